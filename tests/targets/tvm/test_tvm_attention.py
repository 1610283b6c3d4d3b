"""The attention's product summed over tokens as one kernel (stdeploy.targets.tvm.kernels.attention):
bit-identical to the product then the sum in the lowered order (per output from 0, the summed
index ascending), on real values where a fused multiply-add would change the result; the routing
chooses it only where the pattern holds. The whole-model pruned sdt-tiny (test_tvm_event.py) runs
it against onnxruntime."""

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np
import pytest

from stdeploy.errors import ShapeError
from stdeploy.targets.tvm.kernels import attention, lif

pytestmark = pytest.mark.tvm


@pytest.mark.parametrize("shape,axis", [((2, 3, 7, 32), 2), ((5, 9, 48), 1), ((11, 16), 0)])
def test_product_sum_equals_the_product_then_the_sum_bit_for_bit(target, shape, axis):
    import tvm

    rng = np.random.default_rng(3)
    a = rng.normal(size=shape).astype(np.float32)
    b = rng.normal(size=shape).astype(np.float32)
    f = np.float32
    ref = np.zeros(np.delete(np.array(shape), axis), f)
    for j in range(shape[axis]):
        ref = (ref + (np.take(a, j, axis) * np.take(b, j, axis)).astype(f)).astype(f)
    fused = np.zeros_like(ref)
    for j in range(shape[axis]):    # what a fused multiply-add would give: differs somewhere, so the test can tell
        fused = (fused.astype(np.float64) + np.take(a, j, axis).astype(np.float64) * np.take(b, j, axis)).astype(f)
    assert not np.array_equal(fused, ref)
    func = attention.product_sum_kernel(shape, axis)
    assert not lif.contracts_to_fma(func, target)
    out = tvm.runtime.tensor(np.full(ref.shape, 7, np.float32))
    fn = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(target))["main"]
    fn(tvm.runtime.tensor(a), tvm.runtime.tensor(b), tvm.runtime.tensor(np.full(lif.LANES, -1, np.int32)), out)
    np.testing.assert_array_equal(out.numpy(), ref)


def test_product_sum_refuses_shapes_it_cannot_vectorise():
    with pytest.raises(ShapeError, match="lanes"):
        attention.product_sum_kernel((4, 5, 10), 1)
    with pytest.raises(ShapeError, match="axis"):
        attention.product_sum_kernel((4, 16), 1)
    with pytest.raises(ShapeError, match="output shape"):
        attention.product_sum_kernel((4, 5, 16), 1, out_shape=(4, 15))


def test_routing_takes_the_pattern_only(target):
    """A product read twice, a sum over the last axis, or a product of different shapes stay Relax's."""
    import tvm
    from tvm import relax

    def module(build):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((4, 16, 32), "float32"))
        y = relax.Var("y", relax.TensorType((4, 16, 32), "float32"))
        with bb.function("main", [x, y]):
            with bb.dataflow():
                out = bb.emit_output(build(bb, x, y))
            bb.emit_func_output(out)
        return bb.get()

    routed, done = attention.route_product_sums(module(lambda bb, x, y: relax.op.sum(bb.emit(x * y), axis=[1])), target)
    assert [(d.shape, d.axis) for d in done] == [((4, 16, 32), 1)] and "stdeploy_product_sum_0" in routed.script()
    twice = lambda bb, x, y: relax.op.add(relax.op.sum(p := bb.emit(x * y), axis=[1], keepdims=True), p)   # noqa: E731
    last = lambda bb, x, y: relax.op.sum(bb.emit(x * y), axis=[2])                                       # noqa: E731
    for build in (twice, last):
        assert attention.route_product_sums(module(build), target)[1] == []

