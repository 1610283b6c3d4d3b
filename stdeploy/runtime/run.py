"""Check a bundle on the device, then time it: the whole of ``python -m stdeploy.runtime``.

1. **check**: the unrolled graph on the bundled samples at the bundle's batch, and the step graph
   fed the same samples frame by frame, each against the reference's output spikes and logits
   under the bundle's tolerance (onnxruntime: every spike equal, logits within 1e-4, unless the
   bundle says otherwise). The device's own output firing rate is reported beside the reference's,
   so a check passed by a model that never fires is visible as such.
2. **batch latency**: ``warmup`` untimed then ``repeats`` timed calls of the unrolled graph on the
   samples: p50 / p90 / p99 / min seconds, samples and timesteps per second (the keys of
   ``stdeploy bench``, so its ``--device-report`` can set them beside the host's).
3. **streaming latency**: batch 1, one timestep per call of the step graph with the membranes
   carried between calls: p50 / p90 / p99 seconds per timestep over ``repeats`` sequences.
4. **peak memory**: the process's peak resident set (``VmHWM`` on Linux, else
   ``resource.getrusage``), after loading and at the end.
5. **energy**: only where a sensor exists (see :mod:`stdeploy.runtime.sensors`); else "none" with
   the reason for each sensor looked for.
"""

from __future__ import annotations

import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from . import ort, sensors
from .bundle import Bundle, BundleError

REPORT_FORMAT = "stdeploy-runtime-report/1"


def percentiles(times: list[float]) -> dict:
    a = np.asarray(times)
    return {"p50_s": float(np.percentile(a, 50)), "p90_s": float(np.percentile(a, 90)),
            "p99_s": float(np.percentile(a, 99)), "min_s": float(a.min()), "median_s": float(np.percentile(a, 50))}


def peak_rss_mib() -> tuple[float, str]:
    """Peak resident set of this process in MiB and where it was read. Linux's ``VmHWM`` in
    ``/proc/self/status`` first: ``getrusage``'s ``ru_maxrss`` survives ``execve``, so a runner
    started from a large parent (a Python with torch loaded) would report the parent's peak. Else
    ``resource.getrusage`` (KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "/proc/self/status VmHWM"
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (r / (1 << 20) if sys.platform == "darwin" else r / 1024), "resource.getrusage ru_maxrss"


def compare(name: str, logits: np.ndarray, spikes: np.ndarray, ref_logits: np.ndarray, ref_spikes: np.ndarray, tol) -> dict:
    if spikes.shape != ref_spikes.shape or logits.shape != ref_logits.shape:
        return {"graph": name, "passed": False, "error": f"shapes: spikes {list(spikes.shape)} vs {list(ref_spikes.shape)}, "
                                                            f"logits {list(logits.shape)} vs {list(ref_logits.shape)}"}
    mism = int(np.count_nonzero(spikes != ref_spikes))
    err = float(np.abs(logits - ref_logits).max()) if logits.size else 0.0
    return {"graph": name, "passed": mism <= tol.spike_mismatches and err <= tol.logits_atol, "spike_mismatches": mism,
            "spikes_total": int(spikes.size), "logits_max_abs_error": err,
            "predictions_agree": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
            "output_firing_rate": float(spikes.mean())}


def check(bundle: Bundle, sessions, samples: dict[str, np.ndarray]) -> dict:
    x, ref_logits, ref_spikes = samples["input"], samples["logits"], samples["spikes"]
    results = [compare(bundle.unrolled, *sessions.run(x), ref_logits, ref_spikes, bundle.tolerance)]
    if sessions.step is not None:
        results.append(compare(bundle.step, *sessions.run_streaming(x), ref_logits, ref_spikes, bundle.tolerance))
    return {"passed": all(r["passed"] for r in results), "samples": int(x.shape[1]),
            "tolerance": {"spike_mismatches": bundle.tolerance.spike_mismatches, "logits_atol": bundle.tolerance.logits_atol},
            "reference_output_firing_rate": float(ref_spikes.mean()), "graphs": results}


def batch_latency(sessions, x: np.ndarray, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        sessions.run(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sessions.run(x)
        times.append(time.perf_counter() - t0)
    T, B = x.shape[:2]
    out = {"batch": int(B), "timesteps": int(T), "warmup": warmup, "repeats": repeats, **percentiles(times)}
    out["samples_per_s"] = B / out["median_s"]
    out["timesteps_per_s"] = B * T / out["median_s"]
    return out


def streaming_latency(sessions, x: np.ndarray, warmup: int, repeats: int) -> dict:
    """Batch 1: the first sample's frames, one step per call, membranes carried; ``repeats`` sequences."""
    frames = np.ascontiguousarray(x[:, :1])
    times = []
    for seq in range(warmup + repeats):
        states = sessions.zero_states(1)
        for t in range(frames.shape[0]):
            t0 = time.perf_counter()
            _, _, states = sessions.step_once(frames[t], states)
            if seq >= warmup:
                times.append(time.perf_counter() - t0)
    out = {"batch": 1, "timesteps": int(frames.shape[0]), "warmup_sequences": warmup, "sequences": repeats,
           "steps_timed": len(times), **percentiles(times)}
    out["steps_per_s"] = 1 / out["median_s"]
    out["sequence_s"] = out["median_s"] * frames.shape[0]
    return out


