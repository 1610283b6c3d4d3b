"""A weight kernel's bias add and residual add folded into its store (Relax rewrite, CPU).

The pattern (a transformer block's output projection, or its MLP's second layer, back onto the
residual stream): ``Y = call_tir(kernel, ...)`` of an event matmul (:func:`.event.event_matmul_kernel`)
or of a fused MLP (:func:`.eventlif.event_mlp_kernel`), read only by ``c + Y`` (``c`` a constant
along ``Y``'s last axis: the layer's bias), that read only by ``R + (c + Y)`` with ``R`` a float32
tensor of ``Y``'s shape. :func:`fold_residual_adds` replaces the three with one call of the
kernel's ``residual`` form, which stores ``(acc + c) + R`` where it stored ``acc``: the sum is
written once, and neither ``Y`` nor ``c + Y`` is written and read back.

Arithmetic: the same two float32 additions in the same order (``c + Y`` then ``R +`` that, each
commutative in IEEE arithmetic), no multiplication next to them (nothing to contract): the output
is bit-identical to the three operators one after another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import event, eventlif
from .routing import rewrite_functions, static_shape, use_counts, var_key

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
    mlps = {f.name: f for f in fused if f.consumer}
    if not matmuls and not mlps:
        return mod, []
    uses = use_counts(mod)
    add, call_tir = tvm.ir.Op.get("relax.add"), tvm.ir.Op.get("relax.call_tir")
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
        def producer(self, var):
            """``(kernel name, its call)`` where ``var`` is read once and bound to a call of a
            foldable kernel."""
            if not isinstance(var, relax.Var) or uses.get(var_key(var), 0) != 1:
                return None
            call = self.lookup_binding(var)
            if (not isinstance(call, relax.Call) or call.op != call_tir or not isinstance(call.args[0], relax.GlobalVar)
                    or call.args[0].name_hint not in {**matmuls, **mlps}):
                return None
            return call.args[0].name_hint, call

        def bias_add(self, var):
            """``(c as (N,), Y's kernel name, Y's call)`` where ``var`` is read once and bound to
            ``c + Y`` or ``Y + c``."""
            if not isinstance(var, relax.Var) or uses.get(var_key(var), 0) != 1:
                return None
            value = self.lookup_binding(var)
            if not isinstance(value, relax.Call) or value.op != add:
                return None
            for c, y in (value.args, value.args[::-1]):
                made_by = self.producer(y)
                shape = static_shape(y)
                if made_by is not None and shape is not None and shape == static_shape(value):
                    vector = bias_vector(c, shape[-1])
                    if vector is not None:
                        return (vector, *made_by)
            return None

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != add or len(call.args) != 2:
                return call
            shape = static_shape(call)
            for inner, r in (call.args, call.args[::-1]):
                found = self.bias_add(inner)
                if found is None or static_shape(r) != shape:
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
            if key not in made:
                kname = f"{key[0]}_residual_{len(made)}"   # named after the kernel it extends
                made[key] = self.builder_.add_func(build().with_attr("global_symbol", kname), kname)
            done.append(FoldedResidual(made[key].name_hint, name, y_shape))
            return relax.call_tir(made[key], [*args, relax.const(c), r], out_ty=call.ty)

    mod = rewrite_functions(mod, _Fold(mod))
    if done:
        mod = relax.transform.DeadCodeElimination()(mod)
    return mod, done


def _shape(const) -> tuple[int, ...]:
    return tuple(int(d) for d in const.ty.shape)
