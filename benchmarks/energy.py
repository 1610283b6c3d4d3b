"""Estimated energy per sample of the demo's models (dense, L1P-90, DSP-30), under both conventions
for direct input, with the activity they ran at.

    python benchmarks/energy.py [--out runs/bench-energy] [--epochs 15] [--finetune-epochs 5]

Trains and prunes exactly as ``stdeploy.demo`` does (sdt-tiny on digits; L1P 90% and DSP 30% with
sLIF compensation), exports each model, and profiles the exports on the whole digits test split
with the ``cpu`` (45 nm model) and ``loihi2`` (Loihi model, active neuron updates) energy figures:
once with direct input charged once per sample (the default) and once per step (the Spikformer
papers' convention). Prints one table per convention (the report's Markdown, with what each
column counts), the firing-rate range of each model, and the machine and command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stdeploy.activity import require_active  # noqa: E402
from stdeploy.data import load_dataset  # noqa: E402
from stdeploy.demo import VARIANTS  # noqa: E402
from stdeploy.export.directory import export_model  # noqa: E402
from stdeploy.models import DEFAULT_PRESET, build_model, clone_model  # noqa: E402
from stdeploy.profile.report import to_markdown  # noqa: E402
from stdeploy.runner import profile_exports  # noqa: E402
from stdeploy.prune import CompensationConfig, prune_model  # noqa: E402
from stdeploy.train import TrainConfig, train  # noqa: E402
from stdeploy.timing import describe_machine  # noqa: E402


def machine() -> str:
    return describe_machine()

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15, help="dense training epochs (the demo's)")
    ap.add_argument("--finetune-epochs", type=int, default=5, help="sLIF fine-tune epochs after pruning (the demo's)")
    ap.add_argument("--out", default="runs/bench-energy")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = build_model(DEFAULT_PRESET)
    train(model, data, TrainConfig(epochs=args.epochs), out / "dense", meta={"preset": DEFAULT_PRESET}, progress=False)
    models = {"dense": model}
    for name, pcfg in VARIANTS.items():
        models[name], _ = prune_model(clone_model(model), data, pcfg, CompensationConfig(epochs=args.finetune_epochs, penalty_epochs=2),
                                      out=out / name, meta={"parent": str(out / "dense")})
    for name, m in models.items():
        export_model(m, out / "export" / name, ("onnx",), data=data, samples=None, source=str(out / name))
    exports = [out / "export" / n for n in models]
    text = [f"Machine: {machine()}. Command: `python benchmarks/energy.py {' '.join(sys.argv[1:])}`\n"]
    reports = {}
    for convention in ("once", "per_step"):
        report = profile_exports(exports, data, [], ["cpu", "loihi2"], direct_input=convention, repeats=1, warmup=0)
        reports[convention] = report
        for v in report["variants"]:
            require_active(v["firing_rates"], low=1e-3, high=0.9, what=v["name"])
        text.append(f"### direct input charged {'once per sample' if convention == 'once' else 'at every step'}\n\n"
                    f"{to_markdown(report)}\n")
    for v in reports["once"]["variants"]:
        rates = v["firing_rates"].values()
        text.append(f"- {v['name']}: firing rates {min(rates):.3f}-{max(rates):.3f}; "
                    f"active / all neuron updates {v['counts']['active_neuron_updates']:.4g} / {v['counts']['neuron_updates']:.4g}")
    report_md = "\n".join(text) + "\n"
    print(report_md)
    (out / "energy.md").write_text(report_md)
    (out / "energy.json").write_text(json.dumps(reports, indent=1, default=str))
    print(f"finished in {time.perf_counter() - t0:.0f} s; {out / 'energy.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
