"""InfluxDB line protocol for readings, with the field types fixed.

Measurement fields are always written as floats and ``epoch``/``t_ms``
always as integers, whatever the node sent, so a field never changes type
within a shard (InfluxDB refuses such a write). Timestamps are milliseconds.
"""

from __future__ import annotations

import math

from .model import Reading

_MEASUREMENT_ESCAPES = str.maketrans({",": r"\,", " ": r"\ ", "\\": "\\\\"})
_KEY_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\\": "\\\\"})


def escape_measurement(name: str) -> str:
    """Escape a measurement name for line protocol."""
    return name.translate(_MEASUREMENT_ESCAPES)


def escape_key(text: str) -> str:
    """Escape a tag key, tag value or field key for line protocol."""
    return text.translate(_KEY_ESCAPES)


def format_float(value: float) -> str:
    """A float as line protocol reads it: never with an ``i`` suffix.

    ``repr`` gives the shortest text that round-trips; a whole number keeps
    its ``.0`` so no reader takes it for an integer.
    """
    if not math.isfinite(value):
        raise ValueError(f"line protocol cannot carry {value!r}")
    return repr(float(value))


def encode(reading: Reading, measurement: str) -> str:
    """One line for ``reading``, timestamped at its receive time in ms."""
    parts = [
        f"{escape_key(name)}={format_float(value)}"
        for name, value in sorted(reading.fields.items())
    ]
    if reading.epoch is not None:
        parts.append(f"epoch={int(reading.epoch)}i")
    if reading.t_ms is not None:
        parts.append(f"t_ms={int(reading.t_ms)}i")
    series = f"{escape_measurement(measurement)},node={escape_key(reading.node)}"
    return f"{series} {','.join(parts)} {reading.received_ms}"
