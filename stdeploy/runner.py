"""The one run path: compile an export directory for a target -> can it run here -> run -> compare
with the reference -> time. ``stdeploy run``, ``bench`` and ``profile``, the demo and the
benchmarks all go through it.

The layer above targets and the profiler: it reads the artifacts through a target and the
reference once per export directory (:func:`load_reference`): the folded PyTorch checkpoint of our
own exports (:class:`Reference`), or, for a directory written by ``stdeploy import`` (no
checkpoint), the converted NIR graph run by our interpreter (:class:`GraphReference`). Both answer
the same questions (time steps, input shape, outputs and firing rates on an input), so run, bench
and profile have one path for both.
Results are judged by the target's declared tolerance (:class:`stdeploy.tolerance.Tolerance`), the
rule export validation applies too. Times are seconds of :mod:`stdeploy.timing`; a run's
``run_seconds`` sums the runtime's own calls (compilation, including lazy builds per batch size,
is ``compile_seconds``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .activity import SILENT_BELOW, rates_from_records
from .checkpoint import load_checkpoint
from .console import native_notes, show_progress
from .errors import ConfigError
from .export.nir_interpreter import EVALUATORS, EvalContext, int_tuple, load_graph, run_nir, topological_order
from .export.validate import Comparison, compare, record_neurons
from .models import direct_encode
from .models.config import ModelConfig
from .models.fold import fold_batchnorm
from .neurons import LIF
from .profile.latency import measure, module_times
from .profile.report import assemble_report, variant_row
from .targets.base import Target, TargetError, get_target, read_manifest, target_names, target_tolerance
from .targets.profiles import DeviceProfile, load_profile
from .timing import Timer

__all__ = ["Compiled", "Reference", "bench_export", "compile_export", "latency", "list_targets", "load_reference",
           "model_config", "profile_exports", "resolve_target", "run_export", "eval_images",
           "GraphReference", "GraphModel", "GraphConfig", "Evaluation", "apply_input_contract"]


# ----------------------------------------------------------------------------- reference
@dataclass(frozen=True)
class Evaluation:
    """The reference's outputs on one input ``(T, B, ...)``."""

    logits: torch.Tensor                  # (B, classes)
    spikes: torch.Tensor | None           # output spikes, (T, B, ...)
    records: dict | None                  # per-LIF records that localise flips (record_neurons), or None
    firing_rates: dict[str, float]        # per spiking layer, on this input


@dataclass(frozen=True)
class Reference:
    """The folded PyTorch model an export directory was validated against, loaded once."""

    export_dir: Path
    manifest: dict
    model: torch.nn.Module     # folded, in eval mode
    name = "pytorch"           # how rows and reports name it

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def timesteps(self) -> int:
        return self.cfg.timesteps

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.cfg.input_shape)

    @property
    def image_size(self) -> int | None:
        return self.cfg.image_size

    def fit_images(self, x_all: torch.Tensor, data_name: str = "the data") -> torch.Tensor:
        """``x_all`` (B, C, H, W) when it matches the model's input, else :class:`ConfigError`."""
        if tuple(x_all.shape[-3:]) != self.input_shape:
            raise ConfigError(f"data {data_name} has inputs {tuple(x_all.shape[-3:])}, the exported model expects {self.input_shape}")
        return x_all

    def evaluate(self, x: torch.Tensor) -> Evaluation:
        with torch.no_grad():
            logits, records = record_neurons(self.model, x)
        return Evaluation(logits, records["head.lif"]["spikes"], records, rates_from_records(records))

    def target_spikes(self, spikes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A target's output spikes in the layout of the reference's ``like`` (ours: the same, but
        for Lava's per-neuron vectors ``(T, B, F)`` of a one-token model (the MLP stem), whose
        reference is ``(T, B, 1, F)``: the token axis is put back)."""
        if spikes.dim() == 3 and like.dim() == 4 and like.shape[2] == 1:
            return spikes.unsqueeze(2)
        return spikes


@dataclass(frozen=True)
class GraphConfig:
    """What the run path reads of a model's config, for an imported graph."""

    timesteps: int
    input_shape: tuple[int, ...]


class _Node(torch.nn.Module):
    """One NIR node evaluated by the interpreter's own evaluator."""

    def __init__(self, node):
        super().__init__()
        self.node = node

    def forward(self, x: torch.Tensor, ctx: EvalContext) -> torch.Tensor:
        return EVALUATORS[type(self.node)](self.node, x, ctx)


class _LinearNode(torch.nn.Linear):
    """A 2-D ``Affine``/``Linear`` node: an ``nn.Linear`` holding its weights (what the profiler
    counts), evaluated by the interpreter's evaluator."""

    def __init__(self, node):
        w = np.asarray(node.weight, np.float32)
        bias = getattr(node, "bias", None)
        super().__init__(w.shape[1], w.shape[0], bias=bias is not None)
        self.node = node
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(w))
            if bias is not None:
                self.bias.copy_(torch.as_tensor(np.asarray(bias, np.float32)))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, ctx: EvalContext) -> torch.Tensor:
        return EVALUATORS[type(self.node)](self.node, x, ctx)


