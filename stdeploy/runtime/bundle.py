"""A bundle on disk: a sealed folder (or ``.tar.gz`` of one) that ``stdeploy package`` writes and
the device reads. Nothing here imports torch.

Layout (format ``stdeploy-bundle/1``)::

    manifest.json     what follows, every file's size and sha256, the tolerance, the samples' activity
    model.onnx        unrolled graph: input (T, B, C, H, W) -> logits (B, classes), spikes (T, B, N, D)
    model.step.onnx   one timestep: input (B, C, H, W), state.<neuron> -> logits_step, spikes_step, state_out.<neuron>
    samples.npz       input (T, B, C, H, W), logits (B, classes), spikes (T, B, N, D): the reference's outputs
    README.md         the two commands to run on the device
    runner/stdeploy/  this runner's source (``stdeploy/runtime`` and the three torch-free modules it
                      imports), so ``PYTHONPATH=BUNDLE/runner python -m stdeploy.runtime BUNDLE`` works
                      with numpy and onnxruntime installed and nothing else

Sealed means: every path the manifest names is relative, stays inside the folder (no ``..``, no
absolute path, no link out), has the stated size and sha256, and no file is in the folder that the
manifest does not name (Python's ``__pycache__`` folders, which importing the bundled runner
writes, aside). :func:`read_bundle` checks all of it before anything is loaded, and raises
:class:`BundleError` (a ``ValueError``) with one line naming the file and field at fault.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import StdeployError
from ..files import sha256_file

FORMAT = "stdeploy-bundle/1"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 4 << 20        # a manifest is a few KB; refuse to parse anything huge
MAX_ARCHIVE_BYTES = 4 << 30         # unpacked size guard for .tar.gz bundles
SAMPLE_ARRAYS = ("input", "logits", "spikes")
RUNTIMES = ("onnxruntime", "tvm")
TVM_DEVICES = ("cpu", "cuda")       # where a TVM bundle's modules run (manifest tvm.device)


class BundleError(StdeployError):
    """A bundle is missing, malformed or tampered with (a hash, size or path does not check)."""


@dataclass(frozen=True)
class FileEntry:
    """One sealed file: its path relative to the bundle, size in bytes and sha256 (hex)."""

    path: str
    bytes: int
    sha256: str
    role: str = ""

    def __post_init__(self):
        check_relative(self.path, f"{MANIFEST}: files")
        if not (isinstance(self.bytes, int) and self.bytes >= 0):
            raise BundleError(f"{MANIFEST}: files[{self.path!r}].bytes must be an integer >= 0, got {self.bytes!r}")
        if not (isinstance(self.sha256, str) and len(self.sha256) == 64 and all(c in "0123456789abcdef" for c in self.sha256)):
            raise BundleError(f"{MANIFEST}: files[{self.path!r}].sha256 must be 64 lowercase hex digits")


@dataclass(frozen=True)
class Tolerance:
    """What "agrees with the reference" means on the device: at most ``spike_mismatches`` output
    spikes differ and every logit is within ``logits_atol``."""

    spike_mismatches: int = 0
    logits_atol: float = 1e-4

    def __post_init__(self):
        if not (isinstance(self.spike_mismatches, int) and self.spike_mismatches >= 0):
            raise BundleError(f"{MANIFEST}: tolerance.spike_mismatches must be an integer >= 0, got {self.spike_mismatches!r}")
        if not (isinstance(self.logits_atol, (int, float)) and self.logits_atol >= 0):
            raise BundleError(f"{MANIFEST}: tolerance.logits_atol must be a number >= 0, got {self.logits_atol!r}")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: ``root`` is the folder, ``manifest`` the parsed JSON."""

    root: Path
    manifest: dict
    files: dict[str, FileEntry]
    tolerance: Tolerance
    unrolled: str                   # file name of the unrolled graph
    step: str | None                # file name of the step graph, if bundled
    samples: str                    # file name of samples.npz
    providers: tuple[str, ...] = field(default=("CPUExecutionProvider",))
    tvm: dict | None = None         # runtime "tvm": target, machine, each module's inputs and outputs

    @property
    def runtime(self) -> str:
        return self.manifest["runtime"]

    @property
    def timesteps(self) -> int:
        return int(self.manifest["timesteps"])

    @property
    def batch(self) -> int:
        return int(self.manifest["batch"])

    def path(self, name: str) -> Path:
        return self.root / name

    def load_samples(self) -> dict[str, np.ndarray]:
        """``input``, ``logits`` and ``spikes`` from ``samples.npz`` (no pickles), shapes checked
        against the manifest."""
        path = self.path(self.samples)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError) as err:
            raise BundleError(f"{path}: cannot read it as a numpy .npz without pickles ({err})") from err
        missing = [k for k in SAMPLE_ARRAYS if k not in arrays]
        if missing:
            raise BundleError(f"{path}: missing arrays {missing}; has {sorted(arrays)}")
        shapes = self.manifest["samples"].get("shapes", {})
        for k in SAMPLE_ARRAYS:
            a = arrays[k]
            if a.dtype != np.float32:
                raise BundleError(f"{path}: array {k!r} is {a.dtype}, expected float32")
            if k in shapes and list(a.shape) != list(shapes[k]):
                raise BundleError(f"{path}: array {k!r} has shape {list(a.shape)}, the manifest says {shapes[k]}")
        x, logits, spikes = arrays["input"], arrays["logits"], arrays["spikes"]
        if x.ndim != 5 or x.shape[0] != self.timesteps:
            raise BundleError(f"{path}: input must be (T={self.timesteps}, B, C, H, W), got {list(x.shape)}")
        if logits.shape[0] != x.shape[1] or spikes.shape[:2] != x.shape[:2]:
            raise BundleError(f"{path}: logits {list(logits.shape)} / spikes {list(spikes.shape)} do not match input {list(x.shape)}")
        return arrays


