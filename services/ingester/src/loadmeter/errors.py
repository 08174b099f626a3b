"""The error tree: every error loadmeter raises on purpose derives from one base."""

from __future__ import annotations


class LoadmeterError(Exception):
    """Base of all errors raised by loadmeter itself."""


class ConfigError(LoadmeterError):
    """The environment does not describe a valid configuration.

    ``problems`` holds one line per problem, each naming the variable, the
    value it got and the form it wants.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class SinkError(LoadmeterError):
    """A sink could not store a batch."""

    kind = "permanent"


class TransientSinkError(SinkError):
    """Worth retrying: the backend is unreachable, overloaded or slow.

    ``retry_after`` is the delay in seconds the backend asked for, if any.
    """

    kind = "transient"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentSinkError(SinkError):
    """Retrying the same batch cannot succeed: bad request, auth, size.

    ``status`` is the HTTP status when the backend speaks HTTP.
    """

    kind = "permanent"

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
