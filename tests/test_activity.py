"""Activity: firing rates and input densities counted by hand; silent or saturated layers refused by name."""

import pytest
import torch
from torch import nn

from stdeploy.activity import estimate_batchnorm, measure_activity, require_active
from stdeploy.errors import InactiveModel
from stdeploy.models import build_model, direct_encode
from stdeploy.neurons import LIF


def test_rates_and_densities_by_hand():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 0.0]]))  # neuron 0 gets 2 * x0, neuron 1 nothing
    net = nn.Sequential(lin, LIF(2))
    x = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 0.0]], [[1.0, 1.0]]])  # (T=4, B=1, 2): 4 nonzeros of 8
    a = measure_activity(net, x)
    # neuron 0: v = 0.5 v + 0.5 * 4 x -> 2 at steps 0, 1, 3 (spike, reset), 0 at step 2; neuron 1 never
    assert a.firing_rates == {"1": 3 / 8} and a.input_densities == {"0": 4 / 8} and a.samples == 1
    assert a.real_inputs == [] and a.spike_input_density == 4 / 8
    real = measure_activity(net, x * 0.5)  # values 0.5: not spikes
    assert real.real_inputs == ["0"] and real.spike_input_density is None


def test_require_active_names_the_layers():
    require_active({"a": 0.1, "b": 0.2})
    with pytest.raises(InactiveModel, match=r"silent \(rate < 0.001\): b \(0\)"):
        require_active({"a": 0.1, "b": 0.0})
    with pytest.raises(InactiveModel, match=r"saturated \(rate > 0.5\): a \(0.95\)"):
        require_active({"a": 0.95, "b": 0.2}, high=0.5)
    with pytest.raises(InactiveModel, match="no spiking layer"):
        require_active({})
    with pytest.raises(InactiveModel, match="low < high"):
        require_active({"a": 0.1}, low=0.5, high=0.2)


def test_batchnorm_estimated_layer_by_layer_makes_a_random_model_fire():
    torch.manual_seed(0)
    model = build_model("sdt-tiny").eval()
    x = direct_encode(torch.rand(8, 1, 8, 8), 4)
    with pytest.raises(InactiveModel, match="silent"):  # fresh BatchNorm statistics (0, 1): silent
        require_active(measure_activity(model, x).firing_rates)
    estimate_batchnorm(model, [direct_encode(torch.rand(16, 1, 8, 8), 4) for _ in range(8)])
    bn = model.embed.stages[0].conv.bn
    assert int(bn.num_batches_tracked) == 8 and not model.training
    rates = measure_activity(model, x).firing_rates
    require_active(rates, low=0.01, high=0.5)
    assert len(rates) == 10


def test_batchnorm_gain_must_be_positive():
    from stdeploy.errors import ConfigError

    with pytest.raises(ConfigError, match="gain must be > 0"):
        estimate_batchnorm(build_model("sdt-tiny"), [], gain=0)
