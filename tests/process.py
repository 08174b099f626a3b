"""The ingester as a real process, for tests that kill and restart it.

``IngesterProcess`` runs ``python -m loadmeter run SINK...`` with an
environment of its own: a broker, an InfluxDB URL, a state directory and a
CSV file that stay the same across restarts, a fixed MQTT client id (so the
broker keeps the session) and a fresh metrics port per start. Every start
appends JSON log lines to one log file, which the test can read back as
events. It can be stopped as an operator would (SIGTERM), or killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.services import Mosquitto, free_port, http_get, wait_for

CLIENT_ID = "loadmeter-restart-test"
READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 30.0


class IngesterExitedError(RuntimeError):
    """The ingester process ended while the test waited for it to be ready."""


class IngesterProcess:
    """Starts, probes, stops and kills one ingester, again and again."""

    def __init__(
        self,
        workdir: Path,
        broker: Mosquitto,
        influx_url: str,
        sinks: Sequence[str] = ("influx", "csv"),
        **env: str,
    ) -> None:
        self.workdir = workdir
        self.broker = broker
        self.influx_url = influx_url
        self.sinks = list(sinks)
        self.extra_env = dict(env)
        self.state_dir = workdir / "state"
        self.csv_path = workdir / "load.csv"
        self.log_path = workdir / "ingester.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0

    def environment(self) -> dict[str, str]:
        """The variables the process gets; nothing leaks from the test's own."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONUNBUFFERED": "1",
            "MQTT_HOST": "127.0.0.1",
            "MQTT_PORT": str(self.broker.port),
            "MQTT_CLIENT_ID": CLIENT_ID,
            "MQTT_QOS": "1",
            "INFLUX_URL": self.influx_url,
            "INFLUX_TOKEN": "test-token",
            "METRICS_HOST": "127.0.0.1",
            "METRICS_PORT": str(self.port),
            "STATE_DIR": str(self.state_dir),
            "CSV_PATH": str(self.csv_path),
            "FLUSH_INTERVAL": "0.2",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "info",
            **self.extra_env,
        }

    def start(self) -> None:
        """Start a new process without waiting for it (see ``wait_ready``)."""
        if self.running:
            raise RuntimeError("the ingester is already running")
        self.port = free_port()
        self.starts += 1
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loadmeter", "run", *self.sinks],
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )

    def start_ready(self) -> None:
        """Start and wait until /readyz answers 200."""
        self.start()
        self.wait_ready()

    @property
    def running(self) -> bool:
        """Whether a started process has not exited yet."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def url(self) -> str:
        """The base URL of the running process's metrics and probes."""
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        """Whether /readyz answers 200 right now."""
        try:
            return http_get(f"{self.url}/readyz", timeout=1.0)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait for /readyz 200; fail with the log if the process exits first."""

        def ready_or_exited() -> bool:
            if not self.running:
                raise IngesterExitedError(
                    f"the ingester exited with {self._returncode()}:\n{self.log()}"
                )
            return self.ready()

        wait_for(ready_or_exited, timeout, "the ingester to be ready")

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds until the process ended."""
        proc = self._started()
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = self._wait(proc)
        return code, time.monotonic() - began

    def kill(self) -> int:
        """SIGKILL and reap the process; its (negative) exit code."""
        proc = self._started()
        proc.kill()
        return self._wait(proc)

    def metric(self, sample: str) -> float:
        """The value of one sample line (name and labels) on /metrics."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as response:
            body = response.read().decode()
        for line in body.splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{sample} is not on /metrics")

    def events(self, name: str | None = None) -> list[Mapping[str, object]]:
        """Every JSON log event of every start, or only those called ``name``."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    def log(self, tail: int = 6000) -> str:
        """The end of the log file, for failure messages."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-tail:]

    def close(self) -> None:
        """Kill a process still running, e.g. after a failed test."""
        if self.running:
            self.kill()

    def _started(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("the ingester was never started")
        return self.proc

    def _wait(self, proc: subprocess.Popen[bytes]) -> int:
        try:
            return proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"the ingester did not exit within {EXIT_TIMEOUT}s:\n{self.log()}"
            ) from None

    def _returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode
