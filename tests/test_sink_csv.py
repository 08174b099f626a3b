"""The csv sink: columns, exact values, daily files and crash safety."""

from __future__ import annotations

import csv
import datetime as dt
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loadmeter.config import read_settings
from loadmeter.envreader import EnvReader
from loadmeter.errors import TransientSinkError
from loadmeter.model import Reading
from loadmeter.sinks import sink_class
from loadmeter.sinks.csvfile import CsvSink
from structlog.testing import capture_logs

HEADER_CT2 = (
    "recv_time_utc,node,epoch,t_ms,"
    "ct1_irms,ct1_apparpower,ct1_power,ct2_irms,ct2_apparpower,ct2_power,vrms"
)

MakeSink = Callable[..., CsvSink]


def ms(iso: str) -> int:
    """Milliseconds since the epoch for a naive ISO time taken as UTC."""
    moment = dt.datetime.fromisoformat(iso).replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def reading(
    at: str = "2026-12-03T10:00:00.123", node: str = "node_main", **fields: float
) -> Reading:
    """A reading received at ``at`` with the given measurement fields."""
    return Reading(node, ms(at), fields, epoch=1764756000, t_ms=5123456)


def rows(path: Path) -> list[list[str]]:
    """Every row of a CSV file, header included, as Python's reader sees it."""
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


@pytest.fixture
def make_sink(tmp_path: Path) -> Iterator[MakeSink]:
    """Builds opened csv sinks from environment variables; closes them after."""
    made: list[CsvSink] = []

    def make(csv_path: str | Path | None = None, **env: str) -> CsvSink:
        variables = dict(env, CSV_PATH=str(csv_path or tmp_path / "load.csv"))
        sink = CsvSink.from_env(EnvReader(variables), read_settings(EnvReader(env)))
        sink.open()
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


def test_registry_names_the_csv_sink() -> None:
    """The registry entry "csv" resolves to CsvSink."""
    assert sink_class("csv") is CsvSink


def test_header_lists_clocks_then_channels_then_voltage(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """A new file starts with the documented header for MAX_CT=2."""
    make_sink()

    assert (tmp_path / "load.csv").read_text() == HEADER_CT2 + "\n"


@pytest.mark.parametrize(
    ("max_ct", "channels"),
    [
        ("1", "ct1_irms,ct1_apparpower,ct1_power"),
        (
            "3",
            "ct1_irms,ct1_apparpower,ct1_power,ct2_irms,ct2_apparpower,ct2_power,"
            "ct3_irms,ct3_apparpower,ct3_power",
        ),
    ],
)
def test_header_follows_max_ct(
    make_sink: MakeSink, tmp_path: Path, max_ct: str, channels: str
) -> None:
    """MAX_CT sets how many current channels the header and rows carry."""
    sink = make_sink(MAX_CT=max_ct)

    sink.write([reading(ct1_irms=1.5, vrms=230.0)])

    header, row = rows(tmp_path / "load.csv")
    assert ",".join(header) == f"recv_time_utc,node,epoch,t_ms,{channels},vrms"
    assert len(row) == len(header)
    assert row[4] == "1.5"
    assert row[-1] == "230.0"


def test_row_holds_exact_values_and_empty_cells_for_missing_ones(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """Values land in their columns; absent values and clocks are empty cells."""
    sink = make_sink()
    fields = {"ct1_irms": 1.234, "ct1_apparpower": 283.82, "ct1_power": -251.002}
    full = reading(**fields, vrms=230.0)
    bare = Reading('node, "quoted"', ms("2026-12-03T10:00:01"), {"ct2_irms": 0.0})

    sink.write([full, bare])

    assert rows(tmp_path / "load.csv")[1:] == [
        [
            "2026-12-03T10:00:00.123Z",
            "node_main",
            "1764756000",
            "5123456",
            "1.234",
            "283.82",
            "-251.002",
            "",
            "",
            "",
            "230.0",
        ],
        [
            "2026-12-03T10:00:01.000Z",
            'node, "quoted"',
            "",
            "",
            "",
            "",
            "",
            "0.0",
            "",
            "",
            "",
        ],
    ]


@pytest.mark.parametrize(
    "value",
    [0.1, 0.30000000000000004, 1e-300, 5e-324, 1.7976931348623157e308, -0.0, 1e22],
)
def test_awkward_floats_are_written_with_repr(
    make_sink: MakeSink, tmp_path: Path, value: float
) -> None:
    """A float is written as its repr, so its text and value read back exactly."""
    sink = make_sink()

    sink.write([reading(ct1_power=value)])

    cell = rows(tmp_path / "load.csv")[1][6]
    assert cell == repr(value)
    assert float(cell) == value


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.floats(allow_nan=False, allow_infinity=False), min_size=7, max_size=7
    )
)
def test_any_finite_float_round_trips(
    tmp_path_factory: pytest.TempPathFactory, values: list[float]
) -> None:
    """Every finite float read back from the file equals the one written."""
    path = tmp_path_factory.mktemp("floats") / "load.csv"
    env = {"CSV_PATH": str(path)}
    sink = CsvSink.from_env(EnvReader(env), read_settings(EnvReader(env)))
    names = ["ct1_irms", "ct1_apparpower", "ct1_power"]
    names += ["ct2_irms", "ct2_apparpower", "ct2_power", "vrms"]

    sink.write([reading(**dict(zip(names, values, strict=True)))])
    sink.close()

    assert [float(cell) for cell in rows(path)[1][4:]] == values


