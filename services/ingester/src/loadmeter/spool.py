"""The durable spool between receiving and storing, in SQLite (WAL mode).

Readings are appended once, in groups of one transaction each, and get
increasing ids. Each sink has a cursor, the id of the last reading it
stored, and reads at its own pace; a reading is deleted once every sink has
it. The receive time is stored with the reading, so whatever is replayed
after a crash becomes the identical point again.

Duplicates are refused on the way in: a reading whose (node, epoch, t_ms)
was stored within the de-duplication window, or a reading the broker
replayed from its retained store that equals the node's last stored one.

The spool is bounded by ``max_bytes``: when full, the oldest readings are
dropped and reported, never silently.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .model import Reading

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    node TEXT NOT NULL,
    epoch INTEGER,
    t_ms INTEGER,
    fields TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, last_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen (
    node TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    t_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (node, epoch, t_ms)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_by_age ON seen (received_ms);
CREATE TABLE IF NOT EXISTS last_stored (
    node TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    received_ms INTEGER NOT NULL
);
"""
ROW_OVERHEAD = 48
PRUNE_EVERY = 1000


@dataclass(frozen=True, slots=True)
class Arrival:
    """A reading as it arrived; ``replayed`` when from the retained store."""

    reading: Reading
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Batch:
    """Readings for one sink, oldest first; ``last_id`` to advance past them."""

    readings: list[Reading]
    last_id: int


