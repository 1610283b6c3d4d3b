"""The portable NIR dialect: graphs that other frameworks' NIR readers load and run exactly.

``to_portable_nir(fold_batchnorm(model))`` gives a ``nir.NIRGraph`` written with the primitives
and conventions that snnTorch 1.0, SpikingJelly 2.0, Norse 1.1 and nirtorch 2.6 read; the
``stdeploy`` dialect of :mod:`.nir_export` (tokens ``(D, N)``, kernel-1 ``Conv1d``, batched
``Linear`` weights, ``Threshold`` nodes, two Output nodes, ``dt = 1``) stays the one the Lava
lowering reads.

Time convention
---------------
``graph.metadata["dt"] = 1e-4`` seconds (:data:`READER_DT`): snnTorch's importer hard-codes
``dt = 1e-4`` and SpikingJelly's defaults to it. A model LIF of decay ``d`` (one step:
``v = (1-d)*v + d*I``) becomes ``nir.LIF`` with ``tau = dt/d`` (float64), ``r = 1``, ``v_leak = 0``,
``v_reset = 0``, so NIR's forward-Euler step ``v += dt/tau*(v_leak - v + r*I)`` with the reader's
default ``dt`` is the model's step. The export checks that ``float32(dt/tau) == d`` and
``float32(1 - dt/tau) == 1 - d`` (snnTorch's ``beta``) and that ``tau/dt`` rounds to ``1/d``
(SpikingJelly's ``tau``). Norse defaults to ``dt = 1e-3``: pass ``from_nir(graph,
dt=graph.metadata["dt"])``.

Thresholds
----------
NIR spikes on ``v > v_threshold``, the model on ``v >= theta``: ``v_threshold`` is ``theta``
lowered by one float32 ulp (the same test for a float32 membrane). Readers want one threshold per
layer (snnTorch asserts it; SpikingJelly refuses per-neuron values). **Threshold folding**: where a
layer's per-neuron thresholds differ (sLIF) and ``v_leak = v_reset = 0``, the LIF's dynamics are
linear in its input, so dividing neuron ``i``'s input by ``theta_i`` and using threshold 1 spikes
identically in exact arithmetic. The division goes into the layer's own weight node (one input,
read by this LIF only), or else (the residual stream, whose terms other nodes read) into a
``diag(1/theta)`` 1x1 ``Conv2d``/``Affine`` in front of the LIF. In float32 it is exact by
construction when every ``theta_i`` is a power of two (``fold="exact"``, the default); with
``fold="checked"`` every layer is folded and then run by the NIR interpreter on ``check_input``:
a layer whose spikes differ from the model's is kept unfolded. A layer kept unfolded warns, and
``metadata["threshold_folding"]`` says for every LIF what was done and why.

Primitives and layout (every one read by snnTorch, SpikingJelly, Norse and nirtorch)
---------------------------------------------------------------------------------------
* Images and tokens keep the image layout ``(C, h, w)``: tokens are never flattened (readers do
  not agree on whether ``Flatten.start_dim`` counts the batch dim), the token ``n`` is pixel
  ``(n // w, n % w)`` (the PyTorch model's ``flatten`` order). A per-token linear layer is a
  1x1 ``Conv2d``. The dense (MLP) stem takes the frame as a vector: Input ``(C*H*W,)``
  (row-major ``(C, H, W)``), ``Affine`` layers with 2-D weights ``(out, in)``.
* ``Affine`` always (zero bias where the model has none): Norse maps ``Linear`` with its
  dimensions swapped and snnTorch requires a bias on ``Affine``.
* A stateless threshold (AND/OR of spikes, ``1 where sum(inputs) > level``) is a LIF that all but
  forgets each step: ``tau = dt*(1 + 2^-8)``, ``v_threshold = level``, reset to 0; its inputs are
  integer sums and ``level`` a half-integer, so the little it remembers never changes a spike
  (proof in :func:`_threshold_lif`). ``tau = dt`` would forget fully, but SpikingJelly requires
  ``tau/dt > 1``.
  AND of two spike tensors: both as edges into one such LIF at 1.5; 2x2 max-pool of spikes (OR):
  a 2x2 stride-2 ``Conv2d`` of ones per channel (a sum pool) into one at 0.5.
* Spike-driven attention: ``AND(q, k)``; the sum over tokens is a ``Conv2d`` with an ``(h, w)``
  kernel of ones per channel, ``(D, h, w) -> (D, 1, 1)``; the attention LIF on ``(D, 1, 1)``; its
  mask is broadcast back by a ``Conv2d`` with the same kernel and padding ``(h-1, w-1)``,
  ``(D, 1, 1) -> (D, h, w)``; ``AND(v, mask)``; the projection. All sums are of 0/1 values, exact.
* Residual stream: NIR sums every edge into a node, and readers sum them in no fixed order
  (nirtorch 2.6 collects them in a set), which changes float results for three or more terms. The
  export therefore never lets more than two terms meet: ``x + f(x)`` first collapses ``x``'s two
  terms into an identity ``Conv2d``/``Affine`` (weights 1 on the diagonal, 0 elsewhere: exact),
  and two terms sum identically in either order.
* Head: the head LIF, then the classifier over the mean of tokens as one ``Conv2d`` with an
  ``(h, w)`` kernel (weight ``fc.weight / N``), ``(D, h, w) -> (classes, 1, 1)``; on the MLP, an
  ``Affine``. A low-rank (DSP) classifier is multiplied out into that one node.
* Low-rank (DSP) layers keep their factors: a ``LowRankLinear`` is two chained 1x1 ``Conv2d``
  (``name.v``, ``name.u``), a ``LowRankConv2d`` its ``k x k`` ``Conv2d`` (zero bias) then a 1x1
  ``Conv2d`` with the bias; a per-channel threshold folds into ``name.u``'s rows. One Output node: per-step logits (``output="logits"``, the model's logits are their
  mean over the T steps), or the head LIF's spikes (``output="spikes"``), not both (nirtorch 2.6
  hangs on a graph with two Output nodes).
* Spikformer's ``Q·Kᵀ·V`` is refused (no product of two activations in NIR).
* Sequences (``cfg.input_dims == 1``, MNIST-1D): the MLP stem takes the ``C*L`` values as a
  vector like any frame; a convolutional sequence stem is refused (a ``Conv2d`` with a ``(1, k)``
  kernel fails NIR 1.0.8's type check; ``model.nir`` holds it as ``Conv1d``).

``metadata["nir_min_version"]`` is :data:`NIR_MIN_VERSION` (``v_reset`` on ``LIF`` is read from
nir 1.0.6 on; sinabs and Rockpool pin nir <= 1.0.4, whose ``nir.read`` rejects it).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping

import nir
import numpy as np
import torch
from torch import nn

from ..errors import ShapeError, StdeployError, UnsupportedPrimitive
from ..models.fold import FoldedConv
from ..models.quantize import merge_low_rank
from ..models.layers import Block, DenseEmbed, EmbedStage, Head, MaxPool, MLP, PatchEmbed, SpikeDrivenAttention, SpikformerAttention
from ..models.structure import LowRankConv2d, LowRankLinear
from ..models.transformer import SpikingTransformer
from ..neurons import LIF, SLIF
from .nir_export import (INPUT, SPIKFORMER_REFUSAL, Converter, GraphBuilder, Refusal, as_f32, conv2d_node, convert_model, identity_node, join_name,
                         lowrank_conv_nodes, folded_conv_nodes, sequential_node, weight_meta, unsupported_modules, write_graph_file)

__all__ = ["to_portable_nir", "write_portable_nir", "portable_converters", "READER_DT", "NIR_MIN_VERSION", "OUTPUTS", "DIALECT", "OUTPUT"]

READER_DT = 1e-4           # seconds per model step: snnTorch's hard-coded dt, SpikingJelly's default
NIR_MIN_VERSION = "1.0.6"  # LIF.v_reset
DIALECT = "portable"
OUTPUT = "output"          # the one Output node's name
OUTPUTS = ("logits", "spikes")
TIME_CONVENTION = (
    "dt = metadata['dt'] seconds per step; LIF tau = dt/d, r = 1, v_leak = 0, v_reset = 0: NIR's forward-Euler step "
    "v += dt/tau*(v_leak - v + r*I) is the model's v = (1-d)*v + d*I; spike when v > v_threshold, then v = v_reset; "
    "tau = dt*(1 + 2^-8) over integer sums with a half-integer v_threshold is a stateless threshold"
)
_WEIGHTED = (nir.Affine, nir.Conv2d)


# ----------------------------------------------------------------------------- helpers
STATELESS_EPS = 2.0 ** -8  # a stateless threshold's tau = dt * (1 + eps): d = 1/(1 + eps), 1 - d ~ 0.0039


def _threshold_lif(b: GraphBuilder, name: str, inputs: list[str], level: float, meta: dict, dt: float, most: int) -> str:
    """``1 where sum(inputs) > level``, for integer sums in ``[0, most]`` and a half-integer
    ``level``, as a LIF that all but forgets each step: ``tau = dt*(1 + eps)``, so
    ``v = (1-d)*v + d*I`` with ``1 - d = eps/(1 + eps)``. ``v`` stays in ``[0, most]``, so the
    remembered part moves ``v`` by less than ``(1-d)*most``; with ``(1-d)*(most + 0.5) < 0.5`` an
    input below ``level`` never reaches it and one above always passes it: the spikes are those of
    the threshold, exactly. (``tau = dt`` would forget fully, but SpikingJelly requires
    ``tau/dt > 1``.)"""
    shape = b.input_shape(name, inputs)
    keep = STATELESS_EPS / (1 + STATELESS_EPS)
    if not (level % 1 == 0.5 and keep * (most + 0.5) < 0.5):
        raise StdeployError(f"{name}: a threshold at {level} over integer sums up to {most} has no exact stateless LIF form")
    node = nir.LIF(tau=np.full(shape, dt * (1 + STATELESS_EPS)), r=np.ones(shape, np.float32), v_leak=np.zeros(shape, np.float32),
                   v_threshold=np.full(shape, level, np.float32), v_reset=np.zeros(shape, np.float32),
                   metadata={"module": name, "stateless": True, "inputs": f"integer sums in [0, {most}]", **meta})
    return b.add(name, node, inputs, shape)


def _spikes(b: GraphBuilder, name: str, inputs: list[str], what: str) -> None:
    bad = [src for src in inputs if not isinstance(b.nodes[src], nir.LIF)]
    if bad:
        raise UnsupportedPrimitive(f"{name}: {what} is lowered exactly only on spikes, but {', '.join(bad)} is not a spiking node")


def _channel_conv(b: GraphBuilder, name: str, inputs: list[str], kernel: tuple[int, int], stride: tuple[int, int],
                  padding: tuple[int, int], out_shape: tuple[int, ...], op: str) -> str:
    """A ``Conv2d`` of ones per channel (weight ``[c, c] = 1``, zero elsewhere; dense, ungrouped,
    since SpikingJelly refuses groups): window sums, token sums or a broadcast."""
    c, h, w = b.input_shape(name, inputs)
    weight = np.zeros((c, c, *kernel), np.float32)
    weight[np.arange(c), np.arange(c)] = 1.0
    node = nir.Conv2d(input_shape=(h, w), weight=weight, stride=stride, padding=padding, dilation=(1, 1), groups=1,
                      bias=np.zeros(c, np.float32), metadata={"module": name, "op": op})
    return b.add(name, node, inputs, out_shape)


def _dense(b: GraphBuilder, name: str, weight: np.ndarray, bias: np.ndarray | None, inputs: list[str], meta: dict) -> str:
    """A weight ``(out, in)``: a 1x1 ``Conv2d`` on ``(in, h, w)``, an ``Affine`` on ``(in,)``."""
    shape = b.input_shape(name, inputs)
    out_f, in_f = weight.shape
    bias_ = bias if bias is not None else np.zeros(out_f, np.float32)
    meta = {"module": name, "bias": bias is not None, **meta, **weight_meta(weight)}
    if len(shape) == 3 and shape[0] == in_f:
        node = nir.Conv2d(input_shape=shape[1:], weight=np.ascontiguousarray(weight[:, :, None, None]), stride=(1, 1), padding=(0, 0),
                          dilation=(1, 1), groups=1, bias=bias_, metadata=meta)
        return b.add(name, node, inputs, (out_f, *shape[1:]))
    if len(shape) == 1 and shape[0] == in_f:
        return b.add(name, nir.Affine(weight=weight, bias=bias_, metadata=meta), inputs, (out_f,))
    raise ShapeError(f"{name}: a linear layer of {in_f} inputs needs tokens ({in_f}, h, w) or a vector ({in_f},), got {list(shape)}")


def _collapse(b: GraphBuilder, name: str, terms: list[str]) -> list[str]:
    """One term for ``terms``: an identity node (exact) where there are two, so no more than two
    terms ever meet in a node (readers sum edges in no fixed order)."""
    if len(terms) == 1:
        return terms
    shape = b.input_shape(name, terms)
    eye = np.eye(shape[0], dtype=np.float32)
    return [_dense(b, name, eye, None, terms, {"op": "residual sum (identity)"})]


# ----------------------------------------------------------------------------- converters
def _linear(b, name, m: nn.Linear, inputs):
    return [_dense(b, name, as_f32(m.weight), None if m.bias is None else as_f32(m.bias), inputs, {})]


def _lowrank(b, name, m: LowRankLinear, inputs):
    meta = {"lowrank": True, "rank": int(m.rank)}
    inner = _dense(b, join_name(name, "v"), as_f32(m.v.weight), None, inputs, {**meta, "factor": "v"})
    return [_dense(b, join_name(name, "u"), as_f32(m.u.weight), None if m.u.bias is None else as_f32(m.u.bias), [inner], {**meta, "factor": "u"})]


def _conv2d(b, name, m: nn.Conv2d, inputs):
    return [conv2d_node(b, name, m, inputs)]


def _pow2(a: np.ndarray) -> bool:
    mant, _ = np.frexp(a.astype(np.float64))
    return bool(np.all(mant == 0.5))


FOLD_MODES = ("exact", "checked", "none")


def _fold_thresholds(b: GraphBuilder, name: str, inputs: list[str], theta: np.ndarray, mode: str,
                     keep: frozenset[str]) -> tuple[np.ndarray, list[str], str]:
    """Fold the LIF ``name``'s per-channel ``theta`` into what feeds it: ``(thresholds to use,
    inputs to use, what was done)`` (see the module docstring). Its own weight nodes are scaled
    row by row; otherwise a 1x1 ``Conv2d``/``Affine`` of ``diag(1/theta)`` is put in front."""
    if np.all(theta == theta[0]):
        return theta, inputs, "uniform"
    exact = _pow2(theta)
    if name in keep:
        reason = "kept per-neuron thresholds: folding flipped spikes on the check input"
    elif mode == "none":
        reason = "kept per-neuron thresholds: folding is off"
    elif mode == "exact" and not exact:
        reason = "kept per-neuron thresholds: not every threshold is a power of two, so dividing the weights would round"
    else:
        scale = (1.0 / theta.astype(np.float64)).astype(np.float32)
        feeders = [b.nodes[src] for src in inputs]
        own = (len(inputs) == 1 and isinstance(feeders[0], _WEIGHTED) and not feeders[0].metadata.get("residual_term")
               and not any(s == inputs[0] for s, _ in b.edges))
        if own:  # one weight node that feeds this LIF only (not a term of the residual stream, which others read)
            for node in feeders:
                node.weight = node.weight * scale.reshape((-1,) + (1,) * (node.weight.ndim - 1))
                node.bias = node.bias * scale
        else:
            inputs = [_dense(b, join_name(name, "threshold_scale"), np.diag(scale), None, inputs, {"op": "divide by the thresholds"})]
        how = "exact: thresholds are powers of two" if exact else "not exact by construction: checked spike for spike on the check input"
        return np.ones_like(theta), inputs, f"folded into the incoming weights ({how})"
    warnings.warn(f"{name}: {reason}; readers that want one threshold per layer (snnTorch, SpikingJelly) will refuse it",
                  stacklevel=3)
    return theta, inputs, reason


def _make_lif(dt: float, fold: str = "exact", keep: frozenset[str] = frozenset()) -> Converter:
    def convert(b: GraphBuilder, name: str, m: LIF, inputs: list[str]) -> list[str]:
        shape = b.input_shape(name, inputs)
        if shape[0] != m.features or len(shape) not in (1, 3):
            raise ShapeError(f"{name}: a {type(m).__name__} of {m.features} channels cannot map onto node shape {list(shape)}")
        d, theta = as_f32(m.decay), as_f32(m.threshold)
        theta, inputs, folding = _fold_thresholds(b, name, inputs, theta, fold, keep)
        b.metadata.setdefault("threshold_folding", {})[name] = folding
        per_channel = (-1,) + (1,) * (len(shape) - 1)
        d_full = np.ascontiguousarray(np.broadcast_to(d.reshape(per_channel), shape))
        theta_full = np.ascontiguousarray(np.broadcast_to(theta.reshape(per_channel), shape)).astype(np.float32)
        tau = dt / d_full.astype(np.float64)
        checks = {"float32(dt/tau) == d": (dt / tau).astype(np.float32) == d_full,
                  "float32(1 - dt/tau) == 1 - d": (1.0 - dt / tau).astype(np.float32) == (1 - d_full).astype(np.float32),
                  "float32(tau/dt) == float32(1/d)": (tau / dt).astype(np.float32) == (1.0 / d_full.astype(np.float64)).astype(np.float32)}
        bad = [k for k, ok in checks.items() if not np.all(ok)]
        if bad:
            raise StdeployError(f"{name}: tau = dt/d with dt = {dt} does not round back ({', '.join(bad)})")
        node = nir.LIF(tau=tau, r=np.ones(shape, np.float32), v_leak=np.zeros(shape, np.float32),
                       v_threshold=np.nextafter(theta_full, np.float32(-np.inf)), v_reset=np.zeros(shape, np.float32),
                       metadata={"module": name, "neuron": type(m).__name__, "decay": d, "theta": as_f32(m.threshold),
                                 "threshold_folding": folding})
        return [b.add(name, node, inputs, shape)]

    return convert


def _make_stateless(dt: float):
    def maxpool(b: GraphBuilder, name: str, m: MaxPool, inputs: list[str]) -> list[str]:
        _spikes(b, name, inputs, "max-pool (OR)")
        c, h, w = b.input_shape(name, inputs)
        summed = _channel_conv(b, join_name(name, "sum"), inputs, (2, 2), (2, 2), (0, 0), (c, h // 2, w // 2), "2x2 sum pool")
        return [_threshold_lif(b, join_name(name, "or"), [summed], 0.5, {"op": "or"}, dt, 4)]

    def attention(b: GraphBuilder, name: str, m: SpikeDrivenAttention, inputs: list[str]) -> list[str]:
        s = b.convert(join_name(name, "lif"), m.lif, inputs)
        q = b.convert(join_name(name, "q_lif"), m.q_lif, b.convert(join_name(name, "q"), m.q, s))
        k = b.convert(join_name(name, "k_lif"), m.k_lif, b.convert(join_name(name, "k"), m.k, s))
        v = b.convert(join_name(name, "v_lif"), m.v_lif, b.convert(join_name(name, "v"), m.v, s))
        _spikes(b, name, q + k + v, "spike-driven attention (AND)")
        shape = b.input_shape(name, q + k + v)
        if len(shape) != 3:
            raise ShapeError(f"{name}: spike-driven attention needs tokens (D, h, w), got {list(shape)}")
        d, h, w = shape
        qk = _threshold_lif(b, join_name(name, "qk_and"), q + k, 1.5, {"op": "and"}, dt, 2)
        total = _channel_conv(b, join_name(name, "token_sum"), [qk], (h, w), (1, 1), (0, 0), (d, 1, 1), "sum over tokens")
        mask = b.convert(join_name(name, "attn_lif"), m.attn_lif, [total])
        wide = _channel_conv(b, join_name(name, "mask_broadcast"), mask, (h, w), (1, 1), (h - 1, w - 1), (d, h, w), "broadcast over tokens")
        vm = _threshold_lif(b, join_name(name, "v_and"), v + [wide], 1.5, {"op": "and"}, dt, 2)
        return b.convert(join_name(name, "proj"), m.proj, [vm])

    return maxpool, attention


def _embed_stage(b, name, m: EmbedStage, inputs):
    x = b.convert(join_name(name, "conv"), m.conv, inputs)
    x = b.convert(join_name(name, "lif"), m.lif, x)
    return b.convert(join_name(name, "pool"), m.pool, x)


def _patch_embed(b, name, m: PatchEmbed, inputs):
    x = inputs
    for i, stage in enumerate(m.stages):
        x = b.convert(join_name(name, f"stages.{i}"), stage, x)
    return x + b.convert(join_name(name, "rpe"), m.rpe, x)  # p + rpe(p): two terms, (D, h, w)


def _dense_embed(b, name, m: DenseEmbed, inputs):
    x = inputs
    for i, fc in enumerate(m.fcs):
        x = b.convert(join_name(name, f"fcs.{i}"), fc, x)
        if i < len(m.lifs):
            x = b.convert(join_name(name, f"lifs.{i}"), m.lifs[i], x)
    return x


def _residual(b: GraphBuilder, terms: list[str]) -> list[str]:
    """Mark ``terms`` as terms of the residual stream: read by several nodes, never rescaled in place."""
    for t in terms:
        b.nodes[t].metadata["residual_term"] = True
    return terms


def _block(b, name, m: Block, inputs):
    a = _residual(b, b.convert(join_name(name, "attn"), m.attn, inputs))
    x = _residual(b, _collapse(b, join_name(name, "sum_attn"), inputs)) + a   # x + attn(x), two terms
    f = _residual(b, b.convert(join_name(name, "mlp"), m.mlp, x))
    return _residual(b, _collapse(b, join_name(name, "sum_mlp"), x)) + f     # x + mlp(x), two terms


def _mlp(b, name, m: MLP, inputs):
    x = inputs
    for child in ("lif1", "fc1", "lif2", "fc2"):
        x = b.convert(join_name(name, child), getattr(m, child), x)
    return x


def _head(b, name, m: Head, inputs):
    s = b.convert(join_name(name, "lif"), m.lif, inputs)
    shape = b.input_shape(name, s)
    fc = merge_low_rank(m.fc) if isinstance(m.fc, LowRankLinear) else m.fc   # DSP's whole-model scope factors it: multiplied out
    weight, bias = as_f32(fc.weight), as_f32(fc.bias) if fc.bias is not None else np.zeros(fc.out_features, np.float32)
    if len(shape) == 1:  # one token: the mean over tokens is the identity
        return [_dense(b, join_name(name, "fc"), weight, bias, s, {})]
    d, h, w = shape
    full = np.ascontiguousarray(np.broadcast_to((weight * np.float32(m.token_factor(h * w)))[:, :, None, None], (*weight.shape, h, w)))
    node = nir.Conv2d(input_shape=(h, w), weight=full, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=bias,
                      metadata={"module": join_name(name, "fc"), "op": "classifier over the mean of tokens (weight / N)"})
    return [b.add(join_name(name, "fc"), node, s, (weight.shape[0], 1, 1))]


def _make_transformer(output: str):
    def convert(b: GraphBuilder, name: str, m: SpikingTransformer, inputs: list[str]) -> list[str]:
        cfg = m.cfg
        if cfg.input_dims == 1 and cfg.stem == "conv":
            raise UnsupportedPrimitive(f"{join_name(name, 'embed')}: a 1-D (sequence) convolution stem is not in the portable "
                                       "dialect (its Conv2d with a (1, k) kernel is mistyped by NIR's type check); model.nir "
                                       "holds it as Conv1d")
        c, h, w = cfg.input_shape  # (C, S, S) images, (C, 1, L) sequences
        in_shape = (c * h * w,) if cfg.stem == "dense" else (c, h, w)
        x = [b.add(INPUT, nir.Input(input_type=np.array(in_shape)), [], in_shape)]
        x = _residual(b, b.convert(join_name(name, "embed"), m.embed, x))
        for i, block in enumerate(m.blocks):
            x = b.convert(join_name(name, f"blocks.{i}"), block, x)
        logits = b.convert(join_name(name, "head"), m.head, x)
        spikes = b.produced[join_name(name, "head.lif")]
        srcs = logits
        if output == "spikes":  # the classifier would dangle (NIR adds an Output for it): drop it
            srcs = spikes
            for fc in logits:
                del b.nodes[fc], b.shapes[fc]
                b.edges[:] = [e for e in b.edges if fc not in e]
        shape = b.input_shape(OUTPUT, srcs)
        b.add(OUTPUT, nir.Output(output_type=np.array(shape)), srcs, shape)
        tokens = "one token: the frame flattened in (C, H, W) order" if cfg.stem == "dense" else \
            f"token n = pixel (n // {cfg.image_size // 2 ** cfg.embed_pools}, n % {cfg.image_size // 2 ** cfg.embed_pools})"
        b.metadata.update({
            "timesteps": int(cfg.timesteps), "family": cfg.family, "config": cfg.to_dict(), "output_kind": output,
            "output": ("per-step logits (classes, 1, 1) or (classes,); the model's logits are their mean over the T steps"
                       if output == "logits" else "spikes of head.lif, channel first (D, h, w) or (D,); " + tokens),
        })
        return [OUTPUT]

    return convert


def portable_converters(*, dt: float = READER_DT, output: str = "logits", fold: str = "exact",
                        keep: frozenset[str] = frozenset()) -> dict[type, Converter]:
    """The ``{module type: converter}`` entries of the portable dialect (a fresh dictionary)."""
    if not dt > 0:
        raise StdeployError(f"dt must be > 0, got {dt}")
    if output not in OUTPUTS:
        raise StdeployError(f"output must be one of {OUTPUTS}, got {output!r}")
    if fold not in FOLD_MODES:
        raise StdeployError(f"fold must be one of {FOLD_MODES}, got {fold!r}")
    lif = _make_lif(float(dt), fold, frozenset(keep))
    maxpool, attention = _make_stateless(float(dt))
    return {
        SpikingTransformer: _make_transformer(output), PatchEmbed: _patch_embed, DenseEmbed: _dense_embed,
        EmbedStage: _embed_stage, FoldedConv: folded_conv_nodes, nn.Conv2d: _conv2d, MaxPool: maxpool, nn.Identity: identity_node,
        nn.Sequential: sequential_node, LIF: lif, SLIF: lif, Block: _block, SpikeDrivenAttention: attention,
        SpikformerAttention: Refusal(SPIKFORMER_REFUSAL), MLP: _mlp, nn.Linear: _linear, LowRankLinear: _lowrank, Head: _head,
        LowRankConv2d: lowrank_conv_nodes,
    }


def to_portable_nir(model: nn.Module, *, output: str = "logits", dt: float = READER_DT, fold: str = "exact",
                    check_input: torch.Tensor | None = None, converters: Mapping[type, Converter] | None = None) -> nir.NIRGraph:
    """The portable NIR graph of a folded model (see the module docstring). ``output``:
    ``"logits"`` (per-step logits) or ``"spikes"`` (the head LIF's spikes) as the one Output
    node. ``fold``: threshold folding ``"exact"`` (only where every threshold of a layer is a power
    of two), ``"checked"`` (every layer with per-neuron thresholds, then each folded layer is run
    on ``check_input`` ``(T, B, C, H, W)`` by the NIR interpreter and compared spike for spike
    with the model; a layer whose spikes differ is kept unfolded, with a warning) or ``"none"``.
    Raises one :class:`UnsupportedPrimitive` listing every module that cannot be exported."""
    if fold == "checked" and check_input is None:
        raise StdeployError("fold='checked' needs check_input (T, B, C, H, W)")
    keep: set[str] = set()
    if fold == "checked":
        from .nir_interpreter import run_nir
        from .validate import record_neurons

        with torch.no_grad():
            _, records = record_neurons(model, check_input)
        x = check_input.flatten(2) if model.cfg.stem == "dense" else check_input
        for _ in range(len(records) + 1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = _build(model, output, dt, fold, frozenset(keep), converters)
            bad = _first_flip(graph, run_nir(graph, x, record=[n for n in records if n in graph.nodes]), records)
            if bad is None:
                break
            if not str(graph.metadata["threshold_folding"].get(bad, "")).startswith("folded"):
                from ..errors import OutputMismatch

                raise OutputMismatch(f"portable NIR: {bad} spikes differ from the model's and its threshold is not folded")
            keep.add(bad)
    return _build(model, output, dt, fold, frozenset(keep), converters)


def _first_flip(graph: nir.NIRGraph, outs: dict[str, torch.Tensor], records: dict) -> str | None:
    """The first LIF node (topological order) whose spikes differ from the model's LIF of that name."""
    from .nir_interpreter import topological_order

    for name in topological_order(graph):
        if name not in records:
            continue
        got = outs[name]
        ref = records[name]["spikes"]
        ref = (ref.transpose(-1, -2) if ref.dim() == 4 else ref).reshape(got.shape)  # tokens (N, D) -> channel first
        if not torch.equal(got, ref):
            return name
    return None


def _build(model, output, dt, fold, keep, converters) -> nir.NIRGraph:
    table = {**portable_converters(dt=dt, output=output, fold=fold, keep=keep), **(converters or {})}
    b = convert_model(model, table, "portable NIR")
    b.metadata.update({
        "producer": "stdeploy", "dialect": DIALECT, "dt": float(dt), "nir_min_version": NIR_MIN_VERSION,
        "time_convention": TIME_CONVENTION, "input_encoding": "direct",  # the same analog frame at every step
        "layout": "channel first, tokens kept as an image (D, h, w); per-token linear layers are 1x1 Conv2d",
        "threshold_folding_mode": fold,
    })
    try:
        return nir.NIRGraph(nodes=b.nodes, edges=b.edges, metadata=b.metadata, type_check=True)
    except (ValueError, AssertionError) as err:
        raise ShapeError(f"portable NIR export produced an ill-typed graph: {err}") from err


COMPAT_VERSIONS = ("1.0.4",)


def write_portable_nir(graph: nir.NIRGraph, path, *, nir_version: str | None = None):
    """Write ``graph`` (atomically, as :func:`~.nir_export.write_nir`); ``nir_version="1.0.4"``
    writes a file that nir 1.0.4's ``nir.read`` (pinned by sinabs and Rockpool) loads: no node
    metadata (1.0.4 passes it to node classes that do not take it) and no ``LIF.v_reset`` (1.0.4
    does not know it; refused unless it is 0 everywhere, which 1.0.4's LIF assumes). The graph's
    own metadata (``dt``) stays."""
    import h5py

    from ..files import atomic_write

    if nir_version is not None and nir_version not in COMPAT_VERSIONS:
        raise StdeployError(f"nir_version must be one of {COMPAT_VERSIONS} or None, got {nir_version!r}")
    if nir_version is not None:
        bad = [n for n, v in graph.nodes.items() if isinstance(v, nir.LIF) and np.any(np.asarray(v.v_reset) != 0)]
        if bad:
            raise UnsupportedPrimitive(f"nir {nir_version} has no LIF.v_reset, and {', '.join(bad)} reset(s) to a nonzero value")

    def write(tmp):
        write_graph_file(tmp, graph)
        if nir_version is None:
            return
        with h5py.File(tmp, "r+") as f:
            for node in f["node"]["nodes"].values():
                if "metadata" in node:
                    del node["metadata"]
                if node["type"][()] == b"LIF" and "v_reset" in node:
                    del node["v_reset"]

    path = Path(path)
    atomic_write(path, write)
    return path
