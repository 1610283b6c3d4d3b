"""NIR in: a graph written by another framework's exporter -> an export directory that
``stdeploy run``, ``bench`` and ``profile`` take on onnxruntime, TVM and Lava.

``import_nir(path, out, dt=None, timesteps=4)`` reads ``path``, checks every node before
converting, and writes ``out/`` with:

* ``model.nir``: the graph converted into our dialect (:func:`to_dialect`, every rewrite exact),
  with ``dt``, ``timesteps``, the source and the conversions in its metadata. It is the reference
  (no PyTorch checkpoint exists for a foreign graph): the run path evaluates it with our NIR
  interpreter (:func:`stdeploy.export.nir_interpreter.run_nir`), and Lava's lowering reads it;
* ``model.onnx``: the graph unrolled over ``timesteps`` steps (input ``input`` ``(T, B, C, H, W)``:
  the graph's Input shape padded with trailing 1s to three dims, as every target takes; outputs
  ``logits`` ``(B, F)``, the Output node's values averaged over the steps, and, when LIFs feed the
  Output, ``spikes`` ``(T, B, 1, F)``);
* ``manifest.json``: artifacts with sizes and sha256, ``dt``, the input shape, the validation.

Semantics (NIR's, discretised by forward Euler with step ``dt``): a ``LIF`` steps
``v = (1-d)*v + d*(r*I + v_leak)`` with ``d = dt/tau``, spikes where ``v > v_threshold`` and
resets to ``v_reset``; edges into a node are summed. ``dt`` comes from ``graph.metadata["dt"]`` or
the ``dt`` argument, and is refused when neither gives it (snnTorch 1.0 and Norse 1.1 write none;
snnTorch's importer assumes 1e-4, Norse's 1e-3). What cannot run exactly is refused by name,
all at once: node types without a conversion (``CubaLIF``, ``IF``, ``LI``, ``Delay``,
``AvgPool2d``, ...), recurrent edges, an Input of more than three dims, and a LIF whose ``dt/tau``
is not in ``(0, 1]`` (the step would overshoot: Norse 1.1's exporter writes ``tau =
dt/tau_mem_inv`` for its own ``dt``, so its graphs need ``dt = (Norse's dt)**2``, which this
message says; Norse 1.1's ``from_nir`` reads no ``dt`` from a graph either, so its own reader needs
the flag too). Not detectable, so not refused: snnTorch writes its default subtract-reset
``Leaky`` as a reset-to-zero LIF without a mark; the graph runs with NIR's reset-to-``v_reset``.

Our dialect (what :func:`to_dialect` rewrites, each exact in float32):

* the Input shape is padded to ``(C, H, W)`` with trailing 1s and a ``Flatten`` restores the
  graph's own shape (targets take five-dimensional inputs);
* a LIF's input gain ``r`` is folded into the incoming ``Affine``/``Linear`` rows and bias when
  every ``r`` is a power of two (scaling by ``2**k`` commutes with float rounding) and each source
  feeds that LIF only; otherwise ``r`` stays, the interpreter, onnxruntime and TVM run it, and
  Lava's lowering refuses the LIF by name (as it refuses ``v_leak != 0`` and ``v_reset != 0``);
* the Output node becomes ``logits`` (per-step values; the model's logits are their mean over
  T), plus ``spikes`` with the same sources when LIFs feed it (the names Lava's runner reads).

The ONNX graph is validated against the graph as read (:class:`GraphModule` in PyTorch) on seeded
inputs in ``[0, 1)``, and so is ``model.nir`` run by the interpreter: spikes must agree exactly and
values within 1e-4, or nothing is written.
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
from ..export.nir_interpreter import run_nir, topological_order
from ..files import sha256_file
from .nirtorch_map import NirLIF, node_map

__all__ = ["import_nir", "to_dialect", "GraphModule", "read_foreign", "check_graph", "padded_shape", "FORMAT", "SUPPORTED"]

FORMAT = "stdeploy-import/1"
SUPPORTED = ("Input", "Output", "Affine", "Linear", "Conv1d", "Conv2d", "Flatten", "SumPool2d", "Threshold", "LIF")
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
    elif len(_shape(graph.nodes[inputs[0]].input_type)) > 3:
        problems.append(f"{inputs[0]} (Input): shape {list(_shape(graph.nodes[inputs[0]].input_type))} has more than three "
                        "dims (C, H, W): targets take (T, B, C, H, W)")
    if len(outputs) != 1:
        problems.append(f"the graph has {len(outputs)} Output nodes ({', '.join(outputs) or 'none'}); one is needed")
    return problems


def padded_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Input shape as targets take it: ``(C, H, W)``, trailing 1s added (``(64,) -> (64, 1, 1)``)."""
    return tuple(shape) + (1,) * (3 - len(shape))


