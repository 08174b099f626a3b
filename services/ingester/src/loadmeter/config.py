"""The ingester's own settings, read once at start from the environment."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

from .envreader import EnvReader

TOPIC_SEGMENT = re.compile(r"^[^#+]+(/[^#+]+)*$")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """How to reach the broker and what to subscribe to."""

    host: str
    port: int
    username: str | None
    password: str | None
    base_topic: str
    keepalive: int
    client_id: str
    qos: int
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    tls_insecure: bool

    @property
    def metrics_topic(self) -> str:
        """The subscription that matches every node's readings."""
        return f"{self.base_topic}/+/metrics"

    @property
    def status_topic(self) -> str:
        """Where the ingester announces ``online`` and its will ``offline``."""
        return f"{self.base_topic}/_ingester/{self.client_id}/status"

    @property
    def tls(self) -> bool:
        """Whether the connection is encrypted."""
        return self.tls_ca is not None or self.tls_cert is not None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the core needs; each sink reads its own section."""

    mqtt: MqttSettings
    metrics_host: str
    metrics_port: int
    log_level: str
    log_format: str
    max_payload_bytes: int
    max_ct: int
    queue_max: int
    batch_max: int
    flush_interval: float
    stop_timeout: float
    state_dir: Path
    deadletter_path: Path
    deadletter_max_bytes: int
    spool_path: Path
    spool_max_bytes: int
    spool_sync: str
    dedup_window: float


def default_client_id() -> str:
    """A client id stable across restarts on one host."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40]
    return f"loadmeter-{host}"


def read_mqtt(env: EnvReader) -> MqttSettings:
    """The ``MQTT_*`` variables."""
    base = (env.str("MQTT_BASE_TOPIC", "home/load_meter") or "").strip("/")
    if not TOPIC_SEGMENT.match(base):
        env.problem("MQTT_BASE_TOPIC", base, "a topic without + or # wildcards")
    tls_cert = env.path("MQTT_TLS_CERT", must_exist=True)
    tls_key = env.path("MQTT_TLS_KEY", must_exist=True)
    if (tls_cert is None) != (tls_key is None):
        env.problems.append("MQTT_TLS_CERT and MQTT_TLS_KEY: expected both or neither")
    return MqttSettings(
        host=env.str("MQTT_HOST", "127.0.0.1") or "127.0.0.1",
        port=env.int("MQTT_PORT", 1883, 1, 65535),
        username=env.str("MQTT_USER"),
        password=env.secret("MQTT_PASS"),
        base_topic=base,
        keepalive=env.int("MQTT_KEEPALIVE", 60, 5, 3600),
        client_id=env.str("MQTT_CLIENT_ID", default_client_id()) or "",
        qos=env.int("MQTT_QOS", 1, 0, 1),
        tls_ca=env.path("MQTT_TLS_CA", must_exist=True),
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_insecure=env.bool("MQTT_TLS_INSECURE", False),
    )


def read_settings(env: EnvReader) -> Settings:
    """The core settings; problems accumulate in ``env``."""
    systemd_dir = Path(env.hint("STATE_DIRECTORY") or "state")
    state_dir = env.path_or("STATE_DIR", systemd_dir)
    return Settings(
        mqtt=read_mqtt(env),
        metrics_host=env.str("METRICS_HOST", "0.0.0.0") or "0.0.0.0",
        metrics_port=env.int("METRICS_PORT", 9108, 0, 65535),
        log_level=env.choice("LOG_LEVEL", "info", LOG_LEVELS),
        log_format=env.choice("LOG_FORMAT", "auto", LOG_FORMATS),
        max_payload_bytes=env.int("MAX_PAYLOAD_BYTES", 4096, 64, 1_048_576),
        max_ct=env.int("MAX_CT", 2, 1, 16),
        queue_max=env.int("QUEUE_MAX", 20_000, 10, 10_000_000),
        batch_max=env.int("BATCH_MAX", 5000, 1, 100_000),
        flush_interval=env.float("FLUSH_INTERVAL", 1.0, 0.05, 60.0),
        stop_timeout=env.float("STOP_TIMEOUT", 8.0, 1.0, 300.0),
        state_dir=state_dir,
        deadletter_path=env.path_or("DEADLETTER_PATH", state_dir / "deadletter"),
        deadletter_max_bytes=env.int("DEADLETTER_MAX_BYTES", 100 * 2**20, 2**16, 2**40),
        spool_path=env.path_or("SPOOL_PATH", state_dir / "spool.db"),
        spool_max_bytes=env.int("SPOOL_MAX_BYTES", 2**30, 2**16, 2**44),
        spool_sync=env.choice("SPOOL_SYNC", "full", ("full", "normal")),
        dedup_window=env.float("DEDUP_WINDOW", 6 * 3600.0, 0.0, 30 * 86400.0),
    )
