"""lava: the NIR graph lowered to lava-nc processes, run on Lava's CPU simulator (``Loihi2SimCfg``).

``compile(export_dir, profile)`` reads ``model.nir``, checks every node (one
:class:`LavaUnsupported` lists all that cannot be lowered), lowers the graph to a *plan* (plain,
picklable data: process specs and connections) and returns a :class:`LavaRunnable`. ``run(x)``
hands the plan and ``x`` ``(T, B, C, H, W)`` to a worker subprocess that builds them as Lava
processes, runs ``T + depth`` steps and returns the sinks' records; the runnable returns logits
``(B, classes)`` (the mean over T of the per-step logits) and the head's spikes ``(T, B, N, D)``.

Lava runs only in that worker (:mod:`.lava_processes`): lava sets ``multiprocessing``'s start
method at import, and a failing Lava process model can hang instead of raising. The worker lives
in its own process group with every process Lava forks; each run has the profile's
``timeout_s`` (``[lava] timeout_s``, default 120 s), after which the group is ended (SIGTERM to
the worker, SIGKILL to the Lava processes while multiprocessing's resource tracker unlinks their
shared memory, then SIGKILL to the rest) and :class:`LavaTimeout` is raised. The worker stops the
runtime in ``finally`` (with a limit, as ``stop()`` itself can hang after a failure), ends its
group if its parent dies, and is kept between runs (lava and torch imported once; ``close()`` or
``with`` ends it); after any failure the next run starts a fresh one.

Lowering (channel-first node shapes as in the NIR export, plus a leading batch dim)
----------------------------------------------------------------------------------
* ``Input``      -> ``lava.proc.io.source.RingBuffer`` holding ``x`` over ``T + depth`` steps.
* ``LIF``        -> ``lava.proc.lif.process.LIF`` with ``du = 1`` (``u = a_in``), ``dv = d =
  float32(dt/tau)``, ``vth = v_threshold``, bias 0: Lava's ``v = v*(1-dv) + u`` with ``u = d*I`` is
  NIR's ``v += d*(v_leak - v + r*I)`` for ``r = 1, v_leak = 0``; Lava spikes on ``v > vth`` (strict,
  as NIR, and ``v_threshold`` is the model's theta lowered by one float32 ulp) and resets to 0
  (``v_reset = 0``). The input scaling ``d*I`` is applied per neuron *after* the sum of the
  incoming terms: mathematically the same as scaling each incoming weight row and bias by ``d``,
  with the reference's float32 rounding of ``d * I``. The synapse applies it when the LIF's only
  input is that synapse and the synapse feeds nothing else; otherwise a
  :class:`~.lava_processes.Dendrite` sums the terms in NIR edge order and scales. Lava's LIF takes
  scalar ``du``, ``dv``, ``vth``: a population with per-neuron values (sLIF) becomes our
  ``LIFPerNeuron`` (Lava's equations with arrays) rather than folding ``1/theta`` into weights,
  which would change the float32 rounding.
* ``Threshold``  -> Lava's ``LIF`` with ``du = dv = 1``, ``vth = threshold``: ``v = a_in``, spike
  ``v > vth``, memoryless. AND/OR units sum 0/1 spikes, exact in any order, so their inputs connect
  straight to ``a_in``; other sums go through a ``Dendrite`` with scale 1.
* ``Conv2d``, ``Conv1d`` (per-token linear), ``Linear``/``Affine`` (token sum, mask broadcast,
  token mean, classifier), ``SumPool2d`` -> our batch-aware :class:`~.lava_processes.Synapse`.
* ``Flatten``    -> no process: a reshape virtual port on the connection (``OutPort.reshape``).
* ``Output``     -> one ``lava.proc.io.sink.RingBuffer`` per incoming edge (its model also saves
  the buffer to a file on the last step: ``Var.get`` sends arrays element by element, 10 s for one
  32-sample run); the terms are summed on the host in edge order, each read at its own latency.

Why Lava's own Dense, Sparse and Conv are not used: they have no batch dimension (``Dense`` maps a
vector ``(in,)``, ``Conv`` one ``(W, H, C)`` image), so a batch would need one process per sample
or block-diagonal matrices over ``B*N`` tokens; their float models compute in float64 in their own
summation order, which cannot reproduce PyTorch's float32 bits (exactness is the float mode's
contract); and their fixed models have no way to keep a bias out of the pipeline's fill steps (see
Delays). A pruned model's zeros stay zeros in our synapses' weights (dense float32 arithmetic, as
the reference); the mapping report counts only nonzero synapses.

Delays
------
Every synaptic layer delays by one step, as Lava's ``Dense``/``Sparse`` (``send(previous); recv;
compute``); neurons, dendrites, reshapes and sinks do not. The latency of a node is the number of
synaptic layers on its longest path from the input. Where terms of different latency meet (the
residual stream's edges into a LIF, the embedding's ``p + rpe(p)``, ``v AND mask``), each shorter
term passes a :class:`~.lava_processes.Delay` (one per source, one tap per needed lag), so every
node sees the inputs of model step ``t`` at simulation step ``t + latency``. A synapse computes
only while its input carries data (``latency <= step < latency + T``) and sends zeros otherwise:
membranes stay exactly 0 through the fill steps (no bias leaks in). The run takes ``T + depth``
steps (sdt-tiny: depth 12, 16 steps) and each sink is read at ``[latency, latency + T)``.

Batch
-----
The simulator has no batch dimension; here every population has one, ``(B, *node shape)``: Lava's
LIF is elementwise and our synapses act per sample, so one Lava network runs the whole batch and
its start-up (about 1-2 s for the ~40 processes of sdt-tiny) is paid once per call. Measured on
the busy 2-core machine, sdt-tiny, float mode: 32 samples about 2.1 s per call with a warm worker
(about 4 s for the first call, which starts the worker), 64 samples about 1.5-2 s.

Float mode: exact
-----------------
The synapse model evaluates its node with the reference interpreter's own evaluator
(:mod:`stdeploy.export.nir_interpreter`) in float32, on a batch padded with zeros to the
reference's call shape (``T*B`` rows: CPU convolution kernels pick algorithms by batch size; a
batch of 1 differs in the last bit). LIFs run Lava's LIF equations in float32
(:class:`~.lava_processes.PyLifModelFloat32`, bound to Lava's ``LIF`` process). Lava's own
``PyLifModelFloat`` computes membranes in float64; ``compile(..., lif_model="lava")`` selects it
(it matched on the 360 digits test images here, but only float32 matches by construction).
Measured: 0 spike mismatches on all 360 digits test images, LIF and per-neuron sLIF models.

Fixed mode (``[lava] mode = "fixed"``): Loihi-style integers
-----------------------------------------------------------
Populations run Lava's bit-accurate LIF model (``PyLifModelBitAcc``, or the same arithmetic with
per-neuron arrays): ``du = 4095`` (full current decay), ``dv = round(4096 d)`` (12 bits), integer
``vth``, the input MSB-aligned (``<< 6``), 24-bit ``u`` and ``v``. The membrane of LIF neuron
``i`` is scaled by ``64 V / theta_i`` so that every neuron's threshold is ``vth = V``: the
per-neuron threshold is folded into the incoming weights (a term ``W x`` enters as
``a_in = alpha_i (W x)``, ``alpha_i = d_i V / theta_i``). ``V = 2**12``, lowered where a
worst-case input bound (row sums of ``|W|``) would overflow 24 bits, and, for populations fed only
by synaptic layers, lowered further so that the widest layer's largest weight is exactly a full
mantissa. A bias of one unit per step (at most ``1/d`` units, 1e-5 theta) makes ties (spike
counts times ``d`` landing exactly on theta, common in the attention) fire as the model's
``v >= theta`` does. Every synaptic layer into a population holds ``weight_bits``-bit integer
mantissas and one power-of-two exponent per layer (Loihi's ``weight_exp``); the accumulation is
exact, then ``<< e`` (or Lava's floor ``>> -e``), plus an integer bias. A synaptic layer feeding
several populations becomes one process per population (each folds its own ``alpha``); a spike
edge straight into a LIF becomes a one-to-one synaptic layer (there is no weightless path into a
compartment). AND/OR units count spikes exactly (weight 1, ``vth = floor(threshold)``). The input
is quantised to ``2**-8``; layers feeding the readout are graded integers with a real scale
applied on the host.

Measured (sdt-tiny, 360 digits test images, 8-bit weights): 93.9% of the head's output spikes
equal float mode, accuracy 97.5% (float 97.2%), predictions agree on 99.7%; per-neuron sLIF
89.6%, 83.6% (float 84.7%). That is the 8-bit weights' floor, not the pipeline's: the same
weights fake-quantised in float give 94.3% (LIF) and 90.5% (sLIF); with 16-bit weights the
integer pipeline agrees on 99.0%. The 99% goal needs 12-16-bit weights or quantisation-aware
training.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UnsupportedPrimitive
from .base import RunResult, TargetError, Timer, read_manifest
from .profiles import DeviceProfile

__all__ = ["LavaTarget", "LavaRunnable", "LavaUnsupported", "LavaTimeout", "lower", "group_members", "INSTALL_HINT", "MODES"]

INSTALL_HINT = "pip install 'stdeploy[lava]' && python -m stdeploy.install_lava"
MODES = ("floating", "fixed")
DEFAULT_TIMEOUT_S = 120.0
FIXED_VTH = 2 ** 12            # fixed mode: integer threshold of a (normalised) LIF population, lowered where inputs could overflow
FIXED_INPUT_FRAC_BITS = 8      # fixed mode: the input is quantised to 2**-8 steps
DECAY_UNITY = 4096             # Loihi's 12-bit decays: dv = round(4096 * d)
GRADED_MAX = 2 ** 23 - 1       # fixed mode: graded values (readout layers) stay within 24-bit payloads
_KILL_GRACE_S = 5.0


class LavaUnsupported(TargetError, UnsupportedPrimitive):
    """The NIR graph has nodes (or node parameters) the Lava lowering cannot express."""


class LavaTimeout(TargetError):
    """A Lava run exceeded ``timeout_s``; ``pgid`` is the stopped worker's process group."""

    def __init__(self, message: str, pgid: int):
        super().__init__(message)
        self.pgid = pgid


