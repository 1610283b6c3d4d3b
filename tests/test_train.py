import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stdeploy.checkpoint import load_checkpoint
from stdeploy.errors import ConfigError
from stdeploy.models import build_model
from stdeploy.neurons import SLIF
from stdeploy.train import TrainConfig, param_groups, train

ROOT = Path(__file__).resolve().parents[1]


def test_training_learns_and_checkpoints(tmp_path, digits_subset):
    torch.manual_seed(0)
    model = build_model("sdt-tiny")
    result = train(model, digits_subset(256, 128), TrainConfig(epochs=3, batch_size=16), tmp_path / "run", progress=False)
    assert result.test_accuracy > 0.3  # chance is 0.1
    assert len(result.history) == 3 and result.params == sum(p.numel() for p in model.parameters())
    loaded = load_checkpoint(tmp_path / "run")
    x = torch.rand(4, 3, 1, 8, 8)
    assert torch.equal(loaded.model.eval()(x), model.eval()(x))
    assert loaded.meta["history"][-1]["test_accuracy"] == result.test_accuracy


def test_resume_reaches_the_same_weights(tmp_path, digits_subset):
    data = digits_subset(256, 128)
    cfg = TrainConfig(epochs=2, batch_size=32, seed=3)
    full = build_model("spikformer-tiny")
    torch.manual_seed(0)
    full.load_state_dict(build_model("spikformer-tiny").state_dict())
    init = {k: v.clone() for k, v in full.state_dict().items()}
    train(full, data, cfg, tmp_path / "full", progress=False)

    part = build_model("spikformer-tiny")
    part.load_state_dict(init)
    train(part, data, TrainConfig(epochs=1, batch_size=32, seed=3), tmp_path / "part", progress=False)
    # The cosine schedule depends on the total epochs: the killed run was planned for 2 epochs.
    # Simulate the kill by training 1 of 2 planned epochs: rewrite the state written after epoch 1.
    part2 = build_model("spikformer-tiny")
    part2.load_state_dict(init)
    stopper = _StopAfter(1)
    with pytest.raises(_Stop):
        train(part2, data, cfg, tmp_path / "killed", progress=False, on_step=stopper)
    resumed = build_model("spikformer-tiny")
    train(resumed, data, cfg, tmp_path / "killed", resume=True, progress=False)
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Stop(Exception):
    pass


class _StopAfter:
    """Raise at the first step of epoch ``n + 1`` (after epoch n's checkpoint is written)."""

    def __init__(self, epochs_done):
        self.epochs_done = epochs_done

    def __call__(self, step, total):
        steps_per_epoch = total // 2
        if step == self.epochs_done * steps_per_epoch + 1:
            raise _Stop


def test_slif_gets_its_own_learning_rate():
    model = build_model("sdt-tiny", neuron="slif")
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(lr=1e-3, intrinsic_lr_scale=20))}
    assert groups["intrinsic"]["lr"] == pytest.approx(2e-2) and groups["intrinsic"]["weight_decay"] == 0
    n_intrinsic = sum(len(m.intrinsic_parameters()) for m in model.modules() if isinstance(m, SLIF))
    assert len(groups["intrinsic"]["params"]) == n_intrinsic > 0


def test_bad_train_config(digits_subset):
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=-1)
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="workers must be an integer >= 0"):
        TrainConfig(workers=-2)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            train(build_model("sdt-tiny"), digits_subset(256, 128), TrainConfig(epochs=1, device="cuda"), progress=False)


def _cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "stdeploy.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_cli_train_json_and_errors(tmp_path):
    r = _cli("train", "--epochs", "2", "--out", str(tmp_path / "c"), "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"test_accuracy", "epochs", "params", "checkpoint", "seconds"} <= out.keys()
    assert out["epochs"] == 2 and out["test_accuracy"] > 0.3 and Path(out["checkpoint"]).is_dir()
    bad = _cli("train", "--model", "nope", "--json")
    assert bad.returncode == 2 and "unknown model 'nope'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = _cli("train", "--data", "cifar10", "--data-root", str(tmp_path / "nothing"), "--json")
    assert bad.returncode == 2 and "nothing" in bad.stderr


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "stdeploy.cli",
           "train", "--epochs", "2", "--batch-size", "32", "--out", str(tmp_path / "ddp"), "--json", "--quiet", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["world_size"] == 2  # rank 0 alone prints its JSON line
    ck = load_checkpoint(tmp_path / "ddp")
    assert ck.meta["history"][-1]["test_accuracy"] > 0.3
