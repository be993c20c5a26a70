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

This module is the container and the orchestrator. The pieces live in
their own modules:

* :mod:`~nqlib.quantizers.coded_domain` -- centering, normalisation,
  padding, rotation, dither, projections, the MMSE pass;
* :mod:`~nqlib.quantizers.rate_control` -- the options and the code budget;
* :mod:`~nqlib.quantizers.variable_mode`, :mod:`~nqlib.quantizers.fixed_mode`,
  :mod:`~nqlib.quantizers.trellis_mode`, :mod:`~nqlib.quantizers.baselines`
  -- one encoder and decoder per mode or method;
* :mod:`~nqlib.quantizers.payloads` and :mod:`~nqlib.quantizers.format` --
  the typed payloads and the binary format (a reader that trusts nothing).

The decoder's pseudo-random draws (rotation, dither, entropy tables) are
nqlib's own (:mod:`nqlib.quantizers.draws`), so a file decodes to the same
bits whatever numpy or LAPACK reads it; files of version 2 are read with the
numpy draws they were written with.

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np

from nqlib import _backend, _checks
from nqlib._scratch import scratch
from nqlib.quantizers import baselines, fixed_mode, trellis_mode, variable_mode
from nqlib.quantizers import format as fmt
from nqlib.quantizers.coded_domain import (
    as_matrix,
    coded_rows,
    dither_key,
    mmse_sums,
    project,
    rotation_arrays,
    unit_mean_direction,
)
from nqlib.quantizers.format import (
    FLAG_CENTER,
    FLAG_DITHER,
    FLAG_MMSE,
    FLAG_NORMALIZE,
    FLAG_ROTATE,
    FORMAT_VERSION,
    MAX_ALPHA,
    METHODS,
    MIN_FILE_BITS,
    MODES,
    READ_VERSIONS,
)
from nqlib.quantizers.hadamard import RandomHadamard
from nqlib.quantizers.payloads import FixedPart, FixedPayload
from nqlib.quantizers.rate_control import (
    OPTION_VALUES,
    check_choice,
    check_rate,
    check_state_bits,
    resolve_options,
)

__all__ = ["QuantizedMatrix", "quantize", "quantize_columns", "load",
           "FixedRowsQuantizer", "FixedRowsRun", "CodedDomain",
           "decode_codes", "METHODS", "MODES", "OPTION_VALUES", "FORMAT_VERSION",
           "READ_VERSIONS", "MIN_FILE_BITS"]


