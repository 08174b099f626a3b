"""The ``loadmeter`` command: run, check-config, simulate, deadletter."""

from __future__ import annotations

import argparse
import signal
import sqlite3
import ssl
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

import structlog

from . import __version__, logs, redrive, simulate
from .app import Ingester, Parts
from .config import Settings, read_settings
from .deadletter import DeadLetter
from .envreader import Entry, EnvReader
from .errors import ConfigError
from .metrics import Metrics
from .sinks import REGISTRY, Sink, sink_class
from .spool import Spool

EXIT_CONFIG = 2
log = structlog.get_logger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m loadmeter``."""
    args = _parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loadmeter", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    sink_help = f"sinks to write to ({', '.join(REGISTRY)}); default: $SINKS or print"
    run = commands.add_parser("run", help="ingest readings into the sinks")
    run.add_argument("sinks", nargs="*", metavar="SINK", help=sink_help)
    run.set_defaults(func=_run)
    check = commands.add_parser("check-config", help="validate the environment")
    check.add_argument("sinks", nargs="*", metavar="SINK", help=sink_help)
    check.set_defaults(func=_check_config)
    sim = commands.add_parser("simulate", help="publish realistic node readings")
    simulate.add_arguments(sim)
    sim.set_defaults(func=simulate.run)
    dead = commands.add_parser("deadletter", help="list or re-drive the dead letter")
    redrive.add_arguments(dead)
    dead.set_defaults(func=redrive.run)
    return parser


def configure(env: EnvReader, names: Sequence[str]) -> tuple[Settings, list[Sink]]:
    """Settings and sinks from the environment; ``ConfigError`` lists problems.

    ``names`` are the sinks asked for on the command line; without any, the
    comma-separated ``SINKS`` variable decides.
    """
    settings = read_settings(env)
    raw = ",".join(names) if names else env.str("SINKS", "print") or "print"
    wanted = [name.strip() for name in raw.split(",") if name.strip()]
    source = "sinks on the command line" if names else "SINKS"
    if names:
        env.entries.append(Entry("SINKS", raw, "command line"))
    if not wanted or any(name not in REGISTRY for name in wanted):
        env.problem(source, raw, "a comma-separated list of " + ", ".join(REGISTRY))
        wanted = []
    sinks = [sink_class(name).from_env(env, settings) for name in dict.fromkeys(wanted)]
    env.raise_if_problems()
    return settings, sinks


def _check_config(args: argparse.Namespace) -> int:
    env = EnvReader()
    configure(env, args.sinks)
    width = max(len(entry.name) for entry in env.entries)
    for entry in sorted(env.entries, key=lambda e: e.name):
        print(f"{entry.name:<{width}}  {entry.shown}  ({entry.source})")
    print("configuration ok", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    env = EnvReader()
    settings, sinks = configure(env, args.sinks)
    logs.configure(settings.log_level, settings.log_format)
    ingester = assemble(settings, sinks)
    stop = threading.Event()
    _stop_on_signals(stop)
    ingester.run_until(stop)
    return 0


def assemble(settings: Settings, sinks: Sequence[Sink]) -> Ingester:
    """The ingester; a spool, TLS file or address it cannot use is a ConfigError."""
    metrics = Metrics(sink.name for sink in sinks)
    names = [sink.name for sink in sinks]
    try:
        spool = open_spool(settings, names, _spool_drop_reporter(metrics))
    except (OSError, sqlite3.Error) as exc:
        where = repr(str(settings.spool_path))
        raise ConfigError(
            [f"SPOOL_PATH={where}: expected a file in a writable directory ({exc})"]
        ) from exc

    deadletter = DeadLetter(settings.deadletter_path, settings.deadletter_max_bytes)
    try:
        return Ingester(Parts(settings, sinks, spool, deadletter, metrics))
    except OSError as exc:
        spool.close()
        raise ConfigError([_start_problem(settings, exc)]) from exc


def _start_problem(settings: Settings, exc: OSError) -> str:
    """Name the settings behind a TLS setup or listening socket that failed."""
    if isinstance(exc, ssl.SSLError):
        return f"MQTT_TLS_CA/CERT/KEY: expected PEM files that belong together ({exc})"
    address = f"{settings.metrics_host}:{settings.metrics_port}"
    return (
        f"METRICS_HOST:METRICS_PORT={address!r}: expected an address this host can"
        f" listen on ({exc.strerror or exc})"
    )


def open_spool(
    settings: Settings, sinks: Sequence[str], on_drop: Callable[[int], None]
) -> Spool:
    """The durable spool the settings describe."""
    return Spool(
        settings.spool_path,
        sinks,
        settings.spool_max_bytes,
        settings.dedup_window,
        on_drop,
        synchronous=settings.spool_sync.upper(),
    )


def _spool_drop_reporter(metrics: Metrics) -> Callable[[int], None]:
    def report(count: int) -> None:
        metrics.spool_dropped.inc(count)
        log.error("spool_full_dropped_oldest", dropped=count)

    return report


def _stop_on_signals(stop: threading.Event) -> None:
    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
