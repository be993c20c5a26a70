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
from nqlib.quantizers import entropy
from nqlib.quantizers.hadamard import RandomHadamard

__all__ = ["QuantizedMatrix", "quantize", "load", "METHODS", "MODES"]

METHODS = ("nested", "rtn", "rtn-hadamard", "ecsq")
MODES = ("variable", "fixed")
ESTIMATORS = ("mmse", "unbiased")
MAGIC = b"NQM"
#: 2: dithered files carry the 64-bit dither key (version 1 had none)
FORMAT_VERSION = 2
#: allowed excess of the achieved rate over the target (bits per entry)
RATE_TOLERANCE = 0.02
MIN_RATE = 0.1
MAX_RATE = 8.0

_FLAG_CENTER, _FLAG_NORMALIZE, _FLAG_ROTATE, _FLAG_DITHER, _FLAG_MMSE = (
    1, 2, 4, 8, 16)
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


def _dither(seed: int, n_pad: int, a: int, nblocks: int, key: int) -> np.ndarray:
    """Subtractive dither uniform on the Voronoi cell of E8, one per block.

    ``w = G u`` with ``u`` uniform on [0, 1)^8 is uniform on a fundamental
    parallelepiped; ``w - Q(w)`` is then uniform on the Voronoi cell. The
    stream is seeded by the shared seed *and* the matrix's 64-bit dither
    key (:func:`_dither_key`, stored in the file), so the two operands of a
    product draw independent dithers even when they have the same shape.
    """
    from nqlib.lattices import E8

    rng = np.random.default_rng([seed, n_pad, a, 0x64, key])  # 'd': dither
    w = rng.random((nblocks, 8)) @ E8().generator.T
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
    h.update(np.ascontiguousarray(A, dtype=np.float64).tobytes())
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

    Notes
    -----
    ``nbytes`` is the exact size of :meth:`to_bytes`, which holds everything
    the decoder needs; ``bits_per_entry = 8 * nbytes / (n * a)``.
    Book: chapter "The practical quantizer", label ``ch-practical``.
    """

    def __init__(self, *, shape, rate, method, mode, flags, seed, alpha,
                 means, norms, payload, dither_key=0):
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
        return RandomHadamard(self.n_pad, self.seed) if self.rotate else None

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
        information, payload and a CRC32 of all of it."""
        if self._bytes is not None:
            return self._bytes
        w = _Writer()
        w.buf.write(MAGIC)
        w.pack("B", FORMAT_VERSION)
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
        """Parse :meth:`to_bytes` output; raise ``ValueError`` on a truncated,
        tampered or wrong-version buffer."""
        data = bytes(data)
        if len(data) < len(MAGIC) + 1 or data[:3] != MAGIC:
            raise ValueError("not an nqlib quantized matrix (bad magic bytes)")
        version = data[3]
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported format version {version} (this nqlib "
                             f"reads version {FORMAT_VERSION}; quantize the "
                             "matrix again)")
        if len(data) < 4 + _HEADER.size + 8:
            raise ValueError("quantized matrix data is truncated")
        body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
        if zlib.crc32(body) != crc:
            raise ValueError("checksum mismatch: the quantized matrix data is "
                             "corrupted, truncated or tampered with")
        r = _Reader(body)
        r.pos = 4
        mi, mo, flags, _, n, a, seed, rate = r.unpack(_HEADER.format[1:])
        if mi >= len(METHODS) or mo >= len(MODES):
            raise ValueError("corrupted header: unknown method or mode")
        (alpha,) = r.unpack("f")
        (dither_key,) = r.unpack("Q") if flags & _FLAG_DITHER else (0,)
        means = r.array(np.float32, a) if flags & _FLAG_CENTER else None
        norms = r.array(np.float32, a) if flags & _FLAG_NORMALIZE else None
        qm = cls(shape=(n, a), rate=rate, method=METHODS[mi], mode=MODES[mo],
                 flags=flags, seed=seed, alpha=alpha, means=means, norms=norms,
                 payload={}, dither_key=dither_key)
        qm.payload = _read_payload(r, qm)
        if r.pos != len(body):
            raise ValueError("quantized matrix data has trailing bytes")
        qm._bytes = data
        return qm


