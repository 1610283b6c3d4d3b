"""Export the folded spiking transformer to ONNX and run it with onnxruntime.

Two graphs, both of the folded inference model (:func:`stdeploy.models.fold.fold_batchnorm`):

* :func:`export_onnx`, the **unrolled** graph: ``input (T, B, C, H, W) -> logits (B, classes),
  spikes (T, B, N, D)``; ``spikes`` are the head LIF's output spikes, so an exported graph can be
  compared with the PyTorch model spike for spike. The T timesteps are unrolled (T is fixed).
* :func:`export_onnx_streaming`, **one timestep** with every neuron's membrane as an explicit
  input and output, for devices that feed frames as they arrive::

      inputs : input (B, C, H, W), state.<neuron name> ...           (membranes before the step)
      outputs: logits_step (B, classes), spikes_step (B, N, D), state_out.<neuron name> ...

  Neurons are named by their fully qualified module name (``state.blocks.0.attn.q_lif``).
  The logits of a sequence are the mean over T of ``logits_step`` (:func:`run_onnx_streaming`
  loops the steps); :func:`initial_states` gives the zero membranes.

The batch dimension is dynamic in both (``batch``). Each step is the neuron's pure step function
(:func:`stdeploy.neurons.lif_step`)::

    v = (1 - d) * v + d * x;   s = (v - theta >= 0);   v = v * (1 - s)

with ``d`` and ``theta`` stored as constants: an sLIF is exported with its current per-neuron
values (computed by PyTorch, so ``d0 ** exp(b)`` is not re-evaluated with another ``pow``).

Exporter
--------
The TorchScript-based exporter (``dynamo=False``, the default here) exports the tiny presets in
about 0.5-1 s; the torch.export-based one (``dynamo=True``, needs onnxscript) takes 7-10 s on two
cores and gives an equivalent graph (its per-node stack traces are dropped: half the file). Both
keep a low-rank layer ``u(v(x))`` as two ``MatMul`` nodes: constant folding only folds the
transposes of the weights, never ``Uᵀ`` into ``Vᵀ``, because the activation enters the first
product; a low-rank convolution (``LowRankConv2d`` in a :class:`~stdeploy.models.fold.FoldedConv`)
stays two ``Conv`` nodes, its ``k x k`` factor (no bias) then its 1x1 factor (the bias). The TorchScript exporter's deprecation warning is silenced here; switch the default to
``dynamo=True`` when torch drops it. Folded constants get readable names
(``blocks.0.attn.q.weight.T``, ``blocks.0.attn.q_lif.threshold``) where their content is unique.

Exactness
---------
The graph keeps PyTorch's elementwise operations one for one (the membrane update as two products
and a sum, the threshold as a subtraction and a comparison), and IEEE arithmetic makes those
bit-exact everywhere. Matrix products and convolutions are not: onnxruntime (MLAS) and PyTorch
(oneDNN, MKL) accumulate in different orders. Measured on an AVX2 CPU: onnxruntime's ``MatMul`` is
one fused multiply-add chain over K from zero with the bias added last, which equals PyTorch's
``linear`` bit for bit for K <= 128; for K > 128 MKL adds blocks of 128 into the bias (a third of
``fc2``'s outputs, K = 256, differ in the last bit). PyTorch's 3x3 convolution (oneDNN) starts its
chain at the bias and walks channels in blocks of 8 inside each tap; onnxruntime's adds the bias
last (half or more of the convolution outputs differ by an ulp). Reproducing those orders with
ONNX ops is not possible in general (an im2col + ``MatMul`` with the bias as the first term is exact
for the first convolution, K = 10, but not at K = 289, past MLAS's K stride), and they change with
the CPU's vector width anyway. So a spike whose membrane lies within an ulp of its threshold can
flip, and the flip propagates. Graph optimization levels and ``MatMul`` vs ``Gemm`` do not change
this. On the 360 digits test images, four of five trained tiny models gave 0 flipped head spikes of
1,474,560 and one sLIF model gave 37 (one flip in the second embedding stage, then its cascade).

Every export is therefore validated before it is written: a seeded input at batch 1 and 3 (the
graph is traced at 2, so this also checks that the batch stays dynamic) runs through PyTorch and
onnxruntime. More than :data:`MAX_FLIP_FRACTION` differing output spikes, or logits off by more than
:data:`LOGIT_ATOL` while every spike agrees, raise :class:`~stdeploy.errors.OutputMismatch` listing
every failure, and nothing is written; fewer flips only warn (the counts are in the info dict's
``validation``). Results with ``CUDAExecutionProvider`` are not bit-exact either.

Sparse weights
--------------
Pruned zeros are kept as zeros in dense initializers by default. With
``sparse_initializers=True`` the saved model is post-processed: every weight of a ``MatMul``,
``Gemm`` or ``Conv`` whose fraction of zeros is at least ``sparse_min_zeros`` becomes a
``graph.sparse_initializer`` (float32 values and int64 linear indices, 12 bytes per nonzero
against 4 per dense entry, hence the default of 2/3 below which a sparse weight would be larger).
onnxruntime densifies them at load and runs them exactly; ``onnx.checker.check_model`` passes
(not with ``full_check=True``); ``onnx.reference`` and TVM's ONNX frontend cannot read them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from ..files import atomic_write
from ..errors import ConfigError, OutputMismatch, ShapeError, StdeployError, UnsupportedPrimitive
from ..models.fold import FoldedConv
from ..models.layers import MLP, Block, DenseEmbed, EmbedStage, Head, MaxPool, PatchEmbed, SpikeDrivenAttention, SpikformerAttention
from ..models.structure import LowRankLinear
from ..models.transformer import SpikingTransformer, direct_encode
from ..neurons import LIF, SLIF, lif_step, neurons_of, to_lif
from ..tolerance import ONNXRUNTIME

__all__ = [
    "DEFAULT_OPSET", "LOGIT_ATOL", "MAX_FLIP_FRACTION", "SPARSE_MIN_ZEROS", "export_onnx", "export_onnx_streaming", "export_problems",
    "run_onnx", "run_onnx_streaming", "initial_states", "probe_onnx", "spike_mismatches", "default_step_rules", "providers",
]

DEFAULT_OPSET = 18            # onnxruntime >= 1.14, TensorRT >= 8.6; the dynamo exporter's native minimum
MIN_OPSET, MAX_OPSET = 13, 20 # ReduceSum with axes as an input (13); the TorchScript exporter's maximum (20)
LOGIT_ATOL = ONNXRUNTIME.logits_atol  # logits: onnxruntime vs PyTorch when every spike agrees (sums in another order)
MAX_FLIP_FRACTION = ONNXRUNTIME.max_flip_fraction  # validation: output spikes allowed to differ (rounding at threshold), with a warning
SPARSE_MIN_ZEROS = 2 / 3      # a weight with fewer zeros is smaller dense (12 bytes per nonzero vs 4 per entry)
BATCH = "batch"               # name of the dynamic batch dimension
STATE_IN, STATE_OUT = "state.", "state_out."
_VALIDATION_BATCHES = (1, 3)  # a batch other than the traced one (2) checks that the batch stays dynamic


# --------------------------------------------------------------------------------------------
# Checks


def export_problems(model: nn.Module, *, streaming: bool = False, rules: dict | None = None) -> list[str]:
    """Every reason ``model`` cannot be exported, one line each (empty when it can).

    Refused: BatchNorm not folded, pruning masks still attached (parametrizations), a model that
    is not a :class:`SpikingTransformer` with a standard :class:`Head`, and for the streaming graph
    every module without a step rule (``rules``, default :func:`default_step_rules`).
    """
    problems = []
    if not isinstance(model, SpikingTransformer):
        problems.append(f"<model>: {type(model).__name__} is not a SpikingTransformer")
    elif type(model.head) is not Head:
        problems.append(f"head: {type(model.head).__name__} is not a stdeploy Head (LIF, token mean, linear)")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            problems.append(f"{name}: {type(m).__name__} is not folded; export fold_batchnorm(model)")
        if parametrize.is_parametrized(m):
            tensors = ", ".join(m.parametrizations.keys())
            problems.append(f"{name}: a pruning mask is attached to {tensors}; finalize pruning (make the masks "
                            "permanent, e.g. parametrize.remove_parametrizations(m, 'weight')) before folding and export")
    if streaming and isinstance(model, SpikingTransformer):
        rules = default_step_rules() if rules is None else rules
        problems += [f"{name}: no streaming step rule for {kind}" for name, kind in _missing_rules(model, rules)]
    return problems


def _prepare(model: nn.Module, *, streaming: bool, rules: dict | None = None, sparse_min_zeros: float = SPARSE_MIN_ZEROS,
             opset: int | None = None) -> SpikingTransformer:
    """Check ``model``; a CPU, eval-mode copy with every sLIF frozen to a LIF of its current values."""
    if not 0.0 <= sparse_min_zeros <= 1.0:
        raise ConfigError(f"sparse_min_zeros must lie in [0, 1], got {sparse_min_zeros}")
    if opset is not None and not (isinstance(opset, int) and MIN_OPSET <= opset <= MAX_OPSET):
        raise ConfigError(f"opset must be an integer in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")
    problems = export_problems(model, streaming=streaming, rules=rules)
    if problems:
        raise UnsupportedPrimitive(f"cannot export to ONNX ({len(problems)} problem{'s' * (len(problems) > 1)}):\n  "
                                   + "\n  ".join(problems))
    return to_lif(copy.deepcopy(model)).cpu().eval()


# --------------------------------------------------------------------------------------------
# The two graphs as PyTorch modules


class _Unrolled(nn.Module):
    """``(T, B, C, H, W) -> (logits (B, classes), head spikes (T, B, N, D))``; ``Head.forward``
    with its LIF output kept, everything else the model's own multi-step modules."""

    def __init__(self, model: SpikingTransformer):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = m.embed(x)  # (T, B, N, D)
        for block in m.blocks:
            x = block(x)
        spikes = m.head.lif(x)  # (T, B, N, D)
        return m.head.fc(m.head.reduce_tokens(spikes, 2)).mean(dim=0), spikes


