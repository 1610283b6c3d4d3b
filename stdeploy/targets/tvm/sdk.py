"""The one place apache-tvm is imported for the ``tvm`` target, with the hint that installs it.

Contract: :func:`load_tvm` returns the ``tvm`` module or raises ``ImportError`` naming
``pip install 'stdeploy[tvm]'``; modules of this package call it before importing anything
from ``tvm`` so that importing them costs nothing where TVM is absent.

It also sets ``TVM_BIND_THREADS=0`` unless the caller set it: TVM's CPU thread pool otherwise pins
the calling thread to core 0 when it first runs, and the whole process (torch, onnxruntime, every
child it starts) inherits that affinity, so one TVM run leaves a stdeploy process on one core
and :func:`stdeploy.targets.tvm.host.cpu_target` then reads ``num-cores`` 1 (a different tuning
key) for the rest of the run.
"""

from __future__ import annotations

import os

INSTALL_HINT = "pip install 'stdeploy[tvm]'"


def load_tvm():
    """The ``tvm`` module; ``ImportError`` with the install hint when it cannot be imported."""
    os.environ.setdefault("TVM_BIND_THREADS", "0")  # module docstring: no pinning of the whole process
    try:
        import tvm
    except (ImportError, OSError) as err:
        raise ImportError(f"the tvm target needs apache-tvm ({err}): {INSTALL_HINT}") from err
    return tvm


def runtime_only() -> bool:
    """True where the installed TVM is its runtime alone (no ``libtvm_compiler``): prebuilt
    artifacts load and run, nothing compiles."""
    return bool(getattr(load_tvm().base, "_RUNTIME_ONLY", False))
