"""The payload model: one MQTT message in, one validated reading or a reason out.

A message is rejected whole (``Rejected``) when it cannot be a reading at
all: too large, not UTF-8 JSON, not an object, no usable node name, or no
usable measurement. Otherwise it is accepted (``Accepted``) and each field
that could not be used is dropped alone, with a reason, so one bad value
never costs the rest of the reading.

Numbers arrive as JSON ints, JSON floats or numeric strings; every
measurement leaves as a finite ``float`` and ``epoch``/``t_ms`` as ``int``,
which keeps each InfluxDB field at one type. A value is dropped as
``out_of_range`` outside these bounds, chosen wide enough for any mains
installation and narrow enough to catch a corrupted or unscaled value:

================  ====================  ==================================
field             accepted range        why
================  ====================  ==================================
ct{i}_irms        0 .. 10,000 A         RMS is never negative; 10 kA is
                                        far beyond any clamp's rating
ct{i}_apparpower  0 .. 10,000,000 VA    apparent power is never negative
ct{i}_power       -10 MW .. 10 MW       real power is negative when
                                        exporting
vrms              0 .. 1,000 V          0 V is a disconnected transformer;
                                        no household supply reaches 1 kV
epoch             0 <= epoch < 2**33    whole seconds; a clock not yet
                                        synced reads near 0
t_ms              0 .. 2**32 - 1        the firmware's unsigned 32-bit
                                        ``millis()``
================  ====================  ==================================

``epoch`` and ``t_ms`` may also arrive as whole floats (``5.0``); a fraction
drops them as ``not_numeric``. Channels exist for i = 1..``max_ct`` spelled
without leading zeros; any other ``ct<digits>_<kind>`` is ``ct_out_of_range``.
Node names are 1 to 64 of ``A-Z a-z 0-9 _ . -``. Dropped key names are cut
to 80 characters, like any input echoed in a reject's detail.

``parse`` never raises, whatever the bytes: hostile nesting, huge numbers
and ``NaN`` literals all end as a reject or a dropped field.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .model import Reading, channel_fields

REJECT_REASONS = (
    "too_large",
    "invalid_json",
    "not_object",
    "bad_node",
    "node_mismatch",
    "no_measurements",
)
DROP_REASONS = (
    "not_numeric",
    "not_finite",
    "out_of_range",
    "ct_out_of_range",
    "unknown",
)

MAX_IRMS_A = 1e4
MAX_APPARPOWER_VA = 1e7
MAX_POWER_W = 1e7
MAX_VRMS_V = 1000.0
EPOCH_END = 2**33
T_MS_END = 2**32
DETAIL_CHARS = 80

_RANGES: dict[str, tuple[float, float]] = {
    "irms": (0.0, MAX_IRMS_A),
    "apparpower": (0.0, MAX_APPARPOWER_VA),
    "power": (-MAX_POWER_W, MAX_POWER_W),
    "vrms": (0.0, MAX_VRMS_V),
}
_NODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CHANNEL = re.compile(r"ct[0-9]+_(?:irms|apparpower|power)")
# Unambiguous alternatives, so a long run of digits cannot make it backtrack.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE_WORDS = frozenset(
    sign + word for sign in ("", "+", "-") for word in ("nan", "inf", "infinity")
)
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
# JSON ints longer than this become floats at once: no digit-count limit can
# fire, and a float too large to hold them turns into inf (``not_finite``).
_INT_DIGITS = 20


def _parse_int(text: str) -> int | float:
    """A JSON int, as a float when it is too long to be a sensible int."""
    return int(text) if len(text) <= _INT_DIGITS else float(text)


# Built once: ``json.loads`` with options would build a decoder per message.
# ``NaN`` and ``Infinity`` literals decode to non-finite floats, which the
# field checks then drop as ``not_finite``.
_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_constant=float)

# C's printf("%.3f") prints a non-finite value as a bare ``nan`` or ``inf``,
# which is not JSON. A payload that fails to decode is tried once more with
# those words as JSON's literals, so only that field is dropped, not the
# whole reading.
_C_NONFINITE = re.compile(r"(:\s*)(-?)(nan|inf(?:inity)?)(?=\s*[,}\]])", re.IGNORECASE)


def _as_json_literal(match: re.Match[str]) -> str:
    word = "NaN" if match.group(3).lower() == "nan" else "Infinity"
    sign = match.group(2) if word == "Infinity" else ""
    return f"{match.group(1)}{sign}{word}"


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds a payload is checked against, from the settings."""

    max_payload_bytes: int
    max_ct: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message that cannot become a reading.

    ``reason`` is one of ``REJECT_REASONS``; ``detail`` is short and safe to
    log, with any echoed input cut to about 80 characters.
    """

    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """A reading, and the ``(field name, reason)`` of every field dropped."""

    reading: Reading
    dropped: tuple[tuple[str, str], ...]


def node_from_topic(topic: str, base_topic: str) -> str | None:
    """The node segment of ``{base_topic}/<node>/metrics``, else ``None``."""
    prefix = f"{base_topic.strip('/')}/"
    suffix = "/metrics"
    fits = len(topic) > len(prefix) + len(suffix)
    if not (fits and topic.startswith(prefix) and topic.endswith(suffix)):
        return None

    segment = topic[len(prefix) : -len(suffix)]
    return None if "/" in segment else segment


def parse(
    payload: bytes, topic_node: str | None, received_ms: int, limits: Limits
) -> Accepted | Rejected:
    """Validate and normalise one message; never raises.

    The node is the payload's ``node`` when present, else ``topic_node``;
    when both are given they must agree.
    """
    if len(payload) > limits.max_payload_bytes:
        size = f"{len(payload)} bytes, limit {limits.max_payload_bytes}"
        return Rejected("too_large", size)

    document = _decode(payload)
    if isinstance(document, Rejected):
        return document

    node = _node(document, topic_node)
    if isinstance(node, Rejected):
        return node
    return _collect(document, node, received_ms, limits.max_ct)


def _decode(payload: bytes) -> dict[str, Any] | Rejected:
    """The top-level JSON object, or why there is none."""
    try:
        text = payload.decode("utf-8")
        document = _decode_text(text)
    except UnicodeDecodeError as exc:
        return Rejected("invalid_json", f"not UTF-8 at byte {exc.start}")
    except json.JSONDecodeError as exc:
        return Rejected("invalid_json", f"{exc.msg} at char {exc.pos}")
    except RecursionError:
        return Rejected("invalid_json", "nested too deeply")

    if not isinstance(document, dict):
        return Rejected("not_object", f"top level is {_json_type(document)}")
    return document


def _decode_text(text: str) -> Any:
    """JSON, or JSON with C's bare ``nan``/``inf`` values; else the first error."""
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError:
        repaired, count = _C_NONFINITE.subn(_as_json_literal, text)
        if not count:
            raise
    try:
        return _DECODER.decode(repaired)
    except json.JSONDecodeError:
        return _DECODER.decode(text)


