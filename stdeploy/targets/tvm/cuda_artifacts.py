"""Written CUDA artifacts of the ``tvm`` target: shared libraries, the machine they are for, and
the sidecar that says what they were built from.

Contract: a CUDA build for profile ``P`` writes ``model.P.so`` (the profile's host, e.g. aarch64
for a Jetson) and, when that host is not this machine, ``model.P.<machine>.so`` for the build
machine, plus ``model.P.json`` (the sidecar: the build's info, including the key it was built
from, see :func:`stdeploy.targets.tvm.cuda.artifact_key`). :func:`load_cuda_artifact` reuses them
only when every key field matches and a library for this machine is listed; it checks that the
loaded module implements every kernel the sidecar lists.

A compiled library is code: its constructors run when it is loaded. So the build records the
sidecar and each library, with its size and sha256, under ``built`` in the export directory's
``manifest.json`` (:func:`record_built_files`), and :func:`load_cuda_artifact` loads only a library
that sits in the export directory itself and that the manifest lists with a matching hash: a
sidecar naming another path, an unlisted file or a changed one is never loaded (it is rebuilt).
A separate ``out_dir`` gets a manifest of its own that lists only what was built. Each library is written to a temporary
folder beside its final path and renamed into place (:func:`export_library`), so a reader never
sees half a file.
"""

from __future__ import annotations

import json
import os
import platform
import struct
import tempfile
from pathlib import Path

from ...export.manifest import MANIFEST, add_listed_file, verify_listed_file, write_manifest
from ...errors import StdeployError
from ..base import TargetError
from ..profiles import DeviceProfile
from .cuda_standin_driver import ensure_tvm_cuda_runtime
from .sdk import load_tvm

__all__ = ["ELF_MACHINES", "elf_machine", "build_machine", "find_module", "export_library", "load_cuda_artifact",
           "record_built_files", "FATBIN_MAGIC", "embedded_cuda_code"]

ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv"}


