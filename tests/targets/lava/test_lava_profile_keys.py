"""The standard lowering's choices read from a device profile and what it does with per-neuron
thresholds:

* ``[lava] attention`` (``"product"``, ``"and"`` or ``"strassen"``) picks how Spikformer attention is built, for
  the plan and the resource report; any other value is refused naming the key and the profile
  (``stdeploy run``: exit status 2, one line);
* a pruned model's sLIF (per-neuron thresholds): the float standard plan folds them into the rows
  (``vth = 1``, rows ``d / theta_i``); a ``--quantize loihi2`` graph with them is refused by name on
  ``loihi2-standard-fixed`` (Lava's ``LIFReset`` takes one ``vth``; the README's "Lava's standard
  processes on a loihi2 graph").
"""

import dataclasses
import shutil

import nir
import numpy as np
import pytest
import torch

from stdeploy.activity import estimate_batchnorm
from stdeploy.cli import main as cli_main
from stdeploy.export.directory import export_model
from stdeploy.export.manifest import write_manifest
from stdeploy.export.nir_export import to_nir, write_nir
from stdeploy.models import build_model, direct_encode
from stdeploy.models.fold import fold_batchnorm
from stdeploy.models.quantize import to_exact
from stdeploy.shipped import shipped_dir
from stdeploy.targets.base import TargetError
from stdeploy.targets.lava.graph import LavaUnsupported
from stdeploy.targets.lava.standard import lower_standard
from stdeploy.targets.lava.target import LavaTarget
from stdeploy.targets.profiles import load_profile


def _profile(tmp_path, attention: str, base: str = "loihi2-standard"):
    text = (shipped_dir("profiles") / f"{base}.toml").read_text()
    assert 'attention = "product"' in text
    path = tmp_path / f"{base}-attention-{attention}.toml"
    path.write_text(text.replace('attention = "product"', f'attention = "{attention}"'))
    return path


@pytest.fixture(scope="module")
def spikformer_export(tmp_path_factory):
    """A random-weight spikformer-tiny exported with ``spikformer="exact"`` (model.nir and a manifest)."""
    torch.manual_seed(0)
    model = fold_batchnorm(build_model("spikformer-tiny").eval())
    out = tmp_path_factory.mktemp("attention-key") / "spikformer"
    out.mkdir()
    write_nir(to_nir(model, spikformer="exact"), out / "model.nir")
    write_manifest(out, {"artifacts": {"nir": {"file": "model.nir"}}})
    return out


def test_attention_key_picks_the_lowering(spikformer_export, tmp_path):
    assert load_profile("loihi2-standard").lava["attention"] == "product"
    assert load_profile("loihi2-standard-fixed").lava["attention"] == "product"
    seen = {}
    for attention in ("product", "and", "strassen"):
        runnable = LavaTarget().compile(spikformer_export, load_profile(str(_profile(tmp_path, attention))))
        info = runnable.info
        runnable.close()
        kinds = {p["node_kind"] for p in runnable.plan["populations"]}
        assert info["attention"] == attention and (("product" in kinds) == (attention != "and"))
        seen[attention] = info["resources"]["neurons"]
    assert seen["and"] - seen["product"] == 262_144 - 33_792  # the block's own neurons (tiny: H·dh²·N² against H·dh²·(2N+1))
    assert seen["product"] - seen["strassen"] == 33_792 - 20_232  # Strassen: 4 x 7**4 products a stage against 4 x 16**3
    fixed = _profile(tmp_path, "strassen", "loihi2-standard-fixed")
    with pytest.raises(LavaUnsupported, match=r"fixed point: attention = 'strassen' is not lowered"):
        LavaTarget().compile(spikformer_export, load_profile(str(fixed)))
    bad = _profile(tmp_path, "softmax")
    with pytest.raises(TargetError, match=r"\[lava\] attention must be one of 'product', 'and', 'strassen', got 'softmax'"):
        LavaTarget().compile(spikformer_export, load_profile(str(bad)))


def test_bad_attention_key_exits_2_with_one_line(exported_sdt, tmp_path, capsys):
    bad = _profile(tmp_path, "softmax")
    rc = cli_main(["run", str(exported_sdt), "--target", "lava", "--device", str(bad), "--limit", "2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "[lava] attention must be one of" in err and str(bad) in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def slif_loihi2(digits_full, tmp_path_factory):
    """A random-weight conv-tiny with sLIF neurons whose thresholds differ per neuron, converted
    with ``to_exact(mode="loihi2")`` and exported (NIR); and the float graph before conversion."""
    torch.manual_seed(0)
    model = build_model("conv-tiny", neuron="slif")
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "threshold_log_scale"):
                m.threshold_log_scale.uniform_(-0.3, 0.3)
    xb = direct_encode(torch.stack([digits_full.train[i][0] for i in range(32)]), model.cfg.timesteps)
    estimate_batchnorm(model, [xb], gain=2.0)
    q = to_exact(model.eval(), mode="loihi2").eval()
    data = dataclasses.replace(digits_full, test=torch.utils.data.Subset(digits_full.test, range(2)))
    out = tmp_path_factory.mktemp("slif") / "conv"
    export_model(q, out, ("nir",), data=data, samples=2)
    return to_nir(fold_batchnorm(model)), out


@pytest.mark.filterwarnings("ignore:.*kept per-neuron thresholds")
def test_slif_thresholds_folded_in_float_refused_by_name_on_loihi2_standard_fixed(slif_loihi2):
    float_graph, out = slif_loihi2
    # float: per-neuron thresholds folded into the rows, vth = 1
    lifs = {n: node for n, node in float_graph.nodes.items() if isinstance(node, nir.LIF)}
    varying = [n for n, node in lifs.items() if np.unique(np.asarray(node.v_threshold)).size > 1]
    assert varying, "the sLIF thresholds should differ per neuron"
    plan = lower_standard(float_graph)
    pops = {p["name"]: p for p in plan["populations"]}
    assert all(pops[n]["vth"] == 1.0 for n in varying)
    # the loihi2 graph keeps per-neuron thresholds; Lava's LIFReset takes one vth: refused, the layer named
    graph = nir.read(str(out / "model.nir"))
    per_neuron = [n for n, node in graph.nodes.items() if isinstance(node, nir.LIF)
                  and np.unique(np.asarray(node.v_threshold)).size > 1]
    assert per_neuron
    with pytest.raises(LavaUnsupported, match=r"per-neuron thresholds") as err:
        lower_standard(graph, "fixed")
    assert any(n in str(err.value) for n in per_neuron), str(err.value)
    with pytest.raises(LavaUnsupported, match=r"per-neuron thresholds"):
        LavaTarget().compile(out, load_profile("loihi2-standard-fixed"))
    shutil.rmtree(out)
