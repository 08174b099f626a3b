"""``python -m bench``: run the benchmarks, print the table, write the JSON.

Run from the repository root (``make bench``). Each section runs in its own
scratch directory; a section that fails is reported and the others still
run. The scratch directory is removed after a clean run and kept, with
every process's log, after a failure.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from types import FrameType

from bench import backlog, flood, live, micro
from bench.procs import BenchError
from bench.report import Report

SECTIONS = ("parse", "spool", "backlog", "live", "flood")
FAILURES = (BenchError, AssertionError, RuntimeError, OSError, ValueError, KeyError)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    add = parser.add_argument
    add("--out", type=Path, help="results JSON (default: in a new temp directory)")
    add("--only", action="append", choices=SECTIONS, help="run only these sections")
    add("--backlog", type=int, default=50_000, help="readings in the broker backlog")
    add("--live-nodes", type=int, default=100, help="nodes in the live load")
    add("--live-seconds", type=float, default=30.0, help="length of the live load")
    add("--flood", type=int, default=20_000, help="malformed messages in the flood")
    add("--keep", action="store_true", help="keep the scratch directory and logs")
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> dict[str, Callable[[Report, Path], None]]:
    """Each chosen section, as a call taking the report and a scratch directory."""
    every: dict[str, Callable[[Report, Path], None]] = {
        "parse": lambda report, work: micro.bench_parse(report),
        "spool": micro.bench_spool,
        "backlog": lambda report, work: backlog.bench_backlog(
            report, work, args.backlog
        ),
        "live": lambda report, work: live.bench_live(
            report, work, args.live_seconds, args.live_nodes
        ),
        "flood": lambda report, work: flood.bench_flood(report, work, args.flood),
    }
    chosen = args.only or SECTIONS
    return {name: every[name] for name in SECTIONS if name in chosen}


def context(argv: list[str]) -> dict[str, object]:
    """The conditions of the run, stored beside the figures."""
    return {
        "command": " ".join(["python -m bench", *argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": git_state(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "paho_mqtt": version("paho-mqtt"),
        "sqlite": sqlite3.sqlite_version,
        "mosquitto": tool_version(["mosquitto", "-h"]),
    }


def git_state() -> str:
    """The commit measured, and whether the ingester had uncommitted changes."""
    try:
        head = run(["git", "rev-parse", "--short", "HEAD"])
        dirty = run(["git", "status", "--porcelain", "services/ingester"])
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} with uncommitted changes in services/ingester" if dirty else head


def tool_version(argv: list[str]) -> str:
    """The first line a program prints about itself."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def run(argv: list[str]) -> str:
    """A command's stripped standard output."""
    return subprocess.run(
        argv, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def terminate_cleanly(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so every started process is stopped."""
    raise KeyboardInterrupt


def run_sections(report: Report, args: argparse.Namespace, work: Path) -> None:
    """Run each chosen section in its own directory, recording failures."""
    for name, section in plan(args).items():
        print(f"\n[{name}]", flush=True)
        directory = work / name
        directory.mkdir()
        started = time.monotonic()
        try:
            section(report, directory)
        except FAILURES as exc:
            report.fail(name, f"{type(exc).__name__}: {exc}")
        report.context[f"seconds_{name}"] = round(time.monotonic() - started, 1)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; 0 when every section produced its figures."""
    argv = sys.argv[1:] if argv is None else argv
    args = arguments(argv)
    signal.signal(signal.SIGTERM, terminate_cleanly)
    out = args.out or Path(tempfile.mkdtemp(prefix="loadmeter-bench-")) / "results.json"
    work = Path(tempfile.mkdtemp(prefix="loadmeter-bench-work-"))
    report = Report(context=context(argv))
    interrupted = False
    try:
        run_sections(report, args, work)
    except KeyboardInterrupt:
        interrupted = True
        report.fail("run", "interrupted")
    report.context["load_average_at_end"] = os.getloadavg()[0]
    report.print_table()
    report.write(out)
    print(f"\nresults: {out}")
    if report.failures or args.keep:
        print(f"logs and scratch files: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 130 if interrupted else (1 if report.failures else 0)


if __name__ == "__main__":
    sys.exit(main())
