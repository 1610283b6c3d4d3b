"""`stdeploy import`: graphs written in the test by snnTorch's, SpikingJelly's and Norse's own exporters become export
directories whose ONNX graph onnxruntime runs with the framework's own spikes, and that `stdeploy run` (onnxruntime,
TVM, Lava) and `stdeploy bench` take with the graph, run by our NIR interpreter, as the reference."""

from __future__ import annotations

import json
import warnings

import nir
import numpy as np
import onnxruntime as ort
import pytest
import torch

from stdeploy.cli import main
from stdeploy.errors import ConfigError, UnsupportedPrimitive
from stdeploy.interop.importer import import_nir

T = 6


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def digits(n: int = 32) -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().data[:n] / 16.0, dtype=torch.float32)  # (n, 64) in [0, 1]


def snntorch_net():
    import snntorch as snn

    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)
    with torch.no_grad():
        fc1.weight.mul_(3.0)
    # per-neuron beta and threshold: snnTorch 1.0's exporter needs equal parameter shapes
    lif1 = snn.Leaky(beta=torch.full((32,), 0.5), threshold=torch.ones(32), init_hidden=True, reset_mechanism="zero")
    lif2 = snn.Leaky(beta=torch.full((10,), 0.5), threshold=torch.full((10,), 0.5), init_hidden=True, output=True, reset_mechanism="zero")
    return torch.nn.Sequential(fc1, lif1, fc2, lif2)


def snntorch_spikes(net, x: torch.Tensor) -> torch.Tensor:
    import snntorch.utils

    snntorch.utils.reset(net)
    with torch.no_grad():
        return torch.stack([net(x)[0] for _ in range(T)])  # direct input, (T, B, 10)


def run_onnx(out, x: torch.Tensor) -> dict:
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    xs = x.reshape(*x.shape, 1, 1).unsqueeze(0).expand(T, *x.shape, 1, 1).contiguous().numpy()  # (T, B, 64, 1, 1): padded Input
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": xs})))


@pytest.fixture(scope="module")
def snn_file(tmp_path_factory):
    from snntorch.export_nir import export_to_nir

    net = snntorch_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = export_to_nir(net, torch.zeros(64))  # a sample without a batch dim (with one, nir 1.0.8 type-checks it out)
    path = tmp_path_factory.mktemp("snn") / "snn.nir"
    nir.write(path, graph)
    return path, net


def test_snntorch_graph_imports_spike_exact(snn_file, tmp_path):
    path, net = snn_file
    assert "dt" not in nir.read(path).metadata  # snnTorch writes no time step: the flag gives it
    manifest = import_nir(path, tmp_path / "imp", dt=1e-4, timesteps=T)  # snnTorch's importer's dt
    assert {p.name for p in (tmp_path / "imp").iterdir()} == {"model.nir", "model.onnx", "manifest.json"}
    assert manifest["validation"]["results"]["onnx"]["spike_mismatches"] == 0
    x = digits()
    ref = snntorch_spikes(net, x)
    assert 0.02 < float(ref.mean()) < 0.9, "the snnTorch net must fire for the comparison to mean anything"
    out = run_onnx(tmp_path / "imp", x)
    assert out["spikes"].shape == (T, len(x), 1, 10)
    assert int((torch.as_tensor(out["spikes"][:, :, 0]) != ref).sum()) == 0
    np.testing.assert_allclose(out["logits"], ref.mean(0).numpy(), atol=1e-6)
    assert float(nir.read(tmp_path / "imp" / "model.nir").metadata["dt"]) == 1e-4
    from stdeploy.targets.base import get_target  # the onnxruntime target compiles and runs the imported directory
    from stdeploy.targets.profiles import load_profile

    res = get_target("onnxruntime").compile(tmp_path / "imp", load_profile("cpu")).run(x.reshape(1, *x.shape, 1, 1).expand(T, *x.shape, 1, 1).numpy())
    assert int((torch.as_tensor(np.asarray(res.spikes))[:, :, 0] != ref).sum()) == 0


