"""The lava target: NIR -> lava-nc processes on Loihi2SimCfg.

Float mode must reproduce the reference interpreter's spikes bit for bit (0 mismatches) for plain
LIF populations (Lava's LIF process), per-neuron sLIF populations (our LIFPerNeuron) and a 90%
pruned model; fixed mode (8-bit weights, Loihi integer LIF) is measured against float mode; the
core-mapping report is checked by hand on two layers; the timeout path stops every Lava process;
broken export directories and unsupported graphs fail with one clear error.

Measured on the 2-core development machine (sdt-tiny trained 2 epochs on 1024 digits, 12 test
images): float 0 spike mismatches; fixed point 8-bit about 0.93-0.94 of the head's output spikes
equal to float (weights fake-quantised to 8 bits in float give 0.94 on the same model: the loss
is the weights' precision, not the integer pipeline), predictions agree; 16-bit weights give 0.99.
The tests run on the suite's shared sdt-tiny (480 digits; head firing rate 0.17 on the 12 images):
float 0 mismatches, 8-bit 0.94 (predictions agree on 12 of 12), 16-bit 0.99, the same figures.
"""

import dataclasses
import json
import time

import nir
import numpy as np
import pytest
import torch

from stdeploy.export.manifest import write_manifest
from stdeploy.data import load_dataset
from stdeploy.errors import UnsupportedPrimitive
from stdeploy.export.nir_export import to_nir, write_nir
from stdeploy.export.nir_interpreter import run_nir
from stdeploy.models import clone_model, direct_encode
from stdeploy.models.fold import fold_batchnorm
from stdeploy.neurons import SLIF, to_slif
from stdeploy.targets.base import REGISTRY, TargetError, get_target
from stdeploy.targets.profiles import load_profile

from stdeploy.targets.lava.graph import LavaUnsupported  # noqa: E402
from stdeploy.targets.lava.lowering import lower  # noqa: E402
from stdeploy.targets.lava.target import LavaTarget  # noqa: E402
from stdeploy.targets.lava.worker import LavaTimeout, group_members  # noqa: E402

# tests that run Lava: skipped where lava-nc is not installed, a failure where CI is set or the
# install is broken (tests/conftest.py); the others run everywhere
needs_lava = pytest.mark.lava

N_IMAGES = 12
FIXED_MIN_AGREEMENT = 0.90   # measured 0.93-0.94 (see the module docstring); the 8-bit weight floor is about 0.94
FIXED_16BIT_MIN_AGREEMENT = 0.98  # measured 0.99


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_export(path, graph: nir.NIRGraph):
    path.mkdir(parents=True, exist_ok=True)
    write_nir(graph, path / "model.nir")
    write_manifest(path, {"artifacts": {"nir": {"file": "model.nir"}}})
    return path


@pytest.fixture(scope="module")
def trained(trained_sdt):
    """The run's shared sdt-tiny (tests/conftest.py: LIF, trained 2 epochs on 480 digits, every layer
    checked to fire) and its first N_IMAGES test images; the figures in the module docstring were
    measured on it."""
    model, data = trained_sdt
    images = torch.stack([data.test[i][0] for i in range(N_IMAGES)])
    labels = np.array([int(data.test[i][1]) for i in range(N_IMAGES)])
    return model, direct_encode(images, model.cfg.timesteps), labels


@pytest.fixture(scope="module")
def export_dir(trained, tmp_path_factory):
    model, _, _ = trained
    return write_export(tmp_path_factory.mktemp("lava") / "lif", to_nir(fold_batchnorm(model)))


@pytest.fixture(scope="module")
def profile():
    return load_profile("loihi2")


def with_lava(profile, **changes):
    return dataclasses.replace(profile, lava={**profile.lava, **changes})


@pytest.fixture(scope="module")
def float_run(export_dir, trained, profile):
    _, x, _ = trained
    return LavaTarget().compile(export_dir, profile).run(x.numpy())


def reference(export_dir, x):
    out = run_nir(nir.read(str(export_dir / "model.nir")), x)
    return out["spikes"].transpose(-1, -2).numpy(), out["logits"].mean(dim=0).numpy()


# ----------------------------------------------------------------------------- registry and availability
def test_registered_and_available():
    assert REGISTRY["lava"] == "stdeploy.targets.lava.target:LavaTarget"
    target = get_target("lava")
    assert target.name == "lava" and target.tolerance["spike_mismatches"] == 0
    ok, why = target.available()
    assert isinstance(ok, bool) and why


def test_unavailable_names_the_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lava" else real(name, *a))
    ok, why = LavaTarget().available()
    assert not ok and "python -m stdeploy.install_lava" in why and "stdeploy[lava]" in why


