"""The one run path (stdeploy.runner), the one tolerance rule, the one timer and the console rules,
on the shared trained and exported sdt-tiny (tests/conftest.py)."""

import copy
import io
import os
import re

import pytest
import torch

from stdeploy import cli, runner, timing
from stdeploy.errors import ConfigError
from stdeploy.targets import base
from stdeploy.tolerance import ONNXRUNTIME, Tolerance


# ----------------------------------------------------------------------------- tolerance
def test_tolerance_rule():
    t = Tolerance(logits_atol=1e-5, max_flip_fraction=1e-3, rounding_limit=1e-4)
    assert t.problems(1000, 0, 5e-6, None) == []
    assert "logits differ by up to 2e-05" in t.problems(1000, 0, 2e-5, None)[0]
    assert t.problems(10_000, 3, 0.5, 1e-6) == []                       # rounding flips: logits may follow them
    assert "flipped at threshold" in t.problems(1000, 3, 0.5, 1e-6)[0]  # too many of them
    assert "not float rounding" in t.problems(10_000, 1, 0.5, 0.3)[0]   # a flip far from threshold
    assert "not float rounding" in t.problems(10_000, 1, 0.5, None)[0]  # unmeasured flips are not excused
    assert Tolerance(spike_mismatches=2).problems(10_000, 2, 0.5, 0.3) == []
    # seen at the output layer only (a run): any flip may be a rounding cascade, bounded by the fraction
    assert t.problems(10_000, 2, 0.5, 0.3, localised=False) == []
    assert "(not localised)" in t.problems(1000, 2, 0.5, 0.3, localised=False)[0]
    q = Tolerance(quantised_spike_agreement=0.9)
    assert q.problems(100, 10, 9.0, None, quantised=True) == []
    assert "below the quantised tolerance" in q.problems(100, 11, 9.0, None, quantised=True)[0]
    assert "declares no tolerance for quantised" in t.problems(100, 0, 0.0, None, quantised=True)[0]
    assert t.problems(0, 0, 0.0, None) == ["no output spikes were compared"]


def test_tolerance_declarations_and_errors():
    legacy = Tolerance.coerce({"spike_mismatches": 0, "logits_atol": 1e-5, "fixed_spike_agreement": 0.89})
    assert legacy.quantised_spike_agreement == 0.89 and legacy["fixed_spike_agreement"] == 0.89 and legacy["logits_atol"] == 1e-5
    with pytest.raises(ConfigError, match=r"unknown tolerance field\(s\) \['atol'\]"):
        Tolerance.coerce({"atol": 1})
    with pytest.raises(ConfigError, match="max_flip_fraction must be a fraction"):
        Tolerance(max_flip_fraction=2)
    with pytest.raises(ConfigError, match="logits_atol must be a number >= 0"):
        Tolerance(logits_atol=-1)
    for name in base.target_names():  # every target declares a tolerance the rule can read, and a default device
        t = base.get_target(name)
        assert isinstance(base.target_tolerance(t), Tolerance)
        assert t.default_device in {"cpu", "loihi2"}
    from stdeploy.export import onnx_export

    # the ONNX export is validated by the rule the onnxruntime target runs by
    assert base.get_target("onnxruntime").tolerance is ONNXRUNTIME
    assert (onnx_export.LOGIT_ATOL, onnx_export.MAX_FLIP_FRACTION) == (ONNXRUNTIME.logits_atol, ONNXRUNTIME.max_flip_fraction)


