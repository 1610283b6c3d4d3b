"""The profile report: accuracy, parameters, nonzeros, file sizes, latency per target and energy per
device model of export directories, as one table (JSON + Markdown) and PNG plots.

This room builds and writes the report from values it is given (the folded reference, measured
latencies); running targets is the run path's job (:func:`stdeploy.runner.profile_exports`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import atomic_write_text
from ..errors import ConfigError
from ..models import direct_encode
from .energy import MODEL_LABELS, count_operations, energy

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "stdeploy profile report",
    "type": "object",
    "required": ["format", "variants", "energy_profiles"],
    "properties": {
        "format": {"const": "stdeploy-report/1"},
        "energy_profiles": {"type": "object"},
        "variants": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "accuracy", "params", "nonzero_params", "nonzero_param_bytes", "block_nonzeros", "files",
                         "latency", "energy", "counts"],
            "properties": {
                "name": {"type": "string"}, "accuracy": {"type": ["number", "null"]},
                "params": {"type": "integer"}, "nonzero_params": {"type": "integer"}, "nonzero_param_bytes": {"type": "integer"},
                "block_nonzeros": {"type": "integer"},
                "files": {"type": "object", "additionalProperties": {"type": "integer"}},
                "latency": {"type": "object", "additionalProperties": {"type": "object", "required": ["median_s", "p90_s", "samples_per_s"]}},
                "energy": {"type": "object", "additionalProperties": {"type": "object", "required": ["joules_per_sample"]}},
                "counts": {"type": "object", "required": ["sops", "macs", "neuron_updates", "spikes"]},
            }}},
    },
}


def validate_report(report: dict) -> None:
    import jsonschema

    try:
        jsonschema.validate(report, SCHEMA)
    except jsonschema.ValidationError as err:
        raise ConfigError(f"report does not match its schema: {err.message} at {list(err.absolute_path)}") from err


# What each count in a report row means (also printed under the Markdown table).
COLUMNS = {
    "accuracy": "test accuracy of the folded PyTorch reference on the profiled images",
    "params": "every parameter entry of the folded reference, zeros included (pruning does not lower it)",
    "nonzero params": "parameter entries that are not zero (pruned weights excluded; low-rank layers as their factors)",
    "param KB": "bytes of the nonzero parameter values at their dtype (float32: 4 each), no sparse indices, / 1024",
    "block nonzeros": "nonzero weights of the transformer blocks' linear layers (what pruning removes)",
    "ONNX KB": "size of model.onnx on disk / 1024",
    "SOPs/sample": "synaptic operations per sample: spikes x nonzero fan-out, attention products included",
    "MACs/sample": "multiply-accumulates per sample of real-valued inputs (direct input charged once per sample unless "
                   "direct_input='per_step')",
    "<target> ms": "median wall time of one batch on that runtime (pytorch: the folded reference, eager)",
    "E <model>": "estimated energy per sample from operation counts x the profile's per-operation figures (45 nm: a 45 nm "
                 "chip model, not this CPU's energy; Loihi: Loihi 1 figures, neuron updates as the profile states)",
    "SOPs vs first": "SOPs/sample relative to the first variant",
}


def parameter_counts(model: torch.nn.Module) -> dict:
    """``params`` (all entries), ``nonzero_params`` and ``nonzero_param_bytes`` (nonzero values x element size)."""
    ps = list(model.parameters())
    nonzero = [int(torch.count_nonzero(p)) for p in ps]
    return {"params": int(sum(p.numel() for p in ps)), "nonzero_params": sum(nonzero),
            "nonzero_param_bytes": sum(n * p.element_size() for n, p in zip(nonzero, ps))}


def energy_label(name: str, report: dict) -> str:
    """A report column's name for energy profile ``name``: the energy model (``45 nm``, ``Loihi``),
    with the profile's name added only where two profiles share a model."""
    profiles = report["energy_profiles"]
    model = profiles[name].get("model")
    label = MODEL_LABELS.get(model, str(model))
    if sum(p.get("model") == model for p in profiles.values()) > 1:
        label += f" ({name})"
    return label


