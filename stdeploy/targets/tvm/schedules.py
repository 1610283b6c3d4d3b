"""Schedules for the standalone CPU module: the graph's heavy operators as TIR kernels compiled
into the module (no Python callback), so ``export_library`` writes a library TVM's runtime runs alone.

:func:`route_to_tir_kernels` replaces, in the Relax graph, every ``R.matmul(x, W)`` with a constant
2-D float32 ``W`` and every stride-1 NCHW ``R.nn.conv2d`` (constant OIHW float32 weight,
``groups = 1``, no dilation, padding below the kernel size) by an ``R.call_tir`` of the
spike-adaptive TIR kernels of :mod:`.kernels.spike` (the weight baked in as a constant in the
kernel's layout). Everything else (the LIF recurrences, batch norm, pooling, reductions) is left
to Relax's default lowering. :func:`standalone_module` then runs Relax's zero pipeline (legalize,
fuse) on the result: the module ``tvm.compile`` builds for the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernels import spike

__all__ = ["Routed", "route_to_tir_kernels", "standalone_module"]


@dataclass(frozen=True)
class Routed:
    """One operator compiled as a TIR kernel of ours: ``op`` (``matmul`` or ``conv2d``), the weight
    and output shapes."""

    op: str
    weight: tuple
    out: tuple


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def route_to_tir_kernels(mod):
    """``(new_mod, [Routed, ...])``: ``mod`` with its constant-weight matmuls and stride-1
    convolutions turned into ``call_tir`` calls of the spike-adaptive TIR kernels. Operators that
    do not fit (symbolic shapes, strides, groups, dilation, non-constant weights) stay as they are
    and are not listed."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    op_matmul, op_conv = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.nn.conv2d")
    const_type = type(relax.const(0.0))
    done: list[Routed] = []

    def static_shape(expr) -> tuple | None:
        try:
            return _ints(expr.ty.shape)
        except (AttributeError, TypeError, ValueError):  # symbolic or unknown dims: leave to TVM
            return None

    @mutator
    class _Rewrite(PyExprMutator):
        def _add(self, func, name):
            return self.builder_.add_func(func.with_attr("global_symbol", name), name)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            weight = call.args[1] if len(call.args) > 1 else None
            if (not isinstance(weight, const_type) or getattr(call.ty, "dtype", None) != "float32"
                    or weight.value.dtype != "float32"):
                return call
            out, x_shape = static_shape(call), static_shape(call.args[0])
            if out is None or x_shape is None:
                return call
            w = weight.value.numpy()
            if call.op == op_matmul and w.ndim == 2 and len(x_shape) >= 2:
                gvar = self._add(spike.gather_matmul_kernel(x_shape, *w.shape), f"spike_matmul_{len(done)}")
                done.append(Routed("matmul", w.shape, out))
                return relax.call_tir(gvar, [call.args[0], relax.const(np.ascontiguousarray(w))], call.ty)
            if call.op == op_conv:
                a = call.attrs
                if (int(a.groups) != 1 or any(int(d) != 1 for d in a.dilation) or str(a.data_layout) != "NCHW"
                        or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW"
                        or not spike.applicable(x_shape, w.shape, _ints(a.strides), _ints(a.padding))):
                    return call
                gvar = self._add(spike.gather_conv_kernel(x_shape, w.shape, _ints(a.padding)), f"spike_conv2d_{len(done)}")
                done.append(Routed("conv2d", w.shape, out))
                wt = np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # (KH, KW, C, O): the kernel's layout
                return relax.call_tir(gvar, [call.args[0], relax.const(wt)], call.ty)
            return call

    rewriter = _Rewrite(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.get(), done


def standalone_module(mod, target: dict):
    """``(module, [Routed, ...])``: ``mod`` routed to the TIR kernels and lowered by Relax's zero
    pipeline for ``target``, ready for ``tvm.compile``."""
    import tvm
    from tvm import relax

    mod, done = route_to_tir_kernels(mod)
    with tvm.target.Target(target):
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
                                        relax.get_pipeline("zero")])(mod)
    return mod, done
