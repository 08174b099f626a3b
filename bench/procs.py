"""Child processes that are always stopped, and what ``/proc`` says about them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_WAIT_S = 15.0


class BenchError(RuntimeError):
    """A benchmark could not be measured: a timeout or a process that died."""


class Processes:
    """Starts programs with their output in log files; stops them all on exit.

    Use as a context manager: leaving it, for any reason, sends SIGTERM to
    every process still running, waits, and kills what does not exit.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._running: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self._running):
            stop(proc)
        self._running.clear()

    def spawn(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stdout and stderr appended to ``<name>.log``."""
        with (self.workdir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=self.workdir,
            )
        self._running.append(proc)
        return proc

    def log(self, name: str, chars: int = 2000) -> str:
        """The end of a process's log, for error messages."""
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def stop(proc: subprocess.Popen[bytes], timeout: float = STOP_WAIT_S) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return int(proc.returncode)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float, what: str) -> int:
    """Wait for a process that finishes by itself; ``BenchError`` when late."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} did not finish within {timeout:.0f} s") from None


def poll_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.1,
    alive: subprocess.Popen[bytes] | None = None,
) -> None:
    """Call ``condition`` until true; ``BenchError`` on timeout or a dead ``alive``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if alive is not None and alive.poll() is not None:
            raise BenchError(f"process exited with {alive.returncode} while {what}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s {what}")
        time.sleep(interval)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """The process's resident set size (``VmRSS``) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for process {pid}")
