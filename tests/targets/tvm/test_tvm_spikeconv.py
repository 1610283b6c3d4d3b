"""The accumulate-only convolution (stdeploy.targets.tvm.kernels.spike): equal to the dense convolution
for spikes and for any real input, at several shapes and paddings; the adaptive packed function
picks the gather kernel up to its density threshold and BLAS above, and says which; the measured
threshold is where the two cost the same; the CPU module uses it by default and keeps PyTorch's
spikes."""

import numpy as np
import pytest
import torch

from stdeploy.targets.tvm.kernels import spike
from stdeploy.targets.tvm.kernels.blas import conv2d_nchw
from stdeploy.targets.tvm.kernels.routing import route_to_external_kernels

pytestmark = pytest.mark.tvm


def torch_conv(x, w, padding):
    top, left, bottom, right = padding
    xp = torch.nn.functional.pad(torch.from_numpy(x), (left, right, top, bottom))
    return torch.nn.functional.conv2d(xp, torch.from_numpy(w)).numpy()


@pytest.mark.parametrize("x_shape,w_shape,padding", [
    ((3, 4, 9, 7), (5, 4, 3, 3), (1, 1, 1, 1)),     # the stem's 3x3 "same" convolution
    ((2, 3, 6, 5), (8, 3, 3, 2), (0, 1, 2, 0)),     # asymmetric kernel and padding
    ((2, 2, 5, 5), (3, 2, 1, 1), (0, 0, 0, 0)),     # 1x1
    ((1, 16, 4, 4), (32, 16, 3, 3), (2, 2, 2, 2)),  # padding = kernel - 1: a "full" convolution
    ((9, 3, 5, 4), (96, 3, 3, 3), (1, 1, 1, 1)),    # two output-channel tiles (96 = 3 x 32), images split unevenly
    ((2, 5, 4, 4), (7, 5, 3, 3), (1, 1, 1, 1)),     # an odd channel count
])
@pytest.mark.parametrize("kind", ["spikes", "real"])
def test_gather_kernel_equals_the_dense_convolution(target, x_shape, w_shape, padding, kind):
    import tvm

    rng = np.random.default_rng(0)
    w = rng.normal(size=w_shape).astype(np.float32)
    x = ((rng.random(x_shape) < 0.15) if kind == "spikes" else rng.normal(size=x_shape)).astype(np.float32)
    assert spike.applicable(x_shape, w_shape, (1, 1), padding)
    conv = spike.SpikeConv(x_shape, w, padding, target)
    expected = torch_conv(x, w, padding)
    out = tvm.runtime.tensor(np.full(expected.shape, np.nan, np.float32))
    conv(tvm.runtime.tensor(x), out)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2e-5)


def test_only_what_the_kernel_handles():
    ok = spike.applicable
    assert ok((1, 4, 8, 8), (4, 4, 3, 3), (1, 1), (1, 1, 1, 1))
    assert not ok((1, 4, 8, 8), (4, 4, 3, 3), (2, 2), (1, 1, 1, 1))      # stride 2
    assert not ok((1, 4, 8, 8), (4, 2, 3, 3), (1, 1), (1, 1, 1, 1), 2)   # grouped
    assert not ok((1, 4, 8, 8), (4, 4, 3, 3), (1, 1), (3, 1, 1, 1))      # padding >= kernel


def test_adaptive_conv_picks_the_path_by_density(target):
    import tvm
    import tvm_ffi

    rng = np.random.default_rng(1)
    x_shape, w = (4, 8, 6, 6), rng.normal(size=(16, 8, 3, 3)).astype(np.float32)
    name, conv = spike.adaptive_conv(x_shape, w, (1, 1, 1, 1), target, max_density=0.2)
    run = tvm_ffi.get_global_func(name)
    wt = tvm.runtime.tensor(w)
    for density, path in ((0.0, "gather"), (0.05, "gather"), (0.12, "gather"), (0.6, "blas"), (1.0, "blas")):
        x = (rng.random(x_shape) < density).astype(np.float32)
        expected = conv2d_nchw(x, w, (1, 1), (1, 1, 1, 1))
        out = tvm.runtime.tensor(np.zeros(expected.shape, np.float32))
        before = dict(conv.stats)
        run(tvm.runtime.tensor(x), wt, out)
        assert conv.stats[path] == before[path] + 1, (density, conv.stats)
        np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2e-5)


def test_density_is_estimated_from_whole_images():
    x = np.zeros((64, 2, 3, 3), np.float32)
    x[::4] = 1.0                           # every fourth image all ones
    image = 2 * 3 * 3
    assert spike.density(x, image, sample=16) == 1.0    # images 0, 4, 8, ... sampled
    assert spike.density(x, image, sample=64) == 0.25   # all of them
    assert spike.density(x, 3, sample=10**6) == 0.25    # rows of 3: all of them
    assert spike.density(np.zeros((3, 5), np.float32), 5, sample=1) == 0.0


