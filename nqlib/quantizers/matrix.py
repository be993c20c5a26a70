"""The matrix quantizer: ``quantize``, ``QuantizedMatrix`` and ``load``.

A real matrix ``A`` (n x a) is quantized column by column (the columns are
the vectors: the product of interest is ``A.T @ B``). For the nested-lattice
method the pipeline is

1. **centering**: subtract each column's mean (side information, float32);
2. **normalisation**: scale each centred column to norm ``sqrt(n')``
   (its norm is side information, float32), where ``n'`` is ``n`` rounded up
   to a multiple of 8 (zero padding);
3. **rotation**: a seeded random Hadamard rotation of R^n' (shared with the
   other operand through the seed), after which every 8-block looks like
   N(0, I_8);
4. **E8 coding** of every 8-block:
   ``mode="variable"`` -- the nearest point of ``beta E8``, entropy coded
   (ANS) under a fitted discretised-Gaussian model, ``beta`` set by rate
   control; ``mode="fixed"`` -- a union of E8 Voronoi codes at ``k`` scales,
   one fixed-length word per block (random access);
5. **decoding** with the MMSE shrinkage ``alpha = <y, y_hat> / <y_hat, y_hat>``
   (``estimator="mmse"``, default) or without it (``"unbiased"``), after
   projecting out the directions known to carry no signal (the mean
   direction when centred, the padding).

The rate is honest: ``bits_per_entry`` is ``8 * nbytes / (n a)`` where
``nbytes`` is the length of the serialised matrix -- header, means, norms,
shrinkage factor, model parameters and codes. Only the seed is free (it is
stored too).

The file format (version 3) is read by a parser that trusts nothing: every
header field is checked against the others and against the length of the
data before anything is allocated, and a file carries at least
``MIN_FILE_BITS`` bits per entry (a writer pads a shorter code, which only
a degenerate matrix -- constant columns, say -- produces, with zero bytes),
so its size bounds the work of decoding it. The CRC-32 at the end catches
accidental damage (truncation, flipped bits), not deliberate changes; the
checks catch a well-formed lie. The decoder's pseudo-random draws (rotation,
dither, entropy tables) are nqlib's own (:mod:`nqlib.quantizers.draws`), so
a file decodes to the same bits whatever numpy or LAPACK reads it; files of
version 2 are read with the numpy draws they were written with.

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

import hashlib
import io
import math
import numbers
import struct
import zlib

import numpy as np

from nqlib import _backend, _checks
from nqlib.quantizers import draws, entropy
from nqlib.quantizers.hadamard import RandomHadamard

__all__ = ["QuantizedMatrix", "quantize", "load", "METHODS", "MODES"]

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
_ENTRIES_PER_BYTE = 80  # 8 / MIN_FILE_BITS
#: the rotation's dense odd factor O_m (m x m, m the odd part of the coded
#: length) is allowed up to this m, beyond only while m^2 <= 8 n a
MAX_ODD_FACTOR = 1023
#: allowed excess of the achieved rate over the target (bits per entry)
RATE_TOLERANCE = 0.02
MIN_RATE = 0.1
MAX_RATE = 8.0

_FLAG_CENTER, _FLAG_NORMALIZE, _FLAG_ROTATE, _FLAG_DITHER, _FLAG_MMSE = (
    1, 2, 4, 8, 16)
_KNOWN_FLAGS = 31
_HEADER = struct.Struct("<BBBBIIQf")  # method, mode, flags, pad, n, a, seed, rate


# ----------------------------------------------------------------- helpers
class _Writer:
    def __init__(self):
        self.buf = io.BytesIO()

    def pack(self, fmt, *values):
        self.buf.write(struct.pack("<" + fmt, *values))

    def array(self, arr, dtype):
        self.buf.write(np.ascontiguousarray(arr, dtype=dtype).tobytes())

    def getvalue(self):
        return self.buf.getvalue()


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def unpack(self, fmt):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise ValueError("quantized matrix data is truncated")
        out = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return out

    def array(self, dtype, count):
        dtype = np.dtype(dtype)
        size = dtype.itemsize * count
        if self.pos + size > len(self.data):
            raise ValueError("quantized matrix data is truncated")
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += size
        return out.copy()

    def rest(self):
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out


def _padded(n: int) -> int:
    return -(-n // 8) * 8


def _dither(seed: int, n_pad: int, a: int, nblocks: int, key: int,
            version: int = FORMAT_VERSION) -> np.ndarray:
    """Subtractive dither uniform on the Voronoi cell of E8, one per block.

    ``w = G u`` with ``u`` uniform on [0, 1)^8 is uniform on a fundamental
    parallelepiped; ``w - Q(w)`` is then uniform on the Voronoi cell. The
    stream is seeded by the shared seed *and* the matrix's 64-bit dither
    key (:func:`_dither_key`, stored in the file), so the two operands of a
    product draw independent dithers even when they have the same shape.

    Version 3: ``u`` is the top 40 bits of nqlib's own stream
    (:mod:`nqlib.quantizers.draws`) times 2^-40, so ``G u`` (entries of ``G``
    in {0, +-1/2, +-1, 2}) and ``w - Q(w)`` are exact: the same bits on every
    machine. Version 2: numpy's ``Generator.random``.
    """
    from nqlib.lattices import E8

    if version >= draws.FIRST_OWN_DRAWS:
        key64 = draws.stream_key(seed, n_pad, a, key, draws.DITHER)
        top = draws.words(key64, 8 * nblocks) >> np.uint64(24)
        u = top.astype(np.float64).reshape(nblocks, 8) * 2.0**-40
    else:
        rng = np.random.default_rng([seed, n_pad, a, 0x64, key])  # 'd': dither
        u = rng.random((nblocks, 8))
    w = u @ E8().generator.T
    return w - E8().closest_point(w)


def _dither_key(A: np.ndarray) -> int:
    """64-bit dither key of a matrix: a BLAKE2b digest of its shape and
    float64 entries.

    The same matrix always gets the same key (so :func:`quantize` stays
    deterministic), and different matrices get different keys with
    overwhelming probability -- hence, with the shared seed, independent
    pseudo-random dither streams for ``A`` and ``B`` in ``A.T @ B``. Only a
    matrix multiplied by itself shares its dither, as it shares its whole
    code.
    """
    h = hashlib.blake2b(digest_size=8, person=b"nqlib-dither")
    h.update(struct.pack("<QQ", *A.shape))
    # the float64 bytes in C order, hashed a block of rows at a time (the
    # same digest as the whole buffer at once, without a float64 copy of A)
    step = max(1, _CHUNK_ENTRIES // max(1, A.shape[1]))
    for r0 in range(0, A.shape[0], step):
        h.update(np.ascontiguousarray(A[r0:r0 + step], dtype=np.float64))
    return int.from_bytes(h.digest(), "little")


def _unit_mean_direction(P: RandomHadamard | None, n: int, n_pad: int) -> np.ndarray:
    """The unit all-ones direction of length ``n``, zero-padded to ``n_pad``,
    in the coded domain (rotated by ``P`` when there is one)."""
    e = np.zeros(n_pad)
    e[:n] = 1.0 / np.sqrt(n)
    return P.apply(e) if P is not None else e


def _scaled_padded_rotated(Xc: np.ndarray, n_pad: int, norms, P) -> np.ndarray:
    """The rows the lattice codes: the centred vectors ``Xc`` (a, n)
    zero-padded to ``n_pad``, scaled to norm ``sqrt(n_pad)`` by their stored
    (float32) ``norms`` when given (zero vectors stay zero), rotated by ``P``
    when given."""
    a, n = Xc.shape
    Y = np.zeros((a, n_pad))
    Y[:, :n] = Xc
    if norms is not None:
        s = norms.astype(np.float64)
        Y *= np.where(s > 0, np.sqrt(n_pad) / np.where(s > 0, s, 1.0), 0.0)[:, None]
    return P.apply(Y) if P is not None else Y


# ------------------------------------------------- bounded-memory passes
#: entries (float64) per chunk of the encoder's passes: the matrix is
#: centred, rotated, encoded and its shrinkage measured this many entries
#: (whole vectors) at a time, so the extra memory of :func:`quantize` is the
#: coded matrix (float64) plus a few chunks, whatever the size of ``A``.
#: Every step is per vector (or follows numpy's own summation tree), so the
#: chunk size changes no output bit.
_CHUNK_ENTRIES = 1 << 20


def _rows_per_chunk(n_pad: int, multiple: int = 8) -> int:
    """Vectors per chunk: about ``_CHUNK_ENTRIES`` entries, a multiple of
    ``multiple`` (8: a fixed-mode part then starts on a byte)."""
    return max(multiple, _CHUNK_ENTRIES // max(1, n_pad) // multiple * multiple)


def _coded_rows(A, n_pad, center, normalize, P):
    """The coded domain of :func:`quantize`, a chunk of columns at a time:
    ``(Y, means, norms)`` with ``Y`` (a, n_pad) float64 the centred,
    normalised, padded, rotated columns of ``A`` (n, a) and the stored
    (float32) means and norms, or None. Each column gets the arithmetic it
    would get alone (row-wise reductions, per-row transforms)."""
    n, a = A.shape
    Y = np.empty((a, n_pad))
    means = np.empty(a, dtype=np.float32) if center else None
    norms = np.empty(a, dtype=np.float32) if normalize else None
    step = _rows_per_chunk(n_pad, 1)
    for c0 in range(0, a, step):
        c1 = min(a, c0 + step)
        # (c, n), always a copy: it is centred in place, and for a
        # Fortran-ordered A the transposed slice is already C-contiguous
        X = np.array(A[:, c0:c1].T, dtype=np.float64, order="C")
        if center:
            means[c0:c1] = X.mean(axis=1)
            X -= means[c0:c1].astype(np.float64)[:, None]
        if normalize:
            norms[c0:c1] = np.sqrt((X * X).sum(axis=1))
        Y[c0:c1] = _scaled_padded_rotated(X, n_pad, None if norms is None
                                          else norms[c0:c1], P)
    return Y, means, norms


def _pairwise_sums(total: int, leaf_values):
    """``np.sum`` of ``total`` float64 values, for several arrays at once,
    with the values made a leaf at a time: ``leaf_values(start, stop)``
    returns a tuple of 1-D arrays holding the flat entries ``start ..
    stop - 1`` of each array.

    numpy sums a contiguous array pairwise: a run of more than 128 values
    is split at half its length rounded down to a multiple of 8 and the two
    sums added. Following that tree down to runs of at most
    ``_CHUNK_ENTRIES`` values and summing those with ``np.sum`` gives the
    bits of ``np.sum`` over the whole array without ever holding it.
    """
    # numpy's reduction starts from the identity 0.0 (which turns -0.0 into 0.0)
    return tuple(0.0 + v for v in _pairwise_node(0, total, leaf_values))


def _pairwise_node(start, n, leaf_values):
    """One node of :func:`_pairwise_sums` (a module function, not a closure
    that refers to itself: such a cycle would keep the arrays it reaches
    alive until the garbage collector runs)."""
    if n <= max(_CHUNK_ENTRIES, 128):  # numpy splits runs of more than 128
        return [float(np.sum(v)) for v in leaf_values(start, start + n)]
    half = n // 2
    half -= half % 8
    left = _pairwise_node(start, half, leaf_values)
    right = _pairwise_node(start + half, n - half, leaf_values)
    return [x + y for x, y in zip(left, right)]


def _mmse_sums(qm, Y, *, keep=False):
    """``(<y_hat, y>, <y_hat, y_hat>, Y_hat)`` over the whole matrix, with
    ``y_hat`` the projected raw decode (:func:`_project`), made a block of
    vectors at a time from ``qm._raw_rows(r0, r1)`` (or from the decoded
    payload) -- the bits of ``(Y_hat * Y).sum()`` and ``(Y_hat * Y_hat).sum()``
    on whole arrays. ``Y_hat`` (a, n_pad) is returned only with ``keep``
    (None otherwise)."""
    a, n_pad = Y.shape
    raw_rows = getattr(qm, "_raw_rows", None)
    if raw_rows is None:
        decoded = _decode_codes(qm)

        def raw_rows(r0, r1):
            return decoded[r0:r1]

    rows = _rows_per_chunk(n_pad)
    full = np.empty((a, n_pad)) if keep else None
    block = [-1, None]  # (first vector, its projected rows)

    def projected(r0):
        if block[0] != r0:
            r1 = min(a, r0 + rows)
            block[:] = [r0, _project(raw_rows(r0, r1), qm).reshape(-1)]
            if full is not None:
                full[r0:r1] = block[1].reshape(r1 - r0, n_pad)
        return block[1]

    flat_y = Y.reshape(-1)

    def leaf(start, stop):
        pieces, pos = [], start
        while pos < stop:
            r0 = pos // n_pad // rows * rows
            yh = projected(r0)
            off = pos - r0 * n_pad
            take = min(stop - pos, yh.size - off)
            pieces.append(yh[off:off + take])
            pos += take
        yh = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return yh * flat_y[start:stop], yh * yh

    num, den = _pairwise_sums(a * n_pad, leaf)
    return num, den, full


# ------------------------------------------------------------ the container
class QuantizedMatrix:
    """A matrix compressed by :func:`quantize`.

    Attributes
    ----------
    shape : tuple (n, a)
        Shape of the original matrix (its columns are the quantized vectors).
    rate : float
        The target rate given to :func:`quantize` (bits per entry).
    method, mode, estimator : str
        How it was quantized.
    seed : int
        The shared seed (rotation, dither).
    dither_key : int
        With ``dither``: the 64-bit key that, with ``seed``, draws this
        matrix's dither (stored in the file; 0 when there is no dither).
    version : int
        Format version: which draws (rotation, dither, entropy tables) the
        codes were made with; :data:`FORMAT_VERSION` for new matrices, 2 for
        a version-2 file read back (saved again as version 2).

    Notes
    -----
    ``nbytes`` is the exact size of :meth:`to_bytes`, which holds everything
    the decoder needs; ``bits_per_entry = 8 * nbytes / (n * a)``.
    Book: chapter "The practical quantizer", label ``ch-practical``.
    """

    def __init__(self, *, shape, rate, method, mode, flags, seed, alpha,
                 means, norms, payload, dither_key=0, version=FORMAT_VERSION):
        if version not in READ_VERSIONS:
            raise ValueError(f"version must be one of {READ_VERSIONS}, got "
                             f"{version!r}")
        self.version = int(version)
        self.shape = (int(shape[0]), int(shape[1]))
        self.rate = float(np.float32(rate))
        self.method = method
        self.mode = mode
        self.flags = int(flags)
        self.seed = int(seed)
        self.dither_key = int(dither_key)
        self.alpha = float(np.float32(alpha))
        self.means = means
        self.norms = norms
        self.payload = payload
        self._bytes = None
        self._decoded = None
        self._raw = None

    # -------------------------------------------------------------- basics
    @property
    def center(self) -> bool:
        return bool(self.flags & _FLAG_CENTER)

    @property
    def normalize(self) -> bool:
        return bool(self.flags & _FLAG_NORMALIZE)

    @property
    def rotate(self) -> bool:
        return bool(self.flags & _FLAG_ROTATE)

    @property
    def dither(self) -> bool:
        return bool(self.flags & _FLAG_DITHER)

    @property
    def estimator(self) -> str:
        return "mmse" if self.flags & _FLAG_MMSE else "unbiased"

    @property
    def n_pad(self) -> int:
        """Length of the coded vectors: ``n`` rounded up to a multiple of 8
        for the lattice methods."""
        n = self.shape[0]
        return _padded(n) if self.method == "nested" else n

    @property
    def entries(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes the decoder needs: the length of :meth:`to_bytes`."""
        return len(self.to_bytes())

    @property
    def bits_per_entry(self) -> float:
        """Achieved rate: ``8 * nbytes / (n * a)``, all side information
        included."""
        return 8.0 * self.nbytes / self.entries

    def __repr__(self) -> str:
        n, a = self.shape
        mode = f", mode={self.mode!r}" if self.method == "nested" else ""
        return (f"QuantizedMatrix(shape=({n}, {a}), method={self.method!r}{mode}, "
                f"rate={self.rate:g}, bits_per_entry={self.bits_per_entry:.4f}, "
                f"nbytes={self.nbytes})")

    # ------------------------------------------------------------ decoding
    def rotation(self) -> RandomHadamard | None:
        """The shared rotation (drawn as this matrix's format version
        draws it), or None."""
        return (RandomHadamard(self.n_pad, self.seed, version=self.version)
                if self.rotate else None)

    def _rows(self) -> np.ndarray:
        """Decoded vectors (a, n_pad) in the coded domain (rotated and
        normalised when those steps are on), shrinkage and projections
        applied. Cached."""
        if self._decoded is None:
            self._decoded = _decode_rows(self)
            self._decoded.setflags(write=False)
        return self._decoded

    def _row_scales(self) -> np.ndarray:
        """Per-vector factor from the coded domain back to the column."""
        if self.normalize:
            return self.norms.astype(np.float64) / np.sqrt(self.n_pad)
        return np.ones(self.shape[1])

    def dequantize(self, dtype=np.float64) -> np.ndarray:
        """The reconstructed matrix ``A_hat``, shape (n, a).

        Parameters
        ----------
        dtype : numpy dtype
            Output dtype (arithmetic is float64).
        """
        n, a = self.shape
        Y = self._rows()
        P = self.rotation()
        Z = P.inverse(Y) if P is not None else np.array(Y)
        Z = Z[:, :n] * self._row_scales()[:, None]
        if self.center:
            Z = Z + self.means.astype(np.float64)[:, None]
        return np.ascontiguousarray(Z.T).astype(dtype, copy=False)

    # -------------------------------------------------------- serialisation
    def to_bytes(self) -> bytes:
        """The serialised matrix: magic, format version, header, side
        information, payload, zero padding up to ``MIN_FILE_BITS`` bits per
        entry (version 3; only a degenerate matrix needs any) and a CRC-32
        of all of it (which detects accidental damage, not deliberate
        edits)."""
        if self._bytes is not None:
            return self._bytes
        w = _Writer()
        w.buf.write(MAGIC)
        w.pack("B", self.version)
        w.pack(_HEADER.format[1:], METHODS.index(self.method),
               MODES.index(self.mode), self.flags, 0, self.shape[0],
               self.shape[1], self.seed, self.rate)
        w.pack("f", self.alpha)
        if self.dither:
            w.pack("Q", self.dither_key)
        if self.center:
            w.array(self.means, np.float32)
        if self.normalize:
            w.array(self.norms, np.float32)
        _write_payload(w, self)
        body = w.getvalue()
        body += bytes(_padding(self.version, self.entries, len(body)))
        self._bytes = body + struct.pack("<I", zlib.crc32(body))
        return self._bytes

    def save(self, path) -> None:
        """Write :meth:`to_bytes` to ``path`` (a file name or a binary file)."""
        data = self.to_bytes()
        if hasattr(path, "write"):
            path.write(data)
        else:
            with open(path, "wb") as fh:
                fh.write(data)

    @classmethod
    def from_bytes(cls, data: bytes) -> QuantizedMatrix:
        """Parse :meth:`to_bytes` output.

        Nothing in the data is trusted: the header fields are checked
        against each other and against the length of the data (a file
        carries at least ``MIN_FILE_BITS`` bits per entry, so a short file
        cannot claim a huge shape), every stored float must be finite and
        in its range, the payload lengths must be exact, all before any
        array of the claimed size is allocated.

        Raises
        ------
        ValueError
            Not an nqlib file, a format version this nqlib does not read, a
            checksum mismatch (accidental damage: truncation, flipped bits)
            or a field that is out of range or inconsistent (the message
            says "corrupted" and names it).
        """
        data = bytes(data)
        if len(data) < len(MAGIC) + 1 or data[:3] != MAGIC:
            raise ValueError("not an nqlib quantized matrix (bad magic bytes)")
        version = data[3]
        if version not in READ_VERSIONS:
            raise ValueError(f"unsupported format version {version} (this nqlib "
                             f"reads versions {', '.join(map(str, READ_VERSIONS))};"
                             " quantize the matrix again)")
        if len(data) < 4 + _HEADER.size + 8:
            raise ValueError("quantized matrix data is truncated")
        body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
        if zlib.crc32(body) != crc:
            raise ValueError("checksum mismatch: the quantized matrix data is "
                             "corrupted or truncated")
        r = _Reader(body)
        r.pos = 4
        header = r.unpack(_HEADER.format[1:])
        (alpha,) = r.unpack("f")
        fields = _check_header(version, len(data), header, alpha)
        flags, a = fields["flags"], fields["shape"][1]
        (dither_key,) = r.unpack("Q") if flags & _FLAG_DITHER else (0,)
        means = r.array(np.float32, a) if flags & _FLAG_CENTER else None
        norms = r.array(np.float32, a) if flags & _FLAG_NORMALIZE else None
        _check_floats(means, "column means")
        _check_floats(norms, "column norms", minimum=0.0)
        qm = cls(**fields, means=means, norms=norms, payload={},
                 dither_key=dither_key, version=version)
        qm.payload = _read_payload(r, qm)
        pad = _padding(version, qm.entries, r.pos)
        if len(body) - r.pos > pad:
            raise ValueError("quantized matrix data has trailing bytes")
        if len(body) - r.pos < pad or any(body[r.pos:]):
            raise ValueError("corrupted padding: a version-3 file is zero-padded "
                             f"to {MIN_FILE_BITS} bits per entry")
        qm._bytes = data
        return qm


