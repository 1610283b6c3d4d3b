"""Sparse-weight matrix products for TVM Relax: a TIR kernel over a compressed (CSR) weight, and a
rewrite that puts it in place of ``R.matmul(x, W)`` where ``W`` is a pruned constant.

Relax has no sparse tensor type, so a pruned linear layer imported from ONNX stays a dense
``R.matmul(x, W)`` with ``x`` of shape ``(..., K)`` and the constant ``W`` of shape ``(K, N)`` (the
transposed torch weight). :func:`rewrite_sparse_matmuls` replaces the chosen ones with::

    x2 = R.reshape(x, (M, K))                      # M = product of the leading dims
    y2 = R.call_tir(sparse_matmul_..., (x2, indptr, indices, values), R.Tensor((M, N)))
    y  = R.reshape(y2, (..., N))

The weight is stored by :func:`csr_from_dense` as CSR over the **output features** (CSR of
``W.T``): the nonzeros of output ``n`` are ``indices[indptr[n]:indptr[n+1]]`` (input features
``k``, ascending) with ``values`` alongside. The structure is passed to the kernel as three Relax
constants rather than baked into its code (baking the nonzeros in as immediates makes parsing and
compiling grow with the number of nonzeros, to minutes for large layers, and runs no faster).

Arithmetic: :func:`sparse_matmul_kernel` computes ``y[m, n] = sum_k x[m, k] * W[k, n]``, summing
each output's nonzeros in ascending ``k`` from 0 as a plain float32 loop does, each multiply-add
contracted by LLVM into one FMA: the same order as TVM's own untuned dense matmul, so the rewrite
leaves logits and spikes of such a module bit-identical. Against a BLAS ``x @ W`` (blocked
summation) results differ by float32 rounding (the tests bound it).

CPU schedule (``llvm``): the rows M are the vector dimension. Tasks (``T.parallel``) are tiles of
:data:`CPU_ROWS_SMALL_K` rows when ``K <= 128`` (the tile of x then fits a 32 KB L1 cache), else
:data:`CPU_ROWS`, fewer when M is small. Each task transposes its rows of ``x`` into a contiguous
``(K, rows)`` block, then for each output accumulates ``w * xt[k, :]`` over that output's nonzeros
in vector registers, collecting :data:`CPU_OUTPUTS` outputs before a transposed store into ``y``.
With fewer than :data:`CPU_MIN_TASKS` row tiles the outputs are split into groups too. Compile
with the host CPU named (``mcpu``, see :func:`default_cpu_target`): without it LLVM emits SSE2 code.
The cost is proportional to the nonzeros plus a fixed cost for reading ``x`` and writing ``y``.

CUDA schedule (``cuda``): ``blockIdx.x`` over groups of :data:`GPU_ROWS` rows, ``blockIdx.y`` x
``threadIdx.x`` (:data:`GPU_THREADS`) over the outputs: each thread reads each of its output's
nonzeros once and applies it to the rows held in registers, ascending ``k``. Marked
``tirx.is_scheduled`` so dlight leaves it alone. Built through :mod:`stdeploy.targets.tvm.cuda`.

Which layers take the kernel: :func:`measured_choice` times it against what would run instead
(BLAS, or the spike gather kernel) per layer on the CPU; :func:`density_choice` decides by the
fraction of zeros (the CUDA build, where no GPU is there to time). ``python -m
stdeploy.targets.tvm.kernels.sparse`` prints the per-layer comparison for an export.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ....timing import time_candidates
from ....errors import ShapeError
from ..frontend import load_onnx_graph, relax_module
from ..host import host_cpu_name, usable_cores
from ..sdk import load_tvm
from .skipzero import SkipZeroMatmul, applies as skipzero_applies
from .spike import SpikeMatmul, blas_threads, pinned_threads, runtime_threads

__all__ = ["CSRWeight", "csr_from_dense", "sparse_matmul_kernel", "kernel_arrays", "CompiledSparseMatmul",
           "default_cpu_target", "rewrite_sparse_matmuls", "measured_choice", "MeasuredChoice", "density_choice",
           "compare_with_dense", "DecideFn"]

DecideFn = Callable[[int, np.ndarray, tuple], bool]  # (layer index, W (K, N), x shape) -> use the sparse kernel?

CPU_ROWS = 32          # rows per CPU task: 32 float32 lanes = 4 AVX2 registers of accumulators ...
CPU_ROWS_SMALL_K = 64  # ... or 64 (8 registers) when the (K, 64) block of x fits in a 32 KB L1: K <= 128
CPU_OUTPUTS = 16       # outputs gathered in a tile before the transposed store into y
CPU_MIN_TASKS = 8      # fewer row tiles than this: split the outputs into groups as well
GPU_THREADS = 128      # threads per block, one output each
GPU_ROWS = 8           # rows per block (one thread sums its output for each of them)


# --------------------------------------------------------------------------------------------
# The compressed weight


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class CSRWeight:
    """A weight ``W`` of shape ``(K, N)`` (``y = x @ W``) compressed over its output features.

    The nonzeros of output ``n`` are ``values[indptr[n]:indptr[n+1]]`` at input features
    ``indices[indptr[n]:indptr[n+1]]``, ascending. Arrays are read-only.
    """

    indptr: np.ndarray        # (N + 1,) int32, non-decreasing, indptr[0] = 0, indptr[N] = nnz
    indices: np.ndarray       # (nnz,) int32 in [0, K), strictly ascending within each output
    values: np.ndarray        # (nnz,) float32
    shape: tuple[int, int]    # (K, N) of the dense W
    nnz: int = field(init=False)
    density: float = field(init=False)  # nnz / (K * N)

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ShapeError(f"CSRWeight: shape must be (K, N) with K, N >= 1, got {self.shape}")
        k, n = shape
        indptr, indices, values = (np.asarray(a) for a in (self.indptr, self.indices, self.values))
        if indptr.shape != (n + 1,):
            raise ShapeError(f"CSRWeight {shape}: indptr must have shape ({n + 1},) (N + 1), got {indptr.shape}")
        if indices.ndim != 1 or values.shape != indices.shape:
            raise ShapeError(f"CSRWeight {shape}: indices {indices.shape} and values {values.shape} must be 1-D and alike")
        nnz = indices.shape[0]
        if indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
            raise ShapeError(f"CSRWeight {shape}: indptr must rise from 0 to nnz = {nnz}, got {indptr[0]} .. {indptr[-1]}")
        if nnz and (indices.min() < 0 or indices.max() >= k):
            raise ShapeError(f"CSRWeight {shape}: indices must lie in [0, {k}), got [{indices.min()}, {indices.max()}]")
        if nnz > 1:
            rising = np.diff(indices.astype(np.int64)) > 0
            starts = indptr[1:-1]
            rising[starts[(starts > 0) & (starts < nnz)] - 1] = True  # a new output may start lower
            if not rising.all():
                raise ShapeError(f"CSRWeight {shape}: indices must rise strictly within each output feature")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "indptr", _readonly(indptr.astype(np.int32)))
        object.__setattr__(self, "indices", _readonly(indices.astype(np.int32)))
        object.__setattr__(self, "values", _readonly(values.astype(np.float32)))
        object.__setattr__(self, "nnz", int(nnz))
        object.__setattr__(self, "density", nnz / (k * n))

    def to_dense(self) -> np.ndarray:
        """``W`` as a dense float32 array of shape ``(K, N)``."""
        k, n = self.shape
        w = np.zeros((n, k), np.float32)
        rows = np.repeat(np.arange(n), np.diff(self.indptr))
        w[rows, self.indices] = self.values
        return w.T.copy()


def csr_from_dense(w: np.ndarray) -> CSRWeight:
    """Compress a dense weight ``W`` of shape ``(K, N)`` (``y = x @ W``) for the sparse kernel.

    Exact zeros are dropped (prune first: a magnitude mask is applied by the caller). The values are
    stored as float32; a weight that is not a real 2-D array raises :class:`ShapeError`."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ShapeError(f"csr_from_dense: W must be 2-D (K, N), got shape {w.shape}")
    if min(w.shape) < 1:
        raise ShapeError(f"csr_from_dense: W must have K, N >= 1, got shape {w.shape}")
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise ShapeError(f"csr_from_dense: W of shape {w.shape} must be real numbers, got dtype {w.dtype}")
    wt = np.ascontiguousarray(w.T, dtype=np.float32)          # (N, K): one row per output feature
    mask = wt != 0
    indptr = np.zeros(w.shape[1] + 1, np.int64)
    np.cumsum(mask.sum(axis=1), out=indptr[1:])
    rows, cols = np.nonzero(mask)                              # row-major: ascending k within each n
    return CSRWeight(indptr=indptr, indices=cols, values=wt[rows, cols], shape=w.shape)


