"""A DSP-factored sdt-tiny on the tvm target's default CPU path: the shared trained sdt-tiny with
DSP ``--layers all`` applied one-shot at 30% of the parameters (no fine-tune), exported to ONNX and
compiled by ``TVMTarget().compile`` for the ``cpu`` profile. Each factored convolution stays two
convolutions (a ``k x k`` one to ``rank`` channels, then a 1x1 one with the bias) in the ONNX graph
and in the compiled module, where each runs on a kernel of its own; spikes equal onnxruntime's and
PyTorch's exactly and logits are within the target's tolerance, every LIF population firing."""

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np
import onnx
import pytest
import torch

pytestmark = pytest.mark.tvm

IMAGES = 16
PARAM_RATIO = 0.3   # low enough that the global budget factors the stem as well as stage 1 and the position embedding
FACTORED = ("embed.stages.0.conv.conv", "embed.stages.1.conv.conv", "embed.rpe.conv")


@pytest.fixture(scope="module")
def dsp_export(trained_sdt, tmp_path_factory):
    """``(model, export_dir, x)``: the DSP-all model (unfolded, eval), its export directory (ONNX
    only) and ``IMAGES`` direct-encoded test digits ``(T, B, 1, 8, 8)``."""
    from stdeploy.export.directory import export_model
    from stdeploy.models import clone_model, direct_encode
    from stdeploy.prune import ALL_LAYERS, PruneConfig, make_pruner

    base, data = trained_sdt
    model = clone_model(base)
    pruner = make_pruner(PruneConfig(method="dsp", param_ratio=PARAM_RATIO, layers=ALL_LAYERS))
    pruner.one_shot(model)
    model.eval()
    out = tmp_path_factory.mktemp("dsp-tvm") / "export"
    export_model(model, out, ("onnx",), data=None, samples=8)   # validated against PyTorch inside as well
    x = direct_encode(torch.stack([data.test[i][0] for i in range(IMAGES)]), model.cfg.timesteps)
    return model, out, x


def test_dsp_whole_model_runs_on_the_tvm_cpu_path_two_convolutions_per_factored_one(dsp_export):
    from stdeploy.activity import measure_activity, require_active
    from stdeploy.export.validate import record_neurons
    from stdeploy.models.fold import fold_batchnorm
    from stdeploy.models.structure import LowRankConv2d
    from stdeploy.targets.base import get_target
    from stdeploy.targets.profiles import load_profile
    from stdeploy.targets.tvm.target import TVMTarget

    model, export_dir, x = dsp_export
    factored = {name: model.get_submodule(name) for name in FACTORED}
    assert all(isinstance(m, LowRankConv2d) and m.rank < min(m.fan_in, m.out_channels) for m in factored.values()), factored
    activity = measure_activity(model, x)
    require_active(activity.firing_rates, 1e-3, 0.9, what="DSP-all sdt-tiny")

    # the ONNX graph: two Conv nodes per factored convolution, k x k to rank then 1x1 with the bias
    proto = onnx.load(export_dir / "model.onnx")
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 * len(FACTORED)
    expected = []   # OIHW weights of the convolutions, v then u of each factored layer
    for name, m in factored.items():
        v, u = (m.rank, m.in_channels, *m.kernel_size), (m.out_channels, m.rank, 1, 1)
        assert shapes[f"{name}.v.weight"] == v and shapes[f"{name}.u.weight"] == u
        assert f"{name}.u.bias" in shapes and f"{name}.v.bias" not in shapes   # BatchNorm folded into u's bias
        expected += [list(v), list(u)]

    profile = load_profile("cpu")
    tvm_run = TVMTarget().compile(export_dir, profile, batch_size=IMAGES)
    result = tvm_run.run(x.numpy())
    ort = get_target("onnxruntime").compile(export_dir, profile).run(x.numpy())
    with torch.no_grad():
        ref_logits, rec = record_neurons(fold_batchnorm(model).eval(), x)
    ref_spikes = rec["head.lif"]["spikes"].numpy()
    tolerance = TVMTarget.tolerance
    assert result.spikes.shape == ref_spikes.shape and 0.01 < ref_spikes.mean() < 0.95
    assert np.count_nonzero(result.spikes != ort.spikes) == tolerance["spike_mismatches"] == 0
    assert np.count_nonzero(result.spikes != ref_spikes) == 0
    np.testing.assert_allclose(result.logits, ort.logits, rtol=0, atol=tolerance["logits_atol"])
    np.testing.assert_allclose(result.logits, ref_logits.numpy(), rtol=0, atol=tolerance["logits_atol"])

    # the compiled module: every convolution on a kernel of its own, the factored ones as their two
    # factors (no dense product); the one-channel ones on the stationary event kernel, the others on
    # the spike-adaptive kernels, each of which ran
    build = result.info["builds"][str(IMAGES)]
    events = [e["weight"] for e in build.get("event", []) if e["op"] == "conv2d"]
    adaptive = build.get("spike_conv", [])
    assert sorted(events + [c["weight"] for c in adaptive]) == sorted(expected), (events, adaptive)
    assert events == [[factored[FACTORED[0]].rank, 1, 3, 3]]   # the stem's v: one input channel
    assert all(sum(c["calls"].values()) >= 1 for c in adaptive), adaptive
    assert result.info["path"].startswith("spike-adaptive conv2d/matmul + BLAS matmul/conv2d + ")
    print(f"DSP-all {PARAM_RATIO:.0%} on tvm cpu: ranks {[m.rank for m in factored.values()]}, {activity.summary()}, "
          f"head spikes {ref_spikes.mean():.3f}")
