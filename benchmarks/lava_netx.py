"""Our NIR -> Lava lowering against lava-dl's netx on the same MLP-only spiking network.

    .venv/bin/python benchmarks/lava_netx.py [--steps 200 1000] [--seed 0] [--timeout 300]
    .venv/bin/python benchmarks/lava_netx.py --trained [--samples 100] [--repeats 3]

``--trained``: mlp-tiny trained on digits (2 epochs, seed 0, or ``--mlp-checkpoint``) exported with
``--format nir,netx``; the same stream of ``--samples`` test digits (direct encoding, the samples
back to back at batch 1, no reset between them: ``samples x T`` steps) runs through (a) our lowering
of ``model.nir`` on the ``loihi2`` (float) and ``loihi2-fixed`` profiles and (b) lava-dl netx
loading ``netx.h5`` (host encoder currents into the input block's neuron), and netx's spikes are
checked against the numpy Loihi reference (``stdeploy.export.netx_export.loihi_reference``, exact
expected). Then the whole sdt-tiny (trained the same way, or ``--sdt-checkpoint``) on our lowering
at batch 1 (float; netx cannot hold attention). Reported: steps/s (median of ``--repeats`` runs of
``lava_steps_s``, the ``RunSteps`` wall time), spike agreement of the head's spikes over the stream,
firing rates.

``--trained --loihi2``: the same mlp-tiny quantised with ``--quantize loihi2`` (no fine-tune), so
that netx holds the model's own integers in Loihi's units (:mod:`stdeploy.export.netx_export`);
netx is loaded with ``reset_interval = T`` (each layer resets at its first step of a sample: the
stream is ``samples`` separate samples), our fixed point runs the same samples as one batch
(separate samples too), and the head spikes of netx, ours and the numpy reference (with the same
resets) are compared: 0 differ is expected (same integer arithmetic). The sdt-tiny part is skipped.

The network (no attention, so lava-dl can express it): 64 spike inputs -> Dense 128 -> LIF/CUBA
-> Dense 10 -> LIF/CUBA, fixed random integer weights (seeded), batch 1, a Bernoulli spike input.

Paths, each run for S steps of input (plus the 2 steps the two synaptic layers delay by):

* ``ours float``  : the NIR graph (``nir.Input -> Affine -> LIF -> Affine -> LIF -> Output``, LIF
  with per-neuron ``tau``/``v_threshold`` arrays as our exporter writes them) lowered with
  :func:`stdeploy.targets.lava.lowering.lower` (mode ``floating``) and run by
  :class:`~stdeploy.targets.lava.target.LavaRunnable` (a Lava worker subprocess, float32 LIF,
  ``Loihi2SimCfg``). No export directory is needed: the runnable is built from the plan.
* ``ours fixed``  : the same graph lowered in our ``fixed`` mode (8-bit weights, Loihi
  bit-accurate LIF; its own membrane scaling, so not bit-identical to netx).
* ``lava-dl netx``: the same weights written as a netx HDF5 file (``layer/i/{type, shape, weight,
  neuron/{type='CUBA', iDecay, vDecay, vThMant, refDelay, gradedSpike}}``), loaded with
  ``lava.lib.dl.netx.hdf5.Network`` and run with ``io`` RingBuffer source and sink under
  ``Loihi2SimCfg(select_tag='fixed_pt')``: netx's block process models are tagged ``fixed_pt``
  only, so netx runs Loihi's bit-accurate integer LIF (``PyLifModelBitAcc``) and ``Dense``.

Equivalence. netx CUBA with ``iDecay = 4096`` (full current decay: ``u = a_in << 6``) and
``vDecay = dv`` computes ``v = trunc(v * (4096 - dv) / 4096) + (W s << 6)``, spike ``v > vThMant
<< 6``, reset 0. Our lowering of NIR's LIF (``r = 1``, ``v_leak = v_reset = 0``) computes ``v = v
(1 - d) + d (W s)`` in float32 with ``d = dt/tau``, spike ``v > v_threshold``, reset 0. With
``tau = 4096/dv``, NIR weights ``W / d`` and ``v_threshold = vThMant`` the two are the same real
recursion (``v`` in units of one integer weight); they differ only in rounding: netx truncates the
decayed membrane towards zero at 1/64 of a unit, we round in float32. ``d = 1/8`` here (``dv =
512``) so ``d * (W/d)`` is exact in float32. A spike can differ only where the membrane lands
within that rounding of the threshold, after which the trajectories part. The script also
simulates both arithmetics in numpy (float32 and Loihi integers) to show that each Lava path
matches its own arithmetic exactly, so any disagreement between the paths is that rounding.
Note: our exporter lowers ``v_threshold`` by one float32 ulp to express ``v >= theta``; here the
threshold is ``vThMant`` itself, Loihi's strict ``v > vth``.

Timing: ``build s`` = everything before the steps (our path: ``lower()`` plus process creation and
``create_runtime`` in the worker; netx: ``Network(...)``, source, sink and ``create_runtime``);
``run s`` = the wall time of ``run(RunSteps(S + 2))`` only; ``steps/s`` = (S + 2) / run s; each is
the median of ``--repeats`` runs (ours on one kept worker after a warm-up; netx a fresh child
process per run); ``whole call s`` is one run end to end (ours: ``LavaRunnable.run``; netx: the
child process, lava import included). Each
Lava run is bounded by ``--timeout`` and its runtime is stopped in ``finally`` (our worker does
that itself; the netx run lives in a child process of this script, in its own process group,
which is ended on timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_IN, N_HID, N_OUT = 64, 128, 10
DV = 512                      # Loihi 12-bit voltage decay: d = 512/4096 = 1/8
D = DV / 4096.0
VTH = (300, 250)              # vThMant of the hidden and output layer (units of one integer weight)
P_IN = 0.2                    # input spike probability per step and channel
DEPTH = 2                     # two synaptic layers: outputs appear 2 steps late
REPEATS = 3                   # timings are the median of this many runs (set by --repeats)


def make_weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w1 = rng.integers(-48, 60, size=(N_HID, N_IN)).astype(np.int64)
    w2 = rng.integers(-64, 72, size=(N_OUT, N_HID)).astype(np.int64)
    return w1, w2


def make_input(seed: int, steps: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    return (rng.random((steps, 1, N_IN)) < P_IN).astype(np.float32)   # (T, B=1, 64)


# ----------------------------------------------------------------------------- NIR graph, our path
def nir_graph(w1: np.ndarray, w2: np.ndarray):
    import nir

    def lif(n: int, vth: float):
        return nir.LIF(tau=np.full(n, 1.0 / D), r=np.ones(n, np.float32), v_leak=np.zeros(n, np.float32),
                       v_threshold=np.full(n, vth, np.float32), v_reset=np.zeros(n, np.float32))

    nodes = {
        "input": nir.Input(input_type=np.array([N_IN])),
        "fc1": nir.Affine(weight=(w1 / D).astype(np.float32), bias=np.zeros(N_HID, np.float32)),
        "lif1": lif(N_HID, VTH[0]),
        "fc2": nir.Affine(weight=(w2 / D).astype(np.float32), bias=np.zeros(N_OUT, np.float32)),
        "lif2": lif(N_OUT, VTH[1]),
        "out": nir.Output(output_type=np.array([N_OUT])),
    }
    edges = [("input", "fc1"), ("fc1", "lif1"), ("lif1", "fc2"), ("fc2", "lif2"), ("lif2", "out")]
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata={"dt": 1.0})


def ours(graph, mode: str, xs: dict[int, np.ndarray], timeout_s: float) -> dict[int, dict]:
    """Lower once, then run each input on one kept worker (a short warm-up run starts it)."""
    from stdeploy.targets.lava.lowering import lower
    from stdeploy.targets.lava.target import LavaRunnable

    t0 = time.perf_counter()
    plan = lower(graph, mode, weight_bits=8)
    lower_s = time.perf_counter() - t0
    runnable = LavaRunnable(plan=plan, in_shape=tuple(plan["in_shape"]), timeout_s=timeout_s, info={})
    results = {}
    try:
        runnable.run(np.zeros((5, 1, N_IN), np.float32))  # starts the worker (imports lava once)
        for steps, x in xs.items():
            runs = []
            for _ in range(REPEATS):
                res = runnable.run(x)
                info = res.info
                spikes = np.asarray(info["outputs"]["out"])[:, 0, :]      # (T, 10), aligned by the runnable
                build = lower_s + info["lava_seconds"] - info["lava_steps_s"]
                runs.append({"build_s": build, "run_s": info["lava_steps_s"], "sim_steps": info["steps"],
                             "call_s": res.seconds, "spikes": spikes})
            results[steps] = _median(runs)
    finally:
        runnable.close()
    return results


# ----------------------------------------------------------------------------- netx
def write_netx_h5(path: Path, w1: np.ndarray, w2: np.ndarray) -> None:
    """The layout slayer's ``export_hdf5`` writes and ``netx.hdf5.Network`` reads."""
    import h5py

    def string(group, key, value):
        group.create_dataset(key, (1,), "S10", [value.encode("ascii")])

    def cuba(group, vth):
        neuron = group.create_group("neuron")
        string(neuron, "type", "CUBA")
        neuron.create_dataset("iDecay", data=4096)       # du = iDecay - 1 = 4095 (+ ds_offset 1): u = a_in
        neuron.create_dataset("vDecay", data=DV)
        neuron.create_dataset("vThMant", data=int(vth))
        neuron.create_dataset("refDelay", data=1)
        neuron.create_dataset("gradedSpike", data=False)

    with h5py.File(path, "w") as f:
        layers = f.create_group("layer")
        g = layers.create_group("0")
        string(g, "type", "input")
        g.create_dataset("shape", data=np.array([N_IN]))
        for i, (w, vth) in enumerate(((w1, VTH[0]), (w2, VTH[1])), start=1):
            g = layers.create_group(str(i))
            string(g, "type", "dense")
            g.create_dataset("shape", data=np.array([w.shape[0]]))
            g.create_dataset("weight", data=w.astype(np.float64))
            cuba(g, vth)


