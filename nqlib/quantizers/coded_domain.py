"""The coded domain: where a matrix's columns live when the lattice codes them.

:func:`nqlib.quantize` maps each column ``x`` (length ``n``) of ``A`` to a
vector ``y`` of length ``n' = 8 ceil(n / 8)``: subtract the column mean
(side information), scale the centred column to norm ``sqrt(n')`` (its norm
is side information), zero-pad to ``n'`` and rotate by the shared random
Hadamard rotation. Every 8-block of ``y`` then looks like N(0, I_8). This
module holds those maps, the per-matrix subtractive dither, the projection
of the directions known to carry no signal (padding, the mean direction),
and the MMSE shrinkage pass -- everything the modes share. The modes
themselves (:mod:`~nqlib.quantizers.variable_mode`,
:mod:`~nqlib.quantizers.fixed_mode`, :mod:`~nqlib.quantizers.trellis`,
:mod:`~nqlib.quantizers.baselines`) code and decode the rows ``y``.

Memory is bounded: the passes work ``CHUNK_ENTRIES`` float64 entries
(whole vectors) at a time, and each step is per vector (or follows numpy's
own summation tree), so the chunk size changes no output bit.

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nqlib import _checks
from nqlib.quantizers import draws
from nqlib.quantizers.format import FORMAT_VERSION
from nqlib.quantizers.hadamard import RandomHadamard

__all__ = ["padded", "as_matrix", "dither", "dither_key", "unit_mean_direction",
           "scaled_padded_rotated", "coded_rows", "rotation_arrays", "project",
           "mmse_sums",
           "CHUNK_ENTRIES", "rows_per_chunk", "pairwise_sums", "Encoding"]

#: entries (float64) per chunk of the encoder's passes: the matrix is
#: centred, rotated, encoded and its shrinkage measured this many entries
#: (whole vectors) at a time, so the extra memory of :func:`quantize` is the
#: coded matrix (float64) plus a few chunks, whatever the size of ``A``.
CHUNK_ENTRIES = 1 << 20


def padded(n: int) -> int:
    """``n`` rounded up to a multiple of 8 (the coded length ``n'``)."""
    return -(-n // 8) * 8


def as_matrix(A, *, keep_float32=False) -> np.ndarray:
    """``A`` as a finite 2-D float64 array (a tensor of any dtype and
    device, or any array layout). With ``keep_float32``, float32 and half
    data (float16, bfloat16) become float32 instead: the same values, half
    the memory. ValueError for anything else."""
    A = np.asarray(_checks.to_numpy(A))
    half = A.dtype in (np.float16, np.float32)
    arr = _checks.as_float_array(
        A, "A", dtype=np.float32 if keep_float32 and half else np.float64)
    if arr.ndim != 2:
        raise ValueError(f"A must be a 2-D matrix (n, a), got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"A must be non-empty, got shape {arr.shape}")
    return arr


def dither(seed: int, n_pad: int, a: int, nblocks: int, key: int,
           version: int = FORMAT_VERSION) -> np.ndarray:
    """Subtractive dither uniform on the Voronoi cell of E8, one per block.

    ``w = G u`` with ``u`` uniform on [0, 1)^8 is uniform on a fundamental
    parallelepiped; ``w - Q(w)`` is then uniform on the Voronoi cell. The
    stream is seeded by the shared seed *and* the matrix's 64-bit dither
    key (:func:`dither_key`, stored in the file), so the two operands of a
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


def dither_key(A: np.ndarray) -> int:
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
    step = max(1, CHUNK_ENTRIES // max(1, A.shape[1]))
    for r0 in range(0, A.shape[0], step):
        h.update(np.ascontiguousarray(A[r0:r0 + step], dtype=np.float64))
    return int.from_bytes(h.digest(), "little")


def unit_mean_direction(P: RandomHadamard | None, n: int, n_pad: int) -> np.ndarray:
    """The unit all-ones direction of length ``n``, zero-padded to ``n_pad``,
    in the coded domain (rotated by ``P`` when there is one); read-only,
    cached per rotation (every quantized activation needs it)."""
    key = None if P is None else (P.n, P.seed, P.version)
    return _unit_mean_direction(key, int(n), int(n_pad))


@functools.lru_cache(maxsize=32)
def _unit_mean_direction(rotation, n: int, n_pad: int) -> np.ndarray:
    e = np.zeros(n_pad)
    e[:n] = 1.0 / np.sqrt(n)
    if rotation is not None:
        e = RandomHadamard(rotation[0], rotation[1], version=rotation[2]).apply(e)
    e.setflags(write=False)
    return e


def scaled_padded_rotated(Xc: np.ndarray, n_pad: int, norms, P) -> np.ndarray:
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


def rows_per_chunk(n_pad: int, multiple: int = 8) -> int:
    """Vectors per chunk: about ``CHUNK_ENTRIES`` entries, a multiple of
    ``multiple`` (8: a fixed-mode part then starts on a byte)."""
    return max(multiple, CHUNK_ENTRIES // max(1, n_pad) // multiple * multiple)


def coded_rows(A, n_pad, center, normalize, P, out=None):
    """The coded domain of ``A`` (n, a), a chunk of columns at a time.

    ``out``: where to write ``Y`` (a C-contiguous float64 array (a,
    n_pad)); a new array when None.

    Returns
    -------
    Y : ndarray (a, n_pad) float64
        The centred, normalised, padded, rotated columns.
    means, norms : ndarray (a,) float32 or None
        The stored side information (None when the step is off).

    Each column gets the arithmetic it would get alone (row-wise
    reductions, per-row transforms).
    """
    n, a = A.shape
    Y = np.empty((a, n_pad)) if out is None else out
    means = np.empty(a, dtype=np.float32) if center else None
    norms = np.empty(a, dtype=np.float32) if normalize else None
    step = rows_per_chunk(n_pad, 1)
    if P is None or P.version >= draws.FIRST_OWN_DRAWS:
        # one compiled pass per column, the same bits (the reference
        # arithmetic is the loop below, which version-2 rotations keep)
        from nqlib.kernels.cpu.coded import coded_rows_into

        rotation = rotation_arrays(P, n_pad)
        spare = np.zeros(0, dtype=np.float32)
        for c0 in range(0, a, step):
            c1 = min(a, c0 + step)
            X = A[:, c0:c1].T
            if not X.flags.c_contiguous:    # columns of a C-ordered A
                X = np.ascontiguousarray(X)
            coded_rows_into(X, bool(center), bool(normalize), *rotation,
                            Y[c0:c1], spare if means is None else means[c0:c1],
                            spare if norms is None else norms[c0:c1])
        return Y, means, norms
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
        Y[c0:c1] = scaled_padded_rotated(X, n_pad, None if norms is None
                                         else norms[c0:c1], P)
    return Y, means, norms


def rotation_arrays(P, n_pad):
    """``(signs, O^T, p)`` of ``P`` (None: no rotation) as
    :func:`~nqlib.kernels.cpu.coded.coded_rows_into` takes them (empty
    signs: no rotation); for rotations of format version
    ``draws.FIRST_OWN_DRAWS`` or later, whose arithmetic that kernel
    follows."""
    if P is None:
        return np.zeros(0), np.ones((1, 1)), n_pad
    return (np.asarray(P.signs, dtype=np.float64),
            np.ascontiguousarray(P.orthogonal.T), int(P.power_of_two))


def project(Y: np.ndarray, qm) -> np.ndarray:
    """Remove from decoded rows ``Y`` (a, n_pad) the directions that carry no
    signal for the quantized matrix ``qm``: the padding coordinates and, for
    centred columns, the (rotated) all-ones direction."""
    n = qm.shape[0]
    P = qm.rotation()
    if qm.n_pad > n:
        Z = P.inverse(Y) if P is not None else np.array(Y)
        Z[:, n:] = 0.0
        Y = P.apply(Z) if P is not None else Z
    if qm.center:
        u = unit_mean_direction(P, n, qm.n_pad)
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


# ------------------------------------------------------ the MMSE shrinkage
def pairwise_sums(total: int, leaf_values):
    """``np.sum`` of ``total`` float64 values, for several arrays at once,
    with the values made a leaf at a time: ``leaf_values(start, stop)``
    returns a tuple of 1-D arrays holding the flat entries ``start ..
    stop - 1`` of each array.

    numpy sums a contiguous array pairwise: a run of more than 128 values
    is split at half its length rounded down to a multiple of 8 and the two
    sums added. Following that tree down to runs of at most
    ``CHUNK_ENTRIES`` values and summing those with ``np.sum`` gives the
    bits of ``np.sum`` over the whole array without ever holding it.
    """
    # numpy's reduction starts from the identity 0.0 (which turns -0.0 into 0.0)
    return tuple(0.0 + v for v in _pairwise_node(0, total, leaf_values))


def _pairwise_node(start, n, leaf_values):
    """One node of :func:`pairwise_sums` (a module function, not a closure
    that refers to itself: such a cycle would keep the arrays it reaches
    alive until the garbage collector runs)."""
    if n <= max(CHUNK_ENTRIES, 128):  # numpy splits runs of more than 128
        return [float(np.sum(v)) for v in leaf_values(start, start + n)]
    half = n // 2
    half -= half % 8
    left = _pairwise_node(start, half, leaf_values)
    right = _pairwise_node(start + half, n - half, leaf_values)
    return [x + y for x, y in zip(left, right)]


def mmse_sums(qm, Y, raw_rows, *, keep=False):
    """The sums of the MMSE shrinkage ``alpha = <y, y_hat> / <y_hat, y_hat>``.

    Parameters
    ----------
    qm : QuantizedMatrix
        The matrix being coded (its projections are applied).
    Y : ndarray (a, n_pad)
        The coded rows.
    raw_rows : callable
        ``raw_rows(r0, r1)``: the raw decode (before projection) of vectors
        ``r0 .. r1 - 1``, asked for in order, a chunk at a time.
    keep : bool
        Also return the projected decode ``Y_hat`` (a, n_pad).

    Returns
    -------
    num, den : float
        The bits of ``(Y_hat * Y).sum()`` and ``(Y_hat * Y_hat).sum()`` on
        whole arrays, made a block of vectors at a time.
    Y_hat : ndarray or None
    """
    a, n_pad = Y.shape
    if (keep and qm.n_pad == qm.shape[0]
            and (not qm.center or qm.version >= draws.FIRST_OWN_DRAWS)):
        # the whole decode is kept anyway: project it in place and sum it
        # in one compiled call (the same bits as the chunked pass below)
        from nqlib.kernels.cpu.coded import project_mmse

        R = np.ascontiguousarray(raw_rows(0, a), dtype=np.float64)
        u = (unit_mean_direction(qm.rotation(), qm.shape[0], n_pad)
             if qm.center else np.zeros(n_pad))
        num, den = project_mmse(R, np.ascontiguousarray(Y), u, bool(qm.center))
        return num, den, R
    rows = rows_per_chunk(n_pad)
    full = np.empty((a, n_pad)) if keep else None
    block = [-1, None]  # (first vector, its projected rows)

    def projected(r0):
        if block[0] != r0:
            r1 = min(a, r0 + rows)
            block[:] = [r0, project(raw_rows(r0, r1), qm).reshape(-1)]
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

    num, den = pairwise_sums(a * n_pad, leaf)
    return num, den, full


@dataclass(eq=False)
class Encoding:
    """What a mode's encoder returns to :func:`nqlib.quantize`.

    Attributes
    ----------
    payload : Payload
        The codes (:mod:`nqlib.quantizers.payloads`).
    raw_rows : callable
        ``raw_rows(r0, r1)``: the decoder's raw rows (before projection and
        shrinkage) of vectors ``r0 .. r1 - 1``, asked for in order, a chunk
        at a time (or all at once), by the MMSE pass (:func:`mmse_sums`),
        which may overwrite them.
    finish : callable or None
        Codes whatever the MMSE pass did not ask for (an encoder may code
        a chunk only when its reconstruction is asked for, so that no
        full-size decoded matrix is held); None when the payload is
        complete.
    """

    payload: object
    raw_rows: Callable[[int, int], np.ndarray]
    finish: Callable[[], None] | None = None
