"""Accuracy of a float checkpoint under the exact mode's input contract: the test split as is,
rounded to the contract's grid ``2**-INPUT_FRAC_BITS``, and rounded and clipped to its range
``INPUT_RANGE`` (what an exact-mode model sees). Shows whether a data set fits the contract.
Usage::

    python benchmarks/exact_input_contract.py CHECKPOINT --data mnist1d
"""

from __future__ import annotations

import argparse

import torch

from stdeploy.checkpoint import load_checkpoint
from stdeploy.data import load_dataset
from stdeploy.models import direct_encode
from stdeploy.models.quantize import INPUT_FRAC_BITS, INPUT_RANGE, quantize_input


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="digits")
    args = ap.parse_args()
    data = load_dataset(args.data)
    model = load_checkpoint(args.checkpoint).model.eval()
    x = torch.stack([data.test[i][0] for i in range(len(data.test))])
    y = torch.tensor([int(data.test[i][1]) for i in range(len(data.test))])
    n = 2 ** INPUT_FRAC_BITS
    print(f"{args.data}: inputs in [{float(x.min()):.3f}, {float(x.max()):.3f}]; contract: [{INPUT_RANGE[0]:g}, {INPUT_RANGE[1]:g}] "
          f"on 2^-{INPUT_FRAC_BITS}")
    with torch.no_grad():
        for name, xx in (("as is", x), (f"rounded to 2^-{INPUT_FRAC_BITS}", torch.round(x * n) / n),
                         ("rounded and clipped (the contract)", quantize_input(x))):
            acc = float((model(direct_encode(xx, model.cfg.timesteps)).argmax(1) == y).float().mean())
            print(f"  {name}: accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
