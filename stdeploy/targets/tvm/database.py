"""MetaSchedule tuning databases of the TVM CPU path: where each lives, reading, applying.

A database belongs to one (model, device profile, TVM target, batch, kernels) and lives under
``EXPORT_DIR/tuning/<profile>-b<batch>-<kernels>-<key>/`` (``key``: hash of the ONNX file's sha256,
the target dict, the batch and the kernel option; :func:`database_dir`). It holds MetaSchedule's
JSON tables (:data:`WORKLOADS`, :data:`RECORDS`: one JSON list per line) and ``tune.json``
(:data:`META`: what was tuned, trials per task, seconds). A table that is not JSON lines, or a
summary without a task list, raises :class:`TuningDatabaseError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ...files import atomic_write_text, sha256_file
from ..base import TargetError
from ..profiles import DeviceProfile
from .sdk import load_tvm

__all__ = ["WORKLOADS", "RECORDS", "META", "TuningDatabaseError", "database_dir", "read_meta", "open_database",
           "apply_database", "write_meta", "find_database"]

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
