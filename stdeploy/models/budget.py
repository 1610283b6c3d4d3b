"""How much memory a model will take, from its config alone, before anything is built.

A config with ``embed_dim = 10**9`` once drove a machine to the OOM killer, and ``timesteps = 10**9``
asked for terabytes; :func:`check_budget` refuses such a request up front, naming the field that
dominates and the estimate. The estimate counts, in float32 bytes:

- parameters ``P`` (convolutions, linears, BatchNorm, neuron parameters; closed form below), and
  for training 4 copies of them (weights, gradients, AdamW's two moments);
- activations: every layer output of one sample and timestep (``per_sample_step``), times ``T``
  and the batch, times 3 for training (the layer outputs, the membranes the surrogate gradient
  keeps, the gradients flowing back), times 1 for inference.

It is an estimate within a small factor, meant to separate "fits" from "cannot possibly fit".
The default limit is half the machine's physical memory (``MemTotal`` in ``/proc/meminfo``);
``--max-memory-gb`` raises or lowers it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .config import ModelConfig

BYTES = 4  # float32


@dataclass(frozen=True)
class Estimate:
    params: int                 # parameters of the model
    activations_per_sample: int  # float32 activation values of one sample over all T steps
    bytes: int                  # total bytes for the asked batch and mode
    parts: dict                 # field -> bytes attributed to it, to name what dominates

    @property
    def gib(self) -> float:
        return self.bytes / 2 ** 30


def param_count(cfg: ModelConfig) -> int:
    """Parameter count of :class:`SpikingTransformer` for ``cfg``, exact for every stem, family and
    neuron: the model is built on PyTorch's ``meta`` device, which records shapes and allocates no
    memory (so a config asking for terabytes costs nothing to count)."""
    from .transformer import SpikingTransformer

    with torch.device("meta"):
        model = SpikingTransformer(cfg)
    return int(sum(p.numel() for p in model.parameters()))


def estimate(cfg: ModelConfig, batch: int = 1, training: bool = False) -> Estimate:
    d, s, n, t = cfg.embed_dim, cfg.embed_stages, cfg.tokens, cfg.timesteps
    size = cfg.image_size
    embed = 0
    height = 1 if cfg.input_dims == 1 else size
    for i, width in enumerate(cfg.stage_widths):
        embed += 4 * width * height * size  # conv, BN, membrane, spikes
        if i >= s - cfg.embed_pools:
            size //= 2
            height = 1 if cfg.input_dims == 1 else size
    embed += 3 * d * n
    attn = 12 * d * n + (cfg.heads * n * n if cfg.family == "spikformer" else 0)
    mlp = 6 * cfg.mlp_hidden * n + 4 * d * n
    per_step = embed + cfg.depth * (attn + mlp) + 2 * cfg.num_classes
    per_sample = per_step * t
    factor = 3 if training else 1
    params = param_count(cfg)
    copies = 4 if training else 1
    parts = {
        "embed_dim/depth (parameters)": params * BYTES * copies,
        "timesteps x batch (activations)": per_sample * batch * factor * BYTES,
    }
    return Estimate(params=params, activations_per_sample=per_sample, bytes=sum(parts.values()), parts=parts)


def memory_limit_bytes() -> int:
    """Half the machine's physical memory (``MemTotal``); 8 GiB where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def check_budget(cfg: ModelConfig, batch: int = 1, training: bool = False, limit_bytes: int | None = None,
                 source: str = "model config") -> Estimate:
    """Refuse ``cfg`` (a :class:`ConfigError` naming the dominant fields and the estimate) when its
    estimated memory for ``batch`` exceeds ``limit_bytes`` (default :func:`memory_limit_bytes`)."""
    limit = memory_limit_bytes() if limit_bytes is None else limit_bytes
    est = estimate(cfg, batch, training)
    if est.bytes > limit:
        worst = max(est.parts, key=est.parts.get)
        raise ConfigError(
            f"{source}: {'training' if training else 'running'} this model needs about {est.gib:.3g} GiB "
            f"({est.params:.3g} parameters; embed_dim={cfg.embed_dim}, depth={cfg.depth}, timesteps={cfg.timesteps}, "
            f"batch={batch}; most from {worst}), over the limit of {limit / 2 ** 30:.3g} GiB; "
            "shrink those fields or raise the limit with --max-memory-gb")
    return est
