"""The export directory as a whole: NIR + ONNX + reference + manifest, validated, atomic."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stdeploy.activity import estimate_batchnorm, require_active
from stdeploy.checkpoint import save_checkpoint
from stdeploy.errors import ConfigError, UnsupportedPrimitive
from stdeploy.export.directory import export_model
from stdeploy.export.validate import compare, logits_and_spikes, membrane_before_reset, record_neurons
from stdeploy.models import build_model, direct_encode
from stdeploy.models.structure import LowRankLinear, attach_mask
from stdeploy.neurons import LIF
from stdeploy.prune import PruneConfig, make_pruner

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(trained_sdt):
    """The run's shared trained sdt-tiny and its 64-image digits subset (tests/conftest.py)."""
    return trained_sdt


def _recalibrate(model, data):
    images = torch.stack([data.train[i][0] for i in range(len(data.train))])
    return estimate_batchnorm(model, [direct_encode(images[i:i + 64], model.cfg.timesteps) for i in range(0, len(images), 64)])


def test_membrane_before_reset_matches_lif():
    lif = LIF(3)
    x = torch.rand(6, 2, 3) * 3
    v = membrane_before_reset(lif, x)
    assert torch.equal((v >= 1.0).float(), lif(x))


def test_compare_localises_first_diverging_layer():
    model = build_model("sdt-tiny").eval()
    x = torch.rand(4, 2, 1, 8, 8)
    logits, rec = record_neurons(model, x)
    layers = {k: v["spikes"].clone() for k, v in rec.items()}
    layers["blocks.0.mlp.lif2"].view(-1)[0] = 1 - layers["blocks.0.mlp.lif2"].view(-1)[0]
    c = compare("x", logits, rec["head.lif"]["spikes"], logits, rec["head.lif"]["spikes"], rec, layers)
    assert c.flips[0]["layer"] == "blocks.0.mlp.lif2" and c.flips[0]["flips"] == 1
    v = rec["blocks.0.mlp.lif2"]["membrane"].view(-1)[0]
    assert c.max_flip_distance == pytest.approx(abs(float(v) - 1.0))


def test_logits_and_spikes_are_record_neurons_output_layer(trained):
    """One pass, no autograd, no hook left behind: the logits and head.lif spikes that
    :func:`record_neurons` records, on test digits where the output layer fires."""
    model, data = trained
    x = direct_encode(torch.stack([data.test[i][0] for i in range(8)]), model.cfg.timesteps)
    x.requires_grad_(True)
    logits, spikes = logits_and_spikes(model, x)
    assert not logits.requires_grad and not spikes.requires_grad
    assert not model.head.lif._forward_hooks
    with torch.no_grad():
        ref_logits, rec = record_neurons(model, x)
    assert spikes.shape == rec["head.lif"]["spikes"].shape and 0.02 < float(spikes.mean()) < 0.9
    assert torch.equal(spikes, rec["head.lif"]["spikes"]) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("variant", ["dense", "l1p", "dsp"])
def test_export_directory_validates_and_writes_manifest(trained, tmp_path, variant):
    model, data = trained
    if variant != "dense":
        from stdeploy.models import clone_model

        model = clone_model(model)
        pruner = make_pruner(PruneConfig(method=variant, sparsity=0.9, param_ratio=0.3))
        pruner.prepare(model)
        pruner.step(model)
        pruner.finalize(model)
        _recalibrate(model, data)  # one-shot pruning leaves the attention LIFs near silent
    manifest = export_model(model.eval(), tmp_path / "exp", data=data, samples=None)
    files = {p.name for p in (tmp_path / "exp").iterdir()}
    assert files == {"model.nir", "model.portable.nir", "model.onnx", "model.step.onnx", "reference", "manifest.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory left"
    on_disk = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert on_disk["format"] == "stdeploy-export/1" and on_disk["timesteps"] == 4 and on_disk["dt"] == 1.0
    for name in ("nir", "nir.portable", "onnx", "onnx.step"):
        r = on_disk["validation"]["results"][name]
        assert r["rounding_only"], r
        assert r["accuracy"] == pytest.approx(on_disk["validation"]["reference_accuracy"], abs=1.5 / 64)
        assert len(on_disk["artifacts"][name]["sha256"]) == 64
    assert on_disk["validation"]["results"]["nir"]["spike_mismatches"] == 0
    activity = on_disk["validation"]["activity"]  # recorded with the validation: the compared spikes are not all zeros
    require_active(activity["firing_rates"], low=1e-3, high=0.9)
    assert activity["samples"] == 64 and 0 < activity["spike_input_density"] < 1
    assert on_disk["validation"]["results"]["nir.portable"]["spike_mismatches"] == 0
    assert on_disk["artifacts"]["nir.portable"]["dt"] == 1e-4 and on_disk["artifacts"]["nir.portable"]["nir_min_version"] == "1.0.6"
    if variant == "dsp":
        assert any(isinstance(m, LowRankLinear) for m in model.modules())


def test_export_errors_leave_nothing(tmp_path):
    model = build_model("spikformer-tiny").eval()
    with pytest.raises(UnsupportedPrimitive, match="sdt"):
        export_model(model, tmp_path / "x", ("nir",))
    assert list(tmp_path.iterdir()) == []
    masked = build_model("sdt-tiny").eval()
    fc = masked.blocks[0].mlp.fc1.linear
    attach_mask(fc, torch.ones_like(fc.weight, dtype=torch.bool))
    with pytest.raises(UnsupportedPrimitive, match="finalize"):
        export_model(masked, tmp_path / "y", ("onnx",))
    with pytest.raises(ConfigError, match="unknown export format"):
        export_model(build_model("sdt-tiny"), tmp_path / "z", ("tflite",))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        export_model(build_model("sdt-tiny"), tmp_path / "file", ("nir",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cli_export_and_run(trained, tmp_path):
    model, _ = trained
    save_checkpoint(tmp_path / "ck", model)
    py = [sys.executable, "-m", "stdeploy.cli"]
    r = subprocess.run(py + ["export", str(tmp_path / "ck"), "--out", str(tmp_path / "exp"), "--samples", "16", "--json", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["validation"]["results"]["nir"]["spike_mismatches"] == 0
    r = subprocess.run(py + ["run", str(tmp_path / "exp"), "--target", "onnxruntime", "--limit", "32", "--json", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["samples"] == 32 and res["prediction_agreement"] >= 31 / 32
    assert all(f["min_distance"] < 1e-4 for f in res["flips"][:1])  # a flip, if any, starts at rounding level
    bad = subprocess.run(py + ["run", str(tmp_path / "nowhere"), "--target", "onnxruntime"], capture_output=True, text=True)
    assert bad.returncode == 2 and "nowhere" in bad.stderr
    bad = subprocess.run(py + ["run", str(tmp_path / "exp"), "--target", "tpu"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown target 'tpu'; known targets: onnxruntime, tvm, lava" in bad.stderr
