"""``loadmeter deadletter``: look into the dead letter and re-drive refused points.

``list`` shows the records and a count per reason. ``redrive`` writes the
points a sink refused (reason ``sink_refused``) again, into that sink or
into the sinks named, configured from the environment as ``loadmeter run``
is. A point stored is removed from the dead letter; a point refused again
stays, with the sink's new message. Payload rejects (``invalid_json`` and
the like) are raw messages, not readings: they are listed, never re-driven.

Each changed file is replaced atomically and keeps every other line as it
was, unreadable ones included. A point keeps its receive time as timestamp,
so writing it twice (after a crash between the write and the rewrite) gives
the same point in InfluxDB. The ingester appends to the newest file: stop it
before a re-drive.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import cli, logs
from .config import Settings, read_settings
from .deadletter import UNREADABLE, Line, read_lines, reading_from, rewrite
from .envreader import EnvReader
from .errors import PermanentSinkError, SinkError
from .model import Reading
from .sinks import REGISTRY, Sink
from .worker import BLOCKING_STATUSES

REDRIVABLE = "sink_refused"
DETAIL_LIMIT = 200
DESCRIPTION = """\
list: the records, newest last, and a count per reason.
redrive: write the points a sink refused (reason sink_refused) again, into
  that sink or the ones named with --sink, configured from the environment
  as for `loadmeter run`. Points stored leave the dead letter; points refused
  again stay, with the new message. Stop the ingester first: it appends to
  the newest file.

Payload rejects (invalid_json and the like) are raw messages, not readings:
they are listed but never re-driven.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``list`` and ``redrive`` actions on ``parser``."""
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = parser.add_subparsers(required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="show records and a count per reason")
    listing.add_argument("--reason", help="only records with this reason")
    listing.add_argument(
        "--limit", type=_positive, metavar="N", help="only the newest N records"
    )
    listing.add_argument("--json", action="store_true", help="one JSON document")
    listing.set_defaults(action=list_records)

    redrive = actions.add_parser(
        "redrive",
        help="write refused points again; payload rejects are never re-driven",
        description="Write the points a sink refused (sink_refused) again and "
        "remove those stored from the dead letter. Payload rejects (invalid_json "
        "and the like) are raw messages, not readings: they stay, never re-driven. "
        "Stop the ingester first. Exit 0 when every point was stored, 1 when some "
        "stay, 2 on a configuration error.",
    )
    redrive.add_argument(
        "--sink",
        action="append",
        dest="sinks",
        choices=list(REGISTRY),
        help="write into this sink instead of the one that refused each point "
        "(repeatable)",
    )
    redrive.add_argument(
        "--dry-run", action="store_true", help="only count what would be re-driven"
    )
    redrive.set_defaults(action=redrive_points)


def run(args: argparse.Namespace) -> int:
    """Run the chosen action; its exit status."""
    status: int = args.action(args)
    return status


def _positive(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 1, got {text!r}"
        )
    return value


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _points(count: int) -> str:
    return f"{count} point" if count == 1 else f"{count} points"


def _settings() -> Settings:
    env = EnvReader()
    settings = read_settings(env)
    env.raise_if_problems()
    return settings


def list_records(args: argparse.Namespace) -> int:
    """Print the records (newest last) and how many there are per reason."""
    lines = read_lines(_settings().deadletter_path)
    chosen = [
        line for line in lines if args.reason is None or line.reason == args.reason
    ]
    shown = chosen[-args.limit :] if args.limit else chosen
    counts = dict(sorted(Counter(line.reason for line in chosen).items()))
    if args.json:
        records = [
            line.record or {"reason": UNREADABLE, "line": line.text} for line in shown
        ]
        _say(json.dumps({"counts": counts, "records": records}, default=str))
        return 0

    for line in shown:
        _say(describe(line))
    _say()
    _say("records per reason:" if counts else "no records")
    for reason, count in counts.items():
        _say(f"  {reason:<20} {count}")
    if len(shown) < len(chosen):
        _say(f"showing the newest {len(shown)} of {len(chosen)}")
    return 0


def describe(line: Line) -> str:
    """One listing line: time, reason, node or topic, and what went wrong."""
    record = line.record
    if record is None:
        return f"-  {UNREADABLE}  -  {line.text[:DETAIL_LIMIT]}"
    where = record.get("node") or record.get("topic") or "-"
    detail = record.get("detail") or ""
    if line.reason == REDRIVABLE:
        detail = f"{record.get('sink', '?')}: {record.get('message', '')}"
    text = " ".join(str(detail).split())[:DETAIL_LIMIT]
    return f"{record.get('time', '-')}  {line.reason}  {where}  {text}"


def redrive_points(args: argparse.Namespace) -> int:
    """Re-drive every refused point; 0 when all were stored, else 1."""
    settings = _settings()
    lines = read_lines(settings.deadletter_path)
    plan, stuck = _plan(lines, args.sinks or [])
    settings, sinks = (
        cli.configure(EnvReader(), sorted(plan)) if plan else (settings, [])
    )
    for name, points in plan.items():
        _say(f"to re-drive into {name}: {_points(len(points))}")
    for why, count in Counter(stuck.values()).items():
        _say(f"left, {why}: {_points(count)}")
    if args.dry_run:
        return 0

    logs.configure(settings.log_level, settings.log_format)
    failures: dict[int, Failure] = {}
    for sink in sinks:
        for index, failure in _drive(sink, plan[sink.name], settings.batch_max):
            failures.setdefault(index, failure)
    stored = {index for points in plan.values() for index, _ in points} - set(failures)
    rewrite(lines, _changes(lines, stored, failures))
    refused = sum(1 for failure in failures.values() if failure.refusal)
    _say(
        f"stored: {len(stored)}, refused again: {refused}, "
        f"kept as the sink failed: {len(failures) - refused}, left: {len(stuck)}"
    )
    return 1 if failures or stuck else 0


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a point was not stored: the sink refused it, or the sink failed."""

    sink: str
    error: SinkError

    @property
    def refusal(self) -> bool:
        """Whether the sink refused the point itself (so it is worth noting)."""
        return _sink_failure([self.error]) is None


