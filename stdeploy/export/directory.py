"""One export directory per model: ``model.nir``, ``model.portable.nir``, ``model.onnx``, ``model.step.onnx``,
``reference/`` (the PyTorch checkpoint the artifacts were checked against) and ``manifest.json``.

Everything is written into a temporary sibling directory, validated there, and renamed into place
only when every artifact reproduces the folded PyTorch model: an error leaves nothing behind.

Validation streams its samples in batches of ``VALIDATION_BATCH`` and keeps only what it compares
(logits and the output spikes); every neuron is recorded only to localise a flip, on the first
sample that has one (the reference's once for every artifact that flips there; the ONNX files'
neurons from an unrolled probe, the NIR files' from the interpreter's LIF nodes), so that every
artifact is judged by the same rule: its first flip localised, then the task-level bound. Each artifact is validated once, from its file: the ONNX files on every
sample with a first batch of one (the batch dimension, traced at 2, stays dynamic), the NIR files
by the interpreter, which frees each node's output once read (the portable file's ``head.lif``
kept as well). A model in the exact mode (:mod:`stdeploy.models.quantize`) is checked first
(:func:`stdeploy.export.exact.check_exact`: every partial sum provably exact in float32) and must
then reproduce PyTorch with no flip at all and bit-identical logits.
"""

from __future__ import annotations

import json
import math
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
from ..neurons import neurons_of
from ..models.quantize import InputContract, deployable, exact_layers, input_contract_of, quant_mode
from ..tolerance import NIR_INTERPRETER, ONNXRUNTIME, Tolerance
from .manifest import MANIFEST, listed_files
from .validate import Comparison, compare, logits_and_spikes, record_neurons, require_agreement

FORMAT = "stdeploy-export/1"
FORMATS = ("nir", "onnx")
OPTIONAL_FORMATS = ("netx",)  # asked for by name only: lava-dl netx holds attention-free chains (stdeploy.export.netx_export)
VALIDATION_SAMPLES = 64
# the rule each artifact is validated by: the tolerance of the runtime that runs it in validation
ARTIFACT_TOLERANCE: dict[str, Tolerance] = {"nir": NIR_INTERPRETER, "nir.portable": NIR_INTERPRETER, "onnx": ONNXRUNTIME,
                                            "onnx.step": ONNXRUNTIME}
