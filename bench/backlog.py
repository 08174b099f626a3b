"""End to end: a broker backlog drained into the spool and into VictoriaMetrics.

Each ingester variant subscribes once with a fixed client id and stops, so
the broker keeps its session; two bare counting consumers do the same. The
simulator then publishes the backlog once, and the broker queues it for
every session. One bare consumer drains its copy, then each ingester drains
its own while its ``/metrics`` is polled, then the other bare consumer: the
baseline brackets the ingesters, so a change in the machine's other load
shows as a spread between the two instead of skewing the ratio.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.drain import DRAIN_TIMEOUT_S, Sample, drain, report_drain
from bench.procs import BenchError, Processes, poll_until, wait_exit
from bench.report import Report
from bench.stack import IngesterProcess, UndedupedVictoriaMetrics, services, simulate
from tests.services import Mosquitto

NODES = 10
PUBLISH_TIMEOUT_S = 120.0
STORE_TIMEOUT_S = 30.0
BARE_IDS = ("bench-bare-before", "bench-bare-after")
SIMULATOR = ["--interval", "0", "--voltage", "--ct", "2", "--qos", "1", "--seed", "1"]


def variants(count: int) -> dict[str, dict[str, str]]:
    """Ingester settings to drain with: the defaults, as users run it.

    Add an entry to compare a setting (e.g. ``{"QUEUE_MAX": "1000"}``).
    """
    return {"defaults": {}}


def bench_backlog(report: Report, workdir: Path, count: int) -> None:
    """Publish ``count`` readings to offline sessions, then time their drains."""
    section = f"backlog drain ({count:,} readings, {NODES} nodes, QoS 1)"
    with services(workdir) as (broker, store), Processes(workdir) as procs:
        ingesters = [
            IngesterProcess(procs, name, broker, store, env(name, settings))
            for name, settings in variants(count).items()
        ]
        for ingester in ingesters:
            ingester.start()
            ingester.stop()
        for client_id in BARE_IDS:
            run_bare(procs, broker, client_id, "subscribe")

        seconds = publish(procs, broker, count)
        note = f"queued for {len(ingesters) + len(BARE_IDS)} offline sessions"
        report.add(section, "simulator publish", count / seconds, "messages/s", note)
        before = bare_rate(procs, broker, BARE_IDS[0], count)
        timelines = {i.name: attempt(report, section, i, count) for i in ingesters}
        after = bare_rate(procs, broker, BARE_IDS[1], count)

        report_bare(report, section, before, after)
        for ingester in ingesters:
            timeline = timelines[ingester.name]
            if timeline:
                heading = f"{section}: ingester, {describe(ingester)}"
                report_drain(report, heading, timeline, count, (before + after) / 2)
                report_store(report, heading, store, ingester, count)


def env(name: str, settings: dict[str, str]) -> dict[str, str]:
    """A variant's settings, writing to a measurement of its own."""
    return {"INFLUX_MEASUREMENT": f"bench_{name.replace('-', '_')}", **settings}


def describe(ingester: IngesterProcess) -> str:
    """The variant's settings as the table shows them."""
    shown = [f"{k}={v}" for k, v in ingester.env.items() if k == "QUEUE_MAX"]
    return ", ".join(shown) or "default settings"


def attempt(
    report: Report, section: str, ingester: IngesterProcess, count: int
) -> list[Sample]:
    """Drain one variant; its timeline, or nothing (and a failure) if it stalled."""
    log = ingester.procs.workdir / f"drain-{ingester.name}.csv"
    try:
        return drain(ingester, count, log)
    except BenchError as exc:
        report.fail(f"{section}: ingester, {describe(ingester)}", str(exc))
        return []
    finally:
        if ingester.stop() != 0:
            report.fail(section, f"ingester {ingester.name} did not exit cleanly")


def publish(procs: Processes, broker: Mosquitto, count: int) -> float:
    """Publish the backlog with the simulator; the seconds it took."""
    start = time.monotonic()
    sizes = ["--nodes", str(NODES), "--count", str(count // NODES)]
    sim = simulate(procs, "simulate-backlog", broker, *sizes, *SIMULATOR)
    if wait_exit(sim, PUBLISH_TIMEOUT_S, "publishing the backlog") != 0:
        raise BenchError(f"simulator failed:\n{procs.log('simulate-backlog')}")
    return time.monotonic() - start


def run_bare(
    procs: Processes, broker: Mosquitto, client_id: str, mode: str, *args: str
) -> dict[str, float]:
    """Run the bare consumer in one mode; its JSON result."""
    name = f"{client_id}-{mode}"
    argv = [sys.executable, "-m", "bench.bare", mode, "--port", str(broker.port)]
    argv += ["--client-id", client_id, "--timeout", str(DRAIN_TIMEOUT_S), *args]
    proc = procs.spawn(name, argv, {"PYTHONPATH": str(Path.cwd())})
    if wait_exit(proc, DRAIN_TIMEOUT_S + 10, f"bare consumer {mode}") != 0:
        raise BenchError(f"bare consumer {mode} failed:\n{procs.log(name)}")
    result: dict[str, float] = json.loads(procs.log(name).strip().splitlines()[-1])
    return result


def bare_rate(procs: Processes, broker: Mosquitto, client_id: str, count: int) -> float:
    """Drain one bare consumer's copy of the backlog; messages per second."""
    result = run_bare(procs, broker, client_id, "drain", "--count", str(count))
    if result["received"] < count:
        raise BenchError(f"bare consumer got {result['received']} of {count}")
    return (count - 1) / result["seconds"]


def report_bare(report: Report, section: str, before: float, after: float) -> None:
    """The baseline before and after the ingesters' drains, and their mean."""
    note = "own process, paho acks each message as it arrives"
    report.add(section, "bare paho consumer, before", before, "messages/s", note)
    report.add(section, "bare paho consumer, after", after, "messages/s")
    mean = (before + after) / 2
    report.add(section, "bare paho consumer, mean", mean, "messages/s", "ratios use it")


def report_store(
    report: Report,
    section: str,
    store: UndedupedVictoriaMetrics,
    ingester: IngesterProcess,
    count: int,
) -> None:
    """Check that every reading is in VictoriaMetrics, as one sample per field."""
    series = f"{ingester.env['INFLUX_MEASUREMENT']}_ct1_irms"
    stored = [0]

    def all_there() -> bool:
        stored[0] = store.count(series)
        return stored[0] >= count

    try:
        poll_until(all_there, STORE_TIMEOUT_S, "reading back VictoriaMetrics", 1.0)
    finally:
        name = "ct1_irms samples in VictoriaMetrics"
        report.add(section, name, stored[0], "samples", f"expected {count:,}")
