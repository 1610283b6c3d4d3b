"""The tvm target on a briefly trained sdt-tiny: llvm on the CPU spike-exact against onnxruntime and
PyTorch, a CUDA artifact for a Jetson built without a GPU, clear errors for broken export directories.

Compiles are slow on a small machine (about 10 s per CPU batch size, 25 s for the CUDA build):
each is done once per module by a fixture, and sdt-tiny is compiled for the CPU at one batch size
only (compiling per batch size, lazily and once, is tested on a tiny graph in test_tvm_fast.py; the
sparse CUDA kernels on a small pruned graph here).
"""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from stdeploy.export.manifest import write_manifest
from stdeploy.data import load_dataset
from stdeploy.errors import ConfigError
from stdeploy.export.onnx_export import export_onnx
from stdeploy.export.validate import record_neurons
from stdeploy.models import build_model, direct_encode
from stdeploy.models.fold import fold_batchnorm
from stdeploy.targets.base import REGISTRY, Target, TargetError, get_target
from stdeploy.targets.profiles import DeviceProfile, load_profile
from stdeploy.targets.tvm.cuda import build_cuda_artifact
from stdeploy.targets.tvm.frontend import densify_sparse_initializers, load_onnx_graph
from stdeploy.targets.tvm.host import cpu_target, host_cpu_name
from stdeploy.targets.tvm.sdk import INSTALL_HINT
from stdeploy.targets.tvm.target import TVMTarget
from stdeploy.train import TrainConfig, train

pytestmark = pytest.mark.tvm

TEST_IMAGES = 32
TIMESTEPS = 2  # the shared sdt-tiny's weights at T = 2: TVM's builds unroll every step, two keep the membrane's carry
LOGITS_ATOL = 1e-4
EM_X86_64, EM_AARCH64 = 62, 183
CROSS_COMPILER = "aarch64-linux-gnu-g++"
CROSS_MISSING = (f"{CROSS_COMPILER} is not installed (apt-get install -y g++-aarch64-linux-gnu; `make test` installs it): "
                 "the aarch64 host part of the Jetson artifact cannot be built here")


def write_export_dir(path, onnx_bytes: bytes | None = None, manifest: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    if onnx_bytes is not None:
        (path / "model.onnx").write_bytes(onnx_bytes)
    write_manifest(path, manifest or {"artifacts": {"onnx": {"file": "model.onnx"}}})
    return path


def elf_machine_code(path) -> int:
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and head[5] == 1, f"{path} is not a little-endian ELF file"
    return int.from_bytes(head[18:20], "little")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_sdt):
    """The run's shared sdt-tiny (conftest: trained briefly on 480 digits, two epochs, about 85% test
    accuracy, about 20% of the head neurons spiking) with its weights at T = 2 (its first two steps,
    checked here), folded and exported, with 32 test images and the PyTorch outputs."""
    model, data = trained_sdt
    short = build_model("sdt-tiny", timesteps=TIMESTEPS)
    short.load_state_dict(model.state_dict())
    folded = fold_batchnorm(short).eval()
    export_dir = tmp_path_factory.mktemp("export")
    export_onnx(folded, export_dir / "model.onnx")
    write_export_dir(export_dir)
    images = torch.stack([data.test[i][0] for i in range(TEST_IMAGES)])
    x = direct_encode(images, folded.cfg.timesteps)  # (T, 32, 1, 8, 8)
    with torch.no_grad():  # direct encoding: the T = 2 model is the trained model's first two steps
        preset = record_neurons(fold_batchnorm(model).eval(), direct_encode(images, model.cfg.timesteps))[1]["head.lif"]["spikes"]
        logits, rec = record_neurons(folded, x)
        assert torch.equal(rec["head.lif"]["spikes"], preset[:TIMESTEPS])
    return {"dir": export_dir, "x": x.numpy(), "logits": logits.numpy(), "spikes": rec["head.lif"]["spikes"].numpy()}


@pytest.fixture(scope="module")
def ort(exported):
    return get_target("onnxruntime").compile(exported["dir"], load_profile("cpu"))


@pytest.fixture(scope="module")
def cpu(exported):
    return TVMTarget().compile(exported["dir"], load_profile("cpu"), batch_size=TEST_IMAGES)


