"""MNIST-1D dense baselines: a spiking 1-D preset against its non-spiking twin of the same size,
trained the same way, several seeds; firing rates of the spiking model. Prints a table and writes
a JSON record (atomically) with every seed's figures.

    .venv/bin/python benchmarks/mnist1d_baselines.py [--model sdt-1d-tiny] [--seeds 3] [--epochs 40]
        [--batch-size 128] [--lr 2e-3] [--out runs/mnist1d-baselines.json]

The twin (``--twin relu``, the default) is the same network with every LIF replaced by a ReLU:
the same layers and parameter count (an sLIF model's thresholds and leaks aside), the same
attention arithmetic (the spike-driven mask ``ReLU(sum_tokens(q * k))``, Spikformer's
``ReLU(q·kᵀ·v · scale)``), real-valued activations instead of spikes. With no state a ReLU network
gives the same output at every step, so the twin runs at T = 1 (the same function as at T = 4, a
quarter of the cost). Both train with AdamW, a cosine schedule and the same batches (same seed);
``--train-limit`` cuts the training split for a quick look. The gap between them is what spiking
costs at this size; issue 21 lists the published baselines (logistic regression, MLP, GRU, CNN).
"""

from __future__ import annotations

import argparse
import json
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


def run(args) -> dict:
    data = load_dataset("mnist1d", args.cache)
    if args.train_limit:
        data = type(data)(**{**data.__dict__, "train": torch.utils.data.Subset(data.train, range(args.train_limit))})
    records = []
    for seed in range(args.seeds):
        row = {"seed": seed}
        for kind in ("spiking", args.twin):
            torch.manual_seed(seed)
            model = build_model(args.model) if kind == "spiking" else relu_twin(args.model)
            cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                              seed=seed, device=args.device)
            t0 = time.perf_counter()
            result = train(model, data, cfg, None, progress=not args.quiet)
            entry = {"test_accuracy": result.test_accuracy, "best_test_accuracy": max(h["test_accuracy"] for h in result.history),
                     "params": params(model), "timesteps": model.cfg.timesteps, "epochs": result.epochs,
                     "seconds": round(time.perf_counter() - t0, 1)}
            if kind == "spiking":
                rates = firing_rates(model, data.test)
                entry["firing_rates"] = rates
                entry["mean_firing_rate"] = statistics.mean(rates.values())
                entry["silent_layers"] = [n for n, r in rates.items() if r == 0]
            row[kind] = entry
            print(f"seed {seed} {kind:<8} test {entry['test_accuracy']:.4f} (best {entry['best_test_accuracy']:.4f}) "
                  f"params {entry['params']} T={entry['timesteps']} {entry['seconds']} s", flush=True)
        records.append(row)
    summary = {}
    for kind in ("spiking", args.twin):
        m, s = mean_std([r[kind]["test_accuracy"] for r in records])
        summary[kind] = {"mean": m, "std": s, "params": records[0][kind]["params"]}
    gaps = [r["spiking"]["test_accuracy"] - r[args.twin]["test_accuracy"] for r in records]
    summary["spiking_minus_twin"] = dict(zip(("mean", "std"), mean_std(gaps)))
    return {"model": args.model, "twin": args.twin, "seeds": args.seeds, "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "weight_decay": args.weight_decay, "train_samples": len(data.train), "test_samples": len(data.test),
            "threads": torch.get_num_threads(), "summary": summary, "records": records}


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
    ap.add_argument("--out", default=None, help="JSON record of every seed (written atomically)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.epochs < 1:
        print("mnist1d_baselines: --seeds and --epochs must be >= 1", file=sys.stderr)
        return 2
    torch.set_flush_denormal(True)  # denormal floats can slow a CPU run of a small model by more than an order of magnitude
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
