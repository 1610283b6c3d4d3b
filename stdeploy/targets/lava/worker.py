"""The parent's side of the Lava worker: a Python subprocess that imports lava once and runs one
lowered plan per request (:mod:`.processes` is its other side).

Why a subprocess: lava sets ``multiprocessing``'s start method at import, and a failing Lava
process model can hang instead of raising. Contract: the worker runs in its own process group
with every process Lava forks; a request not answered within its ``timeout_s`` (seconds, the
worker's start-up included when it starts), a worker that dies, or a failed run ends the whole
group (SIGTERM to the worker, SIGKILL to the Lava processes while multiprocessing's resource
tracker unlinks their shared memory, then SIGKILL to the rest) and raises
:class:`LavaTimeout` or :class:`~stdeploy.targets.base.TargetError` with the worker's log tail;
the next request starts a fresh worker. The worker imports stdeploy from the same import path as
this process (:func:`worker_env`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..base import TargetError
from .plan import MODEL_FAILED

__all__ = ["LavaTimeout", "LavaWorker", "worker_env", "group_members", "group_memory", "kill_group", "stop_group", "WORKER_MODULE"]

WORKER_MODULE = "stdeploy.targets.lava.processes"
_MODEL_FAILED = re.compile(re.escape(MODEL_FAILED).replace(r"\{\}", r"\S+").encode())
_KILL_GRACE_S = 5.0


class LavaTimeout(TargetError):
    """A Lava run exceeded ``timeout_s``; ``pgid`` is the stopped worker's process group."""

    def __init__(self, message: str, pgid: int):
        super().__init__(message)
        self.pgid = pgid


def worker_env() -> dict:
    """The worker's environment: this process's, with ``PYTHONPATH`` set to this process's import
    path (``sys.path``), so the worker imports the same stdeploy (a source checkout, an editable
    install or a wheel) and the same lava, and one thread per math library."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"  # ~50 forked Lava processes: one thread each
    return env


def group_members(pgid: int) -> list[tuple[int, str, str]]:
    """``(pid, state, command line)`` of every process in process group ``pgid`` (from /proc)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
            if int(fields[2]) == pgid:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                members.append((int(entry.name), fields[0], cmd))
        except (OSError, ValueError, IndexError):
            continue
    return members


