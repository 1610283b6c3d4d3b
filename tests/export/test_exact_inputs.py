"""The exact mode's input contract: a signed range for standardised data (MNIST-1D), recorded in
the checkpoint, the manifest and the NIR metadata, used by the export's proof, applied (clip, then
round) on every run; and Lava fixed point's input grid, fitted to Loihi's 24-bit registers or
refused by name.

Small models only (``sdt-1d-tiny``: one block, random weights with BatchNorm statistics estimated
on 256 MNIST-1D sequences, so every layer fires; checked where spikes are compared).
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import nir
import numpy as np
import pytest
import torch

from stdeploy.checkpoint import load_checkpoint, save_checkpoint
from stdeploy.data import load_dataset
from stdeploy.errors import ConfigError, UnsupportedPrimitive
from stdeploy.export.exact import check_exact, contract_metadata, graph_input_contract, manifest_input_contract
from stdeploy.export.nir_export import to_nir
from stdeploy.models import build_model, direct_encode
from stdeploy.models.quantize import InputContract, deployable, input_contract_of, to_exact
from stdeploy.prune import recalibrate_bn

SIGNED = InputContract.covering(-4.19, 4.07)  # MNIST-1D's training split, rounded outward to 2^-8


@pytest.fixture(scope="module")
def mnist1d(mnist1d_cache):
    """MNIST-1D with 256 training and 64 test sequences (generated once per run: tests/conftest.py)."""
    d = load_dataset("mnist1d", mnist1d_cache / "mnist1d")
    sub = torch.utils.data.Subset
    return dataclasses.replace(d, train=sub(d.train, range(256)), test=sub(d.test, range(64)))


@pytest.fixture(scope="module")
def model1d(mnist1d):
    torch.manual_seed(0)
    model = build_model("sdt-1d-tiny")
    recalibrate_bn(model, mnist1d.train, batch_size=64)
    return model.eval()


def graph_of(exact, contract: InputContract) -> nir.NIRGraph:
    graph = to_nir(deployable(exact))
    graph.metadata["quantize"] = {"mode": "exact", **contract_metadata(contract)}
    return graph


# ----------------------------------------------------------------------------- the contract
def test_contract_validates_and_applies():
    assert (SIGNED.lo, SIGNED.hi, SIGNED.frac_bits) == (-4.19140625, 4.0703125, 8) and SIGNED.signed
    assert InputContract.covering(0.0, 0.9375) == InputContract()  # images keep [0, 1]
    assert InputContract.covering(0.25, 0.5, unit=False) == InputContract(0.25, 0.5)
    for bad in (dict(lo=0.1), dict(lo=1.0, hi=1.0), dict(frac_bits=17), dict(frac_bits=2.0), dict(hi=float("inf")),
                dict(lo=-2.0 ** 17, frac_bits=8)):
        with pytest.raises(ConfigError):
            InputContract(**bad)
    x = torch.tensor([-5.0, -4.2, -0.001, 0.0019, 0.002, 1 / 3, 4.07, 9.0])
    got = SIGNED.apply(x)
    assert got.tolist() == [SIGNED.lo, SIGNED.lo, 0.0, 0.0, 0.00390625, 85 / 256, 4.0703125, SIGNED.hi]
    assert np.array_equal(SIGNED.apply(x.numpy()), got.numpy())  # numpy and torch round alike (half to even)
    assert InputContract.from_dict(SIGNED.to_dict()) == SIGNED and InputContract.from_dict(None) == InputContract()
    with pytest.raises(ConfigError, match="meta.input_contract"):
        InputContract.from_dict({"lo": 0.1, "hi": 1, "frac_bits": 8}, "meta.input_contract")


def test_checkpoint_records_the_contract(model1d, tmp_path):
    exact = to_exact(model1d, SIGNED).eval()
    assert input_contract_of(exact) == SIGNED
    save_checkpoint(tmp_path / "ck", exact, meta={"quantize": "exact"})
    doc = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert doc["meta"]["input_contract"] == {"lo": SIGNED.lo, "hi": SIGNED.hi, "frac_bits": 8}
    loaded = load_checkpoint(tmp_path / "ck").model.eval()
    assert input_contract_of(loaded) == SIGNED
    x = direct_encode(torch.linspace(-6, 6, 80).reshape(2, 1, 1, 40), 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), exact(x))
    # a checkpoint written before signed ranges (no input_contract in meta) keeps the images' contract
    doc["meta"].pop("input_contract")
    (tmp_path / "ck" / "config.json").write_text(json.dumps(doc))
    assert input_contract_of(load_checkpoint(tmp_path / "ck").model) == InputContract()


def test_token_mean_over_20_tokens_becomes_a_power_of_two(model1d):
    """1/20 is not dyadic: the exact mode sums the tokens times 2^-5 and moves 32/20 into fc."""
    from stdeploy.models.quantize import power_of_two_token_mean

    folded = deployable(model1d)
    scaled = deployable(model1d)
    power_of_two_token_mean(scaled)
    assert model1d.cfg.tokens == 20 and scaled.head.token_scale == 2.0 ** -5 and folded.head.token_scale is None
    x = direct_encode(torch.randn(8, 1, 1, 40), 4)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), folded(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the proof over a signed range
def test_proof_bounds_the_first_layer_over_the_signed_range(model1d):
    exact = to_exact(model1d, SIGNED).eval()
    graph = graph_of(exact, SIGNED)
    assert graph_input_contract(graph) == SIGNED
    bounds = check_exact(graph)
    conv = deployable(exact).embed.stages[0].conv.conv
    w = conv.weight.detach().double().reshape(conv.out_channels, -1).numpy()
    b = conv.bias.detach().double().numpy()
    # worst case per output channel over inputs in [lo, hi]: a negative weight's extreme comes from lo
    top = (np.maximum(w * SIGNED.lo, w * SIGNED.hi).clip(min=0)).sum(1) + b.clip(min=0)
    bottom = (np.minimum(w * SIGNED.lo, w * SIGNED.hi).clip(max=0)).sum(1) + b.clip(max=0)
    first = bounds["embed.stages.0.conv"]
    assert first["hi"] == pytest.approx(top.max()) and first["lo"] == pytest.approx(bottom.min())
    assert first["lo"] < -1.0  # negative inputs drive it below zero: the [0, 1] bound would not hold
    unit = check_exact(graph_of(exact, InputContract()))
    assert unit["embed.stages.0.conv"]["hi"] < first["hi"]
    # sound: real inputs anywhere in the contract stay inside the proven interval
    x = SIGNED.apply(torch.empty(256, 1, 1, 40).uniform_(SIGNED.lo, SIGNED.hi))
    x[:8] = SIGNED.lo
    with torch.no_grad():
        y = conv(x)
    assert first["lo"] <= float(y.min()) and float(y.max()) <= first["hi"]


def test_proof_refuses_a_range_float32_cannot_hold(model1d):
    """The same weights with inputs in [-2048, 2048] on 2^-8: the first layer's sums need more than
    24 bits, and the refusal names it."""
    wide = InputContract(-2048.0, 2048.0, 8)
    with pytest.raises(UnsupportedPrimitive, match=r"(?s)embed\.stages\.0\.(conv|lif): .*2\^2[5-9].*\[analog input\].*--input-frac-bits"):
        check_exact(graph_of(to_exact(model1d, wide).eval(), wide))


# ----------------------------------------------------------------------------- export and runs
class Signed(torch.utils.data.Dataset):
    """A split with every input mapped to ``2 x - 1`` (digits: ``k/8 - 1`` in [-1, 1])."""

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        x, y = self.split[i]
        return 2 * x - 1, y


def test_signed_contract_through_quantize_checkpoint_and_nir(digits_subset, tmp_path, one_thread):
    """quantize (range derived from the training split: [-1, 1]) -> checkpoint -> export to NIR
    (both dialects): the proof over the signed range, the manifest and the NIR metadata carry the
    contract, 0 flips and identical logits on signed inputs."""
    from stdeploy.export.directory import export_model
    from stdeploy.export.nir_interpreter import load_graph
    from stdeploy.prune import QuantizeConfig, quantize_model

    d = digits_subset(256, 32)
    data = dataclasses.replace(d, train=Signed(d.train), test=Signed(d.test))
    torch.manual_seed(0)
    model = build_model("sdt-tiny")
    recalibrate_bn(model, data.train, batch_size=64)
    exact, report = quantize_model(model.eval(), data, QuantizeConfig(epochs=0), out=tmp_path / "ck", progress=False)
    assert report["input_contract"] == {"lo": -1.0, "hi": 1.0, "frac_bits": 8}
    manifest = export_model(load_checkpoint(tmp_path / "ck").model, tmp_path / "export", ("nir",), data=data, samples=32)
    contract = InputContract(-1.0, 1.0, 8)
    assert manifest_input_contract(manifest) == contract and "[-1, 1]" in manifest["input"]["contract"]
    for key in ("nir", "nir.portable"):
        res = manifest["validation"]["results"][key]
        assert res["spike_mismatches"] == 0 and res["logits_max_abs_error"] == 0.0, (key, res)
    rates = manifest["validation"]["activity"]["firing_rates"]
    assert min(rates.values()) > 0, rates  # every layer fires: the spike comparison means something
    assert graph_input_contract(load_graph(tmp_path / "export" / "model.nir")) == contract  # read back from the file
    x = torch.stack([data.test[i][0] for i in range(32)])
    assert float(x.min()) == -1.0  # the validation saw negative inputs


def test_mnist1d_exact_export_and_onnxruntime_run(model1d, mnist1d, tmp_path, one_thread):
    """sdt-1d-tiny (20 tokens) in the exact mode with MNIST-1D's signed contract: exported to ONNX
    with 0 flips and identical logits; onnxruntime through the run path, which clips and rounds the
    sequences as the reference does."""
    from stdeploy.export.directory import export_model
    from stdeploy.runner import run_export

    exact = to_exact(model1d, SIGNED).eval()
    manifest = export_model(exact, tmp_path / "export", ("onnx",), data=mnist1d, samples=32)
    assert manifest["quantize"]["max_bits"] <= 24 and manifest_input_contract(manifest) == SIGNED
    for key in ("onnx", "onnx.step"):
        res = manifest["validation"]["results"][key]
        assert res["spike_mismatches"] == 0 and res["logits_max_abs_error"] == 0.0, (key, res)
    assert min(manifest["validation"]["activity"]["firing_rates"].values()) > 0
    import onnx

    for name in ("model.onnx", "model.step.onnx"):  # the contract travels with the ONNX files
        props = {p.key: p.value for p in onnx.load(str(tmp_path / "export" / name), load_external_data=False).metadata_props}
        assert json.loads(props["stdeploy.input_range"]) == [SIGNED.lo, SIGNED.hi] and props["stdeploy.input_frac_bits"] == "8"
    out = run_export(tmp_path / "export", "onnxruntime", data=mnist1d, limit=64)
    assert out["within_tolerance"] and out["spike_mismatches"] == 0 and out["logits_max_abs_error"] == 0.0
    assert out["input_contract"]["contract"] == SIGNED.to_dict() and out["input_contract"]["values"] == 64 * 40
    assert out["input_contract"]["values_off_grid"] > 0  # MNIST-1D is not on 2^-8: the run rounds it, as the reference


def test_runner_clips_inputs_outside_the_contract():
    from stdeploy.runner import apply_input_contract

    manifest = {"quantize": {"mode": "exact", **contract_metadata(SIGNED)}}
    x = torch.tensor([[-9.0, 0.5, 5.0, 1 / 3]])
    y, rep = apply_input_contract(x, manifest)
    assert y.tolist() == [[SIGNED.lo, 0.5, SIGNED.hi, 85 / 256]] and rep["values_clipped"] == 2
    y, rep = apply_input_contract(x, manifest, {"input_contract": {"lo": -4.0, "hi": 4.0, "frac_bits": 4}})
    assert y.tolist() == [[-4.0, 0.5, 4.0, 0.3125]] and rep["target_contract"]["frac_bits"] == 4
    assert apply_input_contract(x, {"quantize": {"mode": "float"}}) == (x, None)


# ----------------------------------------------------------------------------- Lava's input grid
def test_lava_fits_the_finest_input_grid_or_refuses(model1d):
    """Lava's u holds 24 bits, 6 fewer than float32's proof allows after its << 6: the plan takes the
    finest input grid on which every population is proven (inside the export's range), says so in a
    warning and in the plan, and refuses by name where no grid fits."""
    from stdeploy.targets.lava.graph import LavaUnsupported
    from stdeploy.targets.lava.lowering import lower

    exact = to_exact(model1d, SIGNED).eval()
    with pytest.warns(UserWarning, match=r"inputs are rounded to 2\^-[0-7] in \[-4"):
        plan = lower(graph_of(exact, SIGNED), "fixed", weight_bits=8)
    fitted = InputContract.from_dict(plan["input_contract"])
    assert fitted.frac_bits < 8 and SIGNED.lo <= fitted.lo < 0 < fitted.hi <= SIGNED.hi
    assert all(v["proven"] for v in plan["quant"].values() if "proven" in v)
    source = next(p for p in plan["procs"] if p["kind"] == "source")
    assert source["inv_scale"] == 2.0 ** fitted.frac_bits
    assert source["contracts"] == [[SIGNED.lo, SIGNED.hi, 256.0], [fitted.lo, fitted.hi, 2.0 ** fitted.frac_bits]]
    # one bit finer does not fit: the choice is the finest
    finer = InputContract.covering(fitted.lo, fitted.hi, fitted.frac_bits + 1, unit=False)
    with pytest.warns(UserWarning, match=rf"2\^-{fitted.frac_bits} in"):
        lower(graph_of(exact, finer), "fixed", weight_bits=8)
    # inputs in [-64, 64] on 2^0: float32 holds the first layer, Loihi's 24 bits cannot at any grid
    wide = InputContract(-64.0, 64.0, 0)
    check_exact(graph_of(to_exact(model1d, wide).eval(), wide))
    with pytest.raises(LavaUnsupported, match=r"no input grid fits.*embed\.stages\.0\.lif needs"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lower(graph_of(to_exact(model1d, wide).eval(), wide), "fixed", weight_bits=8)


@pytest.mark.lava
@pytest.mark.timeout(300)
def test_lava_fixed_point_runs_signed_inputs_exactly(model1d, mnist1d, tmp_path):
    """Lava's bit-accurate LIF on the exact sdt-1d-tiny with MNIST-1D's signed sequences (2 of
    them): on the fitted input grid, output spikes and logits bit-identical to PyTorch."""
    from stdeploy.export.manifest import write_manifest
    from stdeploy.export.nir_export import write_nir
    from stdeploy.export.validate import record_neurons
    from stdeploy.targets.lava.target import LavaTarget
    from stdeploy.targets.profiles import load_profile

    exact = to_exact(model1d, SIGNED).eval()
    path = tmp_path / "lava"
    path.mkdir()
    write_nir(graph_of(exact, SIGNED), path / "model.nir")
    write_manifest(path, {"artifacts": {"nir": {"file": "model.nir"}}})
    with pytest.warns(UserWarning, match="inputs are rounded to"):
        runnable = LavaTarget().compile(path, load_profile("loihi2-fixed"))
    fitted = InputContract.from_dict(runnable.info["input_contract"])
    raw = torch.stack([mnist1d.test[i][0] for i in range(2)])
    assert float(raw.min()) < 0
    x = direct_encode(fitted.apply(SIGNED.apply(raw)), 4)  # what the run path feeds the reference
    with torch.no_grad():
        logits, records = record_neurons(deployable(exact), x)
    rates = {k: float(v["spikes"].mean()) for k, v in records.items()}
    assert min(rates.values()) > 0, rates
    with runnable:
        res = runnable.run(direct_encode(raw, 4).numpy())  # the source applies both contracts itself, in the same order
    spikes = records["head.lif"]["spikes"].numpy()
    assert int((res.spikes != spikes).sum()) == 0 and np.array_equal(res.logits, logits.numpy())
