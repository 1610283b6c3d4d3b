"""The lava target's standard-process lowering (``[lava] lowering = "standard"``): Lava's own
Dense/Sparse/DelaySparse, LIFReset and RingBuffer processes with Lava's float models, samples
streamed one at a time (batch 1) as the chip runs.

Every process class built in the worker must come from the ``lava`` package (for mlp-tiny,
conv-tiny and the whole sdt-tiny: all of them, nothing simulation-only), and the output spikes must
agree with the float32 reference interpreter on real digits (Lava's float models compute in
float64: at least ``SPIKE_AGREEMENT`` of the spikes, measured: all of them; Lava's bit-accurate
models with 8-bit weights: at least ``FIXED_AGREEMENT``), with every spiking layer firing (rates
between 1e-3 and 0.9 on the same images).
"""

import dataclasses

import nir
import numpy as np
import pytest
import torch

from stdeploy.activity import estimate_batchnorm, require_active
from stdeploy.errors import ConfigError
from stdeploy.export.manifest import write_manifest
from stdeploy.export.nir_export import to_nir, write_nir
from stdeploy.export.nir_interpreter import EVALUATORS, EvalContext, run_nir
from stdeploy.models import build_model, direct_encode
from stdeploy.models.fold import fold_batchnorm
from stdeploy.targets.lava.graph import LavaUnsupported
from stdeploy.targets.lava.resources import resource_report
from stdeploy.targets.lava.standard import LOGITS_ATOL, SPIKE_AGREEMENT, lower_standard, process_classes, synaptic_matrix
from stdeploy.targets.lava.target import LavaTarget
from stdeploy.targets.lava.worker import LavaWorker
from stdeploy.targets.profiles import load_profile

N_IMAGES = 4
FIXED_AGREEMENT = 0.90   # fixed mode: output spikes equal to the float reference (8-bit weights' floor, as the exact lowering's fixed mode)


def write_export(path, graph: nir.NIRGraph):
    path.mkdir(parents=True, exist_ok=True)
    write_nir(graph, path / "model.nir")
    write_manifest(path, {"artifacts": {"nir": {"file": "model.nir"}}})
    return path


def calibrated(preset: str, digits_full):
    """A random-weight ``preset`` whose BatchNorm statistics are estimated on 64 digits with gain 2
    (its LIFs then fire at 0.18-0.48, measured), folded; and ``N_IMAGES`` test digits encoded."""
    torch.manual_seed(0)
    model = build_model(preset)
    xb = direct_encode(torch.stack([digits_full.train[i][0] for i in range(64)]), model.cfg.timesteps)
    estimate_batchnorm(model, [xb], gain=2.0)
    x = direct_encode(torch.stack([digits_full.test[i][0] for i in range(N_IMAGES)]), model.cfg.timesteps)
    return to_nir(fold_batchnorm(model.eval())), x


def reference_and_rates(graph, x):
    """The reference's output spikes (T, B, N, D) for tokens, (T, B, F) for vectors, logits, and
    every spiking node's firing rate."""
    rec = run_nir(graph, x, record=True)
    rates = {n: float(rec[n].mean()) for n, node in graph.nodes.items() if type(node).__name__ in ("LIF", "Threshold")}
    spikes = rec["spikes"]
    return (spikes.transpose(-1, -2) if spikes.dim() == 4 else spikes).numpy(), rec["logits"].mean(dim=0).numpy(), rates


def standard_profile():
    profile = load_profile("loihi2-standard")
    assert profile.lava["lowering"] == "standard" and profile.lava["mode"] == "floating"
    return profile


@pytest.fixture(scope="module")
def worker():
    """One Lava worker for this module's runs (lava and torch imported once)."""
    w = LavaWorker()
    yield w
    w.close()


