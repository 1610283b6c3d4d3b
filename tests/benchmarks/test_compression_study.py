"""benchmarks/compression_study.py on a tiny grid: records, resuming, paired differences, report-only."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from stdeploy.errors import ConfigError
from stdeploy.models import build_model
from stdeploy.train import evaluate

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compression_study.py"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("compression_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_digits(digits_subset):
    return digits_subset(160, 80)


def tiny_config(study, **changes):
    base = dict(families=("sdt-tiny",), seeds=(0,), settings=("l1p95",), variants=("lif", "slif-both"), budgets=(1,),
                dense_epochs=1, penalty_epochs=1, data="digits[:160,:80]")
    return study.StudyConfig(**{**base, **changes})


def test_run_records_resume_and_cache(study, tiny_digits, tmp_path, monkeypatch):
    quiet = lambda m: None  # noqa: E731
    new = study.run_study(tiny_config(study), tmp_path, data=tiny_digits, log=quiet)
    records = study.load_records(tmp_path / study.RESULTS)
    assert len(new) == len(records) == 2 and {r["variant"] for r in records} == {"lif", "slif-both"}
    for r in records:
        for k in ("acc_dense", "acc_penalty", "acc_pruned", "acc_recal", "acc_final"):
            assert 0.0 <= r[k] <= 1.0, k
        assert (r["family"], r["seed"], r["setting"], r["method"], r["ratio"], r["budget"]) == ("sdt-tiny", 0, "l1p95", "l1p", 0.95, 1)
        assert r["remaining"] == pytest.approx(0.05, abs=1e-4) and r["block_params_dense"] == 49152
        assert len(r["curve"]) == 1 and r["curve"][-1] == pytest.approx(r["acc_final"])  # finalize keeps the masked weights
        assert len(r["firing_rate"]) == 10 and all(0.0 <= x <= 1.0 for x in r["firing_rate"].values())
        assert r["wall_seconds"] > 0 and r["protocol"]["dense_epochs"] == 1
    lif, slif = sorted(records, key=lambda r: r["variant"] != "lif")
    # both variants start from the same pruned and recalibrated model
    assert lif["acc_pruned"] == slif["acc_pruned"] and lif["acc_recal"] == slif["acc_recal"]
    assert lif["intrinsic"] is None and lif["lr"]["intrinsic"] is None
    assert slif["lr"] == {"weights": 1e-3, "intrinsic": pytest.approx(2e-2)}
    assert slif["optimizer_groups"]["intrinsic"]["weight_decay"] == 0.0
    hist = slif["intrinsic"]["threshold_hist"]
    assert len(hist["counts"]) == 30 and sum(hist["counts"]) + hist["below"] + hist["above"] == 800
    assert set(slif["intrinsic"]["leak"]) == set(slif["firing_rate"])

    # a rerun of the same grid trains nothing
    def no_training(*a, **k):
        raise AssertionError("train() called for a finished cell")

    monkeypatch.setattr(study, "train", no_training)
    assert study.run_study(tiny_config(study), tmp_path, data=tiny_digits, log=quiet) == []
    assert len(study.load_records(tmp_path / study.RESULTS)) == 2

    # one more variant: only its fine-tune trains; dense and penalised models come from the cache
    from stdeploy.train import train as real_train

    calls = []

    def counting(*a, **k):
        calls.append(k.get("regularizer"))
        return real_train(*a, **k)

    monkeypatch.setattr(study, "train", counting)
    new = study.run_study(tiny_config(study, variants=("lif", "slif-both", "slif-thr")), tmp_path, data=tiny_digits, log=quiet)
    assert [r["variant"] for r in new] == ["slif-thr"] and calls == [None]
    assert new[0]["acc_recal"] == lif["acc_recal"] and new[0]["acc_dense"] == lif["acc_dense"]

    # the whole-model scope (``l1p95-all``) in the same folder: its own cell and penalised model, the
    # dense model from the cache; it prunes the convolutions and the classifier too, so less is left
    calls.clear()
    new = study.run_study(tiny_config(study, settings=("l1p95-all",), variants=("lif",)), tmp_path, data=tiny_digits, log=quiet)
    assert len(new) == 1 and len(calls) == 2 and calls[0] is not None and calls[1] is None  # penalty, then fine-tune
    records = study.load_records(tmp_path / study.RESULTS)
    assert len(records) == 4 == len({study.cell_key(r) for r in records})
    whole = new[0]
    assert (lif["scope"], whole["scope"], whole["setting"], whole["acc_dense"]) == ("blocks", "all", "l1p95-all", lif["acc_dense"])
    assert "embed.rpe.conv" in whole["prune_config"]["layers"] and "embed.rpe.conv" not in lif["prune_config"]["layers"]
    assert whole["block_params_dense"] > lif["block_params_dense"] and whole["remaining"] == pytest.approx(0.05, abs=1e-4)
    for r in (lif, whole):
        mc = r["model_counts"]
        assert 0 < mc["params"] < mc["params_dense"] and 0 < mc["macs"] < mc["macs_dense"]
    assert whole["model_counts"]["params"] < lif["model_counts"]["params"] and whole["model_counts"]["macs"] < lif["model_counts"]["macs"]
    from stdeploy.checkpoint import read_checkpoint_config

    seed_dir = tmp_path / "models" / "sdt-tiny" / "seed0"
    penalised = {n: read_checkpoint_config(seed_dir / n)["meta"]["layers"] for n in ("l1p-penalty-e1-1", "l1p-all-penalty-e1-1")}
    assert "embed.rpe.conv" in penalised["l1p-all-penalty-e1-1"] and "embed.rpe.conv" not in penalised["l1p-penalty-e1-1"]
    assert (study.control_of("l1p95-all"), study.control_of("dsp5"), study.control_of("dsp5-all"),
            study.setting_scope("dsp5-all")) == ("l1p0-all", "dsp100", "dsp100-all", "all")

    with pytest.raises(ConfigError, match="another protocol"):
        study.run_study(tiny_config(study, dense_epochs=2), tmp_path, data=tiny_digits, log=quiet)

    # every record names its dense model (digest) and CPU; the dense model trained again from
    # scratch on the same machine is the same model, so cells may be added to its seed
    assert len({r["dense_digest"] for r in records}) == 1 and all(r["cpu"] for r in records)
    monkeypatch.setattr(study, "train", real_train)
    shutil.rmtree(seed_dir / "dense-e1")
    new = study.run_study(tiny_config(study, variants=("slif-leak",)), tmp_path, data=tiny_digits, log=quiet)
    assert len(new) == 1 and new[0]["dense_digest"] == records[0]["dense_digest"]
    # a dense, penalised or pruned model that is not the records' (made on another CPU, say) is refused before any cell
    real_digest, real_penalty, real_prune = study.model_digest, study.penalty_stage, study.prune_stage
    monkeypatch.setattr(study, "model_digest", lambda model: "0" * 64)
    with pytest.raises(ConfigError, match="dense model of sdt-tiny seed 0 is not the one its records were made with"):
        study.run_study(tiny_config(study, settings=("l1p98",), variants=("lif",)), tmp_path, data=tiny_digits, log=quiet)
    monkeypatch.setattr(study, "model_digest", real_digest)

    def nudged(stage):
        model = stage[0] if isinstance(stage, tuple) else stage.model
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).view(-1)[0] += 1e-3
        return stage

    monkeypatch.setattr(study, "penalty_stage", lambda *a, **k: nudged(real_penalty(*a, **k)))
    with pytest.raises(ConfigError, match=r"l1p penalised model \(blocks\) of sdt-tiny seed 0 is not the one"):
        study.run_study(tiny_config(study, settings=("l1p98",), variants=("lif",)), tmp_path, data=tiny_digits, log=quiet)
    monkeypatch.setattr(study, "penalty_stage", real_penalty)
    monkeypatch.setattr(study, "prune_stage", lambda *a, **k: nudged(real_prune(*a, **k)))
    with pytest.raises(ConfigError, match="pruned model l1p95 of sdt-tiny seed 0 is not the one"):
        study.run_study(tiny_config(study, budgets=(2,), variants=("lif",)), tmp_path, data=tiny_digits, log=quiet)
    assert len(study.load_records(tmp_path / study.RESULTS)) == 5


def test_same_model_falls_back_to_measurements_for_records_without_a_digest(study, tmp_path):
    model = build_model("sdt-tiny")
    digest = study.model_digest(model)
    with torch.no_grad():
        p = next(model.parameters())
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf")))
    assert study.model_digest(model) != digest  # one ulp of one weight is another model
    rates = {"a": 0.125, "b": 0.0625}

    def check(recs, seed=0):
        study.check_same_model(recs, tmp_path, f"dense model of sdt-tiny seed {seed}", lambda r: r["seed"] == seed, digest,
                               "dense_digest", {"acc_dense": 0.976, "firing_rate_dense": rates})

    old = {**record("lif", 0, 0.9), "acc_dense": 0.976, "firing_rate_dense": dict(rates)}
    check([old, {**old, "seed": 1, "acc_dense": 0.974}])  # the same measurements; another seed's record does not count
    with pytest.raises(ConfigError, match="seed 0 is not the one .*acc_dense 0.976 here, 0.974 in the records"):
        check([{**old, "acc_dense": 0.974}])
    with pytest.raises(ConfigError, match="firing_rate_dense differs"):  # the same accuracy, other firing rates
        check([{**old, "firing_rate_dense": {"a": 0.125, "b": 0.0626}}])
    check([{**old, "acc_dense": 0.5, "dense_digest": digest}])  # a digest, where recorded, decides
    with pytest.raises(ConfigError, match="digest"):
        check([{**old, "dense_digest": "f" * 64}])


def test_measure_matches_evaluate(study, tiny_digits):
    torch.manual_seed(0)
    model = build_model("spikformer-tiny")
    acc, rates = study.measure(model, tiny_digits.test)
    assert acc == evaluate(model, tiny_digits.test, model.cfg.timesteps)
    assert len(rates) == 10 and all(0.0 <= x <= 1.0 for x in rates.values())


def test_cut_short_line_is_skipped_and_next_append_starts_a_new_line(study, tmp_path):
    path = tmp_path / "results.jsonl"
    study.append_record(path, record("lif", 0, 0.9))
    with open(path, "a") as f:
        f.write('{"family": "sdt-tiny", "se')  # a write interrupted half-way
    with pytest.warns(UserWarning, match="skipping unreadable record"):
        assert len(study.load_records(path)) == 1
    study.append_record(path, record("slif-both", 0, 0.95))
    with pytest.warns(UserWarning):
        assert {r["variant"] for r in study.load_records(path)} == {"lif", "slif-both"}


def record(variant, seed, acc, setting="l1p99", budget=5, family="sdt-tiny"):
    layers = ["embed.stages.0.lif", "blocks.0.mlp.lif1"]
    slif = variant != "lif"
    hist = lambda edges: {"edges": edges, "counts": [1] * 30, "below": 0, "above": 0}  # noqa: E731
    return {"family": family, "seed": seed, "setting": setting, "method": setting[:3], "ratio": 0.99 if setting == "l1p99" else 0.05,
            "remaining": 0.01 if setting == "l1p99" else 0.049, "variant": variant, "budget": budget,
            "acc_dense": 0.99, "acc_pruned": 0.80 + seed / 100, "acc_recal": 0.85 + seed / 100, "acc_final": acc,
            "curve": [acc - 0.01 * (budget - e) for e in range(1, budget + 1)],
            "firing_rate": {n: 0.05 + 0.01 * slif for n in layers}, "firing_rate_recal": {n: 0.04 for n in layers},
            "intrinsic": {"threshold": {}, "leak": {}, "threshold_hist": hist(STUDY_EDGES[0]), "leak_hist": hist(STUDY_EDGES[1])} if slif else None,
            "wall_seconds": 1.0, "protocol": {"data": "digits"}}


STUDY_EDGES = ([i * 0.1 for i in range(31)], [i / 30 for i in range(31)])


def test_paired_differences_and_report_only(study, tmp_path):
    lif = [0.90, 0.92, 0.94]
    slif = [0.93, 0.91, 0.97]  # differences +3, -1, +3 points
    with open(tmp_path / "results.jsonl", "w") as f:
        for setting in ("l1p99", "dsp5"):
            for budget in (5, 20):
                for seed in range(3):
                    f.write(json.dumps(record("lif", seed, lif[seed], setting, budget)) + "\n")
                    f.write(json.dumps(record("slif-both", seed, slif[seed], setting, budget)) + "\n")
    assert study.main(["--out", str(tmp_path), "--report-only"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["groups"]) == 4 and summary["records"] == 24
    g = next(g for g in summary["groups"] if g["setting"] == "l1p99" and g["budget"] == 5)
    p = g["paired"]["slif-both"]
    assert p["mean"] == pytest.approx(0.05 / 3)
    assert p["std"] == pytest.approx(torch.tensor([0.03, -0.01, 0.03]).double().std().item())
    assert (p["min"], p["max"], p["positive"], p["n"]) == (pytest.approx(-0.01), pytest.approx(0.03), 2, 3)
    assert g["variants"]["lif"]["mean"] == pytest.approx(0.92) and g["variants"]["lif"]["std"] == pytest.approx(0.02)
    assert g["recal"]["mean"] == pytest.approx(0.86) and g["dense"]["mean"] == pytest.approx(0.99) and g["seeds"] == [0, 1, 2]
    report = (tmp_path / "report.md").read_text()
    assert "| l1p99 | 5 | slif-both | +1.67 | 2.31 | -1.00 .. +3.00 | 2 of 3 |" in report
    assert summary["cpus"] == {"not recorded": 24} and "made on: not recorded (24 cells)." in report
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["accuracy_vs_params_b20.png", "accuracy_vs_params_b5.png", "curves_b20.png", "firing_rates_sdt-tiny_b20.png",
                    "firing_rates_sdt-tiny_b5.png", "intrinsic_sdt-tiny_b20.png", "intrinsic_sdt-tiny_b5.png"]
    assert all((tmp_path / n).read_bytes()[:8] == PNG for n in pngs)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left no temporary files


def test_net_of_control_takes_the_control_of_the_setting_s_method(study):
    """DSP rows are netted against ``dsp100`` (DSP's penalty, nothing factored), L1P rows against
    ``l1p0``; without ``dsp100`` a DSP row falls back to ``l1p0``, named as its control."""
    def cells(setting, gains):
        return [r for seed, gain in enumerate(gains)
                for r in (record("lif", seed, 0.9, setting), record("slif-both", seed, 0.9 + gain, setting))]

    records = cells("l1p0", [0.01, 0.02]) + cells("dsp100", [0.03, 0.01]) + cells("dsp5", [0.05, 0.04]) + cells("l1p99", [0.02, 0.02])
    groups = {g["setting"]: g for g in study.summarize(records)["groups"]}
    assert (groups["dsp5"]["control"], groups["l1p99"]["control"], groups["dsp100"]["control"]) == ("dsp100", "l1p0", None)
    assert groups["dsp5"]["paired_net"]["slif-both"]["mean"] == pytest.approx(((0.05 - 0.03) + (0.04 - 0.01)) / 2)
    fallback = {g["setting"]: g for g in study.summarize([r for r in records if r["setting"] != "dsp100"])["groups"]}
    assert fallback["dsp5"]["control"] == "l1p0"
    assert fallback["dsp5"]["paired_net"]["slif-both"]["mean"] == pytest.approx(((0.05 - 0.01) + (0.04 - 0.02)) / 2)


def test_scope_tables_split_scopes_and_state_the_cost_of_the_cut(study):
    """The README's study tables come from the report: block and whole-model rows apart, the control
    labelled, the cost of the cut from the dense and LIF means, the threshold/leak table only for
    settings where those variants ran."""
    def cells(setting, lif, gains, variants=("slif-both",)):
        return [r for seed, gain in enumerate(gains) for r in
                [record("lif", seed, lif, setting)] + [record(v, seed, lif + gain, setting) for v in variants]]

    records = (cells("l1p0", 0.97, [0.01, 0.00]) + cells("l1p99", 0.90, [0.03, -0.01]) + cells("dsp5", 0.92, [0.02, 0.02])
               + cells("l1p99-all", 0.50, [0.10, 0.06], ("slif-thr", "slif-both")) + cells("l1p0-all", 0.98, [0.00, 0.01]))
    for r in records:
        if r["setting"].endswith("-all"):
            r["model_counts"] = {"params": 747, "params_dense": 74688, "params_ratio": 0.01, "macs": 9250, "macs_dense": 1733760,
                                 "macs_ratio": 0.0053}
    text = "\n".join(study.scope_tables(study.summarize(records)["groups"]))
    block, whole, one = text.split("Whole model:")[0], text.split("Whole model:")[1].split("threshold only")[0], text.split("threshold only")[1]
    assert "| l1p0 (control) | 5 | 4.9% | - | 2 |" in block and "-all" not in block
    assert ("| l1p99 | 5 | 1.0% | - | 2 | 80.50 ± 0.71 | 85.50 ± 0.71 | 90.00 ± 0.00 | 91.00 ± 2.83 | +1.00 ± 2.83 (1/2) | "
            "+0.50 ± 2.12 (1/2) | 0.050 (0.050) / 0.060 (0.060) |") in block
    # dsp5 without DSP's own control (dsp100) is netted against l1p0, and says so
    assert "| +2.00 ± 0.00 (2/2) | +1.50 ± 0.71 (2/2) vs l1p0 |" in block
    assert ("| l1p99-all | 5 | 747 (1.0%) | 9,250 (0.5%) | 2 | 80.50 ± 0.71 | 85.50 ± 0.71 | 50.00 ± 0.00 | 58.00 ± 2.83 | 49.00 | "
            "+8.00 ± 2.83 (2/2) | +7.50 ± 3.54 (2/2) |") in whole
    assert "| l1p99-all | 5 | 2 | 50.00 ± 0.00 | 58.00 ± 2.83 | - | 58.00 ± 2.83 | +8.00 ± 2.83 (2/2) | - | +8.00 ± 2.83 (2/2) |" in one
    assert "| l1p99 |" not in one  # no threshold-only or leak-only cells there


def test_cli_selection(study):
    parse = lambda *argv: study.config_from_args(study.build_parser().parse_args(list(argv)))  # noqa: E731
    quick = parse("--quick")
    assert (quick.seeds, quick.settings, quick.budgets, quick.dense_epochs, quick.penalty_epochs) == ((0,), ("l1p99", "dsp5"), (1,), 2, 1)
    full = parse()
    assert len(full.seeds) == 5 and len(full.settings) == 6 and len(full.variants) == 4 and full.budgets == (5, 20)
    assert parse("--seeds", "3").seeds == (0, 1, 2) and parse("--seed-list", "0,3").seeds == (0, 3)
    assert parse("--settings", "l1p95,dsp5", "--budgets", "5", "--families", "spikformer-tiny").settings == ("l1p95", "dsp5")
    with pytest.raises(ConfigError, match="unknown setting 'l1p80'"):
        parse("--settings", "l1p80")
    m1d = parse("--data", "mnist1d", "--settings", "l1p90,dsp30")   # MNIST-1D: its 1-D preset, the milder ratios known
    assert (m1d.data, m1d.families, m1d.settings, m1d.protocol()["data"]) == ("mnist1d", ("sdt-1d-tiny",), ("l1p90", "dsp30"), "mnist1d")
    assert parse("--data", "mnist1d", "--families", "spikformer-1d-tiny").families == ("spikformer-1d-tiny",)
    with pytest.raises(ConfigError, match="unknown family 'sdt-tiny' for --data mnist1d; known: sdt-1d-tiny"):
        parse("--data", "mnist1d", "--families", "sdt-tiny")
    assert full.settings == study.DEFAULT_SETTINGS and full.data == "digits"   # the digits grid unchanged by the new ratios
    assert study.main(["--variants", "plif", "--out", "/nonexistent-never-created"]) == 2
    assert parse().device == "cpu" and parse("--device", "cuda").device == "cuda"
    assert "device" not in full.protocol()  # cells trained on a GPU pair with CPU cells of the same protocol
    if not torch.cuda.is_available():
        assert study.main(["--device", "cuda", "--out", "/nonexistent-never-created"]) == 2


def models_by(records, key, digest_field, *measured):
    """The models that records name, per ``key`` (record fields): their digests where recorded,
    else what they measured of the model (``measured`` fields)."""
    models = {}
    for r in records:
        digest = r.get(digest_field)
        models.setdefault(tuple(r[k] for k in key), set()).add(
            digest if digest else json.dumps([r[m] for m in measured], sort_keys=True))
    return models


def test_committed_results_hold_each_cell_once(study):
    """The committed study's results.jsonl: one record per cell (family, seed, setting, variant,
    budget), and the full grid of the report (2 x 5 x 6 x 4 x 2 = 480).

    Its cells ran on an H200 and on two CPUs, before records named their models. The README states
    where one seed's records name several models, and this test pins those places, so that no new
    one goes unnoticed: spikformer-tiny seeds 2-4 have two dense models (the H200 trained the one of
    the budget-5 groups and L1P, the CPU the one of the later DSP groups); one group pairs an LIF
    cell with sLIF cells from another pruned model (spikformer-tiny seed 1, dsp10, budget 20); three
    groups' models measured different firing rates (in the fifth or sixth digit) on different
    machines with the same accuracies."""
    path = SCRIPT.parent / "results" / "compression-study" / study.RESULTS
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    group = ("family", "seed", "setting", "budget")

    def mixed(key, *measured):
        return {k for k, v in models_by(lines, key, "-", *measured).items() if len(v) > 1}

    assert mixed(("family", "seed"), "acc_dense") == {("spikformer-tiny", s) for s in (2, 3, 4)}
    assert mixed(group, "acc_dense") == set()
    assert mixed(group, "acc_pruned", "acc_recal") == {("spikformer-tiny", 1, "dsp10", 20)}
    assert mixed(group, "acc_dense", "firing_rate_dense") == {("spikformer-tiny", 1, "dsp10", 20), ("spikformer-tiny", 1, "l1p99", 5)}
    assert mixed(group, "acc_pruned", "acc_recal", "firing_rate_recal") == {("spikformer-tiny", 1, "dsp10", 20), ("sdt-tiny", 2, "dsp10", 20)}
    keys = [study.cell_key(r) for r in lines]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    assert not dupes, f"cells recorded more than once: {dupes}"
    assert len(keys) == 480 == len({k[0] for k in keys}) * len({k[1] for k in keys}) * len({k[2] for k in keys}) \
        * len({k[3] for k in keys}) * len({k[4] for k in keys})


@pytest.mark.parametrize("folder", ["compression-study-mnist1d", "compression-study-mnist1d-epyc"])
def test_committed_mnist1d_slice_holds_each_cell_once_and_pairs_every_variant(study, folder):
    """The committed MNIST-1D slices (``--data mnist1d``; the second made on another CPU, with its
    own dense models): one record per cell, all of one MNIST-1D protocol, every sLIF cell paired
    with the LIF cell of the same seed, setting and budget, and every record of a seed made from
    the same dense model (by digest where the records carry one)."""
    path = SCRIPT.parent / "results" / folder / study.RESULTS
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert all(len(v) == 1 for v in models_by(lines, ("family", "seed"), "dense_digest", "acc_dense", "firing_rate_dense").values()), \
        "a seed whose records come from several dense models"
    assert len({r.get("cpu") for r in lines}) == 1, "records of several CPUs in one folder"
    keys = [study.cell_key(r) for r in lines]
    assert lines and len(keys) == len(set(keys)), "a cell recorded more than once"
    assert {json.dumps(r["protocol"], sort_keys=True) for r in lines} == {json.dumps(lines[0]["protocol"], sort_keys=True)}
    assert lines[0]["protocol"]["data"] == "mnist1d" and {r["family"] for r in lines} == {"sdt-1d-tiny"}
    base = {(f, s, st, b) for f, s, st, v, b in keys if v == study.BASELINE}
    assert all((f, s, st, b) in base for f, s, st, v, b in keys), "an sLIF cell without its LIF pair"
    # a silent layer after the fine-tune only where the cut went through the model: whole-model L1P 98-99%,
    # whose one global budget leaves under 0.7% of some layer on the signal path (README, "Choosing a compression")
    for r in lines:
        silent = [n for n, rate in r["firing_rate"].items() if rate == 0]
        assert not silent or (r["setting"] in ("l1p98-all", "l1p99-all") and min(r["layer_remaining"].values()) < 0.007), \
            (study.cell_key(r), silent)
    # every layer fires in at least 30 cells (all of them where a folder holds fewer)
    assert sum(all(0 < rate for rate in r["firing_rate"].values()) for r in lines) >= min(30, len(lines))


def test_layer_remaining_of_dsp_whole_model_reports_counts_convolutions(study):
    """DSP's whole-model report holds convolutions (shape ``(out, in, kh, kw)``) beside linears: the
    fraction left of each is its factors' parameters over the dense weight's entries."""
    from stdeploy.prune import ALL_LAYERS, PruneConfig, make_pruner

    torch.manual_seed(0)
    model = build_model("sdt-tiny")
    pruner = make_pruner(PruneConfig(method="dsp", param_ratio=0.2, layers=ALL_LAYERS))
    pruner.one_shot(model)
    layers = pruner.report(model)["layers"]
    rpe = model.embed.rpe.conv
    assert layers["embed.rpe.conv"]["shape"] == [64, 64, 3, 3]
    assert study._layer_remaining(layers["embed.rpe.conv"]) == rpe.rank * (576 + 64) / (64 * 576)
    assert study._layer_remaining(layers["embed.stages.0.conv.conv"]) == 1.0   # dense by the rule
    assert study._layer_remaining(layers["head.fc"]) == layers["head.fc"]["params"] / 640


@pytest.mark.parametrize("folder", ["compression-study-mnist1d", "compression-study-mnist1d-epyc"])
def test_readme_study_tables_are_the_committed_reports(folder):
    """The README's MNIST-1D tables are the "LIF against sLIF, by scope" section of the committed
    report, verbatim: a figure changed in one and not the other fails here."""
    report = (SCRIPT.parent / "results" / folder / "report.md").read_text()
    section = report.split("### LIF against sLIF, by scope\n", 1)[1].strip()
    assert section.count("\n| ") >= 4 and section in (SCRIPT.parents[1] / "README.md").read_text()