def test_norse_graph_imports_with_its_time_step(tmp_path):
    import norse.torch as nt

    torch.manual_seed(1)
    p1 = nt.LIFBoxParameters(tau_mem_inv=torch.full((32,), 100.0), v_th=torch.ones(32), v_leak=torch.zeros(32), v_reset=torch.zeros(32))
    p2 = nt.LIFBoxParameters(tau_mem_inv=torch.full((10,), 100.0), v_th=torch.full((10,), 0.3), v_leak=torch.zeros(10), v_reset=torch.zeros(10))
    fc1, fc2 = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)
    with torch.no_grad():
        fc1.weight.mul_(25.0)  # d = 0.1 integrates slowly: loud weights make both layers fire within T steps
        fc2.weight.mul_(15.0)
    net = nt.SequentialState(fc1, nt.LIFBoxCell(p1), fc2, nt.LIFBoxCell(p2))  # dt = 1e-3: d = dt*tau_mem_inv = 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = nt.to_nir(net, torch.zeros(64))
    path = tmp_path / "norse.nir"
    nir.write(path, graph)
    # Norse 1.1's own reader takes dt only as an argument (default 1e-3) and never reads graph.metadata["dt"]: the limit
    # behind "Norse needs its dt flag" (the README says it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = nt.from_nir(nir.NIRGraph(nodes=graph.nodes, edges=graph.edges, metadata={"dt": 1e-6}, type_check=False))
    assert {m.dt for m in back.modules() if isinstance(m, nt.LIFBoxCell)} == {1e-3}
    with pytest.raises(UnsupportedPrimitive, match=r"dt/tau = 100 is outside \(0, 1\]"):
        import_nir(path, tmp_path / "bad", dt=1e-3)  # Norse writes tau = dt/tau_mem_inv = 1e-5
    assert not (tmp_path / "bad").exists()
    import_nir(path, tmp_path / "imp", dt=1e-6, timesteps=T)  # (Norse's dt)**2 gives d = 0.1
    x = digits()
    state, spikes = None, []
    with torch.no_grad():
        for _ in range(T):
            z, state = net(x, state)
            spikes.append(z)
    ref = torch.stack(spikes)
    assert 0.02 < float(ref.mean()) < 0.9, "the Norse net must fire"
    got = torch.as_tensor(run_onnx(tmp_path / "imp", x)["spikes"][:, :, 0])
    assert int((got != ref).sum()) == 0


