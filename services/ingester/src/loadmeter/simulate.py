"""``loadmeter simulate``: publish plausible readings in the firmware's format.

The readings come from the household model in ``household``; ``run`` paces
that stream onto a broker for demos, tests and benchmarks.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from . import logs
from .config import LOG_FORMATS, LOG_LEVELS, MqttSettings, read_mqtt
from .envreader import EnvReader
from .errors import LoadmeterError
from .household import (
    FIRMWARE_PERIOD_S,
    MAX_CT,
    NodeModel,
    circuits_for,
    firmware_payload,
    readings,
)

__all__ = [
    "NodeModel",
    "add_arguments",
    "circuits_for",
    "firmware_payload",
    "readings",
    "run",
]

log = structlog.get_logger(__name__)

WINDOW = 100  # messages handed to paho but not yet written (QoS 0) or acked (QoS 1)
CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 30.0


class BrokerUnavailableError(LoadmeterError):
    """The simulator could not connect to, or was refused by, the broker."""


@dataclass(frozen=True, slots=True)
class Options:
    """The command line, typed."""

    nodes: tuple[str, ...]
    interval: float
    count: int
    ct: int
    voltage: bool
    qos: int
    retain: bool
    seed: int | None
    start_epoch: int | None
    host: str | None
    port: int | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        """Pick the simulator's options out of a parsed namespace."""
        nodes = tuple(f"{args.node_prefix}{i}" for i in range(1, args.nodes + 1))
        return cls(
            nodes=nodes,
            interval=args.interval,
            count=args.count,
            ct=args.ct,
            voltage=args.voltage,
            qos=args.qos,
            retain=args.retain,
            seed=args.seed,
            start_epoch=args.start_epoch,
            host=args.host,
            port=args.port,
        )


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low}..{high}, got {text!r}")
        return value

    return parse


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"expected 0..3600 seconds, got {text!r}")
    return value


