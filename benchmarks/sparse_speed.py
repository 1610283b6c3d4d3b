"""Whole-model sparse sdt-tiny on the CPU: dense vs L1P-pruned over every weight layer, in one run.

    python benchmarks/sparse_speed.py [--sparsity 0.95] [--batch 32] [--threads 1] [--repeats 15] \\
        [--out runs/bench-sparse-speed] [--machine-note TEXT]

The model: sdt-tiny trained ``--epochs`` (2) on the first ``--train-images`` (480) digits (the test
suite's recipe: speed does not depend on accuracy, only on shapes, zeros and firing). The sparse
copy: L1P magnitude masks at ``--sparsity`` over the whole model (``--layers all``: block linears,
embedding convolutions, classifier; one global budget), BatchNorm re-estimated on 512 training
images; both must fire (every LIF's rate inside ``ACTIVE``), or the script exits 2 naming the
silent or saturated layers.

Reported, for the benchmark batch:

* FLOP limits: dense multiply-adds over the pruned model's (zero weights skipped), and the same
  with each layer's measured input density (zero inputs skipped as well: what the gather kernels do
  on the dense model against what the skip-zero kernels do on the pruned one);
* times of every runtime in one run, interleaved round by round (each round calls every runner
  once; median of ``--repeats`` rounds after ``--warmup``), wall time and process CPU time (CPU time
  is what preemption on a shared machine does not add): onnxruntime, the default CPU TVM path
  (``TVMTarget().compile`` as ``stdeploy run`` does: every pruned layer, and the one-channel stem
  convolution, on its kernel compiled into the module (:mod:`stdeploy.targets.tvm.kernels.event`:
  event-driven linears, weight-stationary convolutions), the other weight layers on the
  spike-adaptive kernels (CSR kernels where measured faster), the LIF recurrences as fused kernels
  (:mod:`stdeploy.targets.tvm.kernels.lif`), max pooling as a TIR kernel
  (:mod:`stdeploy.targets.tvm.kernels.pool`), the elementwise chains inlined and vectorised, an event
  kernel feeding a LIF through a bias add fused with it (:mod:`stdeploy.targets.tvm.kernels.eventlif`);
  a max pool fed by a LIF population alone pooled in that kernel, the bias and residual adds after
  an event matmul or fused MLP in its store (:mod:`stdeploy.targets.tvm.kernels.residual`); dense
  and pruned models alike), the
  dense model's other options (its linears, or every layer, on the event kernels: ``event_every``;
  its time is the fastest option's, measured), both models with the weight+LIF, LIF+pool and
  residual fusions off (``fusions off``), the same path with the LIF recurrences left to Relax's per-operator
  TIR (``unfused LIF``), the pruned model with the event kernels off (``event kernels off``: its
  pruned layers on the adaptive skip-zero / gather / BLAS kernels and the CSR pass, the path
  before them, with the same non-weight kernels), and that module with every pruned layer
  pinned to one adaptive kernel (``gather``, ``skip-zero``);
* the headline pair, the pruned model's default path and the dense model's fastest option, timed
  once more in rounds of their own (each call then finds the caches as the pair left them, as in a
  deployment that runs one model call after call, not as onnxruntime and the other runners did);
* spike mismatches of every runner against PyTorch on the batch;
* where the time goes: the Relax VM's per-call CPU times (its instrument hook) of the default TVM module, dense and
  sparse, grouped into the weight layers' kernels, the fused LIF kernels and the rest (pooling,
  residual and bias adds, attention products, the VM's allocations: with the LIF steps, what
  pruning cannot remove), and the bound that puts on the whole-model speed-up (dense time / the
  sparse model's time outside the weight kernels).

Writes ``OUT/sparse_speed.md`` and ``OUT/sparse_speed.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stdeploy.activity import estimate_batchnorm, measure_activity, require_active  # noqa: E402
from stdeploy.data import load_dataset  # noqa: E402
from stdeploy.errors import InactiveModel  # noqa: E402
from stdeploy.export.directory import export_model  # noqa: E402
from stdeploy.export.validate import logits_and_spikes  # noqa: E402
from stdeploy.models import build_model, clone_model, direct_encode  # noqa: E402
from stdeploy.prune import ALL_LAYERS, PruneConfig, make_pruner, weight_counts  # noqa: E402
from stdeploy.targets.base import get_target  # noqa: E402
from stdeploy.targets.profiles import load_profile  # noqa: E402
from stdeploy.targets.tvm.cpu import TVMRunnable, compile_cpu, outputs_to_numpy  # noqa: E402
from stdeploy.timing import describe_machine  # noqa: E402
from stdeploy.targets.tvm.database import CrossoverCache  # noqa: E402
from stdeploy.targets.tvm.frontend import load_onnx_graph, relax_module  # noqa: E402
from stdeploy.targets.tvm.host import cpu_target  # noqa: E402
from stdeploy.targets.tvm.kernels import skipzero  # noqa: E402
from stdeploy.targets.tvm.kernels.lif import fuse_lif_recurrences  # noqa: E402
from stdeploy.targets.tvm.kernels.pool import route_max_pools  # noqa: E402
from stdeploy.targets.tvm.kernels.routing import route_to_external_kernels  # noqa: E402
from stdeploy.targets.tvm.kernels.spike import pinned_threads  # noqa: E402
from stdeploy.targets.tvm.schedules import inline_injective, schedule_elementwise  # noqa: E402
from stdeploy.targets.tvm.sdk import load_tvm  # noqa: E402
from stdeploy.targets.tvm.target import TVMTarget  # noqa: E402
from stdeploy.train import TrainConfig, train  # noqa: E402

ACTIVE = (0.01, 0.5)
# Relax VM profile rows that are the weight layers' kernels (the rest is what pruning cannot remove)
WEIGHT_KERNELS = ("stdeploy.", "sparse_matmul", "stdeploy_event_matmul", "stdeploy_stationary")
LIF_KERNELS = ("stdeploy_lif",)   # the fused LIF kernels (kernels.lif)
WEIGHT_LIF_KERNELS = ("stdeploy_event_lif", "stdeploy_event_mlp")   # weight layer(s) and LIF in one kernel (kernels.eventlif)
# the dense model's options (CPU build options of TVMRunnable): its time is the fastest of them
DENSE_OPTIONS = {"dense: tvm default": {}, "dense: tvm, linears on event kernels": {"event_every": ("matmul",)},
                 "dense: tvm, every layer on event kernels": {"event_every": ("matmul", "conv2d")},
                 "dense: tvm, linears on event kernels, fusions off": {"event_every": ("matmul",), "event_lif": False,
                                                                       "lif_pool": False, "residual": False}}
UNFUSED = "sparse: tvm, fusions off"   # the pruned model without the weight+LIF, LIF+pool and residual fusions


def machine() -> str:
    try:
        load = ", load average %.1f at start" % os.getloadavg()[0]
    except OSError:
        load = ""
    return describe_machine() + load


def flop_limits(counts: dict, densities: dict, dense_counts: dict, dense_densities: dict, steps_batch: int) -> dict:
    """Multiply-adds per batch: dense, pruned (zero weights skipped), and both with zero inputs
    skipped too (each layer's MACs times its measured input density)."""
    def effective(c, d):
        return sum(e["macs"] * d.get(name, 1.0) for name, e in c["layers"].items()) * steps_batch
    layers = []
    for name, e in counts["layers"].items():
        layers.append({"layer": name, "input_density_dense": dense_densities.get(name), "input_density_sparse": densities.get(name),
                       "weight_density": e["params"] / max(e["params_dense"], 1), "macs_dense": e["macs_dense"] * steps_batch,
                       "macs_sparse": e["macs"] * steps_batch,
                       "ops_dense_skip_inputs": dense_counts["layers"][name]["macs"] * dense_densities.get(name, 1.0) * steps_batch,
                       "ops_sparse_skip_both": e["macs"] * densities.get(name, 1.0) * steps_batch})
    macs_dense, macs_sparse = dense_counts["macs"] * steps_batch, counts["macs"] * steps_batch
    ops_dense, ops_sparse = effective(dense_counts, dense_densities), effective(counts, densities)
    return {"macs_dense": macs_dense, "macs_sparse": macs_sparse, "weight_limit": macs_dense / macs_sparse,
            "ops_dense_skip_inputs": ops_dense, "ops_sparse_skip_both": ops_sparse, "both_limit": ops_dense / ops_sparse,
            "layers": layers}


class RoutedModule:
    """The default path's module with the event kernels off, built here (no CSR pass; the LIF
    recurrences fused, max pooling inside the kernel of the LIF that feeds it, elementwise chains
    inlined and vectorised, as on the default path), so that its pruned layers can be pinned to one adaptive kernel: ``forced``
    None (chosen per call), ``gather``, ``skipzero`` or ``blas``."""

    def __init__(self, export_dir: Path, batch: int, target: dict, cache: CrossoverCache):
        import tvm
        from tvm import relax

        self.graph = load_onnx_graph(export_dir)
        mod, done = route_to_external_kernels(relax_module(self.graph, batch), spike_target=target, crossovers=cache)
        self.kernels = [o.kernel for o in done if isinstance(o.kernel, skipzero.AdaptiveSparse)]
        mod, pools = route_max_pools(mod)
        mod, _ = fuse_lif_recurrences(mod, target, (), pools)   # the max pool in its LIF's kernel, as on the default path
        with tvm.target.Target(target):
            mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
                                            relax.get_pipeline("zero")])(mod)
        mod, _ = inline_injective(mod)
        mod, _ = schedule_elementwise(mod)
        self.vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(target)), tvm.cpu())

    def runner(self, forced: str | None):
        import tvm

        def run(x: np.ndarray) -> np.ndarray:
            for k in self.kernels:
                k.forced = forced
            return outputs_to_numpy(self.vm["main"](tvm.runtime.tensor(x)), self.graph.outputs)["spikes"]
        return run


