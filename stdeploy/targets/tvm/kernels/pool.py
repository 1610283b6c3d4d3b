"""Max pooling for the CPU path: a hand-scheduled TIR kernel in place of Relax's ``max_pool2d``.

Relax lowers ``R.nn.max_pool2d`` to one untuned reduction loop nest (scalar, the running maximum
kept in memory). :func:`max_pool_kernel` computes, for an NCHW input without padding or dilation
and ``ceil_mode`` off, each output as the graph does (the running maximum from -FLT_MAX over the
window, rows then columns), held in registers, with the output row vectorised; the result is the
same float32 value (a maximum rounds nothing). :func:`route_max_pools` puts it in place of every
such ``max_pool2d`` in a Relax module (one ``call_tir`` per pooling; the others are left alone).
It serves dense and pruned models alike: the spikes of sdt-tiny's embedding are pooled here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import spike

__all__ = ["MaxPool", "max_pool_kernel", "pool_steps", "route_max_pools"]

PARTS = spike.PARTS     # parallel tasks per call (planes are split between them)


def max_pool_kernel(x_shape: tuple, pool: tuple, stride: tuple):
    """The TIR PrimFunc ``(x (N, C, H, W), low (1,), y (N, C, HO, WO))``: the maximum over each
    ``pool``-sized window at ``stride`` (no padding, no dilation, windows inside the input), the
    running maximum started at ``low[0]`` (-FLT_MAX, as Relax's lowering starts it). ``low`` is
    an input rather than a literal because Relax takes a ``call_tir`` of one input and one output
    for a possible reshape and requires such a function to be written in blocks."""
    from tvm.script import tirx as T

    n, c, h, w = (int(v) for v in x_shape)
    kh, kw = (int(v) for v in pool)
    sh, sw = (int(v) for v in stride)
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    planes = n * c
    parts = min(PARTS, planes)
    per = math.ceil(planes / parts)

    @T.prim_func
    def max_pool(xh: T.handle, low: T.Buffer((1,), "float32"), yh: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xn = T.match_buffer(xh, (n, c, h, w), "float32")
        yn = T.match_buffer(yh, (n, c, ho, wo), "float32")
        x = T.decl_buffer((planes, h, w), "float32", data=xn.data)
        y = T.decl_buffer((planes, ho, wo), "float32", data=yn.data)
        for part in T.parallel(parts):
            acc = T.alloc_buffer((wo,), "float32")
            for p in range(part * per, T.min(planes, part * per + per)):
                for r in range(ho):
                    for q in T.vectorized(wo):
                        acc[q] = low[0]
                    for i in T.unroll(kh):
                        for j in T.unroll(kw):
                            for q in T.vectorized(wo):
                                acc[q] = T.max(acc[q], x[p, r * sh + i, q * sw + j])
                    for q in T.vectorized(wo):
                        y[p, r, q] = acc[q]

    return max_pool


def pool_steps(steps: int, plane_shape: tuple, pool: tuple):
    """The max pooling of a LIF kernel's spikes inside that kernel (:mod:`.lif`, :mod:`.eventlif`),
    a TIR macro ``(spl, mx, out, first, stride)``: ``spl`` holds ``steps`` planes of
    ``plane_shape`` ``(H, W)``, one after another; the ``(HP, WP)`` maxima of step ``t`` go to the
    flat ``out`` from ``first + t * stride``, each the running maximum from -FLT_MAX over its
    ``pool`` ``(kh, kw, sh, sw)`` window, rows then columns, in ``mx`` (1,) (:func:`max_pool_kernel`'s
    order)."""
    from tvm.script import tirx as T

    h, w = (int(v) for v in plane_shape)
    kh, kw, sh, sw = (int(v) for v in pool)
    hp, wp = (h - kh) // sh + 1, (w - kw) // sw + 1
    plane, low = h * w, float(-np.finfo(np.float32).max)

    @T.macro
    def pool_planes(spl, mx, out, first, stride):
        for t in range(steps):
            for r in range(hp):
                for q in range(wp):
                    mx[0] = T.float32(low)
                    for i in T.unroll(kh):
                        for j in T.unroll(kw):
                            mx[0] = T.max(mx[0], spl[t * plane + (r * sh + i) * w + q * sw + j])
                    out[first + t * stride + r * wp + q] = mx[0]

    return pool_planes


@dataclass(frozen=True)
class MaxPool:
    """One ``max_pool2d`` routed to :func:`max_pool_kernel`."""

    x_shape: tuple
    pool: tuple
    stride: tuple
    name: str


def route_max_pools(mod):
    """``(new_mod, [MaxPool, ...])``: ``mod`` with every float32 ``R.nn.max_pool2d`` of a static
    NCHW input (no padding, dilation 1, ``ceil_mode`` off, NCHW out) replaced by a ``call_tir`` of
    :func:`max_pool_kernel`; kernels of equal shapes are shared."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from .routing import rewrite_functions

    op_pool = tvm.ir.Op.get("relax.nn.max_pool2d")
    done: list[MaxPool] = []
    kernels: dict = {}

    @mutator
    class _Rewrite(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != op_pool or getattr(call.ty, "dtype", None) != "float32":
                return call
            a, x = call.attrs, call.args[0]
            try:
                x_shape = tuple(int(v) for v in x.ty.shape)
            except (AttributeError, TypeError, ValueError):
                return call
            if (len(x_shape) != 4 or getattr(x.ty, "dtype", None) != "float32" or str(a.layout) != "NCHW"
                    or str(a.out_layout) != "NCHW" or bool(a.ceil_mode) or any(int(v) != 0 for v in a.padding)
                    or any(int(v) != 1 for v in a.dilation)):
                return call
            pool, stride = tuple(int(v) for v in a.pool_size), tuple(int(v) for v in a.strides)
            if pool[0] > x_shape[2] or pool[1] > x_shape[3]:
                return call
            key = (x_shape, pool, stride)
            if key not in kernels:
                name = f"stdeploy_max_pool_{len(kernels)}"
                kernels[key] = self.builder_.add_func(max_pool_kernel(x_shape, pool, stride).with_attr("global_symbol", name), name)
            done.append(MaxPool(x_shape, pool, stride, kernels[key].name_hint))
            low = relax.const(np.full((1,), np.finfo(np.float32).min, np.float32))
            return relax.call_tir(kernels[key], [x, low], call.ty)

    return rewrite_functions(mod, _Rewrite(mod)), done
