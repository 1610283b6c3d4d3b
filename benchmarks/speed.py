"""Speed of dense, L1P-pruned and DSP low-rank models on every CPU path, in one run.

    .venv/bin/python benchmarks/speed.py [--tune-trials 8] [--batch 32] [--large] [--quantize exact] [--out runs/bench-speed]

Table 1: the default model (sdt-tiny, trained briefly on digits), dense, L1P at 90/95/98% and
DSP at 30/10% of block parameters (one-shot: masks / truncated SVD, no fine-tune: speed does not
depend on accuracy; each pruned copy's BatchNorm statistics are re-estimated on 512 training
images, since one-shot pruning leaves the attention LIFs near silent). Table 2 (``--large``): an sdt-8-512-class model on 32x32 inputs with
random weights, where block matmuls dominate; its BatchNorm statistics are estimated layer by
layer over ``--bn-batches`` batches of ``--bn-batch-size`` random images (cumulative average,
normalised std ``--bn-gain``), for the dense model and again for each pruned variant, so that its
spiking layers fire as a trained model's do (a random model with fresh statistics is silent: its
kernels would be timed on zeros). ``--scope`` picks how pruned variants spend their budget: one
magnitude (L1P) or rank (DSP) budget over all block layers (``global``, the default) or each layer
alike (``layer``). Global L1P-90 on the random-weight sdt-8-512 removes every weight of all 8
``mlp.fc2`` layers (the pruner warns), so its table uses ``--scope layer``.

Each table is followed by the seconds every stage took per variant (pruning, BatchNorm
estimation, export with its validation on ``--export-samples`` samples, each path's build and its
check + timing), so that a run can be sized before it is started.

Activity is part of every row: each variant's firing rates (min-max over its LIFs) and the input
density of its spike-fed layers are measured on the benchmark batch and printed next to the
times, and per layer in a second table (input density of every Linear/Conv2d, firing rate of every
LIF, per variant). A third table lists, for the default path ("tvm tuned"; "tvm untuned-TIR" with
``--tune-trials 0``, as every "tvm tuned ..." column, legend and heading), each spike-adaptive
kernel's density threshold, whether it was measured by this build or read from the crossover
cache (``--crossover-cache``, default ``OUT/cache``), and how many calls took the gather
kernel and how many BLAS in the timed runs, and a variant whose spiking layers are silent (rate < ``ACTIVE[0]``) or saturated
(> ``ACTIVE[1]``) is refused, naming the layers. Runtimes: PyTorch eager, onnxruntime, TVM
untuned (all TIR, no schedule), TVM with BLAS matmuls/convolutions and MetaSchedule-tuned TIR
("tvm tuned, BLAS conv"), the same with the spike-adaptive convolution ("tvm tuned", the default;
one tuning database shared by all: the TIR tasks are the same), and that with sparse kernels for
pruned layers. Columns: median ms per batch, ratio to onnxruntime on
the dense model with the process's median CPU ms per call (all its threads: where they spin waiting
for a busy machine's cores, far more than the work itself), speedup over the dense model on the
same path, and that speedup as a fraction of
the FLOP limit (dense MACs / model MACs, whole model). Every TVM path is checked spike for spike
against PyTorch on the benchmark batch. A third table puts each DSP layer's two BLAS matmuls
against its dense matmul: measured speedup vs the layer's limit in*out / (k*(in+out)).

``--quantize exact``: the rows time each variant's integer-exact copy instead of its float model
(:func:`stdeploy.models.quantize.to_exact`, after the variant's BatchNorm estimation and pruning,
with no quantisation-aware fine-tuning: speed does not depend on accuracy). Its input contract is
``[0, 1]`` on ``2^-N`` (``--input-frac-bits``, default 8), which holds the random images and the
digits; the benchmark batch is clipped (nothing lies outside) and rounded to it before any path sees
it. The export proves every partial sum within 2^24 grid units (a layer that could exceed it is
refused by name, and with it the run) and records the largest bound per variant. PyTorch eager
runs the exact model's deployable form (its quantised weights frozen into plain Linear/Conv2d:
what a deployment would run, without the per-call rounding that fine-tuning needs). Float runtimes
order their sums differently, so a deep float model cannot be spike-exact (a rounding flip
cascades); in this mode every path must give 0 differing output spikes and bit-identical logits
against PyTorch on the benchmark batch: a row that does not is printed, shown in the table, and
makes the run exit with status 1. ``--large-model`` (default ``sdt-8-512``; a preset or a model
config file) sizes a large run on a small config first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stdeploy.activity import estimate_batchnorm, measure_activity, require_active  # noqa: E402
from stdeploy.data import load_dataset  # noqa: E402
from stdeploy.errors import InactiveModel  # noqa: E402
from stdeploy.export.directory import export_model  # noqa: E402
from stdeploy.export.validate import logits_and_spikes  # noqa: E402
from stdeploy.models import build_model, clone_model, direct_encode  # noqa: E402
from stdeploy.models.quantize import INPUT_FRAC_BITS, InputContract, deployable, is_exact, to_exact  # noqa: E402
from stdeploy.models.structure import LowRankLinear, structure_of  # noqa: E402
from stdeploy.prune import PruneConfig, make_pruner  # noqa: E402
from stdeploy.targets.base import get_target  # noqa: E402
from stdeploy.targets.profiles import load_profile  # noqa: E402
from stdeploy.timing import describe_machine  # noqa: E402
from stdeploy.targets.tvm.target import TVMTarget  # noqa: E402
from stdeploy.targets.tvm.tuning import tune  # noqa: E402
from stdeploy.train import TrainConfig, train  # noqa: E402

VARIANTS = [("dense", None), ("l1p-90", ("l1p", 0.90)), ("l1p-95", ("l1p", 0.95)), ("l1p-98", ("l1p", 0.98)),
            ("dsp-30", ("dsp", 0.30)), ("dsp-10", ("dsp", 0.10))]
ACTIVE = (0.01, 0.5)  # every LIF of every benchmarked variant must fire at a rate inside these bounds
PATHS = ["pytorch", "onnxruntime", "tvm untuned", "tvm tuned, BLAS conv", "tvm tuned", "tvm tuned + sparse"]
TVM_PATH_KEYS = {"untuned": "tvm untuned", "blas-conv": "tvm tuned, BLAS conv", "default": "tvm tuned", "sparse": "tvm tuned + sparse"}


def prune(model, method: str, ratio: float, scope: str = "global"):
    """One-shot L1P masks or DSP factors; ``scope``: one magnitude/rank budget over all block layers
    (``global``) or each layer alike (``layer``)."""
    cfg = (PruneConfig(method="l1p", sparsity=ratio, scope=scope) if method == "l1p"
           else PruneConfig(method="dsp", param_ratio=ratio, scope=scope))
    pruner = make_pruner(cfg)
    pruner.prepare(model)
    pruner.step(model, 1.0)
    return pruner.finalize(model)


def macs(model, x: torch.Tensor) -> int:
    """Multiply-accumulates of every Linear/Conv2d on ``x``, zero weights excluded (what a kernel
    that skips zeros would do), low-rank layers as their two factors."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        nonzero = int(torch.count_nonzero(module.weight))
        if isinstance(module, torch.nn.Conv2d):
            total += nonzero * output.shape[-1] * output.shape[-2] * output.shape[0]
        else:
            total += nonzero * output.numel() // output.shape[-1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def machine() -> str:
    return f"{describe_machine()} (torch threads {torch.get_num_threads()})"