def test_directory_gets_one_file_per_utc_day_split_at_midnight(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """A batch spanning midnight UTC puts each row in its own day's file."""
    sink = make_sink(tmp_path)
    late = reading("2026-12-03T23:59:59.999", ct1_irms=1.0)
    early = reading("2026-12-04T00:00:00.000", ct1_irms=2.0)

    sink.write([late, early])
    sink.write([reading("2026-12-04T00:00:01.000", ct1_irms=3.0)])

    first = rows(tmp_path / "loadmeter-2026-12-03.csv")
    second = rows(tmp_path / "loadmeter-2026-12-04.csv")
    assert [row[0] for row in first] == ["recv_time_utc", "2026-12-03T23:59:59.999Z"]
    assert [row[4] for row in second] == ["ct1_irms", "2.0", "3.0"]


def test_path_ending_with_slash_is_a_directory_created_on_open(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """CSV_PATH ending with / names a directory, made when missing."""
    sink = make_sink(f"{tmp_path}/data/csv/")

    sink.write([reading("2026-12-03T10:00:00.000", ct1_irms=1.0)])

    assert rows(tmp_path / "data/csv/loadmeter-2026-12-03.csv")[1][4] == "1.0"


def test_trailing_slash_on_an_existing_file_is_a_config_problem(
    tmp_path: Path,
) -> None:
    """CSV_PATH with a trailing / that names a file is reported at start."""
    (tmp_path / "load.csv").write_text("")
    env = EnvReader({"CSV_PATH": f"{tmp_path}/load.csv/"})

    CsvSink.from_env(env, read_settings(EnvReader({})))

    assert len(env.problems) == 1
    assert env.problems[0].startswith("CSV_PATH=")


def test_default_path_is_loadmeter_csv_in_the_working_directory() -> None:
    """Without CSV_PATH the sink writes ./loadmeter.csv."""
    sink = CsvSink.from_env(EnvReader({}), read_settings(EnvReader({})))

    assert sink.path == Path("loadmeter.csv")
    assert not sink.per_day


def test_restart_appends_under_the_single_existing_header(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """A second run appends rows to the file without writing a second header."""
    first = make_sink()
    first.write([reading(ct1_irms=1.0)])
    first.close()

    with capture_logs() as logs:
        make_sink().write([reading(ct1_irms=2.0)])

    assert [row[4] for row in rows(tmp_path / "load.csv")] == ["ct1_irms", "1.0", "2.0"]
    assert logs[0]["event"] == "csv_file_started"
    assert logs[0]["created"] is False


def test_header_mismatch_starts_a_numbered_file_and_leaves_the_old_one(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """After MAX_CT changes, rows go to load.1.csv and load.csv stays as it was."""
    make_sink(MAX_CT="1").write([reading(ct1_irms=1.0)])
    before = (tmp_path / "load.csv").read_bytes()

    with capture_logs() as logs:
        make_sink(MAX_CT="3").write([reading(ct3_irms=3.0)])

    assert (tmp_path / "load.csv").read_bytes() == before
    header, row = rows(tmp_path / "load.1.csv")
    assert header[-4:] == ["ct3_irms", "ct3_apparpower", "ct3_power", "vrms"]
    assert row[header.index("ct3_irms")] == "3.0"
    assert logs[0] == {
        "event": "csv_header_mismatch",
        "log_level": "warning",
        "sink": "csv",
        "path": str(tmp_path / "load.csv"),
        "reason": "its header differs from the configured columns",
    }


def test_header_mismatch_takes_the_first_matching_numbered_file(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """Numbered files are tried in order; one with our header is appended to."""
    make_sink(MAX_CT="1").write([reading(ct1_irms=1.0)])
    make_sink(MAX_CT="2").write([reading(ct1_irms=2.0)])
    make_sink(MAX_CT="3").write([reading(ct1_irms=3.0)])

    make_sink(MAX_CT="3").write([reading(ct1_irms=4.0)])

    assert [row[4] for row in rows(tmp_path / "load.csv")] == ["ct1_irms", "1.0"]
    assert [row[4] for row in rows(tmp_path / "load.1.csv")] == ["ct1_irms", "2.0"]
    assert [r[4] for r in rows(tmp_path / "load.2.csv")] == ["ct1_irms", "3.0", "4.0"]


def test_torn_last_row_is_cut_off_on_open(make_sink: MakeSink, tmp_path: Path) -> None:
    """A row left half-written by a crash is removed before new rows follow."""
    path = tmp_path / "load.csv"
    make_sink().write([reading(ct1_irms=1.0)])
    intact = path.read_bytes()
    path.write_bytes(intact + b"2026-12-03T10:00:01.000Z,node_main,17")

    with capture_logs() as logs:
        make_sink().write([reading(ct1_irms=2.0)])

    assert path.read_bytes().startswith(intact)
    assert [row[4] for row in rows(path)] == ["ct1_irms", "1.0", "2.0"]
    assert logs[0]["event"] == "csv_torn_row_removed"
    assert logs[0]["bytes_removed"] == 37


def test_torn_header_is_rewritten_whole(make_sink: MakeSink, tmp_path: Path) -> None:
    """A file holding only the start of our header gets the full header."""
    path = tmp_path / "load.csv"
    path.write_text(HEADER_CT2[:20])

    make_sink().write([reading(ct1_irms=1.0)])

    assert ",".join(rows(path)[0]) == HEADER_CT2
    assert len(rows(path)) == 2


def test_failed_write_is_cut_back_and_a_retry_stores_it_once(
    make_sink: MakeSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk-full error mid-batch leaves no partial rows, and retrying works."""
    path = tmp_path / "load.csv"
    sink = make_sink()
    sink.write([reading(ct1_irms=1.0)])
    batch = [reading(ct1_irms=2.0), reading(ct1_irms=3.0)]
    real_write = os.write
    calls: list[int] = []

    def short_then_full(fd: int, data: bytes) -> int:
        """Write half the bytes, then fail as a full disk does."""
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(TransientSinkError) as caught:
        sink.write(batch)
    monkeypatch.setattr(os, "write", real_write)

    assert calls[1] == calls[0] - calls[0] // 2
    assert isinstance(caught.value.__cause__, OSError)
    assert [row[4] for row in rows(path)] == ["ct1_irms", "1.0"]
    sink.write(batch)
    assert [row[4] for row in rows(path)] == ["ct1_irms", "1.0", "2.0", "3.0"]


def test_failure_in_the_second_day_file_cuts_back_the_first(
    make_sink: MakeSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A midnight batch is stored in both day files or in neither."""
    sink = make_sink(tmp_path)
    sink.write([reading("2026-12-03T23:59:59.000", ct1_irms=1.0)])
    sink.write([reading("2026-12-04T00:00:00.000", ct1_irms=2.0)])
    real_write = os.write
    calls: list[int] = []

    def fail_second(fd: int, data: bytes) -> int:
        """Write the first file's rows, then fail on the second file."""
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.EIO, "Input/output error")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", fail_second)
    with pytest.raises(TransientSinkError):
        sink.write(
            [
                reading("2026-12-03T23:59:59.500", ct1_irms=3.0),
                reading("2026-12-04T00:00:00.500", ct1_irms=4.0),
            ]
        )

    assert len(calls) == 2
    assert len(rows(tmp_path / "loadmeter-2026-12-03.csv")) == 2
    assert len(rows(tmp_path / "loadmeter-2026-12-04.csv")) == 2


def test_unusable_location_raises_a_transient_error(tmp_path: Path) -> None:
    """A CSV_PATH under a regular file fails to open as a retryable error."""
    (tmp_path / "plain").write_text("")
    env = {"CSV_PATH": str(tmp_path / "plain" / "load.csv")}
    sink = CsvSink.from_env(EnvReader(env), read_settings(EnvReader(env)))

    with pytest.raises(TransientSinkError) as caught:
        sink.open()

    assert isinstance(caught.value.__cause__, OSError)


def series(count: int, start: str = "2026-12-03T10:00:00.000") -> list[Reading]:
    """``count`` readings one second apart, each with its own clocks and value."""
    first = ms(start)
    return [
        Reading(
            "node_main",
            first + i * 1000,
            {"ct1_irms": float(i)},
            epoch=1764756000 + i,
            t_ms=5123456 + i * 1000,
        )
        for i in range(count)
    ]


def values(path: Path) -> list[str]:
    """The ct1_irms cell of every data row of ``path``."""
    return [row[4] for row in rows(path)[1:]]


def test_replayed_batch_after_a_restart_is_stored_once(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """The same batch written again after reopening the file adds no row."""
    batch = series(3)
    first = make_sink()
    first.write(batch)
    first.close()

    with capture_logs() as logs:
        make_sink().write(batch)

    assert values(tmp_path / "load.csv") == ["0.0", "1.0", "2.0"]
    [skipped] = [entry for entry in logs if entry["event"] == "csv_replay_skipped"]
    assert skipped["rows"] == 3
    assert skipped["path"] == str(tmp_path / "load.csv")


def test_replayed_prefix_is_skipped_and_new_readings_appended(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """A replay followed by newer readings appends only the newer ones."""
    readings = series(6)
    first = make_sink()
    first.write(readings[:2])
    first.write(readings[2:4])
    first.close()

    make_sink().write(readings[2:6])

    assert values(tmp_path / "load.csv") == ["0.0", "1.0", "2.0", "3.0", "4.0", "5.0"]


def test_rows_left_by_a_torn_batch_are_not_written_twice(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """After a crash mid-batch, the whole rows stay and only the rest is added."""
    path = tmp_path / "load.csv"
    readings = series(4)
    first = make_sink()
    first.write(readings[:3])
    first.close()
    torn = path.read_bytes()[:-10]
    path.write_bytes(torn)

    make_sink().write(readings)

    assert values(path) == ["0.0", "1.0", "2.0", "3.0"]


def test_replay_smaller_than_the_written_batch_spans_several_writes(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """A replayed batch cut into smaller writes is still recognised write by write."""
    readings = series(5)
    first = make_sink()
    first.write(readings[:4])
    first.close()

    second = make_sink()
    second.write(readings[:2])
    second.write(readings[2:5])

    assert values(tmp_path / "load.csv") == ["0.0", "1.0", "2.0", "3.0", "4.0"]


def test_new_readings_are_appended_whole_after_a_restart(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """A batch whose first reading is not at the file's tail is all new."""
    readings = series(4)
    first = make_sink()
    first.write(readings[:2])
    first.close()

    with capture_logs() as logs:
        make_sink().write(readings[2:])

    assert values(tmp_path / "load.csv") == ["0.0", "1.0", "2.0", "3.0"]
    assert "csv_replay_skipped" not in [entry["event"] for entry in logs]


def test_same_clocks_at_another_receive_time_are_a_new_row(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """Only a row with the same receive time, node and clocks counts as replayed."""
    first = make_sink()
    first.write([reading("2026-12-03T10:00:00.000", ct1_irms=1.0)])
    first.close()

    make_sink().write([reading("2026-12-03T10:00:00.001", ct1_irms=1.0)])

    assert values(tmp_path / "load.csv") == ["1.0", "1.0"]


def test_replay_is_skipped_in_each_day_file(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """A midnight batch replayed after a restart leaves each day file unchanged."""
    late = series(2, "2026-12-03T23:59:58.500")
    early = series(2, "2026-12-04T00:00:00.500")
    first = make_sink(tmp_path)
    first.write([*late, *early])
    first.close()

    make_sink(tmp_path).write([*late, *early, *series(1, "2026-12-04T00:00:05.000")])

    assert values(tmp_path / "loadmeter-2026-12-03.csv") == ["0.0", "1.0"]
    assert values(tmp_path / "loadmeter-2026-12-04.csv") == ["0.0", "1.0", "0.0"]


def test_replay_after_a_crash_between_day_files_completes_the_second_day(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """A batch stored in the first day's file only is completed, not repeated."""
    late = series(2, "2026-12-03T23:59:58.500")
    early = series(2, "2026-12-04T00:00:00.500")
    first = make_sink(tmp_path)
    first.write(late)
    first.close()

    make_sink(tmp_path).write([*late, *early])

    assert values(tmp_path / "loadmeter-2026-12-03.csv") == ["0.0", "1.0"]
    assert values(tmp_path / "loadmeter-2026-12-04.csv") == ["0.0", "1.0"]


def test_failed_replay_is_retried_without_duplicates(
    make_sink: MakeSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replayed batch whose new rows fail to write is skipped again on retry."""
    readings = series(3)
    first = make_sink()
    first.write(readings[:2])
    first.close()
    sink = make_sink()
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        """Fail as a full disk does."""
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(TransientSinkError):
        sink.write(readings)
    monkeypatch.setattr(os, "write", real_write)
    sink.write(readings)

    assert values(tmp_path / "load.csv") == ["0.0", "1.0", "2.0"]


def test_look_back_reaches_batch_max_rows_and_no_further(
    make_sink: MakeSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last BATCH_MAX rows are recognised, even read in small chunks; older not."""
    readings = series(12)
    make_sink().write(readings)
    monkeypatch.setattr("loadmeter.sinks.csvfile.TAIL_CHUNK", 7)

    make_sink(BATCH_MAX="5").write(readings[7:])
    unchanged = values(tmp_path / "load.csv")
    make_sink(BATCH_MAX="5").write(readings[6:])

    assert unchanged == [f"{i}.0" for i in range(12)]
    assert values(tmp_path / "load.csv") == [
        *[f"{i}.0" for i in range(12)],
        *[f"{i}.0" for i in range(6, 12)],
    ]
