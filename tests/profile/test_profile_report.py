import json
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from stdeploy.data import load_dataset
from stdeploy.errors import ConfigError
from stdeploy.export.directory import export_model
from stdeploy.models import build_model
from stdeploy.profile.latency import measure
from stdeploy.profile.report import validate_report, write_report
from stdeploy.runner import profile_exports
from stdeploy.prune import PruneConfig, make_pruner


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("exports")
    dense = build_model("sdt-tiny")
    from stdeploy.activity import estimate_batchnorm
    from stdeploy.models import direct_encode

    # BatchNorm statistics estimated layer by layer so that every LIF fires (checked in the test)
    estimate_batchnorm(dense, [direct_encode(torch.rand(16, 1, 8, 8), 4) for _ in range(8)], gain=1.5)
    pruned = build_model("sdt-tiny").eval()
    pruned.load_state_dict(dense.state_dict())
    p = make_pruner(PruneConfig(method="l1p", sparsity=0.9))
    p.prepare(pruned)
    p.step(pruned)
    p.finalize(pruned)
    export_model(dense, root / "dense", ("onnx",))
    export_model(pruned, root / "l1p", ("onnx",))
    return [root / "dense", root / "l1p"]


def test_report_counts_fewer_sops_for_pruned_and_writes_png(exports, tmp_path):
    report = profile_exports(exports, load_dataset("digits"), ["onnxruntime"], ["cpu", "loihi2"], batch=8, repeats=2, samples=32)
    dense, l1p = report["variants"]
    from stdeploy.activity import require_active

    require_active(dense["firing_rates"], low=0.01, high=0.5)
    assert l1p["counts"]["sops"] < dense["counts"]["sops"]
    # params counts every entry (zeros too): equal; nonzero params and their bytes drop with pruning
    assert l1p["params"] == dense["params"] and l1p["nonzero_params"] < dense["nonzero_params"]
    pruned_away = dense["block_nonzeros"] - l1p["block_nonzeros"]
    assert dense["nonzero_params"] - l1p["nonzero_params"] == pytest.approx(pruned_away, rel=0.02)
    assert l1p["nonzero_param_bytes"] == 4 * l1p["nonzero_params"]
    assert report["counting"]["direct_input"] == "once"
    assert dense["energy"]["loihi2"]["neuron_updates"] == "active" and dense["energy"]["cpu"]["label"] == "45 nm"
    assert 0 < dense["counts"]["active_neuron_updates"] < dense["counts"]["neuron_updates"]
    assert l1p["energy"]["cpu"]["joules_per_sample"] < dense["energy"]["cpu"]["joules_per_sample"]
    assert l1p["block_nonzeros"] == 49152 - round(0.9 * 49152)
    assert dense["latency"]["onnxruntime"]["median_s"] > 0
    paths = write_report(report, tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| E 45 nm (uJ) | E Loihi (uJ) |" in md and "E cpu" not in md
    assert "| params | nonzero params | param KB |" in md and "- **nonzero params**:" in md
    for png in paths["plots"]:
        head = open(png, "rb").read(24)
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = struct.unpack(">II", head[16:24])
        assert w > 100 and h > 100
    validate_report(json.loads((tmp_path / "rep" / "report.json").read_text()))
    bad = json.loads((tmp_path / "rep" / "report.json").read_text())
    del bad["variants"][0]["counts"]
    with pytest.raises(ConfigError, match="schema"):
        validate_report(bad)


def test_latency_measure_and_errors():
    calls = []
    r = measure(lambda x: calls.append(1), torch.zeros(4, 8, 1).numpy(), warmup=2, repeats=5)
    assert len(calls) == 7 and r["batch"] == 8 and r["timesteps"] == 4 and r["p90_s"] >= r["min_s"]
    assert r["samples_per_s"] == pytest.approx(8 / r["median_s"])
    with pytest.raises(ConfigError):
        measure(lambda x: None, torch.zeros(4, 8, 1).numpy(), repeats=0)


def test_cli_bench_json(exports):
    r = subprocess.run([sys.executable, "-m", "stdeploy.cli", "bench", str(exports[0]), "--targets", "onnxruntime",
                        "--repeats", "3", "--batch", "8", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["results"]["onnxruntime"]["median_s"] > 0 and out["results"]["pytorch"]["samples_per_s"] > 0


def test_power_integration_and_gpu_energy_refusal(exports):
    from stdeploy.profile.gpu_power import integrate, nvml_available

    # 2 s at a constant 50 W, then a linear ramp 50 -> 150 W over 1 s: 100 J + 100 J
    assert integrate([(0.0, 50.0), (2.0, 50.0), (3.0, 150.0)]) == pytest.approx(200.0)
    assert integrate([(1.0, 30.0)]) == 0.0
    ok, why = nvml_available()
    if not ok:  # no GPU here: asking for measured GPU energy is a clear error, not a silent estimate
        r = subprocess.run([sys.executable, "-m", "stdeploy.cli", "bench", str(exports[0]), "--targets", "onnxruntime",
                            "--gpu-energy", "--repeats", "2"], capture_output=True, text=True)
        assert r.returncode == 2 and "cannot measure GPU power here" in r.stderr


def test_measured_energy_runs_long_enough_and_subtracts_idle(monkeypatch):
    """NVML averages power over ~0.1 s: the window is stretched to min_seconds, and the idle draw
    measured first is subtracted for the dynamic figure (NVML faked: 60 W idle, 160 W busy)."""
    import types

    from stdeploy.profile import gpu_power

    busy = {"on": False}
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: i,
                                 nvmlDeviceGetPowerUsage=lambda h: 160_000 if busy["on"] else 60_000)
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    def run(x):
        busy["on"] = True
        time.sleep(0.01)

    e = gpu_power.measure_energy(run, np.zeros((4, 8, 1)), repeats=3, min_seconds=0.3, idle_seconds=0.1)
    assert e["calls"] >= 3 and e["seconds"] >= 0.3 and e["idle_watts"] == pytest.approx(60.0)
    assert e["mean_watts"] == pytest.approx(160.0, rel=0.05)
    samples = e["calls"] * 8
    assert e["joules_per_sample"] == pytest.approx(160.0 * e["seconds"] / samples, rel=0.1)
    assert e["dynamic_joules_per_sample"] == pytest.approx(100.0 * e["seconds"] / samples, rel=0.15)


def test_bench_pytorch_on_cuda_needs_a_gpu(exports):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = subprocess.run([sys.executable, "-m", "stdeploy.cli", "bench", str(exports[0]), "--targets", "",
                        "--pytorch-device", "cuda", "--repeats", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "--pytorch-device cuda: no CUDA GPU here" in r.stderr


def test_pytorch_module_times_cover_each_stage():
    from stdeploy.profile.latency import module_times

    model = build_model("sdt-tiny").eval()
    times = module_times(model, torch.rand(4, 2, 1, 8, 8))
    assert [t["name"] for t in times] == ["embed", "blocks.0.attn", "blocks.0.mlp", "head"]
    assert all(t["ms"] > 0 for t in times)


def test_cli_profile_direct_input_convention(exports, tmp_path):
    py = [sys.executable, "-m", "stdeploy.cli", "profile", str(exports[0]), "--targets", "", "--energy", "cpu",
          "--limit", "8", "--repeats", "1", "--json"]
    for flag, stored in (("once", "once"), ("per-step", "per_step")):
        r = subprocess.run(py + ["--direct-input", flag, "--out", str(tmp_path / flag)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        report = json.loads((tmp_path / flag / "report.json").read_text())
        assert report["counting"]["direct_input"] == stored
    once, per_step = (json.loads((tmp_path / f / "report.json").read_text())["variants"][0]["counts"]["macs"] for f in ("once", "per-step"))
    # sdt-tiny, T = 4: the first convolution costs 61,952 MACs per sample over 4 steps (15,488 each:
    # 32 channels x the in-bounds taps of a 3x3 kernel on 8x8), the head 2,560 (4 steps x 64 x 10);
    # charged once, the convolution's repeated input costs one step
    assert per_step == 61952 + 2560 and once == 61952 / 4 + 2560
    bad = subprocess.run(py + ["--direct-input", "twice", "--out", str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--direct-input" in bad.stderr
