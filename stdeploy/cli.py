"""``stdeploy VERB ...``: a thin layer over the library. Every verb takes ``--json`` and then prints
one JSON object with its results as the last line of stdout; bad input exits with status 2 and a
one-line message on stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from .errors import ConfigError, StdeployError

COMMANDS: dict[str, Callable[[argparse.Namespace], dict]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


def _print_table(rows: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


# ----------------------------------------------------------------------------- trust boundary
def count(minimum: int = 1):
    """An argparse type: an integer >= ``minimum`` (argparse names the flag in its one-line error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {'a positive integer' if minimum == 1 else f'an integer >= {minimum}'}, got {value}")
        return value

    parse.__name__ = "count"
    return parse


def finite(minimum: float | None = None, maximum: float | None = None):
    """An argparse type: a finite float, optionally within ``[minimum, maximum]``."""
    def parse(text: str) -> float:
        import math

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            bounds = "" if minimum is None and maximum is None else f" in [{'-inf' if minimum is None else minimum}, {'inf' if maximum is None else maximum}]"
            raise argparse.ArgumentTypeError(f"must be a finite number{bounds}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def guard_out(out: str, inputs: dict[str, str | None], *, overwrite: bool, checkpoint: bool = False,
              resume: bool | None = None) -> None:
    """Refuse (exit 2) an ``--out`` that would destroy something not asked for: an existing non-empty
    folder without ``--overwrite`` (train: a checkpoint with ``--resume`` is fine), a folder that is,
    holds or lies inside an input, the current folder or one above it. ``inputs``: flag -> path;
    ``checkpoint``: ``--out`` is a checkpoint folder (a non-empty folder that is not one is never
    replaced); ``resume``: None where the verb has no ``--resume``."""
    from pathlib import Path

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: choose one")
    target = Path(out).resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ConfigError(f"--out {out} is the current folder or one above it; name a folder of its own")
    for flag, path in inputs.items():
        if path is None or not Path(path).exists():  # a preset name, or a missing input refused later
            continue
        source = Path(path).resolve()
        if source == target or target in source.parents or source in target.parents:
            raise ConfigError(f"--out {out} and {flag} {path} overlap; a command never writes over or into its own input")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    is_checkpoint = (target / "config.json").is_file()
    if resume:
        if not is_checkpoint:
            raise ConfigError(f"--resume: no checkpoint at --out {out}")
        return
    if not (target.is_dir() and any(target.iterdir())):
        return
    if checkpoint and not is_checkpoint:
        raise ConfigError(f"--out {out} is not empty and not a checkpoint; choose another folder")
    if not overwrite:
        if is_checkpoint and resume is not None:
            raise ConfigError(f"--out {out} holds a checkpoint; pass --resume to continue it or --overwrite to replace it")
        raise ConfigError(f"--out {out} {'holds a checkpoint' if is_checkpoint else 'exists and is not empty'}; pass --overwrite to replace it")


def memory_limit(args: argparse.Namespace) -> int | None:
    """``--max-memory-gb`` in bytes; without it the GPU's memory when training there, else None
    (half the machine's memory: :func:`stdeploy.models.budget.memory_limit_bytes`)."""
    gb = getattr(args, "max_memory_gb", None)
    if gb is not None:
        return int(gb * 2 ** 30)
    if getattr(args, "device", None) in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
    return None


# ----------------------------------------------------------------------------- train
def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="digits (default, offline), mnist1d (offline, 1-D presets), cifar10, cifar100, "
                                                     "imagefolder, dvs")
    p.add_argument("--data-root", default=None, help="local folder of the data set (all but digits)")


