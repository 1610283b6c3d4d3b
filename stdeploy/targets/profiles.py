"""Device profiles: TOML files (TVM target, Lava run config, core limits, energy per operation with
sources), chosen by name (``targets/NAME.toml``) or by path."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..shipped import shipped_dir

KINDS = ("cpu", "cuda", "lava")


def profile_dirs() -> list[Path]:
    """Where profiles are looked up: ``$STDEPLOY_TARGETS_DIR``, then the shipped profiles (the
    repository's top-level ``targets/``, carried by the wheel; see :mod:`stdeploy.shipped`)."""
    dirs = []
    if os.environ.get("STDEPLOY_TARGETS_DIR"):
        dirs.append(Path(os.environ["STDEPLOY_TARGETS_DIR"]))
    dirs.append(shipped_dir("profiles"))
    return dirs


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str                              # "cpu", "cuda" or "lava"
    description: str = ""
    tvm: dict = field(default_factory=dict)
    lava: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)
    energy: dict = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"device profile {self.path or self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        for key, value in self.energy.items():
            if key.endswith("_pj") and not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"device profile {self.path or self.name}: energy.{key} must be a number >= 0, got {value!r}")


def known_profiles() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in profile_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                found.setdefault(p.stem, p)
    return found


def load_profile(spec: str | os.PathLike) -> DeviceProfile:
    """A profile by name (``cpu``, ``jetson-orin-nano``, ``loihi2``, ...) or by path to a TOML file."""
    path = Path(spec)
    if path.suffix != ".toml":
        known = known_profiles()
        if str(spec) not in known:
            raise ConfigError(f"unknown device profile {str(spec)!r}; known: {', '.join(known) or 'none'} (or give a path to a .toml file)")
        path = known[str(spec)]
    if not path.is_file():
        raise ConfigError(f"device profile file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: cannot parse TOML: {err}") from err
    allowed = {"name", "kind", "description", "tvm", "lava", "limits", "energy"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    if "kind" not in data:
        raise ConfigError(f"{path}: missing 'kind' (one of {KINDS})")
    data.setdefault("name", path.stem)
    return DeviceProfile(**data, path=str(path))
