"""The integer-exact mode on a small deep model (4 blocks): bit-identical spikes and logits on
PyTorch (float32 and float64), onnxruntime, TVM CPU and the NIR interpreter at batch 1 and 32, and
the float mode's cascade on the same model. The same for the demo's DSP-30 form of the model
(low-rank factors merged into dense 8-bit layers), and Lava's bit-accurate fixed-point LIF on the
dense exact model (a few samples; CUDA is not covered here: no GPU).

TVM builds take minutes on the shared CPU, so there are two: the dense exact model at batch 32, the
DSP one (same architecture once merged) at batch 1.

The float model happens to agree across runtimes on plain digits (its membranes rarely sit within
an ulp of threshold at this size), so the float part perturbs the summation: inputs are built so
that one first-layer membrane lands on its threshold up to rounding (PyTorch float32 and float64
disagree on that spike by construction), and the runs are compared against float64 and the other
runtimes. The same inputs, rounded to the exact mode's input grid, give identical results
everywhere in the exact mode, float64 included.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from stdeploy.checkpoint import load_checkpoint, save_checkpoint
from stdeploy.data import load_dataset
from stdeploy.errors import UnsupportedPrimitive
from stdeploy.export.exact import check_exact, grid_of
from stdeploy.export.manifest import write_manifest
from stdeploy.export.nir_export import to_nir
from stdeploy.export.nir_interpreter import run_nir
from stdeploy.export.onnx_export import export_onnx, run_onnx
from stdeploy.export.validate import ROUNDING_LIMIT, compare, record_neurons
from stdeploy.models import build_model, direct_encode
from stdeploy.models.quantize import QMAX, deployable, exact_layers, is_exact, quantize_input, to_exact
from stdeploy.prune import recalibrate_bn

BATCH = 32
T = 2  # timesteps: two steps keep the membrane's carry from one step to the next; TVM's unrolled build grows with T


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def deep(digits):
    """sdt, 4 blocks, D = 32, T = 2, random weights with BatchNorm statistics estimated on 256 digits."""
    torch.manual_seed(0)
    model = build_model("sdt-tiny", depth=4, embed_dim=32, heads=2, mlp_ratio=2.0, timesteps=T)
    recalibrate_bn(model, torch.utils.data.Subset(digits.train, range(256)), batch_size=64)
    return model.eval()


def boundary_inputs(folded, images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per image, move one pixel so that a first-layer neuron's input sum is 2 (membrane ``z/2`` at
    threshold 1 on the first step) up to rounding, choosing the float32 neighbour where PyTorch's
    float32 sum and the float64 sum fall on different sides. Returns the images and how many were
    placed on the boundary."""
    conv = folded.embed.stages[0].conv.conv
    theta = float(folded.embed.stages[0].lif.threshold[0])
    d = float(folded.embed.stages[0].lif.decay[0])
    target = theta / d
    conv64 = torch.nn.Conv2d(1, conv.out_channels, 3, padding=1).double()
    conv64.load_state_dict({k: v.double() for k, v in conv.state_dict().items()})
    out, placed = images.clone(), 0
    h = w = images.shape[-1] // 2
    for i in range(len(images)):
        done = False
        for c in torch.argsort(conv.weight[:, 0, 1, 1].abs(), descending=True).tolist():
            img = images[i:i + 1].clone()
            wc = float(conv.weight[c, 0, 1, 1])
            z = float(conv64(img.double())[0, c, h, w])
            base = np.float32(float(img[0, 0, h, w]) + (target - z) / wc)
            for k in range(-6, 7):
                val = base
                for _ in range(abs(k)):
                    val = np.nextafter(val, np.float32(np.inf if k > 0 else -np.inf))
                img[0, 0, h, w] = float(val)
                with torch.no_grad():
                    z32 = float(conv(img)[0, c, h, w]) * d
                    z64 = float(conv64(img.double())[0, c, h, w]) * d
                if (z32 >= theta) != (z64 >= theta):
                    out[i], done = img[0], True
                    break
            if done:
                placed += 1
                break
    return out, placed