# exact mode: no flip for any reason, logits bit-identical
EXACT = Tolerance(logits_atol=0.0, spike_mismatches=0, max_flip_fraction=0.0)
VALIDATION_BATCH = 16  # samples per validation batch: memory stays that of one batch at any sample count


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
                 spikformer: str = "refuse", source: str | None = None, overwrite: bool = False, netx_part: str = "model") -> dict:
    """Export ``model`` (a finalized, unfolded model) to the directory ``out`` and return the manifest.
    An existing non-empty ``out`` is replaced only with ``overwrite`` (atomically: swapped, then deleted)."""
    unknown = sorted(set(formats) - set(FORMATS + OPTIONAL_FORMATS))
    if unknown or not formats:
        raise ConfigError(f"unknown export format(s) {unknown or formats}; known: {', '.join(FORMATS + OPTIONAL_FORMATS)}")
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
    mode = quant_mode(model)
    exact = mode != "float"
    folded = deployable(model)  # BatchNorm folded; in the exact mode the quantised values in plain modules
    x, labels, described = validation_input(model, data, samples)
    contract = (input_contract_of(model) or InputContract()) if exact else None
    if contract is not None:
        x = contract.apply(x)
        described += f", clipped to [{contract.lo:g}, {contract.hi:g}] and rounded to 2^-{contract.frac_bits} (the input contract)"
    exact_graph, checked = _check_exact(folded, spikformer, contract, mode) if exact else (None, None)
    orig_logits, orig_spikes = stream_outputs(model, x)
    # the reference's outputs and its firing rates / input densities in one streamed pass
    ref_logits, ref_spikes, activity = _reference_pass(folded, x)
    # every neuron of the reference on a sample with a flip, recorded once for every artifact that flips there
    records = _SampleMemo(lambda xb: record_neurons(folded, xb))
    folding = compare_streamed("batchnorm folding", model, x, orig_logits, orig_spikes, ref_logits, ref_spikes,
                               lambda xb: {k: v["spikes"] for k, v in records(xb)[1].items()})
    cfg = model.cfg
    manifest = {
        "format": FORMAT, "model": cfg.to_dict(), "timesteps": cfg.timesteps, "dt": 1.0, "source": source,
        "input": {"name": "input", "shape": [cfg.timesteps, "batch", *cfg.input_shape],
                  "encoding": "direct: the same analog frame at every step"},
        "outputs": {"logits": ["batch", cfg.num_classes], "spikes": [cfg.timesteps, "batch", cfg.tokens, cfg.embed_dim]},
        "artifacts": {}, "validation": {"input": described, "reference": "PyTorch model with BatchNorm folded",
                                        "reference_accuracy": _accuracy(ref_logits, labels), "results": {},
                                        "batch": VALIDATION_BATCH},
        "batchnorm_folding": folding.to_dict(),
        "quantize": {"mode": mode},
    }
    # firing rates and input densities of the reference on the validation input (streamed): a check on a silent model means nothing
    manifest["validation"]["activity"] = activity.to_dict()
    if exact:
        from .exact import contract_metadata

        manifest["input"]["contract"] = contract.describe()
        manifest["quantize"].update({**contract_metadata(contract), "layers": exact_layers(model), "max_bits": max(v["bits"] for v in checked.values()),
                                     "proof": "stdeploy.export.exact.check_exact: every partial sum below 2^24 grid units"})
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        comparisons: list[Comparison] = []
        if "nir" in formats:
            comparisons += _export_nir(folded, tmp, x, ref_logits, ref_spikes, labels, manifest, spikformer, exact_graph, records)
        if "onnx" in formats:
            comparisons += _export_onnx(folded, tmp, x, ref_logits, ref_spikes, labels, manifest, sparse_initializers, records)
        if "netx" in formats:
            _export_netx(folded, tmp, x, ref_logits, ref_spikes, labels, manifest, netx_part)  # loihi2: the model's integers
        save_checkpoint(tmp / "reference", model, meta={"role": "export reference", "source": source,
                                                        **({"quantize": mode} if exact else {})})
        manifest["artifacts"]["reference"] = {"file": "reference", "note": "unfolded PyTorch checkpoint; fold_batchnorm gives the reference",
                                              "files": listed_files(tmp / "reference")}
        # the exact mode promises more than the tolerance: no flip at all and bit-identical logits
        tolerances = {k: EXACT for k in ARTIFACT_TOLERANCE} if exact else ARTIFACT_TOLERANCE
        require_agreement(comparisons, "export does not reproduce the PyTorch model (nothing written)", tolerances)
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


def _export_nir(folded, tmp, x, ref_logits, ref_spikes, labels, manifest, spikformer, graph=None, records=None) -> list[Comparison]:
    """``graph``: the model's NIR graph when already converted (the exact mode's check), else converted here."""
    from .nir_export import nir_stats, to_nir, write_nir
    from .nir_interpreter import load_graph, run_nir
    from .nir_portable import NIR_MIN_VERSION

    graph = to_nir(folded, spikformer=spikformer) if graph is None else graph
    if manifest["quantize"]["mode"] != "float":
        graph.metadata["quantize"] = {k: v for k, v in manifest["quantize"].items() if k != "layers"}
        graph.metadata["input_contract"] = manifest["input"]["contract"]
        for node in graph.nodes.values():  # each weight node records its grid: weight = scale * an 8-bit integer
            layer = manifest["quantize"]["layers"].get(getattr(node, "metadata", {}).get("module", ""))
            if layer is not None:
                node.metadata["quantize"] = layer
    path = write_nir(graph, tmp / "model.nir")
    stored = load_graph(path)  # from the file, as a reader would

    def run(xb):
        outs = run_nir(stored, xb)
        sp = outs["spikes"]  # NIR tokens (D, N) or one token (D,); PyTorch's (N, D)
        return outs["logits"].mean(0), (sp.unsqueeze(-2) if sp.dim() == 3 else sp.transpose(-1, -2))

    logits, spikes = _stream(run, x)
    result = compare_streamed("nir", folded, x, ref_logits, ref_spikes, logits, spikes, nir_layer_spikes(stored), records)
    manifest["artifacts"]["nir"] = _artifact(path, stats=nir_stats(graph), lowerings=graph.metadata.get("lowerings"),
                                             layout="channel first: tokens (D, N)", dialect="stdeploy (read by the Lava target)",
                                             nir_min_version=NIR_MIN_VERSION)
    manifest["validation"]["results"]["nir"] = {**result.to_dict(), "accuracy": _accuracy(logits, labels)}
    return [result] + _export_portable_nir(folded, tmp, x, ref_logits, ref_spikes, labels, manifest, records)


