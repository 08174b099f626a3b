"""The ingester as a process, with the broker and store it runs against.

The broker is configured as the deployment's should be for a backlog: 1000
messages in flight per client, a deep queue for offline persistent
sessions, QoS 0 messages queued and delivered at the subscription's QoS.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import cast

from bench.procs import BenchError, Processes, poll_until, stop
from tests.services import Mosquitto, VictoriaMetrics, free_port

BROKER_CONFIG = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location PERSISTENCE/
max_inflight_messages 1000
max_queued_messages 1000000
queue_qos0_messages true
upgrade_outgoing_qos true
"""
CONNECT_TIMEOUT_S = 30.0
BASE_TOPIC = "home/load_meter"


class UndedupedVictoriaMetrics(VictoriaMetrics):
    """VictoriaMetrics keeping every sample it is sent.

    Without the test fixture's de-duplication, a count of stored samples
    shows points written twice as well as points lost.
    """

    def command(self) -> list[str]:
        """The fixture's command without ``-dedup.minScrapeInterval``."""
        return [arg for arg in super().command() if not arg.startswith("-dedup")]

    def count(self, series: str) -> int:
        """How many samples the store holds for ``series``, across all nodes."""
        exported = self.export(f'{{__name__="{series}"}}')
        return sum(len(cast(list[float], s["values"])) for s in exported)


@contextlib.contextmanager
def services(workdir: Path) -> Iterator[tuple[Mosquitto, UndedupedVictoriaMetrics]]:
    """A broker and a VictoriaMetrics, each in its own directory, stopped after."""
    broker_dir, vm_dir = workdir / "mosquitto", workdir / "victoria"
    broker_dir.mkdir()
    # Mosquitto started as root drops to its own user, which must write here.
    broker_dir.chmod(0o777)
    vm_dir.mkdir()
    config = BROKER_CONFIG.replace("PERSISTENCE", str(broker_dir))
    broker = Mosquitto(broker_dir, config=config)
    store = UndedupedVictoriaMetrics(vm_dir)
    try:
        broker.start()
        store.start()
        yield broker, store
    finally:
        store.stop()
        broker.stop()


class IngesterProcess:
    """``python -m loadmeter run influx`` with its own state directory."""

    def __init__(
        self,
        procs: Processes,
        name: str,
        broker: Mosquitto,
        store: VictoriaMetrics,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.procs = procs
        self.name = name
        self.metrics_port = free_port()
        self.env = {
            "MQTT_HOST": "127.0.0.1",
            "MQTT_PORT": str(broker.port),
            "MQTT_CLIENT_ID": f"bench-{name}",
            "INFLUX_URL": store.url,
            "INFLUX_TOKEN": "bench",
            "STATE_DIR": str(procs.workdir / f"state-{name}"),
            "METRICS_HOST": "127.0.0.1",
            "METRICS_PORT": str(self.metrics_port),
            "LOG_FORMAT": "json",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The running process's id."""
        if self.proc is None:
            raise BenchError(f"ingester {self.name} is not running")
        return self.proc.pid

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it."""
        argv = [sys.executable, "-m", "loadmeter", "run", "influx"]
        self.proc = self.procs.spawn(f"ingester-{self.name}", argv, self.env)
        return self.proc

    def start(self) -> subprocess.Popen[bytes]:
        """Start the process and wait until it is subscribed to the broker."""
        proc = self.launch()
        try:
            poll_until(
                lambda: self.value("loadmeter_mqtt_connected") == 1,
                CONNECT_TIMEOUT_S,
                f"waiting for ingester {self.name} to subscribe",
                alive=proc,
            )
        except BenchError as exc:
            raise BenchError(
                f"{exc}\n{self.procs.log(f'ingester-{self.name}')}"
            ) from None
        return proc

    def stop(self) -> int:
        """Stop it cleanly (SIGTERM); its exit status."""
        if self.proc is None:
            return 0
        status = stop(self.proc)
        self.proc = None
        return status

    def scrape(self) -> dict[str, float]:
        """Every sample on ``/metrics`` by its name with labels; empty when down."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return {}
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def value(self, sample: str) -> float:
        """One sample's value, ``-1`` when the endpoint is not up yet."""
        return self.scrape().get(sample, -1.0)

    def total(self, prefix: str) -> float:
        """The sum of every sample whose name with labels starts with ``prefix``."""
        return sum(v for k, v in self.scrape().items() if k.startswith(prefix))


def simulate(
    procs: Processes, name: str, broker: Mosquitto, *options: str
) -> subprocess.Popen[bytes]:
    """Start ``loadmeter simulate`` with ``options`` against ``broker``."""
    argv = [sys.executable, "-m", "loadmeter", "simulate", *options]
    return procs.spawn(name, argv, {"MQTT_PORT": str(broker.port)})