@pytest.fixture(scope="module")
def cuda(exported, tmp_path_factory):
    """The jetson-orin-nano build; where the cross compiler is missing, the same build with an
    x86-64 host (the aarch64 test then skips, saying why)."""
    profile = load_profile("jetson-orin-nano")
    cross_missing = shutil.which(CROSS_COMPILER) is None
    if cross_missing:
        profile = dataclasses.replace(profile, tvm={"target": profile.tvm["target"], "host": {"kind": "llvm"}})
    out = tmp_path_factory.mktemp("cuda")
    return TVMTarget().compile(exported["dir"], profile, out_dir=out), cross_missing, out


# ------------------------------------------------------------------------------------ target


def test_registered_and_available():
    assert REGISTRY["tvm"] == "stdeploy.targets.tvm.target:TVMTarget"
    target = get_target("tvm")
    assert isinstance(target, TVMTarget) and isinstance(target, Target) and target.name == "tvm"
    ok, message = target.available()
    assert ok, message
    assert "apache-tvm 0.27" in message


def test_unavailable_without_tvm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tvm", None)  # `import tvm` now raises ImportError
    ok, message = TVMTarget().available()
    assert not ok and INSTALL_HINT in message and INSTALL_HINT == "pip install 'stdeploy[tvm]'"


def test_cpu_target_names_the_host_cpu():
    target = cpu_target(load_profile("cpu"))
    assert target["kind"] == "llvm" and target["num-cores"] >= 1
    cpu = host_cpu_name()
    assert target.get("mcpu") == cpu and cpu != "native"
    profile = dataclasses.replace(load_profile("cpu"), tvm={"target": {"kind": "llvm", "mcpu": "x86-64", "num-cores": 1}})
    assert cpu_target(profile) == {"kind": "llvm", "mcpu": "x86-64", "num-cores": 1}
    native = dataclasses.replace(load_profile("cpu"), tvm={"target": {"kind": "llvm", "mcpu": "native"}})
    assert cpu_target(native).get("mcpu") == cpu


# ------------------------------------------------------------------------------------ CPU


def test_cpu_matches_onnxruntime_and_pytorch_exactly(exported, cpu, ort):
    x = exported["x"]
    result = cpu.run(x)
    reference = ort.run(x)
    assert result.logits.shape == (TEST_IMAGES, 10) and result.spikes.shape == exported["spikes"].shape
    assert 0.05 < exported["spikes"].mean() < 0.95  # a realistically active model
    assert np.count_nonzero(result.spikes != reference.spikes) == 0
    assert np.count_nonzero(result.spikes != exported["spikes"]) == 0
    np.testing.assert_allclose(result.logits, reference.logits, rtol=0, atol=LOGITS_ATOL)
    np.testing.assert_allclose(result.logits, exported["logits"], rtol=0, atol=LOGITS_ATOL)
    assert result.seconds > 0
    assert cpu.compiled_shapes == [(TIMESTEPS, TEST_IMAGES, 1, 8, 8)] and cpu.prepare(TEST_IMAGES) == 0.0  # compiled up front, once
    assert result.info["path"].startswith("spike-adaptive conv2d/matmul + BLAS matmul/conv2d + ") and result.info["tvm_target"]["kind"] == "llvm"
    calls = [c["calls"] for c in result.info["builds"][str(TEST_IMAGES)]["spike_conv"]]
    assert all(c["gather"] + c["blas"] >= 1 for c in calls)
    assert sum(c["gather"] for c in calls[1:]) >= 1             # the spiking convolutions skip zeros


def test_wrong_input_shape_is_refused(cpu):
    with pytest.raises(ValueError, match=rf"expected input \(T={TIMESTEPS}, B, C=1, H=8, W=8\)"):
        cpu.run(np.zeros((TIMESTEPS, 2, 1, 9, 9), dtype=np.float32))


# ------------------------------------------------------------------------------------ CUDA