def _power_of_two(a) -> bool:
    a = np.asarray(a, np.float64)
    return bool(np.all((a > 0) & (np.frexp(a)[0] == 0.5)))


def to_dialect(graph: nir.NIRGraph, dt: float, timesteps: int, source: str = "") -> tuple[nir.NIRGraph, list[str]]:
    """The graph in our dialect (see the module docstring) and the list of what was converted or
    kept; every rewrite is exact. New node objects replace changed ones: ``graph`` is not modified."""
    nodes, edges, notes = dict(graph.nodes), list(graph.edges), []

    def rename(old: str, new: str) -> None:
        nonlocal edges
        nodes[new] = nodes.pop(old)
        edges = [(new if a == old else a, new if b == old else b) for a, b in edges]

    def unique(name: str) -> str:
        while name in nodes:
            name += "_"
        return name

    in_name = next(n for n, v in nodes.items() if isinstance(v, nir.Input))
    shape = _shape(nodes[in_name].input_type)
    pad = padded_shape(shape)
    if pad != shape:
        flat = unique(f"{in_name}_flatten")
        nodes[in_name] = nir.Input(input_type={"input": np.array(pad)})
        nodes[flat] = nir.Flatten(input_type={"input": np.array(pad)}, start_dim=len(shape) - 1, end_dim=2)
        edges = [(flat if a == in_name else a, b) for a, b in edges] + [(in_name, flat)]
        notes.append(f"{in_name} (Input): {list(shape)} padded to {list(pad)}, {flat} (Flatten) restores it")
    for name, node in graph.nodes.items():
        if not isinstance(node, nir.LIF) or np.all(np.asarray(node.r) == 1):
            continue
        r = np.asarray(node.r, np.float64)
        srcs = [a for a, b in edges if b == name]
        why = None
        if not _power_of_two(r):
            why = "r is not a power of two: folding it into the weights would round"
        elif r.ndim > 1 or not srcs or not all(isinstance(nodes[a], (nir.Affine, nir.Linear)) and np.asarray(nodes[a].weight).ndim == 2
                                               and [b for c, b in edges if c == a] == [name] for a in srcs):
            why = "its inputs are not 2-D Affine/Linear nodes that feed it alone"
        if why:
            notes.append(f"{name} (LIF): r kept ({why}); Lava's lowering refuses it")
            continue
        for a in srcs:
            src = nodes[a]
            w = np.asarray(src.weight)
            gain = np.broadcast_to(r, (w.shape[0],)).astype(w.dtype)
            if isinstance(src, nir.Affine):
                nodes[a] = nir.Affine(weight=w * gain[:, None], bias=np.asarray(src.bias) * gain.astype(np.asarray(src.bias).dtype))
            else:
                nodes[a] = nir.Linear(weight=w * gain[:, None])
        nodes[name] = nir.LIF(tau=node.tau, r=np.ones_like(np.asarray(node.r)), v_leak=node.v_leak, v_threshold=node.v_threshold,
                              v_reset=node.v_reset)
        notes.append(f"{name} (LIF): r = {np.unique(r).tolist()} folded into the rows of {', '.join(srcs)} (exact: powers of two)")
    out_name = next(n for n, v in nodes.items() if isinstance(v, nir.Output))
    feeders = [a for a, b in edges if b == out_name]
    spiking = bool(feeders) and all(isinstance(nodes[a], nir.LIF) for a in feeders)
    for want in ("logits", "spikes"):
        if want in nodes and want != out_name:
            rename(want, unique(f"{want}_node"))
    if out_name != "logits":
        rename(out_name, "logits")
        notes.append(f"{out_name} (Output) renamed logits")
    if spiking:
        nodes["spikes"] = nir.Output(output_type=nodes["logits"].output_type)
        edges += [(a, "spikes") for a in feeders]
        notes.append("spikes (Output) added: the spikes of the Output's LIF sources")
    meta = {**(graph.metadata if isinstance(graph.metadata, dict) else {}), "dt": dt, "timesteps": timesteps,
            "imported_from": source, "conversions": "; ".join(notes) or "none"}
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=meta, type_check=False), notes


