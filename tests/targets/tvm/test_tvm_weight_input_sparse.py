"""The kernels that skip zero inputs and zero weights (stdeploy.targets.tvm.kernels.skipzero): the
weight's row CSR, both TIR kernels bit-identical to the gather kernels (same summation order, the
skipped terms are zero) and equal to the dense product within float32 rounding, on spikes and on
real inputs; the adaptive packed function picks a path per call by the measured lines and caches
the skip-zero threshold under the weight's zero pattern; routing uses it for pruned weights only;
and a whole-model pruned sdt-tiny on the default CPU path keeps PyTorch's spikes with the
skip-zero kernel forced on every layer (its layers checked to fire)."""

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import dataclasses

import numpy as np
import pytest
import torch

from stdeploy.errors import ShapeError
from stdeploy.targets.tvm.database import CrossoverCache
from stdeploy.targets.tvm.kernels import skipzero, spike
from stdeploy.targets.tvm.kernels.blas import conv2d_nchw
from stdeploy.targets.tvm.kernels.routing import route_to_external_kernels

pytestmark = pytest.mark.tvm


def _pruned(rng, shape, sparsity):
    w = rng.normal(size=shape).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0
    return w


def _inputs(rng, shape, kind):
    return ((rng.random(shape) < 0.15) if kind == "spikes" else rng.normal(size=shape) * (rng.random(shape) < 0.5)).astype(np.float32)


def test_row_csr_round_trip_and_checks():
    rng = np.random.default_rng(0)
    w = _pruned(rng, (13, 9), 0.8)
    w[4] = 0                                     # an input row with no weights
    csr = skipzero.rows_from_dense(w)
    assert csr.nnz == np.count_nonzero(w) and csr.ptr[4] == csr.ptr[5]
    np.testing.assert_array_equal(csr.to_dense(), w)
    assert csr.ptr.dtype == np.int32 and csr.vals.dtype == np.float32 and not csr.vals.flags.writeable
    with pytest.raises(ShapeError, match=r"ptr must be \(14,\)"):
        skipzero.RowCSR(ptr=csr.ptr[:-1], cols=csr.cols, vals=csr.vals, shape=(13, 9))
    with pytest.raises(ShapeError, match=r"cols must lie in \[0, 3\)"):
        skipzero.RowCSR(ptr=csr.ptr, cols=csr.cols, vals=csr.vals, shape=(13, 3))
    with pytest.raises(ShapeError, match="2-D"):
        skipzero.rows_from_dense(np.ones(4, np.float32))
    assert skipzero.zero_pattern(w) == skipzero.zero_pattern(w * 2)          # values do not enter, zeros do
    w2 = w.copy()
    w2[0, 0] = 0 if w[0, 0] else 1
    assert skipzero.zero_pattern(w2) != skipzero.zero_pattern(w)


@pytest.mark.parametrize("x_shape,n,sparsity", [
    ((4, 3, 5, 64), 64, 0.95),    # (T, B, tokens, D) as the attention's linears see it, 95% zeros
    ((7, 48), 96, 0.8),           # rows split unevenly between tasks
    ((5, 10), 3, 1.0),            # an all-zero weight: the output is zero
])
@pytest.mark.parametrize("kind", ["spikes", "real"])
def test_skipzero_matmul_equals_the_gather_kernel_bit_for_bit(target, x_shape, n, sparsity, kind):
    import tvm

    rng = np.random.default_rng(1)
    w = _pruned(rng, (x_shape[-1], n), sparsity)
    x = _inputs(rng, x_shape, kind)
    out_skip, out_gather = (tvm.runtime.tensor(np.full((*x_shape[:-1], n), np.nan, np.float32)) for _ in range(2))
    skipzero.SkipZeroMatmul(x_shape, w, target)(tvm.runtime.tensor(x), out_skip)
    spike.SpikeMatmul(x_shape, w, target)(tvm.runtime.tensor(x), out_gather)
    np.testing.assert_array_equal(out_skip.numpy(), out_gather.numpy())
    np.testing.assert_allclose(out_skip.numpy(), x @ w, rtol=0, atol=2e-5)
    assert np.count_nonzero(out_skip.numpy()) > 0 or sparsity == 1.0


