"""The Lava side of the ``lava`` target: our processes and process models, and the worker that
builds a lowered plan (:func:`stdeploy.targets.lava.lowering.lower`) as Lava processes and runs it
on ``Loihi2SimCfg`` (:func:`run_plan`, :func:`serve`).

This module imports lava (which sets ``multiprocessing``'s start method to ``fork`` at import):
only the worker subprocess that :class:`stdeploy.targets.lava.worker.LavaWorker` starts imports
it, never the caller. Every process model is bound to its process instance through the run
config's ``exception_proc_model_map``, so Lava never scans directories for models.

Processes
---------
Lava's own, with their own models where they match (see :mod:`.lowering` for the choices):

* ``lava.proc.io.source.RingBuffer`` (input), ``lava.proc.io.sink.RingBuffer`` (outputs, with
  Lava's model plus a save of the buffer to a file on the last step: :func:`sink_model`);
* ``lava.proc.lif.process.LIF`` for every population whose ``du``, ``dv`` and ``vth`` are uniform
  (Lava's LIF takes scalars only): NIR ``LIF`` nodes and NIR ``Threshold`` nodes (a LIF with
  ``du = dv = 1`` is ``v = a_in``, spike ``v > vth``: memoryless). Float mode runs it with
  :class:`PyLifModelFloat32` (Lava's LIF equations in float32), fixed mode with Lava's
  ``PyLifModelBitAcc``.

Ours, where Lava has nothing that fits:

* :class:`LIFPerNeuron`: Lava's LIF dynamics with per-neuron ``du``, ``dv``, ``vth`` arrays
  (sLIF neurons, per-channel thresholds);
* :class:`Synapse`: one NIR synaptic node (Conv2d, Conv1d, Linear, Affine, SumPool2d, or a
  one-to-one scale) on a population with a leading batch dimension. Like Lava's ``Dense`` it
  sends the activation computed on the *previous* step (one step of synaptic delay), and it
  computes only while its input carries data (``start <= t < start + T``), sending zeros
  otherwise, so biases never leak into the pipeline's fill steps;
* :class:`Dendrite`: the ordered float32 sum of several inputs, times a per-neuron scale
  (``dt/tau``), with no delay: the input stage of a float-mode LIF whose input is a sum of
  terms (Lava sums the connections into one InPort in an unspecified order, which changes
  float32 sums; here every term has its own port, summed in NIR edge order);
* :class:`Delay`: a delay line with taps, aligning paths of different synaptic depth;
* :class:`Stall`: sleeps in every step (a testing aid for the timeout path).

Every multi-input process has one InPort per term (``in0``, ``in1``, ...); its model class is made
per number of ports by :func:`model_class`.

:func:`run_standard_plan` builds a standard plan (:mod:`.standard`) from Lava's processes and
models only (``Dense``, ``Sparse``, ``DelaySparse``, ``LIFReset``, the RingBuffers; float or
bit-accurate models; ``ProdNeuron`` and ``GradedVec`` with their fixed-point models for Spikformer
attention, fed by bit-accurate ``Sparse``), none of the above; :func:`serve` picks it by the plan's
``lowering``.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import signal
import sys
import time
import traceback
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F

from lava.magma.core.decorator import implements, requires
from lava.magma.core.model.py.model import PyLoihiProcessModel
from lava.magma.core.model.py.ports import PyInPort, PyOutPort
from lava.magma.core.model.py.type import LavaPyType
from lava.magma.core.process.ports.ports import InPort, OutPort
from lava.magma.core.process.process import AbstractProcess
from lava.magma.core.process.variable import Var
from lava.magma.core.resources import CPU
from lava.magma.core.sync.protocols.loihi_protocol import LoihiProtocol
from lava.proc.lif.models import AbstractPyLifModelFixed, PyLifModelBitAcc, PyLifModelFloat
from lava.proc.lif.process import LIF

from ...export import nir_interpreter as ref
from ...models.quantize import InputContract
from .plan import MODEL_FAILED

__all__ = ["Synapse", "Dendrite", "Delay", "Stall", "LIFPerNeuron", "PyLifModelFloat32", "PyLifModelBitAccGuarded",
           "PyLifPerNeuronBitAccGuarded", "model_class", "sink_model", "clear_sinks", "read_sinks", "run_plan",
           "run_standard_plan", "terminate", "serve", "main"]


# ----------------------------------------------------------------------------- processes
class _Ported(AbstractProcess):
    """A process with ``n_in`` InPorts ``in0..`` of ``in_shape`` and ``n_out`` OutPorts ``out0..``."""

    def __init__(self, *, in_shape: tuple, out_shape: tuple, n_in: int, n_out: int = 1, name: str | None = None, **params):
        super().__init__(in_shape=in_shape, out_shape=out_shape, n_in=n_in, n_out=n_out, name=name, **params)
        for i in range(n_in):
            setattr(self, f"in{i}", InPort(shape=in_shape))
        for i in range(n_out):
            setattr(self, f"out{i}", OutPort(shape=out_shape))


class Synapse(_Ported):
    """One synaptic layer (params: ``op``, ``start``, ``steps``, ...), one step of delay."""


class Dendrite(_Ported):
    """Ordered float32 sum of the inputs times ``scale``; no delay."""


class Delay(_Ported):
    """Delay line: ``out{j}`` sends the input of ``taps[j]`` steps ago (zeros before)."""


class Stall(AbstractProcess):
    """Receives from the input and sleeps ``seconds`` in every step (tests the timeout path)."""

    def __init__(self, *, shape: tuple, seconds: float, name: str | None = None):
        super().__init__(shape=shape, seconds=seconds, name=name)
        self.in0 = InPort(shape=shape)


class LIFPerNeuron(AbstractProcess):
    """Lava's LIF (``u = u*(1-du) + a_in; v = v*(1-dv) + u + bias; s = v > vth; v[s] = 0``) with
    per-neuron ``du``, ``dv`` and ``vth`` (arrays of ``shape``); Lava's LIF takes scalars."""

    def __init__(self, *, shape: tuple, du, dv, vth, bias=0, name: str | None = None):
        super().__init__(shape=shape, name=name)
        full = lambda a: np.ascontiguousarray(np.broadcast_to(np.asarray(a), shape))  # noqa: E731
        self.a_in = InPort(shape=shape)
        self.s_out = OutPort(shape=shape)
        self.u = Var(shape=shape, init=np.zeros(shape))
        self.v = Var(shape=shape, init=np.zeros(shape))
        self.du = Var(shape=shape, init=full(du))
        self.dv = Var(shape=shape, init=full(dv))
        self.vth = Var(shape=shape, init=full(vth))
        self.bias_mant = Var(shape=shape, init=full(bias))
        self.bias_exp = Var(shape=shape, init=np.zeros(shape))


