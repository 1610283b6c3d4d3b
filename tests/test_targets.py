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
    torch.manual_seed(0)
    model = build_model("sdt-tiny").eval()
    export_model(model, tmp_path / "exp", ("onnx",))
    runnable = get_target("onnxruntime").compile(tmp_path / "exp", load_profile("cpu"))
    assert isinstance(runnable, Runnable)
    x = torch.rand(4, 5, 1, 8, 8)
    from stdeploy.models.fold import fold_batchnorm
    from stdeploy.export.validate import record_neurons

    ref_logits, rec = record_neurons(fold_batchnorm(model), x)
    res = runnable.run(x.numpy())
    assert np.array_equal(res.spikes, rec["head.lif"]["spikes"].numpy())
    np.testing.assert_allclose(res.logits, ref_logits.numpy(), atol=1e-5)
    assert res.seconds > 0
