"""The bundle's standalone TVM modules on TVM's runtime alone (numpy in, numpy out; no torch, no
TVM compiler). ``TVM_USE_RUNTIME_LIB=1`` is set before ``tvm`` is first imported (unless the
caller set it), so the ``apache-tvm`` wheel loads ``libtvm_runtime`` only and a device may delete
``libtvm_compiler.so`` altogether.

The modules have static shapes: the unrolled one runs the bundle's batch, the step one batch 1
(the streaming case), so the step graph's check feeds the samples one sequence at a time.

A CUDA bundle (manifest ``tvm.device == "cuda"``) runs on ``tvm.cuda(0)`` and nowhere else: the
runtime-only TVM does not load its CUDA library by itself, so it is loaded here
(``tvm/lib/libtvm_runtime_cuda.so``, which needs the NVIDIA driver's ``libcuda.so.1`` and CUDA
13's ``libcudart.so.13``). Where that library does not load, no GPU is visible, or the GPU's
compute capability is below the bundle's ``arch``, :class:`Sessions` raises :class:`BundleError`
with one line saying which (the CLI's exit status 2): there is no CPU fallback. The provider
string names the GPU that ran. Inputs are copied to the GPU and outputs back on each call (part of
the timed call); the step module's membranes stay on the GPU between steps.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np

from .bundle import Bundle, BundleError

STATE_IN, STATE_OUT = "state.", "state_out."
CUDA_RUNTIME_LIBRARY = "libtvm_runtime_cuda.so"


def _tvm(threads: int | None = None):
    if "tvm" not in sys.modules:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
        if threads:
            os.environ["TVM_NUM_THREADS"] = str(threads)
    try:
        import tvm
        from tvm.runtime import vm
    except (ImportError, OSError) as err:
        raise BundleError(f"this bundle runs on TVM's runtime, which is not installed ({err}): "
                          f"pip install --no-deps apache-tvm apache-tvm-ffi typing_extensions") from err
    return tvm, vm


def cuda_unavailable() -> str | None:
    """None where a CUDA bundle can run here (TVM's CUDA runtime loads and ``tvm.cuda(0)`` exists),
    else one line saying why not. Loads the CUDA runtime library into this process when it can."""
    tvm, _ = _tvm()
    import tvm_ffi

    if tvm_ffi.get_global_func("device_api.cuda", allow_missing=True) is None:
        lib_dir = Path(tvm.__file__).resolve().parent / "lib"
        if not (lib_dir / CUDA_RUNTIME_LIBRARY).is_file():
            return f"this TVM has no CUDA runtime library ({lib_dir / CUDA_RUNTIME_LIBRARY} is missing)"
        from tvm_ffi.libinfo import load_lib_ctypes

        try:
            load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[lib_dir], mode="RTLD_LOCAL")
        except (OSError, RuntimeError) as err:  # the loader's message names the missing library
            return (f"TVM's CUDA runtime ({CUDA_RUNTIME_LIBRARY}) does not load: {str(err).splitlines()[0]} "
                    "(it needs the NVIDIA driver and CUDA 13's libcudart.so.13)")
        if tvm_ffi.get_global_func("device_api.cuda", allow_missing=True) is None:
            return f"{CUDA_RUNTIME_LIBRARY} loaded but registered no CUDA device"
    if not tvm.cuda(0).exist:
        return "no CUDA GPU is visible (TVM's CUDA runtime loaded; tvm.cuda(0) does not exist)"
    return None


def host_machine() -> str:
    m = platform.machine()
    return {"AMD64": "x86_64", "arm64": "aarch64"}.get(m, m)


class Sessions:
    """A TVM virtual machine for each of a bundle's modules."""

    runtime_name = "tvm"

    def __init__(self, bundle: Bundle, threads: int | None = None):
        section = bundle.tvm
        if section["machine"] != host_machine():
            raise BundleError(f"{bundle.root}: the TVM modules are built for {section['machine']}, this machine is {host_machine()}")
        tvm, vm = _tvm(threads)
        self.tvm = tvm
        self.version = tvm.__version__
        self.names = (bundle.unrolled, bundle.step)
        if section.get("device", "cpu") == "cuda":
            self.dev, self.provider = self._cuda_device(bundle, section)
        else:
            self.dev = tvm.cpu()
            self.provider = f"cpu ({section['target'].get('mcpu') or section['target'].get('mtriple') or 'llvm'})"

        def load(name: str):
            try:
                return vm.VirtualMachine(tvm.runtime.load_module(str(bundle.path(name))), self.dev)["main"]
            except Exception as err:  # TVM's FFI raises its own error types for bad libraries
                raise BundleError(f"{bundle.path(name)}: TVM's runtime cannot load it ({str(err).splitlines()[0]})") from err

        g = section["graphs"]
        self.unrolled_spec = g["unrolled"]
        self.unrolled = load(bundle.unrolled)
        self.step, self.step_spec = None, g.get("step")
        if bundle.step is not None:
            self.step = load(bundle.step)
            self.state_inputs = [(n, s) for n, s in self.step_spec["inputs"] if n.startswith(STATE_IN)]

    def _cuda_device(self, bundle: Bundle, section: dict):
        """``(tvm.cuda(0), provider string naming the GPU)``, or BundleError saying why not here."""
        where = f"{bundle.root}: the TVM modules run on a CUDA GPU ({section.get('arch', '?')})"
        why = cuda_unavailable()
        if why:
            raise BundleError(f"{where} and cannot here: {why}; no CPU fallback")
        dev = self.tvm.cuda(0)
        have, want = str(dev.compute_version), str(section.get("arch", "")).removeprefix("sm_")
        if want.isdigit() and int(have.replace(".", "")) < int(want):
            raise BundleError(f"{where}; this GPU ({dev.device_name}) has compute capability {have}, below {want[:-1]}.{want[-1]}")
        return dev, f"cuda:0 ({dev.device_name}, compute capability {have})"

    def _call(self, fn, name: str, args: list, outputs: list[str], keep: tuple[str, ...] = ()) -> dict:
        """``fn`` on ``args`` (numpy arrays, copied to the module's device, or runtime tensors already
        there); outputs as numpy, except those whose name starts with a prefix in ``keep`` (left on the device)."""
        tensor = self.tvm.runtime.Tensor
        try:
            out = fn(*[a if isinstance(a, tensor) else self.tvm.runtime.tensor(np.ascontiguousarray(a, dtype=np.float32), self.dev)
                       for a in args])
        except Exception as err:  # TVM's own error types (shape checks inside the module)
            raise BundleError(f"{name}: TVM's runtime failed ({str(err).splitlines()[0]})") from err
        out = [out] if len(outputs) == 1 else list(out)
        return {n: o if n.startswith(keep) else o.numpy() for n, o in zip(outputs, out)}

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unrolled module on ``x (T, B, C, H, W)`` at the batch it was built for."""
        (_, want), = self.unrolled_spec["inputs"]
        if list(x.shape) != list(want):
            raise BundleError(f"{self.names[0]}: built for input {want}, got {list(x.shape)}")
        out = self._call(self.unrolled, self.names[0], [x], self.unrolled_spec["outputs"])
        return out["logits"], out["spikes"]

    def zero_states(self, batch: int) -> dict[str, np.ndarray]:
        if batch != 1:
            raise BundleError(f"{self.names[1]}: the step module is built for batch 1, asked for {batch}")
        return {n: np.zeros(s, dtype=np.float32) for n, s in self.state_inputs}

    def step_once(self, frame: np.ndarray, states: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict]:
        args = [frame if n == "input" else states[n] for n, _ in self.step_spec["inputs"]]
        out = self._call(self.step, self.names[1], args, self.step_spec["outputs"], keep=(STATE_OUT,))
        new = {STATE_IN + n[len(STATE_OUT):]: v for n, v in out.items() if n.startswith(STATE_OUT)}
        return out["logits_step"], out["spikes_step"], new

    def run_streaming(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The step module fed each sample's frames in turn (batch 1), membranes carried within a sequence."""
        logits, spikes = [], []
        for b in range(x.shape[1]):
            states, lb, sb = self.zero_states(1), [], []
            for t in range(x.shape[0]):
                lt, st, states = self.step_once(x[t, b:b + 1], states)
                lb.append(lt)
                sb.append(st)
            logits.append(np.stack(lb).mean(axis=0))
            spikes.append(np.stack(sb))
        return np.concatenate(logits, axis=0), np.concatenate(spikes, axis=1)
