"""Compression benchmark on digits: L1P and DSP at several ratios, fine-tuned with sLIF and with
LIF, several seeds. Prints a table (mean ± std accuracy, remaining block parameters, drop vs the
dense model of the same seed) and saves a PNG plot of accuracy against compression.

    .venv/bin/python benchmarks/compression.py [--seeds 3] [--epochs 15] [--out runs/bench-compression]

Each (method, ratio, seed) is pruned once (penalty phase, masks / rank removal, BN recalibration);
the sLIF and LIF fine-tunes start from copies of that same pruned model, so their difference is
the compensation alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stdeploy.data import load_dataset  # noqa: E402
from stdeploy.models import DEFAULT_PRESET, build_model, clone_model  # noqa: E402
from stdeploy.prune import CompensationConfig, PruneConfig, apply_pruning, compensate  # noqa: E402
from stdeploy.train import TrainConfig, train  # noqa: E402

L1P_SPARSITY = (0.5, 0.8, 0.9, 0.95)
DSP_RATIO = (0.5, 0.3, 0.2)


def settings():
    for s in L1P_SPARSITY:
        yield f"L1P {int(s * 100)}%", PruneConfig(method="l1p", sparsity=s)
    for r in DSP_RATIO:
        yield f"DSP {int(r * 100)}% params", PruneConfig(method="dsp", param_ratio=r)


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_PRESET)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dense-epochs", type=int, default=15)
    ap.add_argument("--penalty-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15, help="compensation fine-tune epochs")
    ap.add_argument("--out", default="runs/bench-compression")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_dataset("digits")
    rows: list[dict] = []
    t_start = time.perf_counter()
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = build_model(args.model)
        r = train(dense, data, TrainConfig(epochs=args.dense_epochs, seed=seed), progress=False)
        print(f"seed {seed}: dense {r.test_accuracy:.4f} ({r.seconds:.0f} s)", flush=True)
        rows.append({"setting": "dense", "seed": seed, "compensation": "-", "accuracy": r.test_accuracy,
                     "remaining": 1.0, "dense_accuracy": r.test_accuracy})
        for name, pcfg in settings():
            model = clone_model(dense)
            ccfg = CompensationConfig(epochs=args.epochs, penalty_epochs=args.penalty_epochs, seed=seed)
            pruner, stages = apply_pruning(model, data, pcfg, ccfg, progress=False)
            for comp in ("slif", "lif"):
                m = clone_model(model)
                rep = compensate(m, pruner, data,  # the pruner holds names and config only
                                 CompensationConfig(neuron=comp, epochs=args.epochs, penalty_epochs=args.penalty_epochs, seed=seed),
                                 stages, progress=False)
                remaining = rep["block_params_remaining"] / rep["block_params_dense"]
                rows.append({"setting": name, "seed": seed, "compensation": comp, "accuracy": rep["accuracy"]["final"],
                             "after_prune": stages.get("after_prune"), "after_bn": stages.get("after_bn_recalibration"),
                             "remaining": remaining, "dense_accuracy": r.test_accuracy})
                print(f"  {name:<16} {comp:<5} after prune {stages.get('after_prune', float('nan')):.4f}  "
                      f"after BN {stages.get('after_bn_recalibration', float('nan')):.4f}  final {rep['accuracy']['final']:.4f}  "
                      f"remaining {remaining:.3f}", flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    table = summarize(rows)
    print()
    print(table)
    (out / "table.md").write_text(table + "\n")
    plot(rows, out / "compression.png")
    print(f"\nplot: {out / 'compression.png'}   results: {out / 'results.json'}   ({time.perf_counter() - t_start:.0f} s)")
    return 0


def summarize(rows: list[dict]) -> str:
    lines = ["| setting | compensation | block params left | accuracy (mean ± std) | drop vs dense (points) | n |",
             "|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        k = (r["setting"], r["compensation"])
        if k not in keys:
            keys.append(k)
    for setting, comp in keys:
        sel = [r for r in rows if r["setting"] == setting and r["compensation"] == comp]
        acc_m, acc_s = mean_std([r["accuracy"] * 100 for r in sel])
        drop_m, drop_s = mean_std([(r["dense_accuracy"] - r["accuracy"]) * 100 for r in sel])
        left = statistics.mean(r["remaining"] for r in sel)
        lines.append(f"| {setting} | {comp} | {left:.1%} | {acc_m:.2f} ± {acc_s:.2f} | {drop_m:+.2f} ± {drop_s:.2f} | {len(sel)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = [r["accuracy"] * 100 for r in rows if r["setting"] == "dense"]
    ax.axhline(statistics.mean(dense), color="gray", ls="--", label="dense")
    for method, marker in (("L1P", "o"), ("DSP", "s")):
        for comp, color in (("slif", "tab:red"), ("lif", "tab:blue")):
            settings_ = sorted({r["setting"] for r in rows if r["setting"].startswith(method)},
                               key=lambda s: -statistics.mean(r["remaining"] for r in rows if r["setting"] == s))
            xs, ys, es = [], [], []
            for s in settings_:
                sel = [r for r in rows if r["setting"] == s and r["compensation"] == comp]
                xs.append(statistics.mean(r["remaining"] for r in sel) * 100)
                m, e = mean_std([r["accuracy"] * 100 for r in sel])
                ys.append(m)
                es.append(e)
            ax.errorbar(xs, ys, yerr=es, marker=marker, color=color, capsize=3, label=f"{method} + {comp.upper()}",
                        ls="-" if method == "L1P" else ":")
    ax.set_xlabel("block parameters remaining (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits, sdt-tiny: accuracy vs compression")
    ax.invert_xaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
