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

Optional backends (``@pytest.mark.tvm``, ``@pytest.mark.lava``, e.g. ``pytestmark = pytest.mark.tvm``)
- not installed: the test skips, except where ``CI`` is set (CI runs with ``CI=true``; ``make test``
  installs both): there a missing backend fails the test;
- installed but not importable (a broken install): the test fails, everywhere.
"""

from __future__ import annotations

import dataclasses
import importlib.util
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


# ----------------------------------------------------------------------------- one trained sdt-tiny per run
def head_firing_rate(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Mean firing rate of every LIF of ``model`` on ``x`` (T, B, C, H, W)."""
    from stdeploy.export.validate import record_neurons

    with torch.no_grad():
        _, records = record_neurons(model.eval(), x)
    return {name: float(r["spikes"].float().mean()) for name, r in records.items()}


@pytest.fixture(scope="session")
def trained_sdt(digits_subset):
    """``(model, data)``: sdt-tiny trained two epochs (batch 16, lr 5e-3, seed 0) on 480 digits, about
    85% test accuracy; every spiking layer fires on the test images (checked here), so spike
    comparisons made with it mean something. Shared: tests must not modify it (clone it)."""
    from stdeploy.models import build_model, direct_encode
    from stdeploy.train import TrainConfig, train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = digits_subset(SDT_TRAIN_IMAGES, SDT_TEST_IMAGES)
        torch.manual_seed(0)
        model = build_model("sdt-tiny")
        train(model, data, TrainConfig(epochs=2, batch_size=16, lr=5e-3), None, progress=False)
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