# --------------------------------------------------------------------------------------------
# The kernels


def _target_kind(target) -> str:
    tvm = load_tvm()
    if target is None:
        return "llvm"
    if isinstance(target, str) and target in ("llvm", "cuda"):
        return target
    if isinstance(target, dict):
        return str(target.get("kind"))
    return str(tvm.target.Target(target).kind.name)


def _cpu_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(rows per tile, outputs per tile, output groups) for the CPU kernel."""
    cap = CPU_ROWS_SMALL_K if k * CPU_ROWS_SMALL_K * 4 <= 32 * 1024 else CPU_ROWS
    rows = min(cap, max(8, 1 << (m - 1).bit_length()))  # a power of two: LLVM splits <48 x float> badly (4x slower)
    cols = min(CPU_OUTPUTS, n)
    tiles = math.ceil(m / rows)
    groups = 1 if tiles >= CPU_MIN_TASKS else min(math.ceil(n / cols), math.ceil(CPU_MIN_TASKS / tiles))
    return rows, cols, groups


def _cpu_kernel(m: int, k: int, n: int, p: int):
    from tvm.script import tirx as T

    mb, nb, ng = _cpu_tiling(m, k, n)
    tasks = math.ceil(m / mb) * ng
    nblocks = math.ceil(n / nb)
    per_group = math.ceil(nblocks / ng)
    k8, nb8 = k // 8, nb // 8

    @T.prim_func
    def sparse_matmul(x: T.Buffer((m, k), "float32"), indptr: T.Buffer((n + 1,), "int32"),
                      indices: T.Buffer((p,), "int32"), values: T.Buffer((p,), "float32"),
                      y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for task in T.parallel(tasks):
            xt = T.alloc_buffer((k, mb), "float32")      # this tile's rows of x, transposed
            tile = T.alloc_buffer((nb, mb), "float32")   # nb outputs of the tile, before the store
            acc = T.alloc_buffer((mb,), "float32")       # global scope, < 1 KB: a stack array (registers)
            blk = T.alloc_buffer((8, 8), "float32")      # one 8 x 8 block of a transpose (registers)
            m0 = task // ng * mb
            rows = T.min(mb, m - m0)
            if rows == mb:  # a full tile: 8 x 8 blocks, each 8 vector loads, shuffles, 8 vector stores
                for kb in range(k8):
                    for rb in range(mb // 8):
                        for i in T.unroll(8):
                            for v in T.vectorized(8):
                                blk[i, v] = x[m0 + rb * 8 + i, kb * 8 + v]
                        for v in T.unroll(8):
                            for i in T.vectorized(8):
                                xt[kb * 8 + v, rb * 8 + i] = blk[i, v]
                for r in range(mb):
                    for kk in range(k8 * 8, k):
                        xt[kk, r] = x[m0 + r, kk]
            else:           # the last, partial tile: zero-padded to mb rows
                for r in range(rows):
                    for kk in range(k):
                        xt[kk, r] = x[m0 + r, kk]
                for r in range(rows, mb):
                    for kk in range(k):
                        xt[kk, r] = T.float32(0)
            for bi in range(task % ng * per_group, T.min(nblocks, task % ng * per_group + per_group)):
                n0 = bi * nb
                cols = T.min(nb, n - n0)
                for c in range(cols):
                    for v in T.vectorized(mb):
                        acc[v] = T.float32(0)
                    for j in range(indptr[n0 + c], indptr[n0 + c + 1]):
                        for v in T.vectorized(mb):
                            acc[v] = acc[v] + values[j] * xt[indices[j], v]
                    for v in T.vectorized(mb):
                        tile[c, v] = acc[v]
                if rows == mb and cols == nb:
                    for rb in range(mb // 8):
                        for cb in range(nb8):
                            for i in T.unroll(8):
                                for v in T.vectorized(8):
                                    blk[i, v] = tile[cb * 8 + i, rb * 8 + v]
                            for v in T.unroll(8):
                                for i in T.vectorized(8):
                                    y[m0 + rb * 8 + v, n0 + cb * 8 + i] = blk[i, v]
                        for r in range(8):
                            for c in range(nb8 * 8, nb):
                                y[m0 + rb * 8 + r, n0 + c] = tile[c, rb * 8 + r]
                else:
                    for r in range(rows):
                        for c in range(cols):
                            y[m0 + r, n0 + c] = tile[c, r]

    return sparse_matmul


def _gpu_kernel(m: int, k: int, n: int, p: int):
    from tvm.script import tirx as T

    threads = min(GPU_THREADS, 32 * math.ceil(n / 32))
    row_blocks = math.ceil(m / GPU_ROWS)
    col_blocks = math.ceil(n / threads)
    rows_per_block = GPU_ROWS

    @T.prim_func
    def sparse_matmul(x: T.Buffer((m, k), "float32"), indptr: T.Buffer((n + 1,), "int32"),
                      indices: T.Buffer((p,), "int32"), values: T.Buffer((p,), "float32"),
                      y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bm in T.thread_binding(row_blocks, thread="blockIdx.x"):
            for bn in T.thread_binding(col_blocks, thread="blockIdx.y"):
                for t in T.thread_binding(threads, thread="threadIdx.x"):
                    acc = T.alloc_buffer((rows_per_block,), "float32", scope="local")
                    if bn * threads + t < n:
                        for r in T.unroll(rows_per_block):
                            acc[r] = T.float32(0)
                        for j in range(indptr[bn * threads + t], indptr[bn * threads + t + 1]):
                            for r in T.unroll(rows_per_block):  # rows past m read row m - 1, never stored
                                acc[r] = acc[r] + values[j] * x[T.min(bm * rows_per_block + r, m - 1), indices[j]]
                        for r in T.unroll(rows_per_block):
                            if bm * rows_per_block + r < m:
                                y[bm * rows_per_block + r, bn * threads + t] = acc[r]

    return sparse_matmul


def sparse_matmul_kernel(csr: CSRWeight, m: int, target=None):
    """The TIR PrimFunc ``(x (M, K), indptr, indices, values) -> y (M, N)`` for ``csr`` and ``M``
    rows, scheduled for ``target`` (a kind name, target dict or ``tvm.target.Target``; llvm by
    default; ``cuda`` for the GPU schedule). ``indices``/``values`` have ``max(nnz, 1)`` entries
    (see :func:`kernel_arrays`)."""
    load_tvm()
    if not isinstance(csr, CSRWeight):
        raise TypeError(f"sparse_matmul_kernel needs a CSRWeight (csr_from_dense), got {type(csr).__name__}")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ShapeError(f"sparse_matmul_kernel: M (rows of x) must be a positive integer, got {m!r} for W {csr.shape}")
    kind = _target_kind(target)
    k, n = csr.shape
    p = max(csr.nnz, 1)
    if kind == "llvm":
        return _cpu_kernel(int(m), k, n, p)
    if kind == "cuda":
        return _gpu_kernel(int(m), k, n, p)
    raise ValueError(f"sparse_matmul_kernel: no schedule for target kind {kind!r}; known: llvm, cuda")


def kernel_arrays(csr: CSRWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(indptr, indices, values)`` as the kernel takes them: an all-zero weight gets one unused
    padding entry, since a buffer cannot be empty."""
    if csr.nnz:
        return csr.indptr, csr.indices, csr.values
    return csr.indptr, np.zeros(1, np.int32), np.zeros(1, np.float32)