# ----------------------------------------------------------------------------- models: helpers
F32 = np.float32


def _reported(run_spk):
    """Print a failing step's traceback at once, after :data:`~.plan.MODEL_FAILED`, in one
    write: a Lava runtime whose model raised may hang in ``stop()`` before it shows the error, and
    :class:`~.worker.LavaWorker` ends the run as soon as that line appears in the worker's log."""

    @functools.wraps(run_spk)
    def wrapped(self):
        try:
            run_spk(self)
        except BaseException:
            sys.stderr.write(MODEL_FAILED.format(type(self).__name__, self.time_step) + "\n" + traceback.format_exc())
            sys.stderr.flush()
            raise

    return wrapped


def _gated(model) -> bool:
    """True in the steps where a synapse's input carries data: ``start <= t < start + steps``."""
    t = model.time_step - 1
    return model.first_step <= t < model.first_step + model.active_steps


def _recv_sum_f32(model) -> np.ndarray:
    """The inputs ``in0, in1, ...`` summed in port order, in float32 (NIR edge order)."""
    acc = None
    for i in range(model.proc_params["n_in"]):
        x = getattr(model, f"in{i}").recv().astype(F32, copy=False)
        acc = x.copy() if acc is None else acc + x
    return acc


def _recv_sum_int(model) -> np.ndarray:
    acc = None
    for i in range(model.proc_params["n_in"]):
        x = getattr(model, f"in{i}").recv().astype(np.int64, copy=False)
        acc = x.copy() if acc is None else acc + x
    return acc


class _Base(PyLoihiProcessModel):
    def __init__(self, proc_params):
        super().__init__(proc_params)
        torch.set_num_threads(1)
        self.p = proc_params
        self.first_step = int(proc_params.get("start", 0))  # (not `start`: the model's run loop)
        self.active_steps = int(proc_params.get("steps", 0))

    def _send_all(self, data: np.ndarray) -> None:
        for i in range(self.proc_params["n_out"]):
            getattr(self, f"out{i}").send(data)


# ----------------------------------------------------------------------------- synapse models
class _SynapseBase(_Base):
    """One step of delay, as Lava's Dense: send last step's result, then receive and compute the
    next one (zeros outside the model's T valid steps). Subclasses define ``_receive`` and ``_compute``."""

    @_reported
    def run_spk(self):
        self._send_all(self.buff)
        x = self._receive()
        self.buff = self._compute(x) if _gated(self) else self.zeros


class _SynapseFloat(_SynapseBase):
    """Float32, the reference interpreter's own evaluator for the node, on a batch padded to the
    reference's call shape (``T*B`` rows: CPU kernels choose algorithms by batch size, and only the
    same call gives the same bits), then the optional per-neuron scale ``d * y``."""

    def __init__(self, proc_params):
        super().__init__(proc_params)
        self.node = proc_params["node"]
        self.evaluate = ref.EVALUATORS[type(self.node)]
        self.rows = int(proc_params["ref_batch"])
        self.ctx = ref.EvalContext(1, self.rows, float(proc_params.get("dt", 1.0)), torch.device("cpu"))
        scale = proc_params.get("scale")
        self.scale = None if scale is None else torch.as_tensor(np.asarray(scale, F32))
        self.zeros = np.zeros(proc_params["out_shape"], F32)
        self.buff = self.zeros

    def _receive(self) -> np.ndarray:
        return _recv_sum_f32(self)

    def _compute(self, x: np.ndarray) -> np.ndarray:
        b = x.shape[0]
        xt = torch.from_numpy(x)
        if self.rows > b:
            xt = torch.cat([xt, xt.new_zeros((self.rows - b, *xt.shape[1:]))])
        with torch.no_grad():
            y = self.evaluate(self.node, xt, self.ctx)[:b]
            if self.scale is not None:
                y = self.scale * y
        return np.ascontiguousarray(y.numpy(), dtype=F32)


