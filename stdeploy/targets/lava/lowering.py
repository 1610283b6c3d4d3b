"""The NIR graph lowered to a Lava plan (:func:`lower`), and the float mode's lowering.

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
  :class:`~.processes.Dendrite` sums the terms in NIR edge order and scales. Lava's LIF takes
  scalar ``du``, ``dv``, ``vth``: a population with per-neuron values (sLIF) becomes our
  ``LIFPerNeuron`` (Lava's equations with arrays) rather than folding ``1/theta`` into weights,
  which would change the float32 rounding.
* ``Threshold``  -> Lava's ``LIF`` with ``du = dv = 1``, ``vth = threshold``: ``v = a_in``, spike
  ``v > vth``, memoryless. AND/OR units sum 0/1 spikes, exact in any order, so their inputs connect
  straight to ``a_in``; other sums go through a ``Dendrite`` with scale 1.
* ``Conv2d``, ``Conv1d`` (per-token linear), ``Linear``/``Affine`` (token sum, mask broadcast,
  token mean, classifier), ``SumPool2d`` -> our batch-aware :class:`~.processes.Synapse`.
* ``Flatten``    -> no process: a reshape virtual port on the connection (``OutPort.reshape``).
* ``Output``     -> one ``lava.proc.io.sink.RingBuffer`` per incoming edge (its model also saves
  the buffer to a file on the last step: ``Var.get`` sends arrays element by element, 10 s for one
  32-sample run); the terms are summed on the host in edge order, each read at its own latency.

Why this lowering does not use Lava's own Dense, Sparse and Conv (:mod:`.standard` does, as the
other lowering, ``[lava] lowering = "standard"``, at batch 1 and within a float tolerance): they have no batch dimension (``Dense`` maps a
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
term passes a :class:`~.processes.Delay` (one per source, one tap per needed lag), so every
node sees the inputs of model step ``t`` at simulation step ``t + latency``. A synapse computes
only while its input carries data (``latency <= step < latency + T``) and sends zeros otherwise:
membranes stay exactly 0 through the fill steps (no bias leaks in). The run takes ``T + depth``
steps (sdt-tiny: depth 12, 16 steps) and each sink is read at ``[latency, latency + T)``.

Batch
-----
The simulator has no batch dimension; here every population has one, ``(B, *node shape)``: Lava's
LIF is elementwise and our synapses act per sample, so one Lava network runs the whole batch and
Lava's start-up (building and starting one process per spec) is paid once per call, not per sample.

Float mode: exact
-----------------
The synapse model evaluates its node with the reference interpreter's own evaluator
(:mod:`stdeploy.export.nir_interpreter`) in float32, on a batch padded with zeros to the
reference's call shape (``T*B`` rows: CPU convolution kernels pick algorithms by batch size; a
batch of 1 differs in the last bit). LIFs run Lava's LIF equations in float32
(:class:`~.processes.PyLifModelFloat32`, bound to Lava's ``LIF`` process). Lava's own
``PyLifModelFloat`` computes membranes in float64; ``compile(..., lif_model="lava")`` selects it
(only float32 matches by construction).

Fixed mode: :mod:`.fixed_point`.
"""

from __future__ import annotations

import numpy as np

from ..base import TargetError
from .fixed_point import lower_fixed
from .graph import NEURONS, SYNAPSES, VIEWS, GraphInfo, analyse, decay, is_spiking, node_kind
from .plan import Plan, add_outputs, conn, lif_params

__all__ = ["MODES", "lower", "lower_float"]

MODES = ("floating", "fixed")


def lower(graph, mode: str = "floating", *, weight_bits: int = 8, lif_model: str = "float32", stall_s: float = 0.0,
          record: bool = False, unproven: str = "refuse") -> dict:
    """Lower a NIR graph to a plan (plain data, picklable) for :func:`.processes.run_plan`.
    ``record``: also sink the spikes of every LIF/Threshold node (outputs named after the nodes).
    ``unproven`` (fixed mode, exact graphs): ``"refuse"`` a population whose proven range exceeds
    Loihi's 24-bit registers, or ``"guard"`` it at run time (:func:`.fixed_point.lower_fixed`)."""
    if mode not in MODES:
        raise TargetError(f"lava mode must be one of {MODES}, got {mode!r}")
    if lif_model not in ("float32", "lava"):
        raise TargetError(f"lif_model must be 'float32' or 'lava', got {lif_model!r}")
    info = analyse(graph)
    plan = lower_float(info) if mode == "floating" else lower_fixed(info, weight_bits, unproven)
    if record:
        for name in info.order:
            if node_kind(graph.nodes[name]) in NEURONS:
                add_outputs(plan, info, f"record:{name}", [(name, None)], None if mode == "floating" else {name: 1.0})
    if stall_s > 0:
        plan.procs.append({"name": "stall", "kind": "stall", "shape": info.shapes[info.input], "inputs": [{"src": info.input}],
                           "params": {"seconds": float(stall_s)}})
    return plan.to_dict(lif_model=lif_model, dt=info.dt, weight_bits=weight_bits, quant=plan.quant,
                        latency=dict(plan.latency), in_shape=info.shapes[info.input], shapes=info.shapes)


def lower_float(info: GraphInfo) -> Plan:
    g, plan = info.graph, Plan("float")
    prescaled: set[str] = set()
    for name in info.order:
        node, kind = g.nodes[name], node_kind(g.nodes[name])
        shape = info.shapes[name]
        if kind == "Input":
            plan.add({"name": name, "kind": "source", "shape": shape})
        elif kind in VIEWS:
            continue
        elif kind == "Output":
            add_outputs(plan, info, name, info.terms[name])
        elif kind in SYNAPSES:
            terms = info.terms[name]
            params = {"node": node, "dt": info.dt}
            users = info.users.get(name, [])
            if len(users) == 1 and node_kind(g.nodes[users[0]]) == "LIF" and len(info.terms[users[0]]) == 1:
                params["scale"] = decay(g.nodes[users[0]], info.dt).reshape(shape)
                prescaled.add(users[0])
            in_shape = terms[0][1] or info.shapes[terms[0][0]]
            plan.add({"name": name, "kind": "synapse", "shape": shape, "in_shape": in_shape,
                      "inputs": [conn(s, r) for s, r in terms], "params": params})
        elif kind in NEURONS:
            terms = [conn(s, r) for s, r in info.terms[name]]
            if kind == "LIF":
                d = decay(node, info.dt)
                vth = np.asarray(node.v_threshold, np.float32)
                lif = {"du": 1.0, "dv": d, "vth": vth}
                if name not in prescaled:
                    den = plan.add({"name": f"dendrite:{name}", "kind": "dendrite", "shape": shape, "in_shape": shape,
                                    "inputs": terms, "params": {"scale": d}})
                    terms = [conn(den["name"], None)]
            else:
                lif = {"du": 1.0, "dv": 1.0, "vth": np.asarray(node.threshold, np.float32)}
                if len(terms) > 1 and not all(is_spiking(info, s) for s, _ in info.terms[name]):
                    den = plan.add({"name": f"dendrite:{name}", "kind": "dendrite", "shape": shape, "in_shape": shape,
                                    "inputs": terms, "params": {"scale": np.ones(shape, np.float32)}})
                    terms = [conn(den["name"], None)]
            plan.add({"name": name, "kind": "lif", "shape": shape, "inputs": terms, "params": lif_params(lif, float)})
    return plan
