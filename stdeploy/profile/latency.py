"""Measured latency of a runnable: warm-up, timed repeats, median / p90, throughput."""

from __future__ import annotations

import statistics
import time

import numpy as np


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(run, x: np.ndarray, warmup: int = 3, repeats: int = 20, sync=None) -> dict:
    """Time ``run(x)`` (one batch ``(T, B, ...)``): ``warmup`` untimed calls, then ``repeats``
    timed ones; ``sync()`` (a GPU synchronisation) is called around each timed call."""
    if warmup < 0 or repeats < 1:
        from ..errors import ConfigError

        raise ConfigError(f"warmup must be >= 0 and repeats >= 1, got {warmup}, {repeats}")
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        run(x)
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    T, B = x.shape[0], x.shape[1]
    med = statistics.median(times)
    return {"batch": int(B), "timesteps": int(T), "warmup": warmup, "repeats": repeats, "median_s": med,
            "p90_s": percentile(times, 90), "min_s": min(times), "samples_per_s": B / med, "timesteps_per_s": B * T / med}
