"""``loadmeter simulate``: publish plausible readings in the firmware's format.

The household model is pure and seedable: ``NodeModel`` turns a wall-clock
time into one reading, ``firmware_payload`` prints it byte for byte as the
ESP32 does, and ``readings`` strings nodes together offline. ``run`` paces
that stream onto a broker for demos, tests and benchmarks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .config import MqttSettings, read_mqtt
from .envreader import EnvReader
from .errors import ConfigError, LoadmeterError

log = structlog.get_logger(__name__)

Value = str | int | float

NOMINAL_VRMS = 230.0
VRMS_LOW, VRMS_HIGH = NOMINAL_VRMS * 0.97, NOMINAL_VRMS * 1.03
MILLIS_WRAP = 1 << 32
MAX_CT = 16
FIRMWARE_PERIOD_S = 1.0
SERVICE_OHMS = 0.05  # supply impedance: a kettle dips the voltage by half a volt
WINDOW = 100  # messages handed to paho but not yet written (QoS 0) or acked (QoS 1)
CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 30.0


class BrokerUnavailableError(LoadmeterError):
    """The simulator could not connect to, or was refused by, the broker."""


@dataclass(frozen=True, slots=True)
class Phase:
    """One stage of an appliance's run: a duration range, real power, PF."""

    seconds: tuple[float, float]
    watts: float
    power_factor: float


@dataclass(frozen=True, slots=True)
class Appliance:
    """Something that runs through its phases, then rests ``mean_off_s``."""

    name: str
    phases: tuple[Phase, ...]
    mean_off_s: float


@dataclass(frozen=True, slots=True)
class Circuit:
    """What one CT clamp sees: a standby floor, appliances, maybe a PV inverter."""

    name: str
    standby_w: float
    appliances: tuple[Appliance, ...] = ()
    solar_peak_w: float = 0.0


def _appliance(name: str, mean_off_min: float, *phases: tuple[float, ...]) -> Appliance:
    """An appliance from minutes: ``(shortest, longest, watts, power factor)``."""
    runs = tuple(Phase((lo * 60, hi * 60), watts, pf) for lo, hi, watts, pf in phases)
    return Appliance(name, runs, mean_off_min * 60)


FRIDGE = _appliance("fridge", 25, (8, 20, 95, 0.78))
KETTLE = _appliance("kettle", 90, (2, 4, 2000, 0.99))
MICROWAVE = _appliance("microwave", 90, (1, 5, 1150, 0.92))
OVEN = _appliance("oven", 600, (10, 15, 2400, 0.99), (20, 45, 1100, 0.99))
DISHWASHER = _appliance(
    "dishwasher", 720, (10, 15, 1900, 0.98), (30, 45, 70, 0.65), (8, 12, 1900, 0.98)
)
WASHER = _appliance(
    "washer", 600, (10, 20, 2000, 0.98), (30, 50, 250, 0.62), (5, 10, 500, 0.75)
)
HEAT_PUMP = _appliance("heat_pump", 80, (20, 50, 1600, 0.95))
LIGHTING = _appliance("lighting", 60, (30, 120, 120, 0.9))
TELEVISION = _appliance("television", 180, (30, 150, 110, 0.95))
COMPUTER = _appliance("computer", 120, (30, 180, 180, 0.97))
VACUUM = _appliance("vacuum", 480, (5, 15, 750, 0.97))
DRILL = _appliance("drill", 120, (0.5, 3, 650, 0.85))

KITCHEN = Circuit("kitchen", 12, (FRIDGE, KETTLE, MICROWAVE, OVEN, DISHWASHER))
UTILITY = Circuit("utility", 8, (WASHER, HEAT_PUMP))
SOLAR = Circuit("solar", 0, solar_peak_w=3000)
LIVING = Circuit("living", 25, (LIGHTING, TELEVISION, COMPUTER, VACUUM))
WORKSHOP = Circuit("workshop", 5, (LIGHTING, DRILL, VACUUM))
WHOLE_HOUSE = Circuit(
    "house", 45, (*KITCHEN.appliances, *UTILITY.appliances, *LIVING.appliances)
)
# Split boards clamp one circuit per CT; a PV inverter appears once, on ct3.
SPLIT_BOARD = (KITCHEN, UTILITY, SOLAR, LIVING, WORKSHOP)
MORE_CIRCUITS = (KITCHEN, UTILITY, LIVING, WORKSHOP)