class _Probe(nn.Module):
    """The unrolled graph with every LIF's spikes as extra outputs (for localising flips)."""

    def __init__(self, model: SpikingTransformer):
        super().__init__()
        self.model = model
        self.names = list(neurons_of(model))

    def forward(self, x: torch.Tensor):
        seen: dict[str, torch.Tensor] = {}
        lifs = neurons_of(self.model)
        hooks = [lifs[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in self.names]
        try:
            logits, spikes = _Unrolled(self.model)(x)
        finally:
            for h in hooks:
                h.remove()
        return (logits, *[seen[n] for n in self.names])


def probe_onnx(model: nn.Module, x: torch.Tensor, opset: int | None = None) -> dict[str, torch.Tensor]:
    """Export the folded ``model`` in memory with every neuron's spikes as outputs, run ``x``
    through onnxruntime and return ``{neuron name: spikes (T, B, ...)}``: where an exported graph's
    output spikes differ from PyTorch's, this finds the first layer that diverged."""
    model = _prepare(model, streaming=False)
    probe = _Probe(model)
    outputs = ["logits"] + [f"spikes.{n}" for n in probe.names]
    proto = _to_proto(probe, (x[:, :2],), ["input"], outputs, {"input": 1, "logits": 0, **{o: 1 for o in outputs[1:]}},
                      lambda batch: ({1: batch},), opset=DEFAULT_OPSET if opset is None else opset, dynamo=False)
    out = onnx_session(proto.SerializeToString()).run(None, {"input": _numpy(x)})
    return {n: torch.from_numpy(o) for n, o in zip(probe.names, out[1:])}


StepRule = Callable[["_Step", nn.Module, torch.Tensor], torch.Tensor]


class _Step:
    """One timestep through a model: the membranes before it and after it, by neuron name."""

    def __init__(self, rules: dict[type, StepRule], names: dict[nn.Module, str], states: dict[str, torch.Tensor]):
        self.rules, self.names, self.states = rules, names, states
        self.new_states: dict[str, torch.Tensor] = {}
        self.head_spikes: torch.Tensor | None = None

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.rules[type(module)](self, module, x)

    def lif(self, module: LIF, x: torch.Tensor) -> torch.Tensor:
        name = self.names[module]
        if name in self.new_states:
            raise UnsupportedPrimitive(f"streaming step rules stepped neuron {name} twice in one timestep")
        s, self.new_states[name] = lif_step(x, self.states[name], module.params(x.dim()))
        return s


# Step rules: per-step forms of the multi-step modules. Images (B, C, H, W), tokens (B, N, D).
def _step_transformer(step: _Step, m: SpikingTransformer, x):  # frame (B, C, H, W) -> logits (B, classes)
    x = step(m.embed, x)
    for block in m.blocks:
        x = step(block, x)
    return step(m.head, x)


def _step_patch_embed(step: _Step, m: PatchEmbed, x):  # (B, C, H, W) -> (B, N, D)
    for stage in m.stages:
        x = step(stage, x)
    x = x + step(m.rpe, x)  # (B, D, h, w)
    return x.flatten(2).transpose(1, 2)


def _step_dense_embed(step: _Step, m: DenseEmbed, x):  # (B, C, H, W) -> (B, 1, D)
    x = x.flatten(1).unsqueeze(1)
    for i, fc in enumerate(m.fcs):
        x = step(fc, x)
        if i < len(m.lifs):
            x = step(m.lifs[i], x)
    return x


def _step_embed_stage(step: _Step, m: EmbedStage, x):
    return step(m.pool, step(m.lif, step(m.conv, x)))


def _step_folded_conv(step: _Step, m: FoldedConv, x):
    return m.conv(x)


def _step_maxpool(step: _Step, m: MaxPool, x):
    return nn.functional.max_pool2d(x, m.kernel)


def _step_identity(step: _Step, m: nn.Module, x):
    return x


def _step_pointwise(step: _Step, m: nn.Module, x):  # nn.Linear, LowRankLinear: act on the last dim
    return m(x)


def _step_lif(step: _Step, m: LIF, x):
    return step.lif(m, x)


def _step_block(step: _Step, m: Block, x):
    x = x + step(m.attn, x)
    return x + step(m.mlp, x)


def _step_mlp(step: _Step, m: MLP, x):
    return step(m.fc2, step(m.lif2, step(m.fc1, step(m.lif1, x))))


def _step_spike_driven_attention(step: _Step, m: SpikeDrivenAttention, x):  # (B, N, D)
    s = step(m.lif, x)
    q = step(m.q_lif, step(m.q, s))
    k = step(m.k_lif, step(m.k, s))
    v = step(m.v_lif, step(m.v, s))
    mask = step(m.attn_lif, (q * k).sum(dim=1, keepdim=True))  # (B, 1, D) spikes
    return step(m.proj, v * mask)


def _step_spikformer_attention(step: _Step, m: SpikformerAttention, x):  # (B, N, D)
    def split(t):  # (B, N, D) -> (B, h, N, D/h)
        return t.unflatten(-1, (m.heads, -1)).transpose(1, 2)

    s = step(m.lif, x)
    q = split(step(m.q_lif, step(m.q, s)))
    k = split(step(m.k_lif, step(m.k, s)))
    v = split(step(m.v_lif, step(m.v, s)))
    y = (q @ k.transpose(-2, -1)) @ v * m.scale  # (B, h, N, D/h)
    return step(m.proj, step(m.attn_lif, y.transpose(1, 2).flatten(2)))


def _step_head(step: _Step, m: Head, x):  # (B, N, D) -> per-step logits (B, classes)
    step.head_spikes = step(m.lif, x)
    return m.fc(m.reduce_tokens(step.head_spikes, 1))


_LEAVES = (nn.Linear, LowRankLinear, FoldedConv, LIF, MaxPool, nn.Identity)  # their children need no rule
_CONTAINERS = (nn.ModuleList,)                                                # walked by their parent's rule


def default_step_rules() -> dict[type, StepRule]:
    """``{module type: rule(step, module, x) -> y}`` for the streaming graph (exact types; a
    caller's dictionary may add or override entries)."""
    return {
        SpikingTransformer: _step_transformer, PatchEmbed: _step_patch_embed, EmbedStage: _step_embed_stage,
        DenseEmbed: _step_dense_embed,
        FoldedConv: _step_folded_conv, MaxPool: _step_maxpool, nn.Identity: _step_identity,
        nn.Linear: _step_pointwise, LowRankLinear: _step_pointwise, LIF: _step_lif, SLIF: _step_lif,
        Block: _step_block, MLP: _step_mlp, SpikeDrivenAttention: _step_spike_driven_attention,
        SpikformerAttention: _step_spikformer_attention, Head: _step_head,
    }


def _missing_rules(model: nn.Module, rules: dict[type, StepRule]) -> list[tuple[str, str]]:
    missing = []

    def walk(name: str, m: nn.Module):
        if not isinstance(m, _CONTAINERS):
            if type(m) not in rules:
                missing.append((name or "<model>", type(m).__name__))
                return
            if isinstance(m, _LEAVES):
                return
        for child_name, child in m.named_children():
            walk(f"{name}.{child_name}" if name else child_name, child)

    walk("", model)
    return missing


class _Streaming(nn.Module):
    """``(frame (B, C, H, W), *membranes) -> (logits_step, spikes_step, *new membranes)``, the
    membranes in the order of :attr:`neuron_names`."""

    def __init__(self, model: SpikingTransformer, rules: dict[type, StepRule]):
        super().__init__()
        self.model = model
        self.rules = rules
        neurons = neurons_of(model)
        self.neuron_names = list(neurons)
        self._names = {m: n for n, m in neurons.items()}

    def forward(self, frame: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        step = _Step(self.rules, self._names, dict(zip(self.neuron_names, states)))
        logits = step(self.model, frame)
        missing = [n for n in self.neuron_names if n not in step.new_states]
        if missing:
            raise UnsupportedPrimitive(f"streaming step rules never stepped {', '.join(missing)}: every neuron must step once per timestep")
        return (logits, step.head_spikes, *(step.new_states[n] for n in self.neuron_names))


def _state_shapes(model: SpikingTransformer) -> dict[str, tuple[int, ...]]:
    """Per-step membrane shape of every neuron without the batch dim, from one traced step."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: shapes.__setitem__(name, tuple(inp[0].shape[2:])))
             for name, m in neurons_of(model).items()]
    try:
        with torch.no_grad():
            c = model.cfg
            _Unrolled(model)(torch.zeros(1, 1, *c.input_shape))
    finally:
        for h in hooks:
            h.remove()
    return shapes


# --------------------------------------------------------------------------------------------
# Export


@contextlib.contextmanager
def _removing(handle):
    """Remove a hook ``handle`` when the block ends, however it ends."""
    try:
        yield handle
    finally:
        handle.remove()


def _to_proto(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str],
              batch_dims: dict[str, int], dynamic_shapes: Callable, *, opset: int, dynamo: bool) -> onnx.ModelProto:
    """Trace ``module`` on ``args`` and return the ModelProto (nothing is written to disk).
    ``batch_dims``: the batch dim of every input and output by name; ``dynamic_shapes(dim)``:
    torch.export's spec of the same for ``args`` (varargs grouped in one tuple)."""
    module.eval()
    seen: list[tuple[torch.Size, ...]] = []  # the output shapes of the traced call (no second forward for them)
    hook = module.register_forward_hook(lambda m, inputs, out: seen.append(tuple(o.shape for o in out)))
    with torch.no_grad(), warnings.catch_warnings(), _removing(hook):
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # the LIF's channel check is a Python bool
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        if dynamo:
            program = torch.onnx.export(module, args, dynamo=True, input_names=input_names, output_names=output_names,
                                        dynamic_shapes=dynamic_shapes(torch.export.Dim(BATCH)), opset_version=opset,
                                        optimize=True, verbose=False)
            proto = program.model_proto
            for node in proto.graph.node:  # stack traces and module paths: half the file
                del node.metadata_props[:]
            for value in proto.graph.input:  # one name for the batch dim everywhere
                value.type.tensor_type.shape.dim[batch_dims[value.name]].dim_param = BATCH
        else:
            f = io.BytesIO()
            torch.onnx.export(module, args, f, dynamo=False, input_names=input_names, output_names=output_names,
                              dynamic_axes={n: {d: BATCH} for n, d in batch_dims.items()}, opset_version=opset,
                              do_constant_folding=True)
            proto = onnx.load_from_string(f.getvalue())
        # TorchScript traces one real call (concrete shapes); torch.export traces symbolic ones
        shapes = seen[0] if len(seen) == 1 and not dynamo else tuple(o.shape for o in module(*args))
    _set_output_shapes(proto, {n: tuple(sh) for n, sh in zip(output_names, shapes)}, batch_dims)
    return proto


def _rename(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info) + list(graph.initializer):
        value.name = names.get(value.name, value.name)


def _derived_constants(model: SpikingTransformer, step_ndims: dict[str, int]) -> dict[str, torch.Tensor]:
    """Tensors the exporter folds into new initializers, by the name they should carry: transposed
    linear weights (``blocks.0.attn.q.weight.T``) and each neuron's constants as the step uses
    them (``.decay``, ``.one_minus_decay``, ``.threshold``, shaped to broadcast)."""
    out = {f"{n}.T": p.detach().t() for n, p in model.state_dict().items() if p.dim() == 2}
    for name, lif in neurons_of(model).items():
        p = lif.params(step_ndims[name])
        out.update({f"{name}.decay": p.decay, f"{name}.one_minus_decay": 1 - p.decay, f"{name}.threshold": p.threshold})
    return out


def _name_initializers(proto: onnx.ModelProto, model: SpikingTransformer, step_ndims: dict[str, int],
                       prefix: str = "model.") -> None:
    """Give initializers readable names: the model's parameter names without the wrapper's prefix,
    and for the constants the exporter folded (``onnx::MatMul_12``, ``val_130``) the name of the
    tensor they hold (see :func:`_derived_constants`), where that content is unique."""
    params = set(model.state_dict())
    by_content: dict[tuple, list[str]] = {}
    for name, t in _derived_constants(model, step_ndims).items():
        a = t.detach().contiguous().numpy()
        by_content.setdefault((a.shape, a.tobytes()), []).append(name)
    taken = {i.name for i in proto.graph.initializer}
    names = {}
    for init in proto.graph.initializer:
        new = init.name[len(prefix):] if init.name.startswith(prefix) else None
        if new not in params:
            match = by_content.get((tuple(init.dims), numpy_helper.to_array(init).tobytes()), []) if init.data_type == onnx.TensorProto.FLOAT else []
            new = match[0] if len(match) == 1 else None
        if new and new not in taken:
            names[init.name] = new
            taken.add(new)
    _rename(proto.graph, names)


def _set_output_shapes(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], batch_dims: dict[str, int]) -> None:
    """Static output dims (the TorchScript exporter leaves some symbolic), the batch dim named."""
    for value in proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        for i, size in enumerate(shapes[value.name]):
            if i == batch_dims[value.name]:
                dims[i].dim_param = BATCH
            else:
                dims[i].dim_value = size


def _weight_names(graph: onnx.GraphProto) -> set[str]:
    return {n.input[1] for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and len(n.input) > 1}


def _sparsify(proto: onnx.ModelProto, min_zeros: float) -> list[str]:
    """Move every weight initializer with at least ``min_zeros`` zeros to ``graph.sparse_initializer``
    (values and int64 linear indices); returns the names moved."""
    graph = proto.graph
    weights = _weight_names(graph)
    keep, moved = [], []
    for init in graph.initializer:
        if init.name in weights and init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 2:
            dense = numpy_helper.to_array(init)
            if dense.size and float((dense == 0).mean()) >= min_zeros:
                flat = dense.ravel()
                index = np.flatnonzero(flat).astype(np.int64)
                values = numpy_helper.from_array(flat[index], name=init.name)
                indices = numpy_helper.from_array(index, name=f"{init.name}.indices")
                graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(dense.shape)))
                moved.append(init.name)
                continue
        keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return moved


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def _write(path: Path, data: bytes) -> None:
    """``data`` (a serialised ModelProto: what ``onnx.save_model`` writes) to ``path``, atomically."""
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    except OSError as err:
        raise OSError(err.errno, f"cannot write ONNX model to {path}: {err.strerror or err}", str(err.filename or path)) from err


