"""Accuracy of a float checkpoint under the exact mode's input contracts: the test split as is,
rounded to the grid ``2**-frac_bits``, clipped to the images' range ``[0, 1]`` (the only contract
before signed ranges), and clipped to the contract the exact mode derives from the training split
(:meth:`~stdeploy.models.quantize.InputContract.covering`, signed for standardised data). Shows
whether a data set fits a contract, and how many test values fall outside it (those are clipped).
With ``--exact CHECKPOINT`` also the accuracy of an exact-mode checkpoint (its own contract).
Usage::

    python benchmarks/exact_input_contract.py CHECKPOINT --data mnist1d [--exact EXACT_CHECKPOINT]
"""

from __future__ import annotations

import argparse

import torch

from stdeploy.activity import measure_activity
from stdeploy.checkpoint import load_checkpoint
from stdeploy.data import load_dataset
from stdeploy.models import direct_encode
from stdeploy.models.quantize import INPUT_FRAC_BITS, InputContract, input_contract_of
from stdeploy.prune.qat import data_range


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(direct_encode(x, model.cfg.timesteps)).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--frac-bits", type=int, default=INPUT_FRAC_BITS)
    ap.add_argument("--exact", default=None, help="an exact-mode checkpoint of the same model (its accuracy, contract, firing rates)")
    args = ap.parse_args()
    data = load_dataset(args.data)
    model = load_checkpoint(args.checkpoint).model.eval()
    x = torch.stack([data.test[i][0] for i in range(len(data.test))])
    y = torch.tensor([int(data.test[i][1]) for i in range(len(data.test))])
    n = 2 ** args.frac_bits
    unit = InputContract(0.0, 1.0, args.frac_bits)
    derived = InputContract.covering(*data_range(data.train), args.frac_bits)
    print(f"{args.data}: {len(x)} test samples, values in [{float(x.min()):.3f}, {float(x.max()):.3f}]; "
          f"training split's contract [{derived.lo:g}, {derived.hi:g}] on 2^-{args.frac_bits}")
    rows = [("as is", x), (f"rounded to 2^-{args.frac_bits}", torch.round(x * n) / n),
            ("[0, 1] contract (rounded and clipped)", unit.apply(x)),
            (f"signed contract [{derived.lo:g}, {derived.hi:g}] (rounded and clipped)", derived.apply(x))]
    print("| float model's input | accuracy | test values clipped |")
    print("|---|---:|---:|")
    for name, xx in rows:
        clipped = "-" if "clipped" not in name else int(((x < (unit if "[0, 1]" in name else derived).lo)
                                                        | (x > (unit if "[0, 1]" in name else derived).hi)).sum())
        print(f"| {name} | {accuracy(model, xx, y):.4f} | {clipped} |")
    if args.exact:
        exact = load_checkpoint(args.exact).model.eval()
        c = input_contract_of(exact)
        act = measure_activity(exact, [direct_encode(x[:256], exact.cfg.timesteps)])
        print(f"exact-mode checkpoint {args.exact}: contract [{c.lo:g}, {c.hi:g}] on 2^-{c.frac_bits}, "
              f"accuracy {accuracy(exact, x, y):.4f}")
        print(f"256 test samples: {act.summary()}")
        print("firing rates: " + ", ".join(f"{k} {v:.3f}" for k, v in act.firing_rates.items()))


if __name__ == "__main__":
    main()