class _Conv2dNode(torch.nn.Conv2d):
    def __init__(self, node):
        w = np.asarray(node.weight, np.float32)
        pad = int_tuple(node.padding, 2)
        super().__init__(w.shape[1] * int(node.groups), w.shape[0], w.shape[2:], int_tuple(node.stride, 2), pad,
                         int_tuple(node.dilation, 2), int(node.groups), bias=True)
        self.node = node
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(w))
            self.bias.copy_(torch.as_tensor(np.broadcast_to(np.asarray(node.bias, np.float32), (w.shape[0],)).copy()))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, ctx: EvalContext) -> torch.Tensor:
        return EVALUATORS[type(self.node)](self.node, x, ctx)


class _LIFNode(LIF):
    """A NIR ``LIF`` whose parameters vary per channel only: our :class:`stdeploy.neurons.LIF`
    holding ``d = dt/tau`` and the threshold (what the profiler counts), evaluated by the
    interpreter's evaluator on ``(T, B, *shape)``."""

    def __init__(self, node, d: np.ndarray, thr: np.ndarray, channel_dim: int):
        super().__init__(len(d), 2.0, 1.0, channel_dim)
        self.node = node
        with torch.no_grad():
            self.decay_.copy_(torch.as_tensor(d))
            self.threshold_.copy_(torch.as_tensor(thr))

    def forward(self, x: torch.Tensor, ctx: EvalContext) -> torch.Tensor:
        return EVALUATORS[type(self.node)](self.node, x.flatten(0, 1), ctx).reshape(x.shape)


def _lif_node(node, shape: tuple[int, ...], dt: float) -> torch.nn.Module:
    d = np.broadcast_to((dt / np.asarray(node.tau, np.float64)).astype(np.float32), shape)
    thr = np.broadcast_to(np.asarray(node.v_threshold, np.float32), shape)
    per_channel = all(np.all(a == a.reshape(shape[0], -1)[:, :1].reshape(shape[0], *[1] * (len(shape) - 1))) for a in (d, thr))
    if not per_channel or not np.all(thr > 0):
        return _Node(node)  # run as is; the profiler does not count it as a LIF
    return _LIFNode(node, d.reshape(shape[0], -1)[:, 0].copy(), thr.reshape(shape[0], -1)[:, 0].copy(), -1 if len(shape) == 1 else 1)


