"""onnxruntime: the unrolled ONNX graph on the CPU execution provider, or CUDA's where present."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..tolerance import ONNXRUNTIME
from .base import RunResult, TargetError, Timer, read_manifest
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
        self.info = {"target": "onnxruntime", "file": str(path), "providers": self.session.get_providers()}

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
        available = _ort().get_available_providers()
        providers = ["CPUExecutionProvider"]
        if profile.kind == "cuda" and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        return OnnxRuntimeRunnable(path, providers, threads)
