"""The dispatcher between the MQTT thread and the spool."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from loadmeter.deadletter import DeadLetter
from loadmeter.dispatcher import Dispatcher
from loadmeter.metrics import Metrics
from loadmeter.mqtt import Message
from loadmeter.payload import Limits
from loadmeter.spool import Spool

from tests.services import wait_for

BASE = "home/load_meter"


def message(index: int) -> Message:
    """A valid reading of node n1 as the MQTT side hands it over."""
    payload = json.dumps({"epoch": 1764777600, "t_ms": index, "ct1_irms": 1.5})
    return Message(f"{BASE}/n1/metrics", payload.encode(), 1000 + index, index, 1)


def test_a_full_inbox_holds_the_sender_back_instead_of_dropping(tmp_path: Path) -> None:
    """With the inbox full the offer waits; once drained, every message is spooled."""
    metrics = Metrics(["influx"])
    spool = Spool(tmp_path / "spool.db", ["influx"], 1 << 24, 3600, lambda n: None)
    dispatcher = Dispatcher(
        spool,
        DeadLetter(tmp_path / "dl", 1 << 20),
        metrics,
        Limits(max_payload_bytes=4096, max_ct=2),
        BASE,
        queue_max=10,
    )
    sender = threading.Thread(
        target=lambda: [dispatcher.offer(message(i)) for i in range(50)]
    )

    sender.start()
    wait_for(dispatcher.inbox.full, what="a full inbox")
    assert sender.is_alive()
    dispatcher.start()
    sender.join(10)
    wait_for(lambda: spool.backlog("influx")[0] == 50, what="all 50 spooled")
    dispatcher.stopping.set()
    dispatcher.join(5)

    stored = spool.pending("influx", 100).readings
    assert [r.t_ms for r in stored] == list(range(50))
    dropped = {"queue": "inbox"}
    assert (
        metrics.registry.get_sample_value("loadmeter_queue_dropped_total", dropped) == 0
    )
    spool.close()
