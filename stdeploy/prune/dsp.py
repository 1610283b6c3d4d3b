"""DSP: structured low-rank pruning. Each selected weight ``W`` (out x in) becomes ``U·V`` with
inner dimension k, initialised from a truncated SVD at full rank (exact). A group penalty, the sum
over inner dimensions of ``||(U[:, i], V[i, :])||``, drives whole dimensions toward zero during
training; the dimensions with the smallest group norms are then removed to reach a target rank or
a target parameter ratio (one global budget or per layer). A layer whose factors would hold at
least as many parameters as the dense matrix (``k·(in+out) >= in·out``) stays dense.

Convolutions (selected by the whole-model scope, ``--layers all``) are left dense and listed in the
report's ``skipped`` with :data:`CONV_SKIP_REASON`; the classifier ``head.fc`` (a linear) is factored.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..models.structure import LowRankLinear, set_submodule
from .base import Pruner, dense_params, select_layers

DEFAULT_GROUP = 1e-4  # coefficient of the sum of group norms
CONV_SKIP_REASON = (
    "DSP factors linear layers only: a low-rank convolution (a k x k conv to rank r, then a 1x1 conv r -> out) "
    "is a module no exporter or target lowers yet, and the first stem convolution cannot shrink (its "
    "in*k*k = 9, or 5 for the 1-D stem, is below any useful rank); prune convolutions with l1p"
)


def _cost(m: LowRankLinear | nn.Linear, rank: int | None = None) -> int:
    """Parameters the layer holds at ``rank`` (dense if factors would not be smaller)."""
    if isinstance(m, nn.Linear):
        return m.in_features * m.out_features
    k = m.rank if rank is None else rank
    return min(k * (m.in_features + m.out_features), m.in_features * m.out_features)


class DSPPruner(Pruner):
    def prepare(self, model: nn.Module) -> nn.Module:
        layers = select_layers(model, self.config.layers)
        self.skipped = {n: CONV_SKIP_REASON for n, m in layers.items() if isinstance(m, nn.Conv2d)}
        layers = {n: m for n, m in layers.items() if n not in self.skipped}
        if not layers:
            raise ConfigError(f"dsp: the selected layers {sorted(self.skipped)} are all convolutions: {CONV_SKIP_REASON}")
        self.names = list(layers)
        for n, m in layers.items():
            if isinstance(m, nn.Linear):
                set_submodule(model, n, LowRankLinear.from_dense(m))
        return model

    def _layers(self, model: nn.Module) -> dict[str, LowRankLinear]:
        return {n: model.get_submodule(n) for n in self.names}

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        coef = DEFAULT_GROUP if self.config.penalty is None else self.config.penalty
        return coef * sum(m.group_norms().sum() for m in self._layers(model).values() if isinstance(m, LowRankLinear))

    def target_ranks(self, model: nn.Module) -> dict[str, int]:
        """Rank of every layer after pruning, from ``rank`` or ``param_ratio`` and the scope."""
        layers = self._layers(model)
        cfg = self.config
        if cfg.rank is not None:
            return {n: min(cfg.rank, m.rank) for n, m in layers.items()}
        if cfg.scope == "layer":
            return {n: max(1, min(m.rank, math.floor(cfg.param_ratio * m.in_features * m.out_features / (m.in_features + m.out_features))))
                    for n, m in layers.items()}
        # Global budget: keep inner dimensions in descending order of group norm while they fit.
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
            extra = m.in_features + m.out_features
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
        """Layers whose factors are not smaller than the dense matrix go back to ``nn.Linear``."""
        for n, m in self._layers(model).items():
            if isinstance(m, LowRankLinear) and m.rank * (m.in_features + m.out_features) >= m.in_features * m.out_features:
                dense = nn.Linear(m.in_features, m.out_features, bias=m.u.bias is not None).to(m.u.weight.device)
                dense.weight.copy_(m.weight)
                if m.u.bias is not None:
                    dense.bias.copy_(m.u.bias)
                set_submodule(model, n, dense)
        return model

    def report(self, model: nn.Module) -> dict:
        layers = self._layers(model)
        per_layer = {}
        for n, m in layers.items():
            entry = {"shape": [m.out_features, m.in_features], "params": _cost(m)}
            entry["rank"] = m.rank if isinstance(m, LowRankLinear) else None
            entry["dense"] = isinstance(m, nn.Linear) or _cost(m) == m.in_features * m.out_features
            per_layer[n] = entry
        dense = dense_params(layers)
        remaining = sum(e["params"] for e in per_layer.values())
        return {"method": "dsp", "block_params_dense": dense, "block_params_remaining": remaining,
                "param_ratio": remaining / dense, "nonzeros": remaining, "layers": per_layer, "skipped": dict(self.skipped)}
