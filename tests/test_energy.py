import pytest
import torch
from torch import nn

from stdeploy.neurons import LIF
from stdeploy.profile.energy import count_operations, energy


def _net():
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.0, 0.0]]))  # fan-out of inputs: 2, 0, 1
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]]))  # 3 nonzero taps
    return lin, conv


def test_sops_of_a_linear_layer_by_hand():
    lin, _ = _net()
    net = nn.Sequential(lin, LIF(2))
    x = torch.tensor([[[1.0, 1.0, 0.0]], [[0.0, 1.0, 1.0]], [[1.0, 0.0, 1.0]]])  # (T=3, B=1, 3) spikes
    c = count_operations(net, [x])
    # step 0: spikes at inputs 0, 1 -> 2 + 0; step 1: inputs 1, 2 -> 0 + 1; step 2: inputs 0, 2 -> 2 + 1
    assert c.layers["0"].sops == 6 and c.layers["0"].macs == 0 and c.layers["0"].input == "spikes"
    assert c.neurons["1"]["updates"] == 6  # 2 neurons x 3 steps
    assert c.samples == 1 and c.per_sample()["sops"] == 6


def test_macs_of_a_real_valued_linear_layer_by_hand():
    lin, _ = _net()
    x = torch.full((2, 4, 3), 0.3)  # T=2, B=4: 8 rows, each output row costs its 3 nonzero weights
    c = count_operations(nn.Sequential(lin), [x])
    assert c.layers["0"].macs == 8 * 3 and c.layers["0"].sops == 0 and c.per_sample()["macs"] == 6


def test_conv_sops_and_macs_by_hand():
    _, conv = _net()
    s = torch.zeros(1, 1, 1, 3, 3)
    s[0, 0, 0, 1, 1] = 1.0  # one spike in the centre reaches all 3 nonzero taps inside the 3x3 map
    s_corner = torch.zeros(1, 1, 1, 3, 3)
    s_corner[0, 0, 0, 0, 0] = 1.0  # a corner spike: weight (1,1) -> output (0,0); (1,0) -> (0,1); (0,1) -> (1,0)
    c = count_operations(_Conv(conv), [s, s_corner])
    assert c.layers["conv"].sops == 3 + 3
    real = torch.full((1, 1, 1, 3, 3), 0.5)
    c = count_operations(_Conv(conv), [real])
    # every output position computes its nonzero taps inside the padded map: 9 positions, 3 taps,
    # minus taps that fall on padding: row 0 loses the (0,1) tap (3 outputs), column 0 loses (1,0) (3 outputs)
    assert c.layers["conv"].macs == 9 * 3 - 3 - 3


class _Conv(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):  # (T, B, C, H, W)
        return self.conv(x.flatten(0, 1))


def test_energy_follows_the_profile_figures():
    lin, _ = _net()
    net = nn.Sequential(lin, LIF(2))
    x = torch.tensor([[[1.0, 1.0, 0.0]], [[0.0, 1.0, 1.0]], [[1.0, 0.0, 1.0]]])
    c = count_operations(net, [x])
    e = energy(c, {"model": "45nm", "mac_pj": 4.6, "ac_pj": 0.9})
    assert e["joules_per_sample"] == pytest.approx(6 * 0.9e-12)
    e2 = energy(c, {"model": "45nm", "mac_pj": 4.6, "ac_pj": 1.8})  # double the AC figure: double the energy
    assert e2["joules_per_sample"] == pytest.approx(2 * e["joules_per_sample"])
    spikes = c.spikes
    lo = energy(c, {"model": "loihi", "synop_pj": 23.6, "neuron_update_pj": 52.0, "spike_pj": 1.7})
    assert lo["joules_per_sample"] == pytest.approx((6 * 23.6 + 6 * 52.0 + spikes * 1.7) * 1e-12)
    with pytest.raises(ValueError, match="unknown energy model"):
        energy(c, {"model": "tpu"})


def test_pruned_weights_cost_nothing():
    lin = nn.Linear(4, 4, bias=False)
    x = torch.ones(1, 2, 4)
    dense = count_operations(nn.Sequential(lin), [x]).sops
    with torch.no_grad():
        lin.weight[:, :2] = 0
    assert count_operations(nn.Sequential(lin), [x]).sops == dense / 2
