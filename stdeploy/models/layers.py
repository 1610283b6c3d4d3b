"""Building blocks shared by both families. Every tensor is multi-step: time leads.

Shapes: images ``(T, B, C, H, W)``, tokens ``(T, B, N, D)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..neurons import LIF, SLIF
from .config import ModelConfig


def make_neuron(cfg: ModelConfig, features: int, channel_dim: int = -1, threshold: float | None = None) -> LIF:
    """A LIF (or sLIF when ``cfg.neuron == "slif"``) of ``features`` channels."""
    cls = SLIF if cfg.neuron == "slif" else LIF
    return cls(features, tau=cfg.tau, threshold=cfg.threshold if threshold is None else threshold, channel_dim=channel_dim)


class LinearBN(nn.Module):
    """``Linear`` (no bias) then ``BatchNorm1d`` over features; statistics shared over T, B and N."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)
        self.bn = nn.BatchNorm1d(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, B, N, Din) -> (T, B, N, Dout)
        y = self.linear(x)
        return self.bn(y.flatten(0, -2)).view(y.shape)


class ConvBN(nn.Module):
    """k x k ``Conv2d`` (no bias, same padding) then ``BatchNorm2d``, with T and B merged. With
    ``one_d`` the kernel is ``(1, k)`` with padding ``(0, k // 2)``: a 1-D convolution along the
    width of one-row images (sequences)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, one_d: bool = False):
        super().__init__()
        size, pad = ((1, kernel), (0, kernel // 2)) if one_d else (kernel, kernel // 2)
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=size, padding=pad, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, B, Cin, H, W) -> (T, B, Cout, H, W)
        y = self.bn(self.conv(x.flatten(0, 1)))
        return y.view(x.shape[0], x.shape[1], *y.shape[1:])


class MaxPool(nn.Module):
    """2x2 max-pool of spikes (a logical OR over each window), T and B merged; ``kernel=(1, 2)``
    pools one-row images (sequences) along their length. The stride is the kernel."""

    def __init__(self, kernel: tuple[int, int] = (2, 2)):
        super().__init__()
        self.kernel = tuple(int(k) for k in kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.max_pool2d(x.flatten(0, 1), self.kernel)
        return y.view(x.shape[0], x.shape[1], *y.shape[1:])


class EmbedStage(nn.Module):
    def __init__(self, cfg: ModelConfig, c_in: int, c_out: int, pool: bool, kernel: int = 3):
        super().__init__()
        one_d = cfg.input_dims == 1
        self.conv = ConvBN(c_in, c_out, kernel, one_d)
        self.lif = make_neuron(cfg, c_out, channel_dim=1)
        self.pool = MaxPool((1, 2) if one_d else (2, 2)) if pool else nn.Identity()

    def forward(self, x):
        return self.pool(self.lif(self.conv(x)))


class PatchEmbed(nn.Module):
    """Spikformer's spiking patch splitting: conv-BN-LIF stages (max-pool on the last ``embed_pools``),
    then a conv-BN relative position embedding added to the spikes. Direct encoding: the first
    convolution sees the analog input. Output: real-valued tokens ``(T, B, N, D)``. For sequences
    (``cfg.input_dims == 1``) every convolution and pool is 1-D along the length and the tokens are
    positions; the first convolution's kernel is ``cfg.embed_kernel``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        s = cfg.embed_stages
        widths = list(cfg.stage_widths)
        ins = [cfg.in_channels] + widths[:-1]
        self.stages = nn.ModuleList(EmbedStage(cfg, ci, co, pool=i >= s - cfg.embed_pools, kernel=cfg.embed_kernel if i == 0 else 3)
                                    for i, (ci, co) in enumerate(zip(ins, widths)))
        self.rpe = ConvBN(cfg.embed_dim, cfg.embed_dim, 3, cfg.input_dims == 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, B, C, H, W) -> (T, B, N, D)
        for stage in self.stages:
            x = stage(x)
        x = x + self.rpe(x)  # (T, B, D, h, w)
        return x.flatten(3).transpose(2, 3)


