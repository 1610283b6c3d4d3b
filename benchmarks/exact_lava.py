"""Lava's fixed point on an exact-mode model: output spikes and logits against PyTorch on the same
inputs, for the export's default 8-bit input contract (Lava fits the finest input grid its 24-bit
registers hold: :func:`stdeploy.targets.lava.fixed_point.fit_input_contract`) and for the
digits' own 4-bit grid.

Default model: the one of ``tests/export/test_exact.py`` (sdt, 4 blocks, D = 32, random weights,
BatchNorm statistics estimated on 256 digits, then the exact mode), on digits test images. With
``--checkpoint`` an exact-mode checkpoint instead (its own input contract, e.g. MNIST-1D's signed
one), on ``--data``; then also the exact model's test accuracy in PyTorch on the export's contract
and on the grid Lava runs. Usage::

    python benchmarks/exact_lava.py [--samples 3]
    python benchmarks/exact_lava.py --checkpoint runs/m1d-exact --data mnist1d --samples 3
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from stdeploy.checkpoint import load_checkpoint
from stdeploy.data import load_dataset
from stdeploy.export.exact import contract_metadata
from stdeploy.export.manifest import write_manifest
from stdeploy.export.nir_export import to_nir, write_nir
from stdeploy.export.validate import record_neurons
from stdeploy.models import build_model, direct_encode
from stdeploy.models.quantize import InputContract, deployable, input_contract_of, to_exact
from stdeploy.prune import recalibrate_bn
from stdeploy.targets.lava.target import LavaTarget
from stdeploy.targets.profiles import load_profile


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(direct_encode(x, model.cfg.timesteps)).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--checkpoint", default=None, help="an exact-mode checkpoint (default: the 4-block test model)")
    ap.add_argument("--data", default="digits")
    args = ap.parse_args()
    data = load_dataset(args.data)
    if args.checkpoint:
        exact = load_checkpoint(args.checkpoint).model.eval()
        own = input_contract_of(exact)
        if own is None:
            raise SystemExit(f"{args.checkpoint} is not an exact-mode checkpoint (stdeploy quantize first)")
        contracts = [own]
    else:
        torch.manual_seed(0)
        model = build_model("sdt-tiny", depth=4, embed_dim=32, heads=2, mlp_ratio=2.0)
        recalibrate_bn(model, torch.utils.data.Subset(data.train, range(256)), batch_size=64)
        exact = to_exact(model.eval()).eval()
        contracts = [InputContract(), InputContract(0.0, 1.0, 4)]
    folded = deployable(exact)
    raw = torch.stack([data.test[i][0] for i in range(args.samples)])
    profile = load_profile("loihi2-fixed")
    print(f"{args.checkpoint or 'sdt 4 blocks, D = 32 (tests/export/test_exact.py)'} on {args.samples} {args.data} test samples, "
          f"Lava fixed point ({profile.name}: PyLifModelBitAcc, 8-bit weights)")
    print("| export's input contract | grid Lava runs (fitted) | unproven populations | output spikes differing | logits identical "
          "| firing rates (min-max, head) |")
    print("|---|---|---|---:|---|---|")
    fitted_all = []
    with tempfile.TemporaryDirectory() as tmp:
        for contract in contracts:
            graph = to_nir(folded)
            graph.metadata["quantize"] = {"mode": "exact", **contract_metadata(contract)}
            path = Path(tmp) / f"frac{contract.frac_bits}"
            path.mkdir()
            write_nir(graph, path / "model.nir")
            write_manifest(path, {"artifacts": {"nir": {"file": "model.nir"}}})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                runnable = LavaTarget().compile(path, profile)
            fitted = InputContract.from_dict(runnable.info["input_contract"])
            fitted_all.append(fitted)
            x = direct_encode(fitted.apply(contract.apply(raw)), exact.cfg.timesteps)
            with runnable:
                res = runnable.run(direct_encode(raw, exact.cfg.timesteps).numpy())  # the source clips and rounds itself
            with torch.no_grad():
                logits, records = record_neurons(folded, x)
            rates = {k: float(v["spikes"].mean()) for k, v in records.items()}
            spikes = records["head.lif"]["spikes"].numpy()
            quant = runnable.info["quantisation"]
            unproven = ", ".join(k for k, v in quant.items() if "proven" in v and not v["proven"]) or "none"
            print(f"| [{contract.lo:g}, {contract.hi:g}] on 2^-{contract.frac_bits} | [{fitted.lo:g}, {fitted.hi:g}] on "
                  f"2^-{fitted.frac_bits} | {unproven} | {int((res.spikes != spikes).sum())} of {spikes.size} | "
                  f"{np.array_equal(res.logits, logits.numpy())} | {min(rates.values()):.3f}-{max(rates.values()):.3f}, "
                  f"{rates['head.lif']:.3f} |")
    if args.checkpoint:
        x_all = torch.stack([data.test[i][0] for i in range(len(data.test))])
        y_all = torch.tensor([int(data.test[i][1]) for i in range(len(data.test))])
        print(f"exact model's accuracy on all {len(x_all)} test samples (PyTorch): export's contract "
              f"{accuracy(exact, contracts[0].apply(x_all), y_all):.4f}, Lava's grid 2^-{fitted_all[0].frac_bits} "
              f"{accuracy(exact, fitted_all[0].apply(contracts[0].apply(x_all)), y_all):.4f}")


if __name__ == "__main__":
    main()
