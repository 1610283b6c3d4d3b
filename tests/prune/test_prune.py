import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from stdeploy.checkpoint import load_checkpoint, save_checkpoint
from stdeploy.errors import ConfigError
from stdeploy.models import build_model, direct_encode
from stdeploy.models.structure import LowRankLinear
from stdeploy.neurons import SLIF, neurons_of
from stdeploy.prune import CompensationConfig, PruneConfig, make_pruner, magnitude_masks, prune_model, recalibrate_bn
from stdeploy.prune.base import cubic_sparsity
from stdeploy.train import TrainConfig, train


def _block_weights(model, pruner):
    return {n: model.get_submodule(n).weight for n in pruner.names}


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.95])
def test_l1p_masks_have_exact_sparsity(scope, sparsity):
    torch.manual_seed(0)
    model = build_model("sdt-tiny")
    pruner = make_pruner(PruneConfig(method="l1p", sparsity=sparsity, scope=scope))
    pruner.prepare(model)
    pruner.step(model)
    ws = _block_weights(model, pruner)
    total = sum(w.numel() for w in ws.values())
    zeros = sum(int((w == 0).sum()) for w in ws.values())
    if scope == "global":
        assert zeros == round(sparsity * total)
    else:
        for w in ws.values():
            assert int((w == 0).sum()) == round(sparsity * w.numel())
    report = pruner.report(model)
    assert report["block_params_dense"] == total == 49152 and report["nonzeros"] == total - zeros


def test_global_masks_drop_smallest_magnitudes():
    w = {"a": torch.tensor([[0.1, -5.0], [0.3, 2.0]]), "b": torch.tensor([[-0.2, 4.0]])}
    m = magnitude_masks(w, 0.5, "global")  # 3 of 6 entries go: 0.1, -0.2, 0.3
    assert m["a"].tolist() == [[False, True], [False, True]] and m["b"].tolist() == [[False, True]]


def test_pruned_weights_stay_zero_through_fine_tuning(digits_subset):
    torch.manual_seed(0)
    model = build_model("sdt-tiny")
    pruner = make_pruner(PruneConfig(method="l1p", sparsity=0.8))
    pruner.prepare(model)
    pruner.step(model)
    before = {n: (w == 0).clone() for n, w in _block_weights(model, pruner).items()}
    train(model, digits_subset(192, 96), TrainConfig(epochs=1, batch_size=32), progress=False)
    for n, w in _block_weights(model, pruner).items():
        assert torch.equal(w == 0, before[n]), n
        orig = model.get_submodule(n).parametrizations.weight.original
        assert orig.grad is None or torch.all(orig.grad[before[n]] == 0)
    pruner.finalize(model)
    for n, w in _block_weights(model, pruner).items():
        assert type(model.get_submodule(n)) is nn.Linear and torch.equal(w == 0, before[n])


def test_cubic_schedule():
    assert cubic_sparsity(0.9, 0.0) == 0.0
    assert cubic_sparsity(0.9, 0.75) == pytest.approx(0.9) and cubic_sparsity(0.9, 1.0) == pytest.approx(0.9)
    assert cubic_sparsity(0.9, 0.375) == pytest.approx(0.9 * (1 - 0.5 ** 3))


def test_svd_init_reproduces_weight_at_full_rank():
    torch.manual_seed(0)
    lin = nn.Linear(48, 32, bias=True)
    lr = LowRankLinear.from_dense(lin)
    assert lr.rank == 32
    torch.testing.assert_close(lr.weight, lin.weight, atol=1e-6, rtol=1e-5)
    x = torch.randn(5, 48)
    torch.testing.assert_close(lr(x), lin(x), atol=1e-5, rtol=1e-5)


