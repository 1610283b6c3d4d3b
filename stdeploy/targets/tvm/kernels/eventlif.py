"""A weight layer and the LIF population it feeds in one kernel (TIR, CPU): the event matmul or
the weight-stationary convolution of :mod:`.event` followed by the bias add and all T steps of the
LIF recurrence of :mod:`.lif`, the layer's output (the pre-activation) never written to memory.

The pattern (:func:`~.lif.fuse_lif_recurrences` recognises it, with ``producers``): a ``call_tir``
of an :mod:`.event` kernel whose output ``Y`` (``(T*R, ..., N)`` rows for a matmul, ``(T*B, O, HO,
WO)`` images for a convolution) is read only by a constant add ``Y + c`` feeding one LIF recurrence
over ``T`` steps. Per group of ``T`` rows (a matmul: row ``r`` of every step, ``t * R + r``) or
images (a convolution: image ``b`` of every step, ``t * B + b``, and one output channel at a time),
the kernel computes the ``T`` accumulators exactly as the :mod:`.event` kernel does (the same loops,
the same ``acc + value * w`` in the same order), keeps them in a small buffer, then runs the
recurrence over them with the :mod:`.lif` kernel's arithmetic (``y + c``, ``a * u``, ``b * x``,
their sum, ``v - theta >= 0``, ``v * (1 - s)``, each product passed through an ``and`` with an
all-ones word ``keep`` so the compiler cannot contract it with the following add): spikes
bit-identical to the two kernels run one after the other, and so to onnxruntime's.

Two more things can be pulled in (:func:`~.lif.fuse_lif_recurrences` decides, from the graph):
the max pool that alone reads a convolution's spikes (:func:`stationary_conv_lif_kernel` with
``pool``: only the pooled spikes are written), and the second linear of an MLP that alone reads a
linear's spikes (:func:`event_mlp_kernel`: ``fc1 -> LIF -> fc2``, the spikes never written).

The constants ``c, a, b, theta, v0`` are stored once per period ``M`` (:func:`~.lif.constant_period`);
the vector width ``lanes`` must divide ``M`` and the innermost output block (``N`` for a matmul,
``HO * WO`` for a convolution), which :func:`fusable` checks.
"""

from __future__ import annotations

import math

from ....errors import ShapeError
from .event import BLOCK, PARTS, EventLayer, conv_planes, vector_width
from .pool import pool_steps
from .spike import conv_out_hw

__all__ = ["fusable", "inner_block", "event_matmul_lif_kernel", "stationary_conv_lif_kernel", "event_mlp_kernel"]


def inner_block(layer: EventLayer) -> int:
    """The outputs computed together per row or image and output channel: ``N`` for a matmul,
    ``HO * WO`` for a convolution."""
    if layer.op == "matmul":
        return int(layer.weight[1])
    ho, wo = conv_out_hw(layer.x_shape, layer.weight, layer.padding)
    return ho * wo


def fusable(layer: EventLayer, steps: int, period: int, lanes: int) -> bool:
    """True where ``layer``'s output holds ``steps`` whole steps along its first axis and ``lanes``
    divides both the period and :func:`inner_block`."""
    lead = int(layer.x_shape[0])
    return (lanes >= 1 and lead % steps == 0 and period % lanes == 0 and inner_block(layer) % lanes == 0
            and (layer.op == "matmul" or len(layer.padding) == 4))