def netx_child(h5: str, x_path: str, out_path: str) -> int:
    """Runs in a child process (own process group): build, run, read, always stop."""
    from lava.lib.dl.netx import hdf5
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg
    from lava.proc.io.sink import RingBuffer as Sink
    from lava.proc.io.source import RingBuffer as Source

    def terminate(signum, frame):  # from the parent on timeout: unwind so that `finally: net.stop()` runs
        raise SystemExit(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    x = np.load(x_path)                                       # (T, 1, 64)
    timesteps = x.shape[0]
    steps = timesteps + DEPTH
    data = np.zeros((N_IN, steps), np.int32)
    data[:, :timesteps] = x[:, 0, :].T
    t0 = time.perf_counter()
    net = hdf5.Network(net_config=h5)
    source = Source(data=data)
    sink = Sink(shape=net.out.shape, buffer=steps)
    source.s_out.connect(net.inp)
    net.out.connect(sink.a_in)
    started = False
    try:
        net.create_runtime(run_cfg=Loihi2SimCfg(select_tag="fixed_pt"))
        started = True
        t1 = time.perf_counter()
        net.run(condition=RunSteps(num_steps=steps))
        t2 = time.perf_counter()
        out = sink.data.get()                                 # (10, steps)
        t3 = time.perf_counter()
    finally:
        if started:
            net.stop()
    np.savez(out_path, spikes=out[:, DEPTH:DEPTH + timesteps].T, timing=np.array([t1 - t0, t2 - t1, t3 - t2, steps]),
             table=np.array(str(net)))
    return 0


def _median(runs: list[dict]) -> dict:
    """Median of each timing over the repeats; the spikes of the first run (every run must give the same)."""
    for r in runs[1:]:
        if not np.array_equal(r["spikes"], runs[0]["spikes"]):
            raise RuntimeError("repeated runs gave different spikes")
    out = dict(runs[0])
    for k in ("build_s", "run_s", "call_s", "read_s"):
        if k in out:
            out[k] = float(np.median([r[k] for r in runs]))
    return out


def netx(h5: Path, xs: dict[int, np.ndarray], workdir: Path, timeout_s: float) -> dict[int, dict]:
    results = {}
    for steps, x in xs.items():
        results[steps] = _median([_netx_once(h5, steps, x, workdir, timeout_s) for _ in range(REPEATS)])
    return results


def _netx_once(h5: Path, steps: int, x: np.ndarray, workdir: Path, timeout_s: float) -> dict:
    x_path, out_path = workdir / f"x{steps}.npy", workdir / f"netx{steps}.npz"
    np.save(x_path, x)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--netx-child", str(h5), str(x_path), str(out_path)],
                            start_new_session=True, env=env)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if proc.poll() is None or rc is None:
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):  # SIGTERM: the child unwinds into stop()
                try:
                    os.killpg(proc.pid, sig)              # the child's own group: it and the Lava processes it forked
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            proc.wait()
    if rc is None:
        raise TimeoutError(f"netx run of {steps} steps exceeded {timeout_s} s; its process group was killed")
    if rc != 0:
        raise RuntimeError(f"netx child failed with exit status {rc}")
    z = np.load(out_path)
    build_s, run_s, read_s, sim_steps = z["timing"]
    return {"build_s": float(build_s), "run_s": float(run_s), "read_s": float(read_s), "sim_steps": int(sim_steps),
            "call_s": time.perf_counter() - t0, "spikes": z["spikes"].astype(np.float32), "table": str(z["table"])}


