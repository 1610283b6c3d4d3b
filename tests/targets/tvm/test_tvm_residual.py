"""Folding a weight kernel's bias and residual adds into its store (stdeploy.targets.tvm.kernels.residual):
the patterns it takes and those it must leave alone (the kernels' residual forms are checked bit for
bit in test_tvm_eventlif.py, the whole pruned model against onnxruntime in test_tvm_event.py)."""

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np
import pytest

pytestmark = pytest.mark.tvm


def test_residual_folding_takes_its_patterns_only():
    """kernels.residual refuses: the layer's output read elsewhere, a bias along another axis, a residual
    add that broadcasts, and a transpose other than the tokens' one; it folds the plain pattern."""
    from tvm import relax

    from stdeploy.targets.tvm.kernels import event, residual

    w = np.where(np.random.default_rng(0).random((64, 32)) < 0.2, 1.0, 0.0).astype(np.float32)
    layer = event.EventLayer("matmul", (64, 32), (4, 64), 0.2, int(w.sum()), "stdeploy_event_matmul_0")
    conv = event.EventLayer("conv2d", (8, 8, 3, 3), (2, 8, 4, 4), 0.2, 3, "stdeploy_stationary_conv_1", (1, 1, 1, 1), 2)

    def module(build, r_shape=(4, 32)):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((4, 64), "float32"))
        r = relax.Var("r", relax.TensorType(r_shape, "float32"))
        with bb.function("main", [x, r]):
            with bb.dataflow():
                gv = bb.add_func(event.event_matmul_kernel((4, 64), 64, 32).with_attr("global_symbol", layer.name), layer.name)
                y = bb.emit(relax.call_tir(gv, [x, relax.const(w), relax.const(event.live_masks(w))],
                                           relax.TensorType((4, 32), "float32")))
                out = bb.emit_output(build(bb, y, r))
            bb.emit_func_output(out)
        return bb.get()

    bias = relax.const(np.arange(32, dtype=np.float32))
    plain = lambda bb, y, r: relax.op.add(r, bb.emit(relax.op.add(bias, y)))                                # noqa: E731
    mod, done = residual.fold_residual_adds(module(plain), [layer])
    assert [d.layer for d in done] == [layer.name] and "stdeploy_event_matmul_residual_0" in mod.script()
    column = relax.const(np.arange(4, dtype=np.float32).reshape(4, 1))
    refused = [lambda bb, y, r: relax.op.add(bb.emit(relax.op.add(bias, y)), y),                            # Y read twice
               lambda bb, y, r: relax.op.add(r, bb.emit(relax.op.add(column, y)))]                         # bias per row
    for build in refused:
        assert residual.fold_residual_adds(module(build), [layer])[1] == []
    assert residual.fold_residual_adds(module(plain, (2, 4, 32)), [layer])[1] == []                      # R broadcasts
    # the tokens' transpose ([0, 1, 3, 2] after the flattening reshape) is folded; another permute is not
    def tokens(axes):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((2, 8, 4, 4), "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                wc = np.pad(np.ones((1, 1, 3, 3), np.float32), ((0, 7), (0, 7), (0, 0), (0, 0)))
                gv = bb.add_func(event.stationary_conv_kernel((2, 8, 4, 4), (8, 8, 3, 3), (1, 1, 1, 1), 9, 1)
                                 .with_attr("global_symbol", conv.name), conv.name)
                y = bb.emit(relax.call_tir(gv, [x, *(relax.const(a) for a in event.conv_columns(wc))],
                                           relax.TensorType((2, 8, 4, 4), "float32")))
                z = bb.emit(relax.op.add(x, bb.emit(relax.op.add(y, relax.const(np.ones((1, 8, 1, 1), np.float32))))))
                out = bb.emit_output(relax.op.permute_dims(bb.emit(relax.op.reshape(z, (1, 2, 8, 16))), axes))
            bb.emit_func_output(out)
        return residual.fold_residual_adds(bb.get(), [conv])[1]

    assert [d.shape for d in tokens([0, 1, 3, 2])] == [(1, 2, 16, 8)]
    assert tokens([0, 2, 1, 3]) == [] and tokens(None) == []