def _finish(proto: onnx.ModelProto, model: SpikingTransformer, path: str | os.PathLike, kind: str, *,
            state_shapes: dict[str, tuple[int, ...]], sparse_initializers: bool, sparse_min_zeros: float, exporter: str,
            validate: Callable[[bytes], dict] | None, metadata: dict[str, str] | None) -> dict:
    """Name, annotate (stdeploy's ``metadata_props``, then ``metadata``'s), sparsify, check,
    validate and write ``proto``; the info dict."""
    _name_initializers(proto, model, {n: len(shape) + 1 for n, shape in state_shapes.items()})
    proto.producer_name = "stdeploy"
    meta = {"stdeploy.graph": kind, "stdeploy.model": model.cfg.name or model.cfg.family,
            "stdeploy.timesteps": str(model.cfg.timesteps), "stdeploy.config": json.dumps(model.cfg.to_dict(), sort_keys=True)}
    clash = sorted(set(meta) & set(metadata or {}))
    if clash:
        raise ConfigError(f"metadata: the exporter writes {', '.join(clash)} itself")
    onnx.helper.set_model_props(proto, {**meta, **(metadata or {})})
    dense_bytes = proto.ByteSize()
    sparse = _sparsify(proto, sparse_min_zeros) if sparse_initializers else []
    data = proto.SerializeToString()  # once: checked, validated and written as these bytes
    if len(data) >= 2**31:
        raise StdeployError(f"{kind} ONNX model is {len(data)} bytes, over protobuf's 2 GiB limit (external data is not supported yet)")
    onnx.checker.check_model(data)
    validation = validate(data) if validate is not None else None
    path = Path(path)
    _write(path, data)
    del data
    g = proto.graph
    ops = Counter(n.op_type for n in g.node)
    info = {
        "path": str(path), "graph": kind, "exporter": exporter,
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": {v.name: _dims(v) for v in g.input}, "outputs": {v.name: _dims(v) for v in g.output},
        "file_bytes": path.stat().st_size,
        "initializers": len(g.initializer) + len(g.sparse_initializer),
        "sparse_initializers": sparse,
        "matmul_nodes": ops["MatMul"] + ops["Gemm"],
        "op_counts": dict(sorted(ops.items())),
        "validation": validation,
    }
    if sparse_initializers:
        info["dense_file_bytes"] = dense_bytes  # the same model with every initializer dense
    return info


