"""TVM bundles for CUDA profiles, checked without a GPU: ``stdeploy package --runtime tvm`` for
``jetson-orin-nano`` (aarch64 host code, cross-compiled, ``sm_87`` kernels) and ``nvidia-h100``
(x86-64 host code, ``sm_90`` kernels). What can be checked here is: the bundle's contents and
manifest, that each library needs nothing but TVM's runtime (with its CUDA library) and the C
library, that it holds GPU code for the profile's arch, and that both runners refuse on this
GPU-less machine in one line (never a CPU fallback). Running the kernels needs a GPU
(``test_h100_bundle_runs_on_the_gpu``, marker ``gpu``, skips elsewhere).

Each bundle costs two CUDA builds (the unrolled and the step graph), done once per module by a
fixture from ``short_sdt_export`` (tests/runtime/conftest.py: the run's shared trained sdt-tiny with
its weights at T = 2).
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stdeploy.files import sha256_file
from stdeploy.package import package
from stdeploy.runtime.bundle import read_bundle
from stdeploy.targets.tvm.cuda_artifacts import embedded_cuda_code

pytestmark = [pytest.mark.tvm, pytest.mark.slow]

SAMPLES = 2
TIMESTEPS = 2  # the T of short_sdt_export (tests/runtime/conftest.py)
EM_X86_64, EM_AARCH64, EM_CUDA = 62, 183, 190
CROSS = "aarch64-linux-gnu-g++"
NO_TORCH = "import sys; sys.modules['torch'] = None; from stdeploy.runtime.__main__ import main; raise SystemExit(main(sys.argv[1:]))"


def _tvm_dirs() -> tuple[Path, Path]:
    import tvm
    import tvm_ffi

    return Path(tvm.__file__).parent, Path(tvm_ffi.__file__).parent


def _gpu_here() -> bool:
    """Whether a CUDA GPU is visible to TVM (a real driver is always preferred to the stand-in)."""
    import tvm

    from stdeploy.targets.tvm.cuda_standin_driver import ensure_tvm_cuda_runtime

    ensure_tvm_cuda_runtime()
    return bool(tvm.cuda(0).exist)


@pytest.fixture(scope="module")
def jetson(short_sdt_export, trained_sdt, tmp_path_factory, require_installed):
    if shutil.which(CROSS) is None:
        require_installed(f"{CROSS} is not installed (make installs g++-aarch64-linux-gnu)")
    out = tmp_path_factory.mktemp("cuda-bundle") / "sdt-jetson"
    return out, package(short_sdt_export, "jetson-orin-nano", out, data=trained_sdt[1], samples=SAMPLES, runtime="tvm")


@pytest.fixture(scope="module")
def h100(short_sdt_export, trained_sdt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda-bundle") / "sdt-h100"
    return out, package(short_sdt_export, "nvidia-h100", out, data=trained_sdt[1], samples=SAMPLES, runtime="tvm")


def run_runner(bundle: Path, *args, cwd, env=None):
    """The bundled runner, torch made unimportable, seeing only the bundle's runner/ and TVM's runtime."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(bundle / "runner")}
    env.pop("TVM_USE_RUNTIME_LIB", None)  # the runner sets it itself
    return subprocess.run([sys.executable, "-c", NO_TORCH, str(bundle), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("which, arch, machine", [("jetson", "sm_87", "aarch64"), ("h100", "sm_90", "x86_64")])
def test_cuda_bundle_contents_and_manifest(which, arch, machine, request):
    root, m = request.getfixturevalue(which)
    libs = {"unrolled": f"model.{machine}.so", "step": f"model.step.{machine}.so"}
    assert m["runtime"] == "tvm" and m["providers"] == ["cuda"] and m["models"] == libs
    t = m["tvm"]
    assert t["device"] == "cuda" and t["arch"] == arch and t["machine"] == machine and t["target"]["arch"] == arch
    assert {"model.onnx", "model.step.onnx"}.isdisjoint(m["files"])
    assert {*libs.values(), "samples.npz", "README.md", "runner/run_module.cc", "runner/stdeploy/runtime/tvm_rt.py"} <= set(m["files"])
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert on_disk == sorted(m["files"])
    for name, meta in m["files"].items():
        assert (root / name).stat().st_size == meta["bytes"] and sha256_file(root / name) == meta["sha256"]
    for key, g in t["graphs"].items():
        assert g["file"] == libs[key] and g["kernels"] and f"{arch} SASS" in g["device_code"]
        assert arch in m["files"][g["file"]]["role"] and machine in m["files"][g["file"]]["role"]
    assert t["graphs"]["unrolled"]["batch"] == SAMPLES and t["graphs"]["step"]["batch"] == 1
    b = read_bundle(root)  # sealed, and the runner's format check accepts the cuda section
    rate = float(b.load_samples()["spikes"].mean())
    assert 0.02 < rate < 0.98, "the reference's output neurons must fire (else a spike check passes vacuously)"
    hc = m["host_check"]
    if machine == platform.machine() and _gpu_here():  # a GPU here: package ran the bundle's check on it
        assert hc["passed"] and all(g["output_firing_rate"] > 0 for g in hc["graphs"])
    else:  # nothing ran here: no GPU (and, for the Jetson, not aarch64)
        assert hc["passed"] is None and not hc["graphs"]
        assert ("aarch64" in hc["skipped"]) if machine == "aarch64" else ("no CUDA GPU" in hc["skipped"])
    readme = (root / "README.md").read_text()
    assert f"PYTHONPATH={root.name}/runner python -m stdeploy.runtime {root.name}" in readme
    assert "pip install --no-deps numpy==" in readme and "apache-tvm==" in readme and "libcudart.so.13" in readme
    assert f"./run_module {root.name}/model.{machine}.so input.f32 {TIMESTEPS},{SAMPLES},1,8,8 out cuda" in readme


@pytest.mark.parametrize("which, machine", [("jetson", "aarch64"), ("h100", "x86_64")])
def test_gpu_library_needs_only_tvm_runtime_and_libc(which, machine, request, dynamic_symbols, provided_symbols):
    """Every symbol a library leaves undefined is defined by TVM's runtime libraries (the CUDA one
    included) or the C library of its machine; none is Python's."""
    root, m = request.getfixturevalue(which)
    tvm_dir, ffi_dir = _tvm_dirs()
    libc_dir = Path("/usr/aarch64-linux-gnu/lib") if machine == "aarch64" else Path("/lib/x86_64-linux-gnu")
    provided = provided_symbols([tvm_dir / "lib" / "libtvm_runtime.so", tvm_dir / "lib" / "libtvm_runtime_cuda.so",
                                 *ffi_dir.glob("lib/libtvm_ffi.so")], libc_dir)
    for name in m["models"].values():
        lib = root / name
        head = lib.read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == {"aarch64": EM_AARCH64, "x86_64": EM_X86_64}[machine]
        needed = dynamic_symbols(lib, undefined=True)
        assert needed, "a module that imports nothing is not what TVM writes"
        assert not {s for s in needed if s.startswith(("Py", "_Py"))}
        assert needed <= provided, f"{name}: undefined symbols nobody provides: {sorted(needed - provided)}"


@pytest.mark.parametrize("which, arch", [("jetson", 87), ("h100", 90)])
def test_gpu_library_holds_device_code_for_the_profiles_arch(which, arch, request):
    """Read from the bytes (the aarch64 library cannot be loaded here): an embedded cubin (an ELF
    image for EM_CUDA) whose flags name the arch and whose ptxas line says ``-arch sm_XY``, the fat
    binary's SASS and PTX entries for that arch, and every kernel the manifest lists."""
    root, m = request.getfixturevalue(which)
    for key, g in m["tvm"]["graphs"].items():
        data = (root / g["file"]).read_bytes()
        cubins = [at for at in (x.start() for x in re.finditer(rb"\x7fELF", data)) if at > 0
                  and int.from_bytes(data[at + 18:at + 20], "little") == EM_CUDA]
        assert cubins, f"{g['file']}: no cubin embedded"
        assert all((int.from_bytes(data[at + 48:at + 52], "little") >> 8) & 0xFF == arch for at in cubins)
        assert set(re.findall(rb"-arch (sm_\d+)", data)) == {f"sm_{arch}".encode()}
        code = embedded_cuda_code(root / g["file"])
        assert {(c["kind"], c["arch"]) for c in code} == {("SASS", f"sm_{arch}"), ("PTX", f"compute_{arch}")}
        assert embedded_cuda_code(data) == code  # the bytes already read (what the build checks) give the same
        assert all(k.encode() in data for k in g["kernels"])
    assert embedded_cuda_code(root / "samples.npz") == []


def test_jetson_bundle_is_refused_on_another_architecture(jetson, tmp_path):
    if platform.machine() == "aarch64":
        pytest.skip("this machine is aarch64: the Jetson bundle's host code would load here")
    r = run_runner(jetson[0], "--check-only", cwd=tmp_path)
    assert r.returncode == 2 and "built for aarch64, this machine is" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_runners_refuse_on_a_machine_without_gpu(h100, tmp_path):
    """The Python runner (exit 2) and the C++ runner (exit 1) refuse in one line saying why;
    nothing is run on the CPU instead."""
    if _gpu_here():
        pytest.skip("a CUDA GPU is visible here: test_h100_bundle_runs_on_the_gpu covers running")
    root, _ = h100
    r = run_runner(root, "--check-only", cwd=tmp_path)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and r.stdout == "", r.stderr
    assert "run on a CUDA GPU (sm_90) and cannot here" in err[0] and "libcuda.so.1" in err[0] and "no CPU fallback" in err[0]
    from stdeploy.targets.tvm.cuda_standin_driver import build_stub

    stub_dir = build_stub().parent  # a libcuda.so.1 whose every call fails: the runtime loads, no GPU exists
    r = run_runner(root, "--check-only", cwd=tmp_path, env={"LD_LIBRARY_PATH": f"{stub_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}"})
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "no CUDA GPU is visible" in err[0], r.stderr
    r = run_runner(root, "--check-only", "--provider", "CPUExecutionProvider", cwd=tmp_path)
    assert r.returncode == 2 and "--provider is for onnxruntime bundles" in r.stderr

    tvm_dir, ffi_dir = _tvm_dirs()
    runner = tmp_path / "run_module"
    r = subprocess.run(["g++", "-std=c++17", "-O0", "-o", str(runner), str(root / "runner" / "run_module.cc"),
                        f"-I{ffi_dir / 'include'}", f"-L{tvm_dir / 'lib'}", f"-L{ffi_dir / 'lib'}", "-ltvm_runtime", "-ltvm_ffi", "-ldl"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    x = np.load(root / "samples.npz")["input"]
    x.tofile(tmp_path / "input.f32")
    libs = f"{tvm_dir / 'lib'}:{ffi_dir / 'lib'}"
    argv = [str(runner), str(root / "model.x86_64.so"), str(tmp_path / "input.f32"), ",".join(map(str, x.shape)), str(tmp_path / "out"), "cuda"]
    for ld_path, says in ((libs, "libcuda.so.1"), (f"{stub_dir}:{libs}", "no CUDA GPU is visible")):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "LD_LIBRARY_PATH": ld_path})
        err = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(err) == 1 and says in err[0] and "no CPU fallback" in err[0], r.stderr
        assert r.stdout == "" and not list(tmp_path.glob("out*"))


def test_tampered_cuda_bundle_is_refused(h100, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(h100[0], root)
    lib = root / "model.x86_64.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0x01
    lib.write_bytes(bytes(data))
    r = run_runner(root, "--check-only", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "model.x86_64.so does not match its sha256" in r.stderr
    m = json.loads((root / "manifest.json").read_text())
    m["tvm"]["device"] = "tpu"
    (root / "manifest.json").write_text(json.dumps(m))
    r = run_runner(root, "--check-only", cwd=tmp_path)
    assert r.returncode == 2 and "tvm.device is 'tpu'" in r.stderr


@pytest.mark.gpu
def test_h100_bundle_runs_on_the_gpu(h100, tmp_path):
    """Where a GPU of compute capability 9.0 or newer is visible: the runner alone checks the samples
    on it and names it (the spike tolerance is the bundle's: a flip at threshold fails, and says so)."""
    if not _gpu_here():
        pytest.skip("no CUDA GPU visible to TVM's runtime on this machine")
    root, _ = h100
    r = run_runner(root, "--json", "--repeats", "3", "--warmup", "1", "--energy-seconds", "0.2", cwd=tmp_path)
    assert r.returncode in (0, 1), r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["runtime"]["provider"].startswith("cuda:0 (")
    assert all(g["output_firing_rate"] > 0 for g in rep["check"]["graphs"])
    assert rep["check"]["passed"], rep["check"]
