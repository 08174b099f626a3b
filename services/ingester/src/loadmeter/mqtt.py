"""The broker side: paho-mqtt lives here and nowhere else.

The network callback only stamps the receive time and hands the message on;
everything else happens on other threads. Connection loss is handled by
paho's loop, which reconnects with capped backoff; every (re)connect
subscribes again and announces ``online`` on the status topic, whose last
will is ``offline``.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .config import MqttSettings
from .metrics import Metrics

log = structlog.get_logger(__name__)

RECONNECT_MIN = 1
RECONNECT_MAX = 30
SESSION_EXPIRY = 7 * 24 * 3600
MAX_INFLIGHT = 1000


@dataclass(frozen=True, slots=True)
class Message:
    """A message as received, before any validation."""

    topic: str
    payload: bytes
    received_ms: int
    mid: int
    qos: int
    retained: bool = False
    connection: int = 0


class MqttSource:
    """Subscribes to every node's readings and passes them to ``deliver``.

    Messages of QoS 1 are acknowledged only when ``ack`` is called for them,
    so the broker redelivers whatever was not safely stored. A message from
    an earlier connection is never acknowledged on a later one, where its
    packet id may name another message; the broker redelivers it instead.
    """

    def __init__(
        self,
        settings: MqttSettings,
        deliver: Callable[[Message], None],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._deliver = deliver
        self._connected = threading.Event()
        self.accepting = True
        self._connection = 0
        self.client = self._build_client()

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up and subscribed."""
        return self._connected.is_set()

    def _build_client(self) -> paho.Client:
        s = self.settings
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            self._configure_tls(client)
        client.will_set(s.status_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _configure_tls(self, client: paho.Client) -> None:
        s = self.settings
        client.tls_set(
            ca_certs=str(s.tls_ca) if s.tls_ca else None,
            certfile=str(s.tls_cert) if s.tls_cert else None,
            keyfile=str(s.tls_key) if s.tls_key else None,
            cert_reqs=ssl.CERT_NONE if s.tls_insecure else ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(s.tls_insecure)

    def start(self) -> None:
        """Connect in the background; paho's thread keeps retrying."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY
        s = self.settings
        self.client.connect_async(
            s.host, s.port, s.keepalive, clean_start=False, properties=props
        )
        self.client.loop_start()
        log.info("mqtt_connecting", host=s.host, port=s.port, client_id=s.client_id)

    def ack(self, messages: Iterable[Message]) -> None:
        """Acknowledge QoS 1 messages whose readings are safely stored."""
        for message in messages:
            if message.qos > 0 and message.connection == self._connection:
                self.client.ack(message.mid, message.qos)

    def stop_accepting(self) -> None:
        """Ignore further messages: unacknowledged ones are redelivered later."""
        self.accepting = False

    def stop(self, timeout: float = 2.0) -> None:
        """Announce ``offline``, disconnect cleanly and stop the network thread."""
        if self.connected:
            info = self.client.publish(
                self.settings.status_topic, "offline", qos=1, retain=True
            )
            deadline = time.monotonic() + timeout
            while not info.is_published() and time.monotonic() < deadline:
                time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()
        self.metrics.mqtt_connected.set(0)
        log.info("mqtt_disconnected", reason="shutdown")

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.error("mqtt_connect_refused", reason=str(reason))
            return
        self._connection += 1
        options = SubscribeOptions(qos=self.settings.qos)
        client.subscribe(self.settings.metrics_topic, options=options)
        client.publish(self.settings.status_topic, "online", qos=1, retain=True)
        log.info(
            "mqtt_connected",
            session_present=bool(flags.session_present),
            topic=self.settings.metrics_topic,
        )

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error(
                "mqtt_subscribe_refused",
                topic=self.settings.metrics_topic,
                reason=failed,
            )
            return
        self._connected.set()
        self.metrics.mqtt_connected.set(1)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self.metrics.mqtt_connected.set(0)
        if was_connected and self.accepting:
            log.warning("mqtt_connection_lost", reason=str(reason))

    def _on_message(
        self, client: paho.Client, userdata: Any, message: paho.MQTTMessage
    ) -> None:
        if not self.accepting:
            return
        received_ms = time.time_ns() // 1_000_000
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = ""  # the payload model rejects it as a topic without a node
        self._deliver(
            Message(
                topic,
                bytes(message.payload),
                received_ms,
                message.mid,
                message.qos,
                retained=bool(message.retain),
                connection=self._connection,
            )
        )
