"""A sink that keeps readings in a list: for tests and experiments."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ..config import Settings
from ..envreader import EnvReader
from ..errors import SinkError
from ..model import Reading
from . import Sink


class MemorySink(Sink):
    """Appends every batch to ``readings``; ``fail_with`` makes writes raise."""

    name = "memory"

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.fail_with: SinkError | None = None
        self.lock = threading.Lock()

    @classmethod
    def from_env(cls, env: EnvReader, settings: Settings) -> MemorySink:
        """The memory sink takes no settings."""
        return cls()

    def write(self, readings: Sequence[Reading]) -> None:
        """Store the batch, or raise the configured failure."""
        with self.lock:
            if self.fail_with is not None:
                raise self.fail_with
            self.readings.extend(readings)

    def snapshot(self) -> list[Reading]:
        """A copy of everything stored so far."""
        with self.lock:
            return list(self.readings)
