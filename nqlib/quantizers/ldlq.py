"""Hessian-aware rounding: LDLQ / GPTQ-style error feedback for the
fixed-rate nested-lattice code.

A weight matrix with rows ``w_i`` (length ``n``) multiplies activations
``x``; the output error of row ``i`` is ``x^T (w_hat_i - w_i)``. Plain
quantization makes every weight row accurate; it does not look at which
directions the activations actually excite. Given their second moment
``H = E[x x^T]`` (from calibration data), the expected squared output error
of the row is ``(w_hat_i - w_i) H (w_hat_i - w_i)^T``, and the blocks of a
row can be coded one after the other, each correcting the error the earlier
ones left in the directions ``H`` cares about (Frantar et al., GPTQ, 2022;
Chee et al., QuIP's LDLQ, 2023; NestQuant uses it with E8). The output here
is a standard ``mode="fixed"`` :class:`~nqlib.QuantizedMatrix`: the same
side information, words and payload layout, so decoding, storage and
:func:`nqlib.inner_products` are unchanged -- only which words are chosen differs.

**The coded domain.** :func:`nqlib.quantize` codes ``y_i = P (w_i - mu_i 1)
sqrt(N) / s_i`` (centred, normalised, padded to ``N`` and rotated by ``P``),
and the decoder returns ``y_hat_i = alpha Pi c_i``, where ``c_i`` are the
decoded E8 blocks and ``Pi`` removes the padding and the mean direction.
Since ``x^T (w_hat_i - w_i) = (s_i / sqrt(N)) x'^T (y_hat_i - y_i)`` with
``x' = Pi P x`` (``Pi y_i = y_i``), the per-row loss is
``(y_hat_i - y_i) H' (y_hat_i - y_i)^T`` with ``H' = Pi P H P^T Pi``; the
factor ``s_i^2 / N`` does not change the best codes of row ``i``.

**The block update (derivation).** Split ``y`` (one row; all rows share
``H'``) into ``B = N / 8`` blocks ``y_b``. Code them in order; the block
quantizer ``Q`` (the fixed-rate E8 code) sees

    u_b = y_b + sum_{c<b} eta_c F_cb,    eta_c = Q(u_c) - u_c,

with 8 x 8 feedback matrices ``F_cb`` to be chosen. Then
``y_hat_b - y_b = eta_b + sum_{c<b} eta_c F_cb``, i.e. ``Delta = eta V``
with ``V`` unit block-upper-triangular (``V_bb = I``, ``V_cb = F_cb``), and
the loss is ``eta V H' V^T eta^T``. Write the Cholesky factorisation of the
inverse, ``H'^{-1} = R^T R`` (``R`` upper triangular), let ``R_D`` hold its
8 x 8 diagonal blocks, and take ``V = R_D^{-1} R``, i.e.
``F_cb = R_cc^{-1} R_cb``. Then

    V H' V^T = R_D^{-1} R (R^T R)^{-1} R^T R_D^{-T} = (R_D^T R_D)^{-1},

block diagonal: the loss is ``sum_b eta_b D_b eta_b^T`` with
``D_b = (R_bb^T R_bb)^{-1}``, the Schur complement of ``H'`` on the blocks
``>= b`` onto block ``b`` (the conditional covariance of ``x'_b`` given the
later blocks), so ``D_b <= H'_bb``. If the lattice errors are white with
variance ``m`` per entry, the expected loss falls from ``m tr H'`` (plain
rounding) to ``m sum_b tr D_b``. In code: after coding block ``c``, add
``eta_c R_cc^{-1} R_{c,>c}`` to the not yet coded coordinates of every row
(lazily: at once to the rest of a group of :data:`LAZY_BLOCKS` blocks, and to
the coordinates after the group once the whole group is coded -- the same
sums, in another order).
``H'`` is damped, ``H' + lambda I`` with ``lambda`` a fraction ``damp`` of
its mean diagonal, so that the factorisation exists for rank-deficient
calibration statistics (and the padding and mean directions, which ``Pi``
removes).

The MMSE shrinkage is chosen for the output loss too:
``alpha = <Y, Y_c>_H' / <Y_c, Y_c>_H'`` (undamped ``H'``), which is the plain
quantizer's ``alpha`` when ``H'`` is the identity.

Book: chapter "Quantizing a sentence-embedding model", label ``ch-minilm``.
"""

from __future__ import annotations

import numbers

import numpy as np

