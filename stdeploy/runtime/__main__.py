"""``python -m stdeploy.runtime BUNDLE [--json] [--repeats N] [--out DIR]``: verify a bundle, check
its samples, time it, report. Exit status: 0 when the device reproduced the reference within the
bundle's tolerance, 1 when it did not (the report says where), 2 on a bad bundle or argument
(one line on stderr, nothing written)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .bundle import BundleError, open_bundle
from .report import to_markdown
from .run import run_bundle


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (argparse names the flag in its one-line error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    parse.__name__ = "integer"
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stdeploy.runtime", description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="bundle folder or .tar.gz written by `stdeploy package`")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object (last line of stdout)")
    p.add_argument("--repeats", type=_at_least(1), default=20, help="timed calls (batch) and timed sequences (streaming)")
    p.add_argument("--warmup", type=_at_least(0), default=3, help="untimed calls before timing")
    p.add_argument("--threads", type=_at_least(1), default=None, help="onnxruntime intra-op threads (default: its own)")
    p.add_argument("--provider", default=None, help="onnxruntime execution provider (default: the bundle's first choice)")
    p.add_argument("--energy-seconds", type=float, default=1.0, help="how long to run while a power sensor counts")
    p.add_argument("--out", default=None, help="folder to write report.json and report.md into (created; must not be inside the bundle)")
    p.add_argument("--check-only", action="store_true", help="verify and check the samples; no timing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = Path(args.out) if args.out else None
        if out is not None and out.exists() and not out.is_dir():
            raise BundleError(f"--out {out} exists and is not a folder")
        if not args.energy_seconds > 0:
            raise BundleError(f"--energy-seconds must be > 0, got {args.energy_seconds}")
        with tempfile.TemporaryDirectory(prefix="stdeploy-bundle-") as work:
            bundle = open_bundle(args.bundle, work)
            if out is not None and out.resolve().is_relative_to(bundle.root.resolve()):
                raise BundleError(f"--out {out} is inside the bundle; a bundle is sealed (write the report elsewhere)")
            if args.check_only:
                from .run import check, open_sessions

                sessions = open_sessions(bundle, args.provider, args.threads)
                report = {"bundle": bundle.root.name, "check": check(bundle, sessions, bundle.load_samples())}
            else:
                report = run_bundle(bundle, provider=args.provider, warmup=args.warmup, repeats=args.repeats,
                                    threads=args.threads, energy_seconds=args.energy_seconds)
    except BundleError as err:
        print(f"stdeploy.runtime: error: {err}", file=sys.stderr)
        return 2
    if out is not None:
        from ..files import atomic_write_text

        atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
        if "host" in report:
            atomic_write_text(out / "report.md", to_markdown(report))
    if args.json:
        print(json.dumps(report))
    elif "host" in report:
        print(to_markdown(report), end="")
    else:
        c = report["check"]
        print(f"check {'PASS' if c['passed'] else 'FAIL'}: " + ", ".join(
            f"{g['graph']} {g.get('spike_mismatches', '?')} spike mismatches" for g in c["graphs"]))
    if not report["check"]["passed"]:
        print("stdeploy.runtime: the device's outputs differ from the reference beyond the bundle's tolerance "
              "(see the report's check)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
