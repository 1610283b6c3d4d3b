"""Export time and peak memory against model size: ``stdeploy export`` with default validation
(64 samples, streamed in batches) on sdt-tiny, spikformer-4-384 and sdt-8-512.

Each model gets random weights with BatchNorm statistics estimated on a few batches of noise (so
its layers fire), is saved as a checkpoint, and is exported by ``stdeploy export`` in a fresh
child process that reports its own peak resident memory (``resource.getrusage``). Spikformer
models export to ONNX only (NIR refuses Q·Kᵀ·V by default). Usage::

    python benchmarks/export_scale.py [--models sdt-tiny,spikformer-4-384,sdt-8-512] [--mode float|exact] [--samples 64] [--out FILE.md] [--manifests DIR]

CPU s is the child's user + system time (``getrusage``), export s its wall time; on a shared
machine the wall time grows with the load average printed beside it, the CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stdeploy.timing import describe_machine

PREPARE = r"""
import sys, torch
from stdeploy.checkpoint import save_checkpoint
from stdeploy.models import build_model, direct_encode
from stdeploy.models.quantize import to_exact
torch.manual_seed(0)
model = build_model(sys.argv[1])
c = model.cfg
bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
for bn in bns:
    bn.reset_running_stats(); bn.momentum = None
model.train()
with torch.no_grad():
    for _ in range(3):
        model(direct_encode(torch.rand(8, c.in_channels, c.image_size, c.image_size), c.timesteps))
model.eval()
meta = {}
if sys.argv[3] == "exact":
    model, meta = to_exact(model).eval(), {"quantize": "exact"}
save_checkpoint(sys.argv[2], model, meta=meta)
print(sum(p.numel() for p in model.parameters()))
"""

EXPORT = r"""
import json, resource, sys, time
from stdeploy.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
use = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "cpu_s": use.ru_utime + use.ru_stime,
                  "peak_rss_gb": use.ru_maxrss / 2 ** 20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sdt-tiny,spikformer-4-384,sdt-8-512")
    ap.add_argument("--mode", choices=["float", "exact"], default="float")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    ap.add_argument("--manifests", default=None, help="also copy each export's manifest.json (files' sha256, verdicts, "
                                                      "figures) to this directory as MODEL.json, to compare two codes' exports")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            ck, out = Path(tmp) / f"{name}.ck", Path(tmp) / f"{name}.export"
            prep = subprocess.run([sys.executable, "-c", PREPARE, name, str(ck), args.mode], capture_output=True, text=True)
            if prep.returncode:
                raise SystemExit(f"{name}: preparing the checkpoint failed:\n{prep.stderr[-2000:]}")
            params = int(prep.stdout.strip().splitlines()[-1])
            formats = "onnx" if name.startswith("spikformer") else "nir,onnx"
            load_before = os.getloadavg()[0]
            t0 = time.perf_counter()
            run = subprocess.run([sys.executable, "-c", EXPORT, "export", str(ck), "--out", str(out), "--format", formats,
                                  "--samples", str(args.samples), "--quiet"], capture_output=True, text=True)
            wall = time.perf_counter() - t0
            try:
                stats = json.loads(run.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                stats = {"rc": run.returncode, "seconds": wall, "cpu_s": float("nan"), "peak_rss_gb": float("nan")}
            result = "ok" if stats["rc"] == 0 else run.stderr.strip().splitlines()[-1][:120] if run.stderr.strip() else f"exit {run.returncode}"
            load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
            if args.manifests and (out / "manifest.json").is_file():
                Path(args.manifests).mkdir(parents=True, exist_ok=True)
                (Path(args.manifests) / f"{name}.json").write_text((out / "manifest.json").read_text())
            rows.append((name, params, formats, stats["seconds"], stats["cpu_s"], stats["peak_rss_gb"], load, result))
            print(f"{name}: done", file=sys.stderr)
    lines = [f"mode {args.mode}, {args.samples} validation samples; {_machine()}",
             "| model | params (M) | formats | export s (wall) | CPU s | peak RSS (GB) | load average (start-end) | result |",
             "|---|---:|---|---:|---:|---:|---|---|"]
    lines += [f"| {name} | {params / 1e6:.1f} | {formats} | {secs:.1f} | {cpu:.1f} | {rss:.2f} | {load} | {result} |"
              for name, params, formats, secs, cpu, rss, load, result in rows]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def _machine() -> str:
    """The CPU model and core count (``/proc/cpuinfo``): what the figures were measured on."""
    return describe_machine()

if __name__ == "__main__":
    main()
