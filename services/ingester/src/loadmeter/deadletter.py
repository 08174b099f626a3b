"""The dead letter: every refused message or point, as rotating JSON lines.

A record keeps what is needed to understand the refusal and to re-drive it:
the topic and raw payload of a rejected message, or the reading and line of
a point a sink refused, with the sink's own message.

The ingester appends records; ``loadmeter deadletter`` reads the files back
line by line and replaces a changed file atomically, keeping every other
line byte for byte, a line torn by a crash included.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import os
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeGuard

from .model import Reading

FILE_NAME = "deadletter.jsonl"
UNREADABLE = "unreadable"
# Lines are read and written back byte for byte, even a torn one.
KEEP_BYTES = "surrogateescape"


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


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a dead-letter file; ``record`` when it holds a JSON object."""

    path: Path
    text: str
    record: dict[str, Any] | None

    @property
    def reason(self) -> str:
        """The record's reason, or ``unreadable`` for a line that is no record."""
        if self.record is None:
            return UNREADABLE
        return str(self.record.get("reason", "?"))


def dead_letter_files(directory: Path) -> list[Path]:
    """The dead-letter files in ``directory``, oldest first."""
    rotated = [p for p in directory.glob(f"{FILE_NAME}.*") if p.suffix[1:].isdigit()]
    ordered = sorted(rotated, key=lambda p: -int(p.suffix[1:]))
    return [p for p in [*ordered, directory / FILE_NAME] if p.is_file()]


def read_lines(directory: Path) -> list[Line]:
    """Every non-blank line of the dead letter, oldest first."""
    lines = []
    for path in dead_letter_files(directory):
        with path.open(encoding="utf-8", errors=KEEP_BYTES) as handle:
            lines += [
                Line(path, t.rstrip("\n"), _record(t)) for t in handle if t.strip()
            ]
    return lines


def read_records(directory: Path) -> Iterator[dict[str, Any]]:
    """Every record in ``directory``, oldest file first.

    A line that holds no JSON object, such as one torn by a crash, is no
    record and is skipped; ``read_lines`` shows it.
    """
    return (line.record for line in read_lines(directory) if line.record is not None)


def _record(text: str) -> dict[str, Any] | None:
    try:
        record = json.loads(text)
    except ValueError:
        # A line torn by a crash: read as unreadable and kept as it is.
        return None
    return record if isinstance(record, dict) else None


def reading_from(record: Mapping[str, Any]) -> Reading | None:
    """The reading a ``sink_refused`` record holds; None when it is malformed."""
    node, received, fields = (record.get(k) for k in ("node", "received_ms", "fields"))
    epoch, t_ms = record.get("epoch"), record.get("t_ms")
    if not (isinstance(node, str) and node and _whole(received)):
        return None
    if not (isinstance(fields, dict) and all(map(_finite, fields.values()))):
        return None
    if not all(value is None or _whole(value) for value in (epoch, t_ms)):
        return None
    values = {str(name): float(value) for name, value in fields.items()}
    return Reading(node, received, values, epoch, t_ms)


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (math.isfinite(value))
    )


def rewrite(lines: Sequence[Line], changes: Mapping[int, str | None]) -> None:
    """Apply ``changes`` to the files ``lines`` were read from, each atomically.

    ``changes`` maps the index of a line in ``lines`` to its new text, or to
    None to drop it. Every other line stays as it was; a file without a
    change is not touched.
    """
    files: dict[Path, list[str]] = {line.path: [] for line in lines}
    for index, line in enumerate(lines):
        text = changes.get(index, line.text)
        if text is not None:
            files[line.path].append(text)

    for path in {lines[index].path for index in changes}:
        replace_lines(path, files[path])


def replace_lines(path: Path, lines: Sequence[str]) -> None:
    """Replace ``path`` by ``lines`` atomically: temporary file, fsync, rename."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".redrive-")
    try:
        with open(descriptor, "w", encoding="utf-8", errors=KEEP_BYTES) as out:
            out.writelines(line + "\n" for line in lines)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