class GraphModule(nn.Module):
    """A feed-forward NIR graph unrolled over ``timesteps``: ``(T, B, *input) -> (logits (B, F),
    values (T, B, F))``, node modules from :func:`stdeploy.interop.nirtorch_map.node_map`."""

    def __init__(self, graph: nir.NIRGraph, dt: float, timesteps: int):
        super().__init__()
        table = node_map(dt=dt)
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
    class _Onnx(nn.Module):  # input (T, B, C, H, W): the Input shape padded (see padded_shape)
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            logits, y = self.m(x.reshape(*x.shape[:2], *self.m.in_shape))
            return (logits, y.unsqueeze(2)) if self.m.spiking else (logits,)

    names = ["logits", "spikes"] if module.spiking else ["logits"]
    x = torch.zeros(module.timesteps, 2, *padded_shape(module.in_shape))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo=False is deprecated but exact and quiet about the unrolled loop
        torch.onnx.export(_Onnx(module).eval(), (x,), buf, input_names=["input"], output_names=names, dynamo=False,
                          dynamic_axes={"input": {1: "batch"}, "logits": {0: "batch"}, **({"spikes": {1: "batch"}} if module.spiking else {})})
    path.write_bytes(buf.getvalue())
    return names


def _validate(module: GraphModule, path: Path, dialect: nir.NIRGraph, seed: int = 0) -> dict:
    """``model.onnx`` (at ``path``) and the converted graph run by the interpreter, each against
    the graph as read, on seeded noise: ``{"onnx": ..., "nir": ...}``; raises when either disagrees."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(module.timesteps, VALIDATION_BATCH, *padded_shape(module.in_shape), generator=g)
    with torch.no_grad():
        ref_logits, ref_values = module(x.reshape(*x.shape[:2], *module.in_shape))
        nir_out = run_nir(dialect, x)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x.numpy()})))
    runs = {"onnx": (out["logits"], out.get("spikes")),
            "nir": (nir_out["logits"].flatten(2).mean(0).numpy(), nir_out["spikes"].numpy() if "spikes" in nir_out else None)}
    results = {}
    for name, (logits, spikes) in runs.items():
        result = {"input": f"uniform noise in [0, 1), seed {seed}, {VALIDATION_BATCH} samples, T = {module.timesteps}",
                  "reference": "the NIR graph as read (stdeploy.interop.importer.GraphModule)",
                  "logits_max_abs_error": float(np.abs(logits - ref_logits.numpy()).max())}
        if module.spiking:
            spikes = spikes.reshape(ref_values.shape)
            result.update(spikes_total=int(spikes.size), spike_mismatches=int((spikes != ref_values.numpy()).sum()),
                          reference_spikes=int(ref_values.sum()))
        if result["logits_max_abs_error"] > ATOL or result.get("spike_mismatches", 0):
            what = "the ONNX graph generated from" if name == "onnx" else "the converted model.nir (our interpreter) and"
            raise OutputMismatch(f"{what} the NIR graph disagree (nothing written): {result}")
        results[name] = result
    return results


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
        dialect, conversions = to_dialect(graph, dt, timesteps, path.name)
        nir.write(tmp / "model.nir", dialect)
        outputs = _export_onnx(module, tmp / "model.onnx")
        validation = _validate(module, tmp / "model.onnx", nir.read(tmp / "model.nir"))
        nir_file = {"file": "model.nir", "bytes": (tmp / "model.nir").stat().st_size, "sha256": sha256_file(tmp / "model.nir")}
        manifest = {
            "format": FORMAT, "source": str(path), "dt": dt, "timesteps": timesteps,
            "input": {"name": "input", "shape": [timesteps, "batch", *padded_shape(module.in_shape)],
                      "graph_shape": list(module.in_shape)},
            "outputs": {"logits": ["batch", "F: the Output node's values averaged over the steps"],
                        **({"spikes": [timesteps, "batch", 1, "F"]} if module.spiking else {})},
            "conversions": conversions,
            "artifacts": {
                "nir": nir_file,
                "onnx": {"file": "model.onnx", "bytes": (tmp / "model.onnx").stat().st_size, "sha256": sha256_file(tmp / "model.onnx"),
                         "outputs": outputs},
                "reference": {**nir_file, "kind": "nir graph",
                              "note": "no PyTorch checkpoint: the graph, run by stdeploy's NIR interpreter, is the reference"},
            },
            "validation": {"results": validation},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
