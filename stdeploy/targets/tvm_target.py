"""Apache TVM (0.27, Relax): the unrolled ONNX graph compiled for a CPU or a CUDA device profile.

Both paths import ``model.onnx`` with TVM's Relax ONNX frontend at a **static** input shape
``(T, B, C, H, W)``: the batch is fixed per compiled module, so a runnable compiles lazily per
batch size and keeps one executable per shape (or compiles the ``batch_size`` given up front).
ONNX sparse initializers (which the frontend cannot read) are densified in a copy first.

CPU profiles (``kind = "cpu"``)
    ``[tvm].target`` (``{kind = "llvm"}``) plus ``mcpu`` = the host CPU's LLVM name (read at run
    time: ``"native"`` is refused by this wheel's LLVM) and ``num-cores`` = the usable cores,
    then ``tvm.compile`` and ``relax.VirtualMachine`` on ``tvm.cpu()``. Plain TVM code gives
    matrix products no schedule (an order of magnitude slower than onnxruntime, STACK.md), so by
    default (``kernels="blas"``) matmuls and stride-1 convolutions run as kernels that skip zero
    inputs while the input is mostly spikes (:mod:`stdeploy.targets.tvm_spikeconv`) and as BLAS
    calls otherwise and with ``kernels="blas-dense"`` (:mod:`stdeploy.targets.tvm_blas`), pruned
    linears that measure faster sparse run a sparse kernel (:mod:`stdeploy.targets.tvm_sparse`,
    ``sparse="auto"``), and the rest is TVM code, MetaSchedule-tuned when ``stdeploy tune`` left
    a database for this model, device and batch (:mod:`stdeploy.targets.tvm_tune`). ``info["path"]`` says which kernels ran;
    ``kernels="tir", sparse="off", schedule="untuned"`` is plain untuned TVM.

CUDA profiles (``kind = "cuda"``, e.g. ``jetson-orin-nano``)
    ``Target([tvm].target, host=[tvm].host)``; the Relax graph is legalized, fused and given
    dlight's default GPU schedules (``Matmul, GEMV, Reduction, GeneralReduction, Fallback``)
    inside ``with target:`` (an unscheduled kernel fails the CUDA build with "did you forget to
    bind"), lowered once, and built twice: for the profile's host (``model.<profile>.so``, cross
    compiled with ``[tvm].cross_compiler`` for an aarch64 Jetson) and for this build machine
    (``model.<profile>.<machine>.so``), which is loaded back here with
    ``tvm.runtime.load_module`` to check it. Kernels are compiled once by ``nvcc`` to a fatbin
    holding SASS for the profile's ``arch`` plus its PTX (so newer GPUs can JIT it), without
    ``--use_fast_math`` unless ``fast_math=True`` (fast math flushes denormals and approximates
    division, which moves membranes that sit at a threshold). Without an NVIDIA driver the build
    uses a stand-in ``libcuda.so.1`` (:mod:`stdeploy.targets.cuda_stub`); a real driver always
    wins. Running needs a GPU: ``run`` raises :class:`TargetError` where ``tvm.cuda()`` does not
    exist, and otherwise runs the build-machine module on ``tvm.cuda()``.

    The sidecar ``model.<profile>.json`` records what the artifacts were built from (ONNX sha256,
    TVM target, batch, ``fast_math``, ``sparse``); a later compile with the same inputs loads them
    instead of building (``info["reused"]``). That is how a deployment machine with TVM's runtime
    alone (no ``libtvm_compiler.so``: :func:`runtime_only`) runs them; anything else is refused
    there with the command that builds it. A batch smaller than the built one runs zero-padded.
    ``sparse="on"`` puts linears with >= 50% zeros on :mod:`stdeploy.targets.tvm_sparse`'s GPU
    schedule (no timing at build time: the GPU is elsewhere).

:func:`build_cuda_artifact` is the same CUDA build as a plain function for the CLI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import atomic_write_text, sha256_file
from ..errors import ConfigError, ShapeError
from .base import RunResult, TargetError, Timer, read_manifest
from .profiles import DeviceProfile, load_profile

__all__ = ["TVMTarget", "TVMRunnable", "CudaRunnable", "OnnxGraph", "load_onnx_graph", "densify_sparse_initializers",
           "host_cpu_name", "cpu_target", "build_cuda_artifact", "kernel_names", "elf_machine", "runtime_only", "INSTALL_HINT",
           "GPU_RULES"]

INSTALL_HINT = "pip install 'stdeploy[tvm]'"
GPU_RULES = ("Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback")  # dlight rules, tried in this order
INPUT, OUTPUTS = "input", ("logits", "spikes")
ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv"}
_NVCC_CALLBACK = "tvm_callback_cuda_compile"
_GLOBAL_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(")
_build_lock = threading.Lock()  # the nvcc callback is process-global while a CUDA build runs


def _tvm():
    try:
        import tvm
    except (ImportError, OSError) as err:
        raise ImportError(f"the tvm target needs apache-tvm ({err}): {INSTALL_HINT}") from err
    return tvm


# --------------------------------------------------------------------------------------------
# The ONNX graph


@dataclass(frozen=True)
class OnnxGraph:
    path: Path
    model: object                      # onnx.ModelProto with dense initializers only
    input_dims: tuple                  # (T, B, C, H, W); B an int or the name of the dynamic dim
    outputs: tuple[str, ...]           # graph outputs in order
    densified: tuple[str, ...] = ()    # sparse initializers made dense

    def shape(self, batch: int) -> tuple[int, ...]:
        t, b, c, h, w = self.input_dims
        if isinstance(b, int) and b != batch:
            raise ShapeError(f"{self.path}: the graph has a fixed batch of {b}, asked for {batch}")
        return (t, batch, c, h, w)


def densify_sparse_initializers(model):
    """``(model, [])`` when ``model`` has no ``graph.sparse_initializer``; else a copy with each
    one turned into a dense initializer of the same name, and the names. The input is not changed."""
    import onnx
    from onnx import numpy_helper

    if not len(model.graph.sparse_initializer):
        return model, []
    dense_model = onnx.ModelProto()
    dense_model.CopyFrom(model)
    graph = dense_model.graph
    names = []
    for sparse in graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
        if indices.ndim == 1:  # linear indices into the flattened tensor
            dense.reshape(-1)[indices] = values
        else:                  # one row of coordinates per value
            dense[tuple(indices.T)] = values
        graph.initializer.append(numpy_helper.from_array(dense, name=sparse.values.name))
        names.append(sparse.values.name)
    del graph.sparse_initializer[:]
    return dense_model, names


def _dims(value) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def load_onnx_graph(export_dir: str | os.PathLike) -> OnnxGraph:
    """Read the ``onnx`` artifact of an export directory and check its interface."""
    import onnx

    path, _ = read_manifest(export_dir, "onnx")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise TargetError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from err
    model, densified = densify_sparse_initializers(model)
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    inputs = {v.name: _dims(v) for v in graph.input if v.name not in weights}
    outputs = tuple(v.name for v in graph.output)
    problems = []
    if INPUT not in inputs:
        problems.append(f"no input named {INPUT!r} (inputs: {', '.join(inputs) or 'none'})")
    elif len(inputs[INPUT]) != 5 or not all(isinstance(d, int) and d > 0 for i, d in enumerate(inputs[INPUT]) if i != 1):
        problems.append(f"input {INPUT!r} must be (T, batch, C, H, W) with T, C, H, W fixed, got {inputs[INPUT]}")
    if len(inputs) > 1:
        problems.append(f"extra inputs {sorted(set(inputs) - {INPUT})}: expected the unrolled graph (is this the streaming one?)")
    missing = [o for o in OUTPUTS if o not in outputs]
    if missing:
        problems.append(f"missing outputs {missing} (outputs: {', '.join(outputs) or 'none'})")
    if problems:
        raise TargetError(f"{path}: not an unrolled stdeploy graph: " + "; ".join(problems))
    return OnnxGraph(path=path, model=model, input_dims=tuple(inputs[INPUT]), outputs=outputs, densified=tuple(densified))


def _relax_module(graph: OnnxGraph, batch: int):
    _tvm()
    from tvm.relax.frontend import onnx as rx_onnx

    try:
        return rx_onnx.from_onnx(graph.model, shape_dict={INPUT: list(graph.shape(batch))})
    except Exception as err:  # the frontend raises KeyError, TVMError, ... for graphs it cannot map
        raise TargetError(f"{graph.path}: TVM's ONNX frontend cannot import it ({type(err).__name__}: {err})") from err


# --------------------------------------------------------------------------------------------
# CPU target


def _cpuinfo_cpu_name() -> str | None:
    """An LLVM CPU name with the vector units listed in /proc/cpuinfo (x86-64 only)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "skylake-avx512"
    if {"avx2", "fma", "bmi2"} <= flags:
        return "haswell"
    if "sse4_2" in flags:
        return "nehalem"
    return "x86-64"


