"""Regenerate the golden files of tests/test_golden.py.

Usage (from the repository root)::

    .venv/bin/python tests/data/make_golden.py          # add missing files
    .venv/bin/python tests/data/make_golden.py --check  # compare, write nothing
    .venv/bin/python tests/data/make_golden.py --force  # rewrite every file

Writes one small file per case of ``CASES`` (one per method, mode and dither
setting that nqlib implements; a new mode adds its cases here), in the
current format version, to ``tests/data/golden/``, and
``tests/data/golden/manifest.json`` with, per file, the options it was
written with, the SHA-256 of the file and the SHA-256 of its
``dequantize()`` output (float64, little-endian, C order). By default a file
that exists is kept as it is (an encoder change must not move the goldens):
only missing cases are written, and the manifest entries of the kept files
must still match.

The golden files exist so that a file written today decodes to the same bits
after numpy, scipy, LAPACK, numba or the CPU change: regenerate them only when
the format itself changes on purpose (a new format version), and then keep
the old ones (as ``tests/data/v2/`` keeps the version-2 files, written by
nqlib before version 3 by ``tests/data/v2/make_v2.py``) so that the old
version stays tested. ``--check`` re-decodes the stored files and reports
any hash that differs (what the test does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

import nqlib
from nqlib.quantizers import matrix

HERE = Path(__file__).resolve().parent
OUT = HERE / "golden"

#: name -> (quantize options, shape, rate). Shapes are small (each file is a
#: few hundred bytes) and mix rotation lengths with and without a dense odd
#: factor: 40 = 8 x 5, 48 = 16 x 3, 64 = 2^6, 72 = 8 x 9, 24 = 8 x 3.
CASES = {
    "nested-variable": (dict(method="nested", mode="variable"), (40, 16), 5.0),
    "nested-variable-dither": (dict(method="nested", mode="variable", dither=True),
                               (72, 12), 5.0),
    "nested-fixed": (dict(method="nested", mode="fixed"), (48, 12), 5.0),
    "nested-fixed-dither": (dict(method="nested", mode="fixed", dither=True),
                            (64, 10), 5.0),
    "nested-trellis": (dict(method="nested", mode="trellis"), (64, 16), 5.0),
    "ecsq": (dict(method="ecsq", mode="variable"), (40, 16), 5.0),
    "rtn": (dict(method="rtn", group_size=16), (64, 6), 4),
    "rtn-hadamard": (dict(method="rtn-hadamard", group_size=8), (24, 8), 4),
}
SEED = 7


def output_sha256(Q) -> str:
    X = np.ascontiguousarray(Q.dequantize(), dtype="<f8")
    return hashlib.sha256(X.tobytes()).hexdigest()


def build(force: bool) -> dict:
    """The manifest; writes the files that are missing (all with ``force``)."""
    old = {}
    if (OUT / "manifest.json").exists():
        old = json.loads((OUT / "manifest.json").read_text())
    manifest = {}
    for name, (kw, shape, rate) in CASES.items():
        path = OUT / f"{name}.nqm"
        if path.exists() and not force:
            data = path.read_bytes()
            R = matrix.QuantizedMatrix.from_bytes(data)
            entry = old[path.name]
            if (entry["file_sha256"] != hashlib.sha256(data).hexdigest()
                    or entry["dequantize_sha256"] != output_sha256(R)):
                raise SystemExit(f"{path.name}: differs from its manifest entry")
            manifest[path.name] = entry
            print(f"{path.name:32s} kept")
            continue
        A = np.random.default_rng(2024).standard_normal(shape)
        Q = nqlib.quantize(A, rate, seed=SEED, **kw)
        data = Q.to_bytes()
        R = matrix.QuantizedMatrix.from_bytes(data)
        assert np.array_equal(R.dequantize(), Q.dequantize())
        path.write_bytes(data)
        manifest[path.name] = dict(
            version=matrix.FORMAT_VERSION, options=kw, shape=list(shape),
            rate=rate, seed=SEED, bytes=len(data),
            file_sha256=hashlib.sha256(data).hexdigest(),
            dequantize_sha256=output_sha256(R))
        print(f"{path.name:32s} {len(data):5d} bytes  "
              f"{manifest[path.name]['dequantize_sha256'][:16]}")
    return manifest


def check() -> int:
    manifest = json.loads((OUT / "manifest.json").read_text())
    bad = 0
    for name, entry in manifest.items():
        Q = nqlib.load(OUT / name)
        ok = output_sha256(Q) == entry["dequantize_sha256"]
        bad += not ok
        print(f"{name:32s} {'ok' if ok else 'DIFFERS'}")
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare the stored files' hashes; write nothing")
    parser.add_argument("--force", action="store_true",
                        help="rewrite every file (only for a new format version)")
    args = parser.parse_args()
    if args.check:
        sys.exit(1 if check() else 0)
    OUT.mkdir(exist_ok=True)
    manifest = build(args.force)
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True)
                                       + "\n")


if __name__ == "__main__":
    main()
