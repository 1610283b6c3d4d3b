"""Accumulate-only convolutions and linear layers for spike inputs on the CPU: TIR kernels that
skip zero inputs, switching to BLAS where the input is dense enough that BLAS is faster.

Convolution (:class:`SpikeConv`, :func:`adaptive_conv`; NCHW input, OIHW weight, stride 1,
``groups = 1``, padding at most ``kernel - 1`` on each side: :func:`applicable`). Per image the
kernel compacts the input (for each input pixel, the list of its nonzero channels and their
values, written branch-free), then each output pixel keeps a tile of up to
:data:`CHANNEL_TILE` output channels in vector registers and, for each of the ``KH x KW`` taps,
adds ``value * W[i, j, channel, :]`` for the listed channels of the pixel under the tap (a zero
border of empty lists stands for the padding). The result is stored channels-last, then
written NCHW. Work grows with the number of nonzero inputs, not with the input size.

Linear layer (:class:`SpikeMatmul`, :func:`adaptive_matmul`): the one-tap case; each row of
``x (..., K)`` is compacted, then ``y = sum x[k] * W[k, :]`` over its nonzeros.

Where BLAS overtakes the gather kernel depends on the shape, and the density is only known at
run time. So the adaptive functions measure, once per shape, the kernel at 0 % and
:data:`CALIBRATION_DENSITY` ones and BLAS (:func:`crossover`), take the density where the costs
cross as ``max_density``, and every call estimates its input's density (fraction of nonzero
values, from :data:`SAMPLE_IMAGES` images or :data:`SAMPLE_ROWS` rows) and runs the kernel up to
that threshold, BLAS above it; ``stats`` counts each path.

The measurement is made stable: the three candidates are timed by one rule
(:func:`stdeploy.timing.time_candidates`: :data:`CALIBRATION_WARMUP` untimed calls each, then
:data:`CALIBRATION_REPEATS` interleaved rounds, median) with the thread count pinned
(:func:`pinned_threads`: TVM's pool, numpy's BLAS and torch, when loaded, all at the count the
module runs with; restored afterwards), and done once per (shape, CPU model, LLVM CPU, TVM and
BLAS thread counts, :data:`KERNEL_VERSION`): given a :class:`~stdeploy.targets.tvm.database.CrossoverCache`, a
threshold measured before is read back instead of measured again. Each kernel records where its
threshold came from (``threshold_source``: ``measured``, ``cached`` or ``given``) and the
measurement (``crossover``).

Exact for any input values (zeros skipped, the rest multiplied); the sum runs in (tap, channel)
order, which differs from PyTorch's, so a membrane within float32 rounding of its threshold can
flip as with any other kernel (the tests compare spikes with PyTorch).
``python -m stdeploy.targets.tvm.kernels.spike`` times the kernel against im2col + BLAS here.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from ....timing import time_candidates
from ...profiles import load_profile
from ..database import Crossover, CrossoverCache, CrossoverKey, cpu_model
from ..host import cpu_target
from ..sdk import load_tvm
from .blas import blas_conv2d, blas_matmul, conv2d_nchw

CHANNEL_TILE = 64       # output channels kept in registers at once (8 AVX2 vectors)
PARTS = 8               # parallel tasks per call (images are split between them)
LANES = 16              # float32 per vector step (one AVX-512 or two AVX2 registers)
SAMPLE_IMAGES = 16      # images whose nonzeros estimate a convolution call's density
SAMPLE_ROWS = 256       # rows whose nonzeros estimate a matmul call's density
CALIBRATION_DENSITY = 0.25
CALIBRATION_WARMUP = 2  # untimed calls of each candidate before the crossover is timed
CALIBRATION_REPEATS = 7  # interleaved timed rounds; the median of each candidate is compared
KERNEL_VERSION = 1      # part of a cached crossover's key: raise it when a gather kernel changes


def applicable(x_shape: tuple, w_shape: tuple, stride: tuple, padding: tuple, groups: int = 1) -> bool:
    """True for an NCHW conv the kernel handles: stride 1, no groups, padding < kernel size."""
    if len(x_shape) != 4 or len(w_shape) != 4 or groups != 1 or tuple(stride) != (1, 1):
        return False
    kh, kw = w_shape[2:]
    top, left, bottom, right = padding
    return x_shape[1] == w_shape[1] and max(top, bottom) < kh and max(left, right) < kw


def _channel_tile(o: int) -> int:
    """Output channels per register tile: all of them up to 64, else the largest power-of-two
    divisor up to 64 (1 when ``o`` is odd: correct, just not vectorised)."""
    if o <= CHANNEL_TILE:
        return o
    return math.gcd(o, CHANNEL_TILE)


def conv_out_hw(x_shape: tuple, w_shape: tuple, padding: tuple) -> tuple[int, int]:
    """``(HO, WO)`` of a stride-1 convolution of ``x_shape`` (NCHW) by ``w_shape`` (OIHW) with
    ``padding`` ``(top, left, bottom, right)``."""
    top, left, bottom, right = (int(v) for v in padding)
    return int(x_shape[2]) + top + bottom - int(w_shape[2]) + 1, int(x_shape[3]) + left + right - int(w_shape[3]) + 1


def gather_conv_kernel(x_shape: tuple, w_shape: tuple, padding: tuple):
    """The TIR PrimFunc ``(x (N, C, H, W), w (KH, KW, C, O), y (N, O, HO, WO))``."""
    from tvm.script import tirx as T

    n, c, h, w = (int(v) for v in x_shape)
    o, _, kh, kw = (int(v) for v in w_shape)
    top, left, _, _ = (int(v) for v in padding)
    ho, wo = conv_out_hw(x_shape, w_shape, padding)
    ph, pw = ho + kh - 1, wo + kw - 1          # the list grid: input (r, q) at (r + top, q + left)
    ot = _channel_tile(o)
    tiles = o // ot
    parts = min(PARTS, n)
    per = math.ceil(n / parts)

    @T.prim_func
    def gather_conv(x: T.Buffer((n, c, h, w), "float32"), wt: T.Buffer((kh, kw, c, o), "float32"),
                    y: T.Buffer((n, o, ho, wo), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for part in T.parallel(parts):
            cnt = T.alloc_buffer((ph, pw), "int32")          # nonzero channels of each input pixel
            idx = T.alloc_buffer((ph, pw, c + 1), "int32")   # their indices (+1: the branch-free write)
            val = T.alloc_buffer((ph, pw, c + 1), "float32")
            img = T.alloc_buffer((ho * wo, o), "float32")    # one output image, channels-last
            acc = T.alloc_buffer((ot,), "float32")           # < 1 KB: kept in vector registers
            for r in range(ph):
                for q in range(pw):
                    cnt[r, q] = 0                            # the border stays empty
            for b in range(part * per, T.min(n, part * per + per)):
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
                                    for k in range(cnt[r + i, q + j]):
                                        for v in T.vectorized(ot):
                                            acc[v] = acc[v] + val[r + i, q + j, k] * wt[i, j, idx[r + i, q + j, k], t * ot + v]
                            for v in T.vectorized(ot):
                                img[r * wo + q, t * ot + v] = acc[v]
                for v in range(o):
                    for p in range(ho * wo):
                        y[b, v, p // wo, p % wo] = img[p, v]

    return gather_conv


class _GatherKernel:
    """What :class:`SpikeConv` and :class:`SpikeMatmul` share: a PrimFunc compiled for the CPU
    target with its weight baked in (in the kernel's layout), called on TVM tensors."""

    def _build(self, func, weight: np.ndarray) -> None:
        import tvm

        t0 = time.perf_counter()
        self._fn = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(self.target))["main"]
        self.compile_seconds = time.perf_counter() - t0
        self._w = tvm.runtime.tensor(np.ascontiguousarray(weight, dtype=np.float32))

    def __call__(self, x, out) -> None:
        """``x``, ``out``: TVM tensors of the compiled shapes."""
        self._fn(x, self._w, out)


