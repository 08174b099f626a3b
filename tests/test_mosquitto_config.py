"""The project's mosquitto.conf and acl, run in a real mosquitto.

The configuration is used as shipped; only its container paths and port are
swapped for temporary ones. Logins come from scripts/generate-secrets.py.
A test-only `witness` user may read every topic, so a refused publish can be
shown to arrive nowhere: each test publishes the forbidden messages, then an
allowed "fence" message from the same client, and once the fence arrives
nothing published before it can still be on its way.
"""

from __future__ import annotations

import json
import os
import pwd
import queue
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.services import Mosquitto
from tests.test_secrets import load_generator
from tests.test_stack_static import compose_binary

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "mosquitto" / "mosquitto.conf"
ACL = ROOT / "mosquitto" / "acl"
ANONYMOUS_SNIPPET = ROOT / "mosquitto" / "conf.d" / "anonymous-nodes.conf"
GENERATOR = ROOT / "scripts" / "generate-secrets.py"
WAIT = 5.0
WRONG_LOGIN = "not-the-password"
WITNESS_LOGIN = "witness-password"


def metrics(node: str) -> str:
    """The topic a node publishes its readings to."""
    return f"home/load_meter/{node}/metrics"


@dataclass
class Logins:
    """The generated secrets directory and the passwords in it."""

    directory: Path
    passwords: dict[str, str]


class Client:
    """A paho client that records its acknowledgements and messages."""

    def __init__(
        self,
        port: int,
        user: str | None = None,
        password: str | None = None,
        client_id: str = "",
        clean: bool = True,
    ) -> None:
        self.connacks: queue.Queue[mqtt.ReasonCode] = queue.Queue()
        self.subacks: queue.Queue[list[mqtt.ReasonCode]] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean,
            reconnect_on_failure=False,
        )
        if user is not None:
            self.paho.username_pw_set(user, password)
        self.paho.on_connect = lambda _c, _u, _f, code, _p: self.connacks.put(code)
        self.paho.on_subscribe = lambda _c, _u, _m, codes, _p: self.subacks.put(codes)
        self.paho.on_message = lambda _c, _u, message: self.messages.put(message)
        self.paho.connect("127.0.0.1", port, keepalive=30)
        self.paho.loop_start()
        self.connack = self.connacks.get(timeout=WAIT)

    def subscribe(self, topic: str, qos: int = 1) -> mqtt.ReasonCode:
        """Subscribe and return the broker's answer for this topic."""
        self.paho.subscribe(topic, qos)
        return self.subacks.get(timeout=WAIT)[0]

    def publish(self, topic: str, payload: str, qos: int = 0, retain: bool = False):
        """Publish; for QoS 1, wait for the broker's acknowledgement."""
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(WAIT)

    def flush(self) -> None:
        """Wait until everything the broker sent this client so far has arrived.

        The broker answers a SUBSCRIBE after the messages it queued for the
        client earlier, so the answer to a dummy subscription is a fence.
        """
        self.subscribe("flush/fence")

    def received_until(self, fence: str) -> list[tuple[str, str]]:
        """Every (topic, payload) received before the ``fence`` payload."""
        seen = []
        while True:
            message = self.messages.get(timeout=WAIT)
            if message.payload.decode() == fence:
                return seen
            seen.append((message.topic, message.payload.decode()))

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.paho.disconnect()
        self.paho.loop_stop()


def adapted_config(workdir: Path, passwd: Path, acl: Path, conf_d: Path) -> str:
    """mosquitto.conf with the container paths and port swapped for test ones."""
    text = CONF.read_text(encoding="utf-8")
    swaps = {
        "listener 1883\n": "listener {port} 127.0.0.1\n",
        "/run/secrets/mosquitto_passwd": str(passwd),
        "/mosquitto/config/acl": str(acl),
        "/mosquitto/data/": f"{workdir / 'data'}/",
        "/mosquitto/config/conf.d": str(conf_d),
    }
    for old, new in swaps.items():
        assert old in text, f"mosquitto.conf no longer holds {old!r}"
        text = text.replace(old, new)
    # As root, mosquitto would switch to its own user, who cannot read tmp_path.
    return f"user {pwd.getpwuid(os.geteuid()).pw_name}\n{text}"


