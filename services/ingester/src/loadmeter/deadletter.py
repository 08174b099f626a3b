"""The dead letter: every refused message or point, as rotating JSON lines.

A record keeps what is needed to understand the refusal and to re-drive it:
the topic and raw payload of a rejected message, or the reading and line of
a point a sink refused, with the sink's own message.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

FILE_NAME = "deadletter.jsonl"


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def payload_fields(payload: bytes) -> dict[str, str]:
    """The payload as text when it is UTF-8, else as base64."""
    try:
        return {"payload": payload.decode("utf-8")}
    except UnicodeDecodeError:
        return {"payload_b64": base64.b64encode(payload).decode("ascii")}


class DeadLetter:
    """Appends JSON records to ``directory``, rotating at a size cap.

    The newest file is ``deadletter.jsonl``; older ones ``.1`` .. ``.N``. The
    whole set stays under about ``max_bytes``.
    """

    def __init__(self, directory: Path, max_bytes: int, files: int = 5) -> None:
        self.directory = directory
        self.file_limit = max(1, max_bytes // files)
        self.files = files
        self._lock = threading.Lock()
        self._out: TextIO | None = None
        self._size = 0

    @property
    def path(self) -> Path:
        """The file being written."""
        return self.directory / FILE_NAME

    def _open(self) -> TextIO:
        """The current file, reopened if something replaced it on disk.

        ``loadmeter deadletter redrive`` rewrites the files; a record must
        then go to the new file, not to the replaced one. A last line torn
        by a crash is ended first, so it cannot swallow the next record.
        """
        if self._out is not None and not self._still_current(self._out):
            self._out.close()
            self._out = None
        if self._out is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._out = self.path.open("a", encoding="utf-8")
            self._size = self._out.tell()
            if self._size and not _ends_with_newline(self.path):
                self._out.write("\n")
                self._size += 1
        return self._out

    def _still_current(self, out: TextIO) -> bool:
        try:
            on_disk = self.path.stat()
        except FileNotFoundError:
            return False
        held = os.fstat(out.fileno())
        return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)

    def record(self, reason: str, **fields: Any) -> None:
        """Append one record with its reason and the time it was made."""
        line = json.dumps({"time": _utc_now(), "reason": reason, **fields}, default=str)
        with self._lock:
            out = self._open()
            out.write(line + "\n")
            self._size += len(line) + 1
            if self._size >= self.file_limit:
                self._rotate()

    def _rotate(self) -> None:
        self.sync_locked()
        if self._out is not None:
            self._out.close()
            self._out = None
        for index in range(self.files - 1, 0, -1):
            older = self.directory / f"{FILE_NAME}.{index}"
            newer = self.directory / (
                f"{FILE_NAME}.{index - 1}" if index > 1 else FILE_NAME
            )
            if newer.exists():
                newer.replace(older)

    def sync(self) -> None:
        """Make every record so far durable on disk."""
        with self._lock:
            self.sync_locked()

    def sync_locked(self) -> None:
        """``sync`` for a caller already holding the lock."""
        if self._out is not None:
            self._out.flush()
            os.fsync(self._out.fileno())

    def close(self) -> None:
        """Sync and close the current file."""
        with self._lock:
            self.sync_locked()
            if self._out is not None:
                self._out.close()
                self._out = None


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as raw:
        raw.seek(-1, os.SEEK_END)
        return raw.read(1) == b"\n"


def read_records(directory: Path) -> Iterator[dict[str, Any]]:
    """Every record in ``directory``, oldest file first."""
    rotated = [p for p in directory.glob(f"{FILE_NAME}.*") if p.suffix[1:].isdigit()]
    files = sorted(rotated, key=lambda p: -int(p.suffix[1:]))
    for path in [*files, directory / FILE_NAME]:
        if path.exists():
            with path.open(encoding="utf-8") as lines:
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
