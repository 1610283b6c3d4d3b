"""Kernels that skip zero inputs *and* zero weights: pruned convolutions and linear layers fed
spikes, on the CPU (TIR).

The gather kernels of :mod:`.spike` skip zero inputs and multiply every weight of the rows they
gather, zero or not; the CSR kernel of :mod:`.sparse` skips zero weights and multiplies every
input. Here, for each nonzero input, only the nonzero weights of its weight row are added: the
weight is stored as CSR over its **input rows** (:class:`RowCSR`; for ``y = x @ W`` with ``W`` of
shape ``(K, N)`` the rows of ``W``, i.e. the CSC form of the torch weight ``W.T``; for a convolution
the ``(tap i, tap j, input channel c)`` rows of the ``(KH, KW, C, O)`` weight), and the kernel
scatters ``value * w`` into an accumulator of the output row (all ``N`` outputs, or all ``O``
channels of one output pixel). Work: the nonzero inputs times the nonzeros of their weight rows,
plus a fixed cost for reading ``x`` and writing ``y``.

* :func:`skipzero_matmul_kernel`: ``x (..., K) -> y (..., N)``; for each row of ``x``, its
  nonzeros are compacted (branch-free, ascending ``k``), then each adds its weight row's nonzeros.
* :func:`skipzero_conv_kernel`: NCHW / OIHW, stride 1, ``groups = 1``, padding below the kernel
  size (as :func:`.spike.applicable`); only the weight rows ``(i, j, c)`` with a nonzero are
  visited, and only the input channels they use are read: per image each such channel is copied
  into a zero-bordered plane, then for each row (tap, then channel) each of the row's nonzero
  weights adds ``weight x`` the shifted plane to its output channel's plane, in vectors along the
  output row (weight-stationary: work grows with the nonzero weights, not with the input's
  nonzeros; a zero input adds ``0 x weight``, which leaves a nonzero sum unchanged).

Arithmetic: each output sums its terms in the same order as the gather kernels (tap, then input
channel / feature ascending), one fused multiply-add each, and a skipped term is one whose weight
is zero, which adds nothing to a float32 sum (``fma(x, 0, acc) == acc``; in the convolution a
zero input is added too, ``fma(0, w, acc) == acc``, up to the sign of a zero sum): the outputs
are bit-identical to the gather kernel's (the tests check it), so spikes are too.

Which kernel runs (:func:`adaptive_matmul`, :func:`adaptive_conv`): both spike kernels (gather and
skip-zero) are timed against BLAS by the rule of :func:`.spike.crossover` (all-zero input,
:data:`~.spike.CALIBRATION_DENSITY` ones, BLAS; medians of interleaved rounds, threads pinned), the
thresholds kept in the :class:`~stdeploy.targets.tvm.database.CrossoverCache` (the skip-zero one
keyed by the weight's zero pattern as well, :func:`zero_pattern`: its time depends on it). Each
call then estimates its input's density (:func:`.spike.density`) and runs whichever of the three
the two measured lines and BLAS's time predict fastest at that density; ``stats`` counts each.
Layers whose weight has fewer than :data:`MIN_WEIGHT_ZEROS` zeros take the gather kernel alone
(routing: :func:`applies`), except convolutions with at most :data:`STEM_CHANNELS` input channels
(an image stem fed analog values): there the weight-stationary loop beats the gather kernel even
on a dense weight (``python -m stdeploy.targets.tvm.kernels.event`` times both on sdt-tiny's
first convolution), and the measured choice decides.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ....errors import ShapeError
from ..database import Crossover, CrossoverCache, CrossoverKey
from ..sdk import load_tvm
from . import spike
from .blas import blas_conv2d, blas_matmul

__all__ = ["MIN_WEIGHT_ZEROS", "STEM_CHANNELS", "KERNEL_VERSION", "RowCSR", "rows_from_dense", "zero_pattern", "applies",
           "skipzero_matmul_kernel", "skipzero_conv_kernel", "SkipZeroMatmul", "SkipZeroConv", "AdaptiveSparse",
           "adaptive_matmul", "adaptive_conv"]

MIN_WEIGHT_ZEROS = 0.5   # weights with fewer zeros than this keep the gather kernel alone ...
STEM_CHANNELS = 4        # ... unless a convolution's with at most this many input channels
KERNEL_VERSION = 4       # part of a cached crossover's key: raise it when a kernel here changes
PARTS = spike.PARTS      # parallel tasks per call (rows or images are split between them)


@dataclass(frozen=True, eq=False)
class RowCSR:
    """A weight as CSR over its input rows: row ``r``'s nonzeros are ``vals[ptr[r]:ptr[r+1]]`` at
    output columns ``cols[ptr[r]:ptr[r+1]]`` (ascending). ``shape`` is ``(rows, outputs)``. Arrays
    are read-only int32 / float32."""

    ptr: np.ndarray       # (rows + 1,) int32, rises from 0 to nnz
    cols: np.ndarray      # (nnz,) int32 in [0, outputs)
    vals: np.ndarray      # (nnz,) float32, no zeros
    shape: tuple[int, int]
    nnz: int = field(init=False)

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ShapeError(f"RowCSR: shape must be (rows, outputs) >= 1, got {self.shape}")
        ptr, cols, vals = (np.asarray(a) for a in (self.ptr, self.cols, self.vals))
        nnz = cols.shape[0] if cols.ndim == 1 else -1
        if ptr.shape != (shape[0] + 1,) or vals.shape != cols.shape or nnz < 0:
            raise ShapeError(f"RowCSR {shape}: ptr must be ({shape[0] + 1},), cols and vals 1-D alike; got "
                             f"{ptr.shape}, {cols.shape}, {vals.shape}")
        if ptr[0] != 0 or ptr[-1] != nnz or np.any(np.diff(ptr) < 0):
            raise ShapeError(f"RowCSR {shape}: ptr must rise from 0 to nnz = {nnz}")
        if nnz and (cols.min() < 0 or cols.max() >= shape[1]):
            raise ShapeError(f"RowCSR {shape}: cols must lie in [0, {shape[1]})")
        for name, a, dtype in (("ptr", ptr, np.int32), ("cols", cols, np.int32), ("vals", vals, np.float32)):
            a = np.ascontiguousarray(a, dtype=dtype)
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "nnz", int(nnz))

    def to_dense(self) -> np.ndarray:
        """The ``(rows, outputs)`` float32 matrix."""
        w = np.zeros(self.shape, np.float32)
        w[np.repeat(np.arange(self.shape[0]), np.diff(self.ptr)), self.cols] = self.vals
        return w


def rows_from_dense(w: np.ndarray) -> RowCSR:
    """:class:`RowCSR` of a 2-D weight ``(rows, outputs)``: exact zeros dropped. (A convolution's
    ``(O, C, KH, KW)`` weight enters as ``w.transpose(2, 3, 1, 0).reshape(-1, O)``.)"""
    w = np.asarray(w)
    if w.ndim != 2 or min(w.shape) < 1 or not np.issubdtype(w.dtype, np.number):
        raise ShapeError(f"rows_from_dense: expected a real 2-D weight (rows, outputs), got {w.dtype} {w.shape}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    mask = w != 0
    ptr = np.zeros(w.shape[0] + 1, np.int64)
    np.cumsum(mask.sum(axis=1), out=ptr[1:])
    rows, cols = np.nonzero(mask)   # row-major: ascending columns within a row
    return RowCSR(ptr=ptr, cols=cols, vals=w[rows, cols], shape=w.shape)


def zero_pattern(weight: np.ndarray) -> str:
    """A digest of which entries of ``weight`` are zero, with its shape (the skip-zero kernel's time
    depends on it; part of its crossover's cache key)."""
    w = np.asarray(weight)
    h = hashlib.sha256(str(tuple(w.shape)).encode())
    h.update(np.packbits(w.reshape(-1) != 0).tobytes())
    return h.hexdigest()[:16]


def applies(weight: np.ndarray) -> bool:
    """True where the weight has at least :data:`MIN_WEIGHT_ZEROS` zeros, or is an ``(O, C, KH, KW)``
    convolution weight with ``C <= STEM_CHANNELS`` (the routing rule)."""
    w = np.asarray(weight)
    if w.size == 0:
        return False
    return float(np.mean(w == 0)) >= MIN_WEIGHT_ZEROS or (w.ndim == 4 and w.shape[1] <= STEM_CHANNELS)


# --------------------------------------------------------------------------------------------
# The TIR kernels


def skipzero_matmul_kernel(x_shape: tuple, k: int, n: int, nnz: int):
    """The TIR PrimFunc ``(x (..., K), ptr (K + 1), cols (nnz), vals (nnz), y (..., N))``."""
    from tvm.script import tirx as T

    x_shape = tuple(int(v) for v in x_shape)
    m = math.prod(x_shape[:-1])
    y_shape = (*x_shape[:-1], n)
    parts = min(PARTS, m)
    per = math.ceil(m / parts)
    p = max(1, nnz)

    @T.prim_func
    def skipzero_matmul(xh: T.handle, ptr: T.Buffer((k + 1,), "int32"), cols: T.Buffer((p,), "int32"),
                        vals: T.Buffer((p,), "float32"), yh: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xn = T.match_buffer(xh, x_shape, "float32")
        yn = T.match_buffer(yh, y_shape, "float32")
        x = T.decl_buffer((m, k), "float32", data=xn.data)
        y = T.decl_buffer((m, n), "float32", data=yn.data)
        for part in T.parallel(parts):
            cnt = T.alloc_buffer((1,), "int32")
            idx = T.alloc_buffer((k + 1,), "int32")
            val = T.alloc_buffer((k + 1,), "float32")
            acc = T.alloc_buffer((n,), "float32")
            for row in range(part * per, T.min(m, part * per + per)):
                cnt[0] = 0
                for i in range(k):
                    idx[cnt[0]] = i
                    val[cnt[0]] = x[row, i]
                    cnt[0] = cnt[0] + T.Cast("int32", x[row, i] != T.float32(0))
                for v in T.vectorized(n):
                    acc[v] = T.float32(0)
                for j in range(cnt[0]):
                    for e in range(ptr[idx[j]], ptr[idx[j] + 1]):
                        acc[cols[e]] = acc[cols[e]] + val[j] * vals[e]
                for v in T.vectorized(n):
                    y[row, v] = acc[v]

    return skipzero_matmul


def skipzero_conv_kernel(x_shape: tuple, w_shape: tuple, padding: tuple, nnz: int, live: int, channels: int):
    """The TIR PrimFunc ``(x (N, C, H, W), ptr (KH*KW*C + 1), cols (nnz), vals (nnz), rows (live),
    chans (channels), y (N, O, HO, WO))``; weight row ``(i * KW + j) * C + c`` holds the nonzero
    ``W[:, c, i, j]``, ``rows`` lists the rows with any nonzero (ascending), ``chans`` the input
    channels that appear in them. Per image: each listed channel is copied into a plane with a
    zero border (input ``(r, q)`` at ``(r + top, q + left)``); then for each listed row, i.e. tap
    ``(i, j)`` then channel, each of its nonzero weights adds ``weight x plane[r + i, q + j]`` to
    output ``(r, q)`` of its channel, a vector along ``q``. Per output the terms come in tap order,
    then channel order: the gather kernel's order."""
    from tvm.script import tirx as T

    n, c, h, w = (int(v) for v in x_shape)
    o, _, kh, kw = (int(v) for v in w_shape)
    top, left, _, _ = (int(v) for v in padding)
    ho, wo = spike.conv_out_hw(x_shape, w_shape, padding)
    parts = min(PARTS, n)
    per = math.ceil(n / parts)
    rows = kh * kw * c
    p, lr, lc = max(1, nnz), max(1, live), max(1, channels)
    ph, pw = ho + kh - 1, wo + kw - 1          # input (r, q) at (r + top, q + left), zeros around

    @T.prim_func
    def skipzero_conv(x: T.Buffer((n, c, h, w), "float32"), ptr: T.Buffer((rows + 1,), "int32"),
                      cols: T.Buffer((p,), "int32"), vals: T.Buffer((p,), "float32"),
                      live_rows: T.Buffer((lr,), "int32"), chans: T.Buffer((lc,), "int32"),
                      y: T.Buffer((n, o, ho, wo), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for part in T.parallel(parts):
            pad = T.alloc_buffer((c, ph, pw), "float32")     # the used channels of one image, zero border
            for ch in range(c):
                for r in range(ph):
                    for q in range(pw):
                        pad[ch, r, q] = T.float32(0)
            for b in range(part * per, T.min(n, part * per + per)):
                for li in range(channels):
                    for r in range(h):
                        for q in T.vectorized(w):
                            pad[chans[li], r + top, q + left] = x[b, chans[li], r, q]
                for v in range(o):
                    for r in range(ho):
                        for q in T.vectorized(wo):
                            y[b, v, r, q] = T.float32(0)
                for l in range(live):
                    for e in range(ptr[live_rows[l]], ptr[live_rows[l] + 1]):
                        for r in range(ho):
                            for q in T.vectorized(wo):
                                y[b, cols[e], r, q] = y[b, cols[e], r, q] + pad[live_rows[l] % c, r + live_rows[l] // c // kw,
                                                                                q + live_rows[l] // c % kw] * vals[e]

    return skipzero_conv


# --------------------------------------------------------------------------------------------
# Compiled kernels


class _SkipZeroKernel:
    """A PrimFunc compiled for the CPU target with its weight's :class:`RowCSR` arrays bound."""

    def _build(self, func, csr: RowCSR, extra: list | None = None) -> None:
        tvm = load_tvm()
        t0 = time.perf_counter()
        self._fn = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(self.target))["main"]
        self.compile_seconds = time.perf_counter() - t0
        self.csr = csr
        pad = lambda a, dtype: a if a.size else np.zeros(1, dtype)  # noqa: E731 (an empty weight: one dummy entry)
        self._arrays = [tvm.runtime.tensor(csr.ptr), tvm.runtime.tensor(pad(csr.cols, np.int32)),
                        tvm.runtime.tensor(pad(csr.vals, np.float32))]
        self._arrays += [tvm.runtime.tensor(pad(a, np.int32)) for a in (extra or [])]

    def __call__(self, x, out) -> None:
        """``x``, ``out``: TVM tensors of the compiled shapes."""
        self._fn(x, *self._arrays, out)


@dataclass
class SkipZeroMatmul(_SkipZeroKernel):
    """The skip-zero kernel compiled for one linear layer ``x (..., K) @ W (K, N)``."""

    x_shape: tuple
    weight: np.ndarray    # (K, N)
    target: object

    def __post_init__(self):
        self.x_shape = tuple(int(v) for v in self.x_shape)
        k, n = self.weight.shape
        if self.x_shape[-1] != k:
            raise ShapeError(f"skip-zero matmul: x {self.x_shape} does not contract with W {self.weight.shape}")
        csr = rows_from_dense(self.weight)
        self._build(skipzero_matmul_kernel(self.x_shape, k, n, csr.nnz), csr)
        self.out_shape = (*self.x_shape[:-1], n)


@dataclass
class SkipZeroConv(_SkipZeroKernel):
    """The skip-zero kernel compiled for one convolution (weight ``(O, C, KH, KW)``)."""

    x_shape: tuple
    weight: np.ndarray
    padding: tuple
    target: object

    def __post_init__(self):
        self.x_shape, self.padding = tuple(int(v) for v in self.x_shape), tuple(int(v) for v in self.padding)
        if not spike.applicable(self.x_shape, self.weight.shape, (1, 1), self.padding):
            raise ShapeError(f"skip-zero conv: x {self.x_shape}, W {self.weight.shape}, padding {self.padding}: "
                             f"only stride 1, groups 1, padding below the kernel size")
        o, c = self.weight.shape[:2]
        csr = rows_from_dense(self.weight.transpose(2, 3, 1, 0).reshape(-1, o))
        live = np.flatnonzero(np.diff(csr.ptr)).astype(np.int32)          # rows with a nonzero, ascending
        chans = np.unique(live % c).astype(np.int32)
        self._build(skipzero_conv_kernel(self.x_shape, self.weight.shape, self.padding, csr.nnz, live.size, chans.size),
                    csr, [live, chans])
        self.out_shape = (self.x_shape[0], o, *spike.conv_out_hw(self.x_shape, self.weight.shape, self.padding))


# --------------------------------------------------------------------------------------------
# The adaptive choice: gather, skip-zero or BLAS per call


def _predicted(c: Crossover, d: float) -> float:
    """Seconds a spike kernel is predicted to take at input density ``d`` (its two measured points)."""
    return c.fixed_s + (c.busy_s - c.fixed_s) * d / c.calibration_density


@dataclass
class AdaptiveSparse:
    """One layer's three candidates and the measurements that choose among them per call.

    Read by the build info like a :class:`.spike.SpikeConv`: ``max_density`` (up to which a spike
    kernel, gather or skip-zero, is predicted faster than BLAS), ``threshold_source`` (``measured``
    where this build timed either kernel, else ``cached``), ``crossover`` (the skip-zero kernel's),
    ``stats`` (calls per path: ``skipzero``, ``gather``, ``blas``), ``compile_seconds``;
    ``gather_crossover`` holds the gather kernel's measurement. ``forced`` (None: chosen per call)
    pins every call to one path (``skipzero``, ``gather`` or ``blas``: tests, per-path timings)."""

    gather: object               # spike.SpikeConv / SpikeMatmul
    skipzero: _SkipZeroKernel
    blas: object                 # the BLAS packed function (x, w, out)
    crossover: Crossover
    gather_crossover: Crossover
    threshold_source: str
    stats: dict = field(default_factory=lambda: {"skipzero": 0, "gather": 0, "blas": 0})
    forced: str | None = None

    def __post_init__(self):
        self.weight, self.x_shape, self.target = self.gather.weight, self.gather.x_shape, self.gather.target
        self.sample, self.out_shape = self.gather.sample, self.gather.out_shape
        self.compile_seconds = self.gather.compile_seconds + self.skipzero.compile_seconds
        dense = min(self.crossover.dense_s, self.gather_crossover.dense_s)
        self.max_density = max(self._reach(self.crossover, dense), self._reach(self.gather_crossover, dense))

    @staticmethod
    def _reach(c: Crossover, dense: float) -> float:
        """The density up to which kernel ``c`` is predicted faster than BLAS's ``dense`` seconds."""
        if dense <= c.fixed_s:
            return 0.0
        if c.busy_s <= c.fixed_s:
            return 1.0
        return min(1.0, c.calibration_density * (dense - c.fixed_s) / (c.busy_s - c.fixed_s))

    def choose(self, d: float) -> str:
        """``skipzero``, ``gather`` or ``blas``: the predicted fastest at input density ``d``."""
        times = {"skipzero": _predicted(self.crossover, d), "gather": _predicted(self.gather_crossover, d),
                 "blas": min(self.crossover.dense_s, self.gather_crossover.dense_s)}
        return min(times, key=times.get)

    def run(self, x, w, out) -> None:
        """The packed function's body: ``x``, ``w`` (the dense weight, for BLAS), ``out``: TVM tensors."""
        path = self.forced or self.choose(spike.density(np.from_dlpack(x), *self.sample))
        self.stats[path] += 1
        if path == "skipzero":
            self.skipzero(x, out)
        elif path == "gather":
            self.gather(x, out)
        else:
            self.blas(x, w, out)


def _measure(kernel, blas, kind: str, key: CrossoverKey, crossovers: CrossoverCache | None,
             threads: int, blas_count: int) -> tuple[Crossover, bool]:
    """(crossover, measured now?) of ``kernel`` against ``blas``: from the cache, else timed."""
    tvm = load_tvm()
    found = crossovers.get(key) if crossovers is not None else None
    if found is not None:
        return found, False
    w = tvm.runtime.tensor(np.ascontiguousarray(kernel.weight, dtype=np.float32))
    out = tvm.runtime.tensor(np.zeros(kernel.out_shape, np.float32))
    found = spike.crossover(lambda x: kernel(x, out), lambda x: blas(x, w, out), kernel.x_shape, threads, blas_count)
    if crossovers is not None:
        crossovers.put(key, found)
    return found, True


_ids = itertools.count()
_live: list = []   # kernels alive as long as their packed functions are registered


def _adaptive(gather, skipzero, blas, kind: str, crossovers: CrossoverCache | None, threads: int | None):
    import dataclasses

    import tvm_ffi

    threads = spike.runtime_threads() if threads is None else int(threads)
    blas_count = spike.blas_threads()
    gather_key = spike.crossover_key(gather, f"spike{kind}", threads, blas_count)
    skip_key = dataclasses.replace(gather_key, kind=f"skipzero{kind}", kernel_version=KERNEL_VERSION,
                                   weights=zero_pattern(gather.weight))
    gather_c, g_new = _measure(gather, blas, kind, gather_key, crossovers, threads, blas_count)
    skip_c, s_new = _measure(skipzero, blas, kind, skip_key, crossovers, threads, blas_count)
    gather.crossover, gather.max_density = gather_c, gather_c.max_density
    gather.threshold_source = "measured" if g_new else "cached"
    chosen = AdaptiveSparse(gather, skipzero, blas, skip_c, gather_c, "measured" if (g_new or s_new) else "cached")
    name = f"stdeploy.skipzero{kind}.{next(_ids)}"
    tvm_ffi.register_global_func(name, chosen.run, override=True)
    _live.append(chosen)
    return name, chosen


def adaptive_matmul(x_shape: tuple, weight: np.ndarray, target, crossovers: CrossoverCache | None = None,
                    threads: int | None = None):
    """``(name, AdaptiveSparse)``: a packed function ``(x, w, out)`` registered under ``name`` for a
    linear layer ``x (..., K) @ weight (K, N)`` that runs, per call, the skip-zero kernel, the gather
    kernel or BLAS, whichever is predicted fastest at the call's input density (see the module
    docstring); thresholds read from ``crossovers`` or measured into it."""
    weight = np.asarray(weight, dtype=np.float32)
    x_shape = tuple(int(v) for v in x_shape)
    gather = spike.SpikeMatmul(x_shape, weight, target)
    return _adaptive(gather, SkipZeroMatmul(x_shape, weight, target), blas_matmul, "matmul", crossovers, threads)


def adaptive_conv(x_shape: tuple, weight: np.ndarray, padding: tuple, target, crossovers: CrossoverCache | None = None,
                  threads: int | None = None):
    """:func:`adaptive_matmul` for a stride-1 NCHW convolution (``weight`` ``(O, C, KH, KW)``)."""
    weight = np.asarray(weight, dtype=np.float32)
    x_shape, padding = tuple(int(v) for v in x_shape), tuple(int(v) for v in padding)
    gather = spike.SpikeConv(x_shape, weight, padding, target)
    return _adaptive(gather, SkipZeroConv(x_shape, weight, padding, target), blas_conv2d((1, 1), padding), "conv",
                     crossovers, threads)


def _main(argv=None) -> None:
    """``python -m stdeploy.targets.tvm.kernels.skipzero``: the skip-zero and gather convolutions
    on the pruned sdt-tiny's two spike-fed convolution shapes (random weights at the given weight
    density, random spikes at the given input density), process CPU time, median of interleaved calls."""
    import argparse
    import statistics

    import tvm

    from ...profiles import load_profile
    from ..host import cpu_target

    parser = argparse.ArgumentParser(description="skip-zero vs gather convolution (CPU time)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    target = cpu_target(load_profile("cpu"))
    rng = np.random.default_rng(0)
    # (x shape, weight shape, weight density, input density): benchmarks/results/sparse_speed.md's layers
    for x_shape, w_shape, wd, d in (((128, 32, 8, 8), (64, 32, 3, 3), 0.0059, 0.077),
                                    ((128, 64, 4, 4), (64, 64, 3, 3), 0.0015, 0.098)):
        w = rng.normal(size=w_shape).astype(np.float32) * (rng.random(w_shape) < wd)
        x = (rng.random(x_shape) < d).astype(np.float32)
        skip, gather = SkipZeroConv(x_shape, w, (1, 1, 1, 1), target), spike.SpikeConv(x_shape, w, (1, 1, 1, 1), target)
        xt = tvm.runtime.tensor(x)
        outs = [tvm.runtime.tensor(np.zeros(skip.out_shape, np.float32)) for _ in range(2)]
        times: dict[str, list[float]] = {"skip-zero": [], "gather": []}
        for _ in range(args.repeats + 2):
            for (name, kernel), out in zip((("skip-zero", skip), ("gather", gather)), outs):
                c0 = time.process_time()
                kernel(xt, out)
                times[name].append(time.process_time() - c0)
        same = np.array_equal(outs[0].numpy(), outs[1].numpy())
        s, g = (statistics.median(times[k][2:]) * 1e3 for k in ("skip-zero", "gather"))
        print(f"x {x_shape} w {w_shape} weight density {np.mean(w != 0):.4f}, input density {np.mean(x != 0):.3f}: "
              f"skip-zero {s:.3f} ms, gather {g:.3f} ms CPU (x{g / s:.2f}); bit-identical {same}")


if __name__ == "__main__":
    _main()
