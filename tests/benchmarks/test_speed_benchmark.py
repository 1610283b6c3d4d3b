"""benchmarks/speed.py refuses to time a model whose spiking layers are silent (it would time
kernels fed zeros and compare zeros), and its BatchNorm estimation makes a random model fire."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from stdeploy.errors import InactiveModel
from stdeploy.models import build_model, direct_encode

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("speed_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_a_silent_model_is_refused_before_timing(speed, tmp_path):
    torch.manual_seed(0)
    silent = build_model("sdt-tiny").eval()  # fresh BatchNorm statistics: nothing after the first LIF fires
    x = direct_encode(torch.rand(4, 1, 8, 8), 4)
    args = argparse.Namespace(tune_trials=0, warmup=1, repeats=1)
    with pytest.raises(InactiveModel, match=r"t dense: spiking layers outside the activity bounds; silent \(rate < 0.01\): .*blocks.0.mlp.lif2"):
        speed.run_table("t", {"dense": silent}, x, tmp_path, args, skip_untuned=True)


def test_estimated_batchnorm_makes_the_models_fire(speed):
    torch.manual_seed(0)
    model = build_model("sdt-tiny")
    from stdeploy.activity import estimate_batchnorm, measure_activity, require_active

    estimate_batchnorm(model, [direct_encode(torch.rand(8, 1, 8, 8), 4) for _ in range(8)], gain=1.25)
    a = measure_activity(model, direct_encode(torch.rand(4, 1, 8, 8), 4))
    require_active(a.firing_rates, *speed.ACTIVE)
    assert 0 < a.spike_input_density < 0.5


def test_scope_layer_prunes_every_block_layer_alike(speed):
    """``--scope layer``: each block linear keeps its own 10% (global L1P-90 can empty a whole layer:
    on random-weight sdt-8-512 every mlp.fc2)."""
    torch.manual_seed(0)
    model = speed.prune(build_model("sdt-tiny"), "l1p", 0.9, scope="layer")
    from stdeploy.prune.base import DEFAULT_LAYERS, select_layers

    layers = select_layers(model, DEFAULT_LAYERS)
    assert len(layers) == 6
    for name, layer in layers.items():
        w = layer.weight
        assert int(torch.count_nonzero(w)) == w.numel() - round(0.9 * w.numel()), name


def test_untuned_runs_never_say_tuned(speed):
    """With ``--tune-trials 0`` no column, legend or stage heading names a path "tuned"."""
    paths = {p: speed.column_name(p, tuned=False) for p in speed.PATHS}
    assert not any("tvm tuned" in name for name in paths.values())
    assert paths["tvm tuned"] == "tvm untuned-TIR" and speed.column_name("tvm tuned", tuned=True) == "tvm tuned"
    row = {"variant": "dense", "macs": 10, "limit": 1.0, "ms": {"onnxruntime": 2.0, "tvm tuned": 1.0},
           "vs_ort_dense": {"onnxruntime": 1.0, "tvm tuned": 0.5}, "speedup": {}, "exact": {},
           "activity": {"spike_input_density": 0.1, "firing_min": 0.05, "firing_max": 0.2},
           "stage_s": {"export": 3.0, "build tvm tuned": 4.0, "run tvm tuned": 1.0}}
    table, stages = speed.markdown([row], tuned=False), speed.stages_markdown([row], tuned=False)
    assert "tvm tuned" not in table and "tvm tuned" not in stages
    assert "| build tvm untuned-TIR |" in stages and "| dense | 3 | 4 | 1 | 8 |" in stages


def test_exact_mode_rows_are_spike_exact_with_identical_logits(speed, tmp_path):
    """``--quantize exact`` on a tiny random model that fires: the integer-exact copy is exported and
    checked on onnxruntime (TVM builds cost minutes; the exactness tests cover TVM) with 0 output
    spikes differing and bit-identical logits, the checker's bound recorded, and the table says so."""
    from stdeploy.activity import estimate_batchnorm
    from stdeploy.models.quantize import InputContract

    torch.manual_seed(0)
    model = build_model("sdt-tiny")
    g = torch.Generator().manual_seed(1)
    estimate_batchnorm(model, [direct_encode(torch.rand(8, 1, 8, 8, generator=g), 4) for _ in range(4)], gain=1.25)
    contract = InputContract(0.0, 1.0, 8)
    models = speed.quantize_exact({"dense": model}, contract)
    x = contract.apply(direct_encode(torch.rand(4, 1, 8, 8), 4))
    args = argparse.Namespace(tune_trials=0, warmup=0, repeats=1, export_samples=2, tvm_paths=())
    rows = speed.run_table("t", models, x, tmp_path, args, skip_untuned=True)
    row = rows[0]
    assert row["activity"]["output_spikes"] > 0 and row["activity"]["firing_min"] >= speed.ACTIVE[0]
    assert row["exact"] == {"onnxruntime": 0} and row["logits_diff"] == {"onnxruntime": 0.0}
    assert row["quantize"]["mode"] == "exact" and row["quantize"]["max_bits"] <= 24
    assert set(row["cpu_ms"]) == {"pytorch", "onnxruntime"} and all(v > 0 for v in row["cpu_ms"].values())
    assert speed.not_exact({"t": rows}) == []
    assert f"0 of {row['output_spike_count']:,} output spikes differ, logits identical (onnxruntime)" in speed.markdown(rows, tuned=False)
    assert "2^-8" in speed.exact_note(rows)


def test_a_differing_exact_row_fails_the_run(speed):
    """One flipped spike or one differing logit in an integer-exact row is a failure (exit 1), named."""
    row = {"variant": "l1p-90", "quantize": {"mode": "exact", "max_bits": 22.6}, "output_spike_count": 1000,
           "exact": {"onnxruntime": 0, "tvm tuned": 3}, "logits_diff": {"onnxruntime": 0.5, "tvm tuned": 0.0}}
    failed = speed.not_exact({"sdt-8-512": [row]})
    assert failed == ["sdt-8-512 l1p-90 onnxruntime: 0 output spikes differ, largest logit difference 0.5",
                      "sdt-8-512 l1p-90 tvm tuned: 3 output spikes differ, largest logit difference 0"]
    text = speed.exactness(row, tuned=False)
    assert "onnxruntime: 0 of 1,000 output spikes differ, logits differ by up to 0.5" in text
    assert "tvm untuned-TIR: 3 of 1,000 output spikes differ, logits identical" in text
    assert not speed.not_exact({"t": [{**row, "exact": {"onnxruntime": 0}, "logits_diff": {"onnxruntime": 0.0}}]})
