"""Where a ``benchmarks/speed.py --large`` variant's onnxruntime output spikes first diverge from
PyTorch's, on the same benchmark batch (regenerated as ``speed.py`` draws it: seed 0, the model
built first, then ``--large-batch`` uniform-noise 32x32 images, direct-encoded over T steps).

    .venv/bin/python benchmarks/speed_divergence.py runs/bench-speed-512/sdt-8-512/dense --large-batch 2

Prints the spike mismatches of the unfolded model vs its BatchNorm-folded reference and vs
onnxruntime, then ``stdeploy.export.directory.compare_streamed``'s result: per layer, in model
order, the flips on the first sample that has one and their distance from the threshold (the
first layer's distance says whether the divergence starts at rounding level), and the bound check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stdeploy.checkpoint import load_checkpoint  # noqa: E402
from stdeploy.export.directory import compare_streamed, stream_outputs  # noqa: E402
from stdeploy.export.onnx_export import probe_onnx, run_onnx  # noqa: E402
from stdeploy.models import build_model, direct_encode  # noqa: E402
from stdeploy.models.quantize import deployable  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", help="a variant's export folder written by speed.py (OUT/sdt-8-512/VARIANT)")
    ap.add_argument("--large-batch", type=int, default=4, help="the --large-batch speed.py ran with")
    ap.add_argument("--layers", type=int, default=8, help="how many diverging layers to print")
    args = ap.parse_args()
    d = Path(args.export_dir)
    if not (d / "model.onnx").is_file() or not (d / "reference").is_dir():
        print(f"speed_divergence.py: {d}: no model.onnx and reference/ (not an export folder)", file=sys.stderr)
        return 2
    torch.set_flush_denormal(True)   # as speed.py runs
    torch.manual_seed(0)
    big = build_model("sdt-8-512")   # consumes the generator as speed.py's does before drawing its batch
    x = direct_encode(torch.rand(args.large_batch, 3, 32, 32), big.cfg.timesteps)
    model = load_checkpoint(d / "reference").model.eval()
    folded = deployable(model)
    _, spikes = stream_outputs(model, x)
    f_logits, f_spikes = stream_outputs(folded, x)
    o_logits, o_spikes = run_onnx(d / "model.onnx", x)
    print(f"output spikes {spikes.numel()}: unfolded vs folded {int((spikes != f_spikes).sum())} differ, "
          f"unfolded vs onnxruntime {int((spikes != o_spikes).sum())}")
    result = compare_streamed("onnx", folded, x, f_logits, f_spikes, o_logits, o_spikes, lambda xb: probe_onnx(folded, xb)).to_dict()
    result["flips"] = result.get("flips", [])[:args.layers]
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