class Timing(NamedTuple):
    """Median seconds per call: ``wall`` clock, and ``cpu`` of the whole process (all its threads:
    on a loaded machine, threads that spin while waiting for a core show as CPU far above the work's own)."""

    wall: float
    cpu: float


def timed(fn, x, warmup: int, repeats: int) -> Timing:
    """The median :class:`Timing` of ``fn(x)`` over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn(x)
    times, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(x)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return Timing(statistics.median(times), statistics.median(cpus))


def record_timing(row: dict, path: str, timing: Timing) -> None:
    """``timing`` into ``row`` as ``path``'s median wall ms (``ms``) and process CPU ms (``cpu_ms``)."""
    row["ms"][path], row["cpu_ms"][path] = 1e3 * timing.wall, 1e3 * timing.cpu


def quantize_exact(models: dict, contract: InputContract, stage_s: dict | None = None, label: str = "") -> dict:
    """Each model's integer-exact copy (:func:`~stdeploy.models.quantize.to_exact` with ``contract``:
    BatchNorm folded, 8-bit weights on per-layer power-of-two grids, thresholds on 2^-8, leaks 1/2),
    converted as it is: no quantisation-aware fine-tuning (a speed table does not depend on
    accuracy). ``stage_s`` receives each variant's seconds of conversion."""
    out = {}
    for variant, model in models.items():
        t0 = time.perf_counter()
        out[variant] = to_exact(model.eval(), contract).eval()
        if stage_s is not None:
            stage_s.setdefault(variant, {})["quantize exact"] = time.perf_counter() - t0
        print(f"[{label}] {variant}: converted to the integer-exact mode in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def run_table(name: str, models: dict, x: torch.Tensor, out: Path, args, skip_untuned: bool,
              prep_s: dict | None = None, on_row=None) -> list[dict]:
    """Export, check and time every variant on every path, one variant after the other (dense
    first); ``prep_s``: seconds each variant took to prepare (pruning, BatchNorm estimation), kept
    with the row's stage times; ``on_row(rows)``, when given, is called after each finished row."""
    profile = load_profile("cpu")
    db = out / f"tuning-{name}"
    ort = get_target("onnxruntime")
    rows = []
    dirs = {}
    stages = {variant: dict((prep_s or {}).get(variant, {})) for variant in models}  # seconds per stage (printed, speed.json)
    refs, ref_logits, activities, eager = {}, {}, {}, {}
    for variant, model in models.items():  # every variant's activity is checked before anything is exported or timed
        t0 = time.perf_counter()
        # an exact-mode model runs (reference, activity, PyTorch eager) in its deployable form: the
        # quantised values frozen into plain Linear/Conv2d (no per-call rounding of the weights); its
        # input contract is the caller's to apply to x (run() does)
        eager[variant] = deployable(model) if is_exact(model) else model.eval()
        logits, spikes = logits_and_spikes(eager[variant], x)  # the head LIF's spikes, (T, B, N, D)
        refs[variant], ref_logits[variant] = spikes.numpy(), logits.numpy()
        activities[variant] = measure_activity(eager[variant], x)
        require_active(activities[variant].firing_rates, *ACTIVE, what=f"{name} {variant}")
        stages[variant]["reference + activity"] = time.perf_counter() - t0
    xn = x.numpy()
    for variant, model in models.items():
        dirs[variant] = out / name / variant
        t0 = time.perf_counter()
        manifest = export_model(model, dirs[variant], ("onnx",), data=None, samples=getattr(args, "export_samples", 8),
                                overwrite=True)  # its own run folder, rerun
        stages[variant]["export"] = time.perf_counter() - t0
        print(f"[{name}] {variant}: exported in {stages[variant]['export']:.0f} s", flush=True)
        if variant == "dense" and args.tune_trials > 0:  # one database for every variant (the TIR tasks are the same)
            t0 = time.perf_counter()
            summary = tune(dirs["dense"], profile, batch_size=x.shape[1], trials_per_task=args.tune_trials, sparse="off", database=db)
            print(f"[{name}] tuned {len(summary['tasks'])} tasks, {summary['new_trials']} new trials in "
                  f"{time.perf_counter() - t0:.0f} s ({db})", flush=True)
        model, ref, logits, activity = eager[variant], refs[variant], ref_logits[variant], activities[variant]
        rates = list(activity.firing_rates.values())
        row = {"table": name, "variant": variant, "macs": macs(model, x), "ms": {}, "exact": {}, "paths": {}, "stage_s": stages[variant],
               "activity": {**activity.to_dict(), "firing_min": min(rates), "firing_max": max(rates),
                            "output_spikes": int(ref.sum())},
               "output_spike_count": int(ref.size), "logits_diff": {}, "cpu_ms": {}}
        if manifest.get("quantize", {}).get("mode", "float") != "float":  # the checker's bound (grid units, log2)
            row["quantize"] = {k: manifest["quantize"][k] for k in ("mode", "max_bits", "input_range", "input_frac_bits")
                               if k in manifest["quantize"]}
        t0 = time.perf_counter()
        with torch.no_grad():
            record_timing(row, "pytorch", timed(model, x, args.warmup, args.repeats))
        stages[variant]["time pytorch"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ort_run = ort.compile(dirs[variant], profile)
        record_timing(row, "onnxruntime", timed(ort_run.run, xn, args.warmup, args.repeats))
        result = ort_run.run(xn)
        row["exact"]["onnxruntime"] = int(np.count_nonzero(result.spikes != ref))
        row["logits_diff"]["onnxruntime"] = float(np.abs(result.logits - logits).max())
        stages[variant]["onnxruntime"] = time.perf_counter() - t0
        configs = {"tvm tuned, BLAS conv": {"kernels": "blas-dense", "sparse": "off", "database": db if args.tune_trials > 0 else None},
                   "tvm tuned": {"sparse": "off", "database": db if args.tune_trials > 0 else None},
                   "tvm tuned + sparse": {"sparse": "auto", "database": db if args.tune_trials > 0 else None}}
        if not skip_untuned:
            configs["tvm untuned"] = {"kernels": "tir", "schedule": "untuned", "sparse": "off"}
        if args.tvm_paths is not None:
            configs = {k: v for k, v in configs.items() if k in args.tvm_paths}
        for path, opts in configs.items():
            t0 = time.perf_counter()
            runnable = TVMTarget().compile(dirs[variant], profile, batch_size=x.shape[1], **opts)
            stages[variant][f"build {path}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = runnable.run(xn)
            row["exact"][path] = int(np.count_nonzero(result.spikes != ref))
            row["logits_diff"][path] = float(np.abs(result.logits - logits).max())
            row["paths"][path] = runnable.info["path"]
            sparse = [r for r in runnable.info["builds"][str(x.shape[1])].get("sparse", []) if r.get("chosen") == "sparse"]
            if path.endswith("sparse"):
                row["sparse_layers"] = len(sparse)
            reps = max(3, args.repeats // 4) if path == "tvm untuned" else args.repeats
            record_timing(row, path, timed(runnable.run, xn, 1 if path == "tvm untuned" else args.warmup, reps))
            stages[variant][f"run {path}"] = time.perf_counter() - t0
            print(f"[{name}] {variant}: {column_name(path, args.tune_trials > 0)} built in {stages[variant][f'build {path}']:.0f} s, "
                  f"checked and timed in {stages[variant][f'run {path}']:.0f} s", flush=True)
            if path == "tvm tuned":  # the spike kernels' thresholds and the paths their calls took (live counters)
                build = runnable.info["builds"][str(x.shape[1])]
                row["thresholds"] = [{"op": key, "weight": e["weight"], "max_density": e["max_density"], "source": e["threshold"],
                                      "calls": dict(e["calls"])} for key in ("spike_conv", "spike_matmul") for e in build.get(key, [])]
                row["crossover_cache"] = build.get("crossover_cache")
        rows.append(row)
        derive(rows)
        if on_row is not None:
            on_row(rows)
        print(f"[{name}] {variant}: " + ", ".join(f"{column_name(k, args.tune_trials > 0)} {v:.2f} ms" for k, v in row["ms"].items())
              + f"; spike mismatches { {column_name(k, args.tune_trials > 0): v for k, v in row['exact'].items()} }"
              + f"; largest logit difference { {column_name(k, args.tune_trials > 0): v for k, v in row['logits_diff'].items()} }"
              + f"; {activity.summary()}", flush=True)
    return rows


def derive(rows: list[dict]) -> None:
    """Each row's FLOP limit, ratio to onnxruntime on the dense row and speedup over the dense row
    on the same path (the first row is the dense model), in place."""
    dense = rows[0]
    for row in rows:
        row["limit"] = dense["macs"] / row["macs"]
        row["vs_ort_dense"] = {p: row["ms"][p] / dense["ms"]["onnxruntime"] for p in row["ms"]}
        row["speedup"] = {p: dense["ms"][p] / row["ms"][p] for p in row["ms"] if p in dense["ms"]}


def lowrank_layers(models: dict, x_rows: int, repeats: int) -> list[dict]:
    """Each DSP layer: its dense matmul vs its two factor matmuls, numpy BLAS, M = x_rows."""
    rows = []
    rng = np.random.default_rng(0)
    for variant, model in models.items():
        for name, module in model.named_modules():
            if not isinstance(module, LowRankLinear):
                continue
            first = module.v.weight.detach().numpy().T.copy()   # (in, k)
            second = module.u.weight.detach().numpy().T.copy()  # (k, out)
            k_in, rank = first.shape
            n_out = second.shape[1]
            x = (rng.random((x_rows, k_in)) < 0.2).astype(np.float32)
            w = (first @ second).astype(np.float32)
            dense = timed(lambda a: a @ w, x, 2, repeats).wall
            factored = timed(lambda a: (a @ first) @ second, x, 2, repeats).wall
            limit = k_in * n_out / (rank * (k_in + n_out))
            rows.append({"variant": variant, "layer": name, "in": k_in, "out": n_out, "rank": rank, "dense_ms": dense * 1e3,
                         "lowrank_ms": factored * 1e3, "speedup": dense / factored, "limit": limit,
                         "fraction": (dense / factored) / limit})
    return rows


def column_name(path: str, tuned: bool = True) -> str:
    """What a path's column, legend and headings are called: with ``tuned=False`` (``--tune-trials
    0``) the "tvm tuned ..." paths ran untuned TIR around the external kernels and are named so."""
    if tuned:
        return path
    return "tvm untuned (all TIR)" if path == "tvm untuned" else path.replace("tvm tuned", "tvm untuned-TIR")


def markdown(rows: list[dict], tuned: bool = True) -> str:
    """The speed table, columns named by :func:`column_name`."""
    names = [column_name(p, tuned) for p in PATHS]
    checked = any("quantize" in r for r in rows)  # integer-exact rows: one more column, the exactness check
    head = ("| variant | MACs/batch | FLOP limit | input density | firing rates | " + " | ".join(names)
            + (" | output spikes and logits vs PyTorch" if checked else "")
            + " |\n|---|---:|---:|---:|---:|" + "---:|" * len(PATHS) + ("---|" if checked else ""))
    lines = [head]
    for r in rows:
        cells = []
        for p in PATHS:
            if p not in r["ms"]:
                cells.append("-")
                continue
            cpu = f"; CPU {r['cpu_ms'][p]:.0f} ms" if p in r.get("cpu_ms", {}) else ""  # process CPU per call, all threads
            cell = f"{r['ms'][p]:.2f} ms ({r['vs_ort_dense'][p]:.2f}x ORT{cpu})"
            if r["variant"] != "dense":
                cell += f", {r['speedup'][p]:.2f}x dense = {r['speedup'][p] / r['limit']:.0%} of limit"
            if r["exact"].get(p):
                cell += f" [{r['exact'][p]} spike flips]"
            if checked and r.get("logits_diff", {}).get(p):
                cell += f" [logits differ by up to {r['logits_diff'][p]:.3g}]"
            cells.append(cell)
        if checked:
            cells.append(exactness(r, tuned))
        a = r["activity"]
        lines.append(f"| {r['variant']} | {r['macs']:.3g} | {r['limit']:.1f}x | {a['spike_input_density']:.3f} | "
                     f"{a['firing_min']:.3f}-{a['firing_max']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def exactness(row: dict, tuned: bool = True) -> str:
    """What the spike-for-spike check of ``row`` found on every path against PyTorch (its reference):
    the output spikes that differ and whether the logits are bit-identical."""
    paths = [p for p in PATHS if p in row["exact"]]
    bad = [p for p in paths if row["exact"][p] or row["logits_diff"].get(p, 0.0) != 0.0]
    total = f"{row['output_spike_count']:,}"
    if not bad:
        return f"0 of {total} output spikes differ, logits identical ({', '.join(column_name(p, tuned) for p in paths)})"
    return "; ".join(f"{column_name(p, tuned)}: {row['exact'][p]:,} of {total} output spikes differ, logits "
                     + ("identical" if row["logits_diff"].get(p, 0.0) == 0.0 else f"differ by up to {row['logits_diff'][p]:.3g}")
                     for p in paths)


def not_exact(tables: dict) -> list[str]:
    """The integer-exact rows whose output spikes or logits differ from PyTorch on some path (empty:
    every such row is spike-exact with identical logits)."""
    return [f"{name} {r['variant']} {p}: {r['exact'][p]} output spikes differ, largest logit difference {r['logits_diff'][p]:g}"
            for name, rows in tables.items() for r in rows if "quantize" in r
            for p in r["exact"] if r["exact"][p] or r["logits_diff"].get(p, 0.0) != 0.0]


def activity_markdown(rows: list[dict]) -> str:
    """Per layer: input density of each Linear/Conv2d (``in``) and firing rate of each LIF
    (``rate``), one column per variant, on the benchmark batch."""
    names: dict[str, str] = {}
    for r in rows:
        for layer in r["activity"]["input_densities"]:
            names.setdefault(layer, "in")
        for layer in r["activity"]["firing_rates"]:
            names.setdefault(layer, "rate")
    lines = ["| layer | what | " + " | ".join(r["variant"] for r in rows) + " |", "|---|---|" + "---:|" * len(rows)]
    for layer, what in names.items():
        key = "input_densities" if what == "in" else "firing_rates"
        cells = [f"{r['activity'][key][layer]:.3f}" if layer in r["activity"][key] else "-" for r in rows]
        label = "input density" + (" (real-valued)" if layer in rows[0]["activity"].get("real_inputs", []) else "") if what == "in" else "firing rate"
        lines.append(f"| {layer} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def thresholds_markdown(rows: list[dict]) -> str:
    """The spike-adaptive kernels of the default path: threshold, its source, the calls per path."""
    skipzero = any("skipzero" in t["calls"] for r in rows for t in r.get("thresholds", []))  # pruned weights' row-CSR kernel
    lines = ["| variant | kernel | weight | threshold (max density) | source | gather calls | BLAS calls |"
             + (" skip-zero calls |" if skipzero else ""), "|---|---|---|---:|---|---:|---:|" + ("---:|" if skipzero else "")]
    for r in rows:
        for t in r.get("thresholds", []):
            lines.append(f"| {r['variant']} | {t['op']} | {'x'.join(map(str, t['weight']))} | {t['max_density']:.3f} | "
                         f"{t['source']} | {t['calls']['gather']} | {t['calls']['blas']} |"
                         + (f" {t['calls'].get('skipzero', 0)} |" if skipzero else ""))
    return "\n".join(lines)


def stages_markdown(rows: list[dict], tuned: bool = True) -> str:
    """Wall-clock seconds of each stage per variant: pruning, BatchNorm estimation, export (with
    its validation), PyTorch timing, onnxruntime compile + check + timing, and per TVM path the
    build and the check + timing (warm-up and repeats)."""
    stages: list[str] = []
    for r in rows:
        for k in r["stage_s"]:
            if k not in stages:
                stages.append(k)
    names = [(" ".join([k.split(" ", 1)[0], column_name(k.split(" ", 1)[1], tuned)])
              if k.startswith(("build ", "run ")) else k) for k in stages]
    lines = ["| variant | " + " | ".join(names) + " | total |", "|---|" + "---:|" * (len(stages) + 1)]
    for r in rows:
        cells = [f"{r['stage_s'][k]:.0f}" if k in r["stage_s"] else "-" for k in stages]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {sum(r['stage_s'].values()):.0f} |")
    return "\n".join(lines)


def lowrank_markdown(rows: list[dict]) -> str:
    lines = ["| variant | layer | in x out | rank | dense ms | U·V ms | speedup | limit | fraction |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['layer']} | {r['in']}x{r['out']} | {r['rank']} | {r['dense_ms']:.3f} | "
                     f"{r['lowrank_ms']:.3f} | {r['speedup']:.2f}x | {r['limit']:.2f}x | {r['fraction']:.0%} |")
    return "\n".join(lines)


def load_average() -> str:
    """The 1/5/15-minute load averages (how busy the machine was), or "n/a" where the system has none."""
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def exact_note(rows: list[dict]) -> str:
    """What an integer-exact table measured: how its models were made, the input contract, the
    checker's bound per variant and what the PyTorch column times."""
    q = rows[0]["quantize"]
    lo, hi = q.get("input_range", [0, 1])
    bounds = ", ".join(f"{r['variant']} 2^{r['quantize']['max_bits']:.1f}" for r in rows if "max_bits" in r["quantize"])
    return (f"Integer-exact mode (`--quantize exact`): each variant converted by `to_exact` after its BatchNorm estimation "
            f"(and pruning), no quantisation-aware fine-tuning (speed does not depend on accuracy); 8-bit weights on per-layer "
            f"power-of-two grids, thresholds on 2^-8, leak 1/2. Input contract [{lo:g}, {hi:g}] on 2^-{q.get('input_frac_bits')}: "
            f"the random images are rounded to it before any path sees them (none lie outside it). The export's checker proved "
            f"every partial sum within 2^24 grid units (largest bound per variant: {bounds}). The check: every path's output "
            f"spikes and logits against PyTorch's on the benchmark batch, no tolerance. PyTorch eager runs the exact model's "
            f"deployable form (the quantised weights frozen into plain Linear/Conv2d).")


def report(tables: dict, lowrank: list[dict], args, load_start: str, unfinished: str = "") -> str:
    """The markdown report: header (machine, load averages, command), then per table the speed
    table, its TVM paths, seconds per stage, activity per layer and spike-kernel thresholds;
    ``unfinished``, when given, says what had not run yet (a partial report)."""
    note = f" ({args.machine_note})" if args.machine_note else ""
    text = [f"Machine: {machine()}{note}; load average (1/5/15 min) {load_start} at the start, {load_average()} when written. "
            f"Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`\n"]
    if unfinished:
        text.append(f"**Partial report**: {unfinished}\n")
    tuned = args.tune_trials > 0
    for name, rows in tables.items():
        pruned = "" if all(r["variant"] == "dense" for r in rows) else f", pruned variants: one-shot, scope {args.scope}"
        exact = [r for r in rows if "quantize" in r]
        mode = ", integer-exact mode" if exact else ""
        text.append(f"### {name}, batch {args.batch if name == 'sdt-tiny' else args.large_batch}{mode}{pruned}\n\n{markdown(rows, tuned)}\n")
        if exact:
            text.append(exact_note(exact) + "\n")
        paths = {p: v for r in rows for p, v in r["paths"].items()}
        text.append("TVM paths: " + "; ".join(f"{column_name(k, tuned)}: {v}" for k, v in paths.items()) + "\n")
        text.append(f"#### {name}: seconds per stage\n\n{stages_markdown(rows, tuned)}\n")
        text.append(f"#### {name}: activity per layer (benchmark batch)\n\n{activity_markdown(rows)}\n")
        caches = [r["crossover_cache"] for r in rows if r.get("crossover_cache")]
        measured, reused = sum(c["measured"] for c in caches), sum(c["reused"] for c in caches)
        text.append(f"#### {name}: spike-kernel thresholds of the default path (\"{column_name('tvm tuned', tuned)}\")\n\n"
                    f"Thresholds measured by these builds: {measured}, read from the crossover cache: {reused} "
                    f"({caches[0]['path'] if caches else 'no cache'}). Calls: the warm-up and timed runs of the row.\n\n"
                    f"{thresholds_markdown(rows)}\n")
    if lowrank:
        text.append(f"### DSP layers: two BLAS matmuls vs the dense one\n\n{lowrank_markdown(lowrank)}\n")
    return "\n".join(text)


def write_report(out: Path, tables: dict, lowrank: list[dict], args, load_start: str, unfinished: str = "") -> str:
    """``OUT/speed.md`` and ``OUT/speed.json`` (rewritten after every row, so an interrupted run
    leaves what it measured, marked partial); returns the markdown written."""
    text = report(tables, lowrank, args, load_start, unfinished)
    (out / "speed.md").write_text(text)
    (out / "speed.json").write_text(json.dumps({"tables": tables, "lowrank": lowrank, "args": vars(args), "machine": machine(),
                                                "partial": unfinished or None}, indent=1, default=str))
    return text


def small_models(seed: int, epochs: int) -> tuple[dict, torch.Tensor, int]:
    data = load_dataset("digits")
    torch.manual_seed(seed)
    base = build_model("sdt-tiny")
    train(base, data, TrainConfig(epochs=epochs, batch_size=64, seed=seed), None, progress=False)
    return data, base


def build_variants(base, calibrate=None, names: tuple[str, ...] | None = None, scope: str = "global",
                   stage_s: dict | None = None, label: str = "") -> dict:
    """Dense and pruned copies of ``base`` (those in ``names``, default all; dense always, first),
    pruned with ``scope`` (see :func:`prune`); ``calibrate(model)``, when given, re-estimates each
    pruned copy's BatchNorm statistics (pruning changes what every layer sees). ``stage_s``, when
    given, receives each variant's seconds of pruning and BatchNorm estimation."""
    models = {}
    for name, spec in VARIANTS:
        if names is not None and name != "dense" and name not in names:
            continue
        t0 = time.perf_counter()
        m = clone_model(base)
        models[name] = m if spec is None else prune(m, *spec, scope=scope)
        t1 = time.perf_counter()
        if spec is not None and calibrate is not None:
            calibrate(models[name])
        models[name].eval()
        if stage_s is not None and spec is not None:
            stage_s[name] = {"prune": t1 - t0, "batchnorm": time.perf_counter() - t1}
            print(f"[{label}] {name}: pruned ({scope}) in {t1 - t0:.0f} s, BatchNorm estimated in "
                  f"{time.perf_counter() - t1:.0f} s", flush=True)
    return models


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tune-trials", type=int, default=8, help="MetaSchedule trials per task (0: no tuning)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs of the small model")
    ap.add_argument("--large", action="store_true", help="also the sdt-8-512-class table (32x32, random weights)")
    ap.add_argument("--no-small", action="store_true", help="skip the sdt-tiny table (with --large: that table only)")
    ap.add_argument("--large-batch", type=int, default=4)
    ap.add_argument("--large-untuned", action="store_true", help="also time untuned TVM on the large model (minutes)")
    ap.add_argument("--bn-batches", type=int, default=8, help="large model: batches of random images for BatchNorm statistics")
    ap.add_argument("--bn-batch-size", type=int, default=8, help="large model: random images per BatchNorm estimation batch")
    ap.add_argument("--export-samples", type=int, default=8, help="validation samples of each variant's export")
    ap.add_argument("--bn-gain", type=float, default=1.25,
                    help="large model: std of each normalised BatchNorm output (1.25: LIF rates about 0.06-0.27 on sdt-8-512)")
    ap.add_argument("--scope", choices=("global", "layer"), default="global",
                    help="pruned variants: one magnitude/rank budget over all block layers (global) or each layer alike "
                         "(layer; global L1P-90 on random-weight sdt-8-512 removes every weight of its mlp.fc2 layers)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="runs/bench-speed")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated subset of {','.join(n for n, _ in VARIANTS)} (dense is always run); default all")
    ap.add_argument("--tvm-paths", default=None,
                    help=f"comma-separated subset of the TVM columns ({', '.join(f'{k}: {v!r}' for k, v in TVM_PATH_KEYS.items())}); default all")
    ap.add_argument("--machine-note", default="", help="said after the machine in the header (e.g. that it was shared)")
    ap.add_argument("--quantize", choices=("float", "exact"), default="float",
                    help="exact: time each variant's integer-exact copy (after BatchNorm estimation and pruning; no fine-tuning) "
                         "and demand 0 output-spike mismatches and bit-identical logits on every path")
    ap.add_argument("--input-frac-bits", type=int, default=INPUT_FRAC_BITS,
                    help="--quantize exact: the input contract's grid 2^-N (range [0, 1], which covers the images)")
    ap.add_argument("--large-model", default="sdt-8-512",
                    help="--large: the model (a preset or a model config file; a small config sizes a run)")
    ap.add_argument("--crossover-cache", default=None,
                    help="folder of the spike kernels' threshold cache (STDEPLOY_CACHE_DIR for the builds; default OUT/cache)")
    args = ap.parse_args()
    for flag in ("batch", "large_batch", "bn_batches", "bn_batch_size", "export_samples", "repeats"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.variants is not None:
        known = [n for n, _ in VARIANTS]
        args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        unknown = [v for v in args.variants if v not in known]
        if unknown:
            ap.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    if args.tvm_paths is not None:
        keys = [v.strip() for v in args.tvm_paths.split(",") if v.strip()]
        unknown = [v for v in keys if v not in TVM_PATH_KEYS]
        if unknown:
            ap.error(f"--tvm-paths: unknown {', '.join(unknown)}; known: {', '.join(TVM_PATH_KEYS)}")
        args.tvm_paths = tuple(TVM_PATH_KEYS[k] for k in keys)
    if args.quantize == "exact":
        try:
            args.input_contract = InputContract(0.0, 1.0, args.input_frac_bits)
        except ValueError as err:
            ap.error(f"--input-frac-bits: {err}")
    try:
        return run(args)
    except InactiveModel as err:  # a silent or saturated model: its timings would mean nothing
        print(f"speed.py: {err}", file=sys.stderr)
        return 2


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.crossover_cache = args.crossover_cache or str(out / "cache")
    os.environ["STDEPLOY_CACHE_DIR"] = args.crossover_cache   # one threshold cache for every build of the run
    torch.set_flush_denormal(True)
    t_start = time.perf_counter()
    load_start = load_average()

    def partial(name: str, total: int):
        return lambda rows: write_report(out, {**tables, name: rows}, lowrank, args, load_start,
                                         f"{name}: {len(rows)} of {total} variants finished")
    tables, lowrank = {}, []
    if not args.no_small:
        data, base = small_models(0, args.epochs)
        images = torch.stack([data.test[i][0] for i in range(args.batch)])
        x = direct_encode(images, base.cfg.timesteps)
        train_x = torch.stack([data.train[i][0] for i in range(min(512, len(data.train)))])

        def recalibrate(model):  # one-shot pruning leaves the attention LIFs near silent (rate < 0.01)
            estimate_batchnorm(model, (direct_encode(train_x[i:i + 64], base.cfg.timesteps) for i in range(0, len(train_x), 64)))

        prep: dict = {}
        models = build_variants(base, recalibrate, args.variants, args.scope, prep, "sdt-tiny")
        if args.quantize == "exact":  # digits (k/16) lie on the default 2^-8 grid; the contract applied all the same
            models = quantize_exact(models, args.input_contract, prep, "sdt-tiny")
            x = args.input_contract.apply(x)
        tables["sdt-tiny"] = run_table("sdt-tiny", models, x, out, args, skip_untuned=False, prep_s=prep,
                                       on_row=partial("sdt-tiny", len(models)))
        lowrank = lowrank_layers(models, x.shape[0] * x.shape[1] * 16, args.repeats)
    if args.large:
        torch.manual_seed(0)
        big = build_model(args.large_model)
        big.eval()
        shape = (big.cfg.in_channels, big.cfg.image_size, big.cfg.image_size)
        xl = direct_encode(torch.rand(args.large_batch, *shape), big.cfg.timesteps)
        large = big.cfg.name

        def calibrate(model):  # BatchNorm statistics over many batches of random images, layer by layer
            g = torch.Generator().manual_seed(1)
            estimate_batchnorm(model, (direct_encode(torch.rand(args.bn_batch_size, *shape, generator=g), big.cfg.timesteps)
                                       for _ in range(args.bn_batches)), gain=args.bn_gain)

        t0 = time.perf_counter()
        calibrate(big)
        prep = {"dense": {"batchnorm": time.perf_counter() - t0}}
        print(f"[{large}] dense: BatchNorm estimated over {args.bn_batches} batches of {args.bn_batch_size} in "
              f"{prep['dense']['batchnorm']:.0f} s",
              flush=True)
        big_models = build_variants(big, calibrate, args.variants, args.scope, prep, large)
        if args.quantize == "exact":  # the random images in [0, 1] are rounded to the contract's grid (none clipped)
            big_models = quantize_exact(big_models, args.input_contract, prep, large)
            xl = args.input_contract.apply(xl)
        tables[large] = run_table(large, big_models, xl, out, args, skip_untuned=not args.large_untuned, prep_s=prep,
                                  on_row=partial(large, len(big_models)))
        lowrank += lowrank_layers({k: v for k, v in big_models.items() if k.startswith("dsp")}, xl.shape[0] * xl.shape[1] * 64,
                                  max(5, args.repeats // 2))
    print(write_report(out, tables, lowrank, args, load_start))
    print(f"finished in {time.perf_counter() - t_start:.0f} s; {out / 'speed.md'}")
    failed = not_exact(tables)
    if failed:  # the integer-exact mode promises bit-identical results: a difference is a failure, not a figure
        print("speed.py: not spike-exact in the integer-exact mode: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