def circuits_for(ct: int) -> tuple[Circuit, ...]:
    """The circuit each of ``ct`` clamps measures; one CT sees the whole house."""
    if ct == 1:
        return (WHOLE_HOUSE,)
    extra = itertools.cycle(MORE_CIRCUITS)
    return tuple(
        SPLIT_BOARD[i] if i < len(SPLIT_BOARD) else next(extra) for i in range(ct)
    )


def _reactive(watts: float, power_factor: float) -> float:
    """Reactive power (var) that goes with ``watts`` at ``power_factor``."""
    return abs(watts) * math.sqrt(1.0 - power_factor**2) / power_factor


class _ApplianceRun:
    """One appliance in one home: off, or part-way through its phases."""

    def __init__(self, appliance: Appliance, rng: random.Random) -> None:
        self.appliance = appliance
        self.scale = rng.uniform(0.85, 1.15)  # no two kettles draw the same
        self.phase = -1
        self.left_s = 0.0

        # Start in the steady state rather than with everything off.
        first = appliance.phases[0].seconds
        running_s = sum(sum(phase.seconds) / 2 for phase in appliance.phases)
        if rng.random() < running_s / (running_s + appliance.mean_off_s):
            self.phase, self.left_s = 0, rng.uniform(0, first[1])

    def advance(self, dt: float, rng: random.Random) -> tuple[float, float]:
        """Move on ``dt`` seconds; the (real, reactive) power drawn now."""
        phases = self.appliance.phases
        if self.phase < 0:
            if rng.random() >= -math.expm1(-dt / self.appliance.mean_off_s):
                return 0.0, 0.0
            self.phase, self.left_s = 0, rng.uniform(*phases[0].seconds)
        else:
            self.left_s -= dt
        while self.phase >= 0 and self.left_s <= 0:
            self.phase += 1
            if self.phase == len(phases):
                self.phase = -1
            else:
                self.left_s += rng.uniform(*phases[self.phase].seconds)

        if self.phase < 0:
            return 0.0, 0.0
        phase = phases[self.phase]
        watts = phase.watts * self.scale * rng.uniform(0.98, 1.02)
        return watts, _reactive(watts, phase.power_factor)


class _Inverter:
    """A PV inverter exporting by day under drifting cloud, idling by night."""

    def __init__(self, peak_w: float, rng: random.Random) -> None:
        self.peak_w = peak_w * rng.uniform(0.8, 1.1)
        self.cloud = rng.uniform(0.4, 1.0)

    def advance(self, dt: float, now: float, rng: random.Random) -> tuple[float, float]:
        """Move on ``dt`` seconds; (real, reactive) power, real negative on export."""
        drift = rng.gauss(0.0, 0.01) * math.sqrt(dt)
        self.cloud = min(1.0, max(0.15, self.cloud + drift))
        hour = (now % 86_400) / 3600  # solar time taken as UTC: plausible, not local
        sun = math.sin(math.pi * (hour - 6) / 14) if 6 < hour < 20 else 0.0
        output = self.peak_w * sun * self.cloud
        if output < 20:
            return 4.0, _reactive(4.0, 0.4)
        return -output, _reactive(output, 0.99 if output > 300 else 0.9)


class _CircuitState:
    """A circuit's appliances and inverter in one home, stepped together."""

    def __init__(self, circuit: Circuit, rng: random.Random) -> None:
        self.standby_w = circuit.standby_w * rng.uniform(0.7, 1.3)
        self.runs = [_ApplianceRun(a, rng) for a in circuit.appliances]
        self.inverter = (
            _Inverter(circuit.solar_peak_w, rng) if circuit.solar_peak_w else None
        )

    def advance(self, dt: float, now: float, rng: random.Random) -> tuple[float, float]:
        """Move on ``dt`` seconds; the (real W, apparent VA) the clamp sees."""
        real = self.standby_w + rng.gauss(0.0, 0.4)
        reactive = _reactive(self.standby_w, 0.6)
        for run in self.runs:
            p, q = run.advance(dt, rng)
            real, reactive = real + p, reactive + q
        if self.inverter is not None:
            p, q = self.inverter.advance(dt, now, rng)
            real, reactive = real + p, reactive + q
        return real, math.hypot(real, reactive)


