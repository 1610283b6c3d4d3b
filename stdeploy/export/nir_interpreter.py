"""A reference interpreter for the NIR graphs :mod:`.nir_export` writes, in discrete time.

``run_nir(graph_or_path, x)`` runs a graph of ``Input, Output, Affine, Linear, Conv1d, Conv2d,
LIF, Threshold, SumPool2d, Flatten`` nodes on ``x`` of shape ``(T, B, *input shape)`` and returns
every Output node's tensor ``(T, B, *shape)`` (every node's with ``record=True``).

Semantics:
* Edges into a node are summed, in the order they appear in ``graph.edges``.
* ``LIF`` (time step ``dt`` from the graph's metadata, default 1.0; ``d = float32(dt/tau)``):
  ``v = (1-d)*v + d*(r*I + v_leak)``, written as the model's ``(1-d)*v + d*I`` when ``r = 1`` and
  ``v_leak = 0`` (the forward-Euler step ``v += d*(v_leak - v + r*I)``, in the PyTorch model's
  float order); spike ``v > v_threshold`` (NIR's strict rule); spiking neurons go to ``v_reset``.
* ``Threshold``: ``x > threshold``. ``SumPool2d``: window sums. ``Flatten``: ``start_dim`` and
  ``end_dim`` count the node shape's dims, without a batch dim (as ``nir``'s type inference does).
* ``Affine``/``Linear`` act on the last dim; weights with extra leading dims are batched
  (``weight.shape[:-2]`` lines up with the input's leading dims).

Schedule and float arithmetic: the graph must be acyclic (no recurrent edges, no ``Delay``), so
evaluating every node over all T steps before its successors (topological order) gives the same
values as evaluating the whole graph step by step. It is done that way so that stateless nodes see
``(T*B, ...)`` batches, the same GEMM and convolution shapes as the PyTorch model: CPU kernels pick
algorithms by batch size (``F.conv2d`` on a batch of 1 and of 4 differ in the last bit), and only
identical calls guarantee bitwise-identical membranes. For the same reason a kernel-1 ``Conv1d``
(a per-token linear layer) is evaluated as ``F.linear`` on the token-major tensor, not as
``F.conv1d``, whose summation order differs from ``nn.Linear``'s. A channel-diagonal ``Conv2d``
(every weight between two different channels zero: the portable dialect's identity, sum-pool,
token-sum and broadcast nodes, all sums of integers) runs as the depthwise convolution of its
diagonal kernels: the same nonzero products, C times fewer operations.

Memory: a node's output is freed once the last node that reads it has run (``record`` keeps the
ones asked for), so a run holds the schedule's live tensors, not every node's.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable

import nir
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, ShapeError, UnsupportedPrimitive
from ..neurons import INFERENCE_CHUNK

__all__ = ["run_nir", "lif_blocks", "load_graph", "topological_order", "channel_diagonal", "SUPPORTED", "EVALUATORS", "EvalContext", "Evaluator", "int_tuple"]


def load_graph(graph_or_path: nir.NIRGraph | str | os.PathLike) -> nir.NIRGraph:
    """A NIR graph from memory or a file; every numeric parameter must be finite (a NaN ``tau`` or
    threshold would silently silence or saturate a layer), else :class:`UnsupportedPrimitive`
    naming the node and field."""
    if isinstance(graph_or_path, nir.NIRGraph):
        graph = graph_or_path
    else:
        try:
            graph = nir.read(graph_or_path)
        except Exception as err:  # nir and h5py raise many types (an assertion, KeyError, OSError) for a bad file
            why = str(err).splitlines()[0][:200] if str(err) else "nir's reader refused a node, edge or field it does not know"
            raise UnsupportedPrimitive(f"{graph_or_path}: cannot read the NIR graph ({type(err).__name__}: {why})") from None
    for name, node in graph.nodes.items():
        for field_name, value in vars(node).items():
            if isinstance(value, (np.ndarray, float)) and np.issubdtype(np.asarray(value).dtype, np.floating) \
                    and not np.isfinite(value).all():
                raise UnsupportedPrimitive(f"{graph_or_path if not isinstance(graph_or_path, nir.NIRGraph) else 'NIR graph'}: "
                                           f"node {name}.{field_name} holds NaN or infinite values")
    return graph


def topological_order(graph: nir.NIRGraph) -> list[str]:
    """Node names in an order where every edge goes forward (file order among ready nodes)."""
    incoming = {name: 0 for name in graph.nodes}
    succ: dict[str, list[str]] = {name: [] for name in graph.nodes}
    for src, dst in graph.edges:
        incoming[dst] += 1
        succ[src].append(dst)
    ready = [name for name in graph.nodes if incoming[name] == 0]
    order: list[str] = []
    while ready:
        name = ready.pop(0)
        order.append(name)
        for dst in succ[name]:
            incoming[dst] -= 1
            if incoming[dst] == 0:
                ready.append(dst)
    if len(order) != len(graph.nodes):
        stuck = sorted(set(graph.nodes) - set(order))
        raise UnsupportedPrimitive(f"NIR graph has a cycle through {', '.join(stuck)}: this interpreter runs feed-forward graphs only")
    return order


# ----------------------------------------------------------------------------- node evaluators
# Each takes (node, input summed over edges as (T*B, *shape), context) and returns (T*B, *shape).
class EvalContext:
    """What an evaluator needs beside its node and input: ``timesteps`` T and ``batch`` B of the
    run (inputs are ``(T*B, *shape)``), the NIR time step ``dt`` and the torch ``device``.
    Public: Lava's process models evaluate single nodes with it."""

    def __init__(self, timesteps: int, batch: int, dt: float, device: torch.device):
        self.timesteps, self.batch, self.dt, self.device = timesteps, batch, dt, device

    def tensor(self, a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float32), device=self.device)