# ----------------------------------------------------------------------------- graph analysis
_NEURONS = ("LIF", "Threshold")
_SYNAPSES = ("Conv2d", "Conv1d", "Linear", "Affine", "SumPool2d")
_VIEWS = ("Flatten",)
SUPPORTED = ("Input", "Output", *_NEURONS, *_SYNAPSES, *_VIEWS)


def _kind(node) -> str:
    return type(node).__name__


@dataclass
class GraphInfo:
    """The facts of a NIR graph the lowering needs, found once."""

    graph: object
    order: list[str]                           # topological, views included
    into: dict[str, list[str]]                 # node -> its sources, in edge order
    shapes: dict[str, tuple[int, ...]]         # node -> output shape (no batch dim)
    terms: dict[str, list[tuple[str, tuple | None]]] = field(default_factory=dict)  # node -> (base source, reshape)
    users: dict[str, list[str]] = field(default_factory=dict)                       # base source -> consumers
    input: str = ""
    dt: float = 1.0


def check_graph(graph) -> None:
    """Raise one :class:`LavaUnsupported` listing every node the lowering cannot take."""
    problems = []
    for name, node in graph.nodes.items():
        kind = _kind(node)
        if kind not in SUPPORTED:
            problems.append(f"{name} ({kind}): no Lava lowering")
        elif kind == "LIF":
            bad = [f for f, want in (("r", 1.0), ("v_leak", 0.0), ("v_reset", 0.0))
                   if getattr(node, f) is not None and not np.all(np.asarray(getattr(node, f)) == want)]
            if bad:
                problems.append(f"{name} (LIF): only r = 1, v_leak = 0, v_reset = 0 are lowered (Lava's LIF has no input gain, "
                                f"and a leak or reset level would drive neurons during the pipeline's fill steps); has {', '.join(bad)}")
        elif kind == "Threshold" and not np.all(np.asarray(node.threshold) > 0):
            problems.append(f"{name} (Threshold): thresholds <= 0 fire on zero input (the pipeline's fill steps); not lowered")
    inputs = [n for n, node in graph.nodes.items() if _kind(node) == "Input"]
    if len(inputs) != 1:
        problems.append(f"the graph needs exactly one Input node, it has {len(inputs)}: {inputs}")
    into: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for src, dst in graph.edges:
        if src not in graph.nodes or dst not in graph.nodes:
            problems.append(f"edge {src} -> {dst} names a missing node")
            continue
        into[dst].append(src)
    for name, node in graph.nodes.items():
        if _kind(node) in _VIEWS and len(into[name]) != 1:
            problems.append(f"{name} ({_kind(node)}): a reshape with {len(into[name])} inputs (a sum) is not lowered")
        if _kind(node) not in ("Input",) and name in into and not into[name]:
            problems.append(f"{name} ({_kind(node)}): has no incoming edge")
    if problems:
        raise LavaUnsupported(f"cannot lower the NIR graph to Lava: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems)
                              + f"\nsupported node types: {', '.join(SUPPORTED)}")


