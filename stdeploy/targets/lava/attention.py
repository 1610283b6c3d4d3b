"""Spikformer attention ``y = (Q·Kᵀ·V)·scale`` on Lava's standard processes: product neurons, or
the NIR export's three-input AND units, built from the block's facts rather than unrolled.

Contract
--------
A NIR graph exported with ``spikformer="exact"`` holds each block as the export's AND lowering
(``graph.metadata["lowerings"][block]["kind"] ==`` :data:`AND_KIND`): the spikes ``q``, ``k``,
``v`` (channel-first ``(D, N)``, ``D = H·dh``) broadcast to ``H·dh²·N²`` AND units, then summed
over ``c`` (weight ``scale``) and ``j`` into the attention LIF. :func:`find_blocks` recognises
those nodes (their weights compared entry for entry with the export's formula, a mismatch refused
by name) so that the standard lowering never unrolls their ``(D·N², ...)`` matrices, and builds
one of two exact constructions of Lava's processes (:data:`ATTENTION_LOWERINGS`):

* ``"product"`` (default), with ``M = Kᵀ·V`` first (associativity):
  ``kv_prod[h,c,c',j] = k[hc,j]·v[hc',j]`` (``lava.proc.prodneuron.process.ProdNeuron``, H·dh²·N
  neurons, one identity synapse on each input port), ``kv_sum[h,c,c'] = Σ_j kv_prod`` (``Sparse``
  with weight 1 into ``lava.proc.graded.process.GradedVec``, H·dh² neurons: a graded spike, the
  integer ``M``, at most ``N``), ``qkv_prod[h,c,c',i] = q[hc,i]·M[h,c,c']`` (``ProdNeuron``,
  H·dh²·N neurons; ``q`` arrives through a ``DelaySparse`` identity that aligns it with ``M``),
  and the attention LIF's input ``scale·Σ_c qkv_prod`` (a graded ``Sparse``). Every message is an
  integer count (0/1, ``M <= N``, ``q·M <= N``) and both product and graded neurons are set with
  ``vth = 0``, ``exp = 0`` (``s = v·(|v| > 0)``, ``v = a_in1·a_in2`` or ``a_in``): exact. Lava
  ships only fixed-point models for them (``PyProdNeuronModelFixed``, ``PyGradedVecModelFixed``,
  int32 arithmetic), used in both modes; integer counts are exact in both.
  Depth: 4 synaptic hops from ``q``/``k``/``v`` to the attention LIF (the AND path: 2).
* ``"and"``: the export's construction itself: ``qkv_and`` (``LIFReset`` with ``du = dv = 1``,
  ``vth = 2.5``, H·dh²·N² neurons), three one-hot synapses per unit, and ``scale·Σ_{c,j}`` into
  the attention LIF.

Counts per block (neurons; synapses, nonzero weights; :func:`block_counts`, checked against the
built plans in the tests): product ``2·H·dh²·N + H·dh²`` neurons and ``6·H·dh²·N`` synapses; AND
``H·dh²·N²`` neurons and ``4·H·dh²·N²`` synapses (the attention LIF's own included in both, the
``q``/``k``/``v`` populations in neither). :func:`attention_resources` gives a block's Loihi 2
resource report (:mod:`.resources`) for a model config's sizes without exporting it; ``python -m
stdeploy.targets.lava.attention PRESET ...`` prints it for both lowerings.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import numpy as np

from .graph import GraphInfo, LavaUnsupported, node_kind
from .resources import CoreLimits, LayerResources, ResourceReport, resource_report

__all__ = ["AND_KIND", "ATTENTION_LOWERINGS", "AttentionBlock", "find_blocks", "lower_block", "block_counts",
           "attention_resources", "main"]

AND_KIND = "spikformer attention as three-input AND units"  # graph.metadata["lowerings"][block]["kind"] (the NIR export)
ATTENTION_LOWERINGS = ("product", "and")
_PARTS = ("q_tokens", "q_channels", "k_tokens", "k_channels", "v_tokens", "v_channels", "qkv_and", "sum_c", "sum_j")


@dataclass(frozen=True)
class AttentionBlock:
    """One Spikformer attention block of a graph: its spike sources, sizes and scale."""

    name: str          # the block's module name (blocks.0.attn)
    q: str             # the populations whose spikes are Q, K, V ((D, N) channel-first)
    k: str
    v: str
    heads: int
    dh: int            # channels per head (D = heads * dh)
    tokens: int        # N
    scale: float
    and_node: str      # the export's AND units (not lowered)

    def __post_init__(self):
        for f in ("heads", "dh", "tokens"):
            if int(getattr(self, f)) < 1:
                raise LavaUnsupported(f"{self.name}: {f} must be >= 1, got {getattr(self, f)}")
        if not np.isfinite(self.scale) or self.scale == 0:
            raise LavaUnsupported(f"{self.name}: attention scale must be finite and nonzero, got {self.scale}")

    @property
    def units(self) -> int:  # H·dh²: channel pairs (h, c, c')
        return self.heads * self.dh * self.dh


def _expected_weights(heads: int, dh: int, n: int, scale: float) -> dict[str, np.ndarray]:
    """The AND lowering's weights as the NIR export writes them (``_spikformer_attention_exact``)."""
    d = heads * dh
    eye = np.eye(n, dtype=np.float32)
    pick_i, pick_j = np.repeat(eye, n, axis=0), np.tile(eye, (n, 1))
    unit = np.arange(heads * dh * dh)
    head, c, c2 = unit // (dh * dh), (unit // dh) % dh, unit % dh
    out = {}
    for op, pick, ch in (("q", pick_i, c), ("k", pick_j, c), ("v", pick_j, c2)):
        out[f"{op}_tokens"] = np.broadcast_to(pick, (d, n * n, n))
        w = np.zeros((heads * dh * dh, d), np.float32)
        w[unit, head * dh + ch] = 1.0
        out[f"{op}_channels"] = w[:, :, None]
    w = np.zeros((d, heads * dh * dh), np.float32)
    w[head * dh + c2, unit] = scale
    out["sum_c"] = w[:, :, None]
    out["sum_j"] = np.broadcast_to(pick_i.T, (d, n, n * n))
    return out


