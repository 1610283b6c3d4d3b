"""``manifest.json``: the seal of an export directory, parsed into a validated record at the boundary.

An export directory is a sealed unit. Every file it names is listed in its manifest with its size and
sha256, by ``stdeploy export`` (``artifacts``) or by a later build that adds a file (``built``, through
:func:`add_listed_file`). Every path is relative and resolves inside the directory, symlinks followed.
Each load checks the artifact's size and sha256 against the manifest, so a swapped or truncated file
is refused instead of run; a folder artifact (the ``reference`` checkpoint) lists its files the same
way under ``files``.

Trust model: the manifest detects accidents and swapped files; it is not a signature. A compiled
artifact (a TVM library) is code that runs when loaded: load only directories you trust.

No torch here: targets and the on-device runtime read manifests without the training stack.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, StdeployError
from ..files import atomic_write_text, resolve_inside, sha256_file

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20   # a manifest is a few KiB; anything this large is not one
_SHA256 = re.compile(r"[0-9a-f]{64}")
REBUILD = "rebuild it with `stdeploy export CHECKPOINT --out DIR --overwrite`"


class ManifestError(ConfigError):
    """A ``manifest.json`` is unreadable, malformed, names a path outside its directory, or does not
    match the files it lists."""


@dataclass(frozen=True)
class Listed:
    """One file the manifest vouches for: a path relative to the directory, its size and sha256."""
    file: str
    bytes: int
    sha256: str

    def check_fields(self, where: str, error: type[StdeployError]) -> None:
        if not (isinstance(self.bytes, int) and not isinstance(self.bytes, bool) and self.bytes >= 0):
            raise error(f"{where}.bytes must be an integer >= 0, got {self.bytes!r}; {REBUILD}")
        if not (isinstance(self.sha256, str) and _SHA256.fullmatch(self.sha256)):
            raise error(f"{where}.sha256 must be 64 lowercase hex digits, got {self.sha256!r}; {REBUILD}")


@dataclass(frozen=True)
class Artifact:
    """``artifacts.<key>``: a file (``bytes``, ``sha256``) or a folder (``files``: relative path ->
    size and sha256 of each file in it)."""
    key: str
    file: str
    bytes: int | None = None
    sha256: str | None = None
    files: dict[str, Listed] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """The validated record of ``manifest.json``; ``doc`` keeps the whole parsed object (model
    config, validation results) for the callers that report it."""
    path: Path
    artifacts: dict[str, Artifact]
    built: dict[str, Listed]
    doc: dict

    @classmethod
    def parse(cls, raw: bytes, path: Path, error: type[StdeployError] = ManifestError) -> "Manifest":
        """Parse the bytes of ``path``; refuse anything but a JSON object with well-typed fields."""
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise error(f"{path}: not valid JSON ({str(err).splitlines()[0][:120]}); {REBUILD}") from None
        if not isinstance(doc, dict):
            raise error(f"{path}: expected a JSON object, got a {type(doc).__name__}; {REBUILD}")
        fmt = doc.get("format")
        if fmt is not None and not isinstance(fmt, str):
            raise error(f"{path}: field 'format' must be a string, got {fmt!r}")
        arts = doc.get("artifacts", {})
        if not isinstance(arts, dict):
            raise error(f"{path}: field 'artifacts' must be an object, got {type(arts).__name__}; {REBUILD}")
        artifacts = {}
        for key, entry in arts.items():
            where = f"{path}: artifacts.{key}"
            if not isinstance(entry, dict):
                raise error(f"{where} must be an object, got {type(entry).__name__}; {REBUILD}")
            file = entry.get("file")
            if file is None and isinstance(entry.get("not_written"), str) and set(entry) == {"file", "not_written"}:
                continue  # an artifact the export did not write, and why (model.portable.nir of a Spikformer): nothing to load
            if not isinstance(file, str) or not file:
                raise error(f"{where}.file must be a non-empty string, got {file!r}; {REBUILD}")
            files = entry.get("files", {})
            if not isinstance(files, dict):
                raise error(f"{where}.files must be an object, got {type(files).__name__}; {REBUILD}")
            listed = {}
            for rel, meta in files.items():
                if not isinstance(meta, dict):
                    raise error(f"{where}.files.{rel} must be an object; {REBUILD}")
                listed[rel] = Listed(rel, meta.get("bytes"), meta.get("sha256"))
            artifacts[key] = Artifact(key, file, entry.get("bytes"), entry.get("sha256"), listed)
        built_doc = doc.get("built", {})
        if not isinstance(built_doc, dict) or not all(isinstance(v, dict) for v in built_doc.values()):
            raise error(f"{path}: field 'built' must be an object of objects; {REBUILD}")
        built = {rel: Listed(rel, meta.get("bytes"), meta.get("sha256")) for rel, meta in built_doc.items()}
        return cls(path=path, artifacts=artifacts, built=built, doc=doc)


def load_manifest(export_dir: str | os.PathLike, error: type[StdeployError] = ManifestError) -> Manifest:
    """Read and parse ``export_dir/manifest.json`` (the manifest itself must not be a symlink out)."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise error(f"export directory not found: {export_dir}")
    path = export_dir / MANIFEST
    if not path.is_file():
        raise error(f"{export_dir}: no {MANIFEST}; is this a directory written by `stdeploy export`?")
    resolve_inside(export_dir, MANIFEST, f"{path}", error)
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise error(f"{path}: {size} bytes, larger than any manifest ({MAX_MANIFEST_BYTES} B); {REBUILD}")
    return Manifest.parse(path.read_bytes(), path, error)


