import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from stdeploy.errors import ConfigError, OutputMismatch, ShapeError, UnsupportedPrimitive
from stdeploy.export.onnx_export import (
    LOGIT_ATOL, _Unrolled, default_step_rules, export_onnx, export_onnx_streaming, initial_states, run_onnx,
    run_onnx_streaming, spike_mismatches,
)
from stdeploy.models import build_model, direct_encode
from stdeploy.models.fold import fold_batchnorm
from stdeploy.models.layers import MLP
from stdeploy.models.structure import LowRankLinear, attach_mask
from stdeploy.neurons import to_slif
from stdeploy.activity import measure_activity, require_active
from stdeploy.train import TrainConfig, train

FAMILIES = ["sdt-tiny", "spikformer-tiny"]


@pytest.fixture(scope="module")
def digits(digits_subset):
    """Digits cut to 480 training and 64 test images: two epochs train in a few seconds."""
    return digits_subset(480, 64)


@pytest.fixture(scope="module")
def inputs(digits):
    images = torch.stack([digits.test[i][0] for i in range(len(digits.test))])
    return direct_encode(images, 4)  # (T, 64, 1, 8, 8)


@pytest.fixture(scope="module")
def models(digits, trained_sdt):
    """Each family briefly trained (about 80% accuracy) and folded: realistic spike activity. sdt-tiny
    is the run's shared model (conftest: the same data and settings as below)."""
    out = {"sdt-tiny": fold_batchnorm(trained_sdt[0])}
    for family in FAMILIES:
        if family in out:
            continue
        torch.manual_seed(0)
        model = build_model(family)
        train(model, digits, TrainConfig(epochs=2, batch_size=16, lr=5e-3), None, progress=False)
        out[family] = fold_batchnorm(model)
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, models):
    return models[request.param]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return path, export_onnx(trained, path)


def reference(model, x):
    with torch.no_grad():
        return _Unrolled(model.eval())(x)


def test_unrolled_export_matches_pytorch_exactly(trained, exported, inputs):
    path, info = exported
    onnx.checker.check_model(onnx.load(path))
    assert info["file_bytes"] == path.stat().st_size and info["opset"] == 18
    assert info["inputs"] == {"input": [4, "batch", 1, 8, 8]}
    assert info["outputs"] == {"logits": ["batch", 10], "spikes": [4, "batch", 16, 64]}
    assert all(r["spike_mismatches"] == 0 for r in info["validation"].values())
    ref_logits, ref_spikes = reference(trained, inputs)
    with torch.no_grad():
        assert torch.equal(ref_logits, trained(inputs))  # the wrapper is the model, with its head spikes kept
    assert 0.05 < ref_spikes.mean() < 0.95  # a realistically active model, in every spiking layer
    require_active(measure_activity(trained, inputs).firing_rates, low=1e-3, high=0.9)
    logits, spikes = run_onnx(path, inputs)
    assert spike_mismatches(ref_spikes, spikes) == 0
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=LOGIT_ATOL)


def test_batch_is_dynamic(trained, exported, inputs):
    path, _ = exported
    for batch in (1, 7):
        x = inputs[:, :batch]
        logits, spikes = run_onnx(path, x)
        assert logits.shape == (batch, 10) and spikes.shape == (4, batch, 16, 64)
        ref_logits, ref_spikes = reference(trained, x)
        assert spike_mismatches(ref_spikes, spikes) == 0
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=LOGIT_ATOL)


def test_streaming_steps_equal_the_unrolled_graph(trained, exported, inputs, tmp_path):
    path = tmp_path / "stream.onnx"
    info = export_onnx_streaming(trained, path)
    assert info["inputs"]["input"] == ["batch", 1, 8, 8]
    assert info["inputs"]["state.blocks.0.attn.q_lif"] == ["batch", 16, 64]
    assert info["inputs"]["state.embed.stages.0.lif"] == ["batch", 32, 8, 8]
    assert info["outputs"]["spikes_step"] == ["batch", 16, 64] and info["outputs"]["logits_step"] == ["batch", 10]
    assert {n[len("state_out."):] for n in info["outputs"] if n.startswith("state_out.")} == set(info["states"])
    states = initial_states(path, 5)
    assert states["state.blocks.0.mlp.lif2"].shape == (5, 16, 256) and not any(v.any() for v in states.values())

    logits, spikes = run_onnx_streaming(path, inputs)
    unrolled_logits, unrolled_spikes = run_onnx(exported[0], inputs)
    assert spike_mismatches(unrolled_spikes, spikes) == 0
    torch.testing.assert_close(logits, unrolled_logits, rtol=0, atol=LOGIT_ATOL)
    ref_logits, ref_spikes = reference(trained, inputs)
    assert spike_mismatches(ref_spikes, spikes) == 0
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=LOGIT_ATOL)


