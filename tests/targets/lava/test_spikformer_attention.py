"""Spikformer attention ``Q·Kᵀ·V`` on Lava's standard processes (:mod:`stdeploy.targets.lava.attention`):
product neurons (``ProdNeuron`` for ``Kᵀ·V`` and ``Q·M``, ``GradedVec`` for the graded sums ``M``)
instead of the NIR export's ``H·dh²·N²`` AND units.

The model is a random-weight spikformer-tiny whose BatchNorm statistics are estimated on 64 digits
(gain 2) and whose Q, K, V BatchNorm biases are raised by 0.5, so that the attention LIF fires
(rate 0.13 on the test digits; without the raise 0.004). Lava's run (float models, the products in
Lava's integer models) must give PyTorch's reference spikes exactly, with every spiking layer
firing, and a reference with the attention's output cut must differ (the attention reaches the
output spikes, so the comparison can fail).
"""

import copy
import dataclasses
from pathlib import Path

import nir
import numpy as np
import pytest
import torch

from stdeploy.activity import estimate_batchnorm, require_active
from stdeploy.export.manifest import write_manifest
from stdeploy.export.nir_export import to_nir, write_nir
from stdeploy.export.nir_interpreter import run_nir
from stdeploy.models import PRESETS, build_model, direct_encode
from stdeploy.models.fold import fold_batchnorm
from stdeploy.targets.lava.attention import attention_resources, block_counts, find_blocks, main, model_fit
from stdeploy.targets.lava.graph import LavaUnsupported, analyse
from stdeploy.targets.lava.resources import resource_report
from stdeploy.targets.lava.standard import lower_standard
from stdeploy.targets.lava.target import LavaTarget
from stdeploy.targets.profiles import load_profile

N_IMAGES = 3
BLOCK = "blocks.0.attn"


@pytest.fixture(scope="module")
def spikformer(digits_full):
    """The calibrated spikformer-tiny's exact NIR graph and ``N_IMAGES`` encoded test digits."""
    torch.manual_seed(0)
    model = build_model("spikformer-tiny")
    xb = direct_encode(torch.stack([digits_full.train[i][0] for i in range(64)]), model.cfg.timesteps)
    estimate_batchnorm(model, [xb], gain=2.0)
    attn = model.blocks[0].attn
    with torch.no_grad():
        for m in (attn.q, attn.k, attn.v):
            m.bn.bias += 0.5
    x = direct_encode(torch.stack([digits_full.test[i][0] for i in range(N_IMAGES)]), model.cfg.timesteps)
    return to_nir(fold_batchnorm(model.eval()), spikformer="exact"), x


ADDED = {"product": ("kv_prod", "kv_sum", "qkv_prod"), "and": ("qkv_and",), "strassen": ("kv_prod", "kv_sum", "qkv_prod")}


def added(plan: dict, lowering: str) -> tuple[int, int]:
    """Neurons of the attention's own populations, and synapses into them and the attention LIF."""
    names = {f"{BLOCK}.{n}" for n in ADDED[lowering]}
    neurons = sum(p["size"] for p in plan["populations"] if p["name"] in names)
    syn = sum(int(s["matrix"]["nnz"]) for s in plan["synapses"] if s["dst"] in names | {f"{BLOCK}.attn_lif"})
    return neurons, syn