def _validation_inputs(cfg) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [direct_encode(torch.rand(b, *cfg.input_shape, generator=g), cfg.timesteps)
            for b in _VALIDATION_BATCHES]


def _compare(ref: tuple[torch.Tensor, torch.Tensor], out: tuple[torch.Tensor, torch.Tensor]) -> dict:
    return {"spikes": ref[1].numel(), "spike_mismatches": spike_mismatches(ref[1], out[1]),
            "max_logit_error": float((ref[0] - out[0]).abs().max())}


def _judge(report: dict[str, dict]) -> None:
    """Raise :class:`OutputMismatch` with every failure; warn about tolerated spike flips."""
    problems, flips = [], 0
    for where, r in report.items():
        if r["spike_mismatches"] > MAX_FLIP_FRACTION * r["spikes"]:
            problems.append(f"{where}: {r['spike_mismatches']} of {r['spikes']} output spikes differ "
                            f"(tolerance {MAX_FLIP_FRACTION:g} of them)")
        elif r["spike_mismatches"] == 0 and not r["max_logit_error"] <= LOGIT_ATOL:
            problems.append(f"{where}: logits differ by up to {r['max_logit_error']:.3g} (tolerance {LOGIT_ATOL:g})")
        flips += r["spike_mismatches"]
    if problems:
        raise OutputMismatch("ONNX export does not reproduce the PyTorch model (nothing written):\n  " + "\n  ".join(problems))
    if flips:
        warnings.warn(f"ONNX export: {flips} output spikes flipped on the validation input (float rounding of a "
                      "membrane at its threshold; see stdeploy.export.onnx_export's notes on exactness)", stacklevel=4)


