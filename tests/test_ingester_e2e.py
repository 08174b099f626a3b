"""The ingester end to end: real broker, real threads, the memory sink."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from loadmeter.deadletter import read_records
from loadmeter.sinks.memory import MemorySink

from tests.harness import build, publisher, running, settings_for
from tests.services import Mosquitto, http_get, wait_for

FIRMWARE = {
    "node": "node_main",
    "epoch": 1764777600,
    "t_ms": 5123456,
    "ct1_irms": 1.234,
    "ct1_apparpower": 283.82,
    "ct1_power": 0,
    "vrms": "230.000",
}


def metric_value(port: int, sample: str) -> float:
    """The value of one sample line (name with labels) on /metrics."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    for line in body.decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not exported")


def test_reading_arrives_normalised_in_the_sink(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A firmware reading with an int and a string reaches the sink as floats."""
    sink = MemorySink()
    ingester = build(settings_for(mosquitto, tmp_path), [sink])

    with running(ingester), publisher(mosquitto) as pub:
        pub.send("node_main", FIRMWARE)
        wait_for(sink.snapshot, what="the reading")

    [reading] = sink.snapshot()
    assert reading.node == "node_main"
    assert dict(reading.fields) == {
        "ct1_irms": 1.234,
        "ct1_apparpower": 283.82,
        "ct1_power": 0.0,
        "vrms": 230.0,
    }
    assert all(type(v) is float for v in reading.fields.values())
    assert (reading.epoch, reading.t_ms) == (1764777600, 5123456)


def test_rejects_are_counted_dead_lettered_and_survived(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Malformed messages are counted by reason and recorded; valid ones still flow."""
    sink = MemorySink()
    settings = settings_for(mosquitto, tmp_path)
    ingester = build(settings, [sink])

    with running(ingester), publisher(mosquitto) as pub:
        pub.send("n1", b"\xff\xfe not json", retain=False)
        pub.send("n1", b"[1, 2]", retain=False)
        pub.send("n1", {"node": "other", "ct1_irms": 1}, retain=False)
        pub.send("bad node!", {"ct1_irms": 1}, retain=False)
        pub.send("n1", {"ct1_irms": "abc"}, retain=False)
        pub.send("n1", {"ct1_irms": 2.5, "ct9_irms": 1, "bogus": 3}, retain=False)
        wait_for(sink.snapshot, what="the valid reading")
        port = ingester.http.port
        wait_for(
            lambda: (
                metric_value(
                    port, 'loadmeter_readings_rejected_total{reason="no_measurements"}'
                )
                == 1
            )
        )
        rejected = {
            reason: metric_value(
                port, f'loadmeter_readings_rejected_total{{reason="{reason}"}}'
            )
            for reason in (
                "invalid_json",
                "not_object",
                "node_mismatch",
                "bad_node",
                "no_measurements",
            )
        }
        dropped_ct = metric_value(
            port, 'loadmeter_fields_dropped_total{reason="ct_out_of_range"}'
        )
        dropped_unknown = metric_value(
            port, 'loadmeter_fields_dropped_total{reason="unknown"}'
        )
        received = metric_value(port, "loadmeter_messages_received_total")

    assert rejected == dict.fromkeys(rejected, 1.0)
    assert (dropped_ct, dropped_unknown, received) == (1.0, 1.0, 6.0)
    assert [r.fields for r in sink.snapshot()] == [{"ct1_irms": 2.5}]
    reasons = sorted(
        record["reason"] for record in read_records(settings.deadletter_path)
    )
    assert reasons == sorted(rejected)
    [binary] = [
        r
        for r in read_records(settings.deadletter_path)
        if r["reason"] == "invalid_json"
    ]
    assert binary["payload_b64"]
    assert binary["topic"] == "home/load_meter/n1/metrics"


def test_probes_follow_the_broker_connection(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """/readyz fails while the broker is down and recovers when it returns."""
    sink = MemorySink()
    ingester = build(settings_for(mosquitto, tmp_path), [sink])

    with running(ingester):
        url = f"http://127.0.0.1:{ingester.http.port}"
        assert http_get(f"{url}/readyz")[0] == 200
        mosquitto.stop()
        wait_for(lambda: http_get(f"{url}/readyz")[0] == 503, what="not ready")
        status_health = http_get(f"{url}/healthz")[0]
        mosquitto.start()
        wait_for(lambda: http_get(f"{url}/readyz")[0] == 200, 45, "ready again")
        with publisher(mosquitto) as pub:
            pub.send("n2", {"ct1_irms": 1.0}, retain=False)
            wait_for(sink.snapshot, what="a reading after the reconnect")

    assert status_health == 200


def test_status_topic_is_online_then_offline(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The ingester announces itself retained and says offline on a clean stop."""
    settings = settings_for(mosquitto, tmp_path)
    ingester = build(settings, [MemorySink()])
    seen: list[bytes] = []

    with publisher(mosquitto) as watcher:
        watcher.client.on_message = lambda c, u, m: seen.append(m.payload)
        watcher.client.subscribe(settings.mqtt.status_topic, qos=1)
        with running(ingester):
            wait_for(lambda: b"online" in seen, what="online")
        wait_for(lambda: seen[-1:] == [b"offline"], what="offline")


def test_metrics_pass_promtool(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """The /metrics output is valid exposition format with every promised metric."""
    import subprocess

    ingester = build(settings_for(mosquitto, tmp_path), [MemorySink()])
    with running(ingester):
        _, body = http_get(f"http://127.0.0.1:{ingester.http.port}/metrics")

    check = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    text = body.decode()
    for name in (
        "loadmeter_messages_received_total",
        "loadmeter_readings_accepted_total",
        'loadmeter_readings_rejected_total{reason="too_large"}',
        'loadmeter_fields_dropped_total{reason="not_finite"}',
        'loadmeter_sink_points_written_total{sink="memory"}',
        'loadmeter_sink_write_errors_total{kind="transient",sink="memory"}',
        "loadmeter_sink_write_duration_seconds_bucket",
        "loadmeter_mqtt_connected",
        "loadmeter_build_info",
    ):
        assert name in text, name
