"""prometheus/prometheus.yml, checked by promtool and run by a real
Prometheus that scrapes a stand-in ingester; every PromQL expression of the
dashboards and alert rules is then evaluated against it."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from tests import grafana_queries as gq
from tests.services import Prometheus, require, wait_for

CONFIG = gq.REPO / "prometheus" / "prometheus.yml"
INGESTER_JOB = "loadmeter-ingester"
NODES = ("sim1", "sim2")
SINK = "influxdb"
WRITE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TEST_SCRAPE_INTERVAL = "1s"

# Every metric the ingester promises, by family, with its type.
CONTRACT = {
    "loadmeter_messages_received_total": "counter",
    "loadmeter_readings_accepted_total": "counter",
    "loadmeter_readings_rejected_total": "counter",
    "loadmeter_fields_dropped_total": "counter",
    "loadmeter_sink_points_written_total": "counter",
    "loadmeter_sink_write_errors_total": "counter",
    "loadmeter_sink_write_duration_seconds": "histogram",
    "loadmeter_mqtt_connected": "gauge",
    "loadmeter_node_last_seen_timestamp_seconds": "gauge",
    "loadmeter_build_info": "gauge",
    "loadmeter_queue_dropped_total": "counter",
    "loadmeter_spool_readings": "gauge",
    "loadmeter_spool_oldest_age_seconds": "gauge",
    "loadmeter_spool_dropped_total": "counter",
    "loadmeter_duplicates_dropped_total": "counter",
    "loadmeter_deadletter_records_total": "counter",
}

PROM_QUERIES = gq.all_queries("prometheus")


def _samples(scrape: int, now: float) -> dict[str, list[tuple[str, float]]]:
    """Sample lines per family for the ``scrape``-th scrape: counters keep rising."""
    return {
        "loadmeter_messages_received_total": [("", 100.0 * scrape)],
        "loadmeter_readings_accepted_total": [("", 98.0 * scrape)],
        "loadmeter_readings_rejected_total": [
            ('{reason="invalid_json"}', 2.0 * scrape),
            ('{reason="no_node"}', 0.0),
        ],
        "loadmeter_fields_dropped_total": [('{reason="not_a_number"}', 1.0 * scrape)],
        "loadmeter_sink_points_written_total": [(f'{{sink="{SINK}"}}', 98.0 * scrape)],
        "loadmeter_sink_write_errors_total": [
            (f'{{sink="{SINK}",kind="transient"}}', 1.0 * scrape),
            (f'{{sink="{SINK}",kind="permanent"}}', 0.0),
        ],
        "loadmeter_sink_write_duration_seconds": _histogram(scrape),
        "loadmeter_mqtt_connected": [("", 1.0)],
        "loadmeter_node_last_seen_timestamp_seconds": [
            ('{node="sim1"}', now - 1.0),
            ('{node="sim2"}', now - 300.0),
        ],
        "loadmeter_build_info": [('{version="0.0.0+test"}', 1.0)],
        "loadmeter_queue_dropped_total": [('{queue="inbox"}', 0.0)],
        "loadmeter_spool_readings": [(f'{{sink="{SINK}"}}', 12.0)],
        "loadmeter_spool_oldest_age_seconds": [(f'{{sink="{SINK}"}}', 3.5)],
        "loadmeter_spool_dropped_total": [("", 0.0)],
        "loadmeter_duplicates_dropped_total": [("", 1.0 * scrape)],
        "loadmeter_deadletter_records_total": [('{reason="sink_refused"}', 0.0)],
    }


def _histogram(scrape: int) -> list[tuple[str, float]]:
    """Write-duration buckets, sum and count: ten writes per scrape, spread out."""
    label = f'sink="{SINK}"'
    lines = [
        (f'_bucket{{{label},le="{le}"}}', float(scrape * min(10, i + 1)))
        for i, le in enumerate(WRITE_BUCKETS)
    ]
    lines.append((f'_bucket{{{label},le="+Inf"}}', 10.0 * scrape))
    lines.append((f"_sum{{{label}}}", 0.4 * scrape))
    lines.append((f"_count{{{label}}}", 10.0 * scrape))
    return lines


def exposition(scrape: int, now: float) -> str:
    """Every contract metric in Prometheus' text format, as an ingester exports it."""
    out: list[str] = []
    for family, samples in _samples(scrape, now).items():
        out.append(f"# HELP {family} Sample value for the configuration tests.")
        out.append(f"# TYPE {family} {CONTRACT[family]}")
        for suffix, value in samples:
            name = family + suffix if suffix.startswith("_") else family
            labels = "" if suffix.startswith("_") else suffix
            out.append(f"{name}{labels} {value!r}")
    return "\n".join(out) + "\n"