@pytest.fixture
def logins(tmp_path: Path) -> Logins:
    """Secrets made by the generator, with per-node users and a witness."""
    directory = tmp_path / "secrets"
    subprocess.run(
        [sys.executable, GENERATOR, "--dir", directory, "--node-users", "node_a"],
        check=True,
        capture_output=True,
    )
    passwords = {
        user: (directory / f"mqtt_{user}_password").read_text()
        for user in ("ingester", "nodes", "healthcheck")
    }
    passwords["node_a"] = (directory / "mqtt_node_node_a_password").read_text()
    passwords["witness"] = WITNESS_LOGIN
    entry = f"witness:{load_generator().hash_password(WITNESS_LOGIN)}\n"
    with (directory / "mosquitto_passwd").open("a") as passwd:
        passwd.write(entry)
    return Logins(directory, passwords)


@pytest.fixture
def start_broker(
    tmp_path: Path, logins: Logins
) -> Iterator[Callable[[bool], Mosquitto]]:
    """Start the project's broker, with or without the anonymous opt-in."""
    brokers: list[Mosquitto] = []

    def start(anonymous: bool = False) -> Mosquitto:
        workdir = tmp_path / f"broker{len(brokers)}"
        conf_d = workdir / "conf.d"
        conf_d.mkdir(parents=True)
        (workdir / "data").mkdir()
        if anonymous:
            shutil.copy(ANONYMOUS_SNIPPET, conf_d)
        acl = workdir / "acl"
        acl.write_text(ACL.read_text() + "\nuser witness\ntopic read #\n")
        passwd = logins.directory / "mosquitto_passwd"
        config = adapted_config(workdir, passwd, acl, conf_d)
        broker = Mosquitto(workdir, config=config)
        broker.start()
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        broker.stop()


@pytest.fixture
def connect(
    logins: Logins,
) -> Iterator[Callable[..., Client]]:
    """Open clients by user name (None: anonymous); all closed afterwards."""
    clients: list[Client] = []

    def open_client(
        broker: Mosquitto,
        user: str | None,
        password: str | None = None,
        client_id: str = "",
        clean: bool = True,
    ) -> Client:
        if password is None and user is not None:
            password = logins.passwords[user]
        client = Client(broker.port, user, password, client_id, clean)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


def test_anonymous_clients_are_refused_by_default(start_broker, connect):
    """Without the opt-in, a client without a username gets "not authorized"."""
    broker = start_broker()

    client = connect(broker, None)

    assert client.connack == "Not authorized"


def test_a_wrong_password_is_refused(start_broker, connect):
    """A known user with the wrong password cannot connect."""
    broker = start_broker()

    client = connect(broker, "nodes", password=WRONG_LOGIN)

    assert client.connack.is_failure


def test_the_ingester_reads_every_nodes_readings(start_broker, connect):
    """Readings of the shared and per-node users reach the ingester."""
    broker = start_broker()
    ingester = connect(broker, "ingester", client_id="loadmeter-ingester")
    assert not ingester.subscribe("home/load_meter/+/metrics").is_failure

    connect(broker, "nodes").publish(metrics("node_main"), "shared", retain=True)
    connect(broker, "node_a").publish(metrics("node_a"), "own", retain=True)

    got = {ingester.messages.get(timeout=WAIT).payload for _ in range(2)}
    assert got == {b"shared", b"own"}


def test_node_users_publish_nothing_but_readings(start_broker, connect):
    """Node logins cannot publish outside .../<node>/metrics, even retained."""
    broker = start_broker()
    witness = connect(broker, "witness")
    witness.subscribe("#")
    forbidden = [
        "home/load_meter/node_main/status",
        "home/load_meter/_ingester/loadmeter-ingester/status",
        "healthcheck/mosquitto",
        "elsewhere",
    ]

    for user in ("nodes", "node_a"):
        node = connect(broker, user)
        for topic in forbidden:
            node.publish(topic, f"forged by {user}", qos=1, retain=True)
        node.publish(metrics("node_a"), f"fence {user}")

    assert witness.received_until("fence nodes") == []
    assert witness.received_until("fence node_a") == []


def test_a_node_user_cannot_publish_another_nodes_readings(start_broker, connect):
    """The per-node user node_a cannot publish node_b's readings."""
    broker = start_broker()
    ingester = connect(broker, "ingester")
    ingester.subscribe("home/load_meter/+/metrics")
    node_a = connect(broker, "node_a")

    node_a.publish(metrics("node_b"), "forged", qos=1)
    node_a.publish(metrics("node_a"), "fence")

    assert ingester.received_until("fence") == []


