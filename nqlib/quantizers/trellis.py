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

from nqlib.quantizers.payloads import TrellisPayload

__all__ = ["DEFAULT_L", "DEFAULT_SEQ_LEN", "DEFAULT_WINDOW", "TABLE_BITS",
           "MIN_L", "MAX_L", "MAX_K", "hash_multiplier", "quantile_table",
           "state_values", "Layout", "layout", "scale_grid", "plan", "encode",
           "decode", "decode_tensor", "budget_plan", "encode_matrix"]

#: state bits L of the default code. The Viterbi search costs O(2^L) per
#: entry and each bit buys up to 0.03 bit of gap (n = 4096, a = b = 256, R =
#: 1..6: L = 16 gives .065 .088 .094 .119 .135 .169, L = 15 .071 .090 .117
#: .135 .165 .201). 16 is the largest L whose 4096 x 4096 encode fits the
#: 5-minute budget on two cores: 129, 136 and 167 s at R = 2, 3, 4 on an
#: idle machine (250-304 s of CPU time over 2 threads); L = 17 doubles the
#: search (``benchmarks/trellis.py --rows``, ``--layer``, ``--sweep``,
#: ``--compare``; chapter ``ch-trellis``)
DEFAULT_L = 16
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
        """Number of sequences."""
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
    payload : TrellisPayload
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
    payload = TrellisPayload(L=L, qbits=TABLE_BITS, seq_len=lay.seq_len,
                             keep=lay.keep, beta=float(beta),
                             total_bits=int(total_bits), packed=packed)
    return payload, decode(payload, a, n_pad)


def decode(payload: TrellisPayload, a, n_pad) -> np.ndarray:
    """The decoded vectors (a, n') of a trellis payload (float64; entries
    past ``keep`` are 0)."""
    from nqlib.kernels.cpu import trellis as kern

    p = payload
    lay = layout(a, n_pad, p.keep, p.total_bits, p.seq_len)
    out = np.zeros(a * n_pad, dtype=np.float32)
    data = np.zeros(p.packed.size + 8, dtype=np.uint8)
    data[:p.packed.size] = p.packed
    kern.decode_sequences(data, lay.starts, lay.lengths, lay.bits, lay.offsets,
                          p.L, hash_multiplier(), HASH_SHIFT, p.qbits,
                          quantile_table(p.qbits), np.float32(p.beta), out)
    return out.reshape(a, n_pad).astype(np.float64)


def decode_tensor(payload: TrellisPayload, a, n_pad, device="cuda"):
    """The decoded vectors (a, n') of a trellis payload as a float32 torch
    tensor on ``device``, decoded there by the Triton kernel (entries past
    ``keep`` are 0): the values of :func:`decode` before its float64 cast,
    bit for bit. ``device`` is a CUDA device, or any device under the
    Triton interpreter."""
    import torch

    from nqlib.kernels.gpu import trellis_triton

    p = payload
    lay = layout(a, n_pad, p.keep, p.total_bits, p.seq_len)

    def dev(arr, dtype):
        return torch.from_numpy(np.array(arr, dtype=dtype)).to(device)  # a copy

    out = torch.zeros(a * n_pad, dtype=torch.float32, device=device)
    trellis_triton.decode_sequences(
        dev(p.packed, np.uint8), dev(lay.starts, np.int64),
        dev(lay.lengths, np.int64), dev(lay.bits, np.int64),
        dev(lay.offsets, np.int64), p.L, hash_multiplier(), HASH_SHIFT, p.qbits,
        dev(quantile_table(p.qbits), np.float32), p.beta, out)
    return out.reshape(a, n_pad)


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
