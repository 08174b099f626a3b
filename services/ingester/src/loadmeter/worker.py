"""One thread per sink: takes batches from the spool, writes, retries.

Transient failures are retried with capped exponential backoff and jitter,
honouring the backend's Retry-After, for as long as they last: the readings
wait in the spool. A sink that refuses access (401, 403, 404) keeps its
readings, is reported not ready and is retried slowly. A batch refused as
invalid is split until the bad readings are isolated; those go to the dead
letter and the rest are stored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import structlog
import tenacity

from .deadletter import DeadLetter
from .errors import PermanentSinkError, SinkError, TransientSinkError
from .logs import RateLimiter
from .metrics import Metrics
from .model import Reading
from .sinks import Sink
from .spool import Spool, now_ms

log = structlog.get_logger(__name__)

BLOCKING_STATUSES = frozenset({401, 403, 404})
MAX_BACKOFF = 30.0


class SinkBlockedError(SinkError):
    """The sink refuses access; retry until it is fixed, keep the data."""

    kind = "permanent"


def _wait_strategy() -> Callable[[tenacity.RetryCallState], float]:
    backoff = tenacity.wait_exponential(
        multiplier=0.5, max=MAX_BACKOFF
    ) + tenacity.wait_random(0, 1)

    def wait(state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        asked = getattr(error, "retry_after", None) or 0.0
        return max(float(asked), backoff(state))

    return wait


class SinkWorker(threading.Thread):
    """Moves readings from the spool into one sink."""

    def __init__(
        self,
        sink: Sink,
        spool: Spool,
        metrics: Metrics,
        deadletter: DeadLetter,
        batch_max: int,
        flush_interval: float,
    ) -> None:
        super().__init__(name=f"sink-{sink.name}", daemon=True)
        self.sink = sink
        self.spool = spool
        self.metrics = metrics
        self.deadletter = deadletter
        self.batch_max = batch_max
        self.flush_ms = int(flush_interval * 1000)
        self.stopping = threading.Event()
        self.ready = True
        self.heartbeat = time.monotonic()
        self._limiter = RateLimiter(period=60.0)

    def run(self) -> None:
        """Deliver until asked to stop, then make one last attempt."""
        self._open_sink()
        while not self._step():
            self.heartbeat = time.monotonic()
        self._close_sink()

    def _step(self) -> bool:
        """Deliver one batch when due; True when the worker is finished.

        A batch is due when it is full, when its oldest reading has waited a
        flush interval, or when the worker is stopping. The cheap backlog
        check comes first so that waking on every append costs no read.
        """
        waiting, age_ms = self._report_backlog()
        if waiting == 0:
            if self.stopping.is_set():
                return True
            self.spool.wait(self.flush_ms / 1000)
            return False
        due = waiting >= self.batch_max or age_ms >= self.flush_ms
        if not due and not self.stopping.is_set():
            self.spool.wait(min(self.flush_ms, self.flush_ms - age_ms) / 1000)
            return False
        batch = self.spool.pending(self.sink.name, self.batch_max)
        if not self._deliver(batch.readings):
            return True
        self.spool.advance(self.sink.name, batch.last_id)
        return False

    def _report_backlog(self) -> tuple[int, int]:
        """Export and return (readings waiting, age of the oldest in ms)."""
        waiting, oldest = self.spool.backlog(self.sink.name)
        age_ms = 0 if oldest is None else now_ms() - oldest
        self.metrics.spool_readings.labels(self.sink.name).set(waiting)
        self.metrics.spool_oldest_age.labels(self.sink.name).set(max(0, age_ms) / 1000)
        return waiting, age_ms

    def _deliver(self, readings: Sequence[Reading]) -> bool:
        """Store the readings, isolating refused ones; False if stopped first."""
        try:
            self._write_with_retries(readings)
        except tenacity.RetryError:
            return False
        except PermanentSinkError as exc:
            if len(readings) == 1:
                self._dead_letter(readings[0], exc)
                return True
            middle = len(readings) // 2
            return self._deliver(readings[:middle]) and self._deliver(readings[middle:])
        return True

    def _write_with_retries(self, readings: Sequence[Reading]) -> None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(
                (TransientSinkError, SinkBlockedError)
            ),
            wait=_wait_strategy(),
            stop=self._stop_when_stopping,
            sleep=self._sleep,
            before_sleep=self._log_retry,
        )
        retrying(self._write_once, readings)

    def _stop_when_stopping(self, state: tenacity.RetryCallState) -> bool:
        return self.stopping.is_set()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            # The backlog keeps growing while a write is retried: keep it visible.
            self._report_backlog()
            self.stopping.wait(min(left, 1.0))
            self.heartbeat = time.monotonic()

    def _write_once(self, readings: Sequence[Reading]) -> None:
        name = self.sink.name
        started = time.perf_counter()
        try:
            self.sink.write(readings)
        except SinkError as exc:
            self._count_failure(exc)
            if isinstance(exc, PermanentSinkError) and exc.status in BLOCKING_STATUSES:
                raise SinkBlockedError(str(exc)) from exc
            raise
        except Exception as exc:
            self._count_failure(exc)
            raise PermanentSinkError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.metrics.write_duration.labels(name).observe(
                time.perf_counter() - started
            )
        self.metrics.points_written.labels(name).inc(len(readings))
        self._set_ready(True)

    def _count_failure(self, exc: Exception) -> None:
        kind = exc.kind if isinstance(exc, SinkError) else "permanent"
        self.metrics.write_errors.labels(self.sink.name, kind).inc()

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.metrics.sink_ready.labels(self.sink.name).set(1 if ready else 0)

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        blocked = isinstance(error, SinkBlockedError)
        if blocked or state.attempt_number >= 3:
            self._set_ready(False)
        held = self._limiter.allow("retry", type(error).__name__)
        if held is None:
            return
        emit = log.error if blocked else log.warning
        emit(
            "sink_write_failed",
            sink=self.sink.name,
            error=str(error),
            attempt=state.attempt_number,
            retry_in=round(state.upcoming_sleep, 2),
            suppressed=held,
        )

    def _dead_letter(self, reading: Reading, exc: PermanentSinkError) -> None:
        self.deadletter.record(
            "sink_refused",
            sink=self.sink.name,
            status=exc.status,
            message=str(exc),
            node=reading.node,
            received_ms=reading.received_ms,
            epoch=reading.epoch,
            t_ms=reading.t_ms,
            fields=dict(reading.fields),
        )
        self.deadletter.sync()
        self.metrics.deadletter_records.labels("sink_refused").inc()
        log.error(
            "reading_refused_by_sink",
            sink=self.sink.name,
            node=reading.node,
            status=exc.status,
            error=str(exc),
        )

    def _open_sink(self) -> None:
        while True:
            try:
                self.sink.open()
            except Exception as exc:  # noqa: BLE001 - retried, and reported as not ready
                self._set_ready(False)
                log.error("sink_open_failed", sink=self.sink.name, error=str(exc))
                self._sleep(5.0)
                if self.stopping.is_set():
                    return
            else:
                return

    def _close_sink(self) -> None:
        try:
            self.sink.close()
        except Exception as exc:  # noqa: BLE001 - shutdown goes on for the other sinks
            log.error("sink_close_failed", sink=self.sink.name, error=str(exc))
        waiting, _ = self.spool.backlog(self.sink.name)
        if waiting:
            log.warning(
                "sink_stopped_with_backlog", sink=self.sink.name, waiting=waiting
            )