@command("train")
def cmd_train(args: argparse.Namespace) -> dict:
    import dataclasses

    from .models import build_model, config_for_data
    from .models.budget import check_budget
    from .recipes import flag_overrides, load_recipe, parse_set
    from .train import seed_everything, train

    flags = {"neuron": ("model.neuron",), "timesteps": ("model.timesteps", "data.timesteps"), "data": ("data.name",),
             "augment": ("train.augment",), "epochs": ("train.epochs",), "batch_size": ("train.batch_size",),
             "lr": ("train.lr",), "weight_decay": ("train.weight_decay",), "warmup_epochs": ("train.warmup_epochs",),
             "schedule": ("train.schedule",), "label_smoothing": ("train.label_smoothing",), "seed": ("train.seed",),
             "amp": ("train.amp",)}
    values = {**vars(args), "amp": False if args.no_amp else None}
    recipe = load_recipe(args.recipe, parse_set(args.set) + flag_overrides(values, flags), model=args.model)
    guard_out(args.out, {"--recipe": args.recipe, "--data-root": args.data_root, "--model": args.model},
              overwrite=args.overwrite, checkpoint=True, resume=args.resume)
    data = recipe.load_data(args.data_root)
    cfg = config_for_data(recipe.model, data)
    tcfg = dataclasses.replace(recipe.train, device=args.device, max_steps=args.max_steps)
    if tcfg.epochs < 1:
        raise ConfigError(f"{recipe.source}: train.epochs = {tcfg.epochs}; train needs at least one epoch (no checkpoint would be written)")
    check_budget(cfg, tcfg.batch_size, training=True, limit_bytes=memory_limit(args), source=f"model {cfg.name or cfg.family}")
    seed_everything(tcfg.seed)  # --seed fixes the initial weights too
    model = build_model(cfg)
    result = train(model, data, tcfg, args.out, resume=args.resume, progress=not args.quiet,
                   meta={"preset": cfg.name, **recipe.meta()})
    out = {k: v for k, v in result.to_dict().items() if k != "history"}
    out["model"] = cfg.name or cfg.family
    out["neuron"] = cfg.neuron
    out["recipe"] = args.recipe
    if not args.json:
        rows = [("recipe", args.recipe)] if args.recipe else []
        _print_table(rows + [("model", out["model"]), ("neuron", cfg.neuron), ("params", result.params), ("epochs", result.epochs),
                             ("steps", result.steps), ("test accuracy", f"{result.test_accuracy:.4f}"),
                             ("seconds", f"{result.seconds:.1f}"), ("checkpoint", result.checkpoint)])
    return out


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a spiking transformer (surrogate gradients; torchrun for several processes)")
    p.add_argument("--recipe", default=None, help="recipe .toml (models/recipes/): model, data, training settings; flags override it")
    p.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
                   help="override one recipe value, e.g. --set train.mixup_alpha=0 --set model.depth=2 (repeatable)")
    p.add_argument("--model", default=None, help="preset name or a .toml/.yaml config file (default sdt-tiny); replaces a recipe's [model]")
    p.add_argument("--neuron", choices=["lif", "slif"], default=None, help="override the config's neuron type")
    p.add_argument("--timesteps", type=count(), default=None, help="override T")
    add_data_args(p)
    p.set_defaults(data=None)  # None: the recipe's data set, digits without one
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip on the training split (flip for DVS); default: the recipe's, off without one")
    p.add_argument("--epochs", type=count(), default=None, help="default: the recipe's, 20 without one")
    p.add_argument("--batch-size", type=count(), default=None, help="per process; default: the recipe's, 64 without one")
    p.add_argument("--lr", type=finite(), default=None, help="default: the recipe's, 2e-3 without one")
    p.add_argument("--weight-decay", type=finite(), default=None, help="default: the recipe's, 0 without one")
    p.add_argument("--warmup-epochs", type=finite(), default=None, help="linear warmup epochs (default: the recipe's, 0 without one)")
    p.add_argument("--schedule", choices=["cosine", "constant"], default=None, help="lr after warmup (default cosine)")
    p.add_argument("--label-smoothing", type=finite(), default=None, help="default: the recipe's, 0 without one")
    p.add_argument("--seed", type=count(0), default=None, help="default: the recipe's, 0 without one")
    p.add_argument("--max-steps", type=count(), default=None, help="stop after this many optimizer steps (smoke tests, timing)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--out", default="runs/train", help="checkpoint folder, written after every epoch")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out (otherwise refused)")
    p.add_argument("--max-memory-gb", type=finite(0.001), default=None,
                   help="refuse a model whose estimated training memory exceeds this (default: half the machine's memory, "
                        "or the GPU's memory on CUDA)")


