"""Fold every BatchNorm into the layer before it: the inference form of a model that exporters
and targets see. ``LinearBN`` becomes a biased ``nn.Linear`` (or ``LowRankLinear`` with the scale in
``U``), ``ConvBN`` a :class:`FoldedConv` of a biased ``Conv2d`` (or of a ``LowRankConv2d`` with the
scale and shift in its 1x1 ``u``); zeros of pruned weights stay zeros.

Folding changes float rounding (``W' s + b'`` instead of ``BN(W s)``), so a folded model can flip a
spike whose membrane lies within about 1e-6 of its threshold; exports are validated against the
folded model, and :func:`stdeploy.export.validate` reports folded-vs-original separately.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import UnsupportedPrimitive
from .layers import ConvBN, LinearBN
from .structure import LowRankConv2d, LowRankLinear


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``BN(y) = scale * y + shift`` with running statistics, in float64 then cast back."""
    var = bn.running_var.double()
    scale = bn.weight.double() / torch.sqrt(var + bn.eps)
    shift = bn.bias.double() - bn.running_mean.double() * scale
    return scale, shift


class FoldedConv(nn.Module):
    """What a ``ConvBN`` becomes: a biased ``Conv2d`` of the same kernel and padding, or a
    ``LowRankConv2d`` whose ``u`` holds the bias (a DSP-factored convolution), T and B merged."""

    def __init__(self, conv: nn.Conv2d | LowRankConv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        y = self.conv(x.flatten(0, 1))
        return y.view(x.shape[0], x.shape[1], *y.shape[1:])


def _fold_linear(m: LinearBN) -> nn.Module:
    """A biased ``Linear`` or ``LowRankLinear`` (both act on the last dim of any shape)."""
    scale, shift = _bn_affine(m.bn)
    lin = m.linear
    if parametrize.is_parametrized(lin, "weight"):
        raise UnsupportedPrimitive("pruning masks are still attached; finalize pruning before folding/export")
    if isinstance(lin, LowRankLinear):
        new = LowRankLinear(lin.in_features, lin.out_features, lin.rank, bias=True)
        with torch.no_grad():
            new.v.weight.copy_(lin.v.weight)
            new.u.weight.copy_((lin.u.weight.double() * scale[:, None]).float())
            new.u.bias.copy_(shift.float())
        return new
    new = nn.Linear(lin.in_features, lin.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_((lin.weight.double() * scale[:, None]).float())
        new.bias.copy_(shift.float())
    return new


def _fold_conv(m: ConvBN) -> FoldedConv:
    scale, shift = _bn_affine(m.bn)
    c = m.conv
    if isinstance(c, LowRankConv2d):  # BN scales the output channels: u's rows, and u takes the shift
        v = c.v
        new = LowRankConv2d(c.in_channels, c.out_channels, c.kernel_size, c.rank, v.stride, v.padding, v.dilation, bias=True)
        with torch.no_grad():
            new.v.weight.copy_(v.weight)
            new.u.weight.copy_((c.u.weight.double() * scale[:, None, None, None]).float())
            new.u.bias.copy_(shift.float())
        return FoldedConv(new)
    new = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, bias=True)
    with torch.no_grad():
        new.weight.copy_((c.weight.double() * scale[:, None, None, None]).float())
        new.bias.copy_(shift.float())
    return FoldedConv(new)


FOLDERS = {LinearBN: _fold_linear, ConvBN: _fold_conv}


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A folded copy of ``model`` in eval mode (the caller's model is not changed)."""
    model = copy.deepcopy(model).eval()

    def walk(parent: nn.Module):
        for name, child in list(parent.named_children()):
            fold = FOLDERS.get(type(child))
            if fold is not None:
                setattr(parent, name, fold(child).to(next(child.parameters()).device))
            else:
                walk(child)

    walk(model)
    return model


def is_folded(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