# ------------------------------------------------------------ the container
class QuantizedMatrix:
    """A matrix compressed by :func:`quantize`: its **columns** are the
    quantized vectors (the product of interest is ``A.T @ B``).

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
    alpha : float
        The MMSE shrinkage factor (1 for the unbiased estimator).
    means, norms : ndarray (a,) float32 or None
        The columns' means and norms (side information), when centred and
        normalised.
    payload : Payload
        The codes (a dataclass of :mod:`nqlib.quantizers.payloads`).

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

    # -------------------------------------------------------------- basics
    @property
    def center(self) -> bool:
        """Whether the columns were centred (their means are stored)."""
        return bool(self.flags & FLAG_CENTER)

    @property
    def normalize(self) -> bool:
        """Whether the columns were normalised (their norms are stored)."""
        return bool(self.flags & FLAG_NORMALIZE)

    @property
    def rotate(self) -> bool:
        """Whether the coded domain is rotated (:meth:`rotation`)."""
        return bool(self.flags & FLAG_ROTATE)

    @property
    def dither(self) -> bool:
        """Whether the lattice codes were subtractively dithered."""
        return bool(self.flags & FLAG_DITHER)

    @property
    def estimator(self) -> str:
        """``"mmse"`` (decoded with the shrinkage ``alpha``) or ``"unbiased"``."""
        return "mmse" if self.flags & FLAG_MMSE else "unbiased"

    @property
    def n_pad(self) -> int:
        """Length of the coded vectors: ``n`` rounded up to a multiple of 8
        for the lattice methods."""
        return fmt.padded_length(self.shape[0], self.method)

    @property
    def entries(self) -> int:
        """``n * a``."""
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

    @property
    def stream_nbytes(self) -> int:
        """Bytes this matrix costs as one call of a stream of matrices of
        its length and options (the inputs a layer quantizes on every
        call; :func:`quantize_columns` with ``stream=True``): the file
        without the stream's configuration, which is sent once (see
        :data:`~nqlib.quantizers.format.STREAM_CALL_BYTES`)."""
        return fmt.stream_nbytes(self)

    @property
    def stream_bits_per_entry(self) -> float:
        """Achieved rate as one call of a stream: ``8 * stream_nbytes / (n
        * a)``."""
        return 8.0 * self.stream_nbytes / self.entries

    def __repr__(self) -> str:
        n, a = self.shape
        mode = f", mode={self.mode!r}" if self.method == "nested" else ""
        if self.payload is None:  # being encoded
            return (f"QuantizedMatrix(shape=({n}, {a}), method={self.method!r}"
                    f"{mode}, rate={self.rate:g}, no payload yet)")
        return (f"QuantizedMatrix(shape=({n}, {a}), method={self.method!r}{mode}, "
                f"rate={self.rate:g}, bits_per_entry={self.bits_per_entry:.4f}, "
                f"nbytes={self.nbytes})")

    def resident_arrays(self) -> dict:
        """Every array this object holds, by name: side information, the
        payload's arrays, and the caches (decoded rows, serialised bytes)
        when present -- what keeping it in memory costs."""
        out = {}
        for name in ("means", "norms"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out.update({f"payload.{k}": v for k, v in self.payload.arrays().items()})
        if self._decoded is not None:
            out["decoded"] = self._decoded
        if self._bytes is not None:
            out["bytes"] = np.frombuffer(self._bytes, dtype=np.uint8)
        return out

    # ------------------------------------------------------------ decoding
    def rotation(self) -> RandomHadamard | None:
        """The shared rotation (drawn as this matrix's format version
        draws it), or None."""
        return (RandomHadamard(self.n_pad, self.seed, version=self.version)
                if self.rotate else None)

    def coded_rows(self) -> np.ndarray:
        """Decoded vectors (a, n_pad) in the coded domain (rotated and
        normalised when those steps are on), shrinkage and projections
        applied; read-only, cached. ``A_hat.T`` is ``P^-1`` of these, cut
        to ``n``, times :meth:`row_scales`, plus the means."""
        if self._decoded is None:
            self._decoded = decode_rows(self)
            self._decoded.setflags(write=False)
        return self._decoded

    def row_scales(self) -> np.ndarray:
        """Per-vector factor (a,) from the coded domain back to the column:
        ``norm / sqrt(n_pad)`` when normalised, else 1."""
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
        Y = self.coded_rows()
        P = self.rotation()
        Z = P.inverse(Y) if P is not None else np.array(Y)
        Z = Z[:, :n] * self.row_scales()[:, None]
        if self.center:
            Z = Z + self.means.astype(np.float64)[:, None]
        return np.ascontiguousarray(Z.T).astype(dtype, copy=False)

    # -------------------------------------------------------- serialisation
    def to_bytes(self) -> bytes:
        """The serialised matrix (:mod:`nqlib.quantizers.format`): magic,
        format version, header, side information, payload, zero padding up
        to ``MIN_FILE_BITS`` bits per entry (version 3; only a degenerate
        matrix needs any) and a CRC-32 of all of it (which detects
        accidental damage, not deliberate edits)."""
        if self._bytes is None:
            self._bytes = fmt.serialize(self)
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
        qm = cls(**fmt.parse(data))
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


# ---------------------------------------------------------------- decoding
def decode_codes(qm: QuantizedMatrix) -> np.ndarray:
    """Raw decoded vectors (a, n_pad) of ``qm`` in the coded domain: the
    mode's decoder alone (no projection, no shrinkage)."""
    if qm.method == "nested":
        return {"variable": variable_mode.decode, "fixed": fixed_mode.decode,
                "trellis": trellis_mode.decode}[qm.mode](qm)
    if qm.method in ("rtn", "rtn-hadamard"):
        return baselines.decode_rtn(qm)
    return baselines.decode_ecsq(qm)


def decode_rows(qm: QuantizedMatrix) -> np.ndarray:
    """:meth:`QuantizedMatrix.coded_rows`, uncached: the raw decode,
    projected and shrunk (the lattice and ecsq methods)."""
    Y = decode_codes(qm)
    if qm.method in ("nested", "ecsq"):
        Y = project(Y, qm)
        Y = Y * qm.alpha
    return Y