# ----------------------------------------------------------------------------- prune
@command("prune")
def cmd_prune(args: argparse.Namespace) -> dict:
    from .checkpoint import load_checkpoint
    from .prune import PruneConfig, layer_patterns, prune_model
    from .recipes import RecipeCompensation, flag_overrides, load_recipe, parse_set

    pcfg = PruneConfig(method=args.method, sparsity=args.sparsity, param_ratio=args.param_ratio if args.rank is None else None,
                       rank=args.rank, scope=args.scope, schedule=args.schedule, penalty=args.penalty,
                       layers=layer_patterns(args.layers))
    flags = {"data": ("data.name",), "epochs": ("finetune.epochs",), "penalty_epochs": ("finetune.penalty_epochs",),
             "lr": ("finetune.lr",), "batch_size": ("finetune.batch_size",), "seed": ("train.seed",)}
    recipe = load_recipe(args.recipe, parse_set(args.set) + flag_overrides(vars(args), flags))
    ft = recipe.finetune
    ccfg = RecipeCompensation(neuron=args.compensate, epochs=ft.epochs, penalty_epochs=ft.penalty_epochs,
                              learn_threshold="threshold" in args.slif_learn, learn_leak="leak" in args.slif_learn,
                              recalibrate_bn=not args.no_bn_recalibration, lr=ft.train.lr, batch_size=ft.train.batch_size,
                              intrinsic_lr_scale=ft.train.intrinsic_lr_scale, seed=recipe.train.seed, device=args.device,
                              base=ft.train)
    guard_out(args.out, {"checkpoint": args.checkpoint, "--recipe": args.recipe, "--data-root": args.data_root},
              overwrite=args.overwrite, checkpoint=True)
    ckpt = load_checkpoint(args.checkpoint)
    for key in ("image_size", "timesteps"):
        wanted = getattr(recipe.data, key)
        if wanted is not None and wanted != getattr(ckpt.config, key):
            raise ConfigError(f"{recipe.source}: [data] {key} = {wanted} but checkpoint {ckpt.path} has {getattr(ckpt.config, key)}; "
                              f"add --set data.{key}={getattr(ckpt.config, key)}")
    data = recipe.load_data(args.data_root, finetune=True, image_size=ckpt.config.image_size, timesteps=ckpt.config.timesteps)
    _, report = prune_model(ckpt.model, data, pcfg, ccfg, out=args.out, progress=not args.quiet,
                            meta={**ckpt.meta, "parent": str(ckpt.path), **{f"prune_{k}": v for k, v in recipe.meta().items()}},
                            quantize=_quantize_config(args))
    if not args.json:
        acc = report["accuracy"]
        rows = [("method", report["method"]), ("compensation", report["compensation"])]
        rows += [(f"accuracy {k.replace('_', ' ')}", f"{v:.4f}") for k, v in acc.items()]
        rows += [("block params dense", report["block_params_dense"]), ("block params remaining", report["block_params_remaining"]),
                 ("model params", f"{report['model']['params']} of {report['model']['params_dense']}"),
                 ("model MACs/step", f"{report['model']['macs']} of {report['model']['macs_dense']} "
                                     f"(limit {report['model']['macs_speedup_limit']:.2f}x)"),
                 ("checkpoint", report["checkpoint"])]
        _print_table(rows)
        for name, layer in report["layers"].items():
            detail = f"rank {layer['rank']}" if "rank" in layer else f"sparsity {layer['sparsity']:.3f}"
            print(f"  {name:<28} {detail}")
    return report


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a checkpoint (L1P sparse or DSP low-rank) and compensate with sLIF")
    p.add_argument("checkpoint", help="checkpoint folder written by `stdeploy train`")
    p.add_argument("--method", default="l1p", help="l1p (magnitude masks) or dsp (low-rank U·V)")
    p.add_argument("--sparsity", type=finite(), default=0.9, help="l1p: fraction of zeros in the block weights")
    p.add_argument("--param-ratio", type=finite(), default=0.3, help="dsp: remaining / dense block parameters")
    p.add_argument("--rank", type=count(), default=None, help="dsp: a fixed rank per layer instead of --param-ratio")
    p.add_argument("--scope", choices=["global", "layer"], default="global")
    p.add_argument("--schedule", choices=["oneshot", "cubic"], default="oneshot", help="l1p mask schedule")
    p.add_argument("--penalty", type=finite(), default=None, help="L1 / group penalty coefficient (method default)")
    p.add_argument("--penalty-epochs", type=count(0), default=None, help="epochs with the penalty before pruning (default: the recipe's, 3 without one)")
    p.add_argument("--layers", default=None, help="blocks (default: block linears), all (also the embedding convolutions and the "
                                                  "classifier; dsp leaves convolutions dense) or comma-separated fnmatch patterns")
    p.add_argument("--compensate", default="slif", help="slif, lif or none")
    p.add_argument("--slif-learn", default="threshold",
                   help="what sLIF learns: threshold (default; the compression study found learning the leak no help), leak, or threshold,leak")
    p.add_argument("--no-bn-recalibration", action="store_true")
    p.add_argument("--recipe", default=None, help="recipe .toml: data set and [finetune] settings (flags override it)")
    p.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
                   help="override one recipe value, e.g. --set finetune.warmup_epochs=1 (repeatable)")
    p.add_argument("--epochs", type=count(0), default=None, help="compensation fine-tune epochs (default: the recipe's, 15 without one)")
    p.add_argument("--lr", type=finite(), default=None, help="fine-tune lr (default: the recipe's [finetune] lr, 1e-3 without one)")
    p.add_argument("--batch-size", type=count(), default=None, help="fine-tune batch size (default: the recipe's, 64 without one)")
    p.add_argument("--seed", type=count(0), default=None, help="default: the recipe's, 0 without one")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_data_args(p)
    p.set_defaults(data=None)  # None: the recipe's data set, digits without one
    p.add_argument("--out", default="runs/pruned", help="checkpoint folder of the pruned model")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out (otherwise refused)")
    _add_quantize_args(p)


def input_range(text: str) -> tuple[float, float]:
    """An argparse type: ``LO,HI``, two finite numbers with ``LO < HI`` (the exact mode's input range)."""
    import math

    parts = text.split(",")
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise argparse.ArgumentTypeError(f"expected two finite numbers LO < HI, got {text!r}")
    return lo, hi