def int_op(op: dict, x: torch.Tensor) -> torch.Tensor:
    """A synaptic node on integer-valued float64 tensors (exact: every partial sum < 2**53)."""
    y = _int_op(op, x)
    post = op.get("post")
    return y if post is None else torch.as_tensor(np.asarray(post, np.float64)) * y


def _int_op(op: dict, x: torch.Tensor) -> torch.Tensor:
    kind = op["op"]
    w = op.get("weight")
    wt = None if w is None else torch.as_tensor(np.asarray(w, np.float64))
    if kind == "conv2d":
        return F.conv2d(x, wt, None, op["stride"], op["padding"], op["dilation"], op["groups"])
    if kind == "conv1d":
        return F.conv1d(x, wt, None, op["stride"], op["padding"], op["dilation"], op["groups"])
    if kind == "linear":
        if wt.dim() == 2:
            return F.linear(x, wt)
        return torch.matmul(wt, x.unsqueeze(-1)).squeeze(-1)
    if kind == "sumpool2d":
        return F.avg_pool2d(x, op["kernel_size"], op["stride"], op["padding"], count_include_pad=True, divisor_override=1)
    if kind == "scale":
        return wt * x
    raise ValueError(f"unknown synaptic op {kind!r}")


class _SynapseFixed(_SynapseBase):
    """Integer weights (``weight_bits`` mantissas), accumulation exact, then Loihi's per-layer
    weight exponent (``<< e``, or an arithmetic ``>> -e`` as Lava's Dense does) and an integer
    bias, in the target's input units. Output int32."""

    def __init__(self, proc_params):
        super().__init__(proc_params)
        self.op = proc_params["op_spec"]
        self.exp = int(proc_params.get("exp", 0))
        bias = proc_params.get("bias")
        self.bias = None if bias is None else np.asarray(bias, np.int64)
        self.zeros = np.zeros(proc_params["out_shape"], np.int32)
        self.buff = self.zeros

    def _receive(self) -> np.ndarray:
        return _recv_sum_int(self)

    def _compute(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            y = int_op(self.op, torch.from_numpy(x.astype(np.float64))).numpy()
        y = np.rint(y).astype(np.int64)
        y = np.left_shift(y, self.exp) if self.exp >= 0 else np.right_shift(y, -self.exp)
        if self.bias is not None:
            y = y + self.bias
        if np.abs(y).max(initial=0) >= 2 ** 31:
            raise OverflowError(f"{self.p.get('name')}: synaptic input overflows int32")
        return y.astype(np.int32)


# ----------------------------------------------------------------------------- other models
class _DendriteFloat(_Base):
    def __init__(self, proc_params):
        super().__init__(proc_params)
        self.scale = np.asarray(proc_params["scale"], F32)

    @_reported
    def run_spk(self):
        self._send_all(self.scale * _recv_sum_f32(self))


class _DelayBase(_Base):
    """The last ``max(taps) + 1`` inputs; an all-zero step is kept as one shared zeros array (a
    line holds data for ``T`` steps of its ``T + depth``: the exact ``sdt-8-512``'s residual stream
    waits up to 55 steps, 4 MB a step at batch 32 on each of its lines)."""
    dtype = F32

    def __init__(self, proc_params):
        super().__init__(proc_params)
        self.taps = [int(t) for t in proc_params["taps"]]
        self.zeros = np.zeros(proc_params["in_shape"], self.dtype)
        self.hist = deque([self.zeros] * (max(self.taps) + 1), maxlen=max(self.taps) + 1)

    @_reported
    def run_spk(self):
        x = self.in0.recv().astype(self.dtype)
        self.hist.appendleft(x if x.any() else self.zeros)
        for j, tap in enumerate(self.taps):
            getattr(self, f"out{j}").send(self.hist[tap])


class _DelayFixed(_DelayBase):
    dtype = np.int32


@implements(proc=Stall, protocol=LoihiProtocol)
@requires(CPU)
class PyStallModel(PyLoihiProcessModel):
    in0: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)

    @_reported
    def run_spk(self):
        self.in0.recv()
        time.sleep(float(self.proc_params["seconds"]))


