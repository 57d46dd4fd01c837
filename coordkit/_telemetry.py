"""The only module that imports OpenTelemetry.

coordkit depends on ``opentelemetry-api`` alone: with no SDK configured every span and instrument is a no-op.
Names follow one vocabulary across recipes (see the observability guide). Values, credentials and member
metadata never go into spans or metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import metrics, trace
from opentelemetry.trace import Span, Status, StatusCode

from ._version import __version__

tracer = trace.get_tracer("coordkit", __version__)
meter = metrics.get_meter("coordkit", __version__)

keepalive_latency = meter.create_histogram(
    "coordkit.session.keepalive.latency", unit="s", description="Round trip of one lease keepalive"
)
sessions_lost = meter.create_counter(
    "coordkit.session.lost",
    unit="{session}",
    description="Sessions whose lease validity ran out or whose lease vanished",
)
watch_resyncs = meter.create_counter(
    "coordkit.watch.resyncs", unit="{resync}", description="Full snapshots a watch took after compaction"
)
watch_lag = meter.create_histogram(
    "coordkit.watch.lag", unit="s", description="Commit to delivery delay of watch events, where measurable"
)
config_decode_errors = meter.create_counter(
    "coordkit.config.decode_errors", unit="{value}", description="Published config values a view could not decode"
)
lock_wait = meter.create_histogram("coordkit.lock.wait", unit="s", description="Time from acquire call to holding")
lock_hold = meter.create_histogram("coordkit.lock.hold", unit="s", description="Time a lock was held")
election_transitions = meter.create_counter(
    "coordkit.election.transitions", unit="{transition}", description="Leadership gained or lost"
)


def attributes(*, backend: str, lease_id: int | None = None, name: str | None = None) -> dict[str, str | int]:
    """The standard attribute set. Lease ids are rendered in hex, as they appear in keys."""
    attrs: dict[str, str | int] = {"coordkit.backend": backend}
    if lease_id is not None:
        attrs["coordkit.lease_id"] = format(lease_id, "x")
    if name is not None:
        attrs["coordkit.name"] = name
    return attrs


def record_failure(name: str, attrs: dict[str, str | int], exc: BaseException) -> None:
    """A zero-length span for a failure that was handled (a retried keepalive): the exception, status ERROR."""
    with tracer.start_as_current_span(name, attributes=attrs) as s:
        s.record_exception(exc)
        s.set_status(Status(StatusCode.ERROR, type(exc).__name__))


def record_slow(name: str, attrs: dict[str, str | int], seconds: float) -> None:
    """A span for an operation that succeeded but took long enough to endanger a guarantee."""
    with tracer.start_as_current_span(name, attributes={**attrs, "coordkit.duration_s": seconds}):
        pass


@contextmanager
def span(name: str, attrs: dict[str, str | int]) -> Iterator[Span]:
    """A span named ``coordkit.<recipe>.<operation>``; a coordkit error ending it is recorded on it.

    Cancellation is not an error: it passes through unrecorded.
    """
    with tracer.start_as_current_span(
        name, attributes=attrs, record_exception=False, set_status_on_exception=False
    ) as s:
        try:
            yield s
        except Exception as exc:
            s.record_exception(exc)
            s.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
