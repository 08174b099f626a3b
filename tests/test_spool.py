"""The durable spool on real SQLite files: order, cursors, restarts, dedup, bound."""

from __future__ import annotations

import json
import math
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from loadmeter import spool as spool_module
from loadmeter.model import Reading
from loadmeter.spool import Arrival, Spool, now_ms

T0 = 1_764_777_600_123
EPOCH = 1_764_777_600
SINKS = ("influx", "csv")
ROW_OVERHEAD = 48
HOUR_MS = 3_600_000


def reading(
    seq: int = 0,
    node: str = "node_main",
    epoch: int | None = EPOCH,
    t_ms: int | None = None,
    received_ms: int | None = None,
    **fields: float,
) -> Reading:
    """Reading number ``seq``: received ``seq`` ms after T0, ``t_ms`` = ``seq``.

    The default fields vary with ``seq`` but always take the same space.
    """
    return Reading(
        node,
        T0 + seq if received_ms is None else received_ms,
        fields or {"ct1_irms": seq % 10 + 0.5},
        epoch,
        seq if t_ms is None and epoch is not None else t_ms,
    )


def arrivals(readings: Sequence[Reading], replayed: bool = False) -> list[Arrival]:
    """Each reading as it would arrive from the broker."""
    return [Arrival(r, replayed) for r in readings]


def accounted_bytes(reading: Reading) -> int:
    """What one stored reading counts against ``max_bytes``."""
    fields = json.dumps(dict(reading.fields), separators=(",", ":"))
    return len(fields) + len(reading.node) + ROW_OVERHEAD


def held_rows(path: Path) -> list[tuple[int, int]]:
    """(id, received_ms) of every reading the file holds, read by SQLite itself."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return db.execute("SELECT id, received_ms FROM readings ORDER BY id").fetchall()


def held_bytes(path: Path) -> int:
    """The size of every reading in the file, counted as the bound counts it."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        row = db.execute(
            "SELECT COALESCE(SUM(LENGTH(fields) + LENGTH(node)), 0), COUNT(*)"
            " FROM readings"
        ).fetchone()
    return int(row[0]) + ROW_OVERHEAD * int(row[1])


def received(batch_readings: Sequence[Reading]) -> list[int]:
    """The receive times of a batch, which the tests use as reading numbers."""
    return [r.received_ms - T0 for r in batch_readings]