def load(path) -> QuantizedMatrix:
    """Read a matrix written by :meth:`QuantizedMatrix.save`.

    Raises
    ------
    ValueError
        If the file is not an nqlib file, has another format version, is
        truncated, or fails its checksum.
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
    if qm.method == "nested" and qm.mode == "variable":
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


def _read_payload(r: _Reader, qm: QuantizedMatrix) -> dict:
    n, a = qm.shape
    B = _padded(n) // 8
    if qm.method == "nested" and qm.mode == "variable":
        beta, s0, s1, K, p1, crc, keep, nw = r.unpack("fffHHIII")
        if not 1 <= keep <= B:
            raise ValueError("corrupted variable-mode header (kept blocks)")
        return dict(beta=beta, sigma0=s0, sigma1=s1, K=K, p1=p1, crc=crc,
                    keep=keep, words=r.array(np.uint32, nw))
    if qm.method == "nested":
        (h,) = r.unpack("I")
        if h > B:
            raise ValueError("corrupted fixed-mode header (block split)")
        parts = {}
        for part in ("hi", "lo"):
            L, q, k = r.unpack("BHB")
            # k <= 8 scales (fixed.MAX_SCALES): the scale index is 3 bits
            # wide in the GPU layout
            if L and not (8 <= L <= 64 and 1 <= k <= 8 and q >= 2):
                raise ValueError("corrupted fixed-mode header")
            parts[part] = dict(L=L, q=q, betas=r.array(np.float32, k))
        for part, count in (("hi", a * h), ("lo", a * (B - h))):
            L = parts[part]["L"]
            parts[part]["packed"] = r.array(np.uint8, -(-count * L // 8))
        return dict(h=h, **parts)
    if qm.method in ("rtn", "rtn-hadamard"):
        bits, group = r.unpack("BH")
        if not (2 <= bits <= 8 and group >= 1):
            raise ValueError("corrupted rtn header")
        ng = -(-n // group)
        scales = r.array(np.float16, a * ng).reshape(a, ng)
        packed = r.array(np.uint8, -(-a * ng * group * bits // 8))
        return dict(bits=bits, group=group, scales=scales, packed=packed)
    step, sigma, K, crc, nw = r.unpack("ffIII")
    return dict(step=step, sigma=sigma, K=K, crc=crc, words=r.array(np.uint32, nw))


# ---------------------------------------------------------------- decoding
def _decode_codes(qm: QuantizedMatrix) -> np.ndarray:
    """Raw decoded vectors (a, n_pad) in the coded domain (no shrinkage)."""
    n, a = qm.shape
    n_pad = qm.n_pad
    p = qm.payload
    if qm.method == "nested":
        nblocks = a * n_pad // 8
        z = (_dither(qm.seed, n_pad, a, nblocks, qm.dither_key) if qm.dither
             else np.zeros((1, 8)))
        B = n_pad // 8
        zb = z.reshape(a, B, 8) if qm.dither else None
        out = np.zeros((a, B, 8))
        if qm.mode == "variable":
            keep = p["keep"]
            params = (p["sigma0"], p["sigma1"], p["K"], p["p1"])
            try:
                T2 = entropy.e8_decode(p["words"], a * keep, params)
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
        U = entropy.scalar_decode(p["words"], a * n_pad, params)
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
        Y = Y - np.outer(Y @ u, u)
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


def _as_matrix(A) -> np.ndarray:
    if _backend.is_torch_tensor(A):
        A = A.detach().cpu().numpy()
    arr = _checks.as_float_array(A, "A", dtype=np.float64)
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


def quantize(A, rate, *, seed=0, mode="variable", method="nested",
             estimator="mmse", dither=False, center=True, normalize=True,
             rotate=True, sketch=True, group_size=128,
             backend="auto") -> QuantizedMatrix:
    """Quantize the columns of ``A`` at ``rate`` bits per entry.

    Parameters
    ----------
    A : array_like or torch.Tensor, shape (n, a)
        Real, finite matrix. Its columns are the vectors (the product of
        interest is ``A.T @ B``).
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
    mode : {"variable", "fixed"}
        Entropy-coded E8 points (best distortion per bit) or fixed-length
        words per 8-block (random access, GPU friendly).
    method : {"nested", "rtn", "rtn-hadamard", "ecsq"}
        The nested-lattice quantizer, or a baseline through the same API.
    estimator : {"mmse", "unbiased"}
        Decoder: with the MMSE shrinkage (lower error, biased) or without.
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
    center, normalize, rotate : bool
        Switch off a step of the pipeline (for ablations). ``rotate`` is
        forced False for ``"rtn"`` and True for ``"rtn-hadamard"``.
    sketch : bool
        Below the tangency point of nqlib's own distortion-rate curve
        (about 1.1 bit per coded entry in variable mode), describe only a
        fraction of the rotated coordinates and estimate the rest by 0 -- the
        time sharing that reaches the lower convex envelope (nested only).
        ``False`` spreads the bits over every coordinate (for comparison).
    group_size : int
        Group length of the rtn baselines.
    backend : {"auto", "numba", "numpy"}
        ``"numpy"`` runs the E8 coding through the reference oracles (slow;
        gives byte-identical output).

    Returns
    -------
    QuantizedMatrix

    Raises
    ------
    ValueError
        Non-2-D or non-finite ``A``, a rate out of range or too low for the
        side information of this shape, an unknown option.

    Examples
    --------
    >>> import numpy as np, nqlib
    >>> A = np.random.default_rng(0).standard_normal((256, 16))
    >>> QA = nqlib.quantize(A, 4.0)
    >>> QA.bits_per_entry <= 4.0
    True

    Notes
    -----
    Same input, options and seed give byte-identical output. Book: chapter
    "The practical quantizer", label ``ch-practical``.
    """
    return _quantize(A, rate, seed=seed, mode=mode, method=method,
                     estimator=estimator, dither=dither, center=center,
                     normalize=normalize, rotate=rotate, sketch=sketch,
                     group_size=group_size, backend=backend)


def _quantize(A, rate, *, seed=0, mode="variable", method="nested",
              estimator="mmse", dither=False, center=True, normalize=True,
              rotate=True, sketch=True, group_size=128, backend="auto",
              keep_decoded=False) -> QuantizedMatrix:
    """:func:`quantize`; ``keep_decoded`` keeps the decoded rows that the
    MMSE estimator computes anyway as the :meth:`QuantizedMatrix._rows`
    cache (for activations quantized on the fly and multiplied at once)."""
    _check_choice(method, "method", METHODS)
    _check_choice(mode, "mode", MODES)
    _check_choice(estimator, "estimator", ESTIMATORS)
    rate = _check_rate(rate, method)
    seed = _checks.check_int(seed, "seed", minimum=0)
    if seed >= 2**64:
        raise ValueError(f"seed must be < 2**64, got {seed}")
    group_size = _checks.check_int(group_size, "group_size", minimum=1)
    for flag_name, flag in (("dither", dither), ("center", center),
                            ("normalize", normalize), ("rotate", rotate),
                            ("sketch", sketch)):
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(f"{flag_name} must be True or False, got {flag!r}")
    backend = _backend.resolve(backend, tensor_input=False)
    A = _as_matrix(A)
    n, a = A.shape
    # Means and norms are stored as float32: refuse data whose column
    # statistics do not fit, instead of decoding to inf/NaN.
    with np.errstate(over="ignore", invalid="ignore"):
        biggest = float(np.abs(A).max()) * math.sqrt(n) if A.size else 0.0
    if not biggest < float(np.finfo(np.float32).max):
        raise ValueError("A has entries too large for the float32 side "
                         f"information: max |A| * sqrt(n) = {biggest:.3g} exceeds "
                         f"{float(np.finfo(np.float32).max):.3g}; rescale A first")

    if method in ("rtn", "rtn-hadamard"):
        return _quantize_rtn(A, int(rate), seed, method, group_size, rate)

    flags = (_FLAG_CENTER * bool(center) | _FLAG_NORMALIZE * bool(normalize)
             | _FLAG_ROTATE * bool(rotate) | _FLAG_MMSE * (estimator == "mmse")
             | _FLAG_DITHER * bool(dither and method == "nested"))
    n_pad = _padded(n) if method == "nested" else n
    X = np.ascontiguousarray(A.T)  # (a, n): the vectors as rows
    means = norms = None
    if center:
        means = X.mean(axis=1).astype(np.float32)
        X = X - means.astype(np.float64)[:, None]
    if normalize:
        norms = np.sqrt((X * X).sum(axis=1)).astype(np.float32)
    Xp = _scaled_padded_rotated(X, n_pad, norms,
                                RandomHadamard(n_pad, seed) if rotate else None)
    qm = QuantizedMatrix(shape=(n, a), rate=rate, method=method, mode=mode,
                         flags=flags, seed=seed, alpha=1.0, means=means,
                         norms=norms, payload={},
                         dither_key=_dither_key(A) if flags & _FLAG_DITHER else 0)
    if method == "nested" and mode == "variable":
        _encode_variable(qm, Xp, backend, sketch)
    elif method == "nested":
        _encode_fixed(qm, Xp, backend, sketch)
    else:
        _encode_ecsq(qm, Xp)
    # MMSE shrinkage: alpha = <y, y_hat> / <y_hat, y_hat> after the
    # projections, computed by the encoder (which sees y) and stored.
    if estimator == "mmse":
        raw = getattr(qm, "_raw", None)
        Yhat = _project(raw if raw is not None else _decode_codes(qm), qm)
        den = float((Yhat * Yhat).sum())
        qm.alpha = float(np.float32((Yhat * Xp).sum() / den)) if den > 0 else 1.0
    qm._bytes = None
    qm._decoded = None
    if keep_decoded and estimator == "mmse":
        # exactly _decode_rows(qm): the same projection times the same alpha
        qm._decoded = Yhat * qm.alpha
        qm._decoded.setflags(write=False)
    qm._raw = None
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


def _e8_points(blocks, beta, z, backend):
    """Doubled E8 points ``2 Q(x / beta + z)`` of the rows of ``blocks``."""
    if backend == "numpy":
        from nqlib.reference.lattices import closest_point_e8

        return (2.0 * closest_point_e8(blocks * (1.0 / beta) + z)).astype(np.int32)
    from nqlib.kernels.cpu.nested import e8_points_rows

    out = np.empty(blocks.shape, dtype=np.int32)
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

    def rate_at(lb, data, zz):
        T2 = _e8_points(data, float(np.float32(2.0**lb)), zz, backend)
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
    raw = np.zeros((a, B, 8))
    raw[:, :keep] = (beta * (0.5 * T2 - z)).reshape(a, keep, 8)
    qm._raw = raw.reshape(a, n_pad)


def _encode_fixed_part(blocks, z, L, backend, dec=None):
    """Encode rows of ``blocks`` with the designed ``L``-bit code; returns the
    payload part (L, q, betas, packed words). With the numba backend and a
    ``dec`` array (rows, 8), also writes the decoded rows into it (the same
    bits as decoding the payload)."""
    from nqlib.kernels.cpu import nested as kern
    from nqlib.quantizers.fixed import fixed_code

    code = fixed_code(L)
    betas = np.array(code.betas, dtype=np.float32)
    b64 = betas.astype(np.float64)
    nb = blocks.shape[0]
    if backend == "numpy":
        from nqlib.reference.nested import encode_multiscale

        codes, index, _ = encode_multiscale(blocks, code.q, b64, z)
    else:
        codes = np.empty((nb, 8), dtype=np.int64)
        index = np.empty(nb, dtype=np.int64)
        se = np.empty(nb)
        out = dec if dec is not None else np.empty((0, 8))
        kern.encode_multiscale_rows(blocks, code.q, b64, z, codes, index, se, out)
    words = np.empty(nb, dtype=np.uint64)
    kern.mixed_radix_words(codes, index, code.q, words)
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
    if qm.dither:
        zb = _dither(qm.seed, n_pad, a, a * B, qm.dither_key).reshape(a, B, 8)
    empty = dict(L=0, q=0, betas=np.zeros(0, dtype=np.float32),
                 packed=np.zeros(0, dtype=np.uint8))
    parts = {}
    raw = None if backend == "numpy" else np.zeros((a, B, 8))
    for part, sl, L in (("hi", slice(0, h), L_hi), ("lo", slice(h, B), L_lo)):
        rows = np.ascontiguousarray(blocks[:, sl].reshape(-1, 8))
        if L == 0 or rows.shape[0] == 0:
            parts[part] = empty
            continue
        z = (np.ascontiguousarray(zb[:, sl].reshape(-1, 8)) if qm.dither
             else np.zeros((1, 8)))
        dec = None if raw is None else np.empty((rows.shape[0], 8))
        parts[part] = _encode_fixed_part(rows, z, L, backend, dec)
        if raw is not None:
            raw[:, sl] = dec.reshape(a, -1, 8)
    qm.payload = dict(h=h, **parts)
    if raw is not None:
        # the encoder's reconstruction (bit-identical to decoding the words;
        # dropped blocks stay 0), so the MMSE step need not decode again
        qm._raw = raw.reshape(a, n_pad)


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
    step = float(np.float32(2.0**ls))
    qm.payload = dict(step=step, sigma=params[0], K=params[1],
                      crc=entropy.symbols_crc(U), words=words)
    qm._raw = step * U.reshape(a, n).astype(np.float64)


def _quantize_rtn(A, bits, seed, method, group_size, rate):
    from nqlib.kernels.cpu import nested as kern
    from nqlib.quantizers.scalar import rtn_encode

    n, a = A.shape
    if group_size > 65535:
        raise ValueError(f"group_size must be <= 65535, got {group_size}")
    X = np.ascontiguousarray(A.T)
    rotate = method == "rtn-hadamard"
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
