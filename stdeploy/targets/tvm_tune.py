"""MetaSchedule tuning for the TVM CPU path, with a tuning database per (device, model, batch).

The CPU module is prepared the same way for tuning and for running (:func:`prepare_cpu_module`):
TVM's ONNX import at a static batch, optional sparse-kernel rewrite of pruned linears, the BLAS
offload of matmuls and convolutions (:mod:`stdeploy.targets.tvm_blas`), then Relax's zero
pipeline (legalize, fuse). What is left in TIR (the fused LIF recurrences, pooling, reductions,
and everything when the offload is off) are MetaSchedule's tasks.

``tune`` (the ``stdeploy tune`` command) tunes each task up to ``trials_per_task`` measured
candidates and records every candidate in a JSON database under
``EXPORT_DIR/tuning/<profile>-b<batch>-<key>/`` (``key``: hash of the ONNX file, the TVM target
and the kernel options), beside ``tune.json`` (what was tuned, trials per task, seconds). Tasks
are tuned one at a time and the database is written as candidates are measured, so a run that is
stopped resumes where it stopped: tasks that already hold ``trials_per_task`` records are
skipped, which also makes a second ``tune`` of the same model a no-op.

``run``/``bench`` find the database by the same key and apply it
(:func:`compile_cpu`); a corrupt database raises :class:`TuningDatabaseError` in ``tune`` and
makes the runnable fall back to the untuned (BLAS) module with a warning naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..files import atomic_write_text, sha256_file
from .base import TargetError
from .profiles import DeviceProfile

WORKLOADS, RECORDS, META = "database_workload.json", "database_tuning_record.json", "tune.json"
# blas: matmuls and stride-1 convolutions to the spike-adaptive kernels (tvm_spikeconv), other
# convolutions to BLAS; blas-dense: every matmul/conv2d to BLAS; tir: everything TVM code
KERNELS = ("blas", "blas-dense", "tir")
# the spike-adaptive ops of offload_to_blas: (Offloaded.op, key in the build info, name in the path)
SPIKE_OPS = (("spike-conv2d", "spike_conv", "conv2d"), ("spike-matmul", "spike_matmul", "matmul"))


class TuningDatabaseError(TargetError):
    """A tuning database that cannot be read (names the file)."""


@dataclass(frozen=True)
class CpuOptions:
    """How the CPU module is built: ``kernels`` (``blas`` or ``tir``) and the per-layer sparse
    choice (indices of the constant-weight matmuls that run the sparse kernel; ``None`` = let
    the sparse pass decide by measurement, ``()`` = no sparse kernels)."""

    kernels: str = "blas"
    sparse_layers: tuple[int, ...] | None = ()

    def __post_init__(self):
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")


@dataclass
class PreparedModule:
    mod: object
    info: dict = field(default_factory=dict)


def _tvm():
    from .tvm_target import _tvm as load

    return load()


def prepare_cpu_module(graph, batch: int, target: dict, options: CpuOptions = CpuOptions()) -> PreparedModule:
    """The Relax module of ``graph`` at ``batch``, rewritten per ``options`` and through Relax's
    zero pipeline: the exact module that both tuning and running compile."""
    tvm = _tvm()
    from tvm import relax

    from .tvm_blas import offload_to_blas
    from .tvm_target import _relax_module

    mod = _relax_module(graph, batch)
    info: dict = {"kernels": options.kernels}
    if options.sparse_layers != ():
        from .tvm_sparse import measured_choice, rewrite_sparse_matmuls

        if options.sparse_layers is None:
            decide = measured_choice(target, spike_kernels=options.kernels == "blas")  # against what runs instead
        else:
            chosen = set(options.sparse_layers)
            decide = lambda index, weight, x_shape: index in chosen  # noqa: E731
        mod, report = rewrite_sparse_matmuls(mod, target, decide)
        info["sparse"] = report
    if options.kernels in ("blas", "blas-dense"):
        mod, done = offload_to_blas(mod, spike_target=target if options.kernels == "blas" else None)
        info["offloaded"] = [f"{o.op} {list(o.shape)}" for o in done]
        for op, key, _ in SPIKE_OPS:
            spike = [o for o in done if o.op == op]
            if spike:  # ``calls`` is the kernel's live counter: dumped after a run it says which path ran
                info[key] = [{"weight": list(o.shape), "max_density": round(o.kernel.max_density, 3), "calls": o.kernel.stats,
                              "compile_seconds": round(o.kernel.compile_seconds, 3)} for o in spike]
    with tvm.target.Target(target):
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
                                        relax.get_pipeline("zero")])(mod)
    return PreparedModule(mod, info)


def sparse_layers_of(info: dict) -> tuple[int, ...]:
    """Indices of the matmuls a sparse report sent to the sparse kernel."""
    return tuple(int(r["index"]) for r in info.get("sparse", []) if r.get("chosen") == "sparse")


# --------------------------------------------------------------------------------------------
# The database


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
    _tvm()
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


def _records_per_task(database, tasks) -> list[int]:
    from tvm_ffi import structural_hash

    counts: dict[int, int] = {}
    for record in database.get_all_tuning_records():
        key = structural_hash(record.workload.mod)
        counts[key] = counts.get(key, 0) + 1
    return [counts.get(structural_hash(task.dispatched[0]), 0) for task in tasks]


def extract_tasks(mod, target: dict) -> list:
    """MetaSchedule's tasks of a prepared module, skipping kernels that are already scheduled."""
    tvm = _tvm()
    from tvm.s_tir import meta_schedule as ms

    tasks = ms.relax_integration.extract_tasks(mod, tvm.target.Target(target))
    return [t for t in tasks if not (t.dispatched[0]["main"].attrs or {}).get("tirx.is_scheduled", False)]


