"""Real Mosquitto, VictoriaMetrics, influxd 1.x and Prometheus as processes.

Each runs on a free loopback port in a temporary directory, is polled until
it answers, and is stopped (or killed) by its fixture.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], object], timeout: float = 20.0, what: str = ""
) -> object:
    """Poll ``condition`` until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except (OSError, ValueError, AssertionError) as exc:
            result, last = None, exc
        else:
            last = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or condition}: {last}"
            )
        time.sleep(0.05)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``; the status and body, HTTP errors included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def require(program: str) -> str:
    """The path of ``program``, or an error telling how to install it."""
    path = shutil.which(program) or next(
        (
            p
            for p in (f"/usr/sbin/{program}", f"/usr/bin/{program}")
            if os.path.exists(p)
        ),
        None,
    )
    if path is None:
        raise RuntimeError(
            f"{program} is not installed: run `make deps` (scripts/install-deps.sh)"
        )
    return path


class Service:
    """A program run in the background with its output in a log file."""

    def __init__(self, name: str, workdir: Path, port: int) -> None:
        self.name = name
        self.workdir = workdir
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        return port_open(self.port)

    def start(self) -> None:
        """Start the program and wait until it answers."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        log.close()
        try:
            wait_for(self._ready_or_dead, START_TIMEOUT, f"{self.name} to start")
        except AssertionError:
            self.stop()
            raise AssertionError(
                f"{self.name} did not start; log:\n{self.log()}"
            ) from None

    def _ready_or_dead(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.log()}"
            )
        return self.is_ready()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the program (SIGKILL with ``sig``) and wait for it to exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        return (
            self.log_path.read_text(errors="replace")[-4000:]
            if self.log_path.exists()
            else ""
        )


class Mosquitto(Service):
    """A mosquitto broker; ``extra`` lines are appended to its config.

    It runs as the current user: started as root, mosquitto would switch to
    its own user, which cannot write its persistence file in a test folder.
    """

    def __init__(
        self, workdir: Path, extra: str = "", config: str | None = None
    ) -> None:
        super().__init__("mosquitto", workdir, free_port())
        self.extra = extra
        self.config = config

    def command(self) -> list[str]:
        conf = self.workdir / "mosquitto.conf"
        if self.config is not None:
            conf.write_text(self.config.replace("{port}", str(self.port)))
        else:
            conf.write_text(
                f"listener {self.port} 127.0.0.1\n"
                "allow_anonymous true\n"
                "persistence true\n"
                f"persistence_location {self.workdir}/\n"
                f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
                "max_inflight_messages 1000\n"
                "max_queued_messages 100000\n"
                "queue_qos0_messages true\n"
                f"{self.extra}\n"
            )
        return [require("mosquitto"), "-c", str(conf)]


class VictoriaMetrics(Service):
    """VictoriaMetrics serving the InfluxDB v2 write API on ``url``."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("victoria-metrics", workdir, free_port())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            require("victoria-metrics"),
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.workdir / 'vmdata'}",
            "-retentionPeriod=100y",
            "-dedup.minScrapeInterval=1ms",
            "-loggerLevel=WARN",
        ]

    def is_ready(self) -> bool:
        return http_get(f"{self.url}/health")[0] == 200

    def export(self, match: str = '{__name__=~".+"}') -> list[dict[str, object]]:
        """Every stored series matching ``match`` as VictoriaMetrics' JSON lines.

        Recent writes are flushed first, so a read right after a write sees it.
        """
        http_get(f"{self.url}/internal/force_flush")
        query = urllib.parse.urlencode({"match[]": match, "start": "0"})
        status, body = http_get(f"{self.url}/api/v1/export?{query}")
        assert status == 200, body
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    def samples(
        self, measurement: str = "load_meter"
    ) -> dict[tuple[str, str, int], float]:
        """{(field, node, timestamp_ms): value} for every stored sample."""
        stored: dict[tuple[str, str, int], float] = {}
        prefix = f"{measurement}_"
        for series in self.export(f'{{__name__=~"{measurement}_.+"}}'):
            metric = series["metric"]
            assert isinstance(metric, dict)
            field = str(metric["__name__"])[len(prefix) :]
            node = str(metric.get("node", ""))
            for value, stamp in zip(
                series["values"], series["timestamps"], strict=True
            ):  # type: ignore[call-overload]
                stored[(field, node, int(stamp))] = float(value)
        return stored


class Influxd1(Service):
    """influxd 1.x: real InfluxQL and field-type enforcement on ``url``."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("influxd", workdir, free_port())
        self.rpc_port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        conf = self.workdir / "influxdb.conf"
        data = self.workdir / "influx"
        conf.write_text(
            "reporting-disabled = true\n"
            f'bind-address = "127.0.0.1:{self.rpc_port}"\n'
            f'[meta]\n  dir = "{data}/meta"\n'
            f'[data]\n  dir = "{data}/data"\n  wal-dir = "{data}/wal"\n'
            "  query-log-enabled = false\n"
            f'[http]\n  bind-address = "127.0.0.1:{self.port}"\n'
            "  log-enabled = false\n"
            "[monitor]\n  store-enabled = false\n"
        )
        return [require("influxd"), "-config", str(conf)]

    def is_ready(self) -> bool:
        return http_get(f"{self.url}/ping")[0] == 204

    def query(
        self, q: str, db: str | None = None, epoch: str | None = "ms"
    ) -> dict[str, object]:
        """Run InfluxQL ``q``; the decoded JSON answer."""
        params = {"q": q}
        if db:
            params["db"] = db
        if epoch:
            params["epoch"] = epoch
        request = urllib.request.Request(
            f"{self.url}/query",
            data=urllib.parse.urlencode(params).encode(),
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                result: dict[str, object] = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            result = json.loads(exc.read())
        return result

    def write(self, db: str, lines: str, precision: str = "ms") -> tuple[int, str]:
        """POST line protocol to ``/write``; the status and body."""
        request = urllib.request.Request(
            f"{self.url}/write?db={db}&precision={precision}",
            data=lines.encode(),
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


class Prometheus(Service):
    """Prometheus with the given configuration text."""

    def __init__(self, workdir: Path, config: str) -> None:
        super().__init__("prometheus", workdir, free_port())
        self.config = config

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        conf = self.workdir / "prometheus.yml"
        conf.write_text(self.config)
        return [
            require("prometheus"),
            f"--config.file={conf}",
            f"--storage.tsdb.path={self.workdir / 'promdata'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    def is_ready(self) -> bool:
        return http_get(f"{self.url}/-/ready")[0] == 200

    def query(self, promql: str) -> dict[str, object]:
        """Run an instant PromQL query; the decoded JSON answer."""
        status, body = http_get(
            f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        )
        result: dict[str, object] = json.loads(body)
        result["http_status"] = status
        return result
