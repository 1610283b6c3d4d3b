"""The sparse-weight matmul path for TVM Relax: the compressed weight, the TIR kernel against numpy's
dense ``x @ W``, the Relax rewrite (llvm compile and run; CUDA build only) and its error messages.

Threads are pinned to one (numpy's BLAS, TVM's pool, torch) so the suite does not crowd a shared
machine; the whole file runs in well under a minute.
"""

import os
import re
import shutil
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np
import pytest

try:  # without TVM every test here is skipped, or fails where CI is set (the tvm marker: tests/conftest.py)
    import tvm
    from tvm import relax
except ImportError:
    tvm = relax = None

from stdeploy.errors import ShapeError  # noqa: E402
from stdeploy.targets.tvm.kernels.sparse import (  # noqa: E402
    CompiledSparseMatmul, CSRWeight, csr_from_dense, default_cpu_target, density_choice, measured_choice,
    rewrite_sparse_matmuls, sparse_matmul_kernel,
)

pytestmark = pytest.mark.tvm

ATOL = 1e-5
NVCC_MISSING = "nvcc (CUDA 13 toolkit) is not on PATH: the CUDA kernels cannot be compiled here"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import tvm_ffi

    tvm_ffi.get_global_func("runtime.config_threadpool")(0, 1)
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def cpu_target():
    return default_cpu_target(1)


def _sparse_weight(rng, k, n, sparsity):
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[rng.random((k, n)) < sparsity] = 0
    return w


# --------------------------------------------------------------------------------------------
# The compressed weight


def test_csr_round_trip_and_layout():
    rng = np.random.default_rng(0)
    w = _sparse_weight(rng, 37, 23, 0.8)
    w[5, :] = 0                      # an input feature no output uses
    w[:, 7] = 0                      # an output feature with no weights
    csr = csr_from_dense(w)
    assert isinstance(csr, CSRWeight)
    assert csr.shape == (37, 23) and csr.nnz == np.count_nonzero(w)
    assert csr.density == pytest.approx(np.count_nonzero(w) / w.size)
    assert csr.indptr.shape == (24,) and csr.indptr.dtype == np.int32 and csr.indices.dtype == np.int32
    assert csr.indptr[7] == csr.indptr[8]                      # output 7 is empty
    assert 5 not in set(csr.indices.tolist())
    for n in range(23):                                        # per output: ascending k, W's column n
        ks = csr.indices[csr.indptr[n]:csr.indptr[n + 1]]
        assert np.all(np.diff(ks) > 0)
        np.testing.assert_array_equal(csr.values[csr.indptr[n]:csr.indptr[n + 1]], w[ks, n])
    np.testing.assert_array_equal(csr.to_dense(), w)
    with pytest.raises((AttributeError, TypeError)):
        csr.nnz = 3                                            # frozen
    with pytest.raises(ValueError):
        csr.values[0] = 1.0                                    # read-only arrays


@pytest.mark.parametrize("bad, shape_text", [
    (np.ones(5, np.float32), "(5,)"),
    (np.ones((2, 3, 4), np.float32), "(2, 3, 4)"),
    (np.ones((0, 4), np.float32), "(0, 4)"),
])
def test_csr_from_dense_rejects_non_matrices(bad, shape_text):
    with pytest.raises(ValueError, match=r"W must .*" + re.escape(shape_text)):
        csr_from_dense(bad)


def test_csr_weight_checks_its_arrays():
    good = csr_from_dense(np.eye(4, dtype=np.float32))
    with pytest.raises(ShapeError, match=r"\(4, 4\).*indptr must have shape \(5,\)"):
        CSRWeight(indptr=good.indptr[:-1], indices=good.indices, values=good.values, shape=(4, 4))
    with pytest.raises(ShapeError, match=r"indices must lie in \[0, 3\)"):
        CSRWeight(indptr=good.indptr, indices=good.indices, values=good.values, shape=(3, 4))
    with pytest.raises(ShapeError, match="rise strictly"):
        CSRWeight(indptr=np.array([0, 2]), indices=np.array([1, 0]), values=np.ones(2), shape=(2, 1))


# --------------------------------------------------------------------------------------------
# The kernel