def now_ms() -> int:
    """Wall-clock time in whole milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def digest(reading: Reading) -> str:
    """A fingerprint of what the node sent (not of when it arrived)."""
    content = json.dumps(
        [reading.epoch, reading.t_ms, sorted(reading.fields.items())],
        separators=(",", ":"),
    )
    return hashlib.blake2b(content.encode(), digest_size=16).hexdigest()


class Spool:
    """A bounded, durable, multi-consumer queue of readings."""

    def __init__(
        self,
        path: Path,
        sinks: Sequence[str],
        max_bytes: int,
        dedup_window_s: float,
        on_drop: Callable[[int], None],
        synchronous: str = "FULL",
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.dedup_window_ms = int(dedup_window_s * 1000)
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(SCHEMA)
        self._first_id, self._last_id, self._bytes = self._load_extent()
        self._cursors = self._load_cursors(sinks)
        self._appends = 0

    def _load_cursors(self, sinks: Sequence[str]) -> dict[str, int]:
        # A new sink starts at the oldest reading held; ids below it are gone.
        stored = dict(self._db.execute("SELECT sink, last_id FROM cursors").fetchall())
        start = self._first_id - 1
        cursors = {sink: max(int(stored.get(sink, start)), start) for sink in sinks}
        with self._transaction():
            self._db.execute("DELETE FROM cursors")
            self._db.executemany("INSERT INTO cursors VALUES (?, ?)", cursors.items())
        return cursors

    def _load_extent(self) -> tuple[int, int, int]:
        row = self._db.execute(
            "SELECT MIN(id), MAX(id), COALESCE(SUM(LENGTH(fields) + LENGTH(node)), 0),"
            " COUNT(*) FROM readings"
        ).fetchone()
        last = self._db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name='readings'"
        ).fetchone()
        last_id = int(last[0]) if last else 0
        first_id = int(row[0]) if row[0] is not None else last_id + 1
        return first_id, last_id, int(row[2]) + ROW_OVERHEAD * int(row[3])

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    @property
    def recovered(self) -> int:
        """Readings waiting for at least one sink (e.g. found at start)."""
        with self._lock:
            return self._last_id - min(self._cursors.values(), default=self._last_id)

    def last_received(self) -> dict[str, int]:
        """Each node's last stored receive time, also of readings long gone.

        Receive times identify points in the sinks; a restart must not hand
        out one that an earlier reading of the node already has.
        """
        with self._lock:
            rows = self._db.execute("SELECT node, received_ms FROM last_stored")
            return {str(node): int(ms) for node, ms in rows.fetchall()}

    def append(self, arrivals: Sequence[Arrival]) -> int:
        """Store new readings durably; the number refused as duplicates."""
        with self._changed:
            fresh = self._store(arrivals)
            dropped = self._enforce_bound()
            self._changed.notify_all()
        if dropped:
            self._on_drop(dropped)
        return len(arrivals) - fresh

    def _store(self, arrivals: Sequence[Arrival]) -> int:
        fresh = 0
        with self._transaction():
            for arrival in arrivals:
                if self._is_duplicate(arrival):
                    continue
                self._insert(arrival.reading)
                fresh += 1
            self._appends += 1
            if self._appends % PRUNE_EVERY == 0:
                self._prune_seen()
        return fresh

    def _is_duplicate(self, arrival: Arrival) -> bool:
        reading = arrival.reading
        if arrival.replayed:
            row = self._db.execute(
                "SELECT digest FROM last_stored WHERE node = ?", (reading.node,)
            ).fetchone()
            if row is not None and row[0] == digest(reading):
                return True
        if reading.epoch is None or reading.t_ms is None:
            return False
        # A copy older than the window counts as absent, pruned yet or not.
        cursor = self._db.execute(
            "INSERT INTO seen VALUES (?, ?, ?, ?) ON CONFLICT (node, epoch, t_ms)"
            " DO UPDATE SET received_ms = excluded.received_ms"
            " WHERE seen.received_ms < ?",
            (
                reading.node,
                reading.epoch,
                reading.t_ms,
                reading.received_ms,
                now_ms() - self.dedup_window_ms,
            ),
        )
        return cursor.rowcount == 0

    def _insert(self, reading: Reading) -> None:
        fields = json.dumps(dict(reading.fields), separators=(",", ":"))
        cursor = self._db.execute(
            "INSERT INTO readings (received_ms, node, epoch, t_ms, fields)"
            " VALUES (?, ?, ?, ?, ?)",
            (reading.received_ms, reading.node, reading.epoch, reading.t_ms, fields),
        )
        self._db.execute(
            "INSERT OR REPLACE INTO last_stored VALUES (?, ?, ?)",
            (reading.node, digest(reading), reading.received_ms),
        )
        self._last_id = int(cursor.lastrowid or self._last_id)
        self._bytes += len(fields) + len(reading.node) + ROW_OVERHEAD

    def _prune_seen(self) -> None:
        horizon = now_ms() - self.dedup_window_ms
        self._db.execute("DELETE FROM seen WHERE received_ms < ?", (horizon,))

    def _enforce_bound(self) -> int:
        # The cut is estimated from the average size; the bytes removed are
        # counted exactly, and the loop goes on while still over the bound.
        first = self._first_id
        while self._bytes > self.max_bytes and self._first_id <= self._last_id:
            average = self._bytes / (self._last_id - self._first_id + 1)
            excess = int((self._bytes - self.max_bytes * 0.9) / average) + 1
            cut = min(self._first_id + excess - 1, self._last_id)
            with self._transaction():
                self._trim(cut)
                for sink, last in self._cursors.items():
                    self._cursors[sink] = max(last, cut)
                self._db.execute("UPDATE cursors SET last_id = MAX(last_id, ?)", (cut,))
        return self._first_id - first

    def pending(self, sink: str, limit: int) -> Batch:
        """Up to ``limit`` readings the sink has not stored yet, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, received_ms, node, epoch, t_ms, fields FROM readings"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (self._cursors[sink], limit),
            ).fetchall()
        readings = [
            Reading(node, received, json.loads(fields), epoch, t_ms)
            for _, received, node, epoch, t_ms, fields in rows
        ]
        return Batch(readings, rows[-1][0] if rows else self._cursors[sink])

    def advance(self, sink: str, last_id: int) -> None:
        """Record that ``sink`` stored everything up to ``last_id``; trim."""
        with self._lock, self._transaction():
            self._cursors[sink] = max(self._cursors[sink], last_id)
            self._db.execute(
                "UPDATE cursors SET last_id = ? WHERE sink = ?",
                (self._cursors[sink], sink),
            )
            done = min(self._cursors.values())
            if done >= self._first_id:
                self._trim(done)

    def _trim(self, done: int) -> None:
        removed = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(fields) + LENGTH(node)), 0), COUNT(*)"
            " FROM readings WHERE id <= ?",
            (done,),
        ).fetchone()
        self._db.execute("DELETE FROM readings WHERE id <= ?", (done,))
        self._bytes -= int(removed[0]) + ROW_OVERHEAD * int(removed[1])
        self._first_id = done + 1

    def wait(self, timeout: float) -> None:
        """Block until the next append or ``timeout`` seconds."""
        with self._changed:
            self._changed.wait(timeout)

    def backlog(self, sink: str) -> tuple[int, int | None]:
        """How many readings wait for ``sink`` and when the oldest arrived."""
        with self._lock:
            cursor = max(self._cursors[sink], self._first_id - 1)
            row = self._db.execute(
                "SELECT received_ms FROM readings WHERE id > ? ORDER BY id LIMIT 1",
                (cursor,),
            ).fetchone()
            return self._last_id - cursor, (int(row[0]) if row else None)

    def close(self) -> None:
        """Checkpoint the WAL and close; waiting readings stay for next start."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