def write_dir(path, folded):
    path.mkdir(parents=True, exist_ok=True)
    export_onnx(folded, path / "model.onnx")
    write_manifest(path, {"artifacts": {"onnx": {"file": "model.onnx"}}})  # sealed: size and sha256 recorded
    return path


def head_spikes(model, x):
    with torch.no_grad():
        logits, records = record_neurons(model, x)
    return logits, records


def nir_outputs(graph, x):
    outs = run_nir(graph, x)
    return outs["logits"].mean(0), outs["spikes"].transpose(-1, -2)


@pytest.fixture(scope="module")
def dsp(deep, digits):
    """The demo's DSP-30 of the deep model: block linears factored to 30% of their parameters (the
    ranks with the largest group norms), no fine-tune, BatchNorm statistics re-estimated."""
    import copy

    from stdeploy.prune import PruneConfig, make_pruner

    model = copy.deepcopy(deep)
    pruner = make_pruner(PruneConfig(method="dsp", param_ratio=0.3))
    model = pruner.prepare(model)
    pruner.step(model)
    model = pruner.finalize(model)
    assert abs(pruner.report(model)["param_ratio"] - 0.3) < 0.01
    recalibrate_bn(model, torch.utils.data.Subset(digits.train, range(256)), batch_size=64)
    return model.eval()


@pytest.fixture(scope="module")
def runs(deep, dsp, digits, tmp_path_factory):
    """Both modes on the same boundary inputs: every runtime's logits and output spikes."""
    from stdeploy.targets.profiles import load_profile
    from stdeploy.targets.tvm.target import TVMTarget

    float_model = deployable(deep)
    images = torch.stack([digits.test[i][0] for i in range(BATCH)])
    images, placed = boundary_inputs(float_model, images)
    exact_model = to_exact(deep).eval()
    out = {"placed": placed}
    exact_x = direct_encode(quantize_input(images), T)
    for mode, model, x in (("float", float_model, direct_encode(images, T)),
                           ("exact", deployable(exact_model), exact_x),
                           ("dsp", deployable(to_exact(dsp)), exact_x)):
        logits, records = head_spikes(model, x)
        r = {"x": x, "model": model, "logits": logits, "records": records, "spikes": records["head.lif"]["spikes"]}
        l64, rec64 = head_spikes(deployable(model).double(), x.double())
        r["float64"] = (l64.float(), rec64["head.lif"]["spikes"].float(), {k: v["spikes"].float() for k, v in rec64.items()})
        path = write_dir(tmp_path_factory.mktemp(mode), model)
        r["onnxruntime"] = run_onnx(path / "model.onnx", x)
        r["graph"] = to_nir(model)
        r["nir"] = nir_outputs(r["graph"], x)
        if mode == "exact":  # TVM builds take minutes on a loaded machine: one per model, dense at batch 32
            tvm = TVMTarget().compile(path, load_profile("cpu"), batch_size=BATCH, sparse="off")
            res = tvm.run(x.numpy())
            r["tvm"] = (torch.from_numpy(res.logits), torch.from_numpy(res.spikes))
        if mode == "dsp":  # ... and DSP-30 at batch 1
            tvm = TVMTarget().compile(path, load_profile("cpu"), batch_size=1, sparse="off")
            r["tvm_batch1"] = [tvm.run(x[:, i:i + 1].numpy()) for i in (0, 7, BATCH - 1)]
        r["batch1"] = {"onnxruntime": [run_onnx(path / "model.onnx", x[:, i:i + 1]) for i in (0, 7, BATCH - 1)],
                       "nir": [nir_outputs(r["graph"], x[:, i:i + 1]) for i in (0, 7, BATCH - 1)]}
        out[mode] = r
    return out