def test_cuda_artifact_loads_here_with_kernels(cuda):
    import tvm

    runnable, cross_missing, out = cuda
    info = runnable.info
    assert info["tvm_target"]["target"]["arch"] == "sm_87" and info["batch_size"] == 1
    assert info["cuda_driver"] in ("real", "stand-in") and info["loaded_back"]
    kernels = info["kernels"]
    assert kernels and all(k.endswith("_kernel") for k in kernels)
    host_copy = info["artifacts"]["build_host" if "build_host" in info["artifacts"] else "device"]
    path = out / "model.jetson-orin-nano.x86_64.so" if not cross_missing else out / "model.jetson-orin-nano.so"
    assert host_copy["path"] == str(path) and path.stat().st_size == host_copy["bytes"] > 0
    assert elf_machine_code(path) == EM_X86_64
    lib = tvm.runtime.load_module(str(path))

    def cuda_module(m):
        return m if m.kind == "cuda" else next((c for c in map(cuda_module, m.imports) if c is not None), None)

    device_code = cuda_module(lib)
    assert device_code is not None, "the loaded module imports no compiled CUDA module"
    assert all(device_code.implements_function(k) for k in kernels)
    sidecar = json.loads((out / "model.jetson-orin-nano.json").read_text())
    assert sidecar["kernels"] == kernels and sidecar["artifacts"] == info["artifacts"]


def test_cuda_artifact_for_the_jetson_host_is_aarch64(cuda):
    runnable, cross_missing, out = cuda
    if cross_missing:
        pytest.skip(CROSS_MISSING)
    device = runnable.info["artifacts"]["device"]
    path = out / "model.jetson-orin-nano.so"
    assert device["path"] == str(path) and device["machine"] == "aarch64" and device["bytes"] == path.stat().st_size
    assert elf_machine_code(path) == EM_AARCH64
    assert runnable.info["tvm_target"]["host"] == {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}


def test_cuda_run_needs_a_gpu(cuda, exported):
    import tvm

    runnable, _, _ = cuda
    if tvm.cuda().exist:
        pytest.skip("a CUDA GPU is present: test_cuda_runs_on_gpu covers running")
    with pytest.raises(TargetError, match="no CUDA GPU here; the module was built for jetson-orin-nano"):
        runnable.run(exported["x"][:, :1])


def test_cuda_artifact_is_reused_while_its_key_matches(cuda, exported, tmp_path, monkeypatch):
    from stdeploy.targets.tvm import cuda as tvm_cuda
    from stdeploy.targets.tvm.cuda_artifacts import load_cuda_artifact

    runnable, _, out = cuda
    again = TVMTarget().compile(exported["dir"], runnable.profile, out_dir=out)  # no build: loaded from the sidecar
    paths = [a["path"] for a in runnable.info["artifacts"].values()]
    assert again.info["reused"] in paths and again.info["kernels"] == runnable.info["kernels"]
    assert again.info["onnx_sha256"] == runnable.info["onnx_sha256"] and again.info["batch_size"] == 1
    graph = load_onnx_graph(exported["dir"])
    for change in ({"batch_size": 2}, {"fast_math": True}, {"sparse": "on"}, {"onnx_sha256": "0" * 64}):
        key = {**tvm_cuda.artifact_key(graph, runnable.profile, 1, False, "off"), **change}
        loaded, stale = load_cuda_artifact(runnable.profile, key, out)
        assert loaded is None
        assert f"built from other {next(iter(change))}" in stale
    # a runtime-only TVM (the deployment machine) loads what matches and names what it cannot build
    monkeypatch.setattr(tvm_cuda, "runtime_only", lambda: True)
    assert TVMTarget().compile(exported["dir"], runnable.profile, out_dir=out).info["reused"] in paths
    with pytest.raises(TargetError, match=r"no prebuilt CUDA artifact .* at batch 4 .*built from other batch_size.*runtime-only"):
        TVMTarget().compile(exported["dir"], runnable.profile, batch_size=4, out_dir=out)
    monkeypatch.undo()
    # a damaged library is named, not silently rebuilt over
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    sidecar = json.loads((broken / "model.jetson-orin-nano.json").read_text())
    for a in sidecar["artifacts"].values():
        a["path"] = str(broken / Path(a["path"]).name)
        Path(a["path"]).write_bytes(b"\x7fELF truncated")
    (broken / "model.jetson-orin-nano.json").write_text(json.dumps(sidecar))
    with pytest.raises(TargetError, match=r"broken/model\.jetson-orin-nano\.json: .*(sha256 does not match|the manifest says).*to rebuild"):
        TVMTarget().compile(exported["dir"], runnable.profile, out_dir=broken)
    # ... and so is a library the manifest does not vouch for, or one outside the folder, even when
    # the sidecar itself is listed: a compiled library is code, its constructors run when loaded
    from stdeploy.export.manifest import add_listed_file
    add_listed_file(broken, "model.jetson-orin-nano.json")
    with pytest.raises(TargetError, match=r"model\.jetson-orin-nano.*\.so: .*sha256 does not match|bytes, the manifest says"):
        TVMTarget().compile(exported["dir"], runnable.profile, out_dir=broken)
    for a in sidecar["artifacts"].values():
        a["path"] = str(tmp_path / Path(a["path"]).name)  # a path outside the folder
    (broken / "model.jetson-orin-nano.json").write_text(json.dumps(sidecar))
    add_listed_file(broken, "model.jetson-orin-nano.json")
    with pytest.raises(TargetError, match=r"names a library outside .*not loaded"):
        TVMTarget().compile(exported["dir"], runnable.profile, out_dir=broken)


