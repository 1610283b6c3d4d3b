"""Measured GPU energy: sample the board power through NVML while a run executes and integrate it.

Only where an NVIDIA GPU and driver are present (``nvidia-ml-py`` provides ``pynvml``); elsewhere
:func:`nvml_available` says why not and nothing is measured (estimates from operation counts
remain). Energy is the trapezoidal integral of the power samples over the run's wall time.
"""

from __future__ import annotations

import threading
import time


def nvml_available() -> tuple[bool, str]:
    try:
        import pynvml
    except ImportError:
        return False, "pynvml missing: pip install nvidia-ml-py"
    try:
        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception as err:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return False, f"NVML unavailable: {err}"
    return (n > 0, f"{n} GPU(s)") if n else (False, "no GPU")


def integrate(samples: list[tuple[float, float]]) -> float:
    """Joules from ``(time s, power W)`` samples, trapezoidal rule."""
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(samples, samples[1:]))


class PowerSampler:
    """``with PowerSampler() as s: run()`` then ``s.joules``, ``s.mean_watts``, ``s.samples``."""

    def __init__(self, index: int = 0, interval_s: float = 0.005):
        self.index, self.interval_s = index, interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()

    def __enter__(self):
        import pynvml

        pynvml.nvmlInit()
        self._pynvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            watts = self._pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0  # milliwatts
            self.samples.append((time.perf_counter(), watts))
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._pynvml.nvmlShutdown()

    @property
    def joules(self) -> float:
        return integrate(self.samples)

    @property
    def mean_watts(self) -> float:
        span = self.samples[-1][0] - self.samples[0][0] if len(self.samples) > 1 else 0.0
        return self.joules / span if span else (self.samples[0][1] if self.samples else 0.0)


def measure_energy(run, x, repeats: int = 20, index: int = 0, min_seconds: float = 2.0, idle_seconds: float = 0.5) -> dict:
    """Run ``run(x)`` at least ``repeats`` times and for at least ``min_seconds`` under power
    sampling (NVML's power reading is an average over ~0.1 s: shorter windows mean nothing), after
    ``idle_seconds`` of sampling the idle board. ``run`` must return only when the GPU is done.

    Returns joules per sample for the whole board (``joules_per_sample``) and above the idle draw
    (``dynamic_joules_per_sample``), ``mean_watts``, ``idle_watts``, ``calls``, ``seconds``."""
    with PowerSampler(index) as idle:
        time.sleep(idle_seconds)
    calls = 0
    with PowerSampler(index) as s:
        t0 = time.perf_counter()
        while calls < repeats or time.perf_counter() - t0 < min_seconds:
            run(x)
            calls += 1
        seconds = time.perf_counter() - t0
    samples = calls * x.shape[1]
    idle_watts = idle.mean_watts
    return {"joules_per_sample": s.joules / samples, "dynamic_joules_per_sample": max(s.joules - idle_watts * seconds, 0.0) / samples,
            "mean_watts": s.mean_watts, "idle_watts": idle_watts, "calls": calls, "seconds": seconds,
            "power_samples": len(s.samples)}