class NodeModel:
    """One simulated ESP32 node: its circuits, supply voltage and clocks.

    ``rng`` makes the node reproducible; ``uptime_ms`` is where its
    ``millis()`` counter starts (random when not given).
    """

    def __init__(
        self,
        node: str,
        ct: int = 1,
        voltage: bool = False,
        rng: random.Random | None = None,
        uptime_ms: int | None = None,
    ) -> None:
        if not 1 <= ct <= MAX_CT:
            raise ValueError(f"ct must be 1..{MAX_CT}, got {ct}")
        self.node, self.ct, self.voltage = node, ct, voltage
        self._rng = rng or random.Random()  # noqa: S311 - load noise, not secrets
        self._circuits = [_CircuitState(c, self._rng) for c in circuits_for(ct)]
        self._uptime_ms = (
            self._rng.randrange(MILLIS_WRAP) if uptime_ms is None else uptime_ms
        )
        self._grid_v = min(VRMS_HIGH, max(VRMS_LOW, self._rng.gauss(NOMINAL_VRMS, 2.0)))
        self._current = 0.0
        self._first: float | None = None
        self._last = 0.0

    def next_reading(self, now: float) -> dict[str, Value]:
        """The reading this node publishes at wall-clock ``now`` (epoch seconds)."""
        if self._first is None:
            self._first = self._last = now
        dt, self._last = max(0.0, now - self._last), now
        vrms = self._advance_voltage(dt)
        shown_v = vrms if self.voltage else NOMINAL_VRMS

        millis = (self._uptime_ms + round((now - self._first) * 1000)) % MILLIS_WRAP
        values: dict[str, Value] = {
            "node": self.node,
            "epoch": int(now),
            "t_ms": millis,
        }
        self._current = 0.0
        for i, circuit in enumerate(self._circuits, start=1):
            real, apparent = circuit.advance(dt, now, self._rng)
            irms = apparent / vrms
            self._current += irms
            values[f"ct{i}_irms"] = irms
            values[f"ct{i}_apparpower"] = irms * shown_v
            if self.voltage:
                values[f"ct{i}_power"] = real
        if self.voltage:
            values["vrms"] = vrms
        return values

    def _advance_voltage(self, dt: float) -> float:
        """A slow, mean-reverting walk around nominal, sagging under load."""
        pull = -math.expm1(-dt / 900.0)
        step = self._rng.gauss(0.0, 0.1) * math.sqrt(dt)
        grid = self._grid_v + (NOMINAL_VRMS - self._grid_v) * pull + step
        self._grid_v = min(VRMS_HIGH, max(VRMS_LOW, grid))
        return max(VRMS_LOW, self._grid_v - SERVICE_OHMS * self._current)


def firmware_payload(values: Mapping[str, Value]) -> bytes:
    """``values`` printed as the firmware does: compact, in order, floats ``%.3f``.

    Non-finite floats come out as ``nan``/``inf``, as the firmware's printf
    would print them.
    """
    parts = [f"{json.dumps(key)}:{_printed(value)}" for key, value in values.items()]
    return ("{" + ",".join(parts) + "}").encode()


def _printed(value: Value) -> str:
    if isinstance(value, bool):
        raise TypeError("the firmware never sends booleans")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def readings(
    nodes: Sequence[str],
    ct: int = 1,
    voltage: bool = False,
    seed: int | None = None,
    start_epoch: float | None = None,
    interval: float = FIRMWARE_PERIOD_S,
) -> Iterator[tuple[str, bytes]]:
    """Endless (node, payload) pairs, one round of ``nodes`` per ``interval``.

    Device time starts at ``start_epoch`` (now when None) and nodes are
    spread evenly across each interval, as unsynchronised devices would be.
    The same ``seed`` gives the same sequence.
    """
    if not nodes or interval <= 0:
        raise ValueError("readings needs at least one node and a positive interval")
    models = [NodeModel(node, ct, voltage, _node_rng(seed, node)) for node in nodes]
    start = time.time() if start_epoch is None else start_epoch
    for step in itertools.count():
        for index, model in enumerate(models):
            now = start + (step + index / len(models)) * interval
            yield model.node, firmware_payload(model.next_reading(now))


def _node_rng(seed: int | None, node: str) -> random.Random:
    """An independent generator per node, reproducible when ``seed`` is set."""
    if seed is None:
        return random.Random()  # noqa: S311 - load noise, not secrets
    return random.Random(f"{seed}/{node}")  # noqa: S311 - load noise, not secrets


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

    Returns 0 on a clean finish, 1 when the broker fails us, 2 on bad config.
    """
    options = Options.from_args(args)
    env = EnvReader()
    settings = read_mqtt(env)
    try:
        env.raise_if_problems()
    except ConfigError as exc:
        log.error("config_invalid", problems=exc.problems)
        return 2
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
