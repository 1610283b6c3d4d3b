"""Checkpoints: a folder with ``model.safetensors`` (weights), ``config.json`` (model config,
structure, metadata, and the weights' sha256) and, while training, ``train_state.pt`` (optimizer
and schedule state, loaded with ``weights_only=True``).

A save is atomic as a whole: the complete new checkpoint is written into a temporary sibling
folder ``.NAME.new-*`` (mode 0700 while temporary), flushed to disk, then swapped with the old
folder in one step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere the old folder is renamed aside
to ``.NAME.old-*`` and the new one renamed in) and the old one deleted. A kill or a full disk at any
instant leaves the last complete checkpoint loadable (in the two-rename window the loader reads the
complete sibling); the next save cleans leftovers of an interrupted one. ``config.json`` names the
sha256 of the weights it belongs to, so a weights file from another save is detected on load; its
``"weights"`` must be a plain file name inside the folder.

A save replaces only a checkpoint folder (or an empty or missing one): a folder holding anything
else is refused rather than deleted. Two processes must not save to the same folder at once.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError
from .files import atomic_write, atomic_write_text, sha256_file  # noqa: F401  (re-exported)
from .files import exchange, finished_mode, fsync_dir, fsync_file, resolve_inside
from .models import ModelConfig, SpikingTransformer
from .models.budget import check_budget
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


def _siblings(directory: Path, kind: str) -> list[Path]:
    """Leftover ``.NAME.new-*`` / ``.NAME.old-*`` folders of interrupted saves, newest first."""
    if not directory.parent.is_dir():
        return []
    found = [p for p in directory.parent.glob(f".{directory.name}.{kind}-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _complete(folder: Path) -> bool:
    try:
        doc = json.loads((folder / CONFIG).read_text())
        return isinstance(doc, dict) and (folder / str(doc.get("weights", WEIGHTS))).is_file()
    except (OSError, ValueError):
        return False


def _pending(directory: Path) -> Path | None:
    """Where the last complete save of a missing ``directory`` is, if a kill hit the two-rename
    window: the new folder when complete, else the old one renamed aside."""
    for kind in ("new", "old"):
        for p in _siblings(directory, kind):
            if _complete(p):
                return p
    return None


def _refuse_foreign(directory: Path) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint path {directory} exists and is not a folder")
    foreign = sorted(p.name for p in directory.iterdir()
                     if p.name not in (WEIGHTS, CONFIG, TRAIN_STATE) and not (p.name.startswith(".") and p.name.endswith(".tmp")))
    if foreign:
        raise CheckpointError(f"{directory} is not a checkpoint folder (it holds {foreign[:5]}); "
                              "saving would delete those files: choose another --out")


def save_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, meta: dict | None = None,
                    train_state: dict | None = None) -> Path:
    """Write ``model`` (its config, structure and weights) and optional training state to ``directory``,
    atomically as a whole (module docstring)."""
    model = _unwrap(model)
    directory = Path(directory)
    _refuse_foreign(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    if not directory.exists() and (pending := _pending(directory)) is not None:
        os.replace(pending, directory)  # finish the swap a kill interrupted
    for kind in ("new", "old"):  # leftovers of interrupted saves
        for p in _siblings(directory, kind):
            shutil.rmtree(p, ignore_errors=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.new-", dir=directory.parent))  # mode 0700
    try:
        save_file(state, tmp / WEIGHTS, metadata={"format": FORMAT})
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        doc = {
            "format": FORMAT,
            "model": model.cfg.to_dict(),
            "structure": structure_of(model),
            "weights": WEIGHTS,
            "weights_sha256": sha256_file(tmp / WEIGHTS),
            "meta": {**(meta or {}), **_input_contract_meta(model)},
        }
        (tmp / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True))
        for p in tmp.iterdir():
            os.chmod(p, finished_mode())
            fsync_file(p)
        fsync_dir(tmp)
        os.chmod(tmp, finished_mode(directory=True))
        if directory.exists() and exchange(tmp, directory):  # one atomic step; tmp now holds the old folder
            fsync_dir(directory.parent)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = None
            if directory.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
                os.replace(directory, old)
            os.replace(tmp, directory)
            fsync_dir(directory.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_file() and path.name in (CONFIG, WEIGHTS):
        path = path.parent
    if not path.exists() and (pending := _pending(path)) is not None:
        return pending  # a save was killed between its two renames: its complete sibling
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} (expected a folder with {CONFIG} and {WEIGHTS})")
    return path


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    directory = _checkpoint_dir(path)
    cfg_path = directory / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: missing {CONFIG}")
    resolve_inside(directory, CONFIG, str(cfg_path), CheckpointError)  # not a symlink out of the folder
    if cfg_path.stat().st_size > 64 << 20:
        raise CheckpointError(f"{cfg_path}: {cfg_path.stat().st_size} bytes, larger than any checkpoint config")
    try:
        doc = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({str(err).splitlines()[0][:200]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not a stdeploy checkpoint (format {doc.get('format') if isinstance(doc, dict) else None!r}, expected {FORMAT!r})")
    return doc


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from ``config.json`` and load its weights (safetensors: no pickle)."""
    directory = _checkpoint_dir(path)
    doc = read_checkpoint_config(directory)
    name = doc.get("weights", WEIGHTS)
    if not (isinstance(name, str) and name and "/" not in name and "\\" not in name and name not in (".", "..")):
        raise CheckpointError(f"{directory / CONFIG}: field 'weights' must be a plain file name inside the folder, got {name!r}")
    weights = resolve_inside(directory, name, f"{directory / CONFIG}: field 'weights'", CheckpointError)
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing weights file {weights.name}")
    if sha256_file(weights) != doc.get("weights_sha256"):
        raise CheckpointError(f"{weights}: sha256 does not match {directory / CONFIG}; the checkpoint is corrupt or mixed from two saves")
    if not isinstance(doc.get("model"), dict):
        raise CheckpointError(f"{directory / CONFIG}: field 'model' must be an object of model settings")
    if not isinstance(doc.get("structure", {}), dict) or not isinstance(doc.get("meta", {}), dict):
        raise CheckpointError(f"{directory / CONFIG}: fields 'structure' and 'meta' must be objects")
    try:
        cfg = ModelConfig.from_dict(doc["model"], source=str(directory / CONFIG))
    except (ConfigError, KeyError, TypeError) as err:
        raise CheckpointError(f"{directory / CONFIG}: bad model config: {err}") from err
    check_budget(cfg, source=str(directory / CONFIG))  # before building: a config asking for terabytes is refused
    model = SpikingTransformer(cfg)
    try:
        apply_structure(model, doc.get("structure", {}))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{directory / CONFIG}: bad field 'structure': {str(err).splitlines()[0][:200] if str(err) else type(err).__name__}") from None
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
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{weights}: tensors {bad[:5]}{' ...' if len(bad) > 5 else ''} hold NaN or infinite values; "
                              "the training diverged or the file was edited: retrain or use an earlier checkpoint")
    model.load_state_dict(state)
    model.to(map_location)
    return Checkpoint(model=model, path=directory, meta=doc.get("meta", {}))