def test_slif_exports_its_current_per_neuron_values(models, tmp_path):
    model = to_slif(copy.deepcopy(models["spikformer-tiny"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in model.modules():
            if hasattr(n, "threshold_log_scale"):
                n.threshold_log_scale.copy_(0.1 * torch.randn(n.features, generator=g))
                n.leak_log_exponent.copy_(0.1 * torch.randn(n.features, generator=g))
    info = export_onnx_streaming(model, tmp_path / "slif.onnx")  # validated against the sLIF model
    assert all(r["spike_mismatches"] == 0 for r in info["validation"].values())
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(tmp_path / "slif.onnx").graph.initializer}
    q_lif = model.blocks[0].attn.q_lif
    np.testing.assert_array_equal(inits["blocks.0.attn.q_lif.threshold"].ravel(), q_lif.threshold.detach().numpy())
    np.testing.assert_array_equal(inits["blocks.0.attn.q_lif.decay"].ravel(), q_lif.decay.detach().numpy())


def test_low_rank_layers_stay_two_matmuls(tmp_path, inputs):
    torch.manual_seed(0)
    model = build_model("sdt-tiny").eval()
    rank = 8
    for lbn in (model.blocks[0].attn.q, model.blocks[0].mlp.fc1):
        lbn.linear = LowRankLinear.from_dense(lbn.linear, rank)
        with torch.no_grad():  # statistics of a trained BN, so folding has something to fold
            lbn.bn.running_mean.uniform_(-0.5, 0.5)
            lbn.bn.running_var.uniform_(0.5, 2.0)
    folded = fold_batchnorm(model)
    dense_matmuls = 7  # q, k, v, proj, fc1, fc2, head
    info = export_onnx(folded, tmp_path / "lowrank.onnx")
    proto = onnx.load(tmp_path / "lowrank.onnx")
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == info["matmul_nodes"] == dense_matmuls + 2
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    assert shapes["blocks.0.attn.q.v.weight.T"] == (64, rank) and shapes["blocks.0.attn.q.u.weight.T"] == (rank, 64)
    assert shapes["blocks.0.mlp.fc1.v.weight.T"] == (64, rank) and shapes["blocks.0.mlp.fc1.u.weight.T"] == (rank, 256)
    weights = {n.input[1] for n in matmuls}
    assert sum(shapes.get(w) == (64, 64) for w in weights) == 3  # k, v, proj: no merged U·V for q
    ref_logits, ref_spikes = reference(folded, inputs[:, :8])
    logits, spikes = run_onnx(tmp_path / "lowrank.onnx", inputs[:, :8])
    assert spike_mismatches(ref_spikes, spikes) == 0
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=LOGIT_ATOL)


def test_dsp_whole_model_keeps_two_convs_per_factored_convolution_and_is_spike_exact(tmp_path, trained_sdt, inputs):
    """DSP ``--layers all`` on the shared trained sdt-tiny (one-shot, 50% of the parameters, no
    fine-tune): stage 1 and the position embedding are factored, the stem (and fc1) dense by the
    rule. The graph keeps each factored convolution as two Conv nodes (k x k, then 1x1 with the
    bias) and onnxruntime reproduces PyTorch's head spikes on the 64 test digits, the model firing."""
    from stdeploy.models.structure import LowRankConv2d
    from stdeploy.prune import ALL_LAYERS, PruneConfig, make_pruner

    model = copy.deepcopy(trained_sdt[0])
    pruner = make_pruner(PruneConfig(method="dsp", param_ratio=0.5, layers=ALL_LAYERS))
    pruner.prepare(model)
    pruner.step(model)
    pruner.finalize(model)
    assert "embed.stages.0.conv.conv" in pruner.skipped
    folded = fold_batchnorm(model.eval())
    factored = {n: folded.get_submodule(n).conv for n in ("embed.stages.1.conv", "embed.rpe")}
    assert all(isinstance(c, LowRankConv2d) and c.rank < 64 for c in factored.values())
    info = export_onnx(folded, tmp_path / "dsp.onnx")   # validated against PyTorch inside as well
    proto = onnx.load(tmp_path / "dsp.onnx")
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    assert len(convs) == 1 + 2 + 2 and info["file_bytes"] > 0
    for name, c in factored.items():
        assert shapes[f"{name}.conv.v.weight"] == (c.rank, c.in_channels, 3, 3) and shapes[f"{name}.conv.u.weight"] == (64, c.rank, 1, 1)
        assert f"{name}.conv.u.bias" in shapes and f"{name}.conv.v.bias" not in shapes
    activity = measure_activity(folded, inputs)
    require_active(activity.firing_rates, low=1e-3, high=0.9)
    ref_logits, ref_spikes = reference(folded, inputs)
    logits, spikes = run_onnx(tmp_path / "dsp.onnx", inputs)
    assert float(ref_spikes.mean()) > 0.01
    assert spike_mismatches(ref_spikes, spikes) == 0
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=LOGIT_ATOL)
    print(f"DSP-all 50%: ranks {[c.rank for c in factored.values()]}, {activity.summary()}")


