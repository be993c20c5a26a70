"""The reader trusts nothing: fuzzed files with a *valid* checksum.

A CRC-32 catches accidental damage, not a deliberate edit, so these tests
mutate a file and then recompute its checksum: only the reader's own
validation stands between the bytes and the decoder. The property, for every
method, mode, dither and estimator setting, and for version-2 files too:

    ``QuantizedMatrix.from_bytes`` raises ``ValueError``, or the matrix
    decodes (``dequantize`` may still raise ``ValueError`` for a payload
    that does not decode) to a finite array of the shape the header claims
    -- never another exception, never NaN or inf, never a crash;

and all of it with bounded memory: the fuzzing runs in a subprocess whose
address space is capped (``RLIMIT_AS``) at what the warmed-up interpreter
uses plus ``HEADROOM_MIB``, so an allocation of the size a lying header
claims would fail the test with ``MemoryError`` (or kill the process).

The mutations: (1) a sweep that sets every header and payload field of
every base file (method, mode, flags, reserved byte, n, a, seed, rate,
alpha, the dither key, means, norms, beta, sigmas, K, coset probability,
symbol CRC, kept blocks, word counts, block split, L, q, k, scales,
bit width, group size, step) to each of a list of edge values (0, 1, 2^k,
2^32 - 1, NaN, +-inf, -0, subnormals, 3.4e38, ...) and to nearby integers;
(2) hypothesis: one to four random mutations per file -- a field set to an
edge value, a byte overwritten anywhere, a run of bytes cut out or
inserted. Also the regression of issue 14: a 48-byte file claiming a
2^20 x 2^20 matrix with alpha = NaN.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nqlib
from nqlib.quantizers import format as nqformat
from nqlib.quantizers import matrix

DATA = Path(__file__).parent / "data"
#: address space allowed beyond the warmed-up interpreter
HEADROOM_MIB = 64
#: hypothesis examples of the capped run (override: NQLIB_FUZZ_EXAMPLES)
EXAMPLES = int(os.environ.get("NQLIB_FUZZ_EXAMPLES", "1500"))

V2_FILES = sorted((DATA / "v2").glob("*.nqm"))

_F32 = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 1e-38, 3.4e38, -1.0,
        1.0, 0.05, 0.04, 0.1, 0.09, 8.0, 8.5, 2.0**-70, 2.0**70, 65536.0]
_F16 = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 6e-8, 65504.0]
_UINT = {"B": [0, 1, 2, 7, 8, 9, 16, 31, 32, 64, 65, 128, 255],
         "H": [0, 1, 2, 3, 7, 8, 255, 256, 65534, 65535],
         "I": [0, 1, 2, 5, 7, 8, 9, 16, 40, 64, 255, 2**16, 2**20, 2**24, 2**31,
               2**32 - 1],
         "Q": [0, 1, 2**32, 2**63, 2**64 - 1]}


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def base_files() -> dict:
    """Valid files to mutate (format 3): every (method, mode) layout the
    reader knows -- a new mode joins automatically -- with, where they apply,
    dither, the unbiased estimator and the plain pipeline (no centring,
    normalisation or rotation); and the version-2 golden files."""
    A = np.random.default_rng(5).standard_normal((40, 6))
    out = {}
    for method, mode in nqformat.PAYLOAD_READERS:
        kw = dict(method=method, mode=mode)
        rate = 6.0
        if method.startswith("rtn"):
            kw["group_size"], rate = 8, 4
        variants = {"": kw}
        if not method.startswith("rtn"):
            variants["-unbiased"] = dict(kw, estimator="unbiased")
            variants["-plain"] = dict(kw, center=False, normalize=False,
                                      rotate=False)
        if method == "nested":
            variants["-dither"] = dict(kw, dither=True)
        for suffix, options in variants.items():
            try:
                Q = nqlib.quantize(A, rate, seed=11, **options)
            except ValueError as exc:   # an option that does not apply
                if suffix == "-dither" and "dither" in str(exc):
                    continue
                raise
            out[f"{method}-{mode}{suffix}"] = Q.to_bytes()
    for path in V2_FILES:
        out[path.stem] = path.read_bytes()
    return out


def fields(data: bytes) -> list:
    """``(offset, format)`` of the fields of a valid file ``data``: header,
    side information and the payload header of the layouts listed."""
    Q = matrix.QuantizedMatrix.from_bytes(data)
    out = [(4, "B"), (5, "B"), (6, "B"), (7, "B"), (8, "I"), (12, "I"),
           (16, "Q"), (24, "f"), (28, "f")]
    pos = 32
    a = Q.shape[1]
    if Q.dither:
        out.append((pos, "Q"))
        pos += 8
    for on in (Q.center, Q.normalize):
        if on:
            out += [(pos, "f"), (pos + 4 * (a - 1), "f")]
            pos += 4 * a
    if Q.method == "nested" and Q.mode == "variable":
        out += [(pos + o, f) for o, f in zip((0, 4, 8, 12, 14, 16, 20, 24),
                                             "fffHHIII")]
    elif Q.method == "nested" and Q.mode == "fixed":
        out.append((pos, "I"))
        pos += 4
        for part in ("hi", "lo"):
            k = len(getattr(Q.payload, part).betas)
            out += [(pos, "B"), (pos + 1, "H"), (pos + 3, "B")]
            out += [(pos + 4 + 4 * j, "f") for j in range(k)]
            pos += 4 + 4 * k
    elif Q.method == "ecsq":
        out += [(pos + o, f) for o, f in zip((0, 4, 8, 12, 16), "ffIII")]
    elif Q.method.startswith("rtn"):
        out += [(pos, "B"), (pos + 1, "H"), (pos + 3, "e")]
    # another layout: its payload is fuzzed byte by byte (hypothesis)
    return out


def set_field(body: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(body)
    struct.pack_into("<" + fmt, b, offset, value)
    return bytes(b)


def edge_values(fmt: str, current) -> list:
    if fmt == "f":
        return _F32
    if fmt == "e":
        return _F16
    top = 2 ** (8 * struct.calcsize(fmt)) - 1
    near = [current + d for d in (-8, -1, 1, 8)]
    return [v for v in _UINT[fmt] + near if 0 <= v <= top]


def outcome(data: bytes) -> str:
    """The property: ValueError, or a finite decode of the claimed shape."""
    try:
        Q = matrix.QuantizedMatrix.from_bytes(data)
    except ValueError:
        return "refused"
    n, a = struct.unpack_from("<II", data, 8)
    assert Q.shape == (n, a)
    assert Q.to_bytes() == data
    try:
        X = Q.dequantize()
    except ValueError:
        return "refused at decode"
    assert X.shape == (n, a)
    assert np.all(np.isfinite(X)), "non-finite output"
    return "decoded"


def sweep(bases: dict, counts: Counter) -> None:
    """Every field of every base file set to every edge value."""
    for name, data in bases.items():
        body = data[:-4]
        for offset, fmt in fields(data):
            (current,) = struct.unpack_from("<" + fmt, body, offset)
            for value in edge_values(fmt, current):
                mutated = with_crc(set_field(body, offset, fmt, value))
                try:
                    counts["sweep " + outcome(mutated)] += 1
                except AssertionError as exc:
                    raise AssertionError(f"{name}: field at {offset} ({fmt}) = "
                                         f"{value!r}: {exc}") from None


def fuzz_test(bases: dict, counts: Counter, examples: int):
    """The hypothesis test: 1-4 random mutations of a base file."""
    field_lists = {name: fields(data) for name, data in bases.items()}

    @settings(max_examples=examples, database=None, derandomize=True,
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(draw):
        name = draw.draw(st.sampled_from(sorted(bases)), label="base")
        body = bases[name][:-4]
        for _ in range(draw.draw(st.integers(1, 4), label="mutations")):
            kind = draw.draw(st.sampled_from(["field", "field", "byte", "cut",
                                              "insert"]))
            if kind == "field":
                offset, fmt = draw.draw(st.sampled_from(field_lists[name]))
                if offset + struct.calcsize(fmt) > len(body):
                    continue
                (current,) = struct.unpack_from("<" + fmt, body, offset)
                if fmt in "fe":
                    value = draw.draw(st.one_of(
                        st.sampled_from(edge_values(fmt, current)),
                        st.floats(width=32 if fmt == "f" else 16)))
                else:
                    top = 2 ** (8 * struct.calcsize(fmt)) - 1
                    value = draw.draw(st.one_of(
                        st.sampled_from(edge_values(fmt, current)),
                        st.integers(0, top)))
                body = set_field(body, offset, fmt, value)
            elif kind == "byte":
                i = draw.draw(st.integers(0, len(body) - 1))
                body = body[:i] + bytes([draw.draw(st.integers(0, 255))]) + body[i + 1:]
            elif kind == "cut":
                i = draw.draw(st.integers(0, len(body) - 1))
                body = body[:i] + body[i + draw.draw(st.integers(1, 16)):]
            else:
                i = draw.draw(st.integers(0, len(body)))
                extra = draw.draw(st.binary(min_size=1, max_size=16))
                body = body[:i] + extra + body[i:]
            if len(body) < 4:
                break
        counts["fuzz " + outcome(with_crc(body))] += 1

    run()


def _address_space() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def capped_main(examples: int) -> None:
    """Subprocess body: warm up, cap the address space, fuzz, print counts."""
    import resource

    bases = base_files()
    for data in bases.values():   # load every kernel before the cap
        outcome(data)
    outcome(with_crc(set_field(bases["nested-variable"][:-4], 8, "I", 48)))
    # the largest rotation a small file may ask for: odd factor 1023
    odd = nqlib.quantize(np.random.default_rng(6).standard_normal((8 * 1023, 1)),
                         0.5, seed=3, mode="fixed").to_bytes()
    limit = _address_space() + HEADROOM_MIB * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    counts = Counter()
    # built under the cap: another seed (format 3), and the numpy/LAPACK
    # draw of a version-2 file
    for offset, fmt, value in ((16, "Q", 4), (3, "B", 2)):
        result = outcome(with_crc(set_field(odd[:-4], offset, fmt, value)))
        assert result == "decoded", result
        counts["odd factor 1023 decoded"] += 1
    sweep(bases, counts)
    fuzz_test(bases, counts, examples)
    print(json.dumps(dict(counts, headroom_mib=HEADROOM_MIB)))


# ------------------------------------------------------------------ tests
@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="RLIMIT_AS and /proc are Linux's")
def test_fuzzed_files_under_a_memory_cap():
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, str(EXAMPLES)], env=env,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    print(counts)
    fuzzed = sum(v for k, v in counts.items() if k.startswith("fuzz"))
    assert fuzzed == EXAMPLES
    # not vacuous: some mutations are refused, some still decode
    for kind in ("sweep", "fuzz"):
        assert counts.get(f"{kind} refused", 0) > 0
        assert counts.get(f"{kind} decoded", 0) > 0


@pytest.mark.skipif(sys.platform.startswith("linux"),
                    reason="Linux runs the capped test")
def test_fuzzed_files_uncapped():
    counts = Counter()
    bases = base_files()
    sweep(bases, counts)
    fuzz_test(bases, counts, 300)


def test_forty_eight_byte_file_claiming_a_huge_matrix():
    """Issue 14: a 48-byte file with a valid CRC claiming a 2^20 x 2^20
    fixed-mode matrix (both parts empty) with alpha = NaN was accepted, and
    dequantize() tried to allocate 8 TiB."""
    header = struct.pack("<3sBBBBBIIQf", nqformat.MAGIC, nqformat.FORMAT_VERSION,
                         matrix.METHODS.index("nested"),
                         matrix.MODES.index("fixed"), 16, 0, 2**20, 2**20, 0, 4.0)
    body = header + struct.pack("<f", math.nan) + struct.pack("<I", 0)
    body += struct.pack("<BHB", 0, 0, 0) * 2
    data = with_crc(body)
    assert len(data) == 48
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="corrupted.*claims more entries"):
            matrix.QuantizedMatrix.from_bytes(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    # each lie is caught on its own too
    small = set_field(set_field(body, 8, "I", 8), 12, "I", 4)   # 8 x 4
    with pytest.raises(ValueError, match="alpha not finite"):
        matrix.QuantizedMatrix.from_bytes(with_crc(small))
    honest = small[:28] + struct.pack("<f", 1.0) + small[32:]
    with pytest.raises(ValueError, match="no coded block"):
        matrix.QuantizedMatrix.from_bytes(with_crc(honest))


@pytest.mark.parametrize("offset,fmt,value,message", [
    (6, "B", 32, "unknown flag bits"),
    (6, "B", 8 | 16 | 1 | 2 | 4, None),
    (7, "B", 1, "reserved"),
    (24, "f", math.nan, "rate"),
    (24, "f", 9.0, "rate"),
    (28, "f", math.inf, "alpha"),
], ids=["flag", "dither-ok", "reserved", "rate-nan", "rate-high", "alpha-inf"])
def test_header_fields_are_checked(offset, fmt, value, message):
    data = nqlib.quantize(np.random.default_rng(1).standard_normal((64, 4)), 5,
                          method="ecsq").to_bytes()
    bad = with_crc(set_field(data[:-4], offset, fmt, value))
    with pytest.raises(ValueError, match=message or "flags .* do not apply"):
        matrix.QuantizedMatrix.from_bytes(bad)


def test_messages_say_corrupted_not_tampered():
    data = bytearray(nqlib.quantize(np.ones((256, 4)), 4).to_bytes())
    data[40] ^= 1
    with pytest.raises(ValueError, match="corrupted") as info:
        matrix.QuantizedMatrix.from_bytes(bytes(data))
    assert "tamper" not in str(info.value)


def test_degenerate_matrix_is_padded_to_the_minimum_rate():
    """A constant matrix codes to almost nothing; the writer pads the file
    with zeros to MIN_FILE_BITS bits per entry (so that a reader can bound a
    file's shape by its size) and the padding is checked exactly."""
    A = np.full((4096, 16), 2.5)
    Q = nqlib.quantize(A, 1.0)
    data = Q.to_bytes()
    assert len(data) == A.size // 80
    assert Q.bits_per_entry <= 1.0
    R = matrix.QuantizedMatrix.from_bytes(data)
    np.testing.assert_array_equal(R.dequantize(), A)
    body = data[:-4]
    with pytest.raises(ValueError, match="trailing bytes"):
        matrix.QuantizedMatrix.from_bytes(with_crc(body + b"\0"))
    with pytest.raises(ValueError, match="claims more entries"):
        matrix.QuantizedMatrix.from_bytes(with_crc(body[:-1]))
    with pytest.raises(ValueError, match="padding"):
        matrix.QuantizedMatrix.from_bytes(with_crc(body[:-1] + b"\1"))


def test_writer_refuses_what_the_reader_refuses():
    """An odd factor too large for the matrix is refused when quantizing
    (the reader would refuse the file)."""
    A = np.random.default_rng(2).standard_normal((8 * 1031, 1))
    with pytest.raises(ValueError, match="cannot be rotated"):
        nqlib.quantize(A, 2.0)
    assert nqlib.quantize(A, 2.0, rotate=False).shape == A.shape


if __name__ == "__main__":
    capped_main(int(sys.argv[1]))
