"""The NIR graph lowered to Lava's own standard processes, run as the chip runs: one sample at a
time (batch 1), the samples of a call streamed back to back through one network.

Contract
--------
:func:`lower_standard` turns a checked graph (:func:`.graph.analyse`) into a *standard plan*:
plain, picklable data naming only processes that ship with lava-nc 0.10 (float mode below; fixed
mode at the end):

* every ``LIF`` and ``Threshold`` node -> one ``lava.proc.lif.process.LIFReset`` population of
  ``prod(shape)`` neurons (channel-first shapes flattened in C order, as NIR's ``Flatten``; so
  reshapes cost nothing). A LIF with ``d = float32(dt/tau)``: ``du = 1`` (``u = a_in``), ``dv = d``,
  ``vth = v_threshold``, ``bias_mant = d * b`` where ``b`` sums the biases of the synaptic terms:
  Lava's ``v = v*(1-dv) + a_in + bias`` is NIR's ``v += d*(W x + b - v)`` when the incoming weights
  are ``d * W``. A ``Threshold`` is ``du = dv = 1`` (``v = a_in + bias``: memoryless), ``vth =
  threshold``. Lava's LIF takes scalar ``du``, ``dv``, ``vth``: per-neuron thresholds (the pruned
  models' sLIF compensation) are folded into the rows (``d / theta_i``, ``vth = 1``: the membrane
  in units of its threshold); per-neuron leaks are refused (:class:`~.graph.LavaUnsupported`), not
  approximated;
* every synaptic node (``Conv2d``, ``Conv1d``, ``Linear``, ``Affine``, ``SumPool2d``) -> its exact
  weight matrix ``(out, in)`` (the node applied to one-hot inputs: every entry is one weight, so the
  unrolling is exact), held by ``lava.proc.dense.process.Dense`` or, at most
  :data:`SPARSE_DENSITY` nonzeros (convolutions, token-wise layers, pruned layers),
  ``lava.proc.sparse.process.Sparse``. Chains of synaptic nodes (the head's token mean then the
  classifier) are composed into one matrix. A spike edge straight into a population (the residual
  stream, the AND units) is an identity matrix (a synapse is the only way into a compartment);
* where terms of different synaptic depth meet, the shorter term is delayed by the difference
  (Loihi 2 holds 0-63 steps): a spike edge (an identity) becomes a ``DelaySparse`` with every
  synapse delayed; a layer's matrix stays an undelayed ``Dense``/``Sparse`` fed by a *relay*
  population (``LIFReset`` with ``du = dv = 1``, ``vth = 0.5``: spike in, spike out) behind a
  delayed identity, one relay per source and lag. (Lava's float ``DelayDense``/``DelaySparse``
  models expand their whole matrix once per delay value in every step: about 0.45 s a step for
  sdt-tiny's 1024 x 1024 position-embedding convolution behind a 7-step delay. Loihi 2 could hold
  those delays in the synapses; the relays cost neurons instead, and the resource report counts
  them.) The graded input cannot be delayed (Lava's delayed synapses take binary spikes);
* a Spikformer attention block (the NIR export's AND units, recognised by
  :func:`.attention.find_blocks`, never unrolled) -> ``lava.proc.prodneuron.process.ProdNeuron``
  and ``lava.proc.graded.process.GradedVec`` populations (``node_kind`` ``product`` / ``graded``)
  computing ``Q·(Kᵀ·V)`` exactly, or the AND units built from their indices (``attention="and"``);
  see :mod:`.attention`;
* the input -> ``lava.proc.io.source.RingBuffer`` (graded: ``num_message_bits = 24`` on the first
  synapses); every Output term -> ``lava.proc.io.sink.RingBuffer`` on a population's spikes or on a
  synapse's graded output, whose bias (the classifier's) is added on the host.

Delays and streaming
--------------------
A synapse delays by one step (``Dense`` sends the activation of the previous step); a population
at latency ``L`` (synapses on its longest path from the input) receives frame ``f`` at simulation
step ``f + 1 + L``. A call with ``B`` samples of ``T`` frames runs ``B*T + depth`` steps; every
population resets ``u`` and ``v`` at the first frame of each sample (``LIFReset`` with
``reset_interval = T``, ``reset_offset = (1 + L) mod T``), so the samples do not see each other
and what the pipeline's fill steps integrate (biases) is discarded. A sink reads frame ``f`` at
index ``f + latency``.

Precision
---------
Lava's float models (``PyDenseModelFloat``, ``PySparseModelFloat``, ``PyLifResetModelFloat``)
compute in float64, with ``d`` folded into the weights and the terms of a population summed by
Lava in its own order; the reference interpreter computes in float32. A membrane within float32
rounding of the threshold can therefore fire on one side and not the other (then the neuron's
later steps differ too): spikes are compared with a tolerance
(:data:`SPIKE_AGREEMENT`), logits with :data:`LOGITS_ATOL` where every spike agrees.

``mode = "fixed"`` (:func:`to_fixed`): the same processes with Lava's bit-accurate models
(``PyLifResetModelBitAcc``, ``PyDenseModelBitAcc``, ``PySparseModelBitAcc``,
``PyDelaySparseModelBitAcc``, fixed-point RingBuffers): 8-bit weight mantissas with one exponent
per synaptic process, 12-bit decays, integer thresholds and biases, the input sent as
``round(x * 256)``. Its spikes differ from the float reference where 8-bit weights round a
membrane across its threshold (the same floor as the exact lowering's fixed mode, see
:mod:`.fixed_point`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from scipy import sparse

from ...export.nir_interpreter import EVALUATORS, EvalContext, int_tuple
from .attention import ATTENTION_LOWERINGS, find_blocks, lower_block
from .fixed_point import fit_input_contract, graph_mode, loihi2_population, quantise
from .graph import NEURONS, SYNAPSES, GraphInfo, LavaUnsupported, analyse, decay, node_kind, uniform

__all__ = ["SPARSE_DENSITY", "SPIKE_AGREEMENT", "LOGITS_ATOL", "MAX_DELAY", "MAX_SYNAPSES_PER_LAYER", "GRADED_BITS",
           "LAVA_PROCESSES", "ACT_SHIFT", "A_IN_MAX", "INPUT_SCALE", "BIAS_MAX", "VTH_MAX", "lower_standard", "to_fixed",
           "synaptic_matrix", "process_classes"]

SPARSE_DENSITY = 0.25     # a weight matrix with at most this fraction of nonzeros is held by Sparse
SPIKE_AGREEMENT = 0.999   # float mode: at least this fraction of output spikes equal to the float32 reference
LOGITS_ATOL = 1e-4        # float mode: logits (float64 sums of float32 weights) within this of the reference
MAX_DELAY = 63            # Loihi 2: 6-bit synaptic delays, 0-63 steps (Lava's PyDelayDenseModelBitAcc docstring)
MAX_SYNAPSES_PER_LAYER = 50_000_000  # a layer unrolled past this is refused (the matrices live in memory, 16 B a synapse)
GRADED_BITS = 24          # num_message_bits of synapses fed by the (graded) input

# plan kinds -> the Lava process class each becomes (module path, class name)
LAVA_PROCESSES = {
    "source": "lava.proc.io.source.RingBuffer",
    "sink": "lava.proc.io.sink.RingBuffer",
    "population": "lava.proc.lif.process.LIFReset",
    "dense": "lava.proc.dense.process.Dense",
    "sparse": "lava.proc.sparse.process.Sparse",
    "delay_dense": "lava.proc.dense.process.DelayDense",
    "delay_sparse": "lava.proc.sparse.process.DelaySparse",
    "product": "lava.proc.prodneuron.process.ProdNeuron",   # Spikformer attention's products (:mod:`.attention`)
    "graded": "lava.proc.graded.process.GradedVec",         # its graded sums M = Kᵀ·V
}


def synaptic_matrix(node, in_shape: tuple[int, ...], dt: float = 1.0, chunk: int = 512) -> tuple[sparse.csr_matrix, np.ndarray]:
    """The exact matrix ``W (out, in)`` (CSR, float64) and bias ``b (out,)`` of synaptic node
    ``node`` on a flat input of ``prod(in_shape)`` (C order): ``node(x) = W @ x + b``. Found by
    applying the reference evaluator, bias zeroed, to one-hot inputs (each output entry is one
    weight times 1: exact) in chunks; ``b`` is the node on a zero input."""
    n_in = int(np.prod(in_shape))
    evaluate = EVALUATORS[type(node)]
    if node_kind(node) == "Conv2d" and not isinstance(node.padding, (str, bytes)):
        with torch.no_grad():
            b = evaluate(node, torch.zeros((1, *in_shape)), EvalContext(1, 1, dt, torch.device("cpu")))
        return _conv2d_matrix(node, in_shape, tuple(b.shape[1:])), b[0].reshape(-1).numpy().astype(np.float64)
    unbiased = copy.copy(node)
    if getattr(node, "bias", None) is not None:
        unbiased.bias = np.zeros_like(np.asarray(node.bias, np.float32))
    rows, cols, vals = [], [], []
    n_out = 0
    with torch.no_grad():
        zero = torch.zeros((1, *in_shape))
        b = evaluate(node, zero, EvalContext(1, 1, dt, torch.device("cpu")))[0].reshape(-1).numpy().astype(np.float64)
        for lo in range(0, n_in, chunk):
            hi = min(n_in, lo + chunk)
            eye = torch.zeros((hi - lo, n_in))
            eye[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
            y = evaluate(unbiased, eye.reshape(hi - lo, *in_shape), EvalContext(1, hi - lo, dt, torch.device("cpu")))
            y = y.reshape(hi - lo, -1).numpy()
            n_out = y.shape[1]
            i, o = np.nonzero(y)
            _check_size(sum(len(v) for v in vals) + len(i), node)
            rows.append(o)
            cols.append(i + lo)
            vals.append(y[i, o].astype(np.float64))
    w = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_out, n_in))
    return w, b


def _check_size(synapses: int, node) -> None:
    if synapses > MAX_SYNAPSES_PER_LAYER:
        raise LavaUnsupported(f"{node_kind(node)} layer: more than {MAX_SYNAPSES_PER_LAYER:,} synapses when unrolled "
                              f"({synapses:,}); too large for the standard lowering's matrices")


def _conv2d_matrix(node, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> sparse.csr_matrix:
    """A ``Conv2d``'s matrix built from its weights' indices (as :func:`synaptic_matrix` defines it;
    one-hot evaluation of a wide convolution costs seconds)."""
    w = np.asarray(node.weight, np.float32)
    c_in, h, wd = in_shape
    n_out_ch, oh, ow = out_shape
    (sy, sx), (py, px), (dy, dx) = (int_tuple(node.stride, 2), int_tuple(node.padding, 2), int_tuple(node.dilation, 2))
    groups = int(node.groups)
    o, ci, ky, kx = np.nonzero(w)
    _check_size(len(o) * oh * ow, node)
    val = w[o, ci, ky, kx].astype(np.float64)
    cin_abs = (o // (n_out_ch // groups)) * (c_in // groups) + ci
    oy, ox = np.meshgrid(np.arange(oh), np.arange(ow), indexing="ij")
    oy, ox = oy.reshape(1, -1), ox.reshape(1, -1)
    iy = oy * sy - py + ky[:, None] * dy
    ix = ox * sx - px + kx[:, None] * dx
    ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < wd)
    rows = (o[:, None] * (oh * ow) + oy * ow + ox)[ok]
    cols = (cin_abs[:, None] * (h * wd) + iy * wd + ix)[ok]
    vals = np.broadcast_to(val[:, None], ok.shape)[ok]
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n_out_ch * oh * ow, c_in * h * wd))


class _Term:
    """A synaptic path into a population: a spiking (or input) source, a matrix and a bias;
    ``message_bits`` > 0 for a graded source other than the input (Spikformer attention's products,
    at most ``in_max``)."""

    def __init__(self, src: str, weight: np.ndarray, bias: np.ndarray, nodes: list[str], message_bits: int = 0,
                 in_max: float = 1.0):
        self.src, self.weight, self.bias, self.nodes = src, weight, bias, nodes
        self.message_bits, self.in_max = message_bits, in_max


def _terms_of(info: GraphInfo, name: str, cache: dict) -> list[_Term]:
    """The synaptic paths into node ``name`` (a population or an Output), chains composed."""
    g = info.graph
    out = []
    for src, _reshape in info.terms[name]:
        kind = node_kind(g.nodes[src])
        size = int(np.prod(info.shapes[src]))
        if kind in NEURONS or kind == "Input":
            out.append(_Term(src, None, np.zeros(size), []))  # weight None: the identity
            continue
        if kind not in SYNAPSES:
            raise LavaUnsupported(f"{name}: input {src} ({kind}) has no standard-process lowering")
        if src not in cache:
            inner = _terms_of(info, src, cache)
            if len(inner) != 1:
                raise LavaUnsupported(f"{src} ({kind}): a synaptic layer of a sum of {len(inner)} terms has no standard-process "
                                      "lowering (Lava's Dense takes one input)")
            t = inner[0]
            in_src = info.terms[src][0]
            in_shape = in_src[1] or info.shapes[in_src[0]]
            w, b = synaptic_matrix(g.nodes[src], tuple(in_shape), info.dt)
            cache[src] = _Term(t.src, w if t.weight is None else w @ t.weight, w @ t.bias + b, t.nodes + [src])
        out.append(cache[src])
    return out


def _matrix(w: sparse.csr_matrix | None, scale: float | np.ndarray = 1.0, size: int = 0, sparse_: bool = False) -> dict:
    """``scale * w`` (``scale`` a scalar or one factor per row) as plan data (``w`` None: the
    identity of ``size``): dense, or sparse parts
    (rows, cols, values) where it is sparse enough or ``sparse_`` is set."""
    w = sparse.identity(size, format="csr") if w is None else w
    w = (sparse.diags(np.asarray(scale, np.float64)) @ w if np.ndim(scale) else w * float(scale)).tocoo()
    nnz = int(np.count_nonzero(w.data))
    shape = tuple(int(n) for n in w.shape)
    if sparse_ or nnz <= SPARSE_DENSITY * shape[0] * shape[1]:
        keep = w.data != 0
        return {"format": "sparse", "shape": shape, "rows": w.row[keep].astype(np.int64), "cols": w.col[keep].astype(np.int64),
                "values": w.data[keep], "nnz": nnz}
    return {"format": "dense", "shape": shape, "values": w.toarray(), "nnz": nnz}


def _relay(pops: list, synapses: list, latency: dict, src: str, lag: int, size: int) -> str:
    """The relay population that repeats ``src``'s spikes ``lag`` steps later (made once per
    ``(src, lag)``): an identity synapse delayed ``lag - 1`` steps into ``LIFReset`` neurons with
    ``du = dv = 1``, ``vth = 0.5`` (``v = a_in``: a spike in, a spike out; exact)."""
    name = f"relay:{src}:{lag}"
    if name not in latency:
        latency[name] = latency[src] + lag
        pops.append({"name": name, "node_kind": "relay", "size": size, "shape": (size,), "latency": latency[name],
                     "du": 1.0, "dv": 1.0, "vth": 0.5, "bias": np.zeros(size)})
        m = _matrix(None, 1.0, size)
        synapses.append({"name": f"identity:{src}->{name}", "kind": ("delay_" if lag > 1 else "") + m["format"], "src": src,
                         "dst": name, "matrix": m, "delay": lag - 1, "nodes": [], "graded": False})
    return name


def lower_standard(graph_or_info, mode: str = "floating", weight_bits: int = 8, attention: str = "product") -> dict:
    """The standard plan of a NIR graph (or its :class:`~.graph.GraphInfo`, or a float standard
    plan to convert): populations,
    synapses (matrices, delays), the source and the sinks, with latencies; see the module
    docstring. ``mode = "fixed"``: the same network in Loihi's integers (:func:`to_fixed`).
    ``attention``: how Spikformer attention blocks are built (:mod:`.attention`: ``"product"``
    neurons, or the export's ``"and"`` units)."""
    if mode not in ("floating", "fixed"):
        raise LavaUnsupported(f"the standard-process lowering takes mode 'floating' or 'fixed', got {mode!r}")
    if attention not in ATTENTION_LOWERINGS:
        raise LavaUnsupported(f"the standard-process lowering takes attention in {ATTENTION_LOWERINGS}, got {attention!r}")
    if isinstance(graph_or_info, dict) and graph_or_info.get("lowering") == "standard":  # an already-lowered float plan
        plan = graph_or_info
    else:
        plan = _lower_float(graph_or_info, attention)
    return plan if mode == "floating" else to_fixed(plan, weight_bits)


def _attention_terms(info: GraphInfo, name: str, blocks: dict, attention: str, latency: dict, pops: list,
                     synapses: list) -> list[_Term] | None:
    """The term into ``name`` when it is a Spikformer block's attention LIF (the block's own
    populations and synapses added, :func:`.attention.lower_block`), else None."""
    srcs = [s for s, _ in info.terms[name]]
    if not any(s in blocks for s in srcs):
        return None
    if len(srcs) != 1:
        raise LavaUnsupported(f"{name}: a Spikformer attention sum plus {len(srcs) - 1} other term(s) is not lowered")
    block = blocks[srcs[0]]
    new_pops, new_syns, term = lower_block(block, latency, attention)
    pops.extend(new_pops)
    synapses.extend(new_syns)
    rows, cols, n_src, values = term["weight"]
    w = sparse.csr_matrix((values, (rows, cols)), shape=(int(np.prod(info.shapes[name])), n_src))
    return [_Term(term["src"], w, np.zeros(w.shape[0]), term["nodes"], term["message_bits"], term["in_max"])]


def _lower_float(graph_or_info, attention: str = "product") -> dict:
    info = graph_or_info if isinstance(graph_or_info, GraphInfo) else analyse(graph_or_info)
    g = info.graph
    cache: dict[str, _Term] = {}
    latency = {info.input: 0}
    pops, synapses, problems = [], [], []
    blocks = find_blocks(info)  # Spikformer attention: built by .attention, its AND units never unrolled
    skip = {b.and_node for b in blocks.values()}
    loihi2 = _loihi2_facts(info)  # a --quantize loihi2 graph: its own integers, for to_fixed
    for name in info.order:
        node, kind = g.nodes[name], node_kind(g.nodes[name])
        if kind not in NEURONS or name in skip:
            continue
        terms = _attention_terms(info, name, blocks, attention, latency, pops, synapses) or _terms_of(info, name, cache)
        size = int(np.prod(info.shapes[name]))
        latency[name] = max(latency[t.src] + 1 for t in terms)  # set before any refusal: later nodes need it to be listed
        if kind == "LIF":
            d = decay(node, info.dt).astype(np.float64).reshape(-1)
            vth = np.asarray(node.v_threshold, np.float32).astype(np.float64).reshape(-1)
            if not uniform(d):
                problems.append(f"{name} (LIF): tau varies per neuron; Lava's LIF takes one du, dv per population")
                continue
            d0 = float(d[0])
            if uniform(vth):
                params = {"du": 1.0, "dv": d0, "vth": float(vth[0]), "scale": d0}
            else:  # per-neuron thresholds: the membrane in units of theta_i (rows scaled by d / theta_i), vth = 1
                if np.any(vth <= 0):
                    problems.append(f"{name} (LIF): thresholds <= 0")
                    continue
                params = {"du": 1.0, "dv": d0, "vth": 1.0, "scale": d0 / vth}
        else:
            th = np.asarray(node.threshold, np.float64).reshape(-1)
            if not uniform(th):
                problems.append(f"{name} (Threshold): thresholds vary per neuron; Lava's LIF takes one vth per population")
                continue
            params = {"du": 1.0, "dv": 1.0, "vth": float(th[0]), "scale": 1.0}
        bias = np.zeros(size)
        for t in terms:
            bias = bias + t.bias
        pops.append({"name": name, "node_kind": kind, "size": size, "shape": info.shapes[name], "latency": latency[name],
                     "du": params["du"], "dv": params["dv"], "vth": params["vth"], "bias": params["scale"] * bias})
        if loihi2 is not None and kind == "LIF":
            pops[-1]["loihi2"] = _loihi2_population(info, name, params["scale"], loihi2)
        for t in terms:
            lag = latency[name] - 1 - latency[t.src]
            graded = node_kind(g.nodes[t.src]) == "Input" if t.src in g.nodes else False
            if lag > 0 and t.message_bits:
                problems.append(f"{name}: the graded term from {t.src} arrives {lag} step(s) early; Lava's delayed synapses "
                                "carry binary spikes only")
                continue
            if lag > MAX_DELAY:
                problems.append(f"{name}: term from {t.src} needs a delay of {lag} steps; Loihi 2 holds at most {MAX_DELAY}")
                continue
            if lag > 0 and graded:
                problems.append(f"{name}: the graded input reaches it {lag} step(s) early; Lava's delayed synapses carry "
                                "binary spikes only")
                continue
            src = t.src
            if lag > 0 and t.nodes:  # a layer's matrix behind a delay: delay the spikes into a relay instead
                src = _relay(pops, synapses, latency, t.src, lag, int(np.prod(info.shapes[t.src])))
                lag = 0
            m = _matrix(t.weight, params["scale"], size, sparse_=lag > 0)
            synapses.append({"name": f"{'+'.join(t.nodes) or 'identity'}:{src}->{name}", "kind": ("delay_" if lag > 0 else "")
                             + m["format"], "src": src, "dst": name, "matrix": m, "delay": lag, "nodes": t.nodes,
                             "graded": graded, "message_bits": t.message_bits, "in_max": t.in_max})
    if problems:
        raise LavaUnsupported("cannot lower the NIR graph to Lava's standard processes: " + f"{len(problems)} problem(s):\n  - "
                              + "\n  - ".join(problems))
    outputs: dict[str, list[dict]] = {}
    for name in info.order:
        if node_kind(g.nodes[name]) != "Output":
            continue
        outs = []
        for i, t in enumerate(_terms_of(info, name, cache)):
            if not t.nodes:  # a population's spikes (or the input) straight to the sink
                outs.append({"sink": f"sink:{name}:{i}", "src": t.src, "synapse": None, "latency": latency[t.src],
                             "size": int(np.prod(info.shapes[t.src])), "bias": None})
                continue
            syn = {"name": f"{'+'.join(t.nodes)}:{t.src}->{name}", "kind": None, "src": t.src, "dst": f"sink:{name}:{i}",
                   "matrix": _matrix(t.weight), "delay": 0, "nodes": t.nodes, "graded": node_kind(g.nodes[t.src]) == "Input"}
            syn["kind"] = syn["matrix"]["format"]
            synapses.append(syn)
            outs.append({"sink": f"sink:{name}:{i}", "src": t.src, "synapse": syn["name"], "latency": latency[t.src] + 1,
                         "size": t.weight.shape[0], "bias": t.bias})
        outputs[name] = outs
    depth = max([p["latency"] for p in pops] + [o["latency"] for outs in outputs.values() for o in outs] + [0])
    in_size = int(np.prod(info.shapes[info.input]))
    return {"lowering": "standard", "mode": "float", "input": info.input, "in_shape": info.shapes[info.input],
            "in_size": in_size, "populations": pops, "synapses": synapses, "outputs": outputs, "depth": depth,
            "shapes": info.shapes, "dt": info.dt, "latency": latency, "attention": attention if blocks else None,
            "loihi2": None if loihi2 is None else {"input_contract": loihi2["contract"].to_dict()}}


def _loihi2_facts(info: GraphInfo) -> dict | None:
    """For a ``--quantize loihi2`` graph: its input contract (kept, never refitted), every LIF's
    proven membrane and ``T`` (:func:`.fixed_point.fit_input_contract`); None for other graphs."""
    if graph_mode(info.graph) != "loihi2":
        return None
    contract, membranes = fit_input_contract(info)
    return {"contract": contract, "membranes": membranes, "timesteps": int(info.graph.metadata.get("timesteps", 0))}


def _loihi2_population(info: GraphInfo, name: str, row_scale, facts: dict) -> dict:
    """A loihi2 LIF population in Loihi's integers for :func:`to_fixed`: ``factor`` per neuron
    (``d / U`` over the float plan's row scale, so that the float rows ``row_scale * W`` become the
    layers' mantissas ``d W / U``), ``dv`` and ``vth`` (:func:`.fixed_point.loihi2_population`);
    ``{"error": ...}`` where Lava's LIF cannot hold it (per-neuron ``vth`` or ``dv``)."""
    try:
        pop = loihi2_population(name, info.graph.nodes[name], info, facts["membranes"][name], facts["timesteps"])
    except LavaUnsupported as err:
        return {"error": str(err)}
    lif = pop["lif"]
    dv, vth = np.asarray(lif["dv"]).reshape(-1), np.asarray(lif["vth"]).reshape(-1)
    if not (uniform(dv) and uniform(vth)):
        return {"error": f"{name} (LIF): loihi2 mode: per-neuron thresholds or leaks (vth {np.unique(vth)[:3]}, ...); Lava's "
                         "LIFReset takes one vth and dv per population (the loihi2-fixed profile runs them)"}
    alpha = np.asarray(pop["alpha"], np.float64).reshape(-1)
    return {"factor": alpha / np.broadcast_to(np.asarray(row_scale, np.float64), alpha.shape), "dv": int(dv[0]),
            "vth": int(vth[0]), "unit": pop["exact"]["unit"], "register_bits": pop["exact"]["register_bits"]}


def process_classes(plan: dict) -> dict[str, int]:
    """``{Lava process class path: count}`` that the standard plan builds."""
    counts: dict[str, int] = {}

    def add(kind: str) -> None:
        counts[LAVA_PROCESSES[kind]] = counts.get(LAVA_PROCESSES[kind], 0) + 1

    add("source")
    for p in plan["populations"]:
        add(p["node_kind"] if p["node_kind"] in LAVA_PROCESSES else "population")
    for s in plan["synapses"]:
        add(s["kind"])
    for outs in plan["outputs"].values():
        for _ in outs:
            add("sink")
    return counts


# ----------------------------------------------------------------------------- fixed point
ACT_SHIFT = 6              # Lava's bit-accurate LIF: a_in and vth are MSB-aligned by << 6
A_IN_MAX = 2 ** 15 - 1     # the bit-accurate LIF's a_in port is 16 bits wide: worst-case inputs stay below this
INPUT_SCALE = 2 ** 8       # fixed mode: the (graded) input is sent as round(x * 256)
BIAS_MAX = 4095 << 7       # Lava's bit-accurate LIF: bias_mant (13-bit signed) << bias_exp (3 bits, at most 7)
VTH_MAX = 2 ** 12          # fixed mode: the integer threshold of a LIF population, lowered where inputs could overflow a_in


def _lava_weights(w: np.ndarray, bits: int) -> tuple[np.ndarray, int, int]:
    """Real weights ``w`` as Lava's bit-accurate synapses hold them: ``bits``-bit signed mantissas
    ``k`` (:func:`~.fixed_point.quantise`) stored as ``k << t`` (``t = 9 - bits``: Lava clips to 8
    bits of magnitude and, for mixed signs, drops ``t`` low bits) with ``weight_exp = e - t``;
    returns ``(stored, weight_exp, e)``: ``w ~ stored * 2**weight_exp``."""
    k, e = quantise(np.asarray(w, np.float64), bits)
    t = 9 - bits
    return (k.astype(np.int64) << t), int(e) - t, int(e)


def _int_bias(b: np.ndarray, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """An integer bias as Lava's ``bias_mant`` (13-bit signed) ``<< bias_exp`` (0-7), per neuron."""
    b = np.rint(np.asarray(b, np.float64)).astype(np.int64)
    exp = np.zeros(b.shape, np.int64)
    def over(e):  # the rounded mantissa does not fit 13 bits (and a larger exponent is left)
        return (np.abs(np.rint(b / 2.0 ** e)) > 4095) & (e < 7)

    while np.any(over(exp)):
        exp = np.where(over(exp), exp + 1, exp)
    mant = np.rint(b / 2.0 ** exp).astype(np.int64)
    if np.any(np.abs(mant) > 4095):
        raise LavaUnsupported(f"fixed point: {name}: a bias of {int(np.abs(b).max()):,} membrane units (vth << 6 = 64) "
                              f"exceeds Lava's 13-bit mantissa << 7 ({BIAS_MAX:,}) even at vth = 1; not lowered")
    return mant, exp


def _row_abs(m: dict) -> np.ndarray:
    if m["format"] == "sparse":
        return np.bincount(np.asarray(m["rows"]), weights=np.abs(np.asarray(m["values"], np.float64)), minlength=m["shape"][0])
    return np.abs(np.asarray(m["values"], np.float64)).sum(axis=1)


def to_fixed(plan: dict, weight_bits: int = 8) -> dict:
    """The float standard plan in Loihi's integers, for Lava's bit-accurate models
    (``PyLifResetModelBitAcc``, ``PyDenseModelBitAcc``, ``PySparseModelBitAcc``,
    ``PyDelaySparseModelBitAcc``):

    * a LIF population's membrane is scaled by ``V / theta`` (``V``: :data:`VTH_MAX`, halved until
      the worst-case input, the row sums of ``|W|``, fits the 16-bit ``a_in`` and the bias fits
      :data:`BIAS_MAX`): ``vth = V``,
      ``du = 4095`` (``u = a_in << 6``), ``dv = round(4096 d)``; the incoming matrices (``d W``)
      times ``V / theta`` become ``weight_bits``-bit mantissas with one exponent per synaptic
      process (Lava's ``weight_exp``: ``<< e`` or a floor ``>> -e``); the bias ``d b V / theta``
      in membrane units (``<< 6``) plus one unit, so that exact ties fire as the reference's
      ``v >= theta`` does;
    * a Threshold or relay population counts spikes: integer weights kept, ``vth = floor(theta)``
      (spike when the count exceeds it), ``dv = 4095`` (a residue below ``v / 4096`` remains:
      counts times 64 never reach 4096 for fan-ins below 64);
    * the input is sent as ``round(x * 256)``; a readout's sums reach the host as integers, scaled
      back there;
    * Spikformer attention's product and graded neurons (:mod:`.attention`) keep their integer
      weights (1, ``weight_exp = 0``: exact counts); a LIF fed by graded products bounds its input
      by their largest value (``in_max``).
    """
    if not 2 <= int(weight_bits) <= 8:
        raise LavaUnsupported(f"fixed point: Lava's bit-accurate synapses hold 2-8-bit weights, got weight_bits={weight_bits}")
    if plan.get("mode") != "float":
        raise LavaUnsupported(f"to_fixed takes a float standard plan, got mode {plan.get('mode')!r}")
    if plan.get("attention") == "strassen":
        raise LavaUnsupported("fixed point: attention = 'strassen' is not lowered: the attention LIF would sum signed products "
                              "of up to N·4**levels through 8-bit weights into Lava's 16-bit a_in; run it with Lava's float "
                              "models (loihi2-standard) or use attention = 'product'")
    # copies all the way down to what changes: the float plan (possibly cached) stays as it was
    plan = {**plan, "mode": "fixed", "weight_bits": int(weight_bits), "input_scale": INPUT_SCALE,
            "populations": [dict(p) for p in plan["populations"]], "synapses": [dict(s) for s in plan["synapses"]],
            "outputs": {k: [dict(t) for t in v] for k, v in plan["outputs"].items()}}
    into: dict[str, list[dict]] = {}
    for s in plan["synapses"]:
        s["matrix"] = dict(s["matrix"])
        into.setdefault(s["dst"], []).append(s)
    quant = {}
    for p in plan["populations"]:
        syns = into.get(p["name"], [])
        in_scale = [1.0 / INPUT_SCALE if s["graded"] else 1.0 for s in syns]
        if p["node_kind"] in ("product", "graded"):  # integer counts in, integer weights kept
            for s in syns:
                vals = np.asarray(s["matrix"]["values"], np.float64)
                if not np.all((vals == np.rint(vals)) & (np.abs(vals) <= 127)):
                    raise LavaUnsupported(f"fixed point: {p['name']} ({p['node_kind']}) takes integer weights up to 127")
                s["matrix"]["values"] = vals.astype(np.int64)
                s["weight_exp"] = int(s.get("weight_exp", 0))  # -1 where +-1 is held as +-2 (mixed signs, .attention)
                quant[s["name"]] = {"exp": 0, "weight_exp": s["weight_exp"], "mantissa_max": int(np.abs(vals).max(initial=0))}
            continue
        if p["node_kind"] == "LIF" and p.get("loihi2") is not None:
            _loihi2_fixed(p, syns, in_scale, int(weight_bits), quant)
            continue
        if p["node_kind"] == "LIF":
            theta = float(p["vth"])
            bound = sum(_row_abs(s["matrix"]) * c * float(s.get("in_max", 1.0)) for s, c in zip(syns, in_scale)) / theta
            bound = float(np.max(bound, initial=0.0))
            bias_bound = float(np.abs(np.asarray(p["bias"], np.float64)).max(initial=0.0)) / theta * (1 << ACT_SHIFT)
            v = VTH_MAX
            # 2% for the weights' rounding; the bias (in membrane units) within Lava's 13-bit mantissa << 7
            while v > 1 and (v * bound * 1.02 > A_IN_MAX or v * bias_bound + 1 > BIAS_MAX):
                v //= 2
            factor = v / theta
            dv = int(round(4096 * float(p["dv"])))
            if not 0 <= dv <= 4095:
                dv = 4095  # d = 1 (tau = dt): Loihi's 12-bit decay keeps v / 4096
            bias = np.asarray(p["bias"], np.float64) * factor * (1 << ACT_SHIFT) + 1.0
            p.update(du=4095, dv=dv, vth=int(v), scale_to_int=factor)
        else:  # Threshold or relay: spike counts
            for s in syns:
                vals = np.asarray(s["matrix"]["values"], np.float64)
                if s["graded"] or not np.all(vals == np.rint(vals)):
                    raise LavaUnsupported(f"fixed point: {p['name']} ({p['node_kind']}) sums non-integer inputs; "
                                          "only spike counts are lowered")
            factor = 1.0
            bias = np.asarray(p["bias"], np.float64)
            if np.any(bias != 0):
                raise LavaUnsupported(f"fixed point: {p['name']} ({p['node_kind']}) has a bias; only spike counts are lowered")
            p.update(du=4095, dv=4095, vth=int(np.floor(float(p["vth"]))), scale_to_int=1.0)
        p["bias_mant"], p["bias_exp"] = _int_bias(bias, f"{p['name']} ({p['node_kind']})")
        for s, c in zip(syns, in_scale):
            stored, wexp, e = _lava_weights(np.asarray(s["matrix"]["values"], np.float64) * factor * c, int(weight_bits))
            s["matrix"]["values"] = stored
            s["weight_exp"] = wexp
            quant[s["name"]] = {"exp": e, "weight_exp": wexp, "mantissa_max": int(np.abs(stored).max(initial=0))}
    for outs in plan["outputs"].values():
        for t in outs:
            if t["synapse"] is None:
                continue
            s = next(x for x in plan["synapses"] if x["name"] == t["synapse"])
            c = 1.0 / INPUT_SCALE if s["graded"] else 1.0
            stored, wexp, e = _lava_weights(np.asarray(s["matrix"]["values"], np.float64) * c, int(weight_bits))
            s["matrix"]["values"] = stored
            s["weight_exp"] = 0  # exact integer sums to the host, scaled there
            t["scale"] = 2.0 ** wexp
            quant[s["name"]] = {"exp": e, "weight_exp": 0, "host_scale": 2.0 ** wexp, "mantissa_max": int(np.abs(stored).max(initial=0))}
    plan["quant"] = quant
    if plan.get("loihi2") is not None:
        plan["input_contract"] = plan["loihi2"]["input_contract"]
    return plan


def _loihi2_fixed(p: dict, syns: list[dict], in_scale: list[float], weight_bits: int, quant: dict) -> None:
    """A loihi2 graph's LIF population in Lava's integers, as ``loihi2-fixed`` runs it
    (:mod:`.fixed_point`, "Loihi 2 mode graphs"): the rows times ``factor`` are the layers' own
    mantissas (``d W / U``), held exactly as ``weight_bits``-bit mantissas with one power-of-two
    exponent per synaptic process (Lava's floor shift drops only zeros), the bias ``64 d b / U``
    exactly, ``vth`` the model's integer, ``du = 4095``, ``dv = 4096 d``; no tie bias, no rounding.
    Anything that would need rounding is refused by name."""
    facts = p["loihi2"]
    if "error" in facts:
        raise LavaUnsupported(f"fixed point: {facts['error']}")
    factor = np.asarray(facts["factor"], np.float64)
    bias = np.asarray(p["bias"], np.float64) * factor * (1 << ACT_SHIFT)
    if not np.all(bias == np.rint(bias)):
        raise LavaUnsupported(f"fixed point: {p['name']} (LIF, loihi2): its bias is not an integer in Loihi's units")
    p.update(du=4095, dv=facts["dv"], vth=facts["vth"], scale_to_int=factor)
    p["bias_mant"], p["bias_exp"] = _int_bias(bias, f"{p['name']} (LIF)")
    if not np.array_equal(p["bias_mant"] << p["bias_exp"], bias.astype(np.int64)):
        raise LavaUnsupported(f"fixed point: {p['name']} (LIF, loihi2): its bias does not fit Lava's 13-bit mantissa << 7 exactly")
    for s, c in zip(syns, in_scale):
        m = s["matrix"]
        rows_factor = factor[np.asarray(m["rows"])] if m["format"] == "sparse" else factor[:, None]
        vals = np.asarray(m["values"], np.float64) * rows_factor * c
        stored, wexp, e = _lava_weights(vals, weight_bits)
        if not np.array_equal((stored >> (9 - weight_bits)) * 2.0 ** e, vals):
            raise LavaUnsupported(f"fixed point: {s['name']}: loihi2 graph: its weights in Loihi's units are not "
                                  f"{weight_bits}-bit mantissas with one power-of-two exponent; not re-quantised")
        m["values"] = stored
        s["weight_exp"] = wexp
        quant[s["name"]] = {"exp": e, "weight_exp": wexp, "mantissa_max": int(np.abs(stored).max(initial=0)), "loihi2": True}