class Spools:
    """Opens spools on one file and closes whatever a test leaves open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.drops: list[int] = []
        self._open: list[Spool] = []

    def open(
        self,
        sinks: Sequence[str] = SINKS,
        max_bytes: int = 2**30,
        window_s: float = 3600.0,
    ) -> Spool:
        """A spool on the file; dropped counts go to ``drops``."""
        spool = Spool(self.path, sinks, max_bytes, window_s, self.drops.append)
        self._open.append(spool)
        return spool

    def close(self, spool: Spool) -> None:
        """Close ``spool`` as the ingester does at shutdown."""
        self._open.remove(spool)
        spool.close()

    def reopen(
        self, spool: Spool, sinks: Sequence[str] = SINKS, max_bytes: int = 2**30
    ) -> Spool:
        """Close ``spool`` and open the same file again, as after a restart."""
        self.close(spool)
        return self.open(sinks, max_bytes)

    def close_all(self) -> None:
        """Close every spool still open."""
        for spool in list(self._open):
            self.close(spool)


@pytest.fixture
def spools(tmp_path: Path) -> Iterator[Spools]:
    """A spool file under tmp_path; spools left open are closed afterwards."""
    opened = Spools(tmp_path / "state" / "spool.db")
    yield opened
    opened.close_all()


def test_pending_returns_readings_in_append_order(spools: Spools) -> None:
    """Readings come back oldest first, across appends, up to the limit."""
    spool = spools.open()
    spool.append(arrivals([reading(0), reading(1)]))
    spool.append(arrivals([reading(2)]))
    spool.append(arrivals([reading(3), reading(4)]))

    first = spool.pending("influx", 3)
    spool.advance("influx", first.last_id)
    second = spool.pending("influx", 3)

    assert received(first.readings) == [0, 1, 2]
    assert first.last_id == 3
    assert received(second.readings) == [3, 4]
    assert second.last_id == 5


def test_pending_of_a_caught_up_sink_is_empty_and_keeps_its_place(
    spools: Spools,
) -> None:
    """With nothing waiting, the batch is empty and its last_id is the cursor."""
    spool = spools.open()
    spool.append(arrivals([reading(0), reading(1)]))
    spool.advance("influx", 2)

    batch = spool.pending("influx", 10)

    assert batch.readings == []
    assert batch.last_id == 2


def test_readings_round_trip_exactly(spools: Spools) -> None:
    """Node, receive time, device clocks and every float come back identical."""
    extremes = {
        "ct1_irms": 0.1 + 0.2,
        "ct1_apparpower": 1 / 3,
        "ct1_power": -0.0,
        "ct2_irms": 5e-324,
        "ct2_apparpower": 1.7976931348623157e308,
        "ct2_power": -1234.5678901234567,
        "vrms": 230.0,
    }
    sent = [
        Reading("node_main", T0, extremes, EPOCH, 4_294_967_295),
        Reading("küche-ñ", 253_402_300_799_999, {"ct1_irms": 2.5}, None, None),
        Reading("garage", 0, {"ct1_irms": 1e-300}, EPOCH, None),
        Reading("shed", T0, {"ct1_irms": 7.0}, None, 0),
    ]
    spool = spools.open()
    spool.append(arrivals(sent))

    got = spool.pending("csv", 10).readings

    assert got == sent
    assert [repr(v) for v in got[0].fields.values()] == [
        repr(v) for v in extremes.values()
    ]
    assert math.copysign(1.0, got[0].fields["ct1_power"]) == -1.0
    assert all(type(v) is float for r in got for v in r.fields.values())


def test_a_sink_far_behind_does_not_block_another(spools: Spools) -> None:
    """Each sink reads at its own pace from its own cursor."""
    spool = spools.open()
    spool.append(arrivals([reading(i) for i in range(10)]))

    for _ in range(5):
        batch = spool.pending("csv", 2)
        spool.advance("csv", batch.last_id)
    slow = spool.pending("influx", 3)

    assert spool.pending("csv", 10).readings == []
    assert spool.backlog("csv") == (0, None)
    assert received(slow.readings) == [0, 1, 2]
    assert spool.backlog("influx") == (10, T0)


def test_rows_are_deleted_only_once_every_sink_has_them(spools: Spools) -> None:
    """A reading stays on disk until the last sink has stored it."""
    spool = spools.open()
    spool.append(arrivals([reading(i) for i in range(6)]))

    spool.advance("csv", 6)
    after_csv = held_rows(spools.path)
    spool.advance("influx", 4)
    after_both = held_rows(spools.path)

    assert [row_id for row_id, _ in after_csv] == [1, 2, 3, 4, 5, 6]
    assert after_both == [(5, T0 + 4), (6, T0 + 5)]
    assert received(spool.pending("influx", 10).readings) == [4, 5]
    assert spool.pending("csv", 10).readings == []


def test_advancing_to_an_older_id_never_moves_a_cursor_back(spools: Spools) -> None:
    """A late, smaller advance leaves the cursor where it was, also after restart."""
    spool = spools.open()
    spool.append(arrivals([reading(i) for i in range(8)]))
    spool.advance("influx", 5)

    spool.advance("influx", 2)
    before = received(spool.pending("influx", 10).readings)
    spool = spools.reopen(spool)
    after = received(spool.pending("influx", 10).readings)

    assert before == [5, 6, 7]
    assert after == [5, 6, 7]
    assert spool.recovered == 8


def test_close_and_reopen_keeps_readings_and_cursors(spools: Spools) -> None:
    """After a restart each sink continues exactly where it stopped."""
    spool = spools.open()
    spool.append(arrivals([reading(i) for i in range(7)]))
    spool.advance("influx", spool.pending("influx", 3).last_id)
    spool.advance("csv", spool.pending("csv", 5).last_id)

    spool = spools.reopen(spool)
    influx = spool.pending("influx", 10)
    csv = spool.pending("csv", 10)

    assert received(influx.readings) == [3, 4, 5, 6]
    assert received(csv.readings) == [5, 6]
    assert influx.last_id == csv.last_id == 7
    assert spool.recovered == 4
    assert spool.backlog("influx") == (4, T0 + 3)
    assert spool.backlog("csv") == (2, T0 + 5)


def test_ids_continue_after_a_drained_spool_is_reopened(spools: Spools) -> None:
    """Ids never restart, so a cursor can never point at a newer reading."""
    spool = spools.open()
    spool.append(arrivals([reading(0), reading(1)]))
    spool.advance("influx", 2)
    spool.advance("csv", 2)

    spool = spools.reopen(spool)
    spool.append(arrivals([reading(2)]))

    assert held_rows(spools.path) == [(3, T0 + 2)]
    assert received(spool.pending("influx", 10).readings) == [2]
    assert spool.pending("csv", 10).last_id == 3


def test_new_sink_on_reopen_starts_at_the_oldest_reading_still_held(
    spools: Spools,
) -> None:
    """A sink added to the configuration gets everything the spool still holds."""
    spool = spools.open()
    spool.append(arrivals([reading(i) for i in range(5)]))
    spool.advance("influx", 5)
    spool.advance("csv", 2)

    spool = spools.reopen(spool, ("influx", "csv", "print"))

    assert received(spool.pending("print", 10).readings) == [2, 3, 4]
    assert spool.backlog("print") == (3, T0 + 2)
    assert spool.recovered == 3


def test_new_sink_on_reopen_of_a_drained_spool_has_nothing_waiting(
    spools: Spools,
) -> None:
    """With every reading stored and deleted, a new sink starts with no backlog."""
    spool = spools.open()
    spool.append(arrivals([reading(i) for i in range(4)]))
    spool.advance("influx", 4)
    spool.advance("csv", 4)

    spool = spools.reopen(spool, ("influx", "csv", "print"))

    assert spool.pending("print", 10).readings == []
    assert spool.backlog("print") == (0, None)
    assert spool.recovered == 0


def test_sink_removed_from_config_no_longer_blocks_trimming(spools: Spools) -> None:
    """Without the lagging sink, readings go once the remaining sink has them."""
    spool = spools.open()
    spool.append(arrivals([reading(i) for i in range(4)]))
    spool.advance("csv", 4)
    spool = spools.reopen(spool, ("csv",))
    spool.append(arrivals([reading(4)]))

    spool.advance("csv", spool.pending("csv", 10).last_id)
    spool = spools.reopen(spool, ("csv", "influx"))

    assert held_rows(spools.path) == []
    assert spool.pending("influx", 10).readings == []
    assert spool.recovered == 0


CHILD = f"""
import sys
from pathlib import Path

