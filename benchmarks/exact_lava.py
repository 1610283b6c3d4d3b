"""Lava's fixed point on an exact-mode model: output spikes and logits against PyTorch on the same
inputs, for the export's default 8-bit input contract (Lava fits the finest input grid its 24-bit
registers hold: :func:`stdeploy.targets.lava.fixed_point.fit_input_contract`) and for the
digits' own 4-bit grid.

Default model: the one of ``tests/export/test_exact.py`` (sdt, 4 blocks, D = 32, random weights,
BatchNorm statistics estimated on 256 digits, then the exact mode), on digits test images. With
``--checkpoint`` an exact-mode checkpoint instead (its own input contract, e.g. MNIST-1D's signed
one), on ``--data``; then also the exact model's test accuracy in PyTorch on the export's contract
and on the grid Lava runs. Usage::

    python benchmarks/exact_lava.py [--samples 3]
    python benchmarks/exact_lava.py --checkpoint runs/m1d-exact --data mnist1d --samples 3
    python benchmarks/exact_lava.py --model sdt-8-512 --samples 1 [--static] [--batch] [--min-available-gb 5]

``--model sdt-8-512``: the exact ``sdt-8-512`` that ``benchmarks/export_scale.py --mode exact``
exports (the same seed and steps: random weights, BatchNorm statistics estimated on 3 batches of 8
noise images, then the exact mode), its NIR graph written as the export writes it (metadata
``quantize.mode = "exact"``, the default contract [0, 1] on 2^-8), on CIFAR-shaped noise images
in [0, 1] (seeded; no CIFAR is read). First the static check: per LIF population, the bits its
proven range needs in Loihi's 24-bit ``u``/``v`` on the export's grid, on the grid the plan fits
and on the coarsest (:func:`stdeploy.targets.lava.fixed_point.input_grids`), beside the bits the
samples actually use (from the PyTorch reference's integer membranes, which Lava's equal while no
register wraps) and the firing rates. Then (unless ``--static``) the run: the plan lowered with
``unproven="guard"`` (populations past their proven range run under a guard that stops the run at
the first ``u`` that would wrap), at batch 1 per sample (``--batch``: all samples in one batch), under a watchdog that ends the Lava
worker's process group when ``MemAvailable`` falls below ``--min-available-gb``; it reports the
Lava processes, wall time, the process tree's peak memory (summed PSS and RSS, sampled every
0.5 s) and output spikes and logits against PyTorch.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from stdeploy.checkpoint import load_checkpoint
from stdeploy.data import load_dataset
from stdeploy.export.exact import contract_metadata
from stdeploy.export.manifest import write_manifest
from stdeploy.export.nir_export import to_nir, write_nir
from stdeploy.export.validate import record_neurons
from stdeploy.models import build_model, direct_encode
from stdeploy.models.quantize import InputContract, deployable, input_contract_of, to_exact
from stdeploy.prune import recalibrate_bn
from stdeploy.targets.lava.fixed_point import UV_BITS, exact_membranes, input_grids
from stdeploy.targets.lava.graph import analyse, decay
from stdeploy.targets.lava.lowering import lower
from stdeploy.targets.lava.target import LavaRunnable, LavaTarget
from stdeploy.targets.lava.worker import group_members, group_memory, kill_group
from stdeploy.targets.profiles import load_profile
from stdeploy.timing import describe_machine


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(direct_encode(x, model.cfg.timesteps)).argmax(1) == y).float().mean())


def export_scale_exact(name: str) -> torch.nn.Module:
    """The exact checkpoint ``benchmarks/export_scale.py --mode exact`` makes of preset ``name``."""
    torch.manual_seed(0)
    model = build_model(name)
    c = model.cfg
    for bn in [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(direct_encode(torch.rand(8, c.in_channels, c.image_size, c.image_size), c.timesteps))
    return to_exact(model.eval()).eval()


class Watchdog:
    """Samples the Lava worker's process group every ``interval_s``: the number of its processes,
    their summed PSS and RSS (``/proc/PID/smaps_rollup``; PSS splits pages shared after ``fork``),
    and ``MemAvailable``; ends the group when ``MemAvailable`` falls below ``floor_gb`` (SIGKILL to
    every member but multiprocessing's resource tracker, which then unlinks the shared memory the
    others leave; the worker's parent sees the worker die and stops what remains)."""

    def __init__(self, runnable: LavaRunnable, floor_gb: float, interval_s: float = 0.5):
        self.runnable, self.floor_kb, self.interval_s = runnable, floor_gb * 2 ** 20, interval_s
        self.peak = {"pss_gb": 0.0, "rss_gb": 0.0, "processes": 0, "min_available_gb": math.inf}
        self.killed: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _meminfo(key: str) -> float:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])  # kB
        raise KeyError(key)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            proc = self.runnable.worker.proc
            avail = self._meminfo("MemAvailable")
            self.peak["min_available_gb"] = min(self.peak["min_available_gb"], avail / 2 ** 20)
            if proc is None:
                continue
            members = [pid for pid, state, _ in group_members(proc.pid) if state not in ("Z", "X")]
            rss, pss = group_memory(members)  # bytes
            self.peak["pss_gb"] = max(self.peak["pss_gb"], pss / 2 ** 30)
            self.peak["rss_gb"] = max(self.peak["rss_gb"], rss / 2 ** 30)
            self.peak["processes"] = max(self.peak["processes"], len(members))
            if avail < self.floor_kb and self.killed is None:
                self.killed = (f"MemAvailable {avail / 2 ** 20:.2f} GB < {self.floor_kb / 2 ** 20:g} GB with {len(members)} processes, "
                               f"PSS {pss / 2 ** 30:.2f} GB, RSS {rss / 2 ** 30:.2f} GB")
                kill_group(proc.pid)  # multiprocessing's resource tracker stays: it unlinks the shared memory left behind