def check_relative(name: object, where: str) -> str:
    """``name`` as a safe relative POSIX path (no absolute path, no ``..``, no backslash)."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"{where}: a path must be a non-empty string, got {name!r}")
    p = PurePosixPath(name)
    if p.is_absolute() or "\\" in name or name.startswith("~") or any(part in ("..", "") for part in name.split("/")):
        raise BundleError(f"{where}: path {name!r} must be relative and stay inside the bundle")
    if p.name == MANIFEST and len(p.parts) == 1:
        raise BundleError(f"{where}: {MANIFEST} cannot seal itself")
    return name


def _require(d: dict, key: str, kind, where: str):
    if key not in d:
        raise BundleError(f"{where}: missing field {key!r}")
    if not isinstance(d[key], kind):
        raise BundleError(f"{where}: field {key!r} has the wrong type ({type(d[key]).__name__})")
    return d[key]


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle not found: {root} (a folder or .tar.gz written by `stdeploy package`)")
    if not path.is_file() or path.is_symlink():
        raise BundleError(f"{root}: no {MANIFEST}; is this a bundle written by `stdeploy package`?")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes, larger than the {MAX_MANIFEST_BYTES} a manifest may be")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: must hold a JSON object")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: format is {manifest.get('format')!r}, this runtime reads {FORMAT!r}")
    return manifest


def verify_files(root: Path, entries: dict[str, FileEntry]) -> None:
    """Each entry exists inside ``root`` as a regular file of the stated size and sha256, and
    ``root`` holds nothing else (besides the manifest)."""
    real_root = root.resolve()
    for name, e in entries.items():
        p = root / name
        if p.is_symlink() or (p.exists() and not p.resolve().is_relative_to(real_root)):
            raise BundleError(f"{root}: {name} is a link; a bundle holds plain files only")
        if not p.is_file():
            raise BundleError(f"{root}: {name} is listed in {MANIFEST} but missing")
        size = p.stat().st_size
        if size != e.bytes:
            raise BundleError(f"{root}: {name} has {size} bytes, {MANIFEST} says {e.bytes} (tampered or truncated)")
        if sha256_file(p) != e.sha256:
            raise BundleError(f"{root}: {name} does not match its sha256 in {MANIFEST} (tampered or corrupt)")
    listed = set(entries) | {MANIFEST}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath).name == "__pycache__":  # Python's bytecode caches of the bundled runner
            continue
        for f in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            rel = (Path(dirpath) / f).relative_to(root).as_posix()
            if rel not in listed:
                raise BundleError(f"{root}: {rel} is not listed in {MANIFEST}; a bundle is sealed (remove it or repackage)")


def read_bundle(root: str | os.PathLike) -> Bundle:
    """Verify the bundle folder ``root`` (manifest fields, paths, sizes, sha256, nothing extra)."""
    root = Path(root)
    manifest = read_manifest(root)
    where = f"{root / MANIFEST}"
    runtime = _require(manifest, "runtime", str, where)
    if runtime not in RUNTIMES:
        raise BundleError(f"{where}: runtime {runtime!r} is not one this runner has ({', '.join(RUNTIMES)})")
    for key in ("timesteps", "batch"):
        v = _require(manifest, key, int, where)
        if v < 1:
            raise BundleError(f"{where}: {key} must be >= 1, got {v}")
    raw_files = _require(manifest, "files", dict, where)
    entries = {}
    for name, meta in raw_files.items():
        if not isinstance(meta, dict):
            raise BundleError(f"{where}: files[{name!r}] must be an object")
        check_relative(name, f"{where}: files")
        entries[name] = FileEntry(name, meta.get("bytes"), meta.get("sha256"), str(meta.get("role", "")))
    models = _require(manifest, "models", dict, where)
    unrolled = check_relative(models.get("unrolled"), f"{where}: models.unrolled")
    step = models.get("step")
    if step is not None:
        check_relative(step, f"{where}: models.step")
    samples = _require(manifest, "samples", dict, where)
    samples_file = check_relative(samples.get("file"), f"{where}: samples.file")
    if not isinstance(samples.get("shapes", {}), dict):
        raise BundleError(f"{where}: samples.shapes must be an object of array name -> shape")
    for name, what in ((unrolled, "models.unrolled"), (step, "models.step"), (samples_file, "samples.file")):
        if name is not None and name not in entries:
            raise BundleError(f"{where}: {what} names {name}, which files does not list")
    tol = _require(manifest, "tolerance", dict, where)
    tolerance = Tolerance(_require(tol, "spike_mismatches", int, f"{where}: tolerance"),
                          _require(tol, "logits_atol", (int, float), f"{where}: tolerance"))
    providers = manifest.get("providers", ["CPUExecutionProvider"])
    if not (isinstance(providers, list) and providers and all(isinstance(p, str) for p in providers)):
        raise BundleError(f"{where}: providers must be a non-empty list of onnxruntime provider names")
    tvm = _tvm_section(manifest, where, unrolled, step) if runtime == "tvm" else None
    verify_files(root, entries)
    return Bundle(root, manifest, entries, tolerance, unrolled, step, samples_file, tuple(providers), tvm)


def _tvm_section(manifest: dict, where: str, unrolled: str, step: str | None) -> dict:
    """The ``tvm`` section of a TVM bundle: machine, target and, per graph, its file, inputs
    ``[[name, static shape], ...]`` and output names in the module's order."""
    tvm = _require(manifest, "tvm", dict, where)
    _require(tvm, "machine", str, f"{where}: tvm")
    _require(tvm, "target", dict, f"{where}: tvm")
    if tvm.get("device", "cpu") not in TVM_DEVICES:  # absent: a cpu bundle
        raise BundleError(f"{where}: tvm.device is {tvm.get('device')!r}, this runner runs {', '.join(TVM_DEVICES)}")
    if tvm.get("device") == "cuda" and not str(tvm.get("arch", "")).startswith("sm_"):
        raise BundleError(f"{where}: tvm.arch must name the GPU architecture the kernels were built for (sm_87, ...)")
    graphs = _require(tvm, "graphs", dict, f"{where}: tvm")
    for key, name in (("unrolled", unrolled), ("step", step)):
        if name is None:
            continue
        g = _require(graphs, key, dict, f"{where}: tvm.graphs")
        if g.get("file") != name:
            raise BundleError(f"{where}: tvm.graphs.{key}.file is {g.get('file')!r}, models.{key} is {name!r}")
        inputs = _require(g, "inputs", list, f"{where}: tvm.graphs.{key}")
        outputs = _require(g, "outputs", list, f"{where}: tvm.graphs.{key}")
        ok = all(isinstance(i, list) and len(i) == 2 and isinstance(i[0], str) and isinstance(i[1], list)
                 and all(isinstance(d, int) and d >= 1 for d in i[1]) for i in inputs)
        if not ok or not inputs or not all(isinstance(o, str) for o in outputs):
            raise BundleError(f"{where}: tvm.graphs.{key}: inputs must be [[name, [dims]], ...] and outputs names")
    return tvm


