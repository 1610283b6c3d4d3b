"""Fixtures of the runtime tests: reading a built library's dynamic symbols (both the CPU and the
CUDA bundle tests check that a library needs only TVM's runtime and the C library)."""

import subprocess
from pathlib import Path

import pytest


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