@pytest.mark.parametrize("x_shape,w_shape,padding,sparsity", [
    ((3, 4, 9, 7), (5, 4, 3, 3), (1, 1, 1, 1), 0.9),
    ((2, 3, 6, 5), (8, 3, 3, 2), (0, 1, 2, 0), 0.7),     # asymmetric kernel and padding
    ((6, 16, 4, 4), (32, 16, 3, 3), (1, 1, 1, 1), 0.95),
])
@pytest.mark.parametrize("kind", ["spikes", "real"])
def test_skipzero_conv_equals_the_gather_kernel_bit_for_bit(target, x_shape, w_shape, padding, sparsity, kind):
    import tvm

    rng = np.random.default_rng(2)
    w = _pruned(rng, w_shape, sparsity)
    x = _inputs(rng, x_shape, kind)
    ref = conv2d_nchw(x, w, (1, 1), padding)
    out_skip, out_gather = (tvm.runtime.tensor(np.full(ref.shape, np.nan, np.float32)) for _ in range(2))
    skipzero.SkipZeroConv(x_shape, w, padding, target)(tvm.runtime.tensor(x), out_skip)
    spike.SpikeConv(x_shape, w, padding, target)(tvm.runtime.tensor(x), out_gather)
    np.testing.assert_array_equal(out_skip.numpy(), out_gather.numpy())
    np.testing.assert_allclose(out_skip.numpy(), ref, rtol=0, atol=2e-5)
    assert np.count_nonzero(ref) > 0


def test_adaptive_picks_by_the_measured_lines_and_caches_by_zero_pattern(tmp_path, target):
    import tvm

    rng = np.random.default_rng(3)
    x_shape = (4, 2, 16, 64)
    w = _pruned(rng, (64, 64), 0.95)
    cache = CrossoverCache(tmp_path / "c.json")
    _, k = skipzero.adaptive_matmul(x_shape, w, target, crossovers=cache)
    assert k.threshold_source == "measured" and cache.measured == 2          # gather's and skip-zero's
    kinds = sorted(key.kind for key, _ in cache.entries.values())
    assert kinds == ["skipzeromatmul", "spikematmul"]
    skip_key = next(key for key, _ in cache.entries.values() if key.kind == "skipzeromatmul")
    assert skip_key.weights == skipzero.zero_pattern(w)
    cache.save()
    # the path of each call is the fastest of the three predicted lines at its density
    x = (rng.random(x_shape) < 0.1).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((*x_shape[:-1], 64), np.float32))
    k.run(tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    expected = k.choose(spike.density(x, *k.sample))
    assert k.stats[expected] == 1 and sum(k.stats.values()) == 1
    np.testing.assert_allclose(out.numpy(), x @ w, rtol=0, atol=2e-5)
    # a BLAS line below both kernels' lines sends everything to BLAS, and the other way round
    k.crossover = dataclasses.replace(k.crossover, dense_s=k.crossover.fixed_s / 10)
    assert k.choose(0.0) == "blas"
    k.crossover = dataclasses.replace(k.crossover, fixed_s=0.0, busy_s=0.0, dense_s=1.0)
    assert k.choose(0.3) == "skipzero"
    for path in ("skipzero", "gather", "blas"):
        k.forced = path
        out2 = tvm.runtime.tensor(np.zeros((*x_shape[:-1], 64), np.float32))
        k.run(tvm.runtime.tensor(x), tvm.runtime.tensor(w), out2)
        np.testing.assert_allclose(out2.numpy(), x @ w, rtol=0, atol=2e-5)
    # read back: same shape and zero pattern -> cached; another zero pattern -> measured again
    again = CrossoverCache(tmp_path / "c.json")
    _, k2 = skipzero.adaptive_matmul(x_shape, w * 3, target, crossovers=again)
    assert k2.threshold_source == "cached" and again.reused == 2 and again.measured == 0
    w3 = w.copy()
    w3[0, :] = 1.0
    _, k3 = skipzero.adaptive_matmul(x_shape, w3, target, crossovers=again)
    assert k3.threshold_source == "measured" and again.measured == 1          # the gather's threshold is shared


def test_routing_uses_it_for_pruned_weights_only(target):
    from tvm import relax

    rng = np.random.default_rng(4)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4, 8, 8), "float32"))
    with bb.function("main", [x]):
        a = bb.emit(relax.op.nn.conv2d(x, relax.const(_pruned(rng, (8, 4, 3, 3), 0.9)), padding=[1, 1, 1, 1]))
        b = bb.emit(relax.op.nn.conv2d(a, relax.const(_pruned(rng, (8, 8, 3, 3), 0.1)), padding=[1, 1, 1, 1]))
        bb.emit_func_output(b)
    mod, done = route_to_external_kernels(bb.get(), spike_target=target)
    assert [o.op for o in done] == ["spike-conv2d", "spike-conv2d"]
    assert isinstance(done[0].kernel, skipzero.AdaptiveSparse)
    assert isinstance(done[1].kernel, spike.SpikeConv)
    assert "stdeploy.skipzeroconv." in mod.script() and "stdeploy.spikeconv." in mod.script()


