import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from stdeploy.checkpoint import load_checkpoint, save_checkpoint
from stdeploy.errors import ConfigError
from stdeploy.models import build_model, direct_encode
from stdeploy.models.structure import LowRankConv2d, LowRankLinear
from stdeploy.neurons import SLIF, neurons_of
from stdeploy.prune import CompensationConfig, PruneConfig, make_pruner, magnitude_masks, prune_model, recalibrate_bn
from stdeploy.prune.base import cubic_sparsity, select_layers
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
    """90% zeros in the blocks only leave a multiply-add limit of 1.38x on sdt-tiny."""
    from stdeploy.prune import weight_counts

    model = build_model("sdt-tiny")
    pruner = make_pruner(PruneConfig(sparsity=0.9, scope="layer"))   # the limit is the same with one global budget
    pruner.prepare(model)
    pruner.step(model)
    pruner.finalize(model)
    counts = weight_counts(model)
    assert counts["layers"]["embed.rpe.conv"]["params"] == counts["layers"]["embed.rpe.conv"]["params_dense"]
    assert counts["macs_speedup_limit"] == pytest.approx(1.38, abs=0.01)


def test_low_rank_conv_from_dense_is_exact_at_full_rank():
    """``LowRankConv2d.from_dense``: the SVD of the weight as ``(out, in*kh*kw)``, exact at full rank
    (kernel, stride, padding, bias kept), group norms ``sqrt(2 s_i)``; grouped convolutions refused."""
    torch.manual_seed(0)
    for conv in (nn.Conv2d(8, 16, 3, padding=1, bias=True), nn.Conv2d(1, 32, (1, 5), padding=(0, 2), bias=False),
                 nn.Conv2d(6, 4, 3, stride=2, padding=1, bias=True)):
        lr = LowRankConv2d.from_dense(conv)
        fan_in = conv.weight[0].numel()
        assert lr.rank == min(fan_in, conv.out_channels) and lr.params == lr.rank * (fan_in + conv.out_channels)
        assert lr.u.kernel_size == (1, 1) and lr.v.kernel_size == conv.kernel_size and lr.v.bias is None
        torch.testing.assert_close(lr.weight, conv.weight, atol=1e-6, rtol=1e-5)
        x = torch.randn(2, conv.in_channels, 7, 9)
        torch.testing.assert_close(lr(x), conv(x), atol=1e-5, rtol=1e-5)
        s = torch.linalg.svdvals(conv.weight.detach().flatten(1).double())[: lr.rank]
        torch.testing.assert_close(lr.group_norms().double() ** 2, 2 * s, atol=1e-5, rtol=1e-5)
    kept = lr.keep(torch.tensor([0, 2]))
    assert kept.rank == 2 and torch.equal(kept.u.weight, lr.u.weight[:, [0, 2]]) and torch.equal(kept.v.weight, lr.v.weight[[0, 2]])
    assert kept(x).shape == conv(x).shape
    with pytest.raises(ConfigError, match="embed.x: a grouped convolution"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), name="embed.x")
    # shaped_like: the same parameters by name and shape from the hyper-parameters alone (what a checkpoint loads into)
    empty = LowRankConv2d.shaped_like(conv, lr.rank, name="embed.x")
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in lr.state_dict().items()}
    assert empty.v.stride == conv.stride and empty.v.padding == conv.padding
    empty.load_state_dict(lr.state_dict())   # strict: raises on a missing, unexpected or misshapen entry
    torch.testing.assert_close(empty(x), conv(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"embed.x: rank must be in \[1, 4\] for a 4x6x3x3 convolution, got 5"):
        LowRankConv2d.shaped_like(conv, 5, name="embed.x")


# (preset, conv output positions HO*WO of the stem / stage 1 and of the position embedding)
DSP_ALL_PRESETS = [("sdt-tiny", 64, 16), ("sdt-1d-tiny", 40, 20)]


@pytest.mark.parametrize("preset,stage_positions,rpe_positions", DSP_ALL_PRESETS)
def test_dsp_whole_model_factors_convolutions_and_keeps_the_stem_dense_by_the_rule(preset, stage_positions, rpe_positions):
    """--layers all: stage-1 and position-embedding convolutions become LowRankConv2d under one global
    budget with the linears; the first stem convolution keeps all 9 (5) dimensions here, where its
    factors would be larger than its weight, so it stays dense and ``skipped`` says why. Counts are
    the hand-computed ``rank (in kh kw + out)`` parameters and ``rank in kh kw HO WO + out rank HO WO``
    multiply-adds."""
    from stdeploy.prune import ALL_LAYERS, weight_counts

    torch.manual_seed(0)
    model = build_model(preset)
    pruner = make_pruner(PruneConfig(method="dsp", param_ratio=0.2, layers=ALL_LAYERS))
    pruner.prepare(model)
    assert pruner.names == list(select_layers(build_model(preset), ALL_LAYERS)) and pruner.skipped == {}
    assert isinstance(model.embed.rpe.conv, LowRankConv2d) and isinstance(model.embed.stages[0].conv.conv, LowRankConv2d)
    pruner.regularizer(model).backward()  # the group penalty reaches the convolutions' factors too
    assert model.embed.rpe.conv.v.weight.grad.abs().sum() > 0 and model.embed.stages[1].conv.conv.u.weight.grad.abs().sum() > 0
    pruner.step(model)
    pruner.finalize(model)
    report = pruner.report(model)
    stem = "embed.stages.0.conv.conv"
    w = model.embed.stages[0].conv.conv
    assert type(w) is nn.Conv2d and report["layers"][stem]["dense"]
    fan_in, out = w.weight[0].numel(), w.out_channels            # 9 and 32, or 5 and 64
    assert report["skipped"] == {stem: f"kept dense: its factors at rank {fan_in} would hold {fan_in} x ({fan_in} + {out}) = "
                                       f"{fan_in * (fan_in + out)} parameters, at least the dense weight's {fan_in * out}"}
    counts = weight_counts(model)
    assert counts["layers"][stem]["params"] == fan_in * out and counts["layers"][stem]["macs"] == fan_in * out * stage_positions
    for name, positions in (("embed.stages.1.conv.conv", stage_positions), ("embed.rpe.conv", rpe_positions)):
        m = model.get_submodule(name)
        assert isinstance(m, LowRankConv2d) and report["layers"][name]["rank"] == m.rank < 64 and not report["layers"][name]["dense"]
        c_in, kh, kw = m.in_channels, *m.kernel_size
        assert counts["layers"][name]["params"] == m.rank * (c_in * kh * kw + 64) == report["layers"][name]["params"]
        assert counts["layers"][name]["macs"] == m.rank * c_in * kh * kw * positions + 64 * m.rank * positions
        assert counts["layers"][name]["params_dense"] == 64 * c_in * kh * kw
    assert report["block_params_remaining"] <= 0.2 * report["block_params_dense"] and report["block_params_remaining"] > 0.15 * report["block_params_dense"]
    assert counts["params"] < 0.25 * counts["params_dense"]


def test_dsp_factors_the_stem_where_its_rank_shrinks_it_and_refuses_what_cannot_shrink():
    """The rule, not a list: at rank 4 the stem's factors, 4 x (9 + 32) = 164, are smaller than its 288
    weights, so it is factored; a layer that no rank shrinks, or a grouped convolution, is skipped."""
    from stdeploy.prune import ALL_LAYERS
    from stdeploy.prune.dsp import GROUPED_REASON

    torch.manual_seed(0)
    model = build_model("sdt-tiny")
    pruner = make_pruner(PruneConfig(method="dsp", rank=4, layers=ALL_LAYERS))
    pruner.one_shot(model)
    assert isinstance(model.embed.stages[0].conv.conv, LowRankConv2d) and model.embed.stages[0].conv.conv.params == 164
    assert pruner.report(model)["skipped"] == {}
    tiny = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match=r"no selected layer can be factored: 0: .*1 x \(1 \+ 1\) = 2 .*1; 1: a grouped"):
        make_pruner(PruneConfig(method="dsp", rank=1, layers=("0", "1"))).prepare(tiny)
    assert GROUPED_REASON.startswith("a grouped convolution")