def _apply_quantize_mode(model: SpikingTransformer, meta: dict, directory: Path) -> SpikingTransformer:
    """A checkpoint saved in the exact mode (``meta["quantize"] == "exact"``) holds quantised
    modules: rebuild them before loading the weights."""
    mode = meta.get("quantize", "float") if isinstance(meta, dict) else "float"
    if mode == "float":
        return model
    if mode not in ("exact", "loihi2"):
        raise CheckpointError(f"{directory / CONFIG}: unknown quantisation mode {mode!r} in meta (known: float, exact, loihi2)")
    from .models.quantize import InputContract, to_exact

    # the input contract (checkpoints without one: the mode's default, [0, 1] on 2^-8, or on 2^-4 in the loihi2 mode)
    contract = None
    if meta.get("input_contract") is not None:
        try:
            contract = InputContract.from_dict(meta["input_contract"], f"{directory / CONFIG}: meta.input_contract")
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    try:
        return to_exact(model, contract, mode=mode)
    except ConfigError as err:  # e.g. a loihi2 checkpoint whose contract is finer than Loihi's grid
        raise CheckpointError(f"{directory / CONFIG}: {err}") from None


def _input_contract_meta(model: torch.nn.Module) -> dict:
    """``{"input_contract": {...}}`` for an exact-mode model (its input layer's contract), else ``{}``."""
    from .models.quantize import input_contract_of

    contract = input_contract_of(model)
    return {} if contract is None else {"input_contract": contract.to_dict()}


def load_train_state(path: str | os.PathLike) -> dict | None:
    """The training state saved beside the weights (None when there is none), validated: an
    ``epoch`` integer >= 0, ``optimizer`` and ``schedule`` state objects, a ``history`` list.
    Loaded with ``weights_only=True``: a file holding anything but tensors and plain containers is
    refused, never unpickled."""
    file = _checkpoint_dir(path) / TRAIN_STATE
    if not file.is_file():
        return None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        why = "it holds objects other than tensors and plain containers; refused, since unpickling them could run code"
        if "Weights only load failed" not in str(err):
            why = str(err).splitlines()[0][:200]
        raise CheckpointError(f"{file}: cannot load training state ({why}); delete it to keep the weights "
                              "without resuming, or retrain with --overwrite") from None
    except Exception as err:  # any other failure to read a corrupt or foreign file
        raise CheckpointError(f"{file}: cannot load training state ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'corrupt'}); "
                              "delete it to keep the weights without resuming, or retrain with --overwrite") from None
    problems = []
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: training state must be a dict, got {type(state).__name__}")
    epoch = state.get("epoch")
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0):
        problems.append(f"'epoch' must be an integer >= 0, got {epoch!r}")
    if not isinstance(state.get("optimizer"), dict):
        problems.append(f"'optimizer' must be a state dict, got {type(state.get('optimizer')).__name__}")
    if not isinstance(state.get("schedule", {}), dict):
        problems.append(f"'schedule' must be a state dict, got {type(state.get('schedule')).__name__}")
    if not isinstance(state.get("history", []), list):
        problems.append(f"'history' must be a list, got {type(state.get('history')).__name__}")
    if problems:
        raise CheckpointError(f"{file}: bad training state: " + "; ".join(problems))
    return state
