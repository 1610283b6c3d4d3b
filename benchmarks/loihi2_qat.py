"""``--quantize loihi2`` on the demo models: accuracy of the float, quantised and fine-tuned model,
and fixed-point Lava (Lava's bit-accurate LIF, profile ``loihi2-fixed``) against the quantised
PyTorch model spike for spike.

For each checkpoint (default: the demo's ``runs/demo/{dense,l1p-90,dsp-30}``, sdt-tiny on digits,
written by ``python -m stdeploy.demo``): the float accuracy on the 360 digits test images; the loihi2
mode without fine-tuning; after ``--epochs`` straight-through epochs (``quantize_model``, mode
``loihi2``, lr 5e-4, batch 64, seed 0, the full digits training split); then the fine-tuned model
exported (``model.nir``; the manifest records the mode and the 2^-4 input grid) and run on Lava's
fixed point on the first ``--samples`` test images. Reported: accuracies, output spikes that differ
between Lava and PyTorch (and of how many), logits identical or not, Lava's accuracy on those
images, the head's firing rate and the range of the layers' rates, and the largest register need
of any population (bits of Loihi's 24). Usage::

    python benchmarks/loihi2_qat.py [--checkpoints runs/demo/dense,runs/demo/l1p-90,runs/demo/dsp-30]
                                    [--epochs 2] [--samples 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stdeploy.checkpoint import load_checkpoint  # noqa: E402
from stdeploy.data import load_dataset  # noqa: E402
from stdeploy.export.directory import export_model  # noqa: E402
from stdeploy.export.validate import logits_and_spikes  # noqa: E402
from stdeploy.models import direct_encode  # noqa: E402
from stdeploy.prune import QuantizeConfig, quantize_model  # noqa: E402
from stdeploy.targets.lava.target import LavaTarget  # noqa: E402
from stdeploy.targets.profiles import load_profile  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", default="runs/demo/dense,runs/demo/l1p-90,runs/demo/dsp-30")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    digits = load_dataset("digits")
    print(f"digits: {len(digits.train)} train / {len(digits.test)} test images; loihi2 fine-tune {args.epochs} epochs; "
          f"Lava fixed point (loihi2-fixed, Loihi2SimCfg) on the first {args.samples} test images")
    print("| model | float | loihi2, quantised | loihi2, after QAT | Lava fixed: output spikes differing | logits identical "
          "| Lava accuracy | head firing rate (layers) | largest register need | QAT s | Lava s |")
    print("|---|---:|---:|---:|---:|---|---:|---|---:|---:|---:|")
    for ck_path in args.checkpoints.split(","):
        ck = load_checkpoint(ck_path)
        t0 = time.perf_counter()
        q, report = quantize_model(ck.model, digits, QuantizeConfig(mode="loihi2", epochs=args.epochs, device="cpu"), progress=False)
        t_qat = time.perf_counter() - t0
        acc = report["accuracy"]
        q = q.eval()
        with tempfile.TemporaryDirectory() as tmp:
            manifest = export_model(q, Path(tmp) / "export", ("nir",), data=digits, samples=args.samples)
            rates = manifest["validation"]["activity"]
            x = direct_encode(torch.stack([digits.test[i][0] for i in range(args.samples)]), q.cfg.timesteps)
            labels = np.array([int(digits.test[i][1]) for i in range(args.samples)])
            logits, spikes = logits_and_spikes(q, x)
            logits, spikes = logits.numpy(), spikes.numpy()
            t0 = time.perf_counter()
            with LavaTarget().compile(Path(tmp) / "export", load_profile("loihi2-fixed")) as runnable:
                res = runnable.run(x.numpy())
                quant = runnable.info["quantisation"]
            t_lava = time.perf_counter() - t0
        spikes = spikes.reshape(res.spikes.shape)
        need = max(v["register_bits"] for v in quant.values() if "register_bits" in v)
        layer_rates = list(rates["firing_rates"].values())
        print(f"| {Path(ck_path).name} | {acc['float']:.4f} | {acc['quantized']:.4f} | {acc.get('quantized_finetuned', acc['quantized']):.4f} "
              f"| {int((res.spikes != spikes).sum())} of {spikes.size} | {np.array_equal(res.logits, logits)} "
              f"| {float((res.logits.argmax(-1) == labels).mean()):.4f} | {float(spikes.mean()):.3f} "
              f"({min(layer_rates):.3f}-{max(layer_rates):.3f}) | {need:.2f} bits | {t_qat:.0f} | {t_lava:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