class DenseEmbed(nn.Module):
    """The MLP stem (``cfg.stem == "dense"``): the frame flattened in ``(C, H, W)`` order into one
    token (``C * 1 * L`` values for a sequence), then ``embed_stages`` linear-BN layers with a LIF
    between them (widths as the conv stages': ``cfg.stage_widths``, by default ``D/2^(s-1), ..., D``).
    Output: real-valued tokens ``(T, B, 1, D)``; with ``depth = 0`` the head's LIF and classifier
    complete a plain spiking MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        widths = list(cfg.stage_widths)
        c, h, w = cfg.input_shape
        ins = [c * h * w] + widths[:-1]
        self.fcs = nn.ModuleList(LinearBN(i, o) for i, o in zip(ins, widths))
        self.lifs = nn.ModuleList(make_neuron(cfg, w) for w in widths[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, B, C, H, W) -> (T, B, 1, D)
        x = x.flatten(2).unsqueeze(2)
        for i, fc in enumerate(self.fcs):
            x = fc(x)
            if i < len(self.lifs):
                x = self.lifs[i](x)
        return x


STEMS = {"conv": PatchEmbed, "dense": DenseEmbed}


class SpikformerAttention(nn.Module):
    """Spiking self-attention: ``LIF(Q·Kᵀ·V · scale)`` per head, no softmax, then a projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.embed_dim
        self.heads = cfg.heads
        self.scale = cfg.attn_scale
        self.lif = make_neuron(cfg, d)
        self.q, self.k, self.v = LinearBN(d, d), LinearBN(d, d), LinearBN(d, d)
        self.q_lif, self.k_lif, self.v_lif = make_neuron(cfg, d), make_neuron(cfg, d), make_neuron(cfg, d)
        self.attn_lif = make_neuron(cfg, d, threshold=cfg.attn_threshold)
        self.proj = LinearBN(d, d)

    def _split(self, x):  # (T, B, N, D) -> (T, B, h, N, D/h)
        t, b, n, d = x.shape
        return x.view(t, b, n, self.heads, d // self.heads).transpose(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, B, N, D) real -> (T, B, N, D) real
        s = self.lif(x)
        q = self._split(self.q_lif(self.q(s)))
        k = self._split(self.k_lif(self.k(s)))
        v = self._split(self.v_lif(self.v(s)))
        y = (q @ k.transpose(-2, -1)) @ v * self.scale  # (T, B, h, N, D/h): integer counts times scale
        y = y.transpose(2, 3).flatten(3)  # (T, B, N, D)
        return self.proj(self.attn_lif(y))


class SpikeDrivenAttention(nn.Module):
    """Spike-driven self-attention: ``mask = LIF(sum_tokens(Q ⊙ K))``, output ``V ⊙ mask``, then a
    projection. Only AND, sums and a LIF: no multiplication of real values."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.embed_dim
        self.lif = make_neuron(cfg, d)
        self.q, self.k, self.v = LinearBN(d, d), LinearBN(d, d), LinearBN(d, d)
        self.q_lif, self.k_lif, self.v_lif = make_neuron(cfg, d), make_neuron(cfg, d), make_neuron(cfg, d)
        self.attn_lif = make_neuron(cfg, d, threshold=cfg.attn_threshold)
        self.proj = LinearBN(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, B, N, D) real -> (T, B, N, D) real
        s = self.lif(x)
        q = self.q_lif(self.q(s))
        k = self.k_lif(self.k(s))
        v = self.v_lif(self.v(s))
        mask = self.attn_lif((q * k).sum(dim=2, keepdim=True))  # (T, B, 1, D) spikes
        return self.proj(v * mask)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h = cfg.embed_dim, cfg.mlp_hidden
        self.lif1 = make_neuron(cfg, d)
        self.fc1 = LinearBN(d, h)
        self.lif2 = make_neuron(cfg, h)
        self.fc2 = LinearBN(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, B, N, D) real -> real
        return self.fc2(self.lif2(self.fc1(self.lif1(x))))


ATTENTION = {"spikformer": SpikformerAttention, "sdt": SpikeDrivenAttention}


class Block(nn.Module):
    """Pre-spike residual block: the stream stays real-valued, every linear sees spikes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = ATTENTION[cfg.family](cfg)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Head(nn.Module):
    """LIF, mean over tokens, linear classifier, mean over time: ``(T, B, N, D) -> (B, classes)``.

    ``token_scale``: None (the mean, ``1/N``), or the factor on the sum over tokens that replaces
    it: the exact mode sets a power of two for a token count that is not one (``1/N`` is not
    exact in float32; :func:`stdeploy.models.quantize.to_exact` moves ``2^k/N`` into ``fc``).
    Exporters take the factor from :meth:`token_factor`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.lif = make_neuron(cfg, cfg.embed_dim)
        self.fc = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.token_scale: float | None = None

    def token_factor(self, n: int) -> float:
        """The weight of each of ``n`` tokens in the reduction the classifier reads."""
        return 1.0 / n if self.token_scale is None else self.token_scale

    def reduce_tokens(self, s, dim: int):
        return s.mean(dim=dim) if self.token_scale is None else s.sum(dim=dim) * self.token_scale

    def forward(self, x):
        return self.fc(self.reduce_tokens(self.lif(x), 2)).mean(dim=0)
