"""Recipes (models/recipes/*.toml): every file loads and builds the model it promises, and trains
end to end through the CLI on a tiny synthetic folder in the real on-disk format, shrunk with
``--set`` overrides; the learning-rate schedule, mixing, DVS binning and recipe validation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stdeploy import cli
from stdeploy.checkpoint import TRAIN_STATE, load_checkpoint
from stdeploy.data import DataSplit, events_to_frames, load_dataset
from stdeploy.errors import ConfigError, DataError
from stdeploy.models import PRESETS, build_model, direct_encode
from stdeploy.recipes import RECIPE_DIR, load_recipe, parse_set
from stdeploy.synthetic import write_cifar10, write_cifar100, write_dvs
from stdeploy.train import TrainConfig, count_params, lr_schedule, mix_batch, train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(RECIPE_DIR.glob("*.toml"))

# Parameter counts each recipe's comment block promises (and README's preset table).
EXPECTED_PARAMS = {
    "cifar10-spikformer-4-384": 9_310_906,
    "cifar100-spikformer-4-384": 9_345_556,
    "cifar10-sdt-8-512": 29_156_938,
    "cifar10dvs-sdt": 2_563_594,
}

# Shrinks any recipe's model to seconds per step; image size 16 keeps 2x2 tokens after the pools.
TINY = ["--set", "model.embed_dim=16", "--set", "model.depth=1", "--set", "model.heads=2",
        "--set", "model.embed_stages=2", "--set", "model.embed_pools=2", "--set", "data.image_size=8"]
TINY_DVS = TINY[:-2] + ["--set", "data.image_size=16", "--set", "data.timesteps=3", "--set", "data.test_fraction=0.5"]


# ----------------------------------------------------------------------------- tiny data folders
def tiny_data(recipe_path: Path, root: Path) -> tuple[Path, list[str]]:
    """A folder of the recipe's data set and the overrides that shrink its model (3 training
    batches of 4, so ``--max-steps 2`` stops inside the first epoch)."""
    name = load_recipe(recipe_path).data.name
    if name == "cifar10":
        return write_cifar10(root / "cifar-10-batches-bin"), TINY
    if name == "cifar100":
        return write_cifar100(root / "cifar-100-binary"), TINY
    if name == "dvs":
        return write_dvs(root / "events_np", per_class=6), TINY_DVS
    raise AssertionError(f"no tiny data writer for {name}")


def run_cli(capsys, *argv) -> dict:
    code = cli.main([*argv, "--json", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- recipe files
def test_every_recipe_has_an_expected_size():
    assert RECIPES and {p.stem for p in RECIPES} == set(EXPECTED_PARAMS)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads_and_builds_its_model(path):
    recipe = load_recipe(path)
    params = count_params(build_model(recipe.model))
    assert params == EXPECTED_PARAMS[path.stem]
    if recipe.preset is not None:  # the preset itself, up to the head's class count
        preset = PRESETS[recipe.preset].replace(num_classes=recipe.model.num_classes)
        assert recipe.model == preset.replace(timesteps=recipe.model.timesteps, image_size=recipe.model.image_size)
        assert params == count_params(build_model(preset))
    assert recipe.model.timesteps == recipe.data.timesteps and recipe.model.image_size == recipe.data.image_size
    assert "Expected time per epoch" in path.read_text() and "measured on one NVIDIA H200" in path.read_text()
    assert recipe.train.warmup_epochs > 0 and recipe.train.label_smoothing == 0.1 and recipe.augmentation.augment


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_end_to_end_through_the_cli(path, tmp_path, capsys):
    data_root, tiny = tiny_data(path, tmp_path / "data")
    out = tmp_path / "run"
    result = run_cli(capsys, "train", "--recipe", str(path), "--data-root", str(data_root), *tiny,
                     "--batch-size", "4", "--max-steps", "2", "--device", "cpu", "--out", str(out))
    assert result["steps"] == 2 and result["recipe"] == str(path) and result["world_size"] == 1
    ckpt = load_checkpoint(out)
    recipe = load_recipe(path)
    assert ckpt.model.cfg.embed_dim == 16 and ckpt.model.cfg.family == recipe.model.family
    assert ckpt.meta["recipe"]["source"] == str(path) and ckpt.meta["recipe"]["overrides"]["train.batch_size"] == 4
    saved = ckpt.meta["train"]
    assert (saved["lr"], saved["warmup_epochs"], saved["label_smoothing"], saved["mixup_alpha"]) == \
        (recipe.train.lr, recipe.train.warmup_epochs, recipe.train.label_smoothing, recipe.train.mixup_alpha)
    assert ckpt.meta["history"][-1]["steps"] == 2
    assert not (out / TRAIN_STATE).exists()  # cut inside an epoch: loads, but does not claim to resume
    x = torch.rand(2, *(() if recipe.data.name != "dvs" else (3,)), ckpt.model.cfg.in_channels, ckpt.model.cfg.image_size,
                   ckpt.model.cfg.image_size)
    assert ckpt.model.eval()(direct_encode(x, ckpt.model.cfg.timesteps)).shape == (2, ckpt.model.cfg.num_classes)


def test_prune_uses_the_recipes_finetune_settings(tmp_path, capsys):
    path = RECIPE_DIR / "cifar10-spikformer-4-384.toml"
    data_root = write_cifar10(tmp_path / "c10")
    run_cli(capsys, "train", "--recipe", str(path), "--data-root", str(data_root), *TINY, "--batch-size", "4",
            "--max-steps", "1", "--device", "cpu", "--out", str(tmp_path / "dense"))
    report = run_cli(capsys, "prune", str(tmp_path / "dense"), "--recipe", str(path), "--data-root", str(data_root),
                     "--set", "data.image_size=8", "--epochs", "1", "--penalty-epochs", "0", "--sparsity", "0.5",
                     "--device", "cpu", "--out", str(tmp_path / "pruned"))
    used = report["compensation_config"]
    recipe = load_recipe(path)
    assert used["epochs"] == 1 and used["lr"] == recipe.finetune.train.lr == 5e-5       # flag, then [finetune]
    assert used["batch_size"] == recipe.train.batch_size                                  # inherited from [train]
    assert used["base"]["warmup_epochs"] == 1 and used["base"]["label_smoothing"] == 0.1
    assert used["base"]["weight_decay"] == recipe.train.weight_decay and used["base"]["mixup_alpha"] == 0
    assert load_checkpoint(tmp_path / "pruned").meta["prune_recipe"]["source"] == str(path)
    # the recipe's data size must match the checkpoint's, and the message says how to fix it
    code = cli.main(["prune", str(tmp_path / "dense"), "--recipe", str(path), "--data-root", str(data_root), "--json"])
    assert code == 2 and "--set data.image_size=8" in capsys.readouterr().err


# ----------------------------------------------------------------------------- validation
def _write_recipe(tmp_path, replace: tuple[str, str] | None = None, append: str = "") -> Path:
    text = (RECIPE_DIR / "cifar10-sdt-8-512.toml").read_text()
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    path = tmp_path / "bad.toml"
    path.write_text(text + append)
    return path


@pytest.mark.parametrize("replace, append, words", [
    (("lr = 3e-4", "lrr = 3e-4"), "", ["[train] lrr", "unknown key"]),
    (("epochs = 300", "epochs = 300.5"), "", ["[train] epochs", "expected int"]),
    (("lr = 3e-4", "lr = -3e-4"), "", ["[train]", "lr must be > 0"]),
    (None, "\n[data2]\nx = 1\n", ["data2", "known tables"]),
    (('preset = "sdt-8-512"', 'preset = "sdt-8-512"\nheads = 7'), "", ["[model]", "heads 7"]),
    (('preset = "sdt-8-512"', 'preset = "sdt-8-512"\ntimesteps = 8'), "", ["[model] timesteps = 8", "[data] timesteps = 4"]),
    (('name = "cifar10"', 'name = "cifar10"\nbinning = "count"'), "", ["[data]", "dvs only"]),
    (("augment = true", "augment = \"yes\""), "", ["[train] augment", "expected bool"]),
    (("penalty_epochs = 5", "penalty_epochs = 5\nseed = 1"), "", ["[finetune] seed", "unknown key"]),
])
def test_bad_recipe_names_file_and_key(tmp_path, replace, append, words):
    path = _write_recipe(tmp_path, replace, append)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert str(path) in message and all(w in message for w in words), message


def test_bad_recipe_through_the_cli_is_one_line(tmp_path, capsys):
    path = _write_recipe(tmp_path, ("weight_decay = 6e-2", "weight_decay = 6e-2\nwarmup = 3"))
    assert cli.main(["train", "--recipe", str(path), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "[train] warmup" in err


def test_command_line_overrides_recipe_values():
    path = RECIPE_DIR / "cifar10-spikformer-4-384.toml"
    overrides = parse_set(["train.mixup_alpha=0", "model.depth=2", "data.timesteps=2", "train.schedule=constant"])
    recipe = load_recipe(path, overrides)
    assert (recipe.train.mixup_alpha, recipe.model.depth, recipe.model.timesteps, recipe.train.schedule) == (0, 2, 2, "constant")
    assert recipe.train.lr == 5e-4 and recipe.model.embed_dim == 384      # untouched values stay
    with pytest.raises(ConfigError, match=r"--set train.lr=fast: \[train\] lr: expected float"):
        load_recipe(path, parse_set(["train.lr=fast"]))
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        parse_set(["lr=1"])
    assert load_recipe(path, model="sdt-tiny").model.family == "sdt"      # --model replaces [model]


def test_preset_may_be_a_model_file_next_to_the_recipe(tmp_path):
    (tmp_path / "mine.toml").write_text((ROOT / "models" / "sdt-tiny.toml").read_text())
    path = tmp_path / "r.toml"
    path.write_text('[model]\npreset = "mine.toml"\ndepth = 2\n\n[data]\nname = "digits"\n')
    recipe = load_recipe(path)
    assert recipe.model == PRESETS["sdt-tiny"].replace(depth=2)
    path.write_text('[model]\npreset = "nope"\n\n[data]\nname = "digits"\n')
    with pytest.raises(ConfigError, match=r"r.toml: \[model\] preset: unknown model 'nope'"):
        load_recipe(path)


# ----------------------------------------------------------------------------- schedule and mixing
def test_warmup_then_cosine_lr_values():
    f = lr_schedule(total_steps=100, warmup_steps=10, floor=0.01, warmup_start=0.1)
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.55) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5)          # half way through the cosine
    assert f(100) == pytest.approx(0.01) and f(150) == pytest.approx(0.01)
    plain = lr_schedule(100, 0, 0.01)                          # no warmup: the old cosine exactly
    assert [plain(s) for s in (0, 37, 100)] == [1.0, 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.37)), 0.01]
    const = lr_schedule(100, 10, 0.01, "constant")
    assert const(0) == 0.0 and const(10) == const(99) == 1.0


def test_train_follows_the_schedule(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.utils.data.TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))  # noqa: E731
    data = DataSplit("synthetic", images(64), images(16), num_classes=10, in_channels=1, image_size=8, timesteps=None)
    cfg = TrainConfig(epochs=4, batch_size=16, lr=1e-3, warmup_epochs=1.5, warmup_start_ratio=0.1, min_lr_ratio=0.05,
                      label_smoothing=0.1, mixup_alpha=0.5, cutmix_alpha=1.0, mix_off_epoch=3)
    result = train(build_model("sdt-tiny"), data, cfg, tmp_path / "run", progress=False)
    f = lr_schedule(16, 6, 0.05, "cosine", 0.1)               # 4 steps per epoch, warmup 1.5 epochs = 6 steps
    assert [r["lr"] for r in result.history] == pytest.approx([1e-3 * f(4 * (e + 1)) for e in range(4)])
    assert result.steps == 16 and (tmp_path / "run" / TRAIN_STATE).exists()


def test_mix_batch_mixup_and_cutmix():
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    mixed, target = mix_batch(x, y, 5, TrainConfig(mixup_alpha=0.5), np.random.default_rng(0))
    lam = float(target[0, 0])
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0)) and torch.allclose(target.sum(1), torch.ones(4))
    assert float(target[0, 3]) == pytest.approx(1 - lam, abs=1e-6)
    frames = torch.rand(4, 2, 2, 8, 8)                          # (B, T, C, H, W) event frames
    mixed, target = mix_batch(frames, y, 5, TrainConfig(cutmix_alpha=1.0), np.random.default_rng(1))
    pasted = (mixed != frames).any(dim=(1, 2))[0]               # (H, W) pixels taken from the partner
    assert float(target[0, 0]) == pytest.approx(1 - pasted.float().mean().item(), abs=1e-6)
    assert torch.equal(mixed[0][..., pasted], frames[3][..., pasted])
    same, onehot = mix_batch(x, y, 5, TrainConfig(mixup_alpha=0.5, mix_prob=0.0), np.random.default_rng(0))
    assert same is x and torch.equal(onehot.argmax(1), y)


# ----------------------------------------------------------------------------- DVS additions
def test_count_binning_matches_spikingjelly_split_by_number(tmp_path):
    t = np.array([5, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11], dtype=np.int64)   # 11 events, one out of order
    path = tmp_path / "r.npz"
    np.savez(path, t=t, x=np.arange(11) % 4, y=np.zeros(11, np.int64), p=np.ones(11, np.int64), sensor_size=np.array([4, 4]))
    frames = events_to_frames(path, 3, 4, binning="count")
    # time order: t = 1..11; 11 // 3 = 3 events in frames 0 and 1, the last frame takes 5
    assert frames.sum(dim=(1, 2, 3)).tolist() == [3, 3, 5]
    order = np.argsort(t, kind="stable")
    expected = torch.zeros(3, 2, 4, 4)
    for rank, i in enumerate(order):
        expected[min(rank // 3, 2), 1, 0, (np.arange(11) % 4)[i]] += 1
    assert torch.equal(frames, expected)
    assert events_to_frames(path, 3, 4).sum(dim=(1, 2, 3)).tolist() != [3, 3, 5]  # time binning differs


def test_dvs_split_by_fraction_and_roll(tmp_path):
    root = write_dvs(tmp_path / "events_np", classes=2, per_class=10)
    split = load_dataset("dvs", root, image_size=16, timesteps=2, test_fraction=0.1, augment=True, roll=3, seed=5)
    assert (len(split.train), len(split.test), split.classes) == (18, 2, ("class0", "class1"))
    assert [p.name for p, _ in split.test.samples] == ["cifar10_class0_9.npz", "cifar10_class1_9.npz"]
    plain = load_dataset("dvs", root, image_size=16, timesteps=2, test_fraction=0.1)
    shifted, base = split.train[0][0], plain.train[0][0]
    candidates = [torch.roll(b, (dy, dx), (-2, -1)) for b in (base, base.flip(-1))
                  for dy in range(-3, 4) for dx in range(-3, 4)]
    assert any(torch.equal(shifted, c) for c in candidates)
    with pytest.raises(DataError, match="needs augment=True"):
        load_dataset("dvs", root, test_fraction=0.1, roll=2)
    with pytest.raises(DataError, match="dvs recordings only"):
        load_dataset("cifar10", root, binning="count")


# ----------------------------------------------------------------------------- several processes
@pytest.mark.slow
def test_recipe_under_torchrun_two_processes_on_cpu(tmp_path):
    path = RECIPE_DIR / "cifar10-sdt-8-512.toml"
    data_root = write_cifar10(tmp_path / "c10", train=20)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # each rank's stdout goes to its own file (--redirects); only rank 0 prints the JSON line
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(tmp_path / "logs"), "--redirects", "1", "-m", "stdeploy.cli",
           "train", "--recipe", str(path), "--data-root", str(data_root), *TINY, "--batch-size", "2", "--max-steps", "2",
           "--out", str(tmp_path / "ddp"), "--json", "--quiet", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = sorted((tmp_path / "logs").rglob("stdout.log"))
    lines = [line for log in logs for line in log.read_text().splitlines() if line.startswith("{")]
    assert len(logs) == 2 and len(lines) == 1
    result = json.loads(lines[0])
    assert result["world_size"] == 2 and result["steps"] == 2
    assert load_checkpoint(tmp_path / "ddp").meta["recipe"]["source"] == str(path)
