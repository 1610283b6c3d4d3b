"""The registered ``tvm`` target (:class:`TVMTarget`): a cpu profile compiles :mod:`.cpu`'s module,
a cuda profile :mod:`.cuda`'s build; other profile kinds are refused.

Tolerance: on the CPU (llvm) outputs are spike-exact against onnxruntime and PyTorch and logits
within ``1e-4``; CUDA kernels on a GPU sum in another order and may contract to FMA, so a
membrane at its threshold can flip a spike there.
"""

from __future__ import annotations

import os
import shutil

from ...errors import ConfigError
from ..base import TargetError
from ..profiles import DeviceProfile
from .cpu import TVMRunnable
from .cuda import cuda_compile
from .frontend import load_onnx_graph
from .host import cpu_target
from .sdk import load_tvm, runtime_only

__all__ = ["TVMTarget"]


class TVMTarget:
    name = "tvm"
    default_device = "cpu"
    # CPU (llvm): measured spike-exact against onnxruntime and PyTorch. CUDA kernels on a GPU sum in
    # another order and may contract to FMA: a membrane at its threshold can flip a spike there.
    tolerance = {"spike_mismatches": 0, "logits_atol": 1e-4}

    def available(self) -> tuple[bool, str]:
        try:
            tvm = load_tvm()
        except ImportError as err:
            return False, str(err)
        if runtime_only():
            return True, f"apache-tvm {tvm.__version__} runtime only (prebuilt CUDA artifacts load and run; nothing compiles)"
        from tvm.target import codegen

        llvm = codegen.llvm_version_major() if hasattr(codegen, "llvm_version_major") else "?"
        nvcc = "nvcc on PATH" if shutil.which("nvcc") else "no nvcc (cuda profiles cannot build)"
        return True, f"apache-tvm {tvm.__version__} (LLVM {llvm}; {nvcc})"

    def compile(self, export_dir: str | os.PathLike, profile: DeviceProfile, batch_size: int | None = None, *,
                out_dir: str | os.PathLike | None = None, fast_math: bool = False, schedule: str = "auto",
                kernels: str = "blas", sparse: str = "auto", database: str | os.PathLike | None = None,
                rebuild: bool = False, **options) -> TVMRunnable:
        """A runnable for a cpu or cuda profile.

        ``batch_size`` compiles for that batch up front (a cpu runnable compiles any other batch
        on first use; a cuda build defaults to batch 1). ``out_dir`` (cuda: where the artifacts go,
        default ``export_dir``) and ``fast_math`` (cuda: nvcc's ``--use_fast_math``) have no
        effect on cpu profiles. CPU only: ``schedule`` (``auto``: the tuning database when
        ``stdeploy tune`` wrote one for this batch; ``tuned``: require it; ``untuned``),
        ``kernels`` (``blas``: matmul/conv2d as BLAS calls; ``tir``: all TVM code) and ``sparse``
        (``auto``: pruned linears run a sparse kernel where it measures faster; ``off``);
        ``database``: a tuning database folder instead of the one ``tune`` keys by model.
        """
        if options:
            raise ConfigError(f"unknown tvm target option(s) {sorted(options)}; known: batch_size, out_dir, fast_math, "
                              "schedule, kernels, sparse, database, rebuild")
        choices = {"schedule": ("auto", "tuned", "untuned"), "kernels": ("blas", "blas-dense", "tir"), "sparse": ("auto", "on", "off")}
        given = {"schedule": schedule, "kernels": kernels, "sparse": sparse}
        bad = [f"{k}={v!r} (one of {', '.join(choices[k])})" for k, v in given.items() if v not in choices[k]]
        if bad:
            raise ConfigError("invalid tvm option(s): " + "; ".join(bad))
        load_tvm()
        if profile.kind == "cuda":
            return cuda_compile(export_dir, profile, batch_size, out_dir=out_dir, fast_math=fast_math,
                                 sparse="on" if sparse == "on" else "off", rebuild=rebuild)
        if profile.kind != "cpu":
            raise TargetError(f"device profile {profile.name} is a {profile.kind} profile; the tvm target compiles cpu and cuda profiles")
        if sparse == "on":
            raise ConfigError("sparse='on' is for cuda profiles; on the cpu 'auto' times the sparse kernel against BLAS per layer")
        runnable = TVMRunnable(load_onnx_graph(export_dir), profile, cpu_target(profile), export_dir, {**given, "database": database})
        if batch_size is not None:
            runnable.prepare(batch_size)
        return runnable
