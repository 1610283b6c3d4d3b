"""``stdeploy package``: an export directory -> a bundle one device needs, and nothing else.

For an onnxruntime device (a profile of kind ``cpu`` or ``cuda``) the bundle holds the unrolled and
the step ONNX graphs (with ``runtime="tvm"``: standalone TVM modules of both instead, for a cpu
profile's CPU or, for a cuda profile, with the GPU's kernels and the profile's host code,
:mod:`stdeploy.targets.tvm.bundle`), sample inputs with the reference's expected output spikes and logits
(``samples.npz``, no pickles), the torch-free runner's source (``runner/``), a README with the two
commands to run on the device, and ``manifest.json`` sealing every file (size, sha256). Its format
is :mod:`stdeploy.runtime.bundle`.

The expected outputs come from the folded PyTorch reference the export was validated against. The
bundle is checked here before it is written, with the same runner the device uses: if onnxruntime
on this host does not reproduce them within the bundle's tolerance, nothing is written. TVM modules
for another machine, or for a CUDA GPU this host lacks, cannot run here: they are checked by the
build (ELF machine, kernels, the GPU code's arch) and sealed by hash, and ``host_check.skipped``
says why they were not run.

Where: into a temporary sibling of ``out``, verified, then renamed into place (or written as one
``.tar.gz`` with ``archive=True``). An existing non-empty ``out`` is refused unless ``overwrite``,
and even then only when it is a bundle itself (a folder whose manifest has the bundle format), so
``--overwrite`` can never delete an unrelated folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .errors import ConfigError, OutputMismatch
from .files import atomic_write, sha256_file
from .runtime import bundle as fmt

RUNTIMES = ("onnxruntime", "tvm")
DEFAULT_SAMPLES = 32
# The runner's source, shipped in every bundle (none of these imports torch).
RUNNER_FILES = ("__init__.py", "errors.py", "files.py")
NATIVE_RUNNER = "run_module.cc"  # TVM bundles: the C++ runner (runner/run_module.cc)
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _check_out(out: Path, archive: bool, overwrite: bool) -> None:
    if archive and not out.name.endswith((".tar.gz", ".tgz")):
        raise ConfigError(f"--out {out}: with --archive the bundle is one file; name it NAME.tar.gz")
    if not out.exists():
        return
    if archive:
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder; --archive writes a .tar.gz file")
        if not overwrite:
            raise ConfigError(f"--out {out} exists; pass --overwrite to replace it")
        if not _is_bundle_archive(out):
            raise ConfigError(f"--out {out} is not a bundle archive; --overwrite only replaces a bundle")
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    try:
        is_bundle = json.loads((out / fmt.MANIFEST).read_text()).get("format") == fmt.FORMAT
    except (OSError, ValueError, AttributeError):
        is_bundle = False
    if not is_bundle:
        raise ConfigError(f"--out {out} is not empty and not a bundle; --overwrite only replaces a bundle folder")


def _export_artifact(export_dir: Path, manifest: dict, key: str) -> Path:
    """The export directory's artifact ``key``, checked against the export manifest's size and sha256."""
    from .targets.base import read_manifest

    path, _ = read_manifest(export_dir, key)
    meta = manifest["artifacts"][key]
    if "bytes" in meta and path.stat().st_size != meta["bytes"]:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes, the export manifest says {meta['bytes']} (changed since export)")
    if "sha256" in meta and sha256_file(path) != meta["sha256"]:
        raise ConfigError(f"{path}: sha256 differs from the export manifest (changed since export)")
    return path


def reference_outputs(export_dir: Path, manifest: dict, data, samples: int):
    """``(x (T, B, C, H, W), logits, output spikes, activity, description)`` of the folded PyTorch
    reference on ``samples`` inputs from ``data`` (its test split; seeded noise when shapes differ)."""
    import torch

    from .checkpoint import load_checkpoint
    from .export.directory import validation_input
    from .export.validate import record_neurons
    from .models.fold import fold_batchnorm

    ref = manifest.get("artifacts", {}).get("reference")
    if not ref:
        raise ConfigError(f"{export_dir}: the export manifest lists no reference checkpoint; re-export it")
    model = load_checkpoint(export_dir / ref["file"]).model.eval()
    folded = fold_batchnorm(model)
    x, _, described = validation_input(model, data, samples)
    with torch.no_grad():
        logits, records = record_neurons(folded, x)
    spikes = records["head.lif"]["spikes"]
    activity = {"input_density": float((x != 0).float().mean()), "output_firing_rate": float(spikes.mean()),
                "firing_rates": {name: float(r["spikes"].float().mean()) for name, r in records.items()},
                "note": "firing rate of each neuron layer = input density of the layer it feeds"}
    return x.numpy(), logits.numpy(), spikes.numpy(), activity, described


def device_tolerance(tol) -> dict:
    """The onnxruntime target's stated tolerance as the bundle's ``{"spike_mismatches", "logits_atol"}``;
    a form without both refuses (no silent default)."""
    import dataclasses

    d = dataclasses.asdict(tol) if dataclasses.is_dataclass(tol) else dict(tol)
    missing = [k for k in ("spike_mismatches", "logits_atol") if k not in d]
    if missing:
        raise ConfigError(f"the onnxruntime target's tolerance {d} lacks {missing}; the bundle format needs both")
    return {"spike_mismatches": int(d["spike_mismatches"]), "logits_atol": float(d["logits_atol"])}


def _is_bundle_archive(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:gz") as tar:
            return any(n.count("/") == 1 and n.endswith("/" + fmt.MANIFEST) for n in tar.getnames())
    except (tarfile.TarError, OSError, EOFError):
        return False


def _readme(name: str, versions: dict, profile, shape: tuple[int, ...], runtime: str = "onnxruntime", machine: str = "",
            arch: str = "") -> str:
    timesteps, batch = shape[0], shape[1]
    pins = " ".join(f"{k}=={v}" for k, v in versions.items())
    if runtime == "tvm" and arch:
        what = f"two TVM modules with CUDA kernels for {arch} and {machine} host code"
        needs = "numpy + TVM's runtime with its CUDA library, no torch, no TVM compiler"
        install = f"python -m pip install --no-deps {pins}"
        note = ("\nThe modules run on the GPU only (`tvm.cuda()`): TVM's CUDA runtime library "
                "(`tvm/lib/libtvm_runtime_cuda.so` of the wheel) needs the NVIDIA driver's `libcuda.so.1` and CUDA 13's "
                "`libcudart.so.13` on the loader path. Where either or the GPU is missing the runner refuses "
                "(exit 2, one line saying which); it never falls back to the CPU. The report names the GPU that ran.\n\n"
                "Without Python, `runner/run_module.cc` runs the unrolled module on TVM's runtime libraries alone "
                "(`FFI` and `TVM`: the folders of the `tvm_ffi` and `tvm` packages of those wheels, for the device's architecture):\n\n"
                "```\n"
                f"g++ -std=c++17 -O2 -o run_module {name}/runner/run_module.cc -I$FFI/include -L$TVM/lib -L$FFI/lib -ltvm_runtime -ltvm_ffi -ldl\n"
                f"LD_LIBRARY_PATH=$TVM/lib:$FFI/lib ./run_module {name}/model.{machine}.so input.f32 {','.join(map(str, shape))} out cuda\n"
                "```\n\n"
                "`input.f32` is the raw float32 input (C order, the shape given); each output is written raw as "
                "`out.<i>.f32` (0: logits, 1: output spikes) and its shape printed.\n")
    elif runtime == "tvm":
        what = "two standalone TVM modules (untuned TVM code, no Python callbacks)"
        needs = "numpy + TVM's runtime, no torch, no TVM compiler"
        install = f"python -m pip install --no-deps {pins}"
        note = ("\nThe runner loads TVM's runtime library only (`TVM_USE_RUNTIME_LIB=1`): the wheel's "
                "`tvm/lib/libtvm_compiler.so` may be deleted on the device.\n\n"
                "Without Python, `runner/run_module.cc` runs the unrolled module on TVM's runtime libraries alone "
                "(`FFI` and `TVM`: the folders of the `tvm_ffi` and `tvm` packages of those wheels, for the device's architecture):\n\n"
                "```\n"
                f"g++ -std=c++17 -O2 -o run_module {name}/runner/run_module.cc -I$FFI/include -L$TVM/lib -L$FFI/lib -ltvm_runtime -ltvm_ffi\n"
                f"LD_LIBRARY_PATH=$TVM/lib:$FFI/lib ./run_module {name}/model.{machine}.so input.f32 {','.join(map(str, shape))} out\n"
                "```\n\n"
                "`input.f32` is the raw float32 input (C order, the shape given); each output is written raw as "
                "`out.<i>.f32` (0: logits, 1: output spikes) and its shape printed.\n")
    else:
        what, needs, install, note = "two ONNX graphs", "numpy + onnxruntime, no torch", f"python -m pip install {pins}", ""
    return f"""# Bundle {name}

