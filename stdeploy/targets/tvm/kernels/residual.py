"""A weight kernel's bias add and residual add folded into its store (Relax rewrite, CPU).

Two patterns, each ``Y = call_tir(kernel, ...)`` read only by a bias add ``c + Y`` read only by a
residual add ``R + (c + Y)``:

* a transformer block's output projection, or its MLP's second layer, back onto the residual
  stream: the kernel an event matmul (:func:`.event.event_matmul_kernel`) or a fused MLP
  (:func:`.eventlif.event_mlp_kernel`), ``c`` a constant along ``Y``'s last axis (the bias), ``R``
  a float32 tensor of ``Y``'s shape: the kernel's ``residual`` form stores ``(acc + c) + R`` where
  it stored ``acc``;
* a convolutional position embedding added to its input and flattened into tokens
  (``permute_dims(reshape(R + reshape(c + Y)), [0, 1, 3, 2])``, any reshapes between): the kernel
  a weight-stationary convolution (:func:`.event.stationary_conv_kernel`) with ``Y (N, O, HO,
  WO)``, ``c`` one constant per output channel, ``R`` ``N * O * HO * WO`` values in NCHW order,
  the tokens ``(..., HO * WO, O)``: its ``residual_tokens`` form stores ``(acc + c) + R`` at each
  token's channel.

:func:`fold_residual_adds` replaces the operators with one call of the kernel's form: the sum is
written once, and neither ``Y`` nor ``c + Y`` (nor the sum before the transpose) is written and
read back.

Arithmetic: the same two float32 additions in the same order (``c + Y`` then ``R +`` that, each
commutative in IEEE arithmetic), no multiplication next to them (nothing to contract), reshapes
and the transpose moving values only: the output is bit-identical to the operators one after
another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import event, eventlif
from .routing import bound_once, rewrite_functions, static_shape, use_counts

__all__ = ["FoldedResidual", "fold_residual_adds"]


@dataclass(frozen=True)
class FoldedResidual:
    """One bias + residual add folded into a weight kernel."""

    kernel: str      # the kernel that now stores (acc + c) + r
    layer: str       # the kernel it replaces (an event matmul or fused MLP of the module)
    shape: tuple     # the output's shape


def fold_residual_adds(mod, layers=(), fused=()) -> tuple[object, list[FoldedResidual]]:
    """``(new_mod, [FoldedResidual, ...])``: ``mod`` with every ``R + (c + Y)`` of the module
    docstring's form computed by the residual form of ``Y``'s kernel. ``layers``: the
    :class:`~.event.EventLayer` list of :func:`~.event.route_event_kernels` (its matmuls);
    ``fused``: the :class:`~.lif.FusedLIF` list of :func:`~.lif.fuse_lif_recurrences` (its
    MLP kernels, ``consumer`` set). Other kernels' outputs are left alone."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    matmuls = {e.name: e for e in layers if e.op == "matmul"}
    convs = {e.name: e for e in layers if e.op == "conv2d"}
    mlps = {f.name: f for f in fused if f.consumer}
    rows = {**matmuls, **mlps}     # the kernels whose output rows take a bias along the last axis
    if not matmuls and not mlps and not convs:
        return mod, []
    uses = use_counts(mod)
    add, call_tir = tvm.ir.Op.get("relax.add"), tvm.ir.Op.get("relax.call_tir")
    reshape, permute = tvm.ir.Op.get("relax.reshape"), tvm.ir.Op.get("relax.permute_dims")
    const_type = type(relax.const(0.0))
    made: dict[tuple, object] = {}
    done: list[FoldedResidual] = []

    def bias_vector(c, n: int) -> np.ndarray | None:
        """``c``'s values as ``(n,)`` where it is a float32 constant that varies along the last axis only."""
        if not isinstance(c, const_type) or c.value.dtype != "float32":
            return None
        v = c.value.numpy()
        if v.ndim == 0 or v.shape[-1] != n or any(d != 1 for d in v.shape[:-1]):
            return None
        return np.ascontiguousarray(v.reshape(n))

    @mutator
    class _Fold(PyExprMutator):
        def producer(self, var, kernels):
            """``(kernel name, its call)`` where ``var`` is read once and bound to a call of one of
            ``kernels``."""
            call = self.once(var, call_tir)
            if call is None or not isinstance(call.args[0], relax.GlobalVar) or call.args[0].name_hint not in kernels:
                return None
            return call.args[0].name_hint, call

        def bias_add(self, var):
            """``(c as (N,), Y's kernel name, Y's call)`` where ``var`` is read once and bound to
            ``c + Y`` or ``Y + c``."""
            value = self.once(var, add)
            if value is None:
                return None
            for c, y in (value.args, value.args[::-1]):
                made_by = self.producer(y, rows)
                shape = static_shape(y)
                if made_by is not None and shape is not None and shape == static_shape(value):
                    vector = bias_vector(c, shape[-1])
                    if vector is not None:
                        return (vector, *made_by)
            return None

        def once(self, var, op):
            """The call of ``op`` that ``var`` is bound to, read only here, or None."""
            return bound_once(self.lookup_binding, uses, var, op)

        def unshaped(self, expr):
            """``expr`` with the reshapes it is bound through (each read only there) stripped."""
            while (value := self.once(expr, reshape)) is not None:
                expr = value.args[0]
            return expr

        def tokens(self, call):
            """The call replacing ``call`` (a ``permute_dims``) where it ends the position-embedding
            pattern of the module docstring, or None."""
            out = static_shape(call)
            if out is None or len(out) != 4 or call.attrs.axes is None or [int(a) for a in call.attrs.axes] != [0, 1, 3, 2]:
                return None
            total = self.once(self.unshaped(call.args[0]), add)
            if total is None or len(total.args) != 2 or static_shape(total.args[0]) != static_shape(total.args[1]):
                return None
            for inner, r in (total.args, total.args[::-1]):
                biased = self.once(self.unshaped(inner), add)
                if biased is None:
                    continue
                for y, c in (biased.args, biased.args[::-1]):
                    made_by = self.producer(y, convs)
                    shape = static_shape(y)
                    if made_by is None or shape is None or len(shape) != 4 or static_shape(biased) != shape:
                        continue
                    n, o, ho, wo = shape
                    cv = self.channel_bias(c, o)
                    if cv is None or out[-1] != o or out[-2] != ho * wo or static_shape(r) is None:
                        continue
                    name, ycall = made_by
                    layer = convs[name]
                    r_shape = static_shape(r)
                    key = ("stdeploy_stationary_conv", layer.x_shape, layer.weight, layer.padding, layer.nnz, layer.channels,
                           r_shape, out)
                    build = lambda: event.stationary_conv_kernel(layer.x_shape, layer.weight, layer.padding,  # noqa: E731
                                                                 layer.nnz, layer.channels, True, r_shape, out)
                    return self.emit_kernel(key, build, name, ycall, cv, r, call, out)
            return None

        def channel_bias(self, c, o: int) -> np.ndarray | None:
            """``c`` (through reshapes) as ``(o,)`` where it is one float32 constant per channel of an
            NCHW tensor (shape ``(1, o, 1, 1)`` as added)."""
            shape = static_shape(c)
            if shape is None or len(shape) != 4 or shape[1] != o or shape[0] * shape[2] * shape[3] != 1:
                return None
            value = self.unshaped(c)
            if not isinstance(value, const_type) or value.value.dtype != "float32" or value.value.numpy().size != o:
                return None
            return np.ascontiguousarray(value.value.numpy().reshape(o))

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op == permute and convs:
                folded = self.tokens(call)
                return call if folded is None else folded
            if call.op != add or len(call.args) != 2:
                return call
            shape = static_shape(call)
            for inner, r in (call.args, call.args[::-1]):
                found = self.bias_add(inner)
                if found is None or static_shape(r) != shape or static_shape(inner) != shape:   # no broadcasting
                    continue
                c, name, ycall = found
                return self.fold(name, ycall, c, r, call)
            return call

        def fold(self, name, ycall, c, r, call):
            args = list(ycall.args[1].fields)
            y_shape = static_shape(ycall)
            if name in matmuls:
                layer = matmuls[name]
                key = ("stdeploy_event_matmul", layer.x_shape, layer.weight)
                build = lambda: event.event_matmul_kernel(layer.x_shape, *layer.weight, residual=True)  # noqa: E731
            else:
                f = mlps[name]
                x_shape, (k, n), period, lanes, (_, n2) = (static_shape(args[0]), _shape(args[1]), _shape(args[3])[0],
                                                            _shape(args[8])[0], _shape(args[9]))
                key = ("stdeploy_event_mlp", x_shape, k, n, f.steps, period, lanes, n2, y_shape)
                build = lambda: eventlif.event_mlp_kernel(x_shape, k, n, f.steps, period, lanes, n2, y_shape,  # noqa: E731
                                                          residual=True)
            return self.emit_kernel(key, build, name, ycall, c, r, call, y_shape)

        def emit_kernel(self, key, build, name, ycall, c, r, call, shape):
            """The ``call_tir`` of the folded kernel (built once per ``key``) on ``ycall``'s
            arguments, the bias ``c`` and the residual ``r``, typed as ``call``."""
            if key not in made:
                kname = f"{key[0]}_residual_{len(made)}"   # named after the kernel it extends
                made[key] = self.builder_.add_func(build().with_attr("global_symbol", kname), kname)
            done.append(FoldedResidual(made[key].name_hint, name, tuple(shape)))
            return relax.call_tir(made[key], [*ycall.args[1].fields, relax.const(c), r], out_ty=call.ty)

    mod = rewrite_functions(mod, _Fold(mod))
    if done:
        mod = relax.transform.DeadCodeElimination()(mod)
    return mod, done


def _shape(const) -> tuple[int, ...]:
    return tuple(int(d) for d in const.ty.shape)