# ----------------------------------------------------------------------------- timer
def test_one_timer():
    calls = []
    t = timing.time_calls(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and t.repeats == 5 and 0 <= t.min_s <= t.median_s <= t.p90_s
    synced = []
    timing.time_calls(lambda: None, warmup=0, repeats=3, sync=lambda: synced.append(1))
    assert len(synced) == 6  # before and after each timed call
    with pytest.raises(ConfigError, match="repeats >= 1"):
        timing.time_calls(lambda: None, repeats=0)
    assert not hasattr(base, "median_time") and not hasattr(base, "Timer")  # one timer: stdeploy.timing
    with timing.Timer() as tm:
        sum(range(1000))
    assert tm.seconds > 0


# ----------------------------------------------------------------------------- run
def test_run_export_applies_the_target_tolerance(exported_sdt, trained_sdt, one_thread):
    _, data = trained_sdt
    r = runner.run_export(exported_sdt, "onnxruntime", data=data, batch_size=24)  # batches 24, 24, 16
    assert r["ran"] and r["samples"] == 64 and r["device"] == "cpu"
    assert r["within_tolerance"], r["tolerance_problems"]
    assert r["tolerance"] == ONNXRUNTIME.to_dict()
    assert r["spike_mismatches"] == 0 and r["spikes_total"] == 4 * 64 * 16 * 64
    assert r["accuracy"] == r["reference_accuracy"] > 0.5
    assert r["run_seconds"] > 0 and r["compile_seconds"] > 0
    # activity is part of the result: every spiking layer's firing rate on the run's inputs
    from stdeploy.activity import require_active

    assert "head.lif" in r["firing_rates"] and len(r["firing_rates"]) >= 5
    require_active(r["firing_rates"], low=1e-3, high=0.9)
    assert r["silent_layers"] == []


def test_run_export_flags_results_outside_tolerance(exported_sdt, trained_sdt, one_thread):
    model, data = trained_sdt
    ref = runner.load_reference(exported_sdt)
    changed = copy.deepcopy(ref.model)
    with torch.no_grad():
        changed.head.fc.weight.mul_(1.5)  # logits move, every spike still agrees
    other = runner.Reference(ref.export_dir, ref.manifest, changed)
    r = runner.run_export(exported_sdt, "onnxruntime", data=data, limit=16, reference=other)
    assert r["ran"] and r["spike_mismatches"] == 0 and not r["within_tolerance"]
    assert r["tolerance_problems"][0] == f"logits differ by up to {r['logits_max_abs_error']:.3g} (tolerance 1e-05)"
    assert all("logits" in p for p in r["tolerance_problems"])  # the task-level bound may name them too


def test_cli_run_loads_the_reference_once_and_exits_by_tolerance(exported_sdt, monkeypatch, capsys, one_thread):
    loads = []
    real = runner.load_checkpoint
    monkeypatch.setattr(runner, "load_checkpoint", lambda *a, **k: loads.append(a) or real(*a, **k))
    argv = ["run", str(exported_sdt), "--target", "onnxruntime", "--limit", "16", "--quiet"]
    assert cli.main(argv) == 0
    assert len(loads) == 1
    out = capsys.readouterr().out
    assert re.search(r"^tolerance\s+within$", out, re.M) and re.search(r"^samples\s+16$", out, re.M)
    ref = runner.load_reference(exported_sdt)
    broken = copy.deepcopy(ref.model)
    with torch.no_grad():
        broken.head.fc.weight.mul_(-1)
    monkeypatch.setattr(runner, "load_reference", lambda d: runner.Reference(ref.export_dir, ref.manifest, broken))
    assert cli.main(argv) == 1
    assert "EXCEEDED" in capsys.readouterr().out


def test_model_config_comes_from_the_manifest(exported_sdt, trained_sdt, monkeypatch):
    monkeypatch.setattr(runner, "load_checkpoint", lambda *a, **k: pytest.fail("the manifest has the config"))
    assert runner.model_config(exported_sdt) == trained_sdt[0].cfg


def test_cli_run_bad_flags_exit_2(exported_sdt, capsys):
    for flags, message in ((["--limit", "0"], "--limit: must be a positive integer"),
                           (["--batch-size", "0"], "--batch-size: must be a positive integer")):
        with pytest.raises(SystemExit) as stop:  # argparse's usage error: exit status 2, one line naming the flag
            cli.main(["run", str(exported_sdt), "--target", "onnxruntime", "--quiet", *flags])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unavailable_target_says_why(exported_sdt, trained_sdt, monkeypatch):
    from stdeploy.targets.onnxruntime import OnnxRuntimeTarget

    monkeypatch.setattr(OnnxRuntimeTarget, "available", lambda self: (False, "not on this machine"))
    with pytest.raises(base.TargetError, match="target onnxruntime cannot run here: not on this machine"):
        runner.run_export(exported_sdt, "onnxruntime", data=trained_sdt[1])
    assert runner.latency(exported_sdt, "onnxruntime", torch.zeros(4, 2, 1, 8, 8)) == {"skipped": "not on this machine"}


def test_bench_export(exported_sdt, trained_sdt, one_thread):
    images = torch.stack([trained_sdt[1].test[i][0] for i in range(8)])
    res = runner.bench_export(exported_sdt, ["onnxruntime"], images, warmup=1, repeats=2)
    assert set(res) == {"pytorch", "onnxruntime"}
    for row in res.values():
        assert row["batch"] == 8 and row["repeats"] == 2 and row["median_s"] > 0
    assert res["pytorch"]["layers"] and res["onnxruntime"]["compile_seconds"] > 0


# ----------------------------------------------------------------------------- console
def test_progress_only_on_a_terminal():
    from stdeploy.console import show_progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert show_progress(True, Tty()) and not show_progress(False, Tty()) and not show_progress(True, io.StringIO())


def test_native_warnings_said_once(capfd):
    from stdeploy import console

    key = "Fast mode segfaults when there are out-of-bounds indices"
    console._said.discard(key)
    for _ in range(2):
        with console.native_notes():
            for _ in range(3):
                os.write(2, f"[12:00:00] transform.h:123: Warning: {key}. Make sure input indices are in bound\n".encode())
            os.write(2, b"an unknown native line\n")
    err = capfd.readouterr().err
    assert err.count("an unknown native line") == 2
    assert err.count(key) == 1 and "warned 3x" in err and "needs no action" in err
