"""Timing shared by the benchmarks: the systems compared take turns, one call each per round, so that a change
in the machine's load falls on all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(fns: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, list[float]]:
    """Seconds of each call of each function, ``reps`` rounds after ``warmup`` untimed ones."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def medians(fns: dict[str, Callable[[], object]], warmup: int, reps: int) -> dict[str, float]:
    """The median seconds of each function under :func:`alternate`."""
    return {k: statistics.median(v) for k, v in alternate(fns, warmup, reps).items()}