def _batched_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if w.dim() == 2:
        return F.linear(x, w, b)
    y = torch.matmul(w, x.unsqueeze(-1)).squeeze(-1)  # weight (..., out, in) @ x (..., in, 1)
    return y if b is None else y + b


def _affine(node: nir.Affine, x: torch.Tensor, c: EvalContext) -> torch.Tensor:
    return _batched_linear(x, c.tensor(node.weight), c.tensor(node.bias))


def _linear(node: nir.Linear, x: torch.Tensor, c: EvalContext) -> torch.Tensor:
    return _batched_linear(x, c.tensor(node.weight), None)


def int_tuple(v, n: int):
    """A NIR geometry field (stride, padding, ...) as a tuple of ``n`` ints (a scalar repeated);
    a string (``"same"``, ``"valid"``) is returned as a ``str``."""
    if isinstance(v, (str, bytes)):
        return v.decode() if isinstance(v, bytes) else v
    a = np.atleast_1d(np.asarray(v)).astype(int)
    return tuple(int(i) for i in (np.repeat(a, n) if a.size == 1 else a))


def _bias_or_none(c: EvalContext, bias) -> torch.Tensor | None:
    return None if bias is None or not np.any(bias) else c.tensor(bias)


def _conv1d(node: nir.Conv1d, x: torch.Tensor, c: EvalContext) -> torch.Tensor:
    w = c.tensor(node.weight)
    stride, padding, dilation = int_tuple(node.stride, 1), int_tuple(node.padding, 1), int_tuple(node.dilation, 1)
    pointwise = w.shape[2] == 1 and stride == (1,) and dilation == (1,) and padding in ((0,), "valid", "same") and int(node.groups) == 1
    if pointwise:  # a per-token linear layer: F.linear on (T*B, N, D_in), like the model's nn.Linear
        return F.linear(x.transpose(-1, -2).contiguous(), w[:, :, 0], _bias_or_none(c, node.bias)).transpose(-1, -2)
    return F.conv1d(x, w, c.tensor(node.bias), stride, padding, dilation, int(node.groups))


def channel_diagonal(weight: np.ndarray, groups: int = 1) -> bool:
    """A square, ungrouped ``Conv2d`` weight ``(C, C, kh, kw)`` that is zero wherever the output
    channel differs from the input channel (the portable dialect's identity, sum-pool, token-sum
    and broadcast nodes)."""
    w = np.asarray(weight)
    if w.ndim != 4 or w.shape[0] != w.shape[1] or groups != 1 or w.shape[0] < 2:
        return False
    diag = np.arange(w.shape[0])
    return bool(np.count_nonzero(w) == np.count_nonzero(w[diag, diag]))


