"""The proof, in code, that an exact-mode export is spike-exact on every runtime: a bound on every
partial sum, computed from the weights of the NIR graph, against float32's 24-bit significand.

Each node's values are tracked as an interval ``[lo, hi]`` and a grid ``q`` (every value is an
integer multiple of ``q``, a power of two), walking the graph in topological order:

* ``Input``: the exact mode's input contract (:class:`~stdeploy.models.quantize.InputContract`),
  read from the graph's metadata by :func:`graph_input_contract` (``quantize.input_range`` and
  ``quantize.input_frac_bits``; default ``[0, 1]`` on ``2**-INPUT_FRAC_BITS``). A signed range
  ``[lo, hi]`` (standardised data, ``lo < 0``) is bounded like any other: each term ``w x`` lies
  between ``min(w lo, w hi)`` and ``max(w lo, w hi)``, so a negative weight's worst case comes
  from ``lo`` where a positive one's comes from ``hi``.
* Edges summed into a node: intervals add, the grid is the finest of the terms.
* ``Conv1d``/``Conv2d``/``Linear``/``Affine``: for each output unit, every term ``w * x`` with
  ``x`` in ``[lo, hi]`` lies in ``[min(w lo, w hi), max(w lo, w hi)]``. Whatever order a runtime
  sums the terms and the bias in, every partial sum lies between the sum of the negative extremes
  and the sum of the positive extremes (with the bias): over binary spikes, the sum of the negative
  weights and the sum of the positive weights. The grid is ``grid(w) * q_in`` refined by
  ``grid(b)``.
* ``LIF``: the leak must be a power of two ``2**-j``; the membrane's grid is the input's (and the
  threshold's) refined by ``j`` bits per step over ``T`` steps, its magnitude at most ``max |x|``,
  and intermediates at most ``2 max|x| + theta`` (see :mod:`stdeploy.models.quantize`). Output:
  spikes, ``[0, 1]`` on grid 1.
* ``Threshold``: spikes. ``SumPool2d``: window sums. ``Flatten``: unchanged.
* The model's logits are the mean of the per-step logits over ``T`` steps: ``T`` must be a power
  of two and ``T`` times the logits' bound must fit too.

A value is exact when ``bound / grid <= 2**24``; :func:`check_exact` raises
:class:`~stdeploy.errors.UnsupportedPrimitive` naming every node that could exceed it (with its
bound in bits), and otherwise returns the per-node bounds. The grids come from the stored weights
themselves, so a float model fails here (its weights have 24 significant bits each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import nir
import numpy as np

from ..errors import UnsupportedPrimitive
from ..models.quantize import InputContract
from .nir_interpreter import topological_order

__all__ = ["EXACT_BITS", "Bound", "grid_of", "check_exact", "graph_input_contract", "manifest_input_contract",
           "contract_metadata"]

EXACT_BITS = 24  # float32's significand: integers up to 2**24 (in units of the grid) are exact


@dataclass(frozen=True)
class Bound:
    lo: float        # every value and partial sum lies in [lo, hi]
    hi: float
    grid: float      # every value is an integer multiple of grid (a power of two; inf: only zeros)

    @property
    def magnitude(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    def bits(self, magnitude: float | None = None) -> float:
        """log2 of the largest value in units of the grid."""
        m = self.magnitude if magnitude is None else magnitude
        if m == 0 or math.isinf(self.grid):
            return 0.0
        return math.log2(m / self.grid)


def contract_metadata(contract: InputContract) -> dict:
    """The input contract as graph metadata entries under ``quantize`` (flat, as NIR files store them)."""
    return {"input_frac_bits": contract.frac_bits, "input_range": [contract.lo, contract.hi]}


def graph_input_contract(graph: nir.NIRGraph) -> InputContract:
    """The input contract an exact graph states in ``metadata["quantize"]`` (:func:`contract_metadata`);
    a graph without one: ``[0, 1]`` on ``2**-INPUT_FRAC_BITS`` (the images' contract). A malformed
    entry raises :class:`UnsupportedPrimitive` naming it."""
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    return _contract_of(meta.get("quantize") if isinstance(meta.get("quantize"), dict) else {}, "graph metadata")


def manifest_input_contract(manifest: dict) -> InputContract | None:
    """The input contract of an exact-mode (``exact`` or ``loihi2``) export directory's manifest
    (``quantize``, written by :func:`contract_metadata`; an exact export without one: ``[0, 1]`` on
    ``2**-INPUT_FRAC_BITS``), ``None`` for a float export."""
    q = manifest.get("quantize") if isinstance(manifest, dict) else None
    if not (isinstance(q, dict) and q.get("mode") in ("exact", "loihi2")):
        return None
    return _contract_of(q, "manifest")


def _contract_of(q: dict, where: str) -> InputContract:
    default = InputContract()
    frac, rng = q.get("input_frac_bits", default.frac_bits), q.get("input_range", (default.lo, default.hi))
    try:
        lo, hi = (float(v) for v in np.asarray(rng, np.float64).reshape(-1))
        if isinstance(frac, (bool, np.bool_)) or not isinstance(frac, (int, np.integer)):
            raise ValueError(f"input_frac_bits must be an integer, got {frac!r}")
        return InputContract(lo, hi, int(frac))
    except (ValueError, TypeError) as err:
        raise UnsupportedPrimitive(f"{where} quantize.input_range / input_frac_bits: {err}") from None


def grid_of(values) -> float:
    """The largest power of two that divides every value (``inf`` for an empty or all-zero array).
    Float32 values are dyadic: ``v = M * 2**(e-24)`` with an integer ``M``; the grid is
    ``2**(e - 24 + trailing zeros of M)`` at the finest value."""
    a = np.asarray(values, dtype=np.float64).ravel()
    a = a[a != 0]
    if a.size == 0:
        return math.inf
    if not np.all(np.isfinite(a)):
        raise UnsupportedPrimitive("exact mode: a parameter is not finite")
    mant, exp = np.frexp(np.abs(a))                       # |a| = mant * 2**exp, mant in [0.5, 1)
    m = (mant * 2.0 ** 53).astype(np.uint64)               # an integer: float64 has 53 significant bits
    low = m & (~m + np.uint64(1))                          # lowest set bit of each integer
    tz = np.log2(low.astype(np.float64))
    return float(2.0 ** np.min(exp.astype(np.float64) - 53 + tz))


def _label(name: str, node) -> str:
    module = (getattr(node, "metadata", None) or {}).get("module")
    return f"{name} ({module})" if module and module != name else name


def _weighted(w: np.ndarray, b: np.ndarray | None, rows_of, x: Bound) -> Bound:
    """Bound of ``W x + b`` and its partial sums; ``rows_of(w)`` gives ``(units, terms)``."""
    w = np.asarray(w, np.float64)
    rows = rows_of(w)
    t1, t2 = rows * x.lo, rows * x.hi
    top = np.maximum(np.maximum(t1, t2), 0).sum(1)
    bottom = np.minimum(np.minimum(t1, t2), 0).sum(1)
    grid = grid_of(w) * x.grid
    if b is not None:
        bias = np.broadcast_to(np.asarray(b, np.float64).reshape(-1), top.shape) if np.size(b) in (1, top.size) else np.asarray(b, np.float64).reshape(top.shape)
        top, bottom = top + np.maximum(bias, 0), bottom + np.minimum(bias, 0)
        grid = min(grid, grid_of(b))
    return Bound(float(bottom.min(initial=0.0)), float(top.max(initial=0.0)), grid)


def _conv_rows(w):
    return w.reshape(w.shape[0], -1)


def _linear_rows(w):
    return w.reshape(-1, w.shape[-1])


def check_exact(graph: nir.NIRGraph, timesteps: int | None = None, *, input_bound: Bound | None = None,
                limit_bits: int = EXACT_BITS) -> dict[str, dict]:
    """Check that every partial sum of ``graph`` is exactly representable in float32 for any input
    that meets the exact mode's contract (``input_bound``, else the graph's own,
    :func:`graph_input_contract`); returns ``{node: {"lo", "hi", "grid", "bits"}}``.

    Raises :class:`UnsupportedPrimitive` listing every node whose bound exceeds ``2**limit_bits``
    grid units, whose leak is not a power of two, or whose type it does not know."""
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    T = int(timesteps if timesteps is not None else meta.get("timesteps", 0))
    if T < 1:
        raise UnsupportedPrimitive("exact check: the number of timesteps is unknown (graph metadata 'timesteps')")
    dt = float(np.asarray(meta.get("dt", 1.0)))
    if input_bound is None:
        contract = graph_input_contract(graph)
        input_bound = Bound(contract.lo, contract.hi, contract.grid)
    inp = input_bound
    into: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for src, dst in graph.edges:
        into[dst].append(src)
    bounds: dict[str, Bound] = {}
    report: dict[str, dict] = {}
    problems: list[str] = []
    analog: set[str] = set()  # nodes that see the analog input before any spike: their bounds scale with the contract

    def need(label: str, bound: Bound, magnitude: float | None = None, what: str = "partial sums") -> None:
        bits = bound.bits(magnitude)
        if bits > limit_bits:
            problems.append(f"{label}: {what} reach 2^{bits:.1f} grid units (grid 2^{math.log2(bound.grid):.0f}), "
                            f"over the 2^{limit_bits} that float32 holds exactly" + (" [analog input]" if name in analog else ""))

    for name in topological_order(graph):
        node = graph.nodes[name]
        label = _label(name, node)
        if isinstance(node, nir.Input):
            bounds[name] = inp
            analog.add(name)
            continue
        if any(s in analog and not isinstance(graph.nodes[s], (nir.LIF, nir.Threshold)) for s in into[name]):
            analog.add(name)  # a LIF's membrane sees the analog values, its output is spikes
        srcs = [bounds[s] for s in into[name]]
        if not srcs:
            problems.append(f"{label}: no incoming edge")
            continue
        x = Bound(sum(min(s.lo, 0.0) for s in srcs), sum(max(s.hi, 0.0) for s in srcs), min(s.grid for s in srcs))
        if len(srcs) > 1:
            need(label, x, what="sums of its input edges")
        if isinstance(node, (nir.Output, nir.Flatten)):
            out = x
        elif isinstance(node, (nir.Conv1d, nir.Conv2d)):
            out = _weighted(node.weight, node.bias, _conv_rows, x)
        elif isinstance(node, nir.Affine):
            out = _weighted(node.weight, node.bias, _linear_rows, x)
        elif isinstance(node, nir.Linear):
            out = _weighted(node.weight, None, _linear_rows, x)
        elif isinstance(node, nir.SumPool2d):
            k = int(np.prod(np.asarray(node.kernel_size)))
            out = Bound(x.lo * k if x.lo < 0 else 0.0, x.hi * k if x.hi > 0 else 0.0, x.grid)
        elif isinstance(node, nir.Threshold):
            out = Bound(0.0, 1.0, 1.0)
        elif isinstance(node, nir.LIF):
            out = Bound(0.0, 1.0, 1.0)
            d = (dt / np.asarray(node.tau, np.float64)).astype(np.float32).astype(np.float64)
            mant, _ = np.frexp(d)
            if not (np.all(mant == 0.5) and np.all(d < 1)):
                problems.append(f"{label}: leak d = dt/tau = {np.unique(d)[:3]} is not a power of two; the membrane "
                                "would gain bits at every step (use tau = 2, d = 1/2, or quantise the model)")
                bounds[name] = out
                continue
            if not (np.all(np.asarray(node.r) == 1) and np.all(np.asarray(node.v_leak) == 0) and np.all(np.asarray(node.v_reset) == 0)):
                problems.append(f"{label}: exact check knows LIF with r = 1, v_leak = 0, v_reset = 0 only")
            j = int(round(-math.log2(float(d.min()))))  # the smallest leak adds the most bits per step
            theta = np.asarray((node.metadata or {}).get("theta", node.v_threshold), np.float64)
            grid = min(x.grid, grid_of(theta)) * 2.0 ** (-j * T)
            membrane = Bound(min(x.lo, 0.0), max(x.hi, 0.0), grid)
            need(label, membrane, 2 * membrane.magnitude + float(np.abs(theta).max()), "membrane updates")
            report[name + ".membrane"] = {"lo": membrane.lo, "hi": membrane.hi, "grid": grid,
                                          "bits": membrane.bits(2 * membrane.magnitude + float(np.abs(theta).max()))}
        else:
            problems.append(f"{label}: node type {type(node).__name__} is unknown to the exact check")
            continue
        if isinstance(node, (nir.Conv1d, nir.Conv2d, nir.Affine, nir.Linear, nir.SumPool2d)):
            need(label, out)
        bounds[name] = out
        report[name] = {"lo": out.lo, "hi": out.hi, "grid": out.grid, "bits": out.bits()}
        if isinstance(node, nir.Output) and name == "logits":
            if T & (T - 1):
                problems.append(f"{label}: the mean over T = {T} steps is not exact (T must be a power of two)")
            need(label, out, T * out.magnitude, f"sums over the {T} steps")
    if problems:
        hint = ("\n  (a layer marked [analog input] scales with the input contract: a coarser grid or a narrower range, "
                "stdeploy quantize --input-frac-bits N / --input-range LO,HI, takes bits off it)"
                if any("[analog input]" in p for p in problems) else "")
        raise UnsupportedPrimitive("not exactly representable in float32 (exact mode): " + str(len(problems))
                                   + " problem(s):\n  - " + "\n  - ".join(problems) + hint)
    return report