from loadmeter.model import Reading
from loadmeter.spool import Arrival, Spool

T0, EPOCH, GROUP = {T0}, {EPOCH}, 5
spool = Spool(Path(sys.argv[1]), ["influx", "csv"], 2**30, 3600.0, print)
seq = 0
while True:
    group = [
        Arrival(Reading("node_main", T0 + n, {{"seq": float(n)}}, EPOCH, n))
        for n in range(seq, seq + GROUP)
    ]
    spool.append(group)
    seq += GROUP
    if seq % 50 == 0:
        spool.advance("csv", seq)
    print(seq, flush=True)
"""


def committed_before_kill(path: Path, at_least: int) -> int:
    """Run a child appending groups of five; SIGKILL it; the last count it printed.

    The child prints the number of readings after each append returns, so
    every printed count is a committed one.
    """
    command = [sys.executable, "-c", CHILD, str(path)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        printed = 0
        for line in child.stdout:
            printed = int(line)
            if printed >= at_least:
                break
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read().split()
    assert child.returncode == -signal.SIGKILL
    return int(rest[-1]) if rest else printed


def test_reopen_after_sigkill_mid_stream_keeps_every_committed_append(
    spools: Spools,
) -> None:
    """A killed writer leaves whole groups, gapless ids and its cursor behind."""
    printed = committed_before_kill(spools.path, at_least=400)

    spool = spools.open()
    rows = held_rows(spools.path)
    influx = spool.pending("influx", 10_000).readings
    csv = spool.pending("csv", 10_000).readings

    count = len(rows)
    assert printed <= count <= printed + 5
    assert count % 5 == 0
    assert rows == [(n + 1, T0 + n) for n in range(count)]
    assert [r.fields for r in influx] == [{"seq": float(n)} for n in range(count)]
    assert [r.t_ms for r in influx] == list(range(count))
    assert spool.recovered == count
    csv_cursor = count - len(csv)
    assert printed // 50 * 50 <= csv_cursor <= count
    assert received(csv) == list(range(csv_cursor, count))


def test_reopen_after_sigkill_accepts_new_appends_after_the_last_id(
    spools: Spools,
) -> None:
    """Appending after a crash continues the ids without reusing one."""
    committed_before_kill(spools.path, at_least=100)
    spool = spools.open()
    before = held_rows(spools.path)

    spool.append(arrivals([reading(received_ms=T0 - 1, t_ms=10**6)]))

    after = held_rows(spools.path)
    assert after[:-1] == before
    assert after[-1] == (before[-1][0] + 1, T0 - 1)


def test_same_device_clocks_within_the_window_are_refused(spools: Spools) -> None:
    """A reading whose (node, epoch, t_ms) was just stored is a duplicate."""
    spool = spools.open()
    now = now_ms()
    spool.append(arrivals([reading(1, received_ms=now)]))

    again = spool.append(arrivals([reading(1, received_ms=now + 5)]))
    twice_in_one = spool.append(
        arrivals([reading(2, received_ms=now), reading(2, received_ms=now + 1)])
    )
    other_node = spool.append(arrivals([reading(1, node="garage", received_ms=now)]))

    assert (again, twice_in_one, other_node) == (1, 1, 0)
    stored = spool.pending("influx", 10).readings
    assert [(r.node, r.t_ms, r.received_ms) for r in stored] == [
        ("node_main", 1, now),
        ("node_main", 2, now),
        ("garage", 1, now),
    ]


@pytest.mark.parametrize("prune_every", [1, 1000])
def test_same_device_clocks_are_accepted_once_the_window_has_passed(
    spools: Spools, monkeypatch: pytest.MonkeyPatch, prune_every: int
) -> None:
    """A copy stored longer ago than the window no longer refuses a new one."""
    monkeypatch.setattr(spool_module, "PRUNE_EVERY", prune_every)
    spool = spools.open(window_s=60.0)
    now = now_ms()
    spool.append(arrivals([reading(1, received_ms=now - HOUR_MS)]))

    late = spool.append(arrivals([reading(1, received_ms=now)]))
    again = spool.append(arrivals([reading(1, received_ms=now + 1)]))

    assert (late, again) == (0, 1)
    stored = spool.pending("influx", 10).readings
    assert [r.received_ms for r in stored] == [now - HOUR_MS, now]


@pytest.mark.parametrize("prune_every", [1, 1000])
def test_same_device_clocks_are_accepted_after_waiting_out_the_window(
    spools: Spools, monkeypatch: pytest.MonkeyPatch, prune_every: int
) -> None:
    """The window is measured in real time: sleeping past it lets a copy in."""
    monkeypatch.setattr(spool_module, "PRUNE_EVERY", prune_every)
    spool = spools.open(window_s=0.05)
    first = now_ms()
    spool.append(arrivals([reading(1, received_ms=first)]))
    time.sleep(0.2)

    late = spool.append(arrivals([reading(1, received_ms=now_ms())]))

    assert late == 0
    assert len(spool.pending("influx", 10).readings) == 2


def test_window_survives_a_restart(spools: Spools) -> None:
    """De-duplication is kept on disk: a redelivery after a restart is refused."""
    spool = spools.open()
    spool.append(arrivals([reading(3, received_ms=now_ms())]))
    spool = spools.reopen(spool)

    again = spool.append(arrivals([reading(3, received_ms=now_ms())]))

    assert again == 1
    assert len(spool.pending("influx", 10).readings) == 1


def test_replay_equal_to_the_last_stored_reading_is_refused(spools: Spools) -> None:
    """The retained copy the broker re-sends after a restart is not stored again."""
    last = reading(2, epoch=None, ct1_irms=1.5, vrms=230.0)
    spool = spools.open()
    spool.append(arrivals([reading(1, epoch=None), last]))
    spool = spools.reopen(spool)

    replayed = spool.append(
        arrivals([Reading(last.node, now_ms(), last.fields)], replayed=True)
    )

    assert replayed == 1
    assert received(spool.pending("influx", 10).readings) == [1, 2]


@pytest.mark.parametrize(
    "replay",
    [
        reading(2, epoch=None, ct1_irms=1.75, vrms=230.0),
        reading(1, epoch=None),
        reading(2, node="garage", epoch=None, ct1_irms=1.5, vrms=230.0),
    ],
    ids=["other-values", "older-reading", "other-node"],
)
def test_replay_that_differs_from_the_last_stored_reading_is_accepted(
    spools: Spools, replay: Reading
) -> None:
    """Only an exact copy of the node's last stored reading counts as a replay."""
    spool = spools.open()
    spool.append(arrivals([reading(1, epoch=None)]))
    spool.append(arrivals([reading(2, epoch=None, ct1_irms=1.5, vrms=230.0)]))

    refused = spool.append(arrivals([replay], replayed=True))

    assert refused == 0
    assert spool.pending("influx", 10).readings[-1] == replay


