"""The Lava lowering's fixed-point mode: Loihi-style integers.

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
several populations becomes one process per population (each folds its own ``alpha``), shared
by the populations whose integers come out the same (an exact graph's residual stream: every
population of the stream has the same ``alpha``, so each writer is one process, not one per
later block: the exact ``sdt-8-512``'s plan has 212 processes instead of 468); a spike
edge straight into a LIF becomes a one-to-one synaptic layer (there is no weightless path into a
compartment). AND/OR units count spikes exactly (weight 1, ``vth = floor(threshold)``). The input
is quantised to ``2**-8``; layers feeding the readout are graded integers with a real scale
applied on the host.

Exact-mode graphs: the model's own integers, no re-quantisation
---------------------------------------------------------------
A graph exported in the exact mode (graph metadata ``quantize.mode == "exact"``, see
:mod:`stdeploy.models.quantize`) already holds 8-bit integer weights on power-of-two grids,
thresholds on ``2**-8``, leaks ``d = 2**-j`` and an input on ``2**-8``. :func:`lower_fixed` then
maps those integers onto Loihi's arithmetic exactly instead of normalising and re-quantising:

* Each LIF population gets one unit ``G``, the membrane grid that
  :func:`stdeploy.export.exact.check_exact` proves (the finest grid of its input terms, biases
  and threshold, refined by ``j`` bits per step over ``T`` steps). Lava's ``v`` holds
  ``64 v / G``: ``a_in = d x / G`` (an integer: ``x`` is a multiple of ``q`` and ``d q >= G``),
  which Lava shifts ``<< 6``; ``du = 4095`` (``u = a_in << 6`` each step), ``dv = 4096 d``.
* The decay ``sign(v (4096 - dv)) (|v (4096 - dv)| >> 12)`` rounds toward zero; it is exact because
  ``(1 - d) v`` is a multiple of ``G`` at every step of a sample (the same grid argument), so no
  membrane is ever odd where Lava halves it. Membranes start at 0 (synapses send nothing before
  their data) and reset to 0.
* Lava spikes on ``v > vth << 6``; the model on ``v >= theta``. Both ``v / G`` and ``theta / G`` are
  integers, so ``vth = theta / G - 1`` is the same rule, with no bias.
* Every synaptic layer into a population keeps its integer weights ``W`` (8 bits) with the layer's
  power of two ``d s sigma_in / G`` as Loihi's ``weight_exp`` (``<< e``, ``e >= 0``), its bias
  ``B d s / G``; spike edges straight in become one-to-one layers with weight ``d / G`` (a power
  of two). Layers feeding the readout keep the power-of-two grid of their weights (e.g. the token
  mean's ``1/N`` is weight 1 at scale ``1/N``), so the host's logits are exact too.
* Range: Lava's ``u = a_in << 6`` wraps beyond 24 bits and ``v`` clips there. Clipping above is
  harmless (such a membrane is over the threshold in both arithmetics and both reset it to 0), so
  a population is exact for every input when ``64 d max|x| / G`` and ``64 |min x| / G`` (the
  proven bounds) stay below ``2**23``: six bits fewer than float32's 2^24 that the export's check
  allows. :func:`register_bits` gives each population's need in bits (sign included) for an
  input grid, :func:`input_grids` on every grid the plan may choose; the plan records it per
  population (``plan["quant"][name]``: ``unit``, ``register_bits``, ``proven``; the compile info's
  ``quantisation``). The first layer's need falls one bit per input bit
  (:func:`fit_input_contract` takes the finest grid that fits); where a population past it does
  not fit on any grid, the plan is refused by name, or, with ``unproven="guard"``, lowered with
  that population under :class:`~.processes.PyLifModelBitAccGuarded`, which stops the run at
  the first ``u`` that would wrap: a run that completes is exact for its inputs, proven for none.
  A layer whose integers would need re-quantising and a readout that would need Lava's floor
  shift are refused by name (:class:`~.graph.LavaUnsupported`), never rounded.

Loihi 2 mode graphs (``quantize.mode == "loihi2"``): Loihi's units, netx's arithmetic
-------------------------------------------------------------------------------------
A model quantised with ``--quantize loihi2`` (:mod:`stdeploy.models.quantize`) has thresholds
``theta = (vth + 2**(-j (T-1))) U`` with an integer ``vth`` and ``U = d s_in``, the current unit of
the population. Its populations are lowered in that unit instead of the proven grid ``G``
(:func:`loihi2_population`): ``U = grid(theta) 2**(j (T-1))`` read back from the thresholds,
``a_in = d x / U`` (the layers' 8-bit mantissas themselves, exponent 0 where the population's
layer has the grid ``s_in``), Lava's ``vth`` is that integer ``vth`` (``v > vth << 6``), and the
membrane keeps ``6`` fractional bits below ``U`` (``a_in << 6``), which hold every membrane of a
sample exactly while ``j (T-1) <= 6``. This is the arithmetic of lava-dl netx's CUBA layers, so a
netx export of the same model (:mod:`stdeploy.export.netx_export`) gives the same spikes. A
loihi2 graph whose thresholds are not of that form, whose proven range exceeds the 24-bit
registers, or whose ``vth`` exceeds 17 bits is refused by name (no warning, no wrap).

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
import warnings

import numpy as np

from ...errors import UnsupportedPrimitive
from ...export.exact import Bound, check_exact, graph_input_contract
from ...models.quantize import InputContract, loihi2_vth
from ...export.nir_interpreter import int_tuple
from ..base import TargetError
from .graph import NEURONS, SYNAPSES, GraphInfo, LavaUnsupported, decay, node_kind
from .plan import Plan, add_outputs, conn, lif_params

__all__ = ["FIXED_VTH", "FIXED_INPUT_FRAC_BITS", "DECAY_UNITY", "GRADED_MAX", "op_spec", "weight_and_bias", "row_factor",
           "quantise", "row_abs_sum", "exact_membranes", "register_bits", "input_grids", "fit_input_contract", "UV_BITS", "UNPROVEN", "lower_fixed", "graph_mode", "loihi2_population"]

FIXED_VTH = 2 ** 12            # fixed mode: integer threshold of a (normalised) LIF population, lowered where inputs could overflow
FIXED_INPUT_FRAC_BITS = 8      # fixed mode: the input is quantised to 2**-8 steps
DECAY_UNITY = 4096             # Loihi's 12-bit decays: dv = round(4096 * d)
GRADED_MAX = 2 ** 23 - 1       # fixed mode: graded values (readout layers) stay within 24-bit payloads
ACT_SHIFT = 6                  # Lava's bit-accurate LIF: a_in << 6 and vth << 6 (MSB alignment)
UV_MAX = 2 ** 23 - 1           # Lava's bit-accurate LIF: 24-bit signed u and v
UV_BITS = math.log2(UV_MAX) + 1  # u and v hold a value needing at most this many bits (sign included; just under 24)
UNPROVEN = ("refuse", "guard")  # exact graph, a population whose proven range exceeds the registers: refuse, or run guarded
VTH_MAX = 2 ** 17 - 1          # Lava's bit-accurate LIF: 17-bit vth


def op_spec(node, kind: str) -> dict:
    """The integer operation of synaptic node ``node`` (``op`` and its geometry), without weights."""
    if kind == "Conv2d":
        return {"op": "conv2d", "stride": int_tuple(node.stride, 2), "padding": int_tuple(node.padding, 2),
                "dilation": int_tuple(node.dilation, 2), "groups": int(node.groups)}
    if kind == "Conv1d":
        return {"op": "conv1d", "stride": int_tuple(node.stride, 1), "padding": int_tuple(node.padding, 1),
                "dilation": int_tuple(node.dilation, 1), "groups": int(node.groups)}
    if kind in ("Linear", "Affine"):
        return {"op": "linear"}
    if kind == "SumPool2d":
        return {"op": "sumpool2d", "kernel_size": int_tuple(node.kernel_size, 2), "stride": int_tuple(node.stride, 2),
                "padding": int_tuple(node.padding, 2)}
    raise LavaUnsupported(f"no fixed-point form for {kind}")


def weight_and_bias(node, kind: str, out_shape) -> tuple[np.ndarray | None, np.ndarray]:
    """The node's weight (None for SumPool2d) and its bias broadcast to the output shape."""
    w = None if kind == "SumPool2d" else np.asarray(node.weight, np.float64)
    b = np.zeros(out_shape)
    if kind in ("Conv2d", "Conv1d"):
        b = np.broadcast_to(np.asarray(node.bias, np.float64).reshape((-1,) + (1,) * (len(out_shape) - 1)), out_shape)
    elif kind == "Affine":
        b = np.broadcast_to(np.asarray(node.bias, np.float64), out_shape)
    return w, np.array(b, np.float64)


