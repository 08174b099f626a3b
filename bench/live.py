"""A steady fleet: the ingester's CPU and memory at the firmware's pace."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, Processes, cpu_seconds, poll_until, rss_bytes
from bench.report import Report
from bench.stack import IngesterProcess, services, simulate

MIB = 2**20
SAMPLE_S = 1.0
WINDOW_SAMPLES = 5
IDLE_S = 5.0
WARMUP_TIMEOUT_S = 30.0
FIRMWARE_LIKE = ["--interval", "1", "--voltage", "--ct", "2", "--qos", "0"]
CPU = "% of one core"
ACCEPTED = "loadmeter_readings_accepted_total"
WRITTEN = 'loadmeter_sink_points_written_total{sink="influx"}'
SPOOLED = 'loadmeter_spool_readings{sink="influx"}'


@dataclass(frozen=True, slots=True)
class Usage:
    """A process's CPU time and resident memory at one moment."""

    at: float
    cpu_s: float
    rss: int


def usage(pid: int) -> Usage:
    """What ``/proc`` says about ``pid`` now."""
    return Usage(time.monotonic(), cpu_seconds(pid), rss_bytes(pid))


def sample(
    pid: int, seconds: float, alive: Sequence[subprocess.Popen[bytes]]
) -> list[Usage]:
    """``usage`` of ``pid`` once per ``SAMPLE_S`` for ``seconds``."""
    samples = [usage(pid)]
    while samples[-1].at < samples[0].at + seconds - SAMPLE_S / 2:
        due = samples[0].at + len(samples) * SAMPLE_S
        time.sleep(max(0.0, due - time.monotonic()))
        if any(proc.poll() is not None for proc in alive):
            raise BenchError("a process exited while the load ran")
        samples.append(usage(pid))
    return samples


def cpu_percent(first: Usage, last: Usage) -> float:
    """Share of one core the process used between two samples, in percent."""
    return 100 * (last.cpu_s - first.cpu_s) / (last.at - first.at)


def bench_live(report: Report, workdir: Path, seconds: float, nodes: int) -> None:
    """A fleet of ``nodes`` at one reading per second each, as the firmware sends."""
    section = f"live load ({nodes} nodes x 1 reading/s, QoS 0, {seconds:.0f} s)"
    with services(workdir) as (broker, store), Processes(workdir) as procs:
        ingester = IngesterProcess(procs, "live", broker, store)
        proc = ingester.start()
        idle = sample(proc.pid, IDLE_S, [proc])
        report.add(
            section,
            "ingester CPU, idle",
            cpu_percent(idle[0], idle[-1]),
            CPU,
            f"connected, no traffic, {IDLE_S:.0f} s",
        )

        fleet = ["--nodes", str(nodes), "--node-prefix", "live", *FIRMWARE_LIKE]
        sim = simulate(procs, "simulate-live", broker, *fleet)
        poll_until(
            lambda: ingester.value(WRITTEN) >= nodes,
            WARMUP_TIMEOUT_S,
            "waiting for the first readings to be written",
            alive=sim,
        )
        before = ingester.value(ACCEPTED)
        loaded = sample(proc.pid, seconds, [sim, proc])
        after = ingester.scrape()

        report_usage(report, section, loaded)
        rate = (after[ACCEPTED] - before) / (loaded[-1].at - loaded[0].at)
        report.add(section, "readings accepted", rate, "readings/s")
        report.add(
            section,
            "spool backlog at the end",
            after[SPOOLED],
            "readings",
            "the sink flushes once a second",
        )


def report_usage(report: Report, section: str, loaded: list[Usage]) -> None:
    """Mean, peak and final CPU (5 s windows) and RSS of the sampled process."""
    step = min(WINDOW_SAMPLES, len(loaded) - 1)
    windows = [
        cpu_percent(loaded[i - step], loaded[i]) for i in range(step, len(loaded), step)
    ]
    window = f"{step * SAMPLE_S:.0f} s windows"
    add = report.add
    add(section, "ingester CPU, mean", cpu_percent(loaded[0], loaded[-1]), CPU)
    add(section, "ingester CPU, max", max(windows), CPU, window)
    add(section, "ingester CPU, final", windows[-1], CPU, window)
    add(section, "ingester RSS, start of load", loaded[0].rss / MIB, "MiB")
    add(section, "ingester RSS, max", max(u.rss for u in loaded) / MIB, "MiB")
    add(section, "ingester RSS, final", loaded[-1].rss / MIB, "MiB")
