"""``stdeploy VERB ...``: a thin layer over the library. Every verb takes ``--json`` and then prints
one JSON object with its results as the last line of stdout; bad input exits with status 2 and a
one-line message on stderr."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .errors import StdeployError

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


# ----------------------------------------------------------------------------- train
def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="digits (default, offline), cifar10, cifar100, imagefolder, dvs")
    p.add_argument("--data-root", default=None, help="local folder of the data set (all but digits)")


@command("train")
def cmd_train(args: argparse.Namespace) -> dict:
    from .data import load_dataset
    from .models import build_model, resolve_config
    from .train import TrainConfig, train

    cfg = resolve_config(args.model, neuron=args.neuron, timesteps=args.timesteps)
    data = load_dataset(args.data, args.data_root, image_size=cfg.image_size if args.data != "digits" else None,
                        timesteps=cfg.timesteps, augment=args.augment, seed=args.seed)
    cfg = cfg.replace(in_channels=data.in_channels, image_size=data.image_size, num_classes=data.num_classes)
    model = build_model(cfg)
    tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                       amp=not args.no_amp, weight_decay=args.weight_decay)
    result = train(model, data, tcfg, args.out, resume=args.resume, progress=not args.quiet, meta={"preset": cfg.name})
    out = {k: v for k, v in result.to_dict().items() if k != "history"}
    out["model"] = cfg.name or cfg.family
    out["neuron"] = cfg.neuron
    if not args.json:
        _print_table([("model", out["model"]), ("neuron", cfg.neuron), ("params", result.params), ("epochs", result.epochs),
                      ("test accuracy", f"{result.test_accuracy:.4f}"), ("seconds", f"{result.seconds:.1f}"),
                      ("checkpoint", result.checkpoint)])
    return out


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a spiking transformer (surrogate gradients; torchrun for several processes)")
    p.add_argument("--model", default="sdt-tiny", help="preset name or a .toml/.yaml config file (default sdt-tiny)")
    p.add_argument("--neuron", choices=["lif", "slif"], default=None, help="override the config's neuron type")
    p.add_argument("--timesteps", type=int, default=None, help="override T")
    add_data_args(p)
    p.add_argument("--augment", action="store_true", help="random crop + flip on the training split (image data)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--out", default="runs/train", help="checkpoint folder, written after every epoch")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")


# ----------------------------------------------------------------------------- prune
@command("prune")
def cmd_prune(args: argparse.Namespace) -> dict:
    from .checkpoint import load_checkpoint, save_checkpoint
    from .data import load_dataset
    from .prune import DEFAULT_LAYERS, CompensationConfig, PruneConfig, prune_model

    pcfg = PruneConfig(method=args.method, sparsity=args.sparsity, param_ratio=args.param_ratio if args.rank is None else None,
                       rank=args.rank, scope=args.scope, schedule=args.schedule, penalty=args.penalty,
                       layers=tuple(args.layers.split(",")) if args.layers else DEFAULT_LAYERS)
    ccfg = CompensationConfig(neuron=args.compensate, epochs=args.epochs, penalty_epochs=args.penalty_epochs,
                              learn_threshold="threshold" in args.slif_learn, learn_leak="leak" in args.slif_learn,
                              recalibrate_bn=not args.no_bn_recalibration, lr=args.lr, seed=args.seed, device=args.device)
    ckpt = load_checkpoint(args.checkpoint)
    data = load_dataset(args.data, args.data_root, image_size=ckpt.config.image_size if args.data != "digits" else None,
                        timesteps=ckpt.config.timesteps, seed=args.seed)
    model, report = prune_model(ckpt.model, data, pcfg, ccfg, out=args.out, progress=not args.quiet)
    out = save_checkpoint(args.out, model, meta={**ckpt.meta, "prune": report, "parent": str(ckpt.path)})
    (out / "train_state.pt").unlink(missing_ok=True)  # the fine-tune's optimizer state belongs to the unfinalized model
    report["checkpoint"] = str(out)
    if not args.json:
        acc = report["accuracy"]
        rows = [("method", report["method"]), ("compensation", report["compensation"])]
        rows += [(f"accuracy {k.replace('_', ' ')}", f"{v:.4f}") for k, v in acc.items()]
        rows += [("block params dense", report["block_params_dense"]), ("block params remaining", report["block_params_remaining"]),
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
    p.add_argument("--sparsity", type=float, default=0.9, help="l1p: fraction of zeros in the block weights")
    p.add_argument("--param-ratio", type=float, default=0.3, help="dsp: remaining / dense block parameters")
    p.add_argument("--rank", type=int, default=None, help="dsp: a fixed rank per layer instead of --param-ratio")
    p.add_argument("--scope", choices=["global", "layer"], default="global")
    p.add_argument("--schedule", choices=["oneshot", "cubic"], default="oneshot", help="l1p mask schedule")
    p.add_argument("--penalty", type=float, default=None, help="L1 / group penalty coefficient (method default)")
    p.add_argument("--penalty-epochs", type=int, default=3, help="epochs with the penalty before pruning")
    p.add_argument("--layers", default=None, help="comma-separated fnmatch patterns of linear layers (default: block linears)")
    p.add_argument("--compensate", default="slif", help="slif, lif or none")
    p.add_argument("--slif-learn", default="threshold,leak", help="what sLIF learns: threshold, leak or both")
    p.add_argument("--no-bn-recalibration", action="store_true")
    p.add_argument("--epochs", type=int, default=15, help="compensation fine-tune epochs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_data_args(p)
    p.add_argument("--out", default="runs/pruned", help="checkpoint folder of the pruned model")


PARSERS = [_train_parser, _prune_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stdeploy", description=__doc__.splitlines()[0])
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
    except (StdeployError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as err:
        print(f"stdeploy {args.verb}: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