def check_run(export, graph, x, worker, mode: str = "floating"):
    spikes, logits, rates = reference_and_rates(graph, x)
    require_active(rates, what="reference")  # every spiking layer fires: the comparison means something
    profile = standard_profile()
    runnable = LavaTarget().compile(export, dataclasses.replace(profile, lava={**profile.lava, "mode": mode}))
    runnable.worker = worker
    r = runnable.run(x.numpy())
    built = r.info["lava_processes_built"]
    assert built and all(cls.startswith("lava.proc.") for cls in built), built
    assert built == r.info["processes"]  # what the plan names is what the worker built
    assert r.info["simulation_only"] == []
    assert r.info["lava_models"] and all(m.startswith("lava.proc.") for m in r.info["lava_models"]), r.info["lava_models"]
    assert r.spikes.shape == spikes.shape
    agreement = float((r.spikes == spikes).mean())
    if mode == "fixed":  # 8-bit weights: measured 0.93-0.99 (16 digits: mlp-tiny 0.990, conv-tiny 0.978, sdt-tiny 0.934)
        assert all("BitAcc" in m or "Fixed" in m for m in r.info["lava_models"]), r.info["lava_models"]
        assert agreement >= FIXED_AGREEMENT, agreement
        return r
    assert agreement >= SPIKE_AGREEMENT, agreement
    if agreement == 1.0:
        np.testing.assert_allclose(r.logits, logits, rtol=0, atol=LOGITS_ATOL)
    assert r.info["steps"] == N_IMAGES * x.shape[0] + r.info["depth"]  # streamed: batch 1, one sample after another
    return r


