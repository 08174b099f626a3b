"""``python -m loadmeter run`` as a real process against a real broker and TSDB."""

from __future__ import annotations

import collections
import csv
import datetime as dt
import itertools
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from loadmeter.simulate import readings

from tests.harness import publisher
from tests.process import IngesterProcess, clean_env, simulate
from tests.services import Mosquitto, VictoriaMetrics, free_port, http_get, wait_for

NODES = ("sim1", "sim2")
SEED = 7
START_EPOCH = 1764777600
TOKEN = "any-token"  # noqa: S105 - VictoriaMetrics accepts any token
Readings = dict[tuple[str, int], dict[str, float]]
WRITTEN = 'loadmeter_sink_points_written_total{{sink="{}"}}'
REJECTED = 'loadmeter_readings_rejected_total{reason="invalid_json"}'
CSV_HEADER = (
    "recv_time_utc,node,epoch,t_ms,"
    "ct1_irms,ct1_apparpower,ct1_power,ct2_irms,ct2_apparpower,ct2_power,vrms"
)
PRINTED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (.*)$")


def now_ms() -> int:
    """Wall-clock time in milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def simulator_args(count: int, interval: float) -> list[str]:
    """``loadmeter simulate`` options for two 2-CT nodes measuring voltage."""
    return [
        *("--nodes", "2", "--ct", "2", "--voltage"),
        *("--count", str(count), "--interval", str(interval)),
        *("--seed", str(SEED), "--start-epoch", str(START_EPOCH)),
    ]


def published_payloads(count: int, interval: float) -> list[tuple[str, bytes]]:
    """The payloads ``simulator_args`` makes the simulator publish, in order."""
    stream = readings(NODES, 2, True, SEED, START_EPOCH, interval or 1.0)
    return list(itertools.islice(stream, count * len(NODES)))


def published(count: int, interval: float) -> Readings:
    """{(node, t_ms): fields} as the payloads carry them, ``%.3f`` read as floats."""
    expected: Readings = {}
    for node, payload in published_payloads(count, interval):
        document = json.loads(payload)
        fields = {k: float(v) for k, v in document.items() if k != "node"}
        expected[(node, document["t_ms"])] = fields
    return expected


def stored_in_victoria(vm: VictoriaMetrics) -> tuple[Readings, list[int]]:
    """VictoriaMetrics' samples regrouped per reading, and every timestamp."""
    grouped: dict[tuple[str, int], dict[str, float]] = collections.defaultdict(dict)
    for (field, node, stamp), value in vm.samples().items():
        grouped[(node, stamp)][field] = value
    stored = {(node, int(f["t_ms"])): f for (node, _), f in grouped.items()}
    return stored, [stamp for _, stamp in grouped]


def newest_per_node(stored: Readings) -> dict[str, int]:
    """The highest device time (t_ms) of each node's readings."""
    newest: dict[str, int] = {}
    for node, t_ms in stored:
        newest[node] = max(t_ms, newest.get(node, t_ms))
    return newest


def wait_for_victoria(vm: VictoriaMetrics, expected: Readings) -> None:
    """Wait until VictoriaMetrics shows each node's last reading of ``expected``.

    Batches are written in order, so once the last one is visible the
    earlier ones are too.
    """
    wait_for(
        lambda: newest_per_node(stored_in_victoria(vm)[0]) == newest_per_node(expected),
        what="the last reading of each node in VictoriaMetrics",
    )


def stored_in_csv(path: Path) -> tuple[Readings, list[int]]:
    """The CSV's rows as readings, and each row's receive time in ms."""
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    stored: Readings = {}
    received = []
    for row in rows:
        stamp = dt.datetime.fromisoformat(row.pop("recv_time_utc"))
        received.append(round(stamp.timestamp() * 1000))
        node = row.pop("node")
        stored[(node, int(row["t_ms"]))] = {k: float(v) for k, v in row.items() if v}
    return stored, received


def expected_print_line(payload: bytes) -> str:
    """What the print sink shows after the receive time, from the payload's text."""
    values = json.loads(payload, parse_float=str)
    channels = [
        f"ct{i} {values[f'ct{i}_irms']} A {values[f'ct{i}_apparpower']} VA"
        f" {values[f'ct{i}_power']} W"
        for i in (1, 2)
    ]
    clocks = f"epoch={values['epoch']} t_ms={values['t_ms']}"
    return " | ".join([values["node"], *channels, f"{values['vrms']} V", clocks])


def run_env(tmp_path: Path, broker: Mosquitto, vm: VictoriaMetrics) -> dict[str, str]:
    """Environment for ``run csv influx`` against ``broker`` and ``vm``."""
    return clean_env(
        tmp_path,
        MQTT_PORT=str(broker.port),
        INFLUX_URL=vm.url,
        INFLUX_TOKEN=TOKEN,
        CSV_PATH=str(tmp_path / "readings.csv"),
    )


