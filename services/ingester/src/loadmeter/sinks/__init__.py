"""The sink contract and the registry of sinks.

A sink stores batches of readings somewhere. To add one, write a module with
a ``Sink`` subclass and add one line to ``REGISTRY``; the name there is what
``loadmeter run NAME`` and ``SINKS`` accept. ``memory.MemorySink`` is left out
on purpose: it serves tests, which hand it to the ingester directly.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Sequence
from typing import ClassVar

from ..config import Settings
from ..envreader import EnvReader
from ..model import Reading

REGISTRY: dict[str, str] = {
    "print": "loadmeter.sinks.printer:PrintSink",
    "csv": "loadmeter.sinks.csvfile:CsvSink",
    "influx": "loadmeter.sinks.influx:InfluxSink",
}


class Sink(abc.ABC):
    """Stores readings. One worker thread calls a sink; it need not lock.

    ``write`` stores the whole batch or raises a ``SinkError``: a
    ``TransientSinkError`` when the same batch may succeed later, a
    ``PermanentSinkError`` when it cannot.
    """

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def from_env(cls, env: EnvReader, settings: Settings) -> Sink:
        """Build the sink from its own environment variables.

        Problems are recorded in ``env``; the caller raises them together.
        """

    def open(self) -> None:  # noqa: B027 - optional hook, empty by design
        """Acquire files or connections; called once before the first write."""

    @abc.abstractmethod
    def write(self, readings: Sequence[Reading]) -> None:
        """Store every reading of the batch, or raise ``SinkError``."""

    def close(self) -> None:  # noqa: B027 - optional hook, empty by design
        """Release what ``open`` acquired; called once, after the last write."""


def sink_class(name: str) -> type[Sink]:
    """The registered sink class for ``name``; ``KeyError`` if unknown."""
    module_name, _, class_name = REGISTRY[name].partition(":")
    module = importlib.import_module(module_name)
    cls: type[Sink] = getattr(module, class_name)
    return cls
