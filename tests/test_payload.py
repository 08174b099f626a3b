"""The payload model: rejects, drops, normalisation and node names."""

from __future__ import annotations

import json
import math
import time

import pytest
from loadmeter.payload import (
    DROP_REASONS,
    REJECT_REASONS,
    Accepted,
    Limits,
    Rejected,
    node_from_topic,
    parse,
)

LIMITS = Limits(max_payload_bytes=4096, max_ct=2)
BIG_LIMITS = Limits(max_payload_bytes=1_048_576, max_ct=2)
RECEIVED_MS = 1_764_777_600_123
FIRMWARE_PAYLOAD = (
    b'{"node":"node_main","epoch":1764777600,"t_ms":5123456,'
    b'"ct1_irms":1.234,"ct1_apparpower":283.820,"ct1_power":251.002,"vrms":230.000}'
)


def run(
    payload: bytes, topic_node: str | None = "n1", limits: Limits = LIMITS
) -> Accepted | Rejected:
    """``parse`` with the defaults these tests share."""
    return parse(payload, topic_node, RECEIVED_MS, limits)


def accept(
    payload: bytes, topic_node: str | None = "n1", limits: Limits = LIMITS
) -> Accepted:
    """Parse a payload that must be accepted."""
    result = run(payload, topic_node, limits)
    assert isinstance(result, Accepted), result
    return result


def with_field(name: str, raw_value: str) -> bytes:
    """A payload of node ``n1``, one valid anchor field and ``name``: raw JSON."""
    anchor = "ct2_power" if name != "ct2_power" else "ct1_power"
    return f'{{"node":"n1","{anchor}":1.0,{json.dumps(name)}:{raw_value}}}'.encode()


def test_firmware_payload_becomes_a_complete_reading() -> None:
    """The firmware's own example payload is accepted with every value intact."""
    result = accept(FIRMWARE_PAYLOAD, "node_main")

    reading = result.reading
    assert reading.node == "node_main"
    assert reading.received_ms == RECEIVED_MS
    assert reading.epoch == 1764777600
    assert reading.t_ms == 5123456
    assert dict(reading.fields) == {
        "ct1_irms": 1.234,
        "ct1_apparpower": 283.82,
        "ct1_power": 251.002,
        "vrms": 230.0,
    }
    assert result.dropped == ()


def test_payload_at_the_size_limit_is_accepted() -> None:
    """A payload exactly ``max_payload_bytes`` long is still parsed."""
    limits = Limits(max_payload_bytes=len(FIRMWARE_PAYLOAD), max_ct=2)

    result = run(FIRMWARE_PAYLOAD, "node_main", limits)

    assert isinstance(result, Accepted)