def test_measured_crossover_separates_the_paths(target):
    """The calibrated threshold: where the kernel's cost line (measured at 0% and 25% ones) meets
    BLAS's. Timing decides its value, so the test checks what must hold whatever the machine: a
    one-channel convolution (9 multiply-adds per output pixel) beats im2col + BLAS even dense, and
    a 64-channel one with spikes at 5% is below its threshold."""
    rng = np.random.default_rng(2)
    _, one = spike.adaptive_conv((64, 1, 8, 8), rng.normal(size=(32, 1, 3, 3)).astype(np.float32), (1, 1, 1, 1), target)
    assert one.max_density > 0.5
    _, wide = spike.adaptive_conv((64, 64, 4, 4), rng.normal(size=(64, 64, 3, 3)).astype(np.float32), (1, 1, 1, 1), target)
    assert 0.05 < wide.max_density <= 1.0


def test_offload_uses_it_for_stride_one_convolutions(target):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 8, 8), "float32"))
    w1 = relax.const(np.ones((4, 3, 3, 3), np.float32))
    w2 = relax.const(np.ones((4, 4, 3, 3), np.float32))
    with bb.function("main", [x]):
        a = bb.emit(relax.op.nn.conv2d(x, w1, padding=[1, 1, 1, 1]))
        bb.emit_func_output(bb.emit(relax.op.nn.conv2d(a, w2, strides=[2, 2], padding=[1, 1, 1, 1])))
    mod, done = route_to_external_kernels(bb.get(), spike_target=target)
    assert [o.op for o in done] == ["spike-conv2d", "conv2d"]   # the strided one stays on BLAS
    # three input channels: a stem, offered the skip-zero kernel too (skipzero.applies)
    assert "stdeploy.skipzeroconv." in mod.script() and "R.nn.conv2d" not in mod.script()
    _, plain = route_to_external_kernels(bb.get())
    assert [o.op for o in plain] == ["conv2d", "conv2d"]


@pytest.mark.parametrize("x_shape,n", [
    ((4, 3, 5, 64), 64),    # (T, B, tokens, D) as the attention's linears see it
    ((7, 48), 96),          # rows split unevenly between tasks; 96 outputs as three tiles of 32
    ((5, 10), 3),           # narrow output
])
@pytest.mark.parametrize("kind", ["spikes", "real"])
def test_gather_matmul_equals_the_dense_product(target, x_shape, n, kind):
    import tvm

    rng = np.random.default_rng(3)
    w = rng.normal(size=(x_shape[-1], n)).astype(np.float32)
    x = ((rng.random(x_shape) < 0.15) if kind == "spikes" else rng.normal(size=x_shape)).astype(np.float32)
    mm = spike.SpikeMatmul(x_shape, w, target)
    expected = x @ w
    out = tvm.runtime.tensor(np.full(expected.shape, np.nan, np.float32))
    mm(tvm.runtime.tensor(x), out)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2e-5)


