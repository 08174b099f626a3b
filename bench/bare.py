"""The baseline: a paho consumer that only counts, run as its own process.

``subscribe`` creates a persistent session (QoS 1) and leaves; ``drain``
resumes it without subscribing again and counts until ``--count`` messages
arrived. paho acknowledges each message as soon as the callback returns.
The result is one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TOPIC = "home/load_meter/+/metrics"
SESSION_EXPIRY_S = 3600


class Counter:
    """Counts messages and remembers when the first and the last arrived."""

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.count = 0
        self.first = self.last = 0.0
        self.done = threading.Event()

    def on_message(self, client: paho.Client, userdata: Any, message: Any) -> None:
        """paho's callback: count, stamp, and signal when all are in."""
        self.last = time.monotonic()
        if not self.count:
            self.first = self.last
        self.count += 1
        if self.count >= self.wanted:
            self.done.set()


def client_for(client_id: str) -> paho.Client:
    """An MQTT 5 client whose session outlives the connection."""
    return paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
    )


def connect(client: paho.Client, port: int, clean: bool) -> None:
    """Connect to the broker on loopback with a session expiry."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = SESSION_EXPIRY_S
    client.connect("127.0.0.1", port, clean_start=clean, properties=props)


def subscribe(client_id: str, port: int, timeout: float) -> dict[str, object]:
    """Create the session with its QoS 1 subscription, then disconnect."""
    client = client_for(client_id)
    granted = threading.Event()
    client.on_subscribe = lambda *args: granted.set()
    connect(client, port, clean=True)
    client.loop_start()
    client.subscribe(TOPIC, qos=1)
    ok = granted.wait(timeout)
    client.disconnect()
    client.loop_stop()
    return {"subscribed": ok}


def drain(client_id: str, port: int, count: int, timeout: float) -> dict[str, object]:
    """Resume the session and count the queued messages."""
    client = client_for(client_id)
    counter = Counter(count)
    client.on_message = counter.on_message
    connected = time.monotonic()
    connect(client, port, clean=False)
    client.loop_start()
    counter.done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    return {
        "received": counter.count,
        "seconds": counter.last - counter.first,
        "first_after_s": counter.first - connected if counter.count else None,
    }


def main() -> int:
    """Parse the command line, run one mode, print its result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("mode", choices=("subscribe", "drain"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    if args.mode == "subscribe":
        result = subscribe(args.client_id, args.port, args.timeout)
    else:
        result = drain(args.client_id, args.port, args.count, args.timeout)
    print(json.dumps(result), file=sys.stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