@pytest.mark.parametrize(("epoch", "t_ms"), [(None, None), (EPOCH, None), (None, 5000)])
def test_live_readings_without_both_device_clocks_are_never_refused(
    spools: Spools, epoch: int | None, t_ms: int | None
) -> None:
    """Identical readings that are not replays and lack a clock are all kept."""
    same = Reading("node_main", T0, {"ct1_irms": 1.0}, epoch, t_ms)
    spool = spools.open()

    refused = spool.append(arrivals([same, same])) + spool.append(arrivals([same]))

    assert refused == 0
    assert spool.pending("influx", 10).readings == [same, same, same]


def test_appending_beyond_max_bytes_drops_the_oldest_and_reports_them(
    spools: Spools,
) -> None:
    """When full, the oldest readings go, and on_drop hears exactly how many."""
    size = accounted_bytes(reading(0))
    spool = spools.open(max_bytes=10 * size)
    for n in range(10):
        spool.append(arrivals([reading(n)]))
    full = held_rows(spools.path)

    spool.append(arrivals([reading(10)]))

    kept = [received_ms - T0 for _, received_ms in held_rows(spools.path)]
    assert len(full) == 10
    assert spools.drops
    assert spools.drops[0] >= 1
    assert sum(spools.drops) == 11 - len(kept)
    assert kept == list(range(sum(spools.drops), 11))
    assert held_bytes(spools.path) <= 10 * size
    assert received(spool.pending("influx", 20).readings) == kept


