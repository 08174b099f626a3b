"""The normalised reading every sink receives."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

MEASUREMENT_KINDS = ("irms", "apparpower", "power")


@dataclass(frozen=True, slots=True)
class Reading:
    """One validated reading from one node.

    ``received_ms`` is the receive time on this machine, UTC, in milliseconds
    since the Unix epoch. ``fields`` holds only finite floats, keyed by the
    firmware's names (``ct1_irms``, ``vrms`` ...). ``epoch`` and ``t_ms`` are
    the device's own clocks, absent when the node did not send them.
    """

    node: str
    received_ms: int
    fields: Mapping[str, float]
    epoch: int | None = None
    t_ms: int | None = None

    @property
    def received_at(self) -> dt.datetime:
        """The receive time as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self.received_ms / 1000, tz=dt.UTC)

    def received_iso(self) -> str:
        """The receive time as ISO 8601 UTC with milliseconds, ``Z`` suffix."""
        return self.received_at.isoformat(timespec="milliseconds")[:-6] + "Z"


def channel_fields(max_ct: int) -> list[str]:
    """Measurement field names for ct1..ct``max_ct`` then ``vrms``, in order."""
    names = [
        f"ct{i}_{kind}" for i in range(1, max_ct + 1) for kind in MEASUREMENT_KINDS
    ]
    return [*names, "vrms"]
