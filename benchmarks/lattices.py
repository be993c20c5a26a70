"""Speed of the lattice decoders and Voronoi codes: numba kernels vs numpy.

For each lattice (Z8, D4, E8, A2) and nesting ratio q (E8: 4, 14, 16; the
others: 14) this times, on float32 Gaussian input of 2**17 vectors:

* ``closest_point``  -- ``Lattice.closest_point``;
* ``encode``         -- ``VoronoiCode.encode`` (codes and overload flags);
* ``decode``         -- ``VoronoiCode.decode`` to float32;

through the public API, once with ``backend="numba"`` and once with
``backend="numpy"`` (the vectorised reference coder of
``nqlib.reference.lattices``), in the same process. Speeds are in millions of
entries (vector coordinates) per second; ``ratio`` is numba on one thread over
numpy, the headline. numba is also timed on all the threads it may use.

Usage: ``python benchmarks/lattices.py [--quick]``.
"""

from __future__ import annotations

import argparse

import numba
import numpy as np
from _harness import best_time, machine_line, print_table

import nqlib

#: (lattice, q) pairs timed for encode / decode
CASES = [("Z8", 14), ("D4", 14), ("E8", 4), ("E8", 14), ("E8", 16), ("A2", 14)]
#: scale beta = BETA0 / q, NestQuant's middle setting (theory.md section 4)
BETA0 = 5.5
#: targets for E8, q = 14, float32, one thread (issue 4)
TARGETS = {"encode": 30.0, "decode": 100.0}
TARGET_RATIO = 4.0


def _speeds(fn, args, kwargs, entries, repeat, min_time, max_threads):
    """M entries/s of ``fn(*args, **kwargs)``: numba on 1 and on all threads,
    then numpy."""
    def speed(backend):
        t = best_time(fn, *args, backend=backend, repeat=repeat,
                      min_time=min_time, **kwargs)
        return entries / t / 1e6

    numba.set_num_threads(1)
    one = speed("numba")
    numba.set_num_threads(max_threads)
    many = speed("numba")
    numba.set_num_threads(1)
    return one, many, speed("numpy")


def run(n_vectors: int, repeat: int, min_time: float) -> list[dict]:
    """Time every case; return one row per (lattice, q, operation)."""
    max_threads = numba.config.NUMBA_NUM_THREADS
    rng = np.random.default_rng(0)
    rows = []
    timed_closest = set()
    for name, q in CASES:
        lat = nqlib.lattice(name)
        x = rng.standard_normal((n_vectors, lat.dim)).astype(np.float32)
        code = nqlib.VoronoiCode(lat, q, BETA0 / q)
        codes, overload = code.encode(x, backend="numba")
        ops = [("encode", code.encode, (x,), {}),
               ("decode", code.decode, (codes,), {"dtype": np.float32})]
        if name not in timed_closest:
            timed_closest.add(name)
            ops.insert(0, ("closest_point", lat.closest_point, (x,), {}))
        for op, fn, args, kwargs in ops:
            one, many, slow = _speeds(fn, args, kwargs, x.size, repeat,
                                      min_time, max_threads)
            rows.append({
                "lattice": name,
                "q": "-" if op == "closest_point" else q,
                "op": op,
                "numba_1t": one,
                "numba_all": many,
                "numpy": slow,
                "ratio": one / slow,
                "overload": "-" if op == "closest_point"
                            else f"{overload.mean():.3f}",
            })
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2**15 vectors and fewer repeats (a smoke run)")
    args = parser.parse_args(argv)
    n_vectors = 2**15 if args.quick else 2**17
    repeat, min_time = (3, 0.02) if args.quick else (7, 0.1)
    print(machine_line())
    print(f"{n_vectors} float32 vectors per call; speeds in M entries/s; "
          f"beta = {BETA0}/q; numba_all = numba on "
          f"{numba.config.NUMBA_NUM_THREADS} threads; "
          "ratio = numba_1t / numpy")
    rows = run(n_vectors, repeat, min_time)
    print_table(rows)
    for row in rows:
        if row["lattice"] == "E8" and row["q"] == 14 and row["op"] in TARGETS:
            target = TARGETS[row["op"]]
            ok = row["numba_1t"] >= target and row["ratio"] >= TARGET_RATIO
            print(f"E8 q=14 {row['op']}: {row['numba_1t']:.1f} M entries/s on "
                  f"one thread (target >= {target:g}), {row['ratio']:.1f}x "
                  f"numpy (target >= {TARGET_RATIO:g}x): "
                  f"{'met' if ok else 'MISSED'}")
    return rows


if __name__ == "__main__":
    main()