def group_memory(pids) -> tuple[int, int]:
    """Summed resident set (RSS) and proportional set size (PSS) of ``pids``, bytes, from
    ``/proc/PID/smaps_rollup`` (forked processes share pages: the RSS sum counts them once per
    process, PSS splits them); a process that has gone counts nothing."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


def _live(pgid: int, keep=lambda cmd: False) -> list[int]:
    return [pid for pid, state, cmd in group_members(pgid) if state not in ("Z", "X") and not keep(cmd)]


def _wait_until(pred, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _is_tracker(cmd: str) -> bool:
    return "resource_tracker" in cmd


def kill_group(pgid: int, keep=_is_tracker) -> None:
    """SIGKILL every live member of process group ``pgid`` but those whose command line ``keep``
    accepts (default: multiprocessing's resource tracker, which then unlinks the shared memory the
    others leave behind)."""
    for pid in _live(pgid, keep):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_group(proc: subprocess.Popen) -> None:
    """End ``proc`` and every process in its process group (it was started with
    ``start_new_session=True``): SIGTERM ``proc`` if it runs (it unwinds into Lava's ``stop()``),
    give the group 5 s to exit, then SIGKILL the Lava processes but multiprocessing's resource
    tracker (:func:`kill_group`), which then unlinks the shared memory they leave behind, then
    SIGKILL what remains; ``proc`` is reaped."""
    pgid = proc.pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _wait_until(lambda: not _live(pgid, _is_tracker), _KILL_GRACE_S)
    kill_group(pgid)
    _wait_until(lambda: not _live(pgid), _KILL_GRACE_S)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=_KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _wait_until(lambda: not _live(pgid), _KILL_GRACE_S)


class LavaWorker:
    """A Python subprocess that imports lava once and runs one Lava network per request.

    It runs in its own process group, with every Lava process it forks. A request not answered
    within its timeout, a worker that dies, or a failed run ends the whole group
    (:func:`stop_group`); the next request starts a fresh worker. Requests are JSON lines on the
    worker's stdin; answers come back on a pipe of their own (Lava's processes print to stdout)."""

    def __init__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="stdeploy-lava-")
        self.dir = Path(self._tmp.name)
        self.proc: subprocess.Popen | None = None
        self._status = None
        self._log = None
        self._requests = 0
        self._scanned = 0
        self._plans: dict[int, str] = {}
        self.last_pgid: int | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _start(self) -> None:
        read_fd, write_fd = os.pipe()
        self._log = open(self.dir / "worker.log", "ab")
        cmd = [sys.executable, "-m", WORKER_MODULE, "--serve", str(write_fd)]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=worker_env(), pass_fds=(write_fd,), start_new_session=True)
        finally:
            os.close(write_fd)
        self._status = os.fdopen(read_fd, "rb", buffering=0)
        self._plans = {}
        self.last_pgid = self.proc.pid  # the worker's process group (its Lava processes too)

    def _log_tail(self, since: int = 0, limit: int = 6000) -> str:
        path = self.dir / "worker.log"
        text = path.read_bytes()[since:].decode(errors="replace") if path.is_file() else ""
        return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2:]

    def run(self, plan: dict, x: np.ndarray, timeout_s: float) -> tuple[dict[str, np.ndarray], dict]:
        """Run ``plan`` on ``x`` within ``timeout_s`` (the worker's start-up included when it starts)."""
        t0 = time.monotonic()
        if not self.alive:
            self.close()
            self._start()
        self._requests += 1
        req = self.dir / f"run{self._requests}"
        req.mkdir()
        if id(plan) not in self._plans:  # the worker keeps each plan it has read
            path = self.dir / f"plan{self._requests}.pkl"
            with open(path, "wb") as f:
                pickle.dump(plan, f, protocol=pickle.HIGHEST_PROTOCOL)
            self._plans[id(plan)] = str(path)
        np.save(req / "x.npy", x)
        log_start = (self.dir / "worker.log").stat().st_size
        self._scanned = log_start  # where _model_failed's next scan of the log starts
        line = json.dumps({"plan": self._plans[id(plan)], "x": str(req / "x.npy"), "dir": str(req), "out": str(req / "out.npz")})
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # the worker died: found below
        answer = b""
        while not answer.endswith(b"\n"):
            left = timeout_s - (time.monotonic() - t0)
            if left <= 0:
                pgid = self.proc.pid
                self.close(force=True)
                tail = self._log_tail(log_start, 2000)
                raise LavaTimeout(f"lava: the run did not finish within timeout_s={timeout_s:g} s; its process group {pgid} "
                                  "was stopped (raise [lava] timeout_s in the profile for larger runs)"
                                  + (f"\nworker log:\n{tail}" if tail.strip() else ""), pgid=pgid)
            ready, _, _ = select.select([self._status], [], [], min(left, 0.2))
            if ready:
                chunk = self._status.read(65536)
                if not chunk:  # the pipe closed
                    break
                answer += chunk
            elif self.proc.poll() is not None or self._model_failed():
                break  # a process model that raised can leave Lava's runtime hanging: its line in the log ends the run
        status = json.loads(answer) if answer.endswith(b"\n") else None
        if status is None or not status.get("ok"):
            rc = self.proc.poll()
            self.close(force=True)  # a fresh worker for the next run
            raise TargetError(f"lava: the run failed (worker exit status {rc}):\n{self._log_tail(log_start)}")
        with np.load(req / "out.npz") as z:
            out = {k: np.array(z[k]) for k in z.files}
        for f in req.iterdir():
            f.unlink()
        req.rmdir()
        compile_s, steps_s, _ = (float(v) for v in out.pop("__timing__"))
        meta = {"lava_seconds": float(out.pop("__lava_seconds__")), "lava_compile_start_s": compile_s, "lava_steps_s": steps_s,
                "worker_pid": self.proc.pid}
        return out, meta

    def _model_failed(self) -> bool:
        """A process model's failure line (:data:`.plan.MODEL_FAILED`) in the worker's log since this
        run's request: each call scans what was not scanned yet, from the start of the last line it
        left unfinished (a half-written line is scanned again once complete)."""
        path = self.dir / "worker.log"
        try:
            if path.stat().st_size <= self._scanned:
                return False
            with open(path, "rb") as f:
                f.seek(self._scanned)
                text = f.read()
        except OSError:
            return False
        if _MODEL_FAILED.search(text) is not None:
            return True
        self._scanned += text.rfind(b"\n") + 1  # up to the last complete line (no newline: stays)
        return False

    def close(self, force: bool = False) -> None:
        """End the worker: close its stdin so that it exits, or (``force``) end its process group."""
        if self.proc is not None:
            if not force and self.proc.poll() is None:
                try:
                    self.proc.stdin.close()
                    self.proc.wait(timeout=_KILL_GRACE_S)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if self.proc.poll() is None or _live(self.proc.pid):
                stop_group(self.proc)
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
            self.proc = None
        for f in (self._status, self._log):
            if f is not None:
                f.close()
        self._status = self._log = None

    def __del__(self):
        try:
            self.close()
            self._tmp.cleanup()
        except Exception:  # at interpreter shutdown nothing more can be cleaned reliably
            pass
