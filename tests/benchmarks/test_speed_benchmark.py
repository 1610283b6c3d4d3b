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
