"""Receive times identify points: each node's are strictly increasing, for good."""

from __future__ import annotations

from pathlib import Path

from loadmeter.dispatcher import NodeClock
from loadmeter.model import Reading
from loadmeter.spool import Arrival, Spool


def open_spool(path: Path) -> Spool:
    """A spool with one sink and a day's dedup window."""
    return Spool(path, ["influx"], 1 << 24, 86_400, on_drop=lambda count: None)


def test_readings_of_one_node_in_one_millisecond_get_distinct_times() -> None:
    """A burst in one millisecond is spread over the following ones, in order."""
    clock = NodeClock()

    stamps = [clock.stamp("n1", 1000) for _ in range(4)]

    assert stamps == [1000, 1001, 1002, 1003]


def test_nodes_keep_their_own_clocks() -> None:
    """Another node's burst never moves this node's times."""
    clock = NodeClock()

    clock.stamp("n1", 1000)
    clock.stamp("n1", 1000)

    assert clock.stamp("n2", 1000) == 1000


def test_a_clock_that_steps_back_never_reuses_a_time() -> None:
    """A wall clock set back still gives each reading a later time than the last."""
    clock = NodeClock()

    clock.stamp("n1", 5000)

    assert clock.stamp("n1", 4000) == 5001


def test_the_node_table_is_bounded() -> None:
    """Past its size the table starts afresh instead of growing."""
    clock = NodeClock(max_nodes=3)

    for node in ("a", "b", "c", "d"):
        clock.stamp(node, 1000)

    assert len(clock._last) <= 3


def test_a_restart_continues_after_the_last_stored_time(tmp_path: Path) -> None:
    """After a restart the first time handed out is past every stored one."""
    path = tmp_path / "spool.db"
    spool = open_spool(path)
    burst_end = 10_000 + 5000
    spool.append([Arrival(Reading("n1", burst_end, {"ct1_irms": 1.0}, 1, 2))])
    spool.close()

    reopened = open_spool(path)
    clock = NodeClock(reopened.last_received())
    reopened.close()

    assert clock.stamp("n1", 10_500) == burst_end + 1
    assert clock.stamp("n2", 10_500) == 10_500
