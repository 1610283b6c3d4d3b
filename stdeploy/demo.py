"""``make demo``: the main job on the embedded default, end to end on a laptop CPU.

1. train the default preset (``sdt-tiny``) on scikit-learn's digits;
2. prune it with L1P (90% sparse) and with DSP (30% of block parameters), each compensated by an
   sLIF fine-tune;
3. export all three to NIR and ONNX, each artifact validated against PyTorch on the test split;
4. run the exports on every target that can run here and check accuracy and output spikes;
5. profile them: operation counts and energy (45 nm and Loihi figures), latency, one report with plots.

Artifacts go to ``runs/demo/`` (override with ``STDEPLOY_DEMO_DIR``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .export.directory import export_model
from .profile.report import to_markdown, write_report
from .runner import list_targets, load_reference, profile_exports, run_export
from .data import load_dataset
from .models import DEFAULT_PRESET, build_model, clone_model
from .prune import DEFAULT_LAYERS, CompensationConfig, PruneConfig, prune_model, select_layers
from .prune.base import dense_params
from .train import TrainConfig, train

EPOCHS = int(os.environ.get("STDEPLOY_DEMO_EPOCHS", "15"))
FINETUNE_EPOCHS = int(os.environ.get("STDEPLOY_DEMO_FINETUNE_EPOCHS", "5"))

VARIANTS = {
    "l1p-90": PruneConfig(method="l1p", sparsity=0.9),
    "dsp-30": PruneConfig(method="dsp", param_ratio=0.3),
}


def main() -> int:
    out = Path(os.environ.get("STDEPLOY_DEMO_DIR", "runs/demo"))
    t0 = time.perf_counter()
    torch.manual_seed(0)
    data = load_dataset("digits")
    steps = 1 + len(VARIANTS)  # training and pruning; export and run follow
    model = build_model(DEFAULT_PRESET)
    print(f"[1/{steps}] training {DEFAULT_PRESET} on digits ({len(data.train)} train / {len(data.test)} test images), {EPOCHS} epochs")
    result = train(model, data, TrainConfig(epochs=EPOCHS), out / "dense", meta={"preset": DEFAULT_PRESET})
    print(f"      dense: test accuracy {result.test_accuracy:.4f}, {result.params} params ({result.seconds:.1f} s)")
    rows = [("dense", result.test_accuracy, None, dense_params(select_layers(model, DEFAULT_LAYERS)), str(out / "dense"))]
    for i, (name, pcfg) in enumerate(VARIANTS.items(), start=2):
        print(f"[{i}/{steps}] pruning: {name} ({pcfg.method}), sLIF compensation, {FINETUNE_EPOCHS} fine-tune epochs")
        _, report = prune_model(clone_model(model), data, pcfg, CompensationConfig(epochs=FINETUNE_EPOCHS, penalty_epochs=2),
                                out=out / name, meta={"parent": str(out / "dense")})
        acc = report["accuracy"]
        print(f"      {name}: right after {acc['after_prune']:.4f}, after BN recalibration {acc['after_bn_recalibration']:.4f}, "
              f"after sLIF fine-tune {acc['final']:.4f}")
        rows.append((name, acc["final"], acc["after_prune"], report["block_params_remaining"], str(out / name)))
    print()
    print(f"{'model':<8} {'test acc':>9} {'right after':>12} {'block params':>13}  checkpoint")
    for name, acc, after, params, path in rows:
        after_s = f"{after:.4f}" if after is not None else "-"
        print(f"{name:<8} {acc:>9.4f} {after_s:>12} {params:>13}  {path}")

    print(f"\n[export] NIR + ONNX of each model, validated on the {len(data.test)} test images")
    models = {"dense": model, **{name: load_checkpoint(out / name).model for name in VARIANTS}}
    for name, m in models.items():
        manifest = export_model(m, out / "export" / name, data=data, samples=None, source=str(out / name), overwrite=True)  # the demo reruns in its folder
        v = manifest["validation"]
        parts = []
        for art, r in v["results"].items():
            parts.append(f"{art} {manifest['artifacts'][art]['bytes'] // 1024} KB, {r['spike_mismatches']} spike mismatches"
                         + ("" if not r["flips"] else f" (first at {r['flips'][0]['layer']}, {r['flips'][0]['max_distance']:.1e} from threshold)"))
        print(f"  {name:<7} " + "; ".join(parts))
    print(f"  manifests: {out / 'export' / '*' / 'manifest.json'}")

    print("\n[run] every target that can run here, on the test split")
    print(f"{'model':<8} {'target':<12} {'accuracy':>9} {'PyTorch':>8} {'spike agreement':>16} {'wall s':>7}")
    targets = list_targets()
    for name in models:
        reference = load_reference(out / "export" / name)  # once per model, for every target
        for t in targets:
            if not t["available"]:
                print(f"{name:<8} {t['target']:<12} skipped: {t['detail']}")
                continue
            r = run_export(out / "export" / name, t["target"], data=data, reference=reference)
            agree = f"{r['spike_agreement']:.6f}" if "spike_agreement" in r else "-"
            print(f"{name:<8} {t['target']:<12} {r['accuracy']:>9.4f} {r['reference_accuracy']:>8.4f} {agree:>16} {r['run_seconds']:>7.2f}"
                  + ("" if r["within_tolerance"] else f"  OUTSIDE TOLERANCE: {'; '.join(r['tolerance_problems'])}"))

    print("\n[profile] operation counts on the test split, energy per device model, latency")
    report = profile_exports([out / "export" / n for n in models], data, ["onnxruntime"], ["cpu", "loihi2"])
    paths = write_report(report, out / "report")
    print(to_markdown(report))
    for v in report["variants"][1:]:
        e = ", ".join(f"{k} {r:.2f}x" for k, r in v["energy_vs_first"].items())
        print(f"  {v['name']}: {v['sops_vs_first']:.2f}x the dense model's SOPs; energy {e}")
    print(f"  report: {paths['json']}, {paths['markdown']}")
    print(f"  plots: {', '.join(paths['plots'])}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
