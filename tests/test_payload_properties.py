"""Properties of the payload model over generated input."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from loadmeter.model import channel_fields
from loadmeter.payload import (
    DROP_REASONS,
    REJECT_REASONS,
    Accepted,
    Limits,
    Rejected,
    node_from_topic,
    parse,
)

LIMITS = Limits(max_payload_bytes=1_048_576, max_ct=2)
FIELD_NAMES = channel_fields(2)
KEYS = [*FIELD_NAMES, "ct0_irms", "ct3_power", "ct01_power", "epoch", "t_ms", "node"]
PROPERTY = settings(max_examples=300, deadline=None)

scalars = (
    st.none()
    | st.booleans()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
numeric_texts = (
    st.floats(allow_nan=True, allow_infinity=True).map(str)
    | st.integers(min_value=-(10**30), max_value=10**30).map(str)
    | st.sampled_from(["nan", "-inf", " 2 ", "1e3", ".5", "5.", "1_0", "0x1", ""])
)
field_values = (
    scalars
    | numeric_texts
    | st.floats(min_value=-1e4, max_value=1e4)
    | st.integers(min_value=0, max_value=2**33)
    | st.lists(scalars, max_size=2)
)
payload_objects = st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=10), field_values, max_size=10
)


def check_outcome(result: Accepted | Rejected) -> None:
    """Assert the invariants every outcome of ``parse`` keeps."""
    if isinstance(result, Rejected):
        assert result.reason in REJECT_REASONS
        assert isinstance(result.detail, str)
        return

    reading = result.reading
    assert reading.fields
    for name, value in reading.fields.items():
        assert name in FIELD_NAMES
        assert type(value) is float
        assert math.isfinite(value)
    assert reading.epoch is None or type(reading.epoch) is int
    assert reading.t_ms is None or type(reading.t_ms) is int
    assert all(reason in DROP_REASONS for _, reason in result.dropped)


@PROPERTY
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise(payload: bytes) -> None:
    """Any bytes at all give an ``Accepted`` or a ``Rejected``, never an error."""
    result = parse(payload, "n1", 0, LIMITS)

    check_outcome(result)


@PROPERTY
@given(json_values, st.sampled_from([None, "n1"]))
def test_arbitrary_json_never_raises(value: Any, topic_node: str | None) -> None:
    """Any JSON document, NaN literals and huge ints included, parses safely."""
    payload = json.dumps(value).encode()

    result = parse(payload, topic_node, 0, LIMITS)

    check_outcome(result)


@PROPERTY
@given(payload_objects)
def test_every_key_is_kept_or_dropped_once(document: dict[str, Any]) -> None:
    """Each key but ``node`` ends as a field, a clock or exactly one drop."""
    document.pop("node", None)

    result = parse(json.dumps(document).encode(), "n1", 0, LIMITS)

    check_outcome(result)
    if isinstance(result, Accepted):
        reading = result.reading
        clocks = (reading.epoch is not None) + (reading.t_ms is not None)
        assert len(reading.fields) + clocks + len(result.dropped) == len(document)


@PROPERTY
@given(payload_objects)
def test_accepted_readings_respect_the_bounds(document: dict[str, Any]) -> None:
    """Measurements and clocks of an accepted reading are within their ranges."""
    document["node"] = "n1"

    result = parse(json.dumps(document).encode(), None, 0, LIMITS)

    check_outcome(result)
    if isinstance(result, Accepted):
        fields = result.reading.fields
        assert all(fields[n] >= 0.0 for n in fields if not n.endswith("_power"))
        assert all(abs(value) <= 1e7 for value in fields.values())
        assert 0 <= (result.reading.epoch or 0) < 2**33
        assert 0 <= (result.reading.t_ms or 0) < 2**32


@PROPERTY
@given(
    st.sampled_from(FIELD_NAMES),
    st.floats(min_value=0.0, max_value=1000.0, allow_subnormal=True),
)
def test_valid_floats_pass_through_unchanged(name: str, value: float) -> None:
    """A valid float in any measurement field comes out exactly as it went in."""
    payload = json.dumps({"node": "n1", name: value}).encode()

    result = parse(payload, "n1", 0, LIMITS)

    assert isinstance(result, Accepted)
    assert result.reading.fields == {name: value}


@PROPERTY
@given(st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True))
def test_topic_node_round_trips(node: str) -> None:
    """The node placed in a metrics topic is the node read back from it."""
    topic = f"home/load_meter/{node}/metrics"

    assert node_from_topic(topic, "home/load_meter") == node