from nqlib import _backend, _checks
from nqlib.quantizers import coded_domain, trellis
from nqlib.quantizers.coded_domain import (
    as_matrix,
    project,
    scaled_padded_rotated,
    unit_mean_direction,
)
from nqlib.quantizers.format import TRELLIS_PAYLOAD_BYTES
from nqlib.quantizers.matrix import QuantizedMatrix, quantize, quantize_columns
from nqlib.quantizers.payloads import FixedPart, FixedPayload, TrellisPayload
from nqlib.quantizers.rate_control import check_state_bits, code_budget_bits

__all__ = ["quantize_ldlq", "quantize_ldlq_trellis", "check_hessian_inputs",
           "DEFAULT_DAMP", "TRELLIS_SEQ_LEN"]

#: damping of H' as a fraction of its mean diagonal (the GPTQ default)
DEFAULT_DAMP = 0.01
#: 8-blocks per group of the lazy error feedback of :func:`quantize_ldlq`
#: (the coordinates after a group are updated once per group)
LAZY_BLOCKS = 16


def check_hessian_inputs(A, H, damp):
    """``(A, H)`` as float64 arrays after checking the Hessian-aware inputs:
    ``A`` a finite ``(n, a)`` matrix, ``H`` a finite ``(n, n)`` matrix and
    ``damp`` a finite number ``>= 0``; ValueError naming the problem."""
    A = as_matrix(A)
    n = A.shape[0]
    H = _checks.as_float_array(H, "H", ndim=2, dtype=np.float64)
    if H.shape != (n, n):
        raise ValueError(f"H must have shape {(n, n)} (the inner dimension of "
                         f"A), got {H.shape}")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not (
            np.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    return A, H


def _coded_domain(A, template: QuantizedMatrix) -> np.ndarray:
    """The rows ``y_i`` (a, n_pad) that :func:`quantize` codes, rebuilt from
    the template's stored (float32) means and norms with the same arithmetic
    as the quantizer."""
    X = np.ascontiguousarray(A.T)
    if template.center:
        X = X - template.means.astype(np.float64)[:, None]
    return scaled_padded_rotated(X, template.n_pad, template.norms,
                                  template.rotation())


def _coded_hessian(H, template: QuantizedMatrix) -> np.ndarray:
    """``H' = Pi P H P^T Pi`` in the coded domain (n_pad x n_pad)."""
    n = template.shape[0]
    n_pad = template.n_pad
    Hp = np.zeros((n_pad, n_pad))
    Hp[:n, :n] = H
    P = template.rotation()
    if P is not None:
        Hp = P.apply(P.apply(Hp).T)  # P Hp P^T (Hp symmetric)
    # Pi: Hp already lives in the span of the unpadded coordinates (which
    # contains the mean direction u), so only u is left to project out:
    # (I - u u^T) Hp (I - u u^T).
    if template.center:
        u = unit_mean_direction(P, n, n_pad)
        Hu = Hp @ u
        Hp = Hp - np.outer(u, Hu) - np.outer(Hu, u) + float(u @ Hu) * np.outer(u, u)
    return 0.5 * (Hp + Hp.T)


def _feedback(Hc, damp, cuts=None) -> np.ndarray:
    """The feedback rows ``V = R_D^{-1} R`` (n_pad x n_pad, unit block-upper
    triangular), ``R`` the upper Cholesky factor of ``(H' + lambda I)^{-1}``.
    The blocks are the 8-blocks, or ``[cuts[i], cuts[i+1])`` when ``cuts``
    (increasing, from 0 to n_pad) is given (the trellis mode's sequences).

    With ``J`` the reversal permutation, ``J H J = L L^T`` gives
    ``H = M M^T`` with ``M = J L J`` upper triangular, and ``R = M^{-1}``.
    """
    from scipy.linalg import solve_triangular

    N = Hc.shape[0]
    trace = float(np.trace(Hc))
    if trace == 0:  # no activation energy: nothing to weigh, no feedback
        return np.eye(N)
    Hd = Hc + (damp * abs(trace) / N) * np.eye(N)
    try:
        L = np.linalg.cholesky(Hd[::-1, ::-1])
    except np.linalg.LinAlgError:
        raise ValueError("H is not positive definite after damping: pass a "
                         "positive semi-definite H and damp > 0") from None
    M = np.ascontiguousarray(L[::-1, ::-1])
    R = solve_triangular(M, np.eye(N), lower=False)
    if cuts is not None:
        V = np.empty_like(R)
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            V[c0:c1] = np.linalg.solve(R[c0:c1, c0:c1], R[c0:c1])
        return V
    B = N // 8
    blocks = np.arange(B)
    diag = R.reshape(B, 8, B, 8)[blocks, :, blocks, :]  # (B, 8, 8): R_bb
    return np.matmul(np.linalg.inv(diag), R.reshape(B, 8, N)).reshape(N, N)


def _block_coder(backend):
    """``enc(x, q, betas, z) -> (codes, index, decoded)``: rows of 8 coded
    with the multi-scale E8 code, and their reconstructions (the decoder's
    bits), in one call."""
    if backend == "numpy":
        from nqlib.reference.nested import decode_multiscale, encode_multiscale

        def enc(x, q, betas, z):
            codes, index, _ = encode_multiscale(x, q, betas, z)
            return codes, index, decode_multiscale(codes, index, q, betas, z)

        return enc
    from nqlib.kernels.cpu import nested as kern

    def enc(x, q, betas, z):
        m = x.shape[0]
        codes = np.empty((m, 8), dtype=np.int64)
        index = np.empty(m, dtype=np.int64)
        out = np.empty((m, 8))
        # the encoder writes the reconstructions too: the same bits as
        # decode_multiscale_rows
        kern.encode_multiscale_rows(x, q, betas, z, codes, index, np.empty(m),
                                    out)
        return codes, index, out

    return enc


def _pack_part(codes, index, part: FixedPart) -> FixedPart:
    """The payload part ``part`` with the given words, packed as
    :func:`nqlib.quantizers.fixed_mode.encode_part` packs them."""
    from nqlib.kernels.cpu import nested as kern

    nb = codes.shape[0]
    words = np.empty(nb, dtype=np.uint64)
    kern.mixed_radix_words(codes, index, part.q, words)
    packed = np.zeros(-(-nb * part.L // 8), dtype=np.uint8)
    kern.pack_words(words, part.L, packed)
    return FixedPart(L=part.L, q=part.q, betas=part.betas, packed=packed)


def quantize_ldlq(A, rate, H, *, seed=0, damp=DEFAULT_DAMP, estimator="mmse",
                  dither=False, center=True, normalize=True, rotate=True,
                  sketch=True, backend="auto") -> QuantizedMatrix:
    """Quantize the columns of ``A`` with Hessian-aware rounding (fixed mode).

    Parameters
    ----------
    A : array_like or torch.Tensor, shape (n, a)
        The matrix; its columns are the vectors (for a linear layer with
        weight ``W``, ``A = W.T``).
    rate : float
        Target rate in bits per entry, as in :func:`nqlib.quantize` with
        ``mode="fixed"``; the achieved rate is the same as that quantizer's
        (same plan, same file layout).
    H : array_like, shape (n, n)
        Second moment ``E[x x^T]`` of the vectors the columns of ``A`` will
        be multiplied with (a layer's input activations), symmetric positive
        semi-definite.
    seed : int
        Shared seed (rotation, dither), as in :func:`nqlib.quantize`.
    damp : float
        Damping ``lambda = damp * mean diag(H')`` added to ``H'`` before the
        factorisation (>= 0).
    estimator, dither, center, normalize, rotate, sketch, backend
        As in :func:`nqlib.quantize` (method ``"nested"``, mode
        ``"fixed"``).

    Returns
    -------
    QuantizedMatrix
        A standard fixed-mode matrix: :func:`nqlib.load`,
        :meth:`~nqlib.QuantizedMatrix.dequantize` and :func:`nqlib.inner_products`
        treat it like any other.

    Raises
    ------
    ValueError
        Bad ``A`` or rate (as :func:`nqlib.quantize`), ``H`` of the wrong
        shape, not finite, or not positive definite after damping.

    Notes
    -----
    The derivation of the block update is in this module's docstring. With
    ``H`` proportional to the identity, ``center=False`` and ``n`` a
    multiple of 8 the feedback vanishes and the words are those of
    ``quantize(A, rate, mode="fixed")`` (with padding, the projection that
    removes the padded coordinates makes the coded-domain ``H`` no longer
    proportional to the identity).
    Book: chapter "Quantizing a sentence-embedding model", label
    ``ch-minilm``.
    """
    A, H = check_hessian_inputs(A, H, damp)
    n, a = A.shape
    backend = _backend.resolve(backend, tensor_input=False)
    # The plain fixed-mode quantizer fixes the side information and the plan
    # (which word length codes which blocks); only the words are chosen here,
    # so it stops before coding any.
    template = quantize_columns(A, rate, seed=seed, mode="fixed",
                                method="nested", estimator=estimator,
                                dither=dither, center=center,
                                normalize=normalize, rotate=rotate,
                                sketch=sketch, backend=backend,
                                code_words=False)
    Y = _coded_domain(A, template)
    Hc = _coded_hessian(0.5 * (H + H.T), template)
    V = _feedback(Hc, float(damp))
    n_pad = template.n_pad
    B = n_pad // 8
    p = template.payload
    h = p.h
    zb = None
    if template.dither:
        zb = coded_domain.dither(seed, n_pad, a, a * B, template.dither_key,
                     template.version).reshape(a, B, 8)
    enc = _block_coder(backend)
    codes = np.zeros((a, B, 8), dtype=np.int64)
    index = np.zeros((a, B), dtype=np.int64)
    U = Y.copy()
    C = np.zeros_like(Y)  # decoded blocks (before projection and shrinkage)
    E = np.empty_like(Y)  # their errors eta_b = C_b - u_b
    # u_{>b} += eta_b R_bb^{-1} R_{b,>b}, applied lazily: within a group of
    # LAZY_BLOCKS blocks at once, to the coordinates after the group once per
    # group (one matrix product instead of one rank-8 update per block; the
    # same sums, in another order)
    for g0 in range(0, B, LAZY_BLOCKS):
        g1 = min(B, g0 + LAZY_BLOCKS)
        end = 8 * g1
        for b in range(g0, g1):
            part = p.hi if b < h else p.lo
            cols = slice(8 * b, 8 * b + 8)
            u = np.ascontiguousarray(U[:, cols])
            if part.L:
                betas = part.betas.astype(np.float64)
                z = (np.ascontiguousarray(zb[:, b]) if zb is not None
                     else np.zeros((1, 8)))
                codes[:, b], index[:, b], C[:, cols] = enc(u, part.q, betas, z)
            E[:, cols] = C[:, cols] - u
            if 8 * b + 8 < end:
                U[:, 8 * b + 8:end] += E[:, cols] @ V[cols, 8 * b + 8:end]
        if end < n_pad:
            U[:, end:] += E[:, 8 * g0:end] @ V[8 * g0:end, end:]
    parts = {}
    for name, part, sl in p.part_ranges(B):
        if part.L == 0 or sl.stop == sl.start:
            parts[name] = part
            continue
        parts[name] = _pack_part(np.ascontiguousarray(codes[:, sl].reshape(-1, 8)),
                                 np.ascontiguousarray(index[:, sl].reshape(-1)),
                                 part)
    qm = QuantizedMatrix(shape=(n, a), rate=template.rate, method="nested",
                         mode="fixed", flags=template.flags, seed=template.seed,
                         alpha=1.0, means=template.means, norms=template.norms,
                         payload=FixedPayload(h=h, **parts),
                         dither_key=template.dither_key)
    if qm.estimator == "mmse":
        Yc = project(C, qm)
        G = Yc @ Hc
        den = float((G * Yc).sum())
        qm.alpha = float(np.float32((G * Y).sum() / den)) if den > 0 else 1.0
    return qm


# ------------------------------------------- the trellis mode, with LDLQ
#: sequence length of :func:`quantize_ldlq_trellis`: shorter than the plain mode's,
#: so that the error feedback runs between more blocks
TRELLIS_SEQ_LEN = 256


def quantize_ldlq_trellis(A, rate, H, *, seed=0, damp=None, estimator="mmse",
                          center=True, normalize=True, rotate=True,
                          sketch=True, seq_len=TRELLIS_SEQ_LEN,
                          state_bits=None):
    """The trellis mode with Hessian-aware rounding (block LDLQ).

    The block update of :func:`quantize_ldlq` with the trellis
    sequences as the blocks and the Viterbi search as the block quantizer:
    the coded vectors are cut into sequences at the same coordinates
    (``[cuts[j], cuts[j+1])`` for every vector), the sequences of block
    ``j`` of all vectors are encoded (tail-biting, as
    :func:`nqlib.quantizers.trellis.encode`), and
    their error ``eta_j`` is fed forward,
    ``u_{>j} += eta_j R_jj^{-1} R_{j,>j}``, so that later blocks correct
    it in the directions ``H`` weighs. Within a sequence the search
    minimises the plain squared error.

    Parameters
    ----------
    A : array_like, shape (n, a)
        The matrix (for a linear layer with weight ``W``, ``A = W.T``).
    rate : float
        Target rate in bits per entry, every byte counted (as
        ``quantize(A, rate, mode="trellis")``).
    H : array_like, shape (n, n)
        Second moment of the vectors the columns of ``A`` multiply,
        symmetric positive semi-definite.
    seed, estimator, center, normalize, rotate, sketch
        As in :func:`nqlib.quantize`.
    damp : float, optional
        Damping fraction (default :data:`DEFAULT_DAMP`).
    seq_len : int
        Sequence length (stored in the file).
    state_bits : int, optional
        State bits of the trellis, as in :func:`nqlib.quantize` (None: the
        default, :data:`nqlib.quantizers.trellis.DEFAULT_L`; stored in the
        file).

    Returns
    -------
    QuantizedMatrix
        A standard ``mode="trellis"`` matrix (the same file layout).

    Notes
    -----
    With ``H`` proportional to the identity (and no centering or padding)
    the feedback vanishes and the stream is that of the plain encoder with
    the same sequence length. Book: chapter "Beyond E8: trellis codes",
    label ``ch-trellis``.
    """
    from nqlib.kernels.cpu import trellis as kern

    damp = DEFAULT_DAMP if damp is None else damp
    state_bits = check_state_bits(state_bits, "nested", "trellis")
    A64, H = check_hessian_inputs(A, H, damp)
    n, a = A64.shape
    base = quantize(A64, rate, seed=seed, mode="fixed",
                          estimator=estimator, center=center,
                          normalize=normalize, rotate=rotate,
                          sketch=sketch)  # side information and options
    qm = QuantizedMatrix(
        shape=base.shape, rate=base.rate, method="nested", mode="trellis",
        flags=base.flags, seed=base.seed, alpha=1.0, means=base.means,
        norms=base.norms, payload=None)
    n_pad = qm.n_pad
    total, keep = trellis.budget_plan(code_budget_bits(qm, TRELLIS_PAYLOAD_BYTES),
                                      a, n_pad, sketch=sketch)
    Y = _coded_domain(A64, base)
    Hc = _coded_hessian(0.5 * (H + H.T), base)
    L = trellis.DEFAULT_L if state_bits is None else state_bits
    lay, L, beta = trellis.plan(Y, total, keep=keep, L=L,
                                seq_len=seq_len)
    per_col = lay.count // a
    cuts = np.concatenate((lay.starts[:per_col], [keep]))
    blocks = cuts if keep == n_pad else np.concatenate((cuts, [n_pad]))
    V = _feedback(Hc, float(damp), blocks)
    values = (beta * trellis.state_values(L)).astype(np.float32)
    U = Y.copy()
    C = np.zeros_like(Y)
    inputs = np.zeros(a * n_pad, dtype=np.uint8)
    table = trellis.quantile_table(trellis.TABLE_BITS)
    for j in range(per_col):
        c0, c1 = int(cuts[j]), int(cuts[j + 1])
        T = c1 - c0
        idx = np.arange(a) * per_col + j
        bits = lay.bits[idx]
        starts = np.arange(a, dtype=np.int64) * T
        lengths = np.full(a, T, dtype=np.int64)
        u = np.ascontiguousarray(U[:, c0:c1], dtype=np.float32).ravel()
        ib = np.zeros(a * T, dtype=np.uint8)
        kern.encode_sequences(u, starts, lengths, bits, values, L,
                              trellis.DEFAULT_WINDOW, ib, np.zeros(a))
        # the block's own reconstruction, decoded from its streams
        offsets = np.concatenate(([0], np.cumsum(bits)[:-1]))
        stream = np.zeros(-(-int(bits.sum()) // 8) + 8, dtype=np.uint8)
        kern.pack_inputs(ib, starts, lengths, bits, offsets, stream)
        dec = np.zeros(a * T, dtype=np.float32)
        kern.decode_sequences(stream, starts, lengths, bits, offsets, L,
                              trellis.hash_multiplier(), trellis.HASH_SHIFT,
                              trellis.TABLE_BITS, table, beta, dec)
        C[:, c0:c1] = dec.reshape(a, T)
        inputs[(lay.starts[idx][:, None] + np.arange(T)).ravel()] = ib
        if c1 < n_pad:  # u_{>j} += eta_j R_jj^{-1} R_{j,>j}
            U[:, c1:] += (C[:, c0:c1] - U[:, c0:c1]) @ V[c0:c1, c1:]
    packed = np.zeros(-(-total // 8), dtype=np.uint8)
    kern.pack_inputs(inputs, lay.starts, lay.lengths, lay.bits, lay.offsets,
                     packed)
    qm.payload = TrellisPayload(L=L, qbits=trellis.TABLE_BITS,
                                seq_len=lay.seq_len, keep=keep, beta=float(beta),
                                total_bits=int(total), packed=packed)
    if qm.estimator == "mmse":
        Yc = project(C, qm)
        G = Yc @ Hc
        den = float((G * Yc).sum())
        qm.alpha = float(np.float32((G * Y).sum() / den)) if den > 0 else 1.0
    return qm
