"""One small protocol for every runtime, and a registry keyed by name.

A target compiles an *export directory* (``model.nir``, ``model.onnx``, ``model.step.onnx``,
``manifest.json``) for a device profile into a :class:`Runnable`, which runs batches of inputs
``(T, B, C, H, W)`` and returns logits and output spikes in the PyTorch layout ``(T, B, N, D)``.
Targets read export directories, never PyTorch modules; heavy SDKs are imported inside each
target's module, so listing targets imports none of them.
"""

from __future__ import annotations

import importlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import ConfigError, StdeployError
from .profiles import DeviceProfile


class TargetError(StdeployError):
    """A target cannot compile or run an artifact (missing SDK, broken export, runtime failure)."""


@dataclass
class RunResult:
    logits: np.ndarray                 # (B, classes)
    spikes: np.ndarray | None          # (T, B, N, D) output spikes, where the runtime exposes them
    seconds: float                     # wall time of the run call
    info: dict = field(default_factory=dict)


@runtime_checkable
class Runnable(Protocol):
    info: dict

    def run(self, x: np.ndarray) -> RunResult: ...


@runtime_checkable
class Target(Protocol):
    name: str
    tolerance: dict                    # what "agrees with PyTorch" means here (spike mismatches, logits atol)

    def available(self) -> tuple[bool, str]: ...

    def compile(self, export_dir: Path, profile: DeviceProfile, **options) -> Runnable: ...


# name -> "module:Class"; imported on first use only.
REGISTRY: dict[str, str] = {
    "onnxruntime": "stdeploy.targets.onnxruntime:OnnxRuntimeTarget",
    "tvm": "stdeploy.targets.tvm.target:TVMTarget",
    "lava": "stdeploy.targets.lava.target:LavaTarget",
}


def target_names() -> list[str]:
    return list(REGISTRY)


def get_target(name: str) -> Target:
    if name not in REGISTRY:
        raise ConfigError(f"unknown target {name!r}; known targets: {', '.join(REGISTRY)}")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def read_manifest(export_dir: str | Path, needs: str) -> tuple[Path, dict]:
    """Check an export directory and return ``(path of the artifact 'needs', manifest)``: the path
    resolves inside the directory and the file's size and sha256 match the manifest
    (:mod:`stdeploy.export.manifest`)."""
    from ..export.manifest import read_manifest as sealed
    return sealed(export_dir, needs, error=TargetError)


def median_time(fn, repeats: int = 3) -> float:
    """Median seconds of ``repeats`` calls of ``fn()`` after one warm-up call (which compiles
    lazily where a runtime does)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
