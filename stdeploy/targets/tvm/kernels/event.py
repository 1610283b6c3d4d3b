"""Kernels for pruned layers on the CPU, compiled into the Relax module (TIR): an event-driven
linear layer and a weight-stationary convolution, one ``call_tir`` per layer, the weight's
structure built at compile time and passed as Relax constants (no Python on the call path, no
density estimate or choice at run time).

* :func:`event_matmul_kernel`, ``y = x @ W`` with ``x (..., K)`` and a pruned ``W (K, N)``: per
  row of ``x`` the events (nonzero inputs) are found :data:`BLOCK` at a time: a vector compare,
  shift and OR-reduce turn a block into a bit mask, ANDed with the block's live mask (the inputs
  whose weight row has a nonzero, :func:`live_masks`), and its set bits are walked in ascending
  order (``cttz``). Each event adds ``value x`` its weight row to an accumulator of the ``N``
  outputs, vectorised; the accumulator is stored once. Work: the events of live inputs times
  ``N / lanes`` vector multiply-adds, plus reading ``x`` and writing ``y`` once. (Adding only the
  nonzero weights of each row, a scalar scatter, was tried first and was slower on every sdt-tiny
  layer: its loop of 0 to 40 iterations per event is a mispredicted branch.)
* :func:`stationary_conv_kernel`, a stride-1 NCHW convolution (:func:`.spike.applicable`) with
  the weight as lists per output channel (:func:`conv_columns`): per image, the input channels
  the weight uses are copied into zero-bordered planes; for each output channel an accumulator of
  its output plane is zeroed, each nonzero weight adds ``weight x`` its channel's plane shifted by
  its tap (vectors across output rows where the rows are narrow: :func:`conv_planes`), and the
  plane is stored once. Work: the nonzero weights times the output plane, in vectors; zero inputs
  are not skipped (an event-driven convolution,
  per-channel event lists and a scalar scatter per event and tap, was tried first and was slower).

:func:`route_event_kernels` puts them in place of every matmul with a constant weight of at least
:data:`.skipzero.MIN_WEIGHT_ZEROS` zeros and every such convolution, and of every convolution with
at most :data:`.skipzero.STEM_CHANNELS` input channels whatever its zeros (an image stem: the
loop beats the gather kernel there on dense weights too, so dense and pruned models both get it).
``python -m stdeploy.targets.tvm.kernels.event`` times each kernel against the skip-zero and
gather kernels on the pruned sdt-tiny's layer shapes and densities.

Arithmetic: each output's terms are added from 0 in the order of the gather kernels of
:mod:`.spike` and the skip-zero kernels of :mod:`.skipzero` (input feature ascending; tap, then
input channel, for a convolution), each as ``acc + value * w``, the form those kernels use (LLVM
contracts it alike); a skipped term is a product with a zero factor, which leaves a float32 sum
unchanged (up to the sign of a zero sum). The outputs are bit-identical to those kernels' on
spikes and on real inputs, and the whole pruned model's spikes and logits to onnxruntime's (the
tests check both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ....errors import ShapeError
from . import skipzero, spike

__all__ = ["BLOCK", "PARTS", "EventLayer", "live_masks", "vector_width", "event_matmul_kernel", "conv_columns", "conv_planes", "stationary_conv_kernel",
           "route_event_kernels"]

BLOCK = 32              # inputs of a matmul row whose events are found at once (one uint32 mask)
PARTS = spike.PARTS     # parallel tasks per call (rows or images are split between them)
LANES = spike.LANES     # float32 per vector step


def vector_width(n: int) -> int:
    """The width of the vector operations over a row of ``n`` outputs: the whole row where ``n``
    is a power of two up to 256, else :data:`LANES` where it divides ``n`` (the row is then
    ``n / LANES`` register-sized vectors), else the whole row. A whole-row vector is what LLVM
    legalises poorly where ``n`` is not a power of two: on the sdt-tiny shapes (K = 64, an input
    density of 0.08) an event matmul with N = 96 took 0.54 ms as one vector and 0.028 ms in
    16-float ones; with N = 64 and 256 one vector was as fast or faster (0.094 against 0.112 ms at
    256)."""
    if n & (n - 1) == 0 and n <= 256:
        return n
    return LANES if n % LANES == 0 else n


def live_masks(weight: np.ndarray) -> np.ndarray:
    """``(ceil(K / BLOCK),)`` uint32: bit ``l`` of word ``b`` is set where input ``b * BLOCK + l``
    of the ``(K, N)`` weight has a nonzero weight (its events can change an output)."""
    w = np.asarray(weight)
    if w.ndim != 2 or min(w.shape) < 1:
        raise ShapeError(f"event matmul: expected a (K, N) weight, got {w.shape}")
    live = np.zeros(math.ceil(w.shape[0] / BLOCK) * BLOCK, np.uint64)
    live[:w.shape[0]] = (w != 0).any(axis=1)
    bits = live.reshape(-1, BLOCK) << np.arange(BLOCK, dtype=np.uint64)
    return bits.sum(axis=1).astype(np.uint32)


def event_matmul_kernel(x_shape: tuple, k: int, n: int, residual: bool = False):
    """The TIR PrimFunc ``(x (..., K), w (K, N), live (ceil(K / BLOCK),) uint32, y (..., N))``
    (``live``: :func:`live_masks` of ``w``). Per row of ``x``: the accumulator of the ``N``
    outputs is zeroed; per block of :data:`BLOCK` inputs the mask of its nonzero inputs is formed
    in vector registers (compare, shift, OR-reduce) and ANDed with the block's live mask; its set
    bits, ascending, are the events, each adding ``value x`` its weight row to the accumulator
    (vectorised over ``N``); the accumulator is stored. The last ``K mod BLOCK`` inputs are
    tested one by one.

    ``residual``: the PrimFunc ``(x, w, live, c (N,), r (..., N), y)`` storing ``(acc + c) + r``
    instead (a bias and a residual add folded into the store: :mod:`.residual`)."""
    from tvm.script import tirx as T

    x_shape = tuple(int(v) for v in x_shape)
    m = math.prod(x_shape[:-1])
    y_shape = (*x_shape[:-1], n)
    parts = min(PARTS, m)
    per = math.ceil(m / parts)
    blocks, rest = divmod(k, BLOCK)
    words = math.ceil(k / BLOCK)
    L, vn = BLOCK, vector_width(n)

    @T.macro
    def rows(x, xi, w, live, y, c, res):
        for part in T.parallel(parts):
            acc = T.alloc_buffer((n,), "float32")
            mask = T.alloc_buffer((1,), "uint32")
            for row in range(part * per, T.min(m, part * per + per)):
                for vo in range(n // vn):
                    for vv in T.vectorized(vn):
                        acc[vo * vn + vv] = T.float32(0)
                for blk in range(blocks):
                    # bit l: input l of the block is not +-0 (its bits other than the sign), and live
                    mask[0] = T.Cast("uint32", T.call_llvm_pure_intrin(
                        "int32", "llvm.vector.reduce.or",
                        T.Cast(f"int32x{L}", (xi[T.ramp(row * k + blk * L, 1, L)] & T.Broadcast(0x7FFFFFFF, L)) != T.Broadcast(0, L))
                        << T.ramp(0, 1, L))) & live[blk]
                    while mask[0] != T.uint32(0):
                        i = blk * L + T.Cast("int32", T.call_llvm_pure_intrin("uint32", "llvm.cttz", mask[0], T.bool(True)))
                        mask[0] = mask[0] & (mask[0] - T.uint32(1))
                        for vo in range(n // vn):
                            for vv in T.vectorized(vn):
                                acc[vo * vn + vv] = acc[vo * vn + vv] + x[row * k + i] * w[i, vo * vn + vv]
                for l in range(rest):
                    if x[row * k + blocks * L + l] != T.float32(0):
                        for vo in range(n // vn):
                            for vv in T.vectorized(vn):
                                acc[vo * vn + vv] = acc[vo * vn + vv] + x[row * k + blocks * L + l] * w[blocks * L + l, vo * vn + vv]
                for vo in range(n // vn):
                    for vv in T.vectorized(vn):
                        if residual:
                            y[row, vo * vn + vv] = (acc[vo * vn + vv] + c[vo * vn + vv]) + res[row, vo * vn + vv]
                        else:
                            y[row, vo * vn + vv] = acc[vo * vn + vv]

    if residual:
        @T.prim_func
        def event_matmul_residual(xh: T.handle, w: T.Buffer((k, n), "float32"), live: T.Buffer((words,), "uint32"),
                                  c: T.Buffer((n,), "float32"), rh: T.handle, yh: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            xn = T.match_buffer(xh, x_shape, "float32")
            rn = T.match_buffer(rh, y_shape, "float32")
            yn = T.match_buffer(yh, y_shape, "float32")
            rows(T.decl_buffer((m * k,), "float32", data=xn.data), T.decl_buffer((m * k,), "int32", data=xn.data), w, live,
                 T.decl_buffer((m, n), "float32", data=yn.data), c, T.decl_buffer((m, n), "float32", data=rn.data))

        return event_matmul_residual

    @T.prim_func
    def event_matmul(xh: T.handle, w: T.Buffer((k, n), "float32"), live: T.Buffer((words,), "uint32"), yh: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xn = T.match_buffer(xh, x_shape, "float32")
        yn = T.match_buffer(yh, y_shape, "float32")
        rows(T.decl_buffer((m * k,), "float32", data=xn.data), T.decl_buffer((m * k,), "int32", data=xn.data), w, live,
             T.decl_buffer((m, n), "float32", data=yn.data), None, None)

    return event_matmul


def conv_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ptr, taps, vals, chans)`` of an ``(O, C, KH, KW)`` weight: output channel ``o``'s nonzero
    weights are ``vals[ptr[o]:ptr[o+1]]``, in ascending (tap ``i * KW + j``, then input channel)
    order, ``taps`` holding ``(i * KW + j) * C + c`` for each; ``chans`` the input channels any
    nonzero weight uses (ascending)."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 4 or min(w.shape) < 1:
        raise ShapeError(f"stationary conv: expected an (O, C, KH, KW) weight, got {w.shape}")
    o = w.shape[0]
    flat = np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(o, -1))   # (O, KH*KW*C): row-major = (tap, channel)
    mask = flat != 0
    ptr = np.zeros(o + 1, np.int32)
    np.cumsum(mask.sum(axis=1), out=ptr[1:])
    rows, taps = np.nonzero(mask)
    chans = np.unique(taps % w.shape[1]).astype(np.int32)
    return ptr, taps.astype(np.int32), flat[rows, taps].astype(np.float32), chans


def conv_planes(x_shape: tuple, w_shape: tuple, padding: tuple, steps: int = 1):
    """The zero-bordered input planes of a weight-stationary convolution and the loops over them
    (TIR macros shared by :func:`stationary_conv_kernel` and
    :func:`.eventlif.stationary_conv_lif_kernel`): ``(pad_shape, zero, fill, accumulate)``.

    ``zero(pad)`` clears the planes of ``pad`` (``pad_shape``: ``steps`` slots of ``C`` planes);
    ``fill(pad, x, chans, channels, t, n)`` copies image ``n`` of ``x``'s used channels into slot
    ``t``; ``accumulate(acc, pad, ptr, taps, vals, u, nsteps)`` zeroes ``acc`` (``steps * HO * WO``)
    for the first ``nsteps`` slots and adds, for each of output channel ``u``'s nonzero weights in
    order, ``plane x weight`` with the plane shifted by its tap (``acc + value * w``).

    Where the output rows are as wide as the input's (stride 1, ``same`` width), :data:`LANES` is a
    multiple of that width (at least twice it) and divides the output plane, each plane is stored flat, its rows one
    after another between guard values, and a shifted plane is read in :data:`LANES`-wide vectors
    across rows, the values a shift brings in from a neighbouring row (or a guard) replaced by 0:
    ``LANES / WO`` rows per vector operation instead of one. Elsewhere the planes keep a zero
    border on every side and a vector covers one output row. Both read the same values (0 outside
    the image) in the same order: the same sums, bit for bit."""
    from tvm.script import tirx as T

    _, c, h, w = (int(v) for v in x_shape)
    _, _, kh, kw = (int(v) for v in w_shape)
    top, left, _, _ = (int(v) for v in padding)
    ho, wo = spike.conv_out_hw(x_shape, w_shape, padding)
    ph, pw = ho + kh - 1, wo + kw - 1
    plane, L = ho * wo, LANES
    flat = wo == w and wo < L and L % wo == 0 and plane % L == 0   # at least two rows per vector
    guard = max(left, kw - 1 - left)
    span = 2 * guard + ph * w
    pad_shape = (steps, c, span) if flat else (steps, c, ph, pw)

    @T.macro
    def zero(pad):
        for t in range(steps):
            for ch in range(c):
                if flat:
                    for i in range(span):
                        pad[t, ch, i] = T.float32(0)
                else:
                    for r in range(ph):
                        for q in range(pw):
                            pad[t, ch, r, q] = T.float32(0)

    @T.macro
    def fill(pad, x, chans, channels, t, n):
        for li in range(channels):
            for r in range(h):
                for q in T.vectorized(w):
                    if flat:
                        pad[t, chans[li], guard + (r + top) * w + q] = x[n, chans[li], r, q]
                    else:
                        pad[t, chans[li], r + top, q + left] = x[n, chans[li], r, q]

    @T.macro
    def accumulate(acc, pad, ptr, taps, vals, u, nsteps):
        for t in range(nsteps):
            if plane % L == 0:
                for vo in range(plane // L):
                    for l in T.vectorized(L):
                        acc[t * plane + vo * L + l] = T.float32(0)
            else:
                for r in T.unroll(ho):
                    for q in T.vectorized(wo):
                        acc[t * plane + r * wo + q] = T.float32(0)
        for e in range(ptr[u], ptr[u + 1]):
            for t in range(nsteps):
                if flat:
                    for vo in range(plane // L):
                        for l in T.vectorized(L):
                            acc[t * plane + vo * L + l] = acc[t * plane + vo * L + l] + T.Select(
                                T.And(l % wo + taps[e] // c % kw >= left, l % wo + taps[e] // c % kw < w + left),
                                pad[t, taps[e] % c, guard + taps[e] // c // kw * w + taps[e] // c % kw - left + vo * L + l],
                                T.float32(0)) * vals[e]
                else:
                    for r in T.unroll(ho):
                        for q in T.vectorized(wo):
                            acc[t * plane + r * wo + q] = acc[t * plane + r * wo + q] + pad[t, taps[e] % c, r + taps[e] // c // kw, q + taps[e] // c % kw] * vals[e]

    return pad_shape, zero, fill, accumulate


def stationary_conv_kernel(x_shape: tuple, w_shape: tuple, padding: tuple, nnz: int, channels: int,
                           residual_tokens: bool = False, r_shape: tuple | None = None, y_shape: tuple | None = None):
    """The TIR PrimFunc ``(x (N, C, H, W), ptr (O + 1), taps (nnz), vals (nnz), chans (channels),
    y (N, O, HO, WO))`` (arrays of :func:`conv_columns`). Per image: each used input channel is
    copied into a plane with a zero border (:func:`conv_planes`); then for each output channel an
    accumulator of the whole output plane is zeroed, each of the channel's nonzero weights, in
    (tap, channel) order, adds ``weight x`` the plane of its channel shifted by its tap, in vectors,
    and the accumulator is stored.

    ``residual_tokens``: the PrimFunc ``(x, ptr, taps, vals, chans, c (O,), r, y)`` storing
    ``(acc + c[o]) + r[n, o, p]`` at ``y[n, p, o]`` (``p`` the output position ``i * WO + j``):
    a bias, a residual add and the transpose to one token per position folded into the store
    (:mod:`.residual`); ``r`` and ``y`` hold ``N * O * HO * WO`` values in any shapes
    ``r_shape``, ``y_shape`` (read as ``(N, O, HO * WO)`` and ``(N, HO * WO, O)``)."""
    from tvm.script import tirx as T

    n, c, h, w = (int(v) for v in x_shape)
    o = int(w_shape[0])
    ho, wo = spike.conv_out_hw(x_shape, w_shape, padding)
    parts = min(PARTS, n)
    per = math.ceil(n / parts)
    p, lc = max(1, nnz), max(1, channels)
    plane = ho * wo

    pad_shape, zero, fill, accumulate = conv_planes(x_shape, w_shape, padding)

    @T.macro
    def images(x, ptr, taps, vals, chans, y, cb, res):
        for part in T.parallel(parts):
            pad = T.alloc_buffer(pad_shape, "float32")
            acc = T.alloc_buffer((plane,), "float32")
            zero(pad)
            for b in range(part * per, T.min(n, part * per + per)):
                fill(pad, x, chans, channels, 0, b)
                for v in range(o):
                    accumulate(acc, pad, ptr, taps, vals, v, 1)
                    for r in T.unroll(ho):
                        for q in T.vectorized(wo):
                            if residual_tokens:
                                y[b, r * wo + q, v] = (acc[r * wo + q] + cb[v]) + res[b, v, r * wo + q]
                            else:
                                y[b, v, r, q] = acc[r * wo + q]

    if residual_tokens:
        rs = tuple(int(d) for d in (r_shape or (n, o, ho, wo)))
        ys = tuple(int(d) for d in (y_shape or (n, plane, o)))
        if math.prod(rs) != n * o * plane or math.prod(ys) != n * o * plane:
            raise ShapeError(f"stationary conv: residual {rs} or output {ys} does not hold {n}x{o}x{ho}x{wo} values")

        @T.prim_func
        def stationary_conv_tokens(x: T.Buffer((n, c, h, w), "float32"), ptr: T.Buffer((o + 1,), "int32"),
                                   taps: T.Buffer((p,), "int32"), vals: T.Buffer((p,), "float32"),
                                   chans: T.Buffer((lc,), "int32"), cb: T.Buffer((o,), "float32"), rh: T.handle, yh: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            rn = T.match_buffer(rh, rs, "float32")
            yn = T.match_buffer(yh, ys, "float32")
            images(x, ptr, taps, vals, chans, T.decl_buffer((n, plane, o), "float32", data=yn.data), cb,
                   T.decl_buffer((n, o, plane), "float32", data=rn.data))

        return stationary_conv_tokens

    @T.prim_func
    def stationary_conv(x: T.Buffer((n, c, h, w), "float32"), ptr: T.Buffer((o + 1,), "int32"),
                        taps: T.Buffer((p,), "int32"), vals: T.Buffer((p,), "float32"),
                        chans: T.Buffer((lc,), "int32"), y: T.Buffer((n, o, ho, wo), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        images(x, ptr, taps, vals, chans, y, None, None)

    return stationary_conv


@dataclass(frozen=True)
class EventLayer:
    """One layer routed to a kernel of this module."""

    op: str             # "matmul" (event_matmul_kernel) or "conv2d" (stationary_conv_kernel)
    weight: tuple       # the weight's shape as the graph holds it, (K, N) or (O, C, KH, KW)
    x_shape: tuple
    weight_density: float
    nnz: int
    name: str           # the PrimFunc's name in the module
    padding: tuple = ()     # a convolution's (top, left, bottom, right)
    channels: int = 0       # a convolution's input channels any nonzero weight uses


def route_event_kernels(mod, min_zeros: float = skipzero.MIN_WEIGHT_ZEROS, every: tuple = ()):
    """``(new_mod, [EventLayer, ...])``: ``mod`` with every ``R.matmul(x, W)`` (constant 2-D
    float32 ``W (K, N)``, float32 ``x`` of static shape ``(..., K)``) whose weight has at least
    ``min_zeros`` zeros replaced by a ``call_tir`` of :func:`event_matmul_kernel` (``W`` and its
    live masks as constants), and every ``R.nn.conv2d`` (constant float32 OIHW weight, static NCHW
    input, ``groups = 1``, no dilation, :func:`.spike.applicable`) whose weight has at least
    ``min_zeros`` zeros or at most :data:`.skipzero.STEM_CHANNELS` input channels by a ``call_tir``
    of :func:`stationary_conv_kernel` (:func:`conv_columns` as constants). ``every``: the ops
    (``"matmul"``, ``"conv2d"``) routed whatever their zeros (a dense model's option). Other
    operators are left as they are, for the routing that follows."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from .routing import rewrite_functions

    if not 0.0 <= float(min_zeros) <= 1.0:
        raise ValueError(f"min_zeros must lie in [0, 1], got {min_zeros}")
    if not set(every) <= {"matmul", "conv2d"}:
        raise ValueError(f"every must name matmul and/or conv2d, got {every!r}")
    op_matmul, op_conv = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.nn.conv2d")
    const_type = type(relax.const(0.0))
    done: list[EventLayer] = []

    def static(expr) -> tuple | None:
        try:
            return tuple(int(v) for v in expr.ty.shape)
        except (AttributeError, TypeError, ValueError):
            return None

    def pruned(w: np.ndarray) -> bool:
        return w.size > 0 and float(np.mean(w == 0)) >= float(min_zeros)

    @mutator
    class _Rewrite(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op not in (op_matmul, op_conv):
                return call
            weight = call.args[1] if len(call.args) > 1 else None
            if not isinstance(weight, const_type) or getattr(call.ty, "dtype", None) != "float32":
                return call
            if weight.value.dtype != "float32" or static(call) is None:
                return call
            x_shape = static(call.args[0])
            if x_shape is None or getattr(call.args[0].ty, "dtype", None) != "float32":
                return call
            w = weight.value.numpy()
            if (call.op == op_matmul and w.ndim == 2 and len(x_shape) >= 2 and x_shape[-1] == w.shape[0]
                    and (pruned(w) or "matmul" in every)):
                name = f"stdeploy_event_matmul_{len(done)}"
                func = event_matmul_kernel(x_shape, w.shape[0], w.shape[1])
                arrays = [np.ascontiguousarray(w, dtype=np.float32), live_masks(w)]
                done.append(EventLayer("matmul", tuple(w.shape), x_shape, 1 - float(np.mean(w == 0)), int(np.count_nonzero(w)), name))
                return self._call(func, name, call.args[0], arrays, call.ty)
            if call.op == op_conv and w.ndim == 4 and (pruned(w) or w.shape[1] <= skipzero.STEM_CHANNELS or "conv2d" in every):
                a = call.attrs
                if (int(a.groups) != 1 or any(int(d) != 1 for d in a.dilation) or str(a.data_layout) != "NCHW"
                        or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW"):
                    return call
                stride, padding = tuple(int(v) for v in a.strides), tuple(int(v) for v in a.padding)
                if not spike.applicable(x_shape, w.shape, stride, padding):
                    return call
                ptr, taps, vals, chans = conv_columns(w)
                name = f"stdeploy_stationary_conv_{len(done)}"
                func = stationary_conv_kernel(x_shape, w.shape, padding, vals.size, chans.size)
                arrays = [ptr, _nonempty(taps, np.int32), _nonempty(vals, np.float32), _nonempty(chans, np.int32)]
                done.append(EventLayer("conv2d", tuple(w.shape), x_shape, 1 - float(np.mean(w == 0)), int(vals.size), name,
                                       padding, int(chans.size)))
                return self._call(func, name, call.args[0], arrays, call.ty)
            return call

        def _call(self, func, name, x, arrays, out_ty):
            gvar = self.builder_.add_func(func.with_attr("global_symbol", name), name)
            return relax.call_tir(gvar, [x, *(relax.const(np.ascontiguousarray(a)) for a in arrays)], out_ty)

    return rewrite_functions(mod, _Rewrite(mod)), done


def _nonempty(a: np.ndarray, dtype) -> np.ndarray:
    """``a`` as ``dtype``, or one zero where it is empty (a buffer needs at least one entry)."""
    a = np.asarray(a, dtype=dtype)
    return a if a.size else np.zeros(1, dtype)


def _main(argv=None) -> None:
    """``python -m stdeploy.targets.tvm.kernels.event``: this module's kernels against the skip-zero
    and gather kernels on the whole-model pruned sdt-tiny's layer shapes (batch 32 x 4 steps;
    random weights at the layers' weight densities, random spikes, or analog values for the stem,
    at their input densities: ``benchmarks/results/sparse_speed.md``), process CPU time, median of
    interleaved calls, one thread; outputs compared bit for bit."""
    import argparse
    import statistics
    import time

    import tvm

    from ...profiles import load_profile
    from ..host import cpu_target
    from .spike import SpikeConv, SpikeMatmul, pinned_threads

    parser = argparse.ArgumentParser(description="event / stationary kernels vs skip-zero and gather (CPU time)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    target = cpu_target(load_profile("cpu"))
    rng = np.random.default_rng(0)
    t = tvm.runtime.tensor
    build = lambda f: tvm.compile(tvm.IRModule({"main": f}), target=tvm.target.Target(target))["main"]  # noqa: E731
    # (name, x shape, weight shape, weight density, input density, analog input)
    layers = [("q/k/v", (128, 16, 64), (64, 64), 0.128, 0.015, False), ("fc1", (128, 16, 64), (64, 256), 0.144, 0.031, False),
              ("fc2", (128, 16, 256), (256, 64), 0.0083, 0.045, False),
              ("stem", (128, 1, 8, 8), (32, 1, 3, 3), 0.656, 0.521, True),
              ("stages.1", (128, 32, 8, 8), (64, 32, 3, 3), 0.0059, 0.077, False),
              ("rpe", (128, 64, 4, 4), (64, 64, 3, 3), 0.0015, 0.098, False)]
    with pinned_threads(1):
        for name, x_shape, w_shape, wd, d, analog in layers:
            w = (rng.normal(size=w_shape) * (rng.random(w_shape) < wd)).astype(np.float32)
            x = ((rng.random(x_shape) if analog else 1.0) * (rng.random(x_shape) < d)).astype(np.float32)
            if len(w_shape) == 2:
                fn = build(event_matmul_kernel(x_shape, *w_shape))
                arrays = [t(w), t(live_masks(w))]
                skip, gather = skipzero.SkipZeroMatmul(x_shape, w, target), SpikeMatmul(x_shape, w, target)
            else:
                ptr, taps, vals, chans = conv_columns(w)
                fn = build(stationary_conv_kernel(x_shape, w_shape, (1, 1, 1, 1), vals.size, chans.size))
                arrays = [t(ptr), t(_nonempty(taps, np.int32)), t(_nonempty(vals, np.float32)), t(_nonempty(chans, np.int32))]
                skip = skipzero.SkipZeroConv(x_shape, w, (1, 1, 1, 1), target)
                gather = SpikeConv(x_shape, w, (1, 1, 1, 1), target)
            xt = t(x)
            outs = [t(np.zeros(skip.out_shape, np.float32)) for _ in range(3)]
            calls = {"this": lambda: fn(xt, *arrays, outs[0]), "skip-zero": lambda: skip(xt, outs[1]),
                     "gather": lambda: gather(xt, outs[2])}
            times: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(args.repeats + 2):
                for k, call in calls.items():
                    c0 = time.process_time()
                    call()
                    times[k].append(time.process_time() - c0)
            ms = {k: statistics.median(v[2:]) * 1e3 for k, v in times.items()}
            same = all(np.array_equal(outs[0].numpy(), o.numpy()) for o in outs[1:])
            print(f"{name:9s} x {x_shape} w {w_shape} weight density {np.mean(w != 0):.4f}, input density "
                  f"{np.mean(x != 0):.3f}: this {ms['this']:.3f} ms, skip-zero {ms['skip-zero']:.3f}, gather "
                  f"{ms['gather']:.3f} (CPU); bit-identical {same}")


if __name__ == "__main__":
    _main()
