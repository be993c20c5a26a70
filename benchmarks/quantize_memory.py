"""Peak memory and in-process speed of ``nqlib.quantize`` on large matrices.

Each measurement runs in a fresh subprocess, so that its peak resident set
size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that one
quantization and nothing else. Two thread settings are compared:

``default``
    The caller's process as a user has it: no ``NUMBA_NUM_THREADS``,
    ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in
    the environment (numba and BLAS use every core).
``single``
    All of them set to 1 (the Makefile's test setting).

The child reports the best wall time over ``--repeat`` calls (entries per
second), its resident set size before quantizing (interpreter, nqlib,
compiled kernels and the input) and the peak during the calls. The figure of
merit is the peak over the input size: ``(peak RSS - RSS before) / input
bytes``. Speeds are also given as the ratio default / single, measured on the
same machine in the same run.

Usage::

    python benchmarks/quantize_memory.py                  # both shapes, both modes
    python benchmarks/quantize_memory.py --shapes 4096x4096 --modes fixed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

THREAD_VARS = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
               "MKL_NUM_THREADS")
SHAPES = ("4096x4096", "16384x4096")
MODES = ("variable", "fixed")
RATE = 4.0


def _rss_now_mib() -> float:
    """Current resident set size (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _peak_rss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # kilobytes on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def child(n: int, a: int, mode: str, repeat: int) -> dict:
    """Quantize a seeded float32 Gaussian (n, a) matrix; runs in the child."""
    import time

    import numpy as np

    import nqlib

    A = np.random.default_rng(0).standard_normal((n, a), dtype=np.float32)
    # load the compiled kernels and designs on a small matrix of the same n
    nqlib.quantize(A[:, :8], RATE, mode=mode)
    before = _rss_now_mib()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        q = nqlib.quantize(A, RATE, mode=mode)
        best = min(best, time.perf_counter() - t0)
        del q
    return {"n": n, "a": a, "mode": mode, "seconds": best,
            "entries_per_s": n * a / best, "rss_before_mib": before,
            "peak_mib": _peak_rss_mib(), "input_mib": A.nbytes / 2**20}


def run_child(shape: str, mode: str, threads: str, repeat: int) -> dict:
    n, a = (int(s) for s in shape.split("x"))
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    if threads == "single":
        env.update(dict.fromkeys(THREAD_VARS, "1"))
    out = subprocess.run([sys.executable, __file__, "--child", str(n), str(a), mode,
                          str(repeat)], env=env, check=True, capture_output=True,
                         text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["threads"] = threads
    res["shape"] = shape
    return res


def main(argv=None) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _harness import machine_line, print_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        n, a, mode, repeat = args.child
        print(json.dumps(child(int(n), int(a), mode, int(repeat))))
        return
    print(machine_line(), "(thread variables are set per row below)")
    rows = []
    for shape in args.shapes.split(","):
        for mode in args.modes.split(","):
            res = {t: run_child(shape, mode, t, args.repeat)
                   for t in ("default", "single")}
            for t, r in res.items():
                rows.append({
                    "shape": shape, "mode": mode, "threads": t,
                    "M entries/s": r["entries_per_s"] / 1e6,
                    "vs single": r["entries_per_s"] / res["single"]["entries_per_s"],
                    "input MiB": r["input_mib"],
                    "RSS before MiB": r["rss_before_mib"],
                    "peak MiB": r["peak_mib"],
                    "(peak-before)/input": (r["peak_mib"] - r["rss_before_mib"])
                    / r["input_mib"],
                })
    print_table(rows)


if __name__ == "__main__":
    main()
