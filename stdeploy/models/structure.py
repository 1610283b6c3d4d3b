"""Structural changes that pruning makes to a model, described as plain data so a checkpoint can
rebuild them before loading weights:

* ``LowRankLinear``: a linear layer held as two factors, ``W = U @ V`` with inner dimension ``rank``.
* ``LowRankConv2d``: a convolution held as two factors, a ``k x k`` convolution ``in -> rank`` (the
  layer's kernel, stride, padding, dilation) then a 1x1 convolution ``rank -> out``: the weight
  reshaped to ``(out, in * kh * kw)`` is ``U @ V``.
* ``WeightMask``: a parametrization that multiplies a weight by a fixed 0/1 mask (weights stay
  trainable, pruned entries stay exactly zero and get zero gradient), on a linear or a convolution.

``structure_of(model)`` lists them by fully qualified name; ``apply_structure(model, s)`` recreates
them on a freshly built model from shapes alone (placeholder values, no SVD, that ``load_state_dict``
then overwrites).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError


def svd_factors(mat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_k sqrt(S_k), sqrt(S_k) V_k^T)`` of a 2-D ``mat`` by a truncated SVD in float64, in
    ``mat``'s dtype: factors whose product is ``mat`` at full rank (up to that dtype's rounding)."""
    u, s, vh = torch.linalg.svd(mat.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(mat.dtype), (root[:, None] * vh[:rank]).to(mat.dtype)


class LowRank(nn.Module):
    """What the factored layers share: ``v`` maps the input to ``rank`` channels, ``u`` maps them
    to the output (with the bias); ``fan_in`` inputs and ``fan_out`` outputs per output value of the
    dense weight (its matrix is ``fan_out x fan_in``). A subclass builds ``u``, ``v`` and sets
    ``rank``, and makes an empty copy of itself at another rank (:meth:`with_rank`)."""

    u: nn.Module
    v: nn.Module
    rank: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    def with_rank(self, rank: int) -> "LowRank":
        raise NotImplementedError

    def keep(self, dims: torch.Tensor) -> "LowRank":
        """A new layer with only the inner dimensions ``dims`` (indices)."""
        new = self.with_rank(int(dims.numel()))
        with torch.no_grad():
            new.u.weight.copy_(self.u.weight[:, dims])
            new.v.weight.copy_(self.v.weight[dims])
            if self.u.bias is not None:
                new.u.bias.copy_(self.u.bias)
        return new.to(self.u.weight.device)

    @property
    def params(self) -> int:
        return self.rank * self.rank_params

    @property
    def rank_params(self) -> int:
        """Parameters one inner dimension holds: a row of ``V`` and a column of ``U``."""
        return self.fan_in + self.fan_out

    @property
    def dense_params(self) -> int:
        """Entries of the dense weight, ``fan_out * fan_in``."""
        return self.fan_in * self.fan_out


class LowRankLinear(LowRank):
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
        u, v = svd_factors(w, rank)
        with torch.no_grad():
            new.u.weight.copy_(u)
            new.v.weight.copy_(v)
            if linear.bias is not None:
                new.u.bias.copy_(linear.bias.detach())
        return new.to(w.device)

    @property
    def weight(self) -> torch.Tensor:
        """The dense product ``U @ V`` (for inspection and dense fallbacks)."""
        return self.u.weight @ self.v.weight

    def group_norms(self) -> torch.Tensor:
        """Norm of each inner dimension: column ``i`` of U with row ``i`` of V, shape ``(rank,)``."""
        return torch.sqrt(self.u.weight.pow(2).sum(0) + self.v.weight.pow(2).sum(1))

    @property
    def fan_in(self) -> int:
        return self.in_features

    @property
    def fan_out(self) -> int:
        return self.out_features

    def with_rank(self, rank: int) -> "LowRankLinear":
        return LowRankLinear(self.in_features, self.out_features, rank, bias=self.u.bias is not None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankConv2d(LowRank):
    """``y = u(v(x))`` on ``(N, C, H, W)``: ``v`` a ``Conv2d`` ``in -> rank`` with the dense layer's
    kernel, stride, padding and dilation (no bias), ``u`` a 1x1 ``Conv2d`` ``rank -> out`` (the
    bias). The weight as a matrix ``(out, in * kh * kw)`` is ``U @ V`` with ``U = u.weight[:, :, 0, 0]``
    and ``V = v.weight.flatten(1)``; ``rank * (in * kh * kw + out)`` parameters, as many multiply-adds
    per output position. Grouped convolutions are not factored."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0, dilation=1,
                 bias: bool = False, name: str = ""):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(int(k) for k in kernel_size)
        fan_in = in_channels * kh * kw
        if not 1 <= rank <= min(fan_in, out_channels):
            raise ConfigError(f"{name + ': ' if name else ''}rank must be in [1, {min(fan_in, out_channels)}] for a "
                              f"{out_channels}x{in_channels}x{kh}x{kw} convolution, got {rank}")
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.v = nn.Conv2d(in_channels, rank, (kh, kw), stride, padding, dilation, bias=False)
        self.u = nn.Conv2d(rank, out_channels, 1, bias=bias)

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.v.kernel_size)

    @property
    def fan_in(self) -> int:
        """Inputs of one output value, ``in * kh * kw`` (the width of ``V``)."""
        kh, kw = self.kernel_size
        return self.in_channels * kh * kw

    @classmethod
    def shaped_like(cls, conv: nn.Conv2d, rank: int, name: str = "") -> "LowRankConv2d":
        """A factored layer of ``rank`` with ``conv``'s hyper-parameters (channels, kernel, stride,
        padding, dilation, bias) built from those alone: no SVD, the factors hold ``Conv2d``'s
        initial values (placeholders for ``load_state_dict``, as a checkpoint load needs), on
        ``conv``'s device. ``name`` names the layer in the :class:`ConfigError` for a grouped or
        non-zero-padded convolution or a rank outside ``[1, min(in * kh * kw, out)]``."""
        label = name or "convolution"
        if conv.groups != 1:
            raise ConfigError(f"{label}: a grouped convolution (groups={conv.groups}) is not factored into low-rank convolutions")
        if conv.padding_mode != "zeros":
            raise ConfigError(f"{label}: padding_mode {conv.padding_mode!r} is not factored (zero padding only)")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, conv.stride, conv.padding, conv.dilation,
                  bias=conv.bias is not None, name=name)
        return new.to(conv.weight.device)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: int | None = None, name: str = "") -> "LowRankConv2d":
        """Factor ``conv.weight`` reshaped to ``(out, in * kh * kw)`` by truncated SVD, ``U_k sqrt(S_k)``
        and ``sqrt(S_k) V_k^T`` (exact at full rank); the bias goes to ``u``. The layer is
        :meth:`shaped_like` ``conv`` (its checks, ``name`` in their errors) with the factors filled in."""
        w = conv.weight.detach()
        out_c = w.shape[0]
        mat = w.reshape(out_c, -1)
        rank = min(mat.shape) if rank is None else rank
        new = cls.shaped_like(conv, rank, name)
        u, v = svd_factors(mat, rank)
        with torch.no_grad():
            new.u.weight.copy_(u[:, :, None, None])
            new.v.weight.copy_(v.view_as(new.v.weight))
            if conv.bias is not None:
                new.u.bias.copy_(conv.bias.detach())
        return new.to(w.device)

    def product(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``(out, in, kh, kw)``, ``U @ V`` computed in ``dtype`` (default the factors')."""
        dtype = dtype or self.u.weight.dtype
        mat = self.u.weight.to(dtype).flatten(1) @ self.v.weight.to(dtype).flatten(1)
        return mat.view(self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def weight(self) -> torch.Tensor:
        """The dense product (for inspection and dense fallbacks), shaped like ``Conv2d.weight``."""
        return self.product()

    def group_norms(self) -> torch.Tensor:
        """Norm of each inner dimension: output channel ``i`` of ``v`` with input channel ``i`` of
        ``u``, shape ``(rank,)``."""
        return torch.sqrt(self.u.weight.pow(2).sum((0, 2, 3)) + self.v.weight.pow(2).sum((1, 2, 3)))

    @property
    def fan_out(self) -> int:
        return self.out_channels

    def with_rank(self, rank: int) -> "LowRankConv2d":
        v = self.v
        return LowRankConv2d(self.in_channels, self.out_channels, self.kernel_size, rank, v.stride, v.padding, v.dilation,
                             bias=self.u.bias is not None)

    def extra_repr(self) -> str:
        v = self.v
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, stride={tuple(v.stride)}, "
                f"padding={v.padding if isinstance(v.padding, str) else tuple(v.padding)}")


LOW_RANK = (LowRankLinear, LowRankConv2d)  # the factored layers: each one unit of weights


def inside_low_rank(model: nn.Module, name: str) -> bool:
    """True where the module ``name`` is a factor (``u`` or ``v``) of a factored layer."""
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), LOW_RANK)


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
        if isinstance(m, LOW_RANK):
            out[name] = {"type": "lowrank", "rank": m.rank}
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and parametrize.is_parametrized(m, "weight"):
            out[name] = {"type": "mask"}
    return out


