"""The spike-driven attention's product summed over tokens as one TIR kernel (CPU).

The pattern: ``R.sum(R.multiply(a, b), axis=[k])`` (``keepdims`` either way), the product read by
nothing else, ``a`` and ``b`` float32 tensors of one static shape, ``k`` not the last axis (in
spike-driven self-attention, ``q * k`` summed over the tokens per channel). Relax's lowering writes
the whole product, then sums it with a scalar loop over the strided axis; :func:`product_sum_kernel`
multiplies and adds in registers, vectorised along the contiguous axes after ``k``, and writes the
sums only.

Arithmetic: per output, ``acc = 0``, then ``acc + a * b`` for the summed index ascending, as the
lowered ``sum`` does; each product passes through an ``and`` with an all-ones word ``keep`` so the
compiler cannot contract it with the add into a fused multiply-add (:func:`.lif.require_exact`
checks the compiled kernel): bit-identical to the two operators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ....errors import ShapeError
from .lif import require_exact
from .routing import bound_once, rewrite_functions, static_shape, use_counts
from .spike import LANES, PARTS

__all__ = ["ProductSum", "product_sum_kernel", "route_product_sums"]


@dataclass(frozen=True)
class ProductSum:
    """One ``sum(a * b, axis)`` replaced by :func:`product_sum_kernel`."""

    shape: tuple     # the operands' shape
    axis: int        # the summed axis
    name: str        # the kernel's name in the module


def product_sum_kernel(shape: tuple, axis: int, lanes: int = LANES, out_shape: tuple | None = None):
    """The TIR PrimFunc ``(a, b (shape), keep (lanes,) int32, out)``: ``out`` the sum of ``a * b``
    over ``axis`` (its ``prod(shape) / shape[axis]`` values in the shape ``out_shape``, default
    ``shape`` without ``axis``), vectorised ``lanes`` at a time along the axes after ``axis``, whose
    size ``lanes`` must divide."""
    from tvm.script import tirx as T

    shape = tuple(int(d) for d in shape)
    if not 0 <= axis < len(shape) - 1:
        raise ShapeError(f"product sum: axis {axis} is not one of the leading axes of {shape}")
    outer, n, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
    if lanes < 1 or inner % lanes:
        raise ShapeError(f"product sum: {lanes} lanes do not divide the {inner} values after axis {axis} of {shape}")
    out_shape = tuple(int(d) for d in (out_shape or (*shape[:axis], *shape[axis + 1:])))
    if math.prod(out_shape) != outer * inner:
        raise ShapeError(f"product sum: output shape {out_shape} does not hold the {outer * inner} sums of {shape} over axis {axis}")
    parts = min(PARTS, outer)
    per = math.ceil(outer / parts)
    groups = inner // lanes

    @T.prim_func
    def product_sum(ah: T.handle, bh: T.handle, keep: T.Buffer((lanes,), "int32"), oh: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        an = T.match_buffer(ah, shape, "float32")
        bn = T.match_buffer(bh, shape, "float32")
        on = T.match_buffer(oh, out_shape, "float32")
        a = T.decl_buffer((outer, n, inner), "float32", data=an.data)
        b = T.decl_buffer((outer, n, inner), "float32", data=bn.data)
        out = T.decl_buffer((outer, inner), "float32", data=on.data)
        for part in T.parallel(parts):
            acc = T.alloc_buffer((lanes,), "float32")
            for i in range(part * per, T.min(outer, part * per + per)):
                for g in range(groups):
                    for l in T.vectorized(lanes):
                        acc[l] = T.float32(0)
                    for j in range(n):
                        for l in T.vectorized(lanes):
                            acc[l] = acc[l] + T.reinterpret("float32", T.reinterpret(
                                "int32", a[i, j, g * lanes + l] * b[i, j, g * lanes + l]) & keep[l])
                    for l in T.vectorized(lanes):
                        out[i, g * lanes + l] = acc[l]

    return product_sum


def route_product_sums(mod, target) -> tuple[object, list[ProductSum]]:
    """``(new_mod, [ProductSum, ...])``: ``mod`` with every ``sum(a * b, axis)`` of the module
    docstring's form computed by :func:`product_sum_kernel` (``call_tir``), where :data:`.spike.LANES`
    divides the values after the axis. ``target``: the CPU target the kernels are checked for
    contraction on; a kernel that would compile to fused multiply-adds raises
    :class:`~stdeploy.targets.base.TargetError` (:func:`.lif.require_exact`)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    uses = use_counts(mod)
    multiply, total = tvm.ir.Op.get("relax.multiply"), tvm.ir.Op.get("relax.sum")
    made: dict[tuple, object] = {}
    done: list[ProductSum] = []

    @mutator
    class _Route(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != total or call.attrs.axis is None or len(call.attrs.axis) != 1:
                return call
            value = bound_once(self.lookup_binding, uses, call.args[0], multiply)
            if value is None:
                return call
            shape = static_shape(value.args[0])
            if shape is None or shape != static_shape(value.args[1]) or shape != static_shape(value) or static_shape(call) is None:
                return call
            axis = int(call.attrs.axis[0]) % len(shape)
            if axis == len(shape) - 1 or math.prod(shape[axis + 1:]) % LANES:
                return call
            key = (shape, axis, static_shape(call))
            if key not in made:
                func = product_sum_kernel(shape, axis, LANES, static_shape(call))
                require_exact(func, ("product_sum", *key), target, f"the product-sum kernel for {shape}")
                name = f"stdeploy_product_sum_{len(made)}"
                made[key] = self.builder_.add_func(func.with_attr("global_symbol", name), name)
            done.append(ProductSum(shape, axis, made[key].name_hint))
            keep = relax.const(np.full(LANES, -1, np.int32))
            return relax.call_tir(made[key], [value.args[0], value.args[1], keep], out_ty=call.ty)

    mod = rewrite_functions(mod, _Route(mod))
    if done:
        mod = relax.transform.DeadCodeElimination()(mod)
    return mod, done