def test_dsp_rank_removal_drops_params_as_reported():
    torch.manual_seed(0)
    model = build_model("sdt-tiny")
    pruner = make_pruner(PruneConfig(method="dsp", rank=8))
    pruner.prepare(model)
    pruner.step(model)
    report = pruner.report(model)
    expected = 4 * 8 * (64 + 64) + 2 * 8 * (64 + 256)
    assert report["block_params_remaining"] == expected
    counted = sum(p.numel() for n in pruner.names for p in model.get_submodule(n).parameters())
    assert counted == expected
    assert all(layer["rank"] == 8 for layer in report["layers"].values())


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_dsp_param_ratio_budget(scope):
    torch.manual_seed(0)
    model = build_model("sdt-tiny")
    pruner = make_pruner(PruneConfig(method="dsp", param_ratio=0.3, scope=scope))
    pruner.prepare(model)
    pruner.step(model)
    report = pruner.report(model)
    assert report["block_params_remaining"] <= 0.3 * 49152
    assert report["block_params_remaining"] > 0.25 * 49152  # the budget is used, not wasted


def test_dsp_keeps_dims_with_largest_group_norm_and_stays_dense_when_not_smaller():
    lr = LowRankLinear(4, 4, 4)
    with torch.no_grad():
        lr.u.weight.copy_(torch.diag(torch.tensor([1.0, 5.0, 0.1, 3.0])))
        lr.v.weight.copy_(torch.eye(4))
    model = nn.Sequential(lr)
    model.cfg = None
    pruner = make_pruner(PruneConfig(method="dsp", rank=2, layers=("0",)))
    pruner.prepare(model)
    pruner.step(model)
    assert torch.equal(model[0].u.weight, torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 0.0], [0.0, 3.0]]))
    pruner.finalize(model)  # rank 2: 2*(4+4) = 16 >= 4*4: back to dense
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, torch.diag(torch.tensor([0.0, 5.0, 0.0, 3.0])))


def test_prune_state_roundtrips_through_checkpoint(tmp_path):
    torch.manual_seed(0)
    for method, kwargs in (("l1p", {"sparsity": 0.7}), ("dsp", {"rank": 6})):
        model = build_model("sdt-tiny")
        pruner = make_pruner(PruneConfig(method=method, **kwargs))
        pruner.prepare(model)
        pruner.step(model)
        save_checkpoint(tmp_path / method, model)
        loaded = load_checkpoint(tmp_path / method).model
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        x = torch.rand(4, 2, 1, 8, 8)
        assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_bn_recalibration_changes_only_statistics(digits_subset):
    torch.manual_seed(0)
    model = build_model("sdt-tiny")
    weights = {k: v.clone() for k, v in model.named_parameters()}
    recalibrate_bn(model, digits_subset(192, 96).train)
    bn = model.blocks[0].mlp.fc1.bn
    assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert bn.momentum == 0.1 and all(torch.equal(weights[k], v) for k, v in model.named_parameters())


def test_prune_model_with_slif_compensation(digits_subset):
    torch.manual_seed(0)
    data = digits_subset(192, 96)
    model = build_model("sdt-tiny")
    train(model, data, TrainConfig(epochs=2, batch_size=32), progress=False)
    model, report = prune_model(model, data, PruneConfig(method="l1p", sparsity=0.9),
                                CompensationConfig(neuron="slif", epochs=1, penalty_epochs=1), progress=False)
    assert set(report["accuracy"]) == {"dense", "after_penalty", "after_prune", "after_bn_recalibration", "final"}
    assert report["nonzeros"] == 49152 - round(0.9 * 49152)
    assert model.cfg.neuron == "slif" and all(isinstance(n, SLIF) for n in neurons_of(model).values())
    thresholds = torch.cat([n.threshold.detach() for n in neurons_of(model).values()])
    assert not torch.all(thresholds == thresholds[0])  # intrinsic parameters moved


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "l1p", "sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
    ({"method": "l1p", "sparsity": -0.1}, "sparsity"),
    ({"method": "dsp", "param_ratio": 0.0}, r"param ratio must be in \(0, 1\]"),
    ({"method": "dsp", "param_ratio": None, "rank": 0}, "rank must be a positive integer"),
    ({"method": "obd"}, "unknown pruning method 'obd'"),
])
def test_bad_prune_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**kwargs)


def test_unknown_layer_and_compensation():
    with pytest.raises(ConfigError, match=r"\['blocks.\*.attn.nope'\] match no linear layer"):
        make_pruner(PruneConfig(layers=("blocks.*.attn.nope",))).prepare(build_model("sdt-tiny"))
    with pytest.raises(ConfigError, match="unknown compensation 'plif'"):
        CompensationConfig(neuron="plif")


