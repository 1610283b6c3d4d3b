"""A weight layer fused with the LIF population it feeds (stdeploy.targets.tvm.kernels.eventlif):
each fused kernel bit-identical to its event kernel followed by the fused LIF kernel (real inputs
and real constants, so that any change of rounding shows), and the dense exported sdt-tiny with
its linears offered the event kernels: the fusion chosen where the pattern holds, spikes and
logits onnxruntime's bit for bit (the model checked to fire). The whole-model pruned sdt-tiny is
checked in test_tvm_event.py."""

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from stdeploy.errors import ShapeError
from stdeploy.targets.tvm.kernels import event, eventlif, lif, pool, spike

pytestmark = pytest.mark.tvm

STEPS = 4


def _compile(func, target):
    import tvm

    return tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(target))["main"]


def _constants(rng, shape, per_feature):
    """``(c, a, b, theta, v0)`` broadcast to the one-step ``shape``: per last feature or per neuron."""
    sub = (shape[-1],) if per_feature else shape
    a = rng.uniform(0.3, 0.9, sub).astype(np.float32)
    return [rng.normal(size=sub).astype(np.float32) * 0.3, a, (1 - a).astype(np.float32),
            rng.uniform(0.2, 0.6, sub).astype(np.float32), np.zeros(sub, np.float32)]


def _max_pool(target, spikes, images_shape, size):
    """The unfused max pool (kernels.pool) of ``spikes`` seen as ``images_shape`` (N, C, H, W)."""
    import tvm

    ho, wo = (images_shape[2] - size[0]) // size[0] + 1, (images_shape[3] - size[1]) // size[1] + 1
    out = tvm.runtime.tensor(np.full((*images_shape[:2], ho, wo), 7, np.float32))
    _compile(pool.max_pool_kernel(images_shape, size, size), target)(
        tvm.runtime.tensor(np.ascontiguousarray(spikes).reshape(images_shape)),
        tvm.runtime.tensor(np.full(1, np.finfo(np.float32).min, np.float32)), out)
    return out.numpy()


def _lif_after(target, y, consts, steps, shape):
    """The unfused pair's second half: lif.lif_kernel (bias fused) on the layer's output ``y``."""
    import tvm

    period = lif.constant_period(shape, consts)
    lanes = int(np.gcd(np.gcd(int(np.prod(shape)), period), lif.LANES))
    flat = [np.ascontiguousarray(np.broadcast_to(c, shape)).reshape(-1)[:period].copy() for c in consts]
    out = tvm.runtime.tensor(np.full((steps, *shape), 7, np.float32))
    _compile(lif.lif_kernel(steps, shape, period, True, y.shape), target)(
        tvm.runtime.tensor(y), *(tvm.runtime.tensor(f) for f in flat), tvm.runtime.tensor(np.full(lanes, -1, np.int32)), out)
    return out.numpy(), flat, period, lanes