class _StandInIngester(BaseHTTPRequestHandler):
    """Serves ``exposition`` on /metrics, counting scrapes."""

    scrapes = 0

    def do_GET(self) -> None:
        """Answer a scrape with the next exposition."""
        type(self).scrapes += 1
        body = exposition(type(self).scrapes, time.time()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep scrapes out of the test output."""


@pytest.fixture(scope="module")
def ingester_target() -> Iterator[str]:
    """host:port of the metrics endpoint Prometheus scrapes as the ingester job.

    A stand-in serving the contract metrics; pointing this fixture at a real
    ingester's metrics port runs the same checks against it.
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandInIngester)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def local_config(ingester_target: str, self_target: str) -> str:
    """The real config with loopback targets and a fast scrape for the test."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"]["scrape_interval"] = TEST_SCRAPE_INTERVAL
    config["global"]["evaluation_interval"] = TEST_SCRAPE_INTERVAL
    config["global"]["scrape_timeout"] = TEST_SCRAPE_INTERVAL
    targets = {INGESTER_JOB: ingester_target, "prometheus": self_target}
    for job in config["scrape_configs"]:
        job["scrape_interval"] = TEST_SCRAPE_INTERVAL
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return yaml.safe_dump(config, sort_keys=False)


def _result(prom: Prometheus, expr: str) -> list[dict[str, Any]]:
    """The result vector of an instant query; a failed query fails the test."""
    answer = prom.query(expr)
    assert answer["status"] == "success", f"{expr}: {answer}"
    data = answer["data"]
    assert isinstance(data, dict)
    return list(data["result"])


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, ingester_target: str
) -> Iterator[Prometheus]:
    """A real Prometheus on the repository's config, past its first two scrapes."""
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), "")
    prom.config = local_config(ingester_target, f"127.0.0.1:{prom.port}")
    prom.start()
    probe = "rate(loadmeter_messages_received_total[1m])"
    wait_for(lambda: _result(prom, probe), 30, "two scrapes of the ingester")
    yield prom
    prom.stop()


def _render(query: gq.Query) -> str:
    """``query`` as Grafana sends it to Prometheus, all nodes selected."""
    values = gq.prometheus_macros(
        interval=gq.grafana_duration(query.interval_ms),
        rate_interval="1m",
        range_=gq.grafana_duration(query.range_seconds * 1000),
    )
    values["node"] = gq.regex_value(NODES)
    return gq.substitute(query.text, values)


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; its exit status and output."""
    return subprocess.run(
        [require("promtool"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


# The configuration file


def test_promtool_accepts_the_config() -> None:
    """``promtool check config`` passes on the shipped prometheus.yml."""
    checked = _promtool("check", "config", str(CONFIG))

    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_config_scrapes_the_ingester_every_15_seconds() -> None:
    """The ingester job scrapes ingester:9108 every 15 s, as Grafana assumes."""
    config = yaml.safe_load(CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    ingester = jobs[INGESTER_JOB]
    assert ingester["static_configs"] == [{"targets": ["ingester:9108"]}]
    assert ingester.get("scrape_interval", config["global"]["scrape_interval"]) == "15s"


def test_config_scrapes_prometheus_itself() -> None:
    """Prometheus scrapes its own metrics as job prometheus."""
    config = yaml.safe_load(CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    assert jobs["prometheus"]["static_configs"] == [{"targets": ["localhost:9090"]}]


# The stand-in ingester


def test_stand_in_exposition_passes_promtool() -> None:
    """The stand-in's metrics text is valid, lint-clean exposition format."""
    checked = _promtool("check", "metrics", stdin=exposition(3, time.time()))

    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_contract_metric_is_on_a_dashboard() -> None:
    """Each metric the ingester promises is shown by at least one dashboard query."""
    shown = " ".join(q.text for q in PROM_QUERIES)

    missing = [name for name in CONTRACT if not re.search(rf"\b{name}", shown)]

    assert not missing


# Queries against the running Prometheus


def test_ingester_target_is_up(prometheus: Prometheus) -> None:
    """Prometheus scrapes the ingester job successfully with the shipped config."""
    result = _result(prometheus, f'up{{job="{INGESTER_JOB}"}} == 1')

    assert len(result) == 1


def test_prometheus_scrapes_itself(prometheus: Prometheus) -> None:
    """The self-scrape job works too."""
    wait_for(lambda: _result(prometheus, 'up{job="prometheus"} == 1'), 10)


def test_promql_queries_exist() -> None:
    """The dashboards and alert rules hold PromQL queries for the next test."""
    assert len(PROM_QUERIES) >= 15


@pytest.mark.parametrize("query", PROM_QUERIES, ids=str)
def test_promql_query_succeeds_with_data(
    prometheus: Prometheus, query: gq.Query
) -> None:
    """Each PromQL query, rendered as Grafana renders it, succeeds with samples."""
    expr = _render(query)

    assert _result(prometheus, expr), f"no samples for {expr}"


def test_node_silent_alert_picks_out_only_the_silent_node(
    prometheus: Prometheus,
) -> None:
    """The node-silent rule's query exceeds its 120 s threshold only for sim2."""
    query = next(q for q in PROM_QUERIES if "loadmeter-node-silent" in q.origin)

    result = _result(prometheus, _render(query))

    silence = {s["metric"]["node"]: float(s["value"][1]) for s in result}
    assert silence["sim2"] > 120 > silence["sim1"]