# ----------------------------------------------------------------------------- numpy references of both arithmetics
def sim_float32(w1, w2, x) -> np.ndarray:
    """Our lowering's arithmetic: a = float32(d) * (float32(W/d) @ s), v = v*(1-d) + a (float32)."""
    d = np.float32(D)
    ws = [(w1 / D).astype(np.float32), (w2 / D).astype(np.float32)]
    vs = [np.zeros(N_HID, np.float32), np.zeros(N_OUT, np.float32)]
    out = []
    for s in x[:, 0, :].astype(np.float32):
        for i, (w, vth) in enumerate(zip(ws, VTH)):
            a = d * (w @ s)
            vs[i] = vs[i] * (np.float32(1) - d) + a
            spk = vs[i] > np.float32(vth)
            vs[i][spk] = 0
            s = spk.astype(np.float32)
        out.append(s)
    return np.array(out)


def sim_loihi(w1, w2, x) -> np.ndarray:
    """netx's arithmetic: integer a = W s, u = a << 6, v = sign(v) (|v (4096 - dv)| >> 12) + u, spike v > vth << 6."""
    ws = [w1, w2]
    vs = [np.zeros(N_HID, np.int64), np.zeros(N_OUT, np.int64)]
    out = []
    for s in x[:, 0, :].astype(np.int64):
        for i, (w, vth) in enumerate(zip(ws, VTH)):
            u = (w @ s) << 6
            dec = vs[i] * (4096 - DV)
            vs[i] = np.sign(dec) * (np.abs(dec) >> 12) + u
            spk = vs[i] > (vth << 6)
            vs[i][spk] = 0
            s = spk.astype(np.int64)
        out.append(s)
    return np.array(out, np.float32)