def pruned_linear_export(path, t: int = 4, k: int = 64, hidden: int = 48, classes: int = 10, zeros: float = 0.9):
    """A small stdeploy-shaped graph: input (T, B, 1, 8, 8) -> linear 64->48 -> threshold (spikes)
    -> mean over T -> linear 48->10 (logits), both weights with ``zeros`` of their entries zero
    (a CUDA build of it takes seconds; the sdt-tiny one, a minute on the shared machine)."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(k, hidden)).astype(np.float32), rng.normal(size=(hidden, classes)).astype(np.float32)
    for w in (w1, w2):
        w[rng.random(w.shape) < zeros] = 0.0
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.array([t, -1, k], np.int64), "shape"), numpy_helper.from_array(np.array(0.5, np.float32), "theta")]
    nodes = [helper.make_node("Reshape", ["input", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w1"], ["current"]),
             helper.make_node("GreaterOrEqual", ["current", "theta"], ["fired"]),
             helper.make_node("Cast", ["fired"], ["spikes"], to=onnx.TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["spikes"], ["rate"], axes=[0], keepdims=0), helper.make_node("MatMul", ["rate", "w2"], ["logits"])]
    graph = helper.make_graph(
        nodes, "pruned", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [t, "batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, classes]),
         helper.make_tensor_value_info("spikes", onnx.TensorProto.FLOAT, [t, None, hidden])], inits)
    return write_export_dir(path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())


def test_cuda_sparse_kernels_for_pruned_linears(tmp_path):
    """sparse="on": linears with >= 50% zeros run the CSR kernel's GPU schedule (built here for sm_90;
    run against PyTorch on an H200 in the session notes: 0 spike mismatches). On a small graph of two
    pruned linears: the dense sdt-tiny CUDA build is test_cuda_artifact_loads_here_with_kernels'."""
    d = pruned_linear_export(tmp_path / "export")
    runnable = TVMTarget().compile(d, load_profile("nvidia-h100"), batch_size=2, sparse="on")
    info = runnable.info
    chosen = [layer for layer in info["sparse_layers"] if layer["chosen"] == "sparse"]
    assert len(chosen) == 2 and all(layer["density"] < 0.2 for layer in chosen)
    assert info["path"].endswith("+ sparse kernels") and info["sparse"] == "on"
    assert sum(k.startswith("sparse_matmul") for k in info["kernels"]) >= 1
    assert (d / "model.nvidia-h100.so").is_file() and info["tvm_target"]["target"]["arch"] == "sm_90"


@pytest.mark.gpu
def test_cuda_runs_on_gpu(exported, ort, tmp_path):
    import tvm

    from stdeploy.targets.tvm.cuda_standin_driver import ensure_tvm_cuda_runtime

    ensure_tvm_cuda_runtime()
    if not tvm.cuda().exist:
        pytest.skip("no CUDA GPU on this machine")
    arch = "sm_" + tvm.cuda().compute_version.replace(".", "")
    profile = DeviceProfile(name="local-gpu", kind="cuda", tvm={"target": {"kind": "cuda", "arch": arch}, "host": {"kind": "llvm"}})
    runnable = TVMTarget().compile(exported["dir"], profile, batch_size=TEST_IMAGES, out_dir=tmp_path)
    result = runnable.run(exported["x"])
    reference = ort.run(exported["x"])
    flips = np.count_nonzero(result.spikes != reference.spikes)
    assert flips <= 1e-3 * reference.spikes.size  # other summation order and FMA: rare flips at threshold
    if flips == 0:
        np.testing.assert_allclose(result.logits, reference.logits, rtol=0, atol=LOGITS_ATOL)