def _export_portable_nir(folded, tmp, x, ref_logits, ref_spikes, labels, manifest, records=None) -> list[Comparison]:
    """``model.portable.nir``: the dialect other frameworks read (:mod:`.nir_portable`), checked
    with our interpreter from the file. A model it cannot express (Spikformer) gets no file and a
    manifest entry saying why, with a warning."""
    from .nir_export import nir_stats, write_nir
    from .nir_interpreter import load_graph, run_nir
    from .nir_portable import NIR_MIN_VERSION, READER_DT, to_portable_nir

    # per-neuron thresholds folded where the spikes stay, checked on the first validation batch (the
    # artifact is then validated on every sample); a model whose every layer has one threshold has
    # nothing to fold, and its graph is built without the check (the same graph: "uniform" everywhere)
    uniform = all(bool(torch.all(lif.threshold == lif.threshold.reshape(-1)[0])) for lif in neurons_of(folded).values())
    # a quantised model promises exactness: its thresholds are folded only where that is exact (powers of two);
    # a checked fold can pass the first batch and flip later (loihi2-mode L1P-90 sdt-tiny: 20 output spikes at sample 21)
    try:
        graph = (to_portable_nir(folded, fold="exact") if uniform or manifest["quantize"]["mode"] != "float" else
                 to_portable_nir(folded, fold="checked", check_input=x[:, :VALIDATION_BATCH]))
    except UnsupportedPrimitive as err:
        reason = str(err).splitlines()[-1].strip(" -")
        warnings.warn(f"model.portable.nir not written: {reason}", stacklevel=3)
        manifest["artifacts"]["nir.portable"] = {"file": None, "not_written": reason}
        return []
    stats = nir_stats(graph)
    path = write_nir(graph, tmp / "model.portable.nir")
    del graph  # the file is what is validated: one copy of the weights in memory, not two
    dense = folded.cfg.stem == "dense"
    stored = load_graph(path)  # from the file, as a reader would

    def run(xb):
        outs = run_nir(stored, xb.flatten(2) if dense else xb, record=["head.lif"])
        sp = outs["head.lif"]
        return (outs["output"].reshape(xb.shape[0], xb.shape[1], -1).mean(0),
                sp.reshape(*sp.shape[:3], -1).transpose(-1, -2))  # (T, B, D, h, w) or (T, B, D) -> (T, B, N, D)

    logits, spikes = _stream(run, x)  # the interpreter keeps the output and head.lif, frees the rest as it goes
    result = compare_streamed("nir.portable", folded, x, ref_logits, ref_spikes, logits, spikes,
                              nir_layer_spikes(stored, (lambda xb: xb.flatten(2)) if dense else None), records)
    manifest["artifacts"]["nir.portable"] = _artifact(
        path, stats=stats, dialect="portable", dt=READER_DT, nir_min_version=NIR_MIN_VERSION,
        input="the frame flattened in (C, H, W) order, (C*H*W,)" if dense else "the frame (C, H, W)",
        output="per-step logits; the model's logits are their mean over T",
        readers="snnTorch 1.0 and SpikingJelly 2.0 at their defaults, Norse 1.1 with dt = metadata['dt'], "
                "nirtorch 2.6 with stdeploy.interop.nirtorch_map.node_map(graph)")
    manifest["validation"]["results"]["nir.portable"] = {**result.to_dict(), "accuracy": _accuracy(logits, labels)}
    return [result]