@implements(proc=LIF, protocol=LoihiProtocol)
@requires(CPU)
class PyLifModelFloat32(PyLoihiProcessModel):
    """Lava's LIF equations exactly as ``PyLifModelFloat`` writes them, in float32 (Lava's float
    model computes in float64, which rounds membranes differently from PyTorch's float32):
    ``u = u*(1-du) + a_in; v = v*(1-dv) + u + bias; s = v > vth; v[s] = 0``."""

    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.float32)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.float32)
    u: np.ndarray = LavaPyType(np.ndarray, np.float32)
    v: np.ndarray = LavaPyType(np.ndarray, np.float32)
    bias_mant: np.ndarray = LavaPyType(np.ndarray, np.float32)
    bias_exp: np.ndarray = LavaPyType(np.ndarray, np.float32)
    du: float = LavaPyType(float, float)
    dv: float = LavaPyType(float, float)
    vth: float = LavaPyType(float, float)

    @_reported
    def run_spk(self):
        a = self.a_in.recv().astype(F32, copy=False)
        du, dv, vth = (F32(np.asarray(p).reshape(-1)[0]) for p in (self.du, self.dv, self.vth))  # scalars, exact in float32
        one = F32(1)
        u = self.u.astype(F32, copy=False) * (one - du) + a
        v = self.v.astype(F32, copy=False) * (one - dv) + u + self.bias_mant.astype(F32, copy=False)
        s = v > vth
        v[s] = 0
        self.u[:] = u
        self.v[:] = v
        self.s_out.send(s.astype(F32))


@implements(proc=LIFPerNeuron, protocol=LoihiProtocol)
@requires(CPU)
class PyLifPerNeuronFloat32(PyLoihiProcessModel):
    """:class:`PyLifModelFloat32` with per-neuron ``du``, ``dv``, ``vth``."""

    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.float32)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.float32)
    u: np.ndarray = LavaPyType(np.ndarray, np.float32)
    v: np.ndarray = LavaPyType(np.ndarray, np.float32)
    du: np.ndarray = LavaPyType(np.ndarray, np.float32)
    dv: np.ndarray = LavaPyType(np.ndarray, np.float32)
    vth: np.ndarray = LavaPyType(np.ndarray, np.float32)
    bias_mant: np.ndarray = LavaPyType(np.ndarray, np.float32)
    bias_exp: np.ndarray = LavaPyType(np.ndarray, np.float32)

    @_reported
    def run_spk(self):
        a = self.a_in.recv().astype(F32, copy=False)
        one = F32(1)
        u = self.u.astype(F32, copy=False) * (one - self.du.astype(F32, copy=False)) + a
        v = self.v.astype(F32, copy=False) * (one - self.dv.astype(F32, copy=False)) + u + self.bias_mant.astype(F32, copy=False)
        s = v > self.vth.astype(F32, copy=False)
        v[s] = 0
        self.u[:] = u
        self.v[:] = v
        self.s_out.send(s.astype(F32))


@implements(proc=LIFPerNeuron, protocol=LoihiProtocol)
@requires(CPU)
class PyLifPerNeuronBitAcc(AbstractPyLifModelFixed):
    """Lava's bit-accurate LIF arithmetic (``PyLifModelBitAcc``) with per-neuron ``du``, ``dv``, ``vth``."""

    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int32, precision=24)
    du: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=12)
    dv: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=12)
    vth: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=17)

    def scale_threshold(self):
        self.effective_vth = np.left_shift(self.vth, self.vth_shift)
        self.isthrscaled = True

    def spiking_activation(self):
        return self.v > self.effective_vth


class _WrapGuard:
    """Lava's bit-accurate LIF step, stopped where it would leave the exact arithmetic: before
    Lava's ``subthr_dynamics`` runs, the same integers are computed without wrapping, and a ``u``
    outside Lava's 24-bit range (where Lava wraps it) or a ``v`` below it (where Lava clips it)
    raises :class:`OverflowError` naming the population and the step. ``v`` above the range is let
    through: it is over the threshold in both arithmetics and both reset it. For populations whose
    proven range exceeds the registers (``plan["quant"][name]["proven"]`` False, lowered with
    ``unproven="guard"``): a run that completes never wrapped, so its integers are the model's."""

    def subthr_dynamics(self, activation_in: np.ndarray):
        unity, top = self.decay_unity, int(self.max_uv_val)
        decayed = np.int64(self.u) * (unity - (np.int64(self.du) + self.ds_offset))
        u = np.sign(decayed) * np.right_shift(np.abs(decayed), self.decay_shift) \
            + np.left_shift(np.asarray(activation_in, np.int64), self.act_shift)
        decayed = np.int64(self.v) * (unity - (np.int64(self.dv) + self.dm_offset))
        v = np.sign(decayed) * np.right_shift(np.abs(decayed), self.decay_shift) + u + np.int64(self.effective_bias)
        wraps, clips = bool(np.any(u > top) or np.any(u <= -top)), bool(np.any(v < -top + 1))
        if wraps or clips:
            what = f"u reaches {int(np.abs(u).max()):,}, where Lava wraps it" if wraps else \
                f"v falls to {int(v.min()):,}, where Lava clips it"
            raise OverflowError(f"lava fixed mode: {self.proc_params.get('name')}: {what} (24 bits: |u|, |v| < {top:,}) at "
                                f"step {self.time_step}: the run would no longer be exact (a population past its proven range, "
                                "lowered with unproven='guard')")
        super().subthr_dynamics(activation_in)


@implements(proc=LIF, protocol=LoihiProtocol)
@requires(CPU)
class PyLifModelBitAccGuarded(_WrapGuard, PyLifModelBitAcc):
    """Lava's ``PyLifModelBitAcc`` under :class:`_WrapGuard`."""

    run_spk = _reported(PyLifModelBitAcc.run_spk)  # the failure in the worker's log at once (the worker stops the run on it)


