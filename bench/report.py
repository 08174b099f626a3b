"""Figures as they are measured: a printed table and a JSON file."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured number with its unit and what it was measured on."""

    section: str
    name: str
    value: float
    unit: str
    note: str = ""

    def shown(self) -> str:
        """The value rounded for reading: three significant figures or more."""
        magnitude = abs(self.value)
        if magnitude >= 100 or self.value == int(self.value):
            return f"{self.value:,.0f}"
        if magnitude >= 10:
            return f"{self.value:,.1f}"
        return f"{self.value:,.2f}" if magnitude >= 0.1 else f"{self.value:.3g}"


@dataclass(slots=True)
class Report:
    """Collects figures, section failures and the conditions of the run."""

    context: dict[str, Any] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    out: TextIO = sys.stdout

    def add(
        self, section: str, name: str, value: float, unit: str, note: str = ""
    ) -> Figure:
        """Record a figure and print it at once, so a long run shows progress."""
        figure = Figure(section, name, float(value), unit, note)
        self.figures.append(figure)
        print(f"  {_row(figure)}", file=self.out, flush=True)
        return figure

    def fail(self, section: str, reason: str) -> None:
        """Record that a section could not finish, and why."""
        self.failures[section] = reason
        print(f"  FAILED {section}: {reason}", file=self.out, flush=True)

    def print_table(self) -> None:
        """Every figure, grouped by section, in aligned columns."""
        print("\nloadmeter benchmark results", file=self.out)
        for key, value in self.context.items():
            print(f"  {key}: {value}", file=self.out)
        section = None
        for figure in self.figures:
            if figure.section != section:
                section = figure.section
                print(f"\n{section}", file=self.out)
            print(f"  {_row(figure)}", file=self.out)
        for name, reason in self.failures.items():
            print(f"\n{name}\n  FAILED: {reason}", file=self.out)
        self.out.flush()

    def write(self, path: Path) -> None:
        """The whole report as JSON at ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "context": self.context,
            "figures": [asdict(f) for f in self.figures],
            "failures": self.failures,
        }
        path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _row(figure: Figure) -> str:
    note = f"  ({figure.note})" if figure.note else ""
    return f"{figure.name:<52} {figure.shown():>12} {figure.unit:<14}{note}"