def _conv2d(node: nir.Conv2d, x: torch.Tensor, c: EvalContext) -> torch.Tensor:
    stride, padding, dilation = int_tuple(node.stride, 2), int_tuple(node.padding, 2), int_tuple(node.dilation, 2)
    weight = np.asarray(node.weight)
    if channel_diagonal(weight, int(node.groups)):
        # each output channel reads its own input channel only: a depthwise convolution with the
        # diagonal kernels computes the same nonzero products without the C-1 zero ones per term
        # (C times fewer operations; the portable sdt-8-512 graph's broadcasts cost about 1 GMAC
        # per image each when run densely). The remaining products are summed in the depthwise
        # kernel's order, exact wherever those sums are (integer-valued: the portable nodes).
        diag = np.arange(weight.shape[0])
        w = c.tensor(weight[diag, diag][:, None])  # (C, 1, kh, kw)
        return F.conv2d(x, w, c.tensor(node.bias), stride, padding, dilation, weight.shape[0])
    return F.conv2d(x, c.tensor(weight), c.tensor(node.bias), stride, padding, dilation, int(node.groups))


def _sumpool2d(node: nir.SumPool2d, x: torch.Tensor, c: EvalContext) -> torch.Tensor:
    return F.avg_pool2d(x, int_tuple(node.kernel_size, 2), int_tuple(node.stride, 2), int_tuple(node.padding, 2),
                        count_include_pad=True, divisor_override=1)


def _threshold(node: nir.Threshold, x: torch.Tensor, c: EvalContext) -> torch.Tensor:
    return (x > c.tensor(node.threshold)).to(torch.float32)


def _flatten(node: nir.Flatten, x: torch.Tensor, c: EvalContext) -> torch.Tensor:
    ndim = x.dim() - 1  # node dims, after the (T*B) batch dim
    start, end = int(node.start_dim), int(node.end_dim)
    start, end = start % ndim, end % ndim
    return x.flatten(start + 1, end + 1)


def _lif(node: nir.LIF, x: torch.Tensor, c: EvalContext) -> torch.Tensor:
    d = torch.as_tensor((c.dt / np.asarray(node.tau, dtype=np.float64)).astype(np.float32), device=c.device)
    r, v_leak = np.asarray(node.r), np.asarray(node.v_leak)
    plain = bool(np.all(r == 1) and np.all(v_leak == 0))
    r_t, leak_t = c.tensor(r), c.tensor(v_leak)
    thr, reset = c.tensor(node.v_threshold), c.tensor(node.v_reset)
    xs = x.reshape(c.timesteps, c.batch, *x.shape[1:])
    if plain and _blockwise(xs, d, thr, reset):
        return lif_blocks(xs, d, thr, reset).flatten(0, 1)
    v = torch.zeros_like(xs[0])
    out = []
    for t in range(c.timesteps):
        drive = xs[t] if plain else r_t * xs[t] + leak_t
        v = (1 - d) * v + d * drive
        s = v > thr
        v = torch.where(s, reset, v)
        out.append(s.to(torch.float32))
    return torch.stack(out).flatten(0, 1)


LIF_BLOCK = INFERENCE_CHUNK  # neurons per block: at most torch's parallel grain, so each operation runs on the calling thread