def interleaved(runners: dict, x: np.ndarray, warmup: int, repeats: int) -> dict:
    """Median wall and process-CPU milliseconds per call of each runner, one call each per round."""
    for _ in range(warmup):
        for fn in runners.values():
            fn(x)
    wall = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn(x)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: {"wall_ms": statistics.median(wall[k]) * 1e3, "cpu_ms": statistics.median(cpu[k]) * 1e3,
                "wall_min_ms": min(wall[k]) * 1e3} for k in runners}


def vm_profile(runnable, x: np.ndarray, batch: int, repeats: int = 10) -> list[dict]:
    """Per-call process CPU time of the default TVM module (``runnable``'s build options) by callee
    name, through the Relax VM's instrument hook: mean ms per model call over ``repeats`` calls after
    one. CPU time, not wall time: on a shared machine a call's wall time is mostly preemption."""
    import tvm
    from tvm import relax

    ex, _ = compile_cpu(runnable.graph, runnable.export_dir, runnable.profile, runnable.target, batch, **runnable.cpu)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rows: dict[str, dict] = {}
    start: dict[str, float] = {}

    def instrument(func, name, before_run, ret, *args):
        name = str(name)
        if before_run:
            start[name] = time.process_time()
        else:
            r = rows.setdefault(name, {"name": name, "us": 0.0, "calls": 0})
            r["us"] += (time.process_time() - start[name]) * 1e6 / repeats
            r["calls"] += 1
        return 0

    xt = tvm.runtime.tensor(x)
    vm["main"](xt)
    vm.set_instrument(instrument)
    for _ in range(repeats):
        vm["main"](xt)
    for r in rows.values():
        r["calls"] //= repeats
    return sorted(rows.values(), key=lambda r: -r["us"])