# ----------------------------------------------------------------------------- float mode: exact
@needs_lava
@pytest.mark.timeout(300)
def test_float_mode_spikes_are_exact(float_run, export_dir, trained):
    _, x, labels = trained
    spikes, logits = reference(export_dir, x)
    r = float_run
    assert r.spikes.shape == spikes.shape == (4, N_IMAGES, 16, 64)
    assert spikes.sum() > 0.05 * spikes.size  # the head fires: the comparison means something
    assert int((r.spikes != spikes).sum()) == 0
    np.testing.assert_allclose(r.logits, logits, rtol=0, atol=LavaTarget.tolerance["logits_atol"])
    assert r.info["mode"] == "floating" and r.info["steps"] == 4 + r.info["depth"]
    assert r.info["processes"]["lif"] == 13 and r.info["processes"]["delay"] >= 1  # branches were aligned
    assert r.seconds > 0


@needs_lava
@pytest.mark.timeout(300)
def test_per_neuron_slif_is_exact(trained, tmp_path, profile):
    """sLIF with per-channel thresholds and leaks: LIFPerNeuron populations, still bit-exact."""
    model, x, _ = trained
    slif = to_slif(clone_model(model))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in slif.modules():
            if isinstance(m, SLIF):
                m.threshold_log_scale.copy_(0.2 * torch.randn(m.threshold_log_scale.shape, generator=gen))
                m.leak_log_exponent.copy_(0.2 * torch.randn(m.leak_log_exponent.shape, generator=gen))
    exp = write_export(tmp_path / "slif", to_nir(fold_batchnorm(slif)))
    runnable = LavaTarget().compile(exp, profile)
    lifs = {n for n, node in nir.read(str(exp / "model.nir")).nodes.items() if isinstance(node, nir.LIF)}
    assert all(spec["params"]["per_neuron"] for spec in runnable.plan["procs"] if spec["name"] in lifs)
    spikes, logits = reference(exp, x[:, :6])
    r = runnable.run(x[:, :6].numpy())
    assert int((r.spikes != spikes).sum()) == 0
    np.testing.assert_allclose(r.logits, logits, rtol=0, atol=1e-5)


