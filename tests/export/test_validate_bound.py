"""Export validation with a bound: the near-threshold rule explains where a divergence starts, the
bound says how much damage is acceptable. Adversarial cases on a 1-block model that fires."""

import pytest
import torch

from stdeploy.activity import estimate_batchnorm, rates_from_records, require_active
from stdeploy.errors import ConfigError
from stdeploy.export.validate import ROUNDING_LIMIT, Bound, compare, record_neurons
from stdeploy.models import build_model, direct_encode

LAYER = "blocks.0.mlp.lif2"  # a hidden layer in the middle of the only block
NUDGE = 3e-5                 # membrane offset from threshold: float-rounding size (< ROUNDING_LIMIT)


@pytest.fixture(scope="module")
def firing():
    """sdt-tiny (one block) with BatchNorm statistics estimated so that every LIF fires, and a
    batch of inputs; checked to fire (a silent model would make every comparison pass)."""
    torch.manual_seed(0)
    model = build_model("sdt-tiny")
    assert model.cfg.depth == 1
    estimate_batchnorm(model, [direct_encode(torch.rand(16, 1, 8, 8), 4) for _ in range(8)], gain=1.5)
    x = direct_encode(torch.rand(16, 1, 8, 8), 4)
    return model.eval(), x


def _run_with_onset(model, x, offset: float):
    """Run the model with the membrane of one neuron of ``LAYER`` at step 0 placed ``offset`` from
    threshold (by setting its input), recording every LIF; the rest of the run is genuine."""
    lif = dict(model.named_modules())[LAYER]
    d = 0
    target = float(lif.threshold[d]) + offset

    def pre(mod, args):
        y = args[0].clone()
        y[0, 0, 0, d] = target / float(lif.decay[d])  # v[0] = decay * x[0] from rest
        return (y,)

    h = lif.register_forward_pre_hook(pre)
    try:
        return record_neurons(model, x)
    finally:
        h.remove()


def test_one_genuine_rounding_flip_passes(firing):
    model, x = firing
    ref_logits, ref = _run_with_onset(model, x, +NUDGE)  # the reference spikes at the onset neuron
    logits, art = _run_with_onset(model, x, -NUDGE)      # the artifact, rounded the other way, does not
    require_active(rates_from_records(ref), low=0.01, high=0.5)
    layers = {k: v["spikes"] for k, v in art.items()}
    c = compare("artifact", ref_logits, ref["head.lif"]["spikes"], logits, art["head.lif"]["spikes"], ref, layers)
    assert c.flips and c.flips[0]["layer"] == LAYER, c.flips  # the divergence is real and starts there
    assert c.max_flip_distance == pytest.approx(NUDGE, abs=1e-6) and c.max_flip_distance < ROUNDING_LIMIT
    assert c.flips_at_rounding_level and c.within_bound and c.rounding_only, c.to_dict()


def test_one_near_threshold_flip_then_everything_wrong_fails(firing):
    """The audit's case: one flip within 1e-4 of threshold, then every later output spike inverted
    and the logits shifted by 100. The onset rule alone accepted it; the bound refuses it."""
    model, x = firing
    ref_logits, ref = _run_with_onset(model, x, +NUDGE)
    _, art = _run_with_onset(model, x, -NUDGE)
    require_active(rates_from_records(ref), low=0.01, high=0.5)
    layers = {k: v["spikes"] for k, v in art.items()}
    ref_out = ref["head.lif"]["spikes"]
    bad_spikes = 1 - ref_out
    layers["head.lif"] = bad_spikes
    c = compare("artifact", ref_logits, ref_out, ref_logits + 100, bad_spikes, ref, layers)
    assert c.flips[0]["layer"] == LAYER and c.flips_at_rounding_level  # the onset still looks like rounding
    assert c.spike_mismatches == c.spikes_total
    assert not c.within_bound and not c.rounding_only
    d = c.to_dict()
    assert d["rounding_only"] is False and d["within_bound"] is False
    assert any("mismatch fraction 1 > 0.01" in v for v in d["bound_violations"])
    assert any(v.startswith("logits error 100") for v in d["bound_violations"])
    # the export's summary line says both: the onset is rounding, the outcome is outside the bound
    from stdeploy.cli import first_flip

    line = first_flip(d)
    assert f"first diverging layer {LAYER}" in line and "(float rounding)" in line and "NOT rounding" not in line
    assert "outside the task-level bound: " in line and "mismatch fraction 1 > 0.01" in line
    far = compare("artifact", ref_logits, ref_out, ref_logits, bad_spikes, ref, {**layers, LAYER: 1 - ref[LAYER]["spikes"]}).to_dict()
    assert "NOT rounding: a bug" in first_flip(far)  # flips far from threshold are named as such