def test_cursors_skip_dropped_readings_and_backlog_counts_exactly(
    spools: Spools,
) -> None:
    """A sink behind the drop resumes at the oldest kept reading; counts are exact."""
    size = accounted_bytes(reading(0))
    spool = spools.open(max_bytes=20 * size)
    spool.append(arrivals([reading(n) for n in range(15)]))
    spool.advance("csv", 12)

    for n in range(15, 30):
        spool.append(arrivals([reading(n)]))

    oldest = held_rows(spools.path)[0][0]
    influx = spool.pending("influx", 100)
    assert sum(spools.drops) == oldest - 1
    assert received(influx.readings) == list(range(oldest - 1, 30))
    assert spool.backlog("influx") == (31 - oldest, T0 + oldest - 1)
    assert spool.backlog("csv") == (30 - max(12, oldest - 1), T0 + max(12, oldest - 1))
    assert spool.recovered == 31 - oldest


def test_bound_holds_for_readings_of_mixed_sizes(spools: Spools) -> None:
    """Small old readings and large new ones never push the spool past max_bytes."""
    small = [reading(n) for n in range(20)]
    large = [
        reading(n, **{f"ct{i}_irms": n + i / 7 for i in range(1, 17)})
        for n in range(20, 40)
    ]
    max_bytes = 12 * accounted_bytes(small[0]) + 2 * accounted_bytes(large[0])
    spool = spools.open(max_bytes=max_bytes)
    sizes = []

    for one in [*small, *large]:
        spool.append(arrivals([one]))
        sizes.append(held_bytes(spools.path))

    assert max(sizes) <= max_bytes
    kept = received(spool.pending("influx", 100).readings)
    assert kept == list(range(40 - len(kept), 40))
    assert sum(spools.drops) == 40 - len(kept)


def test_drop_while_a_batch_is_out_leaves_cursors_consistent(
    spools: Spools,
) -> None:
    """Advancing past a batch that was dropped meanwhile loses nothing newer."""
    size = accounted_bytes(reading(0))
    spool = spools.open(max_bytes=10 * size)
    spool.append(arrivals([reading(n) for n in range(5)]))
    taken = spool.pending("influx", 5)
    for n in range(5, 20):
        spool.append(arrivals([reading(n)]))

    spool.advance("influx", taken.last_id)
    oldest = held_rows(spools.path)[0][1] - T0
    spool = spools.reopen(spool, max_bytes=10 * size)

    assert oldest > 5
    assert received(spool.pending("influx", 100).readings) == list(range(oldest, 20))
    assert spool.backlog("influx") == (20 - oldest, T0 + oldest)
    assert spool.recovered == 20 - oldest


def test_backlog_counts_waiting_readings_and_the_oldest_receive_time(
    spools: Spools,
) -> None:
    """backlog is (readings not yet stored by the sink, receive time of the first)."""
    spool = spools.open()
    spool.append(arrivals([reading(n, received_ms=T0 + 1000 * n) for n in range(3)]))

    spool.advance("influx", 1)

    assert spool.backlog("influx") == (2, T0 + 1000)
    assert spool.backlog("csv") == (3, T0)


def test_wait_returns_as_soon_as_a_reading_is_appended(spools: Spools) -> None:
    """A sink worker waiting for work wakes on the next append, not the timeout."""
    spool = spools.open()
    woke = threading.Event()

    def waiter() -> None:
        spool.wait(30.0)
        woke.set()

    thread = threading.Thread(target=waiter)
    started = time.monotonic()
    thread.start()
    for n in range(20):
        spool.append(arrivals([reading(n)]))
        if woke.wait(0.5):
            break
    thread.join(30)

    assert woke.is_set()
    assert time.monotonic() - started < 15