@needs_lava
@pytest.mark.timeout(300)
def test_pruned_model_is_exact(export_dir, trained, tmp_path, profile):
    """90% of every block linear's weights zeroed by magnitude: exact, and the mapping counts nonzeros."""
    _, x, _ = trained
    graph = nir.read(str(export_dir / "model.nir"))
    for name, node in graph.nodes.items():
        if name.startswith("blocks.") and isinstance(node, nir.Conv1d):
            w = np.asarray(node.weight)
            cut = np.quantile(np.abs(w), 0.9)
            node.weight = np.where(np.abs(w) > cut, w, 0).astype(np.float32)
    exp = write_export(tmp_path / "pruned", graph)
    runnable = LavaTarget().compile(exp, profile)
    fc1 = np.asarray(graph.nodes["blocks.0.mlp.fc1"].weight)
    lif2 = next(layer for layer in runnable.info["mapping"]["layers"] if layer["layer"] == "blocks.0.mlp.lif2")
    assert lif2["synapses"] == np.count_nonzero(fc1) * 16 and lif2["synapses"] <= 0.1 * fc1.size * 16 + 16
    spikes, logits = reference(exp, x[:, :8])
    r = runnable.run(x[:, :8].numpy())
    assert int((r.spikes != spikes).sum()) == 0
    np.testing.assert_allclose(r.logits, logits, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- fixed point
@needs_lava
@pytest.mark.timeout(300)
def test_fixed_mode_agrees_with_float(export_dir, trained, profile, float_run):
    _, x, labels = trained
    runnable = LavaTarget().compile(export_dir, with_lava(profile, mode="fixed", weight_bits=8))
    quant = runnable.info["quantisation"]
    assert all(q["weight_max"] is None or q["weight_max"] <= 127 for q in quant.values())
    lifs = [s for s in runnable.plan["procs"] if s["kind"] == "lif"]
    assert all(isinstance(s["params"]["dv"], int) and 0 < s["params"]["dv"] < 4096 for s in lifs)  # 12-bit decays
    r = runnable.run(x.numpy())
    agreement = float((r.spikes == float_run.spikes).mean())
    print(f"fixed point 8-bit: spike agreement {agreement:.4f}, accuracy {(r.logits.argmax(1) == labels).mean():.3f} "
          f"(float {(float_run.logits.argmax(1) == labels).mean():.3f})")
    assert agreement >= FIXED_MIN_AGREEMENT
    assert (r.logits.argmax(1) == float_run.logits.argmax(1)).mean() >= 0.75
    assert set(np.unique(r.spikes)) <= {0.0, 1.0}


@needs_lava
@pytest.mark.timeout(300)
def test_fixed_mode_16_bit_weights_nearly_match(export_dir, trained, profile, float_run):
    """With 16-bit weights the integer pipeline (decays, thresholds, shifts) is what remains."""
    _, x, _ = trained
    r = LavaTarget().compile(export_dir, with_lava(profile, mode="fixed", weight_bits=16)).run(x[:, :6].numpy())
    assert float((r.spikes == float_run.spikes[:, :6]).mean()) >= FIXED_16BIT_MIN_AGREEMENT


# ----------------------------------------------------------------------------- mapping report
def test_mapping_report_by_hand(export_dir, profile):
    runnable = LavaTarget().compile(export_dir, profile)
    m = runnable.info["mapping"]
    layers = {layer["layer"]: layer for layer in m["layers"]}
    graph = nir.read(str(export_dir / "model.nir"))
    # embed.stages.0.lif: 32 channels of 8x8 neurons; a dense 3x3 kernel with zero padding 1 reaches
    # 3 rows at the interior and 2 at the border: (6*3 + 2*2)^2 = 484 synapses per channel
    first = layers["embed.stages.0.lif"]
    w0 = np.asarray(graph.nodes["embed.stages.0.conv"].weight)
    assert np.count_nonzero(w0) == w0.size
    assert (first["neurons"], first["synapses"], first["fan_in"], first["cores"]) == (32 * 64, 32 * 484, 9, 1)
    # blocks.0.mlp.lif2: 256 x 16 neurons, each fed by one row of fc1 (64 inputs) per token
    lif2 = layers["blocks.0.mlp.lif2"]
    fc1 = np.asarray(graph.nodes["blocks.0.mlp.fc1"].weight)[:, :, 0]
    assert (lif2["neurons"], lif2["synapses"], lif2["fan_in"]) == (4096, np.count_nonzero(fc1) * 16, np.count_nonzero(fc1, axis=1).max())
    # head.lif: four residual terms (two spike edges are one-to-one)
    assert layers["head.lif"]["fan_in"] == 1 + 64 * 9 + 64 + 256
    assert m["cores"] == sum(layer["cores"] for layer in m["layers"]) and m["chips"] == 1 and m["over_fan_in"] == []
    small = dataclasses.replace(profile, limits={**profile.limits, "fan_in_per_neuron": 100, "neurons_per_core": 1024})
    m2 = LavaTarget().compile(export_dir, small).info["mapping"]
    over = " ".join(m2["over_fan_in"])
    assert "blocks.0.mlp.lif1" in over and "head.lif" in over and "blocks.0.mlp.lif2" not in over
    assert {layer["layer"]: layer["cores"] for layer in m2["layers"]}["blocks.0.mlp.lif2"] == 4  # 4096 / 1024


# ----------------------------------------------------------------------------- timeouts and errors
def live_members(pgid: int) -> list:
    return [(pid, state, cmd) for pid, state, cmd in group_members(pgid) if state not in ("Z", "X")]


@needs_lava
@pytest.mark.timeout(120)
def test_timeout_stops_every_lava_process(export_dir, trained, profile):
    """A process that sleeps 60 s a step: the run is stopped at timeout_s, nothing of it survives."""
    _, x, _ = trained
    runnable = LavaTarget().compile(export_dir, profile, timeout_s=8, stall_s=60)
    t0 = time.perf_counter()
    with pytest.raises(LavaTimeout, match="timeout_s=8") as err:
        runnable.run(x[:, :2].numpy())
    assert time.perf_counter() - t0 < 8 + 25
    assert isinstance(err.value, TargetError)
    assert live_members(err.value.pgid) == []


@needs_lava
@pytest.mark.timeout(60)
def test_tiny_timeout_from_the_profile(export_dir, trained, profile):
    _, x, _ = trained
    runnable = LavaTarget().compile(export_dir, with_lava(profile, timeout_s=0.5))
    assert runnable.timeout_s == 0.5
    with pytest.raises(LavaTimeout) as err:
        runnable.run(x[:, :1].numpy())
    assert live_members(err.value.pgid) == []


def test_broken_export_dirs(tmp_path, export_dir, profile):
    target = LavaTarget()
    with pytest.raises(TargetError, match="not found"):
        target.compile(tmp_path / "missing", profile)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TargetError, match="manifest.json"):
        target.compile(tmp_path / "empty", profile)
    onnx_only = tmp_path / "onnx_only"
    onnx_only.mkdir()
    write_manifest(onnx_only, {"artifacts": {"onnx": {"file": "model.onnx"}}})
    with pytest.raises(TargetError, match="no 'nir' artifact"):
        target.compile(onnx_only, profile)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.nir").write_bytes(b"not an hdf5 file")
    write_manifest(corrupt, {"artifacts": {"nir": {"file": "model.nir"}}})
    with pytest.raises(TargetError, match="cannot read the NIR graph"):
        target.compile(corrupt, profile)
    with pytest.raises(TargetError, match="mode must be one of"):
        target.compile(export_dir, with_lava(profile, mode="analog"))
    with pytest.raises(TargetError, match=r"expected input \(T, B, 1, 8, 8\)"):
        target.compile(export_dir, profile).run(np.zeros((4, 2, 3, 8, 8), np.float32))


