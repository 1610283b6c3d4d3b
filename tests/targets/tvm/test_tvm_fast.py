"""The fast TVM CPU path: BLAS kernels for matmul/conv2d, MetaSchedule tuning with a database
that is reused (a second `tune` measures nothing), resumed, and refused with a clear error when
corrupt (running then falls back to the untuned module and says so).

Tuning runs on a tiny stdeploy-shaped ONNX graph (a few tasks, 2 trials each) so it takes
seconds, not the tens of minutes a full model needs on 2 cores.
"""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from stdeploy.export.manifest import write_manifest
from stdeploy.cli import main as cli_main
from stdeploy.targets.profiles import load_profile
from stdeploy.targets.tvm.database import TuningDatabaseError
from stdeploy.targets.tvm.frontend import load_onnx_graph, relax_module
from stdeploy.targets.tvm.kernels.blas import conv2d_nchw
from stdeploy.targets.tvm.kernels.routing import route_to_external_kernels
from stdeploy.targets.tvm.target import TVMTarget
from stdeploy.targets.tvm.tuning import tune

pytestmark = pytest.mark.tvm
T, B = 2, 4


def tiny_export(path, seed: int = 0):
    """x (T, B, 1, 2, 2) -> linear 4->6 -> threshold (spikes) -> mean over T -> linear 6->3
    (logits): the interface of an unrolled stdeploy graph, small enough to tune in seconds."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(4, 6)).astype(np.float32)
    w1[rng.random(w1.shape) < 0.5] = 0.0
    w2 = rng.normal(size=(6, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.array([T, -1, 4], np.int64), "shape"),
             numpy_helper.from_array(np.array(0.5, np.float32), "theta")]
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["current"]),
        helper.make_node("GreaterOrEqual", ["current", "theta"], ["fired"]),
        helper.make_node("Cast", ["fired"], ["spikes"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["spikes"], ["rate"], axes=[0], keepdims=0),
        helper.make_node("MatMul", ["rate", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [T, "batch", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3]),
         helper.make_tensor_value_info("spikes", TensorProto.FLOAT, [T, None, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path / "model.onnx")
    write_manifest(path, {"artifacts": {"onnx": {"file": "model.onnx"}}})
    return path, w1, w2


def reference(x, w1, w2):
    spikes = (x.reshape(T, -1, 4) @ w1 >= 0.5).astype(np.float32)
    return spikes.mean(0) @ w2, spikes


@pytest.mark.parametrize("stride,padding", [((1, 1), (1, 1, 1, 1)), ((2, 1), (0, 1, 2, 0)), ((1, 2), (0, 0, 0, 0))])
def test_blas_conv2d_equals_torch(stride, padding):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 4, 9, 7)).astype(np.float32)
    w = rng.normal(size=(5, 4, 3, 2)).astype(np.float32)
    top, left, bottom, right = padding
    xp = torch.nn.functional.pad(torch.from_numpy(x), (left, right, top, bottom))
    expected = torch.nn.functional.conv2d(xp, torch.from_numpy(w), stride=stride).numpy()
    np.testing.assert_allclose(conv2d_nchw(x, w, stride, padding), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="4 channels"):
        conv2d_nchw(x, w[:, :3], stride, padding)


def test_offload_lists_the_constant_weight_matmuls(tmp_path):

    d, w1, w2 = tiny_export(tmp_path / "e")
    mod, done = route_to_external_kernels(relax_module(load_onnx_graph(d), B))
    assert [(o.op, o.shape) for o in done] == [("matmul", (4, 6)), ("matmul", (6, 3))]
    assert "stdeploy.blas.matmul" in mod.script() and "R.matmul" not in mod.script()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    d, w1, w2 = tiny_export(tmp_path_factory.mktemp("tiny") / "export")
    summary = tune(d, load_profile("cpu"), batch_size=B, trials_per_task=2, sparse="off")
    return d, w1, w2, summary


def test_tune_writes_a_database_that_run_uses(tuned):
    d, w1, w2, summary = tuned
    assert summary["new_trials"] >= 1 and len(summary["tasks"]) >= 1
    assert all(t["records_before"] == 0 for t in summary["tasks"])
    db = summary["database"]
    assert f"cpu-b{B}-blas-" in db and (json.loads(open(f"{db}/tune.json").read())["batch_size"] == B)
    x = np.random.default_rng(2).random((T, B, 1, 2, 2), dtype=np.float32)
    logits, spikes = reference(x, w1, w2)
    assert 0 < spikes.mean() < 1                                   # the layer fires, not saturated
    runnable = TVMTarget().compile(d, load_profile("cpu"), batch_size=B, sparse="off")
    result = runnable.run(x)
    assert result.info["path"] == "spike-adaptive matmul + BLAS matmul/conv2d + MetaSchedule-tuned TIR"
    assert result.info["builds"][str(B)]["database"] == db
    np.testing.assert_array_equal(result.spikes, spikes)
    np.testing.assert_allclose(result.logits, logits, rtol=0, atol=1e-5)
    assert runnable.compiled_shapes == [(T, B, 1, 2, 2)]             # compiled up front
    other = runnable.run(x[:, :3])  # another batch: compiled on first use; no database for it, said so
    assert other.info["builds"]["3"]["path"] == "spike-adaptive matmul + BLAS matmul/conv2d + untuned TIR"
    np.testing.assert_array_equal(other.spikes, spikes[:, :3])
    np.testing.assert_allclose(other.logits, logits[:3], rtol=0, atol=1e-5)
    # one executable per batch size, each compiled once: nothing is recompiled when a batch comes back
    assert runnable.compiled_shapes == [(T, B, 1, 2, 2), (T, 3, 1, 2, 2)]
    assert set(runnable.info["compile_seconds"]) == {str(B), "3"}
    assert runnable.prepare(3) == 0.0 and runnable.prepare(B) == 0.0
    np.testing.assert_array_equal(runnable.run(x).spikes, spikes)
    assert len(runnable.compiled_shapes) == 2


def test_second_tune_measures_nothing(tuned):
    d, _, _, first = tuned
    again = tune(d, load_profile("cpu"), batch_size=B, trials_per_task=2, sparse="off")
    assert again["database"] == first["database"]
    assert again["new_trials"] == 0 and all(t["new_trials"] == 0 for t in again["tasks"])
    assert [t["records_before"] for t in again["tasks"]] == [t["records_before"] + t["new_trials"] for t in first["tasks"]]


def test_tuned_is_required_when_asked(tmp_path):
    d, _, _ = tiny_export(tmp_path / "fresh", seed=3)
    runnable = TVMTarget().compile(d, load_profile("cpu"), schedule="tuned", sparse="off")
    with pytest.raises(Exception, match="no tuning database.*stdeploy tune"):
        runnable.prepare(B)


def test_corrupt_database_is_named_and_run_falls_back(tuned, tmp_path):
    import shutil

    d0, w1, w2, summary = tuned
    d = tmp_path / "copy"
    shutil.copytree(d0, d)
    db = d / "tuning" / summary["database"].rsplit("/", 1)[1]
    (db / "database_tuning_record.json").write_text('[0, [["not", "a record"\n')
    with pytest.raises(TuningDatabaseError, match="database_tuning_record.json, line 1: corrupt tuning database"):
        tune(d, load_profile("cpu"), batch_size=B, trials_per_task=2, sparse="off")
    x = np.random.default_rng(4).random((T, B, 1, 2, 2), dtype=np.float32)
    with pytest.warns(UserWarning, match=r"database_tuning_record.json, line 1: corrupt tuning database .*; running without the tuning database"):
        result = TVMTarget().compile(d, load_profile("cpu"), batch_size=B, sparse="off").run(x)
    assert result.info["path"] == "spike-adaptive matmul + BLAS matmul/conv2d + untuned TIR"
    assert "corrupt" in result.info["builds"][str(B)]["database_problem"]
    np.testing.assert_array_equal(result.spikes, reference(x, w1, w2)[1])


def test_tune_cli_reports_and_refuses_cuda_profiles(tuned, capsys):
    d, _, _, _ = tuned
    assert cli_main(["tune", str(d), "--trials", "2", "--batch", str(B), "--sparse", "off", "--quiet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["new_trials"] == 0 and out["batch_size"] == B
    assert cli_main(["tune", str(d), "--device", "jetson-orin-nano", "--quiet"]) == 2
    assert "cuda profile" in capsys.readouterr().err


def test_untuned_tir_matches_blas(tuned):
    d, w1, w2, _ = tuned
    x = np.random.default_rng(5).random((T, B, 1, 2, 2), dtype=np.float32)
    plain = TVMTarget().compile(d, load_profile("cpu"), kernels="tir", schedule="untuned", sparse="off").run(x)
    assert plain.info["path"] == "untuned TIR"
    np.testing.assert_array_equal(plain.spikes, reference(x, w1, w2)[1])


def test_second_build_reads_the_crossover_cache(tmp_path, monkeypatch):
    """The spike kernels' density thresholds are measured by the first build of a shape and read
    back by the next (the build info says which, and counts), in ``EXPORT_DIR/tuning/`` by
    default or ``$STDEPLOY_CACHE_DIR/tvm/``; the module's outputs are PyTorch's either way."""
    from stdeploy.targets.tvm.database import CROSSOVERS

    monkeypatch.delenv("STDEPLOY_CACHE_DIR", raising=False)
    d, w1, w2 = tiny_export(tmp_path / "e")
    x = (np.random.default_rng(2).random((T, B, 1, 2, 2)) < 0.5).astype(np.float32)
    logits, spikes = reference(x, w1, w2)
    assert 0 < spikes.mean() < 1                                   # the layer fires, not saturated

    def build():
        runnable = TVMTarget().compile(d, load_profile("cpu"), batch_size=B, schedule="untuned", sparse="off")
        result = runnable.run(x)
        np.testing.assert_array_equal(result.spikes, spikes)
        np.testing.assert_allclose(result.logits, logits, rtol=0, atol=1e-5)
        return runnable.info["builds"][str(B)]

    first, second = build(), build()
    assert first["crossover_cache"] == {"path": str(d / "tuning" / CROSSOVERS), "measured": 2, "reused": 0}
    assert second["crossover_cache"] == {"path": str(d / "tuning" / CROSSOVERS), "measured": 0, "reused": 2}
    assert [e["threshold"] for e in first["spike_matmul"]] == ["measured"] * 2
    assert [e["threshold"] for e in second["spike_matmul"]] == ["cached"] * 2
    assert [e["max_density"] for e in second["spike_matmul"]] == [e["max_density"] for e in first["spike_matmul"]]
    assert second["spike_matmul"][0]["crossover"]["statistic"] == "median"
    monkeypatch.setenv("STDEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    third = build()                                                # another cache: measured there
    assert third["crossover_cache"]["measured"] == 2 and (tmp_path / "cache" / "tvm" / CROSSOVERS).is_file()
