"""Export the folded spiking transformer to NIR with standard primitives only.

``to_nir(fold_batchnorm(model))`` gives a ``nir.NIRGraph``; ``write_nir(graph, path)`` writes it
atomically; ``nir_stats(graph)`` counts its neurons and synapses; :mod:`.nir_interpreter` runs it.

Layout: channel first, everywhere
---------------------------------
NIR has no transpose and no reshape (only ``Flatten``), so the graph keeps one layout from input
to output: channels lead every node shape. The embedding works on ``(C, H, W)``; its output is
flattened over the spatial dims into tokens ``(D, N)`` (``nir.Flatten`` with ``start_dim=1``:
NIR counts dims of the node shape, without a batch dim; tokens in row-major ``(h, w)`` order, as
the PyTorch model's ``flatten(3)``). A per-token linear layer (PyTorch ``nn.Linear`` on
``(N, D)``) is then a kernel-1 ``nir.Conv1d`` on ``(D_in, N)`` with weight ``(D_out, D_in, 1)``:
the standard channel-first form of the same map, which every NIR reader understands. Mixing
across tokens (the sum and the mean over tokens, broadcasting a ``(D, 1)`` mask over tokens) is a
``nir.Linear`` acting on the last dim, with a batched weight ``(D, 1, N)`` or ``(D, N, 1)`` (NIR's
``weight.shape[:-2]`` batch dims) so that NIR's own type check of the graph passes. A DSP
low-rank layer keeps its two factors as two chained nodes ``name.v`` -> ``name.u`` (metadata
``lowrank``, ``rank``, ``factor``): a ``LowRankLinear`` as two kernel-1 ``Conv1d``, a
``LowRankConv2d`` as its ``k x k`` convolution (zero bias) then a 1x1 convolution with the bias
(``Conv2d``, or ``Conv1d`` of kernel k and 1 on a sequence).

The residual stream has no node of its own
------------------------------------------
NIR sums every edge into a node. The residual stream ``x = p + rpe(p); x = x + attn(x);
x = x + mlp(x)`` is therefore kept as a list of *terms* (node names): each consumer of ``x``
(the LIF opening the next attention, MLP or head) receives one edge from every term, in the
order of the PyTorch sums (the interpreter adds edges in file order, so its float sums match).
Both terms of the embedding output are flattened separately (``Flatten`` is linear), so no
identity node is needed. A depth-L model has 2 + 2L terms; edges grow as O(L^2), which is small.

Operations without a NIR primitive, lowered exactly on spikes
--------------------------------------------------------------
* 2x2 max-pool of spikes (an OR): ``SumPool2d(2, 2)`` into ``Threshold(0.5)``.

Sequences (``cfg.input_dims == 1``, the MNIST-1D presets)
-------------------------------------------------------
The PyTorch model holds a sequence as a one-row image ``(C, 1, L)`` with ``(1, k)`` kernels. NIR
1.0.8's ``Conv2d`` infers its output shape from ``weight.shape[2]`` alone (the kernel height for
both dims), so a ``(1, k)`` kernel gets a wrong type and ``nir.read`` rejects the file. The graph
therefore says what the model is: after the ``Input`` ``(C, 1, L)`` a ``Flatten`` gives ``(C, L)``,
every embedding convolution is a ``nir.Conv1d`` of kernel k, the embedding LIFs are ``(C, L)``, the
max-pool of 2 is a ``Conv1d`` whose weight is ones on the channel diagonal (kernel 2, stride 2:
window sums of 0/1 spikes, exact; not ``groups=C``, whose input NIR 1.0.8 types as one channel)
into ``Threshold(0.5)``, and the embedding output is already tokens
``(D, N)`` (no flatten).
* AND of two spike tensors: both as edges into ``Threshold(1.5)``.
* Spike-driven attention: ``Threshold(1.5)`` over ``q + k``, token sum ``Linear`` ``(D,1,N)`` of
  ones, the attention LIF on ``(D, 1)``, a ``Linear`` ``(D,N,1)`` of ones to broadcast the mask,
  ``Threshold(1.5)`` over ``v + mask``, then the projection.
* Spikformer's ``Q·Kᵀ·V`` multiplies two activations, which NIR cannot express: it is refused, or
  with ``spikformer="exact"`` lowered to one three-input AND unit per term of the product
  (``H·dh²·N²`` extra neurons per block; counts in ``graph.metadata["lowerings"]``).

Neurons
-------
A LIF/sLIF becomes ``nir.LIF`` with per-neuron arrays of the full node shape: ``tau = dt/d``
(float64, so ``float32(dt/tau) == d``), ``r = 1``, ``v_leak = 0``, ``v_reset = 0``. NIR spikes on
``v > v_threshold`` (strict) while the model spikes on ``v >= theta``; these differ exactly at
equality, which is common (an integer token count times ``d = 0.5`` hitting ``theta = 0.5``).
``v_threshold`` is therefore ``theta`` lowered by one float32 ulp: for a float32 membrane,
``v > nextafter(theta, -inf)`` is the same test as ``v >= theta``, so a reader that follows
NIR's rule reproduces the model's spikes. The node metadata keeps the model's ``theta``.

Converters
----------
``default_converters(dt=...)`` returns a plain ``{module type: fn}`` dictionary; ``to_nir``'s
``converters`` entries override it. A converter ``fn(builder, name, module, inputs) -> outputs``
adds nodes and edges to the :class:`GraphBuilder` and returns the names of the nodes whose sum is
the module's output (``inputs`` likewise). Before converting, the whole model is walked and every
module that cannot be exported (no converter, a refused one, a pruning mask still attached,
BatchNorm not folded) is reported in one :class:`~stdeploy.errors.UnsupportedPrimitive`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import nir
import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ShapeError, StdeployError, UnsupportedPrimitive
from ..models.fold import FoldedConv
from ..models.layers import (Block, ConvBN, DenseEmbed, EmbedStage, Head, LinearBN, MaxPool, MLP, PatchEmbed,
                             SpikeDrivenAttention, SpikformerAttention)
from ..models.structure import LowRankConv2d, LowRankLinear
from ..models.transformer import SpikingTransformer
from ..neurons import LIF, SLIF

__all__ = ["to_nir", "write_nir", "write_graph_file", "nir_stats", "default_converters", "unsupported_modules", "GraphBuilder", "Refusal",
           "Converter", "INPUT", "OUTPUT_LOGITS", "OUTPUT_SPIKES", "DISCRETISATION"]

INPUT = "input"
OUTPUT_LOGITS = "logits"   # per-step logits (classes,); the model's logits are their mean over T
OUTPUT_SPIKES = "spikes"   # the head LIF's spikes (D, N)

DISCRETISATION = (
    "forward Euler with step dt: v += dt/tau*(v_leak - v + r*I); spike when v > v_threshold (NIR's rule); "
    "then v = v_reset. With r = 1, v_leak = 0, v_reset = 0 and d = float32(dt/tau) this is the model's "
    "v = (1-d)*v + d*I; s = (v >= theta); v = v*(1-s), because v_threshold = theta lowered by one float32 ulp"
)

Converter = Callable[["GraphBuilder", str, nn.Module, list[str]], list[str]]


def join_name(prefix: str, name: str) -> str:
    """A child module's qualified name under ``prefix`` (``blocks.0`` + ``attn`` -> ``blocks.0.attn``)."""
    return f"{prefix}.{name}" if prefix else name