def test_whole_model_pruned_sdt_keeps_pytorch_spikes(whole_model_pruned_sdt, tmp_path, target):
    """sdt-tiny pruned to 95% over every weight layer (embedding convolutions and classifier
    included), BatchNorm re-estimated, checked to fire; every pruned layer forced onto the
    skip-zero kernel on the default CPU path (LIF recurrences fused): the output spikes equal PyTorch's."""
    import tvm
    from tvm import relax

    from stdeploy.activity import measure_activity, require_active
    from stdeploy.export.directory import export_model
    from stdeploy.export.validate import logits_and_spikes
    from stdeploy.models import direct_encode
    from stdeploy.targets.tvm.cpu import outputs_to_numpy
    from stdeploy.targets.tvm.frontend import load_onnx_graph, relax_module
    from stdeploy.targets.tvm.kernels.lif import fuse_lif_recurrences

    model, data = whole_model_pruned_sdt
    x = direct_encode(torch.stack([data.test[i][0] for i in range(8)]), model.cfg.timesteps)
    rates = measure_activity(model, x).firing_rates
    require_active(rates, 0.005, 0.5, what="whole-model pruned sdt-tiny")
    export_model(model, tmp_path / "export", ("onnx",), data=None, samples=8, overwrite=True)
    graph = load_onnx_graph(tmp_path / "export")
    mod, done = route_to_external_kernels(relax_module(graph, 8), spike_target=target, crossovers=CrossoverCache(None))
    pruned = [o.kernel for o in done if isinstance(o.kernel, skipzero.AdaptiveSparse)]
    assert len(pruned) >= 8, [o.op for o in done]    # every pruned convolution and linear
    for k in pruned:
        k.forced = "skipzero"
    mod, fused = fuse_lif_recurrences(mod, target)   # as the default path does (and 4-5x faster to compile)
    assert len(fused) == 10
    with tvm.target.Target(target):
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
                                        relax.get_pipeline("zero")])(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(target)), tvm.cpu())
    spikes = outputs_to_numpy(vm["main"](tvm.runtime.tensor(x.numpy())), graph.outputs)["spikes"]
    ref_spikes = logits_and_spikes(model, x)[1]
    assert spikes.sum() > 0
    np.testing.assert_array_equal(spikes, ref_spikes.numpy())
    assert all(k.stats["skipzero"] == 1 and k.stats["gather"] == k.stats["blas"] == 0 for k in pruned)
