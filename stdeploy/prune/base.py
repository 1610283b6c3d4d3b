"""The pruning lifecycle shared by L1P and DSP, in the spirit of ``torch.ao.pruning``:

``pruner = make_pruner(config)``; ``pruner.prepare(model)`` attaches masks or factorisations to the
selected weights (addressed by fully qualified names); ``pruner.regularizer(model)`` is the penalty
added to the loss while the weights are pushed toward zero; ``pruner.step(progress)`` updates the
masks / ranks to the schedule's target; ``pruner.finalize(model)`` makes everything permanent and
leaves plain modules (``nn.Linear`` with zeros, ``LowRankLinear``, ``LowRankConv2d``) that export cleanly.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..models.structure import LOW_RANK, inside_low_rank

METHODS = ("l1p", "dsp")
# The weight matrices of the transformer blocks: Q/K/V/output projections and the MLP layers.
DEFAULT_LAYERS = ("blocks.*.attn.q.linear", "blocks.*.attn.k.linear", "blocks.*.attn.v.linear",
                  "blocks.*.attn.proj.linear", "blocks.*.mlp.fc1.linear", "blocks.*.mlp.fc2.linear")
# The whole model: the block linears, the embedding convolutions (stages and position embedding) and
# the classifier. What pruning leaves untouched caps the speed-up of a pruned model (with the
# embedding dense, a 90%-sparse sdt-tiny has a multiply-add limit of 1.38x over dense).
ALL_LAYERS = DEFAULT_LAYERS + ("embed.stages.*.conv.conv", "embed.rpe.conv", "head.fc")
# Names for the --layers flag: a scope name or comma-separated fnmatch patterns.
LAYER_SCOPES = {"blocks": DEFAULT_LAYERS, "all": ALL_LAYERS}


@dataclass(frozen=True)
class PruneConfig:
    method: str = "l1p"                  # "l1p" (unstructured magnitude masks) or "dsp" (low-rank U·V)
    sparsity: float = 0.9                # l1p: fraction of zeros in the selected weights, in [0, 1)
    param_ratio: float | None = 0.3      # dsp: remaining parameters / dense parameters, in (0, 1]
    rank: int | None = None              # dsp: a fixed rank per layer instead of a ratio
    scope: str = "global"                # "global" (one budget over all layers) or "layer" (each layer alike)
    schedule: str = "oneshot"            # l1p: "oneshot" after the penalty phase, or "cubic" over the fine-tune
    penalty: float | None = None         # L1 (l1p) or group (dsp) coefficient; None: the method's default
    layers: tuple[str, ...] = DEFAULT_LAYERS  # fnmatch patterns over nn.Linear / nn.Conv2d module names (ALL_LAYERS: whole model)

    def __post_init__(self):
        problems = []
        if self.method not in METHODS:
            problems.append(f"unknown pruning method {self.method!r}; known: {', '.join(METHODS)}")
        if self.method == "l1p" and not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            problems.append(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.method == "dsp":
            if self.rank is None and self.param_ratio is None:
                problems.append("dsp needs --param-ratio or --rank")
            if self.rank is not None and not (isinstance(self.rank, int) and self.rank >= 1):
                problems.append(f"rank must be a positive integer, got {self.rank!r}")
            if self.rank is None and self.param_ratio is not None and not 0.0 < self.param_ratio <= 1.0:
                problems.append(f"param ratio must be in (0, 1], got {self.param_ratio}")
        if self.scope not in ("global", "layer"):
            problems.append(f"scope must be 'global' or 'layer', got {self.scope!r}")
        if self.schedule not in ("oneshot", "cubic"):
            problems.append(f"schedule must be 'oneshot' or 'cubic', got {self.schedule!r}")
        if self.penalty is not None and self.penalty < 0:
            problems.append(f"penalty must be >= 0, got {self.penalty}")
        if not self.layers:
            problems.append("no layers selected")
        if problems:
            raise ConfigError("invalid pruning config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


def layer_patterns(text: str | None) -> tuple[str, ...]:
    """The ``--layers`` flag: None or ``blocks`` -> :data:`DEFAULT_LAYERS`, ``all`` ->
    :data:`ALL_LAYERS`, else comma-separated fnmatch patterns."""
    if text is None or text.strip() in LAYER_SCOPES:
        return LAYER_SCOPES[(text or "blocks").strip()]
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    if not patterns:
        raise ConfigError(f"--layers {text!r}: give {' or '.join(LAYER_SCOPES)} or comma-separated layer name patterns")
    return patterns


def select_layers(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> dict[str, nn.Module]:
    """The ``nn.Linear`` / ``nn.Conv2d`` / ``LowRankLinear`` / ``LowRankConv2d`` modules whose names
    match ``patterns``, in model order. A pattern that matches nothing is an error naming it."""
    kinds = (nn.Linear, nn.Conv2d, *LOW_RANK)
    candidates = {n: m for n, m in model.named_modules() if isinstance(m, kinds) and not inside_low_rank(model, n)}
    chosen: dict[str, nn.Module] = {}
    unmatched = []
    for pat in patterns:
        hits = [n for n in candidates if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            unmatched.append(pat)
        for n in hits:
            chosen[n] = candidates[n]
    if unmatched:
        known = ", ".join(list(candidates)[:8])
        raise ConfigError(f"layer pattern(s) {unmatched} match no linear layer of the model (layers are named like: {known}, ...)")
    return {n: chosen[n] for n in candidates if n in chosen}


def dense_params(layers: dict[str, nn.Module]) -> int:
    """Entries of the layers' dense weights (``out x in`` for linears, ``out x in x kh x kw`` for convolutions)."""
    return sum(_dense_size(m) for m in layers.values())


def _dense_size(m: nn.Module) -> int:
    if isinstance(m, LOW_RANK):
        return m.dense_params
    if isinstance(m, nn.Conv2d):
        return m.weight.numel()
    return m.in_features * m.out_features


def cubic_sparsity(final: float, progress: float, ramp: float = 0.75) -> float:
    """Zhu & Gupta's gradual schedule: ``s = final * (1 - (1 - p/ramp)^3)``, full after ``ramp``."""
    p = min(max(progress / ramp, 0.0), 1.0)
    return final * (1.0 - (1.0 - p) ** 3)


class Pruner:
    """Base class: subclasses implement ``prepare``, ``regularizer``, ``step``, ``finalize``, ``report``."""

    def __init__(self, config: PruneConfig):
        self.config = config
        self.names: list[str] = []
        self.skipped: dict[str, str] = {}   # selected layers the method leaves dense, with the reason

    def prepare(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def step(self, model: nn.Module, progress: float = 1.0) -> None:
        raise NotImplementedError

    def finalize(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def report(self, model: nn.Module) -> dict:
        raise NotImplementedError

    def one_shot(self, model: nn.Module) -> nn.Module:
        """``prepare``, one ``step`` to the final target and ``finalize``, no training between: the
        pruned model (changed in place)."""
        self.prepare(model)
        self.step(model, 1.0)
        return self.finalize(model)

    def state_dict(self) -> dict:
        return {"config": self.config.to_dict(), "layers": list(self.names)}
