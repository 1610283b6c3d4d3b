"""Run an export directory on a target and check it against PyTorch: accuracy on the test split,
output-spike agreement with the folded reference model, wall time. The layer above targets: it
may read both the artifacts (through a target) and the reference checkpoint (through PyTorch)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .errors import ConfigError
from .export.validate import compare, record_neurons
from .models import direct_encode
from .models.fold import fold_batchnorm
from .targets.base import TargetError, get_target, read_manifest
from .targets.profiles import load_profile

DEFAULT_DEVICE = {"onnxruntime": "cpu", "tvm": "cpu", "lava": "loihi2"}


def reference_model(export_dir: str | Path):
    """The folded PyTorch model an export directory was validated against."""
    _, manifest = read_manifest(export_dir, "reference")
    return fold_batchnorm(load_checkpoint(Path(export_dir) / manifest["artifacts"]["reference"]["file"]).model)


def run_export(export_dir: str | Path, target: str, device: str | None = None, data=None, *, batch_size: int = 64,
               limit: int | None = None, progress: bool = False, options: dict | None = None) -> dict:
    """Compile ``export_dir`` for ``device`` on ``target`` and run the test split of ``data``."""
    tgt = get_target(target)
    ok, why = tgt.available()
    if not ok:
        raise TargetError(f"target {target} cannot run here: {why}")
    profile = load_profile(device or DEFAULT_DEVICE.get(target, "cpu"))
    reference = reference_model(export_dir)
    cfg = reference.cfg
    if data is None:
        raise ConfigError("run_export needs a data split")
    x_all, y_all = next(iter(torch.utils.data.DataLoader(data.test, batch_size=len(data.test))))
    if limit is not None:
        x_all, y_all = x_all[:limit], y_all[:limit]
    if tuple(x_all.shape[-3:]) != cfg.input_shape:
        raise ConfigError(f"data {data.name} has images {tuple(x_all.shape[-3:])}, the exported model expects "
                          f"{cfg.input_shape}")
    options = dict(options or {})
    if target == "tvm" and profile.kind == "cuda":  # one build at the run's batch (smaller batches are padded)
        options.setdefault("batch_size", min(batch_size, len(x_all)))
    t0 = time.perf_counter()
    runnable = tgt.compile(Path(export_dir), profile, **options)
    compile_s = time.perf_counter() - t0
    if not getattr(runnable, "can_run", True):  # e.g. a CUDA module built on a machine without a GPU
        return {"target": target, "device": profile.name, "export_dir": str(export_dir), "ran": False,
                "reason": f"built for {profile.name}; running it needs that device", "compile_seconds": compile_s,
                "info": runnable.info}
    logits_all, spikes_all, ref_logits_all, ref_spikes_all, run_s = [], [], [], [], 0.0
    flips = []
    starts = range(0, len(x_all), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"{target} on {profile.name}", unit="batch")
    for i in starts:
        x = direct_encode(x_all[i:i + batch_size], cfg.timesteps)
        res = runnable.run(x.numpy())
        run_s += res.seconds
        with torch.no_grad():
            ref_logits, records = record_neurons(reference, x)
        ref_spikes = records["head.lif"]["spikes"]
        logits = torch.as_tensor(np.asarray(res.logits))
        spikes = torch.as_tensor(np.asarray(res.spikes)) if res.spikes is not None else None
        if spikes is not None:
            c = compare(target, ref_logits, ref_spikes, logits, spikes, records)
            flips += c.flips
            spikes_all.append(spikes)
        logits_all.append(logits)
        ref_logits_all.append(ref_logits)
        ref_spikes_all.append(ref_spikes)
    logits = torch.cat(logits_all)
    ref_logits = torch.cat(ref_logits_all)
    result = {
        "target": target, "device": profile.name, "export_dir": str(export_dir), "ran": True, "samples": len(x_all),
        "accuracy": float((logits.argmax(-1) == y_all).float().mean()),
        "reference_accuracy": float((ref_logits.argmax(-1) == y_all).float().mean()),
        "prediction_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
        "logits_max_abs_error": float((logits - ref_logits).abs().max()),
        "compile_seconds": compile_s, "run_seconds": run_s, "info": runnable.info,
    }
    if spikes_all:
        spikes, ref_spikes = torch.cat(spikes_all, dim=1), torch.cat(ref_spikes_all, dim=1)
        mismatches = int((spikes != ref_spikes).sum())
        result.update({"spikes_total": ref_spikes.numel(), "spike_mismatches": mismatches,
                       "spike_agreement": 1 - mismatches / ref_spikes.numel(), "flips": flips})
    return result


def list_targets() -> list[dict]:
    from .targets.base import target_names

    rows = []
    for name in target_names():
        try:
            ok, why = get_target(name).available()
        except ImportError as err:
            ok, why = False, str(err)
        rows.append({"target": name, "available": ok, "detail": why})
    return rows
