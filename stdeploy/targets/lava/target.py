"""The registered ``lava`` target (:class:`LavaTarget`).

``compile(export_dir, profile)`` reads ``model.nir``, checks every node (one
:class:`LavaUnsupported` lists all that cannot be lowered), lowers the graph to a *plan* (plain,
picklable data: process specs and connections) and returns a :class:`LavaRunnable`. ``run(x)``
hands the plan and ``x`` ``(T, B, C, H, W)`` to a worker subprocess that builds them as Lava
processes, runs ``T + depth`` steps and returns the sinks' records; the runnable returns logits
``(B, classes)`` (the mean over T of the per-step logits) and the head's spikes ``(T, B, N, D)``.

Lava runs only in that worker (:mod:`.processes`): lava sets ``multiprocessing``'s start
method at import, and a failing Lava process model can hang instead of raising. The worker lives
in its own process group with every process Lava forks; each run has the profile's
``timeout_s`` (``[lava] timeout_s``, default 120 s), after which the group is ended (SIGTERM to
the worker, SIGKILL to the Lava processes while multiprocessing's resource tracker unlinks their
shared memory, then SIGKILL to the rest) and :class:`LavaTimeout` is raised. The worker stops the
runtime in ``finally`` (with a limit, as ``stop()`` itself can hang after a failure), ends its
group if its parent dies, and is kept between runs (lava and torch imported once; ``close()`` or
``with`` ends it); after any failure the next run starts a fresh one.

``[lava] lowering = "standard"`` (profiles ``loihi2-standard``, ``loihi2-standard-fixed``) lowers
to Lava's own processes instead (:mod:`.standard`): batch 1, the samples streamed, Lava's float
(float64) or bit-accurate models; its tolerance is in that module. Every compile's info carries
``resources``, the Loihi 2 resource report of the standard lowering (:mod:`.resources`).
``[lava] attention`` picks how the standard lowering builds Spikformer attention blocks
(:data:`.attention.ATTENTION_LOWERINGS`: ``"product"``, the default, ``"and"`` or ``"strassen"``,
float mode only), for the run and the resource report alike; ``[lava] unproven`` (fixed mode,
exact graphs, :data:`.fixed_point.UNPROVEN`): ``"refuse"`` (default) a graph whose proven ranges
exceed Loihi's 24-bit registers on every input grid, or ``"guard"``: run it with the populations
past their proven range under a LIF model that stops the run where ``u`` would wrap. Any other
value of either key is refused naming
the key and the profile.

Tolerance (exact lowering): floating mode is spike-exact with logits within float32 rounding of the host-side mean
over T; fixed mode keeps at least ``fixed_spike_agreement`` of the output spikes equal to float
mode with 8-bit weights (see :mod:`.fixed_point`).
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nir
import numpy as np

from ...timing import Timer
from ..base import RunResult, TargetError, read_manifest
from ..profiles import DeviceProfile
from .lowering import lower
from .mapping import mapping_report
from .graph import LavaUnsupported
from .resources import resource_report
from .attention import ATTENTION_LOWERINGS
from .fixed_point import UNPROVEN
from .standard import LOGITS_ATOL, SPIKE_AGREEMENT, lower_standard, process_classes
from .worker import LavaWorker, worker_env

__all__ = ["LavaTarget", "LavaRunnable", "INSTALL_HINT", "DEFAULT_TIMEOUT_S", "LOWERINGS", "lava_import_check", "resources_of",
           "attention_lowering"]

INSTALL_HINT = "pip install 'stdeploy[lava]' && python -m stdeploy.install_lava"
DEFAULT_TIMEOUT_S = 120.0
LOWERINGS = ("exact", "standard")  # [lava] lowering: our exact float32 processes, or Lava's own standard processes


@dataclass
class LavaRunnable:
    """Runs the lowered plan; keeps one :class:`LavaWorker` between calls (``close()`` ends it)."""

    plan: dict
    in_shape: tuple[int, ...]
    timeout_s: float
    info: dict
    worker: LavaWorker = field(default_factory=LavaWorker, repr=False)

    def close(self) -> None:
        self.worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self, x: np.ndarray) -> RunResult:
        import torch

        x = np.asarray(x)
        if x.ndim != 2 + len(self.in_shape) or tuple(x.shape[2:]) != self.in_shape:
            raise TargetError(f"lava: expected input (T, B, {', '.join(map(str, self.in_shape))}), got {tuple(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        timesteps = int(x.shape[0])
        if self.plan.get("lowering") == "standard":
            return self._run_standard(x)
        with Timer() as t:
            records, meta = self.worker.run(self.plan, x, self.timeout_s)
            outputs = {}
            for out_name, sinks in self.plan["outputs"].items():
                acc = None
                for s in sinks:  # terms in edge order, each read at its own latency
                    r = np.moveaxis(records[s["sink"]][..., s["latency"]:s["latency"] + timesteps], -1, 0)
                    r = r.astype(np.float32) if s["scale"] is None else (r.astype(np.float64) * s["scale"]).astype(np.float32)
                    acc = torch.from_numpy(r) if acc is None else acc + torch.from_numpy(r)
                outputs[out_name] = acc
            logits = outputs["logits"].mean(dim=0).numpy() if "logits" in outputs else None
            spikes = outputs.get("spikes")  # tokens (T, B, D, N) -> (T, B, N, D); per-neuron vectors (T, B, F) stay
            spikes = None if spikes is None else (spikes.transpose(-1, -2) if spikes.dim() == 4 else spikes).numpy()
        info = {**self.info, **meta, "steps": timesteps + int(self.plan["depth"]), "outputs": {k: v.numpy() for k, v in outputs.items()}}
        return RunResult(logits=logits, spikes=spikes, seconds=t.seconds, info=info)


    def _run_standard(self, x: np.ndarray) -> RunResult:
        """The standard plan: the samples streamed one after another; sample ``b``'s frame ``j`` is
        read from each sink at index ``b*T + j + latency``, plus the term's host-side bias."""
        timesteps, batch = int(x.shape[0]), int(x.shape[1])
        with Timer() as t:
            records, meta = self.worker.run(self.plan, x, self.timeout_s)
            classes = [str(c) for c in records.pop("__classes__")]
            idx = (np.arange(batch)[None, :] * timesteps + np.arange(timesteps)[:, None])  # (T, B)
            outputs = {}
            for out_name, terms in self.plan["outputs"].items():
                acc = None
                for term in terms:  # in edge order
                    r = records[term["sink"]][:, idx + int(term["latency"])]          # (size, T, B)
                    r = np.moveaxis(r, 0, -1).astype(np.float64)
                    if term.get("scale") is not None:  # fixed point: a readout's integer sums
                        r = r * float(term["scale"])
                    if term["bias"] is not None:
                        r = r + np.asarray(term["bias"], np.float64)
                    acc = r if acc is None else acc + r
                outputs[out_name] = acc.reshape(timesteps, batch, *self.plan["shapes"][out_name]).astype(np.float32)
            logits = outputs["logits"].mean(axis=0) if "logits" in outputs else None
            spikes = outputs.get("spikes")  # tokens (T, B, D, N) -> (T, B, N, D); per-neuron vectors (T, B, F) stay
            spikes = None if spikes is None else (np.swapaxes(spikes, -1, -2) if spikes.ndim == 4 else spikes)
        built = {c.split("=")[0]: int(c.split("=")[1]) for c in classes if not c.startswith("model:")}
        info = {**self.info, **meta, "steps": batch * timesteps + int(self.plan["depth"]), "outputs": outputs,
                "lava_processes_built": built, "lava_models": sorted(c[len("model:"):] for c in classes if c.startswith("model:"))}
        return RunResult(logits=logits, spikes=spikes, seconds=t.seconds, info=info)


