"""The pruning defaults the compression study relies on: BatchNorm is recalibrated after pruning
(library and CLI), sLIF threshold and leak train in their own optimizer group at lr x 20 without
weight decay, and the default compensation learns both threshold and leak."""

import json

import pytest
import torch

import stdeploy.train as train_module
from stdeploy import cli
from stdeploy.checkpoint import load_checkpoint, save_checkpoint
from stdeploy.models import build_model
from stdeploy.neurons import SLIF, neurons_of, to_slif
from stdeploy.prune import CompensationConfig, PruneConfig, prune_model
from stdeploy.train import TrainConfig, train


def test_compensation_config_defaults():
    c = CompensationConfig()
    assert c.recalibrate_bn is True
    assert (c.neuron, c.learn_threshold, c.learn_leak) == ("slif", True, False)  # the study: learning the leak did not help
    assert c.intrinsic_lr_scale == 20.0 and c.train_config(3).intrinsic_lr_scale == 20.0 and c.train_config(3).lr == c.lr
    assert TrainConfig().intrinsic_lr_scale == 20.0


def test_cli_prune_defaults_match_the_library():
    args = cli.build_parser().parse_args(["prune", "some/checkpoint"])
    assert args.no_bn_recalibration is False
    assert args.compensate == CompensationConfig().neuron == "slif"
    assert set(args.slif_learn.split(",")) == {"threshold"}


def _bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


@pytest.mark.parametrize("flags, recalibrated", [([], True), (["--no-bn-recalibration"], False)])
def test_cli_prune_recalibrates_bn_by_default(tmp_path, capsys, flags, recalibrated):
    torch.manual_seed(0)
    dense = build_model("sdt-tiny")
    save_checkpoint(tmp_path / "dense", dense)
    argv = ["prune", str(tmp_path / "dense"), "--method", "l1p", "--sparsity", "0.9", "--penalty-epochs", "0", "--epochs", "0",
            "--compensate", "none", "--out", str(tmp_path / "pruned"), "--json", "--quiet", *flags]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ("after_bn_recalibration" in report["accuracy"]) is recalibrated
    ccfg = report["compensation_config"]
    assert ccfg["recalibrate_bn"] is recalibrated
    assert (ccfg["learn_threshold"], ccfg["learn_leak"], ccfg["intrinsic_lr_scale"]) == (True, False, 20.0)
    before, after = _bn_stats(dense), _bn_stats(load_checkpoint(tmp_path / "pruned").model)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before) is recalibrated


@pytest.mark.parametrize("learn_threshold, learn_leak", [(True, True), (True, False), (False, True)])
def test_intrinsic_parameters_get_their_own_group(monkeypatch, learn_threshold, learn_leak, digits_subset):
    torch.manual_seed(0)
    model = to_slif(build_model("sdt-tiny"), learn_threshold=learn_threshold, learn_leak=learn_leak)
    seen = []
    real = train_module.param_groups

    def capture(m, cfg):
        groups = real(m, cfg)
        seen.append([{**g, "params": list(g["params"])} for g in groups])
        return groups

    monkeypatch.setattr(train_module, "param_groups", capture)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-3, weight_decay=0.05)
    train(model, digits_subset(128, 64), cfg, progress=False)
    (groups,) = seen
    by_name = {g["name"]: g for g in groups}
    intrinsic = by_name["intrinsic"]
    assert intrinsic["lr"] == pytest.approx(1e-3 * 20) and intrinsic["weight_decay"] == 0.0
    assert by_name["weights"]["lr"] == 1e-3 and by_name["weights"]["weight_decay"] == 0.05
    slifs = [n for n in neurons_of(model).values() if isinstance(n, SLIF)]
    expected = {id(n.threshold_log_scale) for n in slifs if learn_threshold} | {id(n.leak_log_exponent) for n in slifs if learn_leak}
    assert {id(p) for p in intrinsic["params"]} == expected
    others = {id(p) for g in groups if g["name"] != "intrinsic" for p in g["params"]}
    assert not others & {id(p) for n in slifs for p in (n.threshold_log_scale, n.leak_log_exponent)}


def test_default_compensation_learns_thresholds_not_leaks(digits_subset):
    torch.manual_seed(0)
    data = digits_subset(128, 64)
    model = build_model("sdt-tiny")
    model, report = prune_model(model, data, PruneConfig(method="l1p", sparsity=0.5), CompensationConfig(epochs=1, penalty_epochs=0),
                                progress=False)
    assert "after_bn_recalibration" in report["accuracy"]
    slifs = list(neurons_of(model).values())
    assert slifs and all(isinstance(n, SLIF) for n in slifs) and model.cfg.neuron == "slif"
    assert all(n.threshold_log_scale.requires_grad and not n.leak_log_exponent.requires_grad for n in slifs)
    assert any(bool(n.threshold_log_scale.detach().abs().gt(0).any()) for n in slifs)  # thresholds moved
    assert not any(bool(n.leak_log_exponent.detach().abs().gt(0).any()) for n in slifs)  # leaks stayed at tau
