"""A stand-in CUDA driver library (``libcuda.so.1``) built so TVM can *compile* CUDA modules on a
machine without an NVIDIA driver or GPU; a real driver, where one loads, is always used instead.

The apache-tvm wheel ships ``libtvm_runtime_cuda.so``, which links against ``libcuda.so.1`` (the
driver). Without a loadable driver ``import tvm`` silently skips that library, and a CUDA build
then holds CUDA source only: no compiled kernels, nothing ``export_library`` can write. The code
generator itself does not need a GPU, only the runtime library's module constructors.

:func:`ensure_tvm_cuda_runtime` makes the runtime library load:

* when a real driver is loadable (``ctypes.CDLL("libcuda.so.1")`` works), it is used, always;
* otherwise a **stand-in** ``libcuda.so.1`` is built once from the undefined ``cu*`` symbols of
  ``libtvm_runtime_cuda.so`` (``nm -D --undefined-only``; each a C function returning
  ``CUDA_ERROR_STUB_LIBRARY``; ``gcc -shared -fPIC -Wl,-soname,libcuda.so.1``) into
  ``~/.cache/stdeploy/cuda-stub/<hash>/`` and loaded into this process with ``RTLD_GLOBAL``, so
  the soname is already resolved when TVM's CUDA library is opened (before ``import tvm``, or
  right after it by loading the library again). ``LD_LIBRARY_PATH`` is never changed.

With the stand-in, ``tvm.cuda().exist`` stays False and nothing can run on a GPU; compiled
modules can be written, loaded and inspected. Only the calling process is affected.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from ..base import TargetError

__all__ = ["STUB_ERROR", "real_driver_loadable", "runtime_library_path", "undefined_cuda_symbols", "build_stub",
           "ensure_tvm_cuda_runtime", "loaded_stub", "stub_cache_dir"]

STUB_ERROR = 34             # CUresult CUDA_ERROR_STUB_LIBRARY: "the CUDA driver loaded is a stub library"
RUNTIME_LIBRARY = "libtvm_runtime_cuda.so"
_ERROR_TEXT = "stand-in libcuda.so.1 built by stdeploy: no NVIDIA driver on this machine"

_lock = threading.Lock()
_state: dict[str, str] = {}   # "driver": "real" | "stand-in", "stub": path of the loaded stand-in


def stub_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stdeploy/cuda-stub`` (``~/.cache/...`` by default)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "stdeploy" / "cuda-stub"


def real_driver_loadable() -> bool:
    """Whether an NVIDIA driver's ``libcuda.so.1`` loads (never true for our own stand-in)."""
    if _state.get("driver") == "stand-in":
        return False  # the loaded stand-in now answers to the soname
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def runtime_library_path() -> Path:
    """``tvm/lib/libtvm_runtime_cuda.so`` of the installed wheel, found without importing tvm."""
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise TargetError("apache-tvm is not installed: pip install 'stdeploy[tvm]'")
    for root in spec.submodule_search_locations:
        path = Path(root) / "lib" / RUNTIME_LIBRARY
        if path.is_file():
            return path
    raise TargetError(f"this TVM build has no CUDA runtime library ({RUNTIME_LIBRARY} not under "
                      f"{', '.join(spec.submodule_search_locations)}); install a wheel built with CUDA: "
                      "pip install 'stdeploy[tvm]'")


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise TargetError(f"building a stand-in libcuda.so.1 needs `{name}`, which is not on PATH: apt-get install -y {package}")
    return path