def find_blocks(info: GraphInfo) -> dict[str, AttentionBlock]:
    """The graph's Spikformer blocks (``{sum_j node: block}``), each checked against the export's
    AND lowering node for node; a block that does not match is refused by name."""
    g = info.graph
    lowerings = g.metadata.get("lowerings", {}) if isinstance(g.metadata, dict) else {}
    blocks = {}
    for name, meta in lowerings.items():
        if not isinstance(meta, dict) or str(meta.get("kind")) != AND_KIND:
            continue
        parts = {p: f"{name}.{p}" for p in _PARTS}
        missing = [n for n in parts.values() if n not in g.nodes]
        if missing:
            raise LavaUnsupported(f"{name}: the graph records a Spikformer AND lowering but lacks {', '.join(missing)}")
        srcs = {}
        for op in "qkv":
            terms = info.terms[parts[f"{op}_tokens"]]
            if len(terms) != 1 or node_kind(g.nodes[terms[0][0]]) not in ("LIF", "Threshold"):
                raise LavaUnsupported(f"{parts[f'{op}_tokens']}: expected one spiking input, got {terms}")
            srcs[op] = terms[0][0]
        d, n = info.shapes[srcs["q"]]
        units = int(np.asarray(g.nodes[parts["q_channels"]].weight).shape[0])
        if units % d:
            raise LavaUnsupported(f"{parts['q_channels']}: {units} channel pairs is not H·dh² for D = {d}")
        dh = units // d
        heads = d // dh if dh else 0
        w_c = np.asarray(g.nodes[parts["sum_c"]].weight)
        nz = w_c[w_c != 0]
        if nz.size == 0 or not np.all(nz == nz[0]):
            raise LavaUnsupported(f"{parts['sum_c']}: expected one attention scale, found {np.unique(nz)[:4]}")
        scale = float(nz[0])
        if heads * dh != d:
            raise LavaUnsupported(f"{name}: {units} channel pairs do not split D = {d} into heads")
        want = _expected_weights(heads, dh, n, scale)
        for part, w in want.items():
            node = g.nodes[parts[part]]
            got = np.asarray(node.weight)
            if got.shape != w.shape or not np.array_equal(got, w):
                raise LavaUnsupported(f"{parts[part]}: weights differ from the NIR export's Spikformer AND lowering; "
                                      "not lowered as attention")
            bias = getattr(node, "bias", None)
            if bias is not None and np.any(np.asarray(bias) != 0):
                raise LavaUnsupported(f"{parts[part]}: a bias in the Spikformer AND lowering; not lowered as attention")
        thr = np.asarray(g.nodes[parts["qkv_and"]].threshold)
        if thr.size == 0 or not np.all(thr == 2.5):
            raise LavaUnsupported(f"{parts['qkv_and']}: expected three-input AND units (threshold 2.5)")
        blocks[parts["sum_j"]] = AttentionBlock(name=name, q=srcs["q"], k=srcs["k"], v=srcs["v"], heads=heads, dh=dh,
                                                tokens=n, scale=scale, and_node=parts["qkv_and"])
    return blocks