# ----------------------------------------------------------------------------- no Lava needed
def test_synaptic_matrix_is_the_layer_exactly():
    """A 3x3 convolution unrolled: every entry is a weight (or 0), and W x + b is the layer."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn((4, 2, 3, 3), generator=gen).numpy()
    b = torch.randn(4, generator=gen).numpy()
    node = nir.Conv2d(input_shape=(5, 5), weight=w, stride=1, padding=1, dilation=1, groups=1, bias=b)
    m, bias = synaptic_matrix(node, (2, 5, 5), chunk=7)
    m = m.toarray()
    assert m.shape == (4 * 25, 2 * 25)
    assert set(np.unique(m[m != 0]).astype(np.float32)) <= set(w.reshape(-1))
    # interior output (channel 0, row 2, col 2) sees all 18 weights; a corner sees 2*2*2 = 8
    assert np.count_nonzero(m[12]) == 18 and np.count_nonzero(m[0]) == 8
    x = torch.randn((1, 2, 5, 5), generator=gen)
    ref = EVALUATORS[nir.Conv2d](node, x, EvalContext(1, 1, 1.0, torch.device("cpu")))[0].reshape(-1).numpy()
    np.testing.assert_allclose(m @ x.reshape(-1).numpy().astype(np.float64) + bias, ref, rtol=0, atol=1e-5)


def test_standard_plan_of_the_presets(digits_full):
    """mlp-tiny and conv-tiny lower to Lava's classes only, with the latencies and resets of the chip's pipeline."""
    graph, _ = calibrated("mlp-tiny", digits_full)
    plan = lower_standard(graph)
    assert process_classes(plan) == {"lava.proc.io.source.RingBuffer": 1, "lava.proc.lif.process.LIFReset": 2,
                                     "lava.proc.dense.process.Dense": 3, "lava.proc.io.sink.RingBuffer": 2}
    assert [p["latency"] for p in plan["populations"]] == [1, 2] and plan["depth"] == 3
    first = next(s for s in plan["synapses"] if s["src"] == "input")
    w = np.asarray(graph.nodes["embed.fcs.0"].weight, np.float64)
    np.testing.assert_array_equal(first["matrix"]["values"], 0.5 * w)  # d = dt/tau = 1/2 folded into the weights
    assert first["graded"] and plan["populations"][0]["dv"] == 0.5 and plan["populations"][0]["du"] == 1.0
    conv, _ = calibrated("conv-tiny", digits_full)
    cplan = lower_standard(conv)
    assert set(process_classes(cplan)) <= {"lava.proc.io.source.RingBuffer", "lava.proc.lif.process.LIFReset",
                                           "lava.proc.dense.process.Dense", "lava.proc.sparse.process.Sparse",
                                           "lava.proc.sparse.process.DelaySparse", "lava.proc.io.sink.RingBuffer"}
    head = [s for s in cplan["synapses"] if s["dst"] == "head.lif"]
    assert sorted(s["delay"] for s in head) == [0, 0]  # the pool's spike edge: an identity synapse, in step with rpe


def test_per_neuron_parameters_and_wide_weights_are_refused():
    lif = nir.LIF(tau=np.array([2.0, 3.0]), r=np.ones(2), v_leak=np.zeros(2), v_threshold=np.ones(2), v_reset=np.zeros(2))
    graph = nir.NIRGraph(nodes={"input": nir.Input(np.array([2])), "fc": nir.Linear(np.eye(2, dtype=np.float32)), "lif": lif,
                                "spikes": nir.Output(np.array([2]))},
                         edges=[("input", "fc"), ("fc", "lif"), ("lif", "spikes")])
    with pytest.raises(LavaUnsupported, match=r"lif \(LIF\): tau varies per neuron"):
        lower_standard(graph)
    # every such population is listed at once, the layers after it too
    graph2 = nir.NIRGraph(nodes={**graph.nodes, "fc2": nir.Linear(np.eye(2, dtype=np.float32)), "lif2": lif,
                                 "spikes": nir.Output(np.array([2]))},
                          edges=[("input", "fc"), ("fc", "lif"), ("lif", "fc2"), ("fc2", "lif2"), ("lif2", "spikes")])
    with pytest.raises(LavaUnsupported, match=r"2 problem\(s\)(.|\n)*lif \(LIF\)(.|\n)*lif2 \(LIF\)"):
        lower_standard(graph2)
    # per-neuron thresholds (sLIF compensation) are folded into the rows: d / theta_i, vth = 1
    graph.nodes["lif"] = nir.LIF(tau=np.full(2, 2.0), r=np.ones(2), v_leak=np.zeros(2), v_threshold=np.array([0.5, 2.0]),
                                 v_reset=np.zeros(2))
    folded = lower_standard(graph)
    assert folded["populations"][0]["vth"] == 1.0
    np.testing.assert_array_equal(np.asarray(folded["synapses"][0]["matrix"]["values"]), [[1.0, 0.0], [0.0, 0.25]])
    graph.nodes["lif"] = nir.LIF(tau=np.full(2, 2.0), r=np.ones(2), v_leak=np.zeros(2), v_threshold=np.ones(2), v_reset=np.zeros(2))
    with pytest.raises(LavaUnsupported, match="2-8-bit weights"):
        lower_standard(graph, "fixed", weight_bits=12)
    fixed = lower_standard(graph, "fixed")
    pop = fixed["populations"][0]
    # theta 1 -> vth 4096; d = 1/2 -> dv 2048 (12 bits), du 4095 (u = a_in << 6)
    assert (pop["vth"], pop["dv"], pop["du"]) == (4096, 2048, 4095)
    syn = fixed["synapses"][0]
    # the identity times d * V / theta / 256 (the input is sent as x * 256) = 8: mantissa 8 stored as 8 << 1, weight_exp -1
    np.testing.assert_array_equal(np.asarray(syn["matrix"]["values"]), [[16, 0], [0, 16]])
    assert syn["weight_exp"] == -1 and syn["graded"]
    assert np.all(pop["bias_mant"] == 1) and np.all(pop["bias_exp"] == 0)  # the one unit that makes exact ties fire


# ----------------------------------------------------------------------------- Lava runs
@pytest.mark.lava
@pytest.mark.timeout(300)
@pytest.mark.parametrize("preset", ["mlp-tiny", "conv-tiny"])
def test_presets_run_on_lava_standard_processes_only(preset, digits_full, tmp_path, one_thread, worker):
    graph, x = calibrated(preset, digits_full)
    export = write_export(tmp_path / preset, graph)
    r = check_run(export, graph, x, worker)
    assert "lava.proc.lif.process.LIFReset" in r.info["lava_processes_built"]
    # the same processes with Lava's bit-accurate models (PyLifResetModelBitAcc, Py*ModelBitAcc)
    rf = check_run(export, graph, x, worker, mode="fixed")
    assert rf.info["lava_processes_built"] == r.info["lava_processes_built"] and rf.info["quantisation"]


@pytest.mark.lava
@pytest.mark.timeout(300)
def test_sdt_tiny_runs_on_lava_standard_processes_only(exported_sdt, trained_sdt, one_thread, worker):
    """The whole transformer (stem, attention's AND units, residual stream): Lava's processes only."""
    model, data = trained_sdt
    graph = nir.read(str(exported_sdt / "model.nir"))
    x = direct_encode(torch.stack([data.test[i][0] for i in range(N_IMAGES)]), model.cfg.timesteps)
    r = check_run(exported_sdt, graph, x, worker)
    built = r.info["lava_processes_built"]
    assert built["lava.proc.sparse.process.DelaySparse"] >= 1  # the residual branches were aligned
    # 13 spiking nodes, plus 3 relays that repeat spikes later for the delayed rpe and proj terms
    assert built["lava.proc.lif.process.LIFReset"] == 13 + 3


# ----------------------------------------------------------------------------- Loihi 2 resource report
def tiny_graph():
    """input (4) -fc1-> A (3) -fc2-> B (3); C (3) <- B and A (spike edges; A's one step late); C -fc3-> logits."""
    w1 = np.array([[1, 0, 2, 0], [0, 3, 0, 0], [4, 5, 6, 7]], np.float32)   # 7 nonzeros, rows 2/1/4
    w2 = np.array([[1, 1, 0], [0, 0, 0], [0, 1, 1]], np.float32)            # 4 nonzeros, columns 1/2/1
    w3 = np.array([[1, 2, 3], [0, 4, 5]], np.float32)                       # 5 nonzeros, columns 1/2/2

    def lif(n):
        return nir.LIF(tau=np.full(n, 2.0), r=np.ones(n), v_leak=np.zeros(n), v_threshold=np.ones(n), v_reset=np.zeros(n))

    nodes = {"input": nir.Input(np.array([4])), "fc1": nir.Linear(w1), "A": lif(3), "fc2": nir.Linear(w2), "B": lif(3),
             "C": lif(3), "fc3": nir.Linear(w3), "logits": nir.Output(np.array([2])), "spikes": nir.Output(np.array([3]))}
    edges = [("input", "fc1"), ("fc1", "A"), ("A", "fc2"), ("fc2", "B"), ("B", "C"), ("A", "C"), ("C", "fc3"),
             ("fc3", "logits"), ("C", "spikes")]
    return nir.NIRGraph(nodes=nodes, edges=edges)


def test_resource_report_by_hand():
    plan = lower_standard(tiny_graph())
    rep = resource_report(plan, {"cores_per_chip": 128, "neurons_per_core": 8192, "synapses_per_core": 1000,
                                 "synaptic_memory_bits_per_core": 8000, "fan_in_per_neuron": 64, "weight_bits": 8, "delay_bits": 6})
    assert rep.assumed_limits == ()
    got = {x.layer: (x.kind, x.neurons, x.synapses, x.synaptic_memory_bits, x.fan_in, x.fan_out, x.cores) for x in rep.layers}
    assert got == {
        # fc1's 7 weights; fan-out: 2 of fc2's columns reach a neuron of A at most (A's column 1), plus its identity to C
        "A": ("LIF", 3, 7, 7 * 8, 4, 2 + 1, 1),
        "B": ("LIF", 3, 4, 4 * 8, 2, 1, 1),
        # one-to-one from B, and from A one step late (a DelaySparse: 6 delay bits per synapse)
        "C": ("LIF", 3, 6, 6 * 8 + 3 * 6, 2, 2, 1),
        "sink:logits:0": ("readout", 2, 5, 5 * 8, 3, 0, 1),
    }
    assert [x.layer for x in rep.layers] == ["A", "B", "C", "sink:logits:0"]  # latency order
    assert (rep.neurons, rep.synapses, rep.synaptic_memory_bits, rep.cores, rep.chips) == (11, 22, 56 + 32 + 66 + 40, 4, 1)
    assert rep.first_unfit is None and rep.unfit_reason is None
    # 2 neurons a core: A, B, C take 2 cores each; a 5-core chip holds A and B, not C
    small = resource_report(plan, {"cores_per_chip": 5, "neurons_per_core": 2})
    assert [x.cores for x in small.layers] == [2, 2, 2, 1] and small.chips == 2
    assert small.first_unfit == "C" and "cores 5-6" in small.unfit_reason
    assert "synapses_per_core" in small.assumed_limits and "neurons_per_core" not in small.assumed_limits
    # fan-in over the limit names the first such layer; memory binds where delays add bits
    assert resource_report(plan, {"fan_in_per_neuron": 3}).first_unfit == "A"
    assert resource_report(plan, {"synaptic_memory_bits_per_core": 60}).layers[2].cores == 2  # C: 66 bits
    with pytest.raises(ConfigError, match="neurons_per_core must be a positive integer"):
        resource_report(plan, {"neurons_per_core": 0})


def test_resource_report_of_sdt_tiny(exported_sdt):
    """The demo-size sdt-tiny (dense): counts checked by hand on three layers; it fits one chip."""
    runnable = LavaTarget().compile(exported_sdt, load_profile("loihi2"))  # the exact lowering reports it too
    sim_only = runnable.info["simulation_only"]  # the exact lowering's own processes are named as such
    assert any(".Synapse x " in p for p in sim_only) and all(p.startswith("stdeploy.targets.lava.processes.") for p in sim_only)
    rep = runnable.info["resources"]
    layers = {x["layer"]: x for x in rep["layers"]}
    graph = nir.read(str(exported_sdt / "model.nir"))
    assert np.count_nonzero(graph.nodes["embed.stages.0.conv"].weight) == 32 * 9
    # 32 x 8x8 neurons; a 3x3 kernel with zero padding 1 reaches (6*3 + 2*2)^2 = 484 inputs per channel
    first = layers["embed.stages.0.lif"]
    assert (first["neurons"], first["synapses"], first["synaptic_memory_bits"], first["fan_in"]) == (2048, 32 * 484, 32 * 484 * 8, 9)
    fc1 = np.asarray(graph.nodes["blocks.0.mlp.fc1"].weight)[:, :, 0]
    lif2 = layers["blocks.0.mlp.lif2"]
    assert (lif2["neurons"], lif2["synapses"], lif2["fan_in"]) == (4096, np.count_nonzero(fc1) * 16, np.count_nonzero(fc1, axis=1).max())
    # head.lif: the pool's spikes (a delayed identity), rpe (via a relay), proj (via a relay) and fc2
    head = layers["head.lif"]
    assert head["fan_in"] == 1 + 64 * 9 + 64 + 256
    assert sum(x["kind"] == "relay" for x in rep["layers"]) == 3
    assert rep["cores"] == sum(x["cores"] for x in rep["layers"]) and rep["chips"] == 1 and rep["first_unfit"] is None
    assert rep["neurons"] == sum(x["neurons"] for x in rep["layers"]) and not rep["assumed_limits"]
    print(f"sdt-tiny on Loihi 2: {rep['neurons']} neurons, {rep['synapses']} synapses, {rep['synaptic_memory_bits']} bits, "
          f"{rep['cores']} cores")