def host_cpu_name() -> str | None:
    """This machine's CPU as LLVM names it (``znver3``, ``sapphirerapids``, ...), checked against
    TVM's LLVM; None when neither LLVM's detection nor /proc/cpuinfo gives a valid name."""
    _tvm()
    from tvm.target import codegen

    triple = str(codegen.llvm_get_system_triple())
    candidates = []
    if hasattr(codegen, "llvm_get_system_cpu"):
        candidates.append(str(codegen.llvm_get_system_cpu()))
    candidates.append(_cpuinfo_cpu_name())
    for name in candidates:
        if name and name != "generic" and codegen.llvm_is_valid_cpu(name, triple):
            return name
    return None


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_target(profile: DeviceProfile) -> dict:
    """The llvm target dict of a cpu profile, completed with ``mcpu`` (host CPU, when the profile
    names neither ``mcpu`` nor ``mtriple``; ``"native"`` is replaced by the host's name) and
    ``num-cores``."""
    target = dict(profile.tvm.get("target") or {"kind": "llvm"})
    if target.get("kind") != "llvm":
        raise TargetError(f"device profile {profile.path or profile.name}: a cpu profile's [tvm].target needs kind = \"llvm\", got {target}")
    if target.get("mcpu", "native") == "native" and "mtriple" not in target:
        target.pop("mcpu", None)
        cpu = host_cpu_name()
        if cpu is None:
            warnings.warn("tvm: the host CPU has no LLVM name TVM accepts; compiling for generic x86-64 (no AVX)", stacklevel=3)
        else:
            target["mcpu"] = cpu
    target.setdefault("num-cores", _usable_cores())
    try:
        _tvm().target.Target(target)
    except Exception as err:  # TVM refuses unknown keys with its own error types
        raise TargetError(f"device profile {profile.path or profile.name}: TVM refuses the target {target}: {err}") from err
    return target