def tune_module(mod, target: dict, db: Path, *, trials_per_task: int, progress: Callable[[str, int, int], None] | None = None,
                seed: int = 0, finished: dict[str, int] | None = None) -> list[dict]:
    """Tune the tasks of ``mod`` into the database in ``db``; per task: name, key (structural
    hash), weight, records before, new trials, budget. A task is skipped when it holds
    ``trials_per_task`` records or ``finished[key]`` (the budget an earlier run completed for
    it; small tasks have fewer distinct candidates than trials) is at least that; the others are
    tuned together (one builder/runner pool). ``progress(task_name, trials_done, trials_total)``
    is called after every measured batch."""
    _tvm()
    from tvm.s_tir import meta_schedule as ms

    if not (isinstance(trials_per_task, int) and trials_per_task >= 1):
        raise ValueError(f"trials_per_task must be a positive integer, got {trials_per_task!r}")
    database = open_database(db, create=True)
    tasks = extract_tasks(mod, target)
    before = _records_per_task(database, tasks)
    keys = [_task_key(t) for t in tasks]
    finished = finished or {}
    todo = [i for i, done in enumerate(before) if done < trials_per_task and finished.get(keys[i], 0) < trials_per_task]
    if todo:
        selected = [tasks[i] for i in todo]
        callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
        if progress is not None:
            callbacks.append(_progress_callback(ms, [t.task_name for t in selected], trials_per_task * len(selected), progress))
        with _quiet_logs():
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                selected, str(db / "logs"), strategy=_search_strategy(ms, trials_per_task), seed=seed)
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(db / "logs"),
                          max_trials_global=trials_per_task * len(selected), max_trials_per_task=trials_per_task,
                          num_trials_per_iter=min(64, trials_per_task), database=database, measure_callbacks=callbacks,
                          builder=_in_process_builder(ms))
    after = _records_per_task(database, tasks) if todo else before
    return [{"task": t.task_name, "key": k, "weight": int(t.weight), "records_before": b, "new_trials": a - b,
             "budget": max(trials_per_task if i in todo else 0, finished.get(k, 0), min(a, trials_per_task))}
            for i, (t, k, b, a) in enumerate(zip(tasks, keys, before, after))]


def _task_key(task) -> str:
    from tvm_ffi import structural_hash

    return f"{structural_hash(task.dispatched[0]) & 0xFFFFFFFFFFFFFFFF:016x}"


