"""The spiking transformer: patch embedding, blocks, head. One class for both families; the
attention kind is the only difference (``cfg.family``)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ShapeError
from .config import ModelConfig
from .layers import STEMS, Block, Head


class SpikingTransformer(nn.Module):
    """``(T, B, C, H, W)`` analog or spike input -> ``(B, num_classes)`` logits (mean over T)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = STEMS[cfg.stem](cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head = Head(cfg)

    def check_input(self, x: torch.Tensor) -> None:
        c = self.cfg
        want = (c.timesteps, *c.input_shape)
        if x.dim() != 5 or (x.shape[0], *x.shape[2:]) != want:
            _, h, w = c.input_shape
            raise ShapeError(
                f"{c.name or c.family}: expected input (T={c.timesteps}, B, C={c.in_channels}, H={h}, W={w}), got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.embed(x)  # (T, B, N, D)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def direct_encode(images: torch.Tensor, timesteps: int) -> torch.Tensor:
    """Direct (analog) encoding: the same image at every step, ``(B, C, H, W) -> (T, B, C, H, W)``.
    Inputs that already have a time dimension (DVS frames, ``(B, T, C, H, W)``) are moved to time-first."""
    if images.dim() == 4:
        return images.unsqueeze(0).expand(timesteps, *images.shape).contiguous()
    if images.dim() == 5:
        if images.shape[1] != timesteps:
            raise ShapeError(f"event frames have {images.shape[1]} time bins, the model expects T={timesteps}")
        return images.transpose(0, 1).contiguous()
    raise ShapeError(f"expected images (B, C, H, W) or frames (B, T, C, H, W), got {tuple(images.shape)}")
