"""``make demo``: the main job on the embedded default, end to end on a laptop CPU.

Trains the default preset (``sdt-tiny``) on scikit-learn's digits and prints its accuracy.
Artifacts go to ``runs/demo/`` (override with ``STDEPLOY_DEMO_DIR``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .data import load_dataset
from .models import DEFAULT_PRESET, build_model
from .train import TrainConfig, train

EPOCHS = int(os.environ.get("STDEPLOY_DEMO_EPOCHS", "15"))


def main() -> int:
    out = Path(os.environ.get("STDEPLOY_DEMO_DIR", "runs/demo"))
    t0 = time.perf_counter()
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = build_model(DEFAULT_PRESET)
    print(f"[1/1] training {DEFAULT_PRESET} on digits ({len(data.train)} train / {len(data.test)} test images), {EPOCHS} epochs")
    result = train(model, data, TrainConfig(epochs=EPOCHS), out / "dense", meta={"preset": DEFAULT_PRESET})
    print()
    print(f"dense {DEFAULT_PRESET}: test accuracy {result.test_accuracy:.4f}  params {result.params}  ({result.seconds:.1f} s)")
    print(f"checkpoint: {out / 'dense'}")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
