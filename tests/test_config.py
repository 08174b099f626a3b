"""Settings read from the environment: defaults, validation, secrets, sinks."""

from __future__ import annotations

from pathlib import Path

import pytest
from loadmeter.cli import configure
from loadmeter.config import read_settings
from loadmeter.envreader import REDACTED, EnvReader
from loadmeter.errors import ConfigError
from loadmeter.sinks.csvfile import CsvSink
from loadmeter.sinks.influx import InfluxSink

SECRET = "s3cr3t-XYZ"  # noqa: S105 - a marker to look for in output


def problems_of(environ: dict[str, str], sinks: tuple[str, ...] = ()) -> list[str]:
    """The problems ``configure`` reports for ``environ``; none is a failure."""
    with pytest.raises(ConfigError) as raised:
        configure(EnvReader(environ), sinks)
    return raised.value.problems


def test_core_defaults_match_the_documentation() -> None:
    """With nothing set, every core setting takes its documented default."""
    env = EnvReader({})

    s = read_settings(env)

    assert env.problems == []
    assert (s.mqtt.host, s.mqtt.port, s.mqtt.keepalive) == ("127.0.0.1", 1883, 60)
    assert s.mqtt.base_topic == "home/load_meter"
    assert s.mqtt.metrics_topic == "home/load_meter/+/metrics"
    assert (s.mqtt.username, s.mqtt.password, s.mqtt.qos) == (None, None, 1)
    assert s.mqtt.client_id.startswith("loadmeter-")
    assert (s.mqtt.tls, s.mqtt.tls_insecure) == (False, False)
    assert (s.metrics_host, s.metrics_port) == ("0.0.0.0", 9108)
    assert (s.log_level, s.log_format) == ("info", "auto")
    assert (s.max_ct, s.max_payload_bytes) == (2, 4096)
    assert (s.queue_max, s.batch_max) == (20_000, 5000)
    assert (s.flush_interval, s.stop_timeout) == (1.0, 8.0)
    assert s.state_dir == Path("state")
    assert s.spool_path == Path("state/spool.db")
    assert s.deadletter_path == Path("state/deadletter")
    assert (s.spool_max_bytes, s.spool_sync) == (2**30, "full")
    assert (s.deadletter_max_bytes, s.dedup_window) == (100 * 2**20, 6 * 3600.0)


def test_sink_defaults_match_the_documentation() -> None:
    """The influx and csv sinks default to a local InfluxDB and ./loadmeter.csv."""
    env = EnvReader({"INFLUX_TOKEN": SECRET})

    _, sinks = configure(env, ["influx", "csv"])

    influx, csv = sinks
    assert isinstance(influx, InfluxSink)
    assert isinstance(csv, CsvSink)
    i = influx.settings
    assert (i.url, i.org, i.bucket) == ("http://127.0.0.1:8086", "home", "load_meter")
    assert (i.measurement, i.timeout, i.gzip) == ("load_meter", 10.0, True)
    assert (i.verify_ssl, i.ca_cert, i.token) == (True, None, SECRET)
    assert (csv.path, csv.per_day) == (Path("loadmeter.csv"), False)


def test_state_paths_follow_state_dir_then_systemd() -> None:
    """STATE_DIR wins over systemd's STATE_DIRECTORY; spool and dead letter follow."""
    from_systemd = read_settings(EnvReader({"STATE_DIRECTORY": "/var/lib/lm"}))
    explicit = read_settings(
        EnvReader({"STATE_DIRECTORY": "/var/lib/lm", "STATE_DIR": "/data"})
    )

    assert from_systemd.spool_path == Path("/var/lib/lm/spool.db")
    assert explicit.spool_path == Path("/data/spool.db")
    assert explicit.deadletter_path == Path("/data/deadletter")


def test_every_bad_value_is_reported_at_once() -> None:
    """Each bad variable yields one problem naming it, its value and the form wanted."""
    environ = {
        "MQTT_PORT": "70000",
        "MQTT_KEEPALIVE": "soon",
        "MQTT_BASE_TOPIC": "home/#",
        "MAX_CT": "0",
        "LOG_LEVEL": "loud",
        "FLUSH_INTERVAL": "nan",
        "MQTT_TLS_INSECURE": "maybe",
        "INFLUX_URL": "ftp://db",
        "INFLUX_TOKEN": SECRET,
    }

    problems = problems_of(environ, ("influx",))

    assert sorted(problems) == sorted(
        [
            "MQTT_PORT='70000': expected a whole number from 1 to 65535",
            "MQTT_KEEPALIVE='soon': expected a whole number from 5 to 3600",
            "MQTT_BASE_TOPIC='home/#': expected a topic without + or # wildcards",
            "MAX_CT='0': expected a whole number from 1 to 16",
            "LOG_LEVEL='loud': expected one of debug, info, warning, error",
            "FLUSH_INTERVAL='nan': expected a number from 0.05 to 60",
            "MQTT_TLS_INSECURE='maybe': expected true or false",
            "INFLUX_URL='ftp://db': expected http://host[:port] or https://host[:port]",
        ]
    )


def test_blank_values_mean_unset() -> None:
    """A variable set to spaces takes its default instead of failing."""
    env = EnvReader({"MQTT_PORT": "  ", "LOG_LEVEL": "", "MQTT_HOST": " broker "})

    s = read_settings(env)

    assert env.problems == []
    assert (s.mqtt.port, s.log_level, s.mqtt.host) == (1883, "info", "broker")