def _node(document: dict[str, Any], topic_node: str | None) -> str | Rejected:
    """The node name the reading belongs to, or why it has none."""
    node = document.get("node", topic_node)
    if not isinstance(node, str):
        shown = _json_type(node) if "node" in document else "missing"
        return Rejected("bad_node", f"node is {shown}")
    if _NODE.fullmatch(node) is None:
        return Rejected("bad_node", f"node {_show(node)} is not 1-64 of A-Za-z0-9_.-")

    if topic_node is not None and node != topic_node:
        shown = f"payload node {_show(node)}, topic node {_show(topic_node)}"
        return Rejected("node_mismatch", shown)
    return node


def _collect(
    document: dict[str, Any], node: str, received_ms: int, max_ct: int
) -> Accepted | Rejected:
    """The reading from a decoded object whose node is settled."""
    document.pop("node", None)
    dropped: list[tuple[str, str]] = []
    epoch = _take_counter(document, "epoch", EPOCH_END, dropped)
    t_ms = _take_counter(document, "t_ms", T_MS_END, dropped)
    fields = _measurements(document, max_ct, dropped)

    if not fields:
        names = ", ".join(f"{name}:{reason}" for name, reason in dropped)
        return Rejected("no_measurements", _clip(names or "no fields"))
    reading = Reading(node, received_ms, fields, epoch, t_ms)
    return Accepted(reading, tuple(dropped))