def variant_row(export: str | Path, manifest: dict, reference: torch.nn.Module, x_all: torch.Tensor, y_all: torch.Tensor,
                energy_profiles: dict, latency: dict[str, dict], *, direct_input: str = "once") -> dict:
    """One row of the report for the export directory ``export``: accuracy, parameters, file sizes,
    operation counts and energy of its folded ``reference`` on the images ``x_all`` (B, C, H, W),
    and ``latency`` as measured elsewhere (``{runtime: stdeploy.timing.time_calls(...) or
    {"median_s": None, ..., "skipped": why}}``; the run path, :mod:`stdeploy.runner`, measures it).
    ``direct_input``: a real input repeated over T is charged ``"once"`` per sample or ``"per_step"``."""
    export = Path(export)
    T = reference.cfg.timesteps
    chunks = [direct_encode(x_all[i:i + 128], T) for i in range(0, len(x_all), 128)]
    counts = count_operations(reference, chunks, direct_input=direct_input)
    with torch.no_grad():
        logits = torch.cat([reference(c) for c in chunks])
    block = [m for n, m in reference.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)]
    return {
        "name": export.name, "export_dir": str(export),
        "accuracy": float((logits.argmax(-1) == y_all).float().mean()),
        **parameter_counts(reference),
        "block_nonzeros": int(sum(int((m.weight != 0).sum()) for m in block)),
        "files": {k: int(v["bytes"]) for k, v in manifest["artifacts"].items() if "bytes" in v},
        "counts": counts.per_sample(), "firing_rates": {k: v["rate"] for k, v in counts.neurons.items()},
        "input_densities": {k: v.input_rate for k, v in counts.layers.items() if v.input == "spikes"},
        "energy": {name: energy(counts, p.energy) for name, p in energy_profiles.items() if p.energy},
        "latency": dict(latency),
    }


def assemble_report(variants: list[dict], energy_profiles: dict, *, direct_input: str = "once") -> dict:
    """The report of ``variants`` (rows of :func:`variant_row`), ratios to the first, validated."""
    report = {"format": "stdeploy-report/1", "variants": variants,
              "energy_profiles": {n: {"path": p.path, **p.energy} for n, p in energy_profiles.items()},
              "counting": {"direct_input": direct_input, "columns": COLUMNS}}
    if variants:
        base = variants[0]
        for v in variants:
            v["sops_vs_first"] = v["counts"]["sops"] / base["counts"]["sops"] if base["counts"]["sops"] else None
            v["energy_vs_first"] = {n: v["energy"][n]["joules_per_sample"] / base["energy"][n]["joules_per_sample"]
                                    for n in v["energy"] if base["energy"][n]["joules_per_sample"]}
    validate_report(report)
    return report


def to_markdown(report: dict) -> str:
    energies = list(report["energy_profiles"])
    targets = sorted({t for v in report["variants"] for t in v["latency"]})
    head = ["variant", "accuracy", "params", "nonzero params", "param KB", "block nonzeros", "ONNX KB", "SOPs/sample", "MACs/sample"]
    head += [f"{t} ms" for t in targets] + [f"E {energy_label(e, report)} (uJ)" for e in energies] + ["SOPs vs first"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in report["variants"]:
        cells = [v["name"], f"{v['accuracy']:.4f}", str(v["params"]), str(v["nonzero_params"]),
                 f"{v['nonzero_param_bytes'] / 1024:.1f}", str(v["block_nonzeros"]),
                 f"{v['files'].get('onnx', 0) / 1024:.0f}", f"{v['counts']['sops']:.3g}", f"{v['counts']['macs']:.3g}"]
        for t in targets:
            lat = v["latency"].get(t, {})
            cells.append(f"{lat['median_s'] * 1e3:.2f}" if lat.get("median_s") else "-")
        cells += [f"{v['energy'][e]['joules_per_sample'] * 1e6:.3f}" if e in v["energy"] else "-" for e in energies]
        cells.append(f"{v['sops_vs_first']:.3f}" if v.get("sops_vs_first") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- **{k}**: {v}" for k, v in COLUMNS.items()]
    return "\n".join(lines)


def _grouped_bars(names: list[str], series: dict[str, list[float]], ylabel: str, title: str, path: Path, log: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(names))], values, width, label=label)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    names = [v["name"] for v in variants]
    targets = sorted({t for v in variants for t, lat in v["latency"].items() if lat.get("median_s")})
    paths = [
        _grouped_bars(names, {t: [(v["latency"].get(t, {}).get("median_s") or 0) * 1e3 for v in variants] for t in targets},
                      "median latency per batch (ms)", "latency per target", out / "latency.png", log=True),
        _grouped_bars(names, {energy_label(e, report): [v["energy"][e]["joules_per_sample"] * 1e6 for v in variants]
                              for e in report["energy_profiles"]},
                      "estimated energy per sample (uJ)", "energy per variant", out / "energy.png"),
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [v["block_nonzeros"] for v in variants]
    ax.scatter(xs, [v["accuracy"] * 100 for v in variants])
    for v, x in zip(variants, xs):
        ax.annotate(v["name"], (x, v["accuracy"] * 100))
    ax.set_xlabel("block parameters (nonzero weights or factor entries)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs compression")
    fig.tight_layout()
    paths.append(out / "accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(report: dict, out: str | Path) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", to_markdown(report) + "\n")
    return {"json": str(out / "report.json"), "markdown": str(out / "report.md"), "plots": [str(p) for p in plot(report, out)]}