def test_import_refusals(snn_file, tmp_path):
    path, _ = snn_file
    with pytest.raises(ConfigError, match="no 'dt' in its metadata"):
        import_nir(path, tmp_path / "a")
    graph = nir.read(path)
    cuba = nir.NIRGraph(nodes={**graph.nodes, "1": nir.CubaLIF(tau_syn=np.full(32, 2e-4), tau_mem=np.full(32, 2e-4), r=np.ones(32),
                                                              v_leak=np.zeros(32), v_threshold=np.ones(32))},
                        edges=graph.edges, metadata={"dt": 1e-4}, type_check=False)
    nir.write(tmp_path / "cuba.nir", cuba)
    with pytest.raises(UnsupportedPrimitive, match=r"1 \(CubaLIF\): no exact conversion"):
        import_nir(tmp_path / "cuba.nir", tmp_path / "b")
    (tmp_path / "junk.nir").write_bytes(b"not hdf5")
    with pytest.raises(ConfigError, match="not a readable NIR file"):
        import_nir(tmp_path / "junk.nir", tmp_path / "c", dt=1e-4)
    assert not any((tmp_path / n).exists() for n in "abc")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_import(snn_file, tmp_path, capsys):
    path, _ = snn_file
    assert main(["import", str(path), "--out", str(tmp_path / "imp"), "--dt", "1e-4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dt"] == 1e-4 and result["validation"]["results"]["onnx"]["spike_mismatches"] == 0
    assert main(["import", str(path), "--out", str(tmp_path / "imp"), "--dt", "1e-4"]) == 2  # exists already
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "already exists" in err[0]
    assert main(["import", str(path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dt" in err[0]


def test_spikingjelly_graph_imports(tmp_path, capsys):
    from spikingjelly.activation_based import functional, layer, neuron
    from spikingjelly.activation_based.nir_exchange import export_to_nir

    torch.manual_seed(2)
    net = torch.nn.Sequential(layer.Linear(64, 32), neuron.LIFNode(tau=2.0, v_reset=0.0), layer.Linear(32, 10),
                              neuron.LIFNode(tau=2.0, v_reset=0.0, v_threshold=0.5))
    with torch.no_grad():
        net[0].weight.mul_(6.0)
        net[2].weight.mul_(3.0)
    graph = export_to_nir(net, torch.zeros(1, 64))  # tau = 2 * 1e-4, r = 1, no dt in the metadata
    nir.write(tmp_path / "sj.nir", graph)
    import_nir(tmp_path / "sj.nir", tmp_path / "imp", dt=1e-4, timesteps=T)  # SpikingJelly's default dt
    x = digits()
    functional.reset_net(net)
    with torch.no_grad():
        ref = torch.stack([net(x) for _ in range(T)])
    assert 0.02 < float(ref.mean()) < 0.9, "the SpikingJelly net must fire"
    got = torch.as_tensor(run_onnx(tmp_path / "imp", x)["spikes"][:, :, 0])
    assert int((got != ref).sum()) == 0
    for target in ("onnxruntime",):  # a second exporter's file through `stdeploy run` (Lava: the snnTorch tests; ~10 s more here)
        assert main(["run", str(tmp_path / "imp"), "--target", target, "--limit", "32", "--batch-size", "32", "--json", "--quiet"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["spike_mismatches"] == 0 and result["spikes_total"] == T * 32 * 10
        assert min(result["firing_rates"].values()) > 0.01


# ----------------------------------------------------------------------------- run / bench on an imported directory
def trained_snntorch_net():
    """The snnTorch MLP trained for a few seconds on digits' train split (BPTT, spike counts): it classifies the test
    split that `stdeploy run` uses, and both layers fire."""
    import snntorch.utils

    from stdeploy.data import load_dataset

    x, y = load_dataset("digits").train.tensors
    x = x.flatten(1)  # (1437, 64)
    net = snntorch_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(15):
        for i in range(0, len(x), 200):
            snntorch.utils.reset(net)
            counts = torch.stack([net(x[i:i + 200])[0] for _ in range(T)]).sum(0)
            loss = torch.nn.functional.cross_entropy(counts, y[i:i + 200])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


@pytest.fixture(scope="module")
def imported_dir(tmp_path_factory):
    """One directory per module: a trained snnTorch MLP written by snnTorch's exporter, then `stdeploy import`."""
    from snntorch.export_nir import export_to_nir

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = trained_snntorch_net()
    finally:
        torch.set_num_threads(before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = export_to_nir(net, torch.zeros(64))
    root = tmp_path_factory.mktemp("imported")
    nir.write(root / "snn.nir", graph)
    assert main(["import", str(root / "snn.nir"), "--out", str(root / "imp"), "--dt", "1e-4", "--timesteps", str(T), "--quiet"]) == 0
    return root / "imp"


def cli_json(capsys, argv: list[str]) -> tuple[int, dict | None]:
    code = main([*argv, "--json", "--quiet"])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1]) if code == 0 else None


def test_imported_directory_is_our_dialect(imported_dir):
    """snnTorch writes r = 2 (beta 0.5 with dt = 1e-4): folded into the Affine rows, exactly, so Lava can lower it."""
    manifest = json.loads((imported_dir / "manifest.json").read_text())
    graph = nir.read(imported_dir / "model.nir")
    lifs = [n for n in graph.nodes.values() if isinstance(n, nir.LIF)]
    assert len(lifs) == 2 and all(np.all(np.asarray(n.r) == 1) for n in lifs)
    assert any("folded" in c for c in manifest["conversions"])
    assert {"logits", "spikes"} <= set(graph.nodes) and manifest["input"]["shape"][2:] == [64, 1, 1]
    assert manifest["validation"]["results"]["nir"]["spike_mismatches"] == 0
    assert manifest["validation"]["results"]["nir"]["reference_spikes"] > 0


@pytest.mark.parametrize("target", ["onnxruntime", "tvm", "lava"])
def test_cli_run_imported(imported_dir, capsys, target):
    """`stdeploy run` on the imported directory: digits' 8x8 images flattened to the graph's (64,) Input, compared with
    the graph run by our interpreter; spike-exact on every target, and the layers fire."""
    code, result = cli_json(capsys, ["run", str(imported_dir), "--target", target, "--limit", "48", "--batch-size", "48"])
    assert code == 0, capsys.readouterr().err
    assert result["reference"] == "nir-graph" and result["samples"] == 48
    assert result["spikes_total"] == T * 48 * 10 and result["spike_mismatches"] == 0 and result["within_tolerance"]
    assert set(result["firing_rates"]) == {"1", "3"} and min(result["firing_rates"].values()) > 0.01
    assert not result["silent_layers"]
    assert result["accuracy"] == result["reference_accuracy"] > 0.7  # trained: it classifies, and the target agrees


def test_cli_bench_imported(imported_dir, capsys):
    code, result = cli_json(capsys, ["bench", str(imported_dir), "--targets", "onnxruntime", "--batch", "8", "--warmup", "1",
                                     "--repeats", "2"])
    assert code == 0
    rows = result["results"]
    assert set(rows) == {"nir-graph", "onnxruntime"} and all(r["median_s"] > 0 for r in rows.values())


def test_cli_refuses_bad_imported_directory_and_shape(imported_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["run", str(tmp_path / "empty"), "--target", "onnxruntime"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest" in err[0]
    graph = nir.NIRGraph(nodes={"in": nir.Input(input_type={"input": np.array([50])}),
                                "fc": nir.Affine(weight=np.ones((10, 50), np.float32), bias=np.zeros(10, np.float32)),
                                "lif": nir.LIF(tau=np.full(10, 2e-4), r=np.ones(10), v_leak=np.zeros(10), v_threshold=np.ones(10),
                                               v_reset=np.zeros(10)),
                                "out": nir.Output(output_type={"output": np.array([10])})},
                         edges=[("in", "fc"), ("fc", "lif"), ("lif", "out")], metadata={"dt": 1e-4})
    nir.write(tmp_path / "g50.nir", graph)
    assert main(["import", str(tmp_path / "g50.nir"), "--out", str(tmp_path / "g50"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "g50"), "--target", "onnxruntime", "--limit", "4"]) == 2  # digits have 64 values
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data digits" in err[0] and "[50]" in err[0] and "Traceback" not in err[0]



def test_lava_refuses_an_unfoldable_gain_by_name(tmp_path, capsys):
    """r = 3 cannot be folded into the weights exactly: the import keeps it (onnxruntime runs it) and Lava's lowering
    refuses that LIF by name, with exit status 2 and one line."""
    graph = nir.NIRGraph(nodes={"in": nir.Input(input_type={"input": np.array([64])}),
                                "fc": nir.Affine(weight=np.full((10, 64), 0.1, np.float32), bias=np.zeros(10, np.float32)),
                                "lif": nir.LIF(tau=np.full(10, 2e-4), r=np.full(10, 3.0), v_leak=np.zeros(10), v_threshold=np.ones(10),
                                               v_reset=np.zeros(10)),
                                "out": nir.Output(output_type={"output": np.array([10])})},
                         edges=[("in", "fc"), ("fc", "lif"), ("lif", "out")], metadata={"dt": 1e-4})
    nir.write(tmp_path / "r3.nir", graph)
    manifest = import_nir(tmp_path / "r3.nir", tmp_path / "r3", timesteps=T)
    assert any(c.startswith("lif (LIF): r kept") for c in manifest["conversions"])
    code, result = cli_json(capsys, ["run", str(tmp_path / "r3"), "--target", "onnxruntime", "--limit", "8"])
    assert code == 0 and result["spike_mismatches"] == 0 and result["firing_rates"]["lif"] > 0.01
    assert main(["run", str(tmp_path / "r3"), "--target", "lava", "--limit", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lif (LIF)" in err[0] and "r" in err[0]


def test_cli_profile_imported(imported_dir, tmp_path, capsys):
    """`stdeploy profile` counts the imported graph's layers (GraphModel: the interpreter's values, layers the profiler sees)."""
    from stdeploy.models import direct_encode
    from stdeploy.runner import load_reference

    ref = load_reference(imported_dir)
    x = direct_encode(digits(16).reshape(16, 64, 1, 1), T)
    assert torch.equal(ref.model(x), ref.evaluate(x).logits)  # the module and the interpreter agree bit for bit
    code, _ = cli_json(capsys, ["profile", str(imported_dir), "--targets", "onnxruntime", "--energy", "loihi2", "--limit", "32",
                                "--batch", "16", "--repeats", "2", "--out", str(tmp_path / "report")])
    assert code == 0
    row = json.loads((tmp_path / "report" / "report.json").read_text())["variants"][0]
    assert set(row["firing_rates"]) == {"1", "3"} and min(row["firing_rates"].values()) > 0.01
    assert row["counts"]["sops"] > 0 and row["input_densities"]["2"] > 0 and row["accuracy"] > 0.7
    assert set(row["latency"]) == {"nir-graph", "onnxruntime"} and row["energy"]["loihi2"]["joules_per_sample"] > 0