def _validator(model: SpikingTransformer, run: Callable) -> Callable[[bytes], dict]:
    """Run PyTorch and onnxruntime on seeded inputs at batch 1 and 3 (the graph was traced at 2)."""

    def validate(data: bytes) -> dict:
        session = onnx_session(data)
        reference = _Unrolled(model)
        report = {}
        for x in _validation_inputs(model.cfg):
            with torch.no_grad():
                ref = reference(x)
            report[f"batch {x.shape[1]}"] = _compare(ref, run(session, x))
        _judge(report)
        return report

    return validate


def export_onnx(model: nn.Module, path: str | os.PathLike, *, sparse_initializers: bool = False, opset: int | None = None,
                sparse_min_zeros: float = SPARSE_MIN_ZEROS, dynamo: bool = False, validate: bool = True,
                metadata: dict[str, str] | None = None) -> dict:
    """Export the folded ``model`` as one unrolled graph to ``path`` (written atomically).

    Inputs ``input (T, B, C, H, W)``; outputs ``logits (B, classes)`` and ``spikes (T, B, N, D)``
    (the head LIF's spikes), ``B`` dynamic. Returns ``path, graph, exporter, opset, inputs, outputs``
    (name -> dims, ``"batch"`` for the dynamic one), ``file_bytes``, ``initializers``,
    ``sparse_initializers`` (names moved), ``matmul_nodes`` (MatMul + Gemm), ``op_counts``,
    ``validation`` (per batch: spike mismatches, max logit error; None with ``validate=False``),
    and with ``sparse_initializers`` also ``dense_file_bytes``. ``metadata`` (str -> str) is written
    into the file's ``metadata_props`` after stdeploy's own (``stdeploy.graph``, ``stdeploy.model``,
    ``stdeploy.timesteps``, ``stdeploy.config``; one of those keys is refused).

    Raises :class:`~stdeploy.errors.UnsupportedPrimitive` (BatchNorm not folded, masks attached),
    :class:`~stdeploy.errors.ConfigError` (bad ``opset`` or ``sparse_min_zeros``, a ``metadata``
    key of stdeploy's),
    :class:`~stdeploy.errors.OutputMismatch` (validation failed, see the module notes on
    exactness; nothing written) or ``OSError`` naming ``path`` (no partial or temporary file left).
    """
    model = _prepare(model, streaming=False, sparse_min_zeros=sparse_min_zeros, opset=opset)
    c = model.cfg
    example = (torch.rand(c.timesteps, 2, *c.input_shape, generator=torch.Generator().manual_seed(1)),)
    opset = DEFAULT_OPSET if opset is None else opset
    proto = _to_proto(_Unrolled(model), example, ["input"], ["logits", "spikes"], {"input": 1, "logits": 0, "spikes": 1},
                      lambda batch: ({1: batch},), opset=opset, dynamo=dynamo)
    return _finish(proto, model, path, "unrolled", state_shapes=_state_shapes(model),
                   sparse_initializers=sparse_initializers, sparse_min_zeros=sparse_min_zeros,
                   exporter="dynamo" if dynamo else "torchscript", validate=_validator(model, run_onnx) if validate else None,
                   metadata=metadata)


