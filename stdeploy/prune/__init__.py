"""Compression: L1P (sparse magnitude masks) and DSP (low-rank U·V), then sLIF compensation.

``prune_model(model, data, PruneConfig(...), CompensationConfig(...))`` runs the whole recipe:
penalty phase -> masks / rank removal -> BatchNorm recalibration -> compensation fine-tune ->
finalize, and reports accuracy at every stage and the parameters that remain: of the selected
layers (``block_params_*``, named for the default scope) and of the whole model's weight layers with
their multiply-adds (``model``: :func:`~.counts.weight_counts`). ``PruneConfig(layers=ALL_LAYERS)``
(``--layers all``) prunes the embedding convolutions and the classifier too.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from torch import nn

from ..checkpoint import TRAIN_STATE, save_checkpoint
from ..errors import ConfigError
from ..train import TrainConfig, evaluate, train
from .base import ALL_LAYERS, DEFAULT_LAYERS, LAYER_SCOPES, METHODS, PruneConfig, Pruner, layer_patterns, select_layers
from .compensate import COMPENSATIONS, convert_neurons, recalibrate_bn
from .counts import weight_counts
from .dsp import DSPPruner
from .l1p import L1Pruner, magnitude_masks
from .qat import QuantizeConfig, quantize_model

PRUNERS: dict[str, type[Pruner]] = {"l1p": L1Pruner, "dsp": DSPPruner}


def make_pruner(config: PruneConfig) -> Pruner:
    return PRUNERS[config.method](config)


@dataclass(frozen=True)
class CompensationConfig:
    neuron: str = "slif"           # "slif" (learnable threshold and leak), "lif" (weights only), "none" (no fine-tune)
    epochs: int = 15               # compensation fine-tune epochs
    penalty_epochs: int = 3        # training epochs with the L1 / group penalty before pruning
    learn_threshold: bool = True   # sLIF variants: threshold only (default), leak only, or both
    learn_leak: bool = False       # benchmarks/compression_study.py (sdt-tiny, 5 seeds): learning the leak did not
                                   # help (DSP 10%/5%: -0.28/-0.28 points vs LIF, 0 and 1 of 5 seeds better)
    recalibrate_bn: bool = True    # recompute BN statistics right after pruning, before fine-tuning
    lr: float = 1e-3
    intrinsic_lr_scale: float = 20.0
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.neuron not in COMPENSATIONS:
            raise ConfigError(f"unknown compensation {self.neuron!r}; known: {', '.join(COMPENSATIONS)}")
        if not (isinstance(self.epochs, int) and self.epochs >= 0 and isinstance(self.penalty_epochs, int) and self.penalty_epochs >= 0):
            raise ConfigError(f"epochs and penalty epochs must be integers >= 0, got {self.epochs!r}, {self.penalty_epochs!r}")
        if self.neuron == "slif" and not (self.learn_threshold or self.learn_leak):
            raise ConfigError("sLIF compensation needs threshold or leak (or both) to learn")

    def train_config(self, epochs: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=self.lr, intrinsic_lr_scale=self.intrinsic_lr_scale,
                           seed=self.seed, device=self.device)


def apply_pruning(model: nn.Module, data, pcfg: PruneConfig, ccfg: CompensationConfig = CompensationConfig(),
                  progress: bool = True) -> tuple[Pruner, dict]:
    """Prepare, penalty phase, prune (unless the schedule is gradual) and recalibrate BN, in place.
    Returns the pruner (for :func:`compensate`) and the test accuracy after each stage."""
    T = model.cfg.timesteps
    device = next(model.parameters()).device
    acc = lambda: evaluate(model, data.test, T, device=device)  # noqa: E731
    stages = {"dense": acc()}
    pruner = make_pruner(pcfg)
    pruner.prepare(model)
    if ccfg.penalty_epochs > 0:
        train(model, data, ccfg.train_config(ccfg.penalty_epochs), None, progress=progress, regularizer=pruner.regularizer)
        stages["after_penalty"] = acc()
    if not _gradual(pcfg):
        pruner.step(model, 1.0)
        stages["after_prune"] = acc()
        if ccfg.recalibrate_bn:
            recalibrate_bn(model, data.train)
            stages["after_bn_recalibration"] = acc()
    return pruner, stages


def compensate(model: nn.Module, pruner: Pruner, data, ccfg: CompensationConfig, stages: dict | None = None,
               out=None, progress: bool = True) -> dict:
    """Convert neurons (sLIF or not), fine-tune with the masks / ranks fixed (or following the
    gradual schedule), finalize; returns the report."""
    t0 = time.perf_counter()
    pcfg = pruner.config
    stages = dict(stages or {})
    convert_neurons(model, ccfg.neuron, ccfg.learn_threshold, ccfg.learn_leak)
    epochs = ccfg.epochs if ccfg.neuron != "none" else 0
    if epochs > 0:
        on_step = None
        if _gradual(pcfg):
            def on_step(step, total):
                if step % 10 == 0 or step == total:
                    pruner.step(model, step / total)
        meta = {"prune": pcfg.to_dict(), "compensation": asdict(ccfg)}
        train(model, data, ccfg.train_config(epochs), out, progress=progress, on_step=on_step, meta=meta)
    elif _gradual(pcfg):
        pruner.step(model, 1.0)
    pruner.finalize(model)
    stages["final"] = evaluate(model, data.test, model.cfg.timesteps, device=next(model.parameters()).device)
    return {**pruner.report(model), "model": weight_counts(model), "accuracy": stages, "compensation": ccfg.neuron,
            "config": pcfg.to_dict(), "compensation_config": asdict(ccfg), "seconds": time.perf_counter() - t0}


def _gradual(pcfg: PruneConfig) -> bool:
    return pcfg.method == "l1p" and pcfg.schedule == "cubic"


def prune_model(model: nn.Module, data, pcfg: PruneConfig, ccfg: CompensationConfig = CompensationConfig(),
                out=None, progress: bool = True, meta: dict | None = None,
                quantize: QuantizeConfig | None = None) -> tuple[nn.Module, dict]:
    """Prune ``model`` in place following ``pcfg``, compensate following ``ccfg``; return the
    finalized model and a report (accuracies at every stage, parameters, per-layer detail).
    With ``quantize`` (mode ``exact``), the finalized model is then quantised and fine-tuned
    (:func:`stdeploy.prune.qat.quantize_model`) and that exact-mode copy is returned instead.
    With ``out``, the final model is saved there (report in its metadata, plus ``meta``)."""
    t0 = time.perf_counter()
    pruner, stages = apply_pruning(model, data, pcfg, ccfg, progress)
    report = compensate(model, pruner, data, ccfg, stages, None if quantize is not None and quantize.mode != "float" else out, progress)
    if quantize is not None and quantize.mode != "float":
        model, report["quantize"] = quantize_model(model, data, quantize, progress=progress)
        meta = {**(meta or {}), "quantize": quantize.mode}
    report["seconds"] = time.perf_counter() - t0
    if out is not None:
        path = save_checkpoint(out, model, meta={**(meta or {}), "prune": report})
        (path / TRAIN_STATE).unlink(missing_ok=True)  # the fine-tune's optimizer state belongs to the unfinalized model
        report["checkpoint"] = str(path)
    return model, report


__all__ = ["PruneConfig", "CompensationConfig", "prune_model", "apply_pruning", "compensate", "make_pruner", "PRUNERS", "METHODS", "COMPENSATIONS",
           "DEFAULT_LAYERS", "select_layers", "recalibrate_bn", "magnitude_masks", "L1Pruner", "DSPPruner",
           "ALL_LAYERS", "LAYER_SCOPES", "layer_patterns", "weight_counts", "QuantizeConfig", "quantize_model"]
