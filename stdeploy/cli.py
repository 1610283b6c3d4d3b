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


PARSERS = [_train_parser]


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