def test_influx_sink_requires_a_token() -> None:
    """Without INFLUX_TOKEN or INFLUX_TOKEN_FILE the influx sink is refused."""
    problems = problems_of({}, ("influx",))

    assert problems == ["INFLUX_TOKEN is not set: expected it, or INFLUX_TOKEN_FILE"]


def test_other_sinks_need_no_token() -> None:
    """The print and csv sinks configure without any InfluxDB secret."""
    env = EnvReader({})

    _, sinks = configure(env, ["print", "csv"])

    assert [sink.name for sink in sinks] == ["print", "csv"]


def test_secrets_are_read_from_their_files(tmp_path: Path) -> None:
    """MQTT_PASS_FILE and INFLUX_TOKEN_FILE supply the secrets, trailing newline cut."""
    (tmp_path / "pass").write_text(SECRET + "-mqtt\n")
    (tmp_path / "token").write_text(SECRET + "-influx\n")
    env = EnvReader(
        {
            "MQTT_PASS_FILE": str(tmp_path / "pass"),
            "INFLUX_TOKEN_FILE": str(tmp_path / "token"),
        }
    )

    settings, [influx] = configure(env, ["influx"])

    assert isinstance(influx, InfluxSink)
    assert settings.mqtt.password == SECRET + "-mqtt"
    assert influx.settings.token == SECRET + "-influx"


def test_secret_file_wins_over_the_variable(tmp_path: Path) -> None:
    """When both MQTT_PASS and MQTT_PASS_FILE are set, the file's content is used."""
    (tmp_path / "pass").write_text(SECRET)
    env = EnvReader({"MQTT_PASS": "stale", "MQTT_PASS_FILE": str(tmp_path / "pass")})

    settings = read_settings(env)

    assert settings.mqtt.password == SECRET


def test_missing_and_empty_secret_files_are_clear_errors(tmp_path: Path) -> None:
    """A secret file that is absent or empty gets one problem saying exactly that."""
    (tmp_path / "empty").write_text("\n")
    environ = {
        "MQTT_PASS_FILE": str(tmp_path / "absent"),
        "INFLUX_TOKEN_FILE": str(tmp_path / "empty"),
    }

    problems = problems_of(environ, ("influx",))

    assert problems == [
        f"MQTT_PASS_FILE='{tmp_path}/absent': expected a readable file"
        " (No such file or directory)",
        f"INFLUX_TOKEN_FILE='{tmp_path}/empty': expected a file holding the"
        " secret, not empty",
    ]


def test_entries_show_secrets_redacted(tmp_path: Path) -> None:
    """The effective configuration marks secrets as set but never holds them."""
    (tmp_path / "token").write_text(SECRET)
    env = EnvReader({"MQTT_PASS": SECRET, "INFLUX_TOKEN_FILE": str(tmp_path / "token")})

    configure(env, ["influx"])

    shown = {entry.name: (entry.shown, entry.source) for entry in env.entries}
    assert shown["MQTT_PASS"] == (REDACTED, "env")
    assert shown["INFLUX_TOKEN"] == (REDACTED, "file")
    assert all(SECRET not in entry.shown for entry in env.entries)


def test_sinks_variable_picks_every_sink_listed() -> None:
    """SINKS=csv,influx builds both sinks, in order, each once."""
    env = EnvReader({"SINKS": " csv, influx,csv ", "INFLUX_TOKEN": SECRET})

    _, sinks = configure(env, [])

    assert [sink.name for sink in sinks] == ["csv", "influx"]


def test_sinks_on_the_command_line_override_the_variable() -> None:
    """Names given to ``run`` replace SINKS entirely and are shown as such."""
    env = EnvReader({"SINKS": "print", "INFLUX_TOKEN": SECRET})

    _, sinks = configure(env, ["csv", "influx"])

    assert [sink.name for sink in sinks] == ["csv", "influx"]
    [entry] = [entry for entry in env.entries if entry.name == "SINKS"]
    assert (entry.shown, entry.source) == ("csv,influx", "command line")


def test_print_is_the_default_sink() -> None:
    """Without SINKS or names on the command line the print sink is used."""
    env = EnvReader({})

    _, sinks = configure(env, [])

    assert [sink.name for sink in sinks] == ["print"]


@pytest.mark.parametrize(
    ("environ", "names", "expected"),
    [
        (
            {"SINKS": "print,foo"},
            (),
            "SINKS='print,foo': expected a comma-separated list of print, csv, influx",
        ),
        (
            {},
            ("foo",),
            "sinks on the command line='foo': expected a comma-separated list of"
            " print, csv, influx",
        ),
        (
            {"SINKS": " , "},
            (),
            "SINKS=',': expected a comma-separated list of print, csv, influx",
        ),
        (
            {"SINKS": "memory"},
            (),
            "SINKS='memory': expected a comma-separated list of print, csv, influx",
        ),
    ],
    ids=["variable", "command-line", "only-commas", "test-only-sink"],
)
def test_unknown_sink_names_are_refused(
    environ: dict[str, str], names: tuple[str, ...], expected: str
) -> None:
    """A sink name outside the registry is a problem naming where it came from."""
    problems = problems_of(environ, names)

    assert problems == [expected]
