"""Structural changes that pruning makes to a model, described as plain data so a checkpoint can
rebuild them before loading weights:

* ``LowRankLinear``: a linear layer held as two factors, ``W = U @ V`` with inner dimension ``rank``.
* ``WeightMask``: a parametrization that multiplies a weight by a fixed 0/1 mask (weights stay
  trainable, pruned entries stay exactly zero and get zero gradient), on a linear or a convolution.

``structure_of(model)`` lists them by fully qualified name; ``apply_structure(model, s)`` recreates
them on a freshly built model (with placeholder values that ``load_state_dict`` then overwrites).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError


class LowRankLinear(nn.Module):
    """``y = U (V x) + b``: ``v`` maps ``in -> rank``, ``u`` maps ``rank -> out``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ConfigError(f"rank must be in [1, {min(in_features, out_features)}] for a {out_features}x{in_features} weight, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False)
        self.u = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int | None = None) -> "LowRankLinear":
        """Factor ``linear.weight`` by truncated SVD, ``U_k sqrt(S_k)`` and ``sqrt(S_k) V_k^T``
        (exact at full rank)."""
        w = linear.weight.detach()
        out_f, in_f = w.shape
        rank = min(out_f, in_f) if rank is None else rank
        new = cls(in_f, out_f, rank, bias=linear.bias is not None)
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        root = s[:rank].sqrt()
        with torch.no_grad():
            new.u.weight.copy_((u[:, :rank] * root).to(w.dtype))
            new.v.weight.copy_((root[:, None] * vh[:rank]).to(w.dtype))
            if linear.bias is not None:
                new.u.bias.copy_(linear.bias.detach())
        return new.to(w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense product ``U @ V`` (for inspection and dense fallbacks)."""
        return self.u.weight @ self.v.weight

    def group_norms(self) -> torch.Tensor:
        """Norm of each inner dimension: column ``i`` of U with row ``i`` of V, shape ``(rank,)``."""
        return torch.sqrt(self.u.weight.pow(2).sum(0) + self.v.weight.pow(2).sum(1))

    def keep(self, dims: torch.Tensor) -> "LowRankLinear":
        """A new layer with only the inner dimensions ``dims`` (indices)."""
        new = LowRankLinear(self.in_features, self.out_features, int(dims.numel()), bias=self.u.bias is not None)
        with torch.no_grad():
            new.u.weight.copy_(self.u.weight[:, dims])
            new.v.weight.copy_(self.v.weight[dims])
            if self.u.bias is not None:
                new.u.bias.copy_(self.u.bias)
        return new.to(self.u.weight.device)

    @property
    def params(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask`` with a fixed 0/1 ``mask`` buffer."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def get_submodule(model: nn.Module, fqn: str) -> nn.Module:
    try:
        return model.get_submodule(fqn)
    except AttributeError as err:
        raise ConfigError(f"no module named {fqn!r} in the model") from err


def set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = get_submodule(model, parent_name) if parent_name else model
    setattr(parent, child, module)


def attach_mask(linear: nn.Module, mask: torch.Tensor) -> None:
    """Attach (or replace) the weight mask of ``linear``."""
    if parametrize.is_parametrized(linear, "weight"):
        linear.parametrizations.weight[0].mask.copy_(mask.to(torch.bool))
    else:
        parametrize.register_parametrization(linear, "weight", WeightMask(mask))


def structure_of(model: nn.Module) -> dict[str, dict]:
    """Every low-rank layer and masked weight, by module name."""
    out: dict[str, dict] = {}
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            out[name] = {"type": "lowrank", "rank": m.rank}
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and parametrize.is_parametrized(m, "weight"):
            out[name] = {"type": "mask"}
    return out


def apply_structure(model: nn.Module, structure: dict[str, dict]) -> nn.Module:
    """Recreate the modules named in ``structure`` on ``model`` (in place)."""
    for fqn, spec in structure.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        m = get_submodule(model, fqn)
        if kind == "lowrank":
            if not isinstance(m, nn.Linear):
                raise ConfigError(f"{fqn}: low-rank structure needs an nn.Linear, found {type(m).__name__}")
            set_submodule(model, fqn, LowRankLinear(m.in_features, m.out_features, int(spec["rank"]), bias=m.bias is not None))
        elif kind == "mask":
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                raise ConfigError(f"{fqn}: mask structure needs an nn.Linear or nn.Conv2d, found {type(m).__name__}")
            attach_mask(m, torch.ones_like(m.weight, dtype=torch.bool))
        else:
            raise ConfigError(f"{fqn}: unknown structure {spec!r} (known: lowrank, mask)")
    return model