_OURS = {"synapse": "Synapse", "dendrite": "Dendrite", "delay": "Delay", "stall": "Stall"}


def _simulation_only(plan: dict) -> list[str]:
    """The exact lowering's processes of ours (``stdeploy.targets.lava.processes``), which exist
    only in simulation: ``{class: count}`` as sorted ``"class x count"`` strings."""
    counts: dict[str, int] = {}
    for spec in plan["procs"]:
        name = _OURS.get(spec["kind"])
        if spec["kind"] == "lif" and spec["params"].get("per_neuron"):
            name = "LIFPerNeuron"
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return [f"stdeploy.targets.lava.processes.{k} x {v}" for k, v in sorted(counts.items())]


@functools.lru_cache(maxsize=2)
def _standard_plan_of(path: str, mtime_ns: int, size: int, attention: str = "product"):
    """The standard plan of the NIR file at ``path`` (cached per file version and attention
    lowering: the exact lowering's report needs it too), or the :class:`LavaUnsupported` that
    refuses it."""
    try:
        return lower_standard(nir.read(path), attention=attention)
    except LavaUnsupported as err:
        return err


def resources_of(path: Path, limits: dict | None, attention: str = "product") -> dict:
    """The Loihi 2 resource report (:mod:`.resources`) of ``model.nir`` at ``path`` as lowered to
    Lava's standard processes (Spikformer attention as ``attention``), as a dict; ``{"error": ...}``
    where that lowering refuses the graph."""
    st = Path(path).stat()
    plan = _standard_plan_of(str(path), st.st_mtime_ns, st.st_size, attention)
    if isinstance(plan, LavaUnsupported):
        return {"error": str(plan)}
    return resource_report(plan, limits).to_dict()


