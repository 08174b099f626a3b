"""Delivery under faults: real Mosquitto, real VictoriaMetrics, in-process ingester.

Each test publishes firmware-exact readings, breaks the path to the database
in one way, and ends by comparing every stored point (node, timestamp and
values) with every reading published: each must be stored exactly once,
with the values the node sent.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import itertools
import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest
import structlog.testing
from loadmeter.config import Settings
from loadmeter.deadletter import read_records
from loadmeter.envreader import EnvReader
from loadmeter.simulate import readings
from loadmeter.sinks import Sink, sink_class
from loadmeter.sinks.csvfile import CsvSink
from prometheus_client.parser import text_string_to_metric_families

from tests.faultproxy import FaultProxy, influx_error_body
from tests.harness import BASE, Publisher, build, publisher, running, settings_for
from tests.services import Mosquitto, VictoriaMetrics, http_get, wait_for

TOKEN = "fault-test-token"  # noqa: S105 - VictoriaMetrics ignores it
START_EPOCH = 1_764_777_600
NODES = ("node_main", "garage", "heat_pump")
# Stored points are fields by t_ms, by node: {node: {t_ms: {field: value}}}.
Points = dict[str, dict[int, dict[str, float]]]
Published = list[tuple[str, bytes]]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A persistent broker that delivers at the subscription's QoS."""
    workdir = tmp_path / "mqtt"
    workdir.mkdir()
    server = Mosquitto(workdir, extra="upgrade_outgoing_qos true")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def proxy(victoria: VictoriaMetrics) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of VictoriaMetrics' write API."""
    with FaultProxy(victoria.url) as running_proxy:
        yield running_proxy


def influx_sink(url: str, settings: Settings) -> Sink:
    """The influx sink writing to ``url`` with a short timeout."""
    env = EnvReader({"INFLUX_URL": url, "INFLUX_TOKEN": TOKEN, "INFLUX_TIMEOUT": "3"})
    sink = sink_class("influx").from_env(env, settings)
    env.raise_if_problems()
    return sink


def csv_sink(path: Path, settings: Settings) -> Sink:
    """The csv sink writing one file at ``path``."""
    env = EnvReader({"CSV_PATH": str(path)})
    sink = CsvSink.from_env(env, settings)
    env.raise_if_problems()
    return sink


def expected_points(published: Iterable[tuple[str, bytes]]) -> Points:
    """What the database should hold for the published firmware payloads."""
    points: Points = {}
    for node, payload in published:
        document = json.loads(payload)
        fields = {k: float(v) for k, v in document.items() if k != "node"}
        points.setdefault(node, {})[int(document["t_ms"])] = fields
    return points


def stored_points(
    samples: dict[tuple[str, str, int], float],
) -> tuple[Points, list[str]]:
    """Stored samples grouped into points by t_ms; and t_ms stored more than once."""
    by_stamp: dict[tuple[str, int], dict[str, float]] = {}
    for (field, node, stamp), value in samples.items():
        by_stamp.setdefault((node, stamp), {})[field] = value

    points: Points = {}
    twice: list[str] = []
    for (node, stamp), fields in sorted(by_stamp.items()):
        t_ms = int(fields.get("t_ms", -1))
        if t_ms in points.setdefault(node, {}):
            twice.append(f"{node} t_ms={t_ms} stored again at timestamp {stamp}")
        points[node][t_ms] = fields
    return points, twice


def delivery_diff(expected: Points, samples: dict[tuple[str, str, int], float]) -> str:
    """Every difference between published and stored points; empty when equal."""
    stored, lines = stored_points(samples)
    for node in sorted(expected.keys() | stored.keys()):
        want, got = expected.get(node, {}), stored.get(node, {})
        missing = sorted(want.keys() - got.keys())
        extra = sorted(got.keys() - want.keys())
        changed = [t for t in sorted(want.keys() & got.keys()) if want[t] != got[t]]
        if missing:
            lines.append(f"{node}: {len(missing)} missing, t_ms {missing[:5]}...")
        if extra:
            lines.append(f"{node}: {len(extra)} never published, t_ms {extra[:5]}...")
        lines.extend(
            f"{node} t_ms={t}: published {want[t]}, stored {got[t]}"
            for t in changed[:3]
        )
    return "\n".join(lines)