def test_every_layer_fires(runs):
    for mode in ("float", "exact", "dsp"):
        rates = {k: float(v["spikes"].mean()) for k, v in runs[mode]["records"].items()}
        assert len(rates) == 2 + 4 * 7 + 1  # two embedding stages, seven LIFs per block, the head
        assert min(rates.values()) > 0.01, (mode, rates)
        assert 0.05 < rates["head.lif"] < 0.95


@pytest.mark.parametrize("mode", ["exact", "dsp"])
def test_exact_mode_is_bit_identical_everywhere(runs, mode):
    r = runs[mode]
    ref_logits, ref_spikes = r["logits"], r["spikes"]
    for name in ("float64", "onnxruntime", "nir") + (("tvm",) if mode == "exact" else ()):
        logits, spikes = r[name][:2]
        assert int((spikes != ref_spikes).sum()) == 0, name
        assert torch.equal(logits, ref_logits), (name, float((logits - ref_logits).abs().max()))
    for i, j in enumerate((0, 7, BATCH - 1)):  # batch 1
        for name in ("onnxruntime", "nir"):
            logits, spikes = r["batch1"][name][i]
            assert torch.equal(spikes, ref_spikes[:, j:j + 1]) and torch.equal(logits, ref_logits[j:j + 1]), (name, j)
        if mode == "dsp":
            res = r["tvm_batch1"][i]
            assert np.array_equal(res.spikes, ref_spikes[:, j:j + 1].numpy()) and np.array_equal(res.logits, ref_logits[j:j + 1].numpy())
    # membranes land exactly on their thresholds, and still every runtime agrees
    at_threshold = sum(int(((rec["membrane"] - rec["threshold"]) == 0).sum()) for rec in r["records"].values())
    assert at_threshold > 0


def test_float_mode_cascades_from_one_rounding_flip(runs):
    assert runs["placed"] >= BATCH // 2
    r = runs["float"]
    l64, s64, layers64 = r["float64"]
    result = compare("float64", r["logits"], r["spikes"], l64, s64, r["records"], layers64)
    # the first diverging layer is the one the inputs were built for, at rounding distance
    assert result.flips and result.flips[0]["layer"] == "embed.stages.0.lif" and result.max_flip_distance < ROUNDING_LIMIT
    assert result.flips[0]["flips"] >= 1
    assert result.spike_mismatches >= 1, result.flips  # ... and it reaches the output spikes
    others = {name: int((r[name][1] != r["spikes"]).sum()) for name in ("onnxruntime", "nir")}
    print(f"float mode, output spikes differing from PyTorch float32: float64 {result.spike_mismatches}, {others}; "
          f"flips by layer {[(f['layer'], f['flips']) for f in result.flips]}")


def test_checker_passes_exact_and_names_float_layers(runs):
    for mode in ("exact", "dsp"):
        bounds = check_exact(runs[mode]["graph"])
        assert max(b["bits"] for b in bounds.values()) <= 24
    with pytest.raises(UnsupportedPrimitive, match=r"embed\.stages\.0\.conv: partial sums reach 2\^\d+"):
        check_exact(runs["float"]["graph"])


def test_checker_refuses_a_layer_over_the_bound(deep):
    model = to_exact(deep).eval()
    with torch.no_grad():  # a bias of 2^25 weight units makes fc1 of block 2 overflow float32's integers
        fc1 = model.blocks[2].mlp.fc1
        fc1.bias[0] = float(fc1.scale()) * 2.0 ** 25
    with pytest.raises(UnsupportedPrimitive, match=r"blocks\.2\.mlp\.fc1: partial sums reach 2\^25\.\d") as err:
        check_exact(to_nir(deployable(model)))
    assert "blocks.1" not in str(err.value)


