"""The TVM CUDA build: the unrolled ONNX graph compiled for a cuda device profile, and its runnable.

``Target([tvm].target, host=[tvm].host)`` of the profile (``[tvm].target`` needs ``kind = "cuda"``
and the GPU's ``arch``, e.g. ``"sm_87"``; CUDA 13's nvcc refuses ``sm_72`` and older). The Relax
graph is legalized, fused and given dlight's default GPU schedules (:data:`GPU_RULES`, tried in
that order) inside ``with target:`` (an unscheduled kernel fails the build with "did you forget
to bind"), lowered once and built twice: for the profile's host (cross compiled with
``[tvm].cross_compiler``, default ``<mtriple>-g++``, for an aarch64 Jetson) and for this build
machine, whose copy is loaded back to check it. Kernels are compiled once by ``nvcc`` to a fatbin
holding SASS for the profile's ``arch`` plus its PTX (newer GPUs JIT it), without
``--use_fast_math`` unless ``fast_math=True`` (fast math flushes denormals and approximates
division, which moves membranes that sit at a threshold). Without an NVIDIA driver the build
loads a stand-in ``libcuda.so.1`` (:mod:`.cuda_standin_driver`); a real driver always wins.

Artifacts and reuse: see :mod:`.cuda_artifacts`. A later compile with the same key loads them
instead of building (``info["reused"]``); that is how a machine with TVM's runtime alone
(:func:`~.sdk.runtime_only`) runs them, and anything else is refused there with the command
that builds it. Running needs a GPU: :meth:`CudaRunnable.run` raises
:class:`~stdeploy.targets.base.TargetError` where ``tvm.cuda()`` does not exist. A batch smaller
than a built one runs zero-padded. ``sparse="on"`` puts linears with at least 50 % zero weights on
the CSR kernel's GPU schedule (:mod:`.kernels.sparse`; chosen by density, since the GPU is not
here to time). Units: ``build_seconds`` per stage and ``device_seconds`` (kernels between two
device syncs) in seconds; library sizes in bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from ...files import atomic_write_text, sha256_file
from ...timing import Timer
from ..base import RunResult, TargetError
from ..profiles import DeviceProfile, load_profile
from .cpu import TVMRunnable, outputs_to_numpy
from .cuda_artifacts import build_machine, export_library, find_module, load_cuda_artifact, record_built_files
from .cuda_standin_driver import ensure_tvm_cuda_runtime
from .frontend import OnnxGraph, load_onnx_graph, relax_module
from .kernels.sparse import density_choice, rewrite_sparse_matmuls
from .sdk import load_tvm, runtime_only

__all__ = ["GPU_RULES", "CudaRunnable", "build_cuda_artifact", "cuda_compile", "cuda_build", "cuda_profile", "artifact_key",
           "schedule_gpu", "nvcc_compiler", "kernel_names", "triple_machine", "compile_relax_for_cuda"]

GPU_RULES = ("Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback")  # dlight rules, tried in this order

_NVCC_CALLBACK = "tvm_callback_cuda_compile"
_GLOBAL_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(")
_build_lock = threading.Lock()  # the nvcc callback is process-global while a CUDA build runs


class CudaRunnable(TVMRunnable):
    """A CUDA build: the artifacts written by :func:`build_cuda_artifact` (``info``) and the
    build-machine executable, which runs on ``tvm.cuda()`` where a GPU exists."""

    path_name = "cuda (dlight default schedules, nvcc)"

    def __init__(self, graph: OnnxGraph, profile: DeviceProfile, build_info: dict, executable, fast_math: bool,
                 sparse: str = "off"):
        super().__init__(graph, profile, build_info["tvm_target"])
        self.info["path"] = self.path_name
        self.fast_math, self.sparse = fast_math, sparse
        self.info.update(build_info)
        self._executables = {graph.shape(build_info["batch_size"]): executable}

    def _build(self, batch: int):
        tvm = load_tvm()
        from tvm.runtime.vm import VirtualMachine  # the runtime's VM: no compiler needed

        shape = self.graph.shape(batch)
        if shape not in self._executables:  # another batch: build for this machine only, write nothing
            _, self._executables[shape] = cuda_build(self.graph, self.profile, batch, fast_math=self.fast_math,
                                                      out_dir=None, sparse=self.sparse)
        return VirtualMachine(self._executables[shape], tvm.cuda())

    @property
    def can_run(self) -> bool:
        """False where no CUDA GPU exists: the artifacts are built, running them needs the device."""
        return bool(load_tvm().cuda().exist)

    def run(self, x: np.ndarray) -> RunResult:
        tvm = load_tvm()
        x = self._check(x)
        dev = tvm.cuda()
        if not dev.exist:
            where = ", ".join(a["path"] for a in self.info.get("artifacts", {}).values()) or "nowhere (no out_dir)"
            raise TargetError(f"no CUDA GPU here; the module was built for {self.profile.name} "
                              f"({self.info['tvm_target']['target'].get('arch', '?')}) and written to {where}: "
                              "load it with tvm.runtime.load_module and relax.VirtualMachine(lib, tvm.cuda()) on the device")
        batch = x.shape[1]
        padded = min((s[1] for s in self._executables if s[1] > batch and s[2:] == x.shape[2:]), default=None)
        if padded is not None and self.graph.shape(batch) not in self._executables:
            # a smaller batch runs on a built module with zero padding rather than a new build
            x = np.concatenate([x, np.zeros((x.shape[0], padded - batch, *x.shape[2:]), np.float32)], axis=1)
        self.prepare(x.shape[1])
        vm = self._vms[tuple(x.shape)]
        with Timer() as t:
            xd = tvm.runtime.tensor(x, device=dev)
            dev.sync()
            t0 = time.perf_counter()
            out = vm["main"](xd)
            dev.sync()
            kernel_seconds = time.perf_counter() - t0
            out = outputs_to_numpy(out, self.graph.outputs)
        if padded is not None:
            out = {"logits": out["logits"][:batch], "spikes": out["spikes"][:, :batch]}
        return RunResult(logits=out["logits"], spikes=out["spikes"], seconds=t.seconds,
                         info={**self.info, "device_seconds": kernel_seconds, **({"padded_to": padded} if padded else {})})


def triple_machine(host: dict) -> str:
    """The machine a host target dict compiles for; no ``mtriple`` means this build machine."""
    triple = str(host.get("mtriple", ""))
    if not triple:
        return build_machine()
    arch = triple.split("-")[0]
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(arch, arch)


def cuda_profile(profile: DeviceProfile, check_cross: bool = True) -> tuple[dict, dict, str | None]:
    """``(device target, host target, cross compiler or None)`` of a cuda profile, checked
    (the cross compiler's presence only with ``check_cross``)."""
    where = f"device profile {profile.path or profile.name}"
    device = dict(profile.tvm.get("target") or {})
    if device.get("kind") != "cuda":
        raise TargetError(f"{where}: a cuda profile's [tvm].target needs kind = \"cuda\", got {device or 'nothing'}")
    if not str(device.get("arch", "")).startswith("sm_"):
        raise TargetError(f"{where}: [tvm].target needs the GPU's arch, e.g. arch = \"sm_87\" (Jetson Orin)")
    host = dict(profile.tvm.get("host") or {"kind": "llvm"})
    if host.get("kind") != "llvm":
        raise TargetError(f"{where}: [tvm].host needs kind = \"llvm\", got {host}")
    cross = None
    machine = triple_machine(host)
    if machine != build_machine():
        cross = profile.tvm.get("cross_compiler") or f"{host['mtriple']}-g++"
        if check_cross and shutil.which(cross) is None:
            package = f"g++-{cross[:-len('-g++')]}" if cross.endswith("-g++") else cross
            raise TargetError(f"{where}: host code for {machine} needs the cross compiler {cross}, which is not on PATH: "
                              f"apt-get install -y {package}")
    return device, host, cross


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def nvcc_compiler(arch: str, fast_math: bool, log: dict):
    """TVM's CUDA compile callback, replaced for the duration of a build: nvcc to a fatbin of SASS
    for ``arch`` plus its PTX, without fast math unless asked, each distinct source compiled once."""
    import tvm_ffi
    from tvm.support import nvcc

    if shutil.which("nvcc") is None:
        raise TargetError("building CUDA kernels needs nvcc (the CUDA 13 toolkit's bin folder on PATH); none found")
    sm = arch.removeprefix("sm_")
    gencode = ["-gencode", f"arch=compute_{sm},code=sm_{sm}", "-gencode", f"arch=compute_{sm},code=compute_{sm}"]
    log.update(gencode=" ".join(gencode), fast_math=fast_math, seconds=0.0, sources=[])
    compiled: dict[str, bytes] = {}

    def compile_cuda(code: str):
        key = hashlib.sha256(code.encode()).hexdigest()
        if key not in compiled:
            t0 = time.perf_counter()
            with _env("TVM_CUDA_NVCC_NO_FAST_MATH", None if fast_math else "1"):
                compiled[key] = nvcc.compile_cuda(code, target_format="fatbin", arch=gencode, compiler="nvcc")
            log["seconds"] = round(log["seconds"] + time.perf_counter() - t0, 3)
            log["sources"].append(code)
        return compiled[key]

    previous = tvm_ffi.get_global_func(_NVCC_CALLBACK, allow_missing=True)
    tvm_ffi.register_global_func(_NVCC_CALLBACK, compile_cuda, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(_NVCC_CALLBACK, previous, override=True)


def schedule_gpu(mod, target):
    """Legalize and fuse, then dlight's default GPU schedules (inside ``with target``)."""
    tvm = load_tvm()
    from tvm import relax

    try:
        from tvm.s_tir import dlight as dl
    except ImportError:  # older TVM releases
        from tvm import dlight as dl
    rules = [getattr(dl.gpu, name)() for name in GPU_RULES if hasattr(dl.gpu, name)]
    if not any(type(r).__name__ == "Fallback" for r in rules):
        raise TargetError("this TVM has no dlight gpu.Fallback rule; kernels would stay unscheduled")
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
              relax.transform.FuseOps(), relax.transform.FuseTIR(), dl.ApplyDefaultSchedule(*rules)]
    with target:
        mod = tvm.ir.transform.Sequential(passes)(mod)
        pipeline = relax.get_default_pipeline(target) if hasattr(relax, "get_default_pipeline") else relax.get_pipeline("default")
        mod = pipeline(mod)  # the rest of the CUDA pipeline: already-scheduled kernels are kept
    return mod, [type(r).__name__ for r in rules]


def build_error(err: Exception, what: str, first_line: bool = False) -> TargetError:
    """A :class:`TargetError` for a failed CUDA build: ``what`` (the graph and the target), a hint
    where TVM's text says a kernel has no GPU schedule, then TVM's own message (its first line
    with ``first_line``), which carries the useful text."""
    hint = " (a kernel without a GPU schedule: add a dlight rule)" if "did you forget to bind" in str(err) else ""
    text = str(err).splitlines()[0] if first_line and str(err) else str(err)
    return TargetError(f"{what}{hint}: {text}")


def compile_relax_for_cuda(mod, target, arch: str, fast_math: bool, what: str) -> tuple[object, list[str], dict]:
    """One Relax module (any functions, any inputs) through :func:`schedule_gpu` and ``tvm.compile``
    for ``target`` (device plus the profile's host), its kernels compiled by :func:`nvcc_compiler`.
    Returns ``(executable, kernel names, nvcc log without the sources)``; TVM's failures become
    :class:`TargetError` naming ``what`` (the file being built). The CUDA runtime must be loaded
    (:func:`~.cuda_standin_driver.ensure_tvm_cuda_runtime`) for the kernels to be compiled in."""
    tvm = load_tvm()
    log: dict = {}
    with _build_lock:
        try:
            lowered, _ = schedule_gpu(mod, target)
            with nvcc_compiler(arch, fast_math, log), target:
                executable = tvm.compile(lowered, target=target, relax_pipeline=None)
        except TargetError:
            raise
        except Exception as err:
            raise build_error(err, f"{what}: TVM cannot build it for {target}", first_line=True) from err
    kernels = kernel_names("\n".join(log.get("sources", [])))
    if find_module(executable.mod, "cuda") is None or not kernels:
        raise TargetError(f"{what}: the CUDA build holds no compiled CUDA kernels (is TVM's CUDA runtime loaded?)")
    return executable, kernels, {k: v for k, v in log.items() if k != "sources"}


def kernel_names(source: str) -> list[str]:
    """``__global__`` function names in CUDA source, in order, each once."""
    return list(dict.fromkeys(_GLOBAL_KERNEL.findall(source)))


def artifact_key(graph: OnnxGraph, profile: DeviceProfile, batch: int, fast_math: bool, sparse: str) -> dict:
    """What a CUDA artifact was built from; a sidecar whose key differs is stale."""
    device, host, _ = cuda_profile(profile, check_cross=False)
    return {"onnx_sha256": sha256_file(graph.path), "tvm_target": {"target": device, "host": host}, "batch_size": batch,
            "fast_math": fast_math, "sparse": sparse}


def cuda_build(graph: OnnxGraph, profile: DeviceProfile, batch: int, *, fast_math: bool,
                out_dir: Path | None, sparse: str = "off", key: dict | None = None) -> tuple[dict, object]:
    """Build ``graph`` at ``batch`` for a cuda profile. With ``out_dir``: write the artifacts, load
    the build-machine copy back and list the kernels. Returns ``(info, build-machine executable)``.
    ``sparse="on"``: linears with at least 50% zero weights run the CSR kernel of
    :mod:`.kernels.sparse` (its GPU schedule) instead of a dense matmul. ``key``:
    :func:`artifact_key` of these inputs when the caller has it."""
    device, host, cross = cuda_profile(profile)
    driver = ensure_tvm_cuda_runtime()
    tvm = load_tvm()
    if runtime_only():
        raise TargetError(f"{graph.path}: building for {profile.name} at batch {batch} needs apache-tvm's compiler and "
                          f"this TVM is runtime-only: build on a machine with `pip install 'stdeploy[tvm]'` (the "
                          f"artifacts model.{profile.name}.so/.json beside model.onnx are then loaded here)")
    from tvm.support import cc

    target = tvm.target.Target(device, host=host)
    here = build_machine()
    same_host = cross is None and triple_machine(host) == here
    build_target = target if same_host else tvm.target.Target(device, host={"kind": "llvm"})
    seconds: dict[str, float] = {}
    nvcc_log: dict = {}
    t_all = time.perf_counter()
    with Timer() as t:
        mod = relax_module(graph, batch)
    seconds["import"] = round(t.seconds, 3)
    sparse_layers: list[dict] = []
    if sparse == "on":
        with Timer() as t:
            mod, sparse_layers = rewrite_sparse_matmuls(mod, target, density_choice(0.5))
        seconds["sparse_rewrite"] = round(t.seconds, 3)
    with _build_lock:
        try:
            with Timer() as t:
                lowered, rules = schedule_gpu(mod, target)
            seconds["schedule_and_lower"] = round(t.seconds, 3)
            builds = [("build_host", build_target)]
            if out_dir is not None and not same_host:
                builds.insert(0, ("device", target))  # the profile's host: only needed to write it
            executables = {}
            with nvcc_compiler(device["arch"], fast_math, nvcc_log):
                for name, tgt in builds:
                    with Timer() as t, tgt:
                        executables[name] = tvm.compile(lowered, target=tgt, relax_pipeline=None)
                    seconds[f"build_{name}"] = round(t.seconds, 3)
            executables.setdefault("device", executables["build_host"] if same_host else None)
        except TargetError:
            raise
        except Exception as err:
            raise build_error(err, f"{graph.path}: TVM cannot build it for {profile.name} ({device})") from err
    kernels = kernel_names("\n".join(nvcc_log.get("sources", [])))
    cuda_module = find_module(executables["build_host"].mod, "cuda")
    if cuda_module is None or not kernels:
        raise TargetError(f"{graph.path}: the CUDA build for {profile.name} holds no compiled CUDA kernels (driver: {driver})")
    chosen = [layer for layer in sparse_layers if layer.get("chosen") == "sparse"]
    info = {
        "target": "tvm", "path": CudaRunnable.path_name + (" + sparse kernels" if chosen else ""), "profile": profile.name,
        "file": str(graph.path), **(key or artifact_key(graph, profile, batch, fast_math, sparse)),
        "input": list(graph.shape(batch)),
        "sparse_layers": sparse_layers,
        "cuda_driver": driver, "schedules": rules, "kernels": kernels,
        "nvcc": {k: v for k, v in nvcc_log.items() if k != "sources"},
        "densified_sparse_initializers": list(graph.densified),
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        with Timer() as t:
            device_path = out_dir / f"model.{profile.name}.so"
            artifacts = {"device": export_library(executables["device"], device_path, cc.cross_compiler(cross) if cross else None)}
            if not same_host:
                artifacts["build_host"] = export_library(executables["build_host"], out_dir / f"model.{profile.name}.{here}.so")
        seconds["export"] = round(t.seconds, 3)
        loaded = tvm.runtime.load_module(artifacts["build_host" if not same_host else "device"]["path"])
        loaded_cuda = find_module(loaded, "cuda")
        missing = [k for k in kernels if loaded_cuda is None or not loaded_cuda.implements_function(k)]
        if missing:
            raise TargetError(f"{artifacts['device']['path']}: the module loaded back lacks kernels {missing[:5]}")
        info["artifacts"] = artifacts
        info["loaded_back"] = True
    seconds["total"] = round(time.perf_counter() - t_all, 3)
    info["build_seconds"] = seconds
    if out_dir is not None:
        sidecar = Path(out_dir) / f"model.{profile.name}.json"
        atomic_write_text(sidecar, json.dumps(info, indent=2) + "\n")
        info["sidecar"] = str(sidecar)
        record_built_files(Path(out_dir), [sidecar.name] + [Path(a["path"]).name for a in info.get("artifacts", {}).values()])
    return info, executables["build_host"]


def _resolve_profile(profile: str | os.PathLike | DeviceProfile) -> DeviceProfile:
    return profile if isinstance(profile, DeviceProfile) else load_profile(profile)


def build_cuda_artifact(export_dir: str | os.PathLike, profile: str | os.PathLike | DeviceProfile,
                        out_dir: str | os.PathLike | None = None, *, batch_size: int = 1, fast_math: bool = False) -> dict:
    """Compile the export directory's ONNX graph for a cuda profile (name, TOML path or
    :class:`DeviceProfile`) and write ``model.<profile>.so`` (the profile's host), a copy for
    this machine ``model.<profile>.<machine>.so`` (when the host differs) and
    ``model.<profile>.json`` (this info) to ``out_dir`` (default: the export directory).

    Returns a JSON-ready dict: ``artifacts`` (path, bytes, ELF machine of each file), ``kernels``
    (CUDA kernel names), ``tvm_target``, ``batch_size``, ``input``, ``cuda_driver`` (``real`` or
    ``stand-in``), ``schedules``, ``nvcc``, ``build_seconds`` (per stage), ``sidecar``.
    """
    return dict(cuda_compile(export_dir, _resolve_profile(profile), batch_size, out_dir=out_dir, fast_math=fast_math).info)


def cuda_compile(export_dir, profile: DeviceProfile, batch_size: int | None, *, out_dir, fast_math: bool,
                  sparse: str = "off", rebuild: bool = False) -> CudaRunnable:
    """Load the artifacts in ``out_dir`` when they were built from this ONNX file, target, batch
    and options (``info["reused"]``), else build them (``rebuild=True``: always build)."""
    if profile.kind != "cuda":
        raise TargetError(f"device profile {profile.name} is a {profile.kind} profile; a CUDA artifact needs kind = \"cuda\"")
    batch = 1 if batch_size is None else batch_size
    if not (isinstance(batch, int) and batch >= 1):
        raise ConfigError(f"batch_size must be a positive integer, got {batch!r}")
    if sparse not in ("on", "off"):
        raise ConfigError(f"cuda sparse must be 'on' or 'off' (no timing at build time), got {sparse!r}")
    graph = load_onnx_graph(export_dir)
    out = Path(export_dir) if out_dir is None else Path(out_dir)
    key = artifact_key(graph, profile, batch, fast_math, sparse)
    loaded, stale = (None, "rebuild asked for") if rebuild else load_cuda_artifact(profile, key, out)
    if loaded is None and runtime_only():
        raise TargetError(f"{graph.path}: no prebuilt CUDA artifact for {profile.name} at batch {batch} ({stale}), "
                          "and this TVM is runtime-only: build it where apache-tvm's compiler is installed, e.g. "
                          f"`stdeploy run {export_dir} --target tvm --device {profile.name} --batch-size {batch}`, and copy "
                          f"model.{profile.name}.* beside model.onnx")
    info, executable = loaded or cuda_build(graph, profile, batch, fast_math=fast_math, out_dir=out, sparse=sparse, key=key)
    return CudaRunnable(graph, profile, info, executable, fast_math, sparse)