def default_cpu_target(num_cores: int | None = None) -> dict:
    """``{"kind": "llvm", "mcpu": <this CPU>, "num-cores": ...}``: the host CPU named so LLVM uses
    its vector units (see :func:`stdeploy.targets.tvm.host.host_cpu_name`)."""
    target = {"kind": "llvm"}
    cpu = host_cpu_name()
    if cpu is None:
        warnings.warn("tvm sparse kernel: the host CPU has no LLVM name TVM accepts; the kernel is compiled for "
                      "generic x86-64 (no AVX) and will be slow", stacklevel=2)
    else:
        target["mcpu"] = cpu
    target["num-cores"] = int(num_cores or usable_cores())
    return target


def _as_target(target):
    tvm = load_tvm()
    if target is None:
        target = default_cpu_target()
    if isinstance(target, str) and target == "llvm":
        target = default_cpu_target()
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


class CompiledSparseMatmul:
    """The kernel for ``csr`` and ``m`` rows compiled for a CPU target, callable on numpy arrays.

    ``x`` of shape ``(..., K)`` whose leading dims multiply to ``m`` -> ``y`` of shape ``(..., N)``."""

    def __init__(self, csr: CSRWeight, m: int, target=None):
        tvm = load_tvm()
        self.csr, self.m = csr, int(m)
        self.target = _as_target(target)
        if self.target.kind.name != "llvm":
            raise ValueError(f"CompiledSparseMatmul runs on this CPU only; target kind is {self.target.kind.name!r}")
        func = sparse_matmul_kernel(csr, m, self.target)
        t0 = time.perf_counter()
        self._lib = tvm.compile(tvm.IRModule({"main": func}), target=self.target)
        self.compile_seconds = time.perf_counter() - t0
        self._arrays = [tvm.runtime.tensor(a) for a in kernel_arrays(csr)]
        self._out = tvm.runtime.tensor(np.zeros((self.m, csr.shape[1]), np.float32))

    def _bind_x(self, x: np.ndarray):
        k, n = self.csr.shape
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] != k or int(np.prod(x.shape[:-1], dtype=np.int64)) != self.m:
            raise ShapeError(f"sparse matmul: x of shape {x.shape} does not match W {self.csr.shape} "
                             f"compiled for M = {self.m} rows (expected (..., {k}) with {self.m} rows)")
        return load_tvm().runtime.tensor(np.ascontiguousarray(x.reshape(self.m, k), dtype=np.float32)), x.shape[:-1] + (n,)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        xt, shape = self._bind_x(x)
        self._lib["main"](xt, *self._arrays, self._out)
        return self._out.numpy().reshape(shape)

    def bound(self, x: np.ndarray) -> Callable[[], None]:
        """A call of the kernel on ``x`` with nothing else in it (no copy in or out): what is timed."""
        xt, _ = self._bind_x(x)
        run, arrays, out = self._lib["main"], self._arrays, self._out
        return lambda: run(xt, *arrays, out)

    def seconds(self, x: np.ndarray, repeats: int = 3) -> float:
        """Minimum wall time of one kernel call over ``repeats`` calls, after one warm-up call."""
        xt, _ = self._bind_x(x)
        run = self._lib["main"]
        run(xt, *self._arrays, self._out)
        best = math.inf
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            run(xt, *self._arrays, self._out)
            best = min(best, time.perf_counter() - t0)
        return best


