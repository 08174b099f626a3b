"""The InfluxDB sink: one synchronous write per batch, outcomes classified.

influxdb-client stays inside this module. Retrying is the sink worker's job,
so the client's own retries are off and one ``write`` is one HTTP request;
every failure leaves as a ``TransientSinkError`` or a ``PermanentSinkError``,
translated in ``translate_error``.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
import math
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import structlog
import urllib3
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS, WriteApi
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException

from ..config import Settings
from ..envreader import EnvReader
from ..errors import PermanentSinkError, SinkError, TransientSinkError
from ..lineproto import encode
from ..model import Reading
from . import Sink

log = structlog.get_logger(__name__)

# Besides every 5xx: 408 (the server tired of waiting for our request) and
# 429 (rate limited) may pass when the same batch is sent again.
TRANSIENT_4XX = frozenset({408, 429})
DELAY_SECONDS = re.compile(r"^\d+(\.\d+)?$")
MESSAGE_LIMIT = 300
URL_FORM = "http://host[:port] or https://host[:port]"
# The library annotates the precision as its class, whose members are strings.
PRECISION_MS = cast(WritePrecision, WritePrecision.MS)


@dataclass(frozen=True, slots=True)
class InfluxSettings:
    """Where and how to write; ``timeout`` is in seconds."""

    url: str
    token: str = field(repr=False)
    org: str
    bucket: str
    measurement: str
    timeout: float
    gzip: bool
    verify_ssl: bool
    ca_cert: Path | None


def valid_url(url: str) -> bool:
    """Whether ``url`` is ``http(s)://host[:port]``, a trailing slash allowed."""
    parts = urllib.parse.urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and port_ok
        and "@" not in parts.netloc
        and parts.path in ("", "/")
        and not parts.query
        and not parts.fragment
    )


def read_influx(env: EnvReader) -> InfluxSettings:
    """The ``INFLUX_*`` variables; problems accumulate in ``env``."""
    url = env.str("INFLUX_URL", "http://127.0.0.1:8086") or ""
    if not valid_url(url):
        env.problem("INFLUX_URL", url, URL_FORM)

    return InfluxSettings(
        url=url.rstrip("/"),
        token=env.secret("INFLUX_TOKEN", required=True) or "",
        org=env.str("INFLUX_ORG", "home") or "",
        bucket=env.str("INFLUX_BUCKET", "load_meter") or "",
        measurement=env.str("INFLUX_MEASUREMENT", "load_meter") or "",
        timeout=env.float("INFLUX_TIMEOUT", 10.0, 0.1, 600.0),
        gzip=env.bool("INFLUX_GZIP", True),
        verify_ssl=env.bool("INFLUX_VERIFY_SSL", True),
        ca_cert=env.path("INFLUX_CA_CERT", must_exist=True),
    )


def parse_retry_after(
    value: str | None, now: dt.datetime | None = None
) -> float | None:
    """Seconds to wait from a Retry-After value: delay-seconds or an HTTP-date.

    A date in the past gives 0; a missing or unreadable value gives ``None``.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()

    if DELAY_SECONDS.match(text):
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None

    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - now).total_seconds())


def server_message(body: object, fallback: str) -> str:
    """InfluxDB's own ``message`` from an error body, else the body as text."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    if not isinstance(text, str) or not text.strip():
        return fallback
    try:
        decoded = json.loads(text)
    except ValueError:
        # Proxies and load balancers in front of InfluxDB answer in HTML or text.
        decoded = None
    message = decoded.get("message") if isinstance(decoded, dict) else None
    return str(message or text.strip())[:MESSAGE_LIMIT]


def _header(headers: object, name: str) -> str | None:
    if not isinstance(headers, Mapping):
        return None
    value = headers.get(name)
    return None if value is None else str(value)


def translate_api_error(exc: ApiException) -> SinkError:
    """A SinkError for an HTTP answer outside 2xx (status 0: no answer)."""
    status = int(exc.status or 0)
    message = " ".join(server_message(exc.body, str(exc.reason or "")).split())

    if status == 0:
        return TransientSinkError(f"influx request failed: {message}")
    if status in TRANSIENT_4XX or 500 <= status <= 599:
        retry_after = parse_retry_after(_header(exc.headers, "Retry-After"))
        return TransientSinkError(
            f"influx answered HTTP {status}: {message}", retry_after=retry_after
        )
    return PermanentSinkError(
        f"influx refused the batch, HTTP {status}: {message}", status
    )


ClientFailure = ApiException | urllib3.exceptions.HTTPError | OSError


def translate_error(exc: ClientFailure) -> SinkError:
    """The one place influxdb-client and urllib3 failures become SinkErrors.

    An HTTP answer is classified by its status; no answer at all (refused,
    reset, timed out, TLS failure) is transient.
    """
    if isinstance(exc, ApiException):
        return translate_api_error(exc)
    return TransientSinkError(f"influx unreachable: {type(exc).__name__}: {exc}")


class InfluxSink(Sink):
    """Writes each batch to the InfluxDB v2 write API in one request."""

    name = "influx"

    def __init__(self, settings: InfluxSettings) -> None:
        self.settings = settings
        self._client: InfluxDBClient | None = None
        self._write_api: WriteApi | None = None

    @classmethod
    def from_env(cls, env: EnvReader, settings: Settings) -> InfluxSink:
        """Build the sink from the ``INFLUX_*`` variables."""
        return cls(read_influx(env))

    def open(self) -> None:
        """Create the HTTP client; no request is made until the first write."""
        if self._client is not None:
            return
        logging.getLogger("influxdb_client").setLevel(logging.WARNING)

        s = self.settings
        self._client = InfluxDBClient(
            url=s.url,
            token=s.token,
            org=s.org,
            timeout=math.ceil(s.timeout * 1000),
            enable_gzip=s.gzip,
            verify_ssl=s.verify_ssl,
            ssl_ca_cert=str(s.ca_cert) if s.ca_cert else None,
            retries=False,
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)
        log.info("sink_opened", sink=self.name, url=s.url, bucket=s.bucket, org=s.org)

    def write(self, readings: Sequence[Reading]) -> None:
        """Send the batch in one request, or raise a classified ``SinkError``."""
        if not readings:
            return
        write_api = self._opened()
        body = "\n".join(encode(r, self.settings.measurement) for r in readings)

        try:
            write_api.write(
                bucket=self.settings.bucket,
                record=body,
                write_precision=PRECISION_MS,
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise translate_error(exc) from exc

    def _opened(self) -> WriteApi:
        if self._write_api is None:
            self.open()
        if self._write_api is None:
            raise RuntimeError("InfluxSink.open did not create a write API")
        return self._write_api

    def close(self) -> None:
        """Release the client's connection pool."""
        # Both close methods lack annotations in influxdb-client.
        if self._write_api is not None:
            self._write_api.close()  # type: ignore[no-untyped-call]
        if self._client is not None:
            self._client.close()  # type: ignore[no-untyped-call]
        self._client = None
        self._write_api = None