# ------------------------------------------------------------ orchestration
def quantize(A, rate, *, seed=0, mode=None, method="nested", estimator=None,
             dither=False, center=None, normalize=None, rotate=None, sketch=None,
             group_size=None, state_bits=None, backend="auto") -> QuantizedMatrix:
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
        :func:`nqlib.inner_products` in the rotated domain must share it.
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
    state_bits : int, optional
        ``mode="trellis"`` only: the trellis has ``2**state_bits`` states
        (``MIN_L`` to ``MAX_L`` of :mod:`nqlib.quantizers.trellis`; None:
        its ``DEFAULT_L``, 16). The Viterbi search costs time proportional
        to ``2**state_bits`` per entry and each state bit buys up to about
        0.03 bit of gap: 12 encodes 16 times faster than 16 for 0.03 to 0.09
        bit more gap at 2 to 4 bits per entry (chapter ``ch-trellis``).
        The decoder reads it from the file.
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
    return quantize_columns(A, rate, seed=seed, mode=mode, method=method,
                            estimator=estimator, dither=dither, center=center,
                            normalize=normalize, rotate=rotate, sketch=sketch,
                            group_size=group_size, state_bits=state_bits,
                            backend=backend)


def quantize_columns(A, rate, *, seed=0, mode=None, method="nested",
                     estimator=None, dither=False, center=None, normalize=None,
                     rotate=None, sketch=None, group_size=None, state_bits=None,
                     backend="auto", keep_decoded=False,
                     code_words=True, stream=False) -> QuantizedMatrix:
    """:func:`quantize`, with three more options.

    Parameters
    ----------
    A, rate, seed, mode, method, estimator, dither, center, normalize, \
rotate, sketch, group_size, state_bits, backend
        As in :func:`quantize`.
    keep_decoded : bool
        Keep the decoded rows that the MMSE estimator computes anyway as the
        :meth:`QuantizedMatrix.coded_rows` cache (for activations quantized
        on the fly and multiplied at once). The bytes are those of
        :func:`quantize`.
    code_words : bool
        False (nested method, fixed mode only): stop before coding any word
        and return the header, the side information (means, norms) and the
        payload plan (which word length codes which blocks) with every word
        zero and ``alpha = 1`` -- everything :func:`quantize` would store
        except the words and the shrinkage, for
        :func:`nqlib.quantizers.ldlq.quantize_ldlq`, which chooses the
        words itself.
    stream : bool
        ``A`` is one call of a stream of matrices with its length and
        options -- the inputs a layer quantizes on every call, a batch of
        tokens at a time -- and ``rate`` is the stream's: it counts what
        each call sends (the codes, the means and norms, the count of
        columns, ``alpha``, the payload's data-dependent fields), not the
        stream's configuration, which is sent once (format marks, method,
        options, length, seed, rate, the fixed mode's code parameters; see
        :data:`~nqlib.quantizers.format.STREAM_CALL_BYTES`).
        :attr:`QuantizedMatrix.stream_bits_per_entry` is then at most the
        rate (plus ``RATE_TOLERANCE`` in the fixed mode), and a single
        column gets as fine a code as a large batch's: without it, a
        one-column file pays its whole header out of the column's bits (at
        576 entries and 4 bits its codes then get 2.35 bits per entry). The
        file itself is complete and reads like any other.
        The rtn baselines' code does not depend on it (their rate is a bit
        width); :attr:`QuantizedMatrix.stream_nbytes` counts them all the
        same.

    Returns
    -------
    QuantizedMatrix
    """
    check_choice(method, "method", METHODS)
    opts = resolve_options(method, mode=mode, estimator=estimator,
                           dither=dither, center=center, normalize=normalize,
                           rotate=rotate, sketch=sketch, group_size=group_size)
    mode, estimator, dither, center, normalize, rotate, sketch, group_size = (
        opts[k] for k in ("mode", "estimator", "dither", "center", "normalize",
                          "rotate", "sketch", "group_size"))
    if not code_words and (method, mode) != ("nested", "fixed"):
        raise ValueError("code_words=False applies to method='nested', "
                         f"mode='fixed' only, got method={method!r}, "
                         f"mode={mode!r}")
    state_bits = check_state_bits(state_bits, method, mode)
    rate = check_rate(rate, method)
    seed = _checks.check_int(seed, "seed", minimum=0)
    if seed >= 2**64:
        raise ValueError(f"seed must be < 2**64, got {seed}")
    backend = _backend.resolve(backend, tensor_input=False)
    # float32 (and half) data stay float32: the pipeline converts a chunk of
    # columns at a time to float64 (the same values), never the whole matrix
    A = as_matrix(A, keep_float32=True)
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
        rotate = method == "rtn-hadamard"
        payload = baselines.encode_rtn(A.astype(np.float64, copy=False),
                                       int(rate), seed, rotate, group_size)
        return QuantizedMatrix(shape=(n, a), rate=rate, method=method,
                               mode="fixed", flags=FLAG_ROTATE * rotate,
                               seed=seed, alpha=1.0, means=None, norms=None,
                               payload=payload)

    flags = (FLAG_CENTER * bool(center) | FLAG_NORMALIZE * bool(normalize)
             | FLAG_ROTATE * bool(rotate) | FLAG_MMSE * (estimator == "mmse")
             | FLAG_DITHER * bool(dither and method == "nested"))
    n_pad = fmt.padded_length(n, method)
    if rotate and (why := fmt.rotation_size_problem(n_pad, a)):
        raise ValueError(f"A cannot be rotated: {why}; use rotate=False")
    if (method == "nested" and mode == "fixed" and keep_decoded
            and estimator == "mmse" and not flags & FLAG_DITHER
            and n_pad == n and backend != "numpy" and code_words):
        # activations quantized on every call (fixed mode, decode kept,
        # nothing padded): one compiled call, the pass of the rows
        # quantizer that the layers keep (the same bytes as below; None
        # cannot happen after the checks above, and would take that path)
        qm = FixedRowsQuantizer(rate, seed, center=center, normalize=normalize,
                                rotate=rotate, sketch=sketch,
                                stream=stream)._code(A.T)
        if qm is not None:
            return qm
    Xp, means, norms = coded_rows(
        A, n_pad, center, normalize,
        RandomHadamard(n_pad, seed) if rotate else None)
    qm = QuantizedMatrix(shape=(n, a), rate=rate, method=method, mode=mode,
                         flags=flags, seed=seed, alpha=1.0, means=means,
                         norms=norms, payload=None,
                         dither_key=dither_key(A) if flags & FLAG_DITHER else 0)
    if method == "nested" and mode == "variable":
        enc = variable_mode.encode(qm, Xp, backend, sketch, stream)
    elif method == "nested" and mode == "trellis":
        enc = trellis_mode.encode(qm, Xp, sketch, state_bits, stream)
    elif method == "nested":
        enc = fixed_mode.encode(qm, Xp, backend, sketch, stream)
    else:
        enc = baselines.encode_ecsq(qm, Xp, stream)
    qm.payload = enc.payload
    if not code_words:  # the plan only (fixed mode codes lazily: nothing coded)
        return qm
    # MMSE shrinkage: alpha = <y, y_hat> / <y_hat, y_hat> after the
    # projections, computed by the encoder (which sees y) and stored.
    if estimator == "mmse":
        num, den, Yhat = mmse_sums(qm, Xp, enc.raw_rows, keep=keep_decoded)
        qm.alpha = _shrinkage(num, den)
    if keep_decoded and estimator == "mmse":
        # exactly decode_rows(qm): the same projection times the same alpha
        # (in place: Yhat is the MMSE pass's own array)
        Yhat *= qm.alpha
        qm._decoded = Yhat
        qm._decoded.setflags(write=False)
    if enc.finish is not None:  # code what the MMSE pass did not (all, without it)
        enc.finish()
    return qm


