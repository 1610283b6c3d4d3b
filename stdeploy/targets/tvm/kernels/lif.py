"""Fused LIF recurrences for the CPU: all T steps of one LIF population in one TIR loop.

The unrolled ONNX graph writes each LIF population as T copies of the neuron's step
(:func:`stdeploy.neurons.lif_step`, see :mod:`stdeploy.export.onnx_export`), which TVM's ONNX
frontend imports as, for ``t = 0 .. T-1`` (``X`` of shape ``(T, *S)``, every other value ``S``)::

    x_t = take(X, t, axis=0)
    v_t = add(multiply(a, u_t), multiply(b, x_t))          # u_0 = broadcast_to(v0, S)
    s_t = astype(greater_equal(subtract(v_t, theta), 0.0), float32)
    u_{t+1} = multiply(v_t, subtract(1.0, s_t))
    spikes = concat([expand_dims(s_t, 0) for t], axis=0)    # (T, *S)

with ``a`` (``1 - d``), ``b`` (``d``), ``theta`` and ``v0`` constants (either operand order of each
``multiply`` and of the ``add``). Relax's default lowering turns that into one loop nest per
operator, each writing its intermediate to memory, untuned (scalar code): most of a small
model's time outside its matrix products and convolutions.

:func:`fuse_lif_recurrences` recognises that pattern in a Relax module (by its structure, the
constants' values and the step indices; anything else is left alone) and replaces the
``concat`` by one ``call_tir`` of :func:`lif_kernel`: for each vector of neurons the membrane
stays in registers over the T steps and the spikes are written as 0.0 / 1.0. Where ``X`` is
``add(Y, c)`` or ``reshape(add(Y, c))`` with a constant ``c`` (a BatchNorm/bias add over the
output of a convolution or linear layer, e.g. ``(T*B, C, H, W)``), the same in every step, and
nothing but this recurrence reads it, the add is done in the kernel too and ``Y`` is read instead. The replaced operators become dead code
(``DeadCodeElimination`` removes them).

Exactness: the kernel performs the graph's float32 operations in the graph's order, each rounded
once (``a * u``, ``b * x``, their sum, ``v - theta``, the ``>= 0`` compare, ``1 - s``, ``v * (1 - s)``;
the fused add ``y + c`` before them). TVM's LLVM backend contracts a product followed by an add
into one FMA (one rounding instead of two) wherever it sees one; so each product passes through
an integer ``and`` with an all-ones word read from memory, which it cannot see through, and
:func:`fuse_lif_recurrences` refuses a kernel whose compiled code holds an FMA
(:func:`contracts_to_fma`). Spikes and membranes are then bit-identical to the unfused
module's and to onnxruntime's elementwise arithmetic.
With the :mod:`.event` kernels' layers given (``producers``) a weight layer feeding a population
through the bias add is computed in the same kernel (:mod:`.eventlif`), and with the max pools
given (``pools``) a max pool fed by a population alone is done in its kernel
(:func:`lif_pool_kernel`); both bit-identical to the separate kernels.
Constants are stored once per period: the smallest trailing block of ``S`` (of at least
:data:`LANES` values where one repeats) that every constant repeats over: a per-channel constant
of an image population ``(B, C, H, W)`` is ``C x H x W`` values, of tokens ``(B, N, D)`` ``D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ....errors import ShapeError
from ...base import TargetError
from .pool import pool_steps
from .routing import static_shape, use_counts, var_key
from .skipzero import STEM_CHANNELS
from .spike import LANES   # neurons per vector step

__all__ = ["FusedLIF", "LANES", "PARTS", "compact_hidden", "constant_period", "contracts_to_fma", "fuse_lif_recurrences", "require_exact", "lif_kernel",
           "reference_lif"]

PARTS = 8    # parallel tasks per call
_EXACT: set = set()   # (kernel key, target) pairs checked free of FMA contraction in this process


@dataclass(frozen=True)
class FusedLIF:
    """One LIF population replaced by the fused kernel."""

    steps: int              # T
    shape: tuple            # one step's shape S
    period: int             # constant values stored per population (the period over the flattened S)
    bias: bool              # a constant add before the recurrence was fused in
    name: str               # the kernel's name in the module
    producer: str = ""      # the weight layer's kernel fused in (kernels.eventlif), "" where none
    consumer: str = ""      # the event matmul its spikes feed, fused in too (kernels.eventlif.event_mlp_kernel)
    pool: tuple = ()        # (kh, kw, sh, sw) of the max pool its spikes feed, fused in (lif_pool_kernel / eventlif)
    units: int = 0          # with a consumer: the neurons per row the kernel computes (those the consumer reads,
                            # rounded up to the vector width; :func:`compact_hidden`), 0 where all of them


def reference_lif(x: np.ndarray, a: np.ndarray, b: np.ndarray, theta: np.ndarray, v0: np.ndarray) -> np.ndarray:
    """The recurrence in numpy float32, operation for operation as the graph writes it:
    ``x`` ``(T, *S)``, constants broadcastable to ``S``; the ``(T, *S)`` spikes."""
    x = np.asarray(x, np.float32)
    f = np.float32
    v = np.broadcast_to(np.asarray(v0, f), x.shape[1:]).astype(f)
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        v = (np.asarray(a, f) * v).astype(f) + (np.asarray(b, f) * x[t]).astype(f)
        s = ((v - np.asarray(theta, f)) >= f(0)).astype(f)
        out[t] = s
        v = v * (f(1) - s)
    return out


def constant_period(shape: tuple, constants: list[np.ndarray]) -> int:
    """The length ``M`` of the smallest trailing block of ``shape`` (a product of its last
    dimensions) such that every constant, broadcast to ``shape`` and flattened, is its first ``M``
    values repeated (compared bit for bit). At least :data:`LANES` where a larger block also
    repeats, so the kernel's vectors stay whole; ``prod(shape)`` in the worst case."""
    n = math.prod(shape)
    full = [np.ascontiguousarray(np.broadcast_to(np.asarray(c, np.float32), shape)).reshape(-1).view(np.uint32)
            for c in constants]
    best = n
    for i in range(len(shape) + 1):
        m = math.prod(shape[i:])
        if all(np.array_equal(f.reshape(-1, m), np.broadcast_to(f[:m], (n // m, m))) for f in full):
            if m >= LANES or best == n:
                best = m
    return best


def _lanes(n: int, period: int) -> int:
    """The vector width: the largest power of two up to :data:`LANES` dividing both."""
    return math.gcd(math.gcd(n, period), LANES)


def lif_kernel(steps: int, shape: tuple, period: int, bias: bool, x_shape: tuple | None = None):
    """The TIR PrimFunc ``(x, [c (M,)], a (M,), b (M,), theta (M,), v0 (M,), keep (L,), out (T, *S))``,
    ``M = period``, ``L`` the vector width: the spikes of the recurrence (module docstring), with
    ``x + c`` as the input where ``bias``. ``x`` is ``(T, *S)`` or ``x_shape`` (the same values in
    another shape, e.g. ``(T*B, C, H, W)``); ``keep`` holds all-ones words: each product passes
    through an ``and`` with it, which the compiler cannot see through, so it cannot contract a
    product and the following add into one FMA (a different rounding)."""
    from tvm.script import tirx as T

    n = math.prod(shape)
    m = int(period)
    lanes = _lanes(n, m)
    vectors = n // lanes
    parts = min(PARTS, vectors)
    per = math.ceil(vectors / parts)
    full = (steps, *(int(d) for d in shape))
    xs = full if x_shape is None else tuple(int(d) for d in x_shape)
    if math.prod(xs) != steps * n:
        raise ShapeError(f"x_shape {xs} does not hold {steps} steps of {tuple(shape)}")

    if bias:
        @T.prim_func
        def lif_bias(xh: T.handle, c: T.Buffer((m,), "float32"), a: T.Buffer((m,), "float32"), b: T.Buffer((m,), "float32"),
                     th: T.Buffer((m,), "float32"), v0: T.Buffer((m,), "float32"), keep: T.Buffer((lanes,), "int32"),
                     oh: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            xn = T.match_buffer(xh, xs, "float32")
            on = T.match_buffer(oh, full, "float32")
            x = T.decl_buffer((steps * n,), "float32", data=xn.data)
            out = T.decl_buffer((steps * n,), "float32", data=on.data)
            for part in T.parallel(parts):
                v = T.alloc_buffer((lanes,), "float32")
                s = T.alloc_buffer((lanes,), "float32")
                for g in range(part * per, T.min(vectors, part * per + per)):
                    base = (g * lanes) % m   # the constants' offset of this vector (once, not per step)
                    for l in T.vectorized(lanes):
                        v[l] = v0[base + l]
                    for t in T.unroll(steps):
                        for l in T.vectorized(lanes):
                            v[l] = T.reinterpret("float32", T.reinterpret("int32", a[base + l] * v[l]) & keep[l]) + \
                                T.reinterpret("float32", T.reinterpret("int32", b[base + l] * (
                                    x[t * n + g * lanes + l] + c[base + l])) & keep[l])
                            s[l] = T.Cast("float32", v[l] - th[base + l] >= T.float32(0))
                            out[t * n + g * lanes + l] = s[l]
                            v[l] = v[l] * (T.float32(1) - s[l])

        return lif_bias

    @T.prim_func
    def lif(xh: T.handle, a: T.Buffer((m,), "float32"), b: T.Buffer((m,), "float32"),
            th: T.Buffer((m,), "float32"), v0: T.Buffer((m,), "float32"), keep: T.Buffer((lanes,), "int32"),
            oh: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xn = T.match_buffer(xh, xs, "float32")
        on = T.match_buffer(oh, full, "float32")
        x = T.decl_buffer((steps * n,), "float32", data=xn.data)
        out = T.decl_buffer((steps * n,), "float32", data=on.data)
        for part in T.parallel(parts):
            v = T.alloc_buffer((lanes,), "float32")
            s = T.alloc_buffer((lanes,), "float32")
            for g in range(part * per, T.min(vectors, part * per + per)):
                base = (g * lanes) % m   # the constants' offset of this vector (once, not per step)
                for l in T.vectorized(lanes):
                    v[l] = v0[base + l]
                for t in T.unroll(steps):
                    for l in T.vectorized(lanes):
                        v[l] = T.reinterpret("float32", T.reinterpret("int32", a[base + l] * v[l]) & keep[l]) + \
                            T.reinterpret("float32", T.reinterpret("int32", b[base + l] * x[t * n + g * lanes + l]) & keep[l])
                        s[l] = T.Cast("float32", v[l] - th[base + l] >= T.float32(0))
                        out[t * n + g * lanes + l] = s[l]
                        v[l] = v[l] * (T.float32(1) - s[l])

    return lif


def lif_pool_kernel(steps: int, shape: tuple, period: int, x_shape: tuple, pool: tuple, out_shape: tuple):
    """:func:`lif_kernel` with ``bias``, its spikes max-pooled in the kernel: ``shape`` is an image
    population ``(B, C, H, W)``, ``pool`` ``(kh, kw, sh, sw)`` (no padding, windows inside the
    plane), ``out`` the pooled ``(T*B, C, HP, WP)`` (``out_shape``, the same values in any shape).
    Per plane the recurrence runs as in :func:`lif_kernel` (the same arithmetic; the vector width
    must divide ``H * W``) into a local buffer, which is then pooled as
    :func:`.pool.max_pool_kernel` does (the running maximum from -FLT_MAX); the spikes are never
    written."""
    from tvm.script import tirx as T

    bsz, c, h, w = (int(d) for d in shape)
    n = bsz * c * h * w
    m = int(period)
    plane = h * w
    lanes = _lanes(n, m)
    kh, kw, sh, sw = (int(v) for v in pool)
    hp, wp = (h - kh) // sh + 1, (w - kw) // sw + 1
    xs = tuple(int(d) for d in x_shape)
    full = tuple(int(d) for d in out_shape)
    if plane % lanes or math.prod(xs) != steps * n or math.prod(full) != steps * bsz * c * hp * wp or min(hp, wp) < 1:
        raise ShapeError(f"LIF + pool: {xs} / {full} do not hold {steps} steps of {tuple(shape)} pooled by {pool}")
    planes, groups, pooled = bsz * c, plane // lanes, hp * wp
    parts = min(PARTS, planes)
    per = math.ceil(planes / parts)
    pool_planes = pool_steps(steps, (h, w), pool)

    @T.prim_func
    def lif_pool(xh: T.handle, cb: T.Buffer((m,), "float32"), a: T.Buffer((m,), "float32"), b: T.Buffer((m,), "float32"),
                 th: T.Buffer((m,), "float32"), v0: T.Buffer((m,), "float32"), keep: T.Buffer((lanes,), "int32"), oh: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xn = T.match_buffer(xh, xs, "float32")
        on = T.match_buffer(oh, full, "float32")
        x = T.decl_buffer((steps * n,), "float32", data=xn.data)
        out = T.decl_buffer((steps * planes * pooled,), "float32", data=on.data)
        for part in T.parallel(parts):
            v = T.alloc_buffer((lanes,), "float32")
            s = T.alloc_buffer((lanes,), "float32")
            spl = T.alloc_buffer((steps * plane,), "float32")
            mx = T.alloc_buffer((1,), "float32")
            for p in range(part * per, T.min(planes, part * per + per)):
                for g in range(groups):
                    base = (p * plane + g * lanes) % m   # the constants' offset of this vector (once, not per step)
                    for l in T.vectorized(lanes):
                        v[l] = v0[base + l]
                    for t in T.unroll(steps):
                        for l in T.vectorized(lanes):
                            v[l] = T.reinterpret("float32", T.reinterpret("int32", a[base + l] * v[l]) & keep[l]) + \
                                T.reinterpret("float32", T.reinterpret("int32", b[base + l] * (
                                    x[t * n + p * plane + g * lanes + l] + cb[base + l])) & keep[l])
                            s[l] = T.Cast("float32", v[l] - th[base + l] >= T.float32(0))
                            spl[t * plane + g * lanes + l] = s[l]
                            v[l] = v[l] * (T.float32(1) - s[l])
                pool_planes(spl, mx, out, p * pooled, planes * pooled)

    return lif_pool


def contracts_to_fma(func, target) -> bool:
    """True when ``func`` compiled for ``target`` holds a fused multiply-add instruction (x86
    ``vfmadd`` / ``vfmsub`` / ``vfnmadd``): the check that the kernel's arithmetic stayed
    operation for operation."""
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(target))
    asm = lib.mod.inspect_source("s")
    return any(op in asm for op in ("vfmadd", "vfmsub", "vfnmadd", "vfnmsub"))


def require_exact(func, key: tuple, target, what: str) -> None:
    """Raise :class:`~stdeploy.targets.base.TargetError` where ``func`` compiled for ``target``
    holds a fused multiply-add (:func:`contracts_to_fma`: it would not keep the graph's arithmetic);
    checked once per ``key`` (the kernel's build parameters) and target in this process."""
    checked = (key, repr(target))
    if checked in _EXACT:
        return
    if contracts_to_fma(func, target):
        raise TargetError(f"{what} compiles to fused multiply-adds on {target}: it would not match the graph's arithmetic")
    _EXACT.add(checked)


class _Matcher:
    """The pattern of the module docstring, read backwards from a ``concat`` through the bindings
    of a Relax mutator (``lookup``: var -> bound value or None)."""

    def __init__(self, lookup, uses: dict):
        import tvm
        from tvm import relax

        self.relax, self.lookup, self.uses = relax, lookup, uses
        self.const_type = type(relax.const(0.0))
        self.op = {k: tvm.ir.Op.get(f"relax.{k}") for k in ("concat", "expand_dims", "astype", "greater_equal", "subtract",
                                                             "add", "multiply", "take", "broadcast_to", "reshape",
                                                             "where", "less")}

    def value(self, expr):
        """The call or constant behind ``expr`` (following var bindings)."""
        seen = 0
        while isinstance(expr, self.relax.Var) and seen < 64:
            bound = self.lookup(expr)
            if bound is None:
                return expr
            expr, seen = bound, seen + 1
        return expr

    def call(self, expr, op: str):
        expr = self.value(expr)
        return expr if isinstance(expr, self.relax.Call) and expr.op == self.op[op] else None

    def const(self, expr) -> np.ndarray | None:
        expr = self.value(expr)
        if isinstance(expr, self.const_type) and str(expr.value.dtype) == "float32":
            return expr.value.numpy()
        reshape = self.call(expr, "reshape")
        shape = static_shape(expr)
        if reshape is not None and shape is not None:  # a reshaped constant (the frontend's bias layout)
            inner = self.const(reshape.args[0])
            return None if inner is None or inner.size != math.prod(shape) else inner.reshape(shape)
        return None

    def scalar(self, expr, want: float) -> bool:
        c = self.const(expr)
        return c is not None and c.size == 1 and np.asarray(c, np.float32).reshape(()).view(np.uint32) == np.float32(want).view(np.uint32)

    def index(self, expr) -> int | None:
        """The integer a step index evaluates to: a constant, or ``where(less(c, 0), ..., c)``."""
        expr = self.value(expr)
        if isinstance(expr, self.const_type):
            d = expr.value.numpy()
            return int(d) if d.size == 1 and d.dtype.kind in "iu" else None
        if isinstance(expr, self.relax.Call) and expr.op == self.op["where"]:
            cond = self.value(expr.args[0])
            if isinstance(cond, self.relax.Call) and cond.op == self.op["less"]:
                lo, hi = self.index(cond.args[0]), self.index(cond.args[1])
                if lo is not None and hi is not None:
                    return self.index(expr.args[2] if lo >= hi else expr.args[1])
        return None

    def products(self, expr):
        """``add(multiply(p, q), multiply(r, s))``: the two products' operand pairs."""
        add = self.call(expr, "add")
        if add is None:
            return None
        pair = [self.call(arg, "multiply") for arg in add.args]
        if any(p is None for p in pair):
            return None
        return [tuple(p.args) for p in pair]

    def step(self, expr):
        """``s_t`` -> ``(v_t var, theta)``."""
        cast = self.call(expr, "astype")
        if cast is None or str(cast.attrs.dtype) != "float32":
            return None
        ge = self.call(cast.args[0], "greater_equal")
        if ge is None or not self.scalar(ge.args[1], 0.0):
            return None
        sub = self.call(ge.args[0], "subtract")
        if sub is None:
            return None
        theta = self.const(sub.args[1])
        return None if theta is None else (sub.args[0], theta)

    def update(self, v, first: bool, prev):
        """Split ``v_t = a * u_t + b * x_t`` into ``(a, b, u_t, x_t)``: ``x_t`` the take, ``u_t`` the
        reset membrane of step ``t - 1`` (``prev = (v_{t-1}, s_{t-1})``) or, first, a constant."""
        pairs = self.products(v)
        if pairs is None:
            return None
        for (p, q), (r, s) in ((pairs[0], pairs[1]), (pairs[1], pairs[0])):
            for a_expr, u in ((p, q), (q, p)):
                for b_expr, x in ((r, s), (s, r)):
                    a, b = self.const(a_expr), self.const(b_expr)
                    take = self.call(x, "take")
                    if a is None or b is None or take is None or int(take.attrs.axis) != 0:
                        continue
                    if first:
                        u0 = self.const(u)
                        bc = self.call(u, "broadcast_to")
                        if u0 is None and bc is not None:
                            u0 = self.const(bc.args[0])
                        if u0 is not None:
                            return a, b, u0, take
                    else:
                        mul = self.call(u, "multiply")
                        if mul is None:
                            continue
                        for keep, reset in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
                            one_minus = self.call(reset, "subtract")
                            if (keep.same_as(prev[0]) and one_minus is not None and self.scalar(one_minus.args[0], 1.0)
                                    and one_minus.args[1].same_as(prev[1])):
                                return a, b, None, take
        return None

    def match(self, concat):
        """``(X, constants (a, b, theta, v0), steps, S)`` for a LIF spikes ``concat``, or None."""
        if int(concat.attrs.axis) != 0:
            return None
        fields = self.value(concat.args[0])
        if not isinstance(fields, self.relax.Tuple) or len(fields.fields) < 1:
            return None
        out = static_shape(concat)
        if out is None or out[0] != len(fields.fields):
            return None
        steps, shape = out[0], out[1:]
        consts, source, prev = None, None, None
        for t, field in enumerate(fields.fields):
            ed = self.call(field, "expand_dims")
            if ed is None or [int(a) for a in ed.attrs.axis] != [0]:
                return None
            s_var = ed.args[0]
            found = self.step(s_var)
            if found is None:
                return None
            v_var, theta = found
            if static_shape(v_var) != shape:
                return None
            upd = self.update(v_var, t == 0, prev)
            if upd is None:
                return None
            a, b, u0, take = upd
            if self.index(take.args[1]) != t or (source is not None and not take.args[0].same_as(source)):
                return None
            source = take.args[0]
            step_consts = (a, b, theta)
            if consts is None:
                consts = (*step_consts, u0)
            elif not all(_same_bits(c, d) for c, d in zip(consts[:3], step_consts)):
                return None
            prev = (v_var, s_var)
        if static_shape(source) != out:
            return None
        try:
            for c in consts:
                np.broadcast_to(c, shape)
        except ValueError:
            return None
        return source, consts, steps, shape

    def bias(self, source, steps: int, shape: tuple):
        """``(Y, c)`` where ``source`` is ``add(Y, c)`` or ``reshape(add(Y, c))`` with a constant ``c``
        the same in every step, used only by this recurrence's steps; else None."""
        if self.uses.get(var_key(source), 0) != steps:
            return None
        node = source
        reshape = self.call(source, "reshape")
        if reshape is not None:
            node = reshape.args[0]
            if not isinstance(node, self.relax.Var) or self.uses.get(var_key(node), 0) != 1:
                return None
        add = self.call(node, "add")
        if add is None:
            return None
        for y, c_expr in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
            c, y_shape = self.const(c_expr), static_shape(y)
            if c is None or y_shape is None or static_shape(add) != y_shape or math.prod(y_shape) != steps * math.prod(shape):
                continue
            try:
                full = np.broadcast_to(c.astype(np.float32), y_shape).reshape(steps, *shape)
            except ValueError:
                continue
            if all(_same_bits(full[0], full[t]) for t in range(1, steps)):
                return y, np.ascontiguousarray(full[0])
        return None


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        return False
    return np.array_equal(np.broadcast_to(a, shape).view(np.uint32), np.broadcast_to(b, shape).view(np.uint32))


def _image_stem(layer) -> bool:
    """True for a convolution with at most :data:`.skipzero.STEM_CHANNELS` input channels: an image
    stem, whose input a direct encoding repeats at every step (its fused kernel checks for that:
    ``repeats`` of :func:`.eventlif.stationary_conv_lif_kernel`)."""
    return layer.op == "conv2d" and int(layer.weight[1]) <= STEM_CHANNELS


def fuse_lif_recurrences(mod, target, producers=(), pools=()) -> tuple[object, list[FusedLIF]]:
    """``(new_mod, [FusedLIF, ...])``: ``mod`` with every LIF recurrence of the module docstring's
    form computed by :func:`lif_kernel` (``call_tir``), the operators it replaces removed.
    ``target``: the CPU target the kernels are checked for contraction on; a kernel that would
    compile to fused multiply-adds raises :class:`~stdeploy.targets.base.TargetError` (it would
    not be exact).

    ``producers``: the :class:`~.event.EventLayer` list of :func:`~.event.route_event_kernels`.
    Where a recurrence's input is ``Y + c`` (the fused bias add) and ``Y`` is the output of one of
    those kernels, read by nothing else, the layer and the recurrence become one kernel of
    :mod:`.eventlif` (``FusedLIF.producer`` names the layer's kernel; its ``call_tir`` becomes dead
    code). The LIF arithmetic is the same code as :func:`lif_kernel`'s (checked free of FMA
    contraction there); the layer's accumulation is the :mod:`.event` kernel's. Where such a
    fused linear's spikes are read only by another of those kernels' matmuls (an MLP's
    ``fc1 -> LIF -> fc2``), that matmul is fused in as well (:func:`.eventlif.event_mlp_kernel`,
    ``FusedLIF.consumer``): the spikes never leave the kernel either.

    ``pools``: the :class:`~.pool.MaxPool` list of :func:`~.pool.route_max_pools`. Where a
    fused image population (with its bias add) feeds one of those max pools alone (directly or
    through a reshape), the pooling is done in the kernel (:func:`lif_pool_kernel`, or the
    convolution's :func:`.eventlif.stationary_conv_lif_kernel` with ``pool``; ``FusedLIF.pool``)
    and only the pooled spikes are written."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from .routing import rewrite_functions

    from . import eventlif

    uses = use_counts(mod)
    concat = tvm.ir.Op.get("relax.concat")
    call_tir = tvm.ir.Op.get("relax.call_tir")
    layers = {e.name: e for e in producers}
    done: list[FusedLIF] = []
    kernels: dict[tuple, object] = {}        # LIF kernels by (steps, shape, period, fused bias, bias shape)
    event_kernels: dict[tuple, object] = {}  # weight layer + LIF kernels by the layer's and the population's facts
    chainable: dict = {}   # fused matmul + LIF kernel name -> (layer, steps, period, lanes); weight -> layer name
    poolable: dict = {}    # fused image-population kernel name -> how to build it with a max pool

    def producer_of(m, y, steps: int, period: int, lanes: int):
        """``(EventLayer, its call's arguments)`` where ``y`` is read only here and is the output
        of a ``call_tir`` of a kernel in ``layers`` that :func:`.eventlif.fusable` accepts."""
        if not layers or uses.get(var_key(y), 0) != 1:
            return None
        pcall = m.value(y)
        if not isinstance(pcall, relax.Call) or pcall.op != call_tir or not isinstance(pcall.args[0], relax.GlobalVar):
            return None
        layer = layers.get(pcall.args[0].name_hint)
        if layer is None or not eventlif.fusable(layer, steps, period, lanes):
            return None
        return layer, list(pcall.args[1].fields)

    @mutator
    class _Fuse(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != concat:
                return call
            m = _Matcher(self.lookup_binding, uses)
            call = self.builder_.normalize(call)
            found = m.match(call)
            if found is None:
                return call
            source, (a, b, theta, v0), steps, shape = found
            fused = m.bias(source, steps, shape)
            consts = [a, b, theta, v0] if fused is None else [fused[1], a, b, theta, v0]
            period = constant_period(shape, consts)
            n = math.prod(shape)
            lanes = _lanes(n, period)
            lif_args = [relax.const(np.ascontiguousarray(np.broadcast_to(np.asarray(c, np.float32), shape)).reshape(-1)[:period].copy())
                        for c in consts] + [relax.const(np.full((lanes,), -1, np.int32))]
            made = None if fused is None else producer_of(m, fused[0], steps, period, lanes)
            if made is not None:
                layer, pargs = made
                out_shape = tuple(int(d) for d in static_shape(call))
                pkey = (layer.op, layer.x_shape, layer.weight, layer.padding, layer.nnz, layer.channels, steps, period, lanes,
                        out_shape)
                if pkey not in event_kernels:
                    if layer.op == "matmul":
                        func = eventlif.event_matmul_lif_kernel(layer.x_shape, *layer.weight, steps, period, lanes, out_shape)
                    else:
                        func = eventlif.stationary_conv_lif_kernel(layer.x_shape, layer.weight, layer.padding, layer.nnz,
                                                                   layer.channels, steps, period, lanes, out_shape,
                                                                   repeats=_image_stem(layer))
                    name = f"stdeploy_event_lif_{len(event_kernels)}"
                    event_kernels[pkey] = self.builder_.add_func(func.with_attr("global_symbol", name), name)
                kernel = event_kernels[pkey]
                done.append(FusedLIF(steps, shape, period, True, kernel.name_hint, layer.name))
                if layer.op == "conv2d":
                    poolable[kernel.name_hint] = ("conv", layer, steps, period, lanes)
                if layer.op == "matmul":
                    chainable[kernel.name_hint] = (layer, steps, period, lanes)
                    chainable[var_key(pargs[1])] = layer.name      # the weight constant -> the layer it belongs to
                return relax.call_tir(kernel, [*pargs, *lif_args], out_ty=call.ty)
            key = (steps, shape, period, fused is not None, None if fused is None else static_shape(fused[0]))
            if key not in kernels:
                func = lif_kernel(*key)
                require_exact(func, ("lif", *key), target, f"the fused LIF kernel for {shape}")
                name = f"stdeploy_lif_{len(kernels)}"
                kernels[key] = self.builder_.add_func(func.with_attr("global_symbol", name), name)
            if fused is not None and len(shape) == 4 and (shape[2] * shape[3]) % lanes == 0:
                poolable[kernels[key].name_hint] = ("lif", steps, shape, period, static_shape(fused[0]))
            done.append(FusedLIF(steps, shape, period, fused is not None, kernels[key].name_hint))
            return relax.call_tir(kernels[key], [source if fused is None else fused[0], *lif_args], out_ty=call.ty)

    mod = rewrite_functions(mod, _Fuse(mod))
    if chainable:
        mod = _chain_consumers(mod, layers, chainable, done)
    if poolable and pools:
        mod = _pool_in(mod, {p.name: p for p in pools}, poolable, done)
    if done:
        mod = relax.transform.DeadCodeElimination()(mod)
    return mod, done


def _chain_consumers(mod, layers: dict, chainable: dict, done: list):
    """``mod`` with every event matmul (``layers``) whose input is read by it alone and is the
    spikes of a fused matmul + LIF kernel (``chainable``) replaced by one
    :func:`.eventlif.event_mlp_kernel`; ``done``'s entries updated in place (name, consumer)."""
    import dataclasses

    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from . import eventlif
    from .routing import rewrite_functions

    uses = use_counts(mod)
    call_tir = tvm.ir.Op.get("relax.call_tir")
    made: dict[tuple, object] = {}

    @mutator
    class _Chain(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != call_tir or not isinstance(call.args[0], relax.GlobalVar):
                return call
            second = layers.get(call.args[0].name_hint)
            args2 = list(call.args[1].fields)
            spikes = args2[0] if args2 else None
            if second is None or second.op != "matmul" or not isinstance(spikes, relax.Var) or uses.get(var_key(spikes), 0) != 1:
                return call
            first = self.lookup_binding(spikes)
            if (not isinstance(first, relax.Call) or first.op != call_tir or not isinstance(first.args[0], relax.GlobalVar)
                    or first.args[0].name_hint not in chainable):
                return call
            layer, steps, period, lanes = chainable[first.args[0].name_hint]
            n, n2 = int(layer.weight[1]), int(second.weight[1])
            y_shape = static_shape(call)
            if int(second.weight[0]) != n or y_shape is None or math.prod(second.x_shape) != math.prod(layer.x_shape[:-1]) * n:
                return call
            args = [*first.args[1].fields, *args2[1:]]
            values = [a.value.numpy() if isinstance(a, tvm.ir.Constant) else None for a in args[1:]]
            compact = None if any(v is None for v in values) else compact_hidden(*values, n, period, lanes)
            if compact is not None:
                args = [args[0], *(relax.const(v) for v in compact)]
                n = period = int(compact[0].shape[1])
            key = (layer.x_shape, layer.weight[0], n, steps, period, lanes, n2, y_shape)
            if key not in made:
                name = f"stdeploy_event_mlp_{len(made)}"
                func = eventlif.event_mlp_kernel(layer.x_shape, int(layer.weight[0]), n, steps, period, lanes, n2, y_shape)
                made[key] = self.builder_.add_func(func.with_attr("global_symbol", name), name)
            producer = chainable.get(var_key(first.args[1].fields[1]))
            for i, f in enumerate(done):
                if f.name == first.args[0].name_hint and f.producer == producer and not f.consumer:
                    done[i] = dataclasses.replace(f, name=made[key].name_hint, consumer=second.name,
                                                  units=0 if compact is None else n)
                    break
            return relax.call_tir(made[key], args, out_ty=call.ty)

    return rewrite_functions(mod, _Chain(mod))


def compact_hidden(w, live, c, a, b, theta, v0, keep, w2, live2, n: int, period: int, lanes: int):
    """The constants of :func:`.eventlif.event_mlp_kernel` (``w (K, N), live, c, a, b, theta, v0
    (period,), keep, w2 (N, N2), live2``) for only the hidden neurons the second layer reads (its
    live inputs: ``live2``'s bits), in ascending order and padded to a multiple of ``lanes`` with
    neurons of zero weights that it does not read; ``None`` where that saves no vector, or the
    period does not divide ``N``. The kept neurons' accumulations, recurrences and spikes are the
    same operations on the same values, and the second layer adds the same weight rows in the same
    order (a neuron it does not read has an all-zero row and no live bit), so its output is
    bit-identical for finite inputs (an input that fed only dropped neurons is no longer an event,
    as the event kernels skip all-zero weight rows); the neurons dropped are computed for nothing:
    their spikes are never read."""
    from .event import BLOCK, live_masks

    if n % period:
        return None
    bits = (np.asarray(live2, np.uint32)[:, None] >> np.arange(BLOCK, dtype=np.uint32)) & 1
    kept = np.flatnonzero(bits.reshape(-1)[:n])
    units = max(lanes, math.ceil(len(kept) / lanes) * lanes)
    if units >= n:
        return None
    pad = units - len(kept)

    def per_unit(v, fill):
        return np.concatenate([np.tile(np.asarray(v, np.float32), n // period)[kept], np.full(pad, fill, np.float32)])

    w_new = np.concatenate([w[:, kept], np.zeros((w.shape[0], pad), np.float32)], axis=1)
    w2_new = np.concatenate([w2[kept], np.zeros((pad, w2.shape[1]), np.float32)], axis=0)
    live_new = live_masks(w_new) & live     # an input is live where a kept neuron reads it
    return (w_new, live_new, per_unit(c, 0), per_unit(a, 0), per_unit(b, 0), per_unit(theta, 1), per_unit(v0, 0),
            keep, w2_new, live_masks(w2_new))


def _pool_in(mod, pools: dict, poolable: dict, done: list):
    """``mod`` with every max pool (``pools``, by kernel name) whose input, alone or through a
    reshape read by it alone, is the output of a fused kernel in ``poolable`` read by nothing else
    replaced by that kernel with the pooling inside; ``done``'s entries updated in place."""
    import dataclasses

    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from . import eventlif
    from .spike import conv_out_hw
    from .routing import rewrite_functions

    uses = use_counts(mod)
    call_tir = tvm.ir.Op.get("relax.call_tir")
    reshape = tvm.ir.Op.get("relax.reshape")
    made: dict[tuple, object] = {}

    @mutator
    class _Pool(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != call_tir or not isinstance(call.args[0], relax.GlobalVar) or call.args[0].name_hint not in pools:
                return call
            mp = pools[call.args[0].name_hint]
            src = call.args[1].fields[0]
            if not isinstance(src, relax.Var) or uses.get(var_key(src), 0) != 1:
                return call
            value = self.lookup_binding(src)
            if isinstance(value, relax.Call) and value.op == reshape and isinstance(value.args[0], relax.Var):
                src = value.args[0]
                if uses.get(var_key(src), 0) != 1:
                    return call
                value = self.lookup_binding(src)
            if (not isinstance(value, relax.Call) or value.op != call_tir or not isinstance(value.args[0], relax.GlobalVar)
                    or value.args[0].name_hint not in poolable):
                return call
            how = poolable[value.args[0].name_hint]
            if how[0] == "conv":
                steps, layer = how[2], how[1]
                shape = (layer.x_shape[0] // steps, int(layer.weight[0]), *conv_out_hw(layer.x_shape, layer.weight, layer.padding))
            else:
                steps, shape = how[1], how[2]
            if tuple(mp.x_shape) != (steps * shape[0], *shape[1:]):
                return call
            pool = (*mp.pool, *mp.stride)
            out_shape = static_shape(call)
            key = (how, pool, out_shape)
            if key not in made:
                name = f"stdeploy_{'event_lif' if how[0] == 'conv' else 'lif'}_pool_{len(made)}"
                if how[0] == "conv":
                    layer, _, period, lanes = how[1:]
                    func = eventlif.stationary_conv_lif_kernel(layer.x_shape, layer.weight, layer.padding, layer.nnz, layer.channels,
                                                               steps, period, lanes, out_shape, pool, repeats=_image_stem(layer))
                else:
                    func = lif_pool_kernel(steps, shape, how[3], how[4], pool, out_shape)
                made[key] = self.builder_.add_func(func.with_attr("global_symbol", name), name)
            for i, f in enumerate(done):
                if f.name == value.args[0].name_hint and not f.pool:
                    done[i] = dataclasses.replace(f, name=made[key].name_hint, pool=pool)
                    break
            return relax.call_tir(made[key], list(value.args[1].fields), out_ty=call.ty)

    return rewrite_functions(mod, _Pool(mod))
