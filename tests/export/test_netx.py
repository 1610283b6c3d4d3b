"""``export --format netx``: lava-dl's netx loads the file and runs it spike for spike as Loihi's
integer equations say (``stdeploy.export.netx_export.loihi_reference``, numpy, written from the
documented CUBA equations, not from Lava's code).

Lava runs in a child process (own process group, timeout, ``stop()`` in ``finally``): lava-nc sets
the multiprocessing start method at import, which fails once anything in the test process set it.
Every layer's spikes are read from Lava (a sink on each block's ``out``) and must equal the
reference exactly: integer arithmetic on both sides, so no tolerance. Against PyTorch (float) the
8-bit export is measured, not exact (``MIN_TORCH_AGREEMENT``: weight rounding and Loihi's
truncating decay move a few spikes; measured 0.97-0.996 on mlp-tiny and conv-tiny).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from stdeploy.checkpoint import save_checkpoint
from stdeploy.errors import ConfigError, UnsupportedPrimitive
from stdeploy.export.directory import export_model
from stdeploy.export.manifest import read_manifest
from stdeploy.export.validate import logits_and_spikes
from stdeploy.export.netx_export import (NetxLayer, NetxNetwork, host_currents, loihi_reference, model_spikes,
                                         netx_input_data, read_netx, to_netx, write_netx)
from stdeploy.models import build_model, direct_encode
from stdeploy.models.fold import fold_batchnorm
from stdeploy.neurons import SLIF, to_slif
from stdeploy.train import TrainConfig, train

MIN_TORCH_AGREEMENT = 0.95   # 8-bit integer export vs the float model's head spikes (measured 0.97-0.996)
LAVA_TIMEOUT_S = 240

# Runs in the child: argv = job.json; each job {h5, data (npy, (*netx shape, steps)), out (npz)}
CHILD = textwrap.dedent("""
    import json, signal, sys
    import numpy as np
    from lava.lib.dl.netx import hdf5
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg
    from lava.proc.io.sink import RingBuffer as Sink
    from lava.proc.io.source import RingBuffer as Source

    def stop(signum, frame):
        raise SystemExit(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    for job in json.load(open(sys.argv[1])):
        data = np.load(job["data"])
        steps = data.shape[-1]
        net = hdf5.Network(net_config=job["h5"], reset_interval=job.get("reset_interval"))
        source = Source(data=data)
        source.s_out.connect(net.layers[0].neuron.a_in)  # lava-dl 0.6's Input block leaves inp unconnected
        sinks = [Sink(shape=layer.out.shape, buffer=steps) for layer in net.layers]
        for layer, sink in zip(net.layers, sinks):
            layer.out.connect(sink.a_in)
        started = False
        try:
            net.create_runtime(run_cfg=Loihi2SimCfg(select_tag="fixed_pt"))
            started = True
            net.run(condition=RunSteps(num_steps=steps))
            out = {str(k): s.data.get() for k, s in enumerate(sinks)}
        finally:
            if started:
                net.stop()
        np.savez(job["out"], **out)
""")


def run_netx_in_lava(jobs: list[dict], tmp_path) -> list[list[np.ndarray]]:
    """Each job's every layer spikes ``(steps, *our shape)`` from lava-dl netx on Loihi2SimCfg."""
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(spec)], start_new_session=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=LAVA_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pytest.fail(f"netx in Lava exceeded {LAVA_TIMEOUT_S} s; its process group was ended")
    assert proc.returncode == 0, output[-3000:]
    results = []
    for job in jobs:
        z = np.load(job["out"])
        layers = []
        for k in range(len(z.files)):
            s = np.moveaxis(z[str(k)], -1, 0)                          # (steps, *netx shape (W, H, C) or (n,))
            layers.append(s.transpose(0, *range(s.ndim - 1, 0, -1)).astype(np.uint8))  # -> (steps, C, H, W)
        results.append(layers)
    return results


def stream(currents: np.ndarray, depth: int) -> np.ndarray:
    """Samples back to back as one batch-1 stream ``(N*T + depth, 1, *shape)`` (zeros at the end)."""
    t, n = currents.shape[:2]
    s = np.zeros((n * t + depth, 1, *currents.shape[2:]), np.int64)
    s[:n * t, 0] = currents.transpose(1, 0, *range(2, currents.ndim)).reshape(n * t, *currents.shape[2:])
    return s


