"""A flood of malformed messages: does the ingester's memory stay put?

Each message goes to a topic of its own, so anything the ingester keeps per
node or per topic (rate limiter keys, metric labels) would grow with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.payloads import malformed
from bench.procs import BenchError, Processes, poll_until, rss_bytes, wait_exit
from bench.report import Report
from bench.stack import BASE_TOPIC, IngesterProcess, services, simulate
from tests.services import Mosquitto

MIB = 2**20
WARM_READINGS = 200
WARM_REJECTS = 210
SETTLE_S = 3.0
PUBLISH_TIMEOUT_S = 60.0
WAIT_TIMEOUT_S = 120.0
WARM_SIMULATOR = ["--nodes", "10", "--interval", "0", "--qos", "1"]
WRITTEN = 'loadmeter_sink_points_written_total{sink="influx"}'
REJECTED = "loadmeter_readings_rejected_total"


def bench_flood(report: Report, workdir: Path, count: int) -> None:
    """RSS of a warmed-up ingester before, halfway and after ``count`` rejects.

    Growth in the second half as large as in the first would point at a
    leak; little or none at state that stops growing at a bound.
    """
    section = f"malformed flood ({count:,} messages, one topic each, QoS 1)"
    with services(workdir) as (broker, store), Processes(workdir) as procs:
        ingester = IngesterProcess(procs, "flood", broker, store)
        proc = ingester.start()
        warm_up(procs, broker, ingester)
        rss = Rss(rss_bytes(proc.pid))

        nodes = [f"flood{i}" for i in range(count)]
        halves = (nodes[: count // 2], nodes[count // 2 :])
        seconds = sum(flood(broker, ingester, half, rss) for half in halves)
        still_ingests(procs, broker, ingester)
        report_flood(report, section, rss, count / seconds, ingester)


@dataclass(slots=True)
class Rss:
    """Resident memory before the flood, after each part of it, and at peak."""

    before: int
    after: list[int] = field(default_factory=list)
    peak: int = 0

    def seen(self, rss: int) -> None:
        """Remember ``rss`` if it is the highest so far."""
        self.peak = max(self.peak, self.before, rss)


def flood(
    broker: Mosquitto, ingester: IngesterProcess, nodes: Sequence[str], rss: Rss
) -> float:
    """Publish one malformed message per node; the seconds until all are rejected.

    The RSS is then taken once the ingester has had ``SETTLE_S`` to settle.
    """
    pid = ingester.pid
    wanted = ingester.total(REJECTED) + len(nodes)
    start = time.monotonic()
    publish_malformed(broker, nodes)

    def all_rejected() -> bool:
        rss.seen(rss_bytes(pid))
        return ingester.total(REJECTED) >= wanted

    poll_until(all_rejected, WAIT_TIMEOUT_S, "rejecting the flood", alive=ingester.proc)
    seconds = time.monotonic() - start
    time.sleep(SETTLE_S)
    rss.after.append(rss_bytes(pid))
    rss.seen(rss.after[-1])
    return seconds


def warm_up(procs: Processes, broker: Mosquitto, ingester: IngesterProcess) -> None:
    """Take every code path once: valid readings stored, bad ones dead-lettered."""
    options = [*WARM_SIMULATOR, "--count", str(WARM_READINGS // 10)]
    sim = simulate(procs, "simulate-warm", broker, *options, "--node-prefix", "warm")
    wait_exit(sim, PUBLISH_TIMEOUT_S, "publishing the warm-up readings")
    publish_malformed(broker, [f"warm{i}" for i in range(WARM_REJECTS)])

    def warm() -> bool:
        scraped = ingester.scrape()
        rejected = sum(v for k, v in scraped.items() if k.startswith(REJECTED))
        return scraped.get(WRITTEN, 0) >= WARM_READINGS and rejected >= WARM_REJECTS

    poll_until(warm, WAIT_TIMEOUT_S, "warming up", alive=ingester.proc)
    time.sleep(SETTLE_S)


def still_ingests(
    procs: Processes, broker: Mosquitto, ingester: IngesterProcess
) -> None:
    """After the flood, valid readings are still written."""
    options = [*WARM_SIMULATOR, "--count", "1", "--node-prefix", "after"]
    sim = simulate(procs, "simulate-after", broker, *options)
    wait_exit(sim, PUBLISH_TIMEOUT_S, "publishing readings after the flood")
    poll_until(
        lambda: ingester.value(WRITTEN) >= WARM_READINGS + 10,
        WAIT_TIMEOUT_S,
        "waiting for valid readings after the flood",
        alive=ingester.proc,
    )


def report_flood(
    report: Report, section: str, rss: Rss, rate: float, ingester: IngesterProcess
) -> None:
    """RSS before, after each half and at peak; rejection rate; dead letter size."""
    deadletter = Path(ingester.env["STATE_DIR"]) / "deadletter"
    stored = sum(p.stat().st_size for p in deadletter.glob("*") if p.is_file())
    halfway, after = rss.after
    settled = f"{SETTLE_S:.0f} s after the last reject"
    add = report.add
    add(section, "ingester RSS before (warmed up)", rss.before / MIB, "MiB")
    add(section, "ingester RSS after the first half", halfway / MIB, "MiB", settled)
    add(section, "ingester RSS after all", after / MIB, "MiB", settled)
    add(section, "ingester RSS, peak", rss.peak / MIB, "MiB")
    add(section, "growth, first half", (halfway - rss.before) / MIB, "MiB")
    add(section, "growth, second half", (after - halfway) / MIB, "MiB")
    add(section, "published and rejected", rate, "messages/s", "publisher included")
    add(section, "dead letter on disk", stored / MIB, "MiB")


def publish_malformed(broker: Mosquitto, nodes: Sequence[str]) -> None:
    """One malformed message per node, QoS 1, not retained; wait for every ack."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-malformed")
    client.max_inflight_messages_set(1000)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise BenchError("the malformed-message publisher could not connect")
        infos = [
            client.publish(f"{BASE_TOPIC}/{node}/metrics", payload, qos=1)
            for node, payload in malformed(nodes)
        ]
        deadline = time.monotonic() + PUBLISH_TIMEOUT_S
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        if not all(info.is_published() for info in infos):
            raise BenchError("the broker did not acknowledge every malformed message")
    finally:
        client.disconnect()
        client.loop_stop()