def _add_input_contract_args(p) -> None:
    p.add_argument("--input-range", type=input_range, default=None, metavar="LO,HI",
                   help="exact/loihi2 mode: the input contract's range, e.g. -4.5,4.5 (default: the training split's smallest and "
                        "largest value, rounded outward to the grid; [0,1] for images); inputs outside are clipped")
    p.add_argument("--input-frac-bits", type=count(0), default=None,
                   help="exact/loihi2 mode: the input contract's grid 2^-N (default 8; loihi2: 4, and no finer)")


def _add_quantize_args(p) -> None:
    p.add_argument("--quantize", choices=["float", "exact", "loihi2"], default="float",
                   help="exact: quantise after pruning (8-bit power-of-two-scaled weights, integer-exact in float32 on "
                        "every runtime) and fine-tune with straight-through gradients; loihi2: the same plus Loihi 2's integer "
                        "constraints (input grid 2^-4, fixed exponents, integer thresholds), so Lava fixed point and netx run "
                        "the trained integers; the checkpoint records the mode and the input contract")
    p.add_argument("--quantize-epochs", type=count(0), default=3, help="quantisation-aware fine-tune epochs (with --quantize exact or loihi2)")
    _add_input_contract_args(p)


def _quantize_config(args):
    from .prune import QuantizeConfig

    if args.quantize == "float":
        return None
    return QuantizeConfig(mode=args.quantize, epochs=args.quantize_epochs, seed=args.seed or 0, device=args.device,
                          input_range=args.input_range, input_frac_bits=args.input_frac_bits)


# ----------------------------------------------------------------------------- quantize
@command("quantize")
def cmd_quantize(args: argparse.Namespace) -> dict:
    from .checkpoint import load_checkpoint
    from .data import load_dataset
    from .prune import QuantizeConfig, quantize_model

    guard_out(args.out, {"checkpoint": args.checkpoint, "--data-root": args.data_root}, overwrite=args.overwrite, checkpoint=True)
    qcfg = QuantizeConfig(mode=args.mode, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, device=args.device,
                          input_range=args.input_range, input_frac_bits=args.input_frac_bits)
    ckpt = load_checkpoint(args.checkpoint)
    data = load_dataset(args.data, args.data_root, seed=args.seed, image_size=ckpt.config.image_size if args.data != "digits" else None,
                        timesteps=ckpt.config.timesteps)
    _, report = quantize_model(ckpt.model, data, qcfg, out=args.out, progress=not args.quiet,
                               meta={**ckpt.meta, "parent": str(ckpt.path)})
    if not args.json:
        _print_table([("mode", report["mode"])] + [(f"accuracy {k.replace('_', ' ')}", f"{v:.4f}") for k, v in report["accuracy"].items()]
                     + [("input contract", _contract_text(report.get("input_contract"))), ("checkpoint", report.get("checkpoint"))])
    return report


def _contract_text(c: dict | None) -> str:
    return "-" if not c else f"[{c['lo']:g}, {c['hi']:g}] on 2^-{c['frac_bits']}"


