"""The one timer: wall time of a call, warm-up then timed repeats, median / p90.

Torch-free (standard library and numpy only), so targets, the profiler and the benchmarks share it.
Every figure is in seconds of ``time.perf_counter``. Candidates that are compared with each other
(:func:`time_candidates`) are timed with one statistic, the median, interleaved round by round. Where a call only *launches* work on an
accelerator (CUDA), pass ``sync`` (e.g. ``torch.cuda.synchronize``): it runs before the clock
starts and before it stops, so a timed call ends when the device is done.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from .errors import ConfigError

__all__ = ["Timer", "Timing", "median_time", "percentile", "time_calls", "time_candidates", "cpu_model", "describe_machine"]


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


def time_candidates(fns: dict[str, Callable[[], object]], warmup: int = 2, repeats: int = 7) -> dict[str, Timing]:
    """One :class:`Timing` per candidate, every one by the same rule, for choosing between them:
    each candidate is called ``warmup`` times untimed, then ``repeats`` rounds each call every
    candidate once, in turn (so a busy spell of the machine hits all of them alike). Compare the
    ``median_s`` of the results: the statistic is the same for every candidate."""
    if not fns:
        raise ConfigError("time_candidates needs at least one candidate")
    if not isinstance(warmup, int) or not isinstance(repeats, int) or warmup < 0 or repeats < 1:
        raise ConfigError(f"warmup must be >= 0 and repeats >= 1, got {warmup}, {repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(warmup=warmup, repeats=repeats, median_s=statistics.median(ts), p90_s=percentile(ts, 90),
                         min_s=min(ts)) for name, ts in times.items()}


def cpu_model() -> str:
    """This machine's CPU model as /proc/cpuinfo names it (``model name``), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_machine() -> str:
    """``"<CPU model>, <n> logical cores"``: the machine a figure was measured on, as every
    benchmark's report states it."""
    return f"{cpu_model()}, {os.cpu_count()} logical cores"
