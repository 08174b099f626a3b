"""Validates received messages, spools accepted readings, records refusals.

Runs on its own thread, taking messages from the bounded inbox that the MQTT
callback fills. Messages are handled in groups: one spool append and one
dead-letter sync per group, then the group is acknowledged to the broker.

A stored point is identified by its node and its receive time in
milliseconds, so each node's readings get strictly increasing receive
times: a backlog the broker delivers in a burst would otherwise put several
readings of one node in the same millisecond, and each would overwrite the
one before it in InfluxDB.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable

import structlog

from .deadletter import DeadLetter, payload_fields
from .logs import RateLimiter
from .metrics import Metrics
from .model import Reading
from .mqtt import Message
from .payload import Accepted, Limits, Rejected, node_from_topic, parse
from .spool import Arrival, Spool

log = structlog.get_logger(__name__)

AckFunction = Callable[[list[Message]], None]
MAX_CLOCK_NODES = 10_000
INBOX_WAIT = 0.5


class NodeClock:
    """Strictly increasing receive times per node.

    A reading received in the same millisecond as (or before) the node's last
    one takes the next free millisecond. It starts from the spool's record of
    each node's last stored receive time, so a restart right after a burst
    cannot reuse a timestamp. Past ``max_nodes`` nodes the table starts
    afresh rather than growing.
    """

    def __init__(
        self, last: dict[str, int] | None = None, max_nodes: int = MAX_CLOCK_NODES
    ) -> None:
        self.max_nodes = max_nodes
        self._last: dict[str, int] = dict(list((last or {}).items())[:max_nodes])

    def stamp(self, node: str, received_ms: int) -> int:
        """The receive time to store for ``node``'s reading."""
        last = self._last.get(node)
        if last is None and len(self._last) >= self.max_nodes:
            self._last.clear()
        stamp = received_ms if last is None or received_ms > last else last + 1
        self._last[node] = stamp
        return stamp


class Dispatcher(threading.Thread):
    """From inbox to spool, dead letter and metrics."""

    def __init__(
        self,
        spool: Spool,
        deadletter: DeadLetter,
        metrics: Metrics,
        limits: Limits,
        base_topic: str,
        queue_max: int,
        group_max: int = 1000,
    ) -> None:
        super().__init__(name="dispatcher", daemon=True)
        self.inbox: queue.Queue[Message] = queue.Queue(maxsize=queue_max)
        self.spool = spool
        self.deadletter = deadletter
        self.metrics = metrics
        self.limits = limits
        self.base_topic = base_topic
        self.group_max = group_max
        self.stopping = threading.Event()
        self.heartbeat = time.monotonic()
        self._limiter = RateLimiter(period=60.0)
        self._clock = NodeClock(spool.last_received())
        self._ack: AckFunction = _no_ack

    def set_acknowledger(self, ack: AckFunction) -> None:
        """Who to tell once a group of messages is safely recorded."""
        self._ack = ack

    def offer(self, message: Message) -> None:
        """Queue a message; while the inbox is full, wait for room.

        Waiting here holds up paho's network thread, which stops reading the
        socket, so TCP flow control makes the broker hold back: a backlog
        drains at the speed of the spool instead of overflowing. Only a stop
        that comes while waiting drops the message (counted); unacknowledged,
        the broker delivers it again to the next session.
        """
        self.metrics.messages_received.inc()
        while True:
            try:
                self.inbox.put(message, timeout=INBOX_WAIT)
            except queue.Full:
                if self.stopping.is_set():
                    self.metrics.queue_dropped.labels("inbox").inc()
                    return
                held = self._limiter.allow("inbox_full")
                if held is not None:
                    log.warning("inbox_full_waiting", capacity=self.inbox.maxsize)
            else:
                return

    def run(self) -> None:
        """Handle groups until stopped and the inbox is empty."""
        while True:
            group = self._take_group()
            self.heartbeat = time.monotonic()
            if group:
                self.handle(group)
            elif self.stopping.is_set():
                return

    def _take_group(self) -> list[Message]:
        try:
            group = [self.inbox.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(group) < self.group_max:
            try:
                group.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        return group

    def handle(self, group: list[Message]) -> None:
        """Validate a group, store what is valid, record what is not, ack all."""
        accepted: list[Arrival] = []
        refused = False
        for message in group:
            reading = self._validate(message)
            if reading is None:
                refused = True
            else:
                accepted.append(Arrival(reading, message.retained))
        if accepted:
            duplicates = self.spool.append(accepted)
            self.metrics.duplicates_dropped.inc(duplicates)
            if duplicates:
                log.debug("duplicates_dropped", count=duplicates)
        if refused:
            self.deadletter.sync()
        self._ack(group)

    def _validate(self, message: Message) -> Reading | None:
        topic_node = node_from_topic(message.topic, self.base_topic)
        result = parse(message.payload, topic_node, message.received_ms, self.limits)
        if isinstance(result, Rejected):
            self._reject(message, topic_node, result)
            return None
        self._count_accepted(result, message.topic)
        reading = result.reading
        stamp = self._clock.stamp(reading.node, reading.received_ms)
        return dataclasses.replace(reading, received_ms=stamp)

    def _count_accepted(self, result: Accepted, topic: str) -> None:
        reading = result.reading
        self.metrics.readings_accepted.inc()
        self.metrics.node_seen(reading.node, reading.received_ms / 1000)
        for field, reason in result.dropped:
            self.metrics.fields_dropped.labels(reason).inc()
            held = self._limiter.allow(reading.node, "field", reason)
            if held is not None:
                log.warning(
                    "field_dropped",
                    node=reading.node,
                    topic=topic,
                    field=field,
                    reason=reason,
                    suppressed=held,
                )

    def _reject(
        self, message: Message, topic_node: str | None, result: Rejected
    ) -> None:
        self.metrics.readings_rejected.labels(result.reason).inc()
        self.metrics.deadletter_records.labels(result.reason).inc()
        self.deadletter.record(
            result.reason,
            topic=message.topic,
            detail=result.detail,
            received_ms=message.received_ms,
            **payload_fields(message.payload),
        )
        node = topic_node or "?"
        held = self._limiter.allow(node, "reject", result.reason)
        if held is not None:
            log.warning(
                "reading_rejected",
                node=node,
                topic=message.topic,
                reason=result.reason,
                detail=result.detail,
                suppressed=held,
            )


def _no_ack(messages: list[Message]) -> None:
    """Used until an acknowledger is set: nothing to acknowledge."""
