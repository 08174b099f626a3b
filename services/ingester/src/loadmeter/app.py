"""The ingester assembled: MQTT source, dispatcher, spool, sink workers, HTTP.

Shutdown order keeps every accepted reading: stop taking messages, drain
the inbox into the spool and acknowledge it, leave the broker, give each
sink a last chance to flush, then close the spool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from . import __version__
from .config import Settings
from .deadletter import DeadLetter
from .dispatcher import Dispatcher
from .httpapi import StatusServer
from .metrics import Metrics
from .mqtt import MqttSource
from .payload import Limits
from .sinks import Sink
from .spool import Spool
from .worker import SinkWorker

log = structlog.get_logger(__name__)

STALE_AFTER = 60.0
CLOSE_RESERVE = 1.0  # seconds of the stop timeout kept for closing up


@dataclass(frozen=True, slots=True)
class Parts:
    """What the ingester is built from, so tests can swap any part."""

    settings: Settings
    sinks: Sequence[Sink]
    spool: Spool
    deadletter: DeadLetter
    metrics: Metrics


class Ingester:
    """Runs the parts together; ``start`` then ``stop`` (or ``run_until``)."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        s = parts.settings
        limits = Limits(max_payload_bytes=s.max_payload_bytes, max_ct=s.max_ct)
        self.dispatcher = Dispatcher(
            parts.spool,
            parts.deadletter,
            parts.metrics,
            limits,
            s.mqtt.base_topic,
            s.queue_max,
        )
        self.mqtt = MqttSource(s.mqtt, self.dispatcher.offer, parts.metrics)
        self.dispatcher.set_acknowledger(self.mqtt.ack)
        self.workers = [
            SinkWorker(
                sink,
                parts.spool,
                parts.metrics,
                parts.deadletter,
                s.batch_max,
                s.flush_interval,
            )
            for sink in parts.sinks
        ]
        self.http = StatusServer(
            s.metrics_host,
            s.metrics_port,
            parts.metrics.registry,
            self.healthz,
            self.readyz,
        )

    def start(self) -> None:
        """Start every thread; the broker connection follows in the background."""
        self.http.start()
        for worker in self.workers:
            worker.start()
        self.dispatcher.start()
        self.mqtt.start()
        log.info(
            "ingester_started",
            version=__version__,
            sinks=[sink.name for sink in self.parts.sinks],
            metrics_port=self.http.port,
            spooled_from_before=self.parts.spool.recovered,
        )

    def run_until(self, stop: threading.Event) -> None:
        """Start, wait for ``stop``, then shut down cleanly."""
        self.start()
        stop.wait()
        self.stop()

    def stop(self) -> None:
        """Stop within the configured timeout, flushing what can be flushed.

        A sink still busy at the deadline (a write hanging on its timeout) is
        left behind: its readings stay in the spool, which is then left open
        for it rather than closed under it; every commit is already durable.
        """
        deadline = time.monotonic() + self.parts.settings.stop_timeout - CLOSE_RESERVE
        log.info("ingester_stopping")
        self.mqtt.stop_accepting()
        self.dispatcher.stopping.set()
        self.dispatcher.join(max(0.1, deadline - time.monotonic()))
        self.mqtt.stop()
        for worker in self.workers:
            worker.stopping.set()
        for worker in self.workers:
            worker.join(max(0.1, deadline - time.monotonic()))
        busy = [w.sink.name for w in self.workers if w.is_alive()]
        if busy:
            log.warning("sinks_still_writing_at_stop", sinks=busy)
        else:
            self.parts.spool.close()
        self.parts.deadletter.close()
        self.http.stop()
        log.info("ingester_stopped")

    def healthz(self) -> list[str]:
        """Problems with the process itself: a dead or stuck thread."""
        now = time.monotonic()
        problems = []
        threads: list[Dispatcher | SinkWorker] = [self.dispatcher, *self.workers]
        for thread in threads:
            if not thread.is_alive():
                problems.append(f"{thread.name}: not running")
            elif now - thread.heartbeat > STALE_AFTER:
                problems.append(
                    f"{thread.name}: no progress for {now - thread.heartbeat:.0f}s"
                )
        return problems

    def readyz(self) -> list[str]:
        """Problems with doing the job: broker not connected, a sink failing."""
        problems = self.healthz()
        if not self.mqtt.connected:
            problems.append("mqtt: not connected")
        problems.extend(
            f"sink {w.sink.name}: cannot write" for w in self.workers if not w.ready
        )
        return problems
