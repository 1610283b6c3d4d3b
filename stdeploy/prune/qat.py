"""Quantisation-aware fine-tuning into the exact mode (:mod:`stdeploy.models.quantize`).

``quantize_model(model, data, QuantizeConfig(...))`` folds BatchNorm, quantises (8-bit weights on a
per-layer power-of-two grid, grid biases and thresholds, power-of-two leak), fine-tunes with
straight-through gradients and returns the exact-mode model with the test accuracy at every stage.
``QuantizeConfig(mode="loihi2")`` adds Loihi 2's constraints (input grid 2^-4, fixed per-layer
exponents, integer thresholds in units of each population's current; see
:mod:`stdeploy.models.quantize`), so Lava's fixed point and lava-dl netx run the trained integers.
A saved checkpoint records ``meta["quantize"] = "exact"`` (or ``"loihi2"``); :func:`stdeploy.checkpoint.load_checkpoint`
rebuilds the quantised modules from it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from torch import nn

from ..checkpoint import TRAIN_STATE, save_checkpoint
from ..errors import ConfigError
from ..models.quantize import check_mode, exact_layers, to_exact
from ..train import TrainConfig, evaluate, train


@dataclass(frozen=True)
class QuantizeConfig:
    mode: str = "exact"            # "exact" (integer-exact deployment), "loihi2" (exact plus Loihi's integer constraints) or "float"
    epochs: int = 3                # quantisation-aware fine-tune epochs (0: quantise only)
    lr: float = 5e-4
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        check_mode(self.mode)
        if not (isinstance(self.epochs, int) and self.epochs >= 0):
            raise ConfigError(f"quantisation fine-tune epochs must be an integer >= 0, got {self.epochs!r}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed, device=self.device)


def quantize_model(model: nn.Module, data, qcfg: QuantizeConfig = QuantizeConfig(), out=None, progress: bool = True,
                   meta: dict | None = None) -> tuple[nn.Module, dict]:
    """The exact-mode copy of a finalized ``model``, fine-tuned; ``(model, report)``. With ``out``
    the result is saved there with ``meta["quantize"] = "exact"`` (plus ``meta``)."""
    t0 = time.perf_counter()
    T = model.cfg.timesteps
    device = next(model.parameters()).device
    stages = {"float": evaluate(model, data.test, T, device=device)}
    if qcfg.mode == "float":
        return model, {"mode": "float", "accuracy": stages}
    q = to_exact(model, qcfg.mode).to(device)
    stages["quantized"] = evaluate(q, data.test, T, device=device)
    if qcfg.epochs > 0:
        train(q, data, qcfg.train_config(), None, progress=progress)
        stages["quantized_finetuned"] = evaluate(q, data.test, T, device=device)
    report = {"mode": qcfg.mode, "accuracy": stages, "config": asdict(qcfg), "layers": exact_layers(q),
              "seconds": time.perf_counter() - t0}
    if out is not None:
        path = save_checkpoint(out, q, meta={**(meta or {}), "quantize": qcfg.mode, "quantize_report": report})
        (path / TRAIN_STATE).unlink(missing_ok=True)
        report["checkpoint"] = str(path)
    return q, report
