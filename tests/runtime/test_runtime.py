"""Bundles and the torch-free runner, played as the device would: ``stdeploy package`` writes a
bundle; ``python -m stdeploy.runtime`` runs it with torch blocked (and, in a fresh virtual
environment holding numpy and onnxruntime alone, with the README's two commands); tampered bundles
are refused with exit status 2 and one line."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from stdeploy.cli import main as cli_main
from stdeploy.data import load_dataset
from stdeploy.export.directory import export_model
from stdeploy.files import sha256_file
from stdeploy.models import build_model
from stdeploy.package import package
from stdeploy.runtime import sensors
from stdeploy.runtime.bundle import BundleError, read_bundle

SAMPLES = 8
# Run the bundled runner with torch made unimportable: any import of torch raises ImportError.
NO_TORCH = "import sys; sys.modules['torch'] = None; from stdeploy.runtime.__main__ import main; raise SystemExit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("sdt-tiny").eval()
    with torch.no_grad():  # BatchNorm statistics that make the neurons fire without training
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_var.fill_(0.05)
    out = tmp_path_factory.mktemp("export") / "exp"
    export_model(model, out, ("onnx",))
    return out


@pytest.fixture(scope="module")
def bundle(export_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "sdt-cpu"
    manifest = package(export_dir, "cpu", out, data=load_dataset("digits"), samples=SAMPLES)
    return out, manifest


def run_runner(bundle_path, *args, cwd):
    """The bundled runner in a subprocess that sees only the bundle's runner/ (not this checkout)."""
    env = {**os.environ, "PYTHONPATH": str(Path(bundle_path) / "runner"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", NO_TORCH, str(bundle_path), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_bundle(bundle, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle[0], dst)
    return dst


def reseal(root: Path, name: str) -> None:
    m = json.loads((root / "manifest.json").read_text())
    m["files"][name].update(bytes=(root / name).stat().st_size, sha256=sha256_file(root / name))
    (root / "manifest.json").write_text(json.dumps(m))


def test_package_writes_a_sealed_bundle_whose_samples_fire(bundle):
    root, manifest = bundle
    names = set(manifest["files"])
    assert {"model.onnx", "model.step.onnx", "samples.npz", "README.md", "runner/stdeploy/runtime/__main__.py",
            "runner/stdeploy/errors.py", "runner/stdeploy/files.py"} <= names
    assert "reference/model.safetensors" not in names and not any(n.startswith("reference") for n in names)
    for name, meta in manifest["files"].items():
        assert (root / name).stat().st_size == meta["bytes"] and sha256_file(root / name) == meta["sha256"]
    b = read_bundle(root)
    s = b.load_samples()
    assert s["input"].shape[:2] == (b.timesteps, SAMPLES) and s["spikes"].shape[:2] == (b.timesteps, SAMPLES)
    rate = float(s["spikes"].mean())
    assert 0 < rate < 1, "the reference's output neurons must fire (else a spike check passes vacuously)"
    assert manifest["activity"]["output_firing_rate"] == pytest.approx(rate)
    assert 0 < manifest["activity"]["input_density"] <= 1 and len(manifest["activity"]["firing_rates"]) > 3
    assert all(g["spike_mismatches"] == 0 for g in manifest["host_check"]["graphs"])
    readme = (root / "README.md").read_text()
    assert "pip install numpy==" in readme and f"PYTHONPATH={root.name}/runner python -m stdeploy.runtime {root.name}" in readme


def test_runner_without_torch_checks_and_times(bundle, export_dir, tmp_path, capsys):
    root, _ = bundle
    r = run_runner(root, "--json", "--repeats", "3", "--warmup", "1", "--energy-seconds", "0.1", "--out", "rep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["check"]["passed"] and len(rep["check"]["graphs"]) == 2
    for g in rep["check"]["graphs"]:
        assert g["spike_mismatches"] == 0 and g["logits_max_abs_error"] <= 1e-4 and g["output_firing_rate"] > 0
    b, s = rep["latency"]["batch"], rep["latency"]["streaming"]
    assert b["batch"] == SAMPLES and b["repeats"] == 3 and 0 < b["min_s"] <= b["p50_s"] <= b["p90_s"] <= b["p99_s"]
    assert b["samples_per_s"] == pytest.approx(SAMPLES / b["median_s"])
    assert s["batch"] == 1 and s["steps_timed"] == 3 * s["timesteps"] and s["p50_s"] > 0
    assert rep["memory"]["peak_rss_mib"] >= rep["memory"]["peak_rss_mib_after_load"] > 10
    assert rep["energy"]["sensor"] in ("none", "rapl", "ina3221")
    if rep["energy"]["sensor"] == "none":
        assert set(rep["energy"]["looked_for"]) == {"rapl", "ina3221"}
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["check"]["passed"]
    assert "| model.step.onnx | 0 / " in (tmp_path / "rep" / "report.md").read_text()
    # stdeploy bench sets the device's figures beside the host's
    capsys.readouterr()
    assert cli_main(["bench", str(export_dir), "--targets", "onnxruntime", "--batch", "8", "--warmup", "1", "--repeats", "2",
                     "--device-report", str(tmp_path / "rep" / "report.json"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    dev = [k for k in res if k.startswith("device ")]
    assert len(dev) == 2 and {"pytorch", "onnxruntime"} <= set(res)
    assert res[dev[0]]["median_s"] == b["median_s"] and res[dev[1]]["timesteps_per_s"] == pytest.approx(1 / s["median_s"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    assert cli_main(["bench", str(export_dir), "--device-report", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a runtime report" in err[0]


def _flip_byte(root):
    p = root / "model.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _dotdot(root):
    m = json.loads((root / "manifest.json").read_text())
    m["files"]["../model.onnx"] = m["files"].pop("model.onnx")
    (root / "manifest.json").write_text(json.dumps(m))


def _absolute(root):
    m = json.loads((root / "manifest.json").read_text())
    m["models"]["unrolled"] = "/etc/passwd"
    (root / "manifest.json").write_text(json.dumps(m))


def _missing(root):
    (root / "samples.npz").unlink()


def _extra(root):
    (root / "evil.onnx").write_bytes(b"x")


def _link(root):
    (root / "model.onnx").unlink()
    (root / "model.onnx").symlink_to(root.parent / "elsewhere.onnx")
    (root.parent / "elsewhere.onnx").write_bytes(b"y")


def _truncated(root):
    p = root / "model.step.onnx"
    p.write_bytes(p.read_bytes()[:-10])


def _bad_json(root):
    (root / "manifest.json").write_text("{not json")


@pytest.mark.parametrize("tamper, says", [
    (_flip_byte, "model.onnx does not match its sha256"), (_dotdot, "'../model.onnx' must be relative and stay inside"),
    (_absolute, "'/etc/passwd' must be relative"), (_missing, "samples.npz is listed in manifest.json but missing"),
    (_extra, "evil.onnx is not listed in manifest.json"), (_link, "model.onnx is a link"),
    (_truncated, "model.step.onnx has"), (_bad_json, "not valid JSON"),
])
def test_tampered_bundle_is_refused_with_one_line(bundle, tmp_path, tamper, says):
    root = copy_bundle(bundle, tmp_path)
    runner = tmp_path / "runner"
    shutil.copytree(bundle[0] / "runner", runner)  # the runner itself intact, beside the bundle
    tamper(root)
    env = {**os.environ, "PYTHONPATH": str(runner)}
    r = subprocess.run([sys.executable, "-c", NO_TORCH, str(root)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and says in lines[0], r.stderr
    assert r.stdout == ""


def test_samples_that_differ_fail_with_exit_1(bundle, tmp_path):
    root = copy_bundle(bundle, tmp_path)
    with np.load(root / "samples.npz", allow_pickle=False) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["spikes"].reshape(-1)[0] = 1 - arrays["spikes"].reshape(-1)[0]  # one expected spike changed, resealed
    np.savez_compressed(root / "samples.npz", **arrays)
    reseal(root, "samples.npz")
    r = run_runner(root, "--json", "--check-only", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert not rep["check"]["passed"] and [g["spike_mismatches"] for g in rep["check"]["graphs"]] == [1, 1]


def test_archive_bundle_runs_and_unsafe_archive_is_refused(export_dir, tmp_path):
    out = tmp_path / "sdt.tar.gz"
    package(export_dir, "cpu", out, samples=4, archive=True)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no temporary left beside --out"
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert "sdt/manifest.json" in names and "sdt/runner/stdeploy/runtime/bundle.py" in names
    unpacked = tmp_path / "dev"
    with tarfile.open(out) as tar:
        tar.extractall(unpacked, filter="data")
    # the archive itself, the runner from an unpacked copy
    r = subprocess.run([sys.executable, "-c", NO_TORCH, str(out), "--check-only"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(unpacked / "sdt" / "runner")}, timeout=60)
    assert r.returncode == 0 and "check PASS" in r.stdout, r.stderr
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(unpacked / "sdt" / "manifest.json", arcname="../manifest.json")
    r = subprocess.run([sys.executable, "-c", NO_TORCH, str(evil)], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(unpacked / "sdt" / "runner")}, timeout=60)
    assert r.returncode == 2 and "must be relative and stay inside" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_package_refuses_bad_out_and_profiles(export_dir, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    for argv, says in [
        ([str(export_dir), "--device", "cpu", "--out", str(busy)], "exists and is not empty; pass --overwrite"),
        ([str(export_dir), "--device", "cpu", "--out", str(busy), "--overwrite"], "not a bundle; --overwrite only replaces"),
        ([str(export_dir), "--device", "loihi2", "--out", str(tmp_path / "x")], "Lava simulation profile"),
        ([str(export_dir), "--device", "jetson-orin-nano", "--runtime", "tensorrt", "--out", str(tmp_path / "x")], "--runtime 'tensorrt'"),
        ([str(export_dir), "--device", "cpu", "--archive", "--out", str(tmp_path / "x")], "name it NAME.tar.gz"),
        ([str(tmp_path / "nope"), "--device", "cpu", "--out", str(tmp_path / "x")], "export directory not found"),
    ]:
        assert cli_main(["package", *argv, "--data", ""]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("stdeploy package: error:") and says in err[0], err
    assert (busy / "mine.txt").read_text() == "keep me" and sorted(p.name for p in busy.iterdir()) == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"], "nothing written outside --out"


def test_package_overwrites_a_bundle_only_with_the_flag(bundle, export_dir, tmp_path):
    root = copy_bundle(bundle, tmp_path)
    with pytest.raises(ValueError, match="pass --overwrite"):
        package(export_dir, "cpu", root, samples=2)
    m = package(export_dir, "cpu", root, samples=2, overwrite=True)
    assert read_bundle(root).batch == 2 and m["batch"] == 2


def test_changed_export_is_refused(export_dir, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(export_dir, exp)
    with open(exp / "model.step.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="model.step.onnx: .*the manifest says"):
        package(exp, "cpu", tmp_path / "b", samples=2)
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- energy sensors (sysfs layouts)
def test_rapl_counter_with_wraparound(tmp_path):
    zone = tmp_path / "class" / "powercap" / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("999000\n")
    (tmp_path / "class" / "powercap" / "intel-rapl:0:0").mkdir()  # a sub-zone (core): not summed
    sensor, why = sensors.rapl(str(tmp_path))
    assert sensor is not None and why == "" and sensor.detail == "package-0"
    sensor.start()
    (zone / "energy_uj").write_text("2000\n")  # wrapped: 1000 + 2000 uJ
    assert sensor.stop() == pytest.approx(3e-3)
    found, reasons = sensors.find_sensor("CPUExecutionProvider", str(tmp_path))
    assert found.name == "rapl" and reasons == {}


def test_ina3221_rails_and_none_found(tmp_path):
    none, reasons = sensors.find_sensor("CPUExecutionProvider", str(tmp_path))
    assert none is None and set(reasons) == {"rapl", "ina3221"} and "intel-rapl" in reasons["rapl"]
    hw = tmp_path / "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hw.mkdir(parents=True)
    for i, (label, mv, ma) in enumerate([("VDD_IN", 5000, 1200), ("VDD_CPU_GPU_CV", 5000, 400), ("NC", 0, 0)], start=1):
        (hw / f"in{i}_label").write_text(label + "\n")
        (hw / f"in{i}_input").write_text(f"{mv}\n")
        (hw / f"curr{i}_input").write_text(f"{ma}\n")
    sensor, why = sensors.ina3221(str(tmp_path))
    assert sensor.watts() == pytest.approx(6.0) and "VDD_IN" in sensor.detail  # the board input rail, not the sum
    assert sensors.integrate([(0.0, 2.0), (1.0, 4.0), (3.0, 4.0)]) == pytest.approx(11.0)
    iio = tmp_path / "old/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    iio.mkdir(parents=True)
    for i, (name, mw) in enumerate([("GPU", 1500), ("CPU", 500)]):
        (iio / f"rail_name_{i}").write_text(name)
        (iio / f"in_power{i}_input").write_text(str(mw))
    old, _ = sensors.ina3221(str(tmp_path / "old"))
    assert old.watts() == pytest.approx(2.0) and "GPU" in old.detail and "CPU" in old.detail


# ----------------------------------------------------------------------------- a clean device: numpy + onnxruntime only
@pytest.fixture(scope="session")
def device_venv(tmp_path_factory):
    """A fresh virtual environment: pip and nothing else (the README installs numpy and onnxruntime)."""
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    return venv


def test_readme_commands_run_the_bundle_in_a_clean_venv(bundle, device_venv, offline_pip, tmp_path):
    root, _ = bundle
    device = tmp_path / "device"
    device.mkdir()
    shutil.copytree(root, device / root.name)  # the device has the bundle folder and nothing of this checkout
    readme = (device / root.name / "README.md").read_text()
    block = readme.split("```")[1].strip().splitlines()
    assert len(block) == 2, block
    python = str(device_venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{device_venv / 'bin'}:{env.get('PATH', '')}"
    install = shlex.split(block[0])
    assert install[:4] == ["python", "-m", "pip", "install"]
    r = subprocess.run([python, *install[1:], *offline_pip, "-q", "--disable-pip-version-check"], cwd=device, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    listed = subprocess.run([python, "-m", "pip", "list", "--format", "freeze"], env=env, capture_output=True, text=True).stdout
    assert "torch" not in listed and "stdeploy" not in listed and "onnxruntime==" in listed
    assert subprocess.run([python, "-c", "import torch"], env=env, capture_output=True).returncode != 0
    assignment, *run = shlex.split(block[1])
    key, _, value = assignment.partition("=")
    r = subprocess.run([python, *run[1:], "--repeats", "2", "--energy-seconds", "0.1"], cwd=device,
                       env={**env, key: value, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((device / f"{root.name}-report" / "report.json").read_text())
    assert rep["check"]["passed"] and all(g["spike_mismatches"] == 0 and g["output_firing_rate"] > 0 for g in rep["check"]["graphs"])
    assert rep["runtime"]["version"] == rep["runtime"]["packaged_with"]["onnxruntime"]
    assert "**PASS**" in r.stdout


def test_cuda_profile_bundle_asks_for_cuda_and_never_falls_back_silently(export_dir, tmp_path):
    out = tmp_path / "jetson"
    m = package(export_dir, "jetson-orin-nano", out, samples=2)
    assert m["providers"][0] == "CUDAExecutionProvider" and m["device"]["name"] == "jetson-orin-nano"
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this host has onnxruntime's CUDA provider: the refusal cannot be shown here")
    r = run_runner(out, "--check-only", cwd=tmp_path)
    assert r.returncode == 2 and "CUDAExecutionProvider is not available" in r.stderr and "--provider CPUExecutionProvider" in r.stderr
    r = run_runner(out, "--check-only", "--provider", "CPUExecutionProvider", cwd=tmp_path)
    assert r.returncode == 0 and "check PASS" in r.stdout, r.stderr


def test_archive_overwrite_replaces_only_a_bundle_archive(export_dir, tmp_path):
    other = tmp_path / "notes.tar.gz"
    other.write_bytes(b"not a bundle")
    with pytest.raises(ValueError, match="not a bundle archive"):
        package(export_dir, "cpu", other, samples=2, archive=True, overwrite=True)
    assert other.read_bytes() == b"not a bundle"
    out = tmp_path / "b.tar.gz"
    package(export_dir, "cpu", out, samples=2, archive=True)
    with pytest.raises(ValueError, match="pass --overwrite"):
        package(export_dir, "cpu", out, samples=3, archive=True)
    package(export_dir, "cpu", out, samples=3, archive=True, overwrite=True)
    with tarfile.open(out) as tar:
        assert json.load(tar.extractfile("b/manifest.json"))["batch"] == 3


# ----------------------------------------------------------------------------- TVM bundles: standalone modules, TVM's runtime alone
# both TVM bundles (x86-64, aarch64) are built from short_sdt_export (tests/runtime/conftest.py: the
# run's trained sdt-tiny with its weights at T = 2)
@pytest.fixture(scope="module")
def tvm_bundle(short_sdt_export, digits_full, tmp_path_factory):
    out = tmp_path_factory.mktemp("tvm") / "sdt-tvm"
    return out, package(short_sdt_export, "cpu", out, data=digits_full, samples=2, runtime="tvm")


@pytest.mark.tvm
@pytest.mark.slow
def test_tvm_bundle_runs_on_tvm_runtime_alone_in_a_clean_venv(tvm_bundle, offline_pip, tmp_path_factory, tmp_path):
    """(b): numpy, apache-tvm and its FFI installed with --no-deps, libtvm_compiler.so deleted, no torch."""
    root, manifest = tvm_bundle
    assert manifest["runtime"] == "tvm" and set(manifest["models"].values()) == {"model.x86_64.so", "model.step.x86_64.so"}
    assert "model.onnx" not in manifest["files"] and all(g["spike_mismatches"] == 0 for g in manifest["host_check"]["graphs"])
    venv = tmp_path_factory.mktemp("tvm-device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    device = tmp_path / "device"
    device.mkdir()
    shutil.copytree(root, device / root.name)
    block = (device / root.name / "README.md").read_text().split("```")[1].strip().splitlines()
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TVM_USE_RUNTIME_LIB")}
    install = shlex.split(block[0])
    assert install[:5] == ["python", "-m", "pip", "install", "--no-deps"]
    r = subprocess.run([python, *install[1:], *offline_pip, "-q", "--disable-pip-version-check"], cwd=device, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, env=env, check=True).stdout.strip())
    (site / "tvm" / "lib" / "libtvm_compiler.so").unlink()  # TVM's runtime alone from here on
    assert not (site / "torch").exists() and not (site / "onnxruntime").exists()
    assignment, *run = shlex.split(block[1])
    key, _, value = assignment.partition("=")
    r = subprocess.run([python, *run[1:], "--json", "--repeats", "2", "--warmup", "1", "--energy-seconds", "0.1"], cwd=device,
                       env={**env, key: value, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["runtime"]["name"] == "tvm" and rep["check"]["passed"]
    assert all(g["spike_mismatches"] == 0 and g["output_firing_rate"] > 0 for g in rep["check"]["graphs"])
    assert rep["latency"]["streaming"]["batch"] == 1 and rep["latency"]["batch"]["batch"] == 2


@pytest.mark.tvm
@pytest.mark.slow
def test_aarch64_modules_need_only_tvm_runtime_and_libc(short_sdt_export, digits_full, require_installed, tmp_path, dynamic_symbols,
                                                      provided_symbols):
    """(c): cross-compiled for aarch64; every symbol the modules leave undefined is defined by TVM's
    runtime libraries or the aarch64 C library; no Python symbol. Then the bundle executes: its C++
    runner (runner/run_module.cc), cross-compiled against the aarch64 TVM wheels that `make`
    keeps, runs the unrolled module under qemu-user on the bundle's samples, spike for spike."""
    compiler = "aarch64-linux-gnu-g++"
    if shutil.which(compiler) is None:
        require_installed(f"{compiler} is not installed (make installs g++-aarch64-linux-gnu)")
    profile = tmp_path / "arm64.toml"
    profile.write_text('kind = "cpu"\ndescription = "aarch64 Linux CPU"\n[tvm]\n'
                       'target = { kind = "llvm", mtriple = "aarch64-linux-gnu" }\n'
                       f'cross_compiler = "{compiler}"\n')
    out = tmp_path / "arm"
    m = package(short_sdt_export, str(profile), out, data=digits_full, samples=2, runtime="tvm")  # the trained model on digits: it fires
    assert m["tvm"]["machine"] == "aarch64" and m["host_check"]["passed"] is None
    import tvm
    import tvm_ffi

    provided = provided_symbols([Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so",
                                 *Path(tvm_ffi.__file__).parent.glob("lib/libtvm_ffi.so")], Path("/usr/aarch64-linux-gnu/lib"))
    for name in m["models"].values():
        lib = out / name
        head = lib.read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
        needed = dynamic_symbols(lib, undefined=True)
        assert needed, "a module that imports nothing is not what TVM writes"
        assert not {s for s in needed if s.startswith(("Py", "_Py"))}
        assert needed <= provided, f"{name}: undefined symbols nobody provides: {sorted(needed - provided)}"
    r = run_runner(out, "--check-only", cwd=tmp_path)  # x86-64 here: refused in one line, not crashed
    assert r.returncode == 2 and "built for aarch64, this machine is" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    _run_under_qemu(out, m, tmp_path, require_installed)


def _aarch64_tvm_runtime(dest: Path, require_installed) -> tuple[Path, Path]:
    """TVM's and tvm-ffi's aarch64 runtime libraries and tvm-ffi's headers, unpacked from the
    wheels `make install` downloads to .venv/wheelhouse/aarch64 (no network here)."""
    import zipfile

    wheels = Path(sys.prefix) / "wheelhouse" / "aarch64"
    found = {k: sorted(wheels.glob(f"{k}-*.whl")) for k in ("apache_tvm", "apache_tvm_ffi")}
    if not all(found.values()):
        require_installed(f"no aarch64 TVM wheels in {wheels} (`make install` downloads them)")
    for wheel in (found["apache_tvm"][-1], found["apache_tvm_ffi"][-1]):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(dest, [n for n in z.namelist() if n in ("tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so")
                                or n.startswith(("tvm_ffi/include/"))])
    return dest / "tvm", dest / "tvm_ffi"


def _run_under_qemu(out: Path, manifest: dict, tmp_path: Path, require_installed) -> None:
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:
        require_installed("qemu-aarch64 is not installed (make installs qemu-user)")
    tvm_dir, ffi_dir = _aarch64_tvm_runtime(tmp_path / "aarch64", require_installed)
    runner = tmp_path / "run_module"
    r = subprocess.run(["aarch64-linux-gnu-g++", "-std=c++17", "-O1", "-o", str(runner), str(out / "runner" / "run_module.cc"),
                        f"-I{ffi_dir / 'include'}", f"-L{tvm_dir / 'lib'}", f"-L{ffi_dir / 'lib'}", "-ltvm_runtime", "-ltvm_ffi"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    samples = np.load(out / "samples.npz")
    x = samples["input"]
    x.astype(np.float32).tofile(tmp_path / "input.f32")
    env = {**os.environ, "LD_LIBRARY_PATH": f"{tvm_dir / 'lib'}:{ffi_dir / 'lib'}", "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1"}
    r = subprocess.run([qemu, "-L", "/usr/aarch64-linux-gnu", str(runner), str(out / manifest["models"]["unrolled"]),
                        str(tmp_path / "input.f32"), ",".join(map(str, x.shape)), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["output", "0", ",".join(map(str, samples["logits"].shape)),
                                "output", "1", ",".join(map(str, samples["spikes"].shape))]
    logits = np.fromfile(tmp_path / "out.0.f32", dtype=np.float32).reshape(samples["logits"].shape)
    spikes = np.fromfile(tmp_path / "out.1.f32", dtype=np.float32).reshape(samples["spikes"].shape)
    assert 0.02 < spikes.mean() < 0.98, "a silent or saturated output makes the comparison empty"
    assert int((spikes != samples["spikes"]).sum()) == 0
    np.testing.assert_allclose(logits, samples["logits"], atol=1e-4)
    # the runner's own bad input: one line, not a crash
    r = subprocess.run([qemu, "-L", "/usr/aarch64-linux-gnu", str(runner), str(out / manifest["models"]["unrolled"]),
                        str(tmp_path / "input.f32"), "1,2,3", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "does not match shape" in r.stderr


def test_runner_refuses_a_report_folder_inside_the_bundle(bundle, capsys):
    from stdeploy.runtime.__main__ import main as runtime_main

    root = bundle[0]
    assert runtime_main([str(root), "--check-only", "--out", str(root / "rep")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is inside the bundle" in err[0]
    assert not (root / "rep").exists()
    read_bundle(root)  # still sealed


def test_package_cli_json_and_archive(export_dir, tmp_path, capsys):
    out = tmp_path / "cli.tar.gz"
    assert cli_main(["package", str(export_dir), "--device", "cpu", "--out", str(out), "--archive", "--samples", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["out"] == str(out) and res["runtime"] == "onnxruntime" and res["tolerance"]["spike_mismatches"] == 0
    assert res["host_check"]["passed"] and "samples.npz" in res["files"] and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.tar.gz"]