def _quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="fine-tune a checkpoint into the integer-exact mode (8-bit power-of-two-scaled weights)")
    p.add_argument("checkpoint")
    p.add_argument("--mode", choices=["exact", "loihi2"], default="exact",
                   help="exact (integer-exact on every runtime) or loihi2 (exact plus Loihi 2's integer constraints)")
    p.add_argument("--epochs", type=count(0), default=3, help="quantisation-aware fine-tune epochs (0: quantise only)")
    p.add_argument("--lr", type=finite(minimum=0.0), default=5e-4)
    p.add_argument("--batch-size", type=count(), default=64)
    p.add_argument("--seed", type=count(0), default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_data_args(p)
    _add_input_contract_args(p)
    p.add_argument("--out", default="runs/exact", help="checkpoint folder of the exact-mode model")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out (otherwise refused)")


# ----------------------------------------------------------------------------- export
@command("export")
def cmd_export(args: argparse.Namespace) -> dict:
    from .checkpoint import load_checkpoint
    from .data import load_dataset
    from .export.directory import export_model

    guard_out(args.out, {"checkpoint": args.checkpoint, "--data-root": args.data_root}, overwrite=args.overwrite)
    ckpt = load_checkpoint(args.checkpoint)
    data = load_dataset(args.data, args.data_root, seed=0) if args.data else None
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    if args.netx_part != "model" and "netx" not in formats:
        raise ConfigError(f"--netx-part {args.netx_part} applies to --format netx, which --format {args.format} does not include")
    manifest = export_model(ckpt.model, args.out, formats, data=data, samples=None if args.all_samples else args.samples,
                            sparse_initializers=args.sparse_initializers, spikformer=args.spikformer, source=str(ckpt.path),
                            overwrite=args.overwrite, netx_part=args.netx_part)
    summary = {"out": args.out, "artifacts": {k: {kk: v.get(kk) for kk in ("file", "bytes", "dense_file_bytes") if kk in v}
                                              for k, v in manifest["artifacts"].items()},
               "validation": manifest["validation"], "batchnorm_folding": manifest["batchnorm_folding"]}
    if not args.json:
        v = manifest["validation"]
        print(f"exported to {args.out} (validated on {v['input']}; reference accuracy {v['reference_accuracy']})")
        for name, r in v["results"].items():
            art = manifest["artifacts"][name]
            print(f"  {name:<10} {art['file']:<16} {art['bytes']:>10} B  spike mismatches {r['spike_mismatches']}/{r['spikes_total']}"
                  f"  max logit error {r['logits_max_abs_error']:.2e}  accuracy {r['accuracy']}")
            if r["flips"]:
                print("             " + first_flip(r))
        if "streaming_vs_unrolled" in v:
            s_ = v["streaming_vs_unrolled"]
            print(f"  streaming vs unrolled ONNX: {s_['spike_mismatches']} spike mismatches, logits within {s_['logits_max_abs_error']:.2e}")
        if "netx" in v:
            n_, art = v["netx"], manifest["artifacts"]["netx"]
            print(f"  netx       {art['file']:<16} {art['bytes']:>10} B  Loihi integer arithmetic (numpy) vs {n_['against']}: "
                  f"{n_['spike_agreement']:.4f} of spikes agree" + (f", accuracy {n_['accuracy']}" if "accuracy" in n_ else ""))
        f = manifest["batchnorm_folding"]
        print(f"  BatchNorm folding vs original: {f['spike_mismatches']} output spike flips" + (f"; {first_flip(f)}" if f["flips"] else ""))
    return summary


def first_flip(result: dict) -> str:
    """One line on a comparison's (``Comparison.to_dict``) first diverging layer: whether its flips
    start at float-rounding distance from threshold, and, apart from that, any task-level bound the
    outcome breaks (a rounding flip in a deep float model can cascade past the bound)."""
    first = result["flips"][0]
    kind = "float rounding" if result["flips_at_rounding_level"] else "NOT rounding: a bug"
    line = (f"first diverging layer {first['layer']}: {first['flips']} flip(s), membrane {first['max_distance']:.2g} "
            f"from threshold ({kind}); later layers follow from it")
    if result["bound_violations"]:
        line += "; outside the task-level bound: " + "; ".join(result["bound_violations"])
    return line


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to NIR and ONNX (validated against PyTorch)")
    p.add_argument("checkpoint")
    p.add_argument("--format", default="nir,onnx", help="comma-separated: nir, onnx, netx (lava-dl netx HDF5; attention-free models)")
    p.add_argument("--netx-part", choices=["model", "stem"], default="model",
                   help="netx: the whole model (depth 0) or the stem alone as a sub-network")
    p.add_argument("--out", default="runs/export")
    p.add_argument("--sparse-initializers", action="store_true", help="write pruned ONNX weights as sparse initializers")
    p.add_argument("--spikformer", choices=["refuse", "exact"], default="refuse",
                   help="Spikformer's Q·Kᵀ·V in NIR: refuse, or lower exactly to AND neurons (large)")
    p.add_argument("--data", default="digits", help="validation data (its test split; noise when shapes differ)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--samples", type=count(), default=64, help="validation images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out (otherwise refused)")
    p.add_argument("--all-samples", action="store_true", help="validate on the whole test split")


# ----------------------------------------------------------------------------- run / targets
@command("run")
def cmd_run(args: argparse.Namespace) -> dict:
    from .data import load_dataset
    from .runner import load_reference, run_export

    reference = load_reference(args.export_dir)  # a checkpoint, or the NIR graph of an imported directory; loaded once
    data = load_dataset(args.data, args.data_root, image_size=reference.image_size if args.data != "digits" else None,
                        timesteps=reference.timesteps)
    result = run_export(args.export_dir, args.target, args.device, data, batch_size=args.batch_size, limit=args.limit,
                        progress=not args.quiet, options=_tvm_options(args) if args.target == "tvm" else None,
                        reference=reference)
    if not args.json and not result["ran"]:
        print(f"{result['target']} ({result['device']}): {result['reason']}")
        for a in result["info"].get("artifacts", {}).values():
            print(f"  artifact {a.get('path')} ({a.get('bytes')} B)")
        if result["info"].get("kernels"):
            print(f"  {len(result['info']['kernels'])} CUDA kernels: {', '.join(result['info']['kernels'][:6])}, ...")
    elif not args.json:
        rows = [("target", f"{result['target']} ({result['device']})"), ("samples", result["samples"]),
                ("accuracy", f"{result['accuracy']:.4f} ({_REFERENCE_LABEL.get(result.get('reference'), 'PyTorch')} "
                                             f"{result['reference_accuracy']:.4f})")]
        if "spike_mismatches" in result:
            rows.append(("output spikes", f"{result['spike_mismatches']} mismatches of {result['spikes_total']} "
                                          f"(agreement {result['spike_agreement']:.6f})"))
        if result["info"].get("path"):
            rows.append(("kernels", result["info"]["path"]))
        rates = result.get("firing_rates", {})
        if rates:
            lo, hi = min(rates, key=rates.get), max(rates, key=rates.get)
            rows.append(("firing rates", f"{rates[lo]:.4f} ({lo}) to {rates[hi]:.4f} ({hi})"
                                         + (f"; SILENT: {', '.join(result['silent_layers'])}" if result.get("silent_layers") else "")))
        rows += [("compile", f"{result['compile_seconds']:.2f} s"), ("run", f"{result['run_seconds']:.3f} s")]
        rows.append(("tolerance", "within" if result["within_tolerance"] else "EXCEEDED: " + "; ".join(result["tolerance_problems"])))
        _print_table(rows)
    return result


_REFERENCE_LABEL = {"pytorch": "PyTorch", "nir-graph": "NIR graph"}  # the reference a run is compared with


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="run an export directory on a target; accuracy and spike agreement with PyTorch",
                       epilog="exit status 1 when the results exceed the target's tolerance (the `tolerance` row)")
    p.add_argument("export_dir")
    p.add_argument("--target", required=True, help="onnxruntime, tvm or lava (see `stdeploy targets`)")
    p.add_argument("--device", default=None, help="device profile name or .toml path (default per target)")
    add_data_args(p)
    p.add_argument("--batch-size", type=count(), default=64)
    p.add_argument("--limit", type=count(), default=None, help="only the first N test images")
    _add_tvm_args(p)


