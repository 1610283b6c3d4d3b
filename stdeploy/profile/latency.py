"""Measured latency of a runnable in the units of a report: seconds per batch (median, p90, min),
samples and timesteps per second. The clock itself is :func:`stdeploy.timing.time_calls`."""

from __future__ import annotations

import time

import numpy as np

from ..timing import percentile, time_calls

__all__ = ["measure", "module_times", "percentile"]


def measure(run, x: np.ndarray, warmup: int = 3, repeats: int = 20, sync=None) -> dict:
    """Time ``run(x)`` (one batch ``(T, B, ...)``): ``warmup`` untimed calls, then ``repeats``
    timed ones; ``sync()`` (a GPU synchronisation) is called around each timed call."""
    t = time_calls(lambda: run(x), warmup, repeats, sync)
    T, B = x.shape[0], x.shape[1]
    return {"batch": int(B), "timesteps": int(T), "warmup": warmup, "repeats": repeats, "median_s": t.median_s,
            "p90_s": t.p90_s, "min_s": t.min_s, "samples_per_s": B / t.median_s, "timesteps_per_s": B * T / t.median_s}


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