def event_matmul_lif_kernel(x_shape: tuple, k: int, n: int, steps: int, period: int, lanes: int, out_shape: tuple | None = None):
    """The TIR PrimFunc ``(x (T*R..., K), w (K, N), live, c (M,), a (M,), b (M,), theta (M,),
    v0 (M,), keep (lanes,), out (T, *S))`` with ``S`` the one-step shape of ``x @ w`` (``x``'s
    rows split into ``T`` steps of ``R`` rows, ``prod(S) = R * N``): the spikes of the LIF
    recurrence fed ``x @ w + c`` (:func:`.event.event_matmul_kernel` and :func:`.lif.lif_kernel`
    fused)."""
    from tvm.script import tirx as T

    x_shape = tuple(int(v) for v in x_shape)
    rows = math.prod(x_shape[:-1])
    if rows % steps or n % lanes or period % lanes:
        raise ShapeError(f"event matmul + LIF: {rows} rows are not {steps} steps, or {lanes} lanes do not divide "
                         f"N={n} and the period {period}")
    r_rows = rows // steps
    size = r_rows * n                       # one step's outputs
    full = (steps, size) if out_shape is None else tuple(int(d) for d in out_shape)
    if math.prod(full) != steps * size:
        raise ShapeError(f"event matmul + LIF: output shape {full} does not hold {steps} steps of {size}")
    parts = min(PARTS, r_rows)
    per = math.ceil(r_rows / parts)
    blocks, rest = divmod(k, BLOCK)
    words = math.ceil(k / BLOCK)
    L, m, groups = BLOCK, int(period), n // lanes
    vn = vector_width(n)

    @T.prim_func
    def event_matmul_lif(xh: T.handle, w: T.Buffer((k, n), "float32"), live: T.Buffer((words,), "uint32"),
                         c: T.Buffer((m,), "float32"), a: T.Buffer((m,), "float32"), b: T.Buffer((m,), "float32"),
                         th: T.Buffer((m,), "float32"), v0: T.Buffer((m,), "float32"), keep: T.Buffer((lanes,), "int32"),
                         oh: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xn = T.match_buffer(xh, x_shape, "float32")
        on = T.match_buffer(oh, full, "float32")
        x = T.decl_buffer((rows * k,), "float32", data=xn.data)
        xi = T.decl_buffer((rows * k,), "int32", data=xn.data)
        out = T.decl_buffer((steps, size), "float32", data=on.data)
        for part in T.parallel(parts):
            acc = T.alloc_buffer((steps, n), "float32")
            mask = T.alloc_buffer((1,), "uint32")
            v = T.alloc_buffer((lanes,), "float32")
            s = T.alloc_buffer((lanes,), "float32")
            for r in range(part * per, T.min(r_rows, part * per + per)):
                for t in range(steps):
                    for qo in range(n // vn):
                        for qv in T.vectorized(vn):
                            acc[t, qo * vn + qv] = T.float32(0)
                    for blk in range(blocks):
                        mask[0] = T.Cast("uint32", T.call_llvm_pure_intrin(
                            "int32", "llvm.vector.reduce.or",
                            T.Cast(f"int32x{L}", (xi[T.ramp((t * r_rows + r) * k + blk * L, 1, L)] & T.Broadcast(0x7FFFFFFF, L))
                                   != T.Broadcast(0, L)) << T.ramp(0, 1, L))) & live[blk]
                        while mask[0] != T.uint32(0):
                            i = blk * L + T.Cast("int32", T.call_llvm_pure_intrin("uint32", "llvm.cttz", mask[0], T.bool(True)))
                            mask[0] = mask[0] & (mask[0] - T.uint32(1))
                            for qo in range(n // vn):
                                for qv in T.vectorized(vn):
                                    acc[t, qo * vn + qv] = acc[t, qo * vn + qv] + x[(t * r_rows + r) * k + i] * w[i, qo * vn + qv]
                    for l in range(rest):
                        if x[(t * r_rows + r) * k + blocks * L + l] != T.float32(0):
                            for qo in range(n // vn):
                                for qv in T.vectorized(vn):
                                    acc[t, qo * vn + qv] = acc[t, qo * vn + qv] + x[(t * r_rows + r) * k + blocks * L + l] * w[blocks * L + l, qo * vn + qv]
                for g in range(groups):
                    base = (r * n + g * lanes) % m   # the constants' offset of this vector (once, not per step)
                    for l in T.vectorized(lanes):
                        v[l] = v0[base + l]
                    for t in T.unroll(steps):
                        for l in T.vectorized(lanes):
                            v[l] = T.reinterpret("float32", T.reinterpret("int32", a[base + l] * v[l]) & keep[l]) + \
                                T.reinterpret("float32", T.reinterpret("int32", b[base + l] * (
                                    acc[t, g * lanes + l] + c[base + l])) & keep[l])
                            s[l] = T.Cast("float32", v[l] - th[base + l] >= T.float32(0))
                            out[t, r * n + g * lanes + l] = s[l]
                            v[l] = v[l] * (T.float32(1) - s[l])

    return event_matmul_lif


def stationary_conv_lif_kernel(x_shape: tuple, w_shape: tuple, padding: tuple, nnz: int, channels: int, steps: int,
                               period: int, lanes: int, out_shape: tuple | None = None, pool: tuple | None = None,
                               repeats: bool = False):
    """The TIR PrimFunc ``(x (T*B, C, H, W), ptr, taps, vals, chans, c (M,), a (M,), b (M,),
    theta (M,), v0 (M,), keep (lanes,), out (T, B*O*HO*WO))``: the spikes of the LIF recurrence fed
    the convolution plus ``c`` (:func:`.event.stationary_conv_kernel` and :func:`.lif.lif_kernel`
    fused). Per image ``b`` the ``T`` images ``t * B + b`` are copied into zero-bordered planes;
    per output channel the ``T`` output planes are accumulated (nonzero weights in order, the
    ``T`` planes inside), then the recurrence runs over them.

    ``pool`` ``(kh, kw, sh, sw)``: the spikes are max-pooled in the kernel (a ``max_pool2d`` that
    reads nothing else, no padding, windows inside the plane; :func:`.pool.max_pool_kernel`'s
    running maximum from -FLT_MAX over rows then columns) and ``out`` is the pooled
    ``(T*B, O, HP, WP)`` (or ``out_shape``, the same values): the spikes are never written.

    ``repeats``: per image, the kernel first checks whether its ``T`` input images are bit for bit
    the same (an image fed at every step, as a direct encoding does) and then accumulates step 0
    alone and copies its planes to the other steps: the same float32 sums, so the same spikes."""
    from tvm.script import tirx as T

    nb, c, h, w = (int(v) for v in x_shape)
    o = int(w_shape[0])
    ho, wo = conv_out_hw(x_shape, w_shape, padding)
    plane = ho * wo
    if nb % steps or plane % lanes or period % lanes:
        raise ShapeError(f"conv + LIF: {nb} images are not {steps} steps, or {lanes} lanes do not divide "
                         f"HO*WO={plane} and the period {period}")
    batch = nb // steps
    pkh, pkw, psh, psw = (1, 1, 1, 1) if pool is None else (int(v) for v in pool)
    hp, wp = (ho - pkh) // psh + 1, (wo - pkw) // psw + 1
    if pool is not None and (min(hp, wp) < 1 or min(pkh, pkw, psh, psw) < 1):
        raise ShapeError(f"conv + LIF: pool {pool} does not fit a {ho}x{wo} plane")
    pooled = hp * wp if pool is not None else plane
    size = batch * o * pooled
    full = (steps, size) if out_shape is None else tuple(int(d) for d in out_shape)
    if math.prod(full) != steps * size:
        raise ShapeError(f"conv + LIF: output shape {full} does not hold {steps} steps of {size}")
    pool_planes = None if pool is None else pool_steps(steps, (ho, wo), pool)
    parts = min(PARTS, batch)
    per = math.ceil(batch / parts)
    p, lc, m, groups = max(1, nnz), max(1, channels), int(period), plane // lanes
    # a channel without weights gets the same input (its bias) in every image, and so the same spikes
    # where the LIF constants repeat from image to image: computed for a part's first image, then copied
    reuse = (o * plane) % m == 0 and per > 1

    pad_shape, zero, fill, accumulate = conv_planes(x_shape, w_shape, padding, steps)

    @T.macro
    def channel(acc, pad, ptr, taps, vals, run, v, s, spl, mx, cb, a, b, th, v0, keep, out, flat_out, img, u):
        # output channel u of image img: its T planes accumulated, the recurrence, the pool
        if repeats:
            if run[0] == 1:
                accumulate(acc, pad, ptr, taps, vals, u, 1)
                for t in range(1, steps):
                    for g in range(groups):
                        for l in T.vectorized(lanes):
                            acc[t * plane + g * lanes + l] = acc[g * lanes + l]
            else:
                accumulate(acc, pad, ptr, taps, vals, u, steps)
        else:
            accumulate(acc, pad, ptr, taps, vals, u, steps)
        for g in range(groups):
            base = ((img * o + u) * plane + g * lanes) % m   # the constants' offset of this vector (once, not per step)
            for l in T.vectorized(lanes):
                v[l] = v0[base + l]
            for t in T.unroll(steps):
                for l in T.vectorized(lanes):
                    v[l] = T.reinterpret("float32", T.reinterpret("int32", a[base + l] * v[l])
                                         & keep[l]) + \
                        T.reinterpret("float32", T.reinterpret("int32", b[base + l] * (
                            acc[t * plane + g * lanes + l] + cb[base + l])) & keep[l])
                    s[l] = T.Cast("float32", v[l] - th[base + l] >= T.float32(0))
                    if pool is None:
                        out[t, (img * o + u) * plane + g * lanes + l] = s[l]
                    else:
                        spl[t * plane + g * lanes + l] = s[l]
                    v[l] = v[l] * (T.float32(1) - s[l])
        if pool is not None:
            pool_planes(spl, mx, flat_out, (img * o + u) * pooled, size)

    @T.prim_func
    def stationary_conv_lif(x: T.Buffer((nb, c, h, w), "float32"), ptr: T.Buffer((o + 1,), "int32"),
                            taps: T.Buffer((p,), "int32"), vals: T.Buffer((p,), "float32"),
                            chans: T.Buffer((lc,), "int32"), cb: T.Buffer((m,), "float32"), a: T.Buffer((m,), "float32"),
                            b: T.Buffer((m,), "float32"), th: T.Buffer((m,), "float32"), v0: T.Buffer((m,), "float32"),
                            keep: T.Buffer((lanes,), "int32"), oh: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        on = T.match_buffer(oh, full, "float32")
        out = T.decl_buffer((steps, size), "float32", data=on.data)
        flat_out = T.decl_buffer((steps * size,), "float32", data=on.data)
        for part in T.parallel(parts):
            pad = T.alloc_buffer(pad_shape, "float32")
            acc = T.alloc_buffer((steps * plane,), "float32")
            spl = T.alloc_buffer((steps * plane,), "float32")
            mx = T.alloc_buffer((1,), "float32")
            v = T.alloc_buffer((lanes,), "float32")
            s = T.alloc_buffer((lanes,), "float32")
            run = T.alloc_buffer((1,), "int32")    # the steps accumulated: 1 where the T inputs are the same
            zero(pad)
            for img in range(part * per, T.min(batch, part * per + per)):
                run[0] = steps
                if repeats:
                    run[0] = 1
                    for t in range(1, steps):
                        for li in range(channels):
                            for r in range(h):
                                for q in range(w):
                                    run[0] = T.max(run[0], T.if_then_else(
                                        T.reinterpret("int32", x[t * batch + img, chans[li], r, q])
                                        != T.reinterpret("int32", x[img, chans[li], r, q]), steps, 1))
                for t in range(run[0]):
                    fill(pad, x, chans, channels, t, t * batch + img)
                for u in range(o):
                    if reuse:
                        if T.And(ptr[u] == ptr[u + 1], img > part * per):    # no weights: the part's first image's spikes
                            for t in range(steps):
                                for i in range(pooled):
                                    out[t, (img * o + u) * pooled + i] = out[t, (part * per * o + u) * pooled + i]
                        else:
                            channel(acc, pad, ptr, taps, vals, run, v, s, spl, mx, cb, a, b, th, v0, keep, out, flat_out, img, u)
                    else:
                        channel(acc, pad, ptr, taps, vals, run, v, s, spl, mx, cb, a, b, th, v0, keep, out, flat_out, img, u)

    return stationary_conv_lif


def event_mlp_kernel(x_shape: tuple, k: int, n: int, steps: int, period: int, lanes: int, n2: int, y_shape: tuple,
                     residual: bool = False):
    """The TIR PrimFunc ``(x, w, live, c, a, b, theta, v0, keep, w2 (N, N2), live2, y (T*R..., N2))``:
    :func:`event_matmul_lif_kernel` whose spikes feed a second event matmul ``s @ w2`` (read by
    nothing else), per row group: the ``T`` spike rows stay in a local buffer and each is run
    through the second layer's event loop (its events found by comparing the spikes with 0, the
    same set the :mod:`.event` kernel finds in 0.0 / 1.0 spikes; its weight rows added in
    ascending input order, ``acc + value * w`` as there). ``y`` is the second layer's output,
    bit-identical to the two :mod:`.event` kernels and the :mod:`.lif` kernel one after another.

    ``residual``: the PrimFunc ``(..., live2, c2 (N2,), r (T*R..., N2), y)`` storing
    ``(acc + c2) + r`` instead (the second layer's bias and a residual add folded into the store:
    :mod:`.residual`)."""
    from tvm.script import tirx as T

    x_shape = tuple(int(v) for v in x_shape)
    y_shape = tuple(int(v) for v in y_shape)
    rows = math.prod(x_shape[:-1])
    if rows % steps or n % lanes or period % lanes or math.prod(y_shape) != rows * n2 or y_shape[-1] != n2:
        raise ShapeError(f"event MLP: {rows} rows are not {steps} steps, {lanes} lanes do not divide N={n} and the "
                         f"period {period}, or {y_shape} is not the second layer's output")
    r_rows = rows // steps
    parts = min(PARTS, r_rows)
    per = math.ceil(r_rows / parts)
    blocks, rest = divmod(k, BLOCK)
    blocks2, rest2 = divmod(n, BLOCK)
    words, words2 = math.ceil(k / BLOCK), math.ceil(n / BLOCK)
    L, m, groups = BLOCK, int(period), n // lanes
    vn, vn2 = vector_width(n), vector_width(n2)

    @T.macro
    def row_groups(x, xi, w, live, c, a, b, th, v0, keep, w2, live2, y, c2, res):
        for part in T.parallel(parts):
            acc = T.alloc_buffer((steps, n), "float32")
            spk = T.alloc_buffer((steps * n,), "float32")
            acc2 = T.alloc_buffer((n2,), "float32")
            mask = T.alloc_buffer((1,), "uint32")
            v = T.alloc_buffer((lanes,), "float32")
            s = T.alloc_buffer((lanes,), "float32")
            for r in range(part * per, T.min(r_rows, part * per + per)):
                for t in range(steps):
                    for qo in range(n // vn):
                        for qv in T.vectorized(vn):
                            acc[t, qo * vn + qv] = T.float32(0)
                    for blk in range(blocks):
                        mask[0] = T.Cast("uint32", T.call_llvm_pure_intrin(
                            "int32", "llvm.vector.reduce.or",
                            T.Cast(f"int32x{L}", (xi[T.ramp((t * r_rows + r) * k + blk * L, 1, L)] & T.Broadcast(0x7FFFFFFF, L))
                                   != T.Broadcast(0, L)) << T.ramp(0, 1, L))) & live[blk]
                        while mask[0] != T.uint32(0):
                            i = blk * L + T.Cast("int32", T.call_llvm_pure_intrin("uint32", "llvm.cttz", mask[0], T.bool(True)))
                            mask[0] = mask[0] & (mask[0] - T.uint32(1))
                            for qo in range(n // vn):
                                for qv in T.vectorized(vn):
                                    acc[t, qo * vn + qv] = acc[t, qo * vn + qv] + x[(t * r_rows + r) * k + i] * w[i, qo * vn + qv]
                    for l in range(rest):
                        if x[(t * r_rows + r) * k + blocks * L + l] != T.float32(0):
                            for qo in range(n // vn):
                                for qv in T.vectorized(vn):
                                    acc[t, qo * vn + qv] = acc[t, qo * vn + qv] + x[(t * r_rows + r) * k + blocks * L + l] * w[blocks * L + l, qo * vn + qv]
                for g in range(groups):
                    base = (r * n + g * lanes) % m   # the constants' offset of this vector (once, not per step)
                    for l in T.vectorized(lanes):
                        v[l] = v0[base + l]
                    for t in T.unroll(steps):
                        for l in T.vectorized(lanes):
                            v[l] = T.reinterpret("float32", T.reinterpret("int32", a[base + l] * v[l]) & keep[l]) + \
                                T.reinterpret("float32", T.reinterpret("int32", b[base + l] * (
                                    acc[t, g * lanes + l] + c[base + l])) & keep[l])
                            s[l] = T.Cast("float32", v[l] - th[base + l] >= T.float32(0))
                            spk[t * n + g * lanes + l] = s[l]
                            v[l] = v[l] * (T.float32(1) - s[l])
                for t in range(steps):
                    for qo in range(n2 // vn2):
                        for qv in T.vectorized(vn2):
                            acc2[qo * vn2 + qv] = T.float32(0)
                    for blk in range(blocks2):
                        mask[0] = T.Cast("uint32", T.call_llvm_pure_intrin(
                            "int32", "llvm.vector.reduce.or",
                            T.Cast(f"int32x{L}", spk[T.ramp(t * n + blk * L, 1, L)] != T.Broadcast(T.float32(0), L))
                            << T.ramp(0, 1, L))) & live2[blk]
                        while mask[0] != T.uint32(0):
                            i = blk * L + T.Cast("int32", T.call_llvm_pure_intrin("uint32", "llvm.cttz", mask[0], T.bool(True)))
                            mask[0] = mask[0] & (mask[0] - T.uint32(1))
                            for qo in range(n2 // vn2):
                                for qv in T.vectorized(vn2):
                                    acc2[qo * vn2 + qv] = acc2[qo * vn2 + qv] + spk[t * n + i] * w2[i, qo * vn2 + qv]
                    for l in range(rest2):
                        if spk[t * n + blocks2 * L + l] != T.float32(0):
                            for qo in range(n2 // vn2):
                                for qv in T.vectorized(vn2):
                                    acc2[qo * vn2 + qv] = acc2[qo * vn2 + qv] + spk[t * n + blocks2 * L + l] * w2[blocks2 * L + l, qo * vn2 + qv]
                    for qo in range(n2 // vn2):
                        for qv in T.vectorized(vn2):
                            if residual:
                                y[t * r_rows + r, qo * vn2 + qv] = (acc2[qo * vn2 + qv] + c2[qo * vn2 + qv]) + \
                                    res[t * r_rows + r, qo * vn2 + qv]
                            else:
                                y[t * r_rows + r, qo * vn2 + qv] = acc2[qo * vn2 + qv]

    if residual:
        @T.prim_func
        def event_mlp_residual(xh: T.handle, w: T.Buffer((k, n), "float32"), live: T.Buffer((words,), "uint32"),
                               c: T.Buffer((m,), "float32"), a: T.Buffer((m,), "float32"), b: T.Buffer((m,), "float32"),
                               th: T.Buffer((m,), "float32"), v0: T.Buffer((m,), "float32"), keep: T.Buffer((lanes,), "int32"),
                               w2: T.Buffer((n, n2), "float32"), live2: T.Buffer((words2,), "uint32"),
                               c2: T.Buffer((n2,), "float32"), rh: T.handle, yh: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            xn = T.match_buffer(xh, x_shape, "float32")
            rn = T.match_buffer(rh, y_shape, "float32")
            yn = T.match_buffer(yh, y_shape, "float32")
            row_groups(T.decl_buffer((rows * k,), "float32", data=xn.data), T.decl_buffer((rows * k,), "int32", data=xn.data),
                       w, live, c, a, b, th, v0, keep, w2, live2, T.decl_buffer((rows, n2), "float32", data=yn.data), c2,
                       T.decl_buffer((rows, n2), "float32", data=rn.data))

        return event_mlp_residual

    @T.prim_func
    def event_mlp(xh: T.handle, w: T.Buffer((k, n), "float32"), live: T.Buffer((words,), "uint32"),
                  c: T.Buffer((m,), "float32"), a: T.Buffer((m,), "float32"), b: T.Buffer((m,), "float32"),
                  th: T.Buffer((m,), "float32"), v0: T.Buffer((m,), "float32"), keep: T.Buffer((lanes,), "int32"),
                  w2: T.Buffer((n, n2), "float32"), live2: T.Buffer((words2,), "uint32"), yh: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xn = T.match_buffer(xh, x_shape, "float32")
        yn = T.match_buffer(yh, y_shape, "float32")
        row_groups(T.decl_buffer((rows * k,), "float32", data=xn.data), T.decl_buffer((rows * k,), "int32", data=xn.data),
                   w, live, c, a, b, th, v0, keep, w2, live2, T.decl_buffer((rows, n2), "float32", data=yn.data), None, None)

    return event_mlp
