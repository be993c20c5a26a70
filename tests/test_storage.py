"""Serialisation of quantized matrices: QuantizedMatrix.save / to_bytes and
nqlib.load.

* save / load round trips (file name and file object) for every method and
  mode give the same bytes and the same reconstruction;
* ``nbytes`` is the length of the file and ``bits_per_entry`` is computed
  from it: the rate accounting is the file size;
* a truncated file, any flipped byte, wrong magic bytes, another format
  version and structurally invalid (but checksummed) headers are refused
  with a ValueError that says what is wrong.
"""

import io
import struct
import zlib

import numpy as np
import pytest

import nqlib
from nqlib.quantizers import format as fmt
from nqlib.quantizers import matrix

CASES = {
    "nested-variable": dict(method="nested", mode="variable"),
    "nested-fixed": dict(method="nested", mode="fixed"),
    "nested-variable-dither": dict(method="nested", mode="variable", dither=True),
    "nested-fixed-unbiased": dict(method="nested", mode="fixed",
                                  estimator="unbiased"),
    "nested-plain": dict(method="nested", center=False, normalize=False,
                         rotate=False),
    "ecsq": dict(method="ecsq"),
    "rtn": dict(method="rtn", group_size=32),
    "rtn-hadamard": dict(method="rtn-hadamard", group_size=32),
}


def quantized(case, shape=(100, 6), rate=6):
    A = np.random.default_rng(1).standard_normal(shape)
    return nqlib.quantize(A, rate, seed=3, **CASES[case])


def with_crc(body: bytes) -> bytes:
    """A buffer whose checksum is valid again after an edit of ``body``."""
    return body + struct.pack("<I", zlib.crc32(body))


def same_matrix(Q, R):
    assert R.to_bytes() == Q.to_bytes()
    for attr in ("shape", "rate", "method", "mode", "estimator", "seed", "alpha",
                 "center", "normalize", "rotate", "dither", "nbytes"):
        assert getattr(R, attr) == getattr(Q, attr), attr
    np.testing.assert_array_equal(R.dequantize(), Q.dequantize())


@pytest.mark.parametrize("case", CASES)
def test_round_trip_through_a_file(case, tmp_path):
    Q = quantized(case)
    path = tmp_path / "a.nqm"
    Q.save(path)
    assert path.stat().st_size == Q.nbytes
    same_matrix(Q, nqlib.load(path))
    same_matrix(Q, nqlib.load(str(path)))


@pytest.mark.parametrize("case", CASES)
def test_round_trip_through_a_file_object(case):
    Q = quantized(case)
    buf = io.BytesIO()
    Q.save(buf)
    buf.seek(0)
    same_matrix(Q, nqlib.load(buf))
    data = Q.to_bytes()
    for view in (bytearray(data), memoryview(data)):
        same_matrix(Q, matrix.QuantizedMatrix.from_bytes(view))


@pytest.mark.parametrize("case", CASES)
def test_matmul_after_loading(case):
    Q = quantized(case)
    B = np.random.default_rng(2).standard_normal((100, 3))
    QB = nqlib.quantize(B, 6, seed=3, **CASES[case])
    R = matrix.QuantizedMatrix.from_bytes(Q.to_bytes())
    np.testing.assert_array_equal(nqlib.inner_products(R, QB),
                                  nqlib.inner_products(Q, QB))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(100, 6), (256, 1), (77, 13)], ids=str)
def test_rate_is_the_file_size(case, shape):
    Q = quantized(case, shape)
    assert Q.nbytes == len(Q.to_bytes())
    assert Q.bits_per_entry == 8 * Q.nbytes / (shape[0] * shape[1])
    assert Q.to_bytes().startswith(fmt.MAGIC + bytes([fmt.FORMAT_VERSION]))


@pytest.mark.parametrize("case", CASES)
def test_truncated_file(case, tmp_path):
    data = quantized(case).to_bytes()
    for keep in sorted({0, 1, 3, 4, 8, 20, len(data) // 2, len(data) - 5,
                        len(data) - 1}):
        with pytest.raises(ValueError, match="truncated|checksum|magic"):
            matrix.QuantizedMatrix.from_bytes(data[:keep])
    path = tmp_path / "cut.nqm"
    path.write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated|checksum"):
        nqlib.load(path)


@pytest.mark.parametrize("case", CASES)
def test_every_flipped_byte_is_detected(case):
    """CRC-32 detects every error burst of up to 32 bits, so a change of any
    one byte -- header, side information, payload or the checksum itself --
    must be refused."""
    data = quantized(case, (64, 3)).to_bytes()
    for i in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            readable = bad[3] in matrix.READ_VERSIONS
            expect = ("magic" if i < 3 else "version" if i == 3 and not readable
                      else "checksum")
            with pytest.raises(ValueError, match=expect):
                matrix.QuantizedMatrix.from_bytes(bytes(bad))


def test_wrong_magic():
    data = quantized("nested-variable").to_bytes()
    for magic in (b"NQX", b"\x89PN", b"nqm"):
        with pytest.raises(ValueError, match="not an nqlib quantized matrix"):
            matrix.QuantizedMatrix.from_bytes(magic + data[3:])
    with pytest.raises(ValueError, match="magic"):
        matrix.QuantizedMatrix.from_bytes(b"")
    with pytest.raises(ValueError, match="magic"):
        nqlib.load(io.BytesIO(b"PK\x03\x04 a zip file"))


@pytest.mark.parametrize("version", [0, 1, 4, 255])
def test_wrong_version(version):
    """Only the version check can catch this: the checksum is recomputed."""
    data = bytearray(quantized("nested-fixed").to_bytes()[:-4])
    data[3] = version
    with pytest.raises(ValueError, match=f"unsupported format version {version}"):
        matrix.QuantizedMatrix.from_bytes(with_crc(bytes(data)))


@pytest.mark.parametrize("offset,value", [(4, 9), (5, 7)], ids=["method", "mode"])
def test_unknown_method_or_mode_with_valid_checksum(offset, value):
    data = bytearray(quantized("nested-variable").to_bytes()[:-4])
    data[offset] = value
    with pytest.raises(ValueError, match="unknown method or mode"):
        matrix.QuantizedMatrix.from_bytes(with_crc(bytes(data)))


@pytest.mark.parametrize("case", CASES)
def test_trailing_or_missing_bytes_with_valid_checksum(case):
    body = quantized(case).to_bytes()[:-4]
    with pytest.raises(ValueError, match="trailing bytes"):
        matrix.QuantizedMatrix.from_bytes(with_crc(body + b"\x00\x00"))
    with pytest.raises(ValueError, match="truncated|corrupted|cannot be decoded"):
        matrix.QuantizedMatrix.from_bytes(with_crc(body[:-2]))


def test_more_than_eight_scales_is_refused():
    """The scale index of a fixed-mode block is 3 bits wide on the GPU: a
    file that claims more than 8 scales is refused when read."""
    A = np.random.default_rng(4).standard_normal((256, 8))
    Q = nqlib.quantize(A, 4.0, mode="fixed")
    part = Q.payload.hi if Q.payload.hi.L else Q.payload.lo
    part.betas = np.linspace(0.1, 1.0, 9).astype(np.float32)
    Q._bytes = None
    with pytest.raises(ValueError, match="corrupted fixed-mode header"):
        matrix.QuantizedMatrix.from_bytes(Q.to_bytes())