@pytest.mark.parametrize(
    ("payload", "topic_node", "reason"),
    [
        pytest.param(b" " * 4097, "n1", "too_large", id="one-byte-over"),
        pytest.param(b"\xff" * 5000, "n1", "too_large", id="size-before-decoding"),
        pytest.param(b"", "n1", "invalid_json", id="empty"),
        pytest.param(b"{", "n1", "invalid_json", id="truncated"),
        pytest.param(b'{"ct1_irms":1} x', "n1", "invalid_json", id="trailing"),
        pytest.param(b'{"ct1_irms":nan}', "n1", "no_measurements", id="firmware-nan"),
        pytest.param(b'{"ct1_irms":1.0,"n":"\xe9"}', "n1", "invalid_json", id="latin1"),
        pytest.param(b'\xef\xbb\xbf{"ct1_irms":1}', "n1", "invalid_json", id="bom"),
        pytest.param(b"[" * 3000, "n1", "invalid_json", id="deep-array"),
        pytest.param(b'{"":' * 1020, "n1", "invalid_json", id="deep-object"),
        pytest.param(b"[]", "n1", "not_object", id="array"),
        pytest.param(b"1.5", "n1", "not_object", id="number"),
        pytest.param(b'"ct1_irms"', "n1", "not_object", id="string"),
        pytest.param(b"null", "n1", "not_object", id="null"),
        pytest.param(b"true", "n1", "not_object", id="boolean"),
        pytest.param(b'{"ct1_irms":1}', None, "bad_node", id="no-node-anywhere"),
        pytest.param(b'{"ct1_irms":1}', "a b", "bad_node", id="bad-topic-node"),
        pytest.param(b'{"node":5,"ct1_irms":1}', "n1", "bad_node", id="number-node"),
        pytest.param(b'{"node":null,"ct1_irms":1}', None, "bad_node", id="null-node"),
        pytest.param(b'{"node":"","ct1_irms":1}', None, "bad_node", id="empty-node"),
        pytest.param(b'{"node":"n/1","ct1_irms":1}', None, "bad_node", id="slash"),
        pytest.param(b'{"node":"n1\\n","ct1_irms":1}', None, "bad_node", id="newline"),
        pytest.param(b'{"node":"\xc3\xa9","ct1_irms":1}', None, "bad_node", id="utf8"),
        pytest.param(b'{"node":"n2","ct1_irms":1}', "n1", "node_mismatch", id="other"),
        pytest.param(b'{"node":"N1","ct1_irms":1}', "n1", "node_mismatch", id="case"),
        pytest.param(b"{}", "n1", "no_measurements", id="empty-object"),
        pytest.param(b'{"node":"n1"}', "n1", "no_measurements", id="node-only"),
        pytest.param(b'{"epoch":1,"t_ms":2}', "n1", "no_measurements", id="clocks"),
        pytest.param(b'{"ct1_irms":"x"}', "n1", "no_measurements", id="all-dropped"),
        pytest.param(b'{"ct9_irms":1}', "n1", "no_measurements", id="all-unknown-ct"),
    ],
)
def test_reject_reasons(payload: bytes, topic_node: str | None, reason: str) -> None:
    """Each kind of unusable message is rejected whole with its own reason."""
    result = run(payload, topic_node)

    assert isinstance(result, Rejected)
    assert result.reason == reason
    assert result.reason in REJECT_REASONS


@pytest.mark.parametrize(
    ("name", "raw_value", "reason"),
    [
        pytest.param("ct1_power", "true", "not_numeric", id="true"),
        pytest.param("ct1_power", "false", "not_numeric", id="false"),
        pytest.param("ct1_power", "null", "not_numeric", id="null"),
        pytest.param("ct1_power", '"abc"', "not_numeric", id="word"),
        pytest.param("ct1_power", '""', "not_numeric", id="empty-string"),
        pytest.param("ct1_power", '"1,5"', "not_numeric", id="decimal-comma"),
        pytest.param("ct1_power", '"0x10"', "not_numeric", id="hex"),
        pytest.param("ct1_power", '"1_000"', "not_numeric", id="underscores"),
        pytest.param("ct1_power", '"\\u0661"', "not_numeric", id="arabic-digit"),
        pytest.param("ct1_power", '{"v":1}', "not_numeric", id="object"),
        pytest.param("ct1_power", "[1]", "not_numeric", id="array"),
        pytest.param("epoch", '"soon"', "not_numeric", id="epoch-word"),
        pytest.param("epoch", "1.5", "not_numeric", id="epoch-fraction"),
        pytest.param("t_ms", "true", "not_numeric", id="t_ms-bool"),
        pytest.param("ct1_power", "NaN", "not_finite", id="nan-literal"),
        pytest.param("ct1_power", "Infinity", "not_finite", id="inf-literal"),
        pytest.param("ct1_power", "-Infinity", "not_finite", id="minus-inf"),
        pytest.param("ct1_power", "1e400", "not_finite", id="float-overflow"),
        pytest.param("ct1_power", "9" * 400, "not_finite", id="int-beyond-float"),
        pytest.param("ct1_power", '"nan"', "not_finite", id="nan-string"),
        pytest.param("ct1_power", '"-inf"', "not_finite", id="inf-string"),
        pytest.param("ct1_power", '" Infinity "', "not_finite", id="infinity-string"),
        pytest.param("ct1_power", '"1e400"', "not_finite", id="overflow-string"),
        pytest.param("epoch", "NaN", "not_finite", id="epoch-nan"),
        pytest.param("t_ms", '"inf"', "not_finite", id="t_ms-inf"),
        pytest.param("ct1_irms", "-0.001", "out_of_range", id="negative-irms"),
        pytest.param("ct1_irms", "10000.5", "out_of_range", id="huge-irms"),
        pytest.param("ct1_apparpower", "-1", "out_of_range", id="negative-va"),
        pytest.param("ct1_apparpower", "1e8", "out_of_range", id="huge-va"),
        pytest.param("ct1_power", "10000001", "out_of_range", id="huge-power"),
        pytest.param("ct1_power", "-2e7", "out_of_range", id="huge-export"),
        pytest.param("ct1_power", "9" * 30, "out_of_range", id="long-int"),
        pytest.param("vrms", "-1", "out_of_range", id="negative-vrms"),
        pytest.param("vrms", '"1000.5"', "out_of_range", id="high-vrms"),
        pytest.param("epoch", "-1", "out_of_range", id="negative-epoch"),
        pytest.param("epoch", str(2**33), "out_of_range", id="far-epoch"),
        pytest.param("epoch", '"1e20"', "out_of_range", id="epoch-string-huge"),
        pytest.param("t_ms", str(2**32), "out_of_range", id="t_ms-past-wrap"),
        pytest.param("t_ms", "-1", "out_of_range", id="negative-t_ms"),
        pytest.param("ct3_irms", "1", "ct_out_of_range", id="above-max-ct"),
        pytest.param("ct0_power", "1", "ct_out_of_range", id="ct-zero"),
        pytest.param("ct01_power", "1", "ct_out_of_range", id="leading-zero"),
        pytest.param("ct" + "9" * 40 + "_irms", "1", "ct_out_of_range", id="huge-ct"),
        pytest.param("temperature", "21.5", "unknown", id="extra-key"),
        pytest.param("CT1_IRMS", "1", "unknown", id="upper-case"),
        pytest.param("ct1_energy", "1", "unknown", id="unknown-kind"),
        pytest.param("ct1", "1", "unknown", id="bare-ct"),
        pytest.param("vrms2", "1", "unknown", id="vrms-suffix"),
        pytest.param("", "1", "unknown", id="empty-key"),
    ],
)
def test_drop_reasons(name: str, raw_value: str, reason: str) -> None:
    """A bad field is dropped alone with its reason and the reading is kept."""
    result = run(with_field(name, raw_value), limits=BIG_LIMITS)

    assert isinstance(result, Accepted), result
    assert result.dropped == ((name, reason),)
    assert reason in DROP_REASONS
    assert name not in result.reading.fields
    assert len(result.reading.fields) == 1