def _sparse(rows: np.ndarray, cols: np.ndarray, values, shape: tuple[int, int]) -> dict:
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    return {"format": "sparse", "shape": (int(shape[0]), int(shape[1])), "rows": rows, "cols": cols,
            "values": np.broadcast_to(np.asarray(values, np.float64), rows.shape).copy(), "nnz": int(rows.size)}


def _synapse(name: str, src: str, dst: str, matrix: dict, delay: int, port: str = "a_in", message_bits: int = 0,
             integer: bool = False) -> dict:
    """A plan synapse; ``integer``: into product/graded neurons, whose fixed-point models need
    integer messages (Lava's bit-accurate synapse models in both modes, weights 1, ``weight_exp`` 0)."""
    return {"name": name, "kind": ("delay_" if delay > 0 else "") + "sparse", "src": src, "dst": dst, "matrix": matrix,
            "delay": int(delay), "nodes": [], "graded": False, "port": port, "message_bits": int(message_bits),
            "in_max": 1.0, "integer": bool(integer)}


def lower_block(block: AttentionBlock, latency: dict[str, int], attention: str = "product") -> tuple[list, list, dict]:
    """The populations and synapses of ``block`` (``attention``: a name in
    :data:`ATTENTION_LOWERINGS`) and the term into its attention LIF: ``{"src", "weight"
    (rows (D·N) x the source's neurons, ``scale``), "message_bits", "in_max", "nodes"}``.
    ``latency`` (synaptic hops from the input) holds ``q``, ``k``, ``v`` and gets the new
    populations; binary inputs that arrive early pass a ``DelaySparse`` identity."""
    if attention not in ATTENTION_LOWERINGS:
        raise LavaUnsupported(f"attention lowering must be one of {ATTENTION_LOWERINGS}, got {attention!r}")
    hh, dh, n = block.heads, block.dh, block.tokens
    d = hh * dh
    u = np.arange(block.units)
    head, c, c2 = u // (dh * dh), (u // dh) % dh, u % dh
    pops, syns = [], []

    def population(name: str, kind: str, size: int, inputs: list[str]) -> str:
        latency[name] = max(latency[s] for s in inputs) + 1
        pop = {"name": name, "node_kind": kind, "size": int(size), "shape": (int(size),), "latency": latency[name]}
        if kind == "Threshold":
            pop.update(du=1.0, dv=1.0, vth=2.5, bias=np.zeros(size))
        pops.append(pop)
        return name

    def wire(src: str, dst: str, rows, cols, port: str, graded: bool = False) -> None:
        lag = latency[dst] - 1 - latency[src]
        if lag > 0 and graded:
            raise LavaUnsupported(f"{dst}: the graded input {src} arrives {lag} step(s) early; Lava's delayed synapses "
                                  "carry binary spikes only")
        size_src = next((p["size"] for p in pops if p["name"] == src), d * n)
        dst_pop = next(p for p in pops if p["name"] == dst)
        m = _sparse(rows, cols, 1.0, (dst_pop["size"], size_src))
        syns.append(_synapse(f"{'delayed ' if lag > 0 else ''}{port}:{src}->{dst}", src, dst, m, lag, port,
                             24 if graded else 0, integer=dst_pop["node_kind"] in ("product", "graded")))

    if attention == "product":
        uu, t = np.repeat(u, n), np.tile(np.arange(n), block.units)  # rows (h, c, c', token)
        rows = np.arange(block.units * n)
        kv = population(f"{block.name}.kv_prod", "product", block.units * n, [block.k, block.v])
        wire(block.k, kv, rows, (head[uu] * dh + c[uu]) * n + t, "a_in1")
        wire(block.v, kv, rows, (head[uu] * dh + c2[uu]) * n + t, "a_in2")
        m = population(f"{block.name}.kv_sum", "graded", block.units, [kv])
        wire(kv, m, uu, rows, "a_in", graded=True)
        qkv = population(f"{block.name}.qkv_prod", "product", block.units * n, [block.q, m])
        wire(block.q, qkv, rows, (head[uu] * dh + c[uu]) * n + t, "a_in1")
        wire(m, qkv, rows, uu, "a_in2", graded=True)
        out_rows = (head[uu] * dh + c2[uu]) * n + t
        weight = (out_rows, rows, block.units * n)
        return pops, syns, {"src": qkv, "weight": weight, "message_bits": 24, "in_max": float(n),
                            "nodes": [f"{block.name}.sum_c"]}
    # "and": one LIFReset unit per (h, c, c', i, j), three one-hot synapses each
    uu = np.repeat(u, n * n)
    i, j = np.tile(np.repeat(np.arange(n), n), block.units), np.tile(np.arange(n), block.units * n)
    rows = np.arange(block.units * n * n)
    a = population(block.and_node, "Threshold", block.units * n * n, [block.q, block.k, block.v])
    wire(block.q, a, rows, (head[uu] * dh + c[uu]) * n + i, "a_in")
    wire(block.k, a, rows, (head[uu] * dh + c[uu]) * n + j, "a_in")
    wire(block.v, a, rows, (head[uu] * dh + c2[uu]) * n + j, "a_in")
    out_rows = (head[uu] * dh + c2[uu]) * n + i
    return pops, syns, {"src": a, "weight": (out_rows, rows, block.units * n * n), "message_bits": 0, "in_max": 1.0,
                        "nodes": [f"{block.name}.sum_c", f"{block.name}.sum_j"]}


