"""The ``loadmeter`` command and the ingester as real processes, for tests.

Every environment built here starts from ``PATH`` alone, so a developer's
own ``MQTT_*`` or ``INFLUX_*`` variables never reach a test. ``loadmeter``
runs a command to completion; ``IngesterProcess`` keeps ``run`` going in the
background, and can start it again after a stop or a kill with the same
state directory, appending each start's output to the same two files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NamedTuple, Self

from tests.services import free_port, http_get, wait_for

PYTHON = Path(sys.executable)
LOADMETER = PYTHON.with_name("loadmeter")
READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 30.0


def bare_env(**variables: str) -> dict[str, str]:
    """Only ``PATH`` and the given variables."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **variables}


def clean_env(workdir: Path, **variables: str) -> dict[str, str]:
    """A bare environment for ``run``: state in ``workdir``, metrics on loopback.

    The MQTT client id is fixed, so a restarted process resumes its session.
    """
    return {
        **bare_env(),
        "STATE_DIR": str(workdir / "state"),
        "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": str(free_port()),
        "MQTT_CLIENT_ID": "loadmeter-under-test",
        "FLUSH_INTERVAL": "0.1",
        **variables,
    }


def loadmeter(
    *args: str, env: Mapping[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``loadmeter ARGS`` to completion; its exit code and both streams."""
    return subprocess.run(
        [str(LOADMETER), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def simulate(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``loadmeter simulate ARGS`` against the broker on ``port``; must succeed."""
    done = loadmeter("simulate", *args, env=bare_env(MQTT_PORT=str(port)), timeout=60)
    assert done.returncode == 0, done.stderr
    return done


class Exit(NamedTuple):
    """How a signalled ingester ended."""

    code: int
    seconds: float


class IngesterExitedError(RuntimeError):
    """The ingester process ended while the test waited for it to be ready."""


class IngesterProcess:
    """``python -m loadmeter run SINKS`` in the background, as often as asked.

    ``env`` is read at every start, so a test may change it between a stop
    and the next start; each start listens for metrics on a fresh loopback
    port, whatever ``env`` says. Standard output and standard error (unless
    ``stderr`` sends it elsewhere) are appended to files in ``workdir``. As a
    context manager it kills a process the test left running.
    """

    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str],
        sinks: Sequence[str] = (),
        stderr: int | IO[bytes] | None = None,
    ) -> None:
        self.workdir = workdir
        self.env = dict(env)
        self.sinks = list(sinks)
        self.stdout_path = workdir / "ingester.out"
        self.stderr_path = workdir / "ingester.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._stderr_to = stderr

    def __enter__(self) -> Self:
        """The process itself, started or not."""
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Kill the process if the test left it running."""
        self.close()

    @property
    def state_dir(self) -> Path:
        """The STATE_DIR of ``env``, relative to ``workdir``."""
        return self.workdir / self.env["STATE_DIR"]

    @property
    def csv_path(self) -> Path:
        """The CSV_PATH of ``env``, relative to ``workdir``."""
        return self.workdir / self.env["CSV_PATH"]

    @property
    def running(self) -> bool:
        """Whether a started process has not exited yet."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def url(self) -> str:
        """The base URL of the current process's metrics and probes."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Start a new process without waiting for it (see ``wait_ready``)."""
        if self.running:
            raise RuntimeError("the ingester is already running")
        self.port = free_port()
        env = {**self.env, "METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(self.port)}
        command = [str(PYTHON), "-m", "loadmeter", "run", *self.sinks]

        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=err if self._stderr_to is None else self._stderr_to,
                cwd=self.workdir,
            )
        return self

    def start_ready(self) -> None:
        """Start and wait until /readyz answers 200."""
        self.start()
        self.wait_ready()

    def status(self, path: str, timeout: float = 5.0) -> int:
        """The HTTP status of ``/healthz``, ``/readyz`` or ``/metrics``."""
        return http_get(self.url + path, timeout)[0]

    def ready(self) -> bool:
        """Whether /readyz answers 200 right now."""
        try:
            return self.status("/readyz", timeout=1.0) == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait for /readyz 200; fail at once, with the log, if the process exits."""

        def ready_or_exited() -> bool:
            if not self.running:
                raise IngesterExitedError(
                    f"the ingester exited with {self._started().returncode}:\n"
                    f"{self._log_tail()}"
                )
            return self.ready()

        wait_for(ready_or_exited, timeout, "the ingester to be ready")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = EXIT_TIMEOUT) -> Exit:
        """Send ``sig`` and wait; the exit code and the seconds until it came."""
        proc = self._started()
        began = time.monotonic()

        proc.send_signal(sig)
        code = self._wait(proc, timeout)

        return Exit(code, time.monotonic() - began)

    def kill(self) -> int:
        """SIGKILL and reap the process; its (negative) exit code."""
        proc = self._started()
        proc.kill()
        return self._wait(proc, EXIT_TIMEOUT)

    def close(self) -> None:
        """Kill a process still running, e.g. after a failed test."""
        if self.running:
            self.kill()

    def metric(self, sample: str) -> float:
        """The value of one sample line (name and labels) on /metrics."""
        _, body = http_get(self.url + "/metrics")
        for line in body.decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{sample} is not on /metrics")

    def stdout(self) -> str:
        """Everything every start wrote to standard output."""
        return _read(self.stdout_path)

    def stderr(self) -> str:
        """Everything every start wrote to standard error (into the file)."""
        return _read(self.stderr_path)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Standard error as JSON events, every line one; or only those ``name``d."""
        events = [json.loads(line) for line in self.stderr().splitlines()]
        return [e for e in events if name is None or e["event"] == name]

    def event_names(self) -> list[str]:
        """The ``event`` of every JSON log line so far, in order."""
        return [event["event"] for event in self.events()]

    def _started(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("the ingester was never started")
        return self.proc

    def _wait(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"the ingester did not exit within {timeout}s:\n{self._log_tail()}"
            ) from None

    def _log_tail(self, chars: int = 6000) -> str:
        return self.stderr()[-chars:]


def _read(path: Path) -> str:
    """A text file's contents, or nothing if it was never created."""
    return path.read_text(errors="replace") if path.exists() else ""