KERNEL_CASES = {
    # name: (M, K, N, sparsity)
    "full tiles": (128, 64, 48, 0.9),
    "partial tile, odd K and N": (70, 37, 19, 0.7),
    "few rows, output groups": (24, 40, 100, 0.95),
    "wide K, 32-row tiles": (96, 200, 40, 0.9),
    "one row": (1, 16, 33, 0.5),
    "fully dense": (64, 24, 16, 0.0),
    "all zero": (10, 8, 5, 1.0),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_equals_numpy_dense(case, cpu_target):
    m, k, n, sparsity = KERNEL_CASES[case]
    rng = np.random.default_rng(list(KERNEL_CASES).index(case))
    w = _sparse_weight(rng, k, n, sparsity)
    if 0 < sparsity < 1:
        w[k // 2, :] = 0             # an all-zero row (input feature)
        w[:, n // 2] = 0             # an all-zero column (output feature)
    x = rng.standard_normal((m, k)).astype(np.float32)
    kernel = CompiledSparseMatmul(csr_from_dense(w), m, cpu_target)
    y = kernel(x)
    assert y.shape == (m, n) and y.dtype == np.float32
    np.testing.assert_allclose(y, x @ w, rtol=0, atol=ATOL)
    if 0 < sparsity < 1:
        assert np.all(y[:, n // 2] == 0)


def test_kernel_on_magnitude_pruned_weight_and_spikes(cpu_target):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((96, 80)) * 0.2).astype(np.float32)
    w[np.abs(w) < np.quantile(np.abs(w), 0.9)] = 0           # keep the largest 10 %
    csr = csr_from_dense(w)
    assert csr.density == pytest.approx(0.1, abs=0.01)
    kernel = CompiledSparseMatmul(csr, 4 * 3 * 5, cpu_target)
    spikes = (rng.random((4, 3, 5, 96)) < 0.3).astype(np.float32)  # leading dims are flattened into M
    np.testing.assert_allclose(kernel(spikes), spikes @ w, rtol=0, atol=ATOL)
    real = rng.standard_normal((4, 3, 5, 96)).astype(np.float32)
    np.testing.assert_allclose(kernel(real), real @ w, rtol=0, atol=ATOL)


def test_kernel_rejects_mismatched_shapes(cpu_target):
    csr = csr_from_dense(np.eye(8, 4, dtype=np.float32))
    kernel = CompiledSparseMatmul(csr, 6, cpu_target)
    with pytest.raises(ValueError, match=r"x of shape \(6, 5\) does not match W \(8, 4\)"):
        kernel(np.ones((6, 5), np.float32))
    with pytest.raises(ValueError, match=r"x of shape \(7, 8\)"):
        kernel(np.ones((7, 8), np.float32))
    with pytest.raises(ValueError, match=r"M .* positive integer, got 0 for W \(8, 4\)"):
        sparse_matmul_kernel(csr, 0)
    with pytest.raises(ValueError, match="no schedule for target kind 'rocm'"):
        sparse_matmul_kernel(csr, 4, {"kind": "rocm"})


# --------------------------------------------------------------------------------------------
# The Relax rewrite


def _onnx_model(rng):
    """x (2, 3, 5, 32) -> MatMul W0 (90 % zeros) -> Add b -> MatMul W1 (dense) -> MatMul W2 (95 % zeros)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = {"W0": _sparse_weight(rng, 32, 48, 0.9), "b0": rng.standard_normal(48).astype(np.float32),
               "W1": rng.standard_normal((48, 24)).astype(np.float32), "W2": _sparse_weight(rng, 24, 16, 0.95)}
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"]), helper.make_node("Add", ["h0", "b0"], ["h1"]),
             helper.make_node("MatMul", ["h1", "W1"], ["h2"]), helper.make_node("MatMul", ["h2", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "sparse_linears",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5, 16])],
                              [numpy_helper.from_array(v, name) for name, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model, weights


@pytest.fixture(scope="module")
def onnx_module():
    from tvm.relax.frontend import onnx as rx_onnx

    rng = np.random.default_rng(7)
    model, weights = _onnx_model(rng)
    mod = rx_onnx.from_onnx(model, shape_dict={"x": [2, 3, 5, 32]})
    x = rng.standard_normal((2, 3, 5, 32)).astype(np.float32)
    return mod, weights, x


def _run_llvm(mod, target, x):
    ex = tvm.compile(mod, target=tvm.target.Target(target))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy()


def _call_tir_targets(mod) -> list[str]:
    return [line.split("cls.")[1].split(",")[0] for line in mod.script(show_meta=False).splitlines() if "R.call_tir(" in line]


def test_rewrite_compiles_runs_and_matches_dense(onnx_module, cpu_target):
    mod, weights, x = onnx_module
    before = mod.script(show_meta=False)
    new, report = rewrite_sparse_matmuls(mod, cpu_target, density_choice(0.5))
    assert mod.script(show_meta=False) == before              # the input module is left alone
    assert [(r["index"], r["shape"], r["M"], r["chosen"]) for r in report] == [
        (0, (32, 48), 30, "sparse"), (1, (48, 24), 30, "dense"), (2, (24, 16), 30, "sparse")]
    assert report[0]["density"] == pytest.approx(np.count_nonzero(weights["W0"]) / weights["W0"].size, abs=1e-4)
    assert report[1]["density"] == 1.0
    kernels = _call_tir_targets(new)
    assert len(kernels) == 2 and all(k.startswith("sparse_matmul_llvm_m30_") for k in kernels)
    expected = ((x @ weights["W0"] + weights["b0"]) @ weights["W1"]) @ weights["W2"]
    dense_out, sparse_out = _run_llvm(mod, cpu_target, x), _run_llvm(new, cpu_target, x)
    np.testing.assert_allclose(dense_out, expected, rtol=0, atol=1e-4)
    # TVM's own (untuned) dense matmul also sums k in ascending order with FMA, and the skipped terms
    # are exact zeros, so on finite inputs the rewrite changes no bit
    np.testing.assert_array_equal(sparse_out, dense_out)


def test_decide_false_leaves_module_unchanged(onnx_module, cpu_target):
    import tvm_ffi

    mod, _, _ = onnx_module
    calls = []

    def never(index, w, x_shape):
        calls.append((index, w.shape, tuple(x_shape)))
        return False

    new, report = rewrite_sparse_matmuls(mod, cpu_target, never)
    assert new is mod and tvm_ffi.structural_equal(new, mod)
    assert calls == [(0, (32, 48), (2, 3, 5, 32)), (1, (48, 24), (2, 3, 5, 48)), (2, (24, 16), (2, 3, 5, 24))]
    assert [r["chosen"] for r in report] == ["dense"] * 3


def test_measured_choice_records_both_times(onnx_module, cpu_target):
    mod, _, x = onnx_module
    decide = measured_choice(cpu_target, min_sparsity=0.5, repeats=2)
    new, report = rewrite_sparse_matmuls(mod, cpu_target, decide)
    assert "reason" in report[1] and "sparse_ms" not in report[1]    # dense weight: not timed
    for r in (report[0], report[2]):
        assert r["sparse_ms"] > 0 and r["dense_ms"] > 0
        assert r["chosen"] == ("sparse" if r["sparse_ms"] < r["dense_ms"] else "dense")
    if any(r["chosen"] == "sparse" for r in report):
        np.testing.assert_allclose(_run_llvm(new, cpu_target, x), _run_llvm(mod, cpu_target, x), rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="cannot time target kind 'cuda'"):
        measured_choice({"kind": "cuda", "arch": "sm_87"})


def test_measured_choice_against_the_spike_kernel(onnx_module, cpu_target):
    """On the default CPU path the dense alternative is BLAS, the spike-input gather kernel or (for
    a pruned weight) the kernel that skips zero inputs and weights, whichever is fastest: the
    sparse kernel is chosen only where it beats all of them."""
    mod, _, _ = onnx_module
    decide = measured_choice(cpu_target, min_sparsity=0.5, repeats=2, spike_kernels=True)
    _, report = rewrite_sparse_matmuls(mod, cpu_target, decide)
    timed = [r for r in report if "sparse_ms" in r]
    assert timed and all(r["gather_ms"] > 0 for r in timed)
    assert all(r["timing"].startswith("median of 2 after 1, interleaved") for r in timed)   # one rule for all three
    for r in timed:
        others = [r["dense_ms"], r["gather_ms"], r.get("skipzero_ms", float("inf"))]   # skip-zero: pruned weights
        assert r["chosen"] == ("sparse" if r["sparse_ms"] < min(others) else "dense")
        assert ("skipzero_ms" in r) == (r["sparsity"] >= 0.5)


def test_rewrite_handles_vector_and_matrix_inputs(cpu_target):
    rng = np.random.default_rng(11)
    w = _sparse_weight(rng, 16, 12, 0.8)
    bb = relax.BlockBuilder()
    v = relax.Var("v", relax.TensorType((16,), "float32"))
    a = relax.Var("a", relax.TensorType((6, 16), "float32"))
    with bb.function("main", [v, a]):
        with bb.dataflow():
            yv = bb.emit(relax.op.matmul(v, relax.const(w)))
            ya = bb.emit(relax.op.matmul(a, relax.const(w)))
            out = bb.emit_output(relax.Tuple([yv, ya]))
        bb.emit_func_output(out)
    new, report = rewrite_sparse_matmuls(bb.get(), cpu_target, lambda i, w, s: True)
    assert [(r["M"], r["chosen"]) for r in report] == [(1, "sparse"), (6, "sparse")]
    assert len(set(_call_tir_targets(new))) == 2
    ex = tvm.compile(new, target=tvm.target.Target(cpu_target))
    xv, xa = rng.standard_normal(16).astype(np.float32), rng.standard_normal((6, 16)).astype(np.float32)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xv), tvm.runtime.tensor(xa))
    np.testing.assert_allclose(got[0].numpy(), xv @ w, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got[1].numpy(), xa @ w, rtol=0, atol=ATOL)


def test_rewrite_skips_symbolic_shapes(cpu_target):
    w = _sparse_weight(np.random.default_rng(2), 16, 8, 0.9)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("batch", "int64"), 16], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(w)))
        bb.emit_func_output(out)
    mod = bb.get()
    new, report = rewrite_sparse_matmuls(mod, cpu_target, lambda i, w, s: pytest.fail("decide called"))
    assert new is mod
    assert report == [{"index": 0, "shape": (16, 8), "M": None, "density": pytest.approx(report[0]["density"]),
                       "chosen": "dense", "reason": "x has no static shape"}]


def test_rewrite_rejects_unknown_targets(onnx_module):
    mod, _, _ = onnx_module
    with pytest.raises(ValueError, match="no sparse kernel for target kind 'metal'"):
        rewrite_sparse_matmuls(mod, {"kind": "metal"}, density_choice())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason=NVCC_MISSING)
def test_cuda_build_of_rewritten_module(onnx_module):
    from stdeploy.targets.tvm.cuda import kernel_names, nvcc_compiler, schedule_gpu
    from stdeploy.targets.tvm.cuda_artifacts import find_module
    from stdeploy.targets.tvm.cuda_standin_driver import ensure_tvm_cuda_runtime

    mod, _, _ = onnx_module
    driver = ensure_tvm_cuda_runtime()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_87"}, host={"kind": "llvm"})
    new, report = rewrite_sparse_matmuls(mod, target, density_choice(0.8))
    assert [r["chosen"] for r in report] == ["sparse", "dense", "sparse"]
    lowered, _ = schedule_gpu(new, target)
    log: dict = {}
    with nvcc_compiler("sm_87", False, log), target:
        ex = tvm.compile(lowered, target=target, relax_pipeline=None)
    kernels = kernel_names("\n".join(log["sources"]))
    sparse = [k for k in kernels if k.startswith("sparse_matmul_cuda_")]
    assert len(sparse) == 2, kernels
    if driver == "stand-in":   # a compiled module (not just source) came back
        assert find_module(ex.mod, "cuda") is not None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason=NVCC_MISSING)
def test_sparse_cuda_benchmark_builds_kernels_for_a_gpu_it_runs_elsewhere(tmp_path, monkeypatch):
    """benchmarks/sparse_cuda.py: ``build`` here writes the CSR arrays, the sparse and the dense
    module for sm_90; ``run`` needs the GPU (measured on an H200: benchmarks/results/gpu-h200.md)."""
    import importlib.util

    import tvm

    script = Path(__file__).resolve().parents[3] / "benchmarks" / "sparse_cuda.py"
    spec = importlib.util.spec_from_file_location("sparse_cuda", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "CASES", [(64, 32, 48, 0.9)])
    assert bench.main(["build", "--arch", "sm_90", "--out", str(tmp_path)]) == 0
    name = bench.case_name(64, 32, 48, 0.9)
    arrays = np.load(tmp_path / f"{name}.npz")
    w = bench.weight(32, 48, 0.9)
    assert tuple(arrays["shape"]) == (32, 48) and len(arrays["values"]) == np.count_nonzero(w)
    np.testing.assert_array_equal(csr_from_dense(w).to_dense(), w)
    for lib in (f"{name}.sparse.so", "dense-64x32x48.so"):
        assert (tmp_path / lib).read_bytes()[:4] == b"\x7fELF"
    if not tvm.cuda().exist:
        with pytest.raises(SystemExit, match="no CUDA GPU here"):
            bench.main(["run", str(tmp_path)])