class GraphModel(torch.nn.Module):
    """An imported directory's ``model.nir`` as a module, ``(T, B, C, H, W) -> logits (B, F)``:
    the interpreter's schedule and evaluators (the same values as :func:`run_nir`), with every
    2-D ``Affine``/``Linear`` an ``nn.Linear``, every ``Conv2d`` an ``nn.Conv2d`` and every LIF with
    per-channel parameters our ``LIF``, so that timing and the profiler's counts see layers.
    Submodules are named after their nodes (dots replaced by ``_``)."""

    def __init__(self, graph, timesteps: int):
        super().__init__()
        self.graph = graph
        self.dt = float(np.asarray(graph.metadata.get("dt", 1.0))) if isinstance(graph.metadata, dict) else 1.0
        self.order = topological_order(graph)
        self.into = {n: [a for a, b in graph.edges if b == n] for n in graph.nodes}
        self.input = next(n for n, v in graph.nodes.items() if type(v).__name__ == "Input")
        shape = tuple(int(d) for d in np.atleast_1d(graph.nodes[self.input].input_type["input"]))
        self.cfg = GraphConfig(int(timesteps), shape)
        with torch.no_grad():
            shapes = {n: tuple(v.shape[2:]) for n, v in run_nir(graph, torch.zeros(1, 1, *shape), record=True).items()}
        self.keys = {}
        for name, node in graph.nodes.items():
            kind = type(node).__name__
            if kind in ("Input", "Output"):
                continue
            if kind in ("Affine", "Linear") and np.asarray(node.weight).ndim == 2:
                mod = _LinearNode(node)
            elif kind == "Conv2d":
                mod = _Conv2dNode(node)
            elif kind == "LIF":
                mod = _lif_node(node, shapes[name], self.dt)
            else:
                mod = _Node(node)
            self.keys[name] = name.replace(".", "_")
            self.add_module(self.keys[name], mod)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B = int(x.shape[0]), int(x.shape[1])
        ctx = EvalContext(T, B, self.dt, x.device)
        values = {self.input: x.to(torch.float32).flatten(0, 1)}
        for name in self.order:
            if name == self.input:
                continue
            srcs = self.into[name]
            acc = values[srcs[0]]
            for src in srcs[1:]:  # sum in edge order, as the interpreter
                acc = acc + values[src]
            if name not in self.keys:  # an Output
                values[name] = acc
                continue
            mod = getattr(self, self.keys[name])
            values[name] = mod(acc.reshape(T, B, *acc.shape[1:]), ctx).flatten(0, 1) if isinstance(mod, LIF) else mod(acc, ctx)
        return values["logits"].reshape(T, B, -1).mean(0)


