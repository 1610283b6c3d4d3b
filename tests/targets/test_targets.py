"""The target protocol, registry and device profiles (every registered target is exercised by its
own test file: test_tvm_target.py, test_lava_target.py, and the onnxruntime run here)."""

import json

import numpy as np
import pytest
import torch

from stdeploy.export.manifest import write_manifest
from stdeploy.errors import ConfigError
from stdeploy.export.directory import export_model
from stdeploy.models import build_model
from stdeploy.targets.base import REGISTRY, Runnable, Target, TargetError, get_target, read_manifest
from stdeploy.targets.profiles import known_profiles, load_profile


def test_registry_lists_known_on_unknown():
    with pytest.raises(ConfigError, match="unknown target 'gpu'; known targets: " + ", ".join(REGISTRY)):
        get_target("gpu")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_target_follows_the_protocol(name):
    t = get_target(name)
    assert isinstance(t, Target) and t.name == name
    ok, why = t.available()
    assert isinstance(ok, bool) and why


@pytest.mark.parametrize("name", ["cpu", "jetson-orin-nano", "jetson-agx-orin", "loihi2"])
def test_profiles_load_with_energy_sources(name):
    p = load_profile(name)
    assert p.name == name and p.energy.get("source")
    if p.kind == "cuda":
        assert p.tvm["target"]["arch"] == "sm_87" and p.tvm["host"]["mtriple"] == "aarch64-linux-gnu"
    if p.kind == "lava":
        assert p.lava["mode"] in ("floating", "fixed") and p.limits["neurons_per_core"] > 0


def test_profile_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown device profile 'tpu'; known: cpu"):
        load_profile("tpu")
    with pytest.raises(ConfigError, match="not found"):
        load_profile(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('kind = "cpu"\n[energy]\nmac_pj = -1\n')
    with pytest.raises(ConfigError, match="energy.mac_pj must be a number >= 0"):
        load_profile(bad)
    bad.write_text('kind = "fpga"\n')
    with pytest.raises(ConfigError, match="kind must be one of"):
        load_profile(bad)
    assert set(known_profiles()) >= {"cpu", "loihi2"}


def test_broken_export_dirs(tmp_path):
    with pytest.raises(TargetError, match="export directory not found"):
        read_manifest(tmp_path / "none", "onnx")
    (tmp_path / "e").mkdir()
    with pytest.raises(TargetError, match="no manifest.json"):
        read_manifest(tmp_path / "e", "onnx")
    write_manifest(tmp_path / "e", {"artifacts": {"nir": {"file": "model.nir"}}})
    with pytest.raises(TargetError, match="no 'onnx' artifact"):
        read_manifest(tmp_path / "e", "onnx")
    with pytest.raises(TargetError, match="model.nir, which is missing"):
        read_manifest(tmp_path / "e", "nir")


def test_onnxruntime_target_matches_pytorch(tmp_path):
    from stdeploy.activity import estimate_batchnorm, rates_from_records, require_active
    from stdeploy.models import direct_encode
    from stdeploy.models.fold import fold_batchnorm
    from stdeploy.export.validate import record_neurons

    torch.manual_seed(0)
    model = build_model("sdt-tiny")  # BatchNorm statistics estimated so every LIF fires (an untrained one is silent)
    estimate_batchnorm(model, [direct_encode(torch.rand(16, 1, 8, 8), 4) for _ in range(8)], gain=1.5)
    manifest = export_model(model, tmp_path / "exp", ("onnx",))
    require_active(manifest["validation"]["activity"]["firing_rates"], low=0.01, high=0.5)
    runnable = get_target("onnxruntime").compile(tmp_path / "exp", load_profile("cpu"))
    assert isinstance(runnable, Runnable)
    x = direct_encode(torch.rand(5, 1, 8, 8), 4)

    ref_logits, rec = record_neurons(fold_batchnorm(model), x)
    require_active(rates_from_records(rec), low=0.01, high=0.5)  # the compared spikes are not all zeros
    res = runnable.run(x.numpy())
    assert np.array_equal(res.spikes, rec["head.lif"]["spikes"].numpy())
    np.testing.assert_allclose(res.logits, ref_logits.numpy(), atol=1e-5)
    assert res.seconds > 0


def test_onnxruntime_refuses_devices_it_cannot_serve(tmp_path):
    """No silent fallback: a GPU profile without the CUDA execution provider, and a Loihi profile,
    are refused with the reason; a served run names the provider that actually ran."""
    import subprocess
    import sys

    import onnxruntime

    torch.manual_seed(0)
    export_model(build_model("sdt-tiny").eval(), tmp_path / "exp", ("onnx",))
    ort = get_target("onnxruntime")
    with pytest.raises(TargetError, match="loihi2 is a Loihi \\(lava\\) profile: onnxruntime cannot run on it"):
        ort.compile(tmp_path / "exp", load_profile("loihi2"))
    cpu = ort.compile(tmp_path / "exp", load_profile("cpu"))
    assert cpu.info["provider"] == "CPUExecutionProvider" == cpu.session.get_providers()[0]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        gpu = ort.compile(tmp_path / "exp", load_profile("nvidia-h100"))
        assert gpu.info["provider"] == "CUDAExecutionProvider"
        return
    with pytest.raises(TargetError, match="nvidia-h100 needs onnxruntime's CUDAExecutionProvider, which this onnxruntime"):
        ort.compile(tmp_path / "exp", load_profile("nvidia-h100"))
    r = subprocess.run([sys.executable, "-m", "stdeploy.cli", "run", str(tmp_path / "exp"), "--target", "onnxruntime",
                        "--device", "nvidia-h100", "--limit", "4"], capture_output=True, text=True)
    assert r.returncode == 2 and "CUDAExecutionProvider" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", sorted(known_profiles()))
def test_every_energy_figure_cites_its_source(name):
    """Each per-operation figure of a shipped profile names where it comes from; a Loihi profile
    says which neuron updates its figure charges."""
    energy = load_profile(name).energy
    figures = [k for k in energy if k.endswith("_pj")]
    if not figures:
        pytest.skip(f"{name} has no energy figures")
    assert sorted(energy.get("sources", {})) == sorted(figures)
    assert all(len(energy["sources"][k]) > 20 for k in figures)
    if energy["model"] == "loihi":
        assert energy["neuron_updates"] in ("active", "all")
