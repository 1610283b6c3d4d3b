"""Quantisation-aware fine-tuning into the exact mode (:mod:`stdeploy.models.quantize`).

``quantize_model(model, data, QuantizeConfig(...))`` folds BatchNorm, quantises (8-bit weights on a
per-layer power-of-two grid, grid biases and thresholds, power-of-two leak), fine-tunes with
straight-through gradients and returns the exact-mode model with the test accuracy at every stage.
``QuantizeConfig(mode="loihi2")`` adds Loihi 2's constraints (input grid 2^-4, fixed per-layer
exponents, integer thresholds in units of each population's current; see
:mod:`stdeploy.models.quantize`), so Lava's fixed point and lava-dl netx run the trained integers.
A saved checkpoint records ``meta["quantize"] = "exact"`` (or ``"loihi2"``) and the input contract
(``meta["input_contract"]``); :func:`stdeploy.checkpoint.load_checkpoint` rebuilds the quantised
modules from it.

The input contract (:class:`~stdeploy.models.quantize.InputContract`): ``input_range`` given, or
derived from the training split (its smallest and largest value, rounded outward to the grid
``2**-input_frac_bits``; data inside ``[0, 1]``, such as images, get ``[0, 1]``). Standardised
data (MNIST-1D: about -4.2 to 4.1) thus get a signed range instead of being clipped to ``[0, 1]``.
``input_frac_bits`` defaults to the mode's grid: 8 in the exact mode, 4 in the loihi2 mode (which
refuses a finer one by name).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from torch import nn

from ..checkpoint import TRAIN_STATE, save_checkpoint
from ..errors import ConfigError
from ..models.quantize import (InputContract, check_input_contract, check_mode, default_input_contract, exact_layers,
                               input_contract_of, is_exact, to_exact)
from ..train import TrainConfig, evaluate, train


@dataclass(frozen=True)
class QuantizeConfig:
    mode: str = "exact"            # "exact" (integer-exact deployment), "loihi2" (exact plus Loihi's integer constraints) or "float"
    epochs: int = 3                # quantisation-aware fine-tune epochs (0: quantise only)
    lr: float = 5e-4
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    input_range: tuple[float, float] | None = None  # the input contract's range; None: the training split's, rounded outward
    input_frac_bits: int | None = None               # the input contract's grid 2**-input_frac_bits; None: the mode's (8, loihi2 4)

    def __post_init__(self):
        check_mode(self.mode)
        if self.input_range is not None:
            if not (isinstance(self.input_range, (tuple, list)) and len(self.input_range) == 2):
                raise ConfigError(f"input range must be (lo, hi), got {self.input_range!r}")
            contract = InputContract.covering(*self.input_range, self.frac_bits, unit=False)  # validates
        else:
            contract = InputContract(0.0, 1.0, self.frac_bits)  # validates the grid
        if self.mode != "float":
            check_input_contract(contract, self.mode)  # loihi2: no finer than 2^-4, refused by name
        if not (isinstance(self.epochs, int) and self.epochs >= 0):
            raise ConfigError(f"quantisation fine-tune epochs must be an integer >= 0, got {self.epochs!r}")

    @property
    def frac_bits(self) -> int:
        """The input grid's fractional bits: ``input_frac_bits``, else the mode's default."""
        mode = self.mode if self.mode != "float" else "exact"
        return default_input_contract(mode).frac_bits if self.input_frac_bits is None else self.input_frac_bits

    def input_contract(self, model: nn.Module, data) -> InputContract:
        """The contract for ``model``: the given range, an exact model's own, or the training split's."""
        if self.input_range is not None:
            return InputContract.covering(*self.input_range, self.frac_bits, unit=False)
        own = input_contract_of(model) if is_exact(model) else None
        if own is not None:
            return own
        lo, hi = data_range(data.train)
        return InputContract.covering(lo, hi, self.frac_bits)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed, device=self.device)


def data_range(split, batch_size: int = 1024) -> tuple[float, float]:
    """The smallest and largest input value of a data split of ``(x, label)`` samples."""
    import torch

    lo, hi = float("inf"), float("-inf")
    for x, _ in torch.utils.data.DataLoader(split, batch_size=batch_size):
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    if lo > hi:
        raise ConfigError("the training split is empty: no input range to derive")
    return lo, hi


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
    contract = qcfg.input_contract(model, data)
    q = to_exact(model, contract, mode=qcfg.mode).to(device)
    stages["quantized"] = evaluate(q, data.test, T, device=device)
    if qcfg.epochs > 0:
        train(q, data, qcfg.train_config(), None, progress=progress)
        stages["quantized_finetuned"] = evaluate(q, data.test, T, device=device)
    report = {"mode": qcfg.mode, "accuracy": stages, "config": asdict(qcfg), "layers": exact_layers(q),
              "input_contract": contract.to_dict(),
              "seconds": time.perf_counter() - t0}
    if out is not None:
        path = save_checkpoint(out, q, meta={**(meta or {}), "quantize": qcfg.mode, "quantize_report": report})
        (path / TRAIN_STATE).unlink(missing_ok=True)
        report["checkpoint"] = str(path)
    return q, report
