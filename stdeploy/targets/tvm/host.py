"""The host CPU for TVM's llvm backend: its LLVM CPU name, the usable cores, and the target dict
of a cpu device profile.

TVM 0.27's wheel refuses ``mcpu = "native"`` and emits generic x86-64 code (no AVX) when no CPU
is named, so the host's name is read at run time: LLVM's own detection first, else a name
chosen from the vector units listed in ``/proc/cpuinfo``, each checked against TVM's LLVM.
Target dicts, not strings: TVM 0.27 refuses option strings such as ``"llvm -num-cores 2"``.
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

from ..base import TargetError
from ..profiles import DeviceProfile
from .sdk import load_tvm

__all__ = ["host_cpu_name", "cpuinfo_cpu_name", "usable_cores", "cpu_target"]


def cpuinfo_cpu_name() -> str | None:
    """An LLVM CPU name with the vector units listed in /proc/cpuinfo (x86-64 only)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "skylake-avx512"
    if {"avx2", "fma", "bmi2"} <= flags:
        return "haswell"
    if "sse4_2" in flags:
        return "nehalem"
    return "x86-64"


def host_cpu_name() -> str | None:
    """This machine's CPU as LLVM names it (``znver3``, ``sapphirerapids``, ...), checked against
    TVM's LLVM; None when neither LLVM's detection nor /proc/cpuinfo gives a valid name."""
    load_tvm()
    from tvm.target import codegen

    triple = str(codegen.llvm_get_system_triple())
    candidates = []
    if hasattr(codegen, "llvm_get_system_cpu"):
        candidates.append(str(codegen.llvm_get_system_cpu()))
    candidates.append(cpuinfo_cpu_name())
    for name in candidates:
        if name and name != "generic" and codegen.llvm_is_valid_cpu(name, triple):
            return name
    return None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_target(profile: DeviceProfile) -> dict:
    """The llvm target dict of a cpu profile, completed with ``mcpu`` (host CPU, when the profile
    names neither ``mcpu`` nor ``mtriple``; ``"native"`` is replaced by the host's name) and
    ``num-cores``."""
    target = dict(profile.tvm.get("target") or {"kind": "llvm"})
    if target.get("kind") != "llvm":
        raise TargetError(f"device profile {profile.path or profile.name}: a cpu profile's [tvm].target needs kind = \"llvm\", got {target}")
    if target.get("mcpu", "native") == "native" and "mtriple" not in target:
        target.pop("mcpu", None)
        cpu = host_cpu_name()
        if cpu is None:
            warnings.warn("tvm: the host CPU has no LLVM name TVM accepts; compiling for generic x86-64 (no AVX)", stacklevel=3)
        else:
            target["mcpu"] = cpu
    target.setdefault("num-cores", usable_cores())
    try:
        load_tvm().target.Target(target)
    except Exception as err:  # TVM refuses unknown keys with its own error types
        raise TargetError(f"device profile {profile.path or profile.name}: TVM refuses the target {target}: {err}") from err
    return target
