"""Run an ingester in-process against a real broker, and publish to it."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from loadmeter.app import Ingester, Parts
from loadmeter.cli import open_spool
from loadmeter.config import Settings, read_settings
from loadmeter.deadletter import DeadLetter
from loadmeter.envreader import EnvReader
from loadmeter.metrics import Metrics
from loadmeter.sinks import Sink
from paho.mqtt.enums import CallbackAPIVersion

from tests.services import Mosquitto, wait_for

BASE = "home/load_meter"
_ids = itertools.count(1)


def settings_for(broker: Mosquitto, state: Path, **extra: str) -> Settings:
    """Settings pointing at ``broker``, metrics on any free port."""
    env = EnvReader(
        {
            "MQTT_PORT": str(broker.port),
            "MQTT_CLIENT_ID": f"test-ingester-{next(_ids)}",
            "METRICS_HOST": "127.0.0.1",
            "METRICS_PORT": "0",
            "STATE_DIR": str(state),
            "FLUSH_INTERVAL": "0.1",
            **extra,
        }
    )
    settings = read_settings(env)
    env.raise_if_problems()
    return settings


def build(settings: Settings, sinks: Sequence[Sink]) -> Ingester:
    """An ingester with its spool and dead letter under the state dir."""
    metrics = Metrics(sink.name for sink in sinks)
    spool = open_spool(settings, [s.name for s in sinks], metrics.spool_dropped.inc)
    deadletter = DeadLetter(settings.deadletter_path, settings.deadletter_max_bytes)
    return Ingester(Parts(settings, sinks, spool, deadletter, metrics))


@contextlib.contextmanager
def running(ingester: Ingester) -> Iterator[Ingester]:
    """Start the ingester, wait until it is subscribed, stop it afterwards."""
    ingester.start()
    try:
        wait_for(lambda: ingester.mqtt.connected, 15, "the ingester to subscribe")
        yield ingester
    finally:
        ingester.stop()


class Publisher:
    """A plain MQTT client publishing like a node (QoS 0, retained)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"pub-{next(_ids)}"
        )
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self._lock = threading.Lock()

    def send(
        self,
        node: str,
        payload: bytes | str | Mapping[str, Any],
        qos: int = 0,
        retain: bool = True,
        topic: str | None = None,
    ) -> None:
        """Publish one payload (a mapping is sent as JSON) and wait until it left."""
        body = json.dumps(payload) if isinstance(payload, Mapping) else payload
        info = self.client.publish(
            topic or f"{BASE}/{node}/metrics", body, qos=qos, retain=retain
        )
        info.wait_for_publish(5)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    """A connected publisher, disconnected afterwards."""
    pub = Publisher(broker)
    try:
        yield pub
    finally:
        pub.close()
