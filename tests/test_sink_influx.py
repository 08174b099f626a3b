"""The influx sink against real VictoriaMetrics, with faults from a proxy."""

from __future__ import annotations

import datetime as dt
import email.utils
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import urllib3
from loadmeter.config import read_settings
from loadmeter.envreader import EnvReader
from loadmeter.errors import PermanentSinkError, TransientSinkError
from loadmeter.model import Reading
from loadmeter.sinks import sink_class
from loadmeter.sinks.influx import InfluxSink, parse_retry_after

from tests.faultproxy import FaultProxy, influx_error_body
from tests.services import VictoriaMetrics, free_port, http_get, wait_for

TOKEN = "test-token-not-secret"  # noqa: S105 - VictoriaMetrics ignores it
CORE = read_settings(EnvReader({}))
T0 = 1_764_777_600_123

MakeSink = Callable[..., InfluxSink]


def reading(node: str, received_ms: int, **fields: float) -> Reading:
    """A reading as the payload parser would hand it over."""
    return Reading(node, received_ms, fields, epoch=received_ms // 1000, t_ms=5000)


def expected_samples(readings: list[Reading]) -> dict[tuple[str, str, int], float]:
    """What VictoriaMetrics should hold for ``readings``, as ``samples()`` reads."""
    stored: dict[tuple[str, str, int], float] = {}
    for r in readings:
        values = dict(r.fields, epoch=r.epoch, t_ms=r.t_ms)
        for name, value in values.items():
            stored[(name, r.node, r.received_ms)] = float(value)
    return stored


def stored(victoria: VictoriaMetrics, count: int) -> dict[tuple[str, str, int], float]:
    """The samples once at least ``count`` are readable.

    VictoriaMetrics makes fresh samples searchable when it flushes its buffers;
    asking it to flush on every poll turns a wait of seconds into milliseconds.
    """

    def flushed_samples() -> dict[tuple[str, str, int], float] | None:
        http_get(f"{victoria.url}/internal/force_flush")
        samples = victoria.samples()
        return samples if len(samples) >= count else None

    result = wait_for(flushed_samples, what=f"{count} samples")
    assert isinstance(result, dict)
    return result


def write_error(sink: InfluxSink) -> BaseException:
    """The error one write of a one-reading batch raises."""
    with pytest.raises((TransientSinkError, PermanentSinkError)) as caught:
        sink.write([reading("node_main", T0, ct1_irms=1.0)])
    return caught.value


@pytest.fixture
def make_sink() -> Iterator[MakeSink]:
    """Build opened influx sinks from a URL and extra variables; close them after."""
    sinks: list[InfluxSink] = []

    def make(url: str, **variables: str) -> InfluxSink:
        env = EnvReader({"INFLUX_URL": url, "INFLUX_TOKEN": TOKEN, **variables})
        sink = InfluxSink.from_env(env, CORE)
        assert env.problems == []
        sink.open()
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close()


@pytest.fixture
def proxy(victoria: VictoriaMetrics) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of VictoriaMetrics."""
    with FaultProxy(victoria.url) as running:
        yield running


def test_influx_is_the_registered_sink_class() -> None:
    """The registry name ``influx`` resolves to this sink."""
    assert sink_class("influx") is InfluxSink


@pytest.mark.parametrize("gzip", ["true", "false"])
def test_batch_reads_back_with_exact_values_node_and_timestamps(
    victoria: VictoriaMetrics, proxy: FaultProxy, make_sink: MakeSink, gzip: str
) -> None:
    """A batch lands in one request, compressed or not, exactly as sent."""
    sink = make_sink(proxy.url, INFLUX_GZIP=gzip)
    batch = [
        reading("node_main", T0, ct1_irms=1.234, ct1_apparpower=283.82, vrms=230.0),
        reading("node_main", T0 + 1000, ct1_irms=1.5, ct1_apparpower=345.0, vrms=229.9),
        reading("garage", T0 + 500, ct1_irms=0.25, ct2_irms=7.125),
    ]

    sink.write(batch)

    assert stored(victoria, 14) == expected_samples(batch)
    assert len(proxy.requests) == 1
    encoding = proxy.requests[0].header("Content-Encoding")
    assert encoding == ("gzip" if gzip == "true" else None)


def test_int_and_float_values_read_back_as_the_same_numbers(
    victoria: VictoriaMetrics, make_sink: MakeSink
) -> None:
    """Whole, negative and fractional readings and 32-bit counters survive as is."""
    sink = make_sink(victoria.url)
    sample = Reading(
        "node_main",
        T0,
        {"ct1_power": 0.0, "ct2_power": -12.5, "ct1_irms": 1.234, "vrms": 230.0},
        epoch=1_764_777_600,
        t_ms=4_294_967_295,
    )

    sink.write([sample])

    assert stored(victoria, 6) == {
        ("ct1_power", "node_main", T0): 0.0,
        ("ct2_power", "node_main", T0): -12.5,
        ("ct1_irms", "node_main", T0): 1.234,
        ("vrms", "node_main", T0): 230.0,
        ("epoch", "node_main", T0): 1_764_777_600.0,
        ("t_ms", "node_main", T0): 4_294_967_295.0,
    }


def test_request_names_org_bucket_precision_and_token(
    proxy: FaultProxy, make_sink: MakeSink
) -> None:
    """The write goes to the v2 API with the org, bucket, ms precision and token."""
    sink = make_sink(proxy.url, INFLUX_ORG="flat", INFLUX_BUCKET="power")

    sink.write([reading("node_main", T0, ct1_irms=1.0)])

    (seen,) = proxy.requests
    assert seen.method == "POST"
    assert seen.path == "/api/v2/write?org=flat&bucket=power&precision=ms"
    assert seen.header("Authorization") == f"Token {TOKEN}"
    assert seen.payload().decode() == (
        f"load_meter,node=node_main ct1_irms=1.0,epoch={T0 // 1000}i,t_ms=5000i {T0}"
    )


def test_empty_batch_makes_no_request(proxy: FaultProxy, make_sink: MakeSink) -> None:
    """Writing nothing does not call the server at all."""
    sink = make_sink(proxy.url)

    sink.write([])

    assert proxy.requests == []


def test_429_with_retry_after_seconds_is_transient(
    proxy: FaultProxy, make_sink: MakeSink
) -> None:
    """A rate-limited write is transient and carries the delay the server asked."""
    sink = make_sink(proxy.url)
    proxy.fail_next(
        status=429,
        headers={"Retry-After": "2"},
        body=influx_error_body("too many requests", "write limit reached"),
    )

    error = write_error(sink)

    assert isinstance(error, TransientSinkError)
    assert error.retry_after == 2.0
    assert "write limit reached" in str(error)
    assert len(proxy.requests) == 1


def test_429_with_retry_after_http_date_is_transient(
    proxy: FaultProxy, make_sink: MakeSink
) -> None:
    """A Retry-After given as an HTTP date becomes the seconds until that date."""
    sink = make_sink(proxy.url)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    retry_at = email.utils.format_datetime(later, usegmt=True)
    proxy.fail_next(status=429, headers={"Retry-After": retry_at})

    error = write_error(sink)

    assert isinstance(error, TransientSinkError)
    assert error.retry_after is not None
    assert 27.0 <= error.retry_after <= 30.0
    assert len(proxy.requests) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_transient(
    proxy: FaultProxy, make_sink: MakeSink, status: int
) -> None:
    """A 5xx answer is transient, quotes InfluxDB's message, and is not retried."""
    sink = make_sink(proxy.url)
    proxy.fail_next(
        status=status, body=influx_error_body("unavailable", "engine is busy")
    )

    error = write_error(sink)

    assert isinstance(error, TransientSinkError)
    assert error.retry_after is None
    assert f"HTTP {status}" in str(error)
    assert "engine is busy" in str(error)
    assert len(proxy.requests) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_client_errors_are_permanent_with_status_and_message(
    proxy: FaultProxy, make_sink: MakeSink, status: int
) -> None:
    """A 4xx answer is permanent, keeps the status and InfluxDB's own message."""
    sink = make_sink(proxy.url)
    message = f"refused for reason {status}"
    proxy.fail_next(status=status, body=influx_error_body("invalid", message))

    error = write_error(sink)

    assert isinstance(error, PermanentSinkError)
    assert error.status == status
    assert message in str(error)
    assert len(proxy.requests) == 1


def test_error_body_that_is_not_json_is_quoted_as_text(
    proxy: FaultProxy, make_sink: MakeSink
) -> None:
    """An HTML answer from a reverse proxy still explains the refusal."""
    sink = make_sink(proxy.url)
    page = b"<html><h1>413 Request Entity Too Large</h1></html>"
    proxy.fail_next(status=413, headers={"Content-Type": "text/html"}, body=page)

    error = write_error(sink)

    assert isinstance(error, PermanentSinkError)
    assert error.status == 413
    assert "Request Entity Too Large" in str(error)
    assert len(proxy.requests) == 1


def test_tls_handshake_failure_is_transient(
    proxy: FaultProxy, make_sink: MakeSink
) -> None:
    """Speaking TLS to a plain HTTP port fails the write as transient, not fatal."""
    sink = make_sink(proxy.url.replace("http://", "https://"))

    error = write_error(sink)

    assert isinstance(error, TransientSinkError)
    assert "influx request failed" in str(error)


def test_connection_refused_is_transient_and_fails_fast(make_sink: MakeSink) -> None:
    """With nothing listening the write fails at once as transient, cause chained."""
    sink = make_sink(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()

    error = write_error(sink)

    assert isinstance(error, TransientSinkError)
    assert isinstance(error.__cause__, urllib3.exceptions.HTTPError)
    assert time.monotonic() - started < 2.0


def test_dropped_connection_is_transient(
    proxy: FaultProxy, make_sink: MakeSink
) -> None:
    """A server that hangs up without answering gives one attempt, transient."""
    sink = make_sink(proxy.url)
    proxy.drop_next()

    error = write_error(sink)

    assert isinstance(error, TransientSinkError)
    assert len(proxy.requests) == 1


def test_upstream_slower_than_timeout_is_transient(
    proxy: FaultProxy, make_sink: MakeSink
) -> None:
    """A write held past INFLUX_TIMEOUT gives up after one attempt, transient."""
    sink = make_sink(proxy.url, INFLUX_TIMEOUT="0.5")
    proxy.delay_next(seconds=10)
    started = time.monotonic()

    error = write_error(sink)

    assert isinstance(error, TransientSinkError)
    assert time.monotonic() - started < 3.0
    assert len(proxy.requests) == 1


def test_sink_writes_again_after_a_failure(
    victoria: VictoriaMetrics, proxy: FaultProxy, make_sink: MakeSink
) -> None:
    """After a refused write the same sink stores the next batch."""
    sink = make_sink(proxy.url)
    proxy.fail_next(status=503)
    batch = [reading("node_main", T0, ct1_irms=2.5)]
    with pytest.raises(TransientSinkError):
        sink.write(batch)

    sink.write(batch)

    assert stored(victoria, 3) == expected_samples(batch)
    assert len(proxy.requests) == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("120", 120.0),
        ("1.5", 1.5),
        ("soon", None),
        ("-3", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_retry_after_forms(value: str | None, expected: float | None) -> None:
    """Retry-After reads as seconds; past dates give 0 and nonsense gives None."""
    assert parse_retry_after(value) == expected


def test_retry_after_date_counts_from_now() -> None:
    """An HTTP-date Retry-After is the distance from the given moment."""
    now = dt.datetime(2025, 12, 3, 12, 0, 0, tzinfo=dt.UTC)

    assert parse_retry_after("Wed, 03 Dec 2025 12:00:45 GMT", now) == 45.0


def test_defaults_apply_when_only_the_token_is_set() -> None:
    """Without INFLUX_* variables the documented defaults are used."""
    env = EnvReader({"INFLUX_TOKEN": TOKEN})

    settings = InfluxSink.from_env(env, CORE).settings

    assert env.problems == []
    assert settings.url == "http://127.0.0.1:8086"
    assert (settings.org, settings.bucket) == ("home", "load_meter")
    assert settings.measurement == "load_meter"
    assert settings.timeout == 10.0
    assert (settings.gzip, settings.verify_ssl, settings.ca_cert) == (True, True, None)


def test_missing_token_is_a_problem_naming_influx_token() -> None:
    """A sink without a token records a problem that names INFLUX_TOKEN."""
    env = EnvReader({})

    InfluxSink.from_env(env, CORE)

    assert len(env.problems) == 1
    assert "INFLUX_TOKEN" in env.problems[0]


def test_token_file_is_read_and_sent(
    tmp_path: Path, proxy: FaultProxy, make_sink: MakeSink
) -> None:
    """INFLUX_TOKEN_FILE supplies the token the write authenticates with."""
    token_file = tmp_path / "influx-token"
    token_file.write_text("from-a-file\n")
    env = EnvReader({"INFLUX_URL": proxy.url, "INFLUX_TOKEN_FILE": str(token_file)})
    sink = InfluxSink.from_env(env, CORE)
    assert env.problems == []
    sink.open()

    try:
        sink.write([reading("node_main", T0, ct1_irms=1.0)])
    finally:
        sink.close()

    assert proxy.requests[0].header("Authorization") == "Token from-a-file"


def test_token_is_kept_out_of_the_settings_repr() -> None:
    """Showing the settings never shows the token."""
    env = EnvReader({"INFLUX_TOKEN": TOKEN})

    settings = InfluxSink.from_env(env, CORE).settings

    assert TOKEN not in repr(settings)


@pytest.mark.parametrize(
    "url",
    [
        "localhost:8086",
        "ftp://influx:8086",
        "http://",
        "http://influx:99999",
        "http://influx:port",
        "http://influx:8086/api",
        "http://user:pw@influx:8086",
    ],
)
def test_bad_url_is_a_problem_naming_influx_url(url: str) -> None:
    """A URL that is not http(s)://host[:port] is named with its value."""
    env = EnvReader({"INFLUX_URL": url, "INFLUX_TOKEN": TOKEN})

    InfluxSink.from_env(env, CORE)

    assert env.problems == [
        f"INFLUX_URL={url!r}: expected http://host[:port] or https://host[:port]"
    ]


@pytest.mark.parametrize(
    "url", ["http://influxdb:8086", "https://influx.example.org/", "http://[::1]:8086"]
)
def test_good_urls_are_accepted(url: str) -> None:
    """Plain, TLS and IPv6 URLs pass; a trailing slash is dropped."""
    env = EnvReader({"INFLUX_URL": url, "INFLUX_TOKEN": TOKEN})

    settings = InfluxSink.from_env(env, CORE).settings

    assert env.problems == []
    assert settings.url == url.rstrip("/")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("INFLUX_TIMEOUT", "0"),
        ("INFLUX_TIMEOUT", "soon"),
        ("INFLUX_GZIP", "maybe"),
        ("INFLUX_VERIFY_SSL", "sometimes"),
        ("INFLUX_CA_CERT", "/nonexistent/ca.pem"),
    ],
)
def test_bad_option_is_a_problem_naming_it(name: str, value: str) -> None:
    """Each malformed INFLUX_* option is reported under its own name."""
    env = EnvReader({"INFLUX_TOKEN": TOKEN, name: value})

    InfluxSink.from_env(env, CORE)

    assert len(env.problems) == 1
    assert env.problems[0].startswith(f"{name}={value!r}")