def agreement(a: np.ndarray, b: np.ndarray) -> str:
    same = float((a == b).mean())
    return f"{same:.4f} of (step, neuron) entries equal, {int((a != b).sum())} differ; counts {a.sum(0).astype(int).tolist()} vs {b.sum(0).astype(int).tolist()}"


# ----------------------------------------------------------------------------- trained models (--trained)
def netx_stream_child(h5: str, data_path: str, out_path: str, reset_interval: str | None = None) -> int:
    """Child process: netx from the file, host currents into the input block's neuron, run, read, stop."""
    from lava.lib.dl.netx import hdf5
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg
    from lava.proc.io.sink import RingBuffer as Sink
    from lava.proc.io.source import RingBuffer as Source

    def terminate(signum, frame):
        raise SystemExit(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    data = np.load(data_path)
    steps = data.shape[-1]
    t0 = time.perf_counter()
    net = hdf5.Network(net_config=h5, reset_interval=int(reset_interval) if reset_interval else None)
    source = Source(data=data)
    sink = Sink(shape=net.out.shape, buffer=steps)
    source.s_out.connect(net.layers[0].neuron.a_in)  # lava-dl 0.6's Input block leaves its inp unconnected
    net.out.connect(sink.a_in)
    started = False
    try:
        net.create_runtime(run_cfg=Loihi2SimCfg(select_tag="fixed_pt"))
        started = True
        t1 = time.perf_counter()
        net.run(condition=RunSteps(num_steps=steps))
        t2 = time.perf_counter()
        out = sink.data.get()
        t3 = time.perf_counter()
    finally:
        if started:
            net.stop()
    np.savez(out_path, spikes=np.moveaxis(out, -1, 0), timing=np.array([t1 - t0, t2 - t1, t3 - t2, steps]), table=np.array(str(net)))
    return 0


def _child(args: list[str], timeout_s: float) -> None:
    proc = subprocess.Popen([sys.executable, __file__, *args], start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        rc = None
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        proc.wait()
    if rc is None:
        raise TimeoutError(f"netx run exceeded {timeout_s} s; its process group was ended")
    if rc != 0:
        raise RuntimeError(f"netx child failed with exit status {rc}")


def _trained(preset: str, checkpoint: str | None, data):
    import torch

    from stdeploy.checkpoint import load_checkpoint
    from stdeploy.models import build_model
    from stdeploy.train import TrainConfig, train

    if checkpoint:
        return load_checkpoint(checkpoint).model.eval(), f"checkpoint {checkpoint}"
    torch.manual_seed(0)
    model = build_model(preset)
    train(model, data, TrainConfig(epochs=2, batch_size=16, lr=5e-3), None, progress=False)
    return model.eval(), "trained here: digits, 2 epochs, batch 16, lr 5e-3, seed 0"


def _ours_stream(export_dir: Path, profile: str, x: np.ndarray, timeout_s: float) -> dict:
    """Our lowering of ``model.nir`` on ``profile`` at batch 1; median timings of REPEATS runs on one worker."""
    from stdeploy.targets.base import get_target
    from stdeploy.targets.profiles import load_profile

    runnable = get_target("lava").compile(export_dir, load_profile(profile), timeout_s=timeout_s)
    runs = []
    try:
        runnable.run(x[:2])  # starts the worker (imports lava once)
        for _ in range(REPEATS):
            res = runnable.run(x)
            info = res.info
            runs.append({"build_s": info["lava_seconds"] - info["lava_steps_s"], "run_s": info["lava_steps_s"],
                         "sim_steps": info["steps"], "call_s": res.seconds, "spikes": res.spikes})
    finally:
        runnable.close()
    return _median(runs)


def trained_main(args) -> int:
    import torch

    from stdeploy.data import load_dataset
    from stdeploy.export.directory import export_model
    from stdeploy.export.netx_export import host_currents, loihi_reference, model_spikes, netx_input_data, read_netx

    torch.set_num_threads(1)
    data = load_dataset("digits", seed=0)
    n = min(args.samples, len(data.test))
    images = torch.stack([data.test[i][0] for i in range(n)])               # (n, C, H, W)
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="lava-netx-trained-") as tmp:
        tmp = Path(tmp)
        mlp, how = _trained("mlp-tiny", args.mlp_checkpoint, data)
        if args.loihi2:
            from stdeploy.models.quantize import to_exact

            mlp, how = to_exact(mlp, mode="loihi2").eval(), how + "; quantised in the loihi2 mode (no fine-tune)"
        manifest = export_model(mlp, tmp / "mlp", ("nir", "netx"), data=data, samples=64)
        t = mlp.cfg.timesteps
        x = images.unsqueeze(0).expand(t, *images.shape).transpose(0, 1).reshape(n * t, 1, *images.shape[1:])  # (n*T, 1, C, H, W)
        xs = x.numpy().astype(np.float32)
        net = read_netx(tmp / "mlp" / "netx.h5")
        cur = host_currents(net, x)                                         # (n*T, 1, *shape)
        steps = n * t + net.depth
        np.save(tmp / "data.npy", netx_input_data(cur[:, 0], steps))
        runs = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            _child(["--netx-stream-child", str(tmp / "mlp" / "netx.h5"), str(tmp / "data.npy"), str(tmp / "out.npz")]
                   + ([str(t)] if args.loihi2 else []), args.timeout)
            z = np.load(tmp / "out.npz")
            build_s, run_s, read_s, sim = z["timing"]
            runs.append({"build_s": float(build_s), "run_s": float(run_s), "read_s": float(read_s), "sim_steps": int(sim),
                         "call_s": time.perf_counter() - t0, "spikes": z["spikes"].astype(np.float32)})
        table = str(z["table"])
        res = {"lava-dl netx (fixed_pt)": _median(runs)}
        ref = loihi_reference(net, cur, steps=steps, reset_interval=t if args.loihi2 else None)
        netx_raw = res["lava-dl netx (fixed_pt)"]["spikes"]
        netx_spk = model_spikes(net, netx_raw[:, None].astype(np.uint8)).numpy()        # (n*T, 1, N, D)
        if args.loihi2:  # separate samples: ours as one batch of n, reordered into the stream's (n*T, 1, N, D)
            name = f"ours fixed (loihi2-fixed), batch {n}"
            xb = xs.reshape(n, t, *xs.shape[2:]).transpose(1, 0, *range(2, xs.ndim))  # (T, n, C, H, W)
            res[name] = _ours_stream(tmp / "mlp", "loihi2-fixed", np.ascontiguousarray(xb), args.timeout)
            sp = res[name]["spikes"]
            res[name]["spikes"] = sp.reshape(t, n, -1).transpose(1, 0, 2).reshape(n * t, 1, 1, -1)
        for name, profile in (() if args.loihi2 else (("ours float (loihi2)", "loihi2"), ("ours fixed (loihi2-fixed)", "loihi2-fixed"))):
            res[name] = _ours_stream(tmp / "mlp", profile, xs, args.timeout)
        notes.append(f"mlp-tiny ({how}); export validation (64 test digits): {json.dumps({k: manifest['validation']['netx'][k] for k in ('spike_agreement', 'accuracy', 'firing_rates')})}; "
                     f"reference accuracy {manifest['validation']['reference_accuracy']}")
        notes.append(f"stream: {n} test digits x T={t} = {n * t} steps at batch 1 (+{net.depth} pipeline step(s) for netx); "
                     f"input: analog pixels, mean {float(images.mean()):.3f}; netx layers' firing rates over the stream "
                     f"{ {l.name: round(float(r[k:k + n * t].mean()), 4) for k, (l, r) in enumerate(zip(net.layers, ref))} }")
        notes.append(f"netx (Lava) vs numpy Loihi integer reference, last layer over the stream: "
                     f"{agreement_short(netx_raw, ref[-1][:, 0].astype(np.float32))}")
        for name in [k for k in res if k.startswith("ours")]:
            notes.append(f"head spikes, {name} vs netx: {agreement_short(res[name]['spikes'].reshape(n * t, -1), netx_spk.reshape(n * t, -1))}")
        for name, r in res.items():
            rows.append(("mlp-tiny", name, r["sim_steps"], r["build_s"], r["run_s"], r["sim_steps"] / r["run_s"], int(r["spikes"].sum()), r["call_s"]))

        if args.loihi2:
            return _print_trained(table, rows, notes)
        sdt, how = _trained("sdt-tiny", args.sdt_checkpoint, data)
        manifest = export_model(sdt, tmp / "sdt", ("nir",), data=data, samples=64)
        r = _ours_stream(tmp / "sdt", "loihi2", xs, args.timeout)
        rows.append(("sdt-tiny", "ours float (loihi2)", r["sim_steps"], r["build_s"], r["run_s"], r["sim_steps"] / r["run_s"], int(r["spikes"].sum()), r["call_s"]))
        act = manifest["validation"]["activity"]
        notes.append(f"sdt-tiny ({how}), reference accuracy {manifest['validation']['reference_accuracy']}; firing rates on 64 test digits "
                     f"{ {k: round(v, 4) for k, v in act['firing_rates'].items()} }; head spike rate over the stream {float(r['spikes'].mean()):.4f}")

    return _print_trained(table, rows, notes)


def _print_trained(table: str, rows: list, notes: list) -> int:
    print("netx network (mlp-tiny):\n" + table)
    print("\n| model | path | Lava steps | build s | run s | steps/s | output spikes | whole call s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model, name, st, b, rr, sps, nsp, c in rows:
        print(f"| {model} | {name} | {st} | {b:.2f} | {rr:.3f} | {sps:.0f} | {nsp} | {c:.2f} |")
    print()
    for line in notes:
        print("- " + line)
    return 0


def agreement_short(a: np.ndarray, b: np.ndarray) -> str:
    return f"{float((a == b).mean()):.4f} of (step, neuron) entries equal, {int((a != b).sum())} differ; spikes {int(a.sum())} vs {int(b.sum())}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--netx-child"]:
        return netx_child(*argv[1:4])
    if argv[:1] == ["--netx-stream-child"]:
        return netx_stream_child(*argv[1:5])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per Lava run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per path and S; timings are their median")
    ap.add_argument("--no-fixed", action="store_true", help="skip our fixed-point lowering")
    ap.add_argument("--trained", action="store_true", help="trained mlp-tiny (netx export) vs our lowering, and sdt-tiny at batch 1")
    ap.add_argument("--samples", type=int, default=100, help="--trained: test digits in the batch-1 stream")
    ap.add_argument("--mlp-checkpoint", default=None, help="--trained: use this mlp-tiny checkpoint instead of training")
    ap.add_argument("--sdt-checkpoint", default=None, help="--trained: use this sdt-tiny checkpoint instead of training")
    ap.add_argument("--loihi2", action="store_true", help="--trained: mlp-tiny in the loihi2 mode; netx against our fixed point, exact")
    args = ap.parse_args(argv)
    global REPEATS
    REPEATS = max(1, args.repeats)
    if args.trained:
        return trained_main(args)

    import torch

    from stdeploy.export.nir_interpreter import run_nir

    w1, w2 = make_weights(args.seed)
    xs = {s: make_input(args.seed, s) for s in args.steps}
    graph = nir_graph(w1, w2)
    rows, checks = [], []
    with tempfile.TemporaryDirectory(prefix="lava-netx-") as tmp:
        tmp = Path(tmp)
        h5 = tmp / "mlp.net"
        write_netx_h5(h5, w1, w2)
        res = {"ours float": ours(graph, "floating", xs, args.timeout)}
        if not args.no_fixed:
            res["ours fixed (8-bit)"] = ours(graph, "fixed", xs, args.timeout)
        res["lava-dl netx (fixed_pt)"] = netx(h5, xs, tmp, args.timeout)
    print("netx network:\n" + next(iter(res["lava-dl netx (fixed_pt)"].values()))["table"])

    for steps, x in xs.items():
        ref_nir = run_nir(graph, torch.from_numpy(x))["out"][:, 0, :].numpy()
        ref_f32, ref_int = sim_float32(w1, w2, x), sim_loihi(w1, w2, x)
        ours_f, netx_r = res["ours float"][steps]["spikes"], res["lava-dl netx (fixed_pt)"][steps]["spikes"]
        checks.append(f"S={steps}: ours float vs NIR reference interpreter: {agreement(ours_f, ref_nir)}")
        checks.append(f"S={steps}: ours float vs numpy float32 recursion: {agreement(ours_f, ref_f32)}")
        checks.append(f"S={steps}: netx vs numpy Loihi-integer recursion: {agreement(netx_r, ref_int)}")
        checks.append(f"S={steps}: ours float vs netx: {agreement(ours_f, netx_r)}")
        if "ours fixed (8-bit)" in res:
            checks.append(f"S={steps}: ours fixed vs netx: {agreement(res['ours fixed (8-bit)'][steps]['spikes'], netx_r)}")
        checks.append(f"S={steps}: input spike rate {x.mean():.3f}; output spikes per step (netx) {netx_r.sum() / steps:.2f}")
        for name, r in res.items():
            rr = r[steps]
            rows.append((name, steps, rr["build_s"], rr["run_s"], rr["sim_steps"] / rr["run_s"], int(rr["spikes"].sum()), rr["call_s"]))

    print(f"\nMLP {N_IN} -> {N_HID} -> {N_OUT}, LIF/CUBA (du=1, dv={DV}/4096, vth={VTH}), batch 1, seed {args.seed}; "
          f"S input steps + {DEPTH} pipeline steps; Loihi2SimCfg (CPU)\n")
    print("| path | S | build s | run s | steps/s | output spikes | whole call s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, steps, b, r, sps, n, c in rows:
        print(f"| {name} | {steps} | {b:.2f} | {r:.3f} | {sps:.0f} | {n} | {c:.2f} |")
    print()
    for line in checks:
        print("- " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