Plan = dict[str, list[tuple[int, Reading]]]


def _plan(lines: Sequence[Line], targets: Sequence[str]) -> tuple[Plan, dict[int, str]]:
    """Which points go to which sink, and why the others cannot go anywhere."""
    plan: Plan = defaultdict(list)
    stuck: dict[int, str] = {}
    for index, line in enumerate(lines):
        if line.record is None or line.reason != REDRIVABLE:
            continue
        reading = reading_from(line.record)
        names = targets or [str(line.record.get("sink"))]
        if reading is None:
            stuck[index] = "malformed, no reading in the record"
        elif any(name not in REGISTRY for name in names):
            stuck[index] = "refused by a sink not known here (name one with --sink)"
        else:
            for name in names:
                plan[name].append((index, reading))
    return dict(plan), stuck


def _drive(
    sink: Sink, points: Sequence[tuple[int, Reading]], batch_max: int
) -> list[tuple[int, Failure]]:
    """Write the points into ``sink``; each one not stored, with why."""
    readings = [reading for _, reading in points]
    try:
        sink.open()
    except SinkError as exc:
        outcomes: list[SinkError | None] = [exc] * len(readings)
    else:
        try:
            outcomes = deliver(sink, readings, batch_max)
        finally:
            sink.close()
    failed = _sink_failure(outcomes)
    if failed is not None:
        _say(f"{sink.name} failed, its remaining points stay: {failed}")
    return [
        (index, Failure(sink.name, error))
        for (index, _), error in zip(points, outcomes, strict=True)
        if error is not None
    ]


def deliver(
    sink: Sink, readings: Sequence[Reading], batch_max: int
) -> list[SinkError | None]:
    """Write ``readings`` in batches; per reading None when stored, else why not.

    A refused batch is halved until the refused readings stand alone. When the
    sink itself fails (unreachable, or refusing access) the rest is not tried
    and carries that error.
    """
    outcomes: list[SinkError | None] = []
    for start in range(0, len(readings), batch_max):
        outcomes += _isolate(sink, readings[start : start + batch_max])
        failed = _sink_failure(outcomes)
        if failed is not None:
            return outcomes + [failed] * (len(readings) - len(outcomes))
    return outcomes


def _isolate(sink: Sink, readings: Sequence[Reading]) -> list[SinkError | None]:
    try:
        sink.write(readings)
    except SinkError as exc:
        if len(readings) == 1 or _sink_failure([exc]) is not None:
            return [exc] * len(readings)
        middle = len(readings) // 2
        first = _isolate(sink, readings[:middle])
        failed = _sink_failure(first)
        if failed is not None:
            return first + [failed] * (len(readings) - middle)
        return first + _isolate(sink, readings[middle:])
    return [None] * len(readings)


def _sink_failure(outcomes: Sequence[SinkError | None]) -> SinkError | None:
    """The first error that says the sink, not a point, is at fault."""
    for error in outcomes:
        if error is None:
            continue
        if not isinstance(error, PermanentSinkError):
            return error
        if error.status in BLOCKING_STATUSES:
            return error
    return None


def _changes(
    lines: Sequence[Line], stored: set[int], failures: Mapping[int, Failure]
) -> dict[int, str | None]:
    """Drop the stored points; note the sink's new message on those refused again."""
    changes: dict[int, str | None] = dict.fromkeys(stored)
    for index, failure in failures.items():
        record = lines[index].record
        if failure.refusal and record is not None:
            changes[index] = json.dumps(_noted(record, failure))
    return changes


def _noted(record: Mapping[str, Any], failure: Failure) -> dict[str, Any]:
    """The record with the sink, status and message of its latest refusal."""
    error = failure.error
    status = error.status if isinstance(error, PermanentSinkError) else None
    latest = {"sink": failure.sink, "status": status, "message": str(error)}
    return {**record, **latest}