@pytest.mark.parametrize(
    ("raw_value", "expected"),
    [
        pytest.param("0", 0.0, id="int-zero"),
        pytest.param("-3", -3.0, id="negative-int"),
        pytest.param("1.5", 1.5, id="float"),
        pytest.param("1E2", 100.0, id="exponent"),
        pytest.param("-0.0", 0.0, id="negative-zero"),
        pytest.param('"2"', 2.0, id="int-string"),
        pytest.param('" 2 "', 2.0, id="padded-string"),
        pytest.param('"1e3"', 1000.0, id="exponent-string"),
        pytest.param('"-1.25"', -1.25, id="negative-string"),
        pytest.param('"+3"', 3.0, id="plus-string"),
        pytest.param('".5"', 0.5, id="leading-dot"),
        pytest.param('"5."', 5.0, id="trailing-dot"),
        pytest.param("251.002", 251.002, id="firmware-format"),
        pytest.param("10000000", 1e7, id="power-limit"),
    ],
)
def test_measurements_become_floats(raw_value: str, expected: float) -> None:
    """Ints, floats and numeric strings all leave as the same ``float``."""
    result = accept(with_field("ct1_power", raw_value))

    value = result.reading.fields["ct1_power"]
    assert type(value) is float
    assert value == expected
    assert math.copysign(1.0, value) == math.copysign(1.0, expected)