@dataclass
class SpikeConv(_GatherKernel):
    """The kernel compiled for one convolution (its weight baked in as a (KH, KW, C, O) tensor)."""

    x_shape: tuple
    weight: np.ndarray           # (O, C, KH, KW)
    padding: tuple
    target: object
    stats: dict = field(default_factory=lambda: {"gather": 0, "blas": 0})
    max_density: float = field(default=1.0, init=False)   # set by adaptive_conv
    threshold_source: str = field(default="", init=False)   # measured, cached or given (adaptive_conv)
    crossover: Crossover | None = field(default=None, init=False)  # the measurement behind max_density

    def __post_init__(self):
        self._build(gather_conv_kernel(self.x_shape, self.weight.shape, self.padding), self.weight.transpose(2, 3, 1, 0))
        self.sample = (math.prod(self.x_shape[1:]), SAMPLE_IMAGES)
        self.out_shape = (self.x_shape[0], self.weight.shape[0], *conv_out_hw(self.x_shape, self.weight.shape, self.padding))


def gather_matmul_kernel(x_shape: tuple, k: int, n: int):
    """The TIR PrimFunc ``(x (..., K), w (K, N), y (..., N))``: for each row of ``x``, the sum of
    the rows of ``w`` whose input is nonzero (times the input), ``N`` in register tiles."""
    from tvm.script import tirx as T

    x_shape = tuple(int(v) for v in x_shape)
    m = math.prod(x_shape[:-1])
    y_shape = (*x_shape[:-1], n)
    ot = _channel_tile(n)
    tiles = n // ot
    parts = min(PARTS, m)
    per = math.ceil(m / parts)

    @T.prim_func
    def gather_matmul(xh: T.handle, w: T.Buffer((k, n), "float32"), yh: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xn = T.match_buffer(xh, x_shape, "float32")
        yn = T.match_buffer(yh, y_shape, "float32")
        x = T.decl_buffer((m, k), "float32", data=xn.data)
        y = T.decl_buffer((m, n), "float32", data=yn.data)
        for part in T.parallel(parts):
            cnt = T.alloc_buffer((1,), "int32")
            idx = T.alloc_buffer((k + 1,), "int32")
            val = T.alloc_buffer((k + 1,), "float32")
            acc = T.alloc_buffer((ot,), "float32")
            for row in range(part * per, T.min(m, part * per + per)):
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

    return gather_matmul


@dataclass
class SpikeMatmul(_GatherKernel):
    """The gather kernel compiled for one linear layer ``x (..., K) @ W (K, N)``."""

    x_shape: tuple
    weight: np.ndarray           # (K, N)
    target: object
    stats: dict = field(default_factory=lambda: {"gather": 0, "blas": 0})
    max_density: float = field(default=1.0, init=False)   # set by adaptive_matmul
    threshold_source: str = field(default="", init=False)   # measured, cached or given (adaptive_matmul)
    crossover: Crossover | None = field(default=None, init=False)  # the measurement behind max_density

    def __post_init__(self):
        k, n = self.weight.shape
        self._build(gather_matmul_kernel(self.x_shape, k, n), self.weight)
        self.sample = (k, SAMPLE_ROWS)
        self.out_shape = (*self.x_shape[:-1], n)


def adaptive_matmul(x_shape: tuple, weight: np.ndarray, target, max_density: float | None = None,
                    crossovers: CrossoverCache | None = None, threads: int | None = None):
    """:func:`adaptive_conv` for a linear layer ``x (..., K) @ weight (K, N)``: the gather kernel
    up to the density threshold (``max_density``, else read from ``crossovers`` or measured), a
    BLAS matmul above."""
    mm = SpikeMatmul(tuple(int(v) for v in x_shape), np.asarray(weight, dtype=np.float32), target)
    return _adaptive(mm, blas_matmul, max_density, "spikematmul", crossovers, threads)


def density(x: np.ndarray, unit: int, sample: int) -> float:
    """Fraction of nonzeros in ``sample`` evenly spaced runs of ``unit`` contiguous values of
    ``x`` (whole images of a convolution's input, whole rows of a matmul's), or all of them."""
    flat = x.reshape(-1, unit)
    flat = flat[:: max(1, flat.shape[0] // sample)]
    return np.count_nonzero(flat) / flat.size


def runtime_threads() -> int:
    """Threads of TVM's runtime pool now: what a compiled module runs with."""
    import tvm_ffi

    load_tvm()
    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def blas_threads() -> int:
    """Threads of numpy's BLAS now (threadpoolctl's view; 0 when threadpoolctl is not installed)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return 0
    return max((int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"), default=0)


@contextlib.contextmanager
def pinned_threads(threads: int, blas: int | None = None):
    """Within the block TVM's thread pool runs ``threads`` threads, numpy's BLAS (through
    threadpoolctl) and torch's intra-op pool (where torch is already imported) ``blas`` threads
    (default: ``threads``); each is restored to what it was afterwards. Without threadpoolctl
    BLAS keeps its own count, with a warning."""
    import tvm_ffi

    blas = threads if blas is None or blas < 1 else blas
    for name, value in (("threads", threads), ("blas", blas)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    config = tvm_ffi.get_global_func("runtime.config_threadpool")
    tvm_before = runtime_threads()
    torch = sys.modules.get("torch")
    torch_before = torch.get_num_threads() if torch is not None else None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
        warnings.warn("threadpoolctl is not installed: numpy's BLAS keeps the threads OMP_NUM_THREADS gave it "
                      "while kernels are timed", stacklevel=3)
    limits = None
    config(0, threads)
    try:
        if threadpool_limits is not None:
            limits = threadpool_limits(blas, user_api="blas")
        if torch is not None:
            torch.set_num_threads(blas)
        yield threads
    finally:
        if limits is not None:
            limits.restore_original_limits()
        if torch is not None:
            torch.set_num_threads(torch_before)
        config(0, tvm_before)


def crossover(kernel, blas, x_shape: tuple, threads: int | None = None, blas_count: int | None = None,
              seed: int = 0) -> Crossover:
    """The input density up to which ``kernel(x)`` is faster than ``blas(x)`` on ``x_shape``
    (both take a TVM tensor and write their output), measured: the kernel's time is linear in
    the nonzeros, so two points (0% and :data:`CALIBRATION_DENSITY` ones) against BLAS's
    (density-independent) time give it. ``max_density`` 1.0 where the kernel wins even on dense
    input (e.g. one input channel), 0.0 where BLAS always wins. The three are timed alike
    (:func:`stdeploy.timing.time_candidates`, median) with TVM's pool at ``threads`` threads and
    BLAS at ``blas_count`` (defaults: as they are now, :func:`runtime_threads`,
    :func:`blas_threads`: what the module runs with), pinned while timing."""
    import tvm

    threads = runtime_threads() if threads is None else int(threads)
    blas_count = blas_threads() if blas_count is None else int(blas_count)
    rng = np.random.default_rng(seed)
    x0 = tvm.runtime.tensor(np.zeros(x_shape, np.float32))
    x1 = tvm.runtime.tensor((rng.random(x_shape) < CALIBRATION_DENSITY).astype(np.float32))
    with pinned_threads(threads, blas_count):
        t = time_candidates({"fixed": lambda: kernel(x0), "busy": lambda: kernel(x1), "dense": lambda: blas(x1)},
                            CALIBRATION_WARMUP, CALIBRATION_REPEATS)
    fixed, busy, dense = t["fixed"].median_s, t["busy"].median_s, t["dense"].median_s
    if dense <= fixed:
        max_density = 0.0
    elif busy <= fixed:
        max_density = 1.0
    else:
        max_density = min(1.0, CALIBRATION_DENSITY * (dense - fixed) / (busy - fixed))
    return Crossover(max_density=max_density, fixed_s=fixed, busy_s=busy, dense_s=dense,
                     calibration_density=CALIBRATION_DENSITY, statistic="median", warmup=CALIBRATION_WARMUP,
                     repeats=CALIBRATION_REPEATS, threads=threads, blas_threads=blas_count)


def crossover_key(kernel, kind: str, threads: int, blas_count: int) -> CrossoverKey:
    """The cache key of ``kernel``'s threshold (a :class:`SpikeConv` or :class:`SpikeMatmul`)."""
    target = kernel.target
    if isinstance(target, dict):
        mcpu = str(target.get("mcpu", ""))
    else:
        mcpu = str(load_tvm().target.Target(target).attrs.get("mcpu", ""))
    return CrossoverKey(kind=kind, x_shape=kernel.x_shape, w_shape=tuple(int(v) for v in kernel.weight.shape),
                        padding=tuple(int(v) for v in getattr(kernel, "padding", ())), cpu=cpu_model(), mcpu=mcpu,
                        threads=threads, blas_threads=blas_count, kernel_version=KERNEL_VERSION)


_ids = itertools.count()
_live: list = []   # the SpikeConv / SpikeMatmul kernels, alive as long as their packed functions are registered


def adaptive_conv(x_shape: tuple, weight: np.ndarray, padding: tuple, target, max_density: float | None = None,
                  crossovers: CrossoverCache | None = None, threads: int | None = None):
    """``(name, SpikeConv)``: a packed function ``(x, w, out)`` registered under ``name`` that runs
    the gather kernel when at most ``max_density`` of ``x`` is nonzero (estimated on a sample of
    images) and im2col + BLAS otherwise. ``max_density=None``: the threshold of this shape is read
    from ``crossovers`` when it holds one for this CPU and ``threads`` (default: TVM's pool,
    :func:`runtime_threads`), else measured (:func:`crossover`) and added to it.
    ``SpikeConv.max_density`` holds the threshold used, ``threshold_source`` where it came from
    and ``SpikeConv.stats`` counts the calls of each path."""
    conv = SpikeConv(tuple(int(v) for v in x_shape), np.asarray(weight, dtype=np.float32), tuple(padding), target)
    blas = blas_conv2d((1, 1), conv.padding)
    return _adaptive(conv, blas, max_density, "spikeconv", crossovers, threads)


def _adaptive(kernel, blas, max_density: float | None, kind: str, crossovers: CrossoverCache | None = None,
              threads: int | None = None):
    """Register the packed function ``(x, w, out)`` that picks ``kernel`` or ``blas`` by density."""
    import tvm
    import tvm_ffi

    if max_density is not None:
        if not 0.0 <= float(max_density) <= 1.0:
            raise ValueError(f"max_density must lie in [0, 1], got {max_density}")
        kernel.threshold_source = "given"
    else:
        threads = runtime_threads() if threads is None else int(threads)
        blas_count = blas_threads()
        key = crossover_key(kernel, kind, threads, blas_count)
        found = crossovers.get(key) if crossovers is not None else None
        if found is not None:
            kernel.threshold_source = "cached"
        else:
            w = tvm.runtime.tensor(kernel.weight)
            out = tvm.runtime.tensor(np.zeros(kernel.out_shape, np.float32))
            found = crossover(lambda x: kernel(x, out), lambda x: blas(x, w, out), kernel.x_shape, threads, blas_count)
            kernel.threshold_source = "measured"
            if crossovers is not None:
                crossovers.put(key, found)
        kernel.crossover = found
        max_density = found.max_density
    kernel.max_density = float(max_density)

    def run(x, w, out) -> None:
        if kernel.max_density >= 1.0 or density(np.from_dlpack(x), *kernel.sample) <= kernel.max_density:
            kernel.stats["gather"] += 1
            kernel(x, out)
        else:
            kernel.stats["blas"] += 1
            blas(x, w, out)

    name = f"stdeploy.{kind}.{next(_ids)}"
    tvm_ffi.register_global_func(name, run, override=True)
    _live.append(kernel)
    return name, kernel


def _main(argv=None) -> None:
    import argparse

    import tvm


    parser = argparse.ArgumentParser(description="gather kernel vs im2col + BLAS (the module docstring's figures)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    target = cpu_target(load_profile("cpu"))
    print(f"target {target}")
    cases = (((128, 1, 8, 8), (32, 1, 3, 3), (1.0,)), ((128, 32, 8, 8), (64, 32, 3, 3), (0.05, 0.08, 0.14, 0.3, 0.5)),
             ((128, 64, 4, 4), (64, 64, 3, 3), (0.05, 0.08, 0.14, 0.3, 0.5)))
    for x_shape, w_shape, densities in cases:
        w = np.random.default_rng(0).standard_normal(w_shape).astype(np.float32)
        name, conv = adaptive_conv(x_shape, w, (1, 1, 1, 1), target)
        c = conv.crossover
        print(f"  x {x_shape} w {w_shape}: measured crossover {conv.max_density:.0%} ones (median of {c.repeats}, "
              f"{c.threads} threads: gather {c.fixed_s * 1e3:.3f} ms empty, {c.busy_s * 1e3:.3f} ms at "
              f"{c.calibration_density:.0%}; BLAS {c.dense_s * 1e3:.3f} ms)")
        for d in densities:
            x = (np.random.default_rng(1).random(x_shape) < d).astype(np.float32)
            ref = conv2d_nchw(x, w, (1, 1), (1, 1, 1, 1))
            xt, yt = tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros(ref.shape, np.float32))
            conv(xt, yt)
            tg, tb = [], []
            for _ in range(args.repeats):  # interleaved: both see the same machine state
                t0 = time.perf_counter()
                conv(xt, yt)
                tg.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                conv2d_nchw(x, w, (1, 1), (1, 1, 1, 1))
                tb.append(time.perf_counter() - t0)
            g, b = statistics.median(tg), statistics.median(tb)
            print(f"    ones {d:4.0%}: gather {g * 1e3:7.3f} ms  im2col+BLAS {b * 1e3:7.3f} ms  x{b / g:5.2f}"
                  f"  max |diff| {np.abs(yt.numpy() - ref).max():.1e}")


if __name__ == "__main__":
    _main()