def export_onnx_streaming(model: nn.Module, path: str | os.PathLike, *, sparse_initializers: bool = False,
                          opset: int | None = None, sparse_min_zeros: float = SPARSE_MIN_ZEROS, dynamo: bool = False,
                          validate: bool = True, rules: dict[type, StepRule] | None = None,
                          metadata: dict[str, str] | None = None) -> dict:
    """Export one timestep of the folded ``model`` with explicit neuron states to ``path``.

    Inputs ``input (B, C, H, W)`` and ``state.<neuron>`` (membranes); outputs
    ``logits_step (B, classes)``, ``spikes_step (B, N, D)`` and ``state_out.<neuron>``. ``rules``
    overrides or extends :func:`default_step_rules`; ``metadata`` as in :func:`export_onnx`.
    Validation runs the graph over T steps (:func:`run_onnx_streaming`) against the unrolled
    PyTorch model. Returns the info dict of :func:`export_onnx` plus ``states`` (neuron name ->
    per-step shape without the batch dim).
    """
    rules = {**default_step_rules(), **(rules or {})}
    model = _prepare(model, streaming=True, rules=rules, sparse_min_zeros=sparse_min_zeros, opset=opset)
    c = model.cfg
    shapes = _state_shapes(model)
    wrapper = _Streaming(model, rules)
    names = wrapper.neuron_names
    frame = torch.rand(2, *c.input_shape, generator=torch.Generator().manual_seed(1))
    states = tuple(torch.zeros(2, *shapes[n]) for n in names)
    inputs = ["input"] + [STATE_IN + n for n in names]
    outputs = ["logits_step", "spikes_step"] + [STATE_OUT + n for n in names]
    proto = _to_proto(wrapper, (frame, *states), inputs, outputs, {n: 0 for n in inputs + outputs},
                      lambda batch: ({0: batch}, tuple({0: batch} for _ in states)),
                      opset=DEFAULT_OPSET if opset is None else opset, dynamo=dynamo)
    info = _finish(proto, model, path, "streaming", state_shapes=shapes,
                   sparse_initializers=sparse_initializers, sparse_min_zeros=sparse_min_zeros,
                   exporter="dynamo" if dynamo else "torchscript", validate=_validator(model, run_onnx_streaming) if validate else None,
                   metadata=metadata)
    info["states"] = {n: list(shapes[n]) for n in names}
    return info


