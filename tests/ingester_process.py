"""Run the ``loadmeter`` command as a separate process, as an operator would.

The environment starts empty (only ``PATH``) so a developer's own ``MQTT_*``
or ``INFLUX_*`` variables never leak into a test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from tests.services import free_port, http_get, wait_for

PYTHON = Path(sys.executable)
LOADMETER = PYTHON.with_name("loadmeter")


def clean_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """``PATH`` plus state in ``tmp_path``, the metrics port free on loopback."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "STATE_DIR": str(tmp_path / "state"),
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
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MQTT_PORT": str(port)}
    done = loadmeter("simulate", *args, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done


class IngesterProcess:
    """``python -m loadmeter run SINKS`` in the background, output kept in files."""

    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str],
        sinks: tuple[str, ...] = (),
        stderr: int | IO[bytes] | None = None,
    ) -> None:
        self.env = dict(env)
        self.url = f"http://127.0.0.1:{self.env['METRICS_PORT']}"
        self.stdout_path = workdir / "ingester.out"
        self.stderr_path = workdir / "ingester.err"
        command = [str(PYTHON), "-m", "loadmeter", "run", *sinks]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                command, env=self.env, stdout=out, stderr=stderr or err, cwd=workdir
            )

    def status(self, path: str) -> int:
        """The HTTP status of ``/healthz``, ``/readyz`` or ``/metrics``."""
        return http_get(self.url + path)[0]

    def wait_ready(self, timeout: float = 20) -> None:
        """Wait until /readyz says the broker is connected and sinks can write."""
        wait_for(lambda: self.status("/readyz") == 200, timeout, "/readyz 200")

    def metric(self, sample: str) -> float:
        """The value of one sample line (name and labels) on /metrics."""
        _, body = http_get(self.url + "/metrics")
        for line in body.decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{sample} is not exported")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Send ``sig`` and wait up to ``timeout`` seconds for the exit code."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Make sure the process is gone, whatever happened in the test."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stdout(self) -> str:
        """Everything written to standard output so far."""
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        """Everything written to standard error so far."""
        return self.stderr_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """Standard error parsed as JSON lines, one event per line."""
        return [json.loads(line) for line in self.stderr().splitlines()]

    def event_names(self) -> list[str]:
        """The ``event`` of every JSON log line so far, in order."""
        return [event["event"] for event in self.events()]


@contextlib.contextmanager
def ingester(
    workdir: Path,
    env: Mapping[str, str],
    sinks: tuple[str, ...] = (),
    stderr: int | IO[bytes] | None = None,
) -> Iterator[IngesterProcess]:
    """A running ingester process, killed afterwards if the test left it up."""
    process = IngesterProcess(workdir, env, sinks, stderr)
    try:
        yield process
    finally:
        process.kill()