def unpack_archive(archive: str | os.PathLike, into: str | os.PathLike) -> Path:
    """Unpack a ``.tar.gz`` bundle into the folder ``into`` (which must be empty or absent) and
    return the bundle folder inside it. Only regular files and folders with safe relative names are
    accepted (no links, devices, absolute paths or ``..``); the unpacked size is capped."""
    archive, into = Path(archive), Path(into)
    if not archive.is_file():
        raise BundleError(f"bundle archive not found: {archive}")
    try:
        tar = tarfile.open(archive, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise BundleError(f"{archive}: not a readable .tar.gz ({err})") from err
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise BundleError(f"{archive}: corrupt archive ({err})") from err
        total, tops = 0, set()
        for m in members:
            check_relative(m.name.rstrip("/"), f"{archive}: member")
            if not (m.isfile() or m.isdir()):
                raise BundleError(f"{archive}: member {m.name} is not a plain file or folder")
            total += m.size
            tops.add(m.name.split("/")[0])
        if total > MAX_ARCHIVE_BYTES:
            raise BundleError(f"{archive}: unpacks to {total} bytes, more than {MAX_ARCHIVE_BYTES}")
        if len(tops) != 1:
            raise BundleError(f"{archive}: must hold one bundle folder, holds {sorted(tops) or 'nothing'}")
        into.mkdir(parents=True, exist_ok=True)
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+ (and security releases of 3.8-3.10)
            tar.extractall(into, filter="data")
        else:  # older Pythons: every member was checked above (plain, relative, inside)
            tar.extractall(into, members)
    return into / tops.pop()


def open_bundle(path: str | os.PathLike, workdir: str | os.PathLike | None = None) -> Bundle:
    """A bundle from a folder or a ``.tar.gz`` (unpacked into ``workdir`` or a temporary folder)."""
    path = Path(path)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        into = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="stdeploy-bundle-"))
        return read_bundle(unpack_archive(path, into))
    return read_bundle(path)