def test_missing_cross_compiler_is_named_with_its_package(exported, tmp_path):
    profile = DeviceProfile(name="arm-board", kind="cuda", tvm={
        "target": {"kind": "cuda", "arch": "sm_87"}, "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
        "cross_compiler": "aarch64-nowhere-linux-gnu-g++"})
    with pytest.raises(TargetError, match=r"aarch64-nowhere-linux-gnu-g\+\+.*apt-get install -y g\+\+-aarch64-nowhere-linux-gnu"):
        TVMTarget().compile(exported["dir"], profile, out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ errors


def test_sparse_initializers_are_densified(exported, tmp_path):
    model = onnx.load(exported["dir"] / "model.onnx")
    graph = model.graph
    weights = {n.input[1] for n in graph.node if n.op_type == "MatMul"}
    init = max((i for i in graph.initializer if i.name in weights), key=lambda i: np.prod(i.dims))
    dense = numpy_helper.to_array(init).copy()
    dense.ravel()[::3] = 0  # make it visibly sparse, then store it sparse
    flat = dense.ravel()
    index = np.flatnonzero(flat).astype(np.int64)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(flat[index], name=init.name),
                                       numpy_helper.from_array(index, name=init.name + ".indices"), list(dense.shape))
    graph.initializer.remove(init)
    graph.sparse_initializer.append(sparse)
    densified, names = densify_sparse_initializers(model)
    assert names == [init.name] and len(model.graph.sparse_initializer) == 1  # the input is not changed
    restored = next(i for i in densified.graph.initializer if i.name == init.name)
    np.testing.assert_array_equal(numpy_helper.to_array(restored), dense)
    write_export_dir(tmp_path, model.SerializeToString())
    loaded = load_onnx_graph(tmp_path)
    assert loaded.densified == (init.name,) and not len(loaded.model.graph.sparse_initializer)
    from tvm.relax.frontend import onnx as rx_onnx

    rx_onnx.from_onnx(loaded.model, shape_dict={"input": [TIMESTEPS, 1, 1, 8, 8]})  # the frontend accepts it now


def _tiny_onnx(input_name: str) -> bytes:
    node = helper.make_node("Relu", [input_name], ["logits"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, [1, 10])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 10])])
    return helper.make_model(graph).SerializeToString()


@pytest.mark.parametrize("case, message", [
    ("no directory", "export directory not found: {dir}"),
    ("no manifest", "{dir}: no manifest.json"),
    ("no onnx artifact", "{dir}: no 'onnx' artifact"),
    ("missing file", "manifest lists model.onnx, which is missing"),
    ("corrupt onnx", "{dir}/model.onnx: not a readable ONNX model"),
    ("other graph", "{dir}/model.onnx: not an unrolled stdeploy graph: no input named 'input'"),
])
def test_broken_export_dir_names_the_path(tmp_path, case, message):
    d = tmp_path / "export"
    if case == "no manifest":
        d.mkdir()
    elif case == "no onnx artifact":
        write_export_dir(d, manifest={"artifacts": {"nir": {"file": "model.nir"}}})
    elif case == "missing file":
        write_export_dir(d)
    elif case == "corrupt onnx":
        write_export_dir(d, b"not an onnx model")
    elif case == "other graph":
        write_export_dir(d, _tiny_onnx("x"))
    with pytest.raises(TargetError) as err:
        TVMTarget().compile(d, load_profile("cpu"))
    assert message.format(dir=d) in str(err.value)


def test_bad_options_and_profiles_are_refused(exported):
    with pytest.raises(ConfigError, match="unknown tvm target option"):
        TVMTarget().compile(exported["dir"], load_profile("cpu"), threads=2)
    with pytest.raises(TargetError, match="lava profile"):
        TVMTarget().compile(exported["dir"], load_profile("loihi2"))
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        TVMTarget().compile(exported["dir"], load_profile("cpu"), batch_size=0)
    with pytest.raises(ConfigError, match="sparse='on' is for cuda profiles"):
        TVMTarget().compile(exported["dir"], load_profile("cpu"), sparse="on")


def test_build_cuda_artifact_takes_a_profile_name(exported, tmp_path):
    with pytest.raises(TargetError, match='device profile cpu is a cpu profile; a CUDA artifact needs kind = "cuda"'):
        build_cuda_artifact(exported["dir"], "cpu", tmp_path)
    with pytest.raises(ConfigError, match="unknown device profile 'no-such-board'"):
        build_cuda_artifact(exported["dir"], "no-such-board", tmp_path)