def test_each_bound_can_fail_alone(firing):
    model, x = firing
    logits, rec = record_neurons(model, x)
    out = rec["head.lif"]["spikes"]
    assert compare("same", logits, out, logits, out, rec).rounding_only
    # predictions: swap the top two logits of every sample, shift nothing else much
    swapped = logits.clone()
    top2 = logits.topk(2, -1).indices
    rows = torch.arange(len(logits))
    swapped[rows, top2[:, 0]], swapped[rows, top2[:, 1]] = logits[rows, top2[:, 1]], logits[rows, top2[:, 0]]
    c = compare("swapped", logits, out, swapped, out, rec, bound=Bound(logits_rtol=10.0))
    assert c.predictions_agree == 0.0 and c.bound_violations() == ["prediction agreement 0.0000 < 0.95 (one of 16 samples may disagree)"]
    # spikes: 2% of output spikes flipped, logits untouched
    flipped = out.clone().view(-1)
    n = int(0.02 * flipped.numel())
    flipped[:n] = 1 - flipped[:n]
    c = compare("flipped", logits, out, logits, flipped.view(out.shape), None)
    assert len(c.bound_violations()) == 1 and "mismatch fraction" in c.bound_violations()[0]
    # logits: just over atol + rtol * max|logit|
    limit = 1e-4 + 0.1 * float(logits.abs().max())
    c = compare("shifted", logits, out, logits + 1.01 * limit, out, rec)
    assert len(c.bound_violations()) == 1 and c.bound_violations()[0].startswith("logits error")
    assert compare("inside", logits, out, logits + 0.99 * limit, out, rec).rounding_only


def test_bound_fields_are_validated():
    with pytest.raises(ConfigError, match="bound.min_prediction_agreement must be in"):
        Bound(min_prediction_agreement=1.5)
    with pytest.raises(ConfigError, match="bound.logits_rtol must be a number >= 0"):
        Bound(logits_rtol=-1)


def test_one_disagreeing_sample_is_allowed_on_a_small_check(firing):
    model, x = firing
    logits, rec = record_neurons(model, x[:, :16])
    out = rec["head.lif"]["spikes"]
    one = logits.clone()
    top2 = logits[0].topk(2).indices
    one[0, top2[0]], one[0, top2[1]] = logits[0, top2[1]], logits[0, top2[0]]  # sample 0's top two swapped
    c = compare("one", logits, out, one, out, rec, bound=Bound(logits_rtol=10.0))
    assert c.predictions_agree == 15 / 16 and c.within_bound  # 0.9375 < 0.95, but only one sample
    two = one.clone()
    top2 = logits[1].topk(2).indices
    two[1, top2[0]], two[1, top2[1]] = logits[1, top2[1]], logits[1, top2[0]]
    c = compare("two", logits, out, two, out, rec, bound=Bound(logits_rtol=10.0))
    assert c.bound_violations() == ["prediction agreement 0.8750 < 0.95 (one of 16 samples may disagree)"]


def test_require_agreement_raises_once_with_every_failure(firing):
    from stdeploy.errors import OutputMismatch
    from stdeploy.export.validate import require_agreement

    model, x = firing
    logits, rec = record_neurons(model, x)
    out = rec["head.lif"]["spikes"]
    good = compare("good", logits, out, logits, out, rec)
    bad = compare("bad", logits, out, logits + 100, 1 - out, None)
    require_agreement([good], "fine")
    with pytest.raises(OutputMismatch, match=r"(?s)run disagrees:\n  bad: 65536 of 65536 output spikes differ.*mismatch fraction 1 > 0.01"):
        require_agreement([good, bad], "run disagrees")