def analyse(graph) -> GraphInfo:
    """Check the graph, find node shapes (by running the reference interpreter on zeros), and
    resolve reshapes into (base source, reshape) terms."""
    import torch

    from ..export.nir_interpreter import run_nir, topological_order

    check_graph(graph)
    order = topological_order(graph)
    into: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for src, dst in graph.edges:
        into[dst].append(src)
    in_name = next(n for n, node in graph.nodes.items() if _kind(node) == "Input")
    in_shape = tuple(int(s) for s in np.atleast_1d(graph.nodes[in_name].input_type["input"]))
    with torch.no_grad():
        rec = run_nir(graph, torch.zeros((1, 1, *in_shape)), record=True)
    shapes = {n: tuple(int(s) for s in t.shape[2:]) for n, t in rec.items()}
    dt = float(np.asarray(graph.metadata.get("dt", 1.0))) if isinstance(graph.metadata, dict) else 1.0
    info = GraphInfo(graph=graph, order=order, into=into, shapes=shapes, input=in_name, dt=dt)

    def base(src: str, reshape):
        """Follow reshapes back to a node that computes something; the reshape nearest the consumer wins."""
        while _kind(graph.nodes[src]) in _VIEWS:
            reshape = reshape if reshape is not None else shapes[src]
            src = into[src][0]
        return src, reshape

    for name in order:
        if _kind(graph.nodes[name]) in _VIEWS or _kind(graph.nodes[name]) == "Input":
            continue
        terms = [base(src, None) for src in into[name]]
        terms = [(s, r if r is not None and r != shapes[s] else None) for s, r in terms]
        info.terms[name] = terms
        for s, _ in terms:
            info.users.setdefault(s, []).append(name)
    return info


def _decay(node, dt: float) -> np.ndarray:
    """``d = float32(dt/tau)`` per neuron, as the reference interpreter computes it."""
    return (dt / np.asarray(node.tau, dtype=np.float64)).astype(np.float32)


def _uniform(a: np.ndarray) -> bool:
    a = np.asarray(a)
    return a.size > 0 and bool(np.all(a == a.reshape(-1)[0]))


def _is_spiking(info: GraphInfo, name: str) -> bool:
    return _kind(info.graph.nodes[name]) in _NEURONS


# ----------------------------------------------------------------------------- the plan
class _Plan:
    """Process specs in creation order, their latencies, and the delay lines between them."""

    def __init__(self, mode: str):
        self.mode = mode
        self.procs: list[dict] = []
        self.by_name: dict[str, dict] = {}
        self.latency: dict[str, int] = {}
        self.outputs: dict[str, list[dict]] = {}     # Output node -> its sinks {sink, latency, scale}
        self.quant: dict[str, dict] = {}             # fixed mode: per synaptic process, exponent and scale

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
        return {"mode": self.mode, "procs": self.procs, "depth": depth, "outputs": self.outputs, **extra}


def _conn(src: str, reshape) -> dict:
    return {"src": src, "reshape": None if reshape is None else tuple(reshape)}


def lower(graph, mode: str = "floating", *, weight_bits: int = 8, lif_model: str = "float32", stall_s: float = 0.0,
          record: bool = False) -> dict:
    """Lower a NIR graph to a plan (plain data, picklable) for :func:`.lava_processes.run_plan`.
    ``record``: also sink the spikes of every LIF/Threshold node (outputs named after the nodes)."""
    if mode not in MODES:
        raise TargetError(f"lava mode must be one of {MODES}, got {mode!r}")
    if lif_model not in ("float32", "lava"):
        raise TargetError(f"lif_model must be 'float32' or 'lava', got {lif_model!r}")
    info = analyse(graph)
    plan = _lower_float(info) if mode == "floating" else _lower_fixed(info, weight_bits)
    if record:
        for name in info.order:
            if _kind(graph.nodes[name]) in _NEURONS:
                _add_outputs(plan, info, f"record:{name}", [(name, None)], None if mode == "floating" else {name: 1.0})
    if stall_s > 0:
        plan.procs.append({"name": "stall", "kind": "stall", "shape": info.shapes[info.input], "inputs": [{"src": info.input}],
                           "params": {"seconds": float(stall_s)}})
    return plan.to_dict(lif_model=lif_model, dt=info.dt, weight_bits=weight_bits, quant=plan.quant,
                        latency=dict(plan.latency), in_shape=info.shapes[info.input], shapes=info.shapes)


