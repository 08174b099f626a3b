"""The ``csv`` sink: one row per reading, in files a crash cannot corrupt.

``CSV_PATH`` (default ``loadmeter.csv`` in the working directory) names a
file, or a directory: one that exists, or any path ending with ``/`` (created
when missing). A directory gets one file per UTC day of the receive time,
``loadmeter-YYYY-MM-DD.csv``; a batch that spans midnight is split between
the two days' files.

The columns are ``recv_time_utc,node,epoch,t_ms``, then ``ct{i}_irms``,
``ct{i}_apparpower`` and ``ct{i}_power`` for i = 1..``MAX_CT``, then ``vrms``.
Receive times are ISO 8601 UTC with milliseconds; floats are written with
``repr`` so they read back exactly; a value the node did not send is an
empty cell.

A file whose header differs from these columns (``MAX_CT`` changed, say) is
never touched: rows go to ``NAME.1.csv``, ``NAME.2.csv`` ..., the first one
whose header matches or which does not exist yet.

Every file ends at a row boundary. A batch is written with one ``write`` of
whole rows and then ``fsync``; a batch that fails is cut back off before the
error is raised; a row torn by a crash is cut off when the file is next
opened.

A batch may be handed over again after a crash: the spool moves its cursor
only once ``write`` returns, so a crash in between (or during the write)
replays the batch on the next start, in the same order, usually followed by
newer readings. To keep each reading once, opening a file remembers its last
rows, as many as one batch holds (``BATCH_MAX``). When a write starts with
one of them, its leading rows that repeat the remembered ones in order are
already in the file and are skipped; the rest is appended. Rows are
compared byte for byte: the same receive time, node, epoch and ``t_ms`` (which
identify a reading) and the same values, so two different readings are
never taken for each other. Once new rows are appended nothing later can be
a replay, and the remembered rows are dropped. Day files are matched each
against its own tail.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ..config import Settings
from ..envreader import EnvReader
from ..errors import TransientSinkError
from ..model import Reading, channel_fields
from . import Sink

log = structlog.get_logger(__name__)

DEFAULT_PATH = "loadmeter.csv"
DAY_FILE_PREFIX = "loadmeter-"
MAX_ALTERNATIVES = 1000
TAIL_CHUNK = 64 * 1024
OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
DEFAULT_REPLAY_ROWS = 5000


def csv_columns(max_ct: int) -> list[str]:
    """The header row for nodes with up to ``max_ct`` current channels."""
    return ["recv_time_utc", "node", "epoch", "t_ms", *channel_fields(max_ct)]


def alternative_path(path: Path, number: int) -> Path:
    """``path`` numbered before its suffix: ``a.csv`` becomes ``a.1.csv``."""
    return path.with_name(f"{path.stem}.{number}{path.suffix}")


def encode_rows(rows: Sequence[Sequence[str]]) -> bytes:
    """CSV text for ``rows``, each ended by ``\\n``, as UTF-8."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)

    # Node names come from MQTT topics; a lone surrogate must not lose a batch.
    return text.getvalue().encode("utf-8", "backslashreplace")


def reading_row(reading: Reading, fields: Sequence[str]) -> list[str]:
    """The cells of one reading, in the order of ``csv_columns``."""
    clocks = ["" if c is None else str(int(c)) for c in (reading.epoch, reading.t_ms)]
    values = [reading.fields.get(name) for name in fields]
    cells = ["" if v is None else repr(float(v)) for v in values]
    return [reading.received_iso(), reading.node, *clocks, *cells]


def tail_lines(fd: int, size: int, limit: int) -> list[bytes]:
    """The last ``limit`` rows in the first ``size`` bytes, each with its ``\\n``.

    ``size`` must end a row. The header, and a row only partly read, are
    left out: the first line read is always dropped.
    """
    chunks: list[bytes] = []
    newlines = 0
    start = size
    while start > 0 and newlines <= limit:
        step = min(TAIL_CHUNK, start)
        start -= step
        chunks.append(os.pread(fd, step, start))
        newlines += chunks[-1].count(b"\n")
    lines = b"".join(reversed(chunks)).splitlines(keepends=True)
    return lines[1:][-limit:]


