"""Schedules for the standalone CPU module: the graph's heavy operators as TIR kernels compiled
into the module (no Python callback), so ``export_library`` writes a library TVM's runtime runs alone.

:func:`route_to_tir_kernels` replaces, in the Relax graph, every ``R.matmul(x, W)`` with a constant
2-D float32 ``W`` and every stride-1 NCHW ``R.nn.conv2d`` (constant OIHW float32 weight,
``groups = 1``, no dilation, padding below the kernel size) by an ``R.call_tir`` of an adaptive
TIR kernel (:func:`adaptive_matmul_kernel`, :func:`adaptive_conv_kernel`; the weight baked in as a
constant in the kernel's layout). The density choice is made inside the kernel on every call: its
parallel parts each count their nonzero inputs and run the gather loops of :mod:`.kernels.spike`
(work in proportion to the nonzeros) up to :func:`max_density`, dense register-blocked loops
above it. Everything else (LIF recurrences, batch norm, pooling, reductions) is left to Relax's
default lowering; :func:`schedule_elementwise` then vectorises its elementwise loops.
:func:`standalone_module` does all of it: the module ``tvm.compile`` builds for a bundle.

Units: float32 tensors, densities are fractions of nonzero input values in [0, 1]. Exact for any
input values (zeros skipped, the rest multiplied); sums run in (tap, channel) order, so a membrane
within float32 rounding of its threshold can flip as with any other kernel.
``python -m stdeploy.targets.tvm.schedules`` times both paths against numpy at several densities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .kernels import spike
from .kernels.routing import rewrite_functions

__all__ = ["Routed", "route_to_tir_kernels", "standalone_module", "schedule_elementwise", "inline_injective"]


@dataclass(frozen=True)
class Routed:
    """One operator compiled as an adaptive TIR kernel: ``op`` (``matmul`` or ``conv2d``), the
    weight and output shapes, and the input density up to which it runs the gather loops."""

    op: str
    weight: tuple
    out: tuple
    max_density: float


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
                limit = max_density("matmul", w.shape[1])
                gvar = self._add(adaptive_matmul_kernel(x_shape, *w.shape, limit), f"adaptive_matmul_{len(done)}")
                done.append(Routed("matmul", w.shape, out, round(limit, 3)))
                return relax.call_tir(gvar, [call.args[0], relax.const(np.ascontiguousarray(w))], call.ty)
            if call.op == op_conv:
                a = call.attrs
                if (int(a.groups) != 1 or any(int(d) != 1 for d in a.dilation) or str(a.data_layout) != "NCHW"
                        or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW"
                        or not spike.applicable(x_shape, w.shape, _ints(a.strides), _ints(a.padding))):
                    return call
                limit = max_density("conv2d", w.shape[0] * w.shape[2] * w.shape[3])
                gvar = self._add(adaptive_conv_kernel(x_shape, w.shape, _ints(a.padding), limit), f"adaptive_conv2d_{len(done)}")
                done.append(Routed("conv2d", w.shape, out, round(limit, 3)))
                wt = np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # (KH, KW, C, O): the kernel's layout
                return relax.call_tir(gvar, [call.args[0], relax.const(wt)], call.ty)
            return call

    return rewrite_functions(mod, _Rewrite(mod)), done


VECTOR = 16             # float32 lanes the elementwise loops are vectorised in (one AVX-512 register)
MIN_PARALLEL = 4096     # elements below which an elementwise loop stays serial (a thread launch costs more)


def schedule_elementwise(mod):
    """``(new_mod, count)``: every PrimFunc of ``mod`` that is not already scheduled gets, for
    each of its blocks whose iterators are all spatial (the legalized elementwise ops, LIF
    recurrences, reshapes, concatenations), its loops fused, split into a parallel outer loop and
    a vectorised inner one of :data:`VECTOR` lanes (when the extent is a multiple of it and at
    least :data:`MIN_PARALLEL`). Blocks with a reduction (pooling, means) are left as they are.
    ``count``: the blocks scheduled."""

    def vectorise(sch, blocks) -> int:
        done = 0
        for block in blocks:
            loops = sch.get_loops(block)
            iters = sch.get(block).iter_vars
            extent = math.prod(int(sch.get(loop).extent) for loop in loops) if loops else 0
            if (not loops or any(int(iv.iter_type) != 0 for iv in iters) or extent < MIN_PARALLEL
                    or extent % VECTOR or len(loops) != len(iters)):
                continue
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            _, inner = sch.split(fused, [None, VECTOR])
            sch.vectorize(inner)
            done += 1
        return done

    return _rewrite_unscheduled(mod, vectorise, mark_scheduled=True)


def _rewrite_unscheduled(mod, rewrite, *, mark_scheduled: bool):
    """``(new_mod, count)``: ``rewrite(schedule, root_blocks) -> int`` run on every PrimFunc of
    ``mod`` that is not already scheduled and has a root block (a hand-written kernel has none);
    a function with a nonzero count is replaced (and marked ``tirx.is_scheduled`` with
    ``mark_scheduled``); ``count`` sums them."""
    import tvm
    from tvm import s_tir, tirx

    out, count = {}, 0
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
            continue
        sch = s_tir.Schedule(func)
        try:
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
        except (tvm.error.TVMError, ValueError):  # no root block: a hand-written kernel
            continue
        done = rewrite(sch, blocks)
        if done:
            out[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True) if mark_scheduled else sch.mod["main"]
            count += done
    for gvar, func in out.items():
        mod[gvar] = func
    return mod, count


def inline_injective(mod):
    """``(new_mod, count)``: in every PrimFunc of ``mod`` that is not already scheduled, the
    spatial blocks that only feed other blocks of the function (the intermediates of a fused
    chain such as add, reshape, add, reshape, transpose) are inlined into their consumers where
    their value holds no multiplication, and an output block that only copies (a reshape or
    transpose) is inlined backwards into its producer: the chain reads its inputs and writes its
    output once instead of writing and reading every intermediate. Each value is still computed
    by the same float32 operations (no multiplication is moved next to an addition, so no
    contraction into a fused multiply-add becomes possible); :func:`schedule_elementwise` then
    vectorises what is left. ``count``: the blocks inlined."""
    import tvm
    from tvm import tirx

    def has_mul(e) -> bool:
        """True where ``e`` may hold a multiplication (any expression kind not known here counts)."""
        if type(e).__name__ in ("BufferLoad", "TensorLoad") or isinstance(e, (tirx.FloatImm, tirx.IntImm, tirx.Var)):
            return False       # a load's indices are integer arithmetic: no float product
        if isinstance(e, (tirx.Add, tirx.Sub, tirx.Max, tirx.Min)):
            return has_mul(e.a) or has_mul(e.b)
        if isinstance(e, tirx.Cast):
            return has_mul(e.value)
        return True

    def inline(sch, blocks) -> int:
        if len(blocks) < 2:
            return 0
        done = 0
        for block in list(blocks)[:-1]:
            b = sch.get(block)
            if (any(int(iv.iter_type) != 0 for iv in b.iter_vars) or len(b.writes) != 1
                    or type(b.body).__name__ not in ("BufferStore", "TensorStore") or has_mul(b.body.value)):
                continue
            try:  # refused where the block writes an output of the function
                sch.compute_inline(block)
                done += 1
            except (tvm.error.TVMError, ValueError):
                continue
        left = sch.get_child_blocks(sch.get_sblock("root"))
        b = sch.get(left[-1])
        if (type(b.body).__name__ in ("BufferStore", "TensorStore") and type(b.body.value).__name__ in ("BufferLoad", "TensorLoad")
                and len(left) > 1):
            try:
                sch.reverse_compute_inline(left[-1])
                done += 1
            except (tvm.error.TVMError, ValueError):
                pass
        return done

    return _rewrite_unscheduled(mod, inline, mark_scheduled=False)


def standalone_module(mod, target: dict):
    """``(module, [Routed, ...])``: ``mod`` routed to the TIR kernels and lowered by Relax's zero
    pipeline for ``target``, ready for ``tvm.compile``."""
    import tvm
    from tvm import relax

    mod, done = route_to_tir_kernels(mod)
    with tvm.target.Target(target):
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
                                        relax.get_pipeline("zero")])(mod)
    mod, _ = schedule_elementwise(mod)
    return mod, done


# ----------------------------------------------------------------------------- the density choice, compiled in
ROW_BLOCK = 4           # rows (matmul) or output pixels (conv) that share each weight load on the dense path
CHANNEL_TILE = spike.CHANNEL_TILE
PARTS = spike.PARTS
# The density choice (fraction of nonzero inputs above which a part runs the dense loops) comes
# from a cost model in units of one dense-loop multiply-add: the gather loops pay COMPACT_COST per
# input value (the compaction) and GATHER_COST per multiply-add they do (nonzero inputs x the
# multiply-adds each feeds, ``fan_out``), the dense loops 1 per multiply-add of the whole input.
# The constants were read off ``python -m stdeploy.targets.tvm.schedules`` (both paths timed at
# several densities on sdt-tiny's shapes, one thread, on the 2-core x86-64 VM). Constants, so
# the module is the same on every build machine and for cross-compiled targets.
COMPACT_COST = 40.0
GATHER_COST = {"matmul": 3.0, "conv2d": 2.0}


def max_density(op: str, fan_out: int) -> float:
    """The density up to which the gather loops run for ``op`` (``matmul`` or ``conv2d``) whose
    every input value feeds ``fan_out`` multiply-adds (``N`` of a matmul, ``KH * KW * O`` of a
    convolution): where ``COMPACT_COST + GATHER_COST * d * fan_out = fan_out``, within [0, 1]."""
    return min(1.0, max(0.0, (fan_out - COMPACT_COST) / (GATHER_COST[op] * fan_out)))


SERIAL_MACS = 1 << 21   # multiply-adds (dense count) below which a kernel runs in one part, no thread launch


def _parts(units: int, macs: int) -> int:
    """Parallel parts of a kernel over ``units`` rows or images doing ``macs`` dense multiply-adds:
    one (a serial loop) for small calls such as a batch-1 step, where waking the thread pool costs
    more than the work, else up to :data:`PARTS`."""
    return 1 if macs < SERIAL_MACS else min(PARTS, units)


def _tile(o: int) -> int:
    """Output channels per register tile: all up to :data:`CHANNEL_TILE`, else the largest
    power-of-two divisor up to it (1 when ``o`` is odd: correct, just not vectorised)."""
    return o if o <= CHANNEL_TILE else math.gcd(o, CHANNEL_TILE)


def _block(count: int) -> int:
    """The largest of ``ROW_BLOCK``, 2, 1 that divides ``count``."""
    return next(b for b in (ROW_BLOCK, 2, 1) if count % b == 0)


def adaptive_matmul_kernel(x_shape: tuple, k: int, n: int, limit: float):
    """The TIR PrimFunc ``(x (..., K), w (K, N), y (..., N))``, ``y = x @ w`` over the rows of
    ``x``. The rows are split into parallel parts; each part counts its nonzero inputs and, at
    most ``limit`` of them nonzero, runs the gather loops (each row compacted to its
    nonzeros, then the sum of the rows of ``w`` they select, times the input), else the dense
    loops (:data:`ROW_BLOCK` rows at a time, each weight load shared by the block)."""
    from tvm.script import tirx as T

    x_shape = tuple(int(v) for v in x_shape)
    m = math.prod(x_shape[:-1])
    y_shape = (*x_shape[:-1], n)
    ot = _tile(n)
    tiles = n // ot
    parts = _parts(m, m * k * n)
    loop = T.parallel if parts > 1 else T.serial
    per = math.ceil(m / parts)
    rb = ROW_BLOCK
    limit = float(limit)

    @T.prim_func
    def adaptive_matmul(xh: T.handle, w: T.Buffer((k, n), "float32"), yh: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xn = T.match_buffer(xh, x_shape, "float32")
        yn = T.match_buffer(yh, y_shape, "float32")
        x = T.decl_buffer((m, k), "float32", data=xn.data)
        y = T.decl_buffer((m, n), "float32", data=yn.data)
        for part in loop(parts):
            nnz = T.alloc_buffer((1,), "int32")
            cnt = T.alloc_buffer((1,), "int32")
            idx = T.alloc_buffer((k + 1,), "int32")
            val = T.alloc_buffer((k + 1,), "float32")
            acc = T.alloc_buffer((ot,), "float32")
            blk = T.alloc_buffer((rb, ot), "float32")
            lo = part * per
            rows = T.min(m, lo + per) - lo
            nnz[0] = 0
            for row in range(rows):
                for i in range(k):
                    nnz[0] = nnz[0] + T.Cast("int32", x[lo + row, i] != T.float32(0))
            if T.Cast("float32", nnz[0]) <= T.float32(limit) * T.Cast("float32", rows * k):
                for row in range(lo, lo + rows):
                    cnt[0] = 0
                    for i in range(k):
                        idx[cnt[0]] = i
                        val[cnt[0]] = x[row, i]
                        cnt[0] = cnt[0] + T.Cast("int32", x[row, i] != T.float32(0))
                    for t in range(tiles):
                        for v in T.vectorized(ot):
                            acc[v] = T.float32(0)
                        for j in range(cnt[0]):
                            for v in T.vectorized(ot):
                                acc[v] = acc[v] + val[j] * w[idx[j], t * ot + v]
                        for v in T.vectorized(ot):
                            y[row, t * ot + v] = acc[v]
            else:
                for b in range(rows // rb):
                    for t in range(tiles):
                        for r in T.unroll(rb):
                            for v in T.vectorized(ot):
                                blk[r, v] = T.float32(0)
                        for i in range(k):
                            for r in T.unroll(rb):
                                for v in T.vectorized(ot):
                                    blk[r, v] = blk[r, v] + x[lo + b * rb + r, i] * w[i, t * ot + v]
                        for r in T.unroll(rb):
                            for v in T.vectorized(ot):
                                y[lo + b * rb + r, t * ot + v] = blk[r, v]
                for row in range(lo + rows // rb * rb, lo + rows):
                    for t in range(tiles):
                        for v in T.vectorized(ot):
                            acc[v] = T.float32(0)
                        for i in range(k):
                            for v in T.vectorized(ot):
                                acc[v] = acc[v] + x[row, i] * w[i, t * ot + v]
                        for v in T.vectorized(ot):
                            y[row, t * ot + v] = acc[v]

    return adaptive_matmul


def adaptive_conv_kernel(x_shape: tuple, w_shape: tuple, padding: tuple, limit: float):
    """The TIR PrimFunc ``(x (N, C, H, W), w (KH, KW, C, O), y (N, O, HO, WO))`` of a stride-1
    convolution (padding (top, left, bottom, right) below the kernel size, :func:`.spike.applicable`).
    The images are split into parallel parts; each part counts its nonzero inputs and, at most
    ``limit`` of them nonzero, runs the gather loops (per image, each input pixel's nonzero
    channels listed, then every output pixel sums ``value * w[i, j, channel, :]`` over the lists
    under its taps), else the dense loops (the image copied channels-last into a zero border,
    then :data:`ROW_BLOCK` output pixels of a row at a time share each weight load). The output
    image is built channels-last, then written NCHW."""
    from tvm.script import tirx as T

    n, c, h, w = (int(v) for v in x_shape)
    o, _, kh, kw = (int(v) for v in w_shape)
    top, left, bottom, right = (int(v) for v in padding)
    ho, wo = h + top + bottom - kh + 1, w + left + right - kw + 1
    ph, pw = ho + kh - 1, wo + kw - 1          # the padded grid: input (r, q) at (r + top, q + left)
    ot = _tile(o)
    tiles = o // ot
    parts = _parts(n, n * ho * wo * kh * kw * c * o)
    loop = T.parallel if parts > 1 else T.serial
    per = math.ceil(n / parts)
    pb = _block(wo)
    limit = float(limit)

    @T.prim_func
    def adaptive_conv(x: T.Buffer((n, c, h, w), "float32"), wt: T.Buffer((kh, kw, c, o), "float32"),
                      y: T.Buffer((n, o, ho, wo), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for part in loop(parts):
            nnz = T.alloc_buffer((1,), "int32")
            cnt = T.alloc_buffer((ph, pw), "int32")          # nonzero channels of each input pixel
            idx = T.alloc_buffer((ph, pw, c + 1), "int32")   # their indices (+1: the branch-free write)
            val = T.alloc_buffer((ph, pw, c + 1), "float32")
            pad = T.alloc_buffer((ph, pw, c), "float32")     # the dense path's channels-last padded image
            img = T.alloc_buffer((ho * wo, o), "float32")    # one output image, channels-last
            acc = T.alloc_buffer((ot,), "float32")
            blk = T.alloc_buffer((pb, ot), "float32")
            lo = part * per
            hi = T.min(n, lo + per)
            nnz[0] = 0
            for b in range(lo, hi):
                for ch in range(c):
                    for r in range(h):
                        for q in range(w):
                            nnz[0] = nnz[0] + T.Cast("int32", x[b, ch, r, q] != T.float32(0))
            if T.Cast("float32", nnz[0]) <= T.float32(limit) * T.Cast("float32", (hi - lo) * (c * h * w)):
                for r in range(ph):
                    for q in range(pw):
                        cnt[r, q] = 0                        # the border stays empty
                for b in range(lo, hi):
                    for r in range(h):
                        for q in range(w):
                            cnt[r + top, q + left] = 0
                    for ch in range(c):
                        for r in range(h):
                            for q in range(w):
                                idx[r + top, q + left, cnt[r + top, q + left]] = ch
                                val[r + top, q + left, cnt[r + top, q + left]] = x[b, ch, r, q]
                                cnt[r + top, q + left] = cnt[r + top, q + left] + T.Cast("int32", x[b, ch, r, q] != T.float32(0))
                    for t in range(tiles):
                        for r in range(ho):
                            for q in range(wo):
                                for v in T.vectorized(ot):
                                    acc[v] = T.float32(0)
                                for i in T.unroll(kh):
                                    for j in T.unroll(kw):
                                        for e in range(cnt[r + i, q + j]):
                                            for v in T.vectorized(ot):
                                                acc[v] = acc[v] + val[r + i, q + j, e] * wt[i, j, idx[r + i, q + j, e], t * ot + v]
                                for v in T.vectorized(ot):
                                    img[r * wo + q, t * ot + v] = acc[v]
                    for v in range(o):
                        for p in range(ho * wo):
                            y[b, v, p // wo, p % wo] = img[p, v]
            else:
                for r in range(ph):
                    for q in range(pw):
                        for ch in range(c):
                            pad[r, q, ch] = T.float32(0)
                for b in range(lo, hi):
                    for r in range(h):
                        for q in range(w):
                            for ch in range(c):
                                pad[r + top, q + left, ch] = x[b, ch, r, q]
                    for t in range(tiles):
                        for r in range(ho):
                            for q0 in range(wo // pb):
                                for p in T.unroll(pb):
                                    for v in T.vectorized(ot):
                                        blk[p, v] = T.float32(0)
                                for i in T.unroll(kh):
                                    for j in T.unroll(kw):
                                        for ch in range(c):
                                            for p in T.unroll(pb):
                                                for v in T.vectorized(ot):
                                                    blk[p, v] = blk[p, v] + pad[r + i, q0 * pb + p + j, ch] * wt[i, j, ch, t * ot + v]
                                for p in T.unroll(pb):
                                    for v in T.vectorized(ot):
                                        img[r * wo + q0 * pb + p, t * ot + v] = blk[p, v]
                    for v in range(o):
                        for p in range(ho * wo):
                            y[b, v, p // wo, p % wo] = img[p, v]

    return adaptive_conv


def _main(argv=None) -> None:
    """Both paths of the adaptive kernels timed at several input densities on sdt-tiny's shapes
    (batch 32, T = 4), each checked against numpy: the figures the cost model's constants
    (:data:`COMPACT_COST`, :data:`GATHER_COST`) are read from."""
    import argparse
    import time

    import tvm

    from ..profiles import load_profile
    from .host import cpu_target

    parser = argparse.ArgumentParser(description=_main.__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    target = cpu_target(load_profile("cpu"))
    print(f"target {target}; fastest of {args.repeats} calls each (the machine is shared: the minimum is the least disturbed)")
    rng = np.random.default_rng(0)
    cases = [("conv", (128, 32, 8, 8), (64, 32, 3, 3)), ("conv", (128, 64, 4, 4), (64, 64, 3, 3)),
             ("matmul", (4, 32, 16, 64), (64, 256)), ("matmul", (4, 32, 16, 256), (256, 64))]
    for kind, x_shape, w_shape in cases:
        w = rng.standard_normal(w_shape).astype(np.float32)
        fns = {}
        for path, limit in (("gather", 2.0), ("dense", -1.0)):
            if kind == "conv":
                func = adaptive_conv_kernel(x_shape, w_shape, (1, 1, 1, 1), limit)
                wt = tvm.runtime.tensor(np.ascontiguousarray(w.transpose(2, 3, 1, 0)))
            else:
                func = adaptive_matmul_kernel(x_shape, *w_shape, limit)
                wt = tvm.runtime.tensor(w)
            fns[path] = (tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(target))["main"], wt)
        print(f"  {kind} x {x_shape} w {w_shape}")
        for d in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0):
            x = (rng.random(x_shape) < d).astype(np.float32)
            if kind == "conv":
                from .kernels.blas import conv2d_nchw

                ref = conv2d_nchw(x, w, (1, 1), (1, 1, 1, 1))
            else:
                ref = x @ w
            xt, yt = tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros(ref.shape, np.float32))
            row = []
            for path, (fn, wt) in fns.items():
                fn(xt, wt, yt)
                err = float(np.abs(yt.numpy() - ref).max())
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    fn(xt, wt, yt)
                    times.append(time.perf_counter() - t0)
                row.append(f"{path} {min(times) * 1e3:7.3f} ms (max |diff| {err:.1e})")
            print(f"    ones {d:4.0%}: " + "  ".join(row))
        fan_out = w_shape[1] if kind == "matmul" else w_shape[0] * w_shape[2] * w_shape[3]
        print(f"    the module runs the gather loops up to {max_density('conv2d' if kind == 'conv' else 'matmul', fan_out):.0%} ones")


if __name__ == "__main__":
    _main()