def _add_tvm_args(p) -> None:
    g = p.add_argument_group("tvm cpu options")
    g.add_argument("--tvm-schedule", choices=["auto", "tuned", "untuned"], default="auto",
                   help="auto: the database of `stdeploy tune` when one exists for this batch; tuned: require it")
    g.add_argument("--tvm-kernels", choices=["blas", "blas-dense", "tir"], default="blas",
                   help="blas: matmuls and stride-1 convolutions skip zero inputs up to a measured density "
                        "(BLAS above); blas-dense: every matmul/conv2d as BLAS calls; tir: all TVM code")
    g.add_argument("--tvm-sparse", choices=["auto", "on", "off"], default="auto",
                   help="cpu: pruned linears on the sparse kernel where it measures faster (auto); "
                        "cuda: on = the sparse kernel for linears with >= 50%% zeros (auto = off)")


def _tvm_options(args) -> dict:
    return {"schedule": args.tvm_schedule, "kernels": args.tvm_kernels, "sparse": args.tvm_sparse}


@command("targets")
def cmd_targets(args: argparse.Namespace) -> dict:
    from .runner import list_targets
    from .targets.profiles import known_profiles

    rows = list_targets()
    profiles = {name: str(path) for name, path in known_profiles().items()}
    if not args.json:
        for r in rows:
            print(f"{r['target']:<12} {'yes' if r['available'] else 'no ':<4} {r['detail']}")
        print("device profiles: " + ", ".join(profiles))
    return {"targets": rows, "profiles": profiles}


def _targets_parser(sub) -> None:
    sub.add_parser("targets", help="list registered targets, whether each can run here, and device profiles")


# ----------------------------------------------------------------------------- bench / profile
@command("bench")
def cmd_bench(args: argparse.Namespace) -> dict:
    from .data import load_dataset
    from .runner import bench_export

    device_rows = {}
    if args.device_report:  # a report made on the device by `python -m stdeploy.runtime`, set beside the host's rows
        from .runtime.report import device_rows as read_device_rows

        device_rows = read_device_rows(args.device_report)
    data = load_dataset(args.data, args.data_root)
    results = bench_export(args.export_dir, [t for t in args.targets.split(",") if t], torch_stack_first(data, args.batch),
                           device=args.device, warmup=args.warmup, repeats=args.repeats, options=_tvm_options(args),
                           pytorch_device=args.pytorch_device, gpu_energy=args.gpu_energy)
    results.update(device_rows)
    if not args.json:
        print(f"{'runtime':<12} {'median ms':>10} {'p90 ms':>8} {'samples/s':>10} {'timesteps/s':>12}")
        for name, r in results.items():
            if "median_s" in r:
                print(f"{name:<12} {r['median_s'] * 1e3:>10.2f} {r['p90_s'] * 1e3:>8.2f} {r['samples_per_s']:>10.1f} {r['timesteps_per_s']:>12.1f}"
                      + (f"  ({r['path']})" if r.get("path") else ""))
                for layer in r.get("layers", [])[:8]:
                    print(f"    {layer['name']:<24} {layer['ms']:.2f} ms")
                if "measured_energy" in r:
                    e = r["measured_energy"]
                    print(f"    GPU energy {e['joules_per_sample'] * 1e3:.3f} mJ/sample ({e['dynamic_joules_per_sample'] * 1e3:.3f} "
                          f"above idle), {e['mean_watts']:.0f} W (idle {e['idle_watts']:.0f} W), {e['calls']} calls in {e['seconds']:.1f} s")
            else:
                print(f"{name:<12} skipped: {r['skipped']}")
    return {"export_dir": args.export_dir, "batch": args.batch, "results": results}