def _export_netx(folded, tmp, x, ref_logits, ref_spikes, labels, manifest, part) -> None:
    """``netx.h5`` (:mod:`.netx_export`): the spiking chain in lava-dl's netx format, 8-bit integer
    weights. Validated with the numpy model of Loihi's integer arithmetic (the file read back)
    against PyTorch: the spike agreement and accuracy are recorded under ``validation.netx``, not
    held to the float tolerance (quantised). Refused before anything is written where netx cannot
    hold the model."""
    from .netx_export import NETX_FILE, host_currents, loihi_reference, model_spikes, read_netx, readout_logits, to_netx, write_netx

    quantize = manifest["quantize"] if manifest["quantize"]["mode"] == "loihi2" else None
    net = to_netx(folded, part, quantize=quantize)  # UnsupportedPrimitive names the first module netx cannot hold
    path = write_netx(net, tmp / NETX_FILE)
    stored = read_netx(path)  # from the file, as netx reads it
    t_in = x.shape[0]
    # loihi2 mode: each layer reset at its first step of a sample (hdf5.Network(reset_interval=T)), so that
    # what it integrates of its bias before its first input arrives is discarded, as in the model
    layers = loihi_reference(stored, host_currents(stored, x), reset_interval=t_in if stored.exact else None)  # layer k emits the model's steps at Lava steps k .. k + T - 1
    rates = {layer.name: float(s[k:k + t_in].mean()) for k, (layer, s) in enumerate(zip(stored.layers, layers))}
    if stored.readout is not None:
        spikes = model_spikes(stored, layers[-1])
        logits = torch.from_numpy(readout_logits(stored, layers[-1][stored.depth:]))
        result = compare("netx", ref_logits, ref_spikes, logits, spikes)
        checked = {"against": "PyTorch head.lif spikes and logits", "spike_mismatches": result.spike_mismatches,
                   "spikes_total": result.spikes_total, "spike_agreement": 1 - result.spike_mismatches / max(1, result.spikes_total),
                   "predictions_agree": result.predictions_agree, "accuracy": _accuracy(logits, labels)}
    else:  # a stem sub-network: against the stem's last stage (spikes, pooled where it pools)
        kept = []
        last = folded.embed.stages[-1] if folded.cfg.stem == "conv" else folded.embed.lifs[-1]
        hook = last.register_forward_hook(lambda m, i, out: kept.append(out))
        try:
            with torch.no_grad():
                for sl in _batches(x.shape[1]):
                    folded(x[:, sl])
        finally:
            hook.remove()
        ref = torch.cat(kept, dim=1)
        ours = torch.from_numpy(layers[-1][stored.depth:].astype(np.float32)).reshape(ref.shape)
        mism = int((ours != ref).sum())
        checked = {"against": "PyTorch spikes of the stem's last layer", "spike_mismatches": mism, "spikes_total": ref.numel(),
                   "spike_agreement": 1 - mism / max(1, ref.numel())}
    if stored.exact and checked["spike_mismatches"]:  # loihi2 mode: the model's own integers, so nothing may differ
        from ..errors import OutputMismatch

        raise OutputMismatch(f"netx (loihi2 mode): {checked['spike_mismatches']} of {checked['spikes_total']} spikes differ from "
                             "PyTorch; the integers should be the model's own (nothing written)")
    checked["exact"] = stored.exact
    manifest["validation"]["netx"] = {**checked, "arithmetic": "numpy model of Loihi's CUBA integer equations (netx_export.loihi_reference)",
                                      "firing_rates": rates, "firing_rates_over": "each layer's T model steps",
                                      "reference_output_rate": float(ref_spikes.mean()) if stored.readout is not None else None}
    manifest["artifacts"]["netx"] = _artifact(
        path, part=stored.part, depth=stored.depth,
        layers=[{"name": l.name, "type": l.kind, "shape": list(l.shape), "vThMant": l.vth, "vDecay": l.v_decay,
                 "modules": net.modules.get(l.name, [])} for l in stored.layers],
        load="lava.lib.dl.netx.hdf5.Network(net_config=path); Loihi2SimCfg(select_tag='fixed_pt')",
        input="host/encoder: integer currents (T, *layer/0 shape) into net.layers[0].neuron.a_in (netx (W, H, C) order); "
              "lava-dl 0.6's Input block leaves its inp port unconnected",
        output=f"net.out: the last layer's spikes, the model's step t at Lava step t + {stored.depth}",
        readout="host/readout: logits = mean over steps and tokens of the spikes @ weight.T + bias" if stored.readout is not None else None)