def assert_all_stored_once(victoria: VictoriaMetrics, expected: Points) -> None:
    """Wait until the database holds exactly ``expected``; show the diff if not."""

    def same() -> bool:
        diff = delivery_diff(expected, victoria.samples())
        assert not diff, f"stored points differ from the published ones:\n{diff}"
        return True

    wait_for(same, 60, "every published reading stored exactly once")


def stored_count(victoria: VictoriaMetrics) -> int:
    """How many points (t_ms samples) the database holds."""
    return sum(1 for key in victoria.samples() if key[0] == "t_ms")


def scrape(ingester_port: int) -> dict[str, float]:
    """Every sample on /metrics, keyed like ``name{label="value",...}``."""
    _, body = http_get(f"http://127.0.0.1:{ingester_port}/metrics")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = (
                sample.value
            )
    return values


def readyz(ingester_port: int) -> tuple[int, str]:
    """The readiness probe's status and the problems it lists."""
    status, body = http_get(f"http://127.0.0.1:{ingester_port}/readyz")
    return status, body.decode()


def influx_blocked(ingester_port: int) -> bool:
    """Whether /readyz fails because the influx sink cannot write."""
    status, problems = readyz(ingester_port)
    return status == 503 and "sink influx: cannot write" in problems


def csv_rows(path: Path) -> list[dict[str, str]]:
    """The data rows of a CSV file, none when it does not exist yet."""
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as rows:
        return list(csv.DictReader(rows))