def block_counts(heads: int, dh: int, tokens: int, attention: str = "product") -> dict[str, int]:
    """Neurons and synapses (nonzero weights) one block's attention adds, the attention LIF's
    input synapses included (see the module docstring)."""
    units = heads * dh * dh
    if attention == "product":
        return {"neurons": 2 * units * tokens + units, "synapses": 6 * units * tokens}
    if attention == "and":
        return {"neurons": units * tokens * tokens, "synapses": 4 * units * tokens * tokens}
    raise LavaUnsupported(f"attention lowering must be one of {ATTENTION_LOWERINGS}, got {attention!r}")


def attention_resources(heads: int, dh: int, tokens: int, attention: str = "product", limits: dict | None = None,
                        scale: float = 0.125, build_limit: int = 20_000_000) -> ResourceReport:
    """The Loihi 2 resource report (:func:`.resources.resource_report`) of one block's attention:
    its added layers and the attention LIF (``D·N`` neurons), ``q``/``k``/``v`` as inputs from
    outside. Built as a plan (the lowering's own arrays) up to ``build_limit`` synapses; above,
    from :func:`block_counts` (the AND lowering's regular layers: every unit 3 synapses in, one
    out; the attention LIF ``dh·N`` synapses per neuron)."""
    d, n = heads * dh, tokens
    block = AttentionBlock(name="attn", q="q", k="k", v="v", heads=heads, dh=dh, tokens=n, scale=scale,
                           and_node="attn.qkv_and")
    counts = block_counts(heads, dh, n, attention)
    lim, assumed = CoreLimits.from_profile(limits)
    if counts["synapses"] <= build_limit:
        latency = {"q": 0, "k": 0, "v": 0}
        pops, syns, term = lower_block(block, latency, attention)
        rows, cols, n_src = term["weight"]
        latency["attn.attn_lif"] = latency[term["src"]] + 1
        pops.append({"name": "attn.attn_lif", "node_kind": "LIF", "size": d * n, "shape": (d, n), "latency": latency["attn.attn_lif"]})
        syns.append(_synapse("sum:attn", term["src"], "attn.attn_lif", _sparse(rows, cols, scale, (d * n, n_src)), 0))
        return resource_report({"lowering": "standard", "populations": pops, "synapses": syns, "outputs": {}}, lim)
    if attention != "and":
        raise LavaUnsupported(f"attention_resources: {counts['synapses']:,} synapses exceed build_limit {build_limit:,}")
    units = heads * dh * dh * n * n

    def layer(name, kind, neurons, synapses, fan_in, fan_out, inputs):
        memory = synapses * lim.weight_bits
        cores = max(math.ceil(neurons / lim.neurons_per_core), math.ceil(synapses / lim.synapses_per_core),
                    math.ceil(memory / lim.synaptic_memory_bits_per_core), 1)
        return LayerResources(layer=name, kind=kind, neurons=neurons, synapses=synapses, synaptic_memory_bits=memory,
                              fan_in=fan_in, fan_out=fan_out, cores=cores, inputs=inputs)

    layers = (layer("attn.qkv_and", "Threshold", units, 3 * units, 3, 1, ("q", "k", "v")),
              layer("attn.attn_lif", "LIF", d * n, units, dh * n, 0, ("attn.qkv_and",)))
    first = reason = None
    used = 0
    for x in layers:
        if first is None and used + x.cores > lim.cores_per_chip:
            first, reason = x.layer, (f"needs cores {used + 1}-{used + x.cores}; a chip has {lim.cores_per_chip} "
                                      f"({x.cores} for this layer: {x.neurons} neurons, {x.synapses} synapses, "
                                      f"{x.synaptic_memory_bits} bits)")
        used += x.cores
    return ResourceReport(limits=lim, assumed_limits=assumed, layers=layers, neurons=sum(x.neurons for x in layers),
                          synapses=sum(x.synapses for x in layers),
                          synaptic_memory_bits=sum(x.synaptic_memory_bits for x in layers), cores=used,
                          chips=math.ceil(used / lim.cores_per_chip), first_unfit=first, unfit_reason=reason)