def test_cli_prune_json(tmp_path):
    model = build_model("sdt-tiny")
    save_checkpoint(tmp_path / "dense", model)
    cmd = [sys.executable, "-m", "stdeploy.cli", "prune", str(tmp_path / "dense"), "--method", "dsp", "--param-ratio", "0.2",
           "--epochs", "0", "--penalty-epochs", "0", "--compensate", "none", "--out", str(tmp_path / "p"), "--json", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["block_params_remaining"] <= 0.2 * out["block_params_dense"]
    assert {"dense", "after_prune", "final"} <= out["accuracy"].keys()
    loaded = load_checkpoint(out["checkpoint"]).model
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())
    bad = subprocess.run(cmd[:5] + ["--method", "l1p", "--sparsity", "1.5", "--json"], capture_output=True, text=True)
    assert bad.returncode == 2 and "sparsity must be in [0, 1)" in bad.stderr


# ----------------------------------------------------------------------------- whole-model scope (--layers all)
def test_layer_scopes_and_patterns():
    from stdeploy.prune import ALL_LAYERS, DEFAULT_LAYERS, layer_patterns

    assert layer_patterns(None) == layer_patterns("blocks") == DEFAULT_LAYERS
    assert layer_patterns("all") == ALL_LAYERS and set(DEFAULT_LAYERS) < set(ALL_LAYERS)
    assert layer_patterns("head.fc, blocks.*.mlp.fc1.linear") == ("head.fc", "blocks.*.mlp.fc1.linear")
    with pytest.raises(ConfigError, match="--layers ','"):
        layer_patterns(",")
    assert PruneConfig().layers == DEFAULT_LAYERS   # the default stays blocks only


@pytest.mark.parametrize("preset", ["sdt-tiny", "sdt-1d-tiny"])
def test_l1p_whole_model_masks_convs_and_head_and_counts_what_is_left(preset, tmp_path):
    from stdeploy.prune import ALL_LAYERS, weight_counts

    torch.manual_seed(0)
    model = build_model(preset)
    dense = weight_counts(model)
    pruner = make_pruner(PruneConfig(sparsity=0.9, layers=ALL_LAYERS, scope="layer"))
    pruner.prepare(model)
    assert {"embed.stages.0.conv.conv", "embed.stages.1.conv.conv", "embed.rpe.conv", "head.fc"} <= set(pruner.names)
    pruner.step(model)
    # a checkpoint of the masked model (conv masks included) rebuilds the same model
    save_checkpoint(tmp_path / "masked", model)
    loaded = load_checkpoint(tmp_path / "masked").model
    x = torch.rand(4, 2, *model.cfg.input_shape)
    assert torch.equal(model.eval()(x), loaded.eval()(x))
    pruner.finalize(model)
    weights = {n: model.get_submodule(n).weight for n in pruner.names}
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert all(int((w == 0).sum()) == round(0.9 * w.numel()) for w in weights.values())  # each layer alike
    assert zeros == sum(round(0.9 * w.numel()) for w in weights.values())
    counts = weight_counts(model)
    assert counts["params_dense"] == dense["params_dense"] and counts["macs_dense"] == dense["macs_dense"]
    assert counts["params"] == dense["params"] - zeros
    # multiply-adds per layer: kept weights times positions (tokens, output pixels, 1 for the head)
    n_tokens = model.cfg.tokens
    assert counts["layers"]["blocks.0.mlp.fc1.linear"]["positions"] == n_tokens
    assert counts["layers"]["head.fc"]["positions"] == 1
    first = counts["layers"]["embed.stages.0.conv.conv"]
    assert first["positions"] == (40 if preset == "sdt-1d-tiny" else 64) and first["macs"] == first["params"] * first["positions"]
    assert counts["macs"] == sum(e["macs"] for e in counts["layers"].values())
    assert counts["macs_speedup_limit"] > 5


