"""How the version-2 golden files in this folder were made (kept for the record).

Run once with nqlib at commit 7ee9e30 (format version 2, the last before
version 3), from the repository root::

    .venv/bin/python tests/data/v2/make_v2.py tests/data/v2

It cannot run against a newer nqlib (it asserts FORMAT_VERSION == 2): the
files and the ``dequantize()`` hashes in ``manifest.json`` are the output of
the version-2 code. The ``*.expected.npy`` arrays were saved afterwards by the
version-3 reader, which decodes version-2 files with the old draws; their
SHA-256 equals the hash recorded here (tests/test_golden.py checks it), so they
are the old code's output.
"""

import hashlib
import io
import json
import sys

import numpy as np

import nqlib
from nqlib.quantizers import matrix

assert matrix.FORMAT_VERSION == 2
out = sys.argv[1]
cases = {
    "v2-nested-variable-dither": (
        dict(method="nested", mode="variable", dither=True), (40, 16), 5.0),
    "v2-nested-fixed": (dict(method="nested", mode="fixed"), (48, 12), 5.0),
    "v2-ecsq": (dict(method="ecsq"), (40, 16), 5.0),
    "v2-rtn-hadamard": (dict(method="rtn-hadamard", group_size=8), (24, 4), 4),
}
man = {}
for name, (kw, shape, rate) in cases.items():
    A = np.random.default_rng(2024).standard_normal(shape)
    Q = nqlib.quantize(A, rate, seed=7, **kw)
    data = Q.to_bytes()
    D = nqlib.load(io.BytesIO(data)).dequantize()
    assert np.array_equal(D, Q.dequantize())
    with open(f"{out}/{name}.nqm", "wb") as fh:
        fh.write(data)
    out_bytes = np.ascontiguousarray(D, dtype="<f8").tobytes()
    man[name + ".nqm"] = dict(
        version=2, options=dict(kw), shape=list(shape), rate=rate, seed=7,
        bytes=len(data), file_sha256=hashlib.sha256(data).hexdigest(),
        dequantize_sha256=hashlib.sha256(out_bytes).hexdigest())
    print(name, len(data), man[name + ".nqm"]["dequantize_sha256"][:16])
with open(f"{out}/manifest.json", "w") as fh:
    json.dump(man, fh, indent=1, sort_keys=True)