@pytest.mark.parametrize(
    ("name", "raw_value", "expected"),
    [
        pytest.param("epoch", "1764777600", 1764777600, id="epoch-int"),
        pytest.param("epoch", "1764777600.0", 1764777600, id="epoch-integral-float"),
        pytest.param("epoch", '"1764777600"', 1764777600, id="epoch-string"),
        pytest.param("epoch", "0", 0, id="epoch-unsynced"),
        pytest.param("epoch", str(2**33 - 1), 2**33 - 1, id="epoch-limit"),
        pytest.param("t_ms", "5.0", 5, id="t_ms-integral-float"),
        pytest.param("t_ms", '" 12 "', 12, id="t_ms-string"),
        pytest.param("t_ms", '"12.0"', 12, id="t_ms-integral-string"),
        pytest.param("t_ms", "0", 0, id="t_ms-after-reboot"),
        pytest.param("t_ms", str(2**32 - 1), 2**32 - 1, id="t_ms-before-wrap"),
    ],
)
def test_clocks_become_ints(name: str, raw_value: str, expected: int) -> None:
    """``epoch`` and ``t_ms`` leave as ``int`` whatever numeric form they came in."""
    result = accept(with_field(name, raw_value))

    value = getattr(result.reading, name)
    assert type(value) is int
    assert value == expected
    assert result.dropped == ()


def test_missing_clocks_are_none_and_not_dropped() -> None:
    """A node that sends no clocks gets ``None`` for both, with nothing dropped."""
    result = accept(b'{"ct1_irms":0.5}')

    assert result.reading.epoch is None
    assert result.reading.t_ms is None
    assert result.dropped == ()


def test_bad_clocks_are_dropped_and_the_reading_kept() -> None:
    """Invalid ``epoch`` and ``t_ms`` cost only themselves, not the measurements."""
    result = accept(b'{"epoch":-5,"t_ms":"later","ct1_irms":0.5}')

    assert result.reading.epoch is None
    assert result.reading.t_ms is None
    assert dict(result.reading.fields) == {"ct1_irms": 0.5}
    assert result.dropped == (("epoch", "out_of_range"), ("t_ms", "not_numeric"))


def test_drops_are_listed_in_payload_order() -> None:
    """Several dropped fields are each reported once, in the order they came."""
    payload = b'{"x":1,"ct1_irms":"nan","ct1_power":2,"ct5_power":3,"vrms":true}'

    result = accept(payload)

    assert result.dropped == (
        ("x", "unknown"),
        ("ct1_irms", "not_finite"),
        ("ct5_power", "ct_out_of_range"),
        ("vrms", "not_numeric"),
    )
    assert dict(result.reading.fields) == {"ct1_power": 2.0}


def test_max_ct_decides_which_channels_exist() -> None:
    """``ct3`` is a measurement when ``max_ct`` is 3 and dropped when it is 2."""
    payload = b'{"ct3_irms":1.5,"ct3_power":-20}'

    wide = run(payload, limits=Limits(4096, 3))
    narrow = run(payload, limits=Limits(4096, 2))

    assert isinstance(wide, Accepted)
    assert dict(wide.reading.fields) == {"ct3_irms": 1.5, "ct3_power": -20.0}
    assert isinstance(narrow, Rejected)
    assert narrow.reason == "no_measurements"


@pytest.mark.parametrize(
    ("payload", "topic_node", "node"),
    [
        pytest.param(b'{"node":"n-1.a_B","ct1_irms":1}', None, "n-1.a_B", id="payload"),
        pytest.param(b'{"ct1_irms":1}', "node_main", "node_main", id="topic"),
        pytest.param(b'{"node":"n1","ct1_irms":1}', "n1", "n1", id="both-agree"),
        pytest.param(b'{"node":"' + b"x" * 64 + b'","ct1_irms":1}', None, "x" * 64),
    ],
)
def test_node_comes_from_payload_or_topic(
    payload: bytes, topic_node: str | None, node: str
) -> None:
    """The payload's node wins when present; otherwise the topic names it."""
    result = accept(payload, topic_node)

    assert result.reading.node == node


def test_node_longer_than_64_is_refused() -> None:
    """A 65-character node name is a ``bad_node``."""
    result = run(b'{"node":"' + b"x" * 65 + b'","ct1_irms":1}', None)

    assert isinstance(result, Rejected)
    assert result.reason == "bad_node"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b'{"node":"' + b"a b" * 3000 + b'","ct1_irms":1}', id="node"),
        pytest.param(b'{"node":"n2' + b"z" * 9000 + b'","ct1_irms":1}', id="mismatch"),
        pytest.param(b'{"' + b"k" * 9000 + b'":"x"}', id="no-measurements"),
        pytest.param(b'{"ct1_irms":1,"a":' + b"1" * 9000 + b"x}", id="json-error"),
    ],
)
def test_reject_detail_stays_short(payload: bytes) -> None:
    """Echoed input in a reject's detail is cut, so logs stay readable."""
    result = run(payload, "n1", BIG_LIMITS)

    assert isinstance(result, Rejected)
    assert len(result.detail) <= 200