def test_both_lowerings_counted_and_refused_when_not_the_exports(spikformer):
    graph, _ = spikformer
    info = analyse(graph)
    (block,) = find_blocks(info).values()
    assert (block.heads, block.dh, block.tokens, block.scale) == (4, 16, 16, 0.125)
    product, anded = lower_standard(info), lower_standard(info, attention="and")
    kinds = {p["name"]: p["node_kind"] for p in product["populations"]}
    assert kinds[f"{BLOCK}.kv_prod"] == kinds[f"{BLOCK}.qkv_prod"] == "product" and kinds[f"{BLOCK}.kv_sum"] == "graded"
    assert f"{BLOCK}.qkv_and" not in kinds and f"{BLOCK}.qkv_and" in {p["name"] for p in anded["populations"]}
    # the counts of block_counts are the built plans' (attention LIF's synapses included, q/k/v excluded)
    for plan, lowering in ((product, "product"), (anded, "and"), (lower_standard(info, attention="strassen"), "strassen")):
        want = block_counts(4, 16, 16, lowering)
        assert added(plan, lowering) == (want["neurons"], want["synapses"]), lowering
    assert block_counts(4, 16, 16, "product") == {"neurons": 33_792, "synapses": 98_304}
    assert block_counts(4, 16, 16, "and") == {"neurons": 262_144, "synapses": 1_048_576}
    # the attention LIF's input: 2 synaptic hops later with products (kv_prod, kv_sum, qkv_prod vs qkv_and)
    lat = {p["name"]: p["latency"] for p in product["populations"]}
    assert lat[f"{BLOCK}.attn_lif"] - lat[f"{BLOCK}.q_lif"] == 4
    assert {p["name"]: p["latency"] for p in anded["populations"]}[f"{BLOCK}.attn_lif"] - lat[f"{BLOCK}.q_lif"] == 2
    # fixed point: the attention LIF gets the same integers from either lowering (its input bound counts the
    # products' largest value, N), so Lava's bit-accurate runs agree spike for spike
    fixed = {lowering: lower_standard(plan, "fixed") for lowering, plan in (("product", product), ("and", anded))}
    pops = {k: next(p for p in f["populations"] if p["name"] == f"{BLOCK}.attn_lif") for k, f in fixed.items()}
    assert all(pops["product"][key] == pops["and"][key] for key in ("vth", "dv", "du", "scale_to_int"))
    syn = {k: next(s for s in f["synapses"] if s["dst"] == f"{BLOCK}.attn_lif") for k, f in fixed.items()}
    assert syn["product"]["weight_exp"] == syn["and"]["weight_exp"]
    assert set(np.unique(syn["product"]["matrix"]["values"])) == set(np.unique(syn["and"]["matrix"]["values"]))
    # resources of one block: the built plan's and (AND, above the build limit) the counted ones agree
    for lowering in ("product", "and"):
        built = attention_resources(4, 16, 16, lowering)
        assert built.neurons - 64 * 16 == block_counts(4, 16, 16, lowering)["neurons"]
    counted, built = attention_resources(4, 16, 16, "and", build_limit=0), attention_resources(4, 16, 16, "and")
    assert [dataclasses.astuple(x)[:8] for x in counted.layers] == [dataclasses.astuple(x)[:8] for x in built.layers]
    # the whole model's report holds the product layers
    layers = {x.layer: x for x in resource_report(product).layers}
    assert layers[f"{BLOCK}.kv_prod"].neurons == 16_384 and layers[f"{BLOCK}.kv_prod"].fan_in == 2
    assert layers[f"{BLOCK}.kv_sum"].fan_in == 16
    # model_fit's whole-model figures are lower bounds of the built plan's report
    whole, fit = resource_report(product), model_fit(PRESETS["spikformer-tiny"], "product")
    assert fit["block_cores"] == attention_resources(4, 16, 16, "product").cores
    assert fit["model_cores_at_least"] <= whole.cores and fit["rest_synapses_at_least"] <= whole.synapses - 98_304
    assert fit["fan_in_residual"] <= layers["head.lif"].fan_in
    # a graph whose AND nodes are not the export's is refused by name, not lowered as attention
    bad = copy.copy(graph)
    bad.nodes = dict(graph.nodes)
    w = np.array(graph.nodes[f"{BLOCK}.sum_c"].weight)
    w[0, np.flatnonzero(w[0, :, 0])[0], 0] = 0.25
    bad.nodes[f"{BLOCK}.sum_c"] = nir.Conv1d(input_shape=16, weight=w, stride=1, padding=0, dilation=1, groups=1,
                                             bias=np.zeros(w.shape[0], np.float32))
    with pytest.raises(LavaUnsupported, match=rf"{BLOCK}.sum_c: expected one attention scale"):
        lower_standard(bad)


