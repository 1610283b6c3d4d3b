"""Standalone TVM modules for a bundle: the export's two ONNX graphs compiled by TVM alone, for a cpu
profile's CPU (below) or, for a cuda profile, with the GPU's kernels (:func:`build_cuda_modules`).

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


def relax_graphs(unrolled: Path, step: Path | None, batch: int):
    """``(key, onnx_path, batch, onnx_model, inputs, relax_module)`` for the bundle's graphs: ``"unrolled"`` at
    ``batch`` and, when there is one, ``"step"`` at batch 1, each imported from its ONNX file with
    sparse initializers densified and every input shape static."""
    import onnx
    from tvm.relax.frontend import onnx as rx_onnx

    from .frontend import densify_sparse_initializers

    for key, path, b in (("unrolled", unrolled, batch), ("step", step, 1)):
        if path is None:
            continue
        model, _ = densify_sparse_initializers(onnx.load(str(path)))
        inputs = _static_inputs(model, b)
        with warnings.catch_warnings():  # the frontend renames "state.x" params to "state_x"; inputs stay positional
            warnings.filterwarnings("ignore", message="Renaming name", category=UserWarning)
            mod = rx_onnx.from_onnx(model, shape_dict=dict(inputs))
        yield key, path, b, model, inputs, mod


def build_tvm_modules(unrolled: Path, step: Path | None, profile, batch: int, stage: Path) -> dict:
    """Compile the graphs for ``profile`` into ``stage`` (``model.<machine>.so``,
    ``model.step.<machine>.so``); return the manifest's ``tvm`` section."""
    try:  # what the build needs, checked first so the error names the extra
        import onnx  # noqa: F401
        import tvm
        from tvm.relax.frontend import onnx as rx_onnx  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"--runtime tvm needs apache-tvm on this build machine: pip install 'stdeploy[tvm]' ({err})") from err
    from .cuda_artifacts import elf_machine
    from .schedules import standalone_module

    if profile.kind == "cuda":
        return build_cuda_modules(unrolled, step, profile, batch, stage)
    if profile.kind != "cpu":
        raise ConfigError(f"--runtime tvm --device {profile.name}: a {profile.kind} profile; TVM bundles are built for cpu "
                          f"and cuda profiles")
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
    for key, path, b, model, inputs, mod in relax_graphs(unrolled, step, batch):
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


CUDA_SCHEDULES = "dlight default GPU schedules, kernels compiled by nvcc (SASS for the profile's arch plus its PTX), no fast math"


def build_cuda_modules(unrolled: Path, step: Path | None, profile, batch: int, stage: Path) -> dict:
    """Compile the graphs for a cuda ``profile`` into ``stage`` (``model.<machine>.so``,
    ``model.step.<machine>.so``, ``<machine>`` the profile's host: ``aarch64`` for a Jetson,
    cross-compiled with ``[tvm].cross_compiler``); return the manifest's ``tvm`` section.

    Each library holds the host code (the Relax VM's program) and the CUDA module of its kernels
    (:func:`~.cuda.compile_relax_for_cuda`: dlight's default schedules, nvcc, no fast math), and
    TVM's runtime with its CUDA library (``libtvm_runtime_cuda``: the NVIDIA driver and CUDA 13's
    ``libcudart``) runs it on ``tvm.cuda()``. Before anything is written each library is checked:
    its ELF machine, every kernel name in it, and its embedded GPU code
    (:func:`~.cuda_artifacts.embedded_cuda_code`) holding SASS for the profile's ``arch``. A
    library for this machine is also loaded back (kernels listed by the loaded CUDA module). No
    kernel runs here: without a GPU the build uses the stand-in driver (:mod:`.cuda_standin_driver`).
    """
    try:  # what the build needs, checked first so the error names the extra
        import onnx  # noqa: F401
        import tvm
        from tvm.relax.frontend import onnx as rx_onnx  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"--runtime tvm needs apache-tvm on this build machine: pip install 'stdeploy[tvm]' ({err})") from err
    from tvm.support import cc

    from .cuda import compile_relax_for_cuda, cuda_profile, triple_machine
    from .cuda_artifacts import build_machine, elf_machine, embedded_cuda_code, find_module
    from .cuda_standin_driver import ensure_tvm_cuda_runtime

    device, host, cross = cuda_profile(profile)
    driver = ensure_tvm_cuda_runtime()
    machine = triple_machine(host)
    target = tvm.target.Target(device, host=host)
    arch = str(device["arch"])
    section = {"version": tvm.__version__, "device": "cuda", "arch": arch, "target": device, "host": host,
               "machine": machine, "schedules": CUDA_SCHEDULES, "build_driver": driver, "graphs": {}}
    for key, path, b, model, inputs, mod in relax_graphs(unrolled, step, batch):
        executable, kernels, nvcc = compile_relax_for_cuda(mod, target, arch, fast_math=False, what=str(path))
        name = f"model.{machine}.so" if key == "unrolled" else f"model.step.{machine}.so"
        lib = stage / name
        ex_kwargs = {"fcompile": cc.cross_compiler(cross)} if cross else {}
        executable.export_library(str(lib), **ex_kwargs)
        if elf_machine(lib) != machine:
            raise ConfigError(f"{lib}: built for {elf_machine(lib)}, expected {machine}")
        data = lib.read_bytes()  # read once: the kernel names and the GPU code are looked up in these bytes
        missing = [k for k in kernels if k.encode() not in data]
        code = embedded_cuda_code(data)
        if missing or not any(c["kind"] == "SASS" and c["arch"] == arch for c in code):
            raise ConfigError(f"{lib}: the library lacks kernels {missing[:5]} or SASS for {arch} (has {code})")
        if machine == build_machine():  # loadable here (the stand-in driver suffices to load, not to run)
            cuda_module = find_module(tvm.runtime.load_module(str(lib)), "cuda")
            if cuda_module is None or not all(cuda_module.implements_function(k) for k in kernels):
                raise ConfigError(f"{lib}: loaded back, its CUDA module lacks kernels the build compiled")
        section["graphs"][key] = {"file": name, "batch": b, "inputs": [[n, s] for n, s in inputs],
                                  "outputs": [o.name for o in model.graph.output], "kernels": kernels,
                                  "device_code": [f"{c['arch']} {c['kind']}" for c in code], "nvcc": nvcc}
    return section