@dataclass(frozen=True)
class GraphReference:
    """The reference of a directory written by ``stdeploy import``: its ``model.nir`` (our dialect,
    checked against the foreign graph at import) run by :func:`stdeploy.export.nir_interpreter.run_nir`.
    Data whose samples hold as many values as the graph's Input are reshaped to it (digits' 8x8
    images for a ``(64,)`` Input); other data are refused naming both shapes."""

    export_dir: Path
    manifest: dict
    graph: object              # nir.NIRGraph
    model: GraphModel          # the same graph as a module (timing, the profiler's counts)
    name = "nir-graph"

    @property
    def cfg(self) -> GraphConfig:
        return self.model.cfg

    @property
    def timesteps(self) -> int:
        return int(self.manifest["timesteps"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.manifest["input"]["shape"][2:])

    @property
    def image_size(self) -> int | None:
        c, h, w = self.input_shape
        return h if h == w and h > 1 else None

    def fit_images(self, x_all: torch.Tensor, data_name: str = "the data") -> torch.Tensor:
        shape = tuple(x_all.shape[1:])
        if shape == self.input_shape:
            return x_all
        graph_shape = self.manifest["input"].get("graph_shape", list(self.input_shape))
        if x_all.dim() != 4 or int(np.prod(shape)) != int(np.prod(self.input_shape)):
            raise ConfigError(f"--data {data_name}: samples of shape {list(shape)} ({int(np.prod(shape))} values) do not fit the "
                              f"imported graph's Input {graph_shape} ({int(np.prod(self.input_shape))} values)")
        return x_all.reshape(len(x_all), *self.input_shape)

    def evaluate(self, x: torch.Tensor) -> Evaluation:
        values = run_nir(self.graph, x, record=True)
        spiking = [n for n, node in self.graph.nodes.items() if type(node).__name__ in ("LIF", "Threshold")]
        return Evaluation(values["logits"].flatten(2).mean(0), values.get("spikes"), None,
                          {n: float(values[n].mean()) for n in spiking})

    def target_spikes(self, spikes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A target's output spikes (onnxruntime, TVM: ``(T, B, 1, F)``; Lava: ``(T, B, F)``) in the
        interpreter's layout, that of ``like`` (a size mismatch is left for the comparison to refuse)."""
        return spikes.reshape(like.shape) if spikes.numel() == like.numel() else spikes


def load_reference(export_dir: str | Path) -> Reference | GraphReference:
    path, manifest = read_manifest(export_dir, "reference")
    if manifest["artifacts"]["reference"].get("kind") == "nir graph":  # written by `stdeploy import`
        graph = load_graph(path)
        return GraphReference(Path(export_dir), manifest, graph, GraphModel(graph, int(manifest["timesteps"])))
    model = fold_batchnorm(load_checkpoint(path).model).eval()
    return Reference(Path(export_dir), manifest, model)


def model_config(export_dir: str | Path) -> ModelConfig:
    """The model config of an export directory, from its manifest (the reference checkpoint's
    config where an older manifest lacks it)."""
    path, manifest = read_manifest(export_dir, "reference")
    if isinstance(manifest.get("model"), dict):
        return ModelConfig.from_dict(manifest["model"], source=str(Path(export_dir) / "manifest.json"))
    return load_checkpoint(path).config


# ----------------------------------------------------------------------------- target, device, compile
def resolve_target(name: str, device: str | Path | None = None) -> tuple[Target, DeviceProfile]:
    """The target ``name`` and its device profile (``device``, else the target's default); a
    target that cannot run here raises :class:`TargetError` saying why."""
    target = get_target(name)
    ok, why = target.available()
    if not ok:
        raise TargetError(f"target {name} cannot run here: {why}")
    return target, load_profile(device or target.default_device)


@dataclass
class Compiled:
    target: Target
    profile: DeviceProfile
    runnable: object
    seconds: float

    @property
    def can_run(self) -> bool:
        """False where the artifact was built for a device this machine lacks."""
        return bool(getattr(self.runnable, "can_run", True))


def compile_export(export_dir: str | Path, target: Target, profile: DeviceProfile, options: dict | None = None,
                   batches: tuple[int, ...] = ()) -> Compiled:
    """Compile ``export_dir`` for ``profile`` and build for each batch size in ``batches`` up front
    where the runtime builds per shape on the CPU (TVM), so that timed runs never compile.
    Native libraries' known warnings are said once (:func:`stdeploy.console.native_notes`)."""
    with native_notes(), Timer() as t:
        runnable = target.compile(Path(export_dir), profile, **(options or {}))
        if profile.kind == "cpu" and getattr(runnable, "can_run", True) and hasattr(runnable, "prepare"):
            for b in sorted(set(batches)):
                runnable.prepare(b)
    return Compiled(target, profile, runnable, t.seconds)


def _target_options(name: str, profile: DeviceProfile, batch: int, options: dict | None) -> dict:
    options = dict(options or {})
    if name == "tvm" and profile.kind == "cuda":  # one build at the run's batch (smaller batches are padded)
        options.setdefault("batch_size", batch)
    return options


# ----------------------------------------------------------------------------- run and compare
def eval_images(data, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, C, H, W)`` and labels of the test split of ``data`` (the first ``limit``)."""
    if data is None:
        raise ConfigError("running an export needs a data split")
    x_all, y_all = next(iter(torch.utils.data.DataLoader(data.test, batch_size=len(data.test))))
    if limit is not None:
        x_all, y_all = x_all[:limit], y_all[:limit]
    if len(x_all) == 0:
        raise ConfigError(f"no test images to run (data {data.name}, limit {limit})")
    return x_all, y_all


def run_export(export_dir: str | Path, target: str, device: str | Path | None = None, data=None, *, batch_size: int = 64,
               limit: int | None = None, progress: bool = False, options: dict | None = None,
               reference: Reference | None = None) -> dict:
    """Compile ``export_dir`` for ``device`` on ``target``, run the test split of ``data`` in batches
    and compare logits and output spikes with the folded reference under the target's tolerance
    (``within_tolerance``, ``tolerance_problems``)."""
    tgt, profile = resolve_target(target, device)
    reference = reference or load_reference(export_dir)
    x_all, y_all = eval_images(data, limit)
    x_all = reference.fit_images(x_all, data.name)
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch = min(batch_size, len(x_all))
    batches = {batch} | ({len(x_all) % batch} if len(x_all) % batch else set())
    compiled = compile_export(export_dir, tgt, profile, _target_options(target, profile, batch, options), tuple(batches))
    runnable = compiled.runnable
    x_all, contract_report = apply_input_contract(x_all, reference.manifest, runnable.info)
    base = {"target": target, "device": profile.name, "export_dir": str(export_dir), "reference": reference.name}
    if contract_report is not None:
        base["input_contract"] = contract_report
    if not compiled.can_run:  # e.g. a CUDA module built on a machine without a GPU
        return {**base, "ran": False, "reason": f"built for {profile.name}; running it needs that device",
                "compile_seconds": compiled.seconds, "info": runnable.info}
    tolerance = target_tolerance(tgt)
    logits_all, ref_logits_all, comparisons, run_s = [], [], [], 0.0
    rate_sums: dict[str, float] = {}
    starts = range(0, len(x_all), batch)
    if show_progress(progress):
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"{target} on {profile.name}", unit="batch")
    for i in starts:  # every batch size was built in compile_export: nothing compiles (or warns) here
        x = direct_encode(x_all[i:i + batch], reference.timesteps)
        res = runnable.run(x.numpy())
        run_s += res.seconds
        ev = reference.evaluate(x)
        ref_logits = ev.logits
        for name, rate in ev.firing_rates.items():  # weighted by the batch's samples
            rate_sums[name] = rate_sums.get(name, 0.0) + rate * x.shape[1]
        logits = torch.as_tensor(np.asarray(res.logits))
        if res.spikes is not None and ev.spikes is not None:
            comparisons.append(compare(target, ref_logits, ev.spikes, logits,
                                       reference.target_spikes(torch.as_tensor(np.asarray(res.spikes)), ev.spikes), ev.records))
        logits_all.append(logits)
        ref_logits_all.append(ref_logits)
    logits, ref_logits = torch.cat(logits_all), torch.cat(ref_logits_all)
    result = {
        **base, "ran": True, "samples": len(x_all),
        "accuracy": float((logits.argmax(-1) == y_all).float().mean()),
        "reference_accuracy": float((ref_logits.argmax(-1) == y_all).float().mean()),
        "prediction_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
        "logits_max_abs_error": float((logits - ref_logits).abs().max()),
        "reference_logits_max_abs": float(ref_logits.abs().max()),
        "compile_seconds": compiled.seconds, "run_seconds": run_s, "info": runnable.info,
        "tolerance": tolerance.to_dict(),
        # the reference's firing rate per spiking layer on these inputs: a comparison of silent layers means nothing
        "firing_rates": {name: total / len(x_all) for name, total in rate_sums.items()},
    }
    result["silent_layers"] = [name for name, r in result["firing_rates"].items() if r < SILENT_BELOW]
    quantised = runnable.info.get("mode") == "fixed"
    if comparisons:
        total = _merge(target, comparisons, result)
        result.update({"spikes_total": total.spikes_total, "spike_mismatches": total.spike_mismatches,
                       "spike_agreement": 1 - total.spike_mismatches / total.spikes_total, "flips": total.flips})
        # a target shows only its output spikes: flips cannot be traced to the layer that diverged first
        problems = total.problems(tolerance, quantised=quantised, localised=False)
    else:  # the runtime exposes logits only: judged by logits alone (no spikes to compare)
        problems = ([] if result["logits_max_abs_error"] <= tolerance.logits_atol else
                    [f"logits differ by up to {result['logits_max_abs_error']:.3g} (tolerance {tolerance.logits_atol:g}); "
                     "no output spikes to compare"])
    result["within_tolerance"] = not problems
    result["tolerance_problems"] = problems
    return result


def apply_input_contract(x_all: torch.Tensor, manifest: dict, info: dict | None = None) -> tuple[torch.Tensor, dict | None]:
    """The inputs an exact-mode export runs on: ``x_all`` clipped to the export's input contract's
    range and rounded to its grid (:func:`stdeploy.export.exact.manifest_input_contract`), then to
    the target's own where it declares a coarser one (``info["input_contract"]``: Lava fixed
    point), so that the reference and the target see the same values. Values outside the range
    are clipped, never refused; the report counts them (``values_clipped`` of ``values``).
    A float export: ``(x_all, None)``."""
    from .export.exact import manifest_input_contract
    from .models.quantize import InputContract

    contract = manifest_input_contract(manifest)
    if contract is None:
        return x_all, None
    clipped = int(((x_all < contract.lo) | (x_all > contract.hi)).sum())
    x = contract.apply(x_all)
    own = (info or {}).get("input_contract")
    target = None if own is None else InputContract.from_dict(own, "target input_contract")
    if target is not None and target != contract:
        x = target.apply(x)
    return x, {"contract": contract.to_dict(), "target_contract": None if target is None else target.to_dict(),
               "values": int(x_all.numel()), "values_clipped": clipped,
               "values_off_grid": int((x != x_all).sum()) - clipped}


def _merge(artifact: str, parts: list[Comparison], result: dict) -> Comparison:
    """One comparison of a whole run from its batches' comparisons."""
    distances = [c.max_flip_distance for c in parts if c.max_flip_distance is not None]
    return Comparison(artifact=artifact, spikes_total=sum(c.spikes_total for c in parts),
                      spike_mismatches=sum(c.spike_mismatches for c in parts),
                      logits_max_abs_error=result["logits_max_abs_error"], predictions_agree=result["prediction_agreement"],
                      flips=[f for c in parts for f in c.flips], max_flip_distance=max(distances) if distances else None,
                      reference_logits_max_abs=result["reference_logits_max_abs"], samples=result["samples"])


def list_targets() -> list[dict]:
    """Every registered target: whether it can run here, why, and its default device."""
    rows = []
    for name in target_names():
        try:
            t = get_target(name)
            ok, why = t.available()
            device = t.default_device
        except ImportError as err:
            ok, why, device = False, str(err), None
        rows.append({"target": name, "available": ok, "detail": why, "default_device": device})
    return rows


# ----------------------------------------------------------------------------- time
def latency(export_dir: str | Path, target: str, x: torch.Tensor, *, device: str | Path | None = None, warmup: int = 3,
            repeats: int = 20, options: dict | None = None, gpu_energy: bool = False) -> dict:
    """Latency of one batch ``x`` (T, B, C, H, W) on ``target``: :func:`stdeploy.profile.latency.measure`'s
    figures, or ``{"skipped": why}`` where the target cannot run here or the artifact needs another device."""
    tgt = get_target(target)
    ok, why = tgt.available()
    if not ok:
        return {"skipped": why}
    profile = load_profile(device or tgt.default_device)
    batch = int(x.shape[1])
    compiled = compile_export(export_dir, tgt, profile, _target_options(target, profile, batch, options), (batch,))
    if not compiled.can_run:
        return {"skipped": "built, but this machine cannot run it", "info": compiled.runnable.info}
    runnable, xb = compiled.runnable, x.numpy()
    with native_notes():
        row = measure(lambda b: runnable.run(b), xb, warmup, repeats)
    row["compile_seconds"] = compiled.seconds
    if runnable.info.get("path"):
        row["path"] = runnable.info["path"]
    if gpu_energy and _runs_on_gpu(runnable.info):
        from .profile.gpu_power import measure_energy

        row["measured_energy"] = measure_energy(lambda b: runnable.run(b), xb, repeats)
    return row


def _runs_on_gpu(info: dict) -> bool:
    return "CUDAExecutionProvider" in info.get("providers", []) or str(info.get("path", "")).startswith("cuda")


def pytorch_latency(reference: Reference, x: torch.Tensor, *, warmup: int = 3, repeats: int = 20, device: str = "cpu",
                    layers: bool = True, gpu_energy: bool = False) -> dict:
    """Latency of the folded reference on ``x``: on the CPU with per-module times (``layers``), or on
    CUDA timed with a device synchronisation (no per-module split)."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--pytorch-device cuda: no CUDA GPU here")
        import copy

        ref_gpu, x_gpu = copy.deepcopy(reference.model).to("cuda"), x.to("cuda")

        def run_ref(b):  # returns when the GPU is done (timing and energy both need that)
            with torch.no_grad():
                out = ref_gpu(b)
            torch.cuda.synchronize()
            return out

        row = {**measure(run_ref, x_gpu, warmup, repeats), "path": f"cuda ({torch.cuda.get_device_name()})"}
        if gpu_energy:
            from .profile.gpu_power import measure_energy

            row["measured_energy"] = measure_energy(run_ref, x_gpu, repeats)
        return row
    if device != "cpu":
        raise ConfigError(f"pytorch device must be cpu or cuda, got {device!r}")
    with torch.no_grad():
        row = measure(lambda b: reference.model(b), x, warmup, repeats)
    if layers:
        row["layers"] = module_times(reference.model, x)
    return row


def bench_export(export_dir: str | Path, targets: list[str], images: torch.Tensor, *, device: str | Path | None = None,
                 warmup: int = 3, repeats: int = 20, options: dict | None = None, pytorch_device: str = "cpu",
                 gpu_energy: bool = False) -> dict:
    """Latency of the reference and of ``export_dir`` on each of ``targets`` for one batch of
    ``images`` (B, C, H, W): ``{"pytorch": ..., target: ...}``. ``options`` go to the TVM target."""
    if gpu_energy:
        from .profile.gpu_power import nvml_available

        ok, why = nvml_available()
        if not ok:
            raise ConfigError(f"--gpu-energy: cannot measure GPU power here ({why})")
    reference = load_reference(export_dir)
    x = direct_encode(reference.fit_images(images), reference.timesteps)
    results = {reference.name: pytorch_latency(reference, x, warmup=warmup, repeats=repeats, device=pytorch_device,
                                          gpu_energy=gpu_energy)}
    for name in targets:
        results[name] = latency(export_dir, name, x, device=device, warmup=warmup, repeats=repeats,
                                options=options if name == "tvm" else None, gpu_energy=gpu_energy)
    return results


# ----------------------------------------------------------------------------- profile
def profile_exports(exports: list[str | Path], data, targets: list[str], energy_profiles: list[str], *, batch: int = 32,
                    warmup: int = 2, repeats: int = 10, samples: int | None = None, direct_input: str = "once") -> dict:
    """The profile report (:mod:`stdeploy.profile.report`) of ``exports``: counts and energy on the
    test split of ``data`` (the first ``samples``), latency of one batch per target. ``direct_input``:
    a real input repeated over T is charged ``"once"`` per sample (default) or ``"per_step"``."""
    images, y_all = eval_images(data, samples)
    profiles = {name: load_profile(name) for name in energy_profiles}
    variants = []
    for export in exports:
        reference = load_reference(export)
        x_all = reference.fit_images(images, data.name)
        xb = direct_encode(x_all[:batch], reference.timesteps)
        lat = {reference.name: pytorch_latency(reference, xb, warmup=warmup, repeats=repeats, layers=False)}
        for name in targets:
            row = latency(export, name, xb, warmup=warmup, repeats=repeats)
            if "skipped" in row and "info" in row:  # built for a device this machine lacks: no row
                continue
            if "skipped" in row:
                row = {"median_s": None, "p90_s": None, "samples_per_s": None, "skipped": row["skipped"]}
            lat[name] = row
        variants.append(variant_row(export, reference.manifest, reference.model, x_all, y_all, profiles, lat,
                                    direct_input=direct_input))
    return assemble_report(variants, profiles, direct_input=direct_input)