def test_spikformer_4_384_block_resources(capsys):
    cfg = PRESETS["spikformer-4-384"]
    heads, dh, n = cfg.heads, cfg.embed_dim // cfg.heads, cfg.tokens
    assert (heads, dh, n) == (12, 32, 64)
    product = attention_resources(heads, dh, n, "product", load_profile("loihi2-standard").limits)
    anded = attention_resources(heads, dh, n, "and", load_profile("loihi2-standard").limits)
    assert product.neurons - 384 * 64 == 2 * 12 * 32 * 32 * 64 + 12 * 32 * 32 == 1_585_152
    assert anded.neurons - 384 * 64 == 12 * 32 * 32 * 64 * 64 == 50_331_648
    assert product.synapses == 6 * 12 * 32 * 32 * 64 and anded.synapses == 4 * 50_331_648
    assert product.cores < anded.cores
    assert main(["spikformer-tiny", "spikformer-4-384"]) == 0
    out = capsys.readouterr().out
    assert "| spikformer-4-384 | 12 | 32 | 64 | product | 1,585,152 |" in out
    # Strassen's products: one chip for a 4-384 block (the README's table)
    assert "| spikformer-4-384 | 12 | 32 | 64 | strassen | 819,024 | 35,831,808 | 322,486,272 | 114 | yes |" in out
    assert "| spikformer-4-384 | strassen | 114 (1) | 452,984,832, 484 | >= 940, >= 8 |" in out
    assert main(["sdt-tiny"]) == 2


@pytest.mark.lava
@pytest.mark.timeout(300)
def test_spikformer_tiny_products_on_lava_are_exact(spikformer, tmp_path, one_thread):
    graph, x = spikformer
    rec = run_nir(graph, x, record=True)
    spikes = rec["spikes"].transpose(-1, -2).numpy()
    rates = {n: float(rec[n].mean()) for n, node in graph.nodes.items() if type(node).__name__ in ("LIF", "Threshold")}
    require_active(rates, what="reference")
    assert rates[f"{BLOCK}.attn_lif"] > 0.05, rates
    # the attention reaches the output spikes: cut its output and they differ
    cut = copy.copy(graph)
    cut.nodes = dict(graph.nodes)
    node = graph.nodes[f"{BLOCK}.sum_c"]
    cut.nodes[f"{BLOCK}.sum_c"] = nir.Conv1d(input_shape=16, weight=np.zeros_like(node.weight), stride=1, padding=0,
                                             dilation=1, groups=1, bias=np.zeros(node.weight.shape[0], np.float32))
    assert (run_nir(cut, x)["spikes"].transpose(-1, -2).numpy() != spikes).sum() > 0
    export = tmp_path / "spikformer"
    export.mkdir()
    write_nir(graph, export / "model.nir")
    write_manifest(export, {"artifacts": {"nir": {"file": "model.nir"}}})
    with LavaTarget().compile(export, load_profile("loihi2-standard")) as runnable:
        r = runnable.run(x.numpy())
    built = r.info["lava_processes_built"]
    assert built["lava.proc.prodneuron.process.ProdNeuron"] == 2 and built["lava.proc.graded.process.GradedVec"] == 1
    assert all(cls.startswith("lava.proc.") for cls in built) and r.info["simulation_only"] == []
    assert "lava.proc.prodneuron.models.PyProdNeuronModelFixed" in r.info["lava_models"]
    assert r.spikes.shape == spikes.shape
    assert int((r.spikes != spikes).sum()) == 0
    assert r.info["resources"]["neurons"] < 64 * 16 * 100  # the product lowering's report (the AND one: > 262,144)
    # the same graph with [lava] attention = "strassen": fewer product neurons, the same spikes
    profile = tmp_path / "strassen.toml"
    profile.write_text(Path(load_profile("loihi2-standard").path).read_text()
                       .replace('attention = "product"', 'attention = "strassen"'))
    with LavaTarget().compile(export, load_profile(str(profile))) as runnable:
        r2 = runnable.run(x.numpy())
    assert r2.info["attention"] == "strassen" and r2.info["lava_processes_built"]["lava.proc.prodneuron.process.ProdNeuron"] == 2
    assert int((r2.spikes != spikes).sum()) == 0
    assert r2.info["resources"]["neurons"] == r.info["resources"]["neurons"] - (33_792 - 20_232)
