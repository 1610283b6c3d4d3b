"""The bundle's standalone TVM modules on TVM's runtime alone (numpy in, numpy out; no torch, no
TVM compiler). ``TVM_USE_RUNTIME_LIB=1`` is set before ``tvm`` is first imported (unless the
caller set it), so the ``apache-tvm`` wheel loads ``libtvm_runtime`` only and a device may delete
``libtvm_compiler.so`` altogether.

The modules have static shapes: the unrolled one runs the bundle's batch, the step one batch 1
(the streaming case), so the step graph's check feeds the samples one sequence at a time.
"""

from __future__ import annotations

import os
import platform
import sys

import numpy as np

from .bundle import Bundle, BundleError

STATE_IN, STATE_OUT = "state.", "state_out."


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
        self.provider = f"cpu ({section['target'].get('mcpu') or section['target'].get('mtriple') or 'llvm'})"
        self.names = (bundle.unrolled, bundle.step)

        def load(name: str):
            try:
                return vm.VirtualMachine(tvm.runtime.load_module(str(bundle.path(name))), tvm.cpu())["main"]
            except Exception as err:  # TVM's FFI raises its own error types for bad libraries
                raise BundleError(f"{bundle.path(name)}: TVM's runtime cannot load it ({str(err).splitlines()[0]})") from err

        g = section["graphs"]
        self.unrolled_spec = g["unrolled"]
        self.unrolled = load(bundle.unrolled)
        self.step, self.step_spec = None, g.get("step")
        if bundle.step is not None:
            self.step = load(bundle.step)
            self.state_inputs = [(n, s) for n, s in self.step_spec["inputs"] if n.startswith(STATE_IN)]

    def _call(self, fn, name: str, args: list[np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        try:
            out = fn(*[self.tvm.runtime.tensor(np.ascontiguousarray(a, dtype=np.float32)) for a in args])
        except Exception as err:  # TVM's own error types (shape checks inside the module)
            raise BundleError(f"{name}: TVM's runtime failed ({str(err).splitlines()[0]})") from err
        out = [out] if len(outputs) == 1 else list(out)
        return {n: o.numpy() for n, o in zip(outputs, out)}

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
        out = self._call(self.step, self.names[1], args, self.step_spec["outputs"])
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
