"""Spiking transformer families and named presets.

``build_model("sdt-tiny")``, ``build_model(ModelConfig(...))`` or ``build_model("path/to.toml")``.
The TOML files in the repository's ``models/`` folder hold the same presets as data.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .config import ModelConfig, load_config_file
from .structure import apply_structure, structure_of
from .transformer import SpikingTransformer, direct_encode

_TINY = dict(embed_dim=64, depth=1, heads=4, mlp_ratio=4.0, timesteps=4, image_size=8, in_channels=1, num_classes=10, embed_stages=2, embed_pools=1)
_CIFAR = dict(mlp_ratio=4.0, timesteps=4, image_size=32, in_channels=3, num_classes=10, embed_stages=4, embed_pools=2)
# MNIST-1D (sequences of 40), a 76k-parameter prototype design: 1-D stem conv k5 (1 -> 64) -> LIF ->
# conv k3 (64 -> 64) -> LIF -> max-pool 2 -> 20 tokens
_SEQ_1D = dict(embed_dim=64, depth=1, heads=4, mlp_ratio=4.0, timesteps=4, image_size=40, in_channels=1, num_classes=10,
               embed_stages=2, embed_pools=1, input_dims=1, embed_kernel=5, embed_widths=(64, 64))

PRESETS: dict[str, ModelConfig] = {
    "sdt-tiny": ModelConfig(family="sdt", name="sdt-tiny", **_TINY),
    "spikformer-tiny": ModelConfig(family="spikformer", name="spikformer-tiny", **_TINY),
    "spikformer-4-384": ModelConfig(family="spikformer", name="spikformer-4-384", embed_dim=384, depth=4, heads=12, **_CIFAR),
    "sdt-8-512": ModelConfig(family="sdt", name="sdt-8-512", embed_dim=512, depth=8, heads=8, **_CIFAR),
    "sdt-1d-tiny": ModelConfig(family="sdt", name="sdt-1d-tiny", **_SEQ_1D),
    "spikformer-1d-tiny": ModelConfig(family="spikformer", name="spikformer-1d-tiny", **_SEQ_1D),
    # What most neuromorphic hardware runs today: no attention (depth 0). conv-tiny: conv-BN-LIF
    # stages, a max-pool of spikes, the conv position embedding, a LIF and a linear readout;
    # mlp-tiny: the 64 pixels -> 32 -> LIF -> 64 -> LIF -> 10.
    "conv-tiny": ModelConfig(family="sdt", name="conv-tiny", **{**_TINY, "depth": 0, "embed_dim": 32}),
    "mlp-tiny": ModelConfig(family="sdt", name="mlp-tiny", stem="dense", **{**_TINY, "depth": 0, "embed_pools": 0}),
    # Their MNIST-1D twins (sequences of 40). conv-1d-tiny: the sdt-1d-tiny stem at half width
    # (conv k5 1 -> 32, conv k3 32 -> 32, max-pool 2 -> 20 positions, conv k3 position embedding),
    # no block; mlp-1d-tiny: the 40 values -> 64 -> LIF -> 128 -> LIF -> 10.
    "conv-1d-tiny": ModelConfig(family="sdt", name="conv-1d-tiny", **{**_SEQ_1D, "depth": 0, "embed_dim": 32, "embed_widths": (32, 32)}),
    "mlp-1d-tiny": ModelConfig(family="sdt", name="mlp-1d-tiny", stem="dense",
                               **{**_SEQ_1D, "depth": 0, "embed_pools": 0, "embed_dim": 128, "embed_widths": (64, 128), "embed_kernel": 3}),
}
DEFAULT_PRESET = "sdt-tiny"


def resolve_config(spec: str | ModelConfig, **overrides) -> ModelConfig:
    """A preset name, a config file path or a config, with keyword overrides (None values ignored)."""
    if isinstance(spec, ModelConfig):
        cfg = spec
    elif spec in PRESETS:
        cfg = PRESETS[spec]
    elif Path(spec).suffix in (".toml", ".yaml", ".yml", ".json"):
        cfg = load_config_file(spec)
    else:
        raise ConfigError(f"unknown model {spec!r}: use a preset ({', '.join(PRESETS)}) or a .toml/.yaml file")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return cfg.replace(**overrides) if overrides else cfg


def config_for_data(cfg: ModelConfig, data) -> ModelConfig:
    """``cfg`` with the input channels, size and classes of the data split ``data``; a model for
    images cannot take sequences (MNIST-1D) or the reverse (a ConfigError naming both)."""
    if cfg.input_dims != data.input_dims:
        kinds = {1: "sequences", 2: "images"}
        hint = "sdt-1d-tiny or spikformer-1d-tiny" if data.input_dims == 1 else "sdt-tiny or spikformer-tiny"
        raise ConfigError(f"model {cfg.name or cfg.family} takes {kinds[cfg.input_dims]} but data {data.name} holds "
                          f"{kinds[data.input_dims]}; use --model {hint} (or a config with input_dims = {data.input_dims})")
    return cfg.replace(in_channels=data.in_channels, image_size=data.image_size, num_classes=data.num_classes)


def build_model(spec: str | ModelConfig, **overrides) -> SpikingTransformer:
    return SpikingTransformer(resolve_config(spec, **overrides))


def clone_model(model: SpikingTransformer) -> SpikingTransformer:
    """An independent copy, rebuilt from config + structure + state (``copy.deepcopy`` does not
    copy masked, parametrized modules reliably)."""
    new = SpikingTransformer(model.cfg)
    apply_structure(new, structure_of(model))
    new.load_state_dict(model.state_dict())
    return new.to(next(model.parameters()).device).train(model.training)


__all__ = ["ModelConfig", "SpikingTransformer", "PRESETS", "DEFAULT_PRESET", "build_model", "config_for_data", "clone_model", "resolve_config", "direct_encode", "load_config_file"]