def prune_blocks(model, sparsity):
    """Zero the smallest-magnitude weights of every block linear (a finalized magnitude pruning)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.blocks.modules():
            if isinstance(m, nn.Linear):
                k = int(sparsity * m.weight.numel())
                cut = m.weight.abs().flatten().kthvalue(k).values
                m.weight[m.weight.abs() <= cut] = 0.0
    return model


def test_sparse_initializers_shrink_the_file_and_give_identical_outputs(models, inputs, tmp_path):
    model = prune_blocks(models["sdt-tiny"], 0.9)
    dense = export_onnx(model, tmp_path / "dense.onnx")
    sparse = export_onnx(model, tmp_path / "sparse.onnx", sparse_initializers=True)
    proto = onnx.load(tmp_path / "sparse.onnx")
    onnx.checker.check_model(proto)
    moved = {t.values.name for t in proto.graph.sparse_initializer}
    assert moved == set(sparse["sparse_initializers"]) and len(moved) == 6  # q, k, v, proj, fc1, fc2
    assert not onnx.load(tmp_path / "dense.onnx").graph.sparse_initializer and dense["sparse_initializers"] == []
    assert sparse["file_bytes"] < dense["file_bytes"]
    assert sparse["dense_file_bytes"] == pytest.approx(dense["file_bytes"], rel=0.01)
    assert sparse["initializers"] == dense["initializers"]
    d_logits, d_spikes = run_onnx(tmp_path / "dense.onnx", inputs)
    s_logits, s_spikes = run_onnx(tmp_path / "sparse.onnx", inputs)
    assert torch.equal(d_logits, s_logits) and torch.equal(d_spikes, s_spikes)
    ref_logits, ref_spikes = reference(model, inputs)
    assert spike_mismatches(ref_spikes, s_spikes) == 0


def test_unfolded_batchnorm_and_attached_masks_are_all_reported(tmp_path):
    model = build_model("sdt-tiny")
    attach_mask(model.blocks[0].mlp.fc1.linear, torch.ones(256, 64))
    with pytest.raises(UnsupportedPrimitive) as err:
        export_onnx(model, tmp_path / "m.onnx")
    message = str(err.value)
    for name in ("embed.stages.0.conv.bn", "embed.rpe.bn", "blocks.0.attn.q.bn", "blocks.0.mlp.fc2.bn"):
        assert f"{name}: BatchNorm" in message
    assert "blocks.0.mlp.fc1.linear: a pruning mask is attached to weight" in message and "fold_batchnorm" in message

    folded = fold_batchnorm(build_model("sdt-tiny"))
    attach_mask(folded.blocks[0].attn.proj, torch.ones(64, 64))
    for export in (export_onnx, export_onnx_streaming):
        with pytest.raises(UnsupportedPrimitive, match=r"blocks\.0\.attn\.proj: a pruning mask .* finalize pruning"):
            export(folded, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_path_names_it_and_leaves_nothing(tmp_path):
    model = fold_batchnorm(build_model("sdt-tiny"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OSError, match="cannot write ONNX model to .*a_file/model.onnx"):
        export_onnx(model, tmp_path / "a_file" / "model.onnx")
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(OSError, match="cannot write ONNX model to .*a_dir"):
        export_onnx_streaming(model, tmp_path / "a_dir")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a_dir", "a_file"]  # no temporary file left


def test_metadata_is_written_with_the_file_after_stdeploys_own(tmp_path):
    """``metadata`` lands in ``metadata_props`` when the file is written (its size as reported),
    after stdeploy's own keys, none of which it may replace (refused, nothing written)."""
    model = fold_batchnorm(build_model("sdt-tiny"))
    info = export_onnx(model, tmp_path / "m.onnx", validate=False, metadata={"stdeploy.quantize": "exact"})
    props = [(p.key, p.value) for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props]
    assert [k for k, _ in props] == ["stdeploy.graph", "stdeploy.model", "stdeploy.timesteps", "stdeploy.config", "stdeploy.quantize"]
    assert props[-1] == ("stdeploy.quantize", "exact") and info["file_bytes"] == (tmp_path / "m.onnx").stat().st_size
    with pytest.raises(ConfigError, match="metadata: the exporter writes stdeploy.timesteps itself"):
        export_onnx_streaming(model, tmp_path / "s.onnx", validate=False, metadata={"stdeploy.timesteps": "2"})
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_a_wrong_step_rule_fails_validation_and_writes_nothing(models, tmp_path):
    trained = models["sdt-tiny"]
    def halved(step, m, x):  # steps every neuron, but halves the MLP's output
        return 0.5 * step(m.fc2, step(m.lif2, step(m.fc1, step(m.lif1, x))))

    def skipping(step, m, x):  # never steps lif2
        return step(m.fc2, step(m.fc1, step(m.lif1, x)))

    with pytest.raises(OutputMismatch, match=r"batch 1: \d+ of 4096 output spikes differ"):
        export_onnx_streaming(trained, tmp_path / "s.onnx", rules={MLP: halved})
    with pytest.raises(UnsupportedPrimitive, match=r"never stepped blocks\.0\.mlp\.lif2"):
        export_onnx_streaming(trained, tmp_path / "s.onnx", rules={MLP: skipping})
    assert list(tmp_path.iterdir()) == []
    assert default_step_rules()[MLP] not in (halved, skipping)  # a fresh dictionary each call


