"""``loadmeter simulate``: firmware-exact payloads, plausible loads, a real broker."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pwd
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from loadmeter import cli, simulate
from loadmeter.simulate import NodeModel, firmware_payload, readings
from paho.mqtt.enums import CallbackAPIVersion

from tests.services import Mosquitto, free_port, require, wait_for

BASE = "test/load_meter"
NOON_UTC = 1764763200  # 2025-12-03 12:00:00 UTC
NUMBER = re.compile(r'"(?:ct\d+_[a-z]+|vrms)":(-?\d+\.\d{3})(?=[,}])')
INTEGER = re.compile(r'"(?:epoch|t_ms)":(\d+)(?=[,}])')


def parse(*argv: str) -> argparse.Namespace:
    """Parse ``argv`` with exactly the options the CLI registers."""
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    return parser.parse_args(list(argv))


def offline(count: int, *nodes: str, **kwargs: Any) -> list[tuple[str, bytes]]:
    """The first ``count`` (node, payload) pairs of the offline generator."""
    return list(itertools.islice(readings(list(nodes), **kwargs), count))


def firmware_keys(ct: int, voltage: bool) -> list[str]:
    """The keys, in order, that the firmware sends for ``ct`` clamps."""
    kinds = ("irms", "apparpower", "power") if voltage else ("irms", "apparpower")
    channels = [f"ct{i}_{kind}" for i in range(1, ct + 1) for kind in kinds]
    return ["node", "epoch", "t_ms", *channels, *(["vrms"] if voltage else [])]


class Subscriber:
    """A paho client that records every message on the metrics topics."""

    def __init__(self, port: int, username: str | None = None, password: str = ""):
        self.messages: list[mqtt.MQTTMessage] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = lambda _c, _u, message: self.messages.append(message)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(5), "no SUBACK"

    def _on_connect(self, client: mqtt.Client, *_: object) -> None:
        client.subscribe(f"{BASE}/+/metrics", qos=1)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[mqtt.MQTTMessage]:
        """Wait until ``count`` messages arrived; all of them."""
        wait_for(lambda: len(self.messages) >= count, timeout, f"{count} messages")
        return self.messages

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch) -> Mosquitto:
    """The broker, described to ``run`` by the ingester's own variables."""
    for name in [n for n in os.environ if n.startswith("MQTT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MQTT_HOST", "127.0.0.1")
    monkeypatch.setenv("MQTT_PORT", str(mosquitto.port))
    monkeypatch.setenv("MQTT_BASE_TOPIC", BASE)
    return mosquitto


@pytest.fixture
def subscribe(broker: Mosquitto) -> Iterator[type[Subscriber]]:
    """A factory for subscribers on ``broker``, closed after the test."""
    opened: list[Subscriber] = []

    class Bound(Subscriber):
        def __init__(self) -> None:
            super().__init__(broker.port)
            opened.append(self)

    yield Bound
    for subscriber in opened:
        subscriber.close()


def test_run_publishes_count_readings_per_node_on_node_topics(
    subscribe: type[Subscriber],
) -> None:
    """Three nodes times five readings arrive as fifteen messages, five per topic."""
    subscriber = subscribe()

    code = simulate.run(parse("--count", "5", "--nodes", "3", "--interval", "0"))

    messages = subscriber.wait_for(15)
    assert code == 0
    time.sleep(0.1)
    assert len(messages) == 15
    assert Counter(m.topic for m in messages) == {
        f"{BASE}/sim{i}/metrics": 5 for i in (1, 2, 3)
    }


def test_broker_payloads_are_byte_exact_firmware_json(
    subscribe: type[Subscriber],
) -> None:
    """Each payload is compact JSON in firmware key order, floats printed %.3f."""
    subscriber = subscribe()

    simulate.run(parse("--count", "3", "--nodes", "2", "--interval", "0"))

    for message in subscriber.wait_for(6):
        text = message.payload.decode()
        values = json.loads(text)
        assert list(values) == firmware_keys(1, voltage=False)
        assert message.topic == f"{BASE}/{values['node']}/metrics"
        assert len(NUMBER.findall(text)) == 2
        assert len(INTEGER.findall(text)) == 2
        assert type(values["epoch"]) is int
        assert type(values["t_ms"]) is int
        assert " " not in text


def test_late_subscriber_gets_each_nodes_last_reading_retained(
    subscribe: type[Subscriber],
) -> None:
    """Retain is on by default, so a new subscriber gets every node's last reading."""
    live = subscribe()
    simulate.run(parse("--count", "4", "--nodes", "3", "--interval", "0"))
    sent = live.wait_for(12)

    late = subscribe().wait_for(3)

    last = {m.topic: m.payload for m in sent}
    assert all(m.retain for m in late)
    assert {m.topic: m.payload for m in late} == last


def test_no_retain_leaves_nothing_for_a_late_subscriber(
    subscribe: type[Subscriber],
) -> None:
    """With --no-retain the broker keeps no reading for later subscribers."""
    simulate.run(parse("--count", "2", "--interval", "0", "--no-retain"))

    late = subscribe()
    time.sleep(0.3)

    assert late.messages == []


def test_qos1_flat_out_keeps_the_in_flight_window_bounded(
    subscribe: type[Subscriber], monkeypatch: pytest.MonkeyPatch
) -> None:
    """QoS 1 at full speed delivers everything with at most WINDOW unacked."""
    subscriber = subscribe()
    pending: list[int] = []
    confirm = simulate._confirm

    def recording(window: Any, tally: simulate.Tally) -> bool:
        pending.append(len(window))
        return confirm(window, tally)

    monkeypatch.setattr(simulate, "_confirm", recording)

    code = simulate.run(
        parse("--qos", "1", "--interval", "0", "--count", "300", "--nodes", "5")
    )

    assert code == 0
    assert len(subscriber.wait_for(1500)) == 1500
    assert max(pending) <= simulate.WINDOW + 1


def test_interval_paces_nodes_on_a_steady_schedule(
    subscribe: type[Subscriber],
) -> None:
    """Two nodes at 0.2 s each publish every 0.1 s, so six readings take 0.5 s."""
    subscriber = subscribe()
    started = time.monotonic()

    simulate.run(parse("--interval", "0.2", "--count", "3", "--nodes", "2"))

    elapsed = time.monotonic() - started
    assert len(subscriber.wait_for(6)) == 6
    assert 0.45 <= elapsed < 1.5


def test_host_and_port_options_override_the_environment(
    subscribe: type[Subscriber], broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--host and --port win over MQTT_HOST and MQTT_PORT."""
    subscriber = subscribe()
    monkeypatch.setenv("MQTT_HOST", "invalid.example")
    monkeypatch.setenv("MQTT_PORT", str(free_port()))

    argv = ("--host", "127.0.0.1", "--port", str(broker.port), "--count", "1")
    code = simulate.run(parse(*argv, "--interval", "0"))

    assert code == 0
    assert len(subscriber.wait_for(2)) == 2


def test_unreachable_broker_exits_with_1(broker: Mosquitto) -> None:
    """Nothing listening on the port is a broker failure, exit code 1."""
    args = parse("--port", str(free_port()), "--count", "1")

    assert simulate.run(args) == 1


def test_invalid_environment_exits_with_2(
    broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A malformed MQTT_PORT is a configuration error, exit code 2."""
    monkeypatch.setenv("MQTT_PORT", "eighteen")

    assert cli.main(["simulate", "--count", "1"]) == 2


@pytest.fixture
def locked_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker that only lets user ``meter`` with password ``s3cret`` in."""
    passwords = tmp_path / "passwords"
    subprocess.run(
        [require("mosquitto_passwd"), "-b", "-c", str(passwords), "meter", "s3cret"],
        check=True,
        capture_output=True,
    )
    passwords.chmod(0o600)
    config = (
        "listener {port} 127.0.0.1\nallow_anonymous false\n"
        f"password_file {passwords}\n"
        # Started as root, mosquitto would drop to a user that cannot read tmp_path.
        f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
    )
    server = Mosquitto(tmp_path, config=config)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def login_env(
    locked_broker: Mosquitto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Path:
    """MQTT_* pointing at ``locked_broker`` as ``meter``; the password file to fill."""
    for name in [n for n in os.environ if n.startswith("MQTT_")]:
        monkeypatch.delenv(name)
    secret = tmp_path / "mqtt_pass"
    monkeypatch.setenv("MQTT_PORT", str(locked_broker.port))
    monkeypatch.setenv("MQTT_BASE_TOPIC", BASE)
    monkeypatch.setenv("MQTT_USER", "meter")
    monkeypatch.setenv("MQTT_PASS_FILE", str(secret))
    return secret


def test_credentials_come_from_mqtt_user_and_pass_file(
    locked_broker: Mosquitto, login_env: Path
) -> None:
    """MQTT_USER and the password in MQTT_PASS_FILE log in to a locked broker."""
    login_env.write_text("s3cret\n")
    subscriber = Subscriber(locked_broker.port, "meter", "s3cret")

    code = simulate.run(parse("--count", "1", "--nodes", "1", "--interval", "0"))

    assert code == 0
    assert len(subscriber.wait_for(1)) == 1
    subscriber.close()


def test_refused_login_exits_with_1(login_env: Path) -> None:
    """A wrong password is refused by the broker and ends the run with exit code 1."""
    login_env.write_text("wrong\n")

    assert simulate.run(parse("--count", "1", "--interval", "0")) == 1


RUNNER = (
    "import argparse, sys\n"
    "from loadmeter import simulate\n"
    "parser = argparse.ArgumentParser()\n"
    "simulate.add_arguments(parser)\n"
    "sys.exit(simulate.run(parser.parse_args(sys.argv[1:])))\n"
)


def test_sigterm_stops_cleanly_and_reports_a_summary(
    subscribe: type[Subscriber],
) -> None:
    """SIGTERM ends an endless run with exit code 0 and a closing summary."""
    subscriber = subscribe()
    process = subprocess.Popen(
        [sys.executable, "-c", RUNNER, "--interval", "0.05", "--nodes", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    subscriber.wait_for(3)

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=5)

    assert process.returncode == 0, output
    assert b"simulate_finished" in output
    assert b"stopped" in output


def test_firmware_payload_prints_like_the_firmware() -> None:
    """Strings quoted, ints bare, floats with exactly three decimals, no spaces."""
    values = {"node": "node_main", "epoch": 1764777600, "t_ms": 5123456}
    values |= {"ct1_irms": 1.234, "ct1_apparpower": 283.82, "ct1_power": -0.5}

    payload = firmware_payload(values)

    assert payload == (
        b'{"node":"node_main","epoch":1764777600,"t_ms":5123456,'
        b'"ct1_irms":1.234,"ct1_apparpower":283.820,"ct1_power":-0.500}'
    )


@pytest.mark.parametrize(("ct", "voltage"), [(1, False), (3, False), (2, True)])
def test_keys_follow_ct_count_and_voltage(ct: int, voltage: bool) -> None:
    """--ct adds ctN keys; --voltage adds ctN_power per clamp and vrms last."""
    pairs = offline(4, "a", "b", ct=ct, voltage=voltage, seed=1)

    for _node, payload in pairs:
        text = payload.decode()
        assert list(json.loads(text)) == firmware_keys(ct, voltage)
        assert len(NUMBER.findall(text)) == len(firmware_keys(ct, voltage)) - 3


def test_same_seed_gives_the_same_payloads() -> None:
    """A seed and start epoch fix the whole sequence; another seed changes it."""
    kwargs: dict[str, Any] = {"ct": 3, "voltage": True, "start_epoch": NOON_UTC}

    first = offline(200, "sim1", "sim2", seed=7, **kwargs)
    again = offline(200, "sim1", "sim2", seed=7, **kwargs)
    other = offline(200, "sim1", "sim2", seed=8, **kwargs)

    assert first == again
    assert first != other


def test_clocks_follow_start_epoch_interval_and_millis() -> None:
    """Epoch counts whole seconds from start; t_ms advances by the interval."""
    pairs = offline(6, "a", "b", seed=3, start_epoch=NOON_UTC, interval=2.0)

    readings_a = [json.loads(p) for node, p in pairs if node == "a"]
    readings_b = [json.loads(p) for node, p in pairs if node == "b"]
    assert [r["epoch"] - NOON_UTC for r in readings_a] == [0, 2, 4]
    assert [r["epoch"] - NOON_UTC for r in readings_b] == [1, 3, 5]
    steps = [(b["t_ms"] - a["t_ms"]) % 2**32 for a, b in itertools.pairwise(readings_a)]
    assert steps == [2000, 2000]


def test_t_ms_wraps_like_an_unsigned_32_bit_counter() -> None:
    """millis() past 2**32 - 1 starts again from zero."""
    model = NodeModel("a", uptime_ms=2**32 - 1500)

    stamps = [model.next_reading(NOON_UTC + s)["t_ms"] for s in (0, 1, 2)]

    assert stamps == [2**32 - 1500, 2**32 - 500, 500]


def day_of_readings(ct: int, voltage: bool, seed: int = 11) -> list[dict[str, Any]]:
    """A simulated day of one node sampled every 20 s, from midnight UTC."""
    start = NOON_UTC - 12 * 3600
    kwargs = {"ct": ct, "voltage": voltage, "seed": seed, "interval": 20.0}
    pairs = offline(4320, "a", start_epoch=start, **kwargs)
    return [json.loads(payload) for _node, payload in pairs]


def test_readings_are_physically_consistent() -> None:
    """apparent >= |real|, irms x vrms = apparent, vrms within 230 V +-5 %."""
    day = day_of_readings(ct=5, voltage=True)

    for reading in day:
        vrms = reading["vrms"]
        assert 218.5 <= vrms <= 241.5
        for i in range(1, 6):
            irms, apparent = reading[f"ct{i}_irms"], reading[f"ct{i}_apparpower"]
            assert apparent >= abs(reading[f"ct{i}_power"])
            rounding = 0.0005 * (vrms + irms + 1)
            assert math.isclose(irms * vrms, apparent, abs_tol=rounding)


def test_without_voltage_apparent_power_assumes_nominal_230_v() -> None:
    """Like the firmware, a node without a VT reports irms x 230 as apparent power."""
    day = day_of_readings(ct=2, voltage=False)

    for reading in day:
        for i in (1, 2):
            irms, apparent = reading[f"ct{i}_irms"], reading[f"ct{i}_apparpower"]
            assert math.isclose(irms * 230, apparent, abs_tol=0.0005 * 231)


def test_whole_house_shows_base_load_appliances_and_power_factors() -> None:
    """One CT sees a never-zero base load, kettle-sized peaks and PF 0.6..0.99."""
    day = day_of_readings(ct=1, voltage=True)

    power = [r["ct1_power"] for r in day]
    factors = [r["ct1_power"] / r["ct1_apparpower"] for r in day]
    assert min(power) > 20
    assert max(power) > 1800
    assert 0.55 < min(factors) < 0.85
    assert 0.95 < max(factors) <= 1.0
    assert len({round(p, -1) for p in power}) > 100


def test_only_the_solar_circuit_exports_and_only_by_day() -> None:
    """ct3 goes negative in daylight; every other circuit only imports."""
    day = day_of_readings(ct=5, voltage=True)

    night = [r["ct3_power"] for r in day if r["epoch"] < NOON_UTC - 8 * 3600]
    noon = [r["ct3_power"] for r in day if abs(r["epoch"] - NOON_UTC) < 3600]
    assert min(night) > 0
    assert max(noon) < -100
    assert all(r[f"ct{i}_power"] > 0 for r in day for i in (1, 2, 4, 5))


def test_defaults_match_the_firmware() -> None:
    """Defaults: 2 nodes sim1.., 1 s, forever, one CT, no voltage, QoS 0, retain."""
    args = parse()

    assert vars(args) == {
        "nodes": 2,
        "node_prefix": "sim",
        "interval": 1.0,
        "count": 0,
        "ct": 1,
        "voltage": False,
        "qos": 0,
        "retain": True,
        "seed": None,
        "start_epoch": None,
        "host": None,
        "port": None,
    }


@pytest.mark.parametrize(
    "argv",
    [
        ("--ct", "17"),
        ("--ct", "0"),
        ("--qos", "2"),
        ("--interval", "-1"),
        ("--nodes", "0"),
        ("--node-prefix", "a/b"),
    ],
)
def test_out_of_range_options_are_rejected(
    argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """Options outside their documented range stop argparse with a usage error."""
    with pytest.raises(SystemExit):
        parse(*argv)

    assert "error" in capsys.readouterr().err
