"""The shipped Prometheus config scraping a real, running ingester.

The stand-in of test_prometheus_config pins what each query shows; here the
real ingester's /metrics is scraped and every PromQL expression of the
dashboards and alert rules must evaluate without error against it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from loadmeter.sinks.memory import MemorySink

from tests.harness import build, publisher, running, settings_for
from tests.services import Mosquitto, Prometheus, wait_for
from tests.test_prometheus_config import (
    INGESTER_JOB,
    PROM_QUERIES,
    _render,
    _result,
    local_config,
)


@pytest.fixture
def scraped_ingester(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Prometheus]:
    """A running ingester with readings behind it, and Prometheus scraping it."""
    sink = MemorySink()
    ingester = build(settings_for(mosquitto, tmp_path / "state"), [sink])
    with running(ingester), publisher(mosquitto) as pub:
        for second in range(5):
            pub.send("sim1", {"epoch": 1764777600 + second, "ct1_irms": 1.0 + second})
        pub.send("sim1", b"not json", retain=False)
        wait_for(lambda: len(sink.snapshot()) == 5, what="five stored readings")
        (tmp_path / "prom").mkdir()
        prom = Prometheus(tmp_path / "prom", "")
        prom.config = local_config(
            f"127.0.0.1:{ingester.http.port}", f"127.0.0.1:{prom.port}"
        )
        prom.start()
        probe = f'loadmeter_readings_accepted_total{{job="{INGESTER_JOB}"}} == 5'
        wait_for(lambda: _result(prom, probe), 30, "a scrape of the ingester")
        yield prom
        prom.stop()


def test_every_promql_query_runs_against_the_real_ingester(
    scraped_ingester: Prometheus,
) -> None:
    """Each dashboard and alert expression evaluates without error on real data."""
    failures = {}

    for query in PROM_QUERIES:
        answer = scraped_ingester.query(_render(query))
        if answer["status"] != "success":
            failures[str(query)] = answer

    assert not failures
    assert _result(scraped_ingester, f'up{{job="{INGESTER_JOB}"}} == 1')
    rejected = 'loadmeter_readings_rejected_total{reason="invalid_json"} == 1'
    assert _result(scraped_ingester, rejected)