def test_run_helpers_check_shapes(exported, tmp_path):
    path, _ = exported
    with pytest.raises(ShapeError, match=r"expected input \(T, B, C, H, W\)"):
        run_onnx(path, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ShapeError, match="fixed dims"):
        run_onnx(path, torch.zeros(3, 2, 1, 8, 8))
    with pytest.raises(ShapeError, match="differ in shape"):
        spike_mismatches(torch.zeros(2, 3), torch.zeros(3, 2))
    assert spike_mismatches(torch.tensor([0.0, 1.0, 1.0]), np.array([1.0, 1.0, 0.0])) == 2
    with pytest.raises(FileNotFoundError):
        run_onnx(tmp_path / "missing.onnx", torch.zeros(4, 1, 1, 8, 8))


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_graph_outputs(tmp_path, inputs):
    torch.manual_seed(0)
    model = build_model("sdt-tiny").eval()
    model.blocks[0].attn.q.linear = LowRankLinear.from_dense(model.blocks[0].attn.q.linear, 8)
    folded = fold_batchnorm(model)
    info = export_onnx(folded, tmp_path / "dynamo.onnx", dynamo=True)
    assert info["exporter"] == "dynamo" and info["matmul_nodes"] == 8
    assert info["inputs"] == {"input": [4, "batch", 1, 8, 8]}
    ref_logits, ref_spikes = reference(folded, inputs[:, :7])
    logits, spikes = run_onnx(tmp_path / "dynamo.onnx", inputs[:, :7])
    assert spike_mismatches(ref_spikes, spikes) == 0
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=LOGIT_ATOL)
