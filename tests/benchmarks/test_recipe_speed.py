"""benchmarks/recipe_speed.py on the CPU: one CIFAR recipe and the DVS recipe shrunk with the
overrides of tests/test_recipes.py, 2 warm-up + 2 timed steps on small synthetic folders."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "recipe_speed.py"

# tests/test_recipes.py TINY / TINY_DVS: seconds per step, image size 16 keeps 2x2 tokens after the pools
TINY = ["--set", "model.embed_dim=16", "--set", "model.depth=1", "--set", "model.heads=2",
        "--set", "model.embed_stages=2", "--set", "model.embed_pools=2"]
TINY_DVS = TINY + ["--set", "data.image_size=16", "--set", "data.timesteps=3", "--set", "data.test_fraction=0.5"]
SMALL = ["--device", "cpu", "--warmup", "2", "--steps", "2", "--set", "train.batch_size=4", "--eval-images", "16",
         "--dvs-eval-images", "8", "--dvs-events", "600", "--cifar-train", "40", "--cifar-test", "16", "--load-batches", "2"]


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("recipe_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def check_run(run: dict, epochs: int) -> None:
    assert run["status"] == "ok", run
    assert run["timed_steps"] == 2 and run["steps_done"] == 4 and len(run["step_s_all"]) == 3
    assert run["step_median_s"] > 0 and run["step_p90_s"] >= run["step_median_s"] > 0
    assert run["steps_per_epoch"] == math.ceil(run["real_train"] / 4)
    assert run["epoch_train_s"] == pytest.approx(run["steps_per_epoch"] * run["step_median_s"])
    assert run["epoch_s"] == pytest.approx(run["epoch_train_s"] + run["real_test"] / run["eval_images_per_s"])
    assert run["run_hours"] == pytest.approx(run["epoch_s"] * epochs / 3600)
    assert run["eval_images_per_s"] > 0 and run["load_batch_s"] > 0 and run["params"] > 0
    assert run["amp_dtype"] == "fp32" and "peak_allocated_gib" not in run   # CPU


def test_cifar_and_dvs_recipes_on_cpu(speed, tmp_path, capsys):
    out = tmp_path / "speed.json"
    code = speed.main(["--recipes", "cifar10-spikformer-4-384", *SMALL, *TINY, "--set", "data.image_size=8",
                       "--out", str(out)])
    assert code == 0
    code = speed.main(["--recipes", "cifar10dvs-sdt", *SMALL, *TINY_DVS, "--out", str(tmp_path / "dvs.json")])
    assert code == 0
    cifar, dvs = (json.loads(p.read_text()) for p in (out, tmp_path / "dvs.json"))
    assert cifar["finished"] and [r["recipe"] for r in cifar["runs"]] == ["cifar10-spikformer-4-384"]
    check_run(cifar["runs"][0], 300)
    assert (cifar["runs"][0]["real_train"], cifar["runs"][0]["real_test"]) == (50_000, 10_000)
    check_run(dvs["runs"][0], 200)
    assert (dvs["runs"][0]["real_train"], dvs["runs"][0]["real_test"]) == (5_000, 5_000)  # test_fraction 0.5
    assert dvs["runs"][0]["timesteps"] == 3 and dvs["runs"][0]["synthetic"]["events"] == 600
    table = (tmp_path / "dvs.md").read_text()
    assert "| cifar10dvs-sdt | on (fp32) | ok |" in table and "cifar10dvs-sdt" in capsys.readouterr().out


def test_failures_are_recorded_and_bad_paths_rejected(speed, tmp_path, capsys):
    out = tmp_path / "bad.json"
    assert speed.main(["--recipes", "no-such-recipe.toml", "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "recipe file not found: no-such-recipe.toml" in err and "cifar10-sdt-8-512" in err and not out.exists()
    # a recipe that fails to build is recorded with its error; all failing -> exit status 1
    code = speed.main(["--recipes", "cifar10-sdt-8-512", *SMALL, "--set", "model.heads=7", "--out", str(out)])
    assert code == 1
    run = json.loads(out.read_text())["runs"][0]
    assert run["status"] == "error" and "heads" in run["error"]
    # an exhausted time budget skips what is left
    assert speed.main(["--recipes", "cifar10-sdt-8-512", *SMALL, "--time-limit", "0", "--out", str(out)]) == 1
    assert json.loads(out.read_text())["runs"][0]["status"] == "skipped"


def test_a_failing_phase_keeps_what_was_measured(speed, tmp_path, monkeypatch):
    args = ["--recipes", "cifar10-spikformer-4-384", *SMALL, *TINY, "--set", "data.image_size=8"]

    def broken_eval(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(speed, "time_eval", broken_eval)
    assert speed.main([*args, "--out", str(tmp_path / "eval.json")]) == 0
    run = json.loads((tmp_path / "eval.json").read_text())["runs"][0]
    assert run["status"] == "ok" and run["step_median_s"] > 0 and "epoch_s" not in run
    assert run["eval_error"].startswith("RuntimeError: CUDA out of memory")
    assert "CUDA out of memory" in (tmp_path / "eval.md").read_text()

    def broken_train(*a, **k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(speed, "train", broken_train)
    assert speed.main([*args, "--amp", "both", "--out", str(tmp_path / "train.json")]) == 1
    runs = json.loads((tmp_path / "train.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["error", "error"] and [r["amp"] for r in runs] == [True, False]
    assert runs[0]["params"] > 0 and runs[0]["error"] == "RuntimeError: CUDA out of memory"
