"""MNIST-1D dense baselines: a spiking 1-D preset against its non-spiking twin of the same size,
trained the same way, several seeds; firing rates of the spiking model. Prints a table and writes
a JSON record (atomically) with every seed's figures.

    .venv/bin/python benchmarks/mnist1d_baselines.py [--model sdt-1d-tiny] [--seeds 3] [--epochs 40]
        [--batch-size 128] [--lr 2e-3] [--jobs 3] [--out runs/mnist1d-baselines.json] [--md table.md]

The twin (``--twin relu``, the default) is the same network with every LIF replaced by a ReLU:
the same layers and parameter count (an sLIF model's thresholds and leaks aside), the same
attention arithmetic (the spike-driven mask ``ReLU(sum_tokens(q * k))``, Spikformer's
``ReLU(q·kᵀ·v · scale)``), real-valued activations instead of spikes. With no state a ReLU network
gives the same output at every step, so the twin runs at T = 1 (the same function as at T = 4, a
quarter of the cost). Both train with AdamW, a cosine schedule and the same batches (same seed);
``--train-limit`` cuts the training split for a quick look. The gap between them is what spiking
costs at this size; the README lists the published baselines (logistic regression, MLP, GRU, CNN).

``--model`` takes any 1-D preset: ``sdt-1d-tiny`` (the default), ``spikformer-1d-tiny``, and the
conv- and MLP-only ``conv-1d-tiny`` and ``mlp-1d-tiny`` (their twins: the same stem and head with
ReLUs). Each run writes its own record and table; the README's table gathers them.

``--jobs N`` trains N of the (seed, model) runs at once, each in its own process (``--threads``);
the same runs as one after the other (each is seeded on its own; only float rounding can differ
with the thread count); a run's ``seconds`` is its own wall time while it shared the cores. ``--md`` writes
the Markdown table (per-seed accuracies, mean ± standard deviation, the gap, firing rates per
layer, parameters, epochs, wall times, machine and command).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stdeploy.data import load_dataset  # noqa: E402
from stdeploy.errors import ConfigError  # noqa: E402
from stdeploy.files import atomic_write_text  # noqa: E402
from stdeploy.models import build_model, direct_encode  # noqa: E402
from stdeploy.neurons import neurons_of  # noqa: E402
from stdeploy.train import TrainConfig, train  # noqa: E402
from stdeploy.timing import describe_machine  # noqa: E402

TWINS = ("relu",)
RATE_SAMPLES = 256  # test sequences the firing rates are measured on


def relu_twin(spec: str) -> nn.Module:
    """The preset with every LIF/sLIF replaced by ``nn.ReLU`` and T = 1 (module docstring)."""
    model = build_model(spec, timesteps=1)
    for name in list(neurons_of(model)):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.ReLU())
    if neurons_of(model):
        raise ConfigError(f"{spec}: neurons left in the twin: {list(neurons_of(model))}")
    return model


@torch.no_grad()
def firing_rates(model: nn.Module, dataset, samples: int = RATE_SAMPLES) -> dict[str, float]:
    """Mean spike rate of every LIF over the first ``samples`` test sequences and all T steps."""
    x = torch.stack([dataset[i][0] for i in range(min(samples, len(dataset)))])
    rates: dict[str, float] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: rates.__setitem__(name, float(out.float().mean())))
             for name, m in neurons_of(model).items()]
    was_training = model.training
    try:
        model.eval()(direct_encode(x, model.cfg.timesteps))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rates


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def load_data(args):
    data = load_dataset("mnist1d", args.cache)
    if args.train_limit:
        data = type(data)(**{**data.__dict__, "train": torch.utils.data.Subset(data.train, range(args.train_limit))})
    return data


def run_one(args, seed: int, kind: str, threads: int | None = None) -> dict:
    """Train one model (``"spiking"`` or the twin) with one seed; its figures. With ``--save DIR``
    the run checkpoints after every epoch to ``DIR/seed<seed>-<kind>`` (its history so far included)."""
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormal floats can slow a CPU run of a small model by more than an order of magnitude
    data = load_data(args)
    torch.manual_seed(seed)
    model = build_model(args.model) if kind == "spiking" else relu_twin(args.model)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      seed=seed, device=args.device)
    t0 = time.perf_counter()
    out = Path(args.save) / f"seed{seed}-{kind}" if args.save else None
    result = train(model, data, cfg, out, progress=not args.quiet and not threads)
    entry = {"test_accuracy": result.test_accuracy, "best_test_accuracy": max(h["test_accuracy"] for h in result.history),
             "history": [round(h["test_accuracy"], 4) for h in result.history],
             "params": params(model), "timesteps": model.cfg.timesteps, "epochs": result.epochs,
             "seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()}
    if kind == "spiking":
        rates = firing_rates(model, data.test)
        entry["firing_rates"] = rates
        entry["mean_firing_rate"] = statistics.mean(rates.values())
        entry["silent_layers"] = [n for n, r in rates.items() if r == 0]
    print(f"seed {seed} {kind:<8} test {entry['test_accuracy']:.4f} (best {entry['best_test_accuracy']:.4f}) "
          f"params {entry['params']} T={entry['timesteps']} {entry['seconds']} s", flush=True)
    return entry


def summarize(records: list[dict], twin: str) -> dict:
    """Mean and standard deviation over the seeds of each model's test accuracy and of the paired
    gap (spiking - twin, per seed)."""
    summary = {}
    for kind in ("spiking", twin):
        m, s = mean_std([r[kind]["test_accuracy"] for r in records])
        summary[kind] = {"mean": m, "std": s, "params": records[0][kind]["params"]}
    gaps = [r["spiking"]["test_accuracy"] - r[twin]["test_accuracy"] for r in records]
    summary["spiking_minus_twin"] = dict(zip(("mean", "std"), mean_std(gaps)))
    return summary


def machine() -> str:
    """The CPU model and core count of this machine."""
    return describe_machine()

def run(args) -> dict:
    data = load_data(args)
    kinds = ("spiking", args.twin)
    jobs = [(seed, kind) for kind in kinds for seed in range(args.seeds)]  # the long (spiking) runs first
    t0 = time.perf_counter()
    if args.jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = {job: pool.submit(run_one, args, *job, args.threads) for job in jobs}
            done = {job: f.result() for job, f in futures.items()}
    else:
        done = {job: run_one(args, *job) for job in jobs}
    records = [{"seed": seed, **{kind: done[seed, kind] for kind in kinds}} for seed in range(args.seeds)]
    summary = summarize(records, args.twin)
    return {"model": args.model, "twin": args.twin, "seeds": args.seeds, "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "weight_decay": args.weight_decay, "train_samples": len(data.train), "test_samples": len(data.test),
            "threads": args.threads if args.jobs > 1 else torch.get_num_threads(), "jobs": args.jobs,
            "wall_seconds": round(time.perf_counter() - t0, 1), "machine": machine(),
            "command": "python benchmarks/mnist1d_baselines.py " + " ".join(args.argv),
            "summary": summary, "records": records}


def markdown(report: dict) -> str:
    """The report as a Markdown table (module docstring)."""
    twin, recs, s = report["twin"], report["records"], report["summary"]
    pct = lambda x: f"{x * 100:.1f}"  # noqa: E731
    lines = [f"# MNIST-1D dense baselines: {report['model']} and its {twin} twin", "",
             f"{report['seeds']} seeds, {report['epochs']} epochs, batch {report['batch_size']}, AdamW lr {report['lr']} "
             f"(weight decay {report['weight_decay']}), cosine schedule; {report['train_samples']} training / "
             f"{report['test_samples']} test sequences. Test accuracy after the last epoch (%).", "",
             "| model | T | params | " + " | ".join(f"seed {r['seed']}" for r in recs) + " | mean ± std | wall time per run (s) |",
             "|---|---|---|" + "---|" * len(recs) + "---|---|"]
    for kind in ("spiking", twin):
        first = recs[0][kind]
        lines.append(f"| {kind} | {first['timesteps']} | {first['params']:,} | "
                     + " | ".join(pct(r[kind]["test_accuracy"]) for r in recs)
                     + f" | {pct(s[kind]['mean'])} ± {pct(s[kind]['std'])} | "
                     + ", ".join(f"{r[kind]['seconds']:.0f}" for r in recs) + " |")
    if all("history" in r[kind] for r in recs for kind in ("spiking", twin)):
        epochs = len(recs[0]["spiking"]["history"])
        lines += ["", "Test accuracy by epoch (mean over the seeds, %):", "",
                  "| epoch | " + " | ".join(str(e + 1) for e in range(epochs)) + " |", "|---|" + "---|" * epochs]
        for kind in ("spiking", twin):
            lines.append(f"| {kind} | " + " | ".join(pct(statistics.mean(r[kind]["history"][e] for r in recs))
                                                   for e in range(epochs)) + " |")
    gap = s["spiking_minus_twin"]
    lines += ["", f"Cost of spiking (spiking - {twin}, paired by seed): {gap['mean'] * 100:+.1f} ± {gap['std'] * 100:.1f} points.", "",
              f"Firing rates of the spiking model (mean spike probability per neuron and step, first {RATE_SAMPLES} test sequences):", "",
              "| layer | " + " | ".join(f"seed {r['seed']}" for r in recs) + " |", "|---|" + "---|" * len(recs)]
    for name in recs[0]["spiking"]["firing_rates"]:
        lines.append(f"| {name} | " + " | ".join(f"{r['spiking']['firing_rates'][name]:.3f}" for r in recs) + " |")
    lines.append("| mean | " + " | ".join(f"{r['spiking']['mean_firing_rate']:.3f}" for r in recs) + " |")
    lines += ["", f"Machine: {report['machine']}; {report['jobs']} run(s) at once, "
              f"{report['threads']} torch thread(s) each, on cores shared with other jobs (wall times are indicative). "
              f"Whole command: {report['wall_seconds'] / 60:.0f} min.", "", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sdt-1d-tiny", help="a 1-D preset or config file")
    ap.add_argument("--twin", choices=TWINS, default="relu")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--train-limit", type=int, default=None, help="only the first N training sequences (a quick look)")
    ap.add_argument("--cache", default=None, help="MNIST-1D cache folder (default: $STDEPLOY_CACHE_DIR/mnist1d or ~/.cache)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each process under --jobs")
    ap.add_argument("--save", default=None, help="folder for each run's checkpoint, written after every epoch")
    ap.add_argument("--out", default=None, help="JSON record of every seed (written atomically)")
    ap.add_argument("--md", default=None, help="Markdown table of the results (written atomically)")
    ap.add_argument("--render", default=None, metavar="JSON", help="only write --md from a record written by --out")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.render:
        if not args.md:
            print("mnist1d_baselines: --render needs --md", file=sys.stderr)
            return 2
        try:
            report = json.loads(Path(args.render).read_text())
        except (OSError, ValueError) as err:
            print(f"mnist1d_baselines: --render {args.render}: {err}", file=sys.stderr)
            return 2
        atomic_write_text(args.md, markdown(report))
        print(f"table: {args.md}")
        return 0
    if args.seeds < 1 or args.epochs < 1 or args.jobs < 1 or args.threads < 1:
        print("mnist1d_baselines: --seeds, --epochs, --jobs and --threads must be >= 1", file=sys.stderr)
        return 2
    try:
        report = run(args)
    except ConfigError as err:  # the library's errors are ValueErrors with one line
        print(f"mnist1d_baselines: {err}", file=sys.stderr)
        return 2
    s = report["summary"]
    print(f"\n{args.model} on MNIST-1D, {args.seeds} seed(s), {args.epochs} epochs, {report['train_samples']} training sequences")
    print(f"{'model':<10} {'params':>8} {'test accuracy':>22}")
    for kind in ("spiking", args.twin):
        print(f"{kind:<10} {s[kind]['params']:>8} {s[kind]['mean'] * 100:>13.2f} ± {s[kind]['std'] * 100:.2f} %")
    gap = s["spiking_minus_twin"]
    print(f"spiking - {args.twin}: {gap['mean'] * 100:+.2f} ± {gap['std'] * 100:.2f} points")
    rates = report["records"][0]["spiking"]["firing_rates"]
    print("firing rates (seed 0): " + ", ".join(f"{n} {r:.3f}" for n, r in rates.items()))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1))
        print(f"record: {args.out}")
    if args.md:
        atomic_write_text(args.md, markdown(report))
        print(f"table: {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