def load(path) -> QuantizedMatrix:
    """Read a matrix written by :meth:`QuantizedMatrix.save`.

    Raises
    ------
    ValueError
        If the file is not an nqlib file, has a format version this nqlib
        does not read, is truncated, fails its checksum (accidental damage)
        or holds a field that is out of range or inconsistent with the
        others (see :meth:`QuantizedMatrix.from_bytes`).
    """
    if hasattr(path, "read"):
        data = path.read()
    else:
        with open(path, "rb") as fh:
            data = fh.read()
    return QuantizedMatrix.from_bytes(data)


# ----------------------------------------------------------------- payloads
def _write_payload(w: _Writer, qm: QuantizedMatrix) -> None:
    p = qm.payload
    if qm.method == "nested" and qm.mode == "trellis":
        from nqlib.quantizers import trellis

        trellis.write_payload(w, p)
    elif qm.method == "nested" and qm.mode == "variable":
        w.pack("fffHHIII", p["beta"], p["sigma0"], p["sigma1"], p["K"], p["p1"],
               p["crc"], p["keep"], len(p["words"]))
        w.array(p["words"], np.uint32)
    elif qm.method == "nested":
        w.pack("I", p["h"])
        for part in ("hi", "lo"):
            c = p[part]
            w.pack("BHB", c["L"], c["q"], len(c["betas"]))
            w.array(c["betas"], np.float32)
        w.buf.write(p["hi"]["packed"].tobytes())
        w.buf.write(p["lo"]["packed"].tobytes())
    elif qm.method in ("rtn", "rtn-hadamard"):
        w.pack("BH", p["bits"], p["group"])
        w.array(p["scales"], np.float16)
        w.buf.write(p["packed"].tobytes())
    else:  # ecsq
        w.pack("ffIII", p["step"], p["sigma"], p["K"], p["crc"], len(p["words"]))
        w.array(p["words"], np.uint32)