def _node_prefix(text: str) -> str:
    if not text or any(c in text for c in "/+#"):
        raise argparse.ArgumentTypeError(f"expected a topic-safe name, got {text!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``simulate`` options on ``parser``."""
    add = parser.add_argument
    on_off = argparse.BooleanOptionalAction
    add("--nodes", type=_bounded_int(1, 10_000), default=2, help="simulated nodes")
    add("--node-prefix", type=_node_prefix, default="sim", help="node ids: sim1...")
    add(
        "--interval",
        type=_interval,
        default=1.0,
        metavar="SECONDS",
        help="seconds between one node's readings; 0 = as fast as possible, "
        "device clocks then advancing 1 s per reading",
    )
    add(
        "--count",
        type=_bounded_int(0, 10**9),
        default=0,
        help="readings per node; 0 = until interrupted",
    )
    add("--ct", type=_bounded_int(1, MAX_CT), default=1, help="CT clamps per node")
    add("--voltage", action=on_off, default=False, help="send ct{i}_power and vrms")
    add("--qos", type=int, choices=(0, 1), default=0, help="publish QoS")
    add("--retain", action=on_off, default=True, help="retain, as the firmware does")
    add("--seed", type=int, default=None, help="make the readings reproducible")
    add(
        "--start-epoch",
        type=_bounded_int(0, 2**40),
        default=None,
        help="device clock at the first reading (default: now)",
    )
    add("--host", default=None, help="broker host (overrides MQTT_HOST)")
    add("--port", type=_bounded_int(1, 65535), default=None, help="overrides MQTT_PORT")


def run(args: argparse.Namespace) -> int:
    """Publish readings until ``--count`` is reached or a signal arrives.

    Returns 0 on a clean finish, 1 when the broker fails us; a bad
    environment raises ``ConfigError`` (the command exits 2). Logs go to
    stderr, as the ingester's do.
    """
    options = Options.from_args(args)
    env = EnvReader()
    settings = read_mqtt(env)
    level = env.choice("LOG_LEVEL", "info", LOG_LEVELS)
    fmt = env.choice("LOG_FORMAT", "auto", LOG_FORMATS)
    env.raise_if_problems()
    logs.configure(level, fmt)
    host, port = options.host or settings.host, options.port or settings.port

    stop = threading.Event()
    with _stop_on_signals(stop):
        try:
            client = _connect(settings, host, port)
        except BrokerUnavailableError as exc:
            log.error("broker_unreachable", host=host, port=port, reason=str(exc))
            return 1
        log.info(
            "simulate_started",
            host=host,
            port=port,
            nodes=len(options.nodes),
            topic=f"{settings.base_topic}/+/metrics",
            qos=options.qos,
        )
        try:
            tally = _publish(client, options, settings.base_topic, stop)
        finally:
            client.disconnect()
            client.loop_stop()
    log.info("simulate_finished", **tally.summary())
    return 1 if tally.outcome == "stalled" else 0


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Turn SIGINT and SIGTERM into ``stop`` while inside, when on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {
        sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _connect(settings: MqttSettings, host: str, port: int) -> mqtt.Client:
    """A started paho client, connected, or ``BrokerUnavailableError``."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"loadmeter-sim-{os.getpid()}"
    )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set(
            ca_certs=_text(settings.tls_ca),
            certfile=_text(settings.tls_cert),
            keyfile=_text(settings.tls_key),
        )
        client.tls_insecure_set(settings.tls_insecure)
    client.max_inflight_messages_set(WINDOW)
    answered = threading.Event()
    refusals: list[ReasonCode] = []

    def on_connect(
        c: mqtt.Client, u: Any, f: Any, rc: ReasonCode, p: Properties | None
    ) -> None:
        if rc.is_failure:
            refusals.append(rc)
        elif answered.is_set():
            log.info("broker_reconnected", host=host, port=port)
        answered.set()

    def on_disconnect(
        c: mqtt.Client, u: Any, f: Any, rc: ReasonCode, p: Properties | None
    ) -> None:
        if rc.is_failure:
            log.warning("broker_disconnected", host=host, port=port, reason=str(rc))

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    try:
        client.connect(host, port, settings.keepalive)
    except OSError as exc:
        raise BrokerUnavailableError(exc.strerror or str(exc)) from exc
    client.loop_start()
    if not answered.wait(CONNECT_TIMEOUT_S) or refusals:
        client.loop_stop()
        raise BrokerUnavailableError(
            str(refusals[0]) if refusals else "no CONNACK in time"
        )
    return client


def _text(path: os.PathLike[str] | None) -> str | None:
    return None if path is None else os.fspath(path)


@dataclass(slots=True)
class Tally:
    """What a run achieved: confirmed, refused by paho, still unconfirmed."""

    started: float
    published: int = 0
    dropped: int = 0
    unconfirmed: int = 0
    outcome: str = "completed"

    def summary(self) -> dict[str, object]:
        """The counts and rate for the closing log event."""
        seconds = max(time.monotonic() - self.started, 1e-9)
        return {
            "published": self.published,
            "dropped": self.dropped,
            "unconfirmed": self.unconfirmed,
            "outcome": self.outcome,
            "seconds": round(seconds, 3),
            "rate_per_s": round(self.published / seconds, 1),
        }


def _publish(
    client: mqtt.Client, options: Options, base_topic: str, stop: threading.Event
) -> Tally:
    """Pace readings onto ``{base}/{node}/metrics`` on a drift-free schedule."""
    stream = readings(
        options.nodes,
        options.ct,
        options.voltage,
        options.seed,
        options.start_epoch,
        options.interval or FIRMWARE_PERIOD_S,
    )
    if options.count:
        stream = itertools.islice(stream, options.count * len(options.nodes))
    spacing = options.interval / len(options.nodes)
    window: deque[mqtt.MQTTMessageInfo] = deque()
    tally = Tally(started=time.monotonic())

    for index, (node, payload) in enumerate(stream):
        if _sleep_until(tally.started + index * spacing, stop):
            tally.outcome = "stopped"
            break
        topic = f"{base_topic}/{node}/metrics"
        info = client.publish(topic, payload, options.qos, options.retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            tally.dropped += 1
            continue
        window.append(info)
        if len(window) > WINDOW and not _confirm(window, tally):
            break

    while window and tally.outcome != "stalled" and _confirm(window, tally):
        pass
    tally.unconfirmed = len(window)
    return tally


def _sleep_until(due: float, stop: threading.Event) -> bool:
    """Wait for the monotonic time ``due``; whether a stop was asked for."""
    delay = due - time.monotonic()
    return stop.wait(delay) if delay > 0 else stop.is_set()


def _confirm(window: deque[mqtt.MQTTMessageInfo], tally: Tally) -> bool:
    """Wait for the oldest message to be written (QoS 0) or acked (QoS 1)."""
    window[0].wait_for_publish(PUBLISH_TIMEOUT_S)
    if not window[0].is_published():
        tally.outcome = "stalled"
        log.error("publish_stalled", waited_s=PUBLISH_TIMEOUT_S, pending=len(window))
        return False
    window.popleft()
    tally.published += 1
    return True
