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
* ``"strassen"``: the populations of ``"product"``, fewer product neurons: per head, ``M = Kᵀ·V``
  (``dh x N`` by ``N x dh``) and ``Y = Qᵀ·M`` (``N x dh`` by ``dh x dh``) each by
  :func:`bilinear`, Strassen's 2x2 algorithm (7 products for 8) applied :func:`strassen_levels`
  times (at most :data:`STRASSEN_MAX_LEVELS`): each ``ProdNeuron`` multiplies two signed sums of
  entries (synapse weights +-1), ``M`` and ``Y`` are signed sums of the products (``GradedVec``;
  the attention LIF's rows ``+-scale``). Still integers only: exact. Lava's bit-accurate synapses
  drop a mixed-sign matrix's lowest weight bit, so +-1 is held as +-2 with ``weight_exp = -1``
  (sums of even numbers shifted back: exact). Per head and stage ``7**L·(dh²N/8**L)`` products
  instead of ``dh²N``, with about ``(3/2)**L`` times the synapses; float mode only (fixed point
  refuses it, :func:`.standard.to_fixed`).

Counts per block (neurons; synapses, nonzero weights; :func:`block_counts`, checked against the
built plans in the tests): product ``2·H·dh²·N + H·dh²`` neurons and ``6·H·dh²·N`` synapses; AND
``H·dh²·N²`` neurons and ``4·H·dh²·N²`` synapses; Strassen the products of :func:`bilinear` plus
``H·dh²`` and the nonzeros of its ``U``, ``V``, ``W`` (the attention LIF's own synapses included in
all, the ``q``/``k``/``v`` populations in none). :func:`attention_resources` gives a block's Loihi 2
resource report (:mod:`.resources`) for a model config's sizes without exporting it;
:func:`model_fit` the chips of one block and a lower bound for the whole model; ``python -m
stdeploy.targets.lava.attention PRESET ...`` prints both for both lowerings.

A block of any size on Lava, without a graph
---------------------------------------------
:func:`block_plan` wraps :func:`lower_block` (an :class:`AttentionBlock` made from the sizes)
into a standard plan of its own: a source ``RingBuffer`` with the ``q``, ``k``, ``v`` spikes side
by side, relay ``LIFReset`` populations for them, the block, the attention LIF, and sinks on the
attention LIF's spikes and (product) on ``M``'s graded spikes. :func:`run_block` runs it with the
worker's ``run_standard_plan`` (Lava's processes and models, ``Loihi2SimCfg``) in a subprocess
in its own process group (stopped whole after a timeout), sampling the group's memory (RSS and
PSS, bytes) and listing every process Lava instantiated (Lava's ``ProcessServer``), from which
:func:`inventory_counts` reads the neurons and nonzero weights. :func:`run_preset` does this on
the first block's ``q``/``k``/``v`` spikes of a random-weight model of a preset on a digits image
(:func:`model_block_spikes`, forward hooks on the model's own ``SpikformerAttention``) and
compares the attention LIF's spikes and ``M`` with the model's, entry for entry; ``python -m
stdeploy.targets.lava.attention PRESET --run`` prints it (seconds and bytes as measured).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from .graph import GraphInfo, LavaUnsupported, node_kind
from .resources import CoreLimits, LayerResources, ResourceReport, layer_cores, place, resource_report

__all__ = ["AND_KIND", "ATTENTION_LOWERINGS", "STRASSEN_MAX_LEVELS", "AttentionBlock", "find_blocks", "lower_block",
           "block_counts", "bilinear", "strassen_levels",
           "attention_resources", "main"]

AND_KIND = "spikformer attention as three-input AND units"  # graph.metadata["lowerings"][block]["kind"] (the NIR export)
ATTENTION_LOWERINGS = ("product", "and", "strassen")  # [lava] attention in a profile (.target)
STRASSEN_MAX_LEVELS = 5    # "strassen": recursion levels at most (fewest product neurons at 5 for spikformer-4-384's sizes)
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
    integer messages (Lava's bit-accurate synapse models in both modes: weights 1, ``weight_exp`` 0,
    or +-2 with ``weight_exp`` -1 where signs are mixed)."""
    return {"name": name, "kind": ("delay_" if delay > 0 else "") + "sparse", "src": src, "dst": dst, "matrix": matrix,
            "delay": int(delay), "nodes": [], "graded": False, "port": port, "message_bits": int(message_bits),
            "in_max": 1.0, "integer": bool(integer)}


def lower_block(block: AttentionBlock, latency: dict[str, int], attention: str = "product") -> tuple[list, list, dict]:
    """The populations and synapses of ``block`` (``attention``: a name in
    :data:`ATTENTION_LOWERINGS`) and the term into its attention LIF: ``{"src", "weight"
    ((rows, cols, source neurons, values): the entries of the ``(D·N) x`` source matrix, ``scale``
    times a signed coefficient), "message_bits", "in_max", "nodes"}``.
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

    def wire(src: str, dst: str, rows, cols, port: str, graded: bool = False, values=1.0) -> None:
        lag = latency[dst] - 1 - latency[src]
        if lag > 0 and graded:
            raise LavaUnsupported(f"{dst}: the graded input {src} arrives {lag} step(s) early; Lava's delayed synapses "
                                  "carry binary spikes only")
        size_src = next((p["size"] for p in pops if p["name"] == src), d * n)
        dst_pop = next(p for p in pops if p["name"] == dst)
        # Lava's bit-accurate synapses drop the lowest weight bit of a matrix of mixed signs: +-1 is held as
        # +-2 with weight_exp -1 (the sums of even numbers shifted back: exact)
        mixed = bool(np.any(np.asarray(values) < 0))
        m = _sparse(rows, cols, np.asarray(values, np.float64) * (2 if mixed else 1), (dst_pop["size"], size_src))
        syns.append({**_synapse(f"{'delayed ' if lag > 0 else ''}{port}:{src}->{dst}", src, dst, m, lag, port,
                                24 if graded else 0, integer=dst_pop["node_kind"] in ("product", "graded")),
                     "weight_exp": -1 if mixed else 0})

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
        weight = (out_rows, rows, block.units * n, np.full(len(rows), block.scale))
        return pops, syns, {"src": qkv, "weight": weight, "message_bits": 24, "in_max": float(n),
                            "nodes": [f"{block.name}.sum_c"]}
    if attention == "strassen":
        return _lower_strassen(block, population, wire, pops, syns)
    # "and": one LIFReset unit per (h, c, c', i, j), three one-hot synapses each
    uu = np.repeat(u, n * n)
    i, j = np.tile(np.repeat(np.arange(n), n), block.units), np.tile(np.arange(n), block.units * n)
    rows = np.arange(block.units * n * n)
    a = population(block.and_node, "Threshold", block.units * n * n, [block.q, block.k, block.v])
    wire(block.q, a, rows, (head[uu] * dh + c[uu]) * n + i, "a_in")
    wire(block.k, a, rows, (head[uu] * dh + c[uu]) * n + j, "a_in")
    wire(block.v, a, rows, (head[uu] * dh + c2[uu]) * n + j, "a_in")
    out_rows = (head[uu] * dh + c2[uu]) * n + i
    return pops, syns, {"src": a, "weight": (out_rows, rows, block.units * n * n, np.full(len(rows), block.scale)),
                        "message_bits": 0, "in_max": 1.0,
                        "nodes": [f"{block.name}.sum_c", f"{block.name}.sum_j"]}


# Strassen's 2x2 algorithm (7 products): C = W ((U a) * (V b)), a, b, c the row-major entries of A, B, C
_STRASSEN = (np.array([[1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0], [-1, 0, 1, 0], [0, 1, 0, -1]]),
             np.array([[1, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, -1], [-1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]]),
             np.array([[1, 0, 0, 1, -1, 0, 1], [0, 0, 1, 0, 1, 0, 0], [0, 1, 0, 1, 0, 0, 0], [1, -1, 1, 0, 0, 1, 0]]))


def strassen_levels(dh: int, tokens: int) -> int:
    """Recursion levels of the ``"strassen"`` lowering: the most (up to :data:`STRASSEN_MAX_LEVELS`)
    for which ``2**levels`` divides both ``dh`` and ``tokens``."""
    levels = 0
    while levels < STRASSEN_MAX_LEVELS and dh % 2 ** (levels + 1) == 0 and tokens % 2 ** (levels + 1) == 0:
        levels += 1
    return levels


def bilinear(m: int, n: int, p: int, levels: int):
    """An exact bilinear algorithm for ``C = A·B`` (``A`` ``m x n``, ``B`` ``n x p``; integers):
    sparse integer matrices ``U`` ``(P, m·n)``, ``V`` ``(P, n·p)``, ``W`` ``(m·p, P)`` with
    ``vec(C) = W ((U vec(A)) * (V vec(B)))`` (row-major ``vec``), entries in {-1, 0, 1}: Strassen's
    2x2 algorithm applied ``levels`` times to blocks (a Kronecker power), the schoolbook product
    below. ``P = 7**levels · (m·n·p / 8**levels)`` products instead of ``m·n·p``."""
    f = 2 ** levels
    if levels < 0 or m % f or n % f or p % f:
        raise LavaUnsupported(f"bilinear: {levels} Strassen levels need m, n, p divisible by {f}, got {m}, {n}, {p}")
    sm, sn, sp = m // f, n // f, p // f
    i, j, k = (x.ravel() for x in np.meshgrid(np.arange(sm), np.arange(sn), np.arange(sp), indexing="ij"))
    r, one = np.arange(i.size), np.ones(i.size, np.int64)
    u = sparse.csr_matrix((one, (r, i * sn + j)), (r.size, sm * sn))
    v = sparse.csr_matrix((one, (r, j * sp + k)), (r.size, sn * sp))
    w = sparse.csr_matrix((one, (i * sp + k, r)), (sm * sp, r.size))

    def blocks(rows_inner: int, cols_inner: int) -> np.ndarray:  # kron's (outer entry, inner entry) -> row-major entry
        a, b, c, d = np.meshgrid(np.arange(2), np.arange(2), np.arange(rows_inner), np.arange(cols_inner), indexing="ij")
        return ((a * rows_inner + c) * (2 * cols_inner) + (b * cols_inner + d)).ravel()

    for _ in range(levels):
        pu, pv, pw = blocks(sm, sn), blocks(sn, sp), blocks(sm, sp)
        u = sparse.kron(sparse.csr_matrix(_STRASSEN[0]), u).tocoo()
        v = sparse.kron(sparse.csr_matrix(_STRASSEN[1]), v).tocoo()
        w = sparse.kron(sparse.csr_matrix(_STRASSEN[2]), w).tocoo()
        u = sparse.csr_matrix((u.data, (u.row, pu[u.col])), u.shape)
        v = sparse.csr_matrix((v.data, (v.row, pv[v.col])), v.shape)
        w = sparse.csr_matrix((w.data, (pw[w.row], w.col)), w.shape)
        sm, sn, sp = 2 * sm, 2 * sn, 2 * sp
    for x in (u, v, w):
        x.eliminate_zeros()
    return u, v, w


def _per_head(mat: sparse.csr_matrix, heads: int, row_of, col_of) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mat`` repeated for every head, its rows and columns mapped to population indices by
    ``row_of(head, row)`` and ``col_of(head, col)``: (rows, cols, values)."""
    c = mat.tocoo()
    h = np.repeat(np.arange(heads), c.nnz)
    rr, cc = np.tile(c.row, heads), np.tile(c.col, heads)
    return row_of(h, rr), col_of(h, cc), np.tile(c.data, heads).astype(np.float64)


def _lower_strassen(block: AttentionBlock, population, wire, pops: list, syns: list) -> tuple[list, list, dict]:
    """The ``"strassen"`` lowering: per head, ``M = Kᵀ·V`` (``dh x N`` by ``N x dh``) and ``Y = Qᵀ·M``
    (``N x dh`` by ``dh x dh``) each by :func:`bilinear` with :func:`strassen_levels` levels: the
    operands of every ``ProdNeuron`` are signed sums of ``K``/``V`` (``Q``/``M``) entries (the
    synapses' weights, +-1), ``M`` is ``W``'s signed sum of the first products (a ``GradedVec``, as
    in ``"product"``), and ``W``'s signed sums of the second products, times ``scale``, feed the
    attention LIF. Integer counts throughout: exact."""
    hh, dh, n = block.heads, block.dh, block.tokens
    levels = strassen_levels(dh, n)
    u1, v1, w1 = bilinear(dh, n, dh, levels)    # A = Kᵀ: (c, j); B = V: (j, c'); C = M: (c, c')
    u2, v2, w2 = bilinear(n, dh, dh, levels)    # A = Qᵀ: (i, c); B = M: (c, c'); C = Y: (i, c')
    p1, p2 = u1.shape[0], u2.shape[0]
    kv = population(f"{block.name}.kv_prod", "product", hh * p1, [block.k, block.v])
    r, c_, val = _per_head(u1, hh, lambda h, x: h * p1 + x, lambda h, a: (h * dh + a // n) * n + a % n)
    wire(block.k, kv, r, c_, "a_in1", values=val)
    r, c_, val = _per_head(v1, hh, lambda h, x: h * p1 + x, lambda h, b: (h * dh + b % dh) * n + b // dh)
    wire(block.v, kv, r, c_, "a_in2", values=val)
    m = population(f"{block.name}.kv_sum", "graded", block.units, [kv])
    r, c_, val = _per_head(w1, hh, lambda h, x: h * dh * dh + x, lambda h, x: h * p1 + x)
    wire(kv, m, r, c_, "a_in", graded=True, values=val)
    qkv = population(f"{block.name}.qkv_prod", "product", hh * p2, [block.q, m])
    r, c_, val = _per_head(u2, hh, lambda h, x: h * p2 + x, lambda h, a: (h * dh + a % dh) * n + a // dh)
    wire(block.q, qkv, r, c_, "a_in1", values=val)
    r, c_, val = _per_head(v2, hh, lambda h, x: h * p2 + x, lambda h, b: h * dh * dh + b)
    wire(m, qkv, r, c_, "a_in2", graded=True, values=val)
    out_rows, out_cols, coef = _per_head(w2, hh, lambda h, y: (h * dh + y % dh) * n + y // dh, lambda h, x: h * p2 + x)
    # the largest product: |signed sum of q| x |signed sum of M| (M <= N)
    in_max = float(np.max(np.asarray(abs(u2).sum(axis=1)).ravel() * np.asarray(abs(v2).sum(axis=1)).ravel() * n))
    return pops, syns, {"src": qkv, "weight": (out_rows, out_cols, hh * p2, block.scale * np.asarray(coef, np.float64)),
                        "message_bits": 24, "in_max": in_max, "nodes": [f"{block.name}.sum_c"]}


def block_counts(heads: int, dh: int, tokens: int, attention: str = "product") -> dict[str, int]:
    """Neurons and synapses (nonzero weights) one block's attention adds, the attention LIF's
    input synapses included (see the module docstring)."""
    units = heads * dh * dh
    if attention == "strassen":
        levels = strassen_levels(dh, tokens)
        mats = bilinear(dh, tokens, dh, levels) + bilinear(tokens, dh, dh, levels)
        return {"neurons": heads * (mats[0].shape[0] + mats[3].shape[0]) + units,
                "synapses": heads * sum(int(x.nnz) for x in mats)}
    if attention == "product":
        return {"neurons": 2 * units * tokens + units, "synapses": 6 * units * tokens}
    if attention == "and":
        return {"neurons": units * tokens * tokens, "synapses": 4 * units * tokens * tokens}
    raise LavaUnsupported(f"attention lowering must be one of {ATTENTION_LOWERINGS}, got {attention!r}")


def attention_resources(heads: int, dh: int, tokens: int, attention: str = "product", limits: dict | None = None,
                        scale: float = 0.125, build_limit: int = 50_000_000) -> ResourceReport:
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
        rows, cols, n_src, values = term["weight"]
        latency["attn.attn_lif"] = latency[term["src"]] + 1
        pops.append({"name": "attn.attn_lif", "node_kind": "LIF", "size": d * n, "shape": (d, n), "latency": latency["attn.attn_lif"]})
        syns.append(_synapse("sum:attn", term["src"], "attn.attn_lif",
                             _sparse(rows, cols, values, (d * n, n_src)), 0))
        return resource_report({"lowering": "standard", "populations": pops, "synapses": syns, "outputs": {}}, lim)
    if attention != "and":
        raise LavaUnsupported(f"attention_resources: {counts['synapses']:,} synapses exceed build_limit {build_limit:,}")
    units = heads * dh * dh * n * n

    def layer(name, kind, neurons, synapses, fan_in, fan_out, inputs):  # the report's rules (.resources), counted
        memory = synapses * lim.weight_bits
        return LayerResources(layer=name, kind=kind, neurons=neurons, synapses=synapses, synaptic_memory_bits=memory,
                              fan_in=fan_in, fan_out=fan_out, cores=layer_cores(neurons, synapses, memory, lim), inputs=inputs)

    return place((layer("attn.qkv_and", "Threshold", units, 3 * units, 3, 1, ("q", "k", "v")),
                  layer("attn.attn_lif", "LIF", d * n, units, dh * n, 0, ("attn.qkv_and",))), lim, assumed)


def model_fit(cfg, attention: str = "product", limits: dict | None = None, block: ResourceReport | None = None) -> dict:
    """Chips for a Spikformer config ``cfg`` (``heads``, ``embed_dim``, ``tokens``, ``depth``,
    ``mlp_hidden``) under the standard lowering: one block's attention (:func:`attention_resources`:
    its added layers and the attention LIF) in cores and chips, and a **lower bound** for the whole
    model: ``depth`` blocks' attention plus the rest's token-wise linear layers alone (``q``, ``k``,
    ``v``, ``proj``: ``D²`` weights, ``fc1``, ``fc2``: ``D·hidden``, each unrolled over the ``N``
    tokens, dense, each counted once) at ``synapses_per_core``; the embedding, the head and the
    residual stream (every block's ``proj`` and ``fc2`` reach every later consumer as a term of its
    own) add more. ``fan_in_residual``: the fan-in that residual stream gives the head's LIF alone
    (``depth·(D + hidden)``), against ``fan_in_per_neuron``. ``block``: the block's report if
    already made (:func:`attention_resources` of the same sizes, lowering and limits)."""
    lim, _ = CoreLimits.from_profile(limits)
    d, n = cfg.embed_dim, cfg.tokens
    if block is None:
        block = attention_resources(cfg.heads, d // cfg.heads, n, attention, limits, scale=cfg.attn_scale)
    rest_synapses = cfg.depth * n * (4 * d * d + 2 * d * cfg.mlp_hidden)
    rest_cores = -(-rest_synapses // lim.synapses_per_core)
    cores = cfg.depth * block.cores + rest_cores
    return {"block_cores": block.cores, "block_chips": block.chips, "rest_synapses_at_least": rest_synapses,
            "rest_cores_at_least": rest_cores, "model_cores_at_least": cores,
            "model_chips_at_least": -(-cores // lim.cores_per_chip), "fan_in_residual": cfg.depth * (d + cfg.mlp_hidden),
            "fan_in_per_neuron": lim.fan_in_per_neuron, "cores_per_chip": lim.cores_per_chip}


# ----------------------------------------------------------------------------- one block run on Lava
SOURCE = "qkv"             # the block plan's input: the frames of q, k, v side by side, (3·D·N,)
RUN_TIMEOUT_S = 900.0      # a block run on Lava is stopped after this long (python -m ... --run --timeout-s)


def block_plan(block: AttentionBlock, decay: float, v_threshold: float, attention: str = "product") -> dict:
    """A standard plan (:func:`.standard.lower_standard`'s form, float mode) of ``block`` alone,
    runnable by the Lava worker's ``run_standard_plan``: the input (``RingBuffer``) carries the
    spikes of ``q``, ``k``, ``v`` side by side (``(3, D, N)`` flattened, each channel-first as the
    NIR export lays tokens out), each copied by an identity ``Sparse`` into a relay population
    (``LIFReset``, ``du = dv = 1``, ``vth = 0.5``: spike in, spike out) named ``block.q``/``k``/``v``;
    then :func:`lower_block` (the NIR lowering's own code) and the attention LIF as the standard
    lowering builds a LIF: ``LIFReset`` with ``du = 1``, ``dv = decay``, ``vth = v_threshold`` and
    the rows ``scale·decay``. Sinks: ``attn`` (the attention LIF's spikes, ``(D, N)``) and, for the
    product lowering, ``sums`` (``kv_sum``'s graded spikes, the integers ``M`` ``(H, dh, dh)``).
    ``v_threshold`` follows the export's rule (the model's ``theta`` lowered by one float32 ulp, so
    Lava's ``v > vth`` is the model's ``v >= theta``)."""
    d, n = block.heads * block.dh, block.tokens
    size = d * n
    latency = {SOURCE: 0}
    pops, syns = [], []
    eye = np.arange(size)
    for i, op in enumerate((block.q, block.k, block.v)):
        latency[op] = 1
        pops.append({"name": op, "node_kind": "relay", "size": size, "shape": (size,), "latency": 1, "du": 1.0, "dv": 1.0,
                     "vth": 0.5, "bias": np.zeros(size)})
        syns.append({**_synapse(f"input:{op}", SOURCE, op, _sparse(eye, eye + i * size, 1.0, (size, 3 * size)), 0),
                     "graded": True})
    new_pops, new_syns, term = lower_block(block, latency, attention)
    pops += new_pops
    syns += new_syns
    lif = f"{block.name}.attn_lif"
    latency[lif] = latency[term["src"]] + 1
    pops.append({"name": lif, "node_kind": "LIF", "size": size, "shape": (d, n), "latency": latency[lif], "du": 1.0,
                 "dv": float(decay), "vth": float(v_threshold), "bias": np.zeros(size)})
    rows, cols, n_src, values = term["weight"]
    syns.append({**_synapse(f"{'+'.join(term['nodes'])}:{term['src']}->{lif}", term["src"], lif,
                            _sparse(rows, cols, values * float(decay), (size, n_src)), 0),
                 "nodes": term["nodes"], "message_bits": term["message_bits"], "in_max": term["in_max"]})
    outputs = {"attn": [{"sink": "sink:attn:0", "src": lif, "synapse": None, "latency": latency[lif], "size": size,
                         "bias": None}]}
    shapes = {SOURCE: (3 * size,), "attn": (d, n)}
    if attention in ("product", "strassen"):
        m = f"{block.name}.kv_sum"
        outputs["sums"] = [{"sink": "sink:sums:0", "src": m, "synapse": None, "latency": latency[m], "size": block.units,
                            "bias": None}]
        shapes["sums"] = (block.heads, block.dh, block.dh)
    return {"lowering": "standard", "mode": "float", "input": SOURCE, "in_shape": (3 * size,), "in_size": 3 * size,
            "populations": pops, "synapses": syns, "outputs": outputs, "depth": max(latency.values()), "shapes": shapes,
            "dt": 1.0, "latency": latency, "loihi2": None, "attention": attention}


def miswire(plan: dict, block: AttentionBlock) -> dict:
    """``plan`` with one wiring fault: ``k``'s synapse into the block's first population shifted
    by one neuron (each ``k[hc, j]`` meets ``v[hc', j-1]``), everything else shared. A check that
    the comparison can fail."""
    out = {**plan, "synapses": list(plan["synapses"])}
    for i, s in enumerate(out["synapses"]):
        if s["src"] == block.k and s["dst"] not in (block.q, block.k, block.v):
            m = dict(s["matrix"])
            m["cols"] = (np.asarray(m["cols"]) + 1) % int(m["shape"][1])
            out["synapses"][i] = {**s, "matrix": m}
            return out
    raise LavaUnsupported(f"{block.name}: no synapse from {block.k} into the block in this plan")


def plan_counts(plan: dict, block: AttentionBlock) -> dict[str, int]:
    """Neurons of the block's own populations and synapses (nonzero weights) into them and into
    the attention LIF, as :func:`block_counts` counts them, read from a plan."""
    outside = {block.q, block.k, block.v, f"{block.name}.attn_lif"}
    own = {p["name"] for p in plan["populations"] if p["name"] not in outside}
    return {"neurons": sum(int(p["size"]) for p in plan["populations"] if p["name"] in own),
            "synapses": sum(int(np.count_nonzero(s["matrix"]["values"])) for s in plan["synapses"]
                            if s["dst"] in own or s["dst"] == f"{block.name}.attn_lif")}


def _run_child(folder: str) -> int:
    """The Lava side of :func:`run_block` (a subprocess of its own: lava sets multiprocessing's
    start method at import): build and run the plan with the worker's ``run_standard_plan``, then
    list every process Lava instantiated (class, neurons or weight matrix, where its output goes)
    from Lava's ``ProcessServer``."""
    import json
    import pickle
    import signal

    from lava.magma.core.process.process import ProcessServer

    from .processes import run_standard_plan, terminate

    signal.signal(signal.SIGTERM, terminate)  # run_block's SIGTERM at its timeout: unwind so that Lava's stop() runs

    with open(f"{folder}/plan.pkl", "rb") as f:
        plan = pickle.load(f)
    x = np.load(f"{folder}/x.npy")
    records = run_standard_plan(plan, x, folder)
    inventory = []
    for proc in ProcessServer().processes:
        entry = {"class": f"{type(proc).__module__}.{type(proc).__name__}", "name": proc.name}
        if hasattr(proc, "weights"):
            w = proc.weights.init
            entry.update(shape=[int(n) for n in w.shape], nnz=int(np.count_nonzero(w.data if hasattr(w, "data") else w)))
            conns = proc.a_out.out_connections
            if conns:
                dst = conns[0].process
                entry.update(dst_class=type(dst).__name__, dst_name=dst.name, port=conns[0].name)
        elif hasattr(proc, "v"):
            entry["neurons"] = int(np.prod(proc.v.shape))
        inventory.append(entry)
    with open(f"{folder}/inventory.json", "w") as f:
        json.dump(inventory, f)
    np.savez(f"{folder}/out.npz", **{k: v for k, v in records.items() if k != "__classes__"})
    return 0


def run_block(plan: dict, x: np.ndarray, timeout_s: float = RUN_TIMEOUT_S) -> dict:
    """Run a block plan (:func:`block_plan`) on ``x`` ``(T, 1, 3·D·N)`` (one sample) with Lava's
    processes on ``Loihi2SimCfg`` in a subprocess in its own process group, stopped (the whole
    group) after ``timeout_s``. Returns ``{"records"`` (sink -> ``(size, steps)``), ``"inventory"``
    (every process Lava built), ``"wall_s"`` (the subprocess, start to end), ``"lava_s"`` (build and
    start, steps: Lava's own time), ``"steps"``, ``"peak_rss_bytes"``, ``"peak_pss_bytes"`` (the
    process group's summed memory, sampled every 0.2 s)``}``. A run past ``timeout_s`` raises
    :class:`.worker.LavaTimeout` (its ``pgid``: the stopped group)."""
    import json
    import pickle
    import subprocess
    import tempfile
    import threading
    import time

    from ..base import TargetError
    from .worker import LavaTimeout, group_members, group_memory, stop_group, worker_env

    if x.ndim != 3 or x.shape[1] != 1 or x.shape[2] != plan["in_size"]:
        raise LavaUnsupported(f"run_block: expected x of shape (T, 1, {plan['in_size']}), got {tuple(x.shape)}")
    with tempfile.TemporaryDirectory(prefix="stdeploy-attn-") as folder:
        with open(f"{folder}/plan.pkl", "wb") as f:
            pickle.dump(plan, f, protocol=pickle.HIGHEST_PROTOCOL)
        np.save(f"{folder}/x.npy", np.ascontiguousarray(x, np.float32))
        log = open(f"{folder}/log.txt", "wb")
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "stdeploy.targets.lava.attention", "--child", folder], stdout=log, stderr=subprocess.STDOUT,
                                env=worker_env(), start_new_session=True)
        peak = [0, 0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                rss, pss = group_memory(pid for pid, state, _ in group_members(proc.pid) if state not in ("Z", "X"))
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            wall = time.perf_counter() - t0
            done.set()
            sampler.join()
            stop_group(proc)  # at the timeout, SIGTERM: the child unwinds into Lava's stop(); then what is left of its group
            log.close()
        tail = open(f"{folder}/log.txt", "rb").read()[-3000:].decode(errors="replace")
        if rc is None:
            raise LavaTimeout(f"lava: the attention block run did not finish within {timeout_s:g} s; its process group "
                              f"{proc.pid} was stopped\n{tail}", pgid=proc.pid)
        if rc != 0:
            raise TargetError(f"lava: the attention block run failed (exit status {rc}):\n{tail}")
        with np.load(f"{folder}/out.npz") as z:
            records = {k: np.array(z[k]) for k in z.files}
        with open(f"{folder}/inventory.json") as f:
            inventory = json.load(f)
    build_s, steps_s, steps = (float(v) for v in records.pop("__timing__"))
    return {"records": records, "inventory": inventory, "wall_s": wall, "lava_s": {"build_start": build_s, "steps": steps_s},
            "steps": int(steps), "peak_rss_bytes": peak[0], "peak_pss_bytes": peak[1]}


def inventory_counts(inventory: list[dict], block: AttentionBlock) -> dict[str, int]:
    """:func:`block_counts`' figures read from the processes Lava instantiated (:func:`run_block`):
    neurons of every ``ProdNeuron`` and ``GradedVec`` (and, for the AND lowering, of the
    ``LIFReset`` named after the AND node), nonzero weights of every synaptic process whose output
    goes into one of them or into the attention LIF."""
    own_class = ("ProdNeuron", "GradedVec")
    lif = f"{block.name}.attn_lif"
    neurons = sum(e["neurons"] for e in inventory if "neurons" in e
                  and (e["class"].rsplit(".", 1)[1] in own_class or e["name"] == block.and_node))
    synapses = sum(e["nnz"] for e in inventory if "nnz" in e
                   and (e.get("dst_class") in own_class or e.get("dst_name") in (lif, block.and_node)))
    return {"neurons": neurons, "synapses": synapses}


def model_block_spikes(preset: str, images: int = 1, seed: int = 0, gain: float = 2.0, qkv_bias: float = 0.0,
                       calibration: int = 32) -> dict:
    """A random-weight model of ``preset`` (seed ``seed``; BatchNorm statistics estimated on
    ``calibration`` digits training images with ``gain``, :func:`stdeploy.activity.estimate_batchnorm`;
    the first block's Q, K, V BatchNorm biases raised by ``qkv_bias``) run by PyTorch on the first
    ``images`` digits test images (resized to the preset's image size, the grey channel repeated
    to its channels): the first block's ``q``, ``k``, ``v`` spikes and its attention LIF's
    spikes, ``(T, B, N, D)``, and the sums ``M = Kᵀ·V`` per head ``(T, B, H, dh, dh)``, recorded
    from the model's own modules (``SpikformerAttention``) with forward hooks."""
    import torch

    from ...activity import estimate_batchnorm
    from ...data import load_dataset
    from ...models import build_model, direct_encode

    torch.manual_seed(seed)
    model = build_model(preset)
    cfg = model.cfg
    if cfg.family != "spikformer":
        raise LavaUnsupported(f"{preset} is not a Spikformer (family {cfg.family!r})")
    data = load_dataset("digits", image_size=cfg.image_size)

    def encode(split, count):
        x = torch.stack([split[i][0] for i in range(count)])
        return direct_encode(x.expand(-1, cfg.in_channels, -1, -1).contiguous(), cfg.timesteps)

    estimate_batchnorm(model, [encode(data.train, calibration)], gain=gain)
    attn = model.blocks[0].attn
    with torch.no_grad():
        for m in (attn.q, attn.k, attn.v):
            m.bn.bias += qkv_bias
    rec = {}
    hooks = [getattr(attn, n).register_forward_hook(lambda mod, args, out, n=n: rec.__setitem__(n, out.detach().clone()))
             for n in ("q_lif", "k_lif", "v_lif", "attn_lif")]
    try:
        with torch.no_grad():
            model(encode(data.test, images))
    finally:
        for h in hooks:
            h.remove()
    t, b, n, d = rec["k_lif"].shape
    k, v = (rec[f"{op}_lif"].view(t, b, n, attn.heads, d // attn.heads).transpose(2, 3) for op in "kv")  # (T, B, H, N, dh)
    lif = attn.attn_lif
    decay, theta = lif.decay.numpy(), lif.threshold.numpy()
    if not (np.all(decay == decay[0]) and np.all(theta == theta[0])):
        raise LavaUnsupported(f"{preset}: the attention LIF's decay or threshold varies per neuron; Lava's LIF takes one")
    return {"q": rec["q_lif"].numpy(), "k": rec["k_lif"].numpy(), "v": rec["v_lif"].numpy(),
            "attn": rec["attn_lif"].numpy(), "sums": (k.transpose(-2, -1) @ v).numpy(),
            "heads": attn.heads, "scale": float(attn.scale), "decay": float(decay[0]), "theta": float(theta[0]),
            "config": {"preset": preset, "seed": seed, "gain": gain, "qkv_bias": qkv_bias, "calibration": calibration,
                       "images": images}}


def lava_input(spikes: dict, sample: int = 0) -> np.ndarray:
    """The block plan's input for one sample: ``(T, 1, 3·D·N)``, each of ``q``, ``k``, ``v``
    ``(N, D)`` per frame laid out channel-first ``(D, N)``."""
    frames = [np.swapaxes(spikes[op][:, sample], -1, -2).reshape(spikes[op].shape[0], -1) for op in "qkv"]
    return np.concatenate(frames, axis=1)[:, None, :].astype(np.float32)


def compare(result: dict, plan: dict, spikes: dict, sample: int = 0) -> dict:
    """Lava's attention LIF spikes (and graded sums ``M``, where recorded) against the PyTorch
    reference ``spikes`` of ``sample``: counts of differing entries, totals, firing rate."""
    timesteps = spikes["attn"].shape[0]
    out = {}
    for key, ref in (("attn", np.swapaxes(spikes["attn"][:, sample], -1, -2)), ("sums", spikes["sums"][:, sample])):
        if key not in plan["outputs"]:
            continue
        (term,) = plan["outputs"][key]
        rec = result["records"][term["sink"]][:, int(term["latency"]):int(term["latency"]) + timesteps]  # (size, T)
        got = rec.T.reshape(ref.shape)
        out[key] = {"differ": int(np.count_nonzero(got != ref)), "total": int(ref.size),
                    "mean": float(np.mean(got)), "max": float(np.max(got))}
    out["attn"]["rate_lava"] = out["attn"].pop("mean")
    out["attn"]["rate_reference"] = float(spikes["attn"][:, sample].mean())
    return out


def run_preset(preset: str, attention: str = "product", *, seed: int = 0, gain: float = 2.0, qkv_bias: float = 0.0,
               timeout_s: float = RUN_TIMEOUT_S, check_wiring: bool = False, spikes: dict | None = None) -> dict:
    """One attention block of ``preset``'s sizes on Lava (:func:`block_plan`, :func:`run_block`)
    on the ``q``, ``k``, ``v`` spikes of the model's first block on one digits image
    (:func:`model_block_spikes`), compared with the model's own attention LIF (and ``M``); the
    counts read from the instantiated processes beside :func:`block_counts`; ``check_wiring``
    also runs :func:`miswire`'s plan (its differing spikes reported). ``spikes``: a
    :func:`model_block_spikes` result to use instead (then ``seed``, ``gain``, ``qkv_bias`` are its own)."""
    import time

    t0 = time.perf_counter()
    if spikes is None:
        spikes = model_block_spikes(preset, images=1, seed=seed, gain=gain, qkv_bias=qkv_bias)
    elif spikes["config"]["preset"] != preset:
        raise LavaUnsupported(f"run_preset: spikes of {spikes['config']['preset']} given for {preset}")
    reference_s = time.perf_counter() - t0
    t, _, n, d = spikes["q"].shape
    heads = spikes["heads"]
    block = AttentionBlock(name="blocks.0.attn", q="blocks.0.attn.q_lif", k="blocks.0.attn.k_lif", v="blocks.0.attn.v_lif",
                           heads=heads, dh=d // heads, tokens=n, scale=spikes["scale"], and_node="blocks.0.attn.qkv_and")
    v_threshold = float(np.nextafter(np.float32(spikes["theta"]), np.float32(-np.inf)))  # the NIR export's rule
    t1 = time.perf_counter()
    plan = block_plan(block, spikes["decay"], v_threshold, attention)
    plan_s = time.perf_counter() - t1
    x = lava_input(spikes)
    result = run_block(plan, x, timeout_s)
    report = {"preset": preset, "attention": attention, "heads": heads, "dh": d // heads, "tokens": n, "timesteps": t,
              "reference": spikes["config"], "reference_s": reference_s, "plan_s": plan_s,
              "input_rates": {op: float(spikes[op].mean()) for op in "qkv"},
              "compare": compare(result, plan, spikes), "counts": {"formula": block_counts(heads, d // heads, n, attention),
                                                                  "plan": plan_counts(plan, block),
                                                                  "lava": inventory_counts(result["inventory"], block)},
              "processes": {}, "wall_s": result["wall_s"], "lava_s": result["lava_s"], "steps": result["steps"],
              "peak_rss_bytes": result["peak_rss_bytes"], "peak_pss_bytes": result["peak_pss_bytes"]}
    for e in result["inventory"]:
        report["processes"][e["class"]] = report["processes"].get(e["class"], 0) + 1
    if check_wiring:
        broken = run_block(miswire(plan, block), x, timeout_s)
        report["miswired"] = compare(broken, plan, spikes)
    return report


def main(argv: list[str] | None = None) -> int:
    """Print one attention block's Loihi 2 resources under both lowerings for model presets;
    ``--run``: run one block of each preset's sizes on Lava's processes and compare it with PyTorch
    (exit status 1 where any entry or count differs, the attention LIF is silent or saturated, or
    the miswired plan agrees)."""
    from ...models import PRESETS  # the presets' sizes only
    from ..profiles import load_profile

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--child":  # run_block's subprocess
        return _run_child(argv[1])
    ap = argparse.ArgumentParser(prog="python -m stdeploy.targets.lava.attention", description=main.__doc__)
    ap.add_argument("presets", nargs="+", help="Spikformer presets (spikformer-tiny, spikformer-4-384, ...)")
    ap.add_argument("--profile", default="loihi2-standard", help="device profile whose [limits] apply")
    ap.add_argument("--run", action="store_true", help="run one block of each preset's sizes on Lava and compare with PyTorch")
    ap.add_argument("--attention", default="product", help=f"--run: the lowering, one of {', '.join(ATTENTION_LOWERINGS)}")
    ap.add_argument("--seed", type=int, default=0, help="--run: the random-weight model's seed")
    ap.add_argument("--qkv-bias", type=float, default=0.0, help="--run: added to the Q, K, V BatchNorm biases of block 0")
    ap.add_argument("--timeout-s", type=float, default=RUN_TIMEOUT_S, help="--run: stop the Lava run after this long")
    ap.add_argument("--check-wiring", action="store_true", help="--run: also run the plan with one synapse miswired")
    ap.add_argument("--json", action="store_true", help="--run: print the report as JSON")
    args = ap.parse_args(argv)
    for name in args.presets:
        if name not in PRESETS:
            print(f"error: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}", file=sys.stderr)
            return 2
        if PRESETS[name].family != "spikformer":
            print(f"error: {name} is not a Spikformer (family {PRESETS[name].family!r})", file=sys.stderr)
            return 2
    if args.attention not in ATTENTION_LOWERINGS:
        print(f"error: --attention must be one of {', '.join(ATTENTION_LOWERINGS)}, got {args.attention!r}", file=sys.stderr)
        return 2
    if not args.timeout_s > 0:
        print(f"error: --timeout-s must be > 0, got {args.timeout_s}", file=sys.stderr)
        return 2
    if args.run:
        import json

        failed = []
        for name in args.presets:
            r = run_preset(name, args.attention, seed=args.seed, qkv_bias=args.qkv_bias, timeout_s=args.timeout_s,
                           check_wiring=args.check_wiring)
            c, n = r["compare"], r["counts"]
            if any(v["differ"] for k, v in c.items()) or not n["formula"] == n["plan"] == n["lava"]:
                failed.append(f"{name}: Lava differs from PyTorch or the counts disagree")
            if not 0 < c["attn"]["rate_reference"] < 1:
                failed.append(f"{name}: the attention LIF is silent or saturated (rate {c['attn']['rate_reference']}); "
                              "the comparison means nothing")
            if r.get("miswired", {}).get("attn", {}).get("differ") == 0:
                failed.append(f"{name}: the miswired plan gives the same spikes; the comparison cannot fail")
            if args.json:
                print(json.dumps(r))
                continue
            print(f"{name}: one attention block on Lava ({args.attention}), H={r['heads']} dh={r['dh']} N={r['tokens']} "
                  f"T={r['timesteps']}, {r['steps']} steps")
            print(f"  q/k/v spike rates {', '.join(f'{k} {v:.4f}' for k, v in r['input_rates'].items())} "
                  f"(random-weight model, seed {args.seed}, digits test image 0)")
            print(f"  attention LIF: {c['attn']['differ']} of {c['attn']['total']:,} spikes differ from PyTorch; "
                  f"rate {c['attn']['rate_lava']:.4f} (PyTorch {c['attn']['rate_reference']:.4f})")
            if "sums" in c:
                print(f"  M = K^T V: {c['sums']['differ']} of {c['sums']['total']:,} sums differ; mean {c['sums']['mean']:.3f}, "
                      f"max {c['sums']['max']:.0f}")
            print(f"  neurons / synapses: formula {n['formula']['neurons']:,} / {n['formula']['synapses']:,}; plan "
                  f"{n['plan']['neurons']:,} / {n['plan']['synapses']:,}; Lava's processes {n['lava']['neurons']:,} / "
                  f"{n['lava']['synapses']:,}")
            print(f"  processes: {', '.join(f'{k.split(chr(46), 2)[2]} x {v}' for k, v in sorted(r['processes'].items()))}")
            print(f"  wall {r['wall_s']:.1f} s (Lava build+start {r['lava_s']['build_start']:.1f} s, "
                  f"{r['steps']} steps {r['lava_s']['steps']:.1f} s); plan {r['plan_s']:.1f} s, PyTorch reference "
                  f"{r['reference_s']:.1f} s; peak memory of the Lava process group: PSS {r['peak_pss_bytes'] / 2**30:.2f} GiB, "
                  f"RSS sum {r['peak_rss_bytes'] / 2**30:.2f} GiB")
            if "miswired" in r:
                print(f"  miswired (k shifted by one neuron): {r['miswired']['attn']['differ']} of "
                      f"{r['miswired']['attn']['total']:,} attention spikes differ")
        for line in failed:
            print(f"FAILED: {line}", file=sys.stderr)
        return 1 if failed else 0
    limits = load_profile(args.profile).limits
    print("| preset | H | dh | N | lowering | added neurons | synapses | memory (bits) | cores | fits one chip |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---|")
    reports = {}
    for name in args.presets:
        cfg = PRESETS[name]
        heads, dh, n = cfg.heads, cfg.embed_dim // cfg.heads, cfg.tokens
        for lowering in ATTENTION_LOWERINGS:
            r = reports[name, lowering] = attention_resources(heads, dh, n, lowering, limits, scale=cfg.attn_scale)
            added = r.neurons - cfg.embed_dim * n
            print(f"| {name} | {heads} | {dh} | {n} | {lowering} | {added:,} | {r.synapses:,} | {r.synaptic_memory_bits:,} | "
                  f"{r.cores:,} | {'yes' if r.first_unfit is None else f'no ({r.chips} chips)'} |")
    print()
    print("| preset | lowering | one block's attention: cores (chips) | rest, linear layers alone: synapses, cores | "
          f"whole model: cores, chips (at least) | residual fan-in of head.lif (limit) |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.presets:
        cfg = PRESETS[name]
        for lowering in ATTENTION_LOWERINGS:
            f = model_fit(cfg, lowering, limits, block=reports[name, lowering])
            print(f"| {name} | {lowering} | {f['block_cores']:,} ({f['block_chips']}) | {f['rest_synapses_at_least']:,}, "
                  f"{f['rest_cores_at_least']:,} | >= {f['model_cores_at_least']:,}, >= {f['model_chips_at_least']} | "
                  f">= {f['fan_in_residual']:,} ({f['fan_in_per_neuron']:,}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