@implements(proc=LIFPerNeuron, protocol=LoihiProtocol)
@requires(CPU)
class PyLifPerNeuronBitAccGuarded(_WrapGuard, PyLifPerNeuronBitAcc):
    """:class:`PyLifPerNeuronBitAcc` under :class:`_WrapGuard`."""

    run_spk = _reported(PyLifPerNeuronBitAcc.run_spk)


# ----------------------------------------------------------------------------- model classes per port count
_BASES = {
    ("synapse", "float"): _SynapseFloat,
    ("synapse", "fixed"): _SynapseFixed,
    ("dendrite", "float"): _DendriteFloat,
    ("delay", "float"): _DelayBase,
    ("delay", "fixed"): _DelayFixed,
}
_PROCS = {"synapse": Synapse, "dendrite": Dendrite, "delay": Delay}
_MODELS: dict[tuple, type] = {}


def model_class(kind: str, mode: str, n_in: int, n_out: int) -> type:
    """The process model of ``kind`` in ``mode`` with ``n_in`` InPorts and ``n_out`` OutPorts.
    Made once per signature and kept as a module global (lava forks its workers, which inherit it)."""
    key = (kind, mode, n_in, n_out)
    if key not in _MODELS:
        dtype = np.float32 if mode == "float" else np.int32
        attrs = {f"in{i}": LavaPyType(PyInPort.VEC_DENSE, dtype) for i in range(n_in)}
        attrs.update({f"out{i}": LavaPyType(PyOutPort.VEC_DENSE, dtype) for i in range(n_out)})
        name = f"_{kind.title()}{mode.title()}Model_{n_in}_{n_out}"
        cls = type(name, (_BASES[(kind, mode)],), {**attrs, "__module__": __name__, "__qualname__": name})
        cls = requires(CPU)(implements(proc=_PROCS[kind], protocol=LoihiProtocol)(cls))
        globals()[name] = cls
        _MODELS[key] = cls
    return _MODELS[key]


def sink_model(base: type, path: str) -> type:
    """Lava's sink RingBuffer model (``base``) that also saves its buffer to ``path`` on the last
    step: ``Var.get`` sends an array element by element (10 s for one 32-sample run's spikes)."""

    @_reported
    def run_spk(self):
        base.run_spk(self)
        if self.time_step == self.data.shape[-1]:  # written whole, then renamed: a reader never sees part of it
            tmp = f"{self.dump_path}.part"
            with open(tmp, "wb") as f:
                np.save(f, self.data)
            os.replace(tmp, self.dump_path)

    name = f"_Dump{base.__name__}_{len(_MODELS)}"
    cls = type(name, (base,), {"dump_path": path, "run_spk": run_spk, "__module__": __name__, "__qualname__": name})
    cls = requires(CPU)(implements(proc=base.implements_process, protocol=LoihiProtocol)(cls))
    globals()[name] = cls
    _MODELS[("sink", path)] = cls
    return cls


def clear_sinks(dumps: dict[str, str]) -> None:
    """Remove the files the sinks of a run will write (their names repeat from run to run in a
    worker's folder): a record left by an earlier run must never be read as this run's."""
    for path in dumps.values():
        for p in (path, f"{path}.part"):
            if os.path.exists(p):
                os.remove(p)


def read_sinks(dumps: dict[str, str], steps: int, limit_s: float = 10.0) -> dict[str, np.ndarray]:
    """Each sink's record once its file is there (the sink process writes it in its last step,
    which can end after ``run`` returned here): waits up to ``limit_s``, then raises naming the
    missing sink; a record of another length than ``steps`` is refused too."""
    deadline = time.monotonic() + limit_s
    while not all(os.path.exists(p) for p in dumps.values()):
        if time.monotonic() > deadline:
            missing = [n for n, p in dumps.items() if not os.path.exists(p)]
            raise RuntimeError(f"lava: the sink record of {missing[0]} was not written within {limit_s:g} s of the run's end")
        time.sleep(0.01)
    records = {name: np.load(path) for name, path in dumps.items()}
    for name, r in records.items():
        if r.shape[-1] != steps:
            raise RuntimeError(f"lava: the sink record of {name} holds {r.shape[-1]} steps, the run had {steps}")
    return records


# ----------------------------------------------------------------------------- the worker
# Slots of each channel's shared-memory queue (Lava's default: 64). Under LoihiProtocol every port
# sends one message a step and its reader takes it within the same step (the runtime advances no
# process to the next step before every process has finished this one), so a queue never holds
# more than one. The exact sdt-8-512's 380 connections carry 58 MB a sample a slot: with 64 slots
# 6.2 GB PSS at batch 1 and 10.2 GB at batch 2.
CHANNEL_SLOTS = 1
def _batched(shape) -> tuple:
    return tuple(int(s) for s in shape)


