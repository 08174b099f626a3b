"""A household's electrical load, as the firmware would report it.

Pure and seedable: ``NodeModel`` turns a wall-clock time into one reading,
``firmware_payload`` prints it byte for byte as the ESP32 does, and
``readings`` strings nodes together offline, for tests and benchmarks.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

Value = str | int | float

NOMINAL_VRMS = 230.0
VRMS_LOW, VRMS_HIGH = NOMINAL_VRMS * 0.97, NOMINAL_VRMS * 1.03
MILLIS_WRAP = 1 << 32
MAX_CT = 16
FIRMWARE_PERIOD_S = 1.0
SERVICE_OHMS = 0.05  # supply impedance: a kettle dips the voltage by half a volt


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
