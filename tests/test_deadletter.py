"""The dead-letter files: records, rotation, repair and replacement."""

from __future__ import annotations

import os
from pathlib import Path

from loadmeter.deadletter import FILE_NAME, DeadLetter, read_records


def test_records_come_back_in_order_with_their_fields(tmp_path: Path) -> None:
    """Each record is one JSON line with its reason, time and fields."""
    letters = DeadLetter(tmp_path, max_bytes=1 << 20)

    letters.record("invalid_json", topic="t/1", payload="x")
    letters.record("sink_refused", sink="influx", status=400)
    letters.close()

    records = list(read_records(tmp_path))
    assert [r["reason"] for r in records] == ["invalid_json", "sink_refused"]
    assert records[0]["topic"] == "t/1"
    assert records[1]["status"] == 400
    assert all(r["time"].endswith("+00:00") for r in records)


def test_rotation_keeps_the_newest_within_the_cap(tmp_path: Path) -> None:
    """Past the cap the oldest file goes; what remains reads oldest first."""
    letters = DeadLetter(tmp_path, max_bytes=50_000, files=5)

    for index in range(2000):
        letters.record("bad_node", index=index, padding="p" * 40)
    letters.close()

    kept = [r["index"] for r in read_records(tmp_path)]
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert kept == sorted(kept)
    assert kept[-1] == 1999
    assert total <= 50_000 + 200
    assert len(list(tmp_path.glob(f"{FILE_NAME}*"))) == 5


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    """After a crash mid-line, the next record still starts on a line of its own."""
    (tmp_path / FILE_NAME).write_text('{"reason": "too_large"}\n{"reason": "bad')
    letters = DeadLetter(tmp_path, max_bytes=1 << 20)

    letters.record("not_object", topic="t")
    letters.close()

    lines = (tmp_path / FILE_NAME).read_text().splitlines()
    assert lines[1] == '{"reason": "bad'
    assert '"not_object"' in lines[2]


def test_records_follow_a_file_replaced_on_disk(tmp_path: Path) -> None:
    """When redrive rewrites the file, later records land in the new file."""
    letters = DeadLetter(tmp_path, max_bytes=1 << 20)
    letters.record("invalid_json", n=1)
    replacement = tmp_path / "rewritten"
    replacement.write_text('{"reason": "kept", "time": "t"}\n')
    os.replace(replacement, tmp_path / FILE_NAME)

    letters.record("invalid_json", n=2)
    letters.close()

    assert [r.get("n") for r in read_records(tmp_path)] == [None, 2]