def run_plan(plan: dict, x: np.ndarray, workdir: str) -> dict[str, np.ndarray]:
    """Build ``plan`` (from :func:`stdeploy.targets.lava.lowering.lower`) as Lava processes for the
    input ``x`` ``(T, B, *input shape)``, run ``T + depth`` steps on ``Loihi2SimCfg`` and return
    each sink's record ``(B, *shape, steps)`` (saved by the sinks into ``workdir``). The runtime is
    always stopped."""
    import os
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg
    from lava.proc.io.sink import PyReceiveModelFixed, PyReceiveModelFloat
    from lava.proc.io.sink import RingBuffer as Sink
    from lava.proc.io.source import PySendModelFixed, PySendModelFloat
    from lava.proc.io.source import RingBuffer as Source

    mode = plan["mode"]
    timesteps, batch = int(x.shape[0]), int(x.shape[1])
    steps = timesteps + int(plan["depth"])
    procs: dict[str, tuple[AbstractProcess, str]] = {}  # name -> (process, how its OutPorts are named)
    models: dict[AbstractProcess, type] = {}
    sinks: dict[str, AbstractProcess] = {}
    dumps: dict[str, str] = {}

    def out_port(conn: dict):
        proc, kind = procs[conn["src"]]
        port = getattr(proc, "s_out") if kind == "s_out" else getattr(proc, f"out{conn.get('tap', 0)}")
        if conn.get("reshape") is not None:
            port = port.reshape((batch, *conn["reshape"]))
        return port

    for spec in plan["procs"]:
        name, kind, shape = spec["name"], spec["kind"], _batched(spec["shape"])
        full = (batch, *shape)
        if kind == "source":
            data = np.zeros((*full, steps), np.float64)
            data[..., :timesteps] = np.moveaxis(x, 0, -1)
            for lo, hi, inv in (spec.get("contracts") or []) if mode == "fixed" else []:
                # an exact graph: the export's input contract, then the grid this target runs (fixed_point.fit_input_contract)
                data[..., :timesteps] = InputContract(lo, hi, round(math.log2(inv))).apply(data[..., :timesteps])
            if mode == "fixed":
                data = np.rint(data * spec["inv_scale"]).astype(np.int32)
            proc = Source(data=data)
            models[proc] = PySendModelFloat if mode == "float" else PySendModelFixed
            procs[name] = (proc, "s_out")
            continue
        if kind == "sink":
            proc = Sink(shape=full, buffer=steps)
            dumps[name] = os.path.join(workdir, f"sink{len(dumps)}.npy")
            models[proc] = sink_model(PyReceiveModelFloat if mode == "float" else PyReceiveModelFixed, dumps[name])
            for conn in spec["inputs"]:
                out_port(conn).connect(proc.a_in)
            sinks[name] = proc
            continue
        if kind == "lif":
            p = spec["params"]
            guarded = (plan.get("quant") or {}).get(name, {}).get("proven") is False  # fixed_point.lower_fixed(unproven="guard")
            if p["per_neuron"]:
                proc = LIFPerNeuron(shape=full, du=p["du"], dv=p["dv"], vth=p["vth"], bias=p.get("bias", 0), name=name)
                models[proc] = PyLifPerNeuronFloat32 if mode == "float" else \
                    PyLifPerNeuronBitAccGuarded if guarded else PyLifPerNeuronBitAcc
            else:
                proc = LIF(shape=full, du=p["du"], dv=p["dv"], vth=p["vth"], bias_mant=p.get("bias", 0), name=name)
                if mode == "fixed":
                    models[proc] = PyLifModelBitAccGuarded if guarded else PyLifModelBitAcc
                else:
                    models[proc] = PyLifModelFloat if plan.get("lif_model") == "lava" else PyLifModelFloat32
            for conn in spec["inputs"]:  # several only where the sum is exact in any order
                out_port(conn).connect(proc.a_in)
            procs[name] = (proc, "s_out")
            continue
        if kind == "stall":
            conn = spec["inputs"][0]
            proc = Stall(shape=(batch, *procs[conn["src"]][0].s_out.shape[1:]), seconds=spec["params"]["seconds"], name=name)
            models[proc] = PyStallModel
            out_port(conn).connect(proc.in0)
            continue
        in_shape = _batched(spec.get("in_shape", spec["shape"]))
        params = dict(spec["params"])
        n_out = len(params.get("taps", [0]))
        if kind == "synapse":
            params.update(steps=timesteps, ref_batch=timesteps * batch)
        proc = _PROCS[kind](in_shape=(batch, *in_shape), out_shape=full, n_in=len(spec["inputs"]), n_out=n_out, name=name, **params)
        models[proc] = model_class(kind, mode, len(spec["inputs"]), n_out)
        for i, conn in enumerate(spec["inputs"]):
            out_port(conn).connect(getattr(proc, f"in{i}"))
        procs[name] = (proc, "out")

    anchor = next(iter(sinks.values()))
    timing = {}
    clear_sinks(dumps)
    try:
        t0 = time.perf_counter()
        anchor.create_runtime(run_cfg=Loihi2SimCfg(exception_proc_model_map=models),
                              compile_config={"pypy_channel_size": CHANNEL_SLOTS})
        t1 = time.perf_counter()
        anchor.run(condition=RunSteps(num_steps=steps))
        t2 = time.perf_counter()
        records = read_sinks(dumps, steps)
        timing = {"compile_start_s": t1 - t0, "steps_s": t2 - t1, "steps": steps}
    finally:
        _stop(anchor)
    records["__timing__"] = np.array([timing["compile_start_s"], timing["steps_s"], timing["steps"]], np.float64)
    return records