@pytest.mark.parametrize("x_shape,n,per_feature", [((STEPS, 3, 5, 64), 32, True), ((STEPS * 6, 45), 16, False)])
def test_event_matmul_lif_equals_the_two_kernels_bit_for_bit(target, x_shape, n, per_feature):
    import tvm

    rng = np.random.default_rng(4)
    w = rng.normal(size=(x_shape[-1], n)).astype(np.float32) * (rng.random((x_shape[-1], n)) < 0.3)
    x = (rng.normal(size=x_shape) * (rng.random(x_shape) < 0.4)).astype(np.float32)   # real inputs: rounding shows
    y_shape = (*x_shape[:-1], n)
    shape = (y_shape[0] // STEPS, *y_shape[1:])
    consts = _constants(rng, shape, per_feature)
    y = tvm.runtime.tensor(np.zeros(y_shape, np.float32))
    live = event.live_masks(w)
    _compile(event.event_matmul_kernel(x_shape, *w.shape), target)(tvm.runtime.tensor(x), tvm.runtime.tensor(w),
                                                                    tvm.runtime.tensor(live), y)
    ref, flat, period, lanes = _lif_after(target, y.numpy(), consts, STEPS, shape)
    assert 0 < ref.mean() < 1
    out = tvm.runtime.tensor(np.full((STEPS, *shape), 7, np.float32))
    fn = _compile(eventlif.event_matmul_lif_kernel(x_shape, *w.shape, STEPS, period, lanes, (STEPS, *shape)), target)
    fn(tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(live), *(tvm.runtime.tensor(f) for f in flat),
       tvm.runtime.tensor(np.full(lanes, -1, np.int32)), out)
    np.testing.assert_array_equal(out.numpy(), ref)
    with pytest.raises(ShapeError, match="steps"):
        eventlif.event_matmul_lif_kernel((STEPS * 6 + 1, 45), 45, n, STEPS, period, lanes)


@pytest.mark.parametrize("x_shape,w_shape,padding,size", [((STEPS * 3, 4, 8, 8), (6, 4, 3, 3), (1, 1, 1, 1), (2, 2)),
                                                          ((STEPS * 2, 1, 6, 8), (8, 1, 3, 3), (1, 1, 1, 1), (3, 2)),
                                                          ((STEPS * 19, 2, 4, 4), (5, 2, 3, 3), (1, 1, 1, 1), (2, 2)),
                                                          ((STEPS * 2, 2, 4, 32), (4, 2, 3, 3), (1, 1, 1, 1), (2, 2))])
def test_stationary_conv_lif_equals_the_two_kernels_bit_for_bit(target, x_shape, w_shape, padding, size):
    """Without and with the max pool fused in (against the max-pool kernel after the two); with 19
    images, 3 per parallel part, the output channel without weights is computed for a part's first
    image and copied to the others; 32-wide rows keep the planes with a border (event.conv_planes)."""
    import tvm

    rng = np.random.default_rng(5)
    w = rng.normal(size=w_shape).astype(np.float32) * (rng.random(w_shape) < 0.5)
    w[0] = 0                                                     # an output channel without weights
    x = (rng.random(x_shape) * (rng.random(x_shape) < 0.5)).astype(np.float32)
    ptr, taps, vals, chans = event.conv_columns(w)
    ho, wo = spike.conv_out_hw(x_shape, w_shape, padding)
    y_shape = (x_shape[0], w_shape[0], ho, wo)
    shape = (x_shape[0] // STEPS, w_shape[0], ho, wo)
    per_channel = _constants(rng, (w_shape[0], 1, 1), False)      # per output channel, as BatchNorm
    c, a, b, theta, _ = per_channel                               # the channel without weights fires on its bias every
    c[0] = theta[0] / (b[0] * (1 + a[0])) * np.float32(1.01)      # second step (its membrane crosses at the second)
    consts = [np.broadcast_to(c, shape) for c in per_channel]
    y = tvm.runtime.tensor(np.zeros(y_shape, np.float32))
    arrays = [tvm.runtime.tensor(a) for a in (ptr, taps, vals, chans)]
    _compile(event.stationary_conv_kernel(x_shape, w_shape, padding, vals.size, chans.size), target)(tvm.runtime.tensor(x), *arrays, y)
    ref, flat, period, lanes = _lif_after(target, y.numpy(), consts, STEPS, shape)
    assert period == w_shape[0] * ho * wo and 0 < ref.mean() < 1 and 0 < ref[:, :, 0].mean() < 1, ref[:, :, 0].mean()
    layer = event.EventLayer("conv2d", w_shape, x_shape, 0.5, int(vals.size), "k", padding, int(chans.size))
    assert eventlif.fusable(layer, STEPS, period, lanes) and not eventlif.fusable(layer, 5, period, lanes)
    out = tvm.runtime.tensor(np.full((STEPS, *shape), 7, np.float32))
    fn = _compile(eventlif.stationary_conv_lif_kernel(x_shape, w_shape, padding, vals.size, chans.size, STEPS, period, lanes,
                                                      (STEPS, *shape)), target)
    fn(tvm.runtime.tensor(x), *arrays, *(tvm.runtime.tensor(f) for f in flat), tvm.runtime.tensor(np.full(lanes, -1, np.int32)), out)
    np.testing.assert_array_equal(out.numpy(), ref)
    pooled_ref = _max_pool(target, ref, y_shape, size)
    pooled = tvm.runtime.tensor(np.full(pooled_ref.shape, 7, np.float32))
    fn = _compile(eventlif.stationary_conv_lif_kernel(x_shape, w_shape, padding, vals.size, chans.size, STEPS, period, lanes,
                                                      pooled_ref.shape, (*size, *size)), target)
    fn(tvm.runtime.tensor(x), *arrays, *(tvm.runtime.tensor(f) for f in flat), tvm.runtime.tensor(np.full(lanes, -1, np.int32)),
       pooled)
    np.testing.assert_array_equal(pooled.numpy(), pooled_ref)
    assert 0 < pooled_ref.mean() < 1


@pytest.mark.parametrize("pool", [None, (2, 2, 2, 2)])
def test_stationary_conv_lif_on_repeated_steps_is_bit_identical(target, pool):
    """``repeats``: a one-channel stem fed the same images at every step (a direct encoding),
    except one image that differs in one pixel at the last step: spikes (and pooled spikes)
    equal the convolution kernel followed by the LIF (and max-pool) kernels, bit for bit."""
    import tvm

    rng = np.random.default_rng(11)
    t = tvm.runtime.tensor
    batch, x_shape, w_shape, padding = 3, (STEPS * 3, 1, 8, 8), (8, 1, 3, 3), (1, 1, 1, 1)
    w = rng.normal(size=w_shape).astype(np.float32) * (rng.random(w_shape) < 0.7)
    x = np.tile(rng.random((batch, 1, 8, 8)).astype(np.float32), (STEPS, 1, 1, 1))
    x[(STEPS - 1) * batch + 2, 0, 3, 4] += 0.5                    # image 2 is not the same at every step
    ptr, taps, vals, chans = event.conv_columns(w)
    y = t(np.zeros((x_shape[0], 8, 8, 8), np.float32))
    arrays = [t(a) for a in (ptr, taps, vals, chans)]
    _compile(event.stationary_conv_kernel(x_shape, w_shape, padding, vals.size, chans.size), target)(t(x), *arrays, y)
    shape = (batch, 8, 8, 8)
    consts = [np.broadcast_to(c, shape) for c in _constants(rng, (8, 1, 1), False)]
    ref, flat, period, lanes = _lif_after(target, y.numpy(), consts, STEPS, shape)
    assert 0 < ref.mean() < 1
    if pool is not None:
        ref = _max_pool(target, ref, (x_shape[0], 8, 8, 8), pool[:2])
    out = t(np.full(ref.shape, 7, np.float32))
    _compile(eventlif.stationary_conv_lif_kernel(x_shape, w_shape, padding, vals.size, chans.size, STEPS, period, lanes,
                                                 ref.shape, pool, repeats=True), target)(
        t(x), *arrays, *(t(f) for f in flat), t(np.full(lanes, -1, np.int32)), out)
    np.testing.assert_array_equal(out.numpy(), ref)


def test_lif_pool_equals_lif_then_max_pool_bit_for_bit(target):
    import tvm

    rng = np.random.default_rng(6)
    shape, size = (3, 5, 8, 8), (2, 2)
    y = (rng.normal(size=(STEPS * shape[0], *shape[1:])) * 0.8).astype(np.float32)
    consts = [np.broadcast_to(c, shape) for c in _constants(rng, (shape[1], 1, 1), False)]
    ref, flat, period, lanes = _lif_after(target, y, consts, STEPS, shape)
    pooled_ref = _max_pool(target, ref, y.shape, size)
    assert 0 < pooled_ref.mean() < 1
    out = tvm.runtime.tensor(np.full(pooled_ref.shape, 7, np.float32))
    fn = _compile(lif.lif_pool_kernel(STEPS, shape, period, y.shape, (*size, *size), pooled_ref.shape), target)
    fn(tvm.runtime.tensor(y), *(tvm.runtime.tensor(f) for f in flat), tvm.runtime.tensor(np.full(lanes, -1, np.int32)), out)
    np.testing.assert_array_equal(out.numpy(), pooled_ref)


def test_event_mlp_equals_the_three_kernels_bit_for_bit(target):
    """fc1 (event matmul) -> LIF -> fc2 (event matmul) in one kernel; fc1 fed real values."""
    import tvm

    rng = np.random.default_rng(7)
    x_shape, n, n2 = (STEPS, 3, 5, 64), 80, 24              # N = 2 blocks + 16 tested one by one
    w = (rng.normal(size=(64, n)) * (rng.random((64, n)) < 0.3)).astype(np.float32)
    w2 = (rng.normal(size=(n, n2)) * (rng.random((n, n2)) < 0.2)).astype(np.float32)
    x = (rng.normal(size=x_shape) * (rng.random(x_shape) < 0.4)).astype(np.float32)
    shape = (3, 5, n)
    consts = _constants(rng, shape, True)
    y = tvm.runtime.tensor(np.zeros((*x_shape[:-1], n), np.float32))
    t = tvm.runtime.tensor
    _compile(event.event_matmul_kernel(x_shape, *w.shape), target)(t(x), t(w), t(event.live_masks(w)), y)
    spikes, flat, period, lanes = _lif_after(target, y.numpy(), consts, STEPS, shape)
    assert 0 < spikes.mean() < 1
    ref = t(np.zeros((*x_shape[:-1], n2), np.float32))
    _compile(event.event_matmul_kernel(spikes.shape, *w2.shape), target)(t(spikes), t(w2), t(event.live_masks(w2)), ref)
    out = t(np.full((*x_shape[:-1], n2), 7, np.float32))
    fn = _compile(eventlif.event_mlp_kernel(x_shape, 64, n, STEPS, period, lanes, n2, out.shape), target)
    fn(t(x), t(w), t(event.live_masks(w)), *(t(f) for f in flat), t(np.full(lanes, -1, np.int32)), t(w2), t(event.live_masks(w2)), out)
    np.testing.assert_array_equal(out.numpy(), ref.numpy())
    assert np.count_nonzero(ref.numpy()) > 0


def test_residual_forms_store_the_bias_and_residual_sums_bit_for_bit(target):
    """kernels.residual: the event matmul's and the fused MLP's ``residual`` forms store
    ``(acc + c) + r``, bit-identical to their plain forms followed by numpy's ``r + (c + y)``
    (the graph's order); the weight-stationary convolution's ``residual_tokens`` form the same sum
    transposed to one token per position; real inputs, a nonzero bias and residual."""
    import tvm

    rng = np.random.default_rng(9)
    t = tvm.runtime.tensor
    x_shape, n, n2 = (STEPS, 3, 5, 64), 80, 24
    w = (rng.normal(size=(64, n)) * (rng.random((64, n)) < 0.3)).astype(np.float32)
    w2 = (rng.normal(size=(n, n2)) * (rng.random((n, n2)) < 0.2)).astype(np.float32)
    x = (rng.normal(size=x_shape) * (rng.random(x_shape) < 0.4)).astype(np.float32)
    consts = [np.ascontiguousarray(np.broadcast_to(c, (3, 5, n))).reshape(-1)[:n].copy() for c in _constants(rng, (3, 5, n), True)]
    keep = np.full(lif.LANES, -1, np.int32)
    cases = [(lambda residual: event.event_matmul_kernel(x_shape, 64, n, residual=residual), [w, event.live_masks(w)], n),
             (lambda residual: eventlif.event_mlp_kernel(x_shape, 64, n, STEPS, n, lif.LANES, n2, (*x_shape[:-1], n2),
                                                         residual=residual),
              [w, event.live_masks(w), *consts, keep, w2, event.live_masks(w2)], n2)]
    for build, arrays, width in cases:
        shape = (*x_shape[:-1], width)
        c = rng.normal(size=width).astype(np.float32)
        r = rng.normal(size=shape).astype(np.float32)
        plain, folded = t(np.full(shape, 7, np.float32)), t(np.full(shape, 7, np.float32))
        _compile(build(False), target)(t(x), *(t(a) for a in arrays), plain)
        _compile(build(True), target)(t(x), *(t(a) for a in arrays), t(c), t(r), folded)
        y = plain.numpy()
        assert np.count_nonzero(y) > 0
        np.testing.assert_array_equal(folded.numpy(), r + (c + y))
    # the weight-stationary convolution's form: bias per channel, residual in NCHW, stored as tokens
    x_shape, w_shape = (6, 16, 4, 4), (24, 16, 3, 3)
    w = (rng.normal(size=w_shape) * (rng.random(w_shape) < 0.05)).astype(np.float32)
    x = (rng.random(x_shape) < 0.3).astype(np.float32)
    c = rng.normal(size=24).astype(np.float32)
    r = rng.normal(size=(6, 24, 4, 4)).astype(np.float32)
    ptr, taps, vals, chans = event.conv_columns(w)
    arrays = [t(ptr), t(taps), t(vals), t(chans)]
    plain, folded = t(np.full((6, 24, 4, 4), 7, np.float32)), t(np.full((2, 3, 16, 24), 7, np.float32))
    _compile(event.stationary_conv_kernel(x_shape, w_shape, (1, 1, 1, 1), vals.size, chans.size), target)(t(x), *arrays, plain)
    _compile(event.stationary_conv_kernel(x_shape, w_shape, (1, 1, 1, 1), vals.size, chans.size, True, (2, 3, 24, 4, 4),
                                          (2, 3, 16, 24)), target)(t(x), *arrays, t(c), t(r.reshape(2, 3, 24, 4, 4)), folded)
    y = plain.numpy()
    assert np.count_nonzero(y) > 0
    expected = (r + (c[:, None, None] + y)).reshape(2, 3, 24, 16).transpose(0, 1, 3, 2)
    np.testing.assert_array_equal(folded.numpy(), expected)
    with pytest.raises(ShapeError):
        event.stationary_conv_kernel(x_shape, w_shape, (1, 1, 1, 1), vals.size, chans.size, True, (6, 24, 16), (6, 16, 25))


def test_event_mlp_on_the_hidden_neurons_fc2_reads_is_bit_identical(target):
    """lif.compact_hidden: with 45 of fc1's 80 neurons never read by fc2 (their rows of w2 zero),
    the kernel computes the 35 others (padded to 48) and fc2's output is the full kernel's bit for bit."""
    import tvm

    rng = np.random.default_rng(8)
    x_shape, n, n2 = (STEPS, 3, 5, 64), 80, 24
    w = (rng.normal(size=(64, n)) * (rng.random((64, n)) < 0.3)).astype(np.float32)
    w2 = (rng.normal(size=(n, n2)) * (rng.random((n, n2)) < 0.5)).astype(np.float32)
    w2[rng.permutation(n)[:45]] = 0
    x = (rng.normal(size=x_shape) * (rng.random(x_shape) < 0.4)).astype(np.float32)
    consts = [np.ascontiguousarray(np.broadcast_to(c, (3, 5, n))).reshape(-1)[:n].copy() for c in _constants(rng, (3, 5, n), True)]
    keep = np.full(lif.LANES, -1, np.int32)
    full = [w, event.live_masks(w), *consts, keep, w2, event.live_masks(w2)]
    compact = lif.compact_hidden(*full, n, n, lif.LANES)
    assert compact[0].shape == (64, 48) and compact[8].shape == (48, n2)
    ones = np.ones((n, n2), np.float32)
    assert lif.compact_hidden(*full[:8], ones, event.live_masks(ones), n, n, lif.LANES) is None     # every neuron read
    t = tvm.runtime.tensor
    outs = []
    for units, args in ((n, full), (48, compact)):
        out = t(np.full((*x_shape[:-1], n2), 7, np.float32))
        _compile(eventlif.event_mlp_kernel(x_shape, 64, units, STEPS, units, lif.LANES, n2, out.shape), target)(
            t(x), *(t(np.ascontiguousarray(a)) for a in args), out)
        outs.append(out.numpy())
    np.testing.assert_array_equal(outs[1], outs[0])
    assert np.count_nonzero(outs[0]) > 0


def test_dense_sdt_with_event_linears_is_fused_and_bit_identical(exported_sdt, trained_sdt, target, equals_onnxruntime):
    """The dense sdt-tiny's options on the default path (``event_every=("matmul",)``: its linears
    on the event kernels): the stem convolution and the q, k, v and fc1 linears, whose outputs
    feed a LIF through a bias add, run fused with it (named in ``info["fused_lif"]``, their event
    kernels gone from the module), fc2 fused after fc1's LIF, the max pool into the stage-1 LIF
    (its convolution stays on the spike kernel); spikes and logits equal onnxruntime's bit for bit."""

    from stdeploy.activity import measure_activity, require_active
    from stdeploy.models import direct_encode
    from stdeploy.targets.tvm.cpu import CpuOptions, prepare_cpu_module
    from stdeploy.targets.tvm.database import CrossoverCache
    from stdeploy.targets.tvm.frontend import load_onnx_graph

    model, data = trained_sdt
    x = direct_encode(torch.stack([data.test[i][0] for i in range(8)]), model.cfg.timesteps)
    require_active(measure_activity(model, x).firing_rates, 0.005, 0.6, what="sdt-tiny")
    graph = load_onnx_graph(exported_sdt)
    prepared = prepare_cpu_module(graph, 8, target, CpuOptions("blas", (), event_every=("matmul",)), CrossoverCache(None))
    info = prepared.info
    producers = {f["producer"]: f for f in info["fused_lif"] if "producer" in f}
    by_name = {e["name"]: e for e in info["event"]}
    assert sorted(by_name[p]["weight"] for p in producers) == sorted([[32, 1, 3, 3], [64, 64], [64, 64], [64, 64], [64, 256]])
    assert all(by_name[p]["weight_density"] > 0.9 for p in producers)          # dense weights
    assert [by_name[f["consumer"]]["weight"] for f in producers.values() if "consumer" in f] == [[256, 64]]
    assert [(f["pool"], f["shape"]) for f in info["fused_lif"] if "pool" in f] == [([2, 2, 2, 2], [8, 64, 8, 8])]
    script = prepared.mod.script()
    assert "cls.stdeploy_max_pool_" not in script                             # no call of the max-pool kernel
    for p, f in producers.items():
        assert f"{f['name']}(" in script or f"{f['name']}," in script          # the fused kernel is called ...
        assert f"R.call_tir(cls.{p}," not in script                            # ... and the layer's own kernel is not
    equals_onnxruntime(prepared.mod, graph, x)
