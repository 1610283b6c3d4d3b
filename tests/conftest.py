"""Shared fixtures and the rule for optional backends.

Fixtures
- ``digits_subset(n_train, n_test)``: scikit-learn's digits cut to the first images of each split
  (``dataclasses.replace`` of the loaded split; offline).
- ``one_thread``: torch on one thread for the test, restored after (the machine is shared).
- ``require_installed(why)``: for a tool `make install` provides (a compiler, qemu, wheels): fails
  where CI is set, skips elsewhere (the same rule as the optional backends below).
- ``offline_pip``: pip arguments that install a device bundle's pinned packages with no network
  (``--no-index --find-links .venv/wheelhouse``: the wheels ``make install`` downloads beside the venv).
- ``trained_sdt``: sdt-tiny (LIF) trained two epochs on 480 digits, once per test run, with its
  spiking layers checked to fire; ``exported_sdt``: that model's export directory (NIR + ONNX +
  reference + manifest), validated on 64 test images, also once per run.

Parallel runs (``make test`` runs ``pytest -n 2 --dist loadfile``, pytest-xdist): each file runs whole
on one worker, so a module-scoped fixture is built once; a session fixture that trains is built by
the first worker that needs it and loaded by the others (:func:`shared_across_workers`).

Every test process looks up the module of a pseudo-file's frame (``<frozen importlib._bootstrap>``,
xdist's ``<string>``) without stdlib's scan of ``sys.modules`` (:func:`skip_module_scan_for_pseudo_files`;
same answers): TVMScript calls :func:`inspect.stack` for every kernel it parses.

Optional backends (``@pytest.mark.tvm``, ``@pytest.mark.lava``, e.g. ``pytestmark = pytest.mark.tvm``)
- not installed: the test skips, except where ``CI`` is set (CI runs with ``CI=true``; ``make test``
  installs both): there a missing backend fails the test;
- installed but not importable (a broken install): the test fails, everywhere.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import pytest
import torch

from stdeploy.data import load_dataset

# marker -> (module to find, registered target that says whether it can run here)
BACKENDS = {"tvm": ("tvm", "tvm"), "lava": ("lava", "lava")}
SDT_TRAIN_IMAGES, SDT_TEST_IMAGES = 480, 64


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


_backend_state: dict[str, tuple[str, str]] = {}


def backend_state(marker: str) -> tuple[str, str]:
    """``("ok" | "missing" | "broken", why)`` for the backend behind ``marker``, checked once."""
    if marker not in _backend_state:
        from stdeploy.targets.base import get_target

        module, target = BACKENDS[marker]
        if importlib.util.find_spec(module) is None:
            _backend_state[marker] = ("missing", f"{module} is not installed")
        else:
            try:
                ok, why = get_target(target).available()
            except ImportError as err:
                ok, why = False, str(err)
            _backend_state[marker] = ("ok", why) if ok else ("broken", f"{module} is installed but cannot be used: {why}")
    return _backend_state[marker]


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in BACKENDS:
        if item.get_closest_marker(marker) is None:
            continue
        state, why = backend_state(marker)
        if state == "broken":
            pytest.fail(why, pytrace=False)
        if state == "missing":
            if in_ci():
                pytest.fail(f"{why}, and CI is set: `make test` installs it, so a missing {marker} is a failure here",
                            pytrace=False)
            pytest.skip(f"{why} (optional backend; install it with `make test`)")


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="session")
def digits_full():
    """scikit-learn's digits as :func:`stdeploy.data.load_dataset` splits it, loaded once."""
    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_subset(digits_full):
    """``digits_subset(n_train, n_test)``: the first ``n_train`` training and ``n_test`` test images."""

    def make(n_train: int, n_test: int):
        sub = torch.utils.data.Subset
        d = digits_full
        return dataclasses.replace(d, train=sub(d.train, range(n_train)), test=sub(d.test, range(n_test)))

    return make


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def missing(why: str) -> None:
    """Something `make install` provides is absent: a failure where CI is set, a skip elsewhere."""
    if in_ci():
        pytest.fail(f"{why}, and CI is set", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def require_installed():
    """``missing`` for tests: ``require_installed("qemu-aarch64 is not installed (make installs qemu-user)")``."""
    return missing


@pytest.fixture(scope="session")
def offline_pip() -> list[str]:
    wheelhouse = Path(sys.prefix) / "wheelhouse"
    if not any(wheelhouse.glob("*.whl")):
        missing(f"no wheels in {wheelhouse} (`make install` downloads them; tests never use the network)")
    return ["--no-index", "--find-links", str(wheelhouse)]


# ----------------------------------------------------------------------------- work shared by xdist workers
def xdist_shared_dir(tmp_path_factory) -> Path | None:
    """The run's temporary folder that every pytest-xdist worker sees (``make test`` runs ``-n 2``), or
    ``None`` in a plain run (one process: a session fixture is computed once anyway)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return None
    return tmp_path_factory.getbasetemp().parent  # workers' basetemps are <run>/popen-gwN


HEAVY_MARKERS = ("slow", "tvm", "lava")
# The files that cost most, with roughly their seconds on one `make test` worker (2-core machine;
# from a run's --durations): started first, longest first, so that the two workers finish together.
# The other files follow by their count of slow/tvm/lava tests. Add a file here when it grows past
# a minute; the figures only order the files.
FILE_SECONDS = {
    "tests/runtime/test_runtime.py": 250,
    "tests/export/test_exact.py": 200,
    "tests/targets/tvm/test_tvm_target.py": 150,
    "tests/test_train.py": 110,
    "tests/targets/lava/test_lava_target.py": 110,
    "tests/test_mnist1d.py": 110,
    "tests/targets/tvm/test_tvm_fast.py": 90,  # its tuning imports tvm.s_tir.tensor_intrin (skip_module_scan_for_pseudo_files)
}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker gets its share of the cores (usable cores // workers, at least
    one) for torch and, unless set already, for the OpenMP/TVM pools of the processes it starts:
    two workers each running two threads on two cores would fight over them.

    In every run, TVM's thread pool is told not to pin threads (``TVM_BIND_THREADS=0``, unless set):
    by default the pool pins the thread that starts it to one core, so a test process (both xdist
    workers: core 0) and everything it runs or starts afterwards would share that one core, and
    :func:`stdeploy.targets.tvm.host.cpu_target` (``num-cores`` from the affinity) would change
    mid-run, giving a tuning database another key than the one it was written under."""
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    skip_module_scan_for_pseudo_files()
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if os.environ.get("PYTEST_XDIST_WORKER") is None or workers is None:
        return
    share = max(1, len(os.sched_getaffinity(0)) // int(workers))
    torch.set_num_threads(share)
    for var in ("OMP_NUM_THREADS", "TVM_NUM_THREADS"):
        os.environ.setdefault(var, str(share))


def _frame_module(frame, _filename=None, _stdlib=inspect.getmodule):
    """:func:`inspect.getmodule` for a frame whose code comes from a pseudo-file (``<frozen
    importlib._bootstrap>``, ``<string>``): the caches stdlib checks, then ``None`` without stdlib's
    scan of every module in ``sys.modules`` (a frame has no ``__name__``, so after the scan stdlib
    returns ``None`` as well unless a module's file is that pseudo-file). Anything else: stdlib's."""
    if not (inspect.isframe(frame) and _filename is not None and _filename[:1] == "<" and _filename[-1:] == ">"):
        return _stdlib(frame, _filename)
    try:
        names = (_filename, inspect.getabsfile(frame, _filename))
    except (TypeError, FileNotFoundError):
        return None
    for name in names:
        if name in inspect.modulesbyfile:
            return sys.modules.get(inspect.modulesbyfile[name])
    return None


def skip_module_scan_for_pseudo_files() -> None:
    """TVMScript (``@T.prim_func``, every TIR kernel TVM or stdeploy defines) calls
    :func:`inspect.stack`, which looks up the module of every frame on the stack; for a frame of a
    pseudo-file (the import machinery's while a module imports, pytest-xdist's ``exec``'d worker loop)
    stdlib then scans all of ``sys.modules`` (2000+ with torch and TVM loaded), twice per frame. Importing
    ``tvm.s_tir.tensor_intrin`` (MetaSchedule tuning and building, dlight's CUDA matmul) parses some 250
    kernels inside nested imports that way: most of a tuning test's time. Test processes look such
    frames up with :func:`_frame_module` instead: the same answer, without the scan."""
    if inspect.getmodule is not _frame_module:
        inspect.getmodule = _frame_module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the files of :data:`FILE_SECONDS` first, longest first, then the files with
    the most ``slow``/``tvm``/``lava`` tests (then the files with the most tests), so the long files
    start early and the two workers finish together (``make test`` passes ``--no-loadscope-reorder``
    so xdist keeps this order). A plain run keeps pytest's order."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return
    heavy: dict[str, int] = {}
    count: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        count[path] = count.get(path, 0) + 1
        heavy[path] = heavy.get(path, 0) + any(item.get_closest_marker(m) for m in HEAVY_MARKERS)
    rank = {path: i for i, path in enumerate(sorted(count, key=lambda p: (-FILE_SECONDS.get(p, 0), -heavy[p], -count[p])))}
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])  # stable: a file's own order is kept


