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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from ..errors import ConfigError, StdeployError
from ..tolerance import Tolerance
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
    """A compiled model. It may also carry ``can_run: bool`` (False: built for a device this
    machine lacks, e.g. a CUDA module built without a GPU); without it, it can run."""

    info: dict

    def run(self, x: np.ndarray) -> RunResult: ...


@runtime_checkable
class Target(Protocol):
    """``available()`` says whether it can run here (SDK importable) and why; ``default_device``
    names the device profile ``run``/``bench``/``profile`` use without ``--device``; ``tolerance``
    is the one rule its results are judged by (:class:`stdeploy.tolerance.Tolerance`, or a mapping
    of its fields, read through :func:`target_tolerance`)."""

    name: str
    default_device: str                # device profile name
    tolerance: Tolerance | Mapping     # what "agrees with PyTorch" means here

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


def target_tolerance(target: Target) -> Tolerance:
    """The target's declared tolerance as a :class:`~stdeploy.tolerance.Tolerance` record."""
    return Tolerance.coerce(target.tolerance)


def read_manifest(export_dir: str | Path, needs: str) -> tuple[Path, dict]:
    """Check an export directory and return ``(path of the artifact 'needs', manifest)``: the path
    resolves inside the directory and the file's size and sha256 match the manifest
    (:mod:`stdeploy.export.manifest`)."""
    from ..export.manifest import read_manifest as sealed
    return sealed(export_dir, needs, error=TargetError)

