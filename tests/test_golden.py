"""Files outlive dependency upgrades: stored files decode to stored bits.

* ``tests/data/golden/``: one file per method, mode and dither setting, in
  the current format (version 3), with the SHA-256 of its ``dequantize()``
  output in ``manifest.json``. Version 3 draws everything the decoder needs
  with nqlib's own generator and transforms and decodes in a fixed order of
  operations, so the hash must match exactly on any machine, whatever
  numpy, LAPACK, BLAS or libm is installed. Regenerate with
  ``tests/data/make_golden.py`` only when the format changes on purpose.
* ``tests/data/v2/``: files written by nqlib before version 3 (format 2,
  ``tests/data/v2/make_v2.py``) with the hashes that code computed. Their
  decoder draws through numpy's Generator, ``np.linalg.qr``, ``np.exp`` and
  BLAS -- which promise values, not last bits, across machines -- so the
  test requires the stored output to within 1e-12 of its scale, and the
  stored ``.expected.npy`` outputs to be the old code's (their SHA-256 is
  the one recorded when the files were written).
* The draws themselves (:mod:`nqlib.quantizers.draws`) are pinned by value
  in ``tests/test_draws.py``.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import nqlib
from nqlib.quantizers import format as fmt

DATA = Path(__file__).parent / "data"
GOLDEN = json.loads((DATA / "golden" / "manifest.json").read_text())
V2 = json.loads((DATA / "v2" / "manifest.json").read_text())


def sha256(X) -> str:
    return hashlib.sha256(np.ascontiguousarray(X, dtype="<f8").tobytes()).hexdigest()


def _dither_applies(method, mode) -> bool:
    A = np.random.default_rng(0).standard_normal((64, 16))
    try:
        nqlib.quantize(A, 6.0, method=method, mode=mode, dither=True)
    except ValueError as exc:
        if "dither" in str(exc):
            return False
        raise
    return True


def test_every_method_mode_and_dither_has_a_golden_file():
    """Every layout of the format (a new mode too) has golden files: add its
    cases to tests/data/make_golden.py and run it (it writes only the
    missing files)."""
    have = {(e["options"]["method"], e["options"].get("mode", "fixed"),
             bool(e["options"].get("dither", False))) for e in GOLDEN.values()}
    want = {(m, mode, False) for (m, mode) in fmt.PAYLOAD_READERS}
    want |= {(m, mode, True) for (m, mode) in fmt.PAYLOAD_READERS
             if m == "nested" and _dither_applies(m, mode)}
    assert want <= have, want - have


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_file_decodes_to_its_hash(name):
    entry = GOLDEN[name]
    data = (DATA / "golden" / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["file_sha256"]
    Q = nqlib.load(DATA / "golden" / name)
    assert Q.version == entry["version"] == fmt.FORMAT_VERSION
    assert Q.shape == tuple(entry["shape"])
    assert sha256(Q.dequantize()) == entry["dequantize_sha256"]
    # read back and written again: the same bytes
    Q._bytes = None
    assert Q.to_bytes() == data


@pytest.mark.parametrize("name", sorted(V2))
def test_version_2_file_stays_readable(name):
    entry = V2[name]
    data = (DATA / "v2" / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["file_sha256"]
    expected = np.load(DATA / "v2" / name.replace(".nqm", ".expected.npy"))
    assert sha256(expected) == entry["dequantize_sha256"]   # the old code's output
    Q = nqlib.load(DATA / "v2" / name)
    assert Q.version == 2
    X = Q.dequantize()
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(X, expected, rtol=0, atol=1e-12 * scale)
    Q._bytes = None
    assert Q.to_bytes() == data       # saved again as version 2


def test_version_2_and_3_rotations_differ_and_products_stay_correct():
    """A version-2 operand and a version-3 one share a seed but not a
    rotation: matmul must not multiply them in the rotated domain."""
    Q2 = nqlib.load(DATA / "v2" / "v2-nested-fixed.nqm")
    n, a = Q2.shape
    B = np.random.default_rng(3).standard_normal((n, 16))
    Q3 = nqlib.quantize(B, 6.0, seed=Q2.seed, mode="fixed")
    assert Q3.version == 3
    assert not np.array_equal(Q2.rotation().signs, Q3.rotation().signs)
    np.testing.assert_allclose(nqlib.inner_products(Q2, Q3),
                               Q2.dequantize().T @ Q3.dequantize(), atol=1e-10)
