"""Accumulate-only convolution for spike inputs on the CPU: a TIR kernel that scatters the weights
of every nonzero input pixel into its output neighbourhood, skipping the zeros.

A spiking layer's convolution sees mostly zeros (the demo sdt-tiny's two spiking convolutions get
10% and 6% ones), but im2col + BLAS multiplies every zero. This kernel loops over the input
pixels of one image; for each nonzero one it adds ``x * W[c, i, j, :]`` (all output channels, as
vectors) to the ``KH x KW`` output positions it reaches, in a channels-last accumulator padded so
that no bounds test is needed, then stores the image NCHW. One branch per input pixel (not per
tap), so the cost grows with the number of spikes.

Measured on this 2-core machine (``python -m stdeploy.targets.tvm_spikeconv``, batch 128 images,
3x3, padding 1): (32 -> 64 channels, 8x8) 2.1x faster than im2col + BLAS at 10% ones, 1.15x at
20%, 0.85x at 30%, 0.34x dense; (64 -> 64, 4x4) 1.9x / 1.23x / 0.93x / 0.37x. Since the density is
only known at run time, :func:`adaptive_conv` counts the input's nonzeros on every call and runs
this kernel up to :data:`MAX_DENSITY` ones, im2col + BLAS above (``stats`` counts each path).

Exact for any input values (zeros skipped, the rest multiplied); the sum over inputs runs in
(channel, row, column) order, which differs from PyTorch's, so a membrane within float rounding of
its threshold can flip as with any other kernel (the tests compare spikes with PyTorch).
Stride 1 only; padding at most ``kernel - 1`` on each side.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

MAX_DENSITY = 0.2   # fraction of nonzero inputs up to which the scatter kernel runs (crossover 20-30%)


def applicable(x_shape: tuple, w_shape: tuple, stride: tuple, padding: tuple, groups: int = 1) -> bool:
    """True for an NCHW conv the kernel handles: stride 1, no groups, padding < kernel size."""
    if len(x_shape) != 4 or len(w_shape) != 4 or groups != 1 or tuple(stride) != (1, 1):
        return False
    kh, kw = w_shape[2:]
    top, left, bottom, right = padding
    return x_shape[1] == w_shape[1] and max(top, bottom) < kh and max(left, right) < kw


def scatter_conv_kernel(x_shape: tuple, w_shape: tuple, padding: tuple):
    """The TIR PrimFunc ``(x (N, C, H, W), w (C, KH, KW, O) channels-last, y (N, O, HO, WO))``."""
    from tvm.script import tirx as T

    n, c, h, w = (int(v) for v in x_shape)
    o, _, kh, kw = (int(v) for v in w_shape)
    top, left, bottom, right = (int(v) for v in padding)
    ho, wo = h + top + bottom - kh + 1, w + left + right - kw + 1
    ph, pw = h + kh - 1, w + kw - 1            # accumulator rows/cols: every tap lands inside
    sh, sw = kh - 1 - top, kw - 1 - left       # output (r, q) lives at accumulator (r + sh, q + sw)

    @T.prim_func
    def scatter_conv(x: T.Buffer((n, c, h, w), "float32"), wt: T.Buffer((c, kh, kw, o), "float32"),
                     y: T.Buffer((n, o, ho, wo), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for b in T.parallel(n):
            acc = T.alloc_buffer((ph, pw, o), "float32")
            for a in range(ph):
                for q in range(pw):
                    for v in T.vectorized(o):
                        acc[a, q, v] = T.float32(0)
            for ch in range(c):
                for r in range(h):
                    for q in range(w):
                        if x[b, ch, r, q] != T.float32(0):
                            for i in T.unroll(kh):
                                for j in T.unroll(kw):
                                    for v in T.vectorized(o):
                                        acc[r + kh - 1 - i, q + kw - 1 - j, v] = (
                                            acc[r + kh - 1 - i, q + kw - 1 - j, v] + x[b, ch, r, q] * wt[ch, i, j, v])
            for v in range(o):
                for r in range(ho):
                    for q in range(wo):
                        y[b, v, r, q] = acc[r + sh, q + sw, v]

    return scatter_conv


@dataclass
class SpikeConv:
    """The kernel compiled for one convolution (its weight baked in as a channels-last tensor)."""

    x_shape: tuple
    weight: np.ndarray           # (O, C, KH, KW)
    padding: tuple
    target: object
    stats: dict = field(default_factory=lambda: {"scatter": 0, "blas": 0})

    def __post_init__(self):
        import tvm

        t0 = time.perf_counter()
        self._lib = tvm.compile(tvm.IRModule({"main": scatter_conv_kernel(self.x_shape, self.weight.shape, self.padding)}),
                                target=tvm.target.Target(self.target))
        self.compile_seconds = time.perf_counter() - t0
        self._w = tvm.runtime.tensor(np.ascontiguousarray(self.weight.transpose(1, 2, 3, 0), dtype=np.float32))

    def __call__(self, x, out) -> None:
        """``x``, ``out``: TVM tensors of the compiled shapes."""
        self._lib["main"](x, self._w, out)


_ids = itertools.count()
_live: list[SpikeConv] = []   # kept alive for as long as their packed functions are registered


def adaptive_conv(x_shape: tuple, weight: np.ndarray, padding: tuple, target, max_density: float = MAX_DENSITY):
    """``(name, SpikeConv)``: a packed function ``(x, w, out)`` registered under ``name`` that runs
    the scatter kernel when at most ``max_density`` of ``x`` is nonzero and im2col + BLAS
    otherwise (``SpikeConv.stats`` counts the calls of each path)."""
    import tvm_ffi

    from .tvm_blas import _conv2d_func

    conv = SpikeConv(tuple(int(v) for v in x_shape), np.asarray(weight, dtype=np.float32), tuple(padding), target)
    limit = max_density * int(np.prod(conv.x_shape))
    blas = _conv2d_func((1, 1), conv.padding)

    def run(x, w, out) -> None:
        if np.count_nonzero(np.from_dlpack(x)) <= limit:
            conv.stats["scatter"] += 1
            conv(x, out)
        else:
            conv.stats["blas"] += 1
            blas(x, w, out)

    name = f"stdeploy.spikeconv.{next(_ids)}"
    tvm_ffi.register_global_func(name, run, override=True)
    _live.append(conv)
    return name, conv


def _main(argv=None) -> None:
    import argparse

    import tvm

    from .profiles import load_profile
    from .tvm_blas import conv2d_nchw
    from .tvm_target import cpu_target

    parser = argparse.ArgumentParser(description="scatter kernel vs im2col + BLAS (the module docstring's figures)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    target = cpu_target(load_profile("cpu"))
    print(f"target {target}")
    for x_shape, w_shape in (((128, 32, 8, 8), (64, 32, 3, 3)), ((128, 64, 4, 4), (64, 64, 3, 3))):
        w = np.random.default_rng(0).standard_normal(w_shape).astype(np.float32)
        conv = SpikeConv(x_shape, w, (1, 1, 1, 1), target)
        for density in (0.05, 0.1, 0.2, 0.3, 1.0):
            x = (np.random.default_rng(1).random(x_shape) < density).astype(np.float32)
            ref = conv2d_nchw(x, w, (1, 1), (1, 1, 1, 1))
            xt, yt = tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros(ref.shape, np.float32))
            conv(xt, yt)
            ts, tb = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                conv(xt, yt)
                ts.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                conv2d_nchw(x, w, (1, 1), (1, 1, 1, 1))
                tb.append(time.perf_counter() - t0)
            s, b = float(np.median(ts)), float(np.median(tb))
            print(f"  x {x_shape} w {w_shape} ones {density:4.0%}: scatter {s * 1e3:7.3f} ms  im2col+BLAS {b * 1e3:7.3f} ms"
                  f"  x{b / s:5.2f}  max |diff| {np.abs(yt.numpy() - ref).max():.1e}")


if __name__ == "__main__":
    _main()
