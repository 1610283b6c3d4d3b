"""Model configuration: one dataclass for both families, validated once, read from TOML/YAML files."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

FAMILIES = ("spikformer", "sdt")
NEURONS = ("lif", "slif")
STEMS = ("conv", "dense")


@dataclass(frozen=True)
class ModelConfig:
    family: str = "sdt"            # "spikformer" (Q·Kᵀ·V attention) or "sdt" (spike-driven attention)
    embed_dim: int = 64            # D: width of the residual stream
    depth: int = 1                 # number of transformer blocks (0: no attention, a plain conv or MLP network)
    heads: int = 4                 # attention heads (embed_dim must divide by it)
    mlp_ratio: float = 4.0         # hidden width of the MLP = mlp_ratio * D
    timesteps: int = 4             # T: simulation steps per sample
    neuron: str = "lif"            # "lif" or "slif" (learnable per-neuron threshold and leak)
    tau: float = 2.0               # membrane time constant in timesteps (decay d = 1/tau)
    threshold: float = 1.0         # firing threshold of every LIF but the attention one
    attn_threshold: float = 0.5    # threshold of the LIF after the attention product
    attn_scale: float = 0.125      # Spikformer's fixed scale of Q·Kᵀ·V (no softmax)
    image_size: int = 8            # H = W of the input
    in_channels: int = 1           # C of the input (1 digits, 3 CIFAR, 2 DVS polarities)
    num_classes: int = 10
    embed_stages: int = 2          # conv-BN-LIF stages of the patch embedding
    embed_pools: int = 1           # 2x2 max-pools of spikes, on the last stages (tokens = (H/2^p)^2)
    name: str = ""                 # preset name, informational
    stem: str = "conv"             # "conv": conv-BN-LIF patch embedding; "dense": the image flattened into one
                                   # token, then linear-BN-LIF layers (an MLP; widths as the conv stages')

    def __post_init__(self):
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.neuron not in NEURONS:
            problems.append(f"neuron must be one of {NEURONS}, got {self.neuron!r}")
        if self.stem not in STEMS:
            problems.append(f"stem must be one of {STEMS}, got {self.stem!r}")
        if not (isinstance(self.depth, int) and self.depth >= 0):
            problems.append(f"depth must be a non-negative integer, got {self.depth!r}")
        for name in ("embed_dim", "heads", "timesteps", "image_size", "in_channels", "num_classes", "embed_stages"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if isinstance(self.embed_dim, int) and isinstance(self.heads, int) and self.heads >= 1 and self.embed_dim % self.heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        if not (isinstance(self.embed_pools, int) and 0 <= self.embed_pools <= self.embed_stages):
            problems.append(f"embed_pools must be in [0, embed_stages={self.embed_stages}], got {self.embed_pools!r}")
        elif isinstance(self.image_size, int) and self.image_size % (2 ** self.embed_pools):
            problems.append(f"image_size {self.image_size} is not divisible by 2**embed_pools = {2 ** self.embed_pools}")
        if isinstance(self.embed_dim, int) and isinstance(self.embed_stages, int) and self.embed_stages >= 1 and self.embed_dim % (2 ** (self.embed_stages - 1)):
            problems.append(f"embed_dim {self.embed_dim} must divide by 2**(embed_stages-1) = {2 ** (self.embed_stages - 1)}")
        if self.stem == "dense" and self.embed_pools:
            problems.append(f"a dense stem has no pooling: embed_pools must be 0, got {self.embed_pools!r}")
        if not self.mlp_ratio > 0:
            problems.append(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not self.tau > 1:
            problems.append(f"tau must be > 1 timestep, got {self.tau}")
        if not (self.threshold > 0 and self.attn_threshold > 0):
            problems.append("thresholds must be > 0")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    @property
    def tokens(self) -> int:
        if self.stem == "dense":
            return 1
        return (self.image_size // 2 ** self.embed_pools) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.embed_dim * self.mlp_ratio))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def load_config_file(path: str | Path) -> ModelConfig:
    """Read a model config from a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file (a ``[model]``
    table, or top-level keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unsupported config format {path.suffix!r} (use .toml, .yaml or .json)")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{path}: cannot parse: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of model settings")
    data = data.get("model", data)
    data = {k: v for k, v in data.items() if not isinstance(v, dict)}  # other tables (train, ...) are not model keys
    data.setdefault("name", path.stem)
    return ModelConfig.from_dict(data, source=str(path))
