"""Time per epoch and memory of the training recipes (models/recipes/*.toml), measured on synthetic
data in the real on-disk formats, on a CUDA GPU (or the CPU, for testing).

    PYTHONPATH=$PWD python3 benchmarks/recipe_speed.py [--recipes cifar10-sdt-8-512,...] [--device auto|cuda|cpu]
        [--amp on|off|both] [--warmup 10] [--steps 30] [--eval-images 2000] [--dvs-eval-images 128]
        [--dvs-events 300000] [--load-batches 4] [--set SECTION.KEY=VALUE ...] [--time-limit SECONDS]
        [--out recipe_speed.json] [--markdown recipe_speed.md]

Per recipe (and per mixed-precision setting):

1. A synthetic folder of its data set is written to a temporary directory (stdeploy.synthetic):
   CIFAR-10/100 at full size (50,000 + 10,000 records), CIFAR10-DVS with 10 class folders, enough
   recordings for the timed steps and the evaluation, ``--dvs-events`` events each (a few distinct
   recordings per class, the rest hard links to them: files are read from the page cache).
2. Data set, model and TrainConfig are built as ``stdeploy train --recipe`` builds them, and
   ``stdeploy.train.train`` runs ``warmup + steps`` optimizer steps (``max_steps``) inside the
   first epoch. After every step the GPU is synchronised and the time taken; the steps after the
   warm-up give the median and p90 step time. A step is the whole loop body: loading and
   augmenting the batch (single-process DataLoader, as train() uses), mixup, forward, backward,
   optimizer. The test split seen by train() is cut to one batch (it evaluates once at the end).
3. Evaluation throughput: ``stdeploy.train.evaluate`` (fp32, no autocast, as train() runs it) on
   ``--eval-images`` test images after a one-batch warm-up.
4. Data loading alone: ``--load-batches`` training batches from ``stdeploy.data.make_loader``
   without the model (for DVS the event binning is the cost); compare with the step time to see
   whether the GPU waits for data.
5. Peak GPU memory of the training run (allocated and reserved by the caching allocator).

Extrapolation to the real data sets: CIFAR-10/100 50,000 training + 10,000 test images;
CIFAR10-DVS 10,000 recordings split by the recipe's ``test_fraction`` (1,000 per class). One
epoch = ceil(train / batch) steps x median step time + test images / eval throughput; the full
run multiplies by the recipe's epochs. One process, one device (under torchrun each GPU takes its
share of the steps).

Every run is written to ``--out`` (JSON) and ``--markdown`` as soon as it ends, so a run cut off
from outside keeps what it measured. A failing recipe (exception, out of memory) is recorded with
its error and the script goes on; ``--time-limit`` stops a run between steps when the budget is
spent (status "cut", partial timings kept) and skips the runs left (status "skipped"). Exit
status 0 when at least one run measured its steps, 1 when none did, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stdeploy.files import atomic_write_text  # noqa: E402
from stdeploy.data import make_loader  # noqa: E402
from stdeploy.errors import StdeployError  # noqa: E402
from stdeploy.models import build_model  # noqa: E402
from stdeploy.profile.latency import percentile  # noqa: E402
from stdeploy.recipes import RECIPE_DIR, load_recipe, parse_set  # noqa: E402
from stdeploy.synthetic import write_dataset  # noqa: E402
from stdeploy.train import count_params, evaluate, resolve_device, train  # noqa: E402

REAL_CIFAR = (50_000, 10_000)          # training, test images of CIFAR-10 and CIFAR-100
DVS_CLASSES, DVS_PER_CLASS = 10, 1_000  # CIFAR10-DVS: 10,000 recordings
DVS_DISTINCT = 4                       # different synthetic recordings per class; the rest are links
AMP_MODES = {"on": (True,), "off": (False,), "both": (True, False)}
GIB = 2 ** 30


class _OutOfTime(Exception):
    """Raised from the step callback when --time-limit is spent."""


def log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------- recipes and sizes
def resolve_recipes(spec: str | None) -> list[Path]:
    """``a,b``: recipe stems in models/recipes or paths to .toml files; None: every recipe there."""
    if not spec:
        return sorted(RECIPE_DIR.glob("*.toml"))
    paths, missing = [], []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        candidates = [Path(item), RECIPE_DIR / item, RECIPE_DIR / f"{item}.toml"]
        found = next((p for p in candidates if p.is_file()), None)
        (paths.append(found) if found else missing.append(item))
    if missing:
        known = ", ".join(p.stem for p in sorted(RECIPE_DIR.glob("*.toml")))
        raise StdeployError(f"recipe file not found: {', '.join(missing)} (give a .toml path or one of: {known})")
    if not paths:
        raise StdeployError("--recipes names no recipe")
    return paths


def real_sizes(recipe) -> tuple[int, int, str]:
    """Training and test samples of the real data set and where the numbers come from."""
    name = recipe.data.name
    if name in ("cifar10", "cifar100"):
        return (*REAL_CIFAR, f"{name}: 50,000 train + 10,000 test images")
    if name == "dvs":
        f = recipe.data.test_fraction
        if not f:
            return 9_000, 1_000, "CIFAR10-DVS with train/ and test/ folders: assumed 9,000 + 1,000 recordings"
        cut = math.ceil(round(DVS_PER_CLASS * (1 - f), 9))  # as stdeploy.data splits each class
        return (DVS_CLASSES * cut, DVS_CLASSES * (DVS_PER_CLASS - cut),
                f"CIFAR10-DVS: 10,000 recordings, test_fraction {f:g} per class")
    raise StdeployError(f"no synthetic data writer for data set {name!r} (have cifar10, cifar100, dvs)")


def dvs_per_class(train_needed: int, test_needed: int, test_fraction: float) -> int:
    """Recordings per class so that the split by ``test_fraction`` leaves at least the wanted
    training and test recordings over the 10 classes."""
    train_pc, test_pc = math.ceil(train_needed / DVS_CLASSES), math.ceil(test_needed / DVS_CLASSES)
    n = train_pc + test_pc
    while True:
        cut = math.ceil(round(n * (1 - test_fraction), 9))
        if cut >= train_pc and n - cut >= test_pc:
            return n
        n += 1


class SyntheticData:
    """Synthetic folders in one temporary directory, written once per distinct size."""

    def __init__(self, root: Path, args):
        self.root, self.args, self.folders = root, args, {}

    def folder(self, recipe, batch: int, max_steps: int) -> tuple[Path, dict]:
        name, args = recipe.data.name, self.args
        train_needed = batch * (max_steps + 1)       # the timed steps stay inside the first epoch
        if name in ("cifar10", "cifar100"):
            sizes = {"train": max(args.cifar_train, train_needed, 5), "test": max(args.cifar_test, args.eval_images, batch)}
        elif name == "dvs":
            test_needed = max(args.dvs_eval_images, batch)
            f = recipe.data.test_fraction
            sizes = {"classes": DVS_CLASSES, "events": args.dvs_events, "distinct": DVS_DISTINCT}
            if f:   # one folder of class folders, split by name order
                sizes["per_class"] = dvs_per_class(train_needed, test_needed, f)
            else:   # train/ and test/ folders
                sizes.update(train_pc=math.ceil(train_needed / DVS_CLASSES), test_pc=math.ceil(test_needed / DVS_CLASSES))
        else:
            raise StdeployError(f"no synthetic data writer for data set {name!r}")
        key = json.dumps([name, sizes], sort_keys=True)
        if key not in self.folders:
            t0 = time.perf_counter()
            target = self.root / f"{name}-{len(self.folders)}"
            if name == "dvs" and not recipe.data.test_fraction:
                common = {k: sizes[k] for k in ("classes", "events", "distinct")}
                write_dataset("dvs", target / "split", **common, per_class=sizes["train_pc"])
                (target / "split" / "events_np").rename(target / "train")
                write_dataset("dvs", target / "split", **common, per_class=sizes["test_pc"], seed=1)
                (target / "split" / "events_np").rename(target / "test")
                folder = target
            else:
                folder = write_dataset(name, target, **sizes)
            seconds = time.perf_counter() - t0
            log(f"  wrote synthetic {name} {sizes} to {folder} in {seconds:.1f} s")
            self.folders[key] = (folder, {**sizes, "write_seconds": round(seconds, 2)})
        return self.folders[key]


# ----------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp_dtype(device: torch.device, amp: bool) -> str:
    """What stdeploy.train._autocast runs under: bf16 where the GPU supports it, else fp16; fp32 on CPU."""
    if device.type != "cuda" or not amp:
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def amp_label(amp: bool, dtype: str) -> str:
    """``on (bf16)``, ``off (fp32)``; ``on (fp32)`` on the CPU, where train() ignores amp."""
    return f"{'on' if amp else 'off'} ({dtype})"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_loading(dataset, batch: int, seed: int, batches: int, deadline: float) -> dict:
    """Seconds per training batch of the DataLoader alone (read, bin, augment, collate)."""
    times = []
    it = iter(make_loader(dataset, batch, shuffle=True, seed=seed, epoch=0))
    for _ in range(batches):
        if time.perf_counter() > deadline:
            break
        t0 = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        times.append(time.perf_counter() - t0)
    if not times:
        return {"load_batches": 0}
    return {"load_batches": len(times), "load_batch_s": statistics.median(times), "load_batch_s_all": times}


def time_eval(model, test, n: int, timesteps: int, batch: int, device: torch.device) -> dict:
    """Images per second of stdeploy.train.evaluate on the first ``n`` test samples."""
    sub = torch.utils.data.Subset
    n = min(n, len(test))
    evaluate(model, sub(test, range(min(batch, n, 32))), timesteps, batch, device)  # warm-up: kernels, allocator
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    evaluate(model, sub(test, range(n)), timesteps, batch, device)
    sync(device)
    seconds = time.perf_counter() - t0
    out = {"eval_images": n, "eval_seconds": seconds, "eval_images_per_s": n / seconds}
    if device.type == "cuda":
        out["eval_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return out


def run_one(row: dict, path: Path, amp: bool, args, overrides, data: SyntheticData, device: torch.device,
            deadline: float, loading_cache: dict) -> dict:
    """One recipe under one amp setting, filling ``row``; raises when the training run fails (the
    caller records the error next to what ``row`` holds by then). A failing evaluation or loader
    timing is recorded in ``row`` and the training numbers are kept."""
    recipe = load_recipe(path, overrides)
    real_train, real_test, real_note = real_sizes(recipe)
    max_steps = args.warmup + args.steps
    batch = recipe.train.batch_size
    folder, sizes = data.folder(recipe, batch, max_steps)
    row.update(data=recipe.data.name, synthetic=sizes, real_train=real_train, real_test=real_test, real_note=real_note)

    # As `stdeploy train --recipe` builds them (stdeploy/cli.py cmd_train).
    split = recipe.load_data(folder)
    cfg = recipe.model.replace(in_channels=split.in_channels, image_size=split.image_size, num_classes=split.num_classes)
    torch.manual_seed(recipe.train.seed)
    model = build_model(cfg)
    tcfg = dataclasses.replace(recipe.train, device=args.device, max_steps=max_steps, amp=amp)
    row.update(model=cfg.name or cfg.family, params=count_params(model), batch_size=batch, timesteps=cfg.timesteps,
               image_size=cfg.image_size, epochs=tcfg.epochs, eval_batch_size=tcfg.eval_batch_size,
               train_samples=len(split.train), test_samples=len(split.test))
    if len(split.train) < batch * max_steps:
        raise StdeployError(f"synthetic training split of {len(split.train)} < {batch} x {max_steps} steps")

    stamps: list[float] = []

    def on_step(step: int, total: int) -> None:
        sync(device)
        stamps.append(time.perf_counter())
        if step in (1, args.warmup, max_steps) or step % 10 == 0:
            took = stamps[-1] - (stamps[-2] if len(stamps) > 1 else t0)
            log(f"  step {step}/{max_steps}: {took:.3f} s" + (" (with train()'s setup)" if step == 1 else ""))
        if time.perf_counter() > deadline and step < max_steps:
            raise _OutOfTime(f"time limit reached after {step} of {max_steps} steps")

    # train() evaluates its test split once at the end of the cut epoch: one batch is enough here.
    trimmed = dataclasses.replace(split, test=torch.utils.data.Subset(split.test, range(min(batch, len(split.test)))))
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        train(model, trimmed, tcfg, None, progress=False, on_step=on_step)
        row["status"] = "ok"
    except _OutOfTime as err:
        row["status"], row["note"] = "cut", str(err)
    row["train_call_seconds"] = time.perf_counter() - t0
    if device.type == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB

    steps = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup - 1:]  # durations of steps warmup+1 ...
    row["steps_done"] = len(stamps)
    row["first_step_s"] = stamps[0] - t0 if stamps else None   # train()'s setup (model to device, optimizer, loader) + step 1
    row["step_s_all"] = [b - a for a, b in zip(stamps, stamps[1:])]
    if not steps:
        row["status"] = "cut"
        row.setdefault("note", "no step after the warm-up was timed")
        return row
    median = statistics.median(steps)
    row.update(timed_steps=len(steps), step_median_s=median, step_p90_s=percentile(steps, 90),
               train_images_per_s=batch / median, steps_per_epoch=math.ceil(real_train / batch))
    row["epoch_train_s"] = row["steps_per_epoch"] * median

    if time.perf_counter() < deadline:
        n = args.dvs_eval_images if recipe.data.name == "dvs" else args.eval_images
        log(f"  evaluating {min(n, len(split.test))} test samples")
        try:
            row.update(time_eval(model, split.test, n, cfg.timesteps, tcfg.eval_batch_size, device))
            row["epoch_eval_s"] = real_test / row["eval_images_per_s"]
        except Exception as err:  # noqa: BLE001 - keep the training numbers (eval OOM, say)
            row["eval_error"] = _error_line(err)
            log(f"  evaluation FAILED: {row['eval_error']}")
        free_memory(device)
    key = (str(path), batch)
    if key not in loading_cache and time.perf_counter() < deadline and args.load_batches > 0:
        log(f"  timing {args.load_batches} data batches without the model")
        try:
            loading_cache[key] = time_loading(split.train, batch, tcfg.seed, args.load_batches, deadline)
        except Exception as err:  # noqa: BLE001
            loading_cache[key] = {"load_error": _error_line(err)}
    row.update(loading_cache.get(key, {}))
    if "load_batch_s" in row:
        row["load_share_of_step"] = row["load_batch_s"] / median
    if "epoch_eval_s" in row:
        row["epoch_s"] = row["epoch_train_s"] + row["epoch_eval_s"]
        row["run_hours"] = row["epoch_s"] * tcfg.epochs / 3600
    if row["status"] == "cut":
        row.setdefault("note", "time limit reached")
    del model
    return row


def _error_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


# ----------------------------------------------------------------------------- report
def _f(value, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, fmt)


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"### Recipe training speed: {env['device_name']} (torch {env['torch']}, {env['device']})", "",
             "| recipe | amp | status | params | batch | T | image | step median / p90 s | train img/s | eval img/s "
             "| load s/batch (share of step) | peak alloc / reserved GiB | epoch min | full run h |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["runs"]:
        if r["status"] in ("error", "skipped"):
            why = r.get("error") or r.get("note", "")
            lines.append(f"| {r['recipe']} | {amp_label(r['amp'], r['amp_dtype'])} | {r['status']}: {why[:160].replace('|', '/')} "
                         + "| - " * 11 + "|")
            continue
        load = "-" if "load_batch_s" not in r else f"{r['load_batch_s']:.3f} ({r['load_share_of_step']:.0%})"
        memory = "-" if "peak_allocated_gib" not in r else f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f}"
        steps = "-" if "step_median_s" not in r else f"{r['step_median_s']:.3f} / {r['step_p90_s']:.3f}"
        lines.append(f"| {r['recipe']} | {amp_label(r['amp'], r['amp_dtype'])} | {r['status']} | {r['params']:,} | {r['batch_size']} | "
                     f"{r['timesteps']} | {r['image_size']} | {steps} | {_f(r.get('train_images_per_s'), '.0f')} | "
                     f"{_f(r.get('eval_images_per_s'), '.0f')} | {load} | {memory} | {_f(r.get('epoch_s'), '.1f', 1 / 60)} | "
                     f"{_f(r.get('run_hours'), '.1f')} |")
    lines += ["", "Epoch = ceil(train / batch) x median step + test / eval throughput, for the real set sizes "
              "(CIFAR 50,000 + 10,000; CIFAR10-DVS 10,000 recordings split by test_fraction); full run = "
              "recipe epochs. Steps include single-process data loading; eval is fp32 (train.evaluate). "
              "Synthetic data: random pixels / events."]
    for r in doc["runs"]:
        notes = [r[k] for k in ("note", "eval_error", "load_error") if r.get(k) and r["status"] != "skipped"]
        if notes:
            lines.append(f"- {r['recipe']} (amp {amp_label(r['amp'], r['amp_dtype'])}): {'; '.join(notes)}")
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict, args) -> None:
    """JSON and markdown, each to a temporary file renamed onto the target."""
    for target, text in ((args.out, json.dumps(doc, indent=1, default=str)), (args.markdown, markdown(doc))):
        if not target:
            continue
        atomic_write_text(target, text)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=torch.cuda.get_device_name(device), device_memory_gib=props.total_memory / GIB,
                   bf16_supported=torch.cuda.is_bf16_supported())
    else:
        env["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--recipes", default=None, help="comma-separated recipe names (models/recipes/NAME.toml) or paths (default: all)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--amp", choices=tuple(AMP_MODES), default="on", help="mixed precision on CUDA: on, off or both (default on)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10, at least 1)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    ap.add_argument("--eval-images", type=int, default=2000, help="CIFAR test images for the eval throughput (default 2000)")
    ap.add_argument("--dvs-eval-images", type=int, default=128, help="DVS test recordings for the eval throughput (default 128)")
    ap.add_argument("--dvs-events", type=int, default=300_000, help="events per synthetic DVS recording (default 300000)")
    ap.add_argument("--cifar-train", type=int, default=REAL_CIFAR[0], help="synthetic CIFAR training records (default 50000)")
    ap.add_argument("--cifar-test", type=int, default=REAL_CIFAR[1], help="synthetic CIFAR test records (default 10000)")
    ap.add_argument("--load-batches", type=int, default=4, help="training batches timed without the model (default 4; 0: skip)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override for every recipe, e.g. --set model.depth=1 (repeatable)")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds; stop timing and skip what is left once spent")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    ap.add_argument("--data-dir", default=None, help="where to write the synthetic data (default: a temporary directory, removed after)")
    ap.add_argument("--out", default="runs/recipe-speed/recipe_speed.json", help="JSON results")
    ap.add_argument("--markdown", default=None, help="markdown table (default: --out with .md)")
    return ap


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    if args.markdown is None:
        args.markdown = str(Path(args.out).with_suffix(".md"))
    try:
        if args.warmup < 1 or args.steps < 1:
            raise StdeployError(f"--warmup and --steps must be >= 1, got {args.warmup}, {args.steps}")
        paths = resolve_recipes(args.recipes)
        overrides = parse_set(args.set)
        device = resolve_device(args.device)
    except StdeployError as err:
        print(f"recipe_speed: error: {err}", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    deadline = t_start + args.time_limit if args.time_limit is not None else math.inf
    doc = {"environment": environment(device), "args": vars(args), "runs": [], "finished": False}
    log(f"recipe_speed: {len(paths)} recipe(s) x amp {args.amp} on {doc['environment']['device_name']}, "
        f"{args.warmup} warm-up + {args.steps} timed steps each"
        + (f", time limit {args.time_limit:.0f} s" if args.time_limit is not None else ""))
    loading_cache: dict = {}
    with tempfile.TemporaryDirectory(prefix="recipe-speed-", dir=args.data_dir) as tmp:
        data = SyntheticData(Path(tmp), args)
        for amp in AMP_MODES[args.amp]:           # every recipe with the first setting before the second
            for path in paths:
                label = f"{path.stem}, amp {amp_label(amp, amp_dtype(device, amp))}"
                if time.perf_counter() > deadline:
                    log(f"[{label}] skipped: time limit")
                    doc["runs"].append({"recipe": path.stem, "path": str(path), "amp": amp,
                                        "amp_dtype": amp_dtype(device, amp), "status": "skipped", "note": "time limit"})
                    write_outputs(doc, args)
                    continue
                log(f"[{label}] starting ({time.perf_counter() - t_start:.0f} s elapsed)")
                t0 = time.perf_counter()
                row = {"recipe": path.stem, "path": str(path), "amp": amp, "amp_dtype": amp_dtype(device, amp)}
                try:
                    run_one(row, path, amp, args, overrides, data, device, deadline, loading_cache)
                except Exception as err:  # noqa: BLE001 - one recipe's failure (OOM included) must not stop the rest
                    row.update(status="error", error=_error_line(err), traceback=traceback.format_exc(limit=-8))
                    log(f"[{label}] FAILED: {row['error']}")
                free_memory(device)
                row["seconds"] = time.perf_counter() - t0
                doc["runs"].append(row)
                write_outputs(doc, args)
                if "step_median_s" in row:
                    log(f"[{label}] {row['status']}: step {row['step_median_s']:.3f} s median, "
                        f"{row['train_images_per_s']:.0f} img/s"
                        + (f", epoch {row['epoch_s'] / 60:.1f} min, {row['run_hours']:.1f} h for {row['epochs']} epochs"
                           if "epoch_s" in row else "")
                        + (f", peak {row['peak_allocated_gib']:.2f} GiB" if "peak_allocated_gib" in row else "")
                        + f" ({row['seconds']:.0f} s)")
    doc["finished"] = True
    doc["seconds"] = time.perf_counter() - t_start
    write_outputs(doc, args)
    print(markdown(doc), flush=True)
    log(f"results: {args.out}, {args.markdown} ({doc['seconds']:.0f} s)")
    return 0 if any("step_median_s" in r for r in doc["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
