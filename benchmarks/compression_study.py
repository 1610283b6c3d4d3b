"""Compression study on digits or MNIST-1D (``--data mnist1d``): does sLIF compensation beat plain
LIF after heavy pruning, and which intrinsic parameter (threshold, leak) does the work?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compression_study.py [--out runs/compression-study]
        [--families sdt-tiny,spikformer-tiny] [--seeds 5 | --seed-list 0,3] [--settings l1p95,dsp5]
        [--variants lif,slif-thr,slif-leak,slif-both] [--budgets 5,20] [--dense-epochs 15]
        [--penalty-epochs 2] [--data digits|mnist1d] [--quick] [--report-only]

``--data mnist1d`` runs the same protocol on MNIST-1D (4,000 / 1,000 sequences, generated offline
by the mnist1d package; default family ``sdt-1d-tiny``). The grid also knows ``l1p90`` and
``dsp30`` (the milder ratios of a first slice) and the controls ``l1p0`` and ``dsp100``: the
L1-penalised (or DSP's group-penalised) model with nothing cut (DSP at 100% of the parameters
factors no layer), BN recalibrated and fine-tuned like every other setting, so a variant's gain
there is not compensation of pruning (an undertrained dense model can gain from the extra epochs
and, with sLIF, from the extra intrinsic parameters). The default settings stay the six below.

Every setting also exists in the whole-model scope, named with ``-all`` (``l1p99-all``,
``dsp5-all``, the control ``l1p0-all``): the block linears, the embedding convolutions and the
classifier under one global budget (DSP factors the convolutions too, as ``LowRankConv2d``, where
that makes them smaller). Its penalty phase penalises the same layers, so it is cached apart
(``l1p-all-penalty-...``). Every record carries its ``scope`` and ``model_counts``: nonzero weights
and multiply-adds per sample per timestep of every weight layer after finalizing
(:func:`stdeploy.prune.weight_counts`). The report subtracts, seed by seed, the paired difference of
the control of the setting's method and scope (``l1p0``, ``l1p0-all``, ``dsp100``, ``dsp100-all``;
where that did not run, the L1P control of the scope, else the block-scope ``l1p0``, labelled) from
each setting's.

The grid: model families x seeds x settings (L1P at 95/98/99 % sparsity, DSP at 20/10/5 % of the
block parameters) x fine-tune variants (``lif``: weights only; ``slif-thr``, ``slif-leak``,
``slif-both``: sLIF learning its threshold, its leak, or both) x fine-tune budgets (epochs).

Protocol, per (family, seed):

1. Train the dense model once (``--dense-epochs``) and cache it as a checkpoint under
   ``OUT/models/``; an interrupted dense run resumes from its last epoch.
2. Per method, run the penalty phase once (``--penalty-epochs``: L1 for L1P, group norm for DSP)
   and cache the penalised model. Neither penalty depends on the target ratio, so the masks
   (95/98/99 %) and the rank cuts (20/10/5 %) of one method all come from the same penalised model.
3. Per setting: prune (one shot), record the accuracy, recalibrate BatchNorm statistics, record
   the accuracy again. BN's recovery is thereby not credited to the compensation.
4. Every (variant, budget) fine-tunes its own copy of that same pruned and recalibrated model, with
   the same data order (seeded), so paired differences (variant - lif, same seed) are the
   compensation alone. Each budget is a real fine-tune with its own cosine schedule. sLIF threshold
   and leak sit in their own optimizer group (lr x ``intrinsic_lr_scale``, no weight decay).
5. Every finished cell is appended at once as one JSON line to ``OUT/results.jsonl``; a rerun skips
   the cells already there, so the study resumes after an interruption. Two processes may share
   an ``OUT`` folder if they run disjoint families or seeds. A record names its dense, penalised
   and pruned models (SHA-256 of their state) and the CPU; a resume whose model differs from the
   one its records were made with (computed again elsewhere: another CPU's math libraries take
   other code paths, and the same seed then gives another model) is refused, as pairing its cells
   with theirs would compare different models (:func:`check_same_model`).

Then ``OUT/report.md``, ``OUT/summary.json`` and PNG plots are (re)built from ``results.jsonl``
(alone with ``--report-only``); the report's last section, LIF against sLIF by scope, holds the
README's study tables.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stdeploy.checkpoint import atomic_write, atomic_write_text, load_checkpoint, read_checkpoint_config, save_checkpoint  # noqa: E402
from stdeploy.data import DataSplit, load_dataset, make_loader  # noqa: E402
from stdeploy.errors import CheckpointError, ConfigError  # noqa: E402
from stdeploy.models import build_model, clone_model, direct_encode  # noqa: E402
from stdeploy.neurons import SLIF, neurons_of  # noqa: E402
from stdeploy.prune import ALL_LAYERS, CompensationConfig, PruneConfig, make_pruner, recalibrate_bn, weight_counts  # noqa: E402
from stdeploy.prune.compensate import convert_neurons  # noqa: E402
from stdeploy.prune.dsp import DEFAULT_GROUP  # noqa: E402
from stdeploy.prune.l1p import DEFAULT_L1  # noqa: E402
from stdeploy.timing import cpu_model  # noqa: E402
from stdeploy.train import TrainConfig, param_groups, train  # noqa: E402

# ----------------------------------------------------------------------------- the grid
FAMILIES = ("sdt-tiny", "spikformer-tiny")
DATA_FAMILIES = {"digits": FAMILIES, "mnist1d": ("sdt-1d-tiny", "spikformer-1d-tiny")}  # presets per --data, default first
KNOWN_FAMILIES = tuple(f for fams in DATA_FAMILIES.values() for f in fams)
SETTINGS: dict[str, PruneConfig] = {
    "l1p0": PruneConfig(method="l1p", sparsity=0.0),   # the control: the same pipeline with nothing cut
    "l1p90": PruneConfig(method="l1p", sparsity=0.90),
    "l1p95": PruneConfig(method="l1p", sparsity=0.95),
    "l1p98": PruneConfig(method="l1p", sparsity=0.98),
    "l1p99": PruneConfig(method="l1p", sparsity=0.99),
    "dsp30": PruneConfig(method="dsp", param_ratio=0.30),
    "dsp20": PruneConfig(method="dsp", param_ratio=0.20),
    "dsp10": PruneConfig(method="dsp", param_ratio=0.10),
    "dsp5": PruneConfig(method="dsp", param_ratio=0.05),
    "dsp100": PruneConfig(method="dsp", param_ratio=1.0),   # DSP's control: its group penalty, nothing factored
}
# The whole-model scope: every setting again with the suffix ``-all``, pruning the block linears,
# the embedding convolutions and the classifier (``PruneConfig(layers=ALL_LAYERS)``; DSP factors the
# convolutions too where their factors are smaller; records made before that left them dense). Its
# penalty phase penalises those same layers, so it has its own cached penalised model.
SCOPE_SUFFIX = "-all"
SETTINGS.update({name + SCOPE_SUFFIX: dataclasses.replace(pcfg, layers=ALL_LAYERS) for name, pcfg in list(SETTINGS.items())})
DEFAULT_SETTINGS = ("l1p95", "l1p98", "l1p99", "dsp20", "dsp10", "dsp5")  # the digits grid
METHOD_PENALTY = {"l1p": DEFAULT_L1, "dsp": DEFAULT_GROUP}  # neither depends on the target ratio


@dataclass(frozen=True)
class Variant:
    name: str
    neuron: str            # "lif" (weights only) or "slif"
    learn_threshold: bool
    learn_leak: bool


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("lif", "lif", False, False),
    Variant("slif-thr", "slif", True, False),
    Variant("slif-leak", "slif", False, True),
    Variant("slif-both", "slif", True, True),
)}
BASELINE = "lif"

THRESHOLD_EDGES = [i * 0.1 for i in range(31)]   # 30 bins over [0, 3]; outside counted apart
LEAK_EDGES = [i / 30 for i in range(31)]         # decay d = dt/tau in (0, 1): 30 bins over [0, 1]

RESULTS, REPORT, SUMMARY = "results.jsonl", "report.md", "summary.json"


@dataclass(frozen=True)
class StudyConfig:
    families: tuple[str, ...] = FAMILIES
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    settings: tuple[str, ...] = DEFAULT_SETTINGS
    variants: tuple[str, ...] = tuple(VARIANTS)
    budgets: tuple[int, ...] = (5, 20)    # fine-tune epochs; each its own run and cosine schedule
    dense_epochs: int = 15
    penalty_epochs: int = 2
    dense_lr: float = 2e-3                 # TrainConfig's default
    lr: float = 1e-3                       # fine-tune and penalty lr of the weights (CompensationConfig's default)
    intrinsic_lr_scale: float = 20.0       # sLIF threshold / leak lr = lr x this
    batch_size: int = 64
    data: str = "digits"                   # "digits" or "mnist1d" (each split is fixed: seed 0 / the canonical arguments);
                                           # a run on a cut of them labels it, e.g. "digits[:160,:80]"
    device: str = "cpu"                    # where training runs (cpu, cuda); cuda trains in fp32 (no AMP, no TF32)

    def __post_init__(self):
        problems = []
        data = self.data.split("[", 1)[0]  # a label: "digits", or "digits[:160,:80]" for a cut (tests)
        if data not in DATA_FAMILIES:
            problems.append(f"unknown data {self.data!r}; known: {', '.join(DATA_FAMILIES)}")
        families = DATA_FAMILIES.get(data, KNOWN_FAMILIES)
        for kind, chosen, known in (("family", self.families, families), ("setting", self.settings, SETTINGS),
                                    ("variant", self.variants, VARIANTS)):
            bad = [c for c in chosen if c not in known]
            if bad:
                where = f" for --data {self.data}" if kind == "family" else ""
                problems.append(f"unknown {kind} {', '.join(map(repr, bad))}{where}; known: {', '.join(known)}")
            if not chosen:
                problems.append(f"no {kind} selected")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            problems.append(f"seeds must be integers >= 0, got {list(self.seeds)}")
        if not self.budgets or any(not isinstance(b, int) or b < 1 for b in self.budgets):
            problems.append(f"budgets must be integers >= 1 (fine-tune epochs), got {list(self.budgets)}")
        if not (isinstance(self.dense_epochs, int) and self.dense_epochs >= 1):
            problems.append(f"dense epochs must be an integer >= 1, got {self.dense_epochs!r}")
        if not (isinstance(self.penalty_epochs, int) and self.penalty_epochs >= 0):
            problems.append(f"penalty epochs must be an integer >= 0, got {self.penalty_epochs!r}")
        if problems:
            raise ConfigError("invalid study config: " + "; ".join(problems))

    def protocol(self) -> dict:
        """What a result depends on besides its cell key: records from another protocol must not
        be mixed into the same results file."""
        return {"data": self.data, "dense_epochs": self.dense_epochs, "penalty_epochs": self.penalty_epochs,
                "dense_lr": self.dense_lr, "lr": self.lr, "intrinsic_lr_scale": self.intrinsic_lr_scale,
                "batch_size": self.batch_size}


QUICK = dict(seeds=(0,), settings=("l1p99", "dsp5"), budgets=(1,), dense_epochs=2, penalty_epochs=1)


def setting_scope(setting: str) -> str:
    """``"all"`` for a whole-model setting (``l1p99-all``), else ``"blocks"``."""
    return "all" if setting.endswith(SCOPE_SUFFIX) else "blocks"


def control_of(setting: str) -> str:
    """The nothing-cut control of a setting's method and scope: ``l1p0`` / ``l1p0-all`` (L1P: its
    L1 penalty phase, nothing pruned) or ``dsp100`` / ``dsp100-all`` (DSP: its group penalty phase,
    every layer left dense)."""
    suffix = SCOPE_SUFFIX if setting_scope(setting) == "all" else ""
    return ("dsp100" if SETTINGS[setting].method == "dsp" else "l1p0") + suffix


def cell_key(rec: dict) -> tuple:
    return (rec["family"], int(rec["seed"]), rec["setting"], rec["variant"], int(rec["budget"]))


# ----------------------------------------------------------------------------- results file
def load_records(path: Path) -> list[dict]:
    """Every valid record of ``results.jsonl``, later duplicates of a cell replacing earlier ones.
    A line that is not valid JSON (a write cut short) is skipped with a warning."""
    if not path.is_file():
        return []
    by_key: dict[tuple, dict] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key = cell_key(rec)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            warnings.warn(f"{path}:{i}: skipping unreadable record ({err})", stacklevel=2)
            continue
        by_key[key] = rec
    return list(by_key.values())


def append_record(path: Path, rec: dict) -> None:
    """Append one JSON line with a single ``write`` on an ``O_APPEND`` descriptor, then fsync.
    If an earlier write was cut short (no final newline), start on a fresh line."""
    line = (json.dumps(rec, sort_keys=True, allow_nan=False) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_protocol(records: list[dict], cfg: StudyConfig, path: Path) -> None:
    want = cfg.protocol()
    for rec in records:
        have = rec.get("protocol")
        if have != want:
            diff = {k: (have or {}).get(k, None) for k in want if (have or {}).get(k, None) != want[k]}
            raise ConfigError(f"{path} holds results of another protocol (theirs {diff}, this run {({k: want[k] for k in diff})}); "
                              "use another --out, or the same protocol options")


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state (every tensor's name, dtype, shape and bytes, in name order): the
    same digest means the same model, bit for bit."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_same_model(records: list[dict], path: Path, what: str, belongs: Callable[[dict], bool], digest: str,
                     digest_field: str, measured: dict) -> None:
    """Refuse to add cells made from a model that is not the one the records it ``belongs`` with
    were made from.

    Every difference the study reports is paired on the same seed and pruned model. A stage
    computed again on another CPU (its math libraries take other code paths), on a GPU or by other
    code is another model, and pairing its cells with the old ones would compare different
    networks: the dense model per seed, the penalised model per seed, method and scope, the pruned
    and recalibrated model per seed and setting. Records carry each model's digest
    (``digest_field``); older ones are compared on what they measured of it (``measured``: record
    field -> this run's value, accuracies and per-layer firing rates, exactly), which can miss a
    model that happens to measure alike, and refuse the same model measured where its spikes come
    out otherwise."""
    for rec in filter(belongs, records):
        theirs = rec.get(digest_field)
        if theirs:
            if theirs == digest:
                continue
            detail = f"digest {digest[:12]} here, {theirs[:12]} in the records"
        else:
            differs = [k for k, v in measured.items() if rec.get(k) != v]
            if not differs:
                continue
            k = differs[0]
            detail = (f"{k} {measured[k]} here, {rec.get(k)} in the records" if not isinstance(measured[k], dict) else
                      f"{k} differs")
        raise ConfigError(f"{path}: the {what} is not the one its records were made with ({detail}; CPU {cpu_model()!r} here, "
                          f"{rec.get('cpu', 'not recorded')!r} there): paired differences would compare different models; "
                          "resume with the records' OUT/models/ on the machine that made them, or use another --out")


# ----------------------------------------------------------------------------- measurements
@torch.no_grad()
def measure(model: torch.nn.Module, dataset, batch_size: int = 256) -> tuple[float, dict[str, float]]:
    """Test accuracy and the mean spike rate of every LIF/sLIF layer (spikes per neuron per
    timestep, over all tokens / pixels and images), from forward hooks on the neurons."""
    totals: dict[str, list[float]] = {name: [0.0, 0.0] for name in neurons_of(model)}

    def hook(name):
        def record(_module, _inputs, out):
            totals[name][0] += float(out.sum())
            totals[name][1] += out.numel()
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in neurons_of(model).items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    try:
        for x, y in make_loader(dataset, batch_size, shuffle=False):
            logits = model(direct_encode(x.to(device), model.cfg.timesteps))
            correct += int((logits.argmax(1).cpu() == y).sum())
            total += y.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return correct / max(total, 1), {n: s / max(c, 1) for n, (s, c) in totals.items()}


def _stats(values: torch.Tensor) -> dict:
    v = values.detach().double().flatten()
    return {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max()),
            "std": float(v.std()) if v.numel() > 1 else 0.0, "n": int(v.numel())}


def histogram(values: torch.Tensor, edges: list[float]) -> dict:
    """Counts in the bins ``[edges[i], edges[i+1])`` (the last bin closed), plus counts outside."""
    v = values.detach().double().flatten()
    lo, hi = edges[0], edges[-1]
    inside = v[(v >= lo) & (v <= hi)]
    counts = torch.histc(inside, bins=len(edges) - 1, min=lo, max=hi) if inside.numel() else torch.zeros(len(edges) - 1)
    return {"edges": list(edges), "counts": [int(c) for c in counts], "below": int((v < lo).sum()), "above": int((v > hi).sum())}


def intrinsic_summary(model: torch.nn.Module) -> dict | None:
    """Per-layer min/mean/max/std of the learned thresholds and leaks (decay d = dt/tau) of every
    sLIF, and histograms over all neurons. None when the model has no sLIF."""
    slifs = {n: m for n, m in neurons_of(model).items() if isinstance(m, SLIF)}
    if not slifs:
        return None
    thr = {n: m.threshold.detach() for n, m in slifs.items()}
    leak = {n: m.decay.detach() for n, m in slifs.items()}
    return {"threshold": {n: _stats(v) for n, v in thr.items()}, "leak": {n: _stats(v) for n, v in leak.items()},
            "threshold_hist": histogram(torch.cat(list(thr.values())), THRESHOLD_EDGES),
            "leak_hist": histogram(torch.cat(list(leak.values())), LEAK_EDGES)}


# ----------------------------------------------------------------------------- the stages
@dataclass
class Stage:
    model: torch.nn.Module
    accuracy: float
    seconds: float
    extra: dict = field(default_factory=dict)


def _train_cfg(cfg: StudyConfig, epochs: int, seed: int, lr: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=lr, intrinsic_lr_scale=cfg.intrinsic_lr_scale, seed=seed,
                       device=cfg.device, amp=False)


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name()})"
    return device


def _train(model: torch.nn.Module, *args, **kwargs):
    """``train`` on the study's device, the model back on the CPU afterwards (pruning, BN
    recalibration and measurements stay on the CPU wherever training ran)."""
    try:
        return train(model, *args, **kwargs)
    finally:
        model.to("cpu")


def dense_stage(cfg: StudyConfig, family: str, seed: int, data: DataSplit, folder: Path, log) -> Stage:
    """The dense model of (family, seed): loaded from its checkpoint when it finished, else trained
    (resuming an interrupted run from its last epoch) and saved by ``train`` after every epoch."""
    done = _finished_epochs(folder)
    if done < cfg.dense_epochs:
        torch.manual_seed(seed)
        model = build_model(family)
        result = _train(model, data, _train_cfg(cfg, cfg.dense_epochs, seed, cfg.dense_lr), folder, resume=done > 0,
                       progress=False, meta={"study": "compression_study", "family": family, "seed": seed})
        log(f"  dense: trained epochs {done + 1}-{cfg.dense_epochs} in {result.seconds:.1f} s")
    model = load_checkpoint(folder).model
    history = read_checkpoint_config(folder)["meta"]["history"]
    acc, rates = measure(model, data.test)
    return Stage(model, acc, sum(h["seconds"] for h in history),
                 {"firing_rate": rates, "curve": [h["test_accuracy"] for h in history], "digest": model_digest(model)})


def _finished_epochs(folder: Path) -> int:
    try:
        return len(read_checkpoint_config(folder)["meta"].get("history", []))
    except CheckpointError:
        return 0


def penalty_stage(cfg: StudyConfig, method: str, seed: int, dense: torch.nn.Module, data: DataSplit, folder: Path, log,
                  layers: tuple[str, ...] | None = None) -> Stage:
    """The penalised model of (family, seed, method, scope), masks / factors attached to ``layers``
    (default: the block linears) but nothing cut yet: loaded from its checkpoint, or computed
    (``--penalty-epochs`` with the method's penalty) and saved. Any setting of the method and
    scope is cut from it."""
    try:
        ck = load_checkpoint(folder)
        if ck.meta.get("penalty_epochs") == cfg.penalty_epochs:
            return Stage(ck.model, ck.meta["accuracy"], ck.meta["seconds"])
    except CheckpointError:
        pass
    t0 = time.perf_counter()
    model = clone_model(dense)
    pruner = make_pruner(PruneConfig(method=method, **({"layers": layers} if layers else {})))  # the penalty does not depend on the ratio
    pruner.prepare(model)
    if cfg.penalty_epochs > 0:
        _train(model, data, _train_cfg(cfg, cfg.penalty_epochs, seed, cfg.lr), progress=False, regularizer=pruner.regularizer)
    acc, _ = measure(model, data.test)
    seconds = time.perf_counter() - t0
    save_checkpoint(folder, model, meta={"penalty_epochs": cfg.penalty_epochs, "accuracy": acc, "seconds": seconds,
                                         "method": method, "penalty": METHOD_PENALTY[method], "layers": list(pruner.names)})
    log(f"  {method} penalty: {cfg.penalty_epochs} epochs in {seconds:.1f} s, accuracy {acc:.4f}")
    return Stage(model, acc, seconds)


def prune_stage(penalised: torch.nn.Module, setting: str, data: DataSplit):
    """Cut ``setting`` from a copy of the penalised model, then recalibrate BN; accuracies both
    before and after recalibration."""
    t0 = time.perf_counter()
    model = clone_model(penalised)
    pruner = make_pruner(SETTINGS[setting])
    pruner.prepare(model)  # already prepared: this only names the layers
    pruner.step(model, 1.0)
    acc_pruned, _ = measure(model, data.test)
    recalibrate_bn(model, data.train)
    acc_recal, rates = measure(model, data.test)
    return model, pruner, {"acc_pruned": acc_pruned, "acc_recal": acc_recal, "firing_rate_recal": rates,
                           "seconds": time.perf_counter() - t0}


def finetune_cell(cfg: StudyConfig, pruned: torch.nn.Module, pruner, variant: Variant, budget: int, seed: int, data: DataSplit) -> dict:
    """Fine-tune a copy of ``pruned`` for ``budget`` epochs as ``variant``; finalize; measure."""
    t0 = time.perf_counter()
    model = clone_model(pruned)
    ccfg = CompensationConfig(neuron=variant.neuron, epochs=budget, penalty_epochs=cfg.penalty_epochs,
                              # (for LIF the learn flags are unused; CompensationConfig keeps its defaults)
                              learn_threshold=variant.learn_threshold if variant.neuron == "slif" else True,
                              learn_leak=variant.learn_leak if variant.neuron == "slif" else True,
                              lr=cfg.lr, intrinsic_lr_scale=cfg.intrinsic_lr_scale, batch_size=cfg.batch_size, seed=seed, device=cfg.device)
    convert_neurons(model, ccfg.neuron, ccfg.learn_threshold, ccfg.learn_leak)
    tcfg = dataclasses.replace(ccfg.train_config(budget), amp=False)
    groups = {g["name"]: {"lr": g["lr"], "weight_decay": g["weight_decay"], "tensors": len(g["params"]),
                          "params": sum(p.numel() for p in g["params"])} for g in param_groups(model, tcfg)}
    result = _train(model, data, tcfg, progress=False)
    pruner.finalize(model)
    acc, rates = measure(model, data.test)
    report = pruner.report(model)
    counts = weight_counts(model)  # the whole model: what is left of every weight layer, cut or not
    return {"model_counts": {k: counts[k] for k in ("params", "params_dense", "macs", "macs_dense", "params_ratio", "macs_ratio")},
            "acc_final": acc, "curve": [h["test_accuracy"] for h in result.history], "curve_loss": [h["loss"] for h in result.history],
            "firing_rate": rates, "intrinsic": intrinsic_summary(model), "optimizer_groups": groups,
            "lr": {"weights": tcfg.lr, "intrinsic": groups.get("intrinsic", {}).get("lr")},
            "block_params_dense": report["block_params_dense"], "block_params_remaining": report["block_params_remaining"],
            "remaining": report["block_params_remaining"] / report["block_params_dense"],
            "layer_remaining": {n: _layer_remaining(layer) for n, layer in report["layers"].items()},
            "wall_seconds": time.perf_counter() - t0, "train_seconds": result.seconds}


def _log(message: str) -> None:
    print(message, flush=True)


def _layer_remaining(layer: dict) -> float:
    """Fraction of a layer's dense parameters that remain (nonzeros for L1P, factors for DSP; a
    convolution's shape is ``(out, in, kh, kw)``)."""
    if "sparsity" in layer:
        return 1.0 - layer["sparsity"]
    dense = 1
    for n in layer["shape"]:
        dense *= n
    return layer["params"] / dense


def run_study(cfg: StudyConfig, out: str | os.PathLike, data: DataSplit | None = None,
              log: Callable[[str], None] = _log) -> list[dict]:
    """Run every cell of ``cfg`` that ``OUT/results.jsonl`` does not hold yet; return the new records."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS
    existing = load_records(results)
    check_protocol(existing, cfg, results)
    done = {cell_key(r) for r in existing}
    data = data if data is not None else load_dataset(cfg.data)
    new: list[dict] = []
    for family in cfg.families:
        for seed in cfg.seeds:
            todo = [(s, v, b) for s in cfg.settings for b in cfg.budgets for v in cfg.variants if (family, seed, s, v, b) not in done]
            tag = f"[{family} seed {seed}]"
            if not todo:
                log(f"{tag} all {len(cfg.settings) * len(cfg.budgets) * len(cfg.variants)} cells done, skipped")
                continue
            log(f"{tag} {len(todo)} cells to run")
            base = out / "models" / family / f"seed{seed}"
            dense = dense_stage(cfg, family, seed, data, base / f"dense-e{cfg.dense_epochs}", lambda m: log(f"{tag}{m}"))
            log(f"{tag} dense accuracy {dense.accuracy:.4f} (training {dense.seconds:.1f} s)")
            check_same_model(existing, results, f"dense model of {family} seed {seed}",
                             lambda r: (r.get("family"), r.get("seed")) == (family, seed), dense.extra["digest"], "dense_digest",
                             {"acc_dense": dense.accuracy, "firing_rate_dense": dense.extra["firing_rate"]})
            for method, scope in dict.fromkeys((SETTINGS[s].method, setting_scope(s)) for s, _, _ in todo):
                suffix = SCOPE_SUFFIX if scope == "all" else ""  # block scope keeps the folder names of earlier runs
                layers = next(SETTINGS[s].layers for s, _, _ in todo if SETTINGS[s].method == method and setting_scope(s) == scope)
                pen = penalty_stage(cfg, method, seed, dense.model, data,
                                    base / f"{method}{suffix}-penalty-e{cfg.dense_epochs}-{cfg.penalty_epochs}",
                                    lambda m: log(f"{tag}{m}"), layers=layers)
                pen_digest = model_digest(pen.model)
                check_same_model(existing, results, f"{method} penalised model ({scope}) of {family} seed {seed}",
                                 lambda r: (r.get("family"), r.get("seed"), r.get("method"), setting_scope(r.get("setting", "")))
                                 == (family, seed, method, scope), pen_digest, "penalty_digest", {"acc_penalty": pen.accuracy})
                for setting in dict.fromkeys(s for s, _, _ in todo if SETTINGS[s].method == method and setting_scope(s) == scope):
                    pruned, pruner, prune_info = prune_stage(pen.model, setting, data)
                    log(f"{tag} {setting}: after prune {prune_info['acc_pruned']:.4f}, after BN recalibration "
                        f"{prune_info['acc_recal']:.4f} ({prune_info['seconds']:.1f} s)")
                    pruned_digest = model_digest(pruned)
                    check_same_model(existing, results, f"pruned model {setting} of {family} seed {seed}",
                                     lambda r: (r.get("family"), r.get("seed"), r.get("setting")) == (family, seed, setting),
                                     pruned_digest, "pruned_digest", {k: prune_info[k] for k in ("acc_pruned", "acc_recal", "firing_rate_recal")})
                    pcfg = SETTINGS[setting]
                    for s, vname, budget in todo:
                        if s != setting:
                            continue
                        variant = VARIANTS[vname]
                        cell = finetune_cell(cfg, pruned, pruner, variant, budget, seed, data)
                        rec = {"family": family, "seed": seed, "setting": setting, "method": pcfg.method, "scope": setting_scope(setting),
                               "ratio": pcfg.sparsity if pcfg.method == "l1p" else pcfg.param_ratio,
                               "variant": vname, "neuron": variant.neuron, "learn_threshold": variant.learn_threshold,
                               "learn_leak": variant.learn_leak, "budget": budget,
                               "acc_dense": dense.accuracy, "dense_digest": dense.extra["digest"], "acc_penalty": pen.accuracy,
                               "penalty_digest": pen_digest, "pruned_digest": pruned_digest,
                               "acc_pruned": prune_info["acc_pruned"], "acc_recal": prune_info["acc_recal"],
                               "firing_rate_dense": dense.extra["firing_rate"], "firing_rate_recal": prune_info["firing_rate_recal"],
                               "penalty": METHOD_PENALTY[pcfg.method], "prune_config": pcfg.to_dict(),
                               "stage_seconds": {"dense": dense.seconds, "penalty": pen.seconds, "prune_recal": prune_info["seconds"]},
                               "protocol": cfg.protocol(), "threads": torch.get_num_threads(), "device": _device_name(cfg.device), "cpu": cpu_model(),
                               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **cell}
                        append_record(results, rec)
                        new.append(rec)
                        log(f"{tag} {setting} {vname:<9} budget {budget:>2}: final {cell['acc_final']:.4f}  "
                            f"remaining {cell['remaining']:.3f}  ({cell['wall_seconds']:.1f} s)")
    return new


# ----------------------------------------------------------------------------- summary
def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)} if xs else \
        {"mean": None, "std": None, "n": 0}


def _order(values: Iterable, known: Iterable) -> list:
    known = list(known)
    return sorted(set(values), key=lambda v: (known.index(v) if v in known else len(known), str(v)))


def summarize(records: list[dict]) -> dict:
    """Per (family, setting, budget): accuracies (mean, std over seeds) of every variant, of the
    dense model and after pruning / recalibration, and paired per-seed differences of every
    variant against ``lif`` (same seed, same pruned model)."""
    groups = []
    for family in _order((r["family"] for r in records), KNOWN_FAMILIES):
        for setting in _order((r["setting"] for r in records if r["family"] == family), SETTINGS):
            for budget in sorted({r["budget"] for r in records if r["family"] == family and r["setting"] == setting}):
                sel = [r for r in records if r["family"] == family and r["setting"] == setting and r["budget"] == budget]
                per_seed = {}  # stage accuracies are shared by the variants of one seed
                for r in sel:
                    per_seed.setdefault(r["seed"], r)
                counted = [r["model_counts"] for r in sel if r.get("model_counts")]  # records before the whole-model scope lack them
                g = {"family": family, "setting": setting, "method": sel[0]["method"], "ratio": sel[0]["ratio"], "budget": budget,
                     "scope": setting_scope(setting), "seeds": sorted(per_seed), "remaining": mean_std([r["remaining"] for r in sel])["mean"],
                     "model_counts": {k: statistics.mean(c[k] for c in counted) for k in counted[0]} if counted else None,
                     "dense": mean_std([r["acc_dense"] for r in per_seed.values()]),
                     "pruned": mean_std([r["acc_pruned"] for r in per_seed.values()]),
                     "recal": mean_std([r["acc_recal"] for r in per_seed.values()]),
                     "variants": {}, "paired": {}}
                by_variant = {}
                for v in _order((r["variant"] for r in sel), VARIANTS):
                    by_variant[v] = {r["seed"]: r for r in sel if r["variant"] == v}
                    g["variants"][v] = mean_std([r["acc_final"] for r in by_variant[v].values()])
                    g["variants"][v]["gain_over_recal"] = mean_std([r["acc_final"] - r["acc_recal"] for r in by_variant[v].values()])
                    rates = [x for r in by_variant[v].values() for x in r["firing_rate"].values()]  # every LIF layer of every seed
                    g["variants"][v]["firing_rate"] = {"mean": statistics.mean(rates) if rates else None,
                                                       "min": min(rates) if rates else None}
                base = by_variant.get(BASELINE, {})
                # what the cut costs after the LIF fine-tune: dense - LIF, paired on the seed
                g["cut_cost"] = mean_std([r["acc_dense"] - r["acc_final"] for r in base.values()])
                for v, recs in by_variant.items():
                    if v == BASELINE:
                        continue
                    diffs = {s: recs[s]["acc_final"] - base[s]["acc_final"] for s in sorted(recs) if s in base}
                    xs = list(diffs.values())
                    g["paired"][v] = {**mean_std(xs), "min": min(xs) if xs else None, "max": max(xs) if xs else None,
                                      "positive": sum(x > 0 for x in xs), "per_seed": {str(s): d for s, d in diffs.items()}}
                groups.append(g)
    for g in groups:  # net of the control: (variant - lif) minus the same seed's (variant - lif) with nothing cut
        # the control of the setting's method and scope; without it the L1P control of the scope, then the
        # block-scope one (same dense models, its penalty on the block linears only), labelled as such
        suffix = SCOPE_SUFFIX if setting_scope(g["setting"]) == "all" else ""
        control = next((c for name in dict.fromkeys((control_of(g["setting"]), "l1p0" + suffix, "l1p0")) for c in groups
                        if (c["family"], c["setting"], c["budget"]) == (g["family"], name, g["budget"])), None)
        g["control"] = control["setting"] if control is not None and control is not g else None
        g["paired_net"] = {}
        if g["control"] is None:
            continue
        for v, p in g["paired"].items():
            cp = control["paired"].get(v, {}).get("per_seed", {})
            xs = [d - cp[s] for s, d in p["per_seed"].items() if s in cp]
            g["paired_net"][v] = {**mean_std(xs), "positive": sum(x > 0 for x in xs)}
    protocols = [dict(p) for p in {json.dumps(r.get("protocol"), sort_keys=True): r.get("protocol") for r in records}.values()]
    def made_on(r):  # where a cell ran: the CPU, or the GPU with its host's CPU
        cpu = r.get("cpu", "not recorded")
        return cpu if r.get("device", "cpu") == "cpu" else f"{r['device']}, host CPU {cpu}"

    cpus = dict(collections.Counter(made_on(r) for r in records))
    return {"groups": groups, "records": len(records), "protocol": protocols[0] if len(protocols) == 1 else protocols, "cpus": cpus,
            "seconds": {"finetune": sum(r.get("wall_seconds", 0.0) for r in records)}}


def _pct(ms: dict) -> str:
    return "-" if ms["mean"] is None else f"{ms['mean'] * 100:.2f} ± {ms['std'] * 100:.2f}"


def to_markdown(summary: dict) -> str:
    groups = summary["groups"]
    variants = _order((v for g in groups for v in g["variants"]), VARIANTS)
    protocol = summary["protocol"] if isinstance(summary["protocol"], dict) else {}
    data = {"digits": "digits", "mnist1d": "MNIST-1D"}.get(protocol.get("data"), "several data sets")
    lines = [f"# Compression study: sLIF compensation vs LIF on {data}", "",
             f"{summary['records']} cells; protocol: `{json.dumps(summary['protocol'], sort_keys=True)}`; made on: "
             + ", ".join(f"{name} ({n} cells)" for name, n in summary.get("cpus", {}).items()) + ".",
             "Accuracies in %, mean ± std over seeds. *after recal*: pruned, BatchNorm statistics recalibrated, "
             "before any fine-tuning (the start of every variant).", ""]
    for family in _order((g["family"] for g in groups), KNOWN_FAMILIES):
        fam = [g for g in groups if g["family"] == family]
        lines += [f"## {family}", "", "| setting | pruned params left | model params left | model MACs left | budget | seeds | dense | "
                  "after prune | after recal | " + " | ".join(variants) + " |", "|---|---|---|---|---|---|---|---|---|" + "---|" * len(variants)]
        for g in fam:
            cells = [_pct(g["variants"][v]) if v in g["variants"] else "-" for v in variants]
            mc = g.get("model_counts")
            left = f"{mc['params_ratio'] * 100:.1f}% | {mc['macs_ratio'] * 100:.1f}%" if mc else "- | -"
            lines.append(f"| {g['setting']} | {g['remaining'] * 100:.1f}% | {left} | {g['budget']} | {len(g['seeds'])} | {_pct(g['dense'])} | "
                         f"{_pct(g['pruned'])} | {_pct(g['recal'])} | " + " | ".join(cells) + " |")
        lines += ["", "*pruned params left*: of the layers the setting prunes (the block linears; with `-all` also the embedding "
                  "convolutions and the classifier; DSP factors a layer only where its factors are smaller); *model params / MACs "
                  "left*: nonzero weights (DSP: factor entries) and "
                  "multiply-adds per sample per step of every weight layer of the model (records that hold them).", "",
                  f"Paired differences vs `{BASELINE}` (same seed, same pruned model), in points; *net of control*: minus the same "
                  "seed's difference with nothing cut (the control of the method and scope: `l1p0`, `l1p0-all`, `dsp100`, "
                  "`dsp100-all`, named in the column), where the control ran:", "",
                  "| setting | budget | variant | mean | std | min .. max | positive | net of control |", "|---|---|---|---|---|---|---|---|"]
        for g in fam:
            for v, p in g["paired"].items():
                if not p["n"]:
                    continue
                net = g.get("paired_net", {}).get(v)
                net_text = (f"{net['mean'] * 100:+.2f} ± {net['std'] * 100:.2f} ({net['positive']} of {net['n']}, vs {g['control']})"
                            if net and net["n"] else "-")
                lines.append(f"| {g['setting']} | {g['budget']} | {v} | {p['mean'] * 100:+.2f} | {p['std'] * 100:.2f} | "
                             f"{p['min'] * 100:+.2f} .. {p['max'] * 100:+.2f} | {p['positive']} of {p['n']} | {net_text} |")
        lines += ["", "Firing rates after the fine-tune: spikes per neuron per step on the test split (direct encoding, input "
                  "density 1), mean over the LIF layers and seeds, the lowest layer in brackets:", "",
                  "| setting | budget | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
        for g in fam:
            rates = [g["variants"][v].get("firing_rate") if v in g["variants"] else None for v in variants]
            lines.append(f"| {g['setting']} | {g['budget']} | " + " | ".join(_rate(f) for f in rates) + " |")
        lines += [""] + scope_tables(fam)
        lines.append("")
    return "\n".join(lines)


def _diff(p: dict | None) -> str:
    """A paired difference in points: mean ± std (seeds where the variant was better / seeds)."""
    return f"{p['mean'] * 100:+.2f} ± {p['std'] * 100:.2f} ({p['positive']}/{p['n']})" if p and p.get("n") else "-"


def _rate(f: dict | None) -> str:
    """A variant's firing rate: mean over layers and seeds, the lowest layer in brackets."""
    return f"{f['mean']:.3f} ({f['min']:.3f})" if f and f["mean"] is not None else "-"


def _rates(g: dict, variants: Iterable[str]) -> str:
    """Firing rates of ``variants`` in group ``g``, split by ' / '."""
    return " / ".join(_rate(g["variants"].get(v, {}).get("firing_rate")) for v in variants)


def scope_tables(groups: list[dict]) -> list[str]:
    """LIF against sLIF (both) per scope, and the threshold-only / leak-only variants: the tables of
    the README's MNIST-1D study section, one family's groups in, markdown lines out."""
    def name(g):
        return g["setting"] + (" (control)" if g["setting"] == control_of(g["setting"]) else "")

    def net(g):  # names the control where it is not the setting's own (a fallback, see summarize)
        text = _diff(g["paired_net"].get(both))
        return text + (f" vs {g['control']}" if text != "-" and g["control"] != control_of(g["setting"]) else "")

    def acc(g, v):  # a variant's accuracy, "-" where it did not run
        return _pct(g["variants"].get(v, mean_std([])))

    def count(mc, key):
        return f"{mc[key]:,.0f} ({mc[key + '_ratio'] * 100:.1f}%)" if mc else "-"

    both = "slif-both"
    head = ["after prune | after BN recal | LIF | sLIF both |", "both − LIF | net of control | firing rate LIF / sLIF (lowest layer) |"]
    block = []
    for g in (g for g in groups if g.get("scope", "blocks") == "blocks" and BASELINE in g["variants"]):
        mc = g.get("model_counts")
        weights = f"{mc['params_ratio'] * 100:.1f}%" if mc else "-"
        block.append(f"| {name(g)} | {g['budget']} | {g['remaining'] * 100:.1f}% | {weights} | "
                     f"{len(g['seeds'])} | {_pct(g['pruned'])} | {_pct(g['recal'])} | {acc(g, BASELINE)} | "
                     f"{acc(g, both)} | {_diff(g['paired'].get(both))} | "
                     f"{net(g)} | {_rates(g, (BASELINE, both))} |")
    whole = []
    for g in (g for g in groups if g.get("scope") == "all" and BASELINE in g["variants"]):
        mc = g.get("model_counts")
        whole.append(f"| {name(g)} | {g['budget']} | {count(mc, 'params')} | {count(mc, 'macs')} | {len(g['seeds'])} | "
                     f"{_pct(g['pruned'])} | {_pct(g['recal'])} | {acc(g, BASELINE)} | {acc(g, both)} | "
                     f"{g['cut_cost']['mean'] * 100:.2f} | {_diff(g['paired'].get(both))} | {net(g)} | {_rates(g, (BASELINE, both))} |")
    lines = ["### LIF against sLIF, by scope"]
    if block:
        lines += ["", "Block scope:", "", "| setting | budget | block params left | model weights left | seeds | " + head[0] + " " + head[1],
                  "|---|---:|---:|---:|---:|---|---|---|---|---|---|---|"] + block
    if whole:
        lines += ["", "Whole model:", "",
                  "| setting | budget | weights left | MACs left | seeds | " + head[0] + " cost of the cut (dense − LIF, points) | " + head[1],
                  "|---|---:|---:|---:|---:|---|---|---|---|---:|---|---|---|"] + whole
    one = ("slif-thr", "slif-leak", both)
    apart = [g for g in groups if BASELINE in g["variants"] and any(v in g["variants"] for v in one[:2])]
    if not apart:
        return lines
    lines += ["", "sLIF learning the threshold only, or the leak only (same seeds and pruned models):", "",
              "| setting | budget | seeds | LIF | sLIF θ | sLIF leak | sLIF both | θ − LIF | leak − LIF | both − LIF |",
              "|---|---:|---:|---|---|---|---|---|---|---|"]
    for g in apart:
        lines.append(f"| {name(g)} | {g['budget']} | {len(g['seeds'])} | {acc(g, BASELINE)} | "
                     + " | ".join(acc(g, v) for v in one) + " | "
                     + " | ".join(_diff(g["paired"].get(v)) for v in one) + " |")
    return lines


# ----------------------------------------------------------------------------- plots
VARIANT_STYLE = {"lif": ("tab:blue", "o"), "slif-thr": ("tab:orange", "^"), "slif-leak": ("tab:green", "v"), "slif-both": ("tab:red", "s")}


def _save(fig, path: Path, paths: list[Path]) -> None:
    """Lay out, write atomically as PNG, close the figure and list the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    paths.append(path)


def plot_all(records: list[dict], summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = summary["groups"]
    families = _order((g["family"] for g in groups), KNOWN_FAMILIES)
    methods = _order(((g["method"], g.get("scope", "blocks")) for g in groups),
                     [(m, sc) for sc in ("blocks", "all") for m in ("l1p", "dsp")])  # one column per method and scope
    variants = _order((r["variant"] for r in records), VARIANTS)
    budgets = sorted({g["budget"] for g in groups})

    # (1) accuracy vs remaining block parameters, one figure per budget
    for budget in budgets:
        fig, axes = plt.subplots(len(families), len(methods), figsize=(5.2 * len(methods), 3.8 * len(families)), squeeze=False)
        for i, family in enumerate(families):
            for j, method in enumerate(methods):
                ax = axes[i][j]
                sel = sorted((g for g in groups if g["family"] == family and (g["method"], g.get("scope", "blocks")) == method
                              and g["budget"] == budget),
                             key=lambda g: g["remaining"])
                if not sel:
                    ax.set_visible(False)
                    continue
                xs = [g["remaining"] * 100 for g in sel]
                for v in variants:
                    pts = [(x, g["variants"][v]) for x, g in zip(xs, sel) if v in g["variants"]]
                    if pts:
                        color, marker = VARIANT_STYLE.get(v, ("k", "x"))
                        ax.errorbar([x for x, _ in pts], [m["mean"] * 100 for _, m in pts], yerr=[m["std"] * 100 for _, m in pts],
                                    color=color, marker=marker, capsize=3, label=v)
                ax.errorbar(xs, [g["recal"]["mean"] * 100 for g in sel], yerr=[g["recal"]["std"] * 100 for g in sel],
                            color="gray", ls=":", marker=".", capsize=2, label="after recal (no fine-tune)")
                ax.axhline(statistics.mean(g["dense"]["mean"] for g in sel) * 100, color="gray", ls="--", lw=1, label="dense")
                ax.set_xscale("log")
                ax.set_xticks(xs, [f"{x:.1f}" for x in xs])
                ax.minorticks_off()
                ax.set_title(f"{family}, {method[0].upper()} {'whole model' if method[1] == 'all' else 'blocks'}, {budget}-epoch fine-tune")
                ax.set_xlabel("pruned layers' parameters remaining (%)")
                ax.set_ylabel("test accuracy (%)")
                ax.legend(fontsize=7)
        _save(fig, out / f"accuracy_vs_params_b{budget}.png", paths)

    # (2) firing rates per layer and learned intrinsic parameters, per family and budget
    for family in families:
        for budget in budgets:
            sel = [r for r in records if r["family"] == family and r["budget"] == budget]
            settings = _order((r["setting"] for r in sel), SETTINGS)
            if not settings:
                continue
            fig, axes = plt.subplots(len(settings), 1, figsize=(11, 2.8 * len(settings)), squeeze=False)
            for ax, setting in zip(axes[:, 0], settings):
                rs = [r for r in sel if r["setting"] == setting]
                layers = list(rs[0]["firing_rate"])
                series = [("after recal", "lightgray", [_mean_rate(rs, "firing_rate_recal", layer, one_per_seed=True) for layer in layers])]
                for v in variants:
                    vr = [r for r in rs if r["variant"] == v]
                    if vr:
                        series.append((v, VARIANT_STYLE.get(v, ("k", "x"))[0], [_mean_rate(vr, "firing_rate", layer) for layer in layers]))
                width = 0.8 / len(series)
                for k, (label, color, ys) in enumerate(series):
                    ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(layers))], [y * 100 for y in ys], width,
                           color=color, label=label)
                ax.set_xticks(range(len(layers)), [layer.replace("blocks.", "b") for layer in layers], rotation=25, ha="right", fontsize=7)
                ax.set_ylabel("spike rate (%)")
                ax.set_title(f"{family}, {setting}, {budget}-epoch fine-tune: firing rate per LIF layer (test split, mean over seeds)",
                             fontsize=9)
                ax.legend(fontsize=7, ncol=len(series))
            _save(fig, out / f"firing_rates_{family}_b{budget}.png", paths)

            slif = [r for r in sel if r.get("intrinsic")]
            if not slif:
                continue
            s_settings = _order((r["setting"] for r in slif), SETTINGS)
            fig, axes = plt.subplots(len(s_settings), 2, figsize=(10, 2.6 * len(s_settings)), squeeze=False)
            for row, setting in zip(axes, s_settings):
                for ax, kind, xlabel in ((row[0], "threshold", "threshold θ"), (row[1], "leak", "leak d = dt/τ")):
                    for v in variants:
                        vr = [r for r in slif if r["setting"] == setting and r["variant"] == v]
                        if not vr:
                            continue
                        hist = vr[0]["intrinsic"][f"{kind}_hist"]
                        counts = [sum(r["intrinsic"][f"{kind}_hist"]["counts"][i] for r in vr) for i in range(len(hist["counts"]))]
                        ax.stairs(counts, hist["edges"], color=VARIANT_STYLE.get(v, ("k", "x"))[0], label=v)
                    ax.set_yscale("symlog", linthresh=1)  # untouched neurons pile up at the initial value
                    ax.set_xlabel(xlabel)
                    ax.set_ylabel("neurons (all seeds)")
                    ax.set_title(f"{family}, {setting}, {budget} epochs: learned {kind}", fontsize=9)
                    ax.legend(fontsize=7)
            _save(fig, out / f"intrinsic_{family}_b{budget}.png", paths)

    # (3) convergence: per-epoch test accuracy of the longest budget
    budget = max(budgets) if budgets else None
    if budget is not None and budget > 1:
        fig, axes = plt.subplots(len(families), 1, figsize=(8, 3.6 * len(families)), squeeze=False)
        for ax, family in zip(axes[:, 0], families):
            sel = [r for r in records if r["family"] == family and r["budget"] == budget]
            for setting in _order((r["setting"] for r in sel), SETTINGS):
                for v in variants:
                    curves = [r["curve"] for r in sel if r["setting"] == setting and r["variant"] == v and len(r["curve"]) == budget]
                    if curves:
                        ys = [statistics.mean(c[e] for c in curves) * 100 for e in range(budget)]
                        ax.plot(range(1, budget + 1), ys, color=VARIANT_STYLE.get(v, ("k", "x"))[0],
                                ls=("-", "--", ":", "-.", (0, (1, 3)), (0, (5, 1)))[list(SETTINGS).index(setting) % 6],
                                lw=1, label=f"{setting} {v}")
            ax.set_xlabel("fine-tune epoch")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{family}: {budget}-epoch fine-tunes, mean over seeds")
            ax.legend(fontsize=6, ncol=4)
        _save(fig, out / f"curves_b{budget}.png", paths)
    return paths


def _mean_rate(records: list[dict], key: str, layer: str, one_per_seed: bool = False) -> float:
    if one_per_seed:
        records = list({r["seed"]: r for r in records}.values())
    xs = [r[key][layer] for r in records if layer in r.get(key, {})]
    return statistics.mean(xs) if xs else 0.0


def write_report(out: str | os.PathLike, log: Callable[[str], None] = _log) -> dict:
    """Rebuild ``report.md``, ``summary.json`` and the plots from ``OUT/results.jsonl``."""
    out = Path(out)
    records = load_records(out / RESULTS)
    if not records:
        raise ConfigError(f"no results in {out / RESULTS}; run the study first")
    summary = summarize(records)
    text = to_markdown(summary)
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=1, sort_keys=True))
    atomic_write_text(out / REPORT, text + "\n")
    plots = plot_all(records, summary, out)
    log(text)
    log(f"report: {out / REPORT}  summary: {out / SUMMARY}  plots: {', '.join(p.name for p in plots)}")
    return {"summary": summary, "plots": plots}


# ----------------------------------------------------------------------------- CLI
def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _names(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--out", default=None, help="output folder (default runs/compression-study, or runs/compression-study-quick)")
    ap.add_argument("--families", type=_names, default=None,
                    help=f"comma-separated presets (default {','.join(FAMILIES)}; with --data mnist1d {DATA_FAMILIES['mnist1d'][0]})")
    ap.add_argument("--data", choices=tuple(DATA_FAMILIES), default=None, help="digits (default) or mnist1d")
    seeds = ap.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5)")
    seeds.add_argument("--seed-list", type=_ints, default=None, help="explicit seeds, e.g. 0,3")
    ap.add_argument("--settings", type=_names, default=None,
                    help=f"comma-separated, of {','.join(SETTINGS)} (default {','.join(DEFAULT_SETTINGS)})")
    ap.add_argument("--variants", type=_names, default=None, help=f"comma-separated (default {','.join(VARIANTS)})")
    ap.add_argument("--budgets", type=_ints, default=None, help="fine-tune epochs, comma-separated (default 5,20)")
    ap.add_argument("--dense-epochs", type=int, default=None, help="dense training epochs (default 15)")
    ap.add_argument("--penalty-epochs", type=int, default=None, help="L1 / group penalty epochs before pruning (default 2)")
    ap.add_argument("--dense-lr", type=float, default=None, help="lr of the dense training (default 2e-3)")
    ap.add_argument("--lr", type=float, default=None, help="fine-tune lr of the weights (default 1e-3)")
    ap.add_argument("--intrinsic-lr-scale", type=float, default=None, help="sLIF threshold/leak lr = lr x this (default 20)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--device", default=None, help="where training runs: cpu (default) or cuda (fp32: no AMP, no TF32); "
                    "pruning and measurements stay on the CPU")
    ap.add_argument("--no-report", action="store_true", help="only run cells (parallel runs into one --out: report once at the end)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, l1p99 and dsp5, 1-epoch budget, dense 2, penalty 1")
    ap.add_argument("--report-only", action="store_true", help="rebuild report, summary and plots from results.jsonl; no training")
    return ap


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    base = {**asdict(StudyConfig()), **(QUICK if args.quick else {})}
    if args.data is not None and args.data != base["data"]:
        base.update(data=args.data, families=DATA_FAMILIES[args.data][:1])
    given = {"families": args.families, "settings": args.settings, "variants": args.variants, "budgets": args.budgets,
             "dense_epochs": args.dense_epochs, "penalty_epochs": args.penalty_epochs, "lr": args.lr, "dense_lr": args.dense_lr,
             "intrinsic_lr_scale": args.intrinsic_lr_scale, "device": args.device,
             "seeds": tuple(range(args.seeds)) if args.seeds is not None else args.seed_list}
    return StudyConfig(**{**base, **{k: v for k, v in given.items() if v is not None}})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out or ("runs/compression-study-quick" if args.quick else "runs/compression-study"))
    try:
        if not args.report_only:
            cfg = config_from_args(args)
            torch.set_num_threads(args.threads)
            if cfg.device.startswith("cuda"):
                if not torch.cuda.is_available():
                    raise ConfigError(f"--device {cfg.device}: no CUDA GPU here")
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 like the CPU runs
            t0 = time.perf_counter()
            new = run_study(cfg, out)
            print(f"{len(new)} new cells in {time.perf_counter() - t0:.1f} s", flush=True)
        if not args.no_report:
            write_report(out)
    except ConfigError as err:
        print(f"compression_study: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
