"""Process time and memory of each phase of ``stdeploy export``: the library's export, NIR and
ONNX functions are wrapped, and each call prints its process time, wall time, resident memory
after it and the peak so far (``resource.getrusage``) to stderr, nested by call depth; the last
line is the whole run's JSON (rc, seconds, cpu_s, peak_rss_gb). Usage::

    python benchmarks/export_phases.py export CHECKPOINT --out DIR --format nir,onnx --samples 16 --quiet

(the arguments of ``stdeploy``). A checkpoint of a paper-size model with random weights:
``benchmarks/export_scale.py`` prepares one per model in a temporary directory (its PREPARE step).
"""

from __future__ import annotations

import functools
import importlib
import json
import resource
import sys
import time

# the functions whose calls are timed, by module (private names too: this is a profiler)
PHASES = {
  "stdeploy.export.directory": ["validation_input", "stream_outputs", "_reference_pass", "compare_streamed", "_check_exact", "_export_nir", "_export_portable_nir", "_export_onnx", "_stream", "save_checkpoint", "deployable", "require_agreement", "record_neurons"],
  "stdeploy.export.nir_export": ["to_nir", "write_nir", "nir_stats"],
  "stdeploy.export.nir_interpreter": ["load_graph", "run_nir"],
  "stdeploy.export.nir_portable": ["to_portable_nir"],
  "stdeploy.export.onnx_export": ["export_onnx", "export_onnx_streaming", "onnx_session", "probe_onnx", "_to_proto", "_finish", "_name_initializers", "_prepare", "_validator", "run_onnx", "run_onnx_streaming"],
  "stdeploy.export.exact": ["check_exact"],
  "onnx.checker": ["check_model"],
}
_depth = [0]


def rss_gb() -> float:
    """Resident memory now, in GiB (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def peak_gb() -> float:
    """Peak resident memory so far, in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def wrap(modname: str, fname: str) -> None:
    """Replace ``modname.fname`` by a wrapper that prints the call's process and wall time and the
    memory after it to stderr, indented by call depth."""
    mod = importlib.import_module(modname)
    f = getattr(mod, fname)

    @functools.wraps(f)
    def timed(*a, **k):
        c0, w0 = time.process_time(), time.perf_counter()
        _depth[0] += 1
        try:
            return f(*a, **k)
        finally:
            _depth[0] -= 1
            print(f"{'  ' * _depth[0]}{modname.split('.')[-1]}.{fname}: cpu {time.process_time() - c0:.1f}s "
                  f"wall {time.perf_counter() - w0:.1f}s rss {rss_gb():.2f} peak {peak_gb():.2f}", file=sys.stderr, flush=True)

    setattr(mod, fname, timed)


def main(argv: list[str] | None = None) -> int:
    for m, fs in PHASES.items():
        for f in fs:
            try:
                wrap(m, f)
            except AttributeError as e:
                print("skip", m, f, e, file=sys.stderr)
    from stdeploy.cli import main as cli_main

    t0 = time.perf_counter()
    rc = cli_main(sys.argv[1:] if argv is None else argv)
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "cpu_s": use.ru_utime + use.ru_stime,
                      "peak_rss_gb": use.ru_maxrss / 2**20}), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