def _dense_seconds(x: np.ndarray, w: np.ndarray, repeats: int) -> float:
    out = x @ w
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        np.matmul(x, w, out=out)
        best = min(best, time.perf_counter() - t0)
    return best


# --------------------------------------------------------------------------------------------
# Choosing layers


@dataclass
class MeasuredChoice:
    """A ``decide`` function: sparse where the weight has at least ``min_sparsity`` zeros and the
    sparse kernel, timed on the real shape (spikes as input), beats numpy's dense ``x @ W``
    (OpenBLAS: what the dense CPU path uses) and, with ``spike_kernels``, also the spike-input
    gather kernel that the default CPU path runs instead of BLAS for mostly-zero inputs
    (:class:`stdeploy.targets.tvm.kernels.spike.SpikeMatmul`) and, where the weight has at least
    :data:`.skipzero.MIN_WEIGHT_ZEROS` zeros, the kernel that skips zero inputs and weights
    (:class:`.skipzero.SkipZeroMatmul`): the sparse kernel must beat the fastest of them. Every candidate is timed by the same rule (:func:`stdeploy.timing.time_candidates`:
    ``warmup`` untimed calls each, then ``repeats`` interleaved rounds, median) with the thread
    counts pinned (:func:`.spike.pinned_threads`: TVM's pool and BLAS as the module runs them).
    The times are kept in ``records`` by layer index and copied into
    :func:`rewrite_sparse_matmuls`'s report."""

    target: object = None
    min_sparsity: float = 0.5
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    spike_kernels: bool = False
    records: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 <= self.min_sparsity <= 1.0:
            raise ValueError(f"min_sparsity must lie in [0, 1], got {self.min_sparsity}")
        self.target = _as_target(self.target)
        if self.target.kind.name != "llvm":
            raise ValueError(f"measured_choice times kernels on this CPU; it cannot time target kind "
                             f"{self.target.kind.name!r} here: use density_choice for other targets")

    def __call__(self, index: int, w: np.ndarray, x_shape: tuple) -> bool:
        sparsity = float(np.mean(w == 0))
        record = {"sparsity": round(sparsity, 4)}
        self.records[index] = record
        if sparsity < self.min_sparsity:
            record["reason"] = f"sparsity {sparsity:.3f} < min_sparsity {self.min_sparsity}"
            return False
        k, _ = w.shape
        m = int(np.prod(x_shape[:-1], dtype=np.int64))
        x = (np.random.default_rng(self.seed).random((m, k)) < 0.2).astype(np.float32)
        kernel = CompiledSparseMatmul(csr_from_dense(w), m, self.target)
        wd = np.ascontiguousarray(w, dtype=np.float32)
        dense_out = x @ wd
        candidates = {"sparse": kernel.bound(x), "dense": lambda: np.matmul(x, wd, out=dense_out)}
        if self.spike_kernels:
            tvm = load_tvm()
            gather = SpikeMatmul((m, k), np.asarray(w, dtype=np.float32), self.target)
            xt, out = tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros((m, w.shape[1]), np.float32))
            candidates["gather"] = lambda: gather(xt, out)
            if skipzero_applies(w):  # routing would offer the skip-zero kernel for this weight too
                skip = SkipZeroMatmul((m, k), np.asarray(w, dtype=np.float32), self.target)
                candidates["skipzero"] = lambda: skip(xt, out)
        threads, blas = runtime_threads(), blas_threads()
        with pinned_threads(threads, blas):
            timings = time_candidates(candidates, self.warmup, self.repeats)
        record.update({f"{name}_ms": round(t.median_s * 1e3, 4) for name, t in timings.items()})
        record.update(kernel_compile_s=round(kernel.compile_seconds, 3),
                      timing=f"median of {self.repeats} after {self.warmup}, interleaved; threads {threads}, BLAS {blas}")
        # decided on the recorded figures themselves, so the report always explains the choice
        # (the unrounded times could differ where the rounded ones tie)
        return record["sparse_ms"] < min(record["dense_ms"], record.get("gather_ms", float("inf")),
                                         record.get("skipzero_ms", float("inf")))