@functools.lru_cache(maxsize=1)
def lava_import_check() -> tuple[bool, str]:
    """Import lava in a subprocess (importing it here would set multiprocessing's start method)."""
    code = ("import lava.magma.core.run_configs, lava.proc.lif.process, lava.proc.io.source; "
            "from importlib.metadata import version; print(version('lava-nc'))")
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=worker_env())
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"cannot check lava: {err}"
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["import failed"])[-1]
        return False, f"lava cannot be imported ({last}); install it: {INSTALL_HINT}"
    return True, f"lava-nc {res.stdout.strip()} (Loihi2SimCfg, CPU simulation)"


def attention_lowering(profile: DeviceProfile) -> str:
    """The profile's ``[lava] attention`` (default ``"product"``), checked against
    :data:`.attention.ATTENTION_LOWERINGS`; another value is a :class:`TargetError` naming the key
    and the profile file."""
    value = (profile.lava or {}).get("attention", "product")
    if not isinstance(value, str) or value not in ATTENTION_LOWERINGS:
        raise TargetError(f"{profile.path or profile.name}: [lava] attention must be one of "
                          f"{', '.join(repr(a) for a in ATTENTION_LOWERINGS)}, got {value!r}")
    return value


class LavaTarget:
    name = "lava"
    default_device = "loihi2"
    # floating mode: spikes bit-exact, logits within float32 rounding of the host-side mean over T;
    # fixed mode: at least this fraction of output spikes equal to float mode (measured 0.94 with
    # 8-bit weights on sdt-tiny, 0.90 with per-neuron sLIF; see the module docstring and the tests)
    tolerance = {"spike_mismatches": 0, "logits_atol": 1e-5, "fixed_spike_agreement": 0.89}

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("lava") is None:
            return False, f"lava-nc is not installed; {INSTALL_HINT}"
        return lava_import_check()

    def compile(self, export_dir: Path, profile: DeviceProfile, *, timeout_s: float | None = None, lif_model: str = "float32",
                stall_s: float = 0.0, record: bool = False, lowering: str | None = None, **options) -> LavaRunnable:
        """Lower ``model.nir`` of ``export_dir`` for ``profile`` (``[lava] mode``, ``weight_bits``,
        ``timeout_s``; ``[limits]`` for the core-mapping report). ``lif_model="lava"`` runs float
        LIFs with Lava's own float64 model instead of ours (to measure it); ``stall_s`` adds a
        process that sleeps that long in every step (a testing aid for the timeout path)."""
        if options:
            raise TargetError(f"lava: unknown compile option(s) {sorted(options)}; known: timeout_s, lif_model, stall_s, record, lowering")
        path, _ = read_manifest(export_dir, "nir")
        try:
            graph = nir.read(str(path))
        except Exception as err:  # nir/h5py raise many types for a bad file
            raise TargetError(f"{path}: cannot read the NIR graph: {type(err).__name__}: {err}") from err
        lava = dict(profile.lava or {})
        mode = str(lava.get("mode", "floating"))
        bits = int(lava.get("weight_bits", 8))
        timeout = float(timeout_s if timeout_s is not None else lava.get("timeout_s", DEFAULT_TIMEOUT_S))
        if not timeout > 0:
            raise TargetError(f"lava: timeout_s must be > 0, got {timeout}")
        lowering = str(lowering if lowering is not None else lava.get("lowering", "exact"))
        if lowering not in LOWERINGS:
            raise TargetError(f"lava: lowering must be one of {LOWERINGS}, got {lowering!r} ([lava] lowering in the profile)")
        attention = attention_lowering(profile)
        unproven = lava.get("unproven", "refuse")
        if not isinstance(unproven, str) or unproven not in UNPROVEN:
            raise TargetError(f"{profile.path or profile.name}: [lava] unproven must be one of "
                              f"{', '.join(repr(u) for u in UNPROVEN)}, got {unproven!r}")
        if lowering == "standard":
            return self._compile_standard(graph, path, profile, mode, timeout, stall_s=stall_s, record=record,
                                          attention=attention)
        plan = lower(graph, mode, weight_bits=bits, lif_model=lif_model, stall_s=stall_s, record=record, unproven=unproven)
        kinds: dict[str, int] = {}
        for spec in plan["procs"]:
            kinds[spec["kind"]] = kinds.get(spec["kind"], 0) + 1
        info = {
            "target": "lava", "file": str(path), "mode": mode, "weight_bits": bits if mode == "fixed" else None,
            "run_config": "Loihi2SimCfg" + (" (fixed point: PyLifModelBitAcc + integer synapses)" if mode == "fixed" else
                                            f" (float32: {'PyLifModelFloat' if lif_model == 'lava' else 'PyLifModelFloat32'})"),
            "depth": int(plan["depth"]), "processes": kinds, "timeout_s": timeout,
            "simulation_only": _simulation_only(plan), "lowering": "exact",
            "mapping": mapping_report(graph, plan["shapes"], profile.limits),
            "resources": resources_of(path, profile.limits, attention),
        }
        if mode == "fixed":
            info["quantisation"] = plan["quant"]
            info["unproven"] = unproven
            if plan.get("input_contract") is not None:  # an exact graph: the input grid this target runs on
                info["input_contract"] = plan["input_contract"]
        return LavaRunnable(plan=plan, in_shape=tuple(plan["in_shape"]), timeout_s=timeout, info=info)

    def _compile_standard(self, graph, path, profile: DeviceProfile, mode: str, timeout: float, *, stall_s: float,
                          record: bool, attention: str = "product") -> LavaRunnable:
        """``[lava] lowering = "standard"``: Lava's own processes only (:mod:`.standard`)."""
        if stall_s or record:
            raise TargetError("lava: stall_s and record are options of the exact lowering, not of lowering = 'standard'")
        bits = int((profile.lava or {}).get("weight_bits", 8))
        st = Path(path).stat()
        plan = _standard_plan_of(str(path), st.st_mtime_ns, st.st_size, attention)  # float; cached (the resource report's too)
        if isinstance(plan, LavaUnsupported):
            raise plan
        if mode != "floating":
            plan = lower_standard(plan, mode, weight_bits=bits)
        fixed = mode == "fixed"
        info = {
            "target": "lava", "file": str(path), "mode": mode, "weight_bits": bits if fixed else None, "lowering": "standard",
            "run_config": "Loihi2SimCfg (" + ("Lava's bit-accurate models: PyDenseModelBitAcc, PySparseModelBitAcc, "
                                              "PyDelaySparseModelBitAcc, PyLifResetModelBitAcc" if fixed else
                                              "Lava's float models: PyDenseModelFloat, PySparseModelFloat, PyLifResetModelFloat; "
                                              "float64") + "), batch 1, samples streamed"
                          + ("; Spikformer attention: PyProdNeuronModelFixed, PyGradedVecModelFixed (int32) fed by "
                             "PySparseModelBitAcc" if any(p["node_kind"] == "product" for p in plan["populations"]) else ""),
            "depth": int(plan["depth"]), "processes": process_classes(plan), "simulation_only": [], "timeout_s": timeout,
            "attention": attention,
            "tolerance": {"spike_agreement": SPIKE_AGREEMENT, "logits_atol": LOGITS_ATOL},
            "mapping": mapping_report(graph, plan["shapes"], profile.limits),
            "resources": resource_report(plan, profile.limits).to_dict(),
        }
        if fixed:
            info["quantisation"] = plan["quant"]
            if plan.get("input_contract") is not None:  # a loihi2 graph: its own integers and input grid, not re-quantised
                info["input_contract"] = plan["input_contract"]
        return LavaRunnable(plan=plan, in_shape=tuple(plan["in_shape"]), timeout_s=timeout, info=info)
