"""Latency of the same exported models on every target, in one run: PyTorch eager (the folded
reference), onnxruntime, TVM (untuned llvm) and Lava, for dense, L1P and DSP variants.

    .venv/bin/python benchmarks/targets.py [EXPORT_DIR ...] [--batch 32] [--repeats 10]

Without arguments it uses the exports `make demo` writes (runs/demo/export/{dense,l1p-90,dsp-30}).
Each cell is the median wall time of one batch over the repeats after a warm-up run (the run
path's timer, ``stdeploy.runner.latency``), divided by the batch; ratios are to onnxruntime on the
dense model, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stdeploy.data import load_dataset  # noqa: E402
from stdeploy.models import direct_encode  # noqa: E402
from stdeploy.runner import latency, load_reference, pytorch_latency  # noqa: E402
from stdeploy.targets.base import target_names  # noqa: E402

DEMO = Path("runs/demo/export")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="*", type=Path)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--lava-batch", type=int, default=4, help="Lava simulates slowly: a smaller batch, scaled per sample")
    args = ap.parse_args()
    exports = args.exports or [DEMO / n for n in ("dense", "l1p-90", "dsp-30")]
    missing = [str(e) for e in exports if not (e / "manifest.json").is_file()]
    if missing:
        print(f"missing export directories {missing}: run `make demo` first or pass export directories", file=sys.stderr)
        return 2
    data = load_dataset("digits")
    x_img = torch.stack([data.test[i][0] for i in range(args.batch)])
    rows = []
    for export in exports:
        ref = load_reference(export)
        x = direct_encode(x_img, ref.cfg.timesteps)
        t = pytorch_latency(ref, x, warmup=1, repeats=args.repeats, layers=False)["median_s"]
        rows.append((export.name, "pytorch eager", t / args.batch))
        for name in target_names():
            batch = args.lava_batch if name == "lava" else args.batch
            r = latency(export, name, x[:, :batch], warmup=1, repeats=1 if name == "lava" else args.repeats)
            rows.append((export.name, name, r["median_s"] / batch if "median_s" in r else None))
    base = next(t for m, n, t in rows if n == "onnxruntime" and t is not None)
    print(f"\nbatch {args.batch} (Lava {args.lava_batch}), T = {ref.cfg.timesteps}, median of {args.repeats} runs after a warm-up; "
          "time per sample")
    print("| model | runtime | ms / sample | x onnxruntime dense |")
    print("|---|---|---|---|")
    for model, runtime, t in rows:
        if t is None:
            print(f"| {model} | {runtime} | not available | |")
        else:
            print(f"| {model} | {runtime} | {t * 1e3:.3f} | {t / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