# --------------------------------------------------------------------------------------------
# Runnables


def _to_numpy(out, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    outs = [out] if hasattr(out, "numpy") else list(out)
    return {name: o.numpy() for name, o in zip(names, outs)}


class TVMRunnable:
    """The graph on TVM's Relax VM on the CPU; one executable per input shape, compiled on first
    use (or up front with :meth:`prepare`). ``cpu`` holds the CPU build options
    (``schedule``, ``kernels``, ``sparse``; see :func:`stdeploy.targets.tvm_tune.compile_cpu`)."""

    path_name = "llvm"

    def __init__(self, graph: OnnxGraph, profile: DeviceProfile, target: dict, export_dir=None, cpu: dict | None = None):
        self.graph, self.profile, self.target = graph, profile, target
        self.export_dir = Path(export_dir) if export_dir is not None else graph.path.parent
        self.cpu = {"schedule": "auto", "kernels": "blas", "sparse": "auto", **(cpu or {})}
        self._vms: dict[tuple[int, ...], object] = {}
        self.info = {"target": "tvm", "path": self.path_name, "profile": profile.name, "file": str(graph.path),
                     "tvm_target": target, "input": list(graph.input_dims),
                     "densified_sparse_initializers": list(graph.densified), "compile_seconds": {}, "builds": {}}

    @property
    def compiled_shapes(self) -> list[tuple[int, ...]]:
        return list(self._vms)

    def _build(self, batch: int):
        tvm = _tvm()
        from tvm import relax

        from .tvm_tune import compile_cpu

        ex, build = compile_cpu(self.graph, self.export_dir, self.profile, self.target, batch, **self.cpu)
        self.info["builds"][str(batch)] = build
        self.info["path"] = build["path"]
        return relax.VirtualMachine(ex, tvm.cpu())

    def prepare(self, batch: int) -> float:
        """Compile for ``batch`` unless already compiled; the seconds it took (0 when cached)."""
        if not (isinstance(batch, int) and batch >= 1):
            raise ConfigError(f"batch_size must be a positive integer, got {batch!r}")
        shape = self.graph.shape(batch)
        if shape in self._vms:
            return 0.0
        with Timer() as t:
            self._vms[shape] = self._build(batch)
        self.info["compile_seconds"][str(batch)] = round(t.seconds, 3)
        return t.seconds

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        t, _, c, h, w = self.graph.input_dims
        if x.ndim != 5 or (x.shape[0], *x.shape[2:]) != (t, c, h, w):
            raise ShapeError(f"tvm: expected input (T={t}, B, C={c}, H={h}, W={w}), got {tuple(x.shape)}")
        return x

    def run(self, x: np.ndarray) -> RunResult:
        tvm = _tvm()
        x = self._check(x)
        self.prepare(x.shape[1])
        vm = self._vms[tuple(x.shape)]
        with Timer() as t:
            out = _to_numpy(vm["main"](tvm.runtime.tensor(x)), self.graph.outputs)
        return RunResult(logits=out["logits"], spikes=out["spikes"], seconds=t.seconds, info=self.info)


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
        tvm = _tvm()
        from tvm.runtime.vm import VirtualMachine  # the runtime's VM: no compiler needed

        shape = self.graph.shape(batch)
        if shape not in self._executables:  # another batch: build for this machine only, write nothing
            _, self._executables[shape] = _cuda_build(self.graph, self.profile, batch, fast_math=self.fast_math,
                                                      out_dir=None, sparse=self.sparse)
        return VirtualMachine(self._executables[shape], tvm.cuda())

    @property
    def can_run(self) -> bool:
        """False where no CUDA GPU exists: the artifacts are built, running them needs the device."""
        return bool(_tvm().cuda().exist)

    def run(self, x: np.ndarray) -> RunResult:
        tvm = _tvm()
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
            out = _to_numpy(out, self.graph.outputs)
        if padded is not None:
            out = {"logits": out["logits"][:batch], "spikes": out["spikes"][:, :batch]}
        return RunResult(logits=out["logits"], spikes=out["spikes"], seconds=t.seconds,
                         info={**self.info, "device_seconds": kernel_seconds, **({"padded_to": padded} if padded else {})})


# --------------------------------------------------------------------------------------------
# CUDA build


def elf_machine(path: str | os.PathLike) -> str:
    """The machine an ELF file is built for (``x86_64``, ``aarch64``, ...), from its header."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise TargetError(f"{path}: not an ELF file")
    code = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return ELF_MACHINES.get(code, f"EM_{code}")


def _triple_machine(host: dict) -> str:
    """The machine a host target dict compiles for; no ``mtriple`` means this build machine."""
    triple = str(host.get("mtriple", ""))
    if not triple:
        return _build_machine()
    arch = triple.split("-")[0]
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(arch, arch)


def _build_machine() -> str:
    m = platform.machine()
    return {"AMD64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _cuda_profile(profile: DeviceProfile, check_cross: bool = True) -> tuple[dict, dict, str | None]:
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
    machine = _triple_machine(host)
    if machine != _build_machine():
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
def _nvcc(arch: str, fast_math: bool, log: dict):
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


def _schedule_gpu(mod, target):
    """Legalize and fuse, then dlight's default GPU schedules (inside ``with target``)."""
    tvm = _tvm()
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


def _find_module(mod, kind: str):
    if mod.kind == kind:
        return mod
    for m in mod.imports:
        found = _find_module(m, kind)
        if found is not None:
            return found
    return None


def kernel_names(source: str) -> list[str]:
    """``__global__`` function names in CUDA source, in order, each once."""
    return list(dict.fromkeys(_GLOBAL_KERNEL.findall(source)))


def _export(ex, path: Path, fcompile=None) -> dict:
    """``export_library`` into a temporary folder beside ``path``, then renamed onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        try:
            ex.export_library(str(tmp_path), **({"fcompile": fcompile} if fcompile is not None else {}))
        except Exception as err:  # the compiler's failure comes through TVM as a RuntimeError
            raise TargetError(f"cannot write {path}: {err}") from err
        os.replace(tmp_path, path)
    return {"path": str(path), "bytes": path.stat().st_size, "machine": elf_machine(path)}


def runtime_only() -> bool:
    """True where the installed TVM is its runtime alone (no ``libtvm_compiler``): prebuilt
    artifacts load and run, nothing compiles."""
    return bool(getattr(_tvm().base, "_RUNTIME_ONLY", False))


def _artifact_key(graph: OnnxGraph, profile: DeviceProfile, batch: int, fast_math: bool, sparse: str) -> dict:
    """What a CUDA artifact was built from; a sidecar whose key differs is stale."""
    device, host, _ = _cuda_profile(profile, check_cross=False)
    return {"onnx_sha256": sha256_file(graph.path), "tvm_target": {"target": device, "host": host}, "batch_size": batch,
            "fast_math": fast_math, "sparse": sparse}


def _load_cuda_artifact(profile: DeviceProfile, key: dict, out_dir: Path) -> tuple[tuple[dict, object] | None, str]:
    """``((info, loaded module), "")`` from ``model.<profile>.json`` in ``out_dir`` when its key
    matches and it lists a library for this machine, else ``(None, why not)``."""
    from .cuda_stub import ensure_tvm_cuda_runtime

    tvm = _tvm()
    sidecar = out_dir / f"model.{profile.name}.json"
    if not sidecar.is_file():
        return None, f"no {sidecar}"
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return None, f"{sidecar} is unreadable ({err})"
    differs = [k for k in key if json.dumps(info.get(k), sort_keys=True) != json.dumps(key[k], sort_keys=True)]
    if differs:
        return None, f"{sidecar} was built from other {', '.join(differs)}"
    here = _build_machine()
    library = next((a for a in info.get("artifacts", {}).values() if a.get("machine") == here), None)
    if library is None or not Path(library["path"]).is_file():
        return None, f"{sidecar} lists no library for {here}"
    driver = ensure_tvm_cuda_runtime()  # registers the CUDA module loader (a stand-in driver where none is installed)
    try:
        module = tvm.runtime.load_module(library["path"])
    except Exception as err:  # a truncated or foreign file comes through TVM as a RuntimeError
        raise TargetError(f"{library['path']}: cannot load this CUDA artifact ({err}); delete it to rebuild") from err
    cuda_module = _find_module(module, "cuda")
    missing = [k for k in info.get("kernels", []) if cuda_module is None or not cuda_module.implements_function(k)]
    if missing:
        raise TargetError(f"{library['path']}: lacks kernels {missing[:5]} that {sidecar} lists; delete both to rebuild")
    info.update(reused=library["path"], sidecar=str(sidecar), cuda_driver=driver)
    return (info, module), ""


def _cuda_build(graph: OnnxGraph, profile: DeviceProfile, batch: int, *, fast_math: bool,
                out_dir: Path | None, sparse: str = "off", key: dict | None = None) -> tuple[dict, object]:
    """Build ``graph`` at ``batch`` for a cuda profile. With ``out_dir``: write the artifacts, load
    the build-machine copy back and list the kernels. Returns ``(info, build-machine executable)``.
    ``sparse="on"``: linears with at least 50% zero weights run the CSR kernel of
    :mod:`stdeploy.targets.tvm_sparse` (its GPU schedule) instead of a dense matmul. ``key``:
    :func:`_artifact_key` of these inputs when the caller has it."""
    from .cuda_stub import ensure_tvm_cuda_runtime

    device, host, cross = _cuda_profile(profile)
    driver = ensure_tvm_cuda_runtime()
    tvm = _tvm()
    if runtime_only():
        raise TargetError(f"{graph.path}: building for {profile.name} at batch {batch} needs apache-tvm's compiler and "
                          f"this TVM is runtime-only: build on a machine with `pip install 'stdeploy[tvm]'` (the "
                          f"artifacts model.{profile.name}.so/.json beside model.onnx are then loaded here)")
    from tvm.support import cc

    target = tvm.target.Target(device, host=host)
    here = _build_machine()
    same_host = cross is None and _triple_machine(host) == here
    build_target = target if same_host else tvm.target.Target(device, host={"kind": "llvm"})
    seconds: dict[str, float] = {}
    nvcc_log: dict = {}
    t_all = time.perf_counter()
    with Timer() as t:
        mod = _relax_module(graph, batch)
    seconds["import"] = round(t.seconds, 3)
    sparse_layers: list[dict] = []
    if sparse == "on":
        from .tvm_sparse import density_choice, rewrite_sparse_matmuls

        with Timer() as t:
            mod, sparse_layers = rewrite_sparse_matmuls(mod, target, density_choice(0.5))
        seconds["sparse_rewrite"] = round(t.seconds, 3)
    with _build_lock:
        try:
            with Timer() as t:
                lowered, rules = _schedule_gpu(mod, target)
            seconds["schedule_and_lower"] = round(t.seconds, 3)
            builds = [("build_host", build_target)]
            if out_dir is not None and not same_host:
                builds.insert(0, ("device", target))  # the profile's host: only needed to write it
            executables = {}
            with _nvcc(device["arch"], fast_math, nvcc_log):
                for name, tgt in builds:
                    with Timer() as t, tgt:
                        executables[name] = tvm.compile(lowered, target=tgt, relax_pipeline=None)
                    seconds[f"build_{name}"] = round(t.seconds, 3)
            executables.setdefault("device", executables["build_host"] if same_host else None)
        except TargetError:
            raise
        except Exception as err:  # TVM's errors carry the useful text; name what was being built
            hint = " (a kernel without a GPU schedule: add a dlight rule)" if "did you forget to bind" in str(err) else ""
            raise TargetError(f"{graph.path}: TVM cannot build it for {profile.name} ({device}){hint}: {err}") from err
    kernels = kernel_names("\n".join(nvcc_log.get("sources", [])))
    cuda_module = _find_module(executables["build_host"].mod, "cuda")
    if cuda_module is None or not kernels:
        raise TargetError(f"{graph.path}: the CUDA build for {profile.name} holds no compiled CUDA kernels (driver: {driver})")
    chosen = [layer for layer in sparse_layers if layer.get("chosen") == "sparse"]
    info = {
        "target": "tvm", "path": CudaRunnable.path_name + (" + sparse kernels" if chosen else ""), "profile": profile.name,
        "file": str(graph.path), **(key or _artifact_key(graph, profile, batch, fast_math, sparse)),
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
            artifacts = {"device": _export(executables["device"], device_path, cc.cross_compiler(cross) if cross else None)}
            if not same_host:
                artifacts["build_host"] = _export(executables["build_host"], out_dir / f"model.{profile.name}.{here}.so")
        seconds["export"] = round(t.seconds, 3)
        loaded = tvm.runtime.load_module(artifacts["build_host" if not same_host else "device"]["path"])
        loaded_cuda = _find_module(loaded, "cuda")
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
    return dict(_cuda_compile(export_dir, _resolve_profile(profile), batch_size, out_dir=out_dir, fast_math=fast_math).info)


def _cuda_compile(export_dir, profile: DeviceProfile, batch_size: int | None, *, out_dir, fast_math: bool,
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
    key = _artifact_key(graph, profile, batch, fast_math, sparse)
    loaded, stale = (None, "rebuild asked for") if rebuild else _load_cuda_artifact(profile, key, out)
    if loaded is None and runtime_only():
        raise TargetError(f"{graph.path}: no prebuilt CUDA artifact for {profile.name} at batch {batch} ({stale}), "
                          "and this TVM is runtime-only: build it where apache-tvm's compiler is installed, e.g. "
                          f"`stdeploy run {export_dir} --target tvm --device {profile.name} --batch-size {batch}`, and copy "
                          f"model.{profile.name}.* beside model.onnx")
    info, executable = loaded or _cuda_build(graph, profile, batch, fast_math=fast_math, out_dir=out, sparse=sparse, key=key)
    return CudaRunnable(graph, profile, info, executable, fast_math, sparse)


# --------------------------------------------------------------------------------------------
# The target


class TVMTarget:
    name = "tvm"
    default_device = "cpu"
    # CPU (llvm): measured spike-exact against onnxruntime and PyTorch. CUDA kernels on a GPU sum in
    # another order and may contract to FMA: a membrane at its threshold can flip a spike there.
    tolerance = {"spike_mismatches": 0, "logits_atol": 1e-4}

    def available(self) -> tuple[bool, str]:
        try:
            tvm = _tvm()
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
        _tvm()
        if profile.kind == "cuda":
            return _cuda_compile(export_dir, profile, batch_size, out_dir=out_dir, fast_math=fast_math,
                                 sparse="on" if sparse == "on" else "off", rebuild=rebuild)
        if profile.kind != "cpu":
            raise TargetError(f"device profile {profile.name} is a {profile.kind} profile; the tvm target compiles cpu and cuda profiles")
        if sparse == "on":
            raise ConfigError("sparse='on' is for cuda profiles; on the cpu 'auto' times the sparse kernel against BLAS per layer")
        runnable = TVMRunnable(load_onnx_graph(export_dir), profile, cpu_target(profile), export_dir, {**given, "database": database})
        if batch_size is not None:
            runnable.prepare(batch_size)
        return runnable
