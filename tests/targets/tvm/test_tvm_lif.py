"""The fused LIF kernels (stdeploy.targets.tvm.kernels.lif): the kernel equals the graph's float32
recurrence bit for bit (membranes landing exactly on the threshold included) and compiles without
FMA contraction; the Relax rewrite finds every LIF population of sdt-tiny, dense and pruned to 95%
over every layer, folds the BatchNorm/bias adds in, and the CPU module built with it gives the
same spikes and logits as onnxruntime, bit for bit (every spiking
layer checked to fire)."""

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from stdeploy.targets.tvm.kernels import lif

pytestmark = pytest.mark.tvm

BATCH = 8


def _grid(rng, shape, scale=8):
    """Values on a 1/scale grid: sums of them land exactly on thresholds of the same grid."""
    return (rng.integers(-2 * scale, 3 * scale, size=shape) / scale).astype(np.float32)


@pytest.mark.parametrize("case", ["channels+bias", "uniform", "tokens"])
def test_kernel_is_the_recurrence_bit_for_bit(case, target):
    import tvm

    rng = np.random.default_rng(1)
    steps = 4
    if case == "channels+bias":      # an embedding stage: per-channel constants, bias on (T*B, C, H, W)
        shape, cshape, x_shape = (3, 8, 4, 4), (8, 1, 1), (steps * 3, 8, 4, 4)
    elif case == "uniform":          # a plain LIF: every constant one value
        shape, cshape, x_shape = (3, 5, 16), (1,), None
    else:                            # an sLIF over tokens: per-feature constants
        shape, cshape, x_shape = (2, 3, 24), (24,), None
    a, b = (rng.integers(1, 8, size=cshape) / 8).astype(np.float32), (rng.integers(1, 8, size=cshape) / 8).astype(np.float32)
    theta = (rng.integers(2, 10, size=cshape) / 8).astype(np.float32)
    v0 = np.zeros(cshape, np.float32)
    c = _grid(rng, cshape) if case == "channels+bias" else None
    x = _grid(rng, (steps, *shape))
    ref = lif.reference_lif(x + c if c is not None else x, a, b, theta, v0)
    # the grid makes some membranes equal their threshold exactly: the >= edge is exercised
    v = np.zeros(shape, np.float32)
    at_threshold = 0
    for t in range(steps):
        v = a * v + b * (x[t] + c if c is not None else x[t])
        at_threshold += int(np.count_nonzero(np.broadcast_to(v == theta, shape)))
        v = v * (1 - ref[t])
    assert at_threshold > 0 and 0 < ref.mean() < 1
    consts = [a, b, theta, v0] if c is None else [c, a, b, theta, v0]
    period = lif.constant_period(shape, consts)
    func = lif.lif_kernel(steps, shape, period, c is not None, x_shape)
    assert not lif.contracts_to_fma(func, target)
    fn = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(target))["main"]
    flat = [tvm.runtime.tensor(np.ascontiguousarray(np.broadcast_to(k, shape)).reshape(-1)[:period].copy()) for k in consts]
    lanes = np.gcd(np.gcd(int(np.prod(shape)), period), lif.LANES)
    out = tvm.runtime.tensor(np.full((steps, *shape), 7, np.float32))
    fn(tvm.runtime.tensor(x.reshape(x_shape) if x_shape else x), *flat, tvm.runtime.tensor(np.full(lanes, -1, np.int32)), out)
    np.testing.assert_array_equal(out.numpy(), ref)


def test_constant_period():
    assert lif.constant_period((4, 8, 2, 2), [np.ones((8, 1, 1), np.float32)]) == 32              # C x H x W
    assert lif.constant_period((4, 6, 64), [np.float32(0.5), np.full((64,), 2, np.float32)]) == 64  # tokens
    assert lif.constant_period((4, 6, 64), [np.full((1,), 0.5, np.float32)]) == 64                 # uniform: last dim
    per_row = np.arange(4, dtype=np.float32).reshape(4, 1, 1)
    assert lif.constant_period((4, 6, 64), [per_row]) == 4 * 6 * 64                                 # nothing repeats
    # -0.0 and 0.0 differ in bits: not one period
    signed = np.zeros((2, 16), np.float32)
    signed[1, 0] = -0.0
    assert lif.constant_period((2, 16), [signed]) == 32


def _fused_module(export_dir, target, x):
    """``(graph, fused populations, logits, spikes)`` of the CPU module that prepare_cpu_module
    builds with the fused LIF kernels (BLAS for the weight layers)."""
    import tvm
    from tvm import relax

    from stdeploy.targets.tvm.cpu import CpuOptions, outputs_to_numpy, prepare_cpu_module
    from stdeploy.targets.tvm.frontend import load_onnx_graph

    graph = load_onnx_graph(export_dir)
    prepared = prepare_cpu_module(graph, BATCH, target, CpuOptions("blas-dense", (), lif=True))
    vm = relax.VirtualMachine(tvm.compile(prepared.mod, target=tvm.target.Target(target)), tvm.cpu())
    r = outputs_to_numpy(vm["main"](tvm.runtime.tensor(x)), graph.outputs)
    return graph, prepared.info["fused_lif"], r["logits"], r["spikes"]


def _check(model, export_dir, x, target):
    import onnxruntime as ort

    from stdeploy.activity import measure_activity, require_active
    from stdeploy.models import direct_encode
    from stdeploy.neurons import neurons_of

    xt = direct_encode(x, model.cfg.timesteps)
    require_active(measure_activity(model, xt).firing_rates, 0.005, 0.6, what="sdt-tiny")
    xn = xt.numpy()
    graph, fused, logits, spikes = _fused_module(export_dir, target, xn)
    assert len(fused) == len(neurons_of(model))                      # every population
    assert any(f["bias"] for f in fused)                             # the BatchNorm/bias adds folded in
    assert 0 < spikes.mean() < 1
    session = ort.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])
    ort_logits, ort_spikes = session.run(["logits", "spikes"], {"input": xn})
    np.testing.assert_array_equal(spikes, ort_spikes)                # bit for bit, spikes and logits
    np.testing.assert_array_equal(logits, ort_logits)
    return fused


def test_fused_sdt_tiny_is_bit_identical(exported_sdt, trained_sdt, target):
    model, data = trained_sdt
    x = torch.stack([data.test[i][0] for i in range(BATCH)])
    fused = _check(model, exported_sdt, x, target)
    assert {tuple(f["shape"]) for f in fused} >= {(BATCH, 32, 8, 8), (BATCH, 16, 64)}


def test_fused_pruned_slif_sdt_tiny_is_bit_identical(whole_model_pruned_sdt, tmp_path, target):
    """Pruned to 95% over every layer, its neurons made sLIFs with per-neuron thresholds and leaks
    (seeded perturbations): per-channel and per-feature constants in the graph."""
    from stdeploy.export.directory import export_model
    from stdeploy.neurons import neurons_of, to_slif

    model, data = whole_model_pruned_sdt
    model = to_slif(model).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for neuron in neurons_of(model).values():
            neuron.threshold_log_scale.copy_(torch.randn(neuron.features, generator=gen) * 0.1)
            neuron.leak_log_exponent.copy_(torch.randn(neuron.features, generator=gen) * 0.1)
    export_model(model, tmp_path / "export", ("onnx",), data=None, samples=8, overwrite=True)
    fused = _check(model, tmp_path / "export", torch.stack([data.test[i][0] for i in range(BATCH)]), target)
    assert {f["period"] for f in fused} >= {32 * 8 * 8, 64}    # per-channel constants of an image population, per-feature of tokens