def _shrinkage(num, den) -> float:
    """The stored MMSE factor ``alpha = num / den`` (float32), 1 when ``den``
    is not positive or when ``|alpha|`` exceeds ``MAX_ALPHA`` (a reader
    refuses that: no sane decode needs it). The same rule as
    :func:`~nqlib.kernels.cpu.coded.code_fixed_rows`."""
    with np.errstate(over="ignore", invalid="ignore"):
        alpha = float(np.float32(num / den)) if den > 0 else 1.0
    return alpha if abs(alpha) <= MAX_ALPHA else 1.0


# ------------------------------------------- rows quantized on every call
#: the largest float32 (the bound of ``max |x| * sqrt(n)``, as
#: :func:`quantize_columns` checks it)
_F32_MAX = float(np.finfo(np.float32).max)
#: no float32 rows wanted from :func:`~nqlib.kernels.cpu.coded.code_fixed_rows`
_NO_ROWS32 = np.zeros((0, 0), dtype=np.float32)


class CodedDomain(NamedTuple):
    """The attributes of a :class:`QuantizedMatrix` that say in which coded
    domain its vectors live (those :func:`nqlib.matmul.same_domain`
    compares)."""

    rotate: bool
    n_pad: int
    center: bool
    version: int


class FixedRowsRun(NamedTuple):
    """What one compiled pass of :class:`FixedRowsQuantizer` wrote (its
    :meth:`~FixedRowsQuantizer.run`): the arrays of the quantized matrix,
    before the :class:`QuantizedMatrix` is built around them."""

    #: ``(n, a)``: the matrix's shape (the rows ``X`` are its columns)
    shape: tuple
    #: the stored MMSE factor
    alpha: float
    #: (a,) float32 (empty when not centred)
    means: np.ndarray
    #: (a,) float32 (empty when not normalised)
    norms: np.ndarray
    #: (a, n) float64: the decoded rows in the coded domain
    decoded: np.ndarray
    #: the words of the two parts
    packed_hi: np.ndarray
    packed_lo: np.ndarray