def split_profile(rows: list[dict]) -> dict:
    weight = sum(r["us"] for r in rows if r["name"].startswith(WEIGHT_KERNELS))
    lif = sum(r["us"] for r in rows if r["name"].startswith(LIF_KERNELS))
    both = sum(r["us"] for r in rows if r["name"].startswith(WEIGHT_LIF_KERNELS))
    total = sum(r["us"] for r in rows)
    return {"total_ms": total / 1e3, "weight_kernels_ms": weight / 1e3, "lif_ms": lif / 1e3, "weight_lif_ms": both / 1e3,
            "other_ms": (total - weight - lif - both) / 1e3, "rest_ms": (total - weight - both) / 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-images", type=int, default=480)
    ap.add_argument("--threads", type=int, default=1, help="threads of TVM's pool, BLAS, onnxruntime and torch")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="runs/bench-sparse-speed")
    ap.add_argument("--machine-note", default="")
    args = ap.parse_args()
    if not 0.0 < args.sparsity < 1.0:
        ap.error(f"--sparsity must lie in (0, 1), got {args.sparsity}")
    load_tvm()
    try:
        with pinned_threads(args.threads):
            return run(args)
    except InactiveModel as err:
        print(f"sparse_speed.py: {err}", file=sys.stderr)
        return 2


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["STDEPLOY_CACHE_DIR"] = str(out / "cache")
    torch.set_flush_denormal(True)
    t_start = time.perf_counter()
    host = machine()
    data = load_dataset("digits")
    sub = dataclasses.replace(data, train=torch.utils.data.Subset(data.train, range(min(args.train_images, len(data.train)))))
    torch.manual_seed(0)
    dense = build_model("sdt-tiny")
    train(dense, sub, TrainConfig(epochs=args.epochs, batch_size=16, lr=5e-3, seed=0), None, progress=False)
    dense.eval()
    print(f"trained in {time.perf_counter() - t_start:.0f} s", flush=True)
    sparse = clone_model(dense)
    pruner = make_pruner(PruneConfig(method="l1p", sparsity=args.sparsity, layers=ALL_LAYERS))
    pruner.prepare(sparse)
    pruner.step(sparse, 1.0)
    sparse = pruner.finalize(sparse)
    train_x = torch.stack([data.train[i][0] for i in range(min(512, len(data.train)))])
    steps = dense.cfg.timesteps
    estimate_batchnorm(sparse, (direct_encode(train_x[i:i + 64], steps) for i in range(0, len(train_x), 64)))
    sparse.eval()
    x = direct_encode(torch.stack([data.test[i][0] for i in range(args.batch)]), steps)
    xn = x.numpy()
    models = {"dense": dense, "sparse": sparse}
    acts = {k: measure_activity(m, x) for k, m in models.items()}
    for k, a in acts.items():
        require_active(a.firing_rates, *ACTIVE, what=f"sdt-tiny {k}")
    counts = {k: weight_counts(m) for k, m in models.items()}
    limits = flop_limits(counts["sparse"], acts["sparse"].input_densities, counts["dense"], acts["dense"].input_densities,
                         steps * args.batch)
    refs = {k: logits_and_spikes(m, x)[1].numpy() for k, m in models.items()}
    dirs = {}
    for k, m in models.items():
        dirs[k] = out / k
        export_model(m, dirs[k], ("onnx",), data=None, samples=8, overwrite=True)
    print(f"exported in {time.perf_counter() - t_start:.0f} s", flush=True)

    profile = load_profile("cpu")
    ort = get_target("onnxruntime")
    runners, paths, builds = {}, {}, {}
    graphs = {k: load_onnx_graph(dirs[k]) for k in models}  # one load per export, shared by the TVM builds below
    for k in models:
        r = ort.compile(dirs[k], profile, threads=args.threads)
        runners[f"{k}: onnxruntime"] = lambda a, r=r: r.run(a).spikes
        tv = TVMTarget().compile(dirs[k], profile, batch_size=args.batch)
        runners[f"{k}: tvm default"] = lambda a, tv=tv: tv.run(a).spikes
        paths[k] = tv.info["path"]
        builds[k] = tv
        unfused = TVMRunnable(graphs[k], profile, cpu_target(profile), dirs[k], {"lif": False})
        unfused.prepare(args.batch)
        runners[f"{k}: tvm, unfused LIF"] = lambda a, tv=unfused: tv.run(a).spikes
    options = {name: TVMRunnable(graphs["dense"], profile, cpu_target(profile), dirs["dense"], cpu)
               for name, cpu in DENSE_OPTIONS.items() if cpu}
    options[UNFUSED] = TVMRunnable(graphs["sparse"], profile, cpu_target(profile), dirs["sparse"],
                                   {"event_lif": False, "lif_pool": False, "residual": False})
    for name, tv in options.items():
        tv.prepare(args.batch)
        runners[name] = lambda a, tv=tv: tv.run(a).spikes
    no_event = TVMRunnable(graphs["sparse"], profile, cpu_target(profile), dirs["sparse"], {"event": False})
    no_event.prepare(args.batch)
    runners["sparse: tvm, event kernels off"] = lambda a, tv=no_event: tv.run(a).spikes
    routed = RoutedModule(dirs["sparse"], args.batch, builds["sparse"].target, CrossoverCache(out / "cache" / "tvm" / "kernel-crossovers.json"))
    runners["sparse: tvm, pruned layers on gather"] = routed.runner("gather")
    runners["sparse: tvm, pruned layers on skip-zero"] = routed.runner("skipzero")
    print(f"built in {time.perf_counter() - t_start:.0f} s", flush=True)
    mismatches = {name: int(np.count_nonzero(fn(xn) != refs[name.split(":")[0]])) for name, fn in runners.items()}
    times = interleaved(runners, xn, args.warmup, args.repeats)
    print(json.dumps(times, indent=1), flush=True)
    dense_best = min(DENSE_OPTIONS, key=lambda name: times[name]["cpu_ms"])
    best = builds["dense"] if dense_best == "dense: tvm default" else options[dense_best]
    # the headline pair once more on its own: each call finds the caches as the pair left them, not
    # as onnxruntime and the other runners did (a deployed model runs call after call)
    pair = interleaved({k: runners[k] for k in (dense_best, "sparse: tvm default")}, xn, args.warmup, args.repeats)
    print(json.dumps(pair, indent=1), flush=True)
    profiles = {"dense": vm_profile(best, xn, args.batch), "sparse": vm_profile(builds["sparse"], xn, args.batch),
                "sparse, fusions off": vm_profile(options[UNFUSED], xn, args.batch)}
    split = {k: split_profile(v) for k, v in profiles.items()}
    sparse_build = builds["sparse"].info["builds"][str(args.batch)]
    kernels = [{"op": op, "weight": e["weight"], "max_density": e["max_density"], "source": e["threshold"], "calls": dict(e["calls"])}
               for op in ("spike_conv", "spike_matmul") for e in sparse_build.get(op, [])]
    csr = [r for r in sparse_build.get("sparse", []) if r.get("chosen") == "sparse"]
    events = {k: b.info["builds"][str(args.batch)].get("event", []) for k, b in builds.items()}
    result = {"args": vars(args), "machine": host, "timesteps": steps, "limits": limits, "times": times, "pair_times": pair,
              "mismatches": mismatches,
              "paths": paths, "activity": {k: a.to_dict() for k, a in acts.items()}, "profiles": profiles, "profile_split": split,
              "sparse_kernels": kernels, "csr_layers": csr, "event_layers": events, "sparse_report": sparse_build.get("sparse", []),
              "fused_lif": {k: b.info["builds"][str(args.batch)].get("fused_lif", []) for k, b in builds.items()},
              "residual": {k: b.info["builds"][str(args.batch)].get("residual", []) for k, b in builds.items()},
              "product_sum": {k: b.info["builds"][str(args.batch)].get("product_sum", []) for k, b in builds.items()},
              "dense_best": dense_best, "dense_best_path": best.info["path"],
              "seconds": time.perf_counter() - t_start}
    (out / "sparse_speed.json").write_text(json.dumps(result, indent=1, default=str))
    text = markdown(result)
    (out / "sparse_speed.md").write_text(text)
    print(text)
    print(f"finished in {time.perf_counter() - t_start:.0f} s; {out / 'sparse_speed.md'}")
    return 0


