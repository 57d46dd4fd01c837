"""Measuring helpers shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping


def percentile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples``, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def interleaved(
    ops: Mapping[str, Callable[[], Awaitable[object]]], iterations: int, rounds: int = 20
) -> dict[str, list[float]]:
    """Time each op ``iterations`` times, alternating between ops in ``rounds`` rounds, after a warm-up.

    Alternating makes machine noise hit every op alike, so their ratios can be compared within one run.
    """
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for op in ops.values():  # warm up connections and code paths
        for _ in range(20):
            await op()
    per_round = max(1, iterations // rounds)
    for _ in range(rounds):
        for name, op in ops.items():
            for _ in range(per_round):
                start = time.perf_counter()
                await op()
                samples[name].append(time.perf_counter() - start)
    return samples
