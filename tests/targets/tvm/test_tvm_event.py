"""The pruned-layer kernels compiled into the module (stdeploy.targets.tvm.kernels.event) and the
max-pool kernel (kernels.pool): the event matmul and the weight-stationary convolution
bit-identical to the skip-zero kernels (spikes and real inputs, uneven shapes), the max pool to
numpy's; and the whole-model pruned sdt-tiny on the default CPU module: its pruned layers are
routed to these kernels (no Python packed function, no BLAS), and its spikes and logits are
onnxruntime's bit for bit (the model checked to fire)."""

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from stdeploy.errors import ShapeError
from stdeploy.targets.tvm.kernels import event, pool, skipzero
from stdeploy.targets.tvm.kernels.blas import conv2d_nchw

pytestmark = pytest.mark.tvm


def _compile(func, target):
    import tvm

    return tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(target))["main"]


def _pruned(rng, shape, sparsity):
    w = rng.normal(size=shape).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0
    return w


def _inputs(rng, shape, kind):
    return ((rng.random(shape) < 0.15) if kind == "spikes" else rng.normal(size=shape) * (rng.random(shape) < 0.5)).astype(np.float32)


@pytest.mark.parametrize("x_shape,n,sparsity", [
    ((4, 3, 5, 64), 64, 0.9),     # (T, B, tokens, D), K two blocks
    ((7, 45), 96, 0.8),           # K = one block + 13 tested one by one; rows split unevenly between tasks
    ((5, 10), 3, 1.0),            # an all-zero weight: the output is zero
])
@pytest.mark.parametrize("kind", ["spikes", "real"])
def test_event_matmul_equals_the_skipzero_kernel_bit_for_bit(target, x_shape, n, sparsity, kind):
    import tvm

    rng = np.random.default_rng(1)
    w = _pruned(rng, (x_shape[-1], n), sparsity)
    x = _inputs(rng, x_shape, kind)
    x.reshape(-1)[:x.shape[-1]] = 0               # a row without events
    w[1] = 0                                      # an input whose events change nothing: not live
    live = event.live_masks(w)
    assert live.dtype == np.uint32 and live.size == -(-w.shape[0] // event.BLOCK) and not live[0] & 2
    assert bin(int(live[0])).count("1") == np.count_nonzero((w[:event.BLOCK] != 0).any(axis=1))
    fn = _compile(event.event_matmul_kernel(x_shape, *w.shape), target)
    out_event, out_skip = (tvm.runtime.tensor(np.full((*x_shape[:-1], n), np.nan, np.float32)) for _ in range(2))
    fn(tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(live), out_event)
    skipzero.SkipZeroMatmul(x_shape, w, target)(tvm.runtime.tensor(x), out_skip)
    np.testing.assert_array_equal(out_event.numpy(), out_skip.numpy())
    np.testing.assert_allclose(out_event.numpy(), x @ w, rtol=0, atol=2e-5)
    assert np.count_nonzero(out_event.numpy()) > 0 or sparsity == 1.0


@pytest.mark.parametrize("x_shape,w_shape,padding,sparsity", [
    ((3, 4, 9, 7), (5, 4, 3, 3), (1, 1, 1, 1), 0.9),
    ((2, 3, 6, 5), (8, 3, 3, 2), (0, 1, 2, 0), 0.7),     # asymmetric kernel and padding
    ((9, 1, 8, 8), (32, 1, 3, 3), (1, 1, 1, 1), 0.34),    # a stem: one input channel, mostly nonzero weights
    ((3, 2, 4, 8), (4, 2, 3, 3), (1, 0, 1, 2), 0.3),      # flat planes (conv_planes), all shifts to one side
    ((2, 3, 4, 4), (6, 3, 5, 5), (2, 2, 2, 2), 0.5),      # flat planes, shifts of two across rows
    ((2, 3, 8, 2), (4, 3, 2, 3), (0, 2, 1, 0), 0.5),      # flat planes, 8 rows per vector, top != bottom, kh != kw
])
@pytest.mark.parametrize("kind", ["spikes", "real"])
def test_stationary_conv_equals_the_skipzero_kernel_bit_for_bit(target, x_shape, w_shape, padding, sparsity, kind):
    import tvm

    rng = np.random.default_rng(2)
    w = _pruned(rng, w_shape, sparsity)
    w[0] = 0                                       # an output channel without weights
    x = _inputs(rng, x_shape, kind)
    ref = conv2d_nchw(x, w, (1, 1), padding)
    ptr, taps, vals, chans = event.conv_columns(w)
    assert ptr[1] == 0 and vals.size == np.count_nonzero(w)
    fn = _compile(event.stationary_conv_kernel(x_shape, w_shape, padding, vals.size, chans.size), target)
    out_event, out_skip = (tvm.runtime.tensor(np.full(ref.shape, np.nan, np.float32)) for _ in range(2))
    fn(tvm.runtime.tensor(x), *(tvm.runtime.tensor(a) for a in (ptr, taps, vals, chans)), out_event)
    skipzero.SkipZeroConv(x_shape, w, padding, target)(tvm.runtime.tensor(x), out_skip)
    np.testing.assert_array_equal(out_event.numpy(), out_skip.numpy())
    np.testing.assert_allclose(out_event.numpy(), ref, rtol=0, atol=2e-5)
    assert np.count_nonzero(ref) > 0
    with pytest.raises(ShapeError, match="OIHW|O, C, KH, KW"):
        event.conv_columns(w[0])


@pytest.mark.parametrize("x_shape,size,stride", [((3, 5, 8, 8), (2, 2), (2, 2)), ((2, 3, 7, 9), (3, 2), (2, 3))])
def test_max_pool_kernel_is_the_window_maximum(target, x_shape, size, stride):
    import tvm

    rng = np.random.default_rng(3)
    x = rng.normal(size=x_shape).astype(np.float32)
    fn = _compile(pool.max_pool_kernel(x_shape, size, stride), target)
    ho, wo = (x_shape[2] - size[0]) // stride[0] + 1, (x_shape[3] - size[1]) // stride[1] + 1
    out = tvm.runtime.tensor(np.full((*x_shape[:2], ho, wo), np.nan, np.float32))
    fn(tvm.runtime.tensor(x), tvm.runtime.tensor(np.full(1, np.finfo(np.float32).min, np.float32)), out)
    win = np.lib.stride_tricks.sliding_window_view(x, size, axis=(2, 3))[:, :, ::stride[0], ::stride[1]]
    np.testing.assert_array_equal(out.numpy(), win.max(axis=(-2, -1)))


def test_whole_model_pruned_sdt_runs_on_them_bit_identical_to_onnxruntime(whole_model_pruned_sdt, tmp_path, target, equals_onnxruntime):
    """sdt-tiny pruned to 95% over every weight layer, BatchNorm re-estimated, checked to fire, on
    the default CPU module (kernels ``blas``, LIF recurrences fused, no CSR pass): every pruned
    convolution and every pruned linear is a call_tir of its kernel, none of them
    a Python packed function, those feeding a LIF through a bias add fused with it
    (kernels.eventlif); spikes and logits equal onnxruntime's bit for bit."""

    from stdeploy.activity import measure_activity, require_active
    from stdeploy.export.directory import export_model
    from stdeploy.models import direct_encode
    from stdeploy.targets.tvm.cpu import CpuOptions, prepare_cpu_module
    from stdeploy.targets.tvm.database import CrossoverCache
    from stdeploy.targets.tvm.frontend import load_onnx_graph
    from stdeploy.targets.tvm.schedules import schedule_elementwise

    model, data = whole_model_pruned_sdt
    x = direct_encode(torch.stack([data.test[i][0] for i in range(8)]), model.cfg.timesteps)
    require_active(measure_activity(model, x).firing_rates, 0.005, 0.5, what="whole-model pruned sdt-tiny")
    export_model(model, tmp_path / "export", ("onnx",), data=None, samples=8, overwrite=True)
    graph = load_onnx_graph(tmp_path / "export")
    prepared = prepare_cpu_module(graph, 8, target, CpuOptions("blas", (), True, True), CrossoverCache(None))
    info = prepared.info
    convs = [e for e in info["event"] if e["op"] == "conv2d"]
    linears = [e for e in info["event"] if e["op"] == "matmul"]
    assert len(convs) == 3                                     # stem, stage 1, position embedding
    assert len(linears) >= 6                                   # q, k, v, proj, fc1, fc2 (and the head where pruned)
    assert all(e["weight_density"] <= 0.5 for e in linears)
    # what is left to the packed functions is neither a pruned convolution nor a pruned small-K linear
    left = info.get("spike_conv", []) + info.get("spike_matmul", [])
    assert not info.get("spike_conv") and all(e["weight"] == [64, 10] for e in left)   # the classifier, where not pruned
    assert len(info["max_pool"]) == 1 and len(info["fused_lif"]) == 10
    mod, vectorised = schedule_elementwise(prepared.mod)
    assert vectorised > 0
    script = mod.script()
    # the layers feeding a LIF through a bias add run fused with it (kernels.eventlif): stem, stage 1,
    # q, k, v and fc1; the others (rpe, proj, fc2 feed a residual add; the classifier) on their own kernels
    producers = {f["producer"]: f for f in info["fused_lif"] if "producer" in f}
    by_name = {e["name"]: e for e in info["event"]}
    assert sorted(by_name[p]["weight"] for p in producers) == sorted(
        [[32, 1, 3, 3], [64, 32, 3, 3], [64, 64], [64, 64], [64, 64], [64, 256]])
    called = {r["layer"]: r["kernel"] for r in info["residual"]}   # kernels replaced by their residual form
    for p, f in producers.items():
        assert f"cls.{called.get(f['name'], f['name'])}," in script and f"cls.{p}," not in script
    # fc2 after fc1's LIF, and the max pool after stage 1's, inside those kernels
    assert [by_name[f["consumer"]]["weight"] for f in producers.values() if "consumer" in f] == [[256, 64]]
    # ... computing only the hidden neurons fc2 reads (lif.compact_hidden), fewer than fc1's 256
    mlp = next(f for f in producers.values() if "consumer" in f)
    assert 0 < mlp["units"] < 256 and mlp["units"] % 16 == 0, mlp
    assert [by_name[p]["weight"] for p, f in producers.items() if f.get("pool") == [2, 2, 2, 2]] == [[64, 32, 3, 3]]
    # proj's, the MLP's and the position embedding's bias and residual adds are in their kernels'
    # stores, the embedding's transpose to tokens too (kernels.residual)
    folded = {r["layer"]: r for r in info["residual"]}
    assert len(folded) == 3 and mlp["name"] in folded and all(r["shape"] == [4, 8, 16, 64] for r in folded.values())
    assert sorted(by_name[name]["weight"] for name in folded if name != mlp["name"]) == [[64, 64], [64, 64, 3, 3]]
    assert all(f"R.call_tir(cls.{name}," not in script and f"R.call_tir(cls.{r['kernel']}," in script for name, r in folded.items())
    assert "transpose" not in script
    # the attention's q * k summed over the tokens: one kernel (kernels.attention)
    assert info["product_sum"] == [{"shape": [4, 8, 16, 64], "axis": 2, "name": "stdeploy_product_sum_0"}]
    assert "R.call_tir(cls.stdeploy_product_sum_0," in script and "multiply_sum" not in script
    assert script.count("stdeploy_event_matmul_") >= 2 * (len(linears) - 6)    # the unfused ones defined and called
    assert "stdeploy_stationary_conv_" in script and "cls.stdeploy_max_pool_" not in script
    assert "stdeploy.skipzeroconv." not in script and "stdeploy.spikeconv." not in script
    equals_onnxruntime(mod, graph, x)