def _export_onnx(folded, tmp, x, ref_logits, ref_spikes, labels, manifest, sparse, records=None) -> list[Comparison]:
    from .onnx_export import export_onnx, export_onnx_streaming, onnx_session, probe_onnx, run_onnx, run_onnx_streaming

    results, outputs = [], {}
    probe = _SampleMemo(lambda xb: probe_onnx(folded, xb))  # both files localise against the same unrolled probe
    # the exporters' own check (PyTorch and onnxruntime on seeded batches of 1 and 3, with a session
    # of its own) is left to the validation below, which runs every sample from the written file
    # and starts with a batch of 1: the batch stays dynamic (traced at 2) at 1 and at 15-16
    q = manifest["quantize"]
    contract_props = None if q["mode"] == "float" else {  # the input contract travels with the ONNX files too (exact, loihi2)
        "stdeploy.quantize": q["mode"], "stdeploy.input_contract": manifest["input"]["contract"],
        "stdeploy.input_range": json.dumps(q["input_range"]), "stdeploy.input_frac_bits": str(q["input_frac_bits"])}
    info = export_onnx(folded, tmp / "model.onnx", sparse_initializers=sparse, validate=False, metadata=contract_props)
    step = export_onnx_streaming(folded, tmp / "model.step.onnx", sparse_initializers=sparse, validate=False, metadata=contract_props)
    for key, path, meta, run in (("onnx", tmp / "model.onnx", info, run_onnx), ("onnx.step", tmp / "model.step.onnx", step, run_onnx_streaming)):
        session = onnx_session(path)
        logits, spikes = outputs[key] = _stream(lambda xb: run(session, xb), x, first=1)
        # localise a flip: every neuron's spikes from onnxruntime, on the first batch that has one
        result = compare_streamed(key, folded, x, ref_logits, ref_spikes, logits, spikes, probe, records)
        keep = {k: meta[k] for k in ("opset", "exporter", "inputs", "outputs", "matmul_nodes", "sparse_initializers", "dense_file_bytes", "states") if k in meta}
        manifest["artifacts"][key] = _artifact(path, **keep)
        manifest["validation"]["results"][key] = {**result.to_dict(), "accuracy": _accuracy(logits, labels)}
        results.append(result)
    (ul, us), (sl, ss) = outputs["onnx"], outputs["onnx.step"]
    manifest["validation"]["streaming_vs_unrolled"] = {"spike_mismatches": int((us != ss).sum()),
                                                       "logits_max_abs_error": float((ul - sl).abs().max())}
    return results


def _batches(n: int, size: int = VALIDATION_BATCH, first: int | None = None) -> list[slice]:
    """Slices of ``n`` samples in batches of ``size``; with ``first``, the first batch has ``first``
    samples and the next one the rest of the first ``size``."""
    if first is None or first >= min(n, size):
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]
    return [slice(0, first), slice(first, min(size, n))] + _batches(n, size)[1:]


