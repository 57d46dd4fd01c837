"""Telemetry through the OpenTelemetry SDK's in-memory readers: keepalive latency, lost sessions, failures."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from coordkit import OwnershipLostError, Session
from coordkit.testing import Harness

pytestmark = pytest.mark.anyio

_reader = InMemoryMetricReader()
_spans = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _sdk() -> None:
    # Global providers can be set once per process; coordkit's instruments bind to them lazily.
    metrics.set_meter_provider(MeterProvider(metric_readers=[_reader]))
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_spans))
    trace.set_tracer_provider(provider)


def _points(name: str) -> Iterator[tuple[dict[str, object], object]]:
    data = _reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            assert scope.scope.name == "coordkit"
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        yield dict(point.attributes or {}), point


async def test_keepalive_latency_and_lost_counter(harness: Harness) -> None:
    async with harness.client() as backend:
        async with Session(backend, ttl=2) as session:
            lease_hex = format(session.lease_id, "x")

            def refreshes() -> int:
                points = _points("coordkit.session.keepalive.latency")
                return sum(p.count for attrs, p in points if attrs["coordkit.lease_id"] == lease_hex)  # type: ignore[attr-defined]

            # Every ttl/3 (0.67 s): two are recorded within a second or so; a loaded machine may take longer.
            with anyio.fail_after(10):
                while refreshes() < 2:  # noqa: ASYNC110 - the meter has nothing to wait on
                    await anyio.sleep(0.1)
            assert dict(
                next(a for a, _ in _points("coordkit.session.keepalive.latency") if a["coordkit.lease_id"] == lease_hex)
            ) == {
                "coordkit.backend": backend.name,
                "coordkit.lease_id": lease_hex,
            }
            harness.suspend_keepalives(backend)
            with pytest.raises(OwnershipLostError):
                async with session.guarded():
                    await anyio.sleep_forever()
            harness.heal(backend)
        lost = [p for attrs, p in _points("coordkit.session.lost") if attrs["coordkit.lease_id"] == lease_hex]
        assert [p.value for p in lost] == [1]  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["memory"])
async def test_keepalive_failure_span(harness: Harness) -> None:
    async with harness.client() as backend, Session(backend, ttl=6) as session:
        backend.faults.fail_calls(1)  # type: ignore[attr-defined]
        await anyio.sleep(3)
        failures = [s for s in _spans.get_finished_spans() if s.name == "coordkit.session.keepalive"]
        assert failures, "a failed keepalive leaves a span"
        span = failures[-1]
        assert span.attributes is not None and span.attributes["coordkit.lease_id"] == format(session.lease_id, "x")
        assert any(event.name == "exception" for event in span.events)
        assert span.status.status_code is StatusCode.ERROR


@pytest.mark.parametrize("kind", ["memory"])
async def test_slow_keepalive_span(harness: Harness) -> None:
    """A keepalive that eats half the safety margin is reported, not only failures."""
    async with harness.client() as backend, Session(backend, ttl=10, safety_margin=1.0) as session:
        backend.faults.set_latency(0.6)  # type: ignore[attr-defined]
        await anyio.sleep(4)
        assert not session.lost
        slow = [
            s
            for s in _spans.get_finished_spans()
            if s.name == "coordkit.session.keepalive"
            and s.attributes is not None
            and s.attributes["coordkit.lease_id"] == format(session.lease_id, "x")
            and "coordkit.duration_s" in s.attributes
        ]
        assert slow, "a slow keepalive leaves a span"
        assert slow[0].attributes is not None and slow[0].attributes["coordkit.duration_s"] == pytest.approx(0.6)
