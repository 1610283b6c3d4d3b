"""Checkpoints: a folder with ``model.safetensors`` (weights), ``config.json`` (model config,
structure, metadata, and the weights' sha256) and, while training, ``train_state.pt`` (optimizer
and schedule state, loaded with ``weights_only=True``).

Every file is written to a temporary name and renamed, so a crash never leaves a half-written
file; ``config.json`` is renamed last and names the sha256 of the weights it belongs to, so a
weights file from another save is detected on load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError
from .files import atomic_write, atomic_write_text, sha256_file  # noqa: F401  (re-exported)
from .models import ModelConfig, SpikingTransformer
from .models.structure import apply_structure, structure_of

FORMAT = "stdeploy-checkpoint/1"
WEIGHTS, CONFIG, TRAIN_STATE = "model.safetensors", "config.json", "train_state.pt"


@dataclass
class Checkpoint:
    model: SpikingTransformer
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel


def save_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, meta: dict | None = None,
                    train_state: dict | None = None) -> Path:
    """Write ``model`` (its config, structure and weights) and optional training state to ``directory``."""
    model = _unwrap(model)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"checkpoint path {directory} exists and is not a folder")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    if train_state is not None:
        atomic_write(directory / TRAIN_STATE, lambda tmp: torch.save(train_state, tmp))
    doc = {
        "format": FORMAT,
        "model": model.cfg.to_dict(),
        "structure": structure_of(model),
        "weights": WEIGHTS,
        "weights_sha256": sha256_file(directory / WEIGHTS),
        "meta": meta or {},
    }
    atomic_write_text(directory / CONFIG, json.dumps(doc, indent=2, sort_keys=True))
    return directory


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_file() and path.name in (CONFIG, WEIGHTS):
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} (expected a folder with {CONFIG} and {WEIGHTS})")
    return path


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    directory = _checkpoint_dir(path)
    cfg_path = directory / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: missing {CONFIG}")
    try:
        doc = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not a stdeploy checkpoint (format {doc.get('format') if isinstance(doc, dict) else None!r}, expected {FORMAT!r})")
    return doc


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from ``config.json`` and load its weights (safetensors: no pickle)."""
    directory = _checkpoint_dir(path)
    doc = read_checkpoint_config(directory)
    weights = directory / doc.get("weights", WEIGHTS)
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing weights file {weights.name}")
    if sha256_file(weights) != doc.get("weights_sha256"):
        raise CheckpointError(f"{weights}: sha256 does not match {directory / CONFIG}; the checkpoint is corrupt or mixed from two saves")
    try:
        cfg = ModelConfig.from_dict(doc["model"], source=str(directory / CONFIG))
    except (ConfigError, KeyError, TypeError) as err:
        raise CheckpointError(f"{directory / CONFIG}: bad model config: {err}") from err
    model = SpikingTransformer(cfg)
    apply_structure(model, doc.get("structure", {}))
    model = _apply_quantize_mode(model, doc.get("meta", {}), directory)
    try:
        state = load_file(weights, device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: cannot read safetensors file: {err}") from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:5]))
        raise CheckpointError(f"{weights}: does not match its config: " + "; ".join(parts))
    model.load_state_dict(state)
    model.to(map_location)
    return Checkpoint(model=model, path=directory, meta=doc.get("meta", {}))


def _apply_quantize_mode(model: SpikingTransformer, meta: dict, directory: Path) -> SpikingTransformer:
    """A checkpoint saved in the exact mode (``meta["quantize"] == "exact"``) holds quantised
    modules: rebuild them before loading the weights."""
    mode = meta.get("quantize", "float") if isinstance(meta, dict) else "float"
    if mode == "float":
        return model
    if mode != "exact":
        raise CheckpointError(f"{directory / CONFIG}: unknown quantisation mode {mode!r} in meta (known: float, exact)")
    from .models.quantize import to_exact

    return to_exact(model)


def load_train_state(path: str | os.PathLike) -> dict | None:
    file = _checkpoint_dir(path) / TRAIN_STATE
    if not file.is_file():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure of a corrupt or foreign file
        raise CheckpointError(f"{file}: cannot load training state: {err}") from err
