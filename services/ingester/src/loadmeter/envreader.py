"""Read typed settings from the environment, collecting every problem at once.

Each ``EnvReader`` call returns a usable value even when the variable is bad
(the default), records the problem, and remembers what it read so the
effective configuration can be shown with secrets redacted.
"""

from __future__ import annotations

import builtins
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

REDACTED = "<redacted>"


@dataclass(frozen=True, slots=True)
class Entry:
    """One variable as the configuration understood it."""

    name: str
    shown: str
    source: str


class EnvReader:
    """Typed, validating access to a mapping of environment variables."""

    def __init__(
        self, environ: Mapping[builtins.str, builtins.str] | None = None
    ) -> None:
        self._env = dict(os.environ if environ is None else environ)
        self.problems: list[str] = []
        self.entries: list[Entry] = []

    def _raw(self, name: builtins.str) -> builtins.str | None:
        value = self._env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def _note(
        self, name: builtins.str, value: object, raw: builtins.str | None
    ) -> None:
        source = "env" if raw is not None else "default"
        self.entries.append(Entry(name, "" if value is None else str(value), source))

    def problem(
        self, name: builtins.str, value: builtins.str, expected: builtins.str
    ) -> None:
        """Record that ``name`` holds ``value`` where ``expected`` was wanted."""
        self.problems.append(f"{name}={value!r}: expected {expected}")

    def str(
        self, name: builtins.str, default: builtins.str | None = None
    ) -> builtins.str | None:
        """A plain string, or ``default`` when unset or blank."""
        raw = self._raw(name)
        value = raw if raw is not None else default
        self._note(name, value, raw)
        return value

    def choice(
        self,
        name: builtins.str,
        default: builtins.str,
        choices: tuple[builtins.str, ...],
    ) -> builtins.str:
        """One of ``choices``, compared case-insensitively."""
        raw = self._raw(name)
        value = default if raw is None else raw.lower()
        if value not in choices:
            self.problem(name, raw or "", "one of " + ", ".join(choices))
            value = default
        self._note(name, value, raw)
        return value

    def int(
        self,
        name: builtins.str,
        default: builtins.int,
        low: builtins.int,
        high: builtins.int,
    ) -> builtins.int:
        """A whole number within ``low``..``high`` inclusive."""
        raw = self._raw(name)
        value = default
        if raw is not None:
            try:
                value = int(raw, 10)
            except ValueError:
                self.problem(name, raw, f"a whole number from {low} to {high}")
            else:
                if not low <= value <= high:
                    self.problem(name, raw, f"a whole number from {low} to {high}")
                    value = default
        self._note(name, value, raw)
        return value

    def float(
        self,
        name: builtins.str,
        default: builtins.float,
        low: builtins.float,
        high: builtins.float,
    ) -> builtins.float:
        """A finite number within ``low``..``high`` inclusive."""
        raw = self._raw(name)
        value = default
        if raw is not None:
            try:
                parsed = float(raw)
            except ValueError:
                parsed = math.nan
            if math.isfinite(parsed) and low <= parsed <= high:
                value = parsed
            else:
                self.problem(name, raw, f"a number from {low:g} to {high:g}")
        self._note(name, value, raw)
        return value

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        """true/false, yes/no, on/off or 1/0."""
        raw = self._raw(name)
        value = default
        if raw is not None:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                value = True
            elif lowered in ("0", "false", "no", "off"):
                value = False
            else:
                self.problem(name, raw, "true or false")
        self._note(name, value, raw)
        return value

    def path(
        self, name: builtins.str, must_exist: builtins.bool = False
    ) -> Path | None:
        """A filesystem path; with ``must_exist`` it has to be a readable file."""
        raw = self._raw(name)
        value = Path(raw) if raw is not None else None
        if value is not None and must_exist and not value.is_file():
            self.problem(name, raw or "", "the path of an existing file")
        self._note(name, value, raw)
        return value

    def hint(self, name: builtins.str) -> builtins.str | None:
        """A value set by the platform (not a setting): read, never shown."""
        return self._raw(name)

    def path_or(self, name: builtins.str, default: Path) -> Path:
        """A filesystem path, ``default`` when unset; shown as the path in use."""
        raw = self._raw(name)
        value = Path(raw) if raw is not None else default
        self._note(name, value, raw)
        return value

    def secret(
        self, name: builtins.str, required: builtins.bool = False
    ) -> builtins.str | None:
        """A secret from ``name`` or from the file named by ``name_FILE``.

        The value itself is never recorded; only whether it is set.
        """
        raw = self._raw(name)
        file_var = f"{name}_FILE"
        file_name = self._raw(file_var)
        value, source = raw, "env" if raw else "default"
        if file_name is not None:
            value, source = self._read_secret_file(file_var, file_name), "file"
            self.entries.append(Entry(file_var, file_name, "env"))
        if file_name is None and value is None and required:
            self.problems.append(f"{name} is not set: expected it, or {file_var}")
        shown = REDACTED if value else ""
        self.entries.append(Entry(name, shown, source))
        return value

    def _read_secret_file(
        self, file_var: builtins.str, file_name: builtins.str
    ) -> builtins.str | None:
        try:
            text = Path(file_name).read_text(encoding="utf-8").strip()
        except OSError as exc:
            self.problem(file_var, file_name, f"a readable file ({exc.strerror})")
            return None
        if not text:
            self.problem(file_var, file_name, "a file holding the secret, not empty")
            return None
        return text

    def raise_if_problems(self) -> None:
        """Raise ``ConfigError`` listing every problem recorded so far."""
        if self.problems:
            raise ConfigError(list(self.problems))
