"""``loihi2-standard-fixed`` (Lava's standard processes, bit-accurate models) on a ``--quantize
loihi2`` graph: the trained integers read as ``loihi2-fixed`` reads them (each population in its
current unit ``U``, the layers' 8-bit mantissas, the integer ``vth``, the graph's own 2^-4 input
grid), never re-quantised, so Lava's spikes equal PyTorch's exactly.

The model is a random-weight conv-tiny (BatchNorm statistics estimated on 64 digits, gain 2)
converted with ``to_exact(mode="loihi2")``: on 3 test digits its layers fire at 0.18-0.24, and the
re-quantising path this replaces differed from PyTorch on 116 of 8,192 head spikes of 4 digits.
"""

import dataclasses

import nir
import numpy as np
import pytest
import torch

from stdeploy.activity import estimate_batchnorm, require_active
from stdeploy.export.directory import export_model
from stdeploy.export.validate import logits_and_spikes
from stdeploy.models import build_model, direct_encode
from stdeploy.models.quantize import to_exact
from stdeploy.targets.lava.standard import lower_standard, to_fixed
from stdeploy.targets.lava.target import LavaTarget
from stdeploy.targets.profiles import load_profile

N_IMAGES = 3


@pytest.fixture(scope="module")
def loihi2_conv(digits_full, tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("conv-tiny")
    xb = direct_encode(torch.stack([digits_full.train[i][0] for i in range(64)]), model.cfg.timesteps)
    estimate_batchnorm(model, [xb], gain=2.0)
    q = to_exact(model.eval(), mode="loihi2").eval()
    data = dataclasses.replace(digits_full, test=torch.utils.data.Subset(digits_full.test, range(N_IMAGES)))
    out = tmp_path_factory.mktemp("loihi2") / "conv"
    manifest = export_model(q, out, ("nir",), data=data, samples=N_IMAGES)
    x = direct_encode(torch.stack([digits_full.test[i][0] for i in range(N_IMAGES)]), q.cfg.timesteps)
    return q, out, manifest, x


def test_loihi2_graph_keeps_its_integers_in_the_standard_plan(loihi2_conv):
    _, out, _, _ = loihi2_conv
    float_plan = lower_standard(nir.read(str(out / "model.nir")))
    assert float_plan["loihi2"] == {"input_contract": {"lo": 0.0, "hi": 1.0, "frac_bits": 4}}
    fixed = lower_standard(float_plan, "fixed")
    assert fixed["input_contract"] == {"lo": 0.0, "hi": 1.0, "frac_bits": 4}
    lifs = [p for p in fixed["populations"] if p["node_kind"] == "LIF"]
    assert lifs and all(p["loihi2"]["vth"] == p["vth"] and p["du"] == 4095 and p["dv"] == 2048 for p in lifs)
    into = [s for s in fixed["synapses"] if s["dst"] in {p["name"] for p in lifs}]
    assert into and all(fixed["quant"][s["name"]].get("loihi2") for s in into)
    # without the loihi2 facts the same float plan is re-quantised (normalised thresholds, other integers)
    plain = {**float_plan, "loihi2": None, "populations": [{k: v for k, v in p.items() if k != "loihi2"} for p in float_plan["populations"]]}
    requant = to_fixed(plain)
    assert [p["vth"] for p in requant["populations"] if p["node_kind"] == "LIF"] != [p["vth"] for p in lifs]


@pytest.mark.lava
@pytest.mark.timeout(300)
def test_loihi2_standard_fixed_equals_pytorch(loihi2_conv, one_thread):
    q, out, manifest, x = loihi2_conv
    rates = manifest["validation"]["activity"]["firing_rates"]
    require_active(rates, what="loihi2 conv-tiny")
    ref = logits_and_spikes(q, x)[1].numpy()
    with LavaTarget().compile(out, load_profile("loihi2-standard-fixed")) as runnable:
        r = runnable.run(x.numpy())
    assert runnable.info["input_contract"] == {"lo": 0.0, "hi": 1.0, "frac_bits": 4}
    assert all(m.startswith("lava.proc.") and ("BitAcc" in m or "Fixed" in m) for m in r.info["lava_models"]), r.info["lava_models"]
    assert r.spikes.shape == ref.shape and 0.02 < float(r.spikes.mean()) < 0.9
    assert int((r.spikes != ref).sum()) == 0