def shared_across_workers(tmp_path_factory, name: str, compute):
    """``compute()`` once per test run: under pytest-xdist the first worker to ask computes it and
    saves it (``torch.save``) in the run's shared folder under a file lock; the others wait and load
    it. In a plain run, ``compute()`` is returned as is."""
    shared = xdist_shared_dir(tmp_path_factory)
    if shared is None:
        return compute()
    path = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.exists():
            partial = shared / f"{name}.partial"
            torch.save(compute(), partial)
            partial.replace(path)  # a worker that dies mid-save leaves no half-written file
        return torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------- one trained sdt-tiny per run
def head_firing_rate(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Mean firing rate of every LIF of ``model`` on ``x`` (T, B, C, H, W)."""
    from stdeploy.export.validate import record_neurons

    with torch.no_grad():
        _, records = record_neurons(model.eval(), x)
    return {name: float(r["spikes"].float().mean()) for name, r in records.items()}


@pytest.fixture(scope="session")
def trained_sdt(digits_subset, tmp_path_factory):
    """``(model, data)``: sdt-tiny trained two epochs (batch 16, lr 5e-3, seed 0) on 480 digits, about
    85% test accuracy; every spiking layer fires on the test images (checked here), so spike
    comparisons made with it mean something. Shared: tests must not modify it (clone it)."""
    from stdeploy.models import build_model, direct_encode
    from stdeploy.train import TrainConfig, train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = digits_subset(SDT_TRAIN_IMAGES, SDT_TEST_IMAGES)

        def fit() -> dict:
            torch.manual_seed(0)
            model = build_model("sdt-tiny")
            train(model, data, TrainConfig(epochs=2, batch_size=16, lr=5e-3), None, progress=False)
            return model.state_dict()

        model = build_model("sdt-tiny")
        model.load_state_dict(shared_across_workers(tmp_path_factory, "sdt-tiny.pt", fit))
        model.eval()
        images = torch.stack([data.test[i][0] for i in range(SDT_TEST_IMAGES)])
        rates = head_firing_rate(model, direct_encode(images, model.cfg.timesteps))
    finally:
        torch.set_num_threads(before)
    silent = [name for name, r in rates.items() if r == 0]
    assert not silent, f"shared sdt-tiny: layers that never fire {silent}; spike comparisons would mean nothing"
    assert rates["head.lif"] > 0.01, rates
    return model, data


@pytest.fixture(scope="session")
def exported_sdt(trained_sdt, tmp_path_factory):
    """The export directory of ``trained_sdt`` (nir, onnx, onnx.step, reference, manifest), validated
    on its 64 test images."""
    from stdeploy.export.directory import export_model

    model, data = trained_sdt
    out = tmp_path_factory.mktemp("shared") / "sdt-tiny"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        export_model(model, out, data=data, samples=None)
    finally:
        torch.set_num_threads(before)
    return out


# ----------------------------------------------------------------------------- MNIST-1D generated once per run
@pytest.fixture(scope="session")
def mnist1d_cache(tmp_path_factory) -> Path:
    """A cache base folder (as ``$STDEPLOY_CACHE_DIR``) whose ``mnist1d/`` subfolder holds MNIST-1D as
    the mnist1d package generates it (canonical arguments), generated once per test run: under
    pytest-xdist the first worker that asks generates it into the run's shared folder and the others
    read the same files. Read-only for tests (``load_dataset("mnist1d", mnist1d_cache / "mnist1d")``)."""

    def generate() -> str:
        base = (xdist_shared_dir(tmp_path_factory) or tmp_path_factory.mktemp("mnist1d-cache")) / "mnist1d-cache"
        load_dataset("mnist1d", base / "mnist1d")
        return str(base)

    return Path(shared_across_workers(tmp_path_factory, "mnist1d-cache.path", generate))
