"""Reader x model table for the portable NIR export: does each third-party reader load the graph,
how many output spikes differ from the PyTorch model on the digits test split, which flags it needs.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/interop.py [--train 1024] [--epochs 2] [--test 360]

Each preset (mlp-tiny, conv-tiny, sdt-tiny) is trained briefly on digits (so that it fires), folded,
exported with ``to_portable_nir(model, output="spikes")`` and run in every reader of
``stdeploy.interop.readers`` at its default settings plus the flags in ``FLAGS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from stdeploy.data import load_dataset
from stdeploy.export.nir_portable import to_portable_nir
from stdeploy.export.validate import record_neurons
from stdeploy.interop.readers import FLAGS, READERS, run_reader
from stdeploy.models import build_model, direct_encode
from stdeploy.models.fold import fold_batchnorm
from stdeploy.train import TrainConfig, train

MODELS = ("mlp-tiny", "conv-tiny", "sdt-tiny")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1024, help="digits training images")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--test", type=int, default=360, help="digits test images compared")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = load_dataset("digits")
    n_test = min(args.test, len(d.test))
    data = dataclasses.replace(d, train=torch.utils.data.Subset(d.train, range(args.train)), test=torch.utils.data.Subset(d.test, range(n_test)))
    images = torch.stack([data.test[i][0] for i in range(n_test)])
    rows = []
    for name in MODELS:
        torch.manual_seed(0)
        model = build_model(name)
        train(model, data, TrainConfig(epochs=args.epochs, batch_size=32), None, progress=False)
        folded = fold_batchnorm(model.eval())
        x = direct_encode(images, model.cfg.timesteps)
        with torch.no_grad():
            _, records = record_neurons(folded, x)
        ref = records["head.lif"]["spikes"]
        graph = to_portable_nir(folded, output="spikes")
        xin = x.flatten(2) if model.cfg.stem == "dense" else x
        for reader in READERS:
            t0 = time.perf_counter()
            try:
                out = run_reader(reader, graph, xin)
                t, b, c = out.shape[:3]
                got = out.reshape(t, b, c, -1).transpose(-1, -2)
                loads, mism = "yes", f"{int((got != ref).sum())} / {ref.numel()}"
            except Exception as err:  # a reader's own failure is a row of the table, not a crash of the table
                loads, mism = f"no: {type(err).__name__}: {str(err).splitlines()[0][:70]}", "-"
            rows.append((reader, name, loads, mism, f"{float(ref.mean()):.3f}", FLAGS[reader] or "none",
                         f"{time.perf_counter() - t0:.1f}"))
    head = ("reader", "model", "loads", "spike mismatches", "model firing rate", "flags needed", "seconds")
    print(f"digits test images: {n_test}, T = 4; portable NIR (dt = 1e-4 s), Output = head LIF spikes")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