class FixedRowsQuantizer:
    """``quantize_columns(X.T, rate, seed=seed, mode="fixed",
    keep_decoded=True, center=center, normalize=normalize, rotate=rotate,
    sketch=sketch, stream=stream)`` for rows ``X`` (a, n), without dither
    and with the MMSE estimator: the same :class:`QuantizedMatrix`, bit for
    bit, with what depends only on ``n`` and ``a`` (the rotation, the mean
    direction, the payload plan, the codes) worked out once. Its compiled
    passes are the ones :func:`quantize_columns` itself runs in that case.

    For activations quantized on every call of a layer
    (:class:`nqlib.nn.ActivationCache`), where a small batch would spend
    most of its time in the general function's checks and set-up rather
    than in the compiled passes, which are the same (the coded rows, the
    multiscale encoder, the projection and MMSE sums). Inputs it does not
    take -- a length that is not a multiple of 8 (zero padding), other
    dtypes than float32 and float64, non-finite or oversized entries --
    go to :func:`quantize_columns`, which also raises its errors.

    Parameters
    ----------
    rate : float
        Bits per entry (checked as :func:`quantize_columns` checks it).
    seed : int
        The shared seed.
    center, normalize, rotate, sketch : bool or None
        As in :func:`quantize` (None: the fixed mode's defaults).
    stream : bool
        As in :func:`quantize_columns`: ``rate`` is a stream's, for the
        inputs of a layer (what :class:`nqlib.nn.ActivationCache` uses).
    """

    #: row counts whose plan is kept (the batch sizes of a model's calls)
    MAX_PLANS = 64

    def __init__(self, rate, seed=0, *, center=None, normalize=None,
                 rotate=None, sketch=None, stream=False):
        self.rate = check_rate(rate, "nested")
        self.seed = _checks.check_int(seed, "seed", minimum=0)
        if self.seed >= 2**64:
            raise ValueError(f"seed must be < 2**64, got {self.seed}")
        opts = resolve_options("nested", mode="fixed", estimator=None,
                               dither=None, center=center, normalize=normalize,
                               rotate=rotate, sketch=sketch)
        self._fast = opts["estimator"] == "mmse" and not opts["dither"]
        self.sketch = bool(opts["sketch"])
        self.center = bool(opts["center"])
        self.normalize = bool(opts["normalize"])
        self.rotate = bool(opts["rotate"])
        self.stream = bool(stream)
        self.flags = (FLAG_CENTER * self.center | FLAG_NORMALIZE * self.normalize
                      | FLAG_ROTATE * self.rotate | FLAG_MMSE)
        self._by_n = {}      # n -> (rotation, mean direction)
        self._plans = {}     # (n, a) -> (h, L_hi, L_lo)
        self._domains = {}   # n -> what same_domain compares
        self._kernel = None  # the compiled pass, imported on first use
        self._lock = threading.Lock()   # a layer may be called from threads

    def __call__(self, X) -> QuantizedMatrix:
        """The quantized rows ``X`` (a, n), as ``quantize_columns(X.T,
        ...)`` returns them (decoded rows kept)."""
        X = np.asarray(X)
        qm = self.code(X)
        if qm is None:
            return quantize_columns(X.T, self.rate, seed=self.seed,
                                    mode="fixed", keep_decoded=True,
                                    center=self.center,
                                    normalize=self.normalize,
                                    rotate=self.rotate, sketch=self.sketch,
                                    stream=self.stream)
        return qm

    def code(self, X, rows32=None) -> QuantizedMatrix | None:
        """The lean path alone: what calling the quantizer returns, or None
        (nothing written) when the lean path does not take ``X`` -- then
        the quantizer itself hands ``X`` to :func:`quantize_columns`.

        Parameters
        ----------
        X : array_like (a, n)
            The rows.
        rows32 : ndarray (a, n) float32, optional
            C-contiguous and writeable: receives, in the same compiled pass,
            the decoded rows times their row scales (``coded_rows() *
            row_scales()[:, None]`` rounded to float32, the activation rows
            of the fused CPU product), when the result is not None.
        """
        run = self.run(X, rows32)
        return None if run is None else self.matrix(run)

    def run(self, X, rows32=None) -> FixedRowsRun | None:
        """:meth:`code` without building the :class:`QuantizedMatrix`: the
        arrays of the compiled pass (:meth:`matrix` makes the matrix from
        them, when it is wanted), or None as :meth:`code` returns None.
        ``rows32`` is checked as :meth:`code` checks it."""
        X = np.asarray(X)
        if rows32 is not None and not (
                isinstance(rows32, np.ndarray) and rows32.dtype == np.float32
                and rows32.shape == X.shape and rows32.flags.c_contiguous
                and rows32.flags.writeable):
            raise ValueError("rows32 must be a writeable C-contiguous float32 "
                             f"array of X's shape {X.shape}, got "
                             f"{getattr(rows32, 'dtype', type(rows32))} "
                             f"{np.shape(rows32)}")
        return self._run(X, rows32) if self.takes(X) else None

    def _code(self, X) -> QuantizedMatrix | None:
        """The quantized rows of ``X`` that :func:`quantize_columns`'s checks
        passed (:meth:`_run` then :meth:`matrix`), or None (see
        :meth:`_run`)."""
        run = self._run(X)
        return None if run is None else self.matrix(run)

    def _run(self, X, rows32=None) -> FixedRowsRun | None:
        """The compiled pass (:func:`~nqlib.kernels.cpu.coded.\
code_fixed_rows`) for float32 or float64 rows ``X`` (a, n), ``n`` a
        multiple of 8, that :meth:`takes` (or :func:`quantize_columns`'s
        checks) passed: its arrays, or None when the shape cannot be rotated
        or an entry is not finite or too large for the float32 side
        information (the general function says why). ``rows32``: None, or
        an (a, n) C-contiguous float32 array that receives the decoded rows
        times the row scales, in the same pass (checked by :meth:`run`)."""
        kernel = self._kernel
        if kernel is None:
            from nqlib.kernels.cpu.coded import code_fixed_rows as kernel

            self._kernel = kernel
        a, n = X.shape
        plan = self._plan(n, a)
        if plan is None:
            return None
        h, coded, hi0, hi64, lo0, lo64 = plan
        rotation, u = self._static(n)
        if not X.flags.c_contiguous:
            X = np.ascontiguousarray(X)
        packed_hi = np.zeros(hi0.packed.shape, np.uint8)
        packed_lo = np.zeros(lo0.packed.shape, np.uint8)
        means = np.empty(a if self.center else 0, np.float32)
        norms = np.empty(a if self.normalize else 0, np.float32)
        R = np.empty((a, n))
        # the coded rows go to this thread's scratch, which no array
        # returned here refers to
        ok, alpha = kernel(
            X, _F32_MAX, self.center, self.normalize, *rotation, u, h, coded,
            hi0.q, hi64, hi0.L, packed_hi, lo0.q, lo64, lo0.L, packed_lo,
            MAX_ALPHA, scratch("coded_rows", (a, n), np.float64), means, norms,
            R, _NO_ROWS32 if rows32 is None else rows32)
        if not ok:
            return None
        return FixedRowsRun((n, a), alpha, means, norms, R, packed_hi,
                            packed_lo)

    def matrix(self, run: FixedRowsRun) -> QuantizedMatrix:
        """The :class:`QuantizedMatrix` of a :meth:`run` of this quantizer
        (what :meth:`code` returns; it takes the run's arrays)."""
        n, a = run.shape
        h, _, hi0, _, lo0, _ = self._plan(n, a)
        hi = FixedPart(L=hi0.L, q=hi0.q, betas=hi0.betas.copy(),
                       packed=run.packed_hi)
        lo = FixedPart(L=lo0.L, q=lo0.q, betas=lo0.betas.copy(),
                       packed=run.packed_lo)
        qm = QuantizedMatrix(shape=(n, a), rate=self.rate, method="nested",
                             mode="fixed", flags=self.flags, seed=self.seed,
                             alpha=run.alpha,
                             means=run.means if self.center else None,
                             norms=run.norms if self.normalize else None,
                             payload=FixedPayload(h=h, hi=hi, lo=lo))
        qm._decoded = run.decoded
        run.decoded.setflags(write=False)
        return qm

    def domain(self, n) -> CodedDomain:
        """The coded domain of the matrices this quantizer makes from rows
        of length ``n`` (what :func:`nqlib.matmul.same_domain` compares,
        without making one)."""
        held = self._domains.get(n)
        if held is None:
            held = CodedDomain(self.rotate, fmt.padded_length(n, "nested"),
                               self.center, FORMAT_VERSION)
            with self._lock:
                self._domains[n] = held
        return held

    def stream_nbytes(self, run: FixedRowsRun) -> int:
        """The bytes that the matrix of ``run`` costs as one call of a
        stream (its :attr:`QuantizedMatrix.stream_nbytes`), without making
        the matrix."""
        return fmt.stream_side_information_bits(
            run.shape, self.flags, run.packed_hi.size + run.packed_lo.size) // 8

    def takes(self, X) -> bool:
        """Whether the lean path may code ``X``: the default options allow
        it, float32 or float64 rows of a length that needs no padding, at
        least one row (its entries are checked in the compiled pass)."""
        return (self._fast and X.ndim == 2
                and X.dtype in (np.float32, np.float64) and X.shape[0] >= 1
                and X.shape[1] >= 8 and X.shape[1] % 8 == 0)

    def _static(self, n):
        """The rotation's arrays (:func:`~nqlib.quantizers.coded_domain.\
rotation_arrays`) and the mean direction in the coded domain (zeros when
        not centred)."""
        held = self._by_n.get(n)
        if held is None:
            P = RandomHadamard(n, self.seed) if self.rotate else None
            u = (unit_mean_direction(P, n, n) if self.center
                 else np.zeros(n))
            held = (rotation_arrays(P, n), u)
            with self._lock:
                self._by_n[n] = held
        return held

    def _plan(self, n, a):
        """``(h, coded, hi, hi64, lo, lo64)``: the fixed mode's plan for
        ``a`` vectors of length ``n`` (:func:`~nqlib.quantizers.fixed_mode.\
plan`, which raises when the rate cannot be met): ``h`` blocks of each row
        in the high part, the first ``coded`` blocks coded, and each part's
        template (its bytes zeroed) and scales in float64; None when the
        shape cannot be rotated."""
        key = (n, a)
        held = self._plans.get(key, False)
        if held is False:
            held = None
            if not (self.rotate and fmt.rotation_size_problem(n, a)):
                template = QuantizedMatrix(
                    shape=(n, a), rate=self.rate, method="nested",
                    mode="fixed", flags=self.flags, seed=self.seed, alpha=1.0,
                    means=None, norms=None, payload=None)
                h, L_hi, L_lo = fixed_mode.plan(template, self.sketch,
                                                self.stream)
                B = n // 8
                parts = []
                for count, L in ((a * h, L_hi), (a * (B - h), L_lo)):
                    part = fixed_mode.part_for(count, L)
                    parts += [part, part.betas.astype(np.float64)]
                held = (h, B if parts[2].L else h, *parts)
            with self._lock:
                if len(self._plans) >= self.MAX_PLANS:    # the oldest goes
                    self._plans.pop(next(iter(self._plans)))
                self._plans[key] = held
        return held