def main(argv: list[str] | None = None) -> int:
    """Print one attention block's Loihi 2 resources under both lowerings for model presets."""
    from ...models import PRESETS  # the presets' sizes only
    from ..profiles import load_profile

    ap = argparse.ArgumentParser(prog="python -m stdeploy.targets.lava.attention", description=main.__doc__)
    ap.add_argument("presets", nargs="+", help="Spikformer presets (spikformer-tiny, spikformer-4-384, ...)")
    ap.add_argument("--profile", default="loihi2-standard", help="device profile whose [limits] apply")
    args = ap.parse_args(argv)
    limits = load_profile(args.profile).limits
    print("| preset | H | dh | N | lowering | added neurons | synapses | memory (bits) | cores | fits one chip |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---|")
    for name in args.presets:
        if name not in PRESETS:
            print(f"error: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}", file=sys.stderr)
            return 2
        cfg = PRESETS[name]
        if cfg.family != "spikformer":
            print(f"error: {name} is not a Spikformer (family {cfg.family!r})", file=sys.stderr)
            return 2
        heads, dh, n = cfg.heads, cfg.embed_dim // cfg.heads, cfg.tokens
        for lowering in ATTENTION_LOWERINGS:
            r = attention_resources(heads, dh, n, lowering, limits, scale=cfg.attn_scale)
            added = r.neurons - cfg.embed_dim * n
            print(f"| {name} | {heads} | {dh} | {n} | {lowering} | {added:,} | {r.synapses:,} | {r.synaptic_memory_bits:,} | "
                  f"{r.cores:,} | {'yes' if r.first_unfit is None else f'no ({r.chips} chips)'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