# ------------------------------------------------------------- validation
#: range of a stored scale (beta, ecsq step, fixed-mode scales)
_SCALE_RANGE = (2.0**-64, 2.0**64)
#: smallest stored model sigma (the fits clip at 0.05, stored as float32)
_SIGMA_MIN = float(np.float32(0.05))
#: largest model range K of the entropy-coded payloads (tables of 2K + 1)
MAX_MODEL_RANGE = 65535
#: largest |alpha| a reader accepts (the encoder stores 1.0 beyond it)
MAX_ALPHA = 2.0**16
#: flags that apply to each method
_METHOD_FLAGS = {
    "nested": _KNOWN_FLAGS,
    "ecsq": _KNOWN_FLAGS & ~_FLAG_DITHER,
    "rtn": 0,
    "rtn-hadamard": _FLAG_ROTATE,
}


def _corrupted(what: str) -> ValueError:
    return ValueError(f"corrupted quantized matrix: {what}")


def _padding(version: int, entries: int, body_len: int) -> int:
    """Zero bytes a file of this ``version`` carries after its payload: up to
    ``entries // 80`` bytes in all (``MIN_FILE_BITS`` bits per entry), CRC
    included; none for version 2."""
    if version < 3:
        return 0
    return max(0, entries // _ENTRIES_PER_BYTE - (body_len + 4))


def _check_rotation_size(n_pad: int, a: int) -> str | None:
    """Why a rotation of length ``n_pad`` for ``a`` vectors is refused (its
    dense odd factor would dwarf the matrix), or None."""
    m = n_pad // (n_pad & -n_pad)
    if m <= MAX_ODD_FACTOR or m * m <= 8 * n_pad * a:
        return None
    return (f"the rotation of length {n_pad} = {n_pad // m} x {m} needs a dense "
            f"{m} x {m} factor, more than 8 times the {n_pad} x {a} matrix "
            f"(allowed: odd part <= {MAX_ODD_FACTOR}, or its square <= 8 n a)")


def _check_floats(arr, name, *, minimum=None, low=None, high=None):
    """Every value of ``arr`` (float array or scalar) finite and in range,
    else a "corrupted" ValueError naming ``name``."""
    if arr is None:
        return
    with np.errstate(invalid="ignore"):  # a signalling NaN read from the file
        v = np.asarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise _corrupted(f"{name} not finite")
    if minimum is not None and np.any(v < minimum):
        raise _corrupted(f"{name} below {minimum}")
    if low is not None and np.any(~((v >= low) & (v <= high))):
        raise _corrupted(f"{name} outside [{low:g}, {high:g}]")


def _check_header(version: int, nbytes: int, header, alpha) -> dict:
    """The fixed header, checked field by field and against the data length
    ``nbytes``; returns the :class:`QuantizedMatrix` keyword arguments."""
    mi, mo, flags, reserved, n, a, seed, rate = header
    if mi >= len(METHODS) or mo >= len(MODES):
        raise ValueError("corrupted header: unknown method or mode")
    method, mode = METHODS[mi], MODES[mo]
    if (method, mode) not in _payload_readers(version):
        raise _corrupted(f"method {method!r} has no mode {mode!r} in format "
                         f"version {version}")
    if reserved:
        raise _corrupted("reserved header byte is not zero")
    if flags & ~_KNOWN_FLAGS:
        raise _corrupted(f"unknown flag bits {flags & ~_KNOWN_FLAGS:#04x}")
    if flags & ~_METHOD_FLAGS[method]:
        raise _corrupted(f"flags {flags:#04x} do not apply to method {method!r}")
    if method == "rtn-hadamard" and not flags & _FLAG_ROTATE:
        raise _corrupted("method 'rtn-hadamard' without its rotation flag")
    if n < 1 or a < 1:
        raise _corrupted(f"empty shape ({n}, {a})")
    if n * a // _ENTRIES_PER_BYTE > nbytes:
        raise _corrupted(f"shape ({n}, {a}) claims more entries than {nbytes} "
                         f"bytes can carry at {MIN_FILE_BITS} bits per entry")
    if method in ("rtn", "rtn-hadamard"):
        if rate not in range(2, 9):
            raise _corrupted(f"rate {rate} is not a bit width 2..8")
    elif not (math.isfinite(rate)
              and np.float32(MIN_RATE) <= rate <= np.float32(MAX_RATE)):
        raise _corrupted(f"rate {rate} outside [{MIN_RATE}, {MAX_RATE}]")
    if flags & _FLAG_MMSE:
        _check_floats(alpha, "shrinkage factor alpha", low=-MAX_ALPHA,
                      high=MAX_ALPHA)
    elif alpha != 1.0:
        raise _corrupted(f"shrinkage factor alpha = {alpha} without the MMSE "
                         "estimator (must be 1)")
    if flags & _FLAG_ROTATE:
        why = _check_rotation_size(_padded(n) if method == "nested" else n, a)
        if why:
            raise _corrupted(why)
    return dict(shape=(n, a), rate=rate, method=method, mode=mode, flags=flags,
                seed=seed, alpha=alpha)


def _read_variable(r: _Reader, qm: QuantizedMatrix) -> dict:
    beta, s0, s1, K, p1, crc, keep, nw = r.unpack("fffHHIII")
    if not 1 <= keep <= qm.n_pad // 8:
        raise ValueError("corrupted variable-mode header (kept blocks)")
    _check_floats(beta, "variable-mode scale beta", low=_SCALE_RANGE[0],
                  high=_SCALE_RANGE[1])
    if K < 1:
        raise _corrupted("variable-mode model range K = 0")
    _check_floats(np.array([s0, s1]), "variable-mode model sigma",
                  low=_SIGMA_MIN, high=K + 1.0)
    if not 1 <= p1 <= 65535:
        raise _corrupted(f"variable-mode coset probability {p1} outside 1..65535")
    return dict(beta=beta, sigma0=s0, sigma1=s1, K=K, p1=p1, crc=crc,
                keep=keep, words=r.array(np.uint32, nw))


def _read_fixed(r: _Reader, qm: QuantizedMatrix) -> dict:
    from nqlib.quantizers.fixed import MAX_SCALES

    a = qm.shape[1]
    B = qm.n_pad // 8
    (h,) = r.unpack("I")
    if h > B:
        raise ValueError("corrupted fixed-mode header (block split)")
    parts = {}
    for part, count in (("hi", a * h), ("lo", a * (B - h))):
        L, q, k = r.unpack("BHB")
        if L == 0:
            ok = q == 0 and k == 0 and (part == "lo" or count == 0)
        else:
            # k <= 8 scales (fixed.MAX_SCALES): the scale index is 3 bits
            # wide in the GPU layout; k q^8 words fit in L bits
            ok = (8 <= L <= 64 and 1 <= k <= MAX_SCALES and q >= 2
                  and k * q**8 <= 2**L and count > 0)
        if not ok:
            raise ValueError(f"corrupted fixed-mode header (part {part!r}: "
                             f"L={L}, q={q}, k={k} for {count} blocks)")
        betas = r.array(np.float32, k)
        _check_floats(betas, "fixed-mode scales", low=_SCALE_RANGE[0],
                      high=_SCALE_RANGE[1])
        parts[part] = dict(L=L, q=q, betas=betas)
    if parts["hi"]["L"] == 0 and parts["lo"]["L"] == 0:
        raise ValueError("corrupted fixed-mode header (no coded block)")
    for part, count in (("hi", a * h), ("lo", a * (B - h))):
        L = parts[part]["L"]
        parts[part]["packed"] = r.array(np.uint8, -(-count * L // 8))
    return dict(h=h, **parts)


def _read_rtn(r: _Reader, qm: QuantizedMatrix) -> dict:
    n, a = qm.shape
    bits, group = r.unpack("BH")
    if not (2 <= bits <= 8 and group >= 1 and bits == qm.rate):
        raise ValueError("corrupted rtn header")
    ng = -(-n // group)
    scales = r.array(np.float16, a * ng).reshape(a, ng)
    _check_floats(scales, "rtn group scales", minimum=0.0)
    packed = r.array(np.uint8, -(-a * ng * group * bits // 8))
    return dict(bits=bits, group=group, scales=scales, packed=packed)


def _read_ecsq(r: _Reader, qm: QuantizedMatrix) -> dict:
    step, sigma, K, crc, nw = r.unpack("ffIII")
    _check_floats(step, "ecsq step", low=_SCALE_RANGE[0], high=_SCALE_RANGE[1])
    if not 1 <= K <= MAX_MODEL_RANGE:
        raise _corrupted(f"ecsq model range K = {K} outside 1..{MAX_MODEL_RANGE}")
    _check_floats(sigma, "ecsq model sigma", low=_SIGMA_MIN, high=K + 1.0)
    return dict(step=step, sigma=sigma, K=K, crc=crc, words=r.array(np.uint32, nw))


def _read_trellis(r: _Reader, qm: QuantizedMatrix) -> dict:
    from nqlib.quantizers import trellis

    if qm.version < 3 or qm.dither:
        raise _corrupted("mode 'trellis' needs format version 3 and no dither")
    return trellis.read_payload(r, qm.shape[1], qm.n_pad)


#: the payload reader of each (method, mode): the layouts of format version
#: 3. A new mode adds its reader here and its writer to _write_payload.
PAYLOAD_READERS = {
    ("nested", "variable"): _read_variable,
    ("nested", "fixed"): _read_fixed,
    ("nested", "trellis"): _read_trellis,
    ("rtn", "fixed"): _read_rtn,
    ("rtn-hadamard", "fixed"): _read_rtn,
    ("ecsq", "variable"): _read_ecsq,
}
#: combinations only version-2 files hold (ecsq stored the mode it was given)
_LEGACY_PAYLOAD_READERS = {("ecsq", "fixed"): _read_ecsq}


def _payload_readers(version: int) -> dict:
    if version < 3:
        return {**PAYLOAD_READERS, **_LEGACY_PAYLOAD_READERS}
    return PAYLOAD_READERS


def _read_payload(r: _Reader, qm: QuantizedMatrix) -> dict:
    """The payload of ``qm``'s method and mode, every field checked; the
    array lengths follow from the header (exact)."""
    return _payload_readers(qm.version)[qm.method, qm.mode](r, qm)


# ---------------------------------------------------------------- decoding
def _decode_codes(qm: QuantizedMatrix) -> np.ndarray:
    """Raw decoded vectors (a, n_pad) in the coded domain (no shrinkage)."""
    n, a = qm.shape
    n_pad = qm.n_pad
    p = qm.payload
    if qm.mode == "trellis":
        from nqlib.quantizers import trellis

        return trellis.decode(p, a, n_pad)
    if qm.method == "nested":
        nblocks = a * n_pad // 8
        z = (_dither(qm.seed, n_pad, a, nblocks, qm.dither_key, qm.version)
             if qm.dither else np.zeros((1, 8)))
        B = n_pad // 8
        zb = z.reshape(a, B, 8) if qm.dither else None
        out = np.zeros((a, B, 8))
        if qm.mode == "variable":
            keep = p["keep"]
            params = (p["sigma0"], p["sigma1"], p["K"], p["p1"])
            try:
                T2 = entropy.e8_decode(p["words"], a * keep, params, qm.version)
            except Exception as exc:  # constriction raises on a bad stream
                raise ValueError(f"entropy-coded payload cannot be decoded: {exc}"
                                 ) from None
            if entropy.symbols_crc(T2) != p["crc"]:
                raise ValueError("entropy-coded payload does not decode to the "
                                 "encoded symbols (model mismatch or corruption)")
            pts = 0.5 * T2.reshape(a, keep, 8)
            if qm.dither:
                pts = pts - zb[:, :keep]
            out[:, :keep] = float(np.float32(p["beta"])) * pts
            return out.reshape(a, n_pad)
        h = p["h"]
        for part, sl in (("hi", slice(0, h)), ("lo", slice(h, B))):
            c = p[part]
            count = a * (sl.stop - sl.start)
            if c["L"] == 0 or count == 0:
                continue
            zz = (np.ascontiguousarray(zb[:, sl].reshape(-1, 8)) if qm.dither
                  else np.zeros((1, 8)))
            out[:, sl] = _decode_fixed_part(c, count, zz).reshape(a, -1, 8)
        return out.reshape(a, n_pad)
    if qm.method in ("rtn", "rtn-hadamard"):
        from nqlib.kernels.cpu import nested as kern
        from nqlib.quantizers.scalar import rtn_decode

        ng = p["scales"].shape[1]
        count = a * ng * p["group"]
        words = np.empty(count, dtype=np.uint64)
        kern.unpack_words(p["packed"], p["bits"], count, words)
        codes = words.astype(np.int64).reshape(a, ng * p["group"])
        return rtn_decode(codes, p["scales"], p["bits"], n)
    params = (p["sigma"], p["K"])
    try:
        U = entropy.scalar_decode(p["words"], a * n_pad, params, qm.version)
    except Exception as exc:
        raise ValueError(f"entropy-coded payload cannot be decoded: {exc}") from None
    if entropy.symbols_crc(U) != p["crc"]:
        raise ValueError("entropy-coded payload does not decode to the encoded "
                         "symbols (model mismatch or corruption)")
    return float(np.float32(p["step"])) * U.reshape(a, n_pad).astype(np.float64)


def _fixed_part_codes(part, count, start=0):
    """Codes (count, 8) and scale indices of the blocks ``start .. start +
    count - 1`` of one fixed-mode payload part (``start * L`` a multiple of
    8 bits); ``ValueError`` when a word is out of range (corruption)."""
    from nqlib.kernels.cpu import nested as kern

    L = part["L"]
    first_byte = start * L // 8
    data = part["packed"][first_byte:first_byte + -(-count * L // 8)]
    words = np.empty(count, dtype=np.uint64)
    kern.unpack_words(np.ascontiguousarray(data), L, count, words)
    codes = np.empty((count, 8), dtype=np.int64)
    index = np.empty(count, dtype=np.int64)
    kern.split_mixed_radix(words, part["q"], codes, index)
    if count and (codes.max() >= part["q"] or index.max() >= len(part["betas"])):
        raise ValueError("corrupted fixed-mode payload (code out of range)")
    return codes, index


def _decode_fixed_part(c, count, z):
    from nqlib.kernels.cpu import nested as kern

    codes, index = _fixed_part_codes(c, count)
    out = np.empty((count, 8))
    kern.decode_multiscale_rows(codes, index, c["q"], c["betas"].astype(np.float64),
                                z, out)
    return out


def _project(Y: np.ndarray, qm: QuantizedMatrix) -> np.ndarray:
    """Remove from decoded rows the directions that carry no signal: padding
    coordinates and, for centred columns, the (rotated) all-ones direction."""
    n = qm.shape[0]
    P = qm.rotation()
    if qm.n_pad > n:
        Z = P.inverse(Y) if P is not None else np.array(Y)
        Z[:, n:] = 0.0
        Y = P.apply(Z) if P is not None else Z
    if qm.center:
        u = _unit_mean_direction(P, n, qm.n_pad)
        if qm.version >= draws.FIRST_OWN_DRAWS:
            # a fixed order of summation: the same bits on every machine
            from nqlib.kernels.cpu.linalg import rows_dot

            Yc = np.ascontiguousarray(Y)
            dots = np.empty(Yc.shape[0])
            rows_dot(Yc, u, dots)
        else:
            dots = Y @ u
        Y = Y - np.outer(dots, u)
    return Y


def _decode_rows(qm: QuantizedMatrix) -> np.ndarray:
    Y = _decode_codes(qm)
    if qm.method in ("nested", "ecsq"):
        Y = _project(Y, qm)
        Y = Y * qm.alpha
    return Y


# ----------------------------------------------------------------- encoding
def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


_BOTH = (True, False)
_RTN_RULES = dict(mode=("fixed",), estimator=("unbiased",), dither=(False,),
                  center=(False,), normalize=(False,), sketch=(False,),
                  group_size=int)
#: The options of :func:`quantize` each method implements: the values it
#: honours (the first one is its default, what ``None`` means), ``int`` for
#: any integer (default 128), or None where the option has no meaning for
#: the method. Anything else raises: no option is silently dropped.
OPTION_VALUES = {
    "nested": dict(mode=MODES, estimator=ESTIMATORS, dither=(False, True),
                   center=_BOTH, normalize=_BOTH, rotate=_BOTH, sketch=_BOTH,
                   group_size=None),
    "ecsq": dict(mode=("variable",), estimator=ESTIMATORS, dither=(False,),
                 center=_BOTH, normalize=_BOTH, rotate=_BOTH, sketch=(False,),
                 group_size=None),
    "rtn": dict(_RTN_RULES, rotate=(False,)),
    "rtn-hadamard": dict(_RTN_RULES, rotate=(True,)),
}
#: why an option value does not apply: (method or "*", option) -> reason
_NOT_APPLICABLE = {
    ("ecsq", "mode"): "its symbols are entropy coded (variable length)",
    ("rtn", "mode"): "its codes have a fixed length",
    ("*", "dither"): "only method='nested' is dithered",
    ("*", "sketch"): "only method='nested' sketches",
    ("rtn", "estimator"): "the rtn baselines decode without shrinkage",
    ("rtn", "center"): "the rtn baselines scale each group of group_size "
                       "entries instead of centring and normalising columns",
    ("rtn", "rotate"): "method='rtn' never rotates (method='rtn-hadamard' does)",
    ("rtn-hadamard", "rotate"): "method='rtn-hadamard' always rotates "
                                "(method='rtn' does not)",
    ("*", "group_size"): "group_size is the group length of the rtn baselines",
}


#: option values a mode does not implement: mode -> {option: (values it
#: implements, why)}
_MODE_OPTIONS = {
    "trellis": {"dither": ((False,), "the trellis code has no subtractive "
                           "dither (it implements dither=False)")},
}


def _resolve_options(method: str, **given) -> dict:
    """The options of :func:`quantize` for ``method``: each value checked
    (type, then whether ``method`` implements it) and ``None`` replaced by
    the method's default. ``ValueError`` names an option that does not
    apply."""
    out = {}
    for name, value in given.items():
        allowed = OPTION_VALUES[method][name]
        if name in ("mode", "estimator") and value is not None:
            _check_choice(value, name, MODES if name == "mode" else ESTIMATORS)
        elif name == "group_size" and value is not None:
            value = _checks.check_int(value, "group_size", minimum=1)
        elif value is not None and not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        if value is None:
            out[name] = (None if allowed is None else 128 if allowed is int
                         else allowed[0])
            continue
        if allowed is int or (allowed is not None and value in allowed):
            out[name] = bool(value) if isinstance(value, np.bool_) else value
            continue
        family = "rtn" if method.startswith("rtn") and name != "rotate" else method
        why = (_NOT_APPLICABLE.get((family, name))
               or _NOT_APPLICABLE.get((family, "center" if name == "normalize"
                                       else name))
               or _NOT_APPLICABLE.get(("*", name)))
        honoured = ("" if allowed is None else " (it implements "
                    + " or ".join(f"{name}={v!r}" for v in allowed) + ")")
        raise ValueError(f"{name}={value!r} does not apply to method="
                         f"{method!r}: {why}{honoured}")
    for name, (allowed, why) in _MODE_OPTIONS.get(out.get("mode"), {}).items():
        if name in out and out[name] not in allowed:
            raise ValueError(f"{name}={out[name]!r} does not apply to mode="
                             f"{out['mode']!r}: {why}")
    return out


def _as_matrix(A, *, keep_float32=False) -> np.ndarray:
    """``A`` as a finite 2-D float64 array (a tensor of any dtype and
    device, or any array layout). With ``keep_float32``, float32 and half
    data (float16, bfloat16) become float32 instead: the same values, half
    the memory."""
    A = np.asarray(_checks.to_numpy(A))
    half = A.dtype in (np.float16, np.float32)
    arr = _checks.as_float_array(
        A, "A", dtype=np.float32 if keep_float32 and half else np.float64)
    if arr.ndim != 2:
        raise ValueError(f"A must be a 2-D matrix (n, a), got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"A must be non-empty, got shape {arr.shape}")
    return arr


def _check_rate(rate, method) -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise ValueError(f"rate must be a real number, got {rate!r}")
    rate = float(rate)
    if not math.isfinite(rate):
        raise ValueError(f"rate must be finite, got {rate}")
    if method in ("rtn", "rtn-hadamard"):
        if rate != int(rate) or not 2 <= rate <= 8:
            raise ValueError(f"for method={method!r}, rate is the integer bit "
                             f"width, 2..8; got {rate}")
        return rate
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"rate must be in [{MIN_RATE}, {MAX_RATE}] bits per entry "
                         f"for method={method!r}, got {rate}")
    return rate


def quantize(A, rate, *, seed=0, mode=None, method="nested", estimator=None,
             dither=False, center=None, normalize=None, rotate=None, sketch=None,
             group_size=None, backend="auto") -> QuantizedMatrix:
    """Quantize the columns of ``A`` at ``rate`` bits per entry.

    Parameters
    ----------
    A : array_like or torch.Tensor, shape (n, a)
        Real, finite matrix. Its columns are the vectors (the product of
        interest is ``A.T @ B``). Any real dtype (numpy float16, torch
        bfloat16 / float16 included: their values are exact in float64, in
        which the quantizer works) and any memory layout; a tensor on any
        device. The same values give the same bytes whatever their dtype,
        layout or container.
    rate : float
        Target total rate in bits per entry, all side information included.
        For ``method="nested"`` and ``"ecsq"``: any real in [0.1, 8]; the
        achieved :attr:`QuantizedMatrix.bits_per_entry` does not exceed it
        (``mode="variable"``) or exceeds it by at most 0.02
        (``mode="fixed"``, whose words have a whole number of bits per
        8-block). For ``"rtn"`` / ``"rtn-hadamard"``: the integer bit width
        b (2..8); they cost ``b + 16 / group_size`` plus the header.
    seed : int
        Shared randomness (rotation, dither). Two matrices multiplied with
        :func:`nqlib.matmul` in the rotated domain must share it.
    mode : {"variable", "fixed", "trellis"}, optional
        Entropy-coded E8 points (best distortion per bit; the default) or
        fixed-length words per 8-block (random access, GPU friendly), or
        ``"trellis"``: a tail-biting bitshift trellis code over sequences
        of up to 1024 rotated entries, Viterbi-encoded, decoded per entry
        from its state by a hash and a small table -- fixed rate and the
        lowest distortion of the fixed-rate modes, at a slow (offline)
        encode (:mod:`nqlib.quantizers.trellis`, chapter ``ch-trellis``;
        no dither; at least 1 bit per coded entry, sketching below). Only
        the nested method has these; ``"ecsq"`` is ``"variable"`` and the
        rtn baselines are ``"fixed"`` (None: the method's own).
    method : {"nested", "rtn", "rtn-hadamard", "ecsq"}
        The nested-lattice quantizer, or a baseline through the same API.
    estimator : {"mmse", "unbiased"}, optional
        Decoder: with the MMSE shrinkage (lower error, biased; the default)
        or without. The rtn baselines have no shrinkage: ``"unbiased"``
        only.
        "Unbiased" is exact over the dither (``dither=True``) in variable
        mode when nothing is sketched away; in fixed mode the scale of each
        block is chosen after seeing the block (to avoid overload), which
        leaves a small input-dependent bias, and without dither the error is
        a deterministic function of the input.
    dither : bool
        Subtractive dither, uniform on the E8 Voronoi cell (nested only).
        Over a random ``seed`` it makes the error uniform and independent of
        the input; costs a little rate at low rates. It is drawn from
        ``seed`` and a 64-bit key hashed from ``A`` (stored, 8 bytes), so two
        different matrices get independent dither streams even with the
        same seed and shape -- what the universal guarantee of chapter
        ``ch-universal`` needs (its expectations are over the seed).
    center, normalize, rotate : bool, optional
        Switch off a step of the pipeline (for ablations); all on by default
        for ``"nested"`` and ``"ecsq"``. The rtn baselines neither centre nor
        normalise (``False`` only); ``"rtn"`` never rotates and
        ``"rtn-hadamard"`` always does.
    sketch : bool, optional
        Below the tangency point of nqlib's own distortion-rate curve
        (about 1.1 bit per coded entry in variable mode), describe only a
        fraction of the rotated coordinates and estimate the rest by 0 -- the
        time sharing that reaches the lower convex envelope. On by default
        for the nested method, the only one that sketches (``False`` spreads
        the bits over every coordinate, for comparison).
    group_size : int, optional
        Group length of the rtn baselines (default 128); no other method
        has groups.
    backend : {"auto", "numba", "numpy"}
        ``"numpy"`` runs the E8 coding through the reference oracles (slow;
        gives byte-identical output). The baselines have a single
        implementation, which every backend runs (the same bytes).

    Returns
    -------
    QuantizedMatrix

    Raises
    ------
    ValueError
        Non-2-D or non-finite ``A``, a rate out of range or too low for the
        side information of this shape, an unknown option, or an option
        value that ``method`` does not implement (the message names it:
        e.g. ``dither=True`` with ``method="ecsq"``,
        :data:`OPTION_VALUES` lists what each method honours). ``None``
        means the method's default; no option is silently ignored.

    Examples
    --------
    >>> import numpy as np, nqlib
    >>> A = np.random.default_rng(0).standard_normal((256, 16))
    >>> QA = nqlib.quantize(A, 4.0)
    >>> QA.bits_per_entry <= 4.0
    True

    Notes
    -----
    Same input, options and seed give byte-identical output, whatever the
    input's dtype or layout, the number of threads numba or BLAS use, and
    whether other threads call ``quantize`` at the same time (it shares no
    mutable state; numba's ``workqueue`` threading layer, which is not
    thread-safe, is serialised by a lock). Memory: besides ``A``, the
    nested method holds the coded matrix (float64, ``a x n'``, twice a
    float32 input) and, in variable mode, its E8 points (int32); everything
    else is worked on a few megabytes at a time (see
    ``benchmarks/quantize_memory.py``). Book: chapter "The practical
    quantizer", label ``ch-practical``.
    """
    return _quantize(A, rate, seed=seed, mode=mode, method=method,
                     estimator=estimator, dither=dither, center=center,
                     normalize=normalize, rotate=rotate, sketch=sketch,
                     group_size=group_size, backend=backend)


def _quantize(A, rate, *, seed=0, mode=None, method="nested", estimator=None,
              dither=False, center=None, normalize=None, rotate=None,
              sketch=None, group_size=None, backend="auto",
              keep_decoded=False) -> QuantizedMatrix:
    """:func:`quantize`; ``keep_decoded`` keeps the decoded rows that the
    MMSE estimator computes anyway as the :meth:`QuantizedMatrix._rows`
    cache (for activations quantized on the fly and multiplied at once)."""
    _check_choice(method, "method", METHODS)
    opts = _resolve_options(method, mode=mode, estimator=estimator,
                            dither=dither, center=center, normalize=normalize,
                            rotate=rotate, sketch=sketch, group_size=group_size)
    mode, estimator, dither, center, normalize, rotate, sketch, group_size = (
        opts[k] for k in ("mode", "estimator", "dither", "center", "normalize",
                          "rotate", "sketch", "group_size"))
    rate = _check_rate(rate, method)
    seed = _checks.check_int(seed, "seed", minimum=0)
    if seed >= 2**64:
        raise ValueError(f"seed must be < 2**64, got {seed}")
    backend = _backend.resolve(backend, tensor_input=False)
    # float32 (and half) data stay float32: the pipeline converts a chunk of
    # columns at a time to float64 (the same values), never the whole matrix
    A = _as_matrix(A, keep_float32=True)
    n, a = A.shape
    # Means and norms are stored as float32: refuse data whose column
    # statistics do not fit, instead of decoding to inf/NaN.
    with np.errstate(over="ignore", invalid="ignore"):
        biggest = max(float(A.max()), -float(A.min())) * math.sqrt(n)
    if not biggest < float(np.finfo(np.float32).max):
        raise ValueError("A has entries too large for the float32 side "
                         f"information: max |A| * sqrt(n) = {biggest:.3g} exceeds "
                         f"{float(np.finfo(np.float32).max):.3g}; rescale A first")

    if method in ("rtn", "rtn-hadamard"):
        return _quantize_rtn(A.astype(np.float64, copy=False), int(rate), seed,
                             method, group_size, rate)

    flags = (_FLAG_CENTER * bool(center) | _FLAG_NORMALIZE * bool(normalize)
             | _FLAG_ROTATE * bool(rotate) | _FLAG_MMSE * (estimator == "mmse")
             | _FLAG_DITHER * bool(dither and method == "nested"))
    n_pad = _padded(n) if method == "nested" else n
    if rotate and (why := _check_rotation_size(n_pad, a)):
        raise ValueError(f"A cannot be rotated: {why}; use rotate=False")
    Xp, means, norms = _coded_rows(A, n_pad, center, normalize,
                                   RandomHadamard(n_pad, seed) if rotate else None)
    qm = QuantizedMatrix(shape=(n, a), rate=rate, method=method, mode=mode,
                         flags=flags, seed=seed, alpha=1.0, means=means,
                         norms=norms, payload={},
                         dither_key=_dither_key(A) if flags & _FLAG_DITHER else 0)
    if method == "nested" and mode == "variable":
        _encode_variable(qm, Xp, backend, sketch)
    elif method == "nested" and mode == "trellis":
        _encode_trellis(qm, Xp, sketch)
    elif method == "nested":
        _encode_fixed(qm, Xp, backend, sketch)
    else:
        _encode_ecsq(qm, Xp)
    # MMSE shrinkage: alpha = <y, y_hat> / <y_hat, y_hat> after the
    # projections, computed by the encoder (which sees y) and stored.
    if estimator == "mmse":
        num, den, Yhat = _mmse_sums(qm, Xp, keep=keep_decoded)
        with np.errstate(over="ignore", invalid="ignore"):
            alpha = float(np.float32(num / den)) if den > 0 else 1.0
        # a reader refuses |alpha| > MAX_ALPHA (no sane decode needs it)
        qm.alpha = alpha if abs(alpha) <= MAX_ALPHA else 1.0
    qm._bytes = None
    qm._decoded = None
    if keep_decoded and estimator == "mmse":
        # exactly _decode_rows(qm): the same projection times the same alpha
        qm._decoded = Yhat * qm.alpha
        qm._decoded.setflags(write=False)
    finish = getattr(qm, "_finish", None)
    if finish is not None:  # code what the MMSE pass did not (all, without it)
        finish()
    qm._raw_rows = qm._finish = None
    return qm


def _fixed_overhead_bits(qm: QuantizedMatrix, payload_fixed_bytes: int) -> int:
    n, a = qm.shape
    side = 4 * a * (bool(qm.center) + bool(qm.normalize)) + 8 * bool(qm.dither)
    return 8 * (len(MAGIC) + 1 + _HEADER.size + 4 + side + payload_fixed_bytes + 4)


def _code_budget_bits(qm, payload_fixed_bytes, slack=0.0) -> int:
    budget = math.floor((qm.rate + slack) * qm.entries)
    code = budget - _fixed_overhead_bits(qm, payload_fixed_bytes)
    if code <= 0:
        per = _fixed_overhead_bits(qm, payload_fixed_bytes) / qm.entries
        raise ValueError(f"rate {qm.rate} cannot be met: the side information "
                         f"alone needs {per:.3f} bits per entry for shape "
                         f"{qm.shape}")
    return code


def _e8_points(blocks, beta, z, backend, out=None):
    """Doubled E8 points ``2 Q(x / beta + z)`` of the rows of ``blocks``
    (int32), written into ``out`` when given."""
    if out is None:
        out = np.empty(blocks.shape, dtype=np.int32)
    if backend == "numpy":
        from nqlib.reference.lattices import closest_point_e8

        step = _rows_per_chunk(8, 1)  # the oracle's temporaries stay small
        for r0 in range(0, blocks.shape[0], step):
            zz = z if z.shape[0] == 1 else z[r0:r0 + step]
            out[r0:r0 + step] = 2.0 * closest_point_e8(
                blocks[r0:r0 + step] * (1.0 / beta) + zz)
        return out
    from nqlib.kernels.cpu.nested import e8_points_rows

    e8_points_rows(blocks, 1.0 / beta, z, out)
    return out


def _encode_variable(qm, Y, backend, sketch):
    """Entropy-coded E8 points; ``beta`` set so the code fits the budget.

    With ``sketch`` and a budget below the tangency rate ``r*`` of the
    measured curve, only the first ``keep`` blocks of every rotated vector
    are coded (at about ``r*`` bits per entry); the rest decode to 0.
    """
    from nqlib.quantizers.ratecurve import variable_tangent

    a, n_pad = Y.shape
    B = n_pad // 8
    budget = _code_budget_bits(qm, struct.calcsize("<fffHHIII")) - 32
    keep = B
    r_star = variable_tangent()
    if sketch and budget / (a * n_pad) < r_star:
        keep = max(1, min(B, math.floor(B * budget / (a * n_pad) / r_star)))
    blocks = np.ascontiguousarray(Y.reshape(a, B, 8)[:, :keep].reshape(-1, 8))
    nb = blocks.shape[0]
    if qm.dither:
        zfull = _dither(qm.seed, n_pad, a, a * B, qm.dither_key).reshape(a, B, 8)
        z = np.ascontiguousarray(zfull[:, :keep].reshape(-1, 8))
    else:
        z = np.zeros((1, 8))
    target = budget / blocks.size  # bits per coded entry
    # Rate control. The ideal code length falls by about one bit per entry
    # when log2(beta) grows by one (high-rate theory), so secant steps
    # converge in a few passes: first on a seeded subsample of blocks, then
    # on all of them. Only the final pass is entropy coded.
    rng = np.random.default_rng([qm.seed, 0x7263])  # 'rc': rate control
    if nb > 16384:
        idx = np.sort(rng.choice(nb, 16384, replace=False))
        sample = blocks[idx]
        zs = z if z.shape[0] == 1 else z[idx]
    else:
        sample, zs = blocks, z

    # one buffer of points per data set: every step overwrites the previous
    # step's points, which are not used again
    buffers = {}

    def rate_at(lb, data, zz):
        if id(data) not in buffers:
            buffers[id(data)] = np.empty(data.shape, dtype=np.int32)
        out = buffers[id(data)]
        T2 = _e8_points(data, float(np.float32(2.0**lb)), zz, backend, out)
        st = entropy.e8_stats(T2)
        return entropy.e8_ideal_bits(T2, stats=st) / data.size, T2, st

    def secant(lb, data, zz, goal, tol, steps):
        r, T2, st = rate_at(lb, data, zz)
        slope = -1.0
        for _ in range(steps):
            if abs(r - goal) < tol:
                break
            lb_new = lb + (goal - r) / slope
            r_new, T2, st = rate_at(lb_new, data, zz)
            if lb_new != lb and r_new != r:
                slope = min((r_new - r) / (lb_new - lb), -0.05)
            lb, r = lb_new, r_new
        return lb, r, T2, st

    # start: h(N(0, 1)) - log2(beta) ~ rate for a unit-volume lattice
    lb0 = 0.5 * math.log2(2 * math.pi * math.e) - max(target, 0.5)
    lb, _, _, _ = secant(lb0, sample, zs, target, 2e-3, 10)
    # on all blocks, aim just under the budget (room for the coder's flush)
    goal = (budget - 96) / blocks.size
    for _ in range(12):
        lb, r, T2, st = secant(lb, blocks, z, goal, 2e-4, 4)
        params = entropy.e8_fit(T2, st)
        if r * blocks.size <= budget - 64:
            words = entropy.e8_encode(T2, params)
            if 32 * len(words) <= budget:
                break
        goal -= 64 / blocks.size
        lb += 1e-4
    else:
        raise ValueError(f"rate {qm.rate} cannot be met (rate control did not "
                         "converge)")
    if params[2] > 65535:
        raise ValueError("the lattice points are too large for the model "
                         "(rate too high for this data)")
    beta = float(np.float32(2.0**lb))
    qm.payload = dict(beta=beta, sigma0=params[0], sigma1=params[1], K=params[2],
                      p1=params[3], crc=entropy.symbols_crc(T2), keep=keep,
                      words=words)
    points = T2.reshape(a, keep, 8)
    zk = z.reshape(a, keep, 8) if z.shape[0] > 1 else z

    def raw_rows(r0, r1):
        # the decoder's beta (t - z), dropped blocks 0 (a block of vectors)
        raw = np.zeros((r1 - r0, B, 8))
        zz = zk[r0:r1] if zk.ndim == 3 else zk
        raw[:, :keep] = beta * (0.5 * points[r0:r1] - zz)
        return raw.reshape(r1 - r0, n_pad)

    qm._raw_rows = raw_rows


def _encode_fixed_part(blocks, z, L, backend, packed=None, dec=None):
    """Encode rows of ``blocks`` with the designed ``L``-bit code; returns the
    payload part (L, q, betas, packed words). The words are packed into
    ``packed`` when given (zeroed bytes, ``ceil(rows L / 8)`` of them: a
    slice of a larger part that starts on a byte). With a ``dec`` array
    (rows, 8), the decoded rows are written into it too (the decoder's
    bits)."""
    from nqlib.kernels.cpu import nested as kern
    from nqlib.quantizers.fixed import fixed_code

    code = fixed_code(L)
    betas = np.array(code.betas, dtype=np.float32)
    b64 = betas.astype(np.float64)
    nb = blocks.shape[0]
    if backend == "numpy":
        from nqlib.reference.nested import encode_multiscale

        codes, index, _ = encode_multiscale(blocks, code.q, b64, z)
        if dec is not None:
            kern.decode_multiscale_rows(codes, index, code.q, b64, z, dec)
    else:
        codes = np.empty((nb, 8), dtype=np.int64)
        index = np.empty(nb, dtype=np.int64)
        se = np.empty(nb)
        kern.encode_multiscale_rows(blocks, code.q, b64, z, codes, index, se,
                                    np.empty((0, 8)) if dec is None else dec)
    words = np.empty(nb, dtype=np.uint64)
    kern.mixed_radix_words(codes, index, code.q, words)
    if packed is None:
        packed = np.zeros(-(-nb * L // 8), dtype=np.uint8)
    kern.pack_words(words, L, packed)
    return dict(L=L, q=code.q, betas=betas, packed=packed)


#: payload bytes besides the packed words: the split h, then per part
#: L, q, k and at most MAX_SCALES float32 scales
_FIXED_PAYLOAD_BYTES = 4 + 2 * (4 + 4 * 8)


def _encode_fixed(qm, Y, backend, sketch):
    """Fixed-length words per 8-block. The budget is met by time sharing
    between two designed codes on the lower envelope of their distortion-rate
    points (``L_hi`` bits for the first ``h`` blocks of every rotated vector,
    ``L_lo`` bits -- or nothing, when sketching -- for the rest)."""
    from nqlib.quantizers.ratecurve import fixed_plan

    a, n_pad = Y.shape
    B = n_pad // 8
    budget = _code_budget_bits(qm, _FIXED_PAYLOAD_BYTES, slack=RATE_TOLERANCE)
    per_block = budget / (a * B)
    try:
        L_hi, L_lo, theta = fixed_plan(min(per_block, 64.0), sketch=sketch)
    except ValueError:
        raise ValueError(f"rate {qm.rate} cannot be met in fixed mode for shape "
                         f"{qm.shape} without sketching: a block needs at least "
                         "8 bits") from None

    def total_bits(h):
        return 8 * (-(-a * h * L_hi // 8) + -(-a * (B - h) * L_lo // 8))

    h = B if L_hi == L_lo else min(B, math.floor(theta * B))
    while h > 0 and total_bits(h) > budget:
        h -= 1
    if h == 0 and L_lo == 0:
        raise ValueError(f"rate {qm.rate} cannot be met in fixed mode for shape "
                         f"{qm.shape}: not even one {L_hi}-bit block per column "
                         "fits the budget")
    blocks = Y.reshape(a, B, 8)
    zb = (_dither(qm.seed, n_pad, a, a * B, qm.dither_key).reshape(a, B, 8)
          if qm.dither else None)
    from nqlib.quantizers.fixed import fixed_code

    parts = {}
    for part, width, L in (("hi", h, L_hi), ("lo", B - h, L_lo)):
        if L == 0 or width == 0:
            parts[part] = dict(L=0, q=0, betas=np.zeros(0, dtype=np.float32),
                               packed=np.zeros(0, dtype=np.uint8))
        else:
            parts[part] = dict(L=L, q=fixed_code(L).q,
                               betas=np.array(fixed_code(L).betas, np.float32),
                               packed=np.zeros(-(-a * width * L // 8), np.uint8))
    qm.payload = dict(h=h, **parts)
    # The blocks are coded a chunk of vectors at a time (8k of them: each
    # chunk's words start on a byte of its part). Every block is coded alone,
    # so the words are those of one pass over all the blocks. The chunks are
    # coded when the MMSE pass asks for their reconstruction (raw_rows, in
    # order), so that no full-size decoded matrix is ever held; finish()
    # codes whatever it did not ask for.
    step = _rows_per_chunk(n_pad)
    cursor = [0]

    def encode(r0, r1, dec):
        for part, sl in (("hi", slice(0, h)), ("lo", slice(h, B))):
            c = parts[part]
            width = sl.stop - sl.start
            if c["L"] == 0 or width == 0:
                continue
            rows = np.ascontiguousarray(blocks[r0:r1, sl].reshape(-1, 8))
            z = (np.zeros((1, 8)) if zb is None
                 else np.ascontiguousarray(zb[r0:r1, sl].reshape(-1, 8)))
            L = c["L"]
            packed = c["packed"][r0 * width * L // 8:-(-r1 * width * L // 8)]
            d = None if dec is None else np.empty((rows.shape[0], 8))
            _encode_fixed_part(rows, z, L, backend, packed, d)
            if dec is not None:
                dec[:, sl] = d.reshape(r1 - r0, width, 8)

    def raw_rows(r0, r1):
        if r0 != cursor[0]:  # pragma: no cover - guards the chunk protocol
            raise RuntimeError("fixed-mode chunks must be coded in order")
        out = np.zeros((r1 - r0, B, 8))  # dropped blocks stay 0
        encode(r0, r1, out)
        cursor[0] = r1
        return out.reshape(r1 - r0, n_pad)

    def finish():
        for r0 in range(cursor[0], a, step):
            encode(r0, min(a, r0 + step), None)
        cursor[0] = a

    qm._raw_rows = raw_rows
    qm._finish = finish


def _encode_trellis(qm, Y, sketch):
    """The tail-biting bitshift trellis code (:mod:`nqlib.quantizers.trellis`)
    on every byte of the budget left after the side information; the
    reconstruction is the encoder's own (what the decoder returns)."""
    from nqlib.quantizers import trellis

    if qm.dither:
        raise ValueError("dither=True does not apply to mode='trellis' (its "
                         "codebook is not a lattice)")
    budget = _code_budget_bits(qm, trellis.PAYLOAD_HEADER_BYTES)
    qm.payload, raw = trellis.encode_matrix(Y, budget, sketch=sketch)
    qm._raw_rows = lambda r0, r1: raw[r0:r1]


def _encode_ecsq(qm, Y):
    a, n = Y.shape
    budget = _code_budget_bits(qm, struct.calcsize("<ffIII")) - 32
    target = budget / Y.size
    flat = Y.ravel()
    rng = np.random.default_rng([qm.seed, 0x6563])
    sample = flat[rng.choice(flat.size, min(flat.size, 131072), replace=False)]

    def sym(data, lstep):
        return np.floor(data / float(np.float32(2.0**lstep)) + 0.5).astype(np.int64)

    lo, hi = -target - 4.0, -target + 6.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        r = entropy.scalar_ideal_bits(sym(sample, mid)) / sample.size
        lo, hi = (mid, hi) if r > target else (lo, mid)
        if hi - lo < 1e-4:
            break
    ls = hi
    for _ in range(12):
        U = sym(flat, ls)
        params = entropy.scalar_fit(U)
        ideal = entropy.scalar_ideal_bits(U, params)
        if ideal <= budget - 64:
            words = entropy.scalar_encode(U, params)
            if 32 * len(words) <= budget:
                break
            excess = 32 * len(words) - budget
        else:
            excess = ideal - (budget - 64)
        ls += (excess + 64) / flat.size + 1e-4
    else:
        raise ValueError(f"rate {qm.rate} cannot be met (rate control did not "
                         "converge)")
    if params[1] > MAX_MODEL_RANGE:
        raise ValueError("the scalar symbols are too large for the model "
                         "(rate too high for this data)")
    step = float(np.float32(2.0**ls))
    qm.payload = dict(step=step, sigma=params[0], K=params[1],
                      crc=entropy.symbols_crc(U), words=words)
    U = U.reshape(a, n)
    qm._raw_rows = lambda r0, r1: step * U[r0:r1].astype(np.float64)


def _quantize_rtn(A, bits, seed, method, group_size, rate):
    from nqlib.kernels.cpu import nested as kern
    from nqlib.quantizers.scalar import rtn_encode

    n, a = A.shape
    if group_size > 65535:
        raise ValueError(f"group_size must be <= 65535, got {group_size}")
    X = np.ascontiguousarray(A.T)
    rotate = method == "rtn-hadamard"
    if rotate and (why := _check_rotation_size(n, a)):
        raise ValueError(f"A cannot be rotated: {why}; use method='rtn'")
    if rotate:
        X = RandomHadamard(n, seed).apply(X)
    codes, scales = rtn_encode(X, bits, group_size)
    words = codes.ravel().astype(np.uint64)
    packed = np.zeros(-(-words.size * bits // 8), dtype=np.uint8)
    kern.pack_words(words, bits, packed)
    return QuantizedMatrix(shape=(n, a), rate=rate, method=method, mode="fixed",
                           flags=_FLAG_ROTATE * rotate, seed=seed, alpha=1.0,
                           means=None, norms=None,
                           payload=dict(bits=bits, group=group_size,
                                        scales=scales, packed=packed))