def test_quantised_values_are_on_their_grids(deep):
    model = to_exact(deep)
    layers = exact_layers(model)
    assert len(layers) == 2 + 1 + 4 * 6 + 1  # 2 embedding convs + rpe, 6 linears per block, the head
    for name, m in model.named_modules():
        if name in layers:
            w, b = m.quantized()
            s = layers[name]["scale"]
            assert float(torch.log2(torch.tensor(s))).is_integer()
            assert torch.equal(w / s, torch.round(w / s)) and float((w / s).abs().max()) <= QMAX
            assert b is None or torch.equal(b / s, torch.round(b / s))
            assert grid_of(w.detach().numpy()) >= s
    for lif in model.modules():
        if hasattr(lif, "decay_"):
            assert torch.all(lif.decay_ == 0.5) and grid_of(lif.threshold_.numpy()) >= 2 ** -8


def test_straight_through_gradients_reach_every_weight(deep, digits):
    model = to_exact(deep).train()
    x = direct_encode(torch.stack([digits.train[i][0] for i in range(16)]), T)
    y = torch.tensor([digits.train[i][1] for i in range(16)])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing


def test_checkpoint_records_and_reapplies_the_mode(deep, digits, tmp_path):
    model = to_exact(deep).eval()
    save_checkpoint(tmp_path / "ck", model, meta={"quantize": "exact"})
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.meta["quantize"] == "exact" and is_exact(loaded.model)
    x = direct_encode(torch.stack([digits.test[i][0] for i in range(8)]), T)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), model(x))


