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


def module_times(model, x, depth_names: tuple[str, ...] | None = None) -> list[dict]:
    """Per-module wall time of one PyTorch forward (forward pre/post hooks): the embedding, each
    block's attention and MLP, and the head by default. ``[{"name", "ms"}]`` in call order."""
    import torch

    names = depth_names or tuple(n for n, _ in model.named_modules()
                                 if n == "embed" or n == "head" or (n.startswith("blocks.") and n.count(".") == 2))
    mods = dict(model.named_modules())
    start: dict[str, float] = {}
    out: list[dict] = []
    hooks = []
    for n in names:
        m = mods[n]
        hooks.append(m.register_forward_pre_hook(lambda mod, args, n=n: start.__setitem__(n, time.perf_counter())))
        hooks.append(m.register_forward_hook(lambda mod, args, o, n=n: out.append({"name": n, "ms": (time.perf_counter() - start[n]) * 1e3})))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return out
