"""The ``loadmeter`` command as a process: exit codes, messages, effective config."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from loadmeter import __version__

from tests.process import IngesterProcess, bare_env, clean_env, loadmeter
from tests.services import free_port, wait_for

SECRET = "s3cr3t-XYZ"  # noqa: S105 - a marker to look for in output
ROW = re.compile(r"^(\S+) +(.*?) *\(([a-z ]+)\)$")
DOCUMENTED_DEFAULTS = {
    "MQTT_HOST": "127.0.0.1",
    "MQTT_PORT": "1883",
    "MQTT_BASE_TOPIC": "home/load_meter",
    "MQTT_KEEPALIVE": "60",
    "MQTT_QOS": "1",
    "MQTT_USER": "",
    "MQTT_PASS": "",
    "MQTT_TLS_INSECURE": "False",
    "INFLUX_URL": "http://127.0.0.1:8086",
    "INFLUX_ORG": "home",
    "INFLUX_BUCKET": "load_meter",
    "INFLUX_MEASUREMENT": "load_meter",
    "INFLUX_TIMEOUT": "10.0",
    "INFLUX_GZIP": "True",
    "INFLUX_VERIFY_SSL": "True",
    "CSV_PATH": "loadmeter.csv",
    "MAX_CT": "2",
    "MAX_PAYLOAD_BYTES": "4096",
    "METRICS_HOST": "0.0.0.0",
    "METRICS_PORT": "9108",
    "LOG_LEVEL": "info",
    "LOG_FORMAT": "auto",
    "QUEUE_MAX": "20000",
    "BATCH_MAX": "5000",
    "FLUSH_INTERVAL": "1.0",
    "STOP_TIMEOUT": "8.0",
    "STATE_DIR": "state",
    "SPOOL_PATH": "state/spool.db",
    "SPOOL_SYNC": "full",
    "DEADLETTER_PATH": "state/deadletter",
}


def table(stdout: str) -> dict[str, tuple[str, str]]:
    """check-config's rows as {variable: (shown value, source)}."""
    rows = {}
    for line in stdout.splitlines():
        match = ROW.match(line)
        assert match, f"not a configuration row: {line!r}"
        rows[match[1]] = (match[2], match[3])
    return rows


def config_errors(stderr: str) -> list[str]:
    """The problems of a refused start, each line checked for its prefix."""
    lines = stderr.splitlines()
    assert all(line.startswith("config error: ") for line in lines), stderr
    return [line.removeprefix("config error: ") for line in lines]


def test_check_config_shows_every_documented_default() -> None:
    """With nothing set, check-config lists each variable at its default and exits 0."""
    env = bare_env(INFLUX_TOKEN=SECRET)

    done = loadmeter("check-config", "print", "csv", "influx", env=env)

    assert done.returncode == 0, done.stderr
    assert done.stderr == "configuration ok\n"
    rows = table(done.stdout)
    shown = {name: rows[name] for name in DOCUMENTED_DEFAULTS}
    assert shown == {name: (v, "default") for name, v in DOCUMENTED_DEFAULTS.items()}
    assert rows["MQTT_CLIENT_ID"][0].startswith("loadmeter-")
    assert rows["SINKS"] == ("print,csv,influx", "command line")


def test_check_config_shows_what_the_environment_set() -> None:
    """Variables that are set appear with their value and the source ``env``."""
    env = bare_env(
        MQTT_HOST="broker.lan",
        MAX_CT="4",
        SINKS="csv,influx",
        INFLUX_TOKEN=SECRET,
        INFLUX_BUCKET="power",
    )

    done = loadmeter("check-config", env=env)

    assert done.returncode == 0, done.stderr
    rows = table(done.stdout)
    assert rows["MQTT_HOST"] == ("broker.lan", "env")
    assert rows["MAX_CT"] == ("4", "env")
    assert rows["SINKS"] == ("csv,influx", "env")
    assert rows["INFLUX_BUCKET"] == ("power", "env")
    assert rows["INFLUX_TOKEN"] == ("<redacted>", "env")


def test_check_config_lists_only_the_chosen_sinks_settings() -> None:
    """Sinks named on the command line override SINKS, and only theirs are read."""
    env = bare_env(SINKS="influx")

    done = loadmeter("check-config", "csv", env=env)

    assert done.returncode == 0, done.stderr
    rows = table(done.stdout)
    assert rows["SINKS"] == ("csv", "command line")
    assert "CSV_PATH" in rows
    assert not [name for name in rows if name.startswith("INFLUX_")]