def observed_bits(graph, info, membranes: dict, records: dict) -> dict[str, float]:
    """Per population, the bits (sign included) the reference's actual values take in Lava's
    registers: ``64 d max|x| / G`` (``u``), ``64 max(-v) / G`` (``v`` below 0), at least 1 unit."""
    out = {}
    for name, m in membranes.items():
        d = float(np.max(decay(graph.nodes[name], info.dt)))
        r, grid = records[name], float(m["grid"])
        units = max(64 * d * float(r["input"].abs().max()) / grid, 64 * float((-r["membrane"]).clamp(min=0).max()) / grid, 1.0)
        out[name] = math.log2(units) + 1
    return out


def sdt_8_512(args) -> None:
    """``--model sdt-8-512``: the static register check, then (unless ``--static``) the guarded run."""
    t0 = time.perf_counter()
    exact = export_scale_exact("sdt-8-512")
    folded = deployable(exact)
    graph = to_nir(folded)
    graph.metadata["quantize"] = {"mode": "exact", **contract_metadata(InputContract())}
    info = analyse(graph)
    grids = input_grids(info)
    limit = UV_BITS  # Loihi's 24-bit u and v, sign included
    irreducible = {n for n, b in grids[-1][1].items() if b > limit}
    fitted, fitted_bits = next((c, b) for c, b in grids if {n for n, v in b.items() if v > limit} <= irreducible)
    own, own_bits = grids[0]
    c = exact.cfg
    torch.manual_seed(1)
    raw = torch.rand(args.samples, c.in_channels, c.image_size, c.image_size)
    x = direct_encode(fitted.apply(own.apply(raw)), c.timesteps)  # as the Lava source: the export's contract, then the fitted grid
    membranes = exact_membranes(graph, fitted)
    seen: dict[str, float] = {}
    counts: dict[str, float] = {}
    logits, head = [], []
    for i in range(0, args.samples, 2):  # the reference in chunks of 2 (every neuron recorded: about 150 MB a sample)
        with torch.no_grad():
            lg, records = record_neurons(folded, x[:, i:i + 2])
        for k, b in observed_bits(graph, info, membranes, records).items():
            seen[k] = max(seen.get(k, 0.0), b)
        for k, v in records.items():
            counts[k] = counts.get(k, 0.0) + float(v["spikes"].sum()) / v["spikes"][:, :1].numel()
        logits.append(lg)
        head.append(records["head.lif"]["spikes"])
        del records
    logits, head = torch.cat(logits), torch.cat(head, dim=1)
    rates = {k: v / args.samples for k, v in counts.items()}
    load = os.getloadavg()
    print(f"exact sdt-8-512 (benchmarks/export_scale.py's checkpoint, {sum(p.numel() for p in exact.parameters()) / 1e6:.1f} M "
          f"parameters), T = {c.timesteps}, {args.samples} CIFAR-shaped noise image(s) in [0, 1]; {describe_machine()}; "
          f"load average {load[0]:.1f}; static check {time.perf_counter() - t0:.0f} s")
    print(f"Loihi's u and v: 24 bits (sign included). Per LIF population, bits its proven range needs on the export's grid "
          f"2^-{own.frac_bits}, on the grid the plan fits (2^-{fitted.frac_bits}: the finest on which every population "
          f"that any grid proves is proven) and on the coarsest 2^-{grids[-1][0].frac_bits}; bits the samples use on 2^-{fitted.frac_bits}; "
          "firing rate on the samples")
    print(f"| population | 2^-{own.frac_bits} | 2^-{fitted.frac_bits} | 2^-{grids[-1][0].frac_bits} | used by the samples | firing rate |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in own_bits:
        mark = lambda b: f"**{b:.2f}**" if b > limit else f"{b:.2f}"  # noqa: E731
        print(f"| {name} | {mark(own_bits[name])} | {mark(fitted_bits[name])} | {mark(grids[-1][1][name])} | {mark(seen[name])} "
              f"| {rates[name]:.3f} |")
    over = sorted(irreducible, key=lambda n: -fitted_bits[n])
    print(f"populations past 24 bits on every input grid: {len(over)} of {len(own_bits)} "
          f"({min(fitted_bits[n] for n in over):.2f}-{max(fitted_bits[n] for n in over):.2f} bits; worst {over[0]})"
          if over else "every population fits on the fitted grid")
    print(f"bits the samples use: at most {max(seen.values()):.2f} ({max(seen, key=seen.get)}); firing rates "
          f"{min(rates.values()):.3f}-{max(rates.values()):.3f} (head {rates['head.lif']:.3f}); input density: the analog image "
          "at every step (1.0)")
    if args.static:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plan = lower(graph, "fixed", weight_bits=8, unproven="guard")
    procs = len(plan["procs"])
    guarded = [n for n, q in plan["quant"].items() if q.get("proven") is False]
    print(f"plan: {procs} Lava processes, depth {plan['depth']} ({c.timesteps + plan['depth']} steps), input grid "
          f"2^-{plan['input_contract']['frac_bits']}, {len(guarded)} populations guarded")
    runnable = LavaRunnable(plan=plan, in_shape=tuple(plan["in_shape"]), timeout_s=float(args.timeout_s),
                            info={"target": "lava", "mode": "fixed", "input_contract": plan["input_contract"]})
    spikes = head.numpy()
    diff, same_logits, walls = 0, True, []
    step = args.samples if args.batch else 1
    with runnable, Watchdog(runnable, args.min_available_gb) as dog:
        for i in range(0, args.samples, step):  # batch 1, or (--batch) all samples in one batch
            w0 = time.perf_counter()
            try:
                res = runnable.run(direct_encode(raw[i:i + step], c.timesteps).numpy())  # the source applies the contracts
            except Exception as err:  # reported with the figures measured up to the stop
                print(f"batch of {step} from sample {i}: the run stopped after {time.perf_counter() - w0:.0f} s: {type(err).__name__}: "
                      f"{str(err).splitlines()[0][:300]}" + (f"; watchdog: {dog.killed}" if dog.killed else ""))
                tail = [ln for ln in str(err).splitlines() if "OverflowError" in ln or "lava fixed mode" in ln]
                if tail:
                    print("  " + tail[-1][:400])
                break
            walls.append(time.perf_counter() - w0)
            ref, ref_logits = spikes[:, i:i + step], logits[i:i + step].numpy()
            diff += int((res.spikes != ref).sum())
            same_logits &= bool(np.array_equal(res.logits, ref_logits))
            print(f"batch of {step} from sample {i}: {int((res.spikes != ref).sum())} of {ref.size} output spikes differ, "
                  f"logits identical {np.array_equal(res.logits, ref_logits)}; wall {walls[-1]:.0f} s "
                  f"(Lava start {res.info['lava_compile_start_s']:.0f} s, steps {res.info['lava_steps_s']:.0f} s)")
    load = os.getloadavg()
    p = dog.peak
    print(f"run: {len(walls) * step} of {args.samples} sample(s) completed, {diff} output spikes differ, logits identical "
          f"{same_logits if walls else 'n/a'}; "
          f"peak {p['processes']} processes in the worker's group, PSS {p['pss_gb']:.2f} GB, RSS {p['rss_gb']:.2f} GB (summed), "
          f"MemAvailable down to {p['min_available_gb']:.2f} GB; this process's peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GB; whole command {time.perf_counter() - t0:.0f} s; "
          f"load average {load[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--checkpoint", default=None, help="an exact-mode checkpoint (default: the 4-block test model)")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--model", choices=["test", "sdt-8-512"], default="test",
                    help="sdt-8-512: export_scale.py's exact checkpoint on CIFAR-shaped noise (static check, then the guarded run)")
    ap.add_argument("--static", action="store_true", help="sdt-8-512: the register check only, no Lava run")
    ap.add_argument("--min-available-gb", type=float, default=5.0, help="sdt-8-512: stop the run below this MemAvailable")
    ap.add_argument("--timeout-s", type=float, default=3000.0, help="sdt-8-512: the Lava run's limit per sample")
    ap.add_argument("--batch", action="store_true", help="sdt-8-512: run the samples as one batch (default: batch 1 each)")
    args = ap.parse_args()
    if args.model == "sdt-8-512":
        return sdt_8_512(args)
    data = load_dataset(args.data)
    if args.checkpoint:
        exact = load_checkpoint(args.checkpoint).model.eval()
        own = input_contract_of(exact)
        if own is None:
            raise SystemExit(f"{args.checkpoint} is not an exact-mode checkpoint (stdeploy quantize first)")
        contracts = [own]
    else:
        torch.manual_seed(0)
        model = build_model("sdt-tiny", depth=4, embed_dim=32, heads=2, mlp_ratio=2.0)
        recalibrate_bn(model, torch.utils.data.Subset(data.train, range(256)), batch_size=64)
        exact = to_exact(model.eval()).eval()
        contracts = [InputContract(), InputContract(0.0, 1.0, 4)]
    folded = deployable(exact)
    raw = torch.stack([data.test[i][0] for i in range(args.samples)])
    profile = load_profile("loihi2-fixed")
    print(f"{args.checkpoint or 'sdt 4 blocks, D = 32 (tests/export/test_exact.py)'} on {args.samples} {args.data} test samples, "
          f"Lava fixed point ({profile.name}: PyLifModelBitAcc, 8-bit weights)")
    print("| export's input contract | grid Lava runs (fitted) | unproven populations | output spikes differing | logits identical "
          "| firing rates (min-max, head) |")
    print("|---|---|---|---:|---|---|")
    fitted_all = []
    with tempfile.TemporaryDirectory() as tmp:
        for contract in contracts:
            graph = to_nir(folded)
            graph.metadata["quantize"] = {"mode": "exact", **contract_metadata(contract)}
            path = Path(tmp) / f"frac{contract.frac_bits}"
            path.mkdir()
            write_nir(graph, path / "model.nir")
            write_manifest(path, {"artifacts": {"nir": {"file": "model.nir"}}})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                runnable = LavaTarget().compile(path, profile)
            fitted = InputContract.from_dict(runnable.info["input_contract"])
            fitted_all.append(fitted)
            x = direct_encode(fitted.apply(contract.apply(raw)), exact.cfg.timesteps)
            with runnable:
                res = runnable.run(direct_encode(raw, exact.cfg.timesteps).numpy())  # the source clips and rounds itself
            with torch.no_grad():
                logits, records = record_neurons(folded, x)
            rates = {k: float(v["spikes"].mean()) for k, v in records.items()}
            spikes = records["head.lif"]["spikes"].numpy()
            quant = runnable.info["quantisation"]
            unproven = ", ".join(k for k, v in quant.items() if "proven" in v and not v["proven"]) or "none"
            print(f"| [{contract.lo:g}, {contract.hi:g}] on 2^-{contract.frac_bits} | [{fitted.lo:g}, {fitted.hi:g}] on "
                  f"2^-{fitted.frac_bits} | {unproven} | {int((res.spikes != spikes).sum())} of {spikes.size} | "
                  f"{np.array_equal(res.logits, logits.numpy())} | {min(rates.values()):.3f}-{max(rates.values()):.3f}, "
                  f"{rates['head.lif']:.3f} |")
    if args.checkpoint:
        x_all = torch.stack([data.test[i][0] for i in range(len(data.test))])
        y_all = torch.tensor([int(data.test[i][1]) for i in range(len(data.test))])
        print(f"exact model's accuracy on all {len(x_all)} test samples (PyTorch): export's contract "
              f"{accuracy(exact, contracts[0].apply(x_all), y_all):.4f}, Lava's grid 2^-{fitted_all[0].frac_bits} "
              f"{accuracy(exact, fitted_all[0].apply(contracts[0].apply(x_all)), y_all):.4f}")


if __name__ == "__main__":
    main()