def _take_counter(
    document: dict[str, Any], key: str, end: int, dropped: list[tuple[str, str]]
) -> int | None:
    """Remove ``key`` and return it as an int in ``0..end-1``, if it is one."""
    if key not in document:
        return None
    outcome = _counter(document.pop(key), end)
    if isinstance(outcome, str):
        dropped.append((key, outcome))
        return None
    return outcome


def _measurements(
    document: dict[str, Any], max_ct: int, dropped: list[tuple[str, str]]
) -> dict[str, float]:
    """Every usable measurement field; the rest are added to ``dropped``."""
    ranges = _ranges(max_ct)
    fields: dict[str, float] = {}
    for key, value in document.items():
        bounds = ranges.get(key)
        outcome = _unknown_reason(key) if bounds is None else _measure(value, bounds)
        if isinstance(outcome, str):
            dropped.append((_clip(key), outcome))
        else:
            fields[key] = outcome
    return fields


@functools.lru_cache(maxsize=32)
def _ranges(max_ct: int) -> dict[str, tuple[float, float]]:
    """Measurement field name to accepted range, for ct1..ct``max_ct``."""
    return {name: _RANGES[name.rpartition("_")[2]] for name in channel_fields(max_ct)}


def _unknown_reason(key: str) -> str:
    """Why a key that names no configured measurement is dropped."""
    return "ct_out_of_range" if _CHANNEL.fullmatch(key) else "unknown"


def _measure(value: object, bounds: tuple[float, float]) -> float | str:
    """``value`` as a finite float within ``bounds``, or the drop reason."""
    number = value if type(value) is float else _number(value)
    if isinstance(number, str):
        return number

    result = float(number) + 0.0  # also folds -0.0 into 0.0
    if bounds[0] <= result <= bounds[1]:  # false for NaN too
        return result
    return "out_of_range" if math.isfinite(result) else "not_finite"


def _counter(value: object, end: int) -> int | str:
    """``value`` as an int in ``0..end-1``, or the drop reason."""
    number = value if type(value) is int else _number(value)
    if isinstance(number, str):
        return number

    if isinstance(number, float):
        if not math.isfinite(number):
            return "not_finite"
        if not number.is_integer():
            return "not_numeric"
        number = int(number)
    return number if 0 <= number < end else "out_of_range"


def _number(value: object) -> int | float | str:
    """A JSON int, float or numeric string as a number, or the drop reason.

    ``bool`` is excluded on purpose: ``true`` is not a measurement.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return "not_numeric"
    if not isinstance(value, str):
        return value

    text = value.strip()
    if _DECIMAL.fullmatch(text):
        return float(text)
    return "not_finite" if text.lower() in _NON_FINITE_WORDS else "not_numeric"


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, with its article."""
    if value is None:
        return "null"
    return _JSON_TYPES.get(type(value), "a number")


def _show(text: str) -> str:
    """``text`` quoted and escaped for a log line, cut to ``DETAIL_CHARS``."""
    return repr(text[:DETAIL_CHARS])


def _clip(text: str) -> str:
    """``text`` cut to ``DETAIL_CHARS`` with unencodable characters escaped."""
    return text[:DETAIL_CHARS].encode("utf-8", "backslashreplace").decode("utf-8")