def markdown(r: dict) -> str:
    a, lim, t = r["args"], r["limits"], r["times"]
    note = f" ({a['machine_note']})" if a["machine_note"] else ""
    argv = " ".join(sys.argv[1:])
    lines = [f"Machine: {r['machine']}{note}; {a['threads']} thread(s) for TVM, BLAS, onnxruntime and torch. "
             f"Command: `python benchmarks/sparse_speed.py {argv}` ({r['seconds']:.0f} s).", ""]
    act = r["activity"]
    for k in ("dense", "sparse"):
        rates = list(act[k]["firing_rates"].values())
        lines.append(f"- {k}: firing rates {min(rates):.3f}-{max(rates):.3f}, spike-fed input density "
                     f"{act[k]['spike_input_density']:.3f}")
    lines += ["", f"FLOP limit per batch ({a['batch']} images x {r['timesteps']} timesteps): "
              f"multiply-adds dense {lim['macs_dense']:.3g}, pruned {lim['macs_sparse']:.3g}: **{lim['weight_limit']:.2f}x**; "
              f"with zero inputs skipped too (x measured input density per layer): dense {lim['ops_dense_skip_inputs']:.3g}, "
              f"pruned {lim['ops_sparse_skip_both']:.3g}: **{lim['both_limit']:.2f}x**.", "",
              "| layer | weight density | input density dense | input density pruned | MACs dense | MACs pruned | ops dense, zero inputs skipped | ops pruned, both skipped |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in lim["layers"]:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {e['layer']} | {e['weight_density']:.3f} | {fmt(e['input_density_dense'])} | {fmt(e['input_density_sparse'])} | "
                     f"{e['macs_dense']:.3g} | {e['macs_sparse']:.3g} | {e['ops_dense_skip_inputs']:.3g} | {e['ops_sparse_skip_both']:.3g} |")
    dense_key = r["dense_best"]
    before_key = "dense: tvm, unfused LIF"
    lines += ["", f"Times (median of {a['repeats']} interleaved rounds after {a['warmup']}; wall and process CPU time; "
              "speed-up over the dense model on the same runtime and LIF kernels: the unfused-LIF rows over "
              f"the dense unfused-LIF row, the other TVM rows over the fastest dense option, `{dense_key}`):", "",
              "| runner | wall ms | CPU ms | speed-up (wall) | speed-up (CPU) | spike mismatches vs PyTorch |", "|---|---:|---:|---:|---:|---:|"]
    for name, v in t.items():
        base = (t[before_key] if "unfused LIF" in name else t[dense_key]) if "tvm" in name else t["dense: onnxruntime"]
        lines.append(f"| {name} | {v['wall_ms']:.2f} | {v['cpu_ms']:.2f} | {base['wall_ms'] / v['wall_ms']:.2f}x | "
                     f"{base['cpu_ms'] / max(v['cpu_ms'], 1e-9):.2f}x | {r['mismatches'][name]} |")
    pt, sp = r["pair_times"], "sparse: tvm default"
    lines += ["", f"**Pruned over dense, each on its fastest TVM option, the two timed on their own ({a['repeats']} "
              f"interleaved rounds after {a['warmup']}, CPU time): {pt[dense_key]['cpu_ms']:.2f} / {pt[sp]['cpu_ms']:.2f} ms = "
              f"{pt[dense_key]['cpu_ms'] / pt[sp]['cpu_ms']:.2f}x** (wall {pt[dense_key]['wall_ms'] / pt[sp]['wall_ms']:.2f}x). "
              f"In the rounds of every runner above (each call after onnxruntime's and the other runners'): "
              f"{t[dense_key]['cpu_ms']:.2f} / {t[sp]['cpu_ms']:.2f} ms = {t[dense_key]['cpu_ms'] / t[sp]['cpu_ms']:.2f}x "
              f"(wall {t[dense_key]['wall_ms'] / t[sp]['wall_ms']:.2f}x); against `dense: tvm default` "
              f"{t['dense: tvm default']['cpu_ms'] / t[sp]['cpu_ms']:.2f}x. Fastest dense option: {dense_key} "
              f"({r['dense_best_path']})."]
    lines += ["", f"Fused LIF kernels over the unfused ones (CPU time): dense {t[before_key]['cpu_ms'] / t['dense: tvm default']['cpu_ms']:.2f}x, "
              f"pruned {t['sparse: tvm, unfused LIF']['cpu_ms'] / t['sparse: tvm default']['cpu_ms']:.2f}x; LIF populations fused: "
              + ", ".join(f"{k} {len(v)} ({sum(f['bias'] for f in v)} with the bias add, {sum('producer' in f for f in v)} "
                          "with the weight layer feeding it)" for k, v in r["fused_lif"].items()) + " (default modules)."]
    lines += ["", "TVM default path: " + "; ".join(f"{k}: {v}" for k, v in r["paths"].items()) + " (LIF recurrences as fused kernels)",
              f"CSR kernels chosen on the pruned model: {len(r['csr_layers'])}.", "",
              "Layers on the kernels compiled into the module (`kernels.event`; call_tir, no choice at run time):", "",
              "| model | op | weight | weight density | nonzero weights | kernel | fused with its LIF into |", "|---|---|---|---:|---:|---|---|"]
    for k, layers in r["event_layers"].items():
        folded = {f["layer"]: f["kernel"] for f in r.get("residual", {}).get(k, [])}
        then = lambda name: f", in {folded[name]} with the bias and residual adds" if name in folded else ""  # noqa: E731
        into = {f["producer"]: f["name"] + (f" ({f['units']} of its {f['shape'][-1]} neurons: those the next layer reads)"
                                            if "units" in f else "") + then(f["name"]) for f in r["fused_lif"][k] if "producer" in f}
        into.update({f["consumer"]: f"{f['name']} (after the LIF){then(f['name'])}" for f in r["fused_lif"][k] if "consumer" in f})
        into.update({e["name"]: f"- (bias and residual adds in {folded[e['name']]}'s store)" for e in layers if e["name"] in folded})
        for e in layers:
            lines.append(f"| {k} | {e['op']} | {'x'.join(map(str, e['weight']))} | {e['weight_density']:.4f} | {e['nnz']} | {e['name']} | "
                         f"{into.get(e['name'], '-')} |")
    lines += ["", "Products summed over an axis as one kernel (`kernels.attention`): " + "; ".join(
        f"{k} {', '.join(p['name'] + ' ' + 'x'.join(map(str, p['shape'])) + ' over axis ' + str(p['axis']) for p in v) or 'none'}"
        for k, v in r.get("product_sum", {}).items()) + "."]
    lines += ["", "Spike kernels left to the adaptive packed functions in the pruned model's default module "
              "(calls: warm-up, check and timed runs):", "",
              "| kernel | weight | max density (a spike kernel beats BLAS) | threshold | calls |", "|---|---|---:|---|---|"]
    for k in r["sparse_kernels"]:
        lines.append(f"| {k['op']} | {'x'.join(map(str, k['weight']))} | {k['max_density']:.3f} | {k['source']} | "
                     + ", ".join(f"{p} {n}" for p, n in k["calls"].items()) + " |")
    s = r["profile_split"]
    lines += ["", "Where the time goes (Relax VM instrument: process CPU ms per model call, mean of 10, by callee; dense: "
              f"`{dense_key}`, sparse: `sparse: tvm default`):", "",
              "| model | total | weight-layer kernels | weight layer + LIF kernels | fused LIF kernels | everything else |",
              "|---|---:|---:|---:|---:|---:|"]
    for k in ("dense", "sparse", "sparse, fusions off"):
        lines.append(f"| {k} | {s[k]['total_ms']:.2f} | {s[k]['weight_kernels_ms']:.2f} | {s[k]['weight_lif_ms']:.2f} | "
                     f"{s[k]['lif_ms']:.2f} | {s[k]['other_ms']:.2f} |")
    free = s["sparse"]["total_ms"] - s["sparse, fusions off"]["weight_kernels_ms"]
    lines += ["", f"Bound from what pruning cannot remove (the fused kernels hide the split, so it is taken from the pruned "
              f"module with the fusions off): dense total / pruned time outside the weight kernels there = "
              f"**{s['dense']['total_ms'] / max(s['sparse, fusions off']['rest_ms'], 1e-9):.2f}x**, the bound of that module "
              f"(the fusions remove work outside the weight kernels as well); with the fusions, the "
              f"default pruned total less those weight kernels' time ({free:.2f} ms) gives "
              f"{s['dense']['total_ms'] / max(free, 1e-9):.2f}x (both even with free weight layers).", ""]
    for k in ("dense", "sparse", "sparse, fusions off"):
        lines += [f"Top calls, {k}:", "", "| call | ms | calls |", "|---|---:|---:|"]
        for row in r["profiles"][k][:16]:
            lines.append(f"| {row['name']} | {row['us'] / 1e3:.3f} | {row['calls']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