def test_unsupported_nodes_are_listed_together(tmp_path, profile):
    graph = nir.NIRGraph(
        nodes={
            "input": nir.Input(input_type=np.array([4])),
            "fc": nir.Linear(weight=np.ones((4, 4), np.float32)),
            "cuba": nir.CubaLIF(tau_syn=np.full(4, 2.0), tau_mem=np.full(4, 2.0), r=np.ones(4), v_leak=np.zeros(4),
                                v_threshold=np.ones(4)),
            "delay": nir.Delay(delay=np.ones(4)),
            "output": nir.Output(output_type=np.array([4])),
        },
        edges=[("input", "fc"), ("fc", "cuba"), ("cuba", "delay"), ("delay", "output")],
    )
    exp = write_export(tmp_path / "unsupported", graph)
    with pytest.raises(LavaUnsupported) as err:
        LavaTarget().compile(exp, profile)
    assert "cuba (CubaLIF)" in str(err.value) and "delay (Delay)" in str(err.value)
    assert isinstance(err.value, TargetError) and isinstance(err.value, UnsupportedPrimitive)


def test_lif_parameters_outside_the_lowering_are_refused():
    graph = nir.NIRGraph(
        nodes={
            "input": nir.Input(input_type=np.array([3])),
            "fc": nir.Linear(weight=np.eye(3, dtype=np.float32)),
            "lif": nir.LIF(tau=np.full(3, 2.0), r=np.full(3, 2.0), v_leak=np.zeros(3), v_threshold=np.ones(3)),
            "thr": nir.Threshold(threshold=np.zeros(3, np.float32)),
            "output": nir.Output(output_type=np.array([3])),
        },
        edges=[("input", "fc"), ("fc", "lif"), ("lif", "thr"), ("thr", "output")],
    )
    with pytest.raises(LavaUnsupported, match=r"(?s)lif \(LIF\).*r\b.*thr \(Threshold\)"):
        lower(graph)


@needs_lava
@pytest.mark.timeout(120)
def test_worker_is_reused_and_closed(export_dir, trained, profile):
    _, x, _ = trained
    with LavaTarget().compile(export_dir, profile) as runnable:
        a = runnable.run(x[:, :3].numpy())
        b = runnable.run(x[:, :3].numpy())
        pgid = runnable.worker.proc.pid
    assert a.info["worker_pid"] == b.info["worker_pid"] == pgid  # lava imported once
    np.testing.assert_array_equal(a.spikes, b.spikes)  # no state carried over between runs
    assert live_members(pgid) == []


@needs_lava
@pytest.mark.timeout(120)
def test_failing_process_model_is_reported(export_dir, trained, profile):
    """A process model that raises: the error comes back as a TargetError, nothing survives, and
    the runnable starts a fresh worker for its next run."""
    _, x, _ = trained
    runnable = LavaTarget().compile(export_dir, with_lava(profile, mode="fixed"))
    spec = next(s for s in runnable.plan["procs"] if s["kind"] == "synapse" and "q@" in s["name"])
    good = spec["params"]["op_spec"]
    spec["params"]["op_spec"] = {**good, "op": "no-such-op"}
    with pytest.raises(TargetError, match="unknown synaptic op 'no-such-op'") as err:
        runnable.run(x[:, :2].numpy())
    assert not isinstance(err.value, LavaTimeout)
    assert runnable.worker.proc is None and live_members(runnable.worker.last_pgid) == []
    spec["params"]["op_spec"] = good
    runnable.worker._plans.clear()  # the plan changed: send it again
    r = runnable.run(x[:, :2].numpy())
    assert r.spikes.shape == (4, 2, 16, 64)
    runnable.close()
