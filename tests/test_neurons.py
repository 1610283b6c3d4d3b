import pytest
import torch

from stdeploy.neurons import LIF, LIFParams, SLIF, lif_step, spike_fn, to_lif, to_slif


def test_lif_step_hand_computed():
    # d = 0.5, threshold 1: v1 = 0.5*0 + 0.5*1.2 = 0.6 (no spike); v2 = 0.3 + 0.9 = 1.2 -> spike, reset to 0;
    # v3 = 0 + 0.5*0.4 = 0.2
    p = LIFParams(decay=0.5, threshold=1.0)
    v = torch.zeros(1)
    out = []
    for x in (1.2, 1.8, 0.4):
        s, v = lif_step(torch.tensor([x]), v, p)
        out.append((s.item(), v.item()))
    assert out == [(0.0, pytest.approx(0.6)), (1.0, 0.0), (0.0, pytest.approx(0.2))]


def test_lif_step_threshold_is_inclusive_and_per_neuron():
    p = LIFParams(decay=torch.tensor([0.5, 0.25]), threshold=torch.tensor([1.0, 0.5]))
    s, v = lif_step(torch.tensor([2.0, 2.0]), torch.zeros(2), p)  # v = [1.0, 0.5]: both exactly at threshold
    assert s.tolist() == [1.0, 1.0] and v.tolist() == [0.0, 0.0]


def test_lif_step_is_pure():
    x, v = torch.ones(3), torch.full((3,), 0.7)
    x0, v0 = x.clone(), v.clone()
    lif_step(x, v, LIFParams())
    assert torch.equal(x, x0) and torch.equal(v, v0)


def test_surrogate_gradient_is_sigmoid_derivative():
    x = torch.tensor([0.0, 0.5, -1.0], requires_grad=True)
    spike_fn(x, alpha=4.0).sum().backward()
    sig = torch.sigmoid(4 * x.detach())
    torch.testing.assert_close(x.grad, 4 * sig * (1 - sig))


def test_multistep_matches_manual_loop_over_time():
    torch.manual_seed(0)
    lif = LIF(5, tau=2.0, threshold=1.0)
    x = torch.rand(6, 2, 3, 5) * 3
    v = torch.zeros(2, 3, 5)
    expected = []
    for t in range(6):
        v = 0.5 * v + 0.5 * x[t]
        s = (v >= 1.0).float()
        v = v * (1 - s)
        expected.append(s)
    assert torch.equal(lif(x), torch.stack(expected))


def test_channel_dim_for_images():
    lif = LIF(3, channel_dim=1, threshold=1.0)
    lif.threshold_.copy_(torch.tensor([0.1, 1.0, 100.0]))
    s = lif(torch.ones(2, 1, 3, 2, 2))
    assert s[1, 0, 0].eq(1).all() and s[:, 0, 2].eq(0).all()


def test_slif_from_lif_is_identical_until_trained():
    torch.manual_seed(1)
    lif = LIF(8, tau=3.0, threshold=0.7)
    slif = SLIF.from_lif(lif)
    x = torch.randn(10, 4, 8) * 2
    assert torch.equal(lif(x), slif(x))
    assert torch.equal(slif.threshold, lif.threshold) and torch.equal(slif.decay, lif.decay)


def test_slif_learns_threshold_and_leak_and_stays_valid():
    torch.manual_seed(0)
    slif = SLIF(4)
    opt = torch.optim.SGD(slif.parameters(), lr=50.0)
    x = torch.rand(6, 16, 4) * 3
    for _ in range(5):
        opt.zero_grad()
        slif(x).mean().backward()
        opt.step()
    assert not torch.equal(slif.threshold, torch.ones(4))
    assert not torch.equal(slif.decay, torch.full((4,), 0.5))
    with torch.no_grad():  # any raw value keeps the parameters in range
        slif.threshold_log_scale.fill_(-50.0)
        slif.leak_log_exponent.copy_(torch.tensor([-30.0, 30.0, 0.0, 3.0]))
    assert (slif.threshold > 0).all()
    assert ((slif.decay >= 0) & (slif.decay <= 1)).all()


def test_slif_learn_flags():
    s = SLIF(3, learn_threshold=True, learn_leak=False)
    assert [p.requires_grad for p in (s.threshold_log_scale, s.leak_log_exponent)] == [True, False]
    assert s.intrinsic_parameters() == [s.threshold_log_scale]


def test_to_slif_and_back_preserve_spikes():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), LIF(4))
    x = torch.randn(5, 2, 4)
    ref = net(x)
    to_slif(net)
    assert isinstance(net[1], SLIF) and torch.equal(net(x), ref)
    to_lif(net)
    assert type(net[1]) is LIF and torch.equal(net(x), ref)


@pytest.mark.parametrize("kwargs, match", [({"tau": 1.0}, "tau"), ({"threshold": 0.0}, "threshold"), ({"features": 0}, "features")])
def test_bad_neuron_parameters(kwargs, match):
    args = {"features": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        LIF(**args)


def test_wrong_channel_count_names_shape():
    with pytest.raises(ValueError, match=r"expected 4 channels"):
        LIF(4)(torch.zeros(2, 3, 5))