# --------------------------------------------------------------------------------------------
# Running with onnxruntime


def providers() -> list[str]:
    """onnxruntime providers in order of preference: CUDA when available, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def onnx_session(model):
    """An ``InferenceSession`` for a path, serialized bytes or an existing session. Its intra-op
    threads (one per core, onnxruntime's default) sleep between operators instead of spinning:
    the same results, and no core burnt waiting while other processes want it."""
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(model, (bytes, bytearray)):
        return ort.InferenceSession(bytes(model), opts, providers=providers())
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    return ort.InferenceSession(str(path), opts, providers=providers())


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_rank(x: np.ndarray, session, name: str, want: int, layout: str) -> None:
    if x.ndim != want:
        raise ShapeError(f"{name}: expected {layout}, got shape {tuple(x.shape)}")
    expected = next(i for i in session.get_inputs() if i.name == "input").shape
    fixed = [(i, d) for i, d in enumerate(expected) if isinstance(d, int)]
    offset = want - len(expected)  # the streaming input has no T
    if any(x.shape[i + offset] != d for i, d in fixed):
        raise ShapeError(f"{name}: expected {layout} with fixed dims {dict((i + offset, d) for i, d in fixed)}, got {tuple(x.shape)}")


def run_onnx(model, x) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an unrolled graph (path, bytes or session) on ``x (T, B, C, H, W)``:
    ``(logits (B, classes), spikes (T, B, N, D))`` as torch tensors."""
    session = onnx_session(model)
    x = _numpy(x)
    _check_rank(x, session, "run_onnx", 5, "input (T, B, C, H, W)")
    logits, spikes = session.run(["logits", "spikes"], {"input": x})
    return torch.from_numpy(logits), torch.from_numpy(spikes)


def initial_states(model, batch: int) -> dict[str, np.ndarray]:
    """Zero membranes for a streaming graph (path, bytes or session), by input name (``state.*``)."""
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    session = onnx_session(model)
    return {i.name: np.zeros([batch if not isinstance(d, int) else d for d in i.shape], dtype=np.float32)
            for i in session.get_inputs() if i.name.startswith(STATE_IN)}


def run_onnx_streaming(model, x) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed ``x (T, B, C, H, W)`` frame by frame through a streaming graph (path, bytes or
    session), carrying the membranes: ``(logits (B, classes), spikes (T, B, N, D))``, the logits
    averaged over the T steps."""
    session = onnx_session(model)
    x = _numpy(x)
    _check_rank(x, session, "run_onnx_streaming", 5, "input (T, B, C, H, W)")
    states = initial_states(session, x.shape[1])
    names = [o.name for o in session.get_outputs()]
    logits, spikes = [], []
    for t in range(x.shape[0]):
        out = dict(zip(names, session.run(names, {"input": x[t], **states})))
        states = {STATE_IN + n[len(STATE_OUT):]: v for n, v in out.items() if n.startswith(STATE_OUT)}
        logits.append(out["logits_step"])
        spikes.append(out["spikes_step"])
    return torch.from_numpy(np.stack(logits)).mean(dim=0), torch.from_numpy(np.stack(spikes))


def spike_mismatches(ref_spikes, out_spikes) -> int:
    """Number of positions where two spike tensors (torch or numpy, same shape) differ."""
    a, b = _numpy(ref_spikes), _numpy(out_spikes)
    if a.shape != b.shape:
        raise ShapeError(f"spike tensors differ in shape: {a.shape} vs {b.shape}")
    return int(np.count_nonzero(a != b))
