"""One export directory per model: ``model.nir``, ``model.portable.nir``, ``model.onnx``, ``model.step.onnx``,
``reference/`` (the PyTorch checkpoint the artifacts were checked against) and ``manifest.json``.

Everything is written into a temporary sibling directory, validated there, and renamed into place
only when every artifact reproduces the folded PyTorch model: an error leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..activity import measure_activity
from ..checkpoint import save_checkpoint
from ..files import exchange, finished_mode, fsync_dir, fsync_file, sha256_file
from ..errors import ConfigError, UnsupportedPrimitive
from ..models import direct_encode
from ..models.fold import fold_batchnorm
from ..tolerance import NIR_INTERPRETER, ONNXRUNTIME, Tolerance
from .manifest import MANIFEST, listed_files
from .validate import Comparison, compare, record_neurons, require_agreement

FORMAT = "stdeploy-export/1"
FORMATS = ("nir", "onnx")
VALIDATION_SAMPLES = 64
# the rule each artifact is validated by: the tolerance of the runtime that runs it in validation
ARTIFACT_TOLERANCE: dict[str, Tolerance] = {"nir": NIR_INTERPRETER, "nir.portable": NIR_INTERPRETER, "onnx": ONNXRUNTIME,
                                            "onnx.step": ONNXRUNTIME}


def validation_input(model: nn.Module, data=None, samples: int = VALIDATION_SAMPLES, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """``(x (T, B, C, H, W), labels or None, description)``: the test split of ``data`` when its
    images fit the model (all of it when ``samples`` is None), else seeded uniform noise."""
    c = model.cfg
    if data is not None:
        x, y = next(iter(torch.utils.data.DataLoader(data.test, batch_size=len(data.test))))
        if x.shape[-3:] == c.input_shape:
            n = len(x) if samples is None else min(samples, len(x))
            return direct_encode(x[:n], c.timesteps), y[:n], f"{data.name} test split, first {n} images"
    g = torch.Generator().manual_seed(seed)
    n = samples or VALIDATION_SAMPLES
    x = torch.rand(n, *c.input_shape, generator=g)
    return direct_encode(x, c.timesteps), None, f"uniform noise in [0, 1), seed {seed}, {n} images"


def _artifact(path: Path, **extra) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path), **extra}


def _accuracy(logits: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    return None if labels is None else float((logits.argmax(-1) == labels).float().mean())


def export_model(model: nn.Module, out: str | os.PathLike, formats: tuple[str, ...] | list[str] = FORMATS, *,
                 data=None, samples: int | None = VALIDATION_SAMPLES, sparse_initializers: bool = False,
                 spikformer: str = "refuse", source: str | None = None, overwrite: bool = False) -> dict:
    """Export ``model`` (a finalized, unfolded model) to the directory ``out`` and return the manifest.
    An existing non-empty ``out`` is replaced only with ``overwrite`` (atomically: swapped, then deleted)."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ConfigError(f"unknown export format(s) {unknown or formats}; known: {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    if samples is not None and not (isinstance(samples, int) and samples >= 1):
        raise ConfigError(f"--samples must be a positive integer, got {samples!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)  # of an export that was killed (one export per --out at a time)
    t0 = time.perf_counter()
    model = model.eval()
    folded = fold_batchnorm(model)
    x, labels, described = validation_input(model, data, samples)
    with torch.no_grad():
        orig_logits, orig_records = record_neurons(model, x)
        ref_logits, records = record_neurons(folded, x)
    ref_spikes = records["head.lif"]["spikes"]
    folding = compare("batchnorm folding", orig_logits, orig_records["head.lif"]["spikes"], ref_logits, ref_spikes,
                      orig_records, {k: v["spikes"] for k, v in records.items()})
    cfg = model.cfg
    manifest = {
        "format": FORMAT, "model": cfg.to_dict(), "timesteps": cfg.timesteps, "dt": 1.0, "source": source,
        "input": {"name": "input", "shape": [cfg.timesteps, "batch", *cfg.input_shape],
                  "encoding": "direct: the same analog frame at every step"},
        "outputs": {"logits": ["batch", cfg.num_classes], "spikes": [cfg.timesteps, "batch", cfg.tokens, cfg.embed_dim]},
        "artifacts": {}, "validation": {"input": described, "reference": "PyTorch model with BatchNorm folded",
                                        "reference_accuracy": _accuracy(ref_logits, labels), "results": {}},
        "batchnorm_folding": folding.to_dict(),
    }
    # firing rates and input densities of the reference on the validation input: a check on a silent model means nothing
    manifest["validation"]["activity"] = measure_activity(folded, x).to_dict()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        comparisons: list[Comparison] = []
        if "nir" in formats:
            comparisons += _export_nir(folded, tmp, x, records, ref_logits, ref_spikes, labels, manifest, spikformer)
        if "onnx" in formats:
            comparisons += _export_onnx(folded, tmp, x, records, ref_logits, ref_spikes, labels, manifest, sparse_initializers)
        save_checkpoint(tmp / "reference", model, meta={"role": "export reference", "source": source})
        manifest["artifacts"]["reference"] = {"file": "reference", "note": "unfolded PyTorch checkpoint; fold_batchnorm gives the reference",
                                              "files": listed_files(tmp / "reference")}
        require_agreement(comparisons, "export does not reproduce the PyTorch model (nothing written)", ARTIFACT_TOLERANCE)
        manifest["seconds"] = time.perf_counter() - t0
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_jsonable))
        for p in tmp.rglob("*"):  # flushed to disk before the directory is renamed into place
            if p.is_file():
                fsync_file(p)
        os.chmod(tmp, finished_mode(directory=True))  # 0700 while temporary (mkdtemp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _jsonable(v):
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, (Path, tuple)):
        return str(v) if isinstance(v, Path) else list(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` onto ``out``; an existing ``out`` is swapped with it in one step where the
    system can (``renameat2``), else renamed aside first; the old one is then deleted."""
    old = None
    if out.exists() and exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(out.parent)
        return
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export_nir(folded, tmp, x, records, ref_logits, ref_spikes, labels, manifest, spikformer) -> list[Comparison]:
    from .nir_export import nir_stats, to_nir, write_nir
    from .nir_interpreter import run_nir
    from .nir_portable import NIR_MIN_VERSION

    graph = to_nir(folded, spikformer=spikformer)
    path = write_nir(graph, tmp / "model.nir")
    outs = run_nir(path, x)  # from the file, as a reader would
    logits = outs["logits"].mean(0)
    spikes = outs["spikes"]
    spikes = spikes.unsqueeze(-2) if spikes.dim() == 3 else spikes.transpose(-1, -2)  # NIR tokens (D, N) or one token (D,); PyTorch's (N, D)
    result = compare("nir", ref_logits, ref_spikes, logits, spikes, records)
    manifest["artifacts"]["nir"] = _artifact(path, stats=nir_stats(graph), lowerings=graph.metadata.get("lowerings"),
                                             layout="channel first: tokens (D, N)", dialect="stdeploy (read by the Lava target)",
                                             nir_min_version=NIR_MIN_VERSION)
    manifest["validation"]["results"]["nir"] = {**result.to_dict(), "accuracy": _accuracy(logits, labels)}
    return [result] + _export_portable_nir(folded, tmp, x, records, ref_logits, ref_spikes, labels, manifest)


def _export_portable_nir(folded, tmp, x, records, ref_logits, ref_spikes, labels, manifest) -> list[Comparison]:
    """``model.portable.nir``: the dialect other frameworks read (:mod:`.nir_portable`), checked
    with our interpreter from the file. A model it cannot express (Spikformer) gets no file and a
    manifest entry saying why, with a warning."""
    from .nir_export import nir_stats, write_nir
    from .nir_interpreter import run_nir
    from .nir_portable import NIR_MIN_VERSION, READER_DT, to_portable_nir

    try:
        graph = to_portable_nir(folded, fold="checked", check_input=x)  # per-neuron thresholds folded where the spikes stay
    except UnsupportedPrimitive as err:
        reason = str(err).splitlines()[-1].strip(" -")
        warnings.warn(f"model.portable.nir not written: {reason}", stacklevel=3)
        manifest["artifacts"]["nir.portable"] = {"file": None, "not_written": reason}
        return []
    path = write_nir(graph, tmp / "model.portable.nir")
    dense = folded.cfg.stem == "dense"
    outs = run_nir(path, x.flatten(2) if dense else x, record=True)
    logits = outs["output"].reshape(x.shape[0], x.shape[1], -1).mean(0)
    spikes = outs["head.lif"]
    spikes = spikes.reshape(*spikes.shape[:3], -1).transpose(-1, -2)  # (T, B, D, h, w) or (T, B, D) -> (T, B, N, D)
    result = compare("nir.portable", ref_logits, ref_spikes, logits, spikes, records)
    manifest["artifacts"]["nir.portable"] = _artifact(
        path, stats=nir_stats(graph), dialect="portable", dt=READER_DT, nir_min_version=NIR_MIN_VERSION,
        input="the frame flattened in (C, H, W) order, (C*H*W,)" if dense else "the frame (C, H, W)",
        output="per-step logits; the model's logits are their mean over T",
        readers="snnTorch 1.0 and SpikingJelly 2.0 at their defaults, Norse 1.1 with dt = metadata['dt'], "
                "nirtorch 2.6 with stdeploy.interop.nirtorch_map.node_map(graph)")
    manifest["validation"]["results"]["nir.portable"] = {**result.to_dict(), "accuracy": _accuracy(logits, labels)}
    return [result]


def _export_onnx(folded, tmp, x, records, ref_logits, ref_spikes, labels, manifest, sparse) -> list[Comparison]:
    from .onnx_export import export_onnx, export_onnx_streaming, probe_onnx, run_onnx, run_onnx_streaming

    results, outputs = [], {}
    info = export_onnx(folded, tmp / "model.onnx", sparse_initializers=sparse)
    step = export_onnx_streaming(folded, tmp / "model.step.onnx", sparse_initializers=sparse)
    for key, path, meta, run in (("onnx", tmp / "model.onnx", info, run_onnx), ("onnx.step", tmp / "model.step.onnx", step, run_onnx_streaming)):
        logits, spikes = outputs[key] = run(path, x)
        layers = None
        if bool((spikes != ref_spikes).any()):  # localise: every neuron's spikes from onnxruntime
            layers = probe_onnx(folded, x)
        result = compare(key, ref_logits, ref_spikes, logits, spikes, records, layers)
        keep = {k: meta[k] for k in ("opset", "exporter", "inputs", "outputs", "matmul_nodes", "sparse_initializers", "dense_file_bytes", "states") if k in meta}
        manifest["artifacts"][key] = _artifact(path, **keep)
        manifest["validation"]["results"][key] = {**result.to_dict(), "accuracy": _accuracy(logits, labels)}
        results.append(result)
    (ul, us), (sl, ss) = outputs["onnx"], outputs["onnx.step"]
    manifest["validation"]["streaming_vs_unrolled"] = {"spike_mismatches": int((us != ss).sum()),
                                                       "logits_max_abs_error": float((ul - sl).abs().max())}
    return results
