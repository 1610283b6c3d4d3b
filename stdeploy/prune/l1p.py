"""L1P: unstructured pruning. An L1 penalty pushes the selected weights toward zero during
training; magnitude masks then zero exactly the requested fraction (globally over all selected
layers, or per layer), one-shot or along a cubic schedule. Masks are parametrizations
(``w * mask``): training code is unchanged, pruned weights stay exactly zero and get zero gradient.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..models.structure import attach_mask
from .base import Pruner, cubic_sparsity, dense_params, select_layers

DEFAULT_L1 = 1e-5  # coefficient of sum |w| over the selected weights


def _weight(linear: nn.Linear) -> torch.Tensor:
    """The trainable (unmasked) weight."""
    if parametrize.is_parametrized(linear, "weight"):
        return linear.parametrizations.weight.original
    return linear.weight


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Boolean keep-masks zeroing exactly ``round(sparsity * n)`` smallest-magnitude entries, over
    all weights together (``global``) or in each weight (``layer``). Ties are broken by position."""
    masks = {}
    if scope == "layer":
        for name, w in weights.items():
            masks[name] = _keep_largest(w.detach().abs().flatten(), sparsity).view_as(w)
        return masks
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = _keep_largest(flat, sparsity)
    offset = 0
    for name, w in weights.items():
        masks[name] = keep[offset: offset + w.numel()].view_as(w)
        offset += w.numel()
    return masks


def _keep_largest(values: torch.Tensor, sparsity: float) -> torch.Tensor:
    n_zero = int(round(sparsity * values.numel()))
    keep = torch.ones_like(values, dtype=torch.bool)
    if n_zero > 0:
        order = torch.argsort(values, stable=True)
        keep[order[:n_zero]] = False
    return keep


class L1Pruner(Pruner):
    def prepare(self, model: nn.Module) -> nn.Module:
        layers = select_layers(model, self.config.layers)
        self.names = list(layers)
        for lin in layers.values():
            if not parametrize.is_parametrized(lin, "weight"):
                attach_mask(lin, torch.ones_like(lin.weight, dtype=torch.bool))
        return model

    def _layers(self, model: nn.Module) -> dict[str, nn.Linear]:
        return {n: model.get_submodule(n) for n in self.names}

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        coef = DEFAULT_L1 if self.config.penalty is None else self.config.penalty
        return coef * sum(lin.weight.abs().sum() for lin in self._layers(model).values())

    def target_sparsity(self, progress: float) -> float:
        if self.config.schedule == "cubic":
            return cubic_sparsity(self.config.sparsity, progress)
        return self.config.sparsity

    @torch.no_grad()
    def step(self, model: nn.Module, progress: float = 1.0) -> None:
        """Recompute the masks at the schedule's sparsity for ``progress`` in [0, 1]. Entries pruned
        earlier have zero effective weight, so they stay pruned (their magnitude counts as 0)."""
        layers = self._layers(model)
        effective = {n: lin.weight for n, lin in layers.items()}  # w * mask: pruned entries are 0
        masks = magnitude_masks(effective, self.target_sparsity(progress), self.config.scope)
        for n, lin in layers.items():
            attach_mask(lin, masks[n])
            _weight(lin).mul_(masks[n])  # keep the stored values of pruned weights at zero too
        emptied = [n for n, m in masks.items() if not bool(m.any())]
        if emptied and self.config.sparsity > 0:
            warnings.warn(f"l1p: the {self.config.scope} magnitude budget at sparsity {self.target_sparsity(progress):.3f} "
                          f"removes every weight of {', '.join(emptied)}: their outputs are constant (a cut through the "
                          "model when on its path). One global budget compares weights of different scales (convolutions "
                          "and the classifier with the block linears under --layers all); --scope layer prunes each "
                          "layer alike", stacklevel=3)

    def finalize(self, model: nn.Module) -> nn.Module:
        for lin in self._layers(model).values():
            if parametrize.is_parametrized(lin, "weight"):
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
        return model

    @torch.no_grad()
    def report(self, model: nn.Module) -> dict:
        layers = self._layers(model)
        per_layer = {}
        nonzeros = 0
        for n, lin in layers.items():
            nz = int((lin.weight != 0).sum())
            nonzeros += nz
            per_layer[n] = {"shape": list(lin.weight.shape), "nonzeros": nz, "sparsity": 1 - nz / lin.weight.numel()}
        dense = dense_params(layers)
        return {"method": "l1p", "block_params_dense": dense, "block_params_remaining": nonzeros, "nonzeros": nonzeros,
                "sparsity": 1 - nonzeros / dense, "layers": per_layer}
