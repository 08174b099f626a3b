"""Logs as events: JSON off a terminal, console on one, levels and rate limits."""

from __future__ import annotations

import collections
import datetime as dt
import errno
import os
import re
import types
from pathlib import Path

import pytest
from loadmeter import logs
from loadmeter.logs import RateLimiter

from tests.harness import publisher
from tests.process import IngesterProcess, clean_env
from tests.services import Mosquitto, free_port, wait_for

SECRET = "s3cr3t-XYZ"  # noqa: S105 - a marker to look for in output
ANSI = re.compile(r"\x1b\[[0-9;]*m")
REJECTED = 'loadmeter_readings_rejected_total{{reason="{}"}}'


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        """The current fake time."""
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The clock ``RateLimiter`` reads, under the test's control."""
    fake = FakeClock()
    monkeypatch.setattr(logs, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    return fake


def read_terminal(master: int) -> str:
    """Everything the other end of a pseudo-terminal wrote, until it closed."""
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return ANSI.sub("", b"".join(chunks).decode(errors="replace"))


def test_rate_limiter_lets_one_through_per_period(clock: FakeClock) -> None:
    """Within a period repeats are held back; the next one reports how many were."""
    limiter = RateLimiter(period=60.0)

    first = limiter.allow("n1", "invalid_json")
    held = [limiter.allow("n1", "invalid_json") for _ in range(5)]
    clock.now += 60.0
    after = limiter.allow("n1", "invalid_json")

    assert first == 0
    assert held == [None] * 5
    assert after == 5


def test_rate_limiter_keys_are_independent(clock: FakeClock) -> None:
    """One noisy node and reason does not silence another node or reason."""
    limiter = RateLimiter(period=60.0)
    limiter.allow("n1", "invalid_json")

    results = [
        limiter.allow("n1", "not_object"),
        limiter.allow("n2", "invalid_json"),
        limiter.allow("n1", "invalid_json"),
    ]

    assert results == [0, 0, None]


def test_rate_limiter_table_is_bounded(clock: FakeClock) -> None:
    """Past ``max_keys`` the table starts afresh instead of growing."""
    limiter = RateLimiter(period=60.0, max_keys=2)
    limiter.allow("a")
    limiter.allow("b")

    limiter.allow("c")

    assert limiter.allow("a") == 0


def test_logs_are_json_events_off_a_terminal(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Each stderr line is a JSON event with a level and a UTC timestamp."""
    env = clean_env(tmp_path, MQTT_PORT=str(mosquitto.port))
    start = dt.datetime.now(dt.UTC)

    with IngesterProcess(tmp_path, env, ("print",)).start() as process:
        process.wait_ready()
        with publisher(mosquitto) as pub:
            pub.send("n1", b"{oops", retain=False)
        wait_for(lambda: process.metric(REJECTED.format("invalid_json")) == 1)
        code = process.stop().code
    end = dt.datetime.now(dt.UTC)

    assert code == 0
    events = process.events()
    assert all({"event", "level", "timestamp"} <= event.keys() for event in events)
    stamps = [dt.datetime.fromisoformat(event["timestamp"]) for event in events]
    assert all(start <= stamp <= end for stamp in stamps)
    assert all(stamp.utcoffset() == dt.timedelta(0) for stamp in stamps)
    names = process.event_names()
    assert {"ingester_started", "mqtt_connected", "reading_rejected"} <= set(names)
    assert names.index("mqtt_connected") < names.index("reading_rejected")
    assert names[-1] == "ingester_stopped"
    assert process.stdout() == ""


def test_reading_rejected_carries_its_stable_keys(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A reject is a warning naming node, topic, reason, detail and suppressed."""
    env = clean_env(tmp_path, MQTT_PORT=str(mosquitto.port))

    with IngesterProcess(tmp_path, env, ("print",)).start() as process:
        process.wait_ready()
        with publisher(mosquitto) as pub:
            pub.send("n7", b"[1, 2]", retain=False)
        wait_for(lambda: "reading_rejected" in process.event_names())
        process.stop()

    [event] = process.events("reading_rejected")
    assert event["level"] == "warning"
    assert event["node"] == "n7"
    assert event["topic"] == "home/load_meter/n7/metrics"
    assert event["reason"] == "not_object"
    assert event["suppressed"] == 0
    assert isinstance(event["detail"], str)
    assert event["detail"]


def test_a_flood_of_rejects_is_logged_rarely_but_counted_fully(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """500 bad messages from a node give at most 2 warnings per reason, all counted."""
    env = clean_env(tmp_path, MQTT_PORT=str(mosquitto.port))

    with IngesterProcess(tmp_path, env, ("print",)).start() as process:
        process.wait_ready()
        with publisher(mosquitto) as pub:
            for i in range(500):
                pub.send("flood", b"{oops" if i % 2 else b"[1]", qos=1, retain=False)
            pub.send("quiet", b"{oops", qos=1, retain=False)
        wait_for(
            lambda: (
                (
                    process.metric(REJECTED.format("invalid_json")),
                    process.metric(REJECTED.format("not_object")),
                )
                == (251.0, 250.0)
            ),
            what="every reject counted",
        )
        process.stop()

    warnings = collections.Counter(
        (event["node"], event["reason"])
        for event in process.events()
        if event["event"] == "reading_rejected"
    )
    assert set(warnings) == {
        ("flood", "invalid_json"),
        ("flood", "not_object"),
        ("quiet", "invalid_json"),
    }
    assert all(1 <= count <= 2 for count in warnings.values()), warnings


def test_warning_level_hides_info_events(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """With LOG_LEVEL=warning lifecycle events vanish and rejects still show."""
    env = clean_env(tmp_path, MQTT_PORT=str(mosquitto.port), LOG_LEVEL="warning")

    with IngesterProcess(tmp_path, env, ("print",)).start() as process:
        process.wait_ready()
        with publisher(mosquitto) as pub:
            pub.send("n1", b"{oops", retain=False)
        wait_for(lambda: "reading_rejected" in process.event_names())
        code = process.stop().code

    assert code == 0
    assert {event["level"] for event in process.events()} == {"warning"}
    assert process.event_names() == ["reading_rejected"]


def test_console_format_when_asked(tmp_path: Path) -> None:
    """LOG_FORMAT=console writes readable lines, not JSON, even into a pipe."""
    env = clean_env(tmp_path, MQTT_PORT=str(free_port()), LOG_FORMAT="console")

    with IngesterProcess(tmp_path, env, ("print",)).start() as process:
        wait_for(lambda: "ingester_started" in process.stderr())
        code = process.stop().code

    assert code == 0
    lines = process.stderr().splitlines()
    started = next(line for line in lines if "ingester_started" in line)
    assert "[info" in started
    assert "sinks=['print']" in started
    assert not any(line.startswith("{") for line in lines)
    assert "ingester_stopped" in lines[-1]


def test_auto_format_is_console_on_a_terminal(tmp_path: Path) -> None:
    """With LOG_FORMAT unset, logs on a terminal are console lines, not JSON."""
    env = clean_env(tmp_path, MQTT_PORT=str(free_port()))
    master, terminal = os.openpty()

    with IngesterProcess(tmp_path, env, ("print",), stderr=terminal).start() as process:
        os.close(terminal)
        wait_for(lambda: process.status("/healthz") == 200)
        code = process.stop().code
    text = read_terminal(master)

    assert code == 0
    lines = [line for line in text.splitlines() if line.strip()]
    assert any("ingester_started" in line and "[info" in line for line in lines)
    assert not any(line.lstrip().startswith("{") for line in lines)


def test_secrets_never_appear_in_logs(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A run at debug level with failing writes never prints the password or token."""
    env = clean_env(
        tmp_path,
        MQTT_PORT=str(mosquitto.port),
        MQTT_USER="meter",
        MQTT_PASS=SECRET,
        INFLUX_TOKEN=SECRET,
        INFLUX_URL=f"http://127.0.0.1:{free_port()}",
        CSV_PATH=str(tmp_path / "out.csv"),
        LOG_LEVEL="debug",
    )
    failures = 'loadmeter_sink_write_errors_total{kind="transient",sink="influx"}'

    with IngesterProcess(tmp_path, env, ("print", "csv", "influx")).start() as process:
        wait_for(lambda: process.metric("loadmeter_mqtt_connected") == 1)
        with publisher(mosquitto) as pub:
            pub.send("n1", {"ct1_irms": 1.5}, retain=False)
            pub.send("n1", b"{oops", retain=False)
        wait_for(lambda: process.metric(failures) >= 1, what="a failed write")
        process.stop()

    output = process.stdout() + process.stderr()
    assert "reading_rejected" in output
    assert SECRET not in output
    written = [
        p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()
    ]
    assert not [text for text in written if SECRET in text]


def test_library_log_records_are_json_too() -> None:
    """A warning from a library's own logger comes out as a JSON line."""
    import io
    import json
    import logging

    from loadmeter import logs

    stream = io.StringIO()
    logs.configure("info", "json", stream)

    logging.getLogger("urllib3.connectionpool").warning("retrying %s", "x")

    record = json.loads(stream.getvalue().splitlines()[-1])
    assert record["event"] == "retrying x"
    assert record["level"] == "warning"
    assert record["logger"] == "urllib3.connectionpool"
