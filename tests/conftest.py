"""Fixtures that start real services on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import Influxd1, Mosquitto, VictoriaMetrics


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh broker with persistence and generous queues."""
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    """A fresh VictoriaMetrics accepting the InfluxDB v2 write API."""
    vm = VictoriaMetrics(tmp_path)
    vm.start()
    yield vm
    vm.stop()


@pytest.fixture(scope="session")
def influxd1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influxd1]:
    """One influxd 1.x for the session; tests use databases of their own."""
    server = Influxd1(tmp_path_factory.mktemp("influxd"))
    server.start()
    yield server
    server.stop()