def loihi2_netx_against_our_lava(model, data, tmp_path):
    """``(job, check)`` for a loihi2-quantised copy of the trained ``model``: ``check(layers)``
    asserts 0 differing spikes at the head between lava-dl netx (the job: 8 test digits back to
    back, ``reset_interval = T``), our Lava fixed-point run (profile ``loihi2-fixed``, Lava's
    bit-accurate LIF in Loihi's units) and PyTorch, every layer firing."""
    from stdeploy.models.quantize import to_exact
    from stdeploy.targets.lava.target import LavaTarget
    from stdeploy.targets.profiles import load_profile

    q = to_exact(model.eval(), mode="loihi2").eval()
    manifest = export_model(q, tmp_path / "loihi2", ("nir", "netx"), data=data, samples=8)
    check = manifest["validation"]["netx"]
    assert check["exact"] and check["spike_mismatches"] == 0, check  # the file's integers, in numpy, equal PyTorch
    own = {"lo": 0.0, "hi": 1.0, "frac_bits": 4}  # the mode's default input contract, in the manifest next to the mode
    assert manifest["quantize"]["mode"] == "loihi2" and manifest["quantize"]["input_range"] == [0.0, 1.0], manifest["quantize"]
    assert manifest["quantize"]["input_frac_bits"] == 4
    assert all(0.02 < r < 0.9 for r in check["firing_rates"].values()), check
    x = direct_encode(torch.stack([data.test[i][0] for i in range(8)]), q.cfg.timesteps)  # digits: on the 2^-4 grid
    with LavaTarget().compile(tmp_path / "loihi2", load_profile("loihi2-fixed")) as runnable:
        ours = runnable.run(x.numpy()).spikes
        assert runnable.info["input_contract"] == own  # Lava keeps a loihi2 graph's own grid (no refit, no re-quantising)
    torch_spikes = logits_and_spikes(q, x)[1].numpy()
    assert np.array_equal(ours, torch_spikes.reshape(ours.shape)), "our Lava fixed point differs from PyTorch"
    net = read_netx(tmp_path / "loihi2" / "netx.h5")
    T = q.cfg.timesteps
    cur = stream(host_currents(net, x), net.depth)
    assert int(np.abs(cur).max()) < 2 ** 15  # no current clipped on the host
    np.save(tmp_path / "loihi2.npy", netx_input_data(cur[:, 0], cur.shape[0]))
    job = {"h5": str(tmp_path / "loihi2" / "netx.h5"), "data": str(tmp_path / "loihi2.npy"), "out": str(tmp_path / "loihi2.npz"),
           "reset_interval": T}

    def check_layers(layers):
        got = layers[-1][net.depth:net.depth + 8 * T].reshape(8, T, -1).transpose(1, 0, 2).reshape(ours.shape)  # (T, B, n)
        assert 0.02 < got.mean() < 0.9, got.mean()
        assert np.array_equal(got, ours), f"netx: {int((got != ours).sum())} of {got.size} spikes differ from our Lava run"

    return job, check_layers


def random_chain(seed: int = 0) -> NetxNetwork:
    """Asymmetric kernels, stride, groups, uneven padding, biases, a flatten into dense; rates 25-60%."""
    rng = np.random.default_rng(seed)
    layers = (NetxLayer("input", "input", (3, 6, 5), vth=200, v_decay=1024),
              NetxLayer("c1", "conv", (4, 6, 5), vth=600, v_decay=512, weight=rng.integers(-60, 100, (4, 3, 3, 3)),
                        bias=rng.integers(-5, 10, (4,)), padding=(1, 1)),
              NetxLayer("pool", "conv", (4, 3, 2), vth=0, v_decay=4095, weight=np.ones((4, 1, 2, 2), np.int64), stride=(2, 2), groups=4),
              NetxLayer("c2", "conv", (5, 3, 1), vth=700, v_decay=2048, weight=rng.integers(-50, 120, (5, 4, 3, 2)), padding=(1, 0)),
              NetxLayer("d", "dense", (7,), vth=300, v_decay=3000, weight=rng.integers(-40, 127, (7, 15)), bias=rng.integers(-3, 3, (7,))))
    enc = {"op": "linear", "weight": np.zeros((90, 1), np.float32), "bias": np.zeros(90, np.float32)}
    return NetxNetwork(layers=layers, encoder=enc, readout=None, part="stem")