A {profile.name} bundle ({profile.description or profile.kind}): {what}, {batch} sample inputs with
the expected output spikes and logits, and the runner (`runner/`, {needs}).

On the device, from the folder that holds `{name}`:

```
{install}
PYTHONPATH={name}/runner python -m stdeploy.runtime {name} --out {name}-report
```
{note}
The second command verifies every file's sha256 (manifest.json), checks the samples spike for spike
(exit 1 when they differ beyond the manifest's tolerance), then times batch {batch} (T={timesteps})
and batch-1 streaming through the step graph, and writes report.json and report.md
(`--json` prints the report; `--help` lists the options).
"""


def package(export_dir: str | os.PathLike, device: str, out: str | os.PathLike, *, data=None,
            samples: int = DEFAULT_SAMPLES, runtime: str = "onnxruntime", archive: bool = False,
            overwrite: bool = False) -> dict:
    """Write the bundle of ``export_dir`` for the device profile ``device`` to ``out``; returns the manifest."""
    from .targets.base import get_target, read_manifest
    from .targets.profiles import load_profile

    export_dir, out = Path(export_dir), Path(out)
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime {runtime!r}: known runtimes are {', '.join(RUNTIMES)}")
    if not (isinstance(samples, int) and samples >= 1):
        raise ConfigError(f"--samples must be a positive integer, got {samples!r}")
    profile = load_profile(device)
    if profile.kind == "lava":
        raise ConfigError(f"--device {profile.name}: a Lava simulation profile; bundles run on onnxruntime or TVM "
                          f"devices (profiles of kind cpu or cuda)")
    _check_out(out, archive, overwrite)
    _, manifest = read_manifest(export_dir, "onnx")
    unrolled = _export_artifact(export_dir, manifest, "onnx")
    step = _export_artifact(export_dir, manifest, "onnx.step") if "onnx.step" in manifest["artifacts"] else None
    x, logits, spikes, activity, described = reference_outputs(export_dir, manifest, data, samples)
    if activity["output_firing_rate"] in (0.0, 1.0):
        warnings.warn(f"{export_dir}: the output neurons {'never' if activity['output_firing_rate'] == 0 else 'always'} "
                      f"fire on these samples, so a spike check cannot tell a wrong model from a right one", stacklevel=2)
    versions = runtime_versions(runtime)
    tolerance = device_tolerance(get_target(runtime).tolerance)
    name = out.name.removesuffix(".tar.gz").removesuffix(".tgz")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        stage = tmp / name
        stage.mkdir()
        tvm_section = None
        if runtime == "tvm":
            from .console import native_notes
            from .targets.tvm.bundle import build_tvm_modules

            with native_notes():  # TVM's C++ warnings: each known one said once, the rest passed on
                tvm_section = build_tvm_modules(unrolled, step, profile, int(x.shape[1]), stage)
            models = {k: g["file"] for k, g in tvm_section["graphs"].items()}
        else:
            shutil.copyfile(unrolled, stage / "model.onnx")
            if step is not None:
                shutil.copyfile(step, stage / "model.step.onnx")
            models = {"unrolled": "model.onnx", "step": "model.step.onnx" if step is not None else None}
        models.setdefault("step", None)
        np.savez_compressed(stage / "samples.npz", input=x.astype(np.float32), logits=logits.astype(np.float32),
                            spikes=spikes.astype(np.float32))
        (stage / "README.md").write_text(_readme(name, versions, profile, tuple(x.shape), runtime,
                                                 tvm_section["machine"] if tvm_section else "",
                                                 tvm_section.get("arch", "") if tvm_section else ""))
        src = Path(__file__).resolve().parent
        runner = stage / "runner" / "stdeploy"
        (runner / "runtime").mkdir(parents=True)
        for f in RUNNER_FILES:
            shutil.copyfile(src / f, runner / f)
        for f in sorted((src / "runtime").glob("*.py")):
            shutil.copyfile(f, runner / "runtime" / f.name)
        if runtime == "tvm":
            shutil.copyfile(src / "runtime" / NATIVE_RUNNER, stage / "runner" / NATIVE_RUNNER)
        roles = {"model.onnx": "unrolled graph: input (T, B, C, H, W) -> logits (B, classes), spikes (T, B, N, D)",
                 "model.step.onnx": "one timestep: input (B, C, H, W), state.<neuron> -> logits_step, spikes_step, state_out.<neuron>",
                 "samples.npz": "input, expected logits and output spikes of the folded PyTorch reference",
                 "README.md": "the two commands to run on the device",
                 f"runner/{NATIVE_RUNNER}": "C++ runner for a device without Python (TVM's runtime libraries only)"}
        if tvm_section is not None:
            cuda = tvm_section.get("device") == "cuda"
            for key, g in tvm_section["graphs"].items():
                if cuda:
                    roles[g["file"]] = (f"TVM module of the {key} graph at batch {g['batch']}: CUDA kernels "
                                        f"({', '.join(g['device_code'])}) and {tvm_section['machine']} host code")
                else:
                    roles[g["file"]] = (f"standalone TVM module ({tvm_section['machine']}, {tvm_section['schedules']}) of the "
                                        f"{key} graph at batch {g['batch']}")
        files = {}
        for p in sorted(q for q in stage.rglob("*") if q.is_file()):
            rel = p.relative_to(stage).as_posix()
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p),
                          "role": roles.get(rel, "runner source (numpy + the bundle's runtime, no torch)")}
        bundle_manifest = {
            "format": fmt.FORMAT, "runtime": runtime,
            "providers": PROVIDERS[profile.kind] if runtime == "onnxruntime" else [tvm_section.get("device", "cpu")],
            "device": {"name": profile.name, "kind": profile.kind, "description": profile.description},
            "model": manifest.get("model", {}), "timesteps": int(x.shape[0]), "batch": int(x.shape[1]),
            "input": manifest.get("input"), "outputs": manifest.get("outputs"),
            "models": models, **({"tvm": tvm_section} if tvm_section is not None else {}),
            "samples": {"file": "samples.npz", "described": described,
                        "shapes": {"input": list(x.shape), "logits": list(logits.shape), "spikes": list(spikes.shape)}},
            "tolerance": tolerance, "activity": activity, "versions": versions,
            "source": {"export_dir": export_dir.name, "export_manifest_sha256": sha256_file(export_dir / "manifest.json")},
            "files": files,
        }
        (stage / fmt.MANIFEST).write_text(json.dumps(bundle_manifest, indent=2) + "\n")
        host, skipped = _host_check(stage)
        if host is not None and not host["passed"]:
            bad = "; ".join(f"{g['graph']}: {g.get('spike_mismatches', '?')} spike mismatches, logits within "
                            f"{g.get('logits_max_abs_error', float('nan')):.2e}" for g in host["graphs"] if not g["passed"])
            raise OutputMismatch(f"{runtime} on this host does not reproduce the reference on the samples (nothing written): {bad}")
        if archive:
            def write_tar(path: str) -> None:
                with tarfile.open(path, "w:gz") as tar:
                    tar.add(stage, arcname=name, filter=_plain_member)

            atomic_write(out, write_tar)
        else:
            _replace_dir(stage, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**bundle_manifest, "out": str(out), "host_check": host or {"passed": None, "graphs": [], "skipped": skipped}}


def _plain_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _host_check(stage: Path) -> tuple[dict | None, str]:
    """``(the device's own check, "")``, run here on the staged bundle (verifies it as a device
    would), or ``(None, why not)`` for TVM modules built for another machine or for a CUDA GPU
    where none is here (they are verified by hash, and by the build's own checks, until run there)."""
    from .runtime import ort
    from .runtime.run import check, open_sessions
    from .runtime.tvm_rt import cuda_unavailable, host_machine

    b = fmt.read_bundle(stage)
    if b.runtime == "tvm":
        if b.tvm["machine"] != host_machine():
            return None, f"built for {b.tvm['machine']} (this machine is {host_machine()}); run it there"
        if b.tvm.get("device") == "cuda":
            why = cuda_unavailable()
            if why:
                return None, f"not run here: {why}; run it on the device"
        return check(b, open_sessions(b), b.load_samples()), ""
    return check(b, ort.Sessions(b, "CPUExecutionProvider"), b.load_samples()), ""


def runtime_versions(runtime: str) -> dict:
    """The versions the device installs (pinned in the bundle's README): those of this host."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["numpy", "onnxruntime"] if runtime == "onnxruntime" else ["numpy", "apache-tvm", "apache-tvm-ffi", "typing_extensions"]
    try:
        return {n: version(n) for n in names}
    except PackageNotFoundError as err:
        raise ConfigError(f"--runtime {runtime}: {err.name} is not installed on this build machine") from err


def _replace_dir(stage: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