def test_cli_quantize_and_export_exact(deep, tmp_path):
    save_checkpoint(tmp_path / "dense", deep)
    env_run = [sys.executable, "-m", "stdeploy.cli"]
    q = subprocess.run(env_run + ["quantize", str(tmp_path / "dense"), "--epochs", "0", "--out", str(tmp_path / "exact"), "--json", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr
    report = json.loads(q.stdout.strip().splitlines()[-1])
    assert report["mode"] == "exact" and set(report["accuracy"]) == {"float", "quantized"}
    e = subprocess.run(env_run + ["export", str(tmp_path / "exact"), "--out", str(tmp_path / "export"), "--samples", "32", "--json", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert e.returncode == 0, e.stderr
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["quantize"]["mode"] == "exact" and manifest["quantize"]["max_bits"] <= 24
    for name in ("nir", "onnx", "onnx.step"):
        res = manifest["validation"]["results"][name]
        assert res["spike_mismatches"] == 0 and res["logits_max_abs_error"] == 0.0
    bad = subprocess.run(env_run + ["quantize", str(tmp_path / "dense"), "--epochs", "-1", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "epochs" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_prune_then_quantize_keeps_zeros_and_saves_the_mode(digits, tmp_path):
    from stdeploy.prune import CompensationConfig, PruneConfig, QuantizeConfig, prune_model

    sub = torch.utils.data.Subset
    data = type(digits)(**{**digits.__dict__, "train": sub(digits.train, range(48)), "test": sub(digits.test, range(32))})
    torch.manual_seed(0)
    model = build_model("sdt-tiny")
    ccfg = CompensationConfig(neuron="none", epochs=0, penalty_epochs=0, recalibrate_bn=False, device="cpu")
    exact, report = prune_model(model, data, PruneConfig(method="l1p", sparsity=0.5), ccfg, out=tmp_path / "ck", progress=False,
                                quantize=QuantizeConfig(epochs=1, batch_size=16, device="cpu"))
    assert is_exact(exact) and set(report["quantize"]["accuracy"]) == {"float", "quantized", "quantized_finetuned"}
    block = [m for n, m in exact.named_modules() if n.startswith("blocks.") and hasattr(m, "mask")]
    pruned = sum(int((~m.mask).sum()) for m in block) / sum(m.mask.numel() for m in block)
    assert pruned >= 0.5  # the masks hold the pruned zeros through the quantisation-aware fine-tune
    assert all(torch.all(m.quantized()[0][~m.mask] == 0) for m in block)
    fc1 = exact.blocks[0].mlp.fc1
    w, _ = fc1.quantized()
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.meta["quantize"] == "exact" and is_exact(loaded.model)
    assert torch.equal(loaded.model.blocks[0].mlp.fc1.quantized()[0], w)


def test_low_rank_layers_are_merged_and_factors_would_not_be_exact(dsp):
    """DSP in the exact mode: every ``LowRankLinear`` becomes one dense ``QuantLinear`` holding the
    quantised product ``U V``. Quantising the factors separately instead puts ``u``'s sums on the
    product of two layer grids, and the checker refuses the residual stream's readers by name."""
    from stdeploy.models.fold import fold_batchnorm
    from stdeploy.models.quantize import QuantLinear, merge_low_rank
    from stdeploy.models.structure import LowRankLinear

    folded = fold_batchnorm(dsp)
    low_rank = {n: m for n, m in folded.named_modules() if isinstance(m, LowRankLinear)}
    assert len(low_rank) == 4 * 6
    exact = to_exact(dsp)
    assert not any(isinstance(m, LowRankLinear) for m in exact.modules())
    for name, lr in low_rank.items():
        q = exact.get_submodule(name)
        assert isinstance(q, QuantLinear) and q.weight.shape == (lr.out_features, lr.in_features)
        dense = merge_low_rank(lr)
        assert torch.allclose(dense.weight, lr.weight, atol=1e-6) and torch.equal(q.weight, dense.weight)
    factored = deployable(exact)
    for name, lr in low_rank.items():  # the alternative: each factor on its own power-of-two grid
        if name.endswith("mlp.fc2"):
            new = LowRankLinear(lr.in_features, lr.out_features, lr.rank, bias=True)
            new.u, new.v = QuantLinear(lr.u).frozen(), QuantLinear(lr.v).frozen()
            parent, _, leaf = name.rpartition(".")
            setattr(factored.get_submodule(parent), leaf, new)
    with pytest.raises(UnsupportedPrimitive, match=r"head\.lif: membrane updates reach 2\^\d+\.\d") as err:
        check_exact(to_nir(factored), timesteps=4)  # over the preset's 4 steps (the grid refines every step)
    print(f"factors quantised separately: {err.value}")


def test_low_rank_convolutions_fold_into_u_and_merge_in_the_exact_mode():
    """DSP's whole-model scope: a ``LowRankConv2d`` before BatchNorm folds the BN scale and shift into
    its 1x1 ``u``; the exact mode merges it into one dense ``QuantConv`` of the layer's kernel (like
    ``LowRankLinear``), and the exact model's NIR passes the exactness check."""
    from torch import nn

    from stdeploy.models.fold import FoldedConv, fold_batchnorm
    from stdeploy.models.quantize import QuantConv, merge_low_rank
    from stdeploy.models.structure import LowRankConv2d

    torch.manual_seed(0)
    model = build_model("sdt-tiny").eval()
    for cbn in (model.embed.stages[1].conv, model.embed.rpe):
        cbn.conv = LowRankConv2d.from_dense(cbn.conv, rank=8)
        with torch.no_grad():  # statistics of a trained BN, so folding has something to fold
            cbn.bn.running_mean.uniform_(-0.5, 0.5)
            cbn.bn.running_var.uniform_(0.5, 2.0)
            cbn.bn.weight.uniform_(0.5, 1.5)
    folded = fold_batchnorm(model)
    x = direct_encode(torch.rand(8, 1, 8, 8), 4)
    for name, cbn in (("embed.stages.1.conv", model.embed.stages[1].conv), ("embed.rpe", model.embed.rpe)):
        f = folded.get_submodule(name)
        assert isinstance(f, FoldedConv) and isinstance(f.conv, LowRankConv2d) and f.conv.rank == 8 and f.conv.v.bias is None
        torch.testing.assert_close(f.conv.v.weight, cbn.conv.v.weight, rtol=0, atol=0)   # v untouched, BN in u
        y = torch.rand(2, 4, cbn.conv.in_channels, 8, 8).round()
        with torch.no_grad():
            torch.testing.assert_close(f(y), cbn(y), rtol=1e-5, atol=1e-5)
        merged = merge_low_rank(f.conv)
        assert type(merged) is nn.Conv2d and merged.weight.shape == (64, cbn.conv.in_channels, 3, 3)
        assert merged.padding == (1, 1) and torch.allclose(merged.weight, f.conv.weight, atol=1e-6)
    exact = to_exact(model)
    assert not any(isinstance(m, LowRankConv2d) for m in exact.modules())
    for name in ("embed.stages.1.conv", "embed.rpe"):
        q = exact.get_submodule(name)
        assert isinstance(q, QuantConv) and torch.equal(q.weight, merge_low_rank(folded.get_submodule(name).conv).weight)
    check_exact(to_nir(deployable(exact)), timesteps=4)   # raises naming the layer where a sum would round
    with torch.no_grad():
        assert exact(quantize_input(x)).shape == (8, 10)


def test_a_low_rank_classifier_of_20_tokens_gets_the_power_of_two_token_mean():
    """DSP's whole-model scope factors ``head.fc``: on ``sdt-1d-tiny`` (20 tokens) the exact mode still
    makes the token mean a sum times 2^-5 (the factors merged first), so the logits stay dyadic."""
    from stdeploy.models.quantize import QuantLinear
    from stdeploy.models.structure import LowRankLinear

    torch.manual_seed(0)
    model = build_model("sdt-1d-tiny").eval()
    dense = to_exact(model)
    model.head.fc = LowRankLinear.from_dense(model.head.fc)   # full rank: the same function
    exact = to_exact(model)
    assert isinstance(model.head.fc, LowRankLinear)   # the caller's model is not changed
    assert isinstance(exact.head.fc, QuantLinear) and exact.head.token_scale == dense.head.token_scale == 2.0 ** -5
    torch.testing.assert_close(exact.head.fc.weight, dense.head.fc.weight, rtol=0, atol=1e-6)
    check_exact(to_nir(deployable(exact)), timesteps=4)


# ----------------------------------------------------------------------------- Lava fixed point
LAVA_SAMPLES = 2  # Lava starts one process per population and synapse (110 here): the run costs 8-12 s on the shared machine


def exact_graph(model, input_frac_bits: int | None = None):
    graph = to_nir(model)
    graph.metadata["quantize"] = {"mode": "exact", **({} if input_frac_bits is None else {"input_frac_bits": input_frac_bits})}
    return graph


def test_lava_fixed_point_uses_the_models_integers(deep):
    """The fixed-point plan of an exact graph keeps the model's 8-bit integers (no re-quantisation);
    with the default 8-bit input contract the first layer's proven range needs more than Loihi's
    24-bit registers, so the plan takes the finest input grid that fits (2^-7 for this model, said in a
    warning and in the plan's input_contract); with a 4-bit input grid every layer fits as it is."""
    from stdeploy.targets.lava.lowering import lower

    exact = to_exact(deep).eval()
    with pytest.warns(UserWarning, match=r"inputs are rounded to 2\^-\d in \[0, 1\]") as caught:
        plan = lower(exact_graph(deployable(exact)), "fixed", weight_bits=8)
    k = plan["input_contract"]["frac_bits"]  # the grid depends on the model (its T and weights): 2^-7 here at T = 2
    assert 4 <= k < 8 and plan["input_contract"] == {"lo": 0.0, "hi": 1.0, "frac_bits": k}
    assert any(f"rounded to 2^-{k} in [0, 1]" in str(w.message) for w in caught)
    with pytest.warns(UserWarning, match=rf"inputs are rounded to 2\^-{k} in"):  # the finest that fits: 2^-(k+1) does not
        assert lower(exact_graph(deployable(exact), input_frac_bits=k + 1), "fixed", weight_bits=8)["input_contract"]["frac_bits"] == k
    pops = {k: v for k, v in plan["quant"].items() if "proven" in v}
    assert len(pops) == 2 + 4 * 7 + 1
    assert all(v["proven"] for v in pops.values())
    by_name = {p["name"]: p for p in plan["procs"]}
    conv = by_name["embed.stages.0.conv@embed.stages.0.lif"]["params"]
    W, B, s = exact.embed.stages[0].conv.integers()
    assert np.array_equal(conv["op_spec"]["weight"] * 2.0 ** conv["exp"], W.numpy() * 2.0 ** conv["exp"])
    fc1 = by_name["blocks.2.mlp.fc1@blocks.2.mlp.lif2"]["params"]
    assert np.array_equal(fc1["op_spec"]["weight"].reshape(exact.blocks[2].mlp.fc1.integers()[0].shape),
                          exact.blocks[2].mlp.fc1.integers()[0].numpy())
    lifs = [p["params"] for p in plan["procs"] if p["kind"] == "lif" and p["name"] in pops]
    assert all(p["dv"] == 2048 and p["du"] == 4095 and p["bias"] == 0 for p in lifs)  # d = 1/2, u = a_in << 6
    plan4 = lower(exact_graph(deployable(exact), input_frac_bits=4), "fixed", weight_bits=8)
    assert all(v["proven"] for v in plan4["quant"].values() if "proven" in v)
    assert plan4["input_contract"] == {"lo": 0.0, "hi": 1.0, "frac_bits": 4}  # the graph's own grid fits: kept


@pytest.mark.lava
@pytest.mark.timeout(600)
def test_lava_fixed_point_is_bit_identical(deep, digits, tmp_path):
    """Lava's bit-accurate LIF (``PyLifModelBitAcc``: 12-bit decays, ``<< 6``, 24-bit u and v) on
    the exact 4-block model, inputs on the digits' own grid ``k/16`` (``input_frac_bits = 4``, so
    every layer's proven range fits Loihi's registers): output spikes and logits bit-identical to PyTorch."""
    import dataclasses

    from stdeploy.export.nir_export import write_nir
    from stdeploy.targets.lava.target import LavaTarget
    from stdeploy.targets.profiles import load_profile

    model = deployable(to_exact(deep).eval())
    path = tmp_path / "lava"
    path.mkdir()
    write_nir(exact_graph(model, input_frac_bits=4), path / "model.nir")
    write_manifest(path, {"artifacts": {"nir": {"file": "model.nir"}}})
    images = torch.stack([digits.test[i][0] for i in range(LAVA_SAMPLES)])
    assert torch.equal(images * 16, torch.round(images * 16)) and float(images.min()) >= 0 and float(images.max()) <= 1
    x = direct_encode(images, T)
    logits, records = head_spikes(model, x)
    rates = {k: float(v["spikes"].mean()) for k, v in records.items()}
    assert min(rates.values()) > 0, rates
    profile = load_profile("loihi2")
    profile = dataclasses.replace(profile, lava={**profile.lava, "mode": "fixed", "weight_bits": 8})
    with LavaTarget().compile(path, profile) as runnable:
        assert all(v["proven"] for v in runnable.info["quantisation"].values() if "proven" in v)
        res = runnable.run(x.numpy())
    spikes = records["head.lif"]["spikes"].numpy()
    assert int((res.spikes != spikes).sum()) == 0 and np.array_equal(res.logits, logits.numpy())
    print(f"lava fixed point, exact mode: 0 of {spikes.size} output spikes differ, logits identical; "
          f"firing rates {min(rates.values()):.3f}-{max(rates.values()):.3f} (head {rates['head.lif']:.3f})")