def measured_choice(target=None, min_sparsity: float = 0.5, repeats: int = 5, spike_kernels: bool = False) -> MeasuredChoice:
    """The default ``decide`` for :func:`rewrite_sparse_matmuls` on a CPU target: see :class:`MeasuredChoice`."""
    return MeasuredChoice(target=target, min_sparsity=min_sparsity, repeats=repeats, spike_kernels=spike_kernels)


def density_choice(min_sparsity: float = 0.9) -> DecideFn:
    """A ``decide`` that needs no timing (for targets this machine cannot run, such as cuda):
    sparse where at least ``min_sparsity`` of the weight is zero."""
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must lie in [0, 1], got {min_sparsity}")

    def decide(index: int, w: np.ndarray, x_shape: tuple) -> bool:
        return float(np.mean(w == 0)) >= min_sparsity

    return decide


# --------------------------------------------------------------------------------------------
# The Relax rewrite


def _static_shape(ty) -> tuple[int, ...] | None:
    from tvm import relax

    if not isinstance(ty, relax.TensorType) or ty.shape is None or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    dims = []
    for v in ty.shape.values:
        if not hasattr(v, "value") or not isinstance(v.value, int):
            return None
        dims.append(int(v.value))
    return tuple(dims)


def _make_rewriter():
    tvm = load_tvm()
    from tvm import relax

    matmul_op = tvm.ir.Op.get("relax.matmul")

    @relax.expr_functor.mutator
    class SparseMatmulRewriter(relax.PyExprMutator):
        def __init__(self, mod, kind: str, decide):
            super().__init__(mod)
            self.kind, self.decide = kind, decide
            self.report: list[dict] = []
            self.rewritten = 0

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.same_as(matmul_op) and len(call.args) == 2):
                return call
            x, w_expr = call.args
            value = getattr(w_expr, "value", None) if isinstance(w_expr, tvm.ir.Constant) else None
            if not hasattr(value, "numpy"):
                return call
            w = value.numpy()
            if w.ndim != 2:
                return call
            index = len(self.report)
            entry = {"index": index, "shape": tuple(int(s) for s in w.shape), "M": None,
                     "density": round(float(np.mean(w != 0)), 4), "chosen": "dense"}
            self.report.append(entry)
            x_shape = _static_shape(x.ty)
            out_dtype = getattr(call.attrs, "out_dtype", None)
            reason = None
            if x_shape is None:
                reason = "x has no static shape"
            elif str(x.ty.dtype) != "float32" or str(w.dtype) != "float32":
                reason = f"dtypes x {x.ty.dtype}, W {w.dtype}: only float32 has a sparse kernel"
            elif out_dtype is not None and str(out_dtype) not in ("", "void", "float32"):
                reason = f"out_dtype {out_dtype}"
            elif x_shape[-1] != w.shape[0]:
                reason = f"x {x_shape} does not contract with W {w.shape}"
            if reason is not None:
                entry["reason"] = reason
                return call
            m = int(np.prod(x_shape[:-1], dtype=np.int64))
            entry["M"] = m
            chosen = bool(self.decide(index, w, x_shape))
            entry.update(getattr(self.decide, "records", {}).get(index, {}))
            if not chosen:
                return call
            entry["chosen"] = "sparse"
            self.rewritten += 1
            return self._sparse_call(x, x_shape, w, m)

        def _sparse_call(self, x, x_shape, w, m):
            csr = csr_from_dense(w)
            k, n = csr.shape
            name = f"sparse_matmul_{self.kind}_m{m}_k{k}_n{n}_nnz{csr.nnz}"  # equal names: equal kernels (shared)
            func = sparse_matmul_kernel(csr, m, self.kind).with_attr("global_symbol", name)
            gvar = self.builder_.add_func(func, name)
            x2 = x if len(x_shape) == 2 else self.builder_.emit(relax.op.reshape(x, (m, k)))
            consts = [relax.const(a) for a in kernel_arrays(csr)]
            y2 = relax.call_tir(gvar, [x2, *consts], relax.TensorType((m, n), "float32"))
            out_shape = x_shape[:-1] + (n,)
            if len(x_shape) == 2:
                return y2
            return relax.op.reshape(self.builder_.emit(y2), out_shape)

    return SparseMatmulRewriter