@pytest.mark.parametrize("user", ["nodes", "node_a"])
def test_node_users_cannot_read(start_broker, connect, user):
    """Node logins receive nothing, not even their own or retained readings."""
    # Mosquitto 2.0 grants the subscription and filters each message on delivery.
    broker = start_broker()
    publisher = connect(broker, "nodes")
    publisher.publish(metrics("node_a"), "retained", retain=True)
    node = connect(broker, user)

    for topic in (metrics("node_a"), "#", "healthcheck/#"):
        node.subscribe(topic)
    publisher.publish(metrics("node_a"), "fresh", qos=1)
    node.publish(metrics("node_a"), "own", qos=1)
    node.flush()

    assert node.messages.empty()


def test_the_ingester_publishes_its_status_but_no_readings(start_broker, connect):
    """The ingester may write its status topic and nothing else."""
    broker = start_broker()
    witness = connect(broker, "witness")
    witness.subscribe("#")
    ingester = connect(broker, "ingester")

    ingester.publish(metrics("node_main"), "forged", qos=1)
    ingester.publish("home/load_meter/_ingester/loadmeter-ingester/status", "online")
    ingester.publish("home/load_meter/_ingester/loadmeter-ingester/status", "fence")

    seen = witness.received_until("fence")
    assert seen == [("home/load_meter/_ingester/loadmeter-ingester/status", "online")]


def test_readings_queue_for_the_absent_ingester_and_survive_a_restart(
    start_broker, connect
):
    """QoS 0 readings wait in the ingester's session, across a broker restart."""
    broker = start_broker()
    away = connect(broker, "ingester", client_id="loadmeter-ingester", clean=False)
    away.subscribe("home/load_meter/+/metrics", qos=1)
    away.close()
    node = connect(broker, "nodes")
    for i in range(500):
        node.publish(metrics("node_main"), f"reading {i}")
    node.publish(metrics("node_main"), "fence", qos=1)  # acked: all are in

    broker.stop()
    broker.start()
    back = connect(broker, "ingester", client_id="loadmeter-ingester", clean=False)

    got = [back.messages.get(timeout=WAIT) for _ in range(501)]
    expected = [*(f"reading {i}" for i in range(500)), "fence"]
    assert [message.payload.decode() for message in got] == expected
    assert {message.qos for message in got} == {1}  # upgraded: acked, redelivered


def test_anonymous_opt_in_lets_firmware_publish_readings_only(start_broker, connect):
    """With the opt-in, anonymous clients publish readings but read nothing."""
    broker = start_broker(anonymous=True)
    witness = connect(broker, "witness")
    witness.subscribe("#")
    anonymous = connect(broker, None)

    anonymous.subscribe("home/load_meter/+/metrics")
    anonymous.subscribe("#")
    anonymous.publish("home/load_meter/node_x/status", "forged", qos=1)
    anonymous.publish("healthcheck/mosquitto", "forged", qos=1)
    anonymous.publish(metrics("node_x"), "reading", retain=True)
    anonymous.publish(metrics("node_x"), "fence")

    assert anonymous.connack == "Success"
    assert witness.received_until("fence") == [(metrics("node_x"), "reading")]
    anonymous.flush()
    assert anonymous.messages.empty()


def test_anonymous_opt_in_keeps_checking_passwords(start_broker, connect):
    """With the opt-in, a username with a wrong password is still refused."""
    broker = start_broker(anonymous=True)

    client = connect(broker, "ingester", password=WRONG_LOGIN)

    assert client.connack.is_failure


def compose_healthcheck(service: str) -> str:
    """The shell command of a compose service's health check, as Docker runs it."""
    rendered = subprocess.run(
        [compose_binary(), "--project-directory", ROOT, "config", "--format", "json"],
        check=True,
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
    ).stdout
    test = json.loads(rendered)["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    return test[1].replace("$$", "$")


def run_healthcheck(broker: Mosquitto, secrets: Path) -> int:
    """Run the mosquitto service's compose health check against ``broker``."""
    command = compose_healthcheck("mosquitto")
    assert command.count("-p 1883") == 2
    command = command.replace("-p 1883", f"-p {broker.port}")
    command = command.replace("/run/secrets/", f"{secrets}/")
    result = subprocess.run(
        ["sh", "-c", command], check=False, capture_output=True, timeout=30
    )
    return result.returncode


def test_the_compose_healthcheck_round_trips_through_the_broker(start_broker, logins):
    """The healthcheck user publishes and reads back its topic."""
    broker = start_broker()

    assert run_healthcheck(broker, logins.directory) == 0


def test_the_compose_healthcheck_fails_without_a_valid_login(
    start_broker, logins, tmp_path
):
    """A wrong healthcheck password makes the health check fail."""
    broker = start_broker()
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "mqtt_healthcheck_password").write_text(WRONG_LOGIN)

    assert run_healthcheck(broker, wrong) != 0
