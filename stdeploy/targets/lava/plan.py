"""The lowered plan: plain, picklable data that the worker builds as Lava processes.

A plan holds process specs in creation order (``name``, ``kind`` in ``source``, ``synapse``,
``dendrite``, ``lif``, ``delay``, ``sink``, ``stall``; ``shape`` without the batch dim; ``inputs``:
connections ``{src, reshape, tap}``; ``params``), the latency of every process (the number of
synaptic layers on its longest path from the input: each synaptic layer delays by one step, as
Lava's ``Dense`` does), and the sinks of every Output node. :meth:`Plan.add` aligns a process's
inputs: a shorter path passes a delay line tap, so every process sees the inputs of model step
``t`` at simulation step ``t + latency``; a synapse starts computing at its input latency.

Input grid (fixed mode): the ``source`` sends ``rint(x * inv_scale)``; for an exact-mode graph it
first applies ``contracts`` in order (``[lo, hi, 2**frac_bits]``: clip, round): the export's input
contract, then ``input_contract`` (``{"lo", "hi", "frac_bits"}``), the grid and range that
:func:`.fixed_point.fit_input_contract` chose (the graph's own, or the finest coarser grid on
which every population fits Loihi's 24-bit registers), and the target reports it
(``info["input_contract"]``) so callers feed the reference the same inputs.
"""

from __future__ import annotations

import numpy as np

from ..base import TargetError
from .graph import GraphInfo, uniform

__all__ = ["Plan", "conn", "add_outputs", "lif_params", "MODEL_FAILED"]

# What a failing process model prints in the worker's log (:func:`.processes._reported`); the
# worker's parent (:class:`.worker.LavaWorker`) ends the run on this line: the two sides of the
# worker share it here, below both.
MODEL_FAILED = "lava process model {} failed at step {}:"


class Plan:
    """Process specs in creation order, their latencies, and the delay lines between them."""

    def __init__(self, mode: str):
        self.mode = mode
        self.procs: list[dict] = []
        self.by_name: dict[str, dict] = {}
        self.latency: dict[str, int] = {}
        self.outputs: dict[str, list[dict]] = {}     # Output node -> its sinks {sink, latency, scale}
        self.quant: dict[str, dict] = {}             # fixed mode: per synaptic process, exponent and scale
        self.input_contract: dict | None = None      # fixed mode, exact graph: the input grid and range the source applies

    def add(self, spec: dict) -> dict:
        """Append ``spec`` after aligning its inputs (inserting delay taps); returns the spec."""
        if spec["name"] in self.by_name:
            raise TargetError(f"lava lowering: process name {spec['name']!r} used twice")
        conns = spec.get("inputs", [])
        lat_in = max((self.latency[c["src"]] for c in conns), default=0)
        if spec["kind"] != "sink":  # sinks are aligned on the host
            for c in conns:
                lag = lat_in - self.latency[c["src"]]
                if lag > 0:
                    c.update(self._tap(c["src"], lag))
        spec.setdefault("params", {})
        if spec["kind"] == "synapse":
            spec["params"]["start"] = lat_in
        self.latency[spec["name"]] = lat_in + (1 if spec["kind"] == "synapse" else 0)
        self.procs.append(spec)
        self.by_name[spec["name"]] = spec
        return spec

    def _tap(self, src: str, lag: int) -> dict:
        name = f"delay:{src}"
        if name not in self.by_name:
            shape = self.by_name[src]["shape"]
            spec = {"name": name, "kind": "delay", "shape": shape, "in_shape": shape, "inputs": [{"src": src}],
                    "params": {"taps": []}}
            # the delay line sits right after its source, before every consumer
            self.procs.insert(self.procs.index(self.by_name[src]) + 1, spec)
            self.by_name[name] = spec
            self.latency[name] = self.latency[src]
        taps = self.by_name[name]["params"]["taps"]
        if lag not in taps:
            taps.append(lag)
        return {"src": name, "tap": taps.index(lag)}

    def to_dict(self, **extra) -> dict:
        depth = max(self.latency.values(), default=0)
        return {"mode": self.mode, "procs": self.procs, "depth": depth, "outputs": self.outputs,
                "input_contract": self.input_contract, **extra}


def conn(src: str, reshape) -> dict:
    """A connection from process ``src``, reshaped to ``reshape`` on the way (None: as is)."""
    return {"src": src, "reshape": None if reshape is None else tuple(reshape)}


def add_outputs(plan: Plan, info: GraphInfo, name: str, terms: list[tuple[str, tuple | None]],
                 scales: dict[str, float] | None = None) -> None:
    """One sink per term of Output node ``name``; the host sums them in edge order."""
    sinks = []
    for i, (src, reshape) in enumerate(terms):
        shape = reshape if reshape is not None else plan.by_name[src]["shape"]
        sink = plan.add({"name": f"sink:{name}:{i}", "kind": "sink", "shape": shape, "inputs": [conn(src, reshape)]})
        sinks.append({"sink": sink["name"], "latency": plan.latency[src], "scale": None if scales is None else scales[src]})
    plan.outputs[name] = sinks


def lif_params(p: dict, cast) -> dict:
    """Scalars where uniform (Lava's LIF), else per-neuron arrays (our LIFPerNeuron)."""
    arrays = {k: np.asarray(v) for k, v in p.items()}
    if all(uniform(a) for a in arrays.values()):
        return {"per_neuron": False, **{k: cast(a.reshape(-1)[0]) for k, a in arrays.items()}}
    return {"per_neuron": True, **arrays}