def _add_outputs(plan: _Plan, info: GraphInfo, name: str, terms: list[tuple[str, tuple | None]],
                 scales: dict[str, float] | None = None) -> None:
    """One sink per term of Output node ``name``; the host sums them in edge order."""
    sinks = []
    for i, (src, reshape) in enumerate(terms):
        shape = reshape if reshape is not None else plan.by_name[src]["shape"]
        sink = plan.add({"name": f"sink:{name}:{i}", "kind": "sink", "shape": shape, "inputs": [_conn(src, reshape)]})
        sinks.append({"sink": sink["name"], "latency": plan.latency[src], "scale": None if scales is None else scales[src]})
    plan.outputs[name] = sinks


def _lower_float(info: GraphInfo) -> _Plan:
    g, plan = info.graph, _Plan("float")
    prescaled: set[str] = set()
    for name in info.order:
        node, kind = g.nodes[name], _kind(g.nodes[name])
        shape = info.shapes[name]
        if kind == "Input":
            plan.add({"name": name, "kind": "source", "shape": shape})
        elif kind in _VIEWS:
            continue
        elif kind == "Output":
            _add_outputs(plan, info, name, info.terms[name])
        elif kind in _SYNAPSES:
            terms = info.terms[name]
            params = {"node": node, "dt": info.dt}
            users = info.users.get(name, [])
            if len(users) == 1 and _kind(g.nodes[users[0]]) == "LIF" and len(info.terms[users[0]]) == 1:
                params["scale"] = _decay(g.nodes[users[0]], info.dt).reshape(shape)
                prescaled.add(users[0])
            in_shape = terms[0][1] or info.shapes[terms[0][0]]
            plan.add({"name": name, "kind": "synapse", "shape": shape, "in_shape": in_shape,
                      "inputs": [_conn(s, r) for s, r in terms], "params": params})
        elif kind in _NEURONS:
            terms = [_conn(s, r) for s, r in info.terms[name]]
            if kind == "LIF":
                d = _decay(node, info.dt)
                vth = np.asarray(node.v_threshold, np.float32)
                lif = {"du": 1.0, "dv": d, "vth": vth}
                if name not in prescaled:
                    den = plan.add({"name": f"dendrite:{name}", "kind": "dendrite", "shape": shape, "in_shape": shape,
                                    "inputs": terms, "params": {"scale": d}})
                    terms = [_conn(den["name"], None)]
            else:
                lif = {"du": 1.0, "dv": 1.0, "vth": np.asarray(node.threshold, np.float32)}
                if len(terms) > 1 and not all(_is_spiking(info, s) for s, _ in info.terms[name]):
                    den = plan.add({"name": f"dendrite:{name}", "kind": "dendrite", "shape": shape, "in_shape": shape,
                                    "inputs": terms, "params": {"scale": np.ones(shape, np.float32)}})
                    terms = [_conn(den["name"], None)]
            plan.add({"name": name, "kind": "lif", "shape": shape, "inputs": terms, "params": _lif_params(lif, float)})
    return plan


def _lif_params(p: dict, cast) -> dict:
    """Scalars where uniform (Lava's LIF), else per-neuron arrays (our LIFPerNeuron)."""
    arrays = {k: np.asarray(v) for k, v in p.items()}
    if all(_uniform(a) for a in arrays.values()):
        return {"per_neuron": False, **{k: cast(a.reshape(-1)[0]) for k, a in arrays.items()}}
    return {"per_neuron": True, **arrays}


# ----------------------------------------------------------------------------- fixed point
def _op_spec(node, kind: str) -> dict:
    from ..export.nir_interpreter import _int_tuple

    if kind == "Conv2d":
        return {"op": "conv2d", "stride": _int_tuple(node.stride, 2), "padding": _int_tuple(node.padding, 2),
                "dilation": _int_tuple(node.dilation, 2), "groups": int(node.groups)}
    if kind == "Conv1d":
        return {"op": "conv1d", "stride": _int_tuple(node.stride, 1), "padding": _int_tuple(node.padding, 1),
                "dilation": _int_tuple(node.dilation, 1), "groups": int(node.groups)}
    if kind in ("Linear", "Affine"):
        return {"op": "linear"}
    if kind == "SumPool2d":
        return {"op": "sumpool2d", "kernel_size": _int_tuple(node.kernel_size, 2), "stride": _int_tuple(node.stride, 2),
                "padding": _int_tuple(node.padding, 2)}
    raise LavaUnsupported(f"no fixed-point form for {kind}")


def _weight_and_bias(node, kind: str, out_shape) -> tuple[np.ndarray | None, np.ndarray]:
    """The node's weight (None for SumPool2d) and its bias broadcast to the output shape."""
    w = None if kind == "SumPool2d" else np.asarray(node.weight, np.float64)
    b = np.zeros(out_shape)
    if kind in ("Conv2d", "Conv1d"):
        b = np.broadcast_to(np.asarray(node.bias, np.float64).reshape((-1,) + (1,) * (len(out_shape) - 1)), out_shape)
    elif kind == "Affine":
        b = np.broadcast_to(np.asarray(node.bias, np.float64), out_shape)
    return w, np.array(b, np.float64)


def _row_factor(alpha: np.ndarray, kind: str, w, out_shape, name: str) -> np.ndarray:
    """``alpha`` (per output neuron) as a factor on the weight's output rows."""
    alpha = np.asarray(alpha, np.float64).reshape(out_shape)
    if kind in ("Conv2d", "Conv1d"):
        per_ch = alpha.reshape(alpha.shape[0], -1)
        if not np.all(per_ch == per_ch[:, :1]):
            raise LavaUnsupported(f"{name}: fixed point folds neuron parameters into convolution weights, which needs them "
                                  "per channel; they vary within a channel")
        return per_ch[:, 0].reshape((-1,) + (1,) * (w.ndim - 1))
    if kind in ("Linear", "Affine"):
        return alpha[..., None] if w.ndim >= 2 else alpha  # rows of a (..., out, in) weight line up with (..., out)
    return alpha  # SumPool2d: an elementwise factor after the window sums