def elf_machine(path: str | os.PathLike) -> str:
    """The machine an ELF file is built for (``x86_64``, ``aarch64``, ...), from its header."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise TargetError(f"{path}: not an ELF file")
    code = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return ELF_MACHINES.get(code, f"EM_{code}")


FATBIN_MAGIC = 0xBA55ED50  # an nvcc fat binary: header (magic u32, version u16, header size u16, size u64), then entries
_FATBIN_KINDS = {1: "PTX", 2: "SASS"}  # entry kind: 1 PTX text (compute_XY), 2 a cubin ELF image (sm_XY)


def embedded_cuda_code(path: str | os.PathLike | bytes) -> list[dict]:
    """The GPU code inside a compiled library: for every nvcc fat binary embedded in the file (TVM
    keeps it in the library's serialized CUDA module), each entry's ``kind`` (``"SASS"``: machine
    code for one GPU; ``"PTX"``: text that newer GPUs compile when loading), ``arch``
    (``"sm_87"`` / ``"compute_87"``), ``bytes`` (as stored; PTX may be compressed) and
    ``compressed``. Read from the bytes alone, so a library for another machine (an aarch64
    Jetson library on x86-64) can be checked; ``path`` may be the file's bytes, already read. An
    empty list: no fat binary in the file."""
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    magic = struct.pack("<I", FATBIN_MAGIC)
    found, at = [], data.find(magic)
    while at >= 0:
        if at + 16 <= len(data):
            _, version, header, size = struct.unpack_from("<IHHQ", data, at)
            end = at + header + size
            if version == 1 and header == 16 and end <= len(data):
                p = at + header
                while p + 32 <= end:
                    kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, p)
                    if kind not in _FATBIN_KINDS or entry_header < 32 or p + entry_header + payload > end:
                        break
                    arch, = struct.unpack_from("<I", data, p + 28)
                    unpacked, = struct.unpack_from("<Q", data, p + 56) if entry_header >= 64 else (0,)
                    found.append({"kind": _FATBIN_KINDS[kind], "arch": f"{'sm' if kind == 2 else 'compute'}_{arch}",
                                  "bytes": int(payload), "compressed": unpacked != 0})  # the unpacked size is set when compressed
                    p += entry_header + payload
                at = data.find(magic, end)
                continue
        at = data.find(magic, at + 4)
    return found


def build_machine() -> str:
    """This machine as ELF names it (``x86_64``, ``aarch64``, ...)."""
    m = platform.machine()
    return {"AMD64": "x86_64", "arm64": "aarch64"}.get(m, m)


def find_module(mod, kind: str):
    """The first module of ``kind`` (``"cuda"``, ...) in ``mod`` and its imports, or None."""
    if mod.kind == kind:
        return mod
    for m in mod.imports:
        found = find_module(m, kind)
        if found is not None:
            return found
    return None


def export_library(ex, path: Path, fcompile=None) -> dict:
    """``export_library`` into a temporary folder beside ``path``, then renamed onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        try:
            ex.export_library(str(tmp_path), **({"fcompile": fcompile} if fcompile is not None else {}))
        except Exception as err:  # the compiler's failure comes through TVM as a RuntimeError
            raise TargetError(f"cannot write {path}: {err}") from err
        os.replace(tmp_path, path)
    return {"path": str(path), "bytes": path.stat().st_size, "machine": elf_machine(path)}


def load_cuda_artifact(profile: DeviceProfile, key: dict, out_dir: Path) -> tuple[tuple[dict, object] | None, str]:
    """``((info, loaded module), "")`` from ``model.<profile>.json`` in ``out_dir`` when its key
    matches and it lists a library for this machine, else ``(None, why not)``."""
    tvm = load_tvm()
    sidecar = out_dir / f"model.{profile.name}.json"
    if not sidecar.is_file():
        return None, f"no {sidecar}"
    rebuild = f"delete {sidecar.name} and model.{profile.name}*.so in {out_dir} to rebuild"
    try:
        verify_listed_file(out_dir, sidecar.name, TargetError)
    except StdeployError as err:
        raise TargetError(f"{err}; {rebuild}") from None
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return None, f"{sidecar} is unreadable ({err})"
    differs = [k for k in key if json.dumps(info.get(k), sort_keys=True) != json.dumps(key[k], sort_keys=True)]
    if differs:
        return None, f"{sidecar} was built from other {', '.join(differs)}"
    here = build_machine()
    library = next((a for a in info.get("artifacts", {}).values() if isinstance(a, dict) and a.get("machine") == here), None)
    if library is None or not isinstance(library.get("path"), str):
        return None, f"{sidecar} lists no library for {here}"
    name = Path(library["path"]).name  # only a file of the export directory itself, whatever path the sidecar names
    if (out_dir / name).resolve() != Path(library["path"]).resolve():
        raise TargetError(f"{sidecar} names a library outside {out_dir} ({library['path']}); not loaded; {rebuild}")
    try:
        path = verify_listed_file(out_dir, name, TargetError)
    except StdeployError as err:
        raise TargetError(f"{err}; {rebuild}") from None
    library = {**library, "path": str(path)}
    driver = ensure_tvm_cuda_runtime()  # registers the CUDA module loader (a stand-in driver where none is installed)
    try:
        module = tvm.runtime.load_module(library["path"])
    except Exception as err:  # a truncated or foreign file comes through TVM as a RuntimeError
        raise TargetError(f"{library['path']}: cannot load this CUDA artifact ({err}); delete it to rebuild") from err
    cuda_module = find_module(module, "cuda")
    missing = [k for k in info.get("kernels", []) if cuda_module is None or not cuda_module.implements_function(k)]
    if missing:
        raise TargetError(f"{library['path']}: lacks kernels {missing[:5]} that {sidecar} lists; delete both to rebuild")
    info.update(reused=library["path"], sidecar=str(sidecar), cuda_driver=driver)
    return (info, module), ""


def record_built_files(out_dir: Path, names: list[str]) -> None:
    """List ``names`` (files in ``out_dir``) with their size and sha256 under ``built`` in
    ``out_dir``'s manifest, so :func:`load_cuda_artifact` may load them later. A folder that is not
    an export directory gets a manifest of its own (no artifacts, only what was built)."""
    if not (out_dir / MANIFEST).is_file():
        write_manifest(out_dir, {"format": "stdeploy-build/1", "artifacts": {}})
    for name in names:
        add_listed_file(out_dir, name, TargetError)
