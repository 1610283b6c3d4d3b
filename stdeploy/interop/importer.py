"""NIR in: a graph written by another framework's exporter -> an export directory onnxruntime runs.

``import_nir(path, out, dt=None, timesteps=4)`` reads ``path``, checks every node before
converting, and writes ``out/`` with:

* ``model.nir``: the graph as read, with ``dt``, ``timesteps`` and the source in its metadata; it
  is also the reference (no PyTorch checkpoint exists for a foreign graph);
* ``model.onnx``: the graph unrolled over ``timesteps`` steps (input ``input`` ``(T, B, *input
  shape)``; outputs ``logits`` ``(B, F)``, the Output node's values averaged over the steps, and,
  when a LIF feeds the Output, ``spikes`` ``(T, B, 1, F)``);
* ``manifest.json``: artifacts with sizes and sha256, ``dt``, the validation.

Semantics (NIR's, discretised by forward Euler with step ``dt``): a ``LIF`` steps
``v = (1-d)*v + d*(r*I + v_leak)`` with ``d = dt/tau``, spikes where ``v > v_threshold`` and
resets to ``v_reset``; edges into a node are summed. ``dt`` comes from ``graph.metadata["dt"]`` or
the ``dt`` argument, and is refused when neither gives it (snnTorch 1.0 and Norse 1.1 write none;
snnTorch's importer assumes 1e-4, Norse's 1e-3). What cannot run exactly is refused by name,
all at once: node types without a conversion (``CubaLIF``, ``IF``, ``LI``, ``Delay``, ...),
recurrent edges, and a LIF whose ``dt/tau`` is not in ``(0, 1]`` (the step would overshoot: Norse
1.1's exporter writes ``tau = dt/tau_mem_inv`` for its own ``dt``, so its graphs need
``dt = (Norse's dt)**2``, which this message says). Not detectable, so not refused: snnTorch writes
its default subtract-reset ``Leaky`` as a reset-to-zero LIF without a mark; the graph runs with
NIR's reset-to-``v_reset``.

The ONNX graph is validated against the graph itself (:class:`GraphModule` in PyTorch) on seeded
inputs in ``[0, 1)``: spikes must agree exactly and values within 1e-4, or nothing is written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import nir
import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, OutputMismatch, ShapeError, StdeployError, UnsupportedPrimitive
from ..export.nir_interpreter import topological_order
from ..files import sha256_file
from .nirtorch_map import NirLIF, node_map

__all__ = ["import_nir", "run_imported", "GraphModule", "read_foreign", "check_graph", "FORMAT", "SUPPORTED"]

FORMAT = "stdeploy-import/1"
SUPPORTED = ("Input", "Output", "Affine", "Linear", "Conv1d", "Conv2d", "Flatten", "SumPool2d", "AvgPool2d", "Threshold", "LIF")
VALIDATION_BATCH = 16
ATOL = 1e-4


def read_foreign(path: str | os.PathLike) -> nir.NIRGraph:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such NIR file")
    try:
        return nir.read(path)
    except Exception as err:  # h5py and nir raise many kinds on a bad file; all mean "not a NIR graph we can read"
        raise ConfigError(f"{path}: not a readable NIR file ({type(err).__name__}: {err})") from err


def graph_time_step(graph: nir.NIRGraph, dt: float | None) -> float:
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    if dt is None:
        if "dt" not in meta:
            raise ConfigError("the graph has no 'dt' in its metadata (snnTorch 1.0 and Norse 1.1 write none): "
                              "give the time step with --dt SECONDS (snnTorch's importer assumes 1e-4, Norse's 1e-3)")
        dt = float(np.asarray(meta["dt"]))
    elif "dt" in meta and not np.isclose(float(np.asarray(meta["dt"])), dt, rtol=1e-12, atol=0):
        raise ConfigError(f"--dt {dt} contradicts the graph's metadata dt = {float(np.asarray(meta['dt']))}")
    if not (np.isfinite(dt) and dt > 0):
        raise ConfigError(f"--dt must be a positive number of seconds, got {dt}")
    return float(dt)


def _shape(t) -> tuple[int, ...]:
    return tuple(int(s) for s in np.atleast_1d(np.asarray(next(iter(t.values())))))


def check_graph(graph: nir.NIRGraph, dt: float) -> list[str]:
    """Every reason the graph cannot be imported exactly, by node name (empty when it can)."""
    problems = []
    for name, node in graph.nodes.items():
        kind = type(node).__name__
        if kind not in SUPPORTED:
            problems.append(f"{name} ({kind}): no exact conversion (supported: {', '.join(SUPPORTED)})")
        elif isinstance(node, nir.LIF):
            d = dt / np.asarray(node.tau, np.float64)
            if not np.all((d > 0) & (d <= 1)):
                worst = float(np.max(d))
                problems.append(f"{name} (LIF): dt/tau = {worst:.6g} is outside (0, 1] with dt = {dt:g}: forward Euler would "
                                f"overshoot (Norse 1.1 writes tau = its dt/tau_mem_inv: import its graphs with dt = (its dt)**2)")
    if any(src == dst for src, dst in graph.edges):
        problems.append("a node feeds itself (recurrence): only feed-forward graphs are imported")
    else:
        try:
            topological_order(graph)
        except StdeployError as err:
            problems.append(str(err))
    inputs = [n for n, v in graph.nodes.items() if isinstance(v, nir.Input)]
    outputs = [n for n, v in graph.nodes.items() if isinstance(v, nir.Output)]
    if len(inputs) != 1:
        problems.append(f"the graph has {len(inputs)} Input nodes ({', '.join(inputs) or 'none'}); one is needed")
    if len(outputs) != 1:
        problems.append(f"the graph has {len(outputs)} Output nodes ({', '.join(outputs) or 'none'}); one is needed")
    return problems


class _AvgPool(nn.Module):
    def __init__(self, node: nir.AvgPool2d):
        super().__init__()
        as2 = lambda v: tuple(int(i) for i in np.broadcast_to(np.atleast_1d(np.asarray(v)), (2,)))  # noqa: E731
        self.pool = nn.AvgPool2d(as2(node.kernel_size), as2(node.stride), as2(node.padding))

    def forward(self, x):
        return self.pool(x)


class GraphModule(nn.Module):
    """A feed-forward NIR graph unrolled over ``timesteps``: ``(T, B, *input) -> (logits (B, F),
    values (T, B, F))``, node modules from :func:`stdeploy.interop.nirtorch_map.node_map`."""

    def __init__(self, graph: nir.NIRGraph, dt: float, timesteps: int):
        super().__init__()
        table = {**node_map(dt=dt), nir.AvgPool2d: _AvgPool}
        self.order = [n for n in topological_order(graph) if not isinstance(graph.nodes[n], nir.Input)]
        self.input = next(n for n, v in graph.nodes.items() if isinstance(v, nir.Input))
        self.output = next(n for n, v in graph.nodes.items() if isinstance(v, nir.Output))
        self.into = {n: [s for s, d in graph.edges if d == n] for n in graph.nodes}
        self.keys = {n: f"n{i}" for i, n in enumerate(graph.nodes)}  # module names free of dots
        self.mods = nn.ModuleDict({self.keys[n]: table[type(v)](v) for n, v in graph.nodes.items()
                                   if not isinstance(v, (nir.Input, nir.Output))})
        self.timesteps = int(timesteps)
        feeders = self.into[self.output]
        self.spiking = bool(feeders) and all(isinstance(self.mods[self.keys[f]], NirLIF) for f in feeders)
        self.in_shape = _shape(graph.nodes[self.input].input_type)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states: dict[str, torch.Tensor | None] = {n: None for n in self.order}
        outs = []
        for t in range(self.timesteps):
            values = {self.input: x[t]}
            for n in self.order:
                srcs = self.into[n]
                acc = values[srcs[0]]
                for s in srcs[1:]:
                    acc = acc + values[s]
                if n == self.output:
                    values[n] = acc
                    continue
                mod = self.mods[self.keys[n]]
                if isinstance(mod, NirLIF):
                    values[n], states[n] = mod(acc, states[n])
                else:
                    values[n] = mod(acc)
            outs.append(values[self.output].flatten(1))
        y = torch.stack(outs)  # (T, B, F)
        return y.mean(0), y


def _export_onnx(module: GraphModule, path: Path) -> list[str]:
    class _Onnx(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            logits, y = self.m(x)
            return (logits, y.unsqueeze(2)) if self.m.spiking else (logits,)

    names = ["logits", "spikes"] if module.spiking else ["logits"]
    x = torch.zeros(module.timesteps, 2, *module.in_shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo=False is deprecated but exact and quiet about the unrolled loop
        torch.onnx.export(_Onnx(module).eval(), (x,), buf, input_names=["input"], output_names=names, dynamo=False,
                          dynamic_axes={"input": {1: "batch"}, "logits": {0: "batch"}, **({"spikes": {1: "batch"}} if module.spiking else {})})
    path.write_bytes(buf.getvalue())
    return names


def _validate(module: GraphModule, path: Path, seed: int = 0) -> dict:
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(module.timesteps, VALIDATION_BATCH, *module.in_shape, generator=g)
    with torch.no_grad():
        ref_logits, ref_values = module(x)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x.numpy()})))
    result = {"input": f"uniform noise in [0, 1), seed {seed}, {VALIDATION_BATCH} samples, T = {module.timesteps}",
              "reference": "the NIR graph itself (stdeploy.interop.importer.GraphModule)",
              "logits_max_abs_error": float(np.abs(out["logits"] - ref_logits.numpy()).max())}
    if module.spiking:
        spikes = out["spikes"][:, :, 0]
        result.update(spikes_total=int(spikes.size), spike_mismatches=int((spikes != ref_values.numpy()).sum()),
                      reference_spikes=int(ref_values.sum()))
    bad = result["logits_max_abs_error"] > ATOL or result.get("spike_mismatches", 0)
    if bad:
        raise OutputMismatch(f"the ONNX graph generated from the NIR graph disagrees with it (nothing written): {result}")
    return result


def import_nir(path: str | os.PathLike, out: str | os.PathLike, *, dt: float | None = None, timesteps: int = 4) -> dict:
    """Import the NIR file ``path`` into the new export directory ``out`` (see the module
    docstring); returns the manifest. ``out`` must not exist yet; on any error nothing is left."""
    path, out = Path(path), Path(out)
    if not (isinstance(timesteps, int) and timesteps >= 1):
        raise ConfigError(f"--timesteps must be a positive integer, got {timesteps!r}")
    if out.exists():
        raise ConfigError(f"--out {out} already exists: give a new directory")
    graph = read_foreign(path)
    dt = graph_time_step(graph, dt)
    problems = check_graph(graph, dt)
    if problems:
        raise UnsupportedPrimitive(f"{path}: cannot import {len(problems)} part(s) exactly: " + "; ".join(problems))
    module = GraphModule(graph, dt, timesteps).eval()
    try:
        with torch.no_grad():
            module(torch.zeros(timesteps, 1, *module.in_shape))
    except RuntimeError as err:
        raise ShapeError(f"{path}: the graph does not run on its Input shape {list(module.in_shape)}: {err}") from err
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta = {**(graph.metadata if isinstance(graph.metadata, dict) else {}), "dt": dt, "timesteps": timesteps,
                "imported_from": path.name}
        nir.write(tmp / "model.nir", nir.NIRGraph(nodes=graph.nodes, edges=graph.edges, metadata=meta, type_check=False))
        outputs = _export_onnx(module, tmp / "model.onnx")
        validation = _validate(module, tmp / "model.onnx")
        manifest = {
            "format": FORMAT, "source": str(path), "dt": dt, "timesteps": timesteps,
            "input": {"name": "input", "shape": [timesteps, "batch", *module.in_shape]},
            "outputs": {"logits": ["batch", "F: the Output node's values averaged over the steps"],
                        **({"spikes": [timesteps, "batch", 1, "F"]} if module.spiking else {})},
            "artifacts": {
                "nir": {"file": "model.nir", "bytes": (tmp / "model.nir").stat().st_size, "sha256": sha256_file(tmp / "model.nir")},
                "onnx": {"file": "model.onnx", "bytes": (tmp / "model.onnx").stat().st_size, "sha256": sha256_file(tmp / "model.onnx"),
                         "outputs": outputs},
                "reference": {"file": "model.nir", "kind": "nir graph", "note": "no PyTorch checkpoint: the graph is the reference"},
            },
            "validation": {"results": {"onnx": validation}},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def run_imported(export_dir: str | os.PathLike, target: str = "onnxruntime", device: str | None = None, data=None, *,
                 batch_size: int = 64, limit: int | None = None) -> dict:
    """Run an imported directory's ``model.onnx`` on ``target`` over the test split of ``data``
    (images flattened when the graph takes vectors of as many values) and compare with the graph
    itself (:class:`GraphModule` from ``model.nir``): spike mismatches and logits error. The
    runner's hook for imported directories (``stdeploy run`` wants a PyTorch checkpoint)."""
    from ..models import direct_encode
    from ..targets.base import get_target
    from ..targets.profiles import load_profile

    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{export_dir}: not a directory written by `stdeploy import`")
    if data is None:
        raise ConfigError("run_imported needs a data split")
    graph = read_foreign(export_dir / "model.nir")
    ref = GraphModule(graph, float(manifest["dt"]), int(manifest["timesteps"])).eval()
    x_all, y_all = next(iter(torch.utils.data.DataLoader(data.test, batch_size=len(data.test))))
    x_all, y_all = x_all[:limit], y_all[:limit]
    if tuple(x_all.shape[1:]) != ref.in_shape:
        if int(np.prod(x_all.shape[1:])) != int(np.prod(ref.in_shape)):
            raise ShapeError(f"data {data.name} has inputs {tuple(x_all.shape[1:])}, the imported graph takes {ref.in_shape}")
        x_all = x_all.reshape(len(x_all), *ref.in_shape)
    runnable = get_target(target).compile(export_dir, load_profile(device or "cpu"))
    logits, ref_logits, mismatches, total, seconds = [], [], 0, 0, 0.0
    for i in range(0, len(x_all), batch_size):
        x = direct_encode(x_all[i:i + batch_size], ref.timesteps) if x_all.dim() == 4 else \
            x_all[i:i + batch_size].unsqueeze(0).expand(ref.timesteps, *x_all[i:i + batch_size].shape).contiguous()
        res = runnable.run(x.numpy())
        seconds += res.seconds
        with torch.no_grad():
            rl, rv = ref(x)
        logits.append(torch.as_tensor(np.asarray(res.logits)))
        ref_logits.append(rl)
        if res.spikes is not None and ref.spiking:
            spikes = torch.as_tensor(np.asarray(res.spikes))[:, :, 0]
            mismatches += int((spikes != rv).sum())
            total += rv.numel()
    logits, ref_logits = torch.cat(logits), torch.cat(ref_logits)
    return {"target": target, "samples": len(x_all), "spike_mismatches": mismatches, "spikes_total": total,
            "logits_max_abs_error": float((logits - ref_logits).abs().max()),
            "accuracy": float((logits.argmax(-1) == y_all).float().mean()), "run_seconds": seconds}
