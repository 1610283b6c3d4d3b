"""BLAS products as TVM packed functions: ``matmul`` and ``conv2d`` run by numpy's BLAS on
zero-copy DLPack views of TVM's buffers.

Contract: every packed function has TVM's destination-passing signature ``(x, w, out)``, float32,
and writes ``out`` in place. :data:`MATMUL` computes ``out = x.reshape(-1, K) @ w`` for a 2-D
``w (K, N)``; :func:`blas_conv2d` returns the function for one ``(stride, padding)`` of an NCHW /
OIHW convolution (``groups = 1``, no dilation), computed as one BLAS product of the im2col matrix
(:func:`conv2d_nchw`). BLAS sums in blocked order, as onnxruntime does, so a membrane within a
few float32 ulps of its threshold can spike differently from PyTorch; export validation reports
such flips.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MATMUL", "CONV2D", "blas_matmul", "conv2d_nchw", "blas_conv2d", "register_packed", "conv_packed_name"]

MATMUL, CONV2D = "stdeploy.blas.matmul", "stdeploy.blas.conv2d"


def _views(*tensors) -> list[np.ndarray]:
    return [np.from_dlpack(t) for t in tensors]


def blas_matmul(x, w, out) -> None:
    """``out = x @ w`` over the rows of ``x (..., K)`` with ``w (K, N)`` (TVM tensors), in place."""
    a, b, o = _views(x, w, out)
    np.matmul(a.reshape(-1, a.shape[-1]), b, out=o.reshape(-1, o.shape[-1]))


def conv2d_nchw(x: np.ndarray, w: np.ndarray, stride: tuple[int, int], padding: tuple[int, int, int, int]) -> np.ndarray:
    """``conv2d`` of ``x`` (B, C, H, W) with ``w`` (O, C, kh, kw) as one BLAS product of the
    im2col matrix; ``padding`` is (top, left, bottom, right) as in Relax. The input is padded
    into channels-last order first, so every im2col row is gathered in runs of C contiguous
    floats rather than gathered from NCHW with a stride of H*W."""
    b, c, h, w_in = x.shape
    o, c_w, kh, kw = w.shape
    if c_w != c:
        raise ValueError(f"conv2d: input has {c} channels, weight {w.shape} expects {c_w}")
    top, left, bottom, right = padding
    xh = np.zeros((b, h + top + bottom, w_in + left + right, c), dtype=x.dtype)
    xh[:, top:top + h, left:left + w_in, :] = x.transpose(0, 2, 3, 1)
    win = np.lib.stride_tricks.sliding_window_view(xh, (kh, kw), axis=(1, 2))[:, ::stride[0], ::stride[1]]
    oh, ow = win.shape[1], win.shape[2]
    cols = win.transpose(0, 1, 2, 4, 5, 3).reshape(b * oh * ow, kh * kw * c)   # rows (kh, kw, C)
    weight = w.transpose(0, 2, 3, 1).reshape(o, kh * kw * c)
    return (cols @ weight.T).reshape(b, oh, ow, o).transpose(0, 3, 1, 2)


def blas_conv2d(stride: tuple[int, int], padding: tuple[int, int, int, int]):
    """The packed function ``(x, w, out)`` of one NCHW convolution's ``stride`` and ``padding``."""
    def run(x, w, out) -> None:
        a, k, o = _views(x, w, out)
        o[...] = conv2d_nchw(a, k, stride, padding)
    return run


_registered: set[str] = set()


def register_packed(name: str, func) -> str:
    """Register ``func`` as TVM global function ``name`` (once per process); returns ``name``."""
    import tvm_ffi

    if name not in _registered:
        tvm_ffi.register_global_func(name, func, override=True)
        _registered.add(name)
    return name


def conv_packed_name(stride, padding) -> str:
    """The global function name of the BLAS convolution for one ``stride`` and ``padding``."""
    return f"{CONV2D}.s{stride[0]}x{stride[1]}.p{'_'.join(map(str, padding))}"
