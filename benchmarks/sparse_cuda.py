"""The sparse CUDA kernel against dense products on a GPU.

Two steps, because the machine with the GPU may carry only TVM's runtime:

    python benchmarks/sparse_cuda.py build --arch sm_90 --out DIR    # here: needs apache-tvm + nvcc
    python benchmarks/sparse_cuda.py run DIR [--json FILE]            # there: TVM runtime + torch (CUDA)

``build`` writes, per case (a K x N weight with a given share of zeros, M rows of spikes):
``<case>.npz`` (the CSR arrays), ``<case>.sparse.so`` (:mod:`stdeploy.targets.tvm.kernels.sparse`'s GPU
schedule for that weight) and one ``dense-<M>x<K>x<N>.so`` (TVM's own dense matmul with dlight's
default GPU schedule, the kernel the dense model path uses). ``run`` loads them on ``tvm.cuda()``,
checks the sparse result against torch's dense ``x @ W`` (cuBLAS) and prints one table: median
milliseconds over ``--repeats`` calls (each timed with a device sync) of the sparse kernel,
TVM's dense kernel and cuBLAS, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = [(2048, 512, 2048, 0.90), (2048, 512, 2048, 0.95), (2048, 512, 2048, 0.98), (256, 64, 256, 0.90)]


def case_name(m: int, k: int, n: int, sparsity: float) -> str:
    return f"m{m}-k{k}-n{n}-s{round(sparsity * 100)}"


def weight(k: int, n: int, sparsity: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0
    return w


def spikes(m: int, k: int, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).random((m, k)) < 0.2).astype(np.float32)


# ------------------------------------------------------------------------------------ build
def build(arch: str, out: Path) -> list[dict]:
    import tvm
    from tvm import relax

    from stdeploy.targets.tvm.cuda import nvcc_compiler, schedule_gpu
    from stdeploy.targets.tvm.cuda_artifacts import export_library
    from stdeploy.targets.tvm.cuda_standin_driver import ensure_tvm_cuda_runtime
    from stdeploy.targets.tvm.kernels.sparse import csr_from_dense, sparse_matmul_kernel

    ensure_tvm_cuda_runtime()
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    log: dict = {}
    with nvcc_compiler(arch, False, log), target:
        for m, k, n, s in CASES:
            name = case_name(m, k, n, s)
            csr = csr_from_dense(weight(k, n, s))
            with tempfile.NamedTemporaryFile(dir=out, suffix=".npz", delete=False) as f:
                np.savez(f, indptr=csr.indptr, indices=csr.indices, values=csr.values, shape=np.array(csr.shape))
            os.replace(f.name, out / f"{name}.npz")
            lib = tvm.compile(tvm.IRModule({"main": sparse_matmul_kernel(csr, m, target)}), target=target)
            rows.append({"case": name, "sparse": export_library(lib, out / f"{name}.sparse.so")})
            dense = out / f"dense-{m}x{k}x{n}.so"
            if not dense.exists():
                bb = relax.BlockBuilder()
                x = relax.Var("x", relax.TensorType((m, k), "float32"))
                w = relax.Var("w", relax.TensorType((k, n), "float32"))
                with bb.function("main", [x, w]):
                    bb.emit_func_output(bb.emit(relax.op.matmul(x, w)))
                mod, _ = schedule_gpu(bb.get(), target)
                rows[-1]["dense"] = export_library(tvm.compile(mod, target=target, relax_pipeline=None), dense)
    (out / "cases.json").write_text(json.dumps({"arch": arch, "cases": [list(c) for c in CASES]}, indent=1))
    return rows


# ------------------------------------------------------------------------------------ run
def _median_ms(fn, sync, repeats: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(folder: Path, repeats: int) -> list[dict]:
    import torch
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from stdeploy.targets.tvm.cuda_standin_driver import ensure_tvm_cuda_runtime
    from stdeploy.targets.tvm.kernels.sparse import CSRWeight, kernel_arrays

    ensure_tvm_cuda_runtime()
    dev = tvm.cuda()
    if not dev.exist:
        raise SystemExit("sparse_cuda run: no CUDA GPU here")
    meta = json.loads((folder / "cases.json").read_text())
    rows = []
    for m, k, n, s in meta["cases"]:
        name = case_name(m, k, n, s)
        arrays = np.load(folder / f"{name}.npz")
        csr = CSRWeight(arrays["indptr"], arrays["indices"], arrays["values"], (k, n))
        indptr, indices, values = kernel_arrays(csr)
        w = csr.to_dense()
        x = spikes(m, k)
        lib = tvm.runtime.load_module(str(folder / f"{name}.sparse.so"))
        args = [tvm.runtime.tensor(a, device=dev) for a in (x, indptr, indices, values)]
        y = tvm.runtime.tensor(np.zeros((m, n), np.float32), device=dev)
        kernel = lib["main"]
        kernel(*args, y)
        xt, wt = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
        torch.backends.cuda.matmul.allow_tf32 = False
        ref = (xt @ wt).cpu().numpy()
        diff = float(np.abs(y.numpy() - ref).max())
        sparse_ms = _median_ms(lambda: kernel(*args, y), dev.sync, repeats)
        cublas_ms = _median_ms(lambda: xt @ wt, torch.cuda.synchronize, repeats)
        vm = VirtualMachine(tvm.runtime.load_module(str(folder / f"dense-{m}x{k}x{n}.so")), dev)
        wd = tvm.runtime.tensor(w, device=dev)
        dense_diff = float(np.abs(vm["main"](args[0], wd).numpy() - ref).max())
        tvm_dense_ms = _median_ms(lambda: vm["main"](args[0], wd), dev.sync, repeats)
        rows.append({"case": name, "M": m, "K": k, "N": n, "zeros": round(float(np.mean(w == 0)), 4),
                     "sparse_ms": sparse_ms, "tvm_dense_ms": tvm_dense_ms, "cublas_fp32_ms": cublas_ms,
                     "vs_tvm_dense": tvm_dense_ms / sparse_ms, "vs_cublas": cublas_ms / sparse_ms,
                     "max_abs_diff": diff, "tvm_dense_max_abs_diff": dense_diff})
    return rows


def to_markdown(rows: list[dict], device: str) -> str:
    lines = [f"Sparse CUDA kernel vs dense on {device} (median ms of timed calls, spikes x of 20% ones; "
             "speedup = dense / sparse)", "",
             "| case | zeros | sparse ms | TVM dense ms | cuBLAS fp32 ms | x TVM dense | x cuBLAS | max abs diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['zeros']:.3f} | {r['sparse_ms']:.4f} | {r['tvm_dense_ms']:.4f} | "
                     f"{r['cublas_fp32_ms']:.4f} | {r['vs_tvm_dense']:.2f} | {r['vs_cublas']:.2f} | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build", help="compile the kernels for a CUDA arch (needs apache-tvm's compiler and nvcc)")
    b.add_argument("--arch", default="sm_90")
    b.add_argument("--out", required=True)
    r = sub.add_parser("run", help="time the built kernels on this machine's GPU")
    r.add_argument("folder")
    r.add_argument("--repeats", type=int, default=200)
    r.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.verb == "build":
        for row in build(args.arch, Path(args.out)):
            print(row["case"], row["sparse"]["bytes"], "B", flush=True)
        return 0
    rows = run(Path(args.folder), args.repeats)
    import torch

    print(to_markdown(rows, torch.cuda.get_device_name()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = [r["case"] for r in rows if r["max_abs_diff"] > 1e-3]
    if bad:
        print(f"MISMATCH against cuBLAS: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
