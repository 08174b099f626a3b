"""Prometheus metrics, one registry per ingester so tests stay independent."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from . import __version__
from .payload import DROP_REASONS, REJECT_REASONS

MAX_NODE_SERIES = 1000
DEADLETTER_REASONS = (*REJECT_REASONS, "sink_refused")
QUEUES = ("inbox",)  # spool drops have their own counter
WRITE_ERROR_KINDS = ("transient", "permanent")
WRITE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every metric the ingester exports, labels pre-initialised to zero."""

    def __init__(self, sinks: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._define_flow()
        self._define_sinks()
        self._define_state()
        self._init_labels(list(sinks))

    def _define_flow(self) -> None:
        reg = self.registry
        self.messages_received = Counter(
            "loadmeter_messages_received", "MQTT messages received.", registry=reg
        )
        self.readings_accepted = Counter(
            "loadmeter_readings_accepted",
            "Readings that passed validation.",
            registry=reg,
        )
        self.readings_rejected = Counter(
            "loadmeter_readings_rejected",
            "Messages refused as a whole, by reason.",
            ["reason"],
            registry=reg,
        )
        self.fields_dropped = Counter(
            "loadmeter_fields_dropped",
            "Fields dropped from otherwise valid readings, by reason.",
            ["reason"],
            registry=reg,
        )
        self.queue_dropped = Counter(
            "loadmeter_queue_dropped",
            "Readings or messages dropped because a bounded queue was full.",
            ["queue"],
            registry=reg,
        )
        self.duplicates_dropped = Counter(
            "loadmeter_duplicates_dropped",
            "Readings not stored again because an identical one was stored.",
            registry=reg,
        )
        self.deadletter_records = Counter(
            "loadmeter_deadletter_records",
            "Records written to the dead letter, by reason.",
            ["reason"],
            registry=reg,
        )

    def _define_sinks(self) -> None:
        reg = self.registry
        self.points_written = Counter(
            "loadmeter_sink_points_written",
            "Readings a sink stored.",
            ["sink"],
            registry=reg,
        )
        self.write_errors = Counter(
            "loadmeter_sink_write_errors",
            "Failed sink writes, by kind (transient or permanent).",
            ["sink", "kind"],
            registry=reg,
        )
        self.write_duration = Histogram(
            "loadmeter_sink_write_duration_seconds",
            "Time one sink write took, failed ones included.",
            ["sink"],
            buckets=WRITE_BUCKETS,
            registry=reg,
        )
        self.spool_readings = Gauge(
            "loadmeter_spool_readings",
            "Readings waiting in the spool for a sink.",
            ["sink"],
            registry=reg,
        )
        self.spool_oldest_age = Gauge(
            "loadmeter_spool_oldest_age_seconds",
            "Age of the oldest reading waiting for a sink, 0 when none waits.",
            ["sink"],
            registry=reg,
        )
        self.spool_dropped = Counter(
            "loadmeter_spool_dropped",
            "Readings dropped, oldest first, because the spool was full.",
            registry=reg,
        )
        self.sink_ready = Gauge(
            "loadmeter_sink_ready",
            "1 when the sink's last write succeeded or it has nothing to write.",
            ["sink"],
            registry=reg,
        )

    def _define_state(self) -> None:
        reg = self.registry
        self.mqtt_connected = Gauge(
            "loadmeter_mqtt_connected", "1 while connected to the broker.", registry=reg
        )
        self.node_last_seen = Gauge(
            "loadmeter_node_last_seen_timestamp_seconds",
            "Receive time of the node's last accepted reading.",
            ["node"],
            registry=reg,
        )
        self.build_info = Info(
            "loadmeter_build", "The running ingester's version.", registry=reg
        )
        self.build_info.info({"version": __version__})
        self._nodes: set[str] = set()

    def _init_labels(self, sinks: list[str]) -> None:
        for reason in REJECT_REASONS:
            self.readings_rejected.labels(reason)
        for reason in DROP_REASONS:
            self.fields_dropped.labels(reason)
        for reason in DEADLETTER_REASONS:
            self.deadletter_records.labels(reason)
        for queue in QUEUES:
            self.queue_dropped.labels(queue)
        for sink in sinks:
            self.points_written.labels(sink)
            self.write_duration.labels(sink)
            self.spool_readings.labels(sink)
            self.spool_oldest_age.labels(sink)
            self.sink_ready.labels(sink).set(1)
            for kind in WRITE_ERROR_KINDS:
                self.write_errors.labels(sink, kind)

    def node_seen(self, node: str, received_seconds: float) -> bool:
        """Record a node's reading; False once ``MAX_NODE_SERIES`` is reached."""
        if node not in self._nodes:
            if len(self._nodes) >= MAX_NODE_SERIES:
                return False
            self._nodes.add(node)
        self.node_last_seen.labels(node).set(received_seconds)
        return True