def torch_stack_first(data, n: int):
    import torch

    return torch.stack([data.test[i][0] for i in range(min(n, len(data.test)))])


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="latency of an export directory per target (warm-up, median, p90, throughput)")
    p.add_argument("export_dir")
    p.add_argument("--targets", default="onnxruntime,tvm")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=count(), default=32)
    p.add_argument("--warmup", type=count(0), default=3)
    p.add_argument("--repeats", type=count(), default=20)
    p.add_argument("--gpu-energy", action="store_true", help="also measure GPU energy with NVML power sampling (GPU runs)")
    p.add_argument("--pytorch-device", choices=["cpu", "cuda"], default="cpu", help="where the PyTorch reference row runs")
    p.add_argument("--device-report", default=None, help="report.json from `python -m stdeploy.runtime` on a device: its rows beside these")
    add_data_args(p)
    _add_tvm_args(p)


# ----------------------------------------------------------------------------- tune
@command("tune")
def cmd_tune(args: argparse.Namespace) -> dict:
    from .targets.profiles import load_profile
    from .targets.tvm.tuning import tune

    from .console import show_progress

    bar = None
    if show_progress(not args.quiet):  # a bar only on a terminal
        from tqdm import tqdm

        bar = tqdm(total=None, unit="trial", desc="tuning")

    def progress(task: str, done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(task[:40])
            bar.refresh()

    try:
        summary = tune(args.export_dir, load_profile(args.device), batch_size=args.batch, trials_per_task=args.trials,
                       kernels=args.kernels, sparse=args.sparse, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if not args.json:
        skipped = sum(1 for t in summary["tasks"] if t["new_trials"] == 0)
        print(f"{len(summary['tasks'])} tasks, {summary['new_trials']} new trials ({skipped} tasks already tuned), "
              f"{summary['records']} records in {summary['database']} ({summary['last_run_seconds']} s)")
        if summary["offloaded"]:
            print(f"BLAS kernels: {len(summary['offloaded'])} ({', '.join(summary['offloaded'][:4])}, ...)")
        if summary["sparse_layers"]:
            print(f"sparse kernels: matmuls {summary['sparse_layers']}")
        print("`stdeploy run/bench --target tvm` at this batch now use it")
    return summary


def _tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="MetaSchedule-tune an export directory for a TVM cpu profile (database reused by run/bench)")
    p.add_argument("export_dir")
    p.add_argument("--device", default="cpu", help="cpu device profile (name or .toml)")
    p.add_argument("--trials", type=count(), default=64, help="measured candidates per task (a rerun adds only missing ones)")
    p.add_argument("--batch", type=count(), default=32, help="batch size the module is tuned for")
    p.add_argument("--kernels", choices=["blas", "blas-dense", "tir"], default="blas",
                   help="tune around the BLAS / spike-adaptive kernels (blas, blas-dense), or tune them too (tir)")
    p.add_argument("--sparse", choices=["auto", "off"], default="auto", help="pruned linears on the sparse kernel where faster")


@command("profile")
def cmd_profile(args: argparse.Namespace) -> dict:
    from .data import load_dataset
    from .profile.report import to_markdown, write_report
    from .runner import profile_exports

    data = load_dataset(args.data, args.data_root)
    report = profile_exports(args.export_dirs, data, [t for t in args.targets.split(",") if t],
                             [e for e in args.energy.split(",") if e], batch=args.batch, repeats=args.repeats, samples=args.limit,
                             direct_input=args.direct_input.replace("-", "_"))
    paths = write_report(report, args.out)
    if not args.json:
        print(to_markdown(report))
        print(f"\nreport: {paths['json']}, {paths['markdown']}; plots: {', '.join(paths['plots'])}")
    return {"report": paths, "variants": [{k: v[k] for k in ("name", "accuracy", "counts", "energy")} for v in report["variants"]]}


def _profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="energy (SOPs/MACs x device figures) and latency of export directories; report + plots")
    p.add_argument("export_dirs", nargs="+")
    p.add_argument("--targets", default="onnxruntime")
    p.add_argument("--energy", default="cpu,loihi2", help="device profiles whose energy figures to apply")
    p.add_argument("--batch", type=count(), default=32)
    p.add_argument("--repeats", type=count(), default=10)
    p.add_argument("--limit", type=count(), default=None, help="count operations on the first N test images")
    p.add_argument("--direct-input", choices=["once", "per-step"], default="once",
                   help="charge a real input repeated over T (direct encoding) once per sample (default) or at every step "
                        "(the Spikformer papers' convention)")
    p.add_argument("--out", default="runs/report")
    add_data_args(p)


