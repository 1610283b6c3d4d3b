"""onnxruntime: the unrolled ONNX graph on the CPU execution provider (``cpu`` profiles) or CUDA's
(``cuda`` profiles). No silent fallback: a GPU profile on an onnxruntime without the CUDA
execution provider, or a Loihi (``lava``) profile, is refused with the reason, and the run's info
names the providers the session actually uses (``providers``; ``provider``: the first of them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..tolerance import ONNXRUNTIME
from ..timing import Timer
from .base import RunResult, TargetError, read_manifest
from .profiles import DeviceProfile


def _ort():
    try:
        import onnxruntime
    except ImportError as err:  # a core dependency, but keep the hint uniform
        raise ImportError("the onnxruntime target needs onnxruntime: pip install 'onnxruntime==1.32.0'") from err
    return onnxruntime


class OnnxRuntimeRunnable:
    def __init__(self, path: Path, providers: list[str], threads: int | None):
        ort = _ort()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise TargetError(f"{path}: onnxruntime cannot load it: {err}") from err
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.input_name = self.session.get_inputs()[0].name
        used = self.session.get_providers()
        if used[0] != providers[0]:  # onnxruntime may drop a provider it cannot initialise
            raise TargetError(f"{path}: asked onnxruntime for {providers[0]}, but the session runs on {used[0]}")
        self.info = {"target": "onnxruntime", "file": str(path), "providers": used, "provider": used[0]}

    def run(self, x: np.ndarray) -> RunResult:
        with Timer() as t:
            out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        named = dict(zip(self.outputs, out))
        return RunResult(logits=named["logits"], spikes=named.get("spikes"), seconds=t.seconds, info=self.info)


class OnnxRuntimeTarget:
    name = "onnxruntime"
    default_device = "cpu"
    tolerance = ONNXRUNTIME  # the rule the ONNX export was validated by

    def available(self) -> tuple[bool, str]:
        try:
            ort = _ort()
        except ImportError as err:
            return False, str(err)
        return True, f"onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})"

    def compile(self, export_dir: Path, profile: DeviceProfile, threads: int | None = None, **options) -> OnnxRuntimeRunnable:
        path, _ = read_manifest(export_dir, "onnx")
        ort = _ort()
        available = ort.get_available_providers()
        if profile.kind == "lava":
            raise TargetError(f"device profile {profile.name} is a Loihi (lava) profile: onnxruntime cannot run on it; "
                              "use --target lava, or a cpu/cuda profile")
        providers = ["CPUExecutionProvider"]
        if profile.kind == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise TargetError(f"device profile {profile.name} needs onnxruntime's CUDAExecutionProvider, which this "
                                  f"onnxruntime {ort.__version__} lacks (available: {', '.join(available)}); "
                                  "install onnxruntime-gpu on a machine with CUDA, or use --device cpu")
            providers.insert(0, "CUDAExecutionProvider")
        return OnnxRuntimeRunnable(path, providers, threads)