def test_adaptive_matmul_picks_the_path_by_density(target):
    import tvm
    import tvm_ffi

    rng = np.random.default_rng(4)
    x_shape, w = (2, 40, 32), rng.normal(size=(32, 16)).astype(np.float32)
    name, mm = spike.adaptive_matmul(x_shape, w, target, max_density=0.3)
    run = tvm_ffi.get_global_func(name)
    for density, path in ((0.1, "gather"), (0.9, "blas")):
        x = (rng.random(x_shape) < density).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((2, 40, 16), np.float32))
        before = dict(mm.stats)
        run(tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
        assert mm.stats[path] == before[path] + 1, (density, mm.stats)
        np.testing.assert_allclose(out.numpy(), x @ w, rtol=0, atol=2e-5)


# --- stable thresholds: one statistic, pinned threads, measured once per (shape, CPU, threads) ---

@pytest.fixture(scope="module")
def conv_key(target):
    """A conv's weight and the key of its threshold on this machine (one compile for the module)."""
    w = np.random.default_rng(3).normal(size=(16, 8, 3, 3)).astype(np.float32)
    _, conv = spike.adaptive_conv((4, 8, 6, 6), w, (1, 1, 1, 1), target, max_density=0.5)   # given: nothing timed
    assert conv.threshold_source == "given" and conv.crossover is None
    return w, spike.crossover_key(conv, "spikeconv", spike.runtime_threads(), spike.blas_threads())


def _cache_setup(tmp_path, conv_key):
    from stdeploy.targets.tvm.database import CrossoverCache

    w, key = conv_key
    return w, key, tmp_path / "crossovers.json", CrossoverCache


def _entry(max_density, threads=1):
    from stdeploy.targets.tvm.database import Crossover

    return Crossover(max_density=max_density, fixed_s=1e-4, busy_s=2e-4, dense_s=3e-4, calibration_density=0.25,
                     statistic="median", warmup=2, repeats=7, threads=threads, blas_threads=threads)


def test_cached_threshold_is_reused_and_decides_deterministically(tmp_path, target, conv_key):
    """A threshold in the cache for this shape, CPU and thread count is used as is (nothing is
    timed: the cache counts no measurement), and the path each density takes follows from it."""
    import tvm
    import tvm_ffi

    w, key, path, Cache = _cache_setup(tmp_path, conv_key)
    first = Cache(path)
    first.put(key, _entry(0.3))
    assert first.save() and path.exists()
    for _ in range(2):                               # two builds, the same choice
        cache = Cache(path)
        name, conv = spike.adaptive_conv((4, 8, 6, 6), w, (1, 1, 1, 1), target, crossovers=cache)
        assert (conv.max_density, conv.threshold_source, cache.measured, cache.reused) == (0.3, "cached", 0, 1)
        run, wt = tvm_ffi.get_global_func(name), tvm.runtime.tensor(w)
        rng = np.random.default_rng(4)
        for density, path_taken in ((0.2, "gather"), (0.45, "blas"), (0.2, "gather")):
            x = (rng.random((4, 8, 6, 6)) < density).astype(np.float32)
            out = tvm.runtime.tensor(np.zeros((4, 16, 6, 6), np.float32))
            before = dict(conv.stats)
            run(tvm.runtime.tensor(x), wt, out)
            assert conv.stats[path_taken] == before[path_taken] + 1, (density, conv.stats)
            np.testing.assert_allclose(out.numpy(), conv2d_nchw(x, w, (1, 1), (1, 1, 1, 1)), rtol=0, atol=2e-5)


def test_cache_for_another_cpu_or_thread_count_is_not_used(tmp_path, target, conv_key):
    import dataclasses

    w, key, path, Cache = _cache_setup(tmp_path, conv_key)
    cache = Cache(path)
    cache.put(dataclasses.replace(key, cpu="Some Other CPU"), _entry(0.123))
    cache.put(dataclasses.replace(key, threads=key.threads + 1), _entry(0.456, key.threads + 1))
    cache.put(dataclasses.replace(key, kernel_version=key.kernel_version + 1), _entry(0.789))
    cache.save()
    cache = Cache(path)
    _, conv = spike.adaptive_conv((4, 8, 6, 6), w, (1, 1, 1, 1), target, crossovers=cache)
    assert conv.threshold_source == "measured" and (cache.measured, cache.reused) == (1, 0)
    assert conv.crossover.threads == key.threads and conv.max_density == conv.crossover.max_density
    assert cache.save() and len(Cache(path).entries) == 4   # the new one added, the others kept


@pytest.mark.parametrize("text,why", [
    ("{not json", "not a readable JSON"),
    ('{"format": "someone-else/3", "entries": []}', "not a stdeploy crossover cache"),
    (None, "max_density"),                                  # a valid file with one out-of-range entry
])
def test_corrupt_or_foreign_cache_is_ignored_by_name_and_left_alone(tmp_path, target, conv_key, text, why):
    import json

    from stdeploy.targets.tvm.database import CROSSOVER_FORMAT

    w, key, path, Cache = _cache_setup(tmp_path, conv_key)
    if text is None:
        import dataclasses

        entry = {"key": dataclasses.asdict(key), "crossover": {**_entry(0.3).to_dict(), "max_density": 7.0}}
        text = json.dumps({"format": CROSSOVER_FORMAT, "entries": [entry]})
    path.write_text(text)
    with pytest.warns(UserWarning, match=f"crossover cache ignored: {path}.*{why}"):
        cache = Cache(path)
    assert cache.entries == {} and why in cache.problem
    _, conv = spike.adaptive_conv((4, 8, 6, 6), w, (1, 1, 1, 1), target, crossovers=cache)
    assert conv.threshold_source == "measured"              # never trusted: measured again
    assert cache.save() is False and path.read_text() == text
    assert "ignored" in cache.summary()


def test_every_candidate_is_timed_by_the_same_rule(target):
    """``time_candidates``: each candidate gets the same warm-up and the same interleaved rounds,
    and one statistic (the median); the crossover is built from those medians at pinned threads."""
    from stdeploy.timing import time_candidates

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timings = time_candidates(fns, warmup=2, repeats=3)
    assert calls == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 3
    assert {(t.warmup, t.repeats) for t in timings.values()} == {(2, 3)}
    w = np.random.default_rng(5).normal(size=(8, 4, 3, 3)).astype(np.float32)
    _, conv = spike.adaptive_conv((2, 4, 5, 5), w, (1, 1, 1, 1), target)
    c = conv.crossover
    assert (c.statistic, c.warmup, c.repeats) == ("median", spike.CALIBRATION_WARMUP, spike.CALIBRATION_REPEATS)
    assert c.threads == spike.runtime_threads() and conv.threshold_source == "measured"
    assert min(c.fixed_s, c.busy_s, c.dense_s) > 0


def test_pinned_threads_sets_and_restores_the_counts():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(2, user_api="blas"):
        tvm_before = spike.runtime_threads()
        assert spike.blas_threads() == 2
        with spike.pinned_threads(1, 1):
            assert (spike.runtime_threads(), spike.blas_threads()) == (1, 1)
        assert (spike.runtime_threads(), spike.blas_threads()) == (tvm_before, 2)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        with spike.pinned_threads(0):
            pass