def rss_bytes() -> int:
    """This process's resident memory."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class Feeder(threading.Thread):
    """Publishes simulated readings of ``nodes`` at a steady pace until stopped."""

    def __init__(self, pub: Publisher, nodes: Sequence[str], pace: float) -> None:
        super().__init__(name="feeder", daemon=True)
        self.pub = pub
        self.pace = pace
        self.source = readings(
            nodes, ct=2, voltage=True, seed=7, start_epoch=START_EPOCH
        )
        self.sent: Published = []
        self.halt = threading.Event()

    def run(self) -> None:
        """Publish one reading per ``pace`` seconds, as nodes do: QoS 0, retained."""
        while not self.halt.wait(self.pace):
            node, payload = next(self.source)
            self.pub.send(node, payload)
            self.sent.append((node, payload))

    def stop(self) -> Published:
        """Stop publishing; everything that was published."""
        self.halt.set()
        self.join(10)
        return list(self.sent)


@contextlib.contextmanager
def feeding(
    pub: Publisher, nodes: Sequence[str] = NODES, pace: float = 0.01
) -> Iterator[Feeder]:
    """A running feeder, stopped on the way out."""
    feeder = Feeder(pub, nodes, pace)
    feeder.start()
    try:
        yield feeder
    finally:
        feeder.stop()


OUTAGE_S = 60


def test_database_outage_loses_nothing_while_csv_keeps_writing(
    broker: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    """Readings made while the database is down arrive once it returns; csv goes on."""
    settings = settings_for(broker, tmp_path / "state")
    csv_path = tmp_path / "readings.csv"
    sinks = [influx_sink(victoria.url, settings), csv_sink(csv_path, settings)]
    ingester = build(settings, sinks)

    with running(ingester), publisher(broker) as pub, feeding(pub) as feed:
        port = ingester.http.port
        wait_for(lambda: stored_count(victoria) >= 20, what="points before the outage")
        victoria.stop()
        wait_for(lambda: influx_blocked(port), 30, "influx reported not ready")
        rows_at_outage = len(csv_rows(csv_path))
        wait_for(
            lambda: len(csv_rows(csv_path)) >= rows_at_outage + 100,
            what="csv rows written during the outage",
        )
        oldest = 'loadmeter_spool_oldest_age_seconds{sink="influx"}'
        wait_for(
            lambda: scrape(port)[oldest] >= OUTAGE_S,
            OUTAGE_S + 30,
            "a minute of outage",
        )
        waiting = scrape(port)['loadmeter_spool_readings{sink="influx"}']
        victoria.start()
        wait_for(lambda: readyz(port)[0] == 200, 60, "ready again")
        published = feed.stop()
        assert_all_stored_once(victoria, expected_points(published))

    assert waiting > 100
    assert not delivery_diff(expected_points(published), victoria.samples())
    in_csv = collections.Counter(
        (r["node"], int(r["t_ms"])) for r in csv_rows(csv_path)
    )
    expected_csv = {
        (node, t) for node, ts in expected_points(published).items() for t in ts
    }
    assert set(in_csv) == expected_csv
    assert set(in_csv.values()) == {1}


def test_rate_limits_and_unavailability_are_waited_out(
    broker: Mosquitto, victoria: VictoriaMetrics, proxy: FaultProxy, tmp_path: Path
) -> None:
    """429 with Retry-After and a run of 503 delay the writes but lose nothing."""
    settings = settings_for(broker, tmp_path / "state")
    ingester = build(settings, [influx_sink(proxy.url, settings)])
    limited = influx_error_body("too many requests", "write limit reached")
    busy = influx_error_body("unavailable", "engine is busy")
    proxy.fail_next(2, status=429, headers={"Retry-After": "2"}, body=limited)
    proxy.fail_next(3, status=503, body=busy)

    with running(ingester), publisher(broker) as pub, feeding(pub) as feed:
        wait_for(lambda: len(proxy.requests) >= 6, 60, "the faults to pass")
        wait_for(lambda: stored_count(victoria) >= 20, what="points after the faults")
        published = feed.stop()
        assert_all_stored_once(victoria, expected_points(published))
        errors = scrape(ingester.http.port)

    assert not delivery_diff(expected_points(published), victoria.samples())
    arrivals = [seen.at for seen in proxy.requests[:3]]
    assert arrivals[1] - arrivals[0] >= 2.0
    assert arrivals[2] - arrivals[1] >= 2.0
    transient = 'loadmeter_sink_write_errors_total{kind="transient",sink="influx"}'
    permanent = 'loadmeter_sink_write_errors_total{kind="permanent",sink="influx"}'
    assert (errors[transient], errors[permanent]) == (5, 0)


def test_points_refused_as_invalid_are_dead_lettered_and_the_rest_stored(
    broker: Mosquitto, victoria: VictoriaMetrics, proxy: FaultProxy, tmp_path: Path
) -> None:
    """A 400 for some points isolates exactly those into the dead letter."""
    settings = settings_for(broker, tmp_path / "state", FLUSH_INTERVAL="0.5")
    ingester = build(settings, [influx_sink(proxy.url, settings)])
    conflict = 'partial write: field type conflict: input field "ct1_irms"'
    proxy.refuse(
        status=400,
        containing=b"node=poison ",
        body=influx_error_body("invalid", conflict),
    )

    with running(ingester), publisher(broker) as pub:
        with feeding(pub, ("node_main", "poison", "garage", "heat_pump")) as feed:
            wait_for(lambda: len(feed.sent) >= 300, what="readings published")
        published = feed.sent
        good = [(node, payload) for node, payload in published if node != "poison"]
        poison = expected_points(published)["poison"]
        assert_all_stored_once(victoria, expected_points(good))
        wait_for(
            lambda: len(list(read_records(settings.deadletter_path))) == len(poison),
            what="every poison reading in the dead letter",
        )
        refused = scrape(ingester.http.port)

    assert not delivery_diff(expected_points(good), victoria.samples())
    records = list(read_records(settings.deadletter_path))
    assert {r["reason"] for r in records} == {"sink_refused"}
    assert {(r["sink"], r["status"], r["node"]) for r in records} == {
        ("influx", 400, "poison")
    }
    assert all(conflict in r["message"] for r in records)
    assert {
        r["t_ms"]: dict(r["fields"], epoch=r["epoch"], t_ms=r["t_ms"]) for r in records
    } == poison
    assert refused['loadmeter_deadletter_records_total{reason="sink_refused"}'] == len(
        poison
    )


def malformed(index: int) -> tuple[str, bytes, str]:
    """The ``index``-th malformed message: topic, payload and expected reason."""
    kinds = [
        (f"{BASE}/junk/metrics", b'{"node": "junk", "ct1_irms": 1.0', "invalid_json"),
        (f"{BASE}/junk/metrics", bytes([0xFF, 0xFE, index % 256, 0]), "invalid_json"),
        (f"{BASE}/junk/metrics", b"[1.0, 2.0, 3.0]", "not_object"),
        (f"{BASE}/bad node!/metrics", b'{"ct1_irms": 1.0}', "bad_node"),
        (f"{BASE}/junk/metrics", b'{"ct1_irms": "' + b"9" * 5000 + b'"}', "too_large"),
        (
            f"{BASE}/junk/metrics",
            b'{"node": "junk", "epoch": 1, "fan": 2}',
            "no_measurements",
        ),
    ]
    return kinds[index % len(kinds)]


def test_flood_of_malformed_messages_is_refused_and_counted_in_bounded_memory(
    broker: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    """Ten thousand malformed messages are dead-lettered; valid ones are all stored."""
    settings = settings_for(broker, tmp_path / "state")
    ingester = build(settings, [influx_sink(victoria.url, settings)])
    valid = readings(NODES, ct=2, voltage=True, seed=11, start_epoch=START_EPOCH)
    published: Published = []
    reasons: collections.Counter[str] = collections.Counter()

    with running(ingester), publisher(broker) as pub:
        port = ingester.http.port
        rss_before = rss_bytes()
        for index in range(10_000):
            topic, payload, reason = malformed(index)
            pub.client.publish(topic, payload, qos=0)
            reasons[reason] += 1
            if index % 10 == 0:
                node, reading = next(valid)
                pub.client.publish(f"{BASE}/{node}/metrics", reading, qos=0)
                published.append((node, reading))
        pub.send("junk", b"[0]", retain=False)
        reasons["not_object"] += 1
        wait_for(
            lambda: (
                scrape(port)["loadmeter_messages_received_total"]
                == 10_001 + len(published)
            ),
            60,
            "every message received",
        )
        assert_all_stored_once(victoria, expected_points(published))
        rss_after = rss_bytes()
        counted = scrape(port)

    assert not delivery_diff(expected_points(published), victoria.samples())
    in_deadletter = collections.Counter(
        r["reason"] for r in read_records(settings.deadletter_path)
    )
    assert in_deadletter == reasons
    for reason, count in reasons.items():
        assert (
            counted[f'loadmeter_readings_rejected_total{{reason="{reason}"}}'] == count
        )
        assert (
            counted[f'loadmeter_deadletter_records_total{{reason="{reason}"}}'] == count
        )
    assert counted["loadmeter_readings_accepted_total"] == len(published)
    assert rss_after - rss_before < 100 * 2**20


def test_refused_access_keeps_the_data_until_the_token_works(
    broker: Mosquitto, victoria: VictoriaMetrics, proxy: FaultProxy, tmp_path: Path
) -> None:
    """While the database answers 401, readings wait, readiness fails, an error logs."""
    settings = settings_for(broker, tmp_path / "state")
    ingester = build(settings, [influx_sink(proxy.url, settings)])
    unauthorized = influx_error_body("unauthorized", "unauthorized access")

    with (
        structlog.testing.capture_logs() as logged,
        running(ingester),
        publisher(broker) as pub,
        feeding(pub) as feed,
    ):
        port = ingester.http.port
        wait_for(lambda: stored_count(victoria) >= 20, what="points before the 401s")
        proxy.refuse(status=401, body=unauthorized)
        refused_from = len(proxy.requests)
        wait_for(lambda: influx_blocked(port), what="influx reported not ready")
        wait_for(lambda: len(proxy.requests) >= refused_from + 3, 30, "three refusals")
        waiting = scrape(port)['loadmeter_spool_readings{sink="influx"}']
        proxy.stop_refusing()
        wait_for(lambda: readyz(port)[0] == 200, 60, "ready again")
        published = feed.stop()
        assert_all_stored_once(victoria, expected_points(published))

    assert not delivery_diff(expected_points(published), victoria.samples())
    assert waiting > 0
    failures = [e for e in logged if e["event"] == "sink_write_failed"]
    assert failures[0]["log_level"] == "error"
    assert failures[0]["sink"] == "influx"
    assert "HTTP 401" in failures[0]["error"]
    assert "unauthorized access" in failures[0]["error"]


def test_backlog_queued_while_the_ingester_was_away_is_stored_whole(
    broker: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    """A backlog the broker delivers in a burst keeps every reading as its own point."""
    settings = settings_for(broker, tmp_path / "state")
    with running(build(settings, [influx_sink(victoria.url, settings)])) as first:
        # Subscribed once, the broker keeps the session and queues for it.
        assert first.mqtt.connected

    source = readings(NODES[:2], ct=2, voltage=True, seed=5, start_epoch=START_EPOCH)
    published = list(itertools.islice(source, 3000))
    with publisher(broker) as pub:
        for node, payload in published:
            sent = pub.client.publish(f"{BASE}/{node}/metrics", payload, retain=True)
        sent.wait_for_publish(10)

    with running(build(settings, [influx_sink(victoria.url, settings)])):
        assert_all_stored_once(victoria, expected_points(published))

    assert not delivery_diff(expected_points(published), victoria.samples())