def test_block_scope_leaves_the_embedding_dense_and_caps_the_speedup():
    """Issue 21's figure: 90% zeros in the blocks only leave a multiply-add limit of 1.38x on sdt-tiny."""
    from stdeploy.prune import weight_counts

    model = build_model("sdt-tiny")
    pruner = make_pruner(PruneConfig(sparsity=0.9, scope="layer"))   # the limit is the same with one global budget
    pruner.prepare(model)
    pruner.step(model)
    pruner.finalize(model)
    counts = weight_counts(model)
    assert counts["layers"]["embed.rpe.conv"]["params"] == counts["layers"]["embed.rpe.conv"]["params_dense"]
    assert counts["macs_speedup_limit"] == pytest.approx(1.38, abs=0.01)


def test_dsp_whole_model_factors_the_head_skips_convs_with_a_reason_and_exports(tmp_path):
    from stdeploy.export.onnx_export import export_onnx
    from stdeploy.models.fold import fold_batchnorm
    from stdeploy.prune import ALL_LAYERS
    from stdeploy.prune.dsp import CONV_SKIP_REASON

    torch.manual_seed(0)
    model = build_model("sdt-1d-tiny")
    pruner = make_pruner(PruneConfig(method="dsp", param_ratio=0.1, layers=ALL_LAYERS))
    pruner.prepare(model)
    assert set(pruner.skipped) == {"embed.stages.0.conv.conv", "embed.stages.1.conv.conv", "embed.rpe.conv"}
    assert "head.fc" in pruner.names and isinstance(model.head.fc, LowRankLinear)
    pruner.step(model)
    pruner.finalize(model)
    report = pruner.report(model)
    assert report["skipped"]["embed.rpe.conv"] == CONV_SKIP_REASON
    assert report["layers"]["head.fc"]["rank"] < 10 and report["block_params_remaining"] <= 0.1 * report["block_params_dense"]
    x = torch.rand(4, 2, *model.cfg.input_shape)
    before = model.eval()(x)
    export_onnx(fold_batchnorm(model), tmp_path / "m.onnx")   # validated against PyTorch inside, raises on mismatch
    assert before.shape == (2, 10)
    with pytest.raises(ConfigError, match="are all convolutions"):
        make_pruner(PruneConfig(method="dsp", param_ratio=0.5, layers=("embed.*.conv",))).prepare(build_model("sdt-tiny"))


def test_cli_prune_whole_model_json_reports_counts(tmp_path):
    save_checkpoint(tmp_path / "dense", build_model("sdt-tiny"))
    cmd = [sys.executable, "-m", "stdeploy.cli", "prune", str(tmp_path / "dense"), "--method", "l1p", "--sparsity", "0.95",
           "--layers", "all", "--scope", "layer", "--epochs", "0", "--penalty-epochs", "0", "--compensate", "none", "--out", str(tmp_path / "p"),
           "--json", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "embed.stages.0.conv.conv" in out["layers"] and "head.fc" in out["layers"]
    m = out["model"]
    assert m["params"] < 0.1 * m["params_dense"] and m["macs"] < 0.1 * m["macs_dense"] and m["macs_speedup_limit"] > 10
    assert out["config"]["layers"][-1] == "head.fc"


def test_l1p_warns_when_the_global_budget_empties_a_layer():
    from stdeploy.prune import ALL_LAYERS

    torch.manual_seed(0)
    model = build_model("sdt-1d-tiny")   # at initialisation the 64x3 convolutions hold the smallest weights
    pruner = make_pruner(PruneConfig(sparsity=0.9, layers=ALL_LAYERS))
    pruner.prepare(model)
    with pytest.warns(UserWarning, match=r"removes every weight of .*embed.rpe.conv.*--scope layer"):
        pruner.step(model)
    layerwise = make_pruner(PruneConfig(sparsity=0.9, layers=ALL_LAYERS, scope="layer"))
    model = build_model("sdt-1d-tiny")
    layerwise.prepare(model)
    import warnings as _w
    with _w.catch_warnings():
        _w.simplefilter("error")
        layerwise.step(model)
    assert all(bool((model.get_submodule(n).weight != 0).any()) for n in layerwise.names)