@pytest.mark.lava
def test_netx_runs_in_lava_spike_exact(digits_subset, tmp_path, one_thread):
    """A trained mlp-tiny exported with ``--format netx`` (the file listed in the sealed manifest)
    and a random conv chain: lava-dl netx equals the Loihi integer reference at every layer. The
    same mlp-tiny quantised with ``--quantize loihi2``: netx equals our Lava fixed-point run, which
    equals PyTorch (:func:`loihi2_netx_against_our_lava`)."""
    data = digits_subset(480, 16)
    torch.manual_seed(0)
    model = build_model("mlp-tiny")
    train(model, data, TrainConfig(epochs=2, batch_size=16, lr=5e-3), None, progress=False)
    manifest = export_model(model.eval(), tmp_path / "export", ("netx",), data=data, samples=16)
    path, _ = read_manifest(tmp_path / "export", "netx")  # listed, size and sha256 checked
    check = manifest["validation"]["netx"]
    assert check["spike_agreement"] >= MIN_TORCH_AGREEMENT, check
    assert check["reference_output_rate"] > 0.01, check  # PyTorch's head fires ...
    assert all(r > 0.005 for r in check["firing_rates"].values()), check  # ... and so does every netx layer

    net = read_netx(path)
    x = direct_encode(torch.stack([data.test[i][0] for i in range(8)]), model.cfg.timesteps)
    cur = stream(host_currents(net, x), net.depth)
    chain = random_chain()
    rnd = np.random.default_rng(1).integers(-100, 600, (30, 1, 3, 6, 5))
    jobs, refs = [], []
    for name, n, c in (("mlp", net, cur), ("chain", chain, rnd)):
        h5 = write_netx(n, tmp_path / f"{name}.h5") if name == "chain" else path
        np.save(tmp_path / f"{name}.npy", netx_input_data(c[:, 0], c.shape[0] + (n.depth if name == "chain" else 0)))
        jobs.append({"h5": str(h5), "data": str(tmp_path / f"{name}.npy"), "out": str(tmp_path / f"{name}.npz")})
        refs.append(loihi_reference(read_netx(h5), c, steps=c.shape[0] + (n.depth if name == "chain" else 0)))
    loihi2_job, check_loihi2 = loihi2_netx_against_our_lava(model, data, tmp_path)  # shares this training and Lava child
    lava = run_netx_in_lava(jobs + [loihi2_job], tmp_path)
    check_loihi2(lava[-1])
    for name, ref, got in zip(("mlp", "chain"), refs, lava):
        assert len(got) == len(ref)
        for k, (r, g) in enumerate(zip(ref, got)):
            assert r[:, 0].sum() >= 5, f"{name} layer {k} barely fires: the comparison would mean little"
            assert np.array_equal(g, r[:, 0]), f"{name} layer {k}: {int((g != r[:, 0]).sum())} of {r[:, 0].size} spikes differ"
    rates = [float(r.mean()) for r in refs[1]]
    assert min(rates) > 0.2 and max(rates) < 0.7, rates  # the random chain is neither silent nor saturated


def test_conv_model_chain_and_file_round_trip(tmp_path):
    """conv-tiny: encoder conv on the host, conv, OR-pool, position embedding with the identity in
    its centre tap; the file reads back to the same integers; the integer reference agrees with
    PyTorch's head spikes (untrained, threshold 0.2 so that every layer fires: measured 0.991)."""
    torch.manual_seed(0)
    model = fold_batchnorm(build_model("conv-tiny", threshold=0.2).eval())
    net = to_netx(model)
    assert [l.kind for l in net.layers] == ["input", "conv", "conv", "conv"] and net.depth == 3
    pool = net.layers[2]
    assert pool.vth == 0 and pool.groups == 32 and pool.stride == (2, 2) and np.all(pool.weight == 1)
    assert all(np.abs(l.weight).max() <= 127 for l in net.layers[1:])
    back = read_netx(write_netx(net, tmp_path / "netx.h5"))
    for a, b in zip(net.layers, back.layers):
        assert (a.kind, a.shape, a.vth, a.v_decay, a.stride, a.padding, a.groups) == (b.kind, b.shape, b.vth, b.v_decay, b.stride, b.padding, b.groups)
        assert (a.weight is None and b.weight is None) or np.array_equal(a.weight, b.weight)
    x = direct_encode(torch.rand(8, 1, 8, 8), 4)
    layers = loihi_reference(back, host_currents(back, x))
    spikes = model_spikes(back, layers[-1])
    torch_spikes = logits_and_spikes(model, x)[1]
    assert all(0.02 < float(s.mean()) < 0.5 for s in layers), [float(s.mean()) for s in layers]  # fires, not saturated
    assert float(torch_spikes.mean()) > 0.05
    assert float((spikes == torch_spikes).float().mean()) >= MIN_TORCH_AGREEMENT


