"""Structured logging: JSON lines off a terminal, readable lines on one."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, TextIO, cast

import structlog

QUIET_LIBRARIES = ("paho", "influxdb_client", "urllib3", "tenacity")


def configure(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None
) -> None:
    """Set up structlog; ``fmt`` is json, console or auto (console on a TTY).

    Logs go to stderr so that the print sink owns stdout. Records from the
    standard library's logging (the libraries' own) are rendered the same
    way, so a JSON log stays JSON throughout.
    """
    out = stream or cast(TextIO, _CurrentStderr())
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(out, shared, renderer)


def _route_stdlib_logging(out: TextIO, shared: list[Any], renderer: Any) -> None:
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the moment of writing.

    Holding the object ``sys.stderr`` was at set-up would keep writing to it
    after it is replaced (and closed), as test runners and daemons do.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class RateLimiter:
    """Lets one event per key through every ``period`` seconds.

    ``allow`` returns how many were held back since the last one let
    through, or None when this one is held back too. Keys are bounded: past
    ``max_keys`` the table starts afresh rather than growing.
    """

    def __init__(self, period: float = 60.0, max_keys: int = 10_000) -> None:
        self.period = period
        self.max_keys = max_keys
        self._last: dict[tuple[str, ...], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def allow(self, *key: str) -> int | None:
        """None to stay quiet, else the number suppressed before this one."""
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(key, (-self.period, 0))
            if now - last < self.period:
                self._last[key] = (last, held + 1)
                return None
            if len(self._last) >= self.max_keys:
                self._last.clear()
            self._last[key] = (now, 0)
            return held