def row_factor(alpha: np.ndarray, kind: str, w, out_shape, name: str) -> np.ndarray:
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


def quantise(a: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """``a ~ q * 2**e`` with ``|q| <= 2**(bits-1) - 1``; integer arrays that fit keep ``e = 0``."""
    qmax = 2 ** (bits - 1) - 1
    amax = float(np.abs(a).max(initial=0.0))
    if amax == 0:
        return np.zeros_like(a), 0
    if np.all(a == np.rint(a)) and amax <= qmax:
        return np.rint(a), 0
    e = math.ceil(math.log2(amax / qmax))
    return np.clip(np.rint(a / 2.0 ** e), -qmax, qmax), e


def row_abs_sum(q: np.ndarray | None, op: dict) -> float:
    """The largest sum of |weights| into one output (an upper bound of the gain from input to output)."""
    if q is None:  # SumPool2d: a window of ones
        return float(np.prod(op["kernel_size"]))
    if op["op"] in ("conv2d", "conv1d"):
        return float(np.abs(q).reshape(q.shape[0], -1).sum(axis=1).max(initial=0.0))
    if op["op"] == "linear":
        return float(np.abs(q).sum(axis=-1).max(initial=0.0))
    return float(np.abs(q).max(initial=0.0))


def _is_exact_graph(graph) -> bool:
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    q = meta.get("quantize")
    return isinstance(q, dict) and q.get("mode") in ("exact", "loihi2")


def graph_mode(graph) -> str:
    """The graph's arithmetic: ``"exact"``, ``"loihi2"`` (the exact arithmetic in Loihi's units) or
    ``"float"`` (graph metadata ``quantize.mode``)."""
    return graph.metadata["quantize"]["mode"] if _is_exact_graph(graph) else "float"


def exact_membranes(graph, contract: InputContract | None = None) -> dict[str, dict] | None:
    """For a graph exported in the exact mode (graph metadata ``quantize.mode`` ``"exact"`` or
    ``"loihi2"``): per LIF node, its membrane's proven bound and grid (``{"lo", "hi", "grid"}`` from
    :func:`~stdeploy.export.exact.check_exact`) for inputs on ``contract`` (default: the graph's
    own, :func:`~stdeploy.export.exact.graph_input_contract`); ``None`` for other graphs. A graph
    that claims the exact mode but fails the check is refused."""
    if not _is_exact_graph(graph):
        return None
    try:
        contract = contract or graph_input_contract(graph)
        report = check_exact(graph, input_bound=Bound(contract.lo, contract.hi, contract.grid))
    except UnsupportedPrimitive as err:
        raise LavaUnsupported(f"lava fixed mode: the graph says it is exact, but {err}") from None
    return {k[: -len(".membrane")]: v for k, v in report.items() if k.endswith(".membrane")}


def _register_units(node, info: GraphInfo, membrane: dict) -> float:
    """The largest magnitude, in Lava's units (``64 v / G``), that a population's ``u`` (the input
    ``a_in << 6``), ``v`` (below zero) or threshold (``vth << 6``) can reach over its proven input
    range; exact while <= 2^23 - 1. ``v`` above the threshold clips harmlessly (both arithmetics fire
    and reset it)."""
    d = decay(node, info.dt).astype(np.float64)
    grid, lo, hi = float(membrane["grid"]), float(membrane["lo"]), float(membrane["hi"])
    u_units = (2 ** ACT_SHIFT) * float(d.max()) * max(abs(lo), abs(hi)) / grid
    v_units = (2 ** ACT_SHIFT) * abs(lo) / grid
    # vth = theta / G - 1 must fit Lava's 17-bit vth (vth << 6 within 24 bits), or the threshold would be cut
    vth_units = (2 ** ACT_SHIFT) * (float(_theta(node).max()) / grid - 1)
    return max(u_units, v_units, vth_units, 1.0)


def register_bits(info: GraphInfo, contract: InputContract | None = None) -> dict[str, float] | None:
    """Per LIF population of an exact graph, the bits (sign included) that its proven range needs
    in Lava's registers for inputs on ``contract`` (default: the graph's own): ``log2`` of
    :func:`_register_units` plus one. A population fits Loihi's 24-bit ``u`` and ``v`` when this
    is at most 24 (``64 d max|x| / G < 2**23``: the proven input bound below ``2**17`` units of
    ``G`` at ``d = 1/2``). ``None`` for a graph that is not exact."""
    if not _is_exact_graph(info.graph):
        return None
    return _bits(info, exact_membranes(info.graph, contract))


def _bits(info: GraphInfo, membranes: dict[str, dict]) -> dict[str, float]:
    """:func:`register_bits` from the populations' proven membranes (:func:`exact_membranes`)."""
    return {name: math.log2(_register_units(info.graph.nodes[name], info, m)) + 1 for name, m in membranes.items()}


def input_grids(info: GraphInfo) -> list[tuple[InputContract, dict[str, float]]] | None:
    """:func:`register_bits` on every input grid the fixed lowering can choose for an exact graph:
    ``2**-k`` for ``k`` from the graph's own ``frac_bits`` down to 0, each range kept inside the
    graph's own (``[ceil(lo 2^k), floor(hi 2^k)] / 2^k``), finest first; ``None`` for a graph that
    is not exact. Only populations whose range depends on the input (the analog first layer) change
    from grid to grid: what :func:`fit_input_contract` chooses from, and what a report shows."""
    if not _is_exact_graph(info.graph):
        return None
    return [(contract, register_bits(info, contract)) for contract in _grids(graph_input_contract(info.graph))]


def _grids(own: InputContract) -> list[InputContract]:
    """The input contracts of :func:`input_grids`, finest first."""
    grids = []
    for k in range(own.frac_bits, -1, -1):
        n = 2 ** k
        lo, hi = math.ceil(own.lo * n) / n, math.floor(own.hi * n) / n
        if not lo < hi:
            break
        grids.append(own if k == own.frac_bits else InputContract(lo, hi, k))
    return grids


def fit_input_contract(info: GraphInfo, unproven: str = "refuse") -> tuple[InputContract, dict[str, dict]] | None:
    """The input grid of an exact graph on Loihi's 24-bit registers: ``(contract, membranes)``
    with the finest grid ``2**-k`` (``k`` down from the graph's own ``frac_bits``) on which every
    population's proven range fits (:func:`_register_units`); ``None`` for a graph that is not exact.

    The analog first layer's membrane grid is the input grid times its weights' grid refined by
    the leak's ``T`` bits, so each bit off the input grid takes one bit off its register need (the
    4-block test model: 2^26.5 units at the default 2^-8, within 2^23 at 2^-4). A coarser grid keeps
    the range inside the graph's own (``[ceil(lo 2^k), floor(hi 2^k)] / 2^k``), so inputs on it are
    also on the graph's contract and the reference sees them unchanged. Where no grid fits (a
    population past the first whose range does not depend on the input), the graph is refused
    (:class:`~.graph.LavaUnsupported`) naming each population and its register bits on the graph's
    own grid and on the coarsest: never run with ``u`` wrapping unseen.

    ``unproven="guard"`` instead takes the finest grid on which every population that any grid
    can prove is proven (the others' worst case does not depend on the grid), and the plan runs
    the rest under a guard that stops the run, naming the population, at the first ``u`` that would
    wrap or ``v`` that would clip below (:func:`lower_fixed`): exact for the inputs it completes
    on, proven for none.

    A loihi2-mode graph keeps its own contract (its grid already fits Loihi, and its thresholds
    are integers in units of that grid): the trained integers are never re-quantised, and
    :func:`loihi2_population` refuses by name a population whose proven range does not fit."""
    if unproven not in UNPROVEN:
        raise TargetError(f"lava fixed mode: unproven must be one of {UNPROVEN}, got {unproven!r}")
    g = info.graph
    if not _is_exact_graph(g):
        return None
    own = graph_input_contract(g)
    if graph_mode(g) == "loihi2":
        return own, exact_membranes(g, own)
    contracts, limit = _grids(own), UV_BITS
    membranes_on = functools.lru_cache(maxsize=None)(lambda c: exact_membranes(g, c))  # check_exact once per grid
    bits_on = functools.lru_cache(maxsize=None)(lambda c: _bits(info, membranes_on(c)))
    over_on = lambda c: {n for n, b in bits_on(c).items() if b > limit}  # noqa: E731
    # over on the coarsest grid: over on every grid (asked only where the guard may run past it)
    irreducible = over_on(contracts[-1]) if unproven == "guard" else set()
    for contract in contracts:
        over = over_on(contract)
        if not over or (unproven == "guard" and over <= irreducible):
            return contract, membranes_on(contract)
    irreducible = over_on(contracts[-1])
    worst = lambda bits: ", ".join(f"{n} needs {b:.1f} bits" for n, b in bits.items() if b > limit)  # noqa: E731
    (first, first_bits), (last, last_bits) = (contracts[0], bits_on(contracts[0])), (contracts[-1], bits_on(contracts[-1]))
    raise LavaUnsupported("lava fixed mode, exact graph: no input grid fits Loihi's 24-bit u and v: on the graph's own grid "
                          f"2^-{first.frac_bits} " + worst(first_bits)
                          + (f"; on the coarsest, 2^-{last.frac_bits}, still {len(irreducible)} population(s): " + worst(last_bits)
                             if last is not first else "")
                          + " (an input range this wide, or a population whose range does not depend on the input: quantise "
                          "with a narrower --input-range or smaller weights, or run lava mode = \"floating\")")


def _theta(node) -> np.ndarray:
    """The model's threshold (``v >= theta``) per neuron: ``v_threshold`` raised by the float32 ulp
    the export took off (the metadata's ``theta``, per channel, is the same value)."""
    return np.nextafter(np.asarray(node.v_threshold, np.float32), np.float32(np.inf)).astype(np.float64)


def _exact_lif(name: str, node, info: GraphInfo, membrane: dict) -> dict:
    """The population of an exact-mode LIF: unit ``G`` (the proven membrane grid), ``alpha = d / G``,
    and whether the proven input range fits Loihi's registers (``proven``)."""
    d = decay(node, info.dt).astype(np.float64)
    grid = float(membrane["grid"])
    theta = _theta(node)
    t_units = theta / grid
    if not np.all(t_units == np.rint(t_units)):
        raise LavaUnsupported(f"{name}: threshold is not on the membrane grid 2^{math.log2(grid):.0f}")
    dv = d * DECAY_UNITY
    if not np.all(dv == np.rint(dv)):
        raise LavaUnsupported(f"{name}: leak {np.unique(d)[:3]} is not a multiple of 1/{DECAY_UNITY}")
    # u = (d x / G) << 6 must not wrap; v must not clip below (clipping above is harmless: such a v
    # is over the threshold in both arithmetics, and both reset it to 0)
    need = _register_units(node, info, membrane)
    alpha = np.broadcast_to(d / grid, info.shapes[name])
    if float(np.max(t_units - 1, initial=0)) > VTH_MAX:
        raise LavaUnsupported(f"{name}: threshold of {int(np.max(t_units)) - 1:,} membrane units exceeds Lava's 17-bit vth")
    vth = (t_units - 1).astype(np.int64)  # v/G > theta/G - 1  <=>  v >= theta (both integers)
    lif = {"du": DECAY_UNITY - 1, "dv": np.rint(dv).astype(np.int64), "vth": vth, "bias": 0}
    return {"alpha": alpha, "count": False, "lif": lif, "vth": None,
            "exact": {"unit": grid, "register_bits": round(math.log2(need) + 1, 2), "proven": need <= UV_MAX}}


def loihi2_population(name: str, node, info: GraphInfo, membrane: dict, timesteps: int) -> dict:
    """A loihi2-mode LIF population in its current unit ``U`` (the module docstring):
    ``{"alpha": d / U per neuron (the node's output shape), "lif": {"du", "dv", "vth", "bias"} in
    Lava's integers, "exact": {"unit", "register_bits", "proven", "mode"}}``; a threshold not of
    the form ``(vth + 2^-j(T-1)) U`` (:func:`stdeploy.models.quantize.loihi2_vth`, the netx export's
    rule too), a leak not ``2^-j`` with ``j (T-1) <= 6``, or a range past the 24-bit registers is
    refused by name (:class:`~.graph.LavaUnsupported`)."""
    d = np.broadcast_to(decay(node, info.dt).astype(np.float64), np.shape(node.v_threshold))
    j = -np.log2(d)
    if not np.all(j == np.rint(j)) or float(j.max()) * (timesteps - 1) > 6:
        raise LavaUnsupported(f"{name}: loihi2 mode needs leaks 2^-j with j (T-1) <= 6 (Lava's 6 fractional membrane bits)")
    try:
        unit, vth = loihi2_vth(_theta(node), d, timesteps, name)
    except UnsupportedPrimitive as err:
        raise LavaUnsupported(str(err)) from None
    if float(vth.max()) > VTH_MAX:
        raise LavaUnsupported(f"{name}: loihi2 mode: vth {int(vth.max()):,} exceeds Lava's 17-bit vth")
    lo, hi = float(membrane["lo"]), float(membrane["hi"])
    u_units = (2 ** ACT_SHIFT) * float((d / unit).max()) * max(abs(lo), abs(hi))
    v_units = (2 ** ACT_SHIFT) * abs(lo) / float(unit.min())
    need = max(u_units, v_units, 1.0)
    if need > UV_MAX:
        raise LavaUnsupported(f"{name}: loihi2 mode: the proven membrane range needs 2^{math.log2(need):.1f} units, more than "
                              "Loihi's 24-bit u and v hold")
    lif = {"du": DECAY_UNITY - 1, "dv": np.rint(d * DECAY_UNITY).astype(np.int64), "vth": np.rint(vth).astype(np.int64), "bias": 0}
    alpha = np.broadcast_to((d / unit).reshape(np.shape(node.v_threshold)), info.shapes[name])
    return {"alpha": alpha, "count": False, "lif": lif, "vth": None,
            "exact": {"unit": float(unit.min()), "register_bits": round(math.log2(need) + 1, 2), "proven": True, "mode": "loihi2"}}


def _exact_quantise(a: np.ndarray, bits: int, name: str) -> tuple[np.ndarray, int]:
    """``quantise`` for an exact graph, which must not round: ``a = q * 2**e`` exactly."""
    q, e = quantise(a, bits)
    if not np.array_equal(q * 2.0 ** e, a):
        raise LavaUnsupported(f"{name}: exact mode: its integers do not fit {bits}-bit mantissas with one power-of-two "
                              "exponent (the export's weights are not on one power-of-two grid)")
    return q, e


def _pow2_grid(w: np.ndarray, bits: int, name: str) -> float:
    """The scale of a graded layer of an exact graph: the coarsest power of two on whose grid
    every weight is an integer of at most ``bits`` bits."""
    from ...export.exact import grid_of

    grid = grid_of(w)
    if math.isinf(grid):
        return 1.0
    top = float(np.abs(w).max()) / grid
    qmax = 2 ** (bits - 1) - 1
    if top > qmax:
        raise LavaUnsupported(f"{name}: exact mode: its weights need {math.ceil(math.log2(top + 1)) + 1} bits on their grid, "
                              f"more than weight_bits = {bits}")
    return grid


def _same_params(a: dict, b: dict) -> bool:
    """Two synaptic processes' parameters hold the same integers (so one process can feed both);
    ``start`` (set by :meth:`Plan.add` from the inputs, which are the same) is not compared."""
    a, b = ({k: v for k, v in p.items() if k != "start"} for p in (a, b))
    if a.keys() != b.keys() or a["op_spec"].keys() != b["op_spec"].keys():
        return False
    pairs = [(a[k], b[k]) for k in a if k != "op_spec"] + [(a["op_spec"][k], b["op_spec"][k]) for k in a["op_spec"]]
    for x, y in pairs:
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.shape == y.shape and np.array_equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def lower_fixed(info: GraphInfo, bits: int, unproven: str = "refuse") -> Plan:
    """The fixed-mode plan of an analysed graph with ``bits``-bit weight mantissas (for an
    exact-mode graph: its own integers, see the module docstring). ``unproven`` (exact graphs):
    ``"refuse"`` a population whose proven range exceeds Loihi's registers on every input grid, or
    ``"guard"``: lower it anyway, marked ``proven: False`` in ``plan.quant`` with its worst-case
    ``register_bits``, and the worker runs it under a guard that stops the run at the first ``u``
    that would wrap or ``v`` that would clip below (:func:`fit_input_contract`)."""
    if not 2 <= int(bits) <= 16:
        raise TargetError(f"lava fixed mode: weight_bits must be in [2, 16], got {bits}")
    g, plan = info.graph, Plan("fixed")
    fitted = fit_input_contract(info, unproven)
    exact = fitted is not None
    contract, membranes = fitted if exact else (None, None)
    loihi2 = graph_mode(g) == "loihi2"
    if exact:
        plan.input_contract = contract.to_dict()
        own = graph_input_contract(g)
        if contract != own:
            warnings.warn(f"lava fixed mode, exact graph: inputs are rounded to 2^-{contract.frac_bits} in "
                          f"[{contract.lo:g}, {contract.hi:g}] on this target (the export's contract is 2^-{own.frac_bits}: "
                          "its first layer would need more than Loihi's 24-bit u); spikes are exact for the inputs so "
                          "rounded (plan input_contract)", stacklevel=4)
    requant = _exact_quantise if exact else (lambda a, b, _name: quantise(a, b))
    scale: dict[str, float] = {}                # graded integer process -> real value of one unit
    bound: dict[str, float] = {}                # graded integer process -> largest |value| it can send
    pops: dict[str, dict] = {}                  # population -> {"alpha": per neuron, "count": bool}
    twins: dict[str, str] = {}                  # synaptic process -> the process with the same integers it reuses

    real_bounds: dict[str, float] = {}

    def real_bound(name: str) -> float:
        """An upper bound of |value| of node ``name`` in model units (spikes 1, inputs assumed in
        [-1, 1]; a synaptic node: its largest row sum of |weights| times its input's bound, plus |bias|)."""
        if name not in real_bounds:
            kind = node_kind(g.nodes[name])
            if kind in SYNAPSES:
                w, b = weight_and_bias(g.nodes[name], kind, info.shapes[name])
                gain = row_abs_sum(w, op_spec(g.nodes[name], kind))
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
        layers = [s for s, _ in info.terms[name] if node_kind(g.nodes[s]) in SYNAPSES and node_kind(g.nodes[s]) != "SumPool2d"]
        if not layers or len(layers) < len(info.terms[name]):
            return vmax  # a spike edge straight in keeps a power-of-two scale: its weight alpha stays exact
        widest = max(layers, key=lambda s: np.asarray(g.nodes[s].weight).size)
        w = np.asarray(g.nodes[widest].weight, np.float64)
        gain = np.asarray(gain, np.float64).reshape(info.shapes[widest]) if np.size(gain) > 1 else float(np.asarray(gain).reshape(-1)[0])
        fac = row_factor(gain, node_kind(g.nodes[widest]), w, info.shapes[widest], widest) if np.size(gain) > 1 else gain
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
        if loihi2 and node_kind(node) == "LIF":
            pops[name] = loihi2_population(name, node, info, membranes[name], int(g.metadata.get("timesteps", 0)))
        elif exact and node_kind(node) == "LIF":
            pops[name] = _exact_lif(name, node, info, membranes[name])
        elif node_kind(node) == "LIF":
            # v_int = v * 64*V / theta, theta = v_threshold raised by the float32 ulp the export took off
            # (the model's "spike when v >= theta"). Lava spikes on v_int > 64*vth with vth = V; a bias of
            # one unit per step (at most 1/d units, 8e-6 theta) makes ties (counts times d landing exactly
            # on theta, common in the attention) fire as in the model.
            d = decay(node, info.dt).astype(np.float64)
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
        kind = node_kind(g.nodes[src])
        if kind in NEURONS:
            return True
        if kind not in ("SumPool2d", "Linear", "Conv1d", "Conv2d"):
            return False
        w = None if kind == "SumPool2d" else np.asarray(g.nodes[src].weight)
        integer = w is None or bool(np.all(w == np.rint(w)))
        no_bias = kind in ("SumPool2d", "Linear") or not np.any(np.asarray(g.nodes[src].bias))
        return integer and no_bias and all(node_kind(g.nodes[s]) in NEURONS for s, _ in info.terms[src])

    def synapse(name: str, target: str | None) -> str:
        """The process of synaptic node ``name`` feeding population ``target`` (its alpha folded
        in), or, with ``target`` None, its graded process (a real scale per integer unit)."""
        pname = name if target is None else f"{name}@{target}"
        if pname in plan.by_name or pname in twins:
            return twins.get(pname, pname)
        node, kind, shape = g.nodes[name], node_kind(g.nodes[name]), info.shapes[name]
        terms = info.terms[name]
        srcs = [source(s, name) for s, _ in terms]
        in_scales = {scale[s] for s in srcs}
        if len(in_scales) != 1:
            raise LavaUnsupported(f"{name}: fixed point needs the terms summed into a synaptic layer to share one scale")
        sigma_in = in_scales.pop()
        w, b = weight_and_bias(node, kind, shape)
        op = op_spec(node, kind)
        if target is None:  # graded output: integer mantissas, a real scale; shifted right to stay in 24 bits
            if exact:  # the weights' own power-of-two grid: integers kept as they are
                s = 1.0 if w is None else _pow2_grid(w, bits, name)
            else:
                s = float(np.abs(w).max(initial=0.0)) / (2 ** (bits - 1) - 1) if w is not None else 1.0
                s = s or 1.0
            q = None if w is None else np.rint(w / s)
            worst = row_abs_sum(q, op) * max(bound[src] for src in srcs) + float(np.abs(b).max(initial=0.0)) / (s * sigma_in)
            shift = max(0, math.ceil(math.log2(worst / GRADED_MAX))) if worst > GRADED_MAX else 0
            if exact and (shift or not np.array_equal(np.rint(b / (s * sigma_in)), b / (s * sigma_in))):
                raise LavaUnsupported(f"{name}: exact mode: the readout's integers would need rounding (worst case "
                                      f"2^{math.log2(worst):.1f} units, Loihi's payload holds 2^23)")
            exp, sigma_out, post = -shift, s * sigma_in * 2.0 ** shift, None
            bias = np.rint(b / sigma_out)
            bound[pname] = worst / 2.0 ** shift
        else:
            alpha = population(target)["alpha"].reshape(-1)
            alpha_out = np.asarray(alpha, np.float64).reshape(shape) if alpha.size == int(np.prod(shape)) else None
            if alpha_out is None:
                raise LavaUnsupported(f"{name} -> {target}: shapes do not match for fixed point")
            if w is None:  # SumPool2d: integer window sums, then an elementwise factor
                q, exp = requant(alpha_out * sigma_in, bits, name)
                post, bias = q, np.rint(alpha_out * b)
                q = None
            else:
                fac = row_factor(alpha_out, kind, w, shape, name)
                q, exp = requant(fac * w * sigma_in, bits, name)
                post, bias = None, np.rint(alpha_out * b)
            if exact and not np.array_equal(bias, alpha_out * b):
                raise LavaUnsupported(f"{name}: exact mode: its bias is not an integer in the membrane's units")
            sigma_out = None
        if post is not None:
            op = {**op, "post": post}
        op["weight"] = q
        params = {"op_spec": op, "exp": int(exp), "bias": bias if np.any(bias) else None}
        if target is not None:  # a layer feeding several populations with the same alpha (the residual stream's writers): one process
            twin = next((t for t in plan.by_name if t.startswith(f"{name}@") and _same_params(plan.by_name[t]["params"], params)), None)
            if twin is not None:
                twins[pname] = twin
                return twin
        in_shape = terms[0][1] or info.shapes[terms[0][0]]
        plan.add({"name": pname, "kind": "synapse", "shape": shape, "in_shape": in_shape,
                  "inputs": [conn(src, r) for src, (_, r) in zip(srcs, terms)], "params": params})
        plan.quant[pname] = {"exp": int(exp), "weight_max": int(np.abs(q).max(initial=0)) if q is not None else None,
                             "scale": sigma_out}
        scale[pname] = sigma_out
        return pname

    def source(src: str, consumer: str) -> str:
        """The process that carries ``src``'s values to a synaptic layer (graded or spikes)."""
        kind = node_kind(g.nodes[src])
        if kind in SYNAPSES:
            return synapse(src, None)
        return src

    for name in info.order:
        node, kind, shape = g.nodes[name], node_kind(g.nodes[name]), info.shapes[name]
        if kind == "Input" and exact:  # the fitted contract: clipped to its range, integers on its grid
            plan.add({"name": name, "kind": "source", "shape": shape, "inv_scale": 2.0 ** contract.frac_bits,
                      # the graph's own contract applied first, so that inputs already on it are not rounded twice
                      "contracts": [[c.lo, c.hi, 2.0 ** c.frac_bits] for c in (own, contract)]})
            scale[name] = contract.grid
            bound[name] = max(abs(contract.lo), abs(contract.hi)) / contract.grid
        elif kind == "Input":
            plan.add({"name": name, "kind": "source", "shape": shape, "inv_scale": 2.0 ** FIXED_INPUT_FRAC_BITS})
            scale[name] = 2.0 ** -FIXED_INPUT_FRAC_BITS
            bound[name] = 2.0 ** FIXED_INPUT_FRAC_BITS  # inputs assumed in [-1, 1] (images in [0, 1])
        elif kind in NEURONS:
            pop = population(name)
            conns = []
            for src, reshape in info.terms[name]:
                skind = node_kind(g.nodes[src])
                if skind in SYNAPSES:
                    conns.append(conn(synapse(src, name), reshape))
                elif pop["count"] and skind in NEURONS:
                    conns.append(conn(src, reshape))  # a spike adds 1: no synapse needed
                else:  # a one-to-one synaptic layer carrying the population's alpha
                    sname = f"{src}@{name}"
                    if sname not in plan.by_name:
                        alpha = np.asarray(pop["alpha"], np.float64) * scale[src]
                        q, exp = requant(alpha, bits, sname)
                        plan.add({"name": sname, "kind": "synapse", "shape": shape, "in_shape": shape,
                                  "inputs": [conn(src, reshape)],
                                  "params": {"op_spec": {"op": "scale", "weight": q}, "exp": int(exp), "bias": None}})
                        plan.quant[sname] = {"exp": int(exp), "weight_max": int(np.abs(q).max(initial=0)), "scale": None}
                    conns.append(conn(sname, None))
            lif = pop["lif"]
            if pop.get("exact"):
                plan.quant[name] = pop["exact"]
            plan.add({"name": name, "kind": "lif", "shape": shape, "inputs": conns, "params": lif_params(lif, int)})
            scale[name] = bound[name] = 1.0
        elif kind == "Output":
            srcs = [(source(src, name), reshape) for src, reshape in info.terms[name]]
            add_outputs(plan, info, name, srcs, scales={s: scale[s] for s, _ in srcs})
    over = [n for n, p in pops.items() if p.get("exact") and not p["exact"]["proven"]]
    if over and unproven != "guard":  # fit_input_contract chose a grid on which every population is proven
        raise TargetError(f"lava fixed mode, exact graph: {', '.join(over)} unproven on the fitted input grid")
    if over:
        warnings.warn(f"lava fixed mode, exact graph: {len(over)} of {len(pops)} populations unproven on Loihi's 24-bit "
                      f"u and v (worst case up to {max(pops[n]['exact']['register_bits'] for n in over):.1f} bits); they run "
                      "under a guard that stops the run at the first u that would wrap (plan quant: proven, register_bits)",
                      stacklevel=4)
    return plan
