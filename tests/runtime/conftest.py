"""Fixtures of the runtime tests: the short sdt-tiny export both TVM bundle tests (CPU and CUDA)
build from, and reading a built library's dynamic symbols (both check that a library needs only
TVM's runtime and the C library)."""

import subprocess
from pathlib import Path

import pytest
import torch


def _dynamic_symbols(lib: Path, undefined: bool) -> set[str]:
    """Global dynamic symbols of an ELF library (readelf reads any architecture): the undefined
    ones that are not weak, or the defined ones; version suffixes dropped."""
    out = subprocess.run(["readelf", "--dyn-syms", "-W", str(lib)], capture_output=True, text=True, check=True).stdout
    names = set()
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 8 and f[0].endswith(":") and f[4] in ("GLOBAL", "WEAK"):
            if (f[6] == "UND") == undefined and not (undefined and f[4] == "WEAK"):
                names.add(f[7].split("@")[0])
    return names


@pytest.fixture
def dynamic_symbols():
    """``dynamic_symbols(lib, undefined)``: see :func:`_dynamic_symbols`."""
    return _dynamic_symbols


C_LIBRARIES = ("libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1")


@pytest.fixture
def provided_symbols():
    """``provided_symbols(libs, libc_dir)``: the symbols the libraries ``libs`` (TVM's runtime ones)
    and the C libraries in ``libc_dir`` that exist there define: what a bundle's module may import."""
    def provided(libs, libc_dir: Path) -> set[str]:
        names = set()
        for lib in [*libs, *(libc_dir / c for c in C_LIBRARIES if (libc_dir / c).exists())]:
            names |= _dynamic_symbols(lib, undefined=False)
        return names
    return provided


SHORT_TIMESTEPS = 2  # a TVM bundle unrolls every step: two keep the membrane's carry at half the build


@pytest.fixture(scope="module")
def short_sdt_export(trained_sdt, tmp_path_factory) -> Path:
    """The run's trained sdt-tiny (tests/conftest.py; every spiking layer fires) with its weights at
    T = 2 (the same operators per step, half the unrolled graph of each TVM build), exported to ONNX
    once per module; with direct encoding its outputs are the trained model's first two steps
    (checked here)."""
    from stdeploy.export.directory import export_model
    from stdeploy.export.validate import logits_and_spikes
    from stdeploy.models import build_model, direct_encode

    model, data = trained_sdt
    short = build_model("sdt-tiny", timesteps=SHORT_TIMESTEPS)
    short.load_state_dict(model.state_dict())
    short.eval()
    images = torch.stack([data.test[i][0] for i in range(8)])
    first = logits_and_spikes(model, direct_encode(images, model.cfg.timesteps))[1][:SHORT_TIMESTEPS]
    assert torch.equal(logits_and_spikes(short, direct_encode(images, SHORT_TIMESTEPS))[1], first)
    out = tmp_path_factory.mktemp("export-short") / "exp"
    export_model(short, out, ("onnx",))
    return out
