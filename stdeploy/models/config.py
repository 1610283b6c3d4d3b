"""Model configuration: one dataclass for both families, validated once, read from TOML/YAML files."""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

FAMILIES = ("spikformer", "sdt")
NEURONS = ("lif", "slif")
# Sane upper bounds of the integer fields: beyond them no model fits any machine (or the loops hang).
INT_LIMITS = {"embed_dim": 1 << 16, "depth": 1024, "heads": 1024, "timesteps": 1 << 14, "image_size": 1 << 14,
              "in_channels": 1 << 12, "num_classes": 1 << 20, "embed_stages": 16}
FLOAT_FIELDS = ("mlp_ratio", "tau", "threshold", "attn_threshold", "attn_scale")
_repr = reprlib.Repr()  # a YAML alias bomb prints short
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 2, 40, 40, 4, 4
_short = _repr.repr
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
    input_dims: int = 2            # 2: images (C, image_size, image_size); 1: sequences of length image_size,
                                   # held as one-row images (C, 1, image_size): (1, k) convolutions and (1, 2)
                                   # max-pools, i.e. 1-D ones along the sequence (tokens = image_size/2^p positions)
    embed_kernel: int = 3          # kernel size of the first embedding convolution (odd; the others are 3)
    embed_widths: tuple[int, ...] = ()  # channels of each embedding stage, the last = embed_dim;
                                   # () = doubling up to D: D/2^(s-1), ..., D/2, D
    name: str = ""                 # preset name, informational
    stem: str = "conv"             # "conv": conv-BN-LIF patch embedding; "dense": the image flattened into one
                                   # token, then linear-BN-LIF layers (an MLP; widths as the conv stages')

    def __post_init__(self):
        if isinstance(self.embed_widths, list):  # TOML / JSON arrays
            object.__setattr__(self, "embed_widths", tuple(self.embed_widths))
        problems = []
        if not isinstance(self.family, str) or self.family not in FAMILIES:
            problems.append(f"family must be one of {FAMILIES}, got {_short(self.family)}")
        if not isinstance(self.neuron, str) or self.neuron not in NEURONS:
            problems.append(f"neuron must be one of {NEURONS}, got {_short(self.neuron)}")
        if not isinstance(self.stem, str) or self.stem not in STEMS:
            problems.append(f"stem must be one of {STEMS}, got {_short(self.stem)}")
        if not isinstance(self.name, str):
            problems.append(f"name must be a string, got {_short(self.name)}")
        for name, top in INT_LIMITS.items():
            v = getattr(self, name)
            low = 0 if name == "depth" else 1  # depth 0: no attention blocks (conv-tiny, mlp-tiny)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                problems.append(f"{name} must be {'a non-negative' if low == 0 else 'a positive'} integer, got {_short(v)}")
            elif v > top:
                problems.append(f"{name} = {v} is beyond the supported maximum {top}")
        for name in FLOAT_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                problems.append(f"{name} must be a finite number, got {_short(v)}")
        if problems:  # the checks below assume the types are right
            raise ConfigError("invalid model config: " + "; ".join(problems))
        if self.mlp_ratio > 64 or self.tau > 1e6:
            problems.append(f"mlp_ratio must be <= 64 and tau <= 1e6, got {self.mlp_ratio}, {self.tau}")
        if isinstance(self.embed_dim, int) and isinstance(self.heads, int) and self.heads >= 1 and self.embed_dim % self.heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        if not (isinstance(self.embed_pools, int) and not isinstance(self.embed_pools, bool) and 0 <= self.embed_pools <= self.embed_stages):
            problems.append(f"embed_pools must be in [0, embed_stages={self.embed_stages}], got {_short(self.embed_pools)}")
        elif isinstance(self.image_size, int) and self.image_size % (2 ** self.embed_pools):
            problems.append(f"image_size {self.image_size} is not divisible by 2**embed_pools = {2 ** self.embed_pools}")
        if self.embed_widths:
            widths = self.embed_widths
            if not (isinstance(widths, tuple) and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)
                    and len(widths) == self.embed_stages and widths[-1] == self.embed_dim):
                problems.append(f"embed_widths must be {self.embed_stages} positive integers ending with embed_dim "
                                f"{self.embed_dim}, got {widths!r}")
        elif isinstance(self.embed_dim, int) and isinstance(self.embed_stages, int) and self.embed_stages >= 1 and self.embed_dim % (2 ** (self.embed_stages - 1)):
            problems.append(f"embed_dim {self.embed_dim} must divide by 2**(embed_stages-1) = {2 ** (self.embed_stages - 1)}")
        if self.input_dims not in (1, 2):
            problems.append(f"input_dims must be 1 (sequences) or 2 (images), got {self.input_dims!r}")
        if not (isinstance(self.embed_kernel, int) and self.embed_kernel >= 1 and self.embed_kernel % 2 == 1):
            problems.append(f"embed_kernel must be an odd positive integer, got {self.embed_kernel!r}")
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
        side = self.image_size // 2 ** self.embed_pools
        return side if self.input_dims == 1 else side ** 2

    @property
    def stage_widths(self) -> tuple[int, ...]:
        """Channels of each embedding stage (``embed_widths``, or doubling up to ``embed_dim``)."""
        s = self.embed_stages
        return self.embed_widths or tuple(self.embed_dim // 2 ** (s - 1 - i) for i in range(s))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input frame: ``(C, S, S)`` images, ``(C, 1, S)`` sequences."""
        height = 1 if self.input_dims == 1 else self.image_size
        return (self.in_channels, height, self.image_size)

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.embed_dim * self.mlp_ratio))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "ModelConfig":
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise ConfigError(f"{source}: model config must be a table of named settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config keys {_short(unknown)}; known keys: {sorted(known)}")
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


def load_config_file(path: str | Path) -> ModelConfig:
    """Read a model config from a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file (a ``[model]``
    table, or top-level keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model config file not found: {path}")
    if path.stat().st_size > 1 << 20:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes is too large for a model config (limit 1 MiB)")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unsupported config format {path.suffix!r} (use .toml, .yaml or .json)")
    except ConfigError:
        raise
    except Exception as err:  # TOML/JSON/YAML syntax, binary bytes, YAML tags (safe_load refuses them)
        import yaml

        if not isinstance(err, (ValueError, yaml.YAMLError, RecursionError)):
            raise
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ConfigError(f"{path}: cannot parse: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of model settings")
    data = data.get("model", data)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: [model] must be a table of settings, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if not isinstance(v, dict)}  # other tables (train, ...) are not model keys
    data.setdefault("name", path.stem)
    return ModelConfig.from_dict(data, source=str(path))
