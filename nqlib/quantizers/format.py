"""The binary format of a quantized matrix (version 3): header, payloads,
validation, and the size of the side information.

A file is::

    b"NQM", version (uint8),
    method, mode, flags, 0 (uint8 each), n, a (uint32), seed (uint64),
    rate (float32), alpha (float32),
    [dither key (uint64)], [means (a float32)], [norms (a float32)],
    payload (by method and mode: :mod:`nqlib.quantizers.payloads`),
    zero padding up to MIN_FILE_BITS bits per entry (version 3),
    CRC-32 of everything before it (uint32)

all little-endian. The reader trusts nothing: every header field is checked
against the others and against the length of the data before anything is
allocated, and a file carries at least ``MIN_FILE_BITS`` bits per entry (a
writer pads a shorter code with zero bytes), so its size bounds the work of
decoding it. The CRC catches accidental damage (truncation, flipped bits),
not deliberate changes; the checks catch a well-formed lie ("corrupted ...").

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np

from nqlib.quantizers import trellis
from nqlib.quantizers.fixed import MAX_SCALES
from nqlib.quantizers.payloads import (
    EcsqPayload,
    FixedPart,
    FixedPayload,
    RtnPayload,
    TrellisPayload,
    VariablePayload,
)

__all__ = ["METHODS", "MODES", "ESTIMATORS", "FORMAT_VERSION", "READ_VERSIONS",
           "serialize", "parse", "side_information_bits",
           "stream_side_information_bits", "stream_nbytes", "STREAM_CALL_BYTES"]

METHODS = ("nested", "rtn", "rtn-hadamard", "ecsq")
MODES = ("variable", "fixed", "trellis")
ESTIMATORS = ("mmse", "unbiased")
MAGIC = b"NQM"
#: 2: dithered files carry the 64-bit dither key (version 1 had none);
#: 3: the decoder's draws are nqlib's own (:mod:`nqlib.quantizers.draws`)
#: and a file carries at least MIN_FILE_BITS bits per entry (zero padding)
FORMAT_VERSION = 3
#: format versions this nqlib reads (2 with numpy's draws, as written)
READ_VERSIONS = (2, 3)
#: every file holds at least this many bits per entry: a reader refuses a
#: shape that its bytes cannot carry (``len(data) >= n a // 80``)
MIN_FILE_BITS = 0.1
ENTRIES_PER_BYTE = 80  # 8 / MIN_FILE_BITS
#: the rotation's dense odd factor O_m (m x m, m the odd part of the coded
#: length) is allowed up to this m, beyond only while m^2 <= 8 n a
MAX_ODD_FACTOR = 1023
MIN_RATE = 0.1
MAX_RATE = 8.0

#: header flag bits: the steps of the pipeline that were on
FLAG_CENTER, FLAG_NORMALIZE, FLAG_ROTATE, FLAG_DITHER, FLAG_MMSE = 1, 2, 4, 8, 16
KNOWN_FLAGS = 31
#: method, mode, flags, reserved, n, a, seed, rate
HEADER = struct.Struct("<BBBBIIQf")

#: range of a stored scale (beta, ecsq step, fixed-mode scales)
SCALE_RANGE = (2.0**-64, 2.0**64)
#: smallest stored model sigma (the fits clip at 0.05, stored as float32)
SIGMA_MIN = float(np.float32(0.05))
#: largest model range K of the entropy-coded payloads (tables of 2K + 1)
MAX_MODEL_RANGE = 65535
#: largest |alpha| a reader accepts (the encoder stores 1.0 beyond it)
MAX_ALPHA = 2.0**16
#: flags that apply to each method
METHOD_FLAGS = {
    "nested": KNOWN_FLAGS,
    "ecsq": KNOWN_FLAGS & ~FLAG_DITHER,
    "rtn": 0,
    "rtn-hadamard": FLAG_ROTATE,
}

#: payload bytes besides the arrays, by (method, mode)
VARIABLE_HEADER = "fffHHIII"  # beta, sigma0, sigma1, K, p1, crc, keep, words
ECSQ_HEADER = "ffIII"         # step, sigma, K, crc, words
TRELLIS_HEADER = "BBHIfQ"     # L, qbits, seq_len, keep, beta, total_bits
#: fixed mode: the split h, then per part L, q, k and at most MAX_SCALES
#: float32 scales
FIXED_PAYLOAD_BYTES = 4 + 2 * (4 + 4 * MAX_SCALES)
VARIABLE_PAYLOAD_BYTES = struct.calcsize("<" + VARIABLE_HEADER)
ECSQ_PAYLOAD_BYTES = struct.calcsize("<" + ECSQ_HEADER)
TRELLIS_PAYLOAD_BYTES = struct.calcsize("<" + TRELLIS_HEADER)


# ----------------------------------------------------------- byte streams
class Writer:
    """Little-endian writer of packed fields and arrays."""

    def __init__(self):
        self.buf = io.BytesIO()

    def pack(self, fmt, *values):
        """Append ``struct.pack("<" + fmt, *values)``."""
        self.buf.write(struct.pack("<" + fmt, *values))

    def array(self, arr, dtype):
        """Append the bytes of ``arr`` as ``dtype`` (C order)."""
        self.buf.write(np.ascontiguousarray(arr, dtype=dtype).tobytes())

    def getvalue(self) -> bytes:
        """Everything written."""
        return self.buf.getvalue()


class Reader:
    """Little-endian reader that refuses to read past the end of ``data``
    ("truncated") before allocating anything."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def unpack(self, fmt):
        """The next ``struct.unpack("<" + fmt)`` fields."""
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise ValueError("quantized matrix data is truncated")
        out = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return out

    def array(self, dtype, count):
        """The next ``count`` values of ``dtype`` (a copy)."""
        dtype = np.dtype(dtype)
        size = dtype.itemsize * count
        if self.pos + size > len(self.data):
            raise ValueError("quantized matrix data is truncated")
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += size
        return out.copy()