def run_standard_plan(plan: dict, x: np.ndarray, workdir: str) -> dict[str, np.ndarray]:
    """Build a standard plan (:func:`stdeploy.targets.lava.standard.lower_standard`) from Lava's own
    processes and float models only, stream the ``B`` samples of ``x`` ``(T, B, *input shape)`` one
    after another through it (``B*T + depth`` steps on ``Loihi2SimCfg``) and return each sink's
    record ``(size, steps)``, plus ``__classes__``: the module and class of every process built and
    of its model (the sinks' models are Lava's ``PyReceiveModelFloat`` plus a save of the buffer)."""
    from scipy.sparse import csr_matrix

    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg
    from lava.proc.dense import models as dense_models
    from lava.proc.dense.process import DelayDense, Dense
    from lava.proc.graded.models import PyGradedVecModelFixed
    from lava.proc.graded.process import GradedVec
    from lava.proc.io.sink import PyReceiveModelFixed, PyReceiveModelFloat
    from lava.proc.io.sink import RingBuffer as Sink
    from lava.proc.io.source import PySendModelFixed, PySendModelFloat
    from lava.proc.io.source import RingBuffer as Source
    from lava.proc.lif.models import PyLifResetModelBitAcc, PyLifResetModelFloat
    from lava.proc.lif.process import LIFReset
    from lava.proc.prodneuron.models import PyProdNeuronModelFixed
    from lava.proc.prodneuron.process import ProdNeuron
    from lava.proc.sparse import models as sparse_models
    from lava.proc.sparse.process import DelaySparse, Sparse

    fixed = plan["mode"] == "fixed"
    kind = "BitAcc" if fixed else "Float"  # Lava's bit-accurate or float models
    dtype = np.int64 if fixed else np.float64
    timesteps, batch = int(x.shape[0]), int(x.shape[1])
    steps = batch * timesteps + int(plan["depth"])
    models: dict[AbstractProcess, type] = {}
    data = np.zeros((int(plan["in_size"]), steps), np.float64)
    # sample b's frame j at index b*T + j: the samples streamed back to back
    data[:, :batch * timesteps] = np.asarray(x, np.float64).transpose(1, 0, *range(2, x.ndim)).reshape(batch * timesteps, -1).T
    if fixed and plan.get("input_contract"):  # a loihi2 graph: its own input grid and range, as loihi2-fixed applies it
        data[:, :batch * timesteps] = InputContract.from_dict(plan["input_contract"]).apply(data[:, :batch * timesteps])
    if fixed:
        data = np.rint(data * plan["input_scale"]).astype(np.int32)
    source = Source(data=data)
    models[source] = PySendModelFixed if fixed else PySendModelFloat
    outs: dict[str, OutPort] = {plan["input"]: source.s_out}
    pops: dict[str, AbstractProcess] = {}
    for p in plan["populations"]:
        if p["node_kind"] in ("product", "graded"):  # Spikformer attention (.attention): Lava ships fixed-point models only
            proc = (ProdNeuron if p["node_kind"] == "product" else GradedVec)(shape=(p["size"],), vth=0, exp=0)
            models[proc] = PyProdNeuronModelFixed if p["node_kind"] == "product" else PyGradedVecModelFixed
            pops[p["name"]] = proc
            outs[p["name"]] = proc.s_out
            continue
        bias = dict(bias_mant=np.asarray(p["bias_mant"], np.int32), bias_exp=np.asarray(p["bias_exp"], np.int32)) if fixed else \
            dict(bias_mant=np.asarray(p["bias"], np.float64))
        proc = LIFReset(shape=(p["size"],), du=p["du"], dv=p["dv"], vth=p["vth"], **bias,
                        reset_interval=timesteps, reset_offset=(1 + int(p["latency"])) % timesteps, name=p["name"])
        models[proc] = PyLifResetModelBitAcc if fixed else PyLifResetModelFloat
        pops[p["name"]] = proc
        outs[p["name"]] = proc.s_out
    syn_out: dict[str, OutPort] = {}
    for s in plan["synapses"]:
        m = s["matrix"]
        # synapses into product/graded neurons (Spikformer attention) deliver integer counts: Lava's
        # bit-accurate models in both modes (weights 1, weight_exp 0), as the neurons' fixed models need
        s_fixed = fixed or bool(s.get("integer"))
        s_kind, s_dtype = ("BitAcc", np.int64) if s_fixed else (kind, dtype)
        if m["format"] == "sparse":
            w = csr_matrix((np.asarray(m["values"], s_dtype), (m["rows"], m["cols"])), shape=tuple(m["shape"]))
        else:
            w = np.asarray(m["values"], s_dtype)
        params = {"num_message_bits": 24 if s["graded"] or s.get("message_bits") else 0}
        if s_fixed:
            params.update(weight_exp=int(s.get("weight_exp", 0)), num_weight_bits=8)
        if s["delay"] > 0:
            if m["format"] == "sparse":
                delays = csr_matrix((np.full(len(m["rows"]), int(s["delay"]), dtype=int), (m["rows"], m["cols"])),
                                    shape=tuple(m["shape"]))
                proc = DelaySparse(weights=w, delays=delays, **params)
                models[proc] = getattr(sparse_models, f"PyDelaySparseModel{s_kind}")
            else:
                proc = DelayDense(weights=w, delays=np.full(w.shape, int(s["delay"]), dtype=int), **params)
                models[proc] = getattr(dense_models, f"PyDelayDenseModel{s_kind}")
        elif m["format"] == "sparse":
            proc = Sparse(weights=w, **params)
            models[proc] = getattr(sparse_models, f"PySparseModel{s_kind}")
        else:
            proc = Dense(weights=w, **params)
            models[proc] = getattr(dense_models, f"PyDenseModel{s_kind}")
        outs[s["src"]].connect(proc.s_in)
        if s["dst"] in pops:
            proc.a_out.connect(getattr(pops[s["dst"]], s.get("port", "a_in")))
        else:
            syn_out[s["name"]] = proc.a_out
    dumps: dict[str, str] = {}
    sinks = []
    for out_name, terms in plan["outputs"].items():
        for t in terms:
            sink = Sink(shape=(int(t["size"]),), buffer=steps)
            dumps[t["sink"]] = os.path.join(workdir, f"sink{len(dumps)}.npy")
            models[sink] = sink_model(PyReceiveModelFixed if fixed else PyReceiveModelFloat, dumps[t["sink"]])
            (syn_out[t["synapse"]] if t["synapse"] is not None else outs[t["src"]]).connect(sink.a_in)
            sinks.append(sink)
    classes = sorted({f"{type(p).__module__}.{type(p).__name__}" for p in models}
                     | {f"model:{(m.__mro__[1] if m.__name__.startswith('_Dump') else m).__module__}."
                        f"{(m.__mro__[1] if m.__name__.startswith('_Dump') else m).__name__}" for m in models.values()})
    anchor = sinks[0]
    clear_sinks(dumps)
    try:
        t0 = time.perf_counter()
        anchor.create_runtime(run_cfg=Loihi2SimCfg(exception_proc_model_map=models))
        t1 = time.perf_counter()
        anchor.run(condition=RunSteps(num_steps=steps))
        t2 = time.perf_counter()
        records = read_sinks(dumps, steps)
    finally:
        _stop(anchor)
    counts: dict[str, int] = {}
    for proc in models:
        key = f"{type(proc).__module__}.{type(proc).__name__}"
        counts[key] = counts.get(key, 0) + 1
    records["__classes__"] = np.array([f"{k}={v}" for k, v in sorted(counts.items())] + [c for c in classes if c.startswith("model:")])
    records["__timing__"] = np.array([t1 - t0, t2 - t1, steps], np.float64)
    return records