def undefined_cuda_symbols(library: Path) -> list[str]:
    """The driver API functions (``cu`` + capital letter) that ``library`` imports, sorted."""
    nm = _tool("nm", "binutils")
    proc = subprocess.run([nm, "-D", "--undefined-only", str(library)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise TargetError(f"nm cannot read {library}: {proc.stderr.strip()}")
    names = set()
    for line in proc.stdout.splitlines():
        symbol = line.split()[-1] if line.split() else ""
        if "@" not in symbol and len(symbol) > 2 and symbol.startswith("cu") and symbol[2].isupper():
            names.add(symbol)  # versioned names (cudaMalloc@libcudart.so.13) belong to the runtime API
    if not names:
        raise TargetError(f"{library} imports no cu* driver functions; cannot derive a stand-in libcuda.so.1")
    return sorted(names)


def _stub_source(symbols: list[str]) -> str:
    lines = ["/* Stand-in libcuda.so.1 written by stdeploy.targets.tvm.cuda_standin_driver: every driver call fails",
             f"   with CUDA_ERROR_STUB_LIBRARY ({STUB_ERROR}). For building CUDA modules without a GPU only. */",
             "typedef int CUresult;"]
    for name in symbols:
        if name in ("cuGetErrorName", "cuGetErrorString"):
            lines.append(f'CUresult {name}(int error, const char **text) {{ if (text) *text = "{_ERROR_TEXT}"; return 0; }}')
        else:
            lines.append(f"CUresult {name}(void) {{ return {STUB_ERROR}; }}")
    return "\n".join(lines) + "\n"


def build_stub(library: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Build (or reuse) the stand-in for ``library`` (default: TVM's CUDA runtime); its path.

    The folder is named by a hash of the source, so a new TVM version with other imports gets
    its own stand-in; files are written under a temporary name and renamed into place.
    """
    library = runtime_library_path() if library is None else Path(library)
    source = _stub_source(undefined_cuda_symbols(library))
    folder = (stub_cache_dir() if cache_dir is None else Path(cache_dir)) / hashlib.sha256(source.encode()).hexdigest()[:16]
    target = folder / "libcuda.so.1"
    if target.is_file():
        return target
    gcc = _tool("gcc", "gcc")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        c_file, so_file = Path(tmp) / "libcuda_stub.c", Path(tmp) / "libcuda.so.1"
        c_file.write_text(source)
        proc = subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(so_file), str(c_file)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise TargetError(f"gcc could not build the stand-in libcuda.so.1 in {folder}: {proc.stderr.strip()}")
        os.replace(c_file, folder / "libcuda_stub.c")
        os.replace(so_file, target)
    return target


def _load_runtime_into_tvm() -> None:
    """After ``import tvm`` skipped the CUDA runtime library, load it now (its registrations run)."""
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                           extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, RuntimeError, FileNotFoundError) as err:
        raise TargetError(f"TVM's CUDA runtime library ({runtime_dir / RUNTIME_LIBRARY}) does not load: {err}. It also needs "
                          "libcudart.so.13 (the CUDA 13 toolkit's lib folder on the loader path)") from err


def _cuda_runtime_registered() -> bool:
    import tvm_ffi

    return tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None


def ensure_tvm_cuda_runtime() -> str:
    """Make TVM's CUDA runtime library loaded in this process; returns ``"real"`` (an NVIDIA
    driver) or ``"stand-in"`` (see the module docstring). Idempotent."""
    with _lock:
        if "driver" not in _state:
            if real_driver_loadable():
                _state["driver"] = "real"
            else:
                stub = build_stub()
                try:
                    ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
                except OSError as err:
                    raise TargetError(f"the stand-in {stub} does not load: {err}; delete its folder to rebuild it") from err
                _state.update(driver="stand-in", stub=str(stub))
        if "tvm" in sys.modules:
            _load_runtime_into_tvm()
        else:
            import tvm  # noqa: F401  (its backend autoload opens the CUDA runtime library now)

            _load_runtime_into_tvm()  # no-op when the autoload succeeded; a clear error when not
        if not _cuda_runtime_registered():
            raise TargetError("TVM's CUDA runtime library is loaded but registered no CUDA module support; "
                              "this TVM wheel cannot write compiled CUDA modules")
        return _state["driver"]


def loaded_stub() -> str | None:
    """Path of the stand-in loaded in this process, if any."""
    return _state.get("stub")