def test_dropped_names_are_short_and_encodable() -> None:
    """An unknown key is reported cut to 80 chars, lone surrogates escaped."""
    payload = b'{"ct1_irms":1,"' + b"q" * 5000 + b'":1,"\\ud800":2}'

    result = accept(payload, limits=BIG_LIMITS)

    (long_name, _), (odd_name, _) = result.dropped
    assert long_name == "q" * 80
    assert odd_name.encode("utf-8") == b"\\ud800"


def test_deep_nesting_in_a_field_is_rejected_not_raised() -> None:
    """A field nested beyond the interpreter's recursion limit is a reject."""
    payload = b'{"ct1_irms":1,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    result = run(payload, "n1", Limits(300_000, 2))

    assert isinstance(result, Rejected)
    assert result.reason == "invalid_json"


def test_huge_int_beyond_the_digit_limit_is_dropped_not_raised() -> None:
    """An int longer than Python's int-parsing digit limit is only ``not_finite``."""
    result = run(with_field("ct1_power", "7" * 6000), limits=BIG_LIMITS)

    assert isinstance(result, Accepted)
    assert result.dropped == (("ct1_power", "not_finite"),)


def test_long_digit_string_is_checked_in_linear_time() -> None:
    """A near-numeric string as large as the payload limit cannot stall parsing."""
    raw_value = '"' + "1" * 1_000_000 + 'x"'
    started = time.monotonic()

    result = run(with_field("ct1_power", raw_value), limits=Limits(1_100_000, 2))

    assert time.monotonic() - started < 2.0
    assert isinstance(result, Accepted)
    assert result.dropped == (("ct1_power", "not_numeric"),)


@pytest.mark.parametrize(
    ("topic", "base", "node"),
    [
        pytest.param("home/load_meter/n1/metrics", "home/load_meter", "n1", id="real"),
        pytest.param("h/lm/n1/metrics", "h/lm/", "n1", id="base-with-slash"),
        pytest.param("a/b.c-d_e/metrics", "a", "b.c-d_e", id="short-base"),
        pytest.param("h/lm/metrics", "h/lm", None, id="no-node"),
        pytest.param("h/lm//metrics", "h/lm", None, id="empty-node"),
        pytest.param("h/lm/a/b/metrics", "h/lm", None, id="two-segments"),
        pytest.param("h/lm/n1/status", "h/lm", None, id="status"),
        pytest.param("h/lm/n1/metrics/x", "h/lm", None, id="longer"),
        pytest.param("other/n1/metrics", "h/lm", None, id="other-base"),
        pytest.param("h/lmX/n1/metrics", "h/lm", None, id="base-prefix"),
        pytest.param("a/metrics", "a", None, id="overlap"),
    ],
)
def test_node_from_topic(topic: str, base: str, node: str | None) -> None:
    """Only ``{base}/<one segment>/metrics`` yields a node name."""
    assert node_from_topic(topic, base) == node


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"ct1_irms":nan,"ct1_apparpower":12.000}', "ct1_irms"),
        (b'{"ct1_irms":1.000,"ct1_apparpower":-inf}', "ct1_apparpower"),
        (b'{"ct1_irms":1.000, "vrms" : NAN }', "vrms"),
        (b'{"ct1_irms":1.000,"ct1_power":inf}', "ct1_power"),
    ],
)
def test_c_printed_nan_and_inf_drop_only_their_field(raw: bytes, field: str) -> None:
    """A bare nan or inf, as printf prints it, drops that field and keeps the rest."""
    result = parse(raw, "n1", 1000, LIMITS)

    assert isinstance(result, Accepted)
    assert (field, "not_finite") in result.dropped
    assert field not in result.reading.fields
    assert result.reading.fields


def test_a_word_nan_elsewhere_still_makes_invalid_json() -> None:
    """Only nan or inf in a value's place is repaired; broken JSON stays rejected."""
    result = parse(b'{"ct1_irms":nan', "n1", 1000, LIMITS)

    assert result == Rejected("invalid_json", result.detail)
