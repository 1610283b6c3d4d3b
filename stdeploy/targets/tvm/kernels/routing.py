"""The Relax rewrite that routes a graph's heavy operators to kernels outside TVM's codegen.

:func:`route_to_external_kernels` replaces, in the Relax graph,

* ``R.matmul(x, W)`` with a constant 2-D float32 ``W`` (a linear layer), and
* ``R.nn.conv2d(x, W)`` (NCHW / OIHW, constant float32 weight, ``groups = 1``, no dilation),

by ``R.call_dps_packed`` calls of the BLAS packed functions of :mod:`.blas`, or, given
``spike_target`` (the CPU target the gather kernels compile for), by the spike-adaptive kernels of
:mod:`.spike` for every matmul and every stride-1 convolution (accumulate-only while the input is
mostly zeros, BLAS otherwise; their density thresholds read from, or measured into, the
``crossovers`` cache: :class:`~stdeploy.targets.tvm.database.CrossoverCache`); where the constant
weight is pruned, or a stem convolution's (:func:`.skipzero.applies`), the packed function also holds
the kernel of :mod:`.skipzero` that skips zero weights as well, and picks among the three per call
(the ``Offloaded.kernel`` is then a :class:`.skipzero.AdaptiveSparse`). Everything else (LIF recurrences, pooling, reductions) stays TVM
code. Operators that do not fit (symbolic shapes, grouped or dilated convolutions, non-constant
weights) are left to TVM and not listed in the result.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import skipzero, spike
from .blas import MATMUL, blas_conv2d, blas_matmul, conv_packed_name, register_packed

__all__ = ["Offloaded", "rewrite_functions", "route_to_external_kernels", "bound_once", "static_shape", "use_counts", "var_key"]


@dataclass(frozen=True)
class Offloaded:
    """One operator sent to an external kernel."""

    op: str        # "matmul", "conv2d", "spike-matmul" or "spike-conv2d"
    shape: tuple   # weight shape
    out: tuple     # output shape
    kernel: object = None   # spike-*: its SpikeConv / SpikeMatmul / skipzero.AdaptiveSparse (call statistics in .stats)


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def route_to_external_kernels(mod, *, matmul: bool = True, conv2d: bool = True, spike_target: dict | None = None,
                              crossovers=None):
    """``(new_mod, [Offloaded, ...])``: ``mod`` with its constant-weight matmuls and plain NCHW
    convolutions turned into calls of the BLAS packed functions (registered on first use).
    With ``spike_target`` (the CPU target), stride-1 convolutions and matmuls become
    :func:`.spike.adaptive_conv` / ``adaptive_matmul`` calls instead: the
    accumulate-only kernel while the input is mostly zeros (spikes), BLAS otherwise (ops
    ``spike-conv2d``, ``spike-matmul``).
    ``crossovers`` (a :class:`~stdeploy.targets.tvm.database.CrossoverCache`, optional) supplies
    thresholds measured before and keeps the new ones (the caller saves it).
    Operators that do not fit (dynamic shapes, grouped or dilated convolutions, non-constant
    weights) are left to TVM and not listed."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    register_packed(MATMUL, blas_matmul)
    op_matmul, op_conv = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.nn.conv2d")
    const_type = type(relax.const(0.0))
    done: list[Offloaded] = []

    def static_out(call) -> tuple | None:
        shape = getattr(call.ty, "shape", None)
        try:
            return _ints(shape)
        except (TypeError, ValueError):  # symbolic dims: leave to TVM
            return None

    @mutator
    class _Rewrite(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            weight = call.args[1] if len(call.args) > 1 else None
            if not isinstance(weight, const_type) or getattr(call.ty, "dtype", None) != "float32":
                return call
            out = static_out(call)
            if out is None or weight.value.dtype != "float32":
                return call
            if matmul and call.op == op_matmul and len(weight.value.shape) == 2:
                x_shape = static_out(call.args[0])
                if spike_target is not None and x_shape is not None and len(x_shape) >= 2:
                    w = weight.value.numpy()
                    adaptive = skipzero.adaptive_matmul if skipzero.applies(w) else spike.adaptive_matmul
                    name, mm = adaptive(x_shape, w, spike_target, crossovers=crossovers)
                    done.append(Offloaded("spike-matmul", _ints(weight.value.shape), out, mm))
                    return relax.call_dps_packed(name, relax.Tuple(list(call.args)), out_ty=call.ty)
                done.append(Offloaded("matmul", _ints(weight.value.shape), out))
                return relax.call_dps_packed(MATMUL, relax.Tuple(list(call.args)), out_ty=call.ty)
            if conv2d and call.op == op_conv:
                a = call.attrs
                if (int(a.groups) != 1 or any(int(d) != 1 for d in a.dilation) or str(a.data_layout) != "NCHW"
                        or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW"):
                    return call
                stride, padding = _ints(a.strides), _ints(a.padding)
                x_shape = static_out(call.args[0])
                if spike_target is not None and x_shape is not None and spike.applicable(
                        x_shape, _ints(weight.value.shape), stride, padding):
                    w = weight.value.numpy()
                    adaptive = skipzero.adaptive_conv if skipzero.applies(w) else spike.adaptive_conv
                    name, conv = adaptive(x_shape, w, padding, spike_target, crossovers=crossovers)
                    done.append(Offloaded("spike-conv2d", _ints(weight.value.shape), out, conv))
                    return relax.call_dps_packed(name, relax.Tuple(list(call.args[:2])), out_ty=call.ty)
                name = register_packed(conv_packed_name(stride, padding), blas_conv2d(stride, padding))
                done.append(Offloaded("conv2d", _ints(weight.value.shape), out))
                return relax.call_dps_packed(name, relax.Tuple(list(call.args[:2])), out_ty=call.ty)
            return call

    return rewrite_functions(mod, _Rewrite(mod)), done


def rewrite_functions(mod, rewriter):
    """``mod`` with every Relax function passed through ``rewriter`` (a ``relax.PyExprMutator``
    built on ``mod``); the other functions (TIR) are kept as they are."""
    from tvm import relax

    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.get()


def static_shape(expr) -> tuple | None:
    """A float32 Relax expression's static shape, or None (another dtype, a symbolic or unknown shape)."""
    sinfo = getattr(expr, "ty", None)
    shape = getattr(sinfo, "shape", None)
    if shape is None or getattr(sinfo, "dtype", None) != "float32":
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None


def var_key(var) -> int:
    """A dict key for a Relax var: its object's handle (``==`` on vars builds an expression)."""
    return var.__chandle__()


def use_counts(mod) -> dict:
    """How often each Relax var is read in ``mod``'s Relax functions (``shape_of`` reads not
    counted: they only feed the step indices)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprVisitor, visitor

    shape_of = tvm.ir.Op.get("relax.shape_of")
    counts: dict = {}

    @visitor
    class _Uses(PyExprVisitor):
        def visit_call_(self, call):
            if call.op == shape_of:
                return
            super().visit_call_(call)

        def visit_var_(self, var):
            counts[var_key(var)] = counts.get(var_key(var), 0) + 1

        def visit_dataflow_var_(self, var):
            counts[var_key(var)] = counts.get(var_key(var), 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            _Uses().visit_expr(func)
    return counts


def bound_once(lookup, uses: dict, var, op):
    """The call of ``op`` that ``var`` is bound to (``lookup``: a mutator's ``lookup_binding``),
    where ``var`` is read exactly once (``uses``: :func:`use_counts`), else None."""
    from tvm import relax

    if not isinstance(var, relax.Var) or uses.get(var_key(var), 0) != 1:
        return None
    value = lookup(var)
    return value if isinstance(value, relax.Call) and value.op == op else None
