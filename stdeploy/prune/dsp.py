"""DSP: structured low-rank pruning. Each selected weight becomes two factors with inner dimension k,
initialised from a truncated SVD at full rank (exact):

* a linear ``W`` (out x in) becomes ``U·V`` (:class:`~stdeploy.models.structure.LowRankLinear`),
  ``k·(in+out)`` parameters;
* a convolution (out x in x kh x kw, selected by the whole-model scope ``--layers all``: the
  embedding stages and the position embedding) becomes a ``kh x kw`` convolution ``in -> k`` (the
  layer's stride, padding, dilation) then a 1x1 convolution ``k -> out`` with the bias
  (:class:`~stdeploy.models.structure.LowRankConv2d`): the weight reshaped to ``(out, in·kh·kw)``
  is ``U·V``, ``k·(in·kh·kw + out)`` parameters and as many multiply-adds per output position.

A group penalty, the sum over inner dimensions of ``||(U[:, i], V[i, :])||`` over every factored
layer (linears and convolutions alike), drives whole dimensions toward zero during training; the
dimensions with the smallest group norms are then removed to reach a target rank or a target
parameter ratio (one global budget over all selected layers, linears and convolutions together, or
the same ratio per layer). A layer costs ``min(k·(fan_in + out), fan_in·out)`` parameters in the
budget: **a layer whose factors would hold at least as many parameters as the dense weight stays
dense** (:func:`dense_reason`), and is listed in the report's ``skipped`` with that reason (also a
layer that no rank shrinks, e.g. ``fan_in = out = 1``, from ``prepare`` on). The rule decides for
the first stem convolution too: ``fan_in = in·kh·kw`` = 9 (5 for the 1-D stem) allows at most 9 (5)
inner dimensions, and its factors are smaller than its weight only below rank 8 of 9 on ``sdt-tiny``
(32 channels: 7·41 = 287 < 288) and rank 5 of 5 on ``sdt-1d-tiny`` (64 channels: 4·69 = 276 < 320).
Where the budget keeps more of its dimensions (its group norms are large on a fresh model), it
stays dense; where the budget cuts it that far, it is factored like any other layer. Grouped
convolutions are not factored (:data:`GROUPED_REASON`). The classifier ``head.fc`` (a linear) is
factored like the others.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..models.quantize import merge_low_rank
from ..models.structure import LOW_RANK, LowRankConv2d, LowRankLinear, set_submodule
from .base import Pruner, dense_params, select_layers

DEFAULT_GROUP = 1e-4  # coefficient of the sum of group norms
GROUPED_REASON = "a grouped convolution is not factored into low-rank convolutions (groups != 1); prune it with l1p"


def dense_reason(m: LowRankLinear | LowRankConv2d, rank: int | None = None) -> str:
    """Why ``m`` at ``rank`` (default its own) stays dense: its factors would not be smaller."""
    k = m.rank if rank is None else rank
    return (f"kept dense: its factors at rank {k} would hold {k} x ({m.fan_in} + {m.fan_out}) = {k * m.rank_params} parameters, "
            f"at least the dense weight's {m.dense_params}")


def _factor(m: nn.Module, name: str) -> nn.Module:
    """The full-rank (exact) factors of a dense layer; a factored one as it is."""
    if isinstance(m, nn.Linear):
        return LowRankLinear.from_dense(m)
    if isinstance(m, nn.Conv2d):
        return LowRankConv2d.from_dense(m, name=name)
    return m


def _cost(m: nn.Module, rank: int | None = None) -> int:
    """Parameters the layer holds at ``rank`` (dense if factors would not be smaller)."""
    if not isinstance(m, LOW_RANK):
        return m.weight.numel()
    k = m.rank if rank is None else rank
    return min(k * m.rank_params, m.dense_params)


class DSPPruner(Pruner):
    def prepare(self, model: nn.Module) -> nn.Module:
        layers = select_layers(model, self.config.layers)
        self.skipped = {}
        for n, m in layers.items():
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                self.skipped[n] = GROUPED_REASON
                continue
            factored = _factor(m, n)
            if factored.rank_params >= factored.dense_params:  # not smaller even at rank 1
                self.skipped[n] = dense_reason(factored, 1)
            elif factored is not m:
                set_submodule(model, n, factored)
        self.names = [n for n in layers if n not in self.skipped]
        if not self.names:
            raise ConfigError(f"dsp: no selected layer can be factored: {'; '.join(f'{n}: {r}' for n, r in self.skipped.items())}")
        return model

    def _layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {n: model.get_submodule(n) for n in self.names}

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        coef = DEFAULT_GROUP if self.config.penalty is None else self.config.penalty
        return coef * sum(m.group_norms().sum() for m in self._layers(model).values() if isinstance(m, LOW_RANK))

    def target_ranks(self, model: nn.Module) -> dict[str, int]:
        """Rank of every layer after pruning, from ``rank`` or ``param_ratio`` and the scope."""
        layers = self._layers(model)
        cfg = self.config
        if cfg.rank is not None:
            return {n: min(cfg.rank, m.rank) for n, m in layers.items()}
        if cfg.scope == "layer":
            return {n: max(1, min(m.rank, math.floor(cfg.param_ratio * m.dense_params / m.rank_params))) for n, m in layers.items()}
        # Global budget: keep inner dimensions in descending order of group norm while they fit. A
        # dimension costs what it adds to the layer's parameters, nothing once the layer is dense.
        budget = cfg.param_ratio * dense_params(layers)
        candidates = sorted(((float(g), n) for n, m in layers.items() for g in m.group_norms().detach()), reverse=True)
        ranks = {n: 1 for n in layers}  # every layer keeps at least one dimension
        used = sum(_cost(m, 1) for m in layers.values())
        skipped_first = {n: False for n in layers}
        for _, n in candidates:
            if not skipped_first[n]:  # the layer's largest dimension is the one already counted
                skipped_first[n] = True
                continue
            m = layers[n]
            extra = _cost(m, ranks[n] + 1) - _cost(m, ranks[n])
            if ranks[n] < m.rank and used + extra <= budget:
                ranks[n] += 1
                used += extra
        return ranks

    @torch.no_grad()
    def step(self, model: nn.Module, progress: float = 1.0) -> None:
        """Remove the inner dimensions with the smallest group norms down to the target ranks."""
        for n, k in self.target_ranks(model).items():
            m = model.get_submodule(n)
            if k < m.rank:
                keep = torch.argsort(m.group_norms(), descending=True)[:k].sort().values
                set_submodule(model, n, m.keep(keep))

    @torch.no_grad()
    def finalize(self, model: nn.Module) -> nn.Module:
        """Layers whose factors are not smaller than the dense weight go back to ``nn.Linear`` /
        ``nn.Conv2d`` (the product of the factors), listed in ``skipped`` with :func:`dense_reason`."""
        for n, m in self._layers(model).items():
            if isinstance(m, LOW_RANK) and m.params >= m.dense_params:
                self.skipped[n] = dense_reason(m)
                set_submodule(model, n, merge_low_rank(m, torch.float32))   # the product as the factors compute it
        return model

    def report(self, model: nn.Module) -> dict:
        layers = self._layers(model)
        per_layer = {}
        for n, m in layers.items():
            low_rank = isinstance(m, LOW_RANK)
            entry = {"shape": list(m.weight.shape), "params": _cost(m)}
            entry["rank"] = m.rank if low_rank else None
            entry["dense"] = not low_rank or _cost(m) == m.dense_params
            per_layer[n] = entry
        dense = dense_params(layers)
        remaining = sum(e["params"] for e in per_layer.values())
        return {"method": "dsp", "block_params_dense": dense, "block_params_remaining": remaining,
                "param_ratio": remaining / dense, "nonzeros": remaining, "layers": per_layer, "skipped": dict(self.skipped)}
