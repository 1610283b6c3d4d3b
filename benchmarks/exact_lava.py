"""Lava's fixed point on an exact-mode model, with the default 8-bit input contract and with the
digits' own 4-bit grid: output spikes and logits against the NIR interpreter (exact in float32).

The model is the one of ``tests/export/test_exact.py`` (sdt, 4 blocks, D = 32, random weights,
BatchNorm statistics estimated on 256 digits, then the exact mode). Usage::

    python benchmarks/exact_lava.py [--samples 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from stdeploy.data import load_dataset
from stdeploy.export.manifest import write_manifest
from stdeploy.export.nir_export import to_nir, write_nir
from stdeploy.export.nir_interpreter import run_nir
from stdeploy.models import build_model, direct_encode
from stdeploy.models.quantize import deployable, to_exact
from stdeploy.prune import recalibrate_bn
from stdeploy.targets.lava.target import LavaTarget
from stdeploy.targets.profiles import load_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3)
    args = ap.parse_args()
    digits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("sdt-tiny", depth=4, embed_dim=32, heads=2, mlp_ratio=2.0)
    recalibrate_bn(model, torch.utils.data.Subset(digits.train, range(256)), batch_size=64)
    exact = deployable(to_exact(model.eval()).eval())
    x = direct_encode(torch.stack([digits.test[i][0] for i in range(args.samples)]), 4)
    profile = load_profile("loihi2")
    profile = dataclasses.replace(profile, lava={**profile.lava, "mode": "fixed", "weight_bits": 8})
    print("| input grid | unproven populations (register bits) | output spikes differing | logits identical | firing rate (head) |")
    print("|---|---|---:|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for frac in (8, 4):
            graph = to_nir(exact)
            graph.metadata["quantize"] = {"mode": "exact", "input_frac_bits": frac}
            path = Path(tmp) / f"frac{frac}"
            path.mkdir()
            write_nir(graph, path / "model.nir")
            write_manifest(path, {"artifacts": {"nir": {"file": "model.nir"}}})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                runnable = LavaTarget().compile(path, profile)
            with runnable:
                res = runnable.run(x.numpy())
            quant = runnable.info["quantisation"]
            unproven = ", ".join(f"{k} ({v['register_bits']})" for k, v in quant.items() if "proven" in v and not v["proven"]) or "none"
            ref = run_nir(graph, x)
            spikes, logits = ref["spikes"].transpose(-1, -2).numpy(), ref["logits"].mean(0).numpy()
            print(f"| 2^-{frac} | {unproven} | {int((res.spikes != spikes).sum())} of {spikes.size} | "
                  f"{np.array_equal(res.logits, logits)} | {spikes.mean():.3f} |")


if __name__ == "__main__":
    main()