# ------------------------------------------------------------- validation
def corrupted(what: str) -> ValueError:
    """The ValueError of a well-formed but inconsistent file."""
    return ValueError(f"corrupted quantized matrix: {what}")


def padded_length(n: int, method: str) -> int:
    """Length of the coded vectors: ``n`` rounded up to a multiple of 8 for
    the lattice method, ``n`` for the scalar ones."""
    return -(-n // 8) * 8 if method == "nested" else n


def padding_bytes(version: int, entries: int, body_len: int) -> int:
    """Zero bytes a file of this ``version`` carries after its payload: up to
    ``entries // 80`` bytes in all (``MIN_FILE_BITS`` bits per entry), CRC
    included; none for version 2."""
    if version < 3:
        return 0
    return max(0, entries // ENTRIES_PER_BYTE - (body_len + 4))


def rotation_size_problem(n_pad: int, a: int) -> str | None:
    """Why a rotation of length ``n_pad`` for ``a`` vectors is refused (its
    dense odd factor would dwarf the matrix), or None."""
    m = n_pad // (n_pad & -n_pad)
    if m <= MAX_ODD_FACTOR or m * m <= 8 * n_pad * a:
        return None
    return (f"the rotation of length {n_pad} = {n_pad // m} x {m} needs a dense "
            f"{m} x {m} factor, more than 8 times the {n_pad} x {a} matrix "
            f"(allowed: odd part <= {MAX_ODD_FACTOR}, or its square <= 8 n a)")


def check_floats(arr, name, *, minimum=None, low=None, high=None):
    """Every value of ``arr`` (float array or scalar) finite and in range,
    else a "corrupted" ValueError naming ``name``."""
    if arr is None:
        return
    with np.errstate(invalid="ignore"):  # a signalling NaN read from the file
        v = np.asarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise corrupted(f"{name} not finite")
    if minimum is not None and np.any(v < minimum):
        raise corrupted(f"{name} below {minimum}")
    if low is not None and np.any(~((v >= low) & (v <= high))):
        raise corrupted(f"{name} outside [{low:g}, {high:g}]")


def check_header(version: int, nbytes: int, header, alpha) -> dict:
    """The fixed header, checked field by field and against the data length
    ``nbytes``; returns the :class:`~nqlib.quantizers.matrix.QuantizedMatrix`
    keyword arguments it holds."""
    mi, mo, flags, reserved, n, a, seed, rate = header
    if mi >= len(METHODS) or mo >= len(MODES):
        raise ValueError("corrupted header: unknown method or mode")
    method, mode = METHODS[mi], MODES[mo]
    if (method, mode) not in payload_readers(version):
        raise corrupted(f"method {method!r} has no mode {mode!r} in format "
                        f"version {version}")
    if reserved:
        raise corrupted("reserved header byte is not zero")
    if flags & ~KNOWN_FLAGS:
        raise corrupted(f"unknown flag bits {flags & ~KNOWN_FLAGS:#04x}")
    if flags & ~METHOD_FLAGS[method]:
        raise corrupted(f"flags {flags:#04x} do not apply to method {method!r}")
    if method == "rtn-hadamard" and not flags & FLAG_ROTATE:
        raise corrupted("method 'rtn-hadamard' without its rotation flag")
    if n < 1 or a < 1:
        raise corrupted(f"empty shape ({n}, {a})")
    if n * a // ENTRIES_PER_BYTE > nbytes:
        raise corrupted(f"shape ({n}, {a}) claims more entries than {nbytes} "
                        f"bytes can carry at {MIN_FILE_BITS} bits per entry")
    if method in ("rtn", "rtn-hadamard"):
        if rate not in range(2, 9):
            raise corrupted(f"rate {rate} is not a bit width 2..8")
    elif not (math.isfinite(rate)
              and np.float32(MIN_RATE) <= rate <= np.float32(MAX_RATE)):
        raise corrupted(f"rate {rate} outside [{MIN_RATE}, {MAX_RATE}]")
    if flags & FLAG_MMSE:
        check_floats(alpha, "shrinkage factor alpha", low=-MAX_ALPHA,
                     high=MAX_ALPHA)
    elif alpha != 1.0:
        raise corrupted(f"shrinkage factor alpha = {alpha} without the MMSE "
                        "estimator (must be 1)")
    if flags & FLAG_ROTATE:
        why = rotation_size_problem(padded_length(n, method), a)
        if why:
            raise corrupted(why)
    return dict(shape=(n, a), rate=rate, method=method, mode=mode, flags=flags,
                seed=seed, alpha=alpha)


# --------------------------------------------------------------- payloads
def _read_variable(r: Reader, h: dict) -> VariablePayload:
    beta, s0, s1, K, p1, crc, keep, nw = r.unpack(VARIABLE_HEADER)
    if not 1 <= keep <= h["n_pad"] // 8:
        raise ValueError("corrupted variable-mode header (kept blocks)")
    check_floats(beta, "variable-mode scale beta", low=SCALE_RANGE[0],
                 high=SCALE_RANGE[1])
    if K < 1:
        raise corrupted("variable-mode model range K = 0")
    check_floats(np.array([s0, s1]), "variable-mode model sigma",
                 low=SIGMA_MIN, high=K + 1.0)
    if not 1 <= p1 <= 65535:
        raise corrupted(f"variable-mode coset probability {p1} outside 1..65535")
    return VariablePayload(beta=beta, sigma0=s0, sigma1=s1, K=K, p1=p1, crc=crc,
                           keep=keep, words=r.array(np.uint32, nw))


def _read_fixed(r: Reader, h: dict) -> FixedPayload:
    a = h["shape"][1]
    B = h["n_pad"] // 8
    (split,) = r.unpack("I")
    if split > B:
        raise ValueError("corrupted fixed-mode header (block split)")
    parts = {}
    for name, count in (("hi", a * split), ("lo", a * (B - split))):
        L, q, k = r.unpack("BHB")
        if L == 0:
            ok = q == 0 and k == 0 and (name == "lo" or count == 0)
        else:
            # k <= 8 scales (fixed.MAX_SCALES): the scale index is 3 bits
            # wide in the GPU layout; k q^8 words fit in L bits
            ok = (8 <= L <= 64 and 1 <= k <= MAX_SCALES and q >= 2
                  and k * q**8 <= 2**L and count > 0)
        if not ok:
            raise ValueError(f"corrupted fixed-mode header (part {name!r}: "
                             f"L={L}, q={q}, k={k} for {count} blocks)")
        betas = r.array(np.float32, k)
        check_floats(betas, "fixed-mode scales", low=SCALE_RANGE[0],
                     high=SCALE_RANGE[1])
        parts[name] = (L, q, betas)
    if parts["hi"][0] == 0 and parts["lo"][0] == 0:
        raise ValueError("corrupted fixed-mode header (no coded block)")
    out = {}
    for name, count in (("hi", a * split), ("lo", a * (B - split))):
        L, q, betas = parts[name]
        out[name] = FixedPart(L=L, q=q, betas=betas,
                              packed=r.array(np.uint8, -(-count * L // 8)))
    return FixedPayload(h=split, **out)


def _read_rtn(r: Reader, h: dict) -> RtnPayload:
    n, a = h["shape"]
    bits, group = r.unpack("BH")
    if not (2 <= bits <= 8 and group >= 1 and bits == h["rate"]):
        raise ValueError("corrupted rtn header")
    ng = -(-n // group)
    scales = r.array(np.float16, a * ng).reshape(a, ng)
    check_floats(scales, "rtn group scales", minimum=0.0)
    packed = r.array(np.uint8, -(-a * ng * group * bits // 8))
    return RtnPayload(bits=bits, group=group, scales=scales, packed=packed)


def _read_ecsq(r: Reader, h: dict) -> EcsqPayload:
    step, sigma, K, crc, nw = r.unpack(ECSQ_HEADER)
    check_floats(step, "ecsq step", low=SCALE_RANGE[0], high=SCALE_RANGE[1])
    if not 1 <= K <= MAX_MODEL_RANGE:
        raise corrupted(f"ecsq model range K = {K} outside 1..{MAX_MODEL_RANGE}")
    check_floats(sigma, "ecsq model sigma", low=SIGMA_MIN, high=K + 1.0)
    return EcsqPayload(step=step, sigma=sigma, K=K, crc=crc,
                       words=r.array(np.uint32, nw))


def _read_trellis(r: Reader, h: dict) -> TrellisPayload:
    if h["version"] < 3 or h["flags"] & FLAG_DITHER:
        raise corrupted("mode 'trellis' needs format version 3 and no dither")
    a, n_pad = h["shape"][1], h["n_pad"]
    L, qbits, seq_len, keep, beta, total_bits = r.unpack(TRELLIS_HEADER)

    def bad(what):
        return corrupted(f"trellis payload {what}")

    if not trellis.MIN_L <= L <= trellis.MAX_L:
        raise bad(f"state bits L = {L} outside {trellis.MIN_L}..{trellis.MAX_L}")
    if qbits != trellis.TABLE_BITS:
        raise bad(f"table bits {qbits} (this nqlib builds {trellis.TABLE_BITS})")
    if seq_len < 1:
        raise bad("sequence length 0")
    if not 1 <= keep <= n_pad:
        raise bad(f"kept entries {keep} outside 1..{n_pad}")
    if not (math.isfinite(beta) and SCALE_RANGE[0] <= beta <= SCALE_RANGE[1]):
        raise bad(f"scale beta = {beta} not finite or out of range")
    coded = a * keep
    if not coded <= total_bits <= trellis.MAX_K * coded:
        raise bad(f"stream of {total_bits} bits for {coded} coded entries "
                  f"(needs 1 to {trellis.MAX_K} bits per entry)")
    packed = r.array(np.uint8, -(-total_bits // 8))  # raises when truncated
    if total_bits % 8 and packed[-1] & ((1 << (8 - total_bits % 8)) - 1):
        raise bad("padding bits of the stream are not zero")
    lay = trellis.layout(a, n_pad, keep, total_bits, seq_len)
    try:
        lay.check(L)
    except ValueError as exc:
        raise bad(str(exc)) from None
    return TrellisPayload(L=L, qbits=qbits, seq_len=seq_len, keep=keep,
                          beta=beta, total_bits=total_bits, packed=packed)


#: the payload reader of each (method, mode): the layouts of format version
#: 3. A new mode adds its payload type, its reader here and its writer to
#: :func:`write_payload`.
PAYLOAD_READERS = {
    ("nested", "variable"): _read_variable,
    ("nested", "fixed"): _read_fixed,
    ("nested", "trellis"): _read_trellis,
    ("rtn", "fixed"): _read_rtn,
    ("rtn-hadamard", "fixed"): _read_rtn,
    ("ecsq", "variable"): _read_ecsq,
}
#: combinations only version-2 files hold (ecsq stored the mode it was given)
LEGACY_PAYLOAD_READERS = {("ecsq", "fixed"): _read_ecsq}


def payload_readers(version: int) -> dict:
    """The payload readers of format ``version`` by (method, mode)."""
    if version < 3:
        return {**PAYLOAD_READERS, **LEGACY_PAYLOAD_READERS}
    return PAYLOAD_READERS


def write_payload(w: Writer, p) -> None:
    """Append the payload ``p`` (any type of :mod:`~nqlib.quantizers.payloads`)."""
    if isinstance(p, TrellisPayload):
        w.pack(TRELLIS_HEADER, p.L, p.qbits, p.seq_len, p.keep, p.beta,
               p.total_bits)
        w.array(p.packed, np.uint8)
    elif isinstance(p, VariablePayload):
        w.pack(VARIABLE_HEADER, p.beta, p.sigma0, p.sigma1, p.K, p.p1, p.crc,
               p.keep, len(p.words))
        w.array(p.words, np.uint32)
    elif isinstance(p, FixedPayload):
        w.pack("I", p.h)
        for c in (p.hi, p.lo):
            w.pack("BHB", c.L, c.q, len(c.betas))
            w.array(c.betas, np.float32)
        w.array(p.hi.packed, np.uint8)
        w.array(p.lo.packed, np.uint8)
    elif isinstance(p, RtnPayload):
        w.pack("BH", p.bits, p.group)
        w.array(p.scales, np.float16)
        w.array(p.packed, np.uint8)
    elif isinstance(p, EcsqPayload):
        w.pack(ECSQ_HEADER, p.step, p.sigma, p.K, p.crc, len(p.words))
        w.array(p.words, np.uint32)
    else:
        raise TypeError(f"not a payload: {type(p).__name__}")


# ------------------------------------------------------------ whole files
def serialize(qm) -> bytes:
    """The bytes of the quantized matrix ``qm``: magic, format version,
    header, side information, payload, zero padding up to ``MIN_FILE_BITS``
    bits per entry (version 3) and a CRC-32 of all of it."""
    w = Writer()
    w.buf.write(MAGIC)
    w.pack("B", qm.version)
    w.pack(HEADER.format[1:], METHODS.index(qm.method), MODES.index(qm.mode),
           qm.flags, 0, qm.shape[0], qm.shape[1], qm.seed, qm.rate)
    w.pack("f", qm.alpha)
    if qm.flags & FLAG_DITHER:
        w.pack("Q", qm.dither_key)
    if qm.flags & FLAG_CENTER:
        w.array(qm.means, np.float32)
    if qm.flags & FLAG_NORMALIZE:
        w.array(qm.norms, np.float32)
    write_payload(w, qm.payload)
    body = w.getvalue()
    body += bytes(padding_bytes(qm.version, qm.shape[0] * qm.shape[1], len(body)))
    return body + struct.pack("<I", zlib.crc32(body))


def parse(data: bytes) -> dict:
    """The fields of a serialised quantized matrix, every one checked: the
    keyword arguments of :class:`~nqlib.quantizers.matrix.QuantizedMatrix`
    (``payload`` included).

    Raises
    ------
    ValueError
        Not an nqlib file, a format version this nqlib does not read, a
        checksum mismatch, or a field out of range or inconsistent.
    """
    data = bytes(data)
    if len(data) < len(MAGIC) + 1 or data[:3] != MAGIC:
        raise ValueError("not an nqlib quantized matrix (bad magic bytes)")
    version = data[3]
    if version not in READ_VERSIONS:
        raise ValueError(f"unsupported format version {version} (this nqlib "
                         f"reads versions {', '.join(map(str, READ_VERSIONS))};"
                         " quantize the matrix again)")
    if len(data) < 4 + HEADER.size + 8:
        raise ValueError("quantized matrix data is truncated")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise ValueError("checksum mismatch: the quantized matrix data is "
                         "corrupted or truncated")
    r = Reader(body)
    r.pos = 4
    header = r.unpack(HEADER.format[1:])
    (alpha,) = r.unpack("f")
    fields = check_header(version, len(data), header, alpha)
    flags, (n, a) = fields["flags"], fields["shape"]
    (dither_key,) = r.unpack("Q") if flags & FLAG_DITHER else (0,)
    means = r.array(np.float32, a) if flags & FLAG_CENTER else None
    norms = r.array(np.float32, a) if flags & FLAG_NORMALIZE else None
    check_floats(means, "column means")
    check_floats(norms, "column norms", minimum=0.0)
    h = dict(fields, version=version, n_pad=padded_length(n, fields["method"]))
    payload = payload_readers(version)[fields["method"], fields["mode"]](r, h)
    pad = padding_bytes(version, n * a, r.pos)
    if len(body) - r.pos > pad:
        raise ValueError("quantized matrix data has trailing bytes")
    if len(body) - r.pos < pad or any(body[r.pos:]):
        raise ValueError("corrupted padding: a version-3 file is zero-padded "
                         f"to {MIN_FILE_BITS} bits per entry")
    return dict(fields, means=means, norms=norms, payload=payload,
                dither_key=dither_key, version=version)


#: Streams. A layer that quantizes its input on every call sends a stream of
#: matrices of one length ``n`` and one set of options. Most of a file is
#: then the stream's configuration, the same for every call and sent once:
#: magic, version, method, mode, flags, ``n``, seed, rate, the fixed mode's
#: code parameters (a function of ``n``, the count ``a`` and the rate), the
#: CRC (a check, not information) and the padding. What one call must send
#: is the rest: ``a`` and ``alpha`` (STREAM_CALL_BYTES), the dither key, the
#: means and norms, and the payload's data-dependent fields and words.
STREAM_CALL_BYTES = 4 + 4


def stream_side_information_bits(shape, flags: int, payload_call_bytes: int) -> int:
    """Bits that one call of a stream (see :data:`STREAM_CALL_BYTES`) sends
    besides the payload's variable part: the count ``a``, ``alpha``, the
    dither key, the means, the norms and the payload's per-call fields
    (``payload_call_bytes``)."""
    return 8 * (STREAM_CALL_BYTES + _call_side_bytes(shape, flags)
                + payload_call_bytes)


def stream_nbytes(qm) -> int:
    """Bytes that ``qm`` costs as one call of a stream (see
    :data:`STREAM_CALL_BYTES`): its file without the stream's
    configuration."""
    p = qm.payload
    if isinstance(p, FixedPayload):      # the split and parts: configuration
        call = p.hi.packed.size + p.lo.packed.size
    elif isinstance(p, VariablePayload):
        call = VARIABLE_PAYLOAD_BYTES + p.words.nbytes
    elif isinstance(p, EcsqPayload):
        call = ECSQ_PAYLOAD_BYTES + p.words.nbytes
    elif isinstance(p, TrellisPayload):
        call = TRELLIS_PAYLOAD_BYTES + p.packed.size
    elif isinstance(p, RtnPayload):      # bits and group: configuration
        call = p.scales.nbytes + p.packed.size
    else:
        raise TypeError(f"not a payload: {type(p).__name__}")
    return stream_side_information_bits(qm.shape, qm.flags, call) // 8


def side_information_bits(shape, flags: int, payload_fixed_bytes: int) -> int:
    """Bits of a file besides the payload's variable part: magic, version,
    header, alpha, dither key, means, norms, the payload's fixed fields
    (``payload_fixed_bytes``) and the CRC."""
    side = _call_side_bytes(shape, flags)
    return 8 * (len(MAGIC) + 1 + HEADER.size + 4 + side + payload_fixed_bytes + 4)


def _call_side_bytes(shape, flags: int) -> int:
    """Bytes of the dither key, the means and the norms of a matrix of
    ``shape``."""
    a = shape[1]
    return (4 * a * (bool(flags & FLAG_CENTER) + bool(flags & FLAG_NORMALIZE))
            + 8 * bool(flags & FLAG_DITHER))