def test_netx_refusals(tmp_path, capsys):
    """Attention is refused naming its module (exit 2, one line, nothing written); so are sLIF's
    per-neuron leaks and weights beyond 8 bits; ``--netx-part stem`` exports the stem instead."""
    from stdeploy.cli import main

    torch.manual_seed(0)
    sdt = build_model("sdt-tiny").eval()
    ck = tmp_path / "ck"
    save_checkpoint(ck, sdt)
    out = tmp_path / "out"
    assert main(["export", str(ck), "--format", "netx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "blocks.0.attn" in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()

    manifest = export_model(sdt, out, ("netx",), samples=4, netx_part="stem")
    art = manifest["artifacts"]["netx"]
    assert art["part"] == "stem" and [l["type"] for l in art["layers"]] == ["input", "conv", "conv"]
    assert read_netx(out / "netx.h5").readout is None and manifest["validation"]["netx"]["spikes_total"] > 0

    slif = to_slif(build_model("mlp-tiny"))
    with torch.no_grad():
        for m in slif.modules():
            if isinstance(m, SLIF):
                m.leak_log_exponent.normal_(0.0, 0.3)
    with pytest.raises(UnsupportedPrimitive, match="per-neuron leaks"):
        to_netx(fold_batchnorm(slif.eval()))
    with pytest.raises(ConfigError, match="8 signed bits"):
        NetxLayer("d", "dense", (2,), vth=10, v_decay=0, weight=np.array([[128, 0], [0, 1]]))


def test_low_rank_layer_is_multiplied_out():
    """A DSP (low-rank U·V) dense layer becomes one netx dense weight: rint(d V (U V) / theta)."""
    from stdeploy.models.structure import LowRankLinear

    torch.manual_seed(0)
    model = build_model("mlp-tiny").eval()
    fc = model.embed.fcs[1].linear
    model.embed.fcs[1].linear = LowRankLinear.from_dense(fc, rank=8)
    folded = fold_batchnorm(model)
    lr = folded.embed.fcs[1]
    assert isinstance(lr, LowRankLinear)
    dense = to_netx(folded).layers[1]
    w = (lr.u.weight.detach().double() @ lr.v.weight.detach().double()).numpy()
    d, theta = 0.5, folded.head.lif.threshold.double().numpy()
    assert np.array_equal(dense.weight, np.rint(d * dense.vth / theta[:, None] * w).astype(np.int64))
    assert np.abs(dense.weight).max() == 127  # the scale fills the 8 bits



def test_dsp_whole_model_convolutions_and_classifier_are_multiplied_out():
    """conv-tiny under DSP on the layers of the whole-model scope it has (stage 1, the position
    embedding, the classifier; the stem is left out; one-shot 50%): netx has no low-rank layer, so a factored
    convolution becomes one dense netx conv, ``rint(d V (U V) / theta)`` with ``U V`` in float64, and
    the factored classifier one dense readout; the integer reference still agrees with PyTorch."""
    from stdeploy.models.structure import LowRankConv2d, LowRankLinear
    from stdeploy.prune import PruneConfig, make_pruner

    torch.manual_seed(0)
    model = build_model("conv-tiny", threshold=0.2)
    pruner = make_pruner(PruneConfig(method="dsp", param_ratio=0.5, layers=("embed.stages.1.conv.conv", "embed.rpe.conv", "head.fc")))
    pruner.prepare(model)
    pruner.step(model)
    pruner.finalize(model)
    folded = fold_batchnorm(model.eval())
    lr, fc = folded.embed.stages[1].conv.conv, folded.head.fc
    assert isinstance(lr, LowRankConv2d) and isinstance(folded.embed.rpe.conv, LowRankConv2d) and isinstance(fc, LowRankLinear)
    net = to_netx(folded)
    assert [l.kind for l in net.layers] == ["input", "conv", "conv", "conv"]
    conv1 = net.layers[1]
    w = lr.product(torch.float64).detach().numpy()
    d, theta = 0.5, folded.embed.stages[1].lif.threshold.double().numpy()
    assert conv1.weight.shape == (32, lr.in_channels, 3, 3) == w.shape and conv1.padding == (1, 1)
    assert np.array_equal(conv1.weight, np.rint(d * conv1.vth / theta[:, None, None, None] * w).astype(np.int64))
    np.testing.assert_allclose(net.readout["weight"], (fc.u.weight.double() @ fc.v.weight.double()).float().detach().numpy(), rtol=0, atol=0)
    x = direct_encode(torch.rand(8, 1, 8, 8), 4)
    spikes = model_spikes(net, loihi_reference(net, host_currents(net, x))[-1])
    torch_spikes = logits_and_spikes(folded, x)[1]
    assert 0.05 < float(torch_spikes.mean()) < 0.9
    assert float((spikes == torch_spikes).float().mean()) >= MIN_TORCH_AGREEMENT
