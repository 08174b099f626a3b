"""Following one ingester through a backlog: polled counters and their rates."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path

from bench.procs import BenchError, cpu_seconds, poll_until, rss_bytes
from bench.report import Report
from bench.stack import IngesterProcess

POLL_S = 0.1
DRAIN_TIMEOUT_S = 180.0
STALL_S = 15.0
MIB = 2**20
RECEIVED = "loadmeter_messages_received_total"
ACCEPTED = "loadmeter_readings_accepted_total"
WRITTEN = 'loadmeter_sink_points_written_total{sink="influx"}'
SPOOLED = 'loadmeter_spool_readings{sink="influx"}'
DROPPED = 'loadmeter_queue_dropped_total{queue="inbox"}'


@dataclass(frozen=True, slots=True)
class Sample:
    """The ingester's counters and resources at one moment (monotonic seconds)."""

    at: float
    received: float
    accepted: float
    written: float
    spooled: float
    dropped: float
    cpu_s: float
    rss: int

    @classmethod
    def of(cls, at: float, scraped: dict[str, float], pid: int) -> Sample:
        """A sample from one scrape of ``/metrics`` and ``/proc`` of ``pid``."""
        return cls(
            at,
            received=scraped.get(RECEIVED, 0.0),
            accepted=scraped.get(ACCEPTED, 0.0),
            written=scraped.get(WRITTEN, 0.0),
            spooled=scraped.get(SPOOLED, 0.0),
            dropped=scraped.get(DROPPED, 0.0),
            cpu_s=cpu_seconds(pid),
            rss=rss_bytes(pid),
        )


def drain(ingester: IngesterProcess, count: int, log: Path) -> list[Sample]:
    """Start the ingester and poll it until ``count`` readings are written.

    Every poll is also written to ``log`` as CSV. A drain that makes no
    progress for ``STALL_S`` fails at once, saying what the ingester dropped.
    """
    proc = ingester.launch()
    timeline: list[Sample] = []

    def written_all() -> bool:
        now, got = time.monotonic(), ingester.scrape()
        if got:
            timeline.append(Sample.of(now, got, proc.pid))
            check_progress(timeline, count)
        return bool(timeline) and timeline[-1].written >= count

    try:
        poll_until(written_all, DRAIN_TIMEOUT_S, "draining the backlog", POLL_S, proc)
    finally:
        write_timeline(log, timeline)
    return timeline


def check_progress(timeline: list[Sample], count: int) -> None:
    """``BenchError`` when neither counter moved for ``STALL_S``."""
    last = timeline[-1]
    if last.at - timeline[0].at < STALL_S:
        return
    then = next(s for s in timeline if s.at >= last.at - STALL_S)
    if then.accepted == last.accepted and then.written == last.written:
        raise BenchError(
            f"the drain stalled: {last.written:.0f} of {count} written,"
            f" {last.dropped:.0f} dropped from the full inbox (never acknowledged,"
            f" so not redelivered before a reconnect), no progress for {STALL_S:.0f} s"
        )


def write_timeline(path: Path, timeline: list[Sample]) -> None:
    """The polled counters as CSV, for a look at how a drain went."""
    names = [field.name for field in fields(Sample)]
    rows = [",".join(names)]
    rows += [",".join(f"{getattr(s, name):.3f}" for name in names) for s in timeline]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def crossing(timeline: list[Sample], field: str, level: float) -> float:
    """When the counter ``field`` reached ``level``, interpolated between polls."""
    before = timeline[0]
    for sample in timeline:
        value = getattr(sample, field)
        if value >= level:
            low = getattr(before, field)
            share = (level - low) / (value - low) if value > low else 1.0
            return before.at + share * (sample.at - before.at)
        before = sample
    raise BenchError(f"{field} never reached {level}")


def report_drain(
    report: Report, section: str, timeline: list[Sample], count: int, bare: float
) -> None:
    """Receive+spool and end-to-end rates, each against the bare consumer's.

    Counting starts at the first poll that saw a reading accepted, pushed
    back by the readings already counted then, at the measured rate.
    """
    first = next(s for s in timeline if s.accepted > 0)
    received = crossing(timeline, "accepted", count)
    receive_rate = (count - first.accepted) / (received - first.at)
    began = first.at - first.accepted / receive_rate
    written = crossing(timeline, "written", count)
    e2e_rate = count / (written - began)
    last = timeline[-1]
    cpu = 100 * (last.cpu_s - first.cpu_s) / (last.at - first.at)

    add = report.add
    took = f"{received - began:.1f} s"
    add(section, "receive, validate, spool", receive_rate, "messages/s", took)
    add(section, "  ratio to the bare consumer", receive_rate / bare, "x")
    took = f"{written - began:.1f} s"
    add(section, "end to end, into VictoriaMetrics", e2e_rate, "messages/s", took)
    add(section, "  ratio to the bare consumer", e2e_rate / bare, "x")
    add(section, "last write after the last receive", written - received, "s")
    add(section, "spool backlog, peak", max(s.spooled for s in timeline), "readings")
    inbox = max(s.received - s.accepted - s.dropped for s in timeline)
    add(section, "inbox, peak", inbox, "messages", "received, not yet validated")
    add(section, "dropped from the full inbox", last.dropped, "messages")
    add(section, "CPU while draining", cpu, "% of one core")
    add(section, "RSS, peak", max(s.rss for s in timeline) / MIB, "MiB")
