"""``stdeploy.targets.tvm.sdk.load_tvm`` keeps TVM's thread pool from pinning the whole process.

With TVM's default (``TVM_BIND_THREADS`` unset), setting the pool to one thread and running a
parallel function pins the calling thread, and so the process and every child it starts, to core 0.
Checked in a fresh interpreter without the variable (the test session sets it in conftest)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("tvm", reason="TVM is installed by make; CI's require_installed covers its absence")

SCRIPT = r"""
import os, sys
import numpy as np
if sys.argv[1] == "stdeploy":
    from stdeploy.targets.tvm.sdk import load_tvm
    tvm = load_tvm()
else:
    import tvm
import tvm_ffi
from tvm.script import tirx as T

@T.prim_func
def double(a: T.Buffer((4096,), "float32"), b: T.Buffer((4096,), "float32")):
    for i in T.parallel(4096):
        b[i] = a[i] * T.float32(2)

f = tvm.compile(double, target="llvm")
a, b = tvm.runtime.tensor(np.ones(4096, "float32")), tvm.runtime.tensor(np.zeros(4096, "float32"))
tvm_ffi.get_global_func("runtime.config_threadpool")(0, 1)  # one thread, as timing with threads pinned does
f(a, b)
assert float(b.numpy().sum()) == 8192.0
print(len(os.sched_getaffinity(0)))
"""


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs an affinity mask of at least two cores")
def test_load_tvm_leaves_the_process_on_every_core(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"}
    cores = len(os.sched_getaffinity(0))
    script = tmp_path / "pin.py"  # a file: TVMScript reads the function's source
    script.write_text(SCRIPT)

    def after(how: str) -> int:
        out = subprocess.run([sys.executable, str(script), how], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    assert after("raw") == 1  # the behaviour being guarded against: TVM alone pins the process
    assert after("stdeploy") == cores
