"""Standalone TVM CPU modules for a bundle: the export's two ONNX graphs compiled by TVM alone.

Each graph goes through TVM's Relax ONNX frontend at a static shape (the unrolled graph at the
bundle's batch, the step graph at batch 1 for streaming), is compiled with ``tvm.compile`` for the
profile's llvm target (``mcpu`` from the profile, else this host's CPU; an ``mtriple`` such as
``aarch64-linux-gnu`` cross-compiles with the profile's ``[tvm].cross_compiler``), and written
with ``export_library`` as one shared library per graph. Nothing in them calls back into Python:
every operator is TVM-generated code (:mod:`.schedules`): matmuls with a constant weight and
stride-1 convolutions run the adaptive TIR kernels (the density choice between gather loops over
the nonzero inputs and dense register-blocked loops made inside the kernel, per call), the rest
(LIF recurrences, batch norm, pooling) is Relax's default lowering with its elementwise loops
vectorised. TVM's runtime alone loads and runs them (``TVM_USE_RUNTIME_LIB=1``, no
``libtvm_compiler``). The manifest lists each graph's TIR kernels and the density up to which
each runs its gather loops.

The target's ``mcpu`` is the profile's, else this build machine's CPU (as ``stdeploy run`` does):
a module built on an AVX-512 host needs an AVX-512 device. For another x86-64 device, give its
``mcpu`` in the profile (``"x86-64"`` for any); the manifest records the target.

What these modules are *not*: the in-process CPU path of ``stdeploy run --target tvm``, which
dispatches to BLAS and decides densities through Python callbacks registered at run time, so it
cannot be exported. ``benchmarks/edge_latency.py`` times both against onnxruntime.
"""

from __future__ import annotations

import platform
import shutil
import warnings
from pathlib import Path

from ...errors import ConfigError

SCHEDULES = "spike-adaptive TIR kernels for matmul/conv2d (schedules.py) + TVM default schedules elsewhere, no Python callbacks"


def _static_inputs(model, batch: int) -> list[tuple[str, list[int]]]:
    """``[(name, shape)]`` of a graph's inputs with every symbolic dim (the batch) set to ``batch``."""
    out = []
    for i in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in i.type.tensor_type.shape.dim]
        out.append((i.name, dims))
    return out


def _target(profile):
    from .host import cpu_target

    target = cpu_target(profile)
    target.pop("num-cores", None)  # the device decides its threads (TVM_NUM_THREADS), not this build machine
    return target


def machine_of(target: dict) -> str:
    triple = str(target.get("mtriple", ""))
    if not triple:
        m = platform.machine()
        return {"AMD64": "x86_64", "arm64": "aarch64"}.get(m, m)
    arch = triple.split("-")[0]
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(arch, arch)


def build_tvm_modules(unrolled: Path, step: Path | None, profile, batch: int, stage: Path) -> dict:
    """Compile the graphs for ``profile`` into ``stage`` (``model.<machine>.so``,
    ``model.step.<machine>.so``); return the manifest's ``tvm`` section."""
    try:
        import onnx
        import tvm
        from tvm.relax.frontend import onnx as rx_onnx
    except ImportError as err:
        raise ConfigError(f"--runtime tvm needs apache-tvm on this build machine: pip install 'stdeploy[tvm]' ({err})") from err
    from .cuda_artifacts import elf_machine
    from .frontend import densify_sparse_initializers
    from .schedules import standalone_module

    if profile.kind != "cpu":
        raise ConfigError(f"--runtime tvm --device {profile.name}: only cpu profiles for now; a {profile.kind} bundle needs the "
                          f"GPU module in the bundle too (use --runtime onnxruntime)")
    target = _target(profile)
    machine = machine_of(target)
    fcompile = None
    if machine != machine_of({}):
        compiler = profile.tvm.get("cross_compiler")
        if not compiler or shutil.which(compiler) is None:
            raise ConfigError(f"device profile {profile.path or profile.name}: mtriple {target.get('mtriple')} needs "
                              f"[tvm].cross_compiler on PATH (got {compiler!r})")
        from tvm.support import cc

        fcompile = cc.cross_compiler(compiler)
    section = {"version": tvm.__version__, "target": target, "machine": machine, "schedules": SCHEDULES, "graphs": {}}
    for key, path, b in (("unrolled", unrolled, batch), ("step", step, 1)):
        if path is None:
            continue
        model, _ = densify_sparse_initializers(onnx.load(str(path)))
        inputs = _static_inputs(model, b)
        with warnings.catch_warnings():  # the frontend renames "state.x" params to "state_x"; inputs stay positional
            warnings.filterwarnings("ignore", message="Renaming name", category=UserWarning)
            mod = rx_onnx.from_onnx(model, shape_dict=dict(inputs))
        mod, routed = standalone_module(mod, target)
        ex = tvm.compile(mod, target=tvm.target.Target(target))
        name = f"model.{machine}.so" if key == "unrolled" else f"model.step.{machine}.so"
        lib = stage / name
        ex.export_library(str(lib), **({"fcompile": fcompile} if fcompile is not None else {}))
        if elf_machine(lib) != machine:
            raise ConfigError(f"{lib}: built for {elf_machine(lib)}, expected {machine}")
        section["graphs"][key] = {"file": name, "batch": b, "inputs": [[n, s] for n, s in inputs],
                                  "outputs": [o.name for o in model.graph.output],
                                  "tir_kernels": [f"{r.op} {list(r.weight)} gather up to {r.max_density:.0%} ones" for r in routed]}
    return section
