"""The accumulate-only convolution (stdeploy.targets.tvm_spikeconv): equal to the dense convolution
for spikes and for any real input, at several shapes and paddings; the adaptive packed function
picks the scatter kernel for mostly-zero inputs and BLAS otherwise, and says which; the CPU
module uses it by default and keeps PyTorch's spikes."""

import numpy as np
import pytest
import torch

from stdeploy.targets import tvm_spikeconv
from stdeploy.targets.profiles import load_profile
from stdeploy.targets.tvm_blas import conv2d_nchw, offload_to_blas
from stdeploy.targets.tvm_target import cpu_target

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def target():
    return cpu_target(load_profile("cpu"))


def torch_conv(x, w, padding):
    top, left, bottom, right = padding
    xp = torch.nn.functional.pad(torch.from_numpy(x), (left, right, top, bottom))
    return torch.nn.functional.conv2d(xp, torch.from_numpy(w)).numpy()


@pytest.mark.parametrize("x_shape,w_shape,padding", [
    ((3, 4, 9, 7), (5, 4, 3, 3), (1, 1, 1, 1)),     # the stem's 3x3 "same" convolution
    ((2, 3, 6, 5), (8, 3, 3, 2), (0, 1, 2, 0)),     # asymmetric kernel and padding
    ((2, 2, 5, 5), (3, 2, 1, 1), (0, 0, 0, 0)),     # 1x1
    ((1, 16, 4, 4), (32, 16, 3, 3), (2, 2, 2, 2)),  # padding = kernel - 1: a "full" convolution
])
@pytest.mark.parametrize("kind", ["spikes", "real"])
def test_scatter_kernel_equals_the_dense_convolution(target, x_shape, w_shape, padding, kind):
    import tvm

    rng = np.random.default_rng(0)
    w = rng.normal(size=w_shape).astype(np.float32)
    x = ((rng.random(x_shape) < 0.15) if kind == "spikes" else rng.normal(size=x_shape)).astype(np.float32)
    assert tvm_spikeconv.applicable(x_shape, w_shape, (1, 1), padding)
    conv = tvm_spikeconv.SpikeConv(x_shape, w, padding, target)
    expected = torch_conv(x, w, padding)
    out = tvm.runtime.tensor(np.full(expected.shape, np.nan, np.float32))
    conv(tvm.runtime.tensor(x), out)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2e-5)


def test_only_what_the_kernel_handles():
    ok = tvm_spikeconv.applicable
    assert ok((1, 4, 8, 8), (4, 4, 3, 3), (1, 1), (1, 1, 1, 1))
    assert not ok((1, 4, 8, 8), (4, 4, 3, 3), (2, 2), (1, 1, 1, 1))      # stride 2
    assert not ok((1, 4, 8, 8), (4, 2, 3, 3), (1, 1), (1, 1, 1, 1), 2)   # grouped
    assert not ok((1, 4, 8, 8), (4, 4, 3, 3), (1, 1), (3, 1, 1, 1))      # padding >= kernel


def test_adaptive_conv_picks_the_path_by_density(target):
    import tvm
    import tvm_ffi

    rng = np.random.default_rng(1)
    x_shape, w = (4, 8, 6, 6), rng.normal(size=(16, 8, 3, 3)).astype(np.float32)
    name, conv = tvm_spikeconv.adaptive_conv(x_shape, w, (1, 1, 1, 1), target)
    run = tvm_ffi.get_global_func(name)
    wt = tvm.runtime.tensor(w)
    for density, path in ((0.05, "scatter"), (0.12, "scatter"), (0.6, "blas"), (1.0, "blas")):
        x = (rng.random(x_shape) < density).astype(np.float32)
        expected = conv2d_nchw(x, w, (1, 1), (1, 1, 1, 1))
        out = tvm.runtime.tensor(np.zeros(expected.shape, np.float32))
        before = dict(conv.stats)
        run(tvm.runtime.tensor(x), wt, out)
        assert conv.stats[path] == before[path] + 1, (density, conv.stats)
        np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2e-5)


def test_offload_uses_it_for_stride_one_convolutions(target):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 8, 8), "float32"))
    w1 = relax.const(np.ones((4, 3, 3, 3), np.float32))
    w2 = relax.const(np.ones((4, 4, 3, 3), np.float32))
    with bb.function("main", [x]):
        a = bb.emit(relax.op.nn.conv2d(x, w1, padding=[1, 1, 1, 1]))
        bb.emit_func_output(bb.emit(relax.op.nn.conv2d(a, w2, strides=[2, 2], padding=[1, 1, 1, 1])))
    mod, done = offload_to_blas(bb.get(), spike_conv_target=target)
    assert [o.op for o in done] == ["spike-conv2d", "conv2d"]   # the strided one stays on BLAS
    assert "stdeploy.spikeconv." in mod.script() and "R.nn.conv2d" not in mod.script()
    _, plain = offload_to_blas(bb.get())
    assert [o.op for o in plain] == ["conv2d", "conv2d"]
