"""Edge latency as a device sees it: batch 32 over whole sequences and batch 1 one timestep at a
time (the step graph, membranes carried), for onnxruntime and the standalone TVM modules
(adaptive TIR kernels compiled in, :mod:`stdeploy.targets.tvm.schedules`), each from a bundle run
by the torch-free runner.

    .venv/bin/python benchmarks/edge_latency.py [--export DIR] [--epochs 2] [--threads 1] [--no-tvm] [--out runs/edge-latency]

Without ``--export``, sdt-tiny is trained briefly on digits and exported. The export is packaged
twice (``stdeploy package``, 32 samples from the digits test split; ``--runtime onnxruntime`` and
``--runtime tvm``), then each bundle's own runner is run in a subprocess with torch made
unimportable, as on a device. Printed: the check (spikes against the reference), batch-32 and
batch-1 streaming latency (p50 / p90 / p99), and each neuron layer's firing rate on the samples,
which is the input density of the layer it feeds (with the input frames' density first). TVM's
in-process path (``stdeploy run --target tvm``: BLAS and spike kernels through Python callbacks)
cannot be bundled; it is timed here in this process at batch 32 (it has no step graph, so no
streaming row).
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


def run_bundle(bundle: Path, report_dir: Path, repeats: int, threads: int | None) -> dict:
    """The bundle's own runner in a subprocess with torch made unimportable, as on a device."""
    cmd = [sys.executable, "-c", NO_TORCH, str(bundle), "--json", "--repeats", str(repeats), "--out", str(report_dir)]
    if threads:
        cmd += ["--threads", str(threads)]
    r = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(bundle / "runner")}, capture_output=True, text=True)
    if r.returncode not in (0, 1):
        raise SystemExit(f"{bundle}: runner failed ({r.returncode}): {r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def inprocess_tvm(export: Path, x, repeats: int) -> tuple[dict, object]:
    """TVM's default CPU path in this process (``stdeploy run --target tvm``: BLAS and spike kernels
    through Python callbacks), timed at the bundle's batch; it cannot be bundled, nor stream.
    Returns the timing and the output spikes on ``x``."""
    from stdeploy.profile.latency import measure
    from stdeploy.targets.base import get_target
    from stdeploy.targets.profiles import load_profile

    runnable = get_target("tvm").compile(export, load_profile("cpu"))
    spikes = runnable.run(x).spikes
    return {**measure(lambda b: runnable.run(b), x, 3, repeats), "path": runnable.info.get("path")}, spikes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", default=None, help="an existing export directory (default: train and export sdt-tiny)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32, help="batch of the whole-sequence timing")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (a small device: 1)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--no-tvm", action="store_true", help="skip the standalone TVM modules (minutes to compile)")
    ap.add_argument("--no-inprocess", action="store_true", help="skip TVM's in-process path (stdeploy run --target tvm)")
    ap.add_argument("--out", default="runs/edge-latency")
    args = ap.parse_args()

    from stdeploy.data import load_dataset
    from stdeploy.package import package

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export = Path(args.export) if args.export else make_export(out / "export", args.epochs)
    data = load_dataset("digits")
    reports = {}
    for runtime in ["onnxruntime"] + ([] if args.no_tvm else ["tvm"]):
        bundle = out / f"bundle-{runtime}"
        manifest = package(export, "cpu", bundle, data=data, samples=args.samples, runtime=runtime, overwrite=True)
        reports[runtime] = run_bundle(bundle, out / f"report-{runtime}", args.repeats, args.threads)
        if runtime == "tvm":
            tir = {k: g.get("tir_kernels", []) for k, g in manifest["tvm"]["graphs"].items()}
    rep = reports["onnxruntime"]
    print(f"{rep['host']['processor']}, {rep['host']['cpus']} CPUs; each bundle run by its own runner without torch, "
          f"threads {args.threads or 'default'}")
    print(f"\n{'runtime':<62} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9}  throughput")
    for runtime, rep in reports.items():
        rt, c = rep["runtime"], rep["check"]
        name = f"{rt['name']} {rt['version']}" + (" standalone module" if runtime == "tvm" else "")
        b, s = rep["latency"]["batch"], rep["latency"]["streaming"]
        print(f"{name + ', whole sequence (T=%d)' % b['timesteps']:<62} {b['batch']:>5} {b['p50_s'] * 1e3:>9.3f} "
              f"{b['p90_s'] * 1e3:>9.3f} {b['p99_s'] * 1e3:>9.3f}  {b['samples_per_s']:.0f} samples/s")
        print(f"{name + ', one timestep (streaming)':<62} {1:>5} {s['p50_s'] * 1e3:>9.3f} {s['p90_s'] * 1e3:>9.3f} "
              f"{s['p99_s'] * 1e3:>9.3f}  {s['steps_per_s']:.0f} steps/s")
        print(f"{'':<62} check {'PASS' if c['passed'] else 'FAIL'}: " + ", ".join(
            f"{g['graph']} {g['spike_mismatches']}/{g['spikes_total']}" for g in c["graphs"])
              + f" spike mismatches; peak RSS {rep['memory']['peak_rss_mib']:.0f} MiB; energy {rep['energy']['sensor']}")
    if not args.no_inprocess:
        import numpy as np

        with np.load(out / "bundle-onnxruntime" / "samples.npz", allow_pickle=False) as z:
            x, expected = z["input"], z["spikes"]
        t, spikes = inprocess_tvm(export, x, args.repeats)
        mism = int((np.asarray(spikes) != expected).sum())
        print(f"{'tvm in-process (Python callbacks), whole sequence (T=%d)' % t['timesteps']:<62} {t['batch']:>5} "
              f"{t['median_s'] * 1e3:>9.3f} {t['p90_s'] * 1e3:>9.3f} {'':>9}  {t['samples_per_s']:.0f} samples/s")
        print(f"{'':<62} {t['path']}; {mism}/{expected.size} spike mismatches; no step graph, so no streaming row")
        reports_inprocess = t
    if "tvm" in reports:
        print(f"\nstandalone TVM kernels (the density choice inside each, per call): "
              + "; ".join(f"{k}: " + ", ".join(v) for k, v in tir.items()))
        o, t = reports["onnxruntime"]["latency"], reports["tvm"]["latency"]
        print(f"standalone TVM / onnxruntime: {t['batch']['p50_s'] / o['batch']['p50_s']:.2f}x at batch {o['batch']['batch']}, "
              f"{t['streaming']['p50_s'] / o['streaming']['p50_s']:.2f}x per streaming step at batch 1")
    if not args.no_inprocess:
        print(f"tvm in-process / onnxruntime: {reports_inprocess['median_s'] / reports['onnxruntime']['latency']['batch']['p50_s']:.2f}x "
              f"at batch {reports_inprocess['batch']}")
    e = reports["onnxruntime"]["energy"]
    if e["sensor"] == "none":
        print("energy: none (" + "; ".join(f"{k}: {v}" for k, v in e["looked_for"].items()) + ")")
    act = reports["onnxruntime"]["activity"]
    print(f"\n{'layer input':<28} density (on the {args.samples} samples)")
    print(f"{'input frames (embed)':<28} {act['input_density']:.4f}")
    for name, rate in act["firing_rates"].items():
        print(f"{'after ' + name:<28} {rate:.4f}")
    print(f"\nreports: {', '.join(str(out / f'report-{r}' / 'report.md') for r in reports)}")
    return 0 if all(r["check"]["passed"] for r in reports.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