def _verify(export_dir: Path, item: Listed, where: str, error: type[StdeployError]) -> Path:
    """The resolved path of a listed file whose size and sha256 match the manifest."""
    path = resolve_inside(export_dir, item.file, where, error)
    if not path.is_file():
        raise error(f"{export_dir}: manifest lists {item.file}, which is missing")
    if item.bytes is None or item.sha256 is None:
        raise error(f"{where} has no size and sha256 to check {item.file} against (a hand-made or old manifest); {REBUILD}")
    item.check_fields(where, error)
    size = path.stat().st_size
    if size != item.bytes:
        raise error(f"{export_dir / item.file}: {size} bytes, the manifest says {item.bytes}; the file was changed or truncated; {REBUILD}")
    if sha256_file(path) != item.sha256:
        raise error(f"{export_dir / item.file}: sha256 does not match {where}; the file was changed or swapped; {REBUILD}")
    return path


def read_manifest(export_dir: str | os.PathLike, artifact: str,
                  error: type[StdeployError] = ManifestError) -> tuple[Path, dict]:
    """``(verified path of artifact, manifest as a dict)``. The artifact's path must resolve inside
    ``export_dir``; a file's size and sha256 (a folder's: each listed file's) must match."""
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir, error)
    if artifact not in manifest.artifacts:
        raise error(f"{export_dir}: no '{artifact}' artifact (has: {', '.join(manifest.artifacts) or 'none'}); "
                    f"export with --format {artifact.split('.')[0]}")
    art = manifest.artifacts[artifact]
    where = f"{manifest.path}: artifacts.{artifact}.file"
    path = resolve_inside(export_dir, art.file, where, error)
    if not path.exists():
        raise error(f"{export_dir}: manifest lists {art.file}, which is missing")
    if path.is_dir():
        if not art.files:
            raise error(f"{manifest.path}: artifacts.{artifact} is a folder without 'files' to check; {REBUILD}")
        for rel, item in art.files.items():
            _verify(path, item, f"{manifest.path}: artifacts.{artifact}.files.{rel}", error)
    else:
        _verify(export_dir, Listed(art.file, art.bytes, art.sha256), f"{manifest.path}: artifacts.{artifact}", error)
    return path, manifest.doc


def verify_listed_file(export_dir: str | os.PathLike, relpath: str, error: type[StdeployError] = ManifestError) -> Path:
    """The resolved path of ``relpath`` only if the manifest lists it (an artifact, a file of a
    folder artifact, or a ``built`` file) with a matching size and sha256. Use before loading a
    compiled library: anything unlisted or changed is refused."""
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir, error)
    target = resolve_inside(export_dir, relpath, f"{relpath}", error)
    base = export_dir.resolve()
    for rel, item in manifest.built.items():
        if resolve_inside(export_dir, rel, f"{manifest.path}: built.{rel}", error) == target:
            return _verify(export_dir, item, f"{manifest.path}: built.{rel}", error)
    for key, art in manifest.artifacts.items():
        art_path = resolve_inside(export_dir, art.file, f"{manifest.path}: artifacts.{key}.file", error)
        if art_path == target and not art.files:
            return _verify(export_dir, Listed(art.file, art.bytes, art.sha256), f"{manifest.path}: artifacts.{key}", error)
        for rel, item in art.files.items():
            if art_path.is_dir() and (art_path / rel).resolve() == target:
                return _verify(art_path, item, f"{manifest.path}: artifacts.{key}.files.{rel}", error)
    raise error(f"{export_dir / relpath}: not listed in {manifest.path} (only files the export or its build "
                f"recorded with their sha256 are loaded; {os.path.relpath(target, base)} was not); rebuild it")


def add_listed_file(export_dir: str | os.PathLike, relpath: str, error: type[StdeployError] = ManifestError) -> dict:
    """Record ``relpath`` (a file inside ``export_dir``, e.g. a compiled library) under ``built`` in
    the manifest with its size and sha256, atomically (an exclusive lock serialises concurrent
    builds; the manifest is renamed into place). Returns the entry."""
    export_dir = Path(export_dir)
    path = resolve_inside(export_dir, relpath, f"{relpath}", error)
    if not path.is_file():
        raise error(f"{export_dir}: cannot list {relpath}: not a file")
    lock_path = export_dir / f".{MANIFEST}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = load_manifest(export_dir, error)
        entry = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        doc = dict(manifest.doc)
        doc["built"] = {**doc.get("built", {}), relpath: entry}
        atomic_write_text(export_dir / MANIFEST, json.dumps(doc, indent=2))
    return entry


def listed_files(directory: str | os.PathLike) -> dict[str, dict]:
    """``{relative path: {bytes, sha256}}`` of every file under ``directory`` (for a folder artifact)."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(directory.rglob("*")) if p.is_file()}


def write_manifest(export_dir: str | os.PathLike, doc: dict) -> dict:
    """Write ``doc`` as ``export_dir/manifest.json`` (atomically) after sealing it: every artifact
    whose file exists gets its ``bytes`` and ``sha256`` (a folder artifact its ``files``). For tools
    and tests that assemble an export directory by hand; ``stdeploy export`` seals its own."""
    export_dir = Path(export_dir)
    doc = {**doc, "artifacts": {k: dict(v) for k, v in doc.get("artifacts", {}).items()}}
    for key, entry in doc["artifacts"].items():
        path = resolve_inside(export_dir, entry.get("file"), f"artifacts.{key}.file", ManifestError)
        if path.is_file():
            entry.update(bytes=path.stat().st_size, sha256=sha256_file(path))
        elif path.is_dir():
            entry["files"] = listed_files(path)
    atomic_write_text(export_dir / MANIFEST, json.dumps(doc, indent=2))
    return doc
