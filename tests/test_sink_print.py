"""The print sink: one readable, stably ordered line per reading."""

from __future__ import annotations

import datetime as dt
import io
import os

import pytest
from loadmeter.config import read_settings
from loadmeter.envreader import EnvReader
from loadmeter.errors import PermanentSinkError, TransientSinkError
from loadmeter.model import Reading
from loadmeter.sinks import sink_class
from loadmeter.sinks.printer import PrintSink

AT = dt.datetime(2026, 12, 3, 10, 0, 0, 123000, tzinfo=dt.UTC)
AT_MS = int(AT.timestamp() * 1000)


def print_sink(**env: str) -> PrintSink:
    """A print sink built from environment variables the way the service does."""
    return PrintSink.from_env(EnvReader(env), read_settings(EnvReader(env)))


def test_registry_names_the_print_sink() -> None:
    """The registry entry "print" resolves to PrintSink."""
    assert sink_class("print") is PrintSink


def test_full_reading_prints_channels_voltage_and_clocks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A complete reading prints as one line with units and device clocks."""
    fields = {"ct1_irms": 1.234, "ct1_apparpower": 283.82, "ct1_power": -251.002}
    reading = Reading("node_main", AT_MS, {**fields, "vrms": 230.0}, 1764756000, 5123)

    print_sink().write([reading])

    assert capsys.readouterr().out == (
        "2026-12-03T10:00:00.123Z node_main | ct1 1.234 A 283.820 VA -251.002 W"
        " | 230.000 V | epoch=1764756000 t_ms=5123\n"
    )


def test_missing_values_and_clocks_are_left_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Only values the node sent appear; no clocks means no clock group."""
    reading = Reading("garage", AT_MS, {"ct2_irms": 0.5, "ct2_apparpower": 115.0})

    print_sink().write([reading])

    assert capsys.readouterr().out == (
        "2026-12-03T10:00:00.123Z garage | ct2 0.500 A 115.000 VA\n"
    )


def test_channels_print_in_max_ct_order_whatever_the_payload_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Channels and kinds follow the model's order, not the dict's, up to MAX_CT."""
    fields = {"vrms": 231.5, "ct3_power": 3.0, "ct2_irms": 2.0, "ct1_irms": 1.0}
    reading = Reading("n", AT_MS, fields, t_ms=7)

    print_sink(MAX_CT="2").write([reading])

    assert capsys.readouterr().out == (
        "2026-12-03T10:00:00.123Z n | ct1 1.000 A | ct2 2.000 A | 231.500 V | t_ms=7\n"
    )


def test_batch_prints_one_line_per_reading_and_empty_batch_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each reading of a batch gets its own line, in batch order."""
    sink = print_sink()
    batch = [Reading(f"node{i}", AT_MS + i, {"ct1_irms": float(i)}) for i in range(3)]

    sink.write(batch)
    sink.write([])

    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["node0", "node1", "node2"]
    assert lines[2].startswith("2026-12-03T10:00:00.125Z")


def test_closed_pipe_raises_a_transient_error() -> None:
    """Output to a pipe nobody reads fails as a retryable sink error."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = os.fdopen(write_end, "w")
    sink = PrintSink(max_ct=2, stream=stream)

    with pytest.raises(TransientSinkError) as caught:
        sink.write([Reading("n", AT_MS, {"ct1_irms": 1.0})])

    assert isinstance(caught.value.__cause__, BrokenPipeError)
    with pytest.raises(BrokenPipeError):
        stream.close()


def test_unencodable_node_raises_a_permanent_error() -> None:
    """A node name the output encoding cannot show fails the batch for good."""
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    sink = PrintSink(max_ct=2, stream=stream)

    with pytest.raises(PermanentSinkError):
        sink.write([Reading("küche", AT_MS, {"ct1_irms": 1.0})])

    assert stream.buffer.getvalue() == b""