def _stop(proc: AbstractProcess, limit_s: float = 5.0) -> None:
    """``proc.stop()``, which can hang after a process model failed: give it ``limit_s``, then
    leave the rest to the parent, which ends the whole process group."""
    import threading

    worker = threading.Thread(target=proc.stop, daemon=True)
    worker.start()
    worker.join(limit_s)
    if worker.is_alive():
        print(f"lava: stop() did not return within {limit_s:g} s", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(3)


def terminate(signum, frame):
    """SIGTERM handler of a Lava subprocess: raise ``SystemExit`` so that the run unwinds into its
    ``finally: stop()`` (the parent's SIGTERM at its timeout)."""
    raise SystemExit(f"terminated by signal {signum}")


def _watch_parent(interval_s: float = 1.0) -> None:
    """End this worker's whole process group (its Lava processes included) if the parent dies."""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def serve(status_fd: int) -> int:
    """Answer requests (JSON lines on stdin naming ``plan``, ``x``, ``dir`` and ``out`` files) until
    stdin closes, one JSON line per request on ``status_fd``. Exits after a failed run, so that
    the next run gets a fresh process."""
    import json

    signal.signal(signal.SIGTERM, terminate)
    torch.set_num_threads(1)
    _watch_parent()
    status = os.fdopen(status_fd, "wb", buffering=0)
    plans: dict[str, dict] = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            if req["plan"] not in plans:
                with open(req["plan"], "rb") as f:
                    plans[req["plan"]] = pickle.load(f)
            x = np.load(req["x"])
            t0 = time.perf_counter()
            plan = plans[req["plan"]]
            records = (run_standard_plan if plan.get("lowering") == "standard" else run_plan)(plan, x, req["dir"])
            records["__lava_seconds__"] = np.float64(time.perf_counter() - t0)
            np.savez(req["out"], **records)
        except BaseException:
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            status.write(json.dumps({"ok": False}).encode() + b"\n")
            return 1
        status.write(json.dumps({"ok": True}).encode() + b"\n")
    return 0


def main(argv: list[str]) -> int:
    """``python -m stdeploy.targets.lava.processes --serve FD``: the worker of :class:`~.worker.LavaWorker`."""
    if len(argv) != 2 or argv[0] != "--serve":
        print("usage: python -m stdeploy.targets.lava.processes --serve STATUS_FD", file=sys.stderr)
        return 2
    return serve(int(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