def _stream(run, x: torch.Tensor, size: int = VALIDATION_BATCH, first: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``run(x_batch) -> (logits, spikes)`` over batches of ``size`` samples of ``x (T, B, ...)``
    (the first of ``first`` samples, see :func:`_batches`), concatenated."""
    parts = [run(x[:, sl]) for sl in _batches(x.shape[1], size, first)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], dim=1)


@torch.no_grad()
def stream_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, head spikes)`` of ``model`` on ``x``, one batch at a time
    (:func:`~stdeploy.export.validate.logits_and_spikes` per batch); no other neuron is kept."""
    return _stream(lambda xb: logits_and_spikes(model, xb), x)


class _SampleMemo:
    """``fn(x_sample)``, computed once for the same view of the validation input (which lives for
    the whole export) and kept until called with another: several artifacts that flip first on the
    same sample share one recording of it."""

    def __init__(self, fn):
        self.fn, self.key, self.value = fn, None, None

    def __call__(self, xb: torch.Tensor):
        key = (xb.data_ptr(), tuple(xb.shape), xb.stride())
        if key != self.key:
            self.key, self.value = None, None  # one recording in memory at a time
            self.value, self.key = self.fn(xb), key
        return self.value


def nir_layer_spikes(graph, prepare=None):
    """``layer_spikes`` for :func:`compare_streamed` from a NIR graph: every ``LIF`` node's spikes
    from the interpreter on ``prepare(x)`` (default ``x``), by node name (the converters name LIF
    nodes after their modules), in the node's layout; :func:`compare_streamed` puts them in the
    reference's."""
    import nir

    from .nir_interpreter import run_nir

    lifs = [name for name, node in graph.nodes.items() if isinstance(node, nir.LIF)]

    def layer_spikes(xb: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = run_nir(graph, xb if prepare is None else prepare(xb), record=lifs)
        return {name: outs[name] for name in lifs}

    return layer_spikes


def reference_layout(spikes: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """One layer's spikes in the reference's layout ``shape``: as they are, or NIR's channel-first
    tokens (``(T, B, D, N)``, or ``(T, B, D, h, w)`` in the portable dialect) as ``(T, B, N, D)``;
    None where neither fits."""
    if spikes.shape == shape:
        return spikes
    if len(shape) == 4 and spikes.dim() >= 3 and spikes.numel() == math.prod(shape) and spikes.shape[2] == shape[3]:
        return spikes.reshape(shape[0], shape[1], shape[3], shape[2]).transpose(-1, -2)
    return None


def compare_streamed(artifact: str, reference: nn.Module, x: torch.Tensor, ref_logits, ref_spikes, logits, spikes,
                     layer_spikes, record=None) -> Comparison:
    """:func:`compare` on the whole input, localised on the first sample with a flip only: there every
    neuron of ``reference`` is recorded and, with ``layer_spikes(x_sample)`` (the artifact's spikes by
    layer), compared layer by layer (without it, at the output layer). Recording every neuron of
    ``sdt-8-512`` takes about 150 MB per sample, so only that one sample is recorded. ``record(x_sample)``
    gives ``reference``'s recording (default :func:`record_neurons`; the export passes one memo for
    every artifact). ``layer_spikes`` may return NIR's channel-first layouts (see :func:`reference_layout`)."""
    result = compare(artifact, ref_logits, ref_spikes, logits, spikes)
    if not result.spike_mismatches:
        return result
    differs = (spikes != ref_spikes).flatten(2).any(-1).any(0)  # (B,): samples with a flipped output spike
    j = int(differs.nonzero()[0, 0])
    sl = slice(j, j + 1)
    _, records = (record or (lambda xb: record_neurons(reference, xb)))(x[:, sl])
    layers = layer_spikes(x[:, sl]) if layer_spikes is not None else None
    if layers is not None:  # in the reference's layout; a layer that fits neither is left out
        layers = {name: fitted for name, s in layers.items() if name in records
                  and (fitted := reference_layout(s, records[name]["spikes"].shape)) is not None}
    local = compare(artifact, ref_logits[sl], ref_spikes[:, sl], logits[sl], spikes[:, sl], records, layers)
    result.flips, result.max_flip_distance = local.flips, local.max_flip_distance
    result.flips = [{**f, "sample": j} for f in result.flips]
    return result


def _check_exact(folded: nn.Module, spikformer: str, contract, mode: str = "exact") -> tuple[nir.NIRGraph, dict]:
    """The NIR graph (converted once: the NIR export reuses it) and its bounds, proven over the
    input ``contract`` (:class:`~stdeploy.models.quantize.InputContract`)."""
    from .exact import check_exact, contract_metadata
    from .nir_export import to_nir

    graph = to_nir(folded, spikformer=spikformer)
    graph.metadata["quantize"] = {"mode": mode, **contract_metadata(contract)}
    return graph, check_exact(graph, folded.cfg.timesteps)


@torch.no_grad()
def _reference_pass(folded: nn.Module, x: torch.Tensor):
    """``(logits, head spikes, activity)`` of the reference on ``x``, streamed in validation batches:
    :func:`stream_outputs` and :func:`~stdeploy.activity.measure_activity` in one pass."""
    logits, spikes = [], []
    hooks = [folded.register_forward_hook(lambda m, inputs, out: logits.append(out)),
             folded.head.lif.register_forward_hook(lambda m, inputs, out: spikes.append(out))]
    try:
        activity = measure_activity(folded, (x[:, sl] for sl in _batches(x.shape[1])))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(logits), torch.cat(spikes, dim=1), activity
