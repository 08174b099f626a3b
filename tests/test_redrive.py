"""``loadmeter deadletter``: listing records and re-driving refused points."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from loadmeter.cli import main
from loadmeter.deadletter import FILE_NAME, DeadLetter, payload_fields, read_records
from loadmeter.envreader import EnvReader
from loadmeter.model import Reading
from loadmeter.sinks.influx import InfluxSink

from tests.faultproxy import FaultProxy, influx_error_body
from tests.harness import build, publisher, running, settings_for
from tests.services import Mosquitto, VictoriaMetrics, free_port, wait_for

TOKEN = "test-token-not-secret"  # noqa: S105 - VictoriaMetrics ignores it
T0 = 1_764_777_600_123
TOPIC = "home/load_meter/node_main/metrics"
CONFLICT = "influx refused the batch, HTTP 422: field type conflict"

FIRMWARE = {
    "node": "node_main",
    "epoch": 1764777600,
    "t_ms": 5123456,
    "ct1_irms": 1.5,
    "vrms": "230.000",
}

Samples = dict[tuple[str, str, int], float]


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A clean environment with the state under tmp_path; logging reset after."""
    for name in ("SINKS", "DEADLETTER_PATH", "STATE_DIRECTORY", "INFLUX_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("INFLUX_TOKEN", TOKEN)
    monkeypatch.setenv("LOG_FORMAT", "json")
    yield
    structlog.reset_defaults()


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    """Where the command finds the dead letter: the default under STATE_DIR."""
    return tmp_path / "state" / "deadletter"


@pytest.fixture
def deadletter(directory: Path) -> Iterator[DeadLetter]:
    """The dead letter the ingester would write, closed before the command runs."""
    letter = DeadLetter(directory, 2**20)
    yield letter
    letter.close()


def point(n: int, node: str = "node_main") -> Reading:
    """A reading as a sink would have been handed it."""
    fields = {"ct1_irms": 1.234 + n, "ct1_apparpower": 283.82 + n, "vrms": 230.0}
    return Reading(node, T0 + 1000 * n, fields, epoch=1_764_777_600 + n, t_ms=5000 + n)


def refuse(letter: DeadLetter, reading: Reading, sink: str = "influx") -> None:
    """Record ``reading`` as the sink worker does when a sink refuses it."""
    letter.record(
        "sink_refused",
        sink=sink,
        status=422,
        message=CONFLICT,
        node=reading.node,
        received_ms=reading.received_ms,
        epoch=reading.epoch,
        t_ms=reading.t_ms,
        fields=dict(reading.fields),
    )


def reject(letter: DeadLetter, reason: str, payload: bytes, detail: str) -> None:
    """Record a refused message as the dispatcher does."""
    letter.record(
        reason, topic=TOPIC, detail=detail, received_ms=T0, **payload_fields(payload)
    )


def expected(*readings: Reading) -> Samples:
    """What VictoriaMetrics holds once ``readings`` are stored."""
    samples: Samples = {}
    for r in readings:
        clocks = {"epoch": r.epoch, "t_ms": r.t_ms}
        values = {**r.fields, **{k: v for k, v in clocks.items() if v is not None}}
        for name, value in values.items():
            samples[(name, r.node, r.received_ms)] = float(value)
    return samples


def samples_at_least(victoria: VictoriaMetrics, count: int) -> Samples:
    """The stored samples, once at least ``count`` are readable."""

    def enough() -> Samples | None:
        samples = victoria.samples()
        return samples if len(samples) >= count else None

    found = wait_for(enough, what=f"{count} samples")
    assert isinstance(found, dict)
    return found


def records(directory: Path) -> list[dict[str, Any]]:
    """Every record left in the dead letter, oldest first."""
    return list(read_records(directory))


def contents(directory: Path) -> dict[str, str]:
    """The text of every file in the dead-letter directory, by name."""
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


def test_list_shows_every_record_and_a_count_per_reason(
    deadletter: DeadLetter, directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each record appears with its reason, node or topic and detail; then counts."""
    reject(deadletter, "invalid_json", b"{not json", "Expecting property name")
    refuse(deadletter, point(1))
    reject(deadletter, "invalid_json", b"\xff\xfe", "not UTF-8")
    reject(deadletter, "payload_too_large", b"x" * 10, "10 bytes over 4 bytes")
    deadletter.close()

    status = main(["deadletter", "list"])

    out = capsys.readouterr().out.splitlines()
    assert status == 0
    assert "invalid_json" in out[0]
    assert TOPIC in out[0]
    assert "Expecting property name" in out[0]
    assert "sink_refused  node_main  influx: " + CONFLICT in out[1]
    assert out[4:] == [
        "",
        "records per reason:",
        "  invalid_json         2",
        "  payload_too_large    1",
        "  sink_refused         1",
    ]


def test_list_json_filters_by_reason_and_keeps_the_newest(
    deadletter: DeadLetter, capsys: pytest.CaptureFixture[str]
) -> None:
    """--reason and --limit choose records; --json gives them whole, with counts."""
    for n in range(3):
        refuse(deadletter, point(n))
        reject(deadletter, "invalid_json", b"{", "truncated")
    deadletter.close()

    status = main(
        ["deadletter", "list", "--reason", "sink_refused", "--limit", "2", "--json"]
    )

    document = json.loads(capsys.readouterr().out)
    assert status == 0
    assert document["counts"] == {"sink_refused": 3}
    assert [r["received_ms"] for r in document["records"]] == [T0 + 1000, T0 + 2000]
    assert document["records"][0]["fields"] == dict(point(1).fields)


def test_list_shows_a_torn_line_as_unreadable(
    deadletter: DeadLetter, directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line cut short by a crash is listed and counted, not fatal."""
    refuse(deadletter, point(1))
    deadletter.close()
    with (directory / FILE_NAME).open("a") as out:
        out.write('{"time": "2026-12-03T10:00:00.000+00:00", "reason": "sink_re')

    status = main(["deadletter", "list"])

    out = capsys.readouterr().out
    assert status == 0
    assert "  sink_refused         1" in out
    assert "  unreadable           1" in out


def test_redrive_stores_points_exactly_and_removes_only_them(
    deadletter: DeadLetter,
    directory: Path,
    victoria: VictoriaMetrics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused points land with their values and timestamps; rejects stay as written."""
    monkeypatch.setenv("INFLUX_URL", victoria.url)
    reject(deadletter, "invalid_json", b"{not json", "Expecting property name")
    refuse(deadletter, point(1))
    reject(deadletter, "invalid_json", b"\xff\xfe", "not UTF-8")
    refuse(deadletter, point(2, node="garage"))
    refuse(deadletter, point(3))
    deadletter.close()
    lines = (directory / FILE_NAME).read_text().splitlines()

    status = main(["deadletter", "redrive"])

    assert status == 0
    assert samples_at_least(victoria, 15) == expected(
        point(1), point(2, node="garage"), point(3)
    )
    assert (directory / FILE_NAME).read_text().splitlines() == [lines[0], lines[2]]
    assert [r["reason"] for r in records(directory)] == ["invalid_json"] * 2


def test_redrive_empties_points_out_of_every_rotated_file(
    directory: Path, victoria: VictoriaMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Points spread over rotated files all go; each file keeps its other records."""
    monkeypatch.setenv("INFLUX_URL", victoria.url)
    letter = DeadLetter(directory, max_bytes=5 * 600, files=5)
    for n in range(4):
        refuse(letter, point(n))
        reject(letter, "invalid_json", f"{{{n}".encode(), f"reject {n}")
    letter.close()
    before = {
        name: [line for line in text.splitlines() if "invalid_json" in line]
        for name, text in contents(directory).items()
    }

    status = main(["deadletter", "redrive"])

    assert status == 0
    assert len(before) > 2
    assert samples_at_least(victoria, 20) == expected(*(point(n) for n in range(4)))
    after = {name: text.splitlines() for name, text in contents(directory).items()}
    assert after == before
    assert [r["detail"] for r in records(directory)] == [
        f"reject {n}" for n in range(4)
    ]


def test_points_refused_again_stay_with_the_new_message(
    deadletter: DeadLetter,
    directory: Path,
    victoria: VictoriaMetrics,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A sink that still refuses leaves the points in place, now with its new answer."""
    reject(deadletter, "invalid_json", b"{", "truncated")
    refuse(deadletter, point(1))
    refuse(deadletter, point(2))
    deadletter.close()
    body = influx_error_body("invalid", "partial write: bucket is read-only")

    with FaultProxy(victoria.url) as proxy:
        proxy.fail_next(10, status=400, body=body)
        monkeypatch.setenv("INFLUX_URL", proxy.url)
        status = main(["deadletter", "redrive"])

    left = records(directory)
    assert status == 1
    assert len(proxy.requests) == 3
    assert [r["reason"] for r in left] == [
        "invalid_json",
        "sink_refused",
        "sink_refused",
    ]
    assert [r["received_ms"] for r in left[1:]] == [T0 + 1000, T0 + 2000]
    assert {r["status"] for r in left[1:]} == {400}
    assert {r["message"] for r in left[1:]} == {
        "influx refused the batch, HTTP 400: partial write: bucket is read-only"
    }
    assert left[1]["fields"] == dict(point(1).fields)
    assert "stored: 0, refused again: 2," in capsys.readouterr().out


def test_only_the_point_refused_again_stays_when_a_batch_is_split(
    deadletter: DeadLetter,
    directory: Path,
    victoria: VictoriaMetrics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused batch is halved: the good point is stored, the bad one stays."""
    refuse(deadletter, point(1))
    refuse(deadletter, point(2))
    deadletter.close()

    with FaultProxy(victoria.url) as proxy:
        proxy.fail_next(2, status=400, body=influx_error_body("invalid", "bad point"))
        monkeypatch.setenv("INFLUX_URL", proxy.url)
        status = main(["deadletter", "redrive"])

    assert status == 1
    assert samples_at_least(victoria, 5) == expected(point(2))
    assert [r["received_ms"] for r in records(directory)] == [T0 + 1000]


def test_unreachable_sink_keeps_every_point_unchanged(
    deadletter: DeadLetter,
    directory: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """When the sink cannot be reached, the dead letter stays byte for byte."""
    monkeypatch.setenv("INFLUX_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("INFLUX_TIMEOUT", "2")
    refuse(deadletter, point(1))
    refuse(deadletter, point(2))
    deadletter.close()
    before = contents(directory)

    status = main(["deadletter", "redrive"])

    assert status == 1
    assert contents(directory) == before
    assert "influx failed, its remaining points stay" in capsys.readouterr().out


def test_dry_run_counts_and_changes_nothing(
    deadletter: DeadLetter,
    directory: Path,
    victoria: VictoriaMetrics,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--dry-run reports what would be re-driven and sends nothing."""
    refuse(deadletter, point(1))
    refuse(deadletter, point(2))
    reject(deadletter, "invalid_json", b"{", "truncated")
    deadletter.close()
    before = contents(directory)

    with FaultProxy(victoria.url) as proxy:
        monkeypatch.setenv("INFLUX_URL", proxy.url)
        status = main(["deadletter", "redrive", "--dry-run"])

    assert status == 0
    assert proxy.requests == []
    assert contents(directory) == before
    assert "to re-drive into influx: 2 points" in capsys.readouterr().out


def test_config_error_exits_2_and_changes_nothing(
    deadletter: DeadLetter,
    directory: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A sink that cannot be configured stops the command before any write."""
    monkeypatch.delenv("INFLUX_TOKEN")
    monkeypatch.setenv("INFLUX_URL", "ftp://influx.example")
    refuse(deadletter, point(1))
    deadletter.close()
    before = contents(directory)

    status = main(["deadletter", "redrive"])

    err = capsys.readouterr().err
    assert status == 2
    assert contents(directory) == before
    assert "config error: INFLUX_URL='ftp://influx.example'" in err
    assert "config error: INFLUX_TOKEN is not set" in err


def test_point_refused_by_an_unknown_sink_stays(
    deadletter: DeadLetter, directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --sink, a point from a sink not registered here is left alone."""
    refuse(deadletter, point(1), sink="memory")
    deadletter.close()
    before = contents(directory)

    status = main(["deadletter", "redrive"])

    assert status == 1
    assert contents(directory) == before
    assert (
        "left, refused by a sink not known here (name one with --sink): 1 point"
        in capsys.readouterr().out
    )


def test_sink_option_re_drives_into_the_named_sink(
    deadletter: DeadLetter,
    directory: Path,
    victoria: VictoriaMetrics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--sink sends every refused point to the sink named, whoever refused it."""
    monkeypatch.setenv("INFLUX_URL", victoria.url)
    refuse(deadletter, point(1), sink="memory")
    refuse(deadletter, point(2), sink="influx")
    deadletter.close()

    status = main(["deadletter", "redrive", "--sink", "influx"])

    assert status == 0
    assert samples_at_least(victoria, 10) == expected(point(1), point(2))
    assert records(directory) == []


def test_malformed_record_stays_and_the_rest_are_re_driven(
    deadletter: DeadLetter,
    directory: Path,
    victoria: VictoriaMetrics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record without a usable reading is kept; the good ones still go."""
    monkeypatch.setenv("INFLUX_URL", victoria.url)
    deadletter.record("sink_refused", sink="influx", node="node_main", fields="x")
    refuse(deadletter, point(1))
    deadletter.close()

    status = main(["deadletter", "redrive"])

    assert status == 1
    assert samples_at_least(victoria, 5) == expected(point(1))
    assert [r["fields"] for r in records(directory)] == ["x"]


def test_point_refused_during_a_real_run_is_re_driven(
    mosquitto: Mosquitto,
    victoria: VictoriaMetrics,
    tmp_path: Path,
    directory: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record the ingester's own worker wrote re-drives as the same point."""
    settings = settings_for(mosquitto, tmp_path / "state")
    with FaultProxy(victoria.url) as proxy:
        proxy.fail_next(100, status=422, body=influx_error_body("invalid", "nope"))
        env = EnvReader({"INFLUX_URL": proxy.url, "INFLUX_TOKEN": TOKEN})
        ingester = build(settings, [InfluxSink.from_env(env, settings)])
        with running(ingester), publisher(mosquitto) as pub:
            pub.send("node_main", FIRMWARE)
            wait_for(lambda: records(directory), what="the dead-letter record")
    [record] = records(directory)
    monkeypatch.setenv("INFLUX_URL", victoria.url)

    status = main(["deadletter", "redrive"])

    assert status == 0
    assert samples_at_least(victoria, 4) == {
        ("ct1_irms", "node_main", record["received_ms"]): 1.5,
        ("vrms", "node_main", record["received_ms"]): 230.0,
        ("epoch", "node_main", record["received_ms"]): 1764777600.0,
        ("t_ms", "node_main", record["received_ms"]): 5123456.0,
    }
    assert records(directory) == []
