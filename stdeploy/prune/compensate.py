"""Compensation after pruning: recalibrate BatchNorm statistics (no weight update), then fine-tune
with the neurons turned into sLIF (learnable per-neuron threshold and leak, identical spikes at
conversion) or kept as LIF for comparison."""

from __future__ import annotations

import torch
from torch import nn

from ..data import make_loader
from ..models import direct_encode
from ..neurons import to_slif

COMPENSATIONS = ("slif", "lif", "none")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, dataset, batch_size: int = 128, max_batches: int | None = None) -> nn.Module:
    """Recompute every BatchNorm's running statistics on ``dataset`` (a cumulative average over
    the batches, no gradient, weights untouched). Pruning shifts the statistics the old running
    averages describe; recalibrating alone can recover much of the drop, so it
    runs before any fine-tuning and both accuracies are reported (compensation is not credited
    with what recalibration recovers)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    model.train()
    device = next(model.parameters()).device
    for i, (x, _) in enumerate(make_loader(dataset, batch_size, shuffle=False)):
        if max_batches is not None and i >= max_batches:
            break
        model(direct_encode(x.to(device), model.cfg.timesteps))
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    model.train(was_training)
    return model


def convert_neurons(model: nn.Module, compensation: str, learn_threshold: bool = True, learn_leak: bool = True) -> nn.Module:
    """``slif``: every LIF becomes an sLIF with the same values (and the config says so)."""
    if compensation == "slif":
        to_slif(model, learn_threshold=learn_threshold, learn_leak=learn_leak)
        model.cfg = model.cfg.replace(neuron="slif")
    return model
