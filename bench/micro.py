"""In-process benchmarks: the payload model and the spool, one core each."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from loadmeter.model import Reading
from loadmeter.payload import Accepted, Limits, parse
from loadmeter.spool import Arrival, Spool

from bench.payloads import mixed, simulated
from bench.report import Report

LIMITS = Limits(max_payload_bytes=4096, max_ct=2)
RECEIVED_MS = 1_764_777_600_000
PARSE_MESSAGES = 20_000
PARSE_REPEATS = 3
MIX_EVERY = 5
SPOOL_READINGS = 50_000
SPOOL_SECONDS = 2.0
GROUP_SIZES = (1, 100, 1000)
SYNC_MODES = ("FULL", "NORMAL")
SINK_BATCH = 5000
DEDUP_WINDOW_S = 6 * 3600.0
UNBOUNDED = 2**40

Messages = Sequence[tuple[str, bytes]]


def parse_all(messages: Messages) -> None:
    """Run the payload model over every message, as the dispatcher does."""
    for node, payload in messages:
        parse(payload, node, RECEIVED_MS, LIMITS)


def best_rate(work: Callable[[Messages], None], messages: Messages) -> float:
    """Messages per second of the fastest of ``PARSE_REPEATS`` runs."""
    best = float("inf")
    for _ in range(PARSE_REPEATS):
        start = time.perf_counter()
        work(messages)
        best = min(best, time.perf_counter() - start)
    return len(messages) / best


def bench_parse(report: Report) -> None:
    """Payload parse rate on simulator payloads, alone and mixed with bad ones."""
    section = "payload parse (single core)"
    full = simulated(PARSE_MESSAGES, ct=2, voltage=True)
    minimal = simulated(PARSE_MESSAGES, ct=1, voltage=False)
    cases = {
        "2 CTs + voltage (9 fields)": full,
        "firmware default, 1 CT (4 fields)": minimal,
        f"2 CTs + voltage, 1 in {MIX_EVERY} malformed": mixed(full, MIX_EVERY),
    }
    for name, messages in cases.items():
        rate = best_rate(parse_all, messages)
        note = f"{1e6 / rate:.1f} us/message, best of {PARSE_REPEATS}"
        report.add(section, name, rate, "messages/s", note)


def spool_readings(count: int) -> list[Reading]:
    """``count`` valid readings from the simulator, unique per (node, epoch, t_ms)."""
    results = (parse(p, n, RECEIVED_MS, LIMITS) for n, p in simulated(count))
    return [r.reading for r in results if isinstance(r, Accepted)]


def open_spool(path: Path, synchronous: str) -> Spool:
    """A spool with one sink and no size bound, as the ingester opens it."""
    return Spool(path, ["influx"], UNBOUNDED, DEDUP_WINDOW_S, _ignore, synchronous)


def _ignore(dropped: int) -> None:
    """The spool is unbounded here: nothing is ever dropped."""


def timed_appends(spool: Spool, arrivals: Sequence[Arrival], group: int) -> float:
    """Append in groups until all are in or the time is up; readings per second."""
    start = time.perf_counter()
    deadline = start + SPOOL_SECONDS
    appended = 0
    while appended < len(arrivals) and time.perf_counter() < deadline:
        spool.append(arrivals[appended : appended + group])
        appended += group
    return min(appended, len(arrivals)) / (time.perf_counter() - start)


def bench_spool(report: Report, workdir: Path) -> None:
    """Grouped appends in both durability modes, then a sink draining the spool."""
    section = "spool append (SQLite WAL, tmp disk)"
    arrivals = [Arrival(r) for r in spool_readings(SPOOL_READINGS)]
    for sync in SYNC_MODES:
        for group in GROUP_SIZES:
            spool = open_spool(workdir / f"append-{sync}-{group}.db", sync)
            try:
                rate = timed_appends(spool, arrivals, group)
            finally:
                spool.close()
            note = f"{rate / group:,.0f} commits/s"
            name = f"group of {group}, synchronous={sync}"
            report.add(section, name, rate, "readings/s", note)
    bench_drain(report, workdir / "drain.db", arrivals)


def bench_drain(report: Report, path: Path, arrivals: Sequence[Arrival]) -> None:
    """``pending`` and ``advance`` throughput of one sink emptying a full spool."""
    section = f"spool drain (pending + advance, batch {SINK_BATCH})"
    spool = open_spool(path, "FULL")
    try:
        for index in range(0, len(arrivals), 1000):
            spool.append(arrivals[index : index + 1000])
        reading_s, advance_s = _drain(spool)
    finally:
        spool.close()
    count, batches = len(arrivals), -(-len(arrivals) // SINK_BATCH)
    report.add(
        section, "pending + advance", count / (reading_s + advance_s), "readings/s"
    )
    report.add(
        section, "pending alone (read and decode)", count / reading_s, "readings/s"
    )
    report.add(
        section, "advance (commit + trim)", 1000 * advance_s / batches, "ms/batch"
    )


def _drain(spool: Spool) -> tuple[float, float]:
    """Empty the spool for its sink; seconds spent in pending and in advance."""
    reading_s = advance_s = 0.0
    while True:
        start = time.perf_counter()
        batch = spool.pending("influx", SINK_BATCH)
        middle = time.perf_counter()
        if not batch.readings:
            return reading_s, advance_s
        spool.advance("influx", batch.last_id)
        reading_s += middle - start
        advance_s += time.perf_counter() - middle
