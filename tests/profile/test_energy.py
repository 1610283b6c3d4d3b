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
    x = torch.rand(2, 4, 3) + 0.1  # T=2, B=4, changing over T: 8 rows, each output row costs its 3 nonzero weights
    c = count_operations(nn.Sequential(lin), [x])
    assert c.layers["0"].macs == 8 * 3 and c.layers["0"].sops == 0 and c.per_sample()["macs"] == 6
    assert not c.layers["0"].repeats_over_t and c.layers["0"].steps_charged == 2


def test_direct_input_repeated_over_t_is_charged_once_per_sample_by_default():
    lin, _ = _net()
    x = torch.full((2, 4, 3), 0.3)  # T=2, B=4, the same at both steps (direct encoding)
    once = count_operations(nn.Sequential(lin), [x])
    # every row costs the 3 nonzero weights; charged once: 4 rows (one per sample), not 8
    assert once.layers["0"].repeats_over_t and once.layers["0"].steps_charged == 1
    assert once.layers["0"].macs == 4 * 3 and once.per_sample()["macs"] == 3 and once.direct_input == "once"
    per_step = count_operations(nn.Sequential(lin), [x], direct_input="per_step")  # the papers' convention
    assert per_step.layers["0"].steps_charged == 2 and per_step.per_sample()["macs"] == 6
    conv = _Conv(_net()[1])  # T and B merged before the convolution, as in ConvBN
    img = torch.full((3, 1, 1, 3, 3), 0.5)  # T=3, the same frame: 21 MACs (see the conv test) once, not 3 times
    assert count_operations(conv, [img]).layers["conv"].macs == 21
    assert count_operations(conv, [img], direct_input="per_step").layers["conv"].macs == 63
    with pytest.raises(ValueError, match="direct_input must be one of"):
        count_operations(conv, [img], direct_input="twice")


def test_active_neuron_updates_by_hand():
    lif = LIF(2)  # decay 0.5, threshold 1
    x = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]], [[0.5, 0.0]], [[0.0, 0.0]]])  # (T=4, B=1, 2)
    c = count_operations(nn.Sequential(lif), [x])
    # neuron 0: t0 input 2 (active; v=1 spikes, resets), t1 rest (inactive), t2 input 0.5 (active; v=0.25),
    # t3 no input but v=0.25 (active): 3; neuron 1 never has input or membrane: 0
    n = c.neurons["0"]
    assert n["updates"] == 8 and n["active_updates"] == 3 and n["spikes"] == 1
    fig = {"model": "loihi", "synop_pj": 23.6, "neuron_update_pj": 52.0, "spike_pj": 1.7}
    assert energy(c, {**fig, "neuron_updates": "active"})["terms_pj"]["neuron_update"] == pytest.approx(3 * 52.0)
    assert energy(c, {**fig, "neuron_updates": "all"})["terms_pj"]["neuron_update"] == pytest.approx(8 * 52.0)
    with pytest.raises(ValueError, match="energy.neuron_updates must say which updates"):
        energy(c, fig)


def test_spikformer_attention_products_by_hand():
    from stdeploy.profile.energy import _attention_ops

    q = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # (N=2, d=2)
    k = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # Q·Kᵀ: d0: 2 q-spikes x 1 k-spike, d1: 1 x 2 -> 4. A = [[1, 0], [2, 1]]: column 0 has 2 nonzeros
    # and V row 0 one spike, column 1 one nonzero and V row 1 none -> 2. Total 6.
    assert _attention_ops(q, k, v) == 6


def test_spikformer_model_counts_its_attention():
    from stdeploy.activity import estimate_batchnorm
    from stdeploy.models import build_model, direct_encode
    from stdeploy.profile.energy import _attention_ops

    torch.manual_seed(0)
    model = build_model("spikformer-tiny")
    estimate_batchnorm(model, [direct_encode(torch.rand(8, 1, 8, 8), 4) for _ in range(4)], gain=1.5)
    x = direct_encode(torch.rand(4, 1, 8, 8), 4)
    attn = model.blocks[0].attn
    seen = {}
    hooks = [getattr(attn, n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o)) for n in ("q_lif", "k_lif", "v_lif")]
    c = count_operations(model, [x])
    for h in hooks:
        h.remove()
    expected = _attention_ops(*(attn._split(seen[n]) for n in ("q_lif", "k_lif", "v_lif")))
    layer = c.layers["blocks.0.attn.qkv"]
    assert expected > 0 and layer.sops == expected and layer.kind == "attention"
    assert c.sops == pytest.approx(sum(v.sops for v in c.layers.values()))
    assert c.layers["embed.stages.0.conv.conv"].repeats_over_t  # direct encoding: the first conv charged once


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
    lo = energy(c, {"model": "loihi", "synop_pj": 23.6, "neuron_update_pj": 52.0, "spike_pj": 1.7, "neuron_updates": "all"})
    assert lo["joules_per_sample"] == pytest.approx((6 * 23.6 + 6 * 52.0 + spikes * 1.7) * 1e-12)
    assert e["label"] == "45 nm" and lo["label"] == "Loihi" and lo["neuron_updates"] == "all"
    with pytest.raises(ValueError, match="unknown energy model"):
        energy(c, {"model": "tpu"})


def test_pruned_weights_cost_nothing():
    lin = nn.Linear(4, 4, bias=False)
    x = torch.ones(1, 2, 4)
    dense = count_operations(nn.Sequential(lin), [x]).sops
    with torch.no_grad():
        lin.weight[:, :2] = 0
    assert count_operations(nn.Sequential(lin), [x]).sops == dense / 2