def _blockwise(xs: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether :func:`lif_blocks` may run: float32 on the CPU, no gradient, not traced, and
    parameters that broadcast against one sample's neurons."""
    if xs.device.type != "cpu" or xs.dtype != torch.float32 or torch.jit.is_tracing() or (torch.is_grad_enabled() and xs.requires_grad):
        return False
    neurons = tuple(xs.shape[2:])
    try:
        return all(torch.broadcast_shapes(tuple(p.shape), neurons) == neurons for p in params)
    except RuntimeError:
        return False


@torch.no_grad()
def lif_blocks(xs: torch.Tensor, d: torch.Tensor, thr: torch.Tensor, reset: torch.Tensor, block: int = LIF_BLOCK) -> torch.Tensor:
    """The ``LIF`` evaluator's loop for ``r = 1``, ``v_leak = 0`` (``xs (T, B, *neurons)``,
    parameters broadcasting against ``neurons``): spikes ``(T, B, *neurons)`` in float32, bit for
    bit those of the step-by-step loop (the same IEEE operations: ``(1-d)*v``, ``d*I``, their sum,
    ``v > v_threshold``, the reset chosen where it fired), done in place on a block of about
    ``block`` neurons at a time through every step, so that the block's membrane stays in cache.
    It does not call :func:`stdeploy.neurons.lif_inference` on purpose: that is the model's rule
    (``v - theta >= 0``, then ``v * (1 - s)``, parameters per channel), this is NIR's for any graph
    (``v > v_threshold``, then ``v_reset``, parameters per neuron), which differ at the threshold
    and after a reset unless ``v_reset = 0`` and ``v_threshold`` is ``theta`` one ulp lower (what
    stdeploy writes)."""
    if xs.dim() >= 4 and _token_major(xs):
        # channel-first tokens held token-major (a per-token linear layer's output, transposed back):
        # the same elementwise operations in the order they lie in memory, the spikes laid out alike
        # (the next per-token layer then reads them without a copy)
        flip = lambda p: p.broadcast_to(xs.shape[2:]).transpose(-1, -2)  # noqa: E731
        return lif_blocks(xs.transpose(-1, -2), flip(d), flip(thr), flip(reset), block).transpose(-1, -2)
    steps, batch = xs.shape[0], xs.shape[1]
    neurons = tuple(xs.shape[2:])
    m = math.prod(neurons)
    xv = xs.reshape(steps, batch, m)
    d, thr, reset = (p.broadcast_to(neurons).reshape(m) for p in (d, thr, reset))
    keep = 1 - d
    cols = max(1, block // batch)
    spikes = torch.empty(xv.shape, dtype=torch.bool)
    v = torch.empty((batch, min(cols, m)), dtype=xs.dtype)
    tmp = torch.empty_like(v)
    for c0 in range(0, m, cols):
        c1 = min(c0 + cols, m)
        vb, tb = v[:, : c1 - c0], tmp[:, : c1 - c0]
        db, ab, tr, rb = d[c0:c1], keep[c0:c1], thr[c0:c1], reset[c0:c1]
        vb.zero_()
        for t in range(steps):
            torch.mul(db, xv[t, :, c0:c1], out=tb)  # d * I
            vb.mul_(ab).add_(tb)                    # (1 - d) * v + d * I
            st = spikes[t, :, c0:c1]
            torch.gt(vb, tr, out=st)                # v > v_threshold
            torch.where(st, rb, vb, out=vb)         # v_reset where it fired
    return spikes.to(torch.float32).view(xs.shape)


Evaluator = Callable[[nir.NIRNode, torch.Tensor, EvalContext], torch.Tensor]
# The reference semantics of every NIR node type this interpreter runs, keyed by type: each takes
# (node, input summed over edges as (T*B, *shape), EvalContext) and returns (T*B, *shape) in float32.
# Public: the Lava target evaluates single nodes with them, so both agree bit for bit.
EVALUATORS: dict[type, Evaluator] = {
    nir.Affine: _affine,
    nir.Linear: _linear,
    nir.Conv1d: _conv1d,
    nir.Conv2d: _conv2d,
    nir.SumPool2d: _sumpool2d,
    nir.Threshold: _threshold,
    nir.Flatten: _flatten,
    nir.LIF: _lif,
}
SUPPORTED = ("Input", "Output", *(t.__name__ for t in EVALUATORS))


def _token_major(t: torch.Tensor) -> bool:
    """Channel-first tokens ``(..., D, N)`` held token-major: a per-token layer's output."""
    return t.dim() >= 3 and not t.is_contiguous() and t.transpose(-1, -2).is_contiguous()


def _one_layout(terms: list[torch.Tensor]) -> list[torch.Tensor]:
    """The terms of a sum with more than one, all held alike in memory where some are held
    token-major (the residual stream sums the stem's output, held channel-first, with per-token
    layers' outputs): the same values, so the same sums, but each addition streams both terms in
    order instead of one across the other's rows."""
    if len(terms) < 2 or not any(_token_major(t) for t in terms) or any(t.dim() < 3 for t in terms):
        return terms
    return [t if _token_major(t) else t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in terms]


def run_nir(graph_or_path: nir.NIRGraph | str | os.PathLike, x: torch.Tensor,
            record: bool | Iterable[str] = False) -> dict[str, torch.Tensor]:
    """Run a NIR graph on ``x`` ``(T, B, *input shape)``; returns each Output node's tensor
    ``(T, B, *shape)`` by name, and every node's output too when ``record`` is True, or the
    outputs of the nodes ``record`` names (a collection of node names). A node's output is
    dropped as soon as its last successor has read it, unless it is returned: memory holds the
    live tensors of the schedule, not every node's.

    Raises :class:`UnsupportedPrimitive` naming every node of a type it cannot run, and
    :class:`ShapeError` naming the Input node when ``x`` does not match it."""
    graph = load_graph(graph_or_path)
    unknown = [f"{name} ({type(node).__name__})" for name, node in graph.nodes.items()
               if not isinstance(node, (nir.Input, nir.Output)) and type(node) not in EVALUATORS]
    if unknown:
        raise UnsupportedPrimitive(f"NIR interpreter cannot run node(s) {', '.join(unknown)}; supported: {', '.join(SUPPORTED)}")
    inputs = [name for name, node in graph.nodes.items() if isinstance(node, nir.Input)]
    if len(inputs) != 1:
        raise UnsupportedPrimitive(f"NIR interpreter needs exactly one Input node, the graph has {len(inputs)}: {inputs}")
    in_name = inputs[0]
    in_shape = tuple(int(s) for s in np.atleast_1d(graph.nodes[in_name].input_type["input"]))
    if x.dim() != 2 + len(in_shape) or tuple(x.shape[2:]) != in_shape:
        raise ShapeError(f"NIR Input node {in_name!r} expects (T, B, {', '.join(map(str, in_shape))}), got {tuple(x.shape)}")

    if isinstance(record, bool):
        keep = set(graph.nodes) if record else {n for n, node in graph.nodes.items() if isinstance(node, nir.Output)}
    else:
        keep = set(record)
        unknown_names = sorted(keep - set(graph.nodes))
        if unknown_names:
            raise ConfigError(f"run_nir: record names node(s) the graph does not have: {', '.join(unknown_names)}")
        keep |= {n for n, node in graph.nodes.items() if isinstance(node, nir.Output)}
    order = topological_order(graph)
    into: dict[str, list[str]] = {name: [] for name in graph.nodes}
    for src, dst in graph.edges:
        into[dst].append(src)
    position = {name: i for i, name in enumerate(order)}
    last_read: dict[int, list[str]] = {}  # step of the schedule -> values no later node reads
    reads: dict[str, int] = {}
    for src, dst in graph.edges:
        reads[src] = max(reads.get(src, -1), position[dst])
    for src, step in reads.items():
        if src not in keep:
            last_read.setdefault(step, []).append(src)
    for name in graph.nodes:  # read by no node and not returned: dropped as soon as computed
        if name not in reads and name not in keep:
            last_read.setdefault(position[name], []).append(name)
    dt = float(np.asarray(graph.metadata.get("dt", 1.0))) if isinstance(graph.metadata, dict) else 1.0
    ctx = EvalContext(int(x.shape[0]), int(x.shape[1]), dt, x.device)

    values: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in order:
            node = graph.nodes[name]
            if isinstance(node, nir.Input):
                values[name] = x.to(torch.float32).flatten(0, 1)
                continue
            srcs = into[name]
            if not srcs:
                raise ShapeError(f"NIR node {name!r} has no incoming edge")
            operands = _one_layout([values[src] for src in srcs])
            acc = operands[0]
            for term in operands[1:]:  # sum in edge order
                acc = acc + term
            del operands
            values[name] = acc if isinstance(node, nir.Output) else EVALUATORS[type(node)](node, acc, ctx)
            del acc
            for src in last_read.get(position[name], ()):
                values.pop(src, None)

    def unflatten(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(ctx.timesteps, ctx.batch, *t.shape[1:])

    return {name: unflatten(values[name]) for name in graph.nodes if name in keep}
