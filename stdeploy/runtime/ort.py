"""The bundle's two ONNX graphs on onnxruntime (numpy in, numpy out; no torch).

* unrolled ``model.onnx``: ``input (T, B, C, H, W) -> logits (B, classes), spikes (T, B, N, D)``;
* step ``model.step.onnx``: ``input (B, C, H, W)`` plus one ``state.<neuron>`` input per neuron
  (its membrane before the step) -> ``logits_step (B, classes)``, ``spikes_step (B, N, D)`` and
  ``state_out.<neuron>`` (the membrane after it). A sequence starts from zero membranes; its
  logits are the mean over the T steps of ``logits_step``, exactly as the unrolled graph's.
"""

from __future__ import annotations

import numpy as np

from .bundle import Bundle, BundleError

STATE_IN, STATE_OUT = "state.", "state_out."


def _ort():
    try:
        import onnxruntime
    except ImportError as err:
        raise BundleError("this bundle runs on onnxruntime, which is not installed: pip install onnxruntime "
                          "(or stdeploy[runtime])") from err
    return onnxruntime


def version() -> str:
    return _ort().__version__


def choose_provider(bundle: Bundle, provider: str | None) -> str:
    """The execution provider to use: ``provider`` when given (it must be available), else the
    bundle's first choice, which must be available: no silent fall-back to another one."""
    available = _ort().get_available_providers()
    want = provider or bundle.providers[0]
    if want not in available:
        hint = "" if provider else f"; pass --provider {available[-1]} to run it there on purpose"
        raise BundleError(f"execution provider {want} is not available in this onnxruntime ({', '.join(available)}){hint}")
    return want


class Sessions:
    """An onnxruntime session for each graph of a bundle on one execution provider."""

    runtime_name = "onnxruntime"

    def __init__(self, bundle: Bundle, provider: str, threads: int | None = None):
        ort = _ort()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.provider = provider
        self.version = ort.__version__

        def load(name: str):
            try:
                return ort.InferenceSession(str(bundle.path(name)), opts, providers=[provider])
            except Exception as err:  # onnxruntime has its own exception types for bad graphs
                raise BundleError(f"{bundle.path(name)}: onnxruntime cannot load it ({str(err).splitlines()[0]})") from err

        self.names = (bundle.unrolled, bundle.step)
        self.unrolled = load(bundle.unrolled)
        self.step = load(bundle.step) if bundle.step else None
        names = [o.name for o in self.unrolled.get_outputs()]
        if "logits" not in names or "spikes" not in names:
            raise BundleError(f"{bundle.unrolled}: outputs are {names}, expected logits and spikes")
        if self.step is not None:
            self.step_outputs = [o.name for o in self.step.get_outputs()]
            self.state_inputs = [i for i in self.step.get_inputs() if i.name.startswith(STATE_IN)]
            missing = [STATE_OUT + i.name[len(STATE_IN):] for i in self.state_inputs
                       if STATE_OUT + i.name[len(STATE_IN):] not in self.step_outputs]
            if missing or "logits_step" not in self.step_outputs or "spikes_step" not in self.step_outputs:
                raise BundleError(f"{bundle.step}: not a step graph (outputs {self.step_outputs[:4]}...; missing {missing[:3]})")

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unrolled graph on ``x (T, B, C, H, W)``: ``(logits, spikes)``."""
        try:
            logits, spikes = self.unrolled.run(["logits", "spikes"], {"input": x})
        except Exception as err:  # onnxruntime's own exception types (bad shapes, kernel failures)
            raise BundleError(f"{self.names[0]}: onnxruntime failed on input {list(x.shape)} ({str(err).splitlines()[0]})") from err
        return logits, spikes

    def zero_states(self, batch: int) -> dict[str, np.ndarray]:
        return {i.name: np.zeros([batch if not isinstance(d, int) else d for d in i.shape], dtype=np.float32)
                for i in self.state_inputs}

    def step_once(self, frame: np.ndarray, states: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict]:
        """One timestep: ``frame (B, C, H, W)`` and the membranes -> ``(logits_step, spikes_step, new membranes)``."""
        try:
            out = dict(zip(self.step_outputs, self.step.run(self.step_outputs, {"input": frame, **states})))
        except Exception as err:  # onnxruntime's own exception types
            raise BundleError(f"{self.names[1]}: onnxruntime failed on a frame {list(frame.shape)} ({str(err).splitlines()[0]})") from err
        new = {STATE_IN + n[len(STATE_OUT):]: v for n, v in out.items() if n.startswith(STATE_OUT)}
        return out["logits_step"], out["spikes_step"], new

    def run_streaming(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Step graph fed ``x (T, B, C, H, W)`` frame by frame from zero membranes: ``(logits, spikes)``."""
        states = self.zero_states(x.shape[1])
        logits, spikes = [], []
        for t in range(x.shape[0]):
            lt, st, states = self.step_once(x[t], states)
            logits.append(lt)
            spikes.append(st)
        return np.stack(logits).mean(axis=0), np.stack(spikes)
