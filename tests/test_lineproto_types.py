"""Parsed and encoded readings keep one type per field in a real influxd 1.x."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loadmeter.lineproto import encode
from loadmeter.model import Reading, channel_fields
from loadmeter.payload import Accepted, Limits, parse

from tests.services import Influxd1

MEASUREMENT = "load_meter"
BASE_MS = 1_764_777_600_000
LIMITS = Limits(max_payload_bytes=4096, max_ct=2)
FIELD_NAMES = channel_fields(2)
MEASUREMENT_TYPES = dict.fromkeys(FIELD_NAMES, "float")
CLOCK_TYPES = {"epoch": "integer", "t_ms": "integer"}
_names = itertools.count()


def create_database(server: Influxd1) -> str:
    """A new, empty database on ``server``; its name."""
    name = f"types_{next(_names)}"
    answer = server.query(f"CREATE DATABASE {name}")
    assert "error" not in json.dumps(answer), answer
    return name


@pytest.fixture
def database(influxd1: Influxd1) -> str:
    """A database of this test's own."""
    return create_database(influxd1)


@pytest.fixture(scope="module")
def shared_database(influxd1: Influxd1) -> str:
    """One database every generated example writes to, so types must agree."""
    return create_database(influxd1)


def reading_from(document: dict[str, Any], node: str, received_ms: int) -> Reading:
    """The reading ``parse`` makes of a JSON ``document`` that must be accepted."""
    result = parse(json.dumps(document).encode(), node, received_ms, LIMITS)
    assert isinstance(result, Accepted), result
    return result.reading


def field_types(server: Influxd1, db: str) -> dict[str, str]:
    """``SHOW FIELD KEYS`` for the measurement, as ``{field: type}``."""
    answer = server.query("SHOW FIELD KEYS FROM load_meter", db)
    (series,) = answer["results"][0]["series"]  # type: ignore[index]
    return dict(series["values"])


def stored_rows(server: Influxd1, db: str, node: str) -> dict[int, dict[str, Any]]:
    """Every stored point of ``node`` as ``{time_ms: {field: value}}``."""
    answer = server.query("SELECT * FROM load_meter", db)
    (series,) = answer["results"][0]["series"]  # type: ignore[index]
    rows: dict[int, dict[str, Any]] = {}
    for values in series["values"]:
        row = dict(zip(series["columns"], values, strict=True))
        if row.pop("node") == node:
            stamp = row.pop("time")
            rows[stamp] = {
                key: value for key, value in row.items() if value is not None
            }
    return rows


def expected_row(reading: Reading) -> dict[str, Any]:
    """What influxd should hold for ``reading``: its fields and its clocks."""
    row: dict[str, Any] = dict(reading.fields)
    if reading.epoch is not None:
        row["epoch"] = reading.epoch
    if reading.t_ms is not None:
        row["t_ms"] = reading.t_ms
    return row


def test_int_float_and_string_values_share_one_field_type(
    influxd1: Influxd1, database: str
) -> None:
    """Ints, floats and numeric strings for the same fields are all written."""
    documents = [
        {"ct1_power": 0, "ct1_irms": 1, "vrms": 230, "epoch": 1764777600, "t_ms": 5},
        {"ct1_power": 1.5, "ct1_irms": 0.25, "vrms": 229.5, "epoch": 1764777601.0},
        {"ct1_power": "2", "ct1_irms": " 0.5 ", "vrms": "231", "t_ms": "7"},
    ]
    readings = [
        reading_from(document, "n1", BASE_MS + 1000 * i)
        for i, document in enumerate(documents)
    ]

    statuses = [
        influxd1.write(database, encode(reading, MEASUREMENT))[0]
        for reading in readings
    ]

    assert statuses == [204, 204, 204]
    assert field_types(influxd1, database) == {
        "ct1_irms": "float",
        "ct1_power": "float",
        "vrms": "float",
        "epoch": "integer",
        "t_ms": "integer",
    }
    # influxd prints a whole float without its ".0", so only the field types
    # above, not these values, show that 0 and 230 were stored as floats.
    assert stored_rows(influxd1, database, "n1") == {
        BASE_MS: {
            "ct1_power": 0.0,
            "ct1_irms": 1.0,
            "vrms": 230.0,
            "epoch": 1764777600,
            "t_ms": 5,
        },
        BASE_MS + 1000: {
            "ct1_power": 1.5,
            "ct1_irms": 0.25,
            "vrms": 229.5,
            "epoch": 1764777601,
        },
        BASE_MS + 2000: {"ct1_power": 2.0, "ct1_irms": 0.5, "vrms": 231.0, "t_ms": 7},
    }


def test_naive_int_then_float_is_refused(influxd1: Influxd1, database: str) -> None:
    """influxd refuses ``ct1_power=0i`` followed by ``ct1_power=1.5``."""
    first = f"{MEASUREMENT},node=n1 ct1_power=0i {BASE_MS}"
    second = f"{MEASUREMENT},node=n1 ct1_power=1.5 {BASE_MS + 1000}"

    first_status, _ = influxd1.write(database, first)
    second_status, body = influxd1.write(database, second)

    assert first_status == 204
    assert second_status == 400
    assert "field type conflict" in body


def test_awkward_floats_are_stored_exactly(influxd1: Influxd1, database: str) -> None:
    """Exponent forms, tiny and limit values round-trip through influxd unchanged."""
    values = [1e-05, 5e-324, 1e-300, 0.1, 2.0, 123456.789, 9999999.999, -1e7, 1e7]
    readings = [
        reading_from({"ct1_power": value}, "n1", BASE_MS + i)
        for i, value in enumerate(values)
    ]

    status, body = influxd1.write(
        database, "\n".join(encode(reading, MEASUREMENT) for reading in readings)
    )

    assert status == 204, body
    assert field_types(influxd1, database) == {"ct1_power": "float"}
    stored = stored_rows(influxd1, database, "n1")
    assert [stored[BASE_MS + i]["ct1_power"] for i in range(len(values))] == values


def number_forms(low: int, high: int) -> st.SearchStrategy[Any]:
    """A number in ``low..high`` as a JSON int, float or numeric string."""
    ints = st.integers(min_value=low, max_value=high)
    floats = st.floats(min_value=low, max_value=high)
    return ints | floats | ints.map(str) | floats.map(repr) | ints.map(float)


documents = st.fixed_dictionaries(
    {"ct1_irms": number_forms(0, 1000)},
    optional={
        **dict.fromkeys(FIELD_NAMES[1:], number_forms(-1000, 1000)),
        "epoch": number_forms(0, 2**33 - 1),
        "t_ms": number_forms(0, 2**32 - 1),
        "junk": st.text(max_size=4),
    },
)


@settings(max_examples=25, deadline=None)
@given(st.lists(documents, min_size=1, max_size=20))
def test_generated_batches_store_without_type_conflict(
    influxd1: Influxd1, shared_database: str, batch: list[dict[str, Any]]
) -> None:
    """Batches of generated payloads write whole and read back as parsed."""
    node = f"gen{next(_names)}"
    readings = [
        reading_from(document, node, BASE_MS + i) for i, document in enumerate(batch)
    ]
    lines = "\n".join(encode(reading, MEASUREMENT) for reading in readings)

    status, body = influxd1.write(shared_database, lines)

    assert status == 204, body
    stored = stored_rows(influxd1, shared_database, node)
    assert stored == {r.received_ms: expected_row(r) for r in readings}
    types = field_types(influxd1, shared_database).items()
    assert set(types) <= set((MEASUREMENT_TYPES | CLOCK_TYPES).items())
