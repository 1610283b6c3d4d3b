"""MetaSchedule tuning databases of the TVM CPU path: where each lives, reading, applying.

A database belongs to one (model, device profile, TVM target, batch, kernels) and lives under
``EXPORT_DIR/tuning/<profile>-b<batch>-<kernels>-<key>/`` (``key``: hash of the ONNX file's sha256,
the target dict, the batch and the kernel option; :func:`database_dir`). It holds MetaSchedule's
JSON tables (:data:`WORKLOADS`, :data:`RECORDS`: one JSON list per line) and ``tune.json``
(:data:`META`: what was tuned, trials per task, seconds). A table that is not JSON lines, or a
summary without a task list, raises :class:`TuningDatabaseError` naming the file.

The crossover cache (:class:`CrossoverCache`, file :data:`CROSSOVERS`) keeps the density
thresholds of the spike-adaptive kernels (:mod:`.kernels.spike`): for each layer shape the
fraction of nonzero inputs above which BLAS beats the gather kernel, measured once per
(:class:`CrossoverKey`: kernel kind, input / weight shape, padding, CPU model, LLVM target CPU,
TVM and BLAS thread counts, :data:`~.kernels.spike.KERNEL_VERSION`) and read back by later builds. Where it
lives (:func:`crossover_cache_path`): the path a caller names, else
``$STDEPLOY_CACHE_DIR/tvm/kernel-crossovers.json``, else ``EXPORT_DIR/tuning/kernel-crossovers.json``.
The file is JSON (``{"format": CROSSOVER_FORMAT, "entries": [{"key": ..., "crossover": ...}]}``),
written atomically; on load every entry is validated, and a file that is not valid JSON, names
another format or holds an invalid entry is ignored as a whole with a warning naming it (and
left as it is: the build measures again and keeps its thresholds in memory). An entry for
another CPU, thread count or kernel version has another key and is never used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from ...files import atomic_write_text, sha256_file
from ...timing import cpu_model
from ..base import TargetError
from ..profiles import DeviceProfile
from .sdk import load_tvm

__all__ = ["WORKLOADS", "RECORDS", "META", "TuningDatabaseError", "database_dir", "read_meta", "open_database",
           "apply_database", "write_meta", "find_database", "CROSSOVERS", "CROSSOVER_FORMAT", "CACHE_ENV",
           "CrossoverCacheError", "CrossoverKey", "Crossover", "CrossoverCache", "crossover_cache_path", "cpu_model"]

WORKLOADS, RECORDS, META = "database_workload.json", "database_tuning_record.json", "tune.json"


class TuningDatabaseError(TargetError):
    """A tuning database that cannot be read (names the file)."""


def database_dir(export_dir: str | os.PathLike, profile: DeviceProfile, target: dict, batch: int, kernels: str,
                 onnx_sha256: str) -> Path:
    """Where the tuning database of this (model, device, target, batch, kernels) lives."""
    key = hashlib.sha256(json.dumps({"onnx": onnx_sha256, "target": target, "batch": batch, "kernels": kernels},
                                    sort_keys=True).encode()).hexdigest()[:12]
    return Path(export_dir) / "tuning" / f"{profile.name}-b{batch}-{kernels}-{key}"


def read_meta(db: Path) -> dict | None:
    """``tune.json`` of a database folder; None when the folder has none."""
    path = db / META
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TuningDatabaseError(f"{path}: unreadable tuning summary ({err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("tasks"), list):
        raise TuningDatabaseError(f"{path}: not a stdeploy tuning summary (no task list)")
    return meta


def open_database(db: Path, *, create: bool = False):
    """MetaSchedule's JSON database in ``db``; :class:`TuningDatabaseError` naming the file when
    a table is not valid JSON lines of workloads / records."""
    load_tvm()
    from tvm.s_tir import meta_schedule as ms

    paths = {name: db / name for name in (WORKLOADS, RECORDS)}
    for name, path in paths.items():
        if path.exists():
            _check_json_lines(path)
        elif not create:
            raise TuningDatabaseError(f"{db}: no tuning database here ({name} missing)")
    db.mkdir(parents=True, exist_ok=True)
    try:
        return ms.database.JSONDatabase(path_workload=str(paths[WORKLOADS]), path_tuning_record=str(paths[RECORDS]),
                                        allow_missing=create)
    except Exception as err:  # TVM raises its own error types for records it cannot parse
        raise TuningDatabaseError(f"{db}: corrupt tuning database ({type(err).__name__}: {str(err).splitlines()[0]})") from err


def _check_json_lines(path: Path) -> None:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TuningDatabaseError(f"{path}: unreadable ({err})") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise TuningDatabaseError(f"{path}, line {number}: corrupt tuning database ({err.msg})") from err
        if not isinstance(value, list):
            raise TuningDatabaseError(f"{path}, line {number}: corrupt tuning database (expected a JSON list)")


def apply_database(mod, target: dict, db: Path):
    """``mod`` with the best schedule of every task found in the database of ``db``."""
    tvm = load_tvm()
    from tvm import relax

    database = open_database(db)
    with tvm.target.Target(target), database:
        return relax.transform.MetaScheduleApplyDatabase()(mod)


def write_meta(db: Path, meta: dict) -> None:
    atomic_write_text(db / META, json.dumps(meta, indent=2) + "\n")


def find_database(export_dir, profile: DeviceProfile, target: dict, batch: int, kernels: str, onnx_path) -> tuple[Path | None, dict | None]:
    """The tuning database for this model/device/batch when ``tune`` wrote one, with its summary."""
    db = database_dir(export_dir, profile, target, batch, kernels, sha256_file(onnx_path))
    meta = read_meta(db)
    return (db, meta) if meta is not None else (None, None)


# --------------------------------------------------------------------------------------------
# The crossover cache of the spike-adaptive kernels

CROSSOVERS = "kernel-crossovers.json"
CROSSOVER_FORMAT = "stdeploy-kernel-crossovers/1"
CACHE_ENV = "STDEPLOY_CACHE_DIR"


class CrossoverCacheError(TuningDatabaseError):
    """A crossover cache file or entry that is not what it must be (names the file or field)."""


def _int_tuple(value, name: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise CrossoverCacheError(f"{name}: expected a list of non-negative integers, got {value!r}")
    return tuple(int(v) for v in value)


# gather kernels (kernels.spike) and skip-zero kernels (kernels.skipzero), convolution and matmul
CROSSOVER_KINDS = ("spikeconv", "spikematmul", "skipzeroconv", "skipzeromatmul")


@dataclass(frozen=True)
class CrossoverKey:
    """What a crossover threshold depends on: a threshold is reused only where all of it is equal."""

    kind: str                     # one of CROSSOVER_KINDS
    x_shape: tuple[int, ...]      # the layer's input (NCHW, or (..., K))
    w_shape: tuple[int, ...]      # its weight (OIHW, or (K, N))
    padding: tuple[int, ...]      # (top, left, bottom, right); () for a matmul
    cpu: str                      # CPU model (cpu_model())
    mcpu: str                     # the LLVM CPU the kernel is compiled for ("" when none named)
    threads: int                  # threads of TVM's pool while timing (and running)
    blas_threads: int             # threads of numpy's BLAS while timing (0: unknown, no threadpoolctl)
    kernel_version: int           # spike.KERNEL_VERSION: a changed kernel is measured again
    weights: str = ""             # skip-zero kernels: digest of the weight's zero pattern (kernels.skipzero.zero_pattern)

    def __post_init__(self):
        if self.kind not in CROSSOVER_KINDS:
            raise CrossoverCacheError(f"key.kind: expected one of {', '.join(CROSSOVER_KINDS)}, got {self.kind!r}")
        if not isinstance(self.weights, str):
            raise CrossoverCacheError(f"key.weights: expected a string, got {self.weights!r}")
        for name in ("x_shape", "w_shape", "padding"):
            object.__setattr__(self, name, _int_tuple(getattr(self, name), f"key.{name}"))
        for name in ("cpu", "mcpu"):
            if not isinstance(getattr(self, name), str):
                raise CrossoverCacheError(f"key.{name}: expected a string, got {getattr(self, name)!r}")
        for name, low in (("threads", 1), ("blas_threads", 0), ("kernel_version", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise CrossoverCacheError(f"key.{name}: expected an integer >= {low}, got {value!r}")

    def text(self) -> str:
        """The key as canonical JSON (how the cache indexes it)."""
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Crossover:
    """One measured threshold and the times it came from (seconds, median of ``repeats`` calls
    after ``warmup``, every candidate alike, TVM's pool at ``threads`` threads, BLAS at
    ``blas_threads``): the gather kernel on an all-zero
    input (``fixed_s``) and on ``calibration_density`` ones (``busy_s``), BLAS (``dense_s``).
    ``max_density`` in [0, 1]: the gather kernel runs up to it, BLAS above."""

    max_density: float
    fixed_s: float
    busy_s: float
    dense_s: float
    calibration_density: float
    statistic: str                # "median"
    warmup: int
    repeats: int
    threads: int
    blas_threads: int

    def __post_init__(self):
        for name in ("max_density", "fixed_s", "busy_s", "dense_s", "calibration_density"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise CrossoverCacheError(f"crossover.{name}: expected a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.max_density > 1.0 or not 0.0 < self.calibration_density <= 1.0:
            raise CrossoverCacheError(f"crossover: max_density {self.max_density} and calibration_density "
                                      f"{self.calibration_density} must lie in [0, 1] and (0, 1]")
        if self.statistic != "median":
            raise CrossoverCacheError(f"crossover.statistic: expected 'median', got {self.statistic!r}")
        for name, low in (("warmup", 0), ("repeats", 1), ("threads", 1), ("blas_threads", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise CrossoverCacheError(f"crossover.{name}: expected an integer >= {low}, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def crossover_cache_path(export_dir: str | os.PathLike | None = None, path: str | os.PathLike | None = None) -> Path | None:
    """Where the crossover cache lives: ``path`` when given, else ``$STDEPLOY_CACHE_DIR/tvm/`` +
    :data:`CROSSOVERS` when that variable is set, else ``export_dir/tuning/`` + :data:`CROSSOVERS`;
    None when there is neither (the thresholds are then measured and kept in memory only)."""
    if path is not None:
        return Path(path)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "tvm" / CROSSOVERS
    if export_dir is not None:
        return Path(export_dir) / "tuning" / CROSSOVERS
    return None


class CrossoverCache:
    """The crossover thresholds of one cache file (or of memory only, ``path=None``).

    ``get`` / ``put`` by :class:`CrossoverKey`; ``save()`` writes the file atomically when
    something was added. ``measured`` and ``reused`` count what this build did (``put`` and hits
    of ``get``); ``problem`` says why a file on disk was ignored (it is then never rewritten)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, tuple[CrossoverKey, Crossover]] = {}
        self.problem: str | None = None
        self.measured = self.reused = 0
        self._dirty = False
        if self.path is not None and self.path.exists():
            try:
                self.entries = self._load(self.path)
            except CrossoverCacheError as err:
                self.problem = str(err)
                warnings.warn(f"tvm: crossover cache ignored: {err}; thresholds are measured again and the file is "
                              f"left as it is (delete it to cache again)", stacklevel=2)

    @staticmethod
    def _load(path: Path) -> dict[str, tuple[CrossoverKey, Crossover]]:
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CrossoverCacheError(f"{path}: not a readable JSON file ({err})") from err
        if not isinstance(doc, dict) or doc.get("format") != CROSSOVER_FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise CrossoverCacheError(f"{path}: not a stdeploy crossover cache (format {found!r}, expected {CROSSOVER_FORMAT!r})")
        entries = doc.get("entries")
        if not isinstance(entries, list):
            raise CrossoverCacheError(f"{path}: entries: expected a list")
        out = {}
        for i, entry in enumerate(entries):
            try:
                if not isinstance(entry, dict) or set(entry) != {"key", "crossover"}:
                    raise CrossoverCacheError("expected {'key': ..., 'crossover': ...}")
                key, value = entry["key"], entry["crossover"]
                if not isinstance(key, dict) or not isinstance(value, dict):
                    raise CrossoverCacheError("key and crossover must be objects")
                key, value = CrossoverKey(**key), Crossover(**value)
            except TypeError as err:  # missing or unknown fields
                raise CrossoverCacheError(f"{path}: entries[{i}]: {err}") from err
            except CrossoverCacheError as err:
                raise CrossoverCacheError(f"{path}: entries[{i}]: {err}") from err
            out[key.text()] = (key, value)
        return out

    def get(self, key: CrossoverKey) -> Crossover | None:
        hit = self.entries.get(key.text())
        if hit is None:
            return None
        self.reused += 1
        return hit[1]

    def put(self, key: CrossoverKey, crossover: Crossover) -> None:
        self.entries[key.text()] = (key, crossover)
        self.measured += 1
        self._dirty = True

    def save(self) -> bool:
        """Write the file when this build added thresholds; False (with a warning) when it cannot
        be written, or when the file on disk was ignored as invalid (never overwritten)."""
        if self.path is None or not self._dirty:
            return False
        if self.problem is not None:
            return False
        entries = dict(self.entries)
        if self.path.exists():  # another build may have added thresholds since this one read the file
            try:
                entries = {**self._load(self.path), **entries}
            except CrossoverCacheError as err:
                warnings.warn(f"tvm: crossover cache not written: {err} (it became invalid during this build)", stacklevel=2)
                return False
        doc = {"format": CROSSOVER_FORMAT,
               "entries": [{"key": asdict(k), "crossover": c.to_dict()} for k, c in entries.values()]}
        try:
            atomic_write_text(self.path, json.dumps(doc, indent=1) + "\n")
        except OSError as err:
            warnings.warn(f"tvm: cannot write the crossover cache {self.path} ({err}); thresholds are not kept", stacklevel=2)
            return False
        self._dirty = False
        return True

    def summary(self) -> dict:
        """For a build's info: the file, this build's measured / reused counts, why a file was ignored."""
        return {"path": str(self.path) if self.path is not None else None, "measured": self.measured,
                "reused": self.reused, **({"ignored": self.problem} if self.problem else {})}
