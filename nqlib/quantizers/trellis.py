"""The bitshift trellis code of ``mode="trellis"``: design, layout, encode
and decode of the coded (rotated, normalised) vectors.

After the pipeline of :func:`nqlib.quantize` (centering, normalisation,
rotation) every coded vector of length ``n'`` looks like N(0, I). Its first
``keep`` entries (all of them unless the rate is below one bit per entry and
``sketch`` is on) are cut into *sequences* of at most ``seq_len`` entries.
A sequence of ``T`` entries is a circular stream of ``Bs`` bits
(tail-biting: no start state is stored). Step ``t`` shifts
``k_t = floor((t+1) Bs / T) - floor(t Bs / T)`` new bits into an ``L``-bit
state -- so fractional rates are time sharing between ``floor(Bs / T)`` and
one more bit per entry -- and the entry decodes to

    ``beta * table[hash(state) >> (32 - TABLE_BITS)]``,

a multiplicative hash of the state (two multiplications by the odd integer
nearest ``2^32 / golden ratio`` and one xor-shift) indexing a table of
``2^TABLE_BITS`` Gaussian quantiles (16 KiB of float32: it stays in L1).
Each path through the trellis is a codeword of a ``T``-dimensional code
whose entries look iid Gaussian -- the random code of the rate-distortion
theorem, made searchable by its shift structure (QTIP, Tseng et al., 2024,
arXiv 2406.11235, is the source of the idea; this code is written from the
mathematics). The encoder finds, per sequence, the path nearest to the
data by a Viterbi search (:mod:`nqlib.kernels.cpu.trellis`), the scale
``beta`` by a search on a subsample of sequences.

The total code budget ``B`` (bits) is spread over the sequences in
proportion to their lengths (:class:`Layout`), so the file meets the rate
to the byte, and the decoder recomputes every offset from ``B``.

Book: chapter "Beyond E8: trellis codes", label ``ch-trellis``.
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

import numpy as np

__all__ = ["DEFAULT_L", "DEFAULT_SEQ_LEN", "DEFAULT_WINDOW", "TABLE_BITS",
           "MIN_L", "MAX_L", "MAX_K", "hash_multiplier", "quantile_table",
           "state_values", "Layout", "layout", "scale_grid", "plan", "encode",
           "decode", "budget_plan", "encode_matrix", "read_payload",
           "write_payload", "quantize_ldlq"]

#: state bits L of the default code. The Viterbi search costs O(2^L) per
#: entry and each bit buys 0.01-0.02 bit of gap: 15 is the largest L whose
#: 4096 x 4096 encode was measured to fit the 5-minute budget on two cores
#: (``benchmarks/trellis.py --sweep`` and ``--layer``; chapter ``ch-trellis``)
DEFAULT_L = 15
#: entries per sequence (longer sequences amortise the tail-biting seam)
DEFAULT_SEQ_LEN = 1024
#: steps on each side of the seam that the encoder's second pass re-solves
DEFAULT_WINDOW = 32
#: the reconstruction table has 2^TABLE_BITS Gaussian quantiles
TABLE_BITS = 12
#: the xor-shift of the state hash
HASH_SHIFT = 16
#: allowed state bits
MIN_L, MAX_L = 2, 20
#: at most this many new bits per step (bits per entry)
MAX_K = 8
#: most coded entries of one payload (so that entries x bits < 2^63)
MAX_CODED = 2**29
#: candidate factors on ``sqrt(1 - 2^(-2r))`` for the scale search
_SCALE_FACTORS = (0.96, 1.0, 1.04, 1.08, 1.12, 1.16)
#: sequences in the scale search's subsample (at most a quarter of them)
_SCALE_SAMPLE = 16


@functools.cache
def hash_multiplier() -> int:
    """The odd integer nearest ``2^32 / phi`` (phi the golden ratio):
    Knuth's multiplicative-hashing constant, 2654435769."""
    m = round(2**32 * 2 / (1 + math.sqrt(5)))
    return m if m % 2 else m + 1


@functools.cache
def quantile_table(qbits: int = TABLE_BITS) -> np.ndarray:
    """``2^qbits`` Gaussian quantiles ``Phi^{-1}((i + 1/2) / 2^qbits)``,
    rescaled to unit mean square (float32, read-only)."""
    nd = NormalDist()
    m = 1 << qbits
    t = np.array([nd.inv_cdf((i + 0.5) / m) for i in range(m)])
    t = (t / math.sqrt(float(np.mean(t * t)))).astype(np.float32)
    t.setflags(write=False)
    return t


