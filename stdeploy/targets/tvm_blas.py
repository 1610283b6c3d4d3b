"""Hand the heavy operators of a Relax graph to an optimised CPU kernel (BLAS via numpy).

TVM's CPU codegen gives ``matmul`` and ``conv2d`` no schedule unless they are tuned, and this
wheel has no BLAS/DNNL dispatch (STACK.md), so an untuned graph runs 10-40x slower than
onnxruntime. This module rewrites, in the Relax graph,

* ``R.matmul(x, W)`` with a constant 2-D ``W`` (a linear layer), and
* ``R.nn.conv2d(x, W)`` (NCHW / OIHW, constant weight, ``groups = 1``, no dilation),

into ``R.call_dps_packed`` calls of packed functions registered here, which run the product
with numpy's BLAS on zero-copy DLPack views of TVM's buffers (the convolution as an im2col
matrix product; with ``spike_target``, matmuls and stride-1 convolutions go to the spike-adaptive
kernels of :mod:`stdeploy.targets.tvm_spikeconv` instead, which fall back to these products for
dense inputs). Everything else (the LIF recurrences, pooling, reductions) stays TVM code.
It is the CPU path's default when no tuning database exists; ``stdeploy tune`` then tunes what
remains in TIR (see :mod:`stdeploy.targets.tvm_tune`).

Arithmetic: BLAS sums in blocked order, as onnxruntime does, so a membrane sitting within a
few float32 ulps of its threshold can spike differently from PyTorch; the export validation
reports such flips (measured on the demo models: 0 spike differences to onnxruntime).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MATMUL, CONV2D = "stdeploy.blas.matmul", "stdeploy.blas.conv2d"


def _views(*tensors) -> list[np.ndarray]:
    return [np.from_dlpack(t) for t in tensors]


def _matmul(x, w, out) -> None:
    a, b, o = _views(x, w, out)
    np.matmul(a.reshape(-1, a.shape[-1]), b, out=o.reshape(-1, o.shape[-1]))


def conv2d_nchw(x: np.ndarray, w: np.ndarray, stride: tuple[int, int], padding: tuple[int, int, int, int]) -> np.ndarray:
    """``conv2d`` of ``x`` (B, C, H, W) with ``w`` (O, C, kh, kw) as one BLAS product of the
    im2col matrix; ``padding`` is (top, left, bottom, right) as in Relax. The input is padded
    into channels-last order first, so every im2col row is gathered in runs of C contiguous
    floats (3x faster than gathering from NCHW, measured on the demo model's convolutions)."""
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


def _conv2d_func(stride: tuple[int, int], padding: tuple[int, int, int, int]):
    def run(x, w, out) -> None:
        a, k, o = _views(x, w, out)
        o[...] = conv2d_nchw(a, k, stride, padding)
    return run


_registered: set[str] = set()


def _register(name: str, func) -> str:
    import tvm_ffi

    if name not in _registered:
        tvm_ffi.register_global_func(name, func, override=True)
        _registered.add(name)
    return name


def _conv_name(stride, padding) -> str:
    return f"{CONV2D}.s{stride[0]}x{stride[1]}.p{'_'.join(map(str, padding))}"


@dataclass(frozen=True)
class Offloaded:
    op: str        # "matmul", "conv2d", "spike-matmul" or "spike-conv2d"
    shape: tuple   # weight shape
    out: tuple     # output shape
    kernel: object = None   # spike-*: its SpikeConv / SpikeMatmul (call statistics in .stats)


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def offload_to_blas(mod, *, matmul: bool = True, conv2d: bool = True, spike_target: dict | None = None):
    """``(new_mod, [Offloaded, ...])``: ``mod`` with its constant-weight matmuls and plain NCHW
    convolutions turned into calls of the BLAS packed functions (registered on first use).
    With ``spike_target`` (the CPU target), stride-1 convolutions and matmuls become
    :func:`stdeploy.targets.tvm_spikeconv.adaptive_conv` / ``adaptive_matmul`` calls instead: the
    accumulate-only kernel while the input is mostly zeros (spikes), BLAS otherwise (ops
    ``spike-conv2d``, ``spike-matmul``).
    Operators that do not fit (dynamic shapes, grouped or dilated convolutions, non-constant
    weights) are left to TVM and not listed."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from . import tvm_spikeconv

    _register(MATMUL, _matmul)
    op_matmul, op_conv = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.nn.conv2d")
    const_type = type(relax.const(0.0))
    done: list[Offloaded] = []

    def static_out(call) -> tuple | None:
        shape = getattr(call.ty, "shape", None)
        try:
            return _ints(shape)
        except (TypeError, ValueError):  # symbolic dims: leave to TVM
            return None

    @mutator
    class _Rewrite(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            weight = call.args[1] if len(call.args) > 1 else None
            if not isinstance(weight, const_type) or getattr(call.ty, "dtype", None) != "float32":
                return call
            out = static_out(call)
            if out is None or weight.value.dtype != "float32":
                return call
            if matmul and call.op == op_matmul and len(weight.value.shape) == 2:
                x_shape = static_out(call.args[0])
                if spike_target is not None and x_shape is not None and len(x_shape) >= 2:
                    name, mm = tvm_spikeconv.adaptive_matmul(x_shape, weight.value.numpy(), spike_target)
                    done.append(Offloaded("spike-matmul", _ints(weight.value.shape), out, mm))
                    return relax.call_dps_packed(name, relax.Tuple(list(call.args)), out_ty=call.ty)
                done.append(Offloaded("matmul", _ints(weight.value.shape), out))
                return relax.call_dps_packed(MATMUL, relax.Tuple(list(call.args)), out_ty=call.ty)
            if conv2d and call.op == op_conv:
                a = call.attrs
                if (int(a.groups) != 1 or any(int(d) != 1 for d in a.dilation) or str(a.data_layout) != "NCHW"
                        or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW"):
                    return call
                stride, padding = _ints(a.strides), _ints(a.padding)
                x_shape = static_out(call.args[0])
                if spike_target is not None and x_shape is not None and tvm_spikeconv.applicable(
                        x_shape, _ints(weight.value.shape), stride, padding):
                    name, conv = tvm_spikeconv.adaptive_conv(x_shape, weight.value.numpy(), padding, spike_target)
                    done.append(Offloaded("spike-conv2d", _ints(weight.value.shape), out, conv))
                    return relax.call_dps_packed(name, relax.Tuple(list(call.args[:2])), out_ty=call.ty)
                name = _register(_conv_name(stride, padding), _conv2d_func(stride, padding))
                done.append(Offloaded("conv2d", _ints(weight.value.shape), out))
                return relax.call_dps_packed(name, relax.Tuple(list(call.args[:2])), out_ty=call.ty)
            return call

    rewriter = _Rewrite(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.get(), done
