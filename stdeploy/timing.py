"""The one timer: wall time of a call, warm-up then timed repeats, median / p90.

Torch-free (standard library and numpy only), so targets, the profiler and the benchmarks share it.
Every figure is in seconds of ``time.perf_counter``. Where a call only *launches* work on an
accelerator (CUDA), pass ``sync`` (e.g. ``torch.cuda.synchronize``): it runs before the clock
starts and before it stops, so a timed call ends when the device is done.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from .errors import ConfigError

__all__ = ["Timer", "Timing", "median_time", "percentile", "time_calls"]


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall time of the block)."""

    seconds: float

    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100, linear interpolation) of ``values``."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed calls that followed ``warmup`` untimed ones."""

    warmup: int
    repeats: int
    median_s: float
    p90_s: float
    min_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def time_calls(fn: Callable[[], object], warmup: int = 3, repeats: int = 20, sync: Callable[[], object] | None = None) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed (lazy compilation, caches), then ``repeats`` times
    timed; ``sync()``, where given, runs around each timed call."""
    if not isinstance(warmup, int) or not isinstance(repeats, int) or warmup < 0 or repeats < 1:
        raise ConfigError(f"warmup must be >= 0 and repeats >= 1, got {warmup}, {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return Timing(warmup=warmup, repeats=repeats, median_s=statistics.median(times), p90_s=percentile(times, 90),
                  min_s=min(times))


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls."""
    return time_calls(fn, warmup, repeats).median_s