def apply_structure(model: nn.Module, structure: dict[str, dict]) -> nn.Module:
    """Recreate the modules named in ``structure`` on ``model`` (in place): ``lowrank`` on an
    ``nn.Linear`` gives a ``LowRankLinear``, on an ``nn.Conv2d`` a ``LowRankConv2d``, both built
    from the dense layer's shapes alone (no SVD of its placeholder weight); ``load_state_dict``
    then fills them."""
    for fqn, spec in structure.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        m = get_submodule(model, fqn)
        if kind == "lowrank":
            if isinstance(m, nn.Conv2d):
                set_submodule(model, fqn, LowRankConv2d.shaped_like(m, int(spec["rank"]), name=fqn))
            elif isinstance(m, nn.Linear):
                set_submodule(model, fqn, LowRankLinear(m.in_features, m.out_features, int(spec["rank"]), bias=m.bias is not None))
            else:
                raise ConfigError(f"{fqn}: low-rank structure needs an nn.Linear or nn.Conv2d, found {type(m).__name__}")
        elif kind == "mask":
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                raise ConfigError(f"{fqn}: mask structure needs an nn.Linear or nn.Conv2d, found {type(m).__name__}")
            attach_mask(m, torch.ones_like(m.weight, dtype=torch.bool))
        else:
            raise ConfigError(f"{fqn}: unknown structure {spec!r} (known: lowrank, mask)")
    return model
