"""The runtime report as Markdown (the JSON form is the report dict itself)."""

from __future__ import annotations


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


def to_markdown(report: dict) -> str:
    h, rt, c = report["host"], report["runtime"], report["check"]
    lines = [f"# Runtime report: {report['bundle']} ({report.get('model') or 'model'})", "",
             f"- device: {h['machine']}, {h['system']}, {h['cpus']} CPUs; profile {report['device_profile'].get('name', '?')}",
             f"- runtime: {rt['name']} {rt['version']} on {rt['provider']} (packaged with {', '.join(f'{k} {v}' for k, v in rt['packaged_with'].items()) or 'unknown versions'})",
             f"- check: **{'PASS' if c['passed'] else 'FAIL'}** on {c['samples']} samples (tolerance: at most "
             f"{c['tolerance']['spike_mismatches']} output spike mismatches, logits within {c['tolerance']['logits_atol']:g}); "
             f"reference output firing rate {c['reference_output_firing_rate']:.4f}", "",
             "| graph | spike mismatches | max logit error | predictions agree | output firing rate | passed |",
             "|---|---|---|---|---|---|"]
    for g in c["graphs"]:
        if "error" in g:
            lines.append(f"| {g['graph']} | {g['error']} | | | | no |")
        else:
            lines.append(f"| {g['graph']} | {g['spike_mismatches']} / {g['spikes_total']} | {g['logits_max_abs_error']:.2e} | "
                         f"{g['predictions_agree']:.3f} | {g['output_firing_rate']:.4f} | {'yes' if g['passed'] else 'no'} |")
    lat = report.get("latency", {})
    if lat:
        lines += ["", "| latency | batch | p50 ms | p90 ms | p99 ms | throughput |", "|---|---|---|---|---|---|"]
        if "batch" in lat:
            b = lat["batch"]
            lines.append(f"| whole sequence (T={b['timesteps']}), unrolled graph | {b['batch']} | {_ms(b['p50_s'])} | "
                         f"{_ms(b['p90_s'])} | {_ms(b['p99_s'])} | {b['samples_per_s']:.1f} samples/s |")
        if "streaming" in lat:
            s = lat["streaming"]
            lines.append(f"| one timestep, step graph (streaming) | 1 | {_ms(s['p50_s'])} | {_ms(s['p90_s'])} | "
                         f"{_ms(s['p99_s'])} | {s['steps_per_s']:.1f} steps/s |")
    mem, e = report.get("memory", {}), report.get("energy", {})
    if mem:
        lines += ["", f"- peak memory (resident set, {mem.get('source', 'getrusage')}): {mem['peak_rss_mib']:.1f} MiB ({mem['peak_rss_mib_after_load']:.1f} MiB after loading)"]
    if e.get("sensor") == "none":
        lines.append("- energy: none (no sensor: " + "; ".join(f"{k}: {v}" for k, v in e.get("looked_for", {}).items()) + ")")
    elif e:
        lines.append(f"- energy ({e['sensor']}: {e['detail']}): {e['joules_per_sample'] * 1e3:.3f} mJ/sample, "
                     f"{e['mean_watts']:.2f} W mean over {e['calls']} calls in {e['seconds']:.2f} s")
    act = report.get("activity") or {}
    if act:
        lines += ["", f"Activity of the samples (measured by the reference when packaged): input density "
                      f"{act.get('input_density', float('nan')):.4f}, output firing rate {act.get('output_firing_rate', float('nan')):.4f}."]
        rates = act.get("firing_rates", {})
        if rates:
            lines += ["", "| neuron layer | firing rate (= input density of the next layer) |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in rates.items()]
    return "\n".join(lines) + "\n"


def read_report(path) -> dict:
    """A report written by ``python -m stdeploy.runtime --out DIR`` (``DIR/report.json``, or the
    ``--json`` line saved to a file), checked for the fields a comparison needs."""
    import json
    from pathlib import Path

    from ..errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--device-report {path}: file not found (report.json written by python -m stdeploy.runtime --out DIR)")
    if path.stat().st_size > 16 << 20:
        raise ConfigError(f"--device-report {path}: {path.stat().st_size} bytes is too large for a runtime report")
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--device-report {path}: not valid JSON ({err})") from err
    from .run import REPORT_FORMAT

    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ConfigError(f"--device-report {path}: not a runtime report (format must be {REPORT_FORMAT!r})")
    for key in ("host", "runtime", "check", "latency"):
        if not isinstance(report.get(key), dict):
            raise ConfigError(f"--device-report {path}: field {key!r} is missing or not an object")
    for kind, row in report["latency"].items():
        missing = [k for k in ("median_s", "p90_s", "batch", "timesteps") if not isinstance(row.get(k), (int, float))]
        if missing:
            raise ConfigError(f"--device-report {path}: latency.{kind} lacks {missing}")
    return report


def device_rows(path) -> dict[str, dict]:
    """Rows in the form of ``stdeploy bench``'s results (median_s, p90_s, samples_per_s,
    timesteps_per_s, path) for the device's batch and streaming latency."""
    r = read_report(path)
    h, rt = r["host"], r["runtime"]
    where = f"{rt.get('name', 'onnxruntime')} {rt.get('version', '?')} on {h.get('machine', '?')} ({rt.get('provider', '?')})"
    passed = "check PASS" if r["check"].get("passed") else "check FAIL"
    rows = {}
    b = r["latency"].get("batch")
    if b:
        rows[f"device {h.get('machine', '?')}"] = {
            "batch": b["batch"], "timesteps": b["timesteps"], "median_s": b["median_s"], "p90_s": b["p90_s"],
            "p99_s": b.get("p99_s"), "samples_per_s": b["batch"] / b["median_s"],
            "timesteps_per_s": b["batch"] * b["timesteps"] / b["median_s"],
            "path": f"{where}, batch {b['batch']}, {passed}", "device_report": str(path)}
    s = r["latency"].get("streaming")
    if s:
        rows[f"device {h.get('machine', '?')} b1 step"] = {
            "batch": 1, "timesteps": 1, "median_s": s["median_s"], "p90_s": s["p90_s"], "p99_s": s.get("p99_s"),
            "samples_per_s": 1 / (s["median_s"] * s["timesteps"]), "timesteps_per_s": 1 / s["median_s"],
            "path": f"{where}, one timestep at batch 1 (streaming), {passed}", "device_report": str(path)}
    return rows
