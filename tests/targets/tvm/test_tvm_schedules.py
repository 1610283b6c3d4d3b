"""The standalone module's adaptive TIR kernels (stdeploy.targets.tvm.schedules): both of a kernel's
paths (gather loops below its density limit, dense loops above) equal numpy's product on spikes and on
real-valued input, in a parallel call and a serial (small) one; the cost model's limits; the Relax
rewrite routes a graph's constant-weight matmul and stride-1 conv to call_tir kernels that need no
Python function at run time."""

import numpy as np
import pytest

from stdeploy.targets.tvm import schedules
from stdeploy.targets.tvm.kernels.blas import conv2d_nchw

pytestmark = pytest.mark.tvm

TARGET = {"kind": "llvm"}


def _compile(func):
    import tvm

    return tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(TARGET))["main"]


def _run(fn, x, w, out_shape):
    import tvm

    y = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32))
    fn(tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
    return y.numpy()


@pytest.mark.parametrize("x_shape", [(4, 8, 16, 32), (1, 6, 32)])   # parallel parts / one serial part (odd rows)
def test_adaptive_matmul_both_paths_equal_numpy(x_shape):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 48)).astype(np.float32)
    fn = _compile(schedules.adaptive_matmul_kernel(x_shape, 32, 48, 0.3))
    for x in ((rng.random(x_shape) < 0.05).astype(np.float32),           # gather path
              (rng.random(x_shape) < 0.9).astype(np.float32),            # dense path
              rng.standard_normal(x_shape).astype(np.float32)):          # dense, real-valued
        np.testing.assert_allclose(_run(fn, x, w, (*x_shape[:-1], 48)), x @ w, rtol=1e-5, atol=1e-4)
    assert (x_shape[0] * np.prod(x_shape[1:-1]) * 32 * 48 < schedules.SERIAL_MACS) == ("parallel" not in
                                                                                         schedules.adaptive_matmul_kernel(x_shape, 32, 48, 0.3).script())


def test_adaptive_conv_both_paths_equal_the_dense_convolution():
    rng = np.random.default_rng(1)
    x_shape, w_shape, padding = (64, 8, 6, 6), (16, 8, 3, 3), (1, 1, 1, 1)
    w = rng.standard_normal(w_shape).astype(np.float32)
    fn = _compile(schedules.adaptive_conv_kernel(x_shape, w_shape, padding, 0.3))
    wt = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    for x in ((rng.random(x_shape) < 0.05).astype(np.float32), (rng.random(x_shape) < 0.9).astype(np.float32),
              rng.standard_normal(x_shape).astype(np.float32)):
        np.testing.assert_allclose(_run(fn, x, wt, (64, 16, 6, 6)), conv2d_nchw(x, w, (1, 1), padding), rtol=1e-5, atol=1e-4)


def test_density_limits_follow_the_cost_model():
    assert schedules.max_density("matmul", 10) == 0.0                    # too little work per input to gather
    assert 0.2 < schedules.max_density("matmul", 256) < 0.35
    assert 0.4 < schedules.max_density("conv2d", 576) < 0.5
    assert schedules.max_density("conv2d", 10 ** 9) <= 1.0


def test_rewrite_routes_matmul_and_conv_to_call_tir_kernels():
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    rng = np.random.default_rng(2)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((2, 4, 6, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, relax.const(rng.standard_normal((8, 4, 3, 3)).astype(np.float32)), padding=1))
            r = bb.emit(relax.op.reshape(c, (2, 8, 36)))
            t = bb.emit(relax.op.permute_dims(r, (0, 2, 1)))
            m = bb.emit(relax.op.matmul(t, relax.const(rng.standard_normal((8, 5)).astype(np.float32))))
            out = bb.emit_output(m)
        bb.emit_func_output(out)
    mod, routed = schedules.standalone_module(bb.get(), TARGET)
    assert [r.op for r in routed] == ["conv2d", "matmul"]
    assert "call_dps_packed" not in mod.script() and mod.script().count("R.call_tir(cls.adaptive_") == 2
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(TARGET)), tvm.cpu())
    xv = (rng.random((2, 4, 6, 6)) < 0.2).astype(np.float32)
    ref = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm.target.Target(TARGET)), tvm.cpu())["main"](tvm.runtime.tensor(xv))
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(xv)).numpy(), ref.numpy(), rtol=1e-5, atol=1e-4)