def _quantise(a: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """``a ~ q * 2**e`` with ``|q| <= 2**(bits-1) - 1``; integer arrays that fit keep ``e = 0``."""
    qmax = 2 ** (bits - 1) - 1
    amax = float(np.abs(a).max(initial=0.0))
    if amax == 0:
        return np.zeros_like(a), 0
    if np.all(a == np.rint(a)) and amax <= qmax:
        return np.rint(a), 0
    e = math.ceil(math.log2(amax / qmax))
    return np.clip(np.rint(a / 2.0 ** e), -qmax, qmax), e


def _row_abs_sum(q: np.ndarray | None, op: dict) -> float:
    """The largest sum of |weights| into one output (an upper bound of the gain from input to output)."""
    if q is None:  # SumPool2d: a window of ones
        return float(np.prod(op["kernel_size"]))
    if op["op"] in ("conv2d", "conv1d"):
        return float(np.abs(q).reshape(q.shape[0], -1).sum(axis=1).max(initial=0.0))
    if op["op"] == "linear":
        return float(np.abs(q).sum(axis=-1).max(initial=0.0))
    return float(np.abs(q).max(initial=0.0))


def _lower_fixed(info: GraphInfo, bits: int) -> _Plan:
    if not 2 <= int(bits) <= 16:
        raise TargetError(f"lava fixed mode: weight_bits must be in [2, 16], got {bits}")
    g, plan = info.graph, _Plan("fixed")
    scale: dict[str, float] = {}                # graded integer process -> real value of one unit
    bound: dict[str, float] = {}                # graded integer process -> largest |value| it can send
    pops: dict[str, dict] = {}                  # population -> {"alpha": per neuron, "count": bool}

    real_bounds: dict[str, float] = {}

    def real_bound(name: str) -> float:
        """An upper bound of |value| of node ``name`` in model units (spikes 1, inputs assumed in
        [-1, 1]; a synaptic node: its largest row sum of |weights| times its input's bound, plus |bias|)."""
        if name not in real_bounds:
            kind = _kind(g.nodes[name])
            if kind in _SYNAPSES:
                w, b = _weight_and_bias(g.nodes[name], kind, info.shapes[name])
                gain = _row_abs_sum(w, _op_spec(g.nodes[name], kind))
                real_bounds[name] = gain * max(real_bound(s) for s, _ in info.terms[name]) + float(np.abs(b).max(initial=0.0))
            else:
                real_bounds[name] = 1.0
        return real_bounds[name]

    def membrane_scale(name: str, theta_min: float) -> int:
        """FIXED_VTH, or less where the worst-case input would overflow Loihi's 24-bit u and v."""
        worst = sum(real_bound(s) for s, _ in info.terms[name]) / theta_min
        fit = (2 ** 23 - 1) / (64 * (worst + 1))
        return int(min(FIXED_VTH, 2 ** max(4, math.floor(math.log2(fit)))))

    def aligned(name: str, vmax: int, gain: np.ndarray) -> int:
        """The largest membrane scale <= vmax at which the population's widest synaptic layer uses
        its full mantissa range (its largest |alpha w| is exactly qmax * 2**e), so that layer's
        per-layer scale loses no bit to the power-of-two exponent."""
        layers = [s for s, _ in info.terms[name] if _kind(g.nodes[s]) in _SYNAPSES and _kind(g.nodes[s]) != "SumPool2d"]
        if not layers or len(layers) < len(info.terms[name]):
            return vmax  # a spike edge straight in keeps a power-of-two scale: its weight alpha stays exact
        widest = max(layers, key=lambda s: np.asarray(g.nodes[s].weight).size)
        w = np.asarray(g.nodes[widest].weight, np.float64)
        gain = np.asarray(gain, np.float64).reshape(info.shapes[widest]) if np.size(gain) > 1 else float(np.asarray(gain).reshape(-1)[0])
        fac = _row_factor(gain, _kind(g.nodes[widest]), w, info.shapes[widest], widest) if np.size(gain) > 1 else gain
        a0 = float(np.abs(fac * w).max(initial=0.0)) * vmax
        qmax = 2 ** (bits - 1) - 1
        if a0 <= qmax or np.all(w == np.rint(w)):
            return vmax
        top = qmax * 2.0 ** math.floor(math.log2(a0 / qmax))
        return max(1, int(math.floor(vmax * top / a0)))

    def population(name: str) -> dict:
        """Input units of a population: a_in = alpha * x (x in model units)."""
        if name in pops:
            return pops[name]
        node, shape = g.nodes[name], info.shapes[name]
        if _kind(node) == "LIF":
            # v_int = v * 64*V / theta, theta = v_threshold raised by the float32 ulp the export took off
            # (the model's "spike when v >= theta"). Lava spikes on v_int > 64*vth with vth = V; a bias of
            # one unit per step (at most 1/d units, 8e-6 theta) makes ties (counts times d landing exactly
            # on theta, common in the attention) fire as in the model.
            d = _decay(node, info.dt).astype(np.float64)
            theta = np.nextafter(np.asarray(node.v_threshold, np.float32), np.float32(np.inf)).astype(np.float64)
            vscale = aligned(name, membrane_scale(name, float(theta.min())), d / theta)
            alpha = d * vscale / theta
            lif = {"du": DECAY_UNITY - 1, "dv": np.rint(d * DECAY_UNITY).astype(np.int64), "vth": vscale, "bias": 1}
            pops[name] = {"alpha": np.broadcast_to(alpha, shape), "count": False, "lif": lif, "vth": vscale}
        else:
            thr = np.asarray(node.threshold, np.float64)
            count = all(_counts(s) for s, _ in info.terms[name]) and np.all(np.floor(thr) < 64)
            if count:  # spike counts: weight 1, spike when count > threshold <=> count > floor(threshold)
                lif = {"du": DECAY_UNITY - 1, "dv": DECAY_UNITY - 1, "vth": np.floor(thr).astype(np.int64), "bias": 0}
                pops[name] = {"alpha": np.ones(shape), "count": True, "lif": lif, "vth": None}
            else:      # a memoryless LIF (d = 1) normalised like the others; NIR's strict x > threshold
                vscale = membrane_scale(name, float(thr.min()))
                lif = {"du": DECAY_UNITY - 1, "dv": DECAY_UNITY - 1, "vth": vscale, "bias": 0}
                pops[name] = {"alpha": np.broadcast_to(vscale / thr, shape), "count": False, "lif": lif, "vth": vscale}
        return pops[name]

    def _counts(src: str) -> bool:
        """The term's values are integer counts of spikes (0/1 sources through integer weights)."""
        kind = _kind(g.nodes[src])
        if kind in _NEURONS:
            return True
        if kind not in ("SumPool2d", "Linear", "Conv1d", "Conv2d"):
            return False
        w = None if kind == "SumPool2d" else np.asarray(g.nodes[src].weight)
        integer = w is None or bool(np.all(w == np.rint(w)))
        no_bias = kind in ("SumPool2d", "Linear") or not np.any(np.asarray(g.nodes[src].bias))
        return integer and no_bias and all(_kind(g.nodes[s]) in _NEURONS for s, _ in info.terms[src])

    def synapse(name: str, target: str | None) -> str:
        """The process of synaptic node ``name`` feeding population ``target`` (its alpha folded
        in), or, with ``target`` None, its graded process (a real scale per integer unit)."""
        pname = name if target is None else f"{name}@{target}"
        if pname in plan.by_name:
            return pname
        node, kind, shape = g.nodes[name], _kind(g.nodes[name]), info.shapes[name]
        terms = info.terms[name]
        srcs = [source(s, name) for s, _ in terms]
        in_scales = {scale[s] for s in srcs}
        if len(in_scales) != 1:
            raise LavaUnsupported(f"{name}: fixed point needs the terms summed into a synaptic layer to share one scale")
        sigma_in = in_scales.pop()
        w, b = _weight_and_bias(node, kind, shape)
        op = _op_spec(node, kind)
        if target is None:  # graded output: integer mantissas, a real scale; shifted right to stay in 24 bits
            s = float(np.abs(w).max(initial=0.0)) / (2 ** (bits - 1) - 1) if w is not None else 1.0
            s = s or 1.0
            q = None if w is None else np.rint(w / s)
            worst = _row_abs_sum(q, op) * max(bound[src] for src in srcs) + float(np.abs(b).max(initial=0.0)) / (s * sigma_in)
            shift = max(0, math.ceil(math.log2(worst / GRADED_MAX))) if worst > GRADED_MAX else 0
            exp, sigma_out, post = -shift, s * sigma_in * 2.0 ** shift, None
            bias = np.rint(b / sigma_out)
            bound[pname] = worst / 2.0 ** shift
        else:
            alpha = population(target)["alpha"].reshape(-1)
            alpha_out = np.asarray(alpha, np.float64).reshape(shape) if alpha.size == int(np.prod(shape)) else None
            if alpha_out is None:
                raise LavaUnsupported(f"{name} -> {target}: shapes do not match for fixed point")
            if w is None:  # SumPool2d: integer window sums, then an elementwise factor
                q, exp = _quantise(alpha_out * sigma_in, bits)
                post, bias = q, np.rint(alpha_out * b)
                q = None
            else:
                fac = _row_factor(alpha_out, kind, w, shape, name)
                q, exp = _quantise(fac * w * sigma_in, bits)
                post, bias = None, np.rint(alpha_out * b)
            sigma_out = None
        if post is not None:
            op = {**op, "post": post}
        op["weight"] = q
        params = {"op_spec": op, "exp": int(exp), "bias": bias if np.any(bias) else None}
        in_shape = terms[0][1] or info.shapes[terms[0][0]]
        plan.add({"name": pname, "kind": "synapse", "shape": shape, "in_shape": in_shape,
                  "inputs": [_conn(src, r) for src, (_, r) in zip(srcs, terms)], "params": params})
        plan.quant[pname] = {"exp": int(exp), "weight_max": int(np.abs(q).max(initial=0)) if q is not None else None,
                             "scale": sigma_out}
        scale[pname] = sigma_out
        return pname

    def source(src: str, consumer: str) -> str:
        """The process that carries ``src``'s values to a synaptic layer (graded or spikes)."""
        kind = _kind(g.nodes[src])
        if kind in _SYNAPSES:
            return synapse(src, None)
        return src

    for name in info.order:
        node, kind, shape = g.nodes[name], _kind(g.nodes[name]), info.shapes[name]
        if kind == "Input":
            plan.add({"name": name, "kind": "source", "shape": shape, "inv_scale": 2.0 ** FIXED_INPUT_FRAC_BITS})
            scale[name] = 2.0 ** -FIXED_INPUT_FRAC_BITS
            bound[name] = 2.0 ** FIXED_INPUT_FRAC_BITS  # inputs assumed in [-1, 1] (images in [0, 1])
        elif kind in _NEURONS:
            pop = population(name)
            conns = []
            for src, reshape in info.terms[name]:
                skind = _kind(g.nodes[src])
                if skind in _SYNAPSES:
                    conns.append(_conn(synapse(src, name), reshape))
                elif pop["count"] and skind in _NEURONS:
                    conns.append(_conn(src, reshape))  # a spike adds 1: no synapse needed
                else:  # a one-to-one synaptic layer carrying the population's alpha
                    sname = f"{src}@{name}"
                    if sname not in plan.by_name:
                        alpha = np.asarray(pop["alpha"], np.float64) * scale[src]
                        q, exp = _quantise(alpha, bits)
                        plan.add({"name": sname, "kind": "synapse", "shape": shape, "in_shape": shape,
                                  "inputs": [_conn(src, reshape)],
                                  "params": {"op_spec": {"op": "scale", "weight": q}, "exp": int(exp), "bias": None}})
                        plan.quant[sname] = {"exp": int(exp), "weight_max": int(np.abs(q).max(initial=0)), "scale": None}
                    conns.append(_conn(sname, None))
            lif = pop["lif"]
            plan.add({"name": name, "kind": "lif", "shape": shape, "inputs": conns, "params": _lif_params(lif, int)})
            scale[name] = bound[name] = 1.0
        elif kind == "Output":
            srcs = [(source(src, name), reshape) for src, reshape in info.terms[name]]
            _add_outputs(plan, info, name, srcs, scales={s: scale[s] for s, _ in srcs})
    return plan


# ----------------------------------------------------------------------------- running
def _worker_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"  # ~50 forked Lava processes: one thread each
    return env


def group_members(pgid: int) -> list[tuple[int, str, str]]:
    """``(pid, state, command line)`` of every process in process group ``pgid`` (from /proc)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
            if int(fields[2]) == pgid:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                members.append((int(entry.name), fields[0], cmd))
        except (OSError, ValueError, IndexError):
            continue
    return members


def _live(pgid: int, keep=lambda cmd: False) -> list[int]:
    return [pid for pid, state, cmd in group_members(pgid) if state not in ("Z", "X") and not keep(cmd)]


def _wait_until(pred, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _stop_group(proc: subprocess.Popen) -> None:
    """End the worker and every Lava process it started (its process group): SIGTERM the worker
    (it unwinds into ``stop()``), then SIGKILL the Lava processes but multiprocessing's resource
    tracker, which then unlinks the shared memory they leave behind, then SIGKILL what remains."""
    pgid = proc.pid
    tracker = lambda cmd: "resource_tracker" in cmd  # noqa: E731
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        _wait_until(lambda: proc.poll() is not None, _KILL_GRACE_S)
    for pid in _live(pgid, tracker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_until(lambda: not _live(pgid), _KILL_GRACE_S)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=_KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _wait_until(lambda: not _live(pgid), _KILL_GRACE_S)


class LavaWorker:
    """A Python subprocess that imports lava once and runs one Lava network per request.

    It runs in its own process group, with every Lava process it forks. A request not answered
    within its timeout, a worker that dies, or a failed run ends the whole group
    (:func:`_stop_group`); the next request starts a fresh worker. Requests are JSON lines on the
    worker's stdin; answers come back on a pipe of their own (Lava's processes print to stdout)."""

    def __init__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="stdeploy-lava-")
        self.dir = Path(self._tmp.name)
        self.proc: subprocess.Popen | None = None
        self._status = None
        self._log = None
        self._requests = 0
        self._plans: dict[int, str] = {}
        self.last_pgid: int | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _start(self) -> None:
        read_fd, write_fd = os.pipe()
        self._log = open(self.dir / "worker.log", "ab")
        cmd = [sys.executable, "-m", "stdeploy.targets.lava_processes", "--serve", str(write_fd)]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=_worker_env(), pass_fds=(write_fd,), start_new_session=True)
        finally:
            os.close(write_fd)
        self._status = os.fdopen(read_fd, "rb", buffering=0)
        self._plans = {}
        self.last_pgid = self.proc.pid  # the worker's process group (its Lava processes too)

    def _log_tail(self, since: int = 0, limit: int = 6000) -> str:
        path = self.dir / "worker.log"
        text = path.read_bytes()[since:].decode(errors="replace") if path.is_file() else ""
        return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2:]

    def run(self, plan: dict, x: np.ndarray, timeout_s: float) -> tuple[dict[str, np.ndarray], dict]:
        """Run ``plan`` on ``x`` within ``timeout_s`` (the worker's start-up included when it starts)."""
        import json
        import select

        t0 = time.monotonic()
        if not self.alive:
            self.close()
            self._start()
        self._requests += 1
        req = self.dir / f"run{self._requests}"
        req.mkdir()
        if id(plan) not in self._plans:  # the worker keeps each plan it has read
            path = self.dir / f"plan{self._requests}.pkl"
            with open(path, "wb") as f:
                pickle.dump(plan, f, protocol=pickle.HIGHEST_PROTOCOL)
            self._plans[id(plan)] = str(path)
        np.save(req / "x.npy", x)
        log_start = (self.dir / "worker.log").stat().st_size
        line = json.dumps({"plan": self._plans[id(plan)], "x": str(req / "x.npy"), "dir": str(req), "out": str(req / "out.npz")})
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # the worker died: found below
        answer = b""
        while not answer.endswith(b"\n"):
            left = timeout_s - (time.monotonic() - t0)
            if left <= 0:
                pgid = self.proc.pid
                self.close(force=True)
                tail = self._log_tail(log_start, 2000)
                raise LavaTimeout(f"lava: the run did not finish within timeout_s={timeout_s:g} s; its process group {pgid} "
                                  "was stopped (raise [lava] timeout_s in the profile for larger runs)"
                                  + (f"\nworker log:\n{tail}" if tail.strip() else ""), pgid=pgid)
            ready, _, _ = select.select([self._status], [], [], min(left, 0.2))
            if ready:
                chunk = self._status.read(65536)
                if not chunk:  # the pipe closed
                    break
                answer += chunk
            elif self.proc.poll() is not None:
                break
        status = json.loads(answer) if answer.endswith(b"\n") else None
        if status is None or not status.get("ok"):
            rc = self.proc.poll()
            self.close(force=True)  # a fresh worker for the next run
            raise TargetError(f"lava: the run failed (worker exit status {rc}):\n{self._log_tail(log_start)}")
        with np.load(req / "out.npz") as z:
            out = {k: np.array(z[k]) for k in z.files}
        for f in req.iterdir():
            f.unlink()
        req.rmdir()
        compile_s, steps_s, _ = (float(v) for v in out.pop("__timing__"))
        meta = {"lava_seconds": float(out.pop("__lava_seconds__")), "lava_compile_start_s": compile_s, "lava_steps_s": steps_s,
                "worker_pid": self.proc.pid}
        return out, meta

    def close(self, force: bool = False) -> None:
        """End the worker: close its stdin so that it exits, or (``force``) end its process group."""
        if self.proc is not None:
            if not force and self.proc.poll() is None:
                try:
                    self.proc.stdin.close()
                    self.proc.wait(timeout=_KILL_GRACE_S)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if self.proc.poll() is None or _live(self.proc.pid):
                _stop_group(self.proc)
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            self.proc = None
        for f in (self._status, self._log):
            if f is not None:
                f.close()
        self._status = self._log = None

    def __del__(self):
        try:
            self.close()
            self._tmp.cleanup()
        except Exception:  # at interpreter shutdown nothing more can be cleaned reliably
            pass


@dataclass
class LavaRunnable:
    """Runs the lowered plan; keeps one :class:`LavaWorker` between calls (``close()`` ends it)."""

    plan: dict
    in_shape: tuple[int, ...]
    timeout_s: float
    info: dict
    worker: LavaWorker = field(default_factory=LavaWorker, repr=False)

    def close(self) -> None:
        self.worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self, x: np.ndarray) -> RunResult:
        import torch

        x = np.asarray(x)
        if x.ndim != 2 + len(self.in_shape) or tuple(x.shape[2:]) != self.in_shape:
            raise TargetError(f"lava: expected input (T, B, {', '.join(map(str, self.in_shape))}), got {tuple(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        timesteps = int(x.shape[0])
        with Timer() as t:
            records, meta = self.worker.run(self.plan, x, self.timeout_s)
            outputs = {}
            for out_name, sinks in self.plan["outputs"].items():
                acc = None
                for s in sinks:  # terms in edge order, each read at its own latency
                    r = np.moveaxis(records[s["sink"]][..., s["latency"]:s["latency"] + timesteps], -1, 0)
                    r = r.astype(np.float32) if s["scale"] is None else (r.astype(np.float64) * s["scale"]).astype(np.float32)
                    acc = torch.from_numpy(r) if acc is None else acc + torch.from_numpy(r)
                outputs[out_name] = acc
            logits = outputs["logits"].mean(dim=0).numpy() if "logits" in outputs else None
            spikes = outputs["spikes"].transpose(-1, -2).numpy() if "spikes" in outputs else None
        info = {**self.info, **meta, "steps": timesteps + int(self.plan["depth"]), "outputs": {k: v.numpy() for k, v in outputs.items()}}
        return RunResult(logits=logits, spikes=spikes, seconds=t.seconds, info=info)


@functools.lru_cache(maxsize=1)
def _lava_import_check() -> tuple[bool, str]:
    """Import lava in a subprocess (importing it here would set multiprocessing's start method)."""
    code = ("import lava.magma.core.run_configs, lava.proc.lif.process, lava.proc.io.source; "
            "from importlib.metadata import version; print(version('lava-nc'))")
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_worker_env())
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"cannot check lava: {err}"
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["import failed"])[-1]
        return False, f"lava cannot be imported ({last}); install it: {INSTALL_HINT}"
    return True, f"lava-nc {res.stdout.strip()} (Loihi2SimCfg, CPU simulation)"