def test_simulated_readings_reach_victoria_and_csv_exactly(
    mosquitto: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    """Every reading of a simulator burst is stored in both sinks with exact values."""
    expected = published(count=20, interval=0)
    env = run_env(tmp_path, mosquitto, victoria)

    with IngesterProcess(tmp_path, env, ("csv", "influx")).start() as process:
        process.wait_ready()
        start = now_ms()
        simulate(mosquitto.port, *simulator_args(count=20, interval=0))
        wait_for(lambda: process.metric(WRITTEN.format("influx")) == 40)
        wait_for(lambda: process.metric(WRITTEN.format("csv")) == 40)
        wait_for_victoria(victoria, expected)
        in_victoria, stamps = stored_in_victoria(victoria)
        end = now_ms()
        assert process.stop().code == 0

    assert in_victoria == expected
    assert {node for node, _ in in_victoria} == set(NODES)
    assert len(stamps) == 40
    assert all(start <= stamp <= end for stamp in stamps)
    assert (tmp_path / "readings.csv").read_text().splitlines()[0] == CSV_HEADER
    in_csv, received = stored_in_csv(tmp_path / "readings.csv")
    assert in_csv == expected
    assert sorted(received) == sorted(stamps)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_stops_the_process_cleanly(
    mosquitto: Mosquitto,
    victoria: VictoriaMetrics,
    tmp_path: Path,
    sig: signal.Signals,
) -> None:
    """SIGTERM or SIGINT ends an ingester that has been writing: exit 0 within 10 s."""
    env = run_env(tmp_path, mosquitto, victoria)

    with IngesterProcess(tmp_path, env, ("csv", "influx")).start() as process:
        process.wait_ready()
        simulate(mosquitto.port, *simulator_args(count=5, interval=0))
        wait_for(lambda: process.metric(WRITTEN.format("csv")) == 10)

        code = process.stop(sig, timeout=10).code

    assert code == 0
    assert "Traceback" not in process.stderr()
    names = process.event_names()
    assert names[-1] == "ingester_stopped"
    [received] = process.events("signal_received")
    assert received["signal"] == sig.name


def test_print_sink_writes_one_line_per_reading_to_stdout(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Standard output holds exactly one formatted line per reading and no logs."""
    env = clean_env(tmp_path, MQTT_PORT=str(mosquitto.port))
    payloads = published_payloads(count=5, interval=0)

    with IngesterProcess(tmp_path, env, ("print",)).start() as process:
        process.wait_ready()
        simulate(mosquitto.port, *simulator_args(count=5, interval=0))
        wait_for(lambda: process.metric(WRITTEN.format("print")) == 10)
        assert process.stop().code == 0

    lines = process.stdout().splitlines()
    shown = [match[1] for line in lines if (match := PRINTED.match(line))]
    assert len(shown) == len(lines) == 10
    assert sorted(shown) == sorted(expected_print_line(p) for _, p in payloads)


def test_unreachable_broker_at_start_is_waited_for(tmp_path: Path) -> None:
    """Without a broker the process stays up, unready; it ingests once one appears."""
    port = free_port()
    csv_path = tmp_path / "readings.csv"
    env = clean_env(tmp_path, MQTT_PORT=str(port), CSV_PATH=str(csv_path))
    broker = Mosquitto(tmp_path)
    broker.port = port

    with IngesterProcess(tmp_path, env, ("csv",)).start() as process:
        wait_for(lambda: process.status("/healthz") == 200, what="/healthz")
        ready_status, ready_body = http_get(process.url + "/readyz")
        still_running = process.running
        broker.start()
        try:
            process.wait_ready(timeout=45)
            with publisher(broker) as pub:
                pub.send("late", {"epoch": START_EPOCH, "t_ms": 42, "ct1_irms": 2.5})
            wait_for(lambda: process.metric(WRITTEN.format("csv")) == 1)
            assert process.stop().code == 0
        finally:
            broker.stop()

    assert still_running
    assert (ready_status, ready_body) == (503, b"mqtt: not connected\n")
    in_csv, _ = stored_in_csv(csv_path)
    assert in_csv == {("late", 42): {"epoch": START_EPOCH, "t_ms": 42, "ct1_irms": 2.5}}
    assert "mqtt_connected" in process.event_names()


def test_metrics_endpoint_passes_promtool(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """/metrics of a process that has ingested and rejected passes promtool."""
    env = clean_env(tmp_path, MQTT_PORT=str(mosquitto.port))

    with IngesterProcess(tmp_path, env, ("print",)).start() as process:
        process.wait_ready()
        with publisher(mosquitto) as pub:
            pub.send("n1", {"ct1_irms": 1.0, "bogus": 1}, retain=False)
            pub.send("n1", b"{oops", retain=False)
        wait_for(lambda: process.metric(WRITTEN.format("print")) == 1)
        wait_for(lambda: process.metric(REJECTED) == 1)
        status, body = http_get(process.url + "/metrics")
        assert process.stop().code == 0

    check = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert status == 200
    assert check.returncode == 0, check.stdout + check.stderr
    text = body.decode()
    assert 'loadmeter_readings_rejected_total{reason="invalid_json"} 1.0' in text
    assert 'loadmeter_fields_dropped_total{reason="unknown"} 1.0' in text
