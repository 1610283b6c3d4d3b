"""Edge latency with onnxruntime as a device sees it: batch 32 over whole sequences and batch 1 one
timestep at a time (the step graph, membranes carried), from a bundle run by the torch-free runner.

    .venv/bin/python benchmarks/edge_latency.py [--export DIR] [--epochs 2] [--threads 1] [--out runs/edge-latency]

Without ``--export``, sdt-tiny is trained briefly on digits and exported. The export is packaged
(``stdeploy package``, 32 samples from the digits test split), then the bundle's own runner is run
in a subprocess with torch made unimportable, exactly as on a device; its report is printed as
tables: the check (spikes against the reference), batch-32 and batch-1 streaming latency
(p50 / p90 / p99), and each neuron layer's firing rate on the samples, which is the input density of
the layer it feeds (with the input frames' density first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NO_TORCH = "import sys; sys.modules['torch'] = None; from stdeploy.runtime.__main__ import main; raise SystemExit(main(sys.argv[1:]))"


def make_export(out: Path, epochs: int) -> Path:
    import torch

    from stdeploy.data import load_dataset
    from stdeploy.export.directory import export_model
    from stdeploy.models import build_model
    from stdeploy.train import TrainConfig, train

    torch.manual_seed(0)
    data = load_dataset("digits")
    model = build_model("sdt-tiny")
    train(model, data, TrainConfig(epochs=epochs, batch_size=32), progress=False)
    export_model(model.eval(), out, ("onnx",), data=data)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", default=None, help="an existing export directory (default: train and export sdt-tiny)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32, help="batch of the whole-sequence timing")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (a small device: 1)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default="runs/edge-latency")
    args = ap.parse_args()

    from stdeploy.data import load_dataset
    from stdeploy.package import package

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export = Path(args.export) if args.export else make_export(out / "export", args.epochs)
    bundle = out / "bundle"
    package(export, "cpu", bundle, data=load_dataset("digits"), samples=args.samples, overwrite=True)
    cmd = [sys.executable, "-c", NO_TORCH, str(bundle), "--json", "--repeats", str(args.repeats), "--out", str(out / "report")]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    r = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(bundle / "runner")}, capture_output=True, text=True)
    if r.returncode not in (0, 1):
        print(r.stderr, file=sys.stderr)
        return r.returncode
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    rt, c = rep["runtime"], rep["check"]
    print(f"onnxruntime {rt['version']} ({rt['provider']}, threads {rt['threads'] or 'default'}) on {rep['host']['processor']}, "
          f"{rep['host']['cpus']} CPUs; runner without torch; peak RSS {rep['memory']['peak_rss_mib']:.0f} MiB")
    print("check: " + ", ".join(f"{g['graph']} {g['spike_mismatches']}/{g['spikes_total']} spike mismatches" for g in c["graphs"])
          + f"; output firing rate {c['reference_output_firing_rate']:.4f}")
    b, s = rep["latency"]["batch"], rep["latency"]["streaming"]
    print(f"\n{'latency':<44} {'batch':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}  throughput")
    print(f"{'whole sequence (T=%d), model.onnx' % b['timesteps']:<44} {b['batch']:>5} {b['p50_s'] * 1e3:>8.3f} "
          f"{b['p90_s'] * 1e3:>8.3f} {b['p99_s'] * 1e3:>8.3f}  {b['samples_per_s']:.0f} samples/s")
    print(f"{'one timestep, model.step.onnx (streaming)':<44} {1:>5} {s['p50_s'] * 1e3:>8.3f} {s['p90_s'] * 1e3:>8.3f} "
          f"{s['p99_s'] * 1e3:>8.3f}  {s['steps_per_s']:.0f} steps/s ({s['sequence_s'] * 1e3:.3f} ms a sequence)")
    e = rep["energy"]
    print(f"energy: {e['sensor']}" + (f" ({e['joules_per_sample'] * 1e3:.3f} mJ/sample)" if e["sensor"] != "none" else
                                       " (" + "; ".join(f"{k}: {v}" for k, v in e["looked_for"].items()) + ")"))
    act = rep["activity"]
    print(f"\n{'layer input':<28} density")
    print(f"{'input frames (embed)':<28} {act['input_density']:.4f}")
    for name, rate in act["firing_rates"].items():
        print(f"{'after ' + name:<28} {rate:.4f}")
    print(f"\nreport: {out / 'report' / 'report.md'}")
    return r.returncode


if __name__ == "__main__":
    raise SystemExit(main())