class LavaTarget:
    name = "lava"
    default_device = "loihi2"
    # floating mode: spikes bit-exact, logits within float32 rounding of the host-side mean over T;
    # fixed mode: at least this fraction of output spikes equal to float mode (measured 0.94 with
    # 8-bit weights on sdt-tiny, 0.90 with per-neuron sLIF; see the module docstring and the tests)
    tolerance = {"spike_mismatches": 0, "logits_atol": 1e-5, "fixed_spike_agreement": 0.89}

    def available(self) -> tuple[bool, str]:
        import importlib.util

        if importlib.util.find_spec("lava") is None:
            return False, f"lava-nc is not installed; {INSTALL_HINT}"
        return _lava_import_check()

    def compile(self, export_dir: Path, profile: DeviceProfile, *, timeout_s: float | None = None, lif_model: str = "float32",
                stall_s: float = 0.0, record: bool = False, **options) -> LavaRunnable:
        """Lower ``model.nir`` of ``export_dir`` for ``profile`` (``[lava] mode``, ``weight_bits``,
        ``timeout_s``; ``[limits]`` for the core-mapping report). ``lif_model="lava"`` runs float
        LIFs with Lava's own float64 model instead of ours (to measure it); ``stall_s`` adds a
        process that sleeps that long in every step (a testing aid for the timeout path)."""
        import nir

        from .lava_mapping import mapping_report

        if options:
            raise TargetError(f"lava: unknown compile option(s) {sorted(options)}; known: timeout_s, lif_model, stall_s, record")
        path, _ = read_manifest(export_dir, "nir")
        try:
            graph = nir.read(str(path))
        except Exception as err:  # nir/h5py raise many types for a bad file
            raise TargetError(f"{path}: cannot read the NIR graph: {type(err).__name__}: {err}") from err
        lava = dict(profile.lava or {})
        mode = str(lava.get("mode", "floating"))
        bits = int(lava.get("weight_bits", 8))
        timeout = float(timeout_s if timeout_s is not None else lava.get("timeout_s", DEFAULT_TIMEOUT_S))
        if not timeout > 0:
            raise TargetError(f"lava: timeout_s must be > 0, got {timeout}")
        plan = lower(graph, mode, weight_bits=bits, lif_model=lif_model, stall_s=stall_s, record=record)
        kinds: dict[str, int] = {}
        for spec in plan["procs"]:
            kinds[spec["kind"]] = kinds.get(spec["kind"], 0) + 1
        info = {
            "target": "lava", "file": str(path), "mode": mode, "weight_bits": bits if mode == "fixed" else None,
            "run_config": "Loihi2SimCfg" + (" (fixed point: PyLifModelBitAcc + integer synapses)" if mode == "fixed" else
                                            f" (float32: {'PyLifModelFloat' if lif_model == 'lava' else 'PyLifModelFloat32'})"),
            "depth": int(plan["depth"]), "processes": kinds, "timeout_s": timeout,
            "mapping": mapping_report(graph, plan["shapes"], profile.limits),
        }
        if mode == "fixed":
            info["quantisation"] = plan["quant"]
        return LavaRunnable(plan=plan, in_shape=tuple(plan["in_shape"]), timeout_s=timeout, info=info)