@functools.cache
def state_values(L: int, qbits: int = TABLE_BITS) -> np.ndarray:
    """``table[hash(s) >> (32 - qbits)]`` for the ``2^L`` states ``s``
    (float32, read-only): the codebook before the scale ``beta``."""
    from nqlib.kernels.cpu import trellis as kern

    out = np.empty(1 << L, dtype=np.float32)
    kern.state_values(L, hash_multiplier(), HASH_SHIFT, qbits,
                      quantile_table(qbits), out)
    out.setflags(write=False)
    return out


class Layout:
    """Where every sequence lives: entries (flat index into the (a, n')
    coded matrix), stream bits and stream offsets.

    Column ``c`` codes its first ``keep`` entries, cut into
    ``per_col = ceil(keep / seq_len)`` sequences of near-equal lengths
    (``floor((i+1) keep / per_col) - floor(i keep / per_col)``); the
    ``a per_col`` sequences, in column order, share the ``B`` stream bits
    in proportion to their lengths: the sequence that ends at coded entry
    ``E_j`` (of ``E = a keep``) ends at stream bit ``floor(E_j B / E)``, so
    a sequence of ``T`` entries gets ``floor(T B / E)`` bits or one more.
    """

    def __init__(self, a, n_pad, keep, total_bits, seq_len):
        self.a, self.n_pad, self.keep = int(a), int(n_pad), int(keep)
        self.total_bits, self.seq_len = int(total_bits), int(seq_len)
        coded = self.a * self.keep
        if coded > MAX_CODED:
            raise ValueError(f"a trellis payload codes at most {MAX_CODED} "
                             f"entries, got {coded}")
        per_col = -(-self.keep // self.seq_len)
        i = np.arange(per_col + 1, dtype=np.int64)
        cuts = i * self.keep // per_col
        cols = np.repeat(np.arange(self.a, dtype=np.int64), per_col)
        self.starts = cols * self.n_pad + np.tile(cuts[:-1], self.a)
        self.lengths = np.tile(np.diff(cuts), self.a)
        # sequence j ends at coded entry E_j and stream bit floor(E_j B / E):
        # bits in proportion to length (E B < 2^63: exact integers)
        entry_ends = np.concatenate(([0], np.cumsum(self.lengths)))
        ends = entry_ends * self.total_bits // coded
        self.offsets = ends[:-1]
        self.bits = np.diff(ends)

    @property
    def count(self) -> int:
        return int(self.lengths.size)

    def check(self, L) -> None:
        """``ValueError`` unless every sequence has between 1 and
        ``MAX_K`` bits per entry, at least ``L`` bits, and fewer than ``L``
        new bits per step."""
        lo = self.bits < self.lengths
        hi = self.bits > MAX_K * self.lengths
        if lo.any() or hi.any():
            raise ValueError("trellis layout needs 1 to 8 bits per coded entry "
                             "in every sequence")
        kmax = int(np.max(-(-self.bits // self.lengths)))
        if kmax >= L or int(self.bits.min()) < L:
            raise ValueError(f"trellis layout: L = {L} state bits need sequences "
                             f"of at least L bits and at most L - 1 bits per "
                             f"entry (got {int(self.bits.min())} bits and "
                             f"{kmax} bits per entry)")


def layout(a, n_pad, keep, total_bits, seq_len) -> Layout:
    """The :class:`Layout` of an (a, n') coded matrix."""
    return Layout(a, n_pad, keep, total_bits, seq_len)


def scale_grid(rate: float) -> np.ndarray:
    """Candidate scales ``beta`` at ``rate`` bits per coded entry: the
    factors ``_SCALE_FACTORS`` times ``sqrt(1 - 2^(-2 rate))`` (the
    standard deviation of the ideal Gaussian test channel's output)."""
    base = math.sqrt(1.0 - 2.0 ** (-2.0 * rate))
    return np.array([np.float32(f * base) for f in _SCALE_FACTORS])


def _encode_subset(x, lay, idx, values, L, window):
    """Encode the sequences ``idx`` of ``lay``; returns (inputs, costs)."""
    from nqlib.kernels.cpu import trellis as kern

    inputs = np.zeros(x.size, dtype=np.uint8)
    costs = np.zeros(idx.size)
    kern.encode_sequences(x, lay.starts[idx], lay.lengths[idx], lay.bits[idx],
                          values, L, window, inputs, costs)
    return inputs, costs


def choose_L(lay: Layout, L: int) -> int:
    """The largest usable ``L' <= L``: every sequence has at least ``L'``
    bits (short vectors lower it)."""
    return max(MIN_L, min(L, int(lay.bits.min())))


def plan(Y, total_bits, *, keep=None, L=DEFAULT_L, seq_len=DEFAULT_SEQ_LEN,
         window=DEFAULT_WINDOW):
    """The layout, the state bits and the scale of a code for ``Y``: what
    :func:`encode` fixes before its Viterbi searches. Returns ``(layout, L,
    beta)``: ``L`` lowered to the shortest sequence's bits when needed, and
    ``beta`` the best of :func:`scale_grid` on a spread subsample of at
    most ``_SCALE_SAMPLE`` sequences (a quarter of them for small
    matrices)."""
    a, n_pad = Y.shape
    keep = n_pad if keep is None else int(keep)
    lay = layout(a, n_pad, keep, total_bits, seq_len)
    L = choose_L(lay, L)
    lay.check(L)
    x = np.ascontiguousarray(Y, dtype=np.float32).ravel()
    unit = state_values(L)
    rate = total_bits / (a * keep)
    n_sample = min(_SCALE_SAMPLE, max(1, lay.count // 4))
    sample = np.unique(np.linspace(0, lay.count - 1, n_sample).astype(np.int64))
    best = None
    for beta in scale_grid(rate):
        _, costs = _encode_subset(x, lay, sample, (beta * unit).astype(np.float32),
                                  L, window)
        if best is None or costs.sum() < best[0]:
            best = (costs.sum(), beta)
    return lay, L, np.float32(best[1])


def encode(Y, total_bits, *, keep=None, L=DEFAULT_L, seq_len=DEFAULT_SEQ_LEN,
           window=DEFAULT_WINDOW):
    """Encode the coded vectors ``Y`` (a, n') in ``total_bits`` bits.

    Parameters
    ----------
    Y : ndarray (a, n')
        The rotated, normalised vectors (entries about N(0, 1)).
    total_bits : int
        Stream bits, at least one and at most ``MAX_K`` per coded entry.
    keep : int, optional
        Entries coded per vector (default all); the rest decode to 0.
    L, seq_len, window : int
        State bits (lowered to the shortest sequence's bits when needed),
        sequence length, and the seam window of the tail-biting encoder.

    Returns
    -------
    payload : dict
        ``L, qbits, seq_len, keep, beta, total_bits, packed``.
    decoded : ndarray (a, n')
        The reconstruction (what :func:`decode` returns).
    """
    from nqlib.kernels.cpu import trellis as kern

    a, n_pad = Y.shape
    lay, L, beta = plan(Y, total_bits, keep=keep, L=L, seq_len=seq_len,
                        window=window)
    x = np.ascontiguousarray(Y, dtype=np.float32).ravel()
    values = (beta * state_values(L)).astype(np.float32)
    inputs, _ = _encode_subset(x, lay, np.arange(lay.count), values, L, window)
    packed = np.zeros(-(-total_bits // 8), dtype=np.uint8)
    kern.pack_inputs(inputs, lay.starts, lay.lengths, lay.bits, lay.offsets,
                     packed)
    payload = dict(L=L, qbits=TABLE_BITS, seq_len=lay.seq_len, keep=lay.keep,
                   beta=float(beta), total_bits=int(total_bits), packed=packed)
    return payload, decode(payload, a, n_pad)


def decode(payload, a, n_pad) -> np.ndarray:
    """The decoded vectors (a, n') of a trellis payload (float64; entries
    past ``keep`` are 0)."""
    from nqlib.kernels.cpu import trellis as kern

    lay = layout(a, n_pad, payload["keep"], payload["total_bits"],
                 payload["seq_len"])
    out = np.zeros(a * n_pad, dtype=np.float32)
    data = np.zeros(payload["packed"].size + 8, dtype=np.uint8)
    data[:payload["packed"].size] = payload["packed"]
    kern.decode_sequences(data, lay.starts, lay.lengths, lay.bits, lay.offsets,
                          payload["L"], hash_multiplier(), HASH_SHIFT,
                          payload["qbits"], quantile_table(payload["qbits"]),
                          np.float32(payload["beta"]), out)
    return out.reshape(a, n_pad).astype(np.float64)


# ------------------------------------------------------- the file payload
#: payload header: L, table bits, sequence length, kept entries per vector,
#: the scale beta (float32), stream bits (uint64); then the packed stream
PAYLOAD_HEADER = "BBHIfQ"
PAYLOAD_HEADER_BYTES = 20
#: range of a stored scale beta
_BETA_RANGE = (2.0**-64, 2.0**64)


def write_payload(w, payload) -> None:
    """Append a trellis payload to a :class:`nqlib.quantizers.matrix._Writer`."""
    p = payload
    w.pack(PAYLOAD_HEADER, p["L"], p["qbits"], p["seq_len"], p["keep"],
           p["beta"], p["total_bits"])
    w.buf.write(np.ascontiguousarray(p["packed"], dtype=np.uint8).tobytes())


def read_payload(r, a: int, n_pad: int) -> dict:
    """Read and check a trellis payload from a
    :class:`nqlib.quantizers.matrix._Reader`, for ``a`` vectors of length
    ``n_pad``. Every field is checked against the others before anything
    is allocated; ``ValueError`` names the first that is wrong."""
    L, qbits, seq_len, keep, beta, total_bits = r.unpack(PAYLOAD_HEADER)

    def bad(what):
        return ValueError(f"corrupted quantized matrix: trellis payload {what}")

    if not MIN_L <= L <= MAX_L:
        raise bad(f"state bits L = {L} outside {MIN_L}..{MAX_L}")
    if qbits != TABLE_BITS:
        raise bad(f"table bits {qbits} (this nqlib builds {TABLE_BITS})")
    if seq_len < 1:
        raise bad("sequence length 0")
    if not 1 <= keep <= n_pad:
        raise bad(f"kept entries {keep} outside 1..{n_pad}")
    if not (math.isfinite(beta) and _BETA_RANGE[0] <= beta <= _BETA_RANGE[1]):
        raise bad(f"scale beta = {beta} not finite or out of range")
    coded = a * keep
    if not coded <= total_bits <= MAX_K * coded:
        raise bad(f"stream of {total_bits} bits for {coded} coded entries "
                  f"(needs 1 to {MAX_K} bits per entry)")
    packed = r.array(np.uint8, -(-total_bits // 8))  # raises when truncated
    if total_bits % 8 and packed[-1] & ((1 << (8 - total_bits % 8)) - 1):
        raise bad("padding bits of the stream are not zero")
    lay = layout(a, n_pad, keep, total_bits, seq_len)
    try:
        lay.check(L)
    except ValueError as exc:
        raise bad(str(exc)) from None
    return dict(L=L, qbits=qbits, seq_len=seq_len, keep=keep, beta=beta,
                total_bits=total_bits, packed=packed)


def encode_matrix(Y, budget_bits: int, *, sketch: bool, L=None, seq_len=None,
                  window=None):
    """:func:`encode` for :func:`nqlib.quantize`: the stream gets every
    whole byte of ``budget_bits`` (at most ``MAX_K`` bits per entry); below
    one bit per
    entry, ``sketch`` codes only the first ``budget_bits // a`` entries of
    every vector (the rest decode to 0), and without it the rate is
    refused. ``L``, ``seq_len``, ``window``: None for the module's
    ``DEFAULT_L``, ``DEFAULT_SEQ_LEN``, ``DEFAULT_WINDOW`` (read at the
    call, so a measurement can set them)."""
    L = DEFAULT_L if L is None else L
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    window = DEFAULT_WINDOW if window is None else window
    total, keep = budget_plan(budget_bits, *Y.shape, sketch=sketch)
    return encode(Y, total, keep=keep, L=L, seq_len=seq_len, window=window)


def budget_plan(budget_bits: int, a: int, n_pad: int, *, sketch: bool):
    """``(total_bits, keep)`` of :func:`encode_matrix`: whole bytes, at most
    ``MAX_K`` bits per coded entry, and below one bit per entry (with
    ``sketch``) the first ``keep`` entries of every vector."""
    # whole bytes: the packed stream is ceil(total / 8) bytes long
    total = min(int(budget_bits) // 8 * 8, MAX_K * a * n_pad)
    keep = n_pad
    if total < a * n_pad:
        if not sketch:
            raise ValueError(f"mode='trellis' needs at least 1 bit per coded "
                             f"entry: {total / (a * n_pad):.3f} bits per entry "
                             "are left after the side information; raise the "
                             "rate or use sketch=True")
        keep = total // a
        if keep < 1:
            raise ValueError("rate too low for mode='trellis': not one bit per "
                             "vector is left after the side information")
        total = min(total, MAX_K * a * keep)
    return total, keep


# ----------------------------------------------- Hessian-aware rounding
#: sequence length of :func:`quantize_ldlq`: shorter than the plain mode's,
#: so that the error feedback runs between more blocks
LDLQ_SEQ_LEN = 256


def quantize_ldlq(A, rate, H, *, seed=0, damp=None, estimator="mmse",
                  center=True, normalize=True, rotate=True, sketch=True,
                  seq_len=LDLQ_SEQ_LEN):
    """The trellis mode with Hessian-aware rounding (block LDLQ).

    The block update of :mod:`nqlib.quantizers.ldlq` with the trellis
    sequences as the blocks and the Viterbi search as the block quantizer:
    the coded vectors are cut into sequences at the same coordinates
    (``[cuts[j], cuts[j+1])`` for every vector), the sequences of block
    ``j`` of all vectors are encoded (tail-biting, as :func:`encode`), and
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
        Damping fraction (default ``ldlq.DEFAULT_DAMP``).
    seq_len : int
        Sequence length (stored in the file).

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

    import nqlib
    from nqlib.kernels.cpu import trellis as kern
    from nqlib.quantizers import ldlq, matrix

    damp = ldlq.DEFAULT_DAMP if damp is None else damp
    A64, H = ldlq.check_hessian_inputs(A, H, damp)
    n, a = A64.shape
    base = nqlib.quantize(A64, rate, seed=seed, mode="fixed",
                          estimator=estimator, center=center,
                          normalize=normalize, rotate=rotate,
                          sketch=sketch)  # side information and options
    qm = matrix.QuantizedMatrix(
        shape=base.shape, rate=base.rate, method="nested", mode="trellis",
        flags=base.flags, seed=base.seed, alpha=1.0, means=base.means,
        norms=base.norms, payload={})
    n_pad = qm.n_pad
    total, keep = budget_plan(matrix._code_budget_bits(qm, PAYLOAD_HEADER_BYTES),
                              a, n_pad, sketch=sketch)
    Y = ldlq._coded_domain(A64, base)
    Hc = ldlq._coded_hessian(0.5 * (H + H.T), base)
    lay, L, beta = plan(Y, total, keep=keep, L=DEFAULT_L, seq_len=seq_len)
    per_col = lay.count // a
    cuts = np.concatenate((lay.starts[:per_col], [keep]))
    blocks = cuts if keep == n_pad else np.concatenate((cuts, [n_pad]))
    V = ldlq._feedback(Hc, float(damp), blocks)
    values = (beta * state_values(L)).astype(np.float32)
    U = Y.copy()
    C = np.zeros_like(Y)
    inputs = np.zeros(a * n_pad, dtype=np.uint8)
    table = quantile_table(TABLE_BITS)
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
                              DEFAULT_WINDOW, ib, np.zeros(a))
        # the block's own reconstruction, decoded from its streams
        offsets = np.concatenate(([0], np.cumsum(bits)[:-1]))
        stream = np.zeros(-(-int(bits.sum()) // 8) + 8, dtype=np.uint8)
        kern.pack_inputs(ib, starts, lengths, bits, offsets, stream)
        dec = np.zeros(a * T, dtype=np.float32)
        kern.decode_sequences(stream, starts, lengths, bits, offsets, L,
                              hash_multiplier(), HASH_SHIFT, TABLE_BITS, table,
                              beta, dec)
        C[:, c0:c1] = dec.reshape(a, T)
        inputs[(lay.starts[idx][:, None] + np.arange(T)).ravel()] = ib
        if c1 < n_pad:  # u_{>j} += eta_j R_jj^{-1} R_{j,>j}
            U[:, c1:] += (C[:, c0:c1] - U[:, c0:c1]) @ V[c0:c1, c1:]
    packed = np.zeros(-(-total // 8), dtype=np.uint8)
    kern.pack_inputs(inputs, lay.starts, lay.lengths, lay.bits, lay.offsets,
                     packed)
    qm.payload = dict(L=L, qbits=TABLE_BITS, seq_len=lay.seq_len, keep=keep,
                      beta=float(beta), total_bits=int(total), packed=packed)
    if qm.estimator == "mmse":
        Yc = matrix._project(C, qm)
        G = Yc @ Hc
        den = float((G * Yc).sum())
        qm.alpha = float(np.float32((G * Y).sum() / den)) if den > 0 else 1.0
    return qm