@command("import")
def cmd_import(args: argparse.Namespace) -> dict:
    from .interop.importer import import_nir

    manifest = import_nir(args.file, args.out, dt=args.dt, timesteps=args.timesteps)
    if not args.json:
        v = manifest["validation"]["results"]["onnx"]
        spikes = f", {v['spike_mismatches']} of {v['spikes_total']} spikes differ" if "spikes_total" in v else ""
        print(f"imported {args.file} to {args.out} (dt {manifest['dt']:g} s, T {manifest['timesteps']}): model.onnx checked "
              f"against the graph{spikes}, values within {v['logits_max_abs_error']:.2e}")
        n = manifest["validation"]["results"].get("nir")
        if n is not None:  # model.nir: the graph in our dialect, the reference of run/bench/profile and what Lava lowers
            print(f"  model.nir (our dialect) checked the same way: {n.get('spike_mismatches', 0)} spikes differ; "
                  + ("; ".join(manifest.get("conversions", [])) or "nothing converted"))
    return {"out": args.out, "dt": manifest["dt"], "timesteps": manifest["timesteps"], "validation": manifest["validation"]}


def _import_parser(sub) -> None:
    p = sub.add_parser("import", help="turn a NIR graph from snnTorch, Norse, SpikingJelly, ... into an export directory (ONNX)")
    p.add_argument("file", help="the .nir file")
    p.add_argument("--out", required=True, help="the export directory to create (must not exist)")
    p.add_argument("--dt", type=float, default=None, help="seconds per step, when the graph's metadata has no dt")
    p.add_argument("--timesteps", type=int, default=4, help="steps the ONNX graph unrolls (default 4)")


PARSERS = [_train_parser, _prune_parser, _quantize_parser, _export_parser, _run_parser, _targets_parser, _tune_parser, _bench_parser, _profile_parser,
           _import_parser]


# ----------------------------------------------------------------------------- package
@command("package")
def cmd_package(args: argparse.Namespace) -> dict:
    from .data import load_dataset
    from .package import package

    data = load_dataset(args.data, args.data_root) if args.data else None
    result = package(args.export_dir, args.device, args.out, data=data, samples=args.samples, runtime=args.runtime,
                     archive=args.archive, overwrite=args.overwrite)
    if not args.json:
        h = result["host_check"]
        print(f"bundle {args.out} for {result['device']['name']} ({result['runtime']}, {'archive' if args.archive else 'folder'}): "
              f"{len(result['files'])} files, {sum(f['bytes'] for f in result['files'].values())} B")
        print(f"  samples: {result['samples']['described']}; output firing rate {result['activity']['output_firing_rate']:.4f}")
        print("  checked here with the device runner: " + (", ".join(
            f"{g['graph']} {g['spike_mismatches']}/{g['spikes_total']} spike mismatches" for g in h["graphs"]) or h.get("skipped", "")))
        print(f"  on the device: see {'README.md in the archive' if args.archive else os.path.join(args.out, 'README.md')}")
    return {k: result[k] for k in ("out", "format", "runtime", "device", "files", "activity", "host_check", "tolerance")}


def _package_parser(sub) -> None:
    p = sub.add_parser("package", help="bundle an export directory for one device: ONNX graphs, samples, runner, manifest")
    p.add_argument("export_dir")
    p.add_argument("--device", required=True, help="device profile name or .toml path (kind cpu or cuda)")
    p.add_argument("--out", required=True, help="bundle folder (NAME.tar.gz with --archive)")
    p.add_argument("--runtime", default="onnxruntime", help="onnxruntime, or tvm: standalone TVM modules (cpu profiles; cuda profiles: with the GPU's kernels)")
    p.add_argument("--archive", action="store_true", help="write one .tar.gz instead of a folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--samples", type=count(), default=32, help="sample inputs (also the batch timed on the device)")
    add_data_args(p)


PARSERS.append(_package_parser)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), naming the flag; ``--help`` shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="stdeploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for add in PARSERS:
        add(sub)
    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="print one JSON object with the results as the last line")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = COMMANDS[args.verb](args)
    except StdeployError as err:
        print(f"stdeploy {args.verb}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # read-only or full file system, permissions, missing files: one line, no traceback
        print(f"stdeploy {args.verb}: error: {_os_error(err)}", file=sys.stderr)
        return 2
    if args.json and os.environ.get("RANK", "0") == "0":  # under torchrun one line, from rank 0 (ranks' lines would interleave)
        print(json.dumps(result, default=str))
    return 1 if result.get("within_tolerance") is False else 0  # ran, but outside the target's tolerance


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(err).__name__


def _os_error(err: OSError) -> str:
    import errno

    what = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EDQUOT: "disk quota exceeded"}.get(err.errno, err.strerror or type(err).__name__)
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{what}" + ("" if err.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)
                               or not err.strerror or what == err.strerror else f" ({err.strerror})")


if __name__ == "__main__":
    raise SystemExit(main())