def open_sessions(bundle: Bundle, provider: str | None = None, threads: int | None = None):
    """The bundle's graphs loaded on its runtime: onnxruntime (``provider``: see
    :func:`stdeploy.runtime.ort.choose_provider`) or TVM's runtime (its CPU; no provider choice)."""
    if bundle.runtime == "tvm":
        if provider:
            raise BundleError(f"--provider {provider}: a TVM bundle runs its modules on the device it was built for "
                              f"({bundle.tvm.get('device', 'cpu')}); --provider is for onnxruntime bundles")
        from . import tvm_rt

        return tvm_rt.Sessions(bundle, threads)
    return ort.Sessions(bundle, ort.choose_provider(bundle, provider), threads)


def host() -> dict:
    return {"machine": platform.machine(), "system": f"{platform.system()} {platform.release()}",
            "processor": platform.processor() or platform.machine(), "cpus": sensors.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__}


def run_bundle(bundle: Bundle, *, provider: str | None = None, warmup: int = 3, repeats: int = 20,
               threads: int | None = None, energy_seconds: float = 1.0, sysfs: str = "/sys") -> dict:
    """Check and time ``bundle`` here; the report (see the module docstring). ``report["check"]["passed"]``
    says whether the device reproduced the reference within the bundle's tolerance."""
    t0 = time.perf_counter()
    sessions = open_sessions(bundle, provider, threads)
    load_s = time.perf_counter() - t0
    provider = sessions.provider
    rss_loaded, _ = peak_rss_mib()
    samples = bundle.load_samples()
    m = bundle.manifest
    report = {
        "format": REPORT_FORMAT, "bundle": bundle.root.name, "model": m.get("model", {}).get("name") or m.get("model_name"),
        "device_profile": m.get("device", {}), "host": host(),
        "runtime": {"name": sessions.runtime_name, "version": sessions.version, "provider": provider, "threads": threads,
                    "load_s": load_s, "packaged_with": m.get("versions", {})},
        "activity": m.get("activity", {}),
    }
    report["check"] = check(bundle, sessions, samples)
    x = samples["input"]
    report["latency"] = {"batch": batch_latency(sessions, x, warmup, repeats)}
    if sessions.step is not None:
        report["latency"]["streaming"] = streaming_latency(sessions, x, min(warmup, 1) if warmup else 0, repeats)
    on_gpu = sessions.runtime_name == "tvm" and provider.startswith("cuda")  # a TVM CUDA bundle: the GPU's sensors
    sensor, reasons = sensors.find_sensor(provider if sessions.runtime_name == "onnxruntime" else "CUDA" if on_gpu else "CPU", sysfs)
    if sensor is None:
        report["energy"] = {"sensor": "none", "looked_for": reasons}
    else:
        report["energy"] = {**sensors.measure(sensor, lambda: sessions.run(x), x.shape[1], energy_seconds), "not_used": reasons}
    peak, source = peak_rss_mib()
    report["memory"] = {"peak_rss_mib_after_load": rss_loaded, "peak_rss_mib": peak, "source": source}
    return report