def _in_process_builder(ms):
    """MetaSchedule's LocalBuilder starts a fresh pool of worker processes for every batch of
    candidates, and each worker imports TVM: about 30 s per batch on a loaded 2-core machine,
    most of a tuning run. Candidates are compiled here instead, one after the other (a failing
    candidate is reported as a build error, as the pool would); measuring still runs in
    MetaSchedule's runner process."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class _InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    results.append(ms.builder.BuilderResult(default_export(default_build(item.mod, item.target, None)), None))
                except Exception as err:  # a candidate TVM cannot compile: MetaSchedule skips it
                    results.append(ms.builder.BuilderResult(None, f"build failed: {type(err).__name__}: {err}"))
            return results

    return _InProcessBuilder()


def _progress_callback(ms, names: list[str], total: int, progress):
    from tvm.ir.utils import derived_object

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.done = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            self.done += len(measure_candidates)
            progress(names[task_id], self.done, total)

    return _Progress()


def _search_strategy(ms, trials_per_task: int):
    """MetaSchedule's evolutionary search sized to the trial budget: its defaults (a population of
    512 evolved 4 times per round) cost minutes per task on 2 cores even for 8 trials."""
    population = max(32, min(512, 4 * trials_per_task))
    return ms.search_strategy.EvolutionarySearch(population_size=population, init_min_unmeasured=min(50, population // 2),
                                                 genetic_num_iters=2 if trials_per_task <= 64 else 4)


class _quiet_logs:
    """MetaSchedule logs every candidate at INFO level to stdout; keep them in its log files.
    Its logging setup also fails on unnamed handlers on its logger (pytest adds two): they are
    taken off while tuning and put back after."""

    def __enter__(self):
        import logging

        self._logger = logging.getLogger("tvm.s_tir.meta_schedule")
        self._level = self._logger.level
        self._unnamed = [h for h in self._logger.handlers if h.get_name() is None]
        for handler in self._unnamed:
            self._logger.removeHandler(handler)
        self._logger.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
        for handler in self._unnamed:
            self._logger.addHandler(handler)


def apply_database(mod, target: dict, db: Path):
    """``mod`` with the best schedule of every task found in the database of ``db``."""
    tvm = _tvm()
    from tvm import relax

    database = open_database(db)
    with tvm.target.Target(target), database:
        return relax.transform.MetaScheduleApplyDatabase()(mod)


def write_meta(db: Path, meta: dict) -> None:
    atomic_write_text(db / META, json.dumps(meta, indent=2) + "\n")


def tune(export_dir: str | os.PathLike, profile: DeviceProfile, *, batch_size: int = 32, trials_per_task: int = 64,
         kernels: str = "blas", sparse: str = "auto", progress: Callable[[str, int, int], None] | None = None,
         database: str | os.PathLike | None = None) -> dict:
    """Tune the export directory's ONNX graph for a cpu profile at ``batch_size``; the summary
    (database folder, per-task trials, seconds) is also written to ``tune.json`` there.

    ``sparse``: ``auto`` (pruned linears go to the sparse kernel where it measures faster; the
    choice is stored and reused by ``run``) or ``off``. ``database``: a folder to use instead of
    the one keyed by model (MetaSchedule matches records per task, so models with the same
    operators, such as the pruned variants of one architecture, can share one)."""
    from .tvm_target import cpu_target, load_onnx_graph

    if profile.kind != "cpu":
        raise TargetError(f"device profile {profile.name} is a {profile.kind} profile; `tune` tunes cpu profiles "
                          "(CUDA modules use dlight's schedules)")
    if sparse not in ("auto", "off"):
        raise ValueError(f"sparse must be 'auto' or 'off', got {sparse!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    graph = load_onnx_graph(export_dir)
    target = cpu_target(profile)
    onnx_sha = sha256_file(graph.path)
    db = Path(database) if database is not None else database_dir(export_dir, profile, target, batch_size, kernels, onnx_sha)
    meta = read_meta(db)
    if meta and database is None:
        sparse_layers = tuple(meta.get("sparse_layers", ()))
    else:
        sparse_layers = None if sparse == "auto" else ()
    t0 = time.perf_counter()
    prepared = prepare_cpu_module(graph, batch_size, target, CpuOptions(kernels, sparse_layers))
    finished = {t["key"]: int(t.get("budget", 0)) for t in (meta or {}).get("tasks", []) if "key" in t}
    tasks = tune_module(prepared.mod, target, db, trials_per_task=trials_per_task, progress=progress, finished=finished)
    seconds = time.perf_counter() - t0
    meta = {
        "onnx": str(graph.path), "onnx_sha256": onnx_sha, "profile": profile.name, "target": target, "batch_size": batch_size,
        "kernels": kernels, "sparse_layers": list(sparse_layers_of(prepared.info)) if sparse_layers is None else list(sparse_layers),
        "trials_per_task": trials_per_task, "tasks": tasks,
        "new_trials": sum(t["new_trials"] for t in tasks), "records": sum(t["records_before"] + t["new_trials"] for t in tasks),
        "seconds": round(seconds + (meta or {}).get("seconds", 0.0), 1), "last_run_seconds": round(seconds, 1),
        "offloaded": prepared.info.get("offloaded", []), "sparse": prepared.info.get("sparse", []),
    }
    write_meta(db, meta)
    return {"database": str(db), **meta}


def find_database(export_dir, profile: DeviceProfile, target: dict, batch: int, kernels: str, onnx_path) -> tuple[Path | None, dict | None]:
    """The tuning database for this model/device/batch when ``tune`` wrote one, with its summary."""
    db = database_dir(export_dir, profile, target, batch, kernels, sha256_file(onnx_path))
    meta = read_meta(db)
    return (db, meta) if meta is not None else (None, None)


def compile_cpu(graph, export_dir, profile: DeviceProfile, target: dict, batch: int, *, schedule: str = "auto",
                kernels: str = "blas", sparse: str = "auto", database: str | os.PathLike | None = None) -> tuple[object, dict]:
    """Compile the CPU executable and say how: ``(executable, info)``, ``info["path"]`` names the
    kernels used (e.g. ``BLAS matmul/conv2d + MetaSchedule-tuned TIR``, ``untuned TIR``).

    ``schedule``: ``auto`` (the tuning database when one exists for this batch, else
    untuned TIR around the BLAS kernels), ``tuned`` (a database is required), ``untuned``."""
    tvm = _tvm()
    if schedule not in ("auto", "tuned", "untuned"):
        raise ValueError(f"schedule must be auto, tuned or untuned, got {schedule!r}")
    db, meta, problem = None, None, None
    if schedule != "untuned":
        try:
            if database is not None:
                db, meta = Path(database), read_meta(Path(database)) or {}
            else:
                db, meta = find_database(export_dir, profile, target, batch, kernels, graph.path)
        except TuningDatabaseError as err:
            problem = str(err)
        if db is None and schedule == "tuned":
            raise TargetError(problem or f"{export_dir}: no tuning database for {profile.name} at batch {batch} "
                              f"(kernels {kernels}): run `stdeploy tune {export_dir} --device {profile.name} --batch {batch}`")
    if meta is not None and database is None:
        sparse_layers = tuple(meta.get("sparse_layers", ()))
    else:
        sparse_layers = None if sparse == "auto" else ()
    prepared = prepare_cpu_module(graph, batch, target, CpuOptions(kernels, sparse_layers))
    mod, tuned = prepared.mod, False
    if db is not None:
        try:
            mod = apply_database(mod, target, db)
            tuned = True
            prepared.info["database"] = str(db)
            prepared.info["tuned_records"] = meta.get("records")
        except TuningDatabaseError as err:
            if schedule == "tuned":
                raise
            problem = str(err)
    if problem:
        warnings.warn(f"tvm: {problem}; running without the tuning database", stacklevel=3)
        prepared.info["database_problem"] = problem
    try:
        ex = tvm.compile(mod, target=tvm.target.Target(target))
    except Exception as err:  # TVMError subclasses; keep the message, name the artifact
        raise TargetError(f"{graph.path}: TVM cannot compile it for {target}: {err}") from err
    path = ("BLAS matmul/conv2d + " if kernels != "tir" else "") + ("MetaSchedule-tuned TIR" if tuned else "untuned TIR")
    spiking = [name for _, key, name in SPIKE_OPS if prepared.info.get(key)]
    if spiking:
        path = f"spike-adaptive {'/'.join(spiking)} + " + path
    if prepared.info.get("sparse") and sparse_layers_of(prepared.info):
        path = "sparse kernels + " + path
    return ex, {"path": path, **prepared.info}