def rewrite_sparse_matmuls(mod, target, decide: DecideFn | None = None) -> tuple[object, list[dict]]:
    """Replace ``R.matmul(x, W)`` with a constant 2-D float32 ``W`` by the sparse kernel wherever
    ``decide(layer_index, W, x_shape)`` is True (default: :func:`measured_choice` for llvm,
    :func:`density_choice` otherwise). ``layer_index`` counts the matmuls with a constant 2-D
    weight in program order. ``target`` picks the kernel's schedule (llvm or cuda).

    Returns ``(new_mod, report)``; ``report`` has one dict per such matmul: ``index``, ``shape``
    ``(K, N)``, ``M``, ``density``, ``chosen`` (``"sparse"`` or ``"dense"``), plus ``reason`` when the
    kernel does not apply and whatever ``decide.records[index]`` holds (``sparse_ms``,
    ``dense_ms``, ...). ``mod`` is not changed; with nothing rewritten it is returned as is.
    """
    tvm = load_tvm()
    from tvm import relax

    if not isinstance(mod, tvm.IRModule):
        raise TypeError(f"rewrite_sparse_matmuls needs a tvm.IRModule, got {type(mod).__name__}")
    kind = _target_kind(target)
    if kind not in ("llvm", "cuda"):
        raise ValueError(f"rewrite_sparse_matmuls: no sparse kernel for target kind {kind!r}; known: llvm, cuda")
    if decide is None:
        decide = measured_choice(target) if kind == "llvm" else density_choice()
    rewriter = _make_rewriter()(mod, kind, decide)
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            new_func = rewriter.visit_expr(func)
            rewriter.builder_.update_func(gvar, new_func)
    if not rewriter.rewritten:
        return mod, rewriter.report
    return rewriter.builder_.get(), rewriter.report