def test_secrets_never_appear_in_check_config_output(tmp_path: Path) -> None:
    """Passwords and tokens, from variables or files, are shown only as redacted."""
    (tmp_path / "token").write_text(SECRET + "-file\n")
    from_variables = bare_env(MQTT_USER="meter", MQTT_PASS=SECRET, INFLUX_TOKEN=SECRET)
    from_files = bare_env(
        MQTT_USER="meter",
        MQTT_PASS_FILE=str(tmp_path / "token"),
        INFLUX_TOKEN_FILE=str(tmp_path / "token"),
    )

    runs = [
        loadmeter("check-config", "print", "csv", "influx", env=env)
        for env in (from_variables, from_files)
    ]

    for done in runs:
        assert done.returncode == 0, done.stderr
        assert SECRET not in done.stdout + done.stderr
        rows = table(done.stdout)
        assert rows["MQTT_PASS"][0] == rows["INFLUX_TOKEN"][0] == "<redacted>"
        assert rows["MQTT_USER"] == ("meter", "env")


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_bad_values_are_all_reported_with_exit_2_and_no_traceback(
    command: str,
) -> None:
    """Every bad variable gets its own line naming it, its value and the form wanted."""
    env = bare_env(
        MQTT_PORT="70000",
        MQTT_KEEPALIVE="soon",
        MAX_CT="17",
        LOG_LEVEL="loud",
        METRICS_PORT="-1",
        STOP_TIMEOUT="forever",
        INFLUX_URL="127.0.0.1:8086",
        INFLUX_GZIP="sometimes",
    )

    done = loadmeter(command, "influx", env=env)

    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert sorted(config_errors(done.stderr)) == sorted(
        [
            "MQTT_PORT='70000': expected a whole number from 1 to 65535",
            "MQTT_KEEPALIVE='soon': expected a whole number from 5 to 3600",
            "MAX_CT='17': expected a whole number from 1 to 16",
            "LOG_LEVEL='loud': expected one of debug, info, warning, error",
            "METRICS_PORT='-1': expected a whole number from 0 to 65535",
            "STOP_TIMEOUT='forever': expected a number from 1 to 300",
            "INFLUX_URL='127.0.0.1:8086': expected http://host[:port] or"
            " https://host[:port]",
            "INFLUX_GZIP='sometimes': expected true or false",
            "INFLUX_TOKEN is not set: expected it, or INFLUX_TOKEN_FILE",
        ]
    )


@pytest.mark.parametrize(
    ("args", "variables", "expected"),
    [
        (
            ("run", "foo"),
            {},
            "sinks on the command line='foo': expected a comma-separated list of"
            " print, csv, influx",
        ),
        (
            ("run",),
            {"SINKS": "print,foo"},
            "SINKS='print,foo': expected a comma-separated list of print, csv, influx",
        ),
    ],
    ids=["command-line", "variable"],
)
def test_unknown_sink_names_exit_2(
    args: tuple[str, ...], variables: dict[str, str], expected: str
) -> None:
    """An unknown sink name refuses to start with a message listing the known ones."""
    done = loadmeter(*args, env=bare_env(**variables))

    assert done.returncode == 2
    assert config_errors(done.stderr) == [expected]


def test_missing_or_empty_secret_files_refuse_to_start(tmp_path: Path) -> None:
    """A *_FILE naming no file, or an empty one, is a one-line error per variable."""
    (tmp_path / "empty").write_text("")
    env = bare_env(
        MQTT_PASS_FILE=str(tmp_path / "absent"),
        INFLUX_TOKEN_FILE=str(tmp_path / "empty"),
    )

    done = loadmeter("run", "influx", env=env)

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert config_errors(done.stderr) == [
        f"MQTT_PASS_FILE='{tmp_path}/absent': expected a readable file"
        " (No such file or directory)",
        f"INFLUX_TOKEN_FILE='{tmp_path}/empty': expected a file holding the"
        " secret, not empty",
    ]


def test_unusable_state_dir_refuses_to_start(tmp_path: Path) -> None:
    """A STATE_DIR that cannot hold the spool is a config error, not a traceback."""
    (tmp_path / "file").write_text("")
    env = clean_env(tmp_path, STATE_DIR=str(tmp_path / "file"))

    done = loadmeter("run", "print", env=env)

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    [problem] = config_errors(done.stderr)
    assert problem.startswith(f"SPOOL_PATH='{tmp_path}/file/spool.db': expected")


def test_metrics_port_in_use_refuses_to_start(tmp_path: Path) -> None:
    """A metrics port another program holds is a config error naming the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(tmp_path, METRICS_PORT=str(port))

        done = loadmeter("run", "print", env=env)

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert config_errors(done.stderr) == [
        f"METRICS_HOST:METRICS_PORT='127.0.0.1:{port}': expected an address this"
        " host can listen on (Address already in use)"
    ]


@pytest.mark.parametrize(
    ("args", "variables"),
    [(("csv", "influx"), {"SINKS": "print"}), ((), {"SINKS": "csv,influx"})],
    ids=["command-line-overrides-variable", "variable"],
)
def test_run_starts_the_sinks_asked_for(
    tmp_path: Path, args: tuple[str, ...], variables: dict[str, str]
) -> None:
    """``run csv influx`` and ``SINKS=csv,influx`` both start exactly those sinks."""
    env = clean_env(
        tmp_path, MQTT_PORT=str(free_port()), INFLUX_TOKEN=SECRET, **variables
    )

    with IngesterProcess(tmp_path, env, args).start() as process:
        wait_for(lambda: "ingester_started" in process.event_names())
        code = process.stop().code

    [started] = process.events("ingester_started")
    assert started["sinks"] == ["csv", "influx"]
    assert code == 0


def test_version_is_printed() -> None:
    """``--version`` prints the package version and exits 0."""
    done = loadmeter("--version", env=bare_env())

    assert (done.returncode, done.stdout) == (0, f"{__version__}\n")