def as_f32(t: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy of a tensor (never a view of the caller's parameters)."""
    return t.detach().to("cpu", torch.float32).numpy().copy()


def weight_meta(weight: np.ndarray) -> dict:
    """A weight node's metadata: its ``sparsity`` (fraction of zeros) and ``nonzeros`` count."""
    nonzeros = int(np.count_nonzero(weight))
    return {"sparsity": float(1.0 - nonzeros / weight.size), "nonzeros": nonzeros}


# ----------------------------------------------------------------------------- the builder
@dataclass
class GraphBuilder:
    """Nodes, edges and node shapes collected while converting; ``convert`` dispatches a module
    to its converter. Edges are kept in insertion order (the order of sums into a node)."""

    converters: Mapping[type, Converter]
    nodes: dict[str, nir.NIRNode] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    produced: dict[str, list[str]] = field(default_factory=dict)  # module name -> its output nodes
    metadata: dict = field(default_factory=dict)

    def add(self, name: str, node: nir.NIRNode, inputs: Sequence[str], shape: Sequence[int]) -> str:
        """Add ``node`` (output shape ``shape``) fed by an edge from each of ``inputs``."""
        if name in self.nodes:
            raise StdeployError(f"NIR export: node name {name!r} used twice")
        for src in inputs:
            if src not in self.nodes:
                raise StdeployError(f"NIR export: edge {src!r} -> {name!r} starts at no node")
        self.nodes[name] = node
        self.edges.extend((src, name) for src in inputs)
        self.shapes[name] = tuple(int(s) for s in shape)
        return name

    def shape(self, node: str) -> tuple[int, ...]:
        return self.shapes[node]

    def input_shape(self, name: str, inputs: Sequence[str]) -> tuple[int, ...]:
        """The common shape of the terms ``inputs`` (summed into ``name``); ShapeError otherwise."""
        if not inputs:
            raise ShapeError(f"{name}: has no input")
        shapes = {src: self.shapes[src] for src in inputs}
        first = shapes[inputs[0]]
        bad = [f"{src}: {list(s)}" for src, s in shapes.items() if s != first]
        if bad:
            raise ShapeError(f"{name}: inputs summed into it differ in shape: {inputs[0]}: {list(first)} vs " + ", ".join(bad))
        return first

    def require_spikes(self, name: str, inputs: Sequence[str], what: str) -> None:
        """The exact AND/OR lowerings need 0/1 inputs: each input must be a spiking or threshold node."""
        bad = [src for src in inputs if not isinstance(self.nodes[src], (nir.LIF, nir.IF, nir.CubaLIF, nir.Threshold))]
        if bad:
            raise UnsupportedPrimitive(f"{name}: {what} is lowered exactly only on spikes, but {', '.join(bad)} "
                                       "is not a spiking node")

    def threshold(self, name: str, inputs: Sequence[str], level: float, meta: dict | None = None) -> str:
        """A ``Threshold`` node at ``level`` (``1 where sum(inputs) > level``) of the inputs' shape."""
        shape = self.input_shape(name, inputs)
        return self.add(name, nir.Threshold(threshold=np.full(shape, level, np.float32), metadata={"module": name, **(meta or {})}),
                        inputs, shape)

    def spike_and(self, name: str, inputs: Sequence[str]) -> str:
        """AND of two spike tensors: both as edges into ``Threshold(1.5)`` (1 only when both are 1)."""
        if len(inputs) != 2:
            raise StdeployError(f"{name}: AND takes two spike inputs, got {len(inputs)}")
        self.require_spikes(name, inputs, "AND")
        return self.threshold(name, inputs, 1.5, {"op": "and"})

    def convert(self, name: str, module: nn.Module, inputs: Sequence[str]) -> list[str]:
        fn = self.converters.get(type(module))
        if fn is None:
            raise UnsupportedPrimitive(f"{name or '<model>'} ({type(module).__name__}): no NIR converter")
        outputs = list(fn(self, name, module, list(inputs)))
        self.produced[name] = outputs
        return outputs


@dataclass(frozen=True)
class Refusal:
    """A converter entry that refuses its module type with ``reason`` (found by the pre-check)."""

    reason: str

    def __call__(self, b: GraphBuilder, name: str, module: nn.Module, inputs: list[str]) -> list[str]:
        raise UnsupportedPrimitive(f"{name} ({type(module).__name__}): {self.reason}")


# ----------------------------------------------------------------------------- leaf converters
def _dense(b: GraphBuilder, name: str, weight: np.ndarray, bias: np.ndarray | None, inputs: list[str], meta: dict) -> str:
    """A weight ``(out, in)``: kernel-1 Conv1d on tokens ``(in, N)``, Affine/Linear on ``(in,)``."""
    shape = b.input_shape(name, inputs)
    out_f, in_f = weight.shape
    meta = {"module": name, **meta, **weight_meta(weight)}
    if len(shape) == 2 and shape[0] == in_f:
        node = nir.Conv1d(input_shape=shape[1], weight=np.ascontiguousarray(weight[:, :, None]), stride=1, padding=0,
                          dilation=1, groups=1, bias=bias if bias is not None else np.zeros(out_f, np.float32),
                          metadata={**meta, "bias": bias is not None})
        return b.add(name, node, inputs, (out_f, shape[1]))
    if len(shape) == 1 and shape[0] == in_f:
        node = nir.Affine(weight=weight, bias=bias, metadata=meta) if bias is not None else nir.Linear(weight=weight, metadata=meta)
        return b.add(name, node, inputs, (out_f,))
    raise ShapeError(f"{name}: a linear layer of {in_f} inputs needs tokens ({in_f}, N) or a vector ({in_f},), got {list(shape)}")


def _linear(b: GraphBuilder, name: str, m: nn.Linear, inputs: list[str]) -> list[str]:
    return [_dense(b, name, as_f32(m.weight), None if m.bias is None else as_f32(m.bias), inputs, {})]


def _lowrank(b: GraphBuilder, name: str, m: LowRankLinear, inputs: list[str]) -> list[str]:
    """``u(v(x))``: two chained kernel-1 Conv1d nodes, ``v`` without bias, ``u`` with it."""
    meta = {"lowrank": True, "rank": int(m.rank), "in_features": int(m.in_features), "out_features": int(m.out_features)}
    inner = _dense(b, join_name(name, "v"), as_f32(m.v.weight), None, inputs, {**meta, "factor": "v"})
    return [_dense(b, join_name(name, "u"), as_f32(m.u.weight), None if m.u.bias is None else as_f32(m.u.bias), [inner], {**meta, "factor": "u"})]


def _conv1d_node(b: GraphBuilder, name: str, conv: nn.Conv2d, inputs: list[str]) -> str:
    """A ``(1, k)`` Conv2d on a one-row image, exported on the sequence ``(C, L)`` as ``nir.Conv1d``."""
    c_in, length = b.input_shape(name, inputs)
    (kh, k), (ph, p), (sh, s), (dh, d) = conv.kernel_size, conv.padding, conv.stride, conv.dilation
    if c_in != conv.in_channels or (kh, ph, sh, dh) != (1, 0, 1, 1) or conv.padding_mode != "zeros":
        raise ShapeError(f"{name}: a sequence ({conv.in_channels}, L) needs a (1, k) zero-padded Conv2d, got kernel "
                         f"{tuple(conv.kernel_size)}, padding {tuple(conv.padding)} on {[c_in, length]}")
    weight = np.ascontiguousarray(as_f32(conv.weight)[:, :, 0, :])  # (out, in, k)
    bias = as_f32(conv.bias) if conv.bias is not None else np.zeros(conv.out_channels, np.float32)
    node = nir.Conv1d(input_shape=length, weight=weight, stride=s, padding=p, dilation=d, groups=conv.groups, bias=bias,
                      metadata={"module": name, "bias": conv.bias is not None, "sequence": True, **weight_meta(weight)})
    return b.add(name, node, inputs, (conv.out_channels, (length + 2 * p - d * (k - 1) - 1) // s + 1))


def conv2d_node(b: GraphBuilder, name: str, conv: nn.Conv2d, inputs: list[str]) -> str:
    shape = b.input_shape(name, inputs)
    if len(shape) == 2 and isinstance(conv.padding, tuple):  # a sequence (C, L): module docstring
        return _conv1d_node(b, name, conv, inputs)
    if len(shape) != 3 or shape[0] != conv.in_channels:
        raise ShapeError(f"{name}: Conv2d expects ({conv.in_channels}, H, W), got {list(shape)}")
    if conv.padding_mode != "zeros":
        raise UnsupportedPrimitive(f"{name}: Conv2d padding_mode {conv.padding_mode!r} has no NIR form (only zero padding)")
    h, w = shape[1:]
    if isinstance(conv.padding, str):
        pad = (0, 0) if conv.padding == "valid" else None
    else:
        pad = tuple(conv.padding)
    if pad is None:  # "same"
        out_hw = (h, w)
    else:
        out_hw = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip((h, w), pad, conv.dilation, conv.kernel_size, conv.stride))
    weight = as_f32(conv.weight)
    bias = as_f32(conv.bias) if conv.bias is not None else np.zeros(conv.out_channels, np.float32)
    node = nir.Conv2d(input_shape=(h, w), weight=weight, stride=tuple(conv.stride), padding=conv.padding if isinstance(conv.padding, str) else pad,
                      dilation=tuple(conv.dilation), groups=conv.groups, bias=bias,
                      metadata={"module": name, "bias": conv.bias is not None, **weight_meta(weight)})
    return b.add(name, node, inputs, (conv.out_channels, *out_hw))


def _conv2d(b: GraphBuilder, name: str, m: nn.Conv2d, inputs: list[str]) -> list[str]:
    return [conv2d_node(b, name, m, inputs)]


def lowrank_conv_nodes(b: GraphBuilder, name: str, m: LowRankConv2d, inputs: list[str]) -> list[str]:
    """``u(v(x))``: two chained convolution nodes, ``name.v`` (the layer's kernel, stride and
    padding, ``in -> rank``, zero bias) then ``name.u`` (1x1, ``rank -> out``, the bias); on a
    sequence both are ``Conv1d`` (kernel ``k`` and 1), as any ``(1, k)`` convolution."""
    meta = {"lowrank": True, "rank": int(m.rank), "in_channels": int(m.in_channels), "out_channels": int(m.out_channels)}
    inner = conv2d_node(b, join_name(name, "v"), m.v, inputs)
    b.nodes[inner].metadata.update({**meta, "factor": "v"})
    outer = conv2d_node(b, join_name(name, "u"), m.u, [inner])
    b.nodes[outer].metadata.update({**meta, "factor": "u"})
    return [outer]


def folded_conv_nodes(b: GraphBuilder, name: str, m: FoldedConv, inputs: list[str]) -> list[str]:
    """A folded convolution: one convolution node, or the two of a DSP-factored one."""
    if isinstance(m.conv, LowRankConv2d):  # a DSP-factored convolution: name.v, name.u
        return lowrank_conv_nodes(b, name, m.conv, inputs)
    return [conv2d_node(b, name, m.conv, inputs)]


# Dim of the model's per-step tensor that holds channels, by rank of the NIR node shape:
# (C, H, W) <- (B, C, H, W); tokens (D, N) <- (B, N, D); vectors (D,) <- (B, D).
_CHANNEL_DIM = {3: 1, 2: 2, 1: 1}


def _make_lif(dt: float) -> Converter:
    """The LIF/sLIF converter for NIR time step ``dt`` (``tau = dt/d``)."""

    def convert(b: GraphBuilder, name: str, m: LIF, inputs: list[str]) -> list[str]:
        return _lif(b, name, m, inputs, dt)

    return convert


def _lif(b: GraphBuilder, name: str, m: LIF, inputs: list[str], dt: float) -> list[str]:
    shape = b.input_shape(name, inputs)
    rank = len(shape)
    sequence = rank == 2 and m.channel_dim == 1  # an embedding LIF of a sequence: (B, C, 1, L) -> (C, L)
    if rank not in _CHANNEL_DIM or (m.channel_dim % (rank + 1) != _CHANNEL_DIM[rank] and not sequence) or shape[0] != m.features:
        raise ShapeError(f"{name}: a {type(m).__name__} of {m.features} channels (channel_dim={m.channel_dim}) cannot map onto "
                         f"node shape {list(shape)}: the NIR layout puts channels first")
    per_channel = (-1,) + (1,) * (rank - 1)
    d = as_f32(m.decay)
    theta = as_f32(m.threshold)
    d_full = np.ascontiguousarray(np.broadcast_to(d.reshape(per_channel), shape))
    theta_full = np.ascontiguousarray(np.broadcast_to(theta.reshape(per_channel), shape))
    tau = dt / d_full.astype(np.float64)
    if not np.array_equal((dt / tau).astype(np.float32), d_full):
        raise StdeployError(f"{name}: tau = dt/d does not round back to d in float32 (dt={dt})")
    node = nir.LIF(
        tau=tau,
        r=np.ones(shape, np.float32),
        v_leak=np.zeros(shape, np.float32),
        v_threshold=np.nextafter(theta_full, np.float32(-np.inf)),
        v_reset=np.zeros(shape, np.float32),
        metadata={"module": name, "neuron": type(m).__name__, "theta": theta, "decay": d,
                  "threshold_rule": "v_threshold = theta lowered by one float32 ulp; spike when v > v_threshold (== v >= theta)"},
    )
    return [b.add(name, node, inputs, shape)]


def _maxpool(b: GraphBuilder, name: str, m: MaxPool, inputs: list[str]) -> list[str]:
    """Max-pool of spikes (2x2, or 1x2 along one-row sequences) = OR over each window: SumPool2d
    then Threshold(0.5)."""
    b.require_spikes(name, inputs, "max-pool (OR)")
    shape = b.input_shape(name, inputs)
    kh, kw = m.kernel
    if len(shape) == 2 and kh == 1:  # a sequence (C, L): window sums by a channel-diagonal Conv1d of ones
        c, length = shape
        ones = np.zeros((c, c, kw), np.float32)
        ones[np.arange(c), np.arange(c)] = 1.0  # not groups=c: NIR 1.0.8 types a grouped Conv1d's input as weight.shape[1]
        summed = b.add(join_name(name, "sum"), nir.Conv1d(input_shape=length, weight=ones, stride=kw, padding=0, dilation=1, groups=1,
                                                      bias=np.zeros(c, np.float32), metadata={"module": name, "op": "sum pool"}),
                       inputs, (c, length // kw))
        return [b.threshold(join_name(name, "or"), [summed], 0.5, {"op": "or"})]
    c, h, w = shape
    summed = b.add(join_name(name, "sum"), nir.SumPool2d(kernel_size=np.array([kh, kw]), stride=np.array([kh, kw]), padding=np.array([0, 0]),
                                                     metadata={"module": name}), inputs, (c, h // kh, w // kw))
    return [b.threshold(join_name(name, "or"), [summed], 0.5, {"op": "or"})]


def identity_node(b: GraphBuilder, name: str, m: nn.Module, inputs: list[str]) -> list[str]:
    return inputs


def sequential_node(b: GraphBuilder, name: str, m: nn.Sequential, inputs: list[str]) -> list[str]:
    for child_name, child in m.named_children():
        inputs = b.convert(join_name(name, child_name), child, inputs)
    return inputs


def _ones_linear(b: GraphBuilder, name: str, inputs: list[str], weight: np.ndarray, out_shape: tuple[int, ...], op: str) -> str:
    return b.add(name, nir.Linear(weight=weight, metadata={"module": name, "op": op, **weight_meta(weight)}), inputs, out_shape)


# ----------------------------------------------------------------------------- model converters
def _transformer(b: GraphBuilder, name: str, m: SpikingTransformer, inputs: list[str]) -> list[str]:
    cfg = m.cfg
    x = [b.add(INPUT, nir.Input(input_type=np.array(cfg.input_shape)), [], tuple(cfg.input_shape))]
    if cfg.input_dims == 1:  # one-row image (C, 1, L) -> sequence (C, L)
        c, _, length = cfg.input_shape
        x = [b.add(join_name(INPUT, "sequence"), nir.Flatten(input_type=np.array(cfg.input_shape), start_dim=1, end_dim=2,
                                                         metadata={"module": name}), x, (c, length))]
    x = b.convert(join_name(name, "embed"), m.embed, x)
    for i, block in enumerate(m.blocks):
        x = b.convert(join_name(name, f"blocks.{i}"), block, x)
    logits = b.convert(join_name(name, "head"), m.head, x)
    spikes = b.produced[join_name(name, "head.lif")]
    outputs = []
    for out_name, srcs in ((OUTPUT_LOGITS, logits), (OUTPUT_SPIKES, spikes)):
        shape = b.input_shape(out_name, srcs)
        outputs.append(b.add(out_name, nir.Output(output_type=np.array(shape)), srcs, shape))
    b.metadata.update({
        "timesteps": int(cfg.timesteps),
        "family": cfg.family,
        "config": cfg.to_dict(),
        "outputs": f"{OUTPUT_LOGITS}: per-step logits, the model's logits are their mean over the T steps; "
                   f"{OUTPUT_SPIKES}: spikes of head.lif, (D, N)",
    })
    return outputs


def _patch_embed(b: GraphBuilder, name: str, m: PatchEmbed, inputs: list[str]) -> list[str]:
    x = inputs
    for i, stage in enumerate(m.stages):
        x = b.convert(join_name(name, f"stages.{i}"), stage, x)
    rpe = b.convert(join_name(name, "rpe"), m.rpe, x)
    tokens = []
    if all(len(b.shape(term)) == 2 for term in x + rpe):  # a sequence: (D, L) is already tokens (D, N)
        return x + rpe
    for term in x + rpe:  # x = p + rpe(p): each term flattened to (D, N), summed by its consumers
        c, h, w = b.shape(term)
        tokens.append(b.add(join_name(term, "flatten"), nir.Flatten(input_type=np.array([c, h, w]), start_dim=1, end_dim=-1,
                                                               metadata={"module": name}), [term], (c, h * w)))
    return tokens


def _dense_embed(b: GraphBuilder, name: str, m: DenseEmbed, inputs: list[str]) -> list[str]:
    """The MLP stem: the frame flattened to a vector ``(C*H*W,)`` (a sequence, already ``(C, L)``:
    ``(C*L,)``), then Affine and LIF nodes on vectors (one token: the model's ``(N=1, D)`` is the
    vector ``(D,)``)."""
    shape = tuple(b.input_shape(name, inputs))
    x = [b.add(join_name(name, "flatten"), nir.Flatten(input_type=np.array(shape), start_dim=0, end_dim=-1,
                                                   metadata={"module": name}), inputs, (int(np.prod(shape)),))]
    for i, fc in enumerate(m.fcs):
        x = b.convert(join_name(name, f"fcs.{i}"), fc, x)
        if i < len(m.lifs):
            x = b.convert(join_name(name, f"lifs.{i}"), m.lifs[i], x)
    return x


def _embed_stage(b: GraphBuilder, name: str, m: EmbedStage, inputs: list[str]) -> list[str]:
    x = b.convert(join_name(name, "conv"), m.conv, inputs)
    x = b.convert(join_name(name, "lif"), m.lif, x)
    return b.convert(join_name(name, "pool"), m.pool, x)


def _block(b: GraphBuilder, name: str, m: Block, inputs: list[str]) -> list[str]:
    x = inputs + b.convert(join_name(name, "attn"), m.attn, inputs)  # x + attn(x)
    return x + b.convert(join_name(name, "mlp"), m.mlp, x)           # x + mlp(x)


def _mlp(b: GraphBuilder, name: str, m: MLP, inputs: list[str]) -> list[str]:
    x = inputs
    for child in ("lif1", "fc1", "lif2", "fc2"):
        x = b.convert(join_name(name, child), getattr(m, child), x)
    return x


def _spike_driven_attention(b: GraphBuilder, name: str, m: SpikeDrivenAttention, inputs: list[str]) -> list[str]:
    s = b.convert(join_name(name, "lif"), m.lif, inputs)
    q = b.convert(join_name(name, "q_lif"), m.q_lif, b.convert(join_name(name, "q"), m.q, s))
    k = b.convert(join_name(name, "k_lif"), m.k_lif, b.convert(join_name(name, "k"), m.k, s))
    v = b.convert(join_name(name, "v_lif"), m.v_lif, b.convert(join_name(name, "v"), m.v, s))
    b.require_spikes(name, q + k + v, "spike-driven attention (AND)")
    d, n = b.input_shape(name, q + k + v)
    qk = b.spike_and(join_name(name, "qk_and"), q + k)
    total = _ones_linear(b, join_name(name, "token_sum"), [qk], np.ones((d, 1, n), np.float32), (d, 1), "sum over tokens")
    mask = b.convert(join_name(name, "attn_lif"), m.attn_lif, [total])  # (D, 1) spikes
    wide = _ones_linear(b, join_name(name, "mask_broadcast"), mask, np.ones((d, n, 1), np.float32), (d, n), "broadcast over tokens")
    b.require_spikes(name, mask, "spike-driven attention (AND)")
    vm = b.threshold(join_name(name, "v_and"), v + [wide], 1.5, {"op": "and"})  # v AND the broadcast mask
    return b.convert(join_name(name, "proj"), m.proj, [vm])


def _spikformer_attention_exact(b: GraphBuilder, name: str, m: SpikformerAttention, inputs: list[str]) -> list[str]:
    """Spikformer's ``y = (Q·Kᵀ·V)·scale`` per head, exactly, with AND units only.

    ``y[h, i, c'] = scale · Σ_j Σ_c q[hc, i]·k[hc, j]·v[hc', j]``: each product of three spikes is
    one three-input AND (``Threshold(2.5)`` over three edges), one unit per ``(h, c, c', i, j)``,
    laid out as channels ``(h, c, c')`` by tokens ``(i, j)``. The three operands are copied there
    by a token broadcast (``Linear`` ``(D, N·N, N)``) and a channel broadcast (kernel-1 ``Conv1d``);
    the sums over ``c`` (a Conv1d with weight ``scale``) and over ``j`` (``Linear`` ``(D, N, N·N)``)
    give the attention LIF's input. Exact in float32 when ``scale`` is a power of two (then every
    partial sum is a small multiple of it). Cost per block: ``H·dh²·N²`` extra neurons and the
    weight entries recorded in ``graph.metadata["lowerings"]``.
    """
    s = b.convert(join_name(name, "lif"), m.lif, inputs)
    q = b.convert(join_name(name, "q_lif"), m.q_lif, b.convert(join_name(name, "q"), m.q, s))
    k = b.convert(join_name(name, "k_lif"), m.k_lif, b.convert(join_name(name, "k"), m.k, s))
    v = b.convert(join_name(name, "v_lif"), m.v_lif, b.convert(join_name(name, "v"), m.v, s))
    b.require_spikes(name, q + k + v, "Spikformer attention (AND)")
    d, n = b.input_shape(name, q + k + v)
    heads, dh = m.heads, d // m.heads
    entries = 4 * d * n ** 3 + 4 * heads * dh * dh * d  # the weights this lowering adds (dense arrays)
    if entries > SPIKFORMER_EXACT_MAX_WEIGHTS:
        raise UnsupportedPrimitive(f"{name}: the exact Spikformer lowering would add {entries:,} weight entries and "
                                   f"{heads * dh * dh * n * n:,} neurons (limit {SPIKFORMER_EXACT_MAX_WEIGHTS:,} entries); "
                                   "export the spike-driven variant (family = 'sdt') instead")
    scale = float(m.scale)
    if np.frexp(scale)[0] != 0.5:
        warnings.warn(f"{name}: attention scale {scale} is not a power of two; the NIR lowering sums scaled units, "
                      "which can differ from the model's count*scale in the last bit", stacklevel=2)
    eye = np.eye(n, dtype=np.float32)
    pick_i, pick_j = np.repeat(eye, n, axis=0), np.tile(eye, (n, 1))  # (N·N, N): token (i, j) -> i, -> j
    unit = np.arange(heads * dh * dh)
    head, c, c2 = unit // (dh * dh), (unit // dh) % dh, unit % dh  # channel (h, c, c')
    first = len(b.nodes)

    def broadcast(src: list[str], operand: str, pick: np.ndarray, channel: np.ndarray) -> str:
        wide = _ones_linear(b, join_name(name, f"{operand}_tokens"), src, np.ascontiguousarray(np.broadcast_to(pick, (d, n * n, n))),
                            (d, n * n), "broadcast over token pairs")
        w = np.zeros((heads * dh * dh, d), np.float32)
        w[unit, head * dh + channel] = 1.0
        return _dense(b, join_name(name, f"{operand}_channels"), w, None, [wide], {"op": "broadcast over channel pairs"})

    operands = [broadcast(q, "q", pick_i, c), broadcast(k, "k", pick_j, c), broadcast(v, "v", pick_j, c2)]
    product = b.threshold(join_name(name, "qkv_and"), operands, 2.5, {"op": "and of three spikes"})
    w = np.zeros((d, heads * dh * dh), np.float32)
    w[head * dh + c2, unit] = scale
    over_c = _dense(b, join_name(name, "sum_c"), w, None, [product], {"op": "scaled sum over c"})
    y = _ones_linear(b, join_name(name, "sum_j"), [over_c], np.ascontiguousarray(np.broadcast_to(pick_i.T, (d, n, n * n))), (d, n), "sum over j")
    added = list(b.nodes)[first:]
    weights = [b.nodes[a].weight for a in added if hasattr(b.nodes[a], "weight")]
    b.metadata.setdefault("lowerings", {})[name] = {
        "kind": "spikformer attention as three-input AND units",
        "extra_neurons": int(heads * dh * dh * n * n),
        "extra_synapses": int(sum(w.size for w in weights)),
        "extra_nonzero_synapses": int(sum(np.count_nonzero(w) for w in weights)),
    }
    a = b.convert(join_name(name, "attn_lif"), m.attn_lif, [y])
    return b.convert(join_name(name, "proj"), m.proj, a)


def _head(b: GraphBuilder, name: str, m: Head, inputs: list[str]) -> list[str]:
    s = b.convert(join_name(name, "lif"), m.lif, inputs)
    if len(b.input_shape(name, s)) == 1:  # one token (the dense stem): the mean over tokens is the identity
        return b.convert(join_name(name, "fc"), m.fc, s)
    d, n = b.input_shape(name, s)
    mean = _ones_linear(b, join_name(name, "token_mean"), s, np.full((d, 1, n), m.token_factor(n), np.float32), (d, 1), "mean over tokens")
    flat = b.add(join_name(name, "flatten"), nir.Flatten(input_type=np.array([d, 1]), start_dim=0, end_dim=-1, metadata={"module": name}), [mean], (d,))
    return b.convert(join_name(name, "fc"), m.fc, [flat])


SPIKFORMER_REFUSAL = (
    "Spikformer attention LIF(Q·Kᵀ·V · scale) multiplies two activations, and NIR has no product of two "
    "activations (edges only add); export the spike-driven variant instead (family = 'sdt'), whose "
    "AND/sum/LIF attention NIR expresses exactly, or opt in to an exact but large lowering with one AND unit per "
    "term of the product (to_nir(model, spikformer='exact'): H·dh²·N² extra neurons per block)"
)
SPIKFORMER_MODES = ("refuse", "exact")
SPIKFORMER_EXACT_MAX_WEIGHTS = 10 ** 8  # 400 MB of float32 weights per attention block

_BN_FIX = "BatchNorm is not folded: export stdeploy.models.fold.fold_batchnorm(model)"
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def default_converters(*, dt: float = 1.0, spikformer: str = "refuse") -> dict[type, Converter]:
    """The built-in ``{module type: converter}`` entries (a fresh dictionary each call).

    ``dt``: the NIR time of one model step; neurons get ``tau = dt/d``.
    ``spikformer``: ``"refuse"`` Spikformer attention (default) or lower it ``"exact"``ly with
    ``H·dh²·N²`` AND units per block (see :func:`_spikformer_attention_exact`)."""
    if not dt > 0:
        raise StdeployError(f"dt must be > 0, got {dt}")
    if spikformer not in SPIKFORMER_MODES:
        raise StdeployError(f"spikformer must be one of {SPIKFORMER_MODES}, got {spikformer!r}")
    lif = _make_lif(float(dt))
    return {
        SpikingTransformer: _transformer,
        PatchEmbed: _patch_embed,
        DenseEmbed: _dense_embed,
        EmbedStage: _embed_stage,
        FoldedConv: folded_conv_nodes,
        nn.Conv2d: _conv2d,
        MaxPool: _maxpool,
        nn.Identity: identity_node,
        nn.Sequential: sequential_node,
        LIF: lif,
        SLIF: lif,
        Block: _block,
        SpikeDrivenAttention: _spike_driven_attention,
        SpikformerAttention: _spikformer_attention_exact if spikformer == "exact" else Refusal(SPIKFORMER_REFUSAL),
        MLP: _mlp,
        nn.Linear: _linear,
        LowRankLinear: _lowrank,
        LowRankConv2d: lowrank_conv_nodes,
        Head: _head,
    }


def unsupported_modules(model: nn.Module, converters: Mapping[type, Converter]) -> list[str]:
    """Every module of ``model`` that cannot be exported, by fully qualified name with how to fix it."""
    problems: list[str] = []

    def visit(name: str, m: nn.Module) -> None:
        label = f"{name or '<model>'} ({type(m).__name__})"
        if parametrize.is_parametrized(m):
            problems.append(f"{label}: a pruning mask is still attached as a parametrization; make it permanent first "
                            "(torch.nn.utils.parametrize.remove_parametrizations(module, 'weight', leave_parametrized=True)), "
                            "then fold and export")
            return
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, LinearBN, ConvBN)):
            problems.append(f"{label}: {_BN_FIX}")
            return
        if type(m) in _CONTAINERS and type(m) not in converters:
            for child_name, child in m.named_children():
                visit(join_name(name, child_name), child)
            return
        fn = converters.get(type(m))
        if fn is None:
            problems.append(f"{label}: no NIR converter; replace the module or pass "
                            f"to_nir(model, converters={{{type(m).__name__}: fn}})")
            return
        if isinstance(fn, Refusal):
            problems.append(f"{label}: {fn.reason}")
            return
        for child_name, child in m.named_children():
            visit(join_name(name, child_name), child)

    visit("", model)
    return problems


def convert_model(model: nn.Module, table: Mapping[type, Converter], what: str) -> "GraphBuilder":
    """A :class:`GraphBuilder` that has converted ``model`` with the converter ``table``; every
    module the table cannot convert is checked first and all of them reported in one
    :class:`UnsupportedPrimitive` (``what`` names the dialect in the message)."""
    problems = unsupported_modules(model, table)
    if problems:
        raise UnsupportedPrimitive(f"cannot export {type(model).__name__} to {what}: {len(problems)} unsupported module(s):\n  - "
                                   + "\n  - ".join(problems))
    b = GraphBuilder(converters=table)
    with torch.no_grad():
        b.convert("", model, [])
    return b


def to_nir(model: nn.Module, *, converters: Mapping[type, Converter] | None = None, dt: float = 1.0,
           spikformer: str = "refuse") -> nir.NIRGraph:
    """The NIR graph of a folded model (``stdeploy.models.fold.fold_batchnorm(model)``).

    ``converters`` entries override the defaults by module type; ``dt`` and ``spikformer`` are
    the settings of :func:`default_converters`. Raises one :class:`UnsupportedPrimitive` listing
    every module that cannot be exported. The model is only read, never changed."""
    table = {**default_converters(dt=dt, spikformer=spikformer), **(converters or {})}
    b = convert_model(model, table, "NIR")
    b.metadata.update({
        "producer": "stdeploy",
        "dt": float(dt),
        "discretisation": DISCRETISATION,
        "input_encoding": "direct",  # the same analog frame at every step
        "layout": "channel first: images (C, H, W), sequences (C, L), tokens (D, N); per-token linear layers are kernel-1 Conv1d",
        "edge_sum_order": "edges into a node are summed in file order (the order of the PyTorch sums)",
    })
    try:
        return nir.NIRGraph(nodes=b.nodes, edges=b.edges, metadata=b.metadata, type_check=True)
    except (ValueError, AssertionError) as err:
        raise ShapeError(f"NIR export produced an ill-typed graph: {err}") from err


def write_nir(graph: nir.NIRGraph, path: str | os.PathLike) -> Path:
    """Write ``graph`` to ``path`` (HDF5, gzip) through a temporary file renamed into place; a
    failed write leaves neither a partial file nor the temporary one. The file is ``nir.write``'s,
    written one node at a time (:func:`write_graph_file`)."""
    from ..files import atomic_write

    path = Path(path)
    try:
        atomic_write(path, lambda tmp: write_graph_file(tmp, graph))
    except OSError as err:
        raise OSError(err.errno, f"cannot write NIR graph to {path}: {err.strerror or err}", str(err.filename or path)) from err
    return path


def write_graph_file(path: str | os.PathLike, graph: nir.NIRGraph, compression: str = "gzip") -> None:
    """The HDF5 file ``nir.write(path, graph)`` writes (nir 1.0.x: groups and datasets alike),
    converted to dictionaries one node at a time. ``nir.write`` converts the whole graph first
    (``NIRGraph.to_dict``: ``dataclasses.asdict`` of the graph, which deep-copies every node,
    then every node's ``to_dict`` again), so it holds two more copies of every weight while it
    writes: about 2.4 GB more for the portable ``sdt-8-512`` graph."""
    import copy

    import h5py

    def write_recursive(group, node: dict) -> None:  # nir.serialization.write's rules, one for one
        for k, v in node.items():
            if k == "metadata":
                if not v == {}:
                    write_recursive(group.create_group(k), v)
            elif isinstance(v, str):
                group.create_dataset(k, data=v, dtype=h5py.string_dtype())
            elif isinstance(v, np.ndarray):
                group.create_dataset(k, data=v, dtype=v.dtype, compression=compression)
            elif isinstance(v, dict):
                write_recursive(group.create_group(str(k)), v)
            else:
                group.create_dataset(k, data=v)

    shell = copy.copy(graph)  # the graph's own fields (edges, metadata) without its nodes
    shell.nodes = {}
    top = shell.to_dict()
    with h5py.File(path, "w") as f:
        f.create_dataset("version", data=nir.version, dtype=h5py.string_dtype())
        group = f.create_group("node")
        write_recursive(group, {k: v for k, v in top.items() if k != "nodes"})
        nodes = group.create_group("nodes")
        for name, node in graph.nodes.items():
            write_recursive(nodes.create_group(str(name)), node.to_dict())


def nir_stats(graph: nir.NIRGraph) -> dict:
    """Neurons by node type, synapses (weight entries) and nonzero synapses, nodes by type, edges."""
    neurons: dict[str, int] = {}
    nodes: dict[str, int] = {}
    synapses = nonzero = 0
    for node in graph.nodes.values():
        kind = type(node).__name__
        nodes[kind] = nodes.get(kind, 0) + 1
        if isinstance(node, (nir.LIF, nir.IF, nir.LI, nir.CubaLIF, nir.CubaLI)):
            neurons[kind] = neurons.get(kind, 0) + int(np.prod(node.output_type["output"]))
        elif isinstance(node, nir.Threshold):
            neurons[kind] = neurons.get(kind, 0) + int(node.threshold.size)
        if isinstance(node, (nir.Affine, nir.Linear, nir.Conv1d, nir.Conv2d)):
            synapses += int(node.weight.size)
            nonzero += int(np.count_nonzero(node.weight))
    return {"neurons": neurons, "neurons_total": sum(neurons.values()), "synapses": synapses,
            "nonzero_synapses": nonzero, "nodes": nodes, "edges": len(graph.edges)}
