"""The ``print`` sink: one readable line per reading on standard output.

A line holds the receive time (UTC, milliseconds), the node, each current
channel that has a value, the voltage and the device clocks, in groups
separated by ``|``::

    2026-12-03T10:00:00.123Z node_main | ct1 1.234 A 283.820 VA 251.002 W
    | 230.000 V | epoch=1764777600 t_ms=5123456

(one line on screen). Channels follow ``MAX_CT`` order; values missing from
the reading are left out; numbers show the firmware's three decimals.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from ..config import Settings
from ..envreader import EnvReader
from ..errors import PermanentSinkError, TransientSinkError
from ..model import Reading, channel_fields
from . import Sink

UNITS = {"irms": "A", "apparpower": "VA", "power": "W", "vrms": "V"}


def format_reading(reading: Reading, fields: Sequence[str]) -> str:
    """The line for ``reading``, its values taken in the order of ``fields``."""
    groups: dict[str, list[str]] = {}
    for name in fields:
        value = reading.fields.get(name)
        if value is not None:
            channel, _, kind = name.rpartition("_")
            group = groups.setdefault(channel, [channel] if channel else [])
            group.append(f"{value:.3f} {UNITS[kind]}")

    clocks = [("epoch", reading.epoch), ("t_ms", reading.t_ms)]
    shown = " ".join(f"{key}={value}" for key, value in clocks if value is not None)
    parts = [f"{reading.received_iso()} {reading.node}"]
    parts += [" ".join(group) for group in groups.values()]
    return " | ".join([*parts, shown] if shown else parts)


class PrintSink(Sink):
    """Writes each batch to ``stream`` (standard output unless given)."""

    name = "print"

    def __init__(self, max_ct: int, stream: TextIO | None = None) -> None:
        self.fields = channel_fields(max_ct)
        self.stream = stream

    @classmethod
    def from_env(cls, env: EnvReader, settings: Settings) -> PrintSink:
        """The print sink reads only ``MAX_CT``, from the core settings."""
        return cls(settings.max_ct)

    def write(self, readings: Sequence[Reading]) -> None:
        """Print the batch, one line per reading, and flush once."""
        if not readings:
            return
        text = "".join(format_reading(r, self.fields) + "\n" for r in readings)
        stream = self.stream or sys.stdout

        try:
            stream.write(text)
            stream.flush()
        except UnicodeEncodeError as exc:
            raise PermanentSinkError(f"print: output cannot show {exc}") from exc
        except OSError as exc:
            raise TransientSinkError(f"print: cannot write output: {exc}") from exc