# --------------------------------------------------------------------------------------------
# Benchmark (the figures in the module docstring)


def _set_threads(n: int) -> None:
    """``n`` threads for TVM's pool and numpy's BLAS (with threadpoolctl; else OMP_NUM_THREADS rules)."""
    import tvm_ffi

    load_tvm()
    tvm_ffi.get_global_func("runtime.config_threadpool")(0, n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        warnings.warn("threadpoolctl is not installed: numpy's BLAS keeps the threads OMP_NUM_THREADS gave it",
                      stacklevel=2)
        return
    threadpool_limits(n)


def compare_with_dense(w: np.ndarray, m: int, target=None, repeats: int = 15, seed: int = 0) -> dict:
    """Time the sparse kernel and numpy's dense ``x @ W`` on spikes ``x`` of shape ``(m, K)``,
    interleaved (each the minimum over ``repeats``), and check them against each other."""
    k, _ = w.shape
    x = (np.random.default_rng(seed).random((m, k)) < 0.2).astype(np.float32)
    w = np.ascontiguousarray(w, dtype=np.float32)
    kernel = CompiledSparseMatmul(csr_from_dense(w), m, target)
    diff = float(np.abs(kernel(x) - x @ w).max())
    sparse_s = dense_s = math.inf
    for _ in range(repeats):
        sparse_s = min(sparse_s, kernel.seconds(x, 1))
        dense_s = min(dense_s, _dense_seconds(x, w, 1))
    return {"M": m, "shape": w.shape, "density": round(kernel.csr.density, 4), "sparse_ms": sparse_s * 1e3,
            "dense_ms": dense_s * 1e3, "speedup": dense_s / sparse_s, "max_abs_diff": diff}


def _demo_layers(export_dir: str, batch: int) -> list[tuple[int, np.ndarray, tuple]]:
    layers = []

    def record(index, w, x_shape):
        layers.append((index, w.copy(), x_shape))
        return False

    rewrite_sparse_matmuls(relax_module(load_onnx_graph(export_dir), batch), "llvm", record)
    return layers


def _main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="sparse kernel vs numpy dense x @ W (the module docstring's figures)")
    parser.add_argument("--export", default="runs/demo/export/l1p-90", help="an export directory (its block matmuls)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    target = default_cpu_target()
    print(f"target {target}")
    cases = [(f"{args.export} #{i}", w, int(np.prod(xs[:-1]))) for i, w, xs in _demo_layers(args.export, args.batch)]
    rng = np.random.default_rng(0)
    for sparsity in (0.9, 0.95, 0.98):
        w = rng.standard_normal((512, 2048)).astype(np.float32)
        w[rng.random(w.shape) < sparsity] = 0
        cases.append((f"synthetic {sparsity:.0%} zeros", w, 2048))
    for threads in args.threads:
        _set_threads(threads)
        print(f"threads {threads}")
        for name, w, m in cases:
            r = compare_with_dense(w, m, target, args.repeats)
            print(f"  {name:34s} M {m:5d} K x N {w.shape[0]:4d} x {w.shape[1]:4d} density {r['density']:.3f}: "
                  f"sparse {r['sparse_ms']:8.3f} ms  dense {r['dense_ms']:8.3f} ms  x{r['speedup']:5.2f}  "
                  f"max |diff| {r['max_abs_diff']:.1e}")


if __name__ == "__main__":
    _main()
