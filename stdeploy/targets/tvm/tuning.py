"""MetaSchedule tuning of the TVM CPU path (the ``stdeploy tune`` command).

:func:`tune` prepares the CPU module exactly as running does (:func:`.cpu.prepare_cpu_module`),
extracts MetaSchedule's tasks (kernels not already scheduled), and tunes each up to
``trials_per_task`` measured candidates into the database of :mod:`.database`. Tasks are tuned
one at a time and the database is written as candidates are measured, so a stopped run resumes
where it stopped: tasks that already hold ``trials_per_task`` records (or whose earlier budget
was spent) are skipped, which also makes a second ``tune`` of the same model a no-op. The sparse
choice made while tuning is stored in ``tune.json`` and reused by ``run``. MetaSchedule's cost
model needs ``xgboost`` installed (the ``tvm`` extra).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from ...files import sha256_file
from ..base import TargetError
from ..profiles import DeviceProfile
from .cpu import CpuOptions, prepare_cpu_module, sparse_layers_of
from .database import database_dir, open_database, read_meta, write_meta
from .frontend import load_onnx_graph
from .host import cpu_target
from .sdk import load_tvm

__all__ = ["extract_tasks", "tune_module", "tune"]


def _records_per_task(database, tasks) -> list[int]:
    from tvm_ffi import structural_hash

    counts: dict[int, int] = {}
    for record in database.get_all_tuning_records():
        key = structural_hash(record.workload.mod)
        counts[key] = counts.get(key, 0) + 1
    return [counts.get(structural_hash(task.dispatched[0]), 0) for task in tasks]


def extract_tasks(mod, target: dict) -> list:
    """MetaSchedule's tasks of a prepared module, skipping kernels that are already scheduled."""
    tvm = load_tvm()
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
    load_tvm()
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
    candidates, and each worker imports TVM anew, which can dominate a tuning run on few cores.
    Candidates are compiled here instead, one after the other (a failing
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


def tune(export_dir: str | os.PathLike, profile: DeviceProfile, *, batch_size: int = 32, trials_per_task: int = 64,
         kernels: str = "blas", sparse: str = "auto", progress: Callable[[str, int, int], None] | None = None,
         database: str | os.PathLike | None = None) -> dict:
    """Tune the export directory's ONNX graph for a cpu profile at ``batch_size``; the summary
    (database folder, per-task trials, seconds) is also written to ``tune.json`` there.

    ``sparse``: ``auto`` (pruned linears go to the sparse kernel where it measures faster; the
    choice is stored and reused by ``run``) or ``off``. ``database``: a folder to use instead of
    the one keyed by model (MetaSchedule matches records per task, so models with the same
    operators, such as the pruned variants of one architecture, can share one)."""
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
