"""What a (pruned) model holds and computes: parameters and multiply-adds of its weight layers.

``weight_counts(model)`` runs one sample of one timestep's shape through the model with hooks on
every weight layer (``nn.Linear``, ``nn.Conv2d``, and ``LowRankLinear`` / ``LowRankConv2d`` each as
one unit) and returns, per layer and in total:

* ``params``: nonzero weight entries (a masked weight counts its kept entries, a low-rank layer
  ``rank * (in + out)``, a low-rank convolution ``rank * (in * kh * kw + out)``); ``params_dense``:
  entries of the dense weight (``out * in [* kh * kw]``).
* ``macs``: multiply-adds per sample per timestep, ``params * positions`` (positions: tokens for a
  per-token linear, output pixels / sequence positions for a convolution, 1 for the classifier),
  zero weights skipped; ``macs_dense`` likewise with the dense weight. A low-rank convolution's
  two factors run at the same output positions ``HO * WO`` (``u`` is 1x1): ``rank * in * kh * kw``
  multiply-adds per position for ``v`` plus ``out * rank`` for ``u``, its params times positions.

Biases, BatchNorm, neuron updates and the attention's activation products (Q·K, the token sums)
are not counted: the figures are what pruning can remove. They do not depend on the input, only on
shapes and on which weights are zero; the timestep count does not enter (per step).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import direct_encode
from ..models.structure import LOW_RANK, LowRankConv2d, inside_low_rank

__all__ = ["weight_counts"]


def _layer_counts(m: nn.Module) -> tuple[int, int]:
    """(params kept, params dense) of one weight layer."""
    if isinstance(m, LOW_RANK):
        kept = int((m.v.weight != 0).sum()) + int((m.u.weight != 0).sum())
        return kept, m.dense_params
    w = m.weight
    return int((w != 0).sum()), w.numel()


@torch.no_grad()
def weight_counts(model: nn.Module) -> dict:
    """Parameters and multiply-adds (per sample per timestep) of every weight layer, and totals."""
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d, *LOW_RANK)) and not inside_low_rank(model, n)}
    positions: dict[str, int] = {}
    hooks = []
    for name, m in layers.items():
        def hook(mod, inputs, output, name=name):
            if isinstance(mod, (nn.Conv2d, LowRankConv2d)):  # (N, C, HO, WO)
                positions[name] = int(output.shape[-2] * output.shape[-1])
            else:
                positions[name] = int(output.numel() // output.shape[-1] // steps_times_batch)
        hooks.append(m.register_forward_hook(hook))
    cfg = model.cfg
    steps_times_batch = cfg.timesteps  # one sample, T steps
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(direct_encode(torch.zeros(1, *cfg.input_shape, device=device), cfg.timesteps))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    per_layer = {}
    for name, m in layers.items():
        kept, dense = _layer_counts(m)
        pos = positions.get(name, 0)
        per_layer[name] = {"params": kept, "params_dense": dense, "positions": pos, "macs": kept * pos, "macs_dense": dense * pos}
    total = {k: sum(e[k] for e in per_layer.values()) for k in ("params", "params_dense", "macs", "macs_dense")}
    total["params_ratio"] = total["params"] / max(total["params_dense"], 1)
    total["macs_ratio"] = total["macs"] / max(total["macs_dense"], 1)
    total["macs_speedup_limit"] = total["macs_dense"] / max(total["macs"], 1)
    return {**total, "layers": per_layer}