def replayed_count(lines: Sequence[bytes], tail: Sequence[bytes]) -> int:
    """How many leading ``lines`` repeat ``tail`` in order from some row on.

    Zero unless the first line is in ``tail``; then the length of the run of
    lines equal to the rows of ``tail`` from that one on.
    """
    if not lines or lines[0] not in tail:
        return 0
    start = tail.index(lines[0])
    count = 0
    for line, seen in zip(lines, tail[start:], strict=False):
        if line != seen:
            break
        count += 1
    return count


def header_allows_append(path: Path, header: bytes) -> bool:
    """Whether rows under ``header`` may go to ``path``.

    True when the file is missing or empty, starts with exactly ``header``,
    or holds only a torn start of it (a crash while it was being created).
    """
    try:
        with path.open("rb") as existing:
            first = existing.readline(len(header) + 1)
    except FileNotFoundError:
        return True
    if first.endswith(b"\n"):
        return first == header
    return header.startswith(first)


def last_row_end(fd: int, size: int) -> int:
    """The offset just after the last ``\\n`` in the first ``size`` bytes."""
    end = size
    while end > 0:
        start = max(0, end - TAIL_CHUNK)
        at = os.pread(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def append_all(fd: int, data: bytes) -> None:
    """Write ``data`` at the end of ``fd``; more calls only after a short write."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_directory(path: Path) -> None:
    """Make a new directory entry in ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class OpenFile:
    """A data file held open for appending.

    ``tail`` holds the rows a replayed batch may repeat: the file's last
    rows when opened, emptied once new rows are appended.
    """

    path: Path
    fd: int
    tail: list[bytes] = field(default_factory=list)

    def skip_replayed(self, lines: Sequence[bytes]) -> int:
        """How many leading ``lines`` the file already ends with; forget them."""
        count = replayed_count(lines, self.tail)
        if count:
            del self.tail[: self.tail.index(lines[0]) + count]
        if count < len(lines):
            self.tail.clear()
        return count


class CsvSink(Sink):
    """Appends rows to a CSV file, or to one file per UTC day in a directory."""

    name = "csv"

    def __init__(
        self,
        path: Path,
        per_day: bool,
        max_ct: int,
        replay_rows: int = DEFAULT_REPLAY_ROWS,
    ) -> None:
        self.path = path
        self.per_day = per_day
        self.replay_rows = replay_rows
        self.fields = channel_fields(max_ct)
        self.header = encode_rows([csv_columns(max_ct)])
        self._open: dict[Path, OpenFile] = {}

    @classmethod
    def from_env(cls, env: EnvReader, settings: Settings) -> CsvSink:
        """``CSV_PATH``: a file, or a directory for one file per UTC day."""
        # Read as a string: a trailing "/" is meaningful and Path drops it.
        raw = env.str("CSV_PATH", DEFAULT_PATH) or DEFAULT_PATH
        path = Path(raw)
        per_day = raw.endswith("/") or path.is_dir()
        if per_day and path.exists() and not path.is_dir():
            env.problem("CSV_PATH", raw, "a directory, or a file path without /")
        return cls(path, per_day, settings.max_ct, settings.batch_max)

    def open(self) -> None:
        """Create the directory, and in single-file mode open the file."""
        try:
            if self.per_day:
                self.path.mkdir(parents=True, exist_ok=True)
            else:
                self._target(self.path)
        except OSError as exc:
            raise TransientSinkError(f"csv: cannot open {self.path}: {exc}") from exc

    def write(self, readings: Sequence[Reading]) -> None:
        """Append the batch and fsync; on failure cut it back off and raise."""
        if not readings:
            return
        groups: dict[Path, list[list[str]]] = {}
        for reading in readings:
            row = reading_row(reading, self.fields)
            groups.setdefault(self._base_for(row[0]), []).append(row)

        written: list[tuple[OpenFile, int]] = []
        try:
            for base, rows in groups.items():
                target = self._target(base)
                lines = [encode_rows([row]) for row in rows]
                fresh = lines[self._skip_replayed(target, lines) :]
                if not fresh:
                    continue
                written.append((target, os.fstat(target.fd).st_size))
                append_all(target.fd, b"".join(fresh))
                os.fsync(target.fd)
        except OSError as exc:
            self._roll_back(written)
            self._close_all()
            raise TransientSinkError(f"csv: cannot append to {base}: {exc}") from exc

        self._close_all(keep=self._base_for(readings[-1].received_iso()))

    def close(self) -> None:
        """Close every open file; each was fsynced after its last batch."""
        self._close_all()

    def _skip_replayed(self, target: OpenFile, lines: list[bytes]) -> int:
        skipped = target.skip_replayed(lines)
        if skipped:
            log.info(
                "csv_replay_skipped",
                sink=self.name,
                path=str(target.path),
                rows=skipped,
                reason="already at the end of the file",
            )
        return skipped

    def _base_for(self, received_iso: str) -> Path:
        if not self.per_day:
            return self.path
        return self.path / f"{DAY_FILE_PREFIX}{received_iso[:10]}.csv"

    def _target(self, base: Path) -> OpenFile:
        target = self._open.get(base)
        if target is None:
            target = self._open[base] = self._open_matching(base)
        return target

    def _open_matching(self, base: Path) -> OpenFile:
        for number in range(MAX_ALTERNATIVES):
            path = alternative_path(base, number) if number else base
            if header_allows_append(path, self.header):
                return self._open_file(path)
            log.warning(
                "csv_header_mismatch",
                sink=self.name,
                path=str(path),
                reason="its header differs from the configured columns",
            )
        last = alternative_path(base, MAX_ALTERNATIVES - 1)
        raise FileExistsError(f"{base} to {last} all have other headers")

    def _open_file(self, path: Path) -> OpenFile:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, OPEN_FLAGS, 0o666)
        try:
            self._cut_torn_row(fd, path)
            size = os.fstat(fd).st_size
            created = size == 0
            if created:
                append_all(fd, self.header)
                os.fsync(fd)
                fsync_directory(path.parent)
            tail = [] if created else tail_lines(fd, size, self.replay_rows)
        except OSError:
            os.close(fd)
            raise
        log.info("csv_file_started", sink=self.name, path=str(path), created=created)
        return OpenFile(path, fd, tail)

    def _cut_torn_row(self, fd: int, path: Path) -> None:
        size = os.fstat(fd).st_size
        keep = last_row_end(fd, size)
        if keep == size:
            return
        os.ftruncate(fd, keep)
        os.fsync(fd)
        log.warning(
            "csv_torn_row_removed",
            sink=self.name,
            path=str(path),
            reason="the file did not end with a newline",
            bytes_removed=size - keep,
        )

    def _roll_back(self, written: list[tuple[OpenFile, int]]) -> None:
        for target, size in written:
            try:
                os.ftruncate(target.fd, size)
                os.fsync(target.fd)
            except OSError as exc:
                # The next open cuts a torn row; whole rows may stay duplicated.
                log.error(
                    "csv_rollback_failed",
                    sink=self.name,
                    path=str(target.path),
                    reason=str(exc),
                )

    def _close_all(self, keep: Path | None = None) -> None:
        for base in [b for b in self._open if b != keep]:
            target = self._open.pop(base)
            try:
                os.close(target.fd)
            except OSError as exc:
                log.warning(
                    "csv_close_failed",
                    sink=self.name,
                    path=str(target.path),
                    reason=str(exc),
                )