def _no_svd(*args, **kwargs):
    raise AssertionError("an SVD ran while rebuilding a checkpoint's structure")


def test_dsp_whole_model_checkpoint_reloads_low_rank_convolutions(tmp_path, trained_sdt, monkeypatch):
    """DSP ``--layers all`` one-shot on the shared trained sdt-tiny, saved and loaded: the factored
    convolutions (stem, stage 1, position embedding) come back from their shapes alone (no SVD of the placeholder weights: the load
    runs with both SVD entry points made to raise) and the loaded model's logits and every LIF's
    spikes equal the pruned model's bit for bit on 16 test digits, every LIF firing."""
    from stdeploy.activity import measure_activity, require_active
    from stdeploy.export.validate import record_neurons
    from stdeploy.models import clone_model, structure
    from stdeploy.prune import ALL_LAYERS

    base, data = trained_sdt
    model = clone_model(base)
    pruner = make_pruner(PruneConfig(method="dsp", param_ratio=0.3, layers=ALL_LAYERS))
    pruner.one_shot(model)
    save_checkpoint(tmp_path / "dsp", model)
    doc = json.loads((tmp_path / "dsp" / "config.json").read_text())
    factored = [n for n, spec in doc["structure"].items() if isinstance(model.get_submodule(n), LowRankConv2d)]
    # at 30% of the trained weights the global budget cuts the stem below 9 dimensions too: all three factored
    assert sorted(factored) == ["embed.rpe.conv", "embed.stages.0.conv.conv", "embed.stages.1.conv.conv"] and pruner.skipped == {}
    assert doc["structure"]["embed.rpe.conv"] == {"type": "lowrank", "rank": model.embed.rpe.conv.rank}
    with monkeypatch.context() as patched:
        patched.setattr(structure, "svd_factors", _no_svd)
        patched.setattr(torch.linalg, "svd", _no_svd)
        with pytest.raises(AssertionError, match="an SVD ran"):   # the patch does catch a factoring
            LowRankConv2d.from_dense(nn.Conv2d(2, 4, 3), rank=2)
        loaded = load_checkpoint(tmp_path / "dsp").model
    for name in factored:
        new, old = loaded.get_submodule(name), model.get_submodule(name)
        assert isinstance(new, LowRankConv2d) and new.rank == old.rank and new.v.weight.shape == old.v.weight.shape
        assert new.u.kernel_size == (1, 1) and new.v.stride == old.v.stride and new.v.padding == old.v.padding
    images = torch.stack([data.test[i][0] for i in range(16)])
    x = direct_encode(images, model.cfg.timesteps)
    model.eval(), loaded.eval()
    require_active(measure_activity(loaded, x).firing_rates, 1e-3, 0.9, what="DSP-all sdt-tiny from its checkpoint")
    with torch.no_grad():
        ref_logits, ref = record_neurons(model, x)
        logits, rec = record_neurons(loaded, x)
    assert torch.equal(logits, ref_logits) and set(rec) == set(ref)
    assert all(torch.equal(rec[n]["spikes"], ref[n]["spikes"]) for n in ref)


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
