"""The buffer between receiving and storing: each sink reads at its own pace.

Readings are appended once, get increasing ids, and stay until every sink
has taken them. A sink's cursor is the id of the last reading it stored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .model import Reading


@dataclass(frozen=True, slots=True)
class Batch:
    """Readings for one sink, oldest first; ``last_id`` to advance past them."""

    readings: list[Reading]
    last_id: int


class Spool(Protocol):
    """What the dispatcher and the sink workers need of a spool."""

    def append(self, readings: Sequence[Reading]) -> None:
        """Add readings; safe to acknowledge them once this returns."""

    def pending(self, sink: str, limit: int) -> Batch:
        """Up to ``limit`` readings the sink has not stored yet."""

    def advance(self, sink: str, last_id: int) -> None:
        """Record that the sink stored everything up to ``last_id``."""

    def wait(self, timeout: float) -> None:
        """Block until something is appended or ``timeout`` passes."""

    def backlog(self, sink: str) -> tuple[int, int | None]:
        """(readings waiting, receive time in ms of the oldest or None)."""

    def close(self) -> None:
        """Release resources; what is waiting may be lost (memory) or kept."""


DropHandler = Callable[[int], None]


class MemorySpool:
    """A bounded spool in RAM: fast, lost on exit, drops the oldest when full."""

    def __init__(
        self, sinks: Sequence[str], max_readings: int, on_drop: DropHandler
    ) -> None:
        self._items: list[Reading] = []
        self._base_id = 1
        self._cursors = dict.fromkeys(sinks, 0)
        self._max = max_readings
        self._on_drop = on_drop
        self._changed = threading.Condition()

    def append(self, readings: Sequence[Reading]) -> None:
        """Add readings, dropping the oldest beyond the bound."""
        with self._changed:
            self._items.extend(readings)
            overflow = len(self._items) - self._max
            if overflow > 0:
                self._discard(overflow)
            self._changed.notify_all()
        if overflow > 0:
            self._on_drop(overflow)

    def _discard(self, count: int) -> None:
        del self._items[:count]
        self._base_id += count
        for sink, cursor in self._cursors.items():
            self._cursors[sink] = max(cursor, self._base_id - 1)

    def pending(self, sink: str, limit: int) -> Batch:
        """Up to ``limit`` readings after the sink's cursor."""
        with self._changed:
            start = self._cursors[sink] + 1 - self._base_id
            readings = self._items[start : start + limit]
            return Batch(readings, self._cursors[sink] + len(readings))

    def advance(self, sink: str, last_id: int) -> None:
        """Move the cursor and forget what every sink has stored."""
        with self._changed:
            self._cursors[sink] = max(self._cursors[sink], last_id)
            done = min(self._cursors.values()) + 1 - self._base_id
            if done > 0:
                del self._items[:done]
                self._base_id += done

    def wait(self, timeout: float) -> None:
        """Block until the next append or ``timeout`` seconds."""
        with self._changed:
            self._changed.wait(timeout)

    def backlog(self, sink: str) -> tuple[int, int | None]:
        """How many readings wait for ``sink`` and when the oldest arrived."""
        with self._changed:
            start = self._cursors[sink] + 1 - self._base_id
            waiting = len(self._items) - start
            oldest = self._items[start].received_ms if waiting > 0 else None
            return waiting, oldest

    def close(self) -> None:
        """Nothing to release; waiting readings are reported by the caller."""


def now_ms() -> int:
    """Wall-clock time in whole milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000
