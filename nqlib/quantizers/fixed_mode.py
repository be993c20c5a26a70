"""``mode="fixed"``: one fixed-length word per 8-block, from a union of E8
Voronoi codes at a few scales (:mod:`nqlib.quantizers.fixed` designs them).

The budget is met by time sharing between two designed codes on the lower
envelope of their distortion-rate points: ``L_hi`` bits for the first ``h``
blocks of every rotated vector, ``L_lo`` bits -- or nothing, when
sketching -- for the rest. Every block is coded alone, so a word can be
decoded without its neighbours (random access; the layout the CPU and GPU
kernels read).

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

import math

import numpy as np

from nqlib.quantizers.coded_domain import Encoding, dither, rows_per_chunk
from nqlib.quantizers.fixed import fixed_code
from nqlib.quantizers.format import FIXED_PAYLOAD_BYTES
from nqlib.quantizers.payloads import FixedPart, FixedPayload
from nqlib.quantizers.rate_control import RATE_TOLERANCE, code_budget_bits

__all__ = ["plan", "part_for", "encode", "decode", "encode_part", "fixed_part_codes",
           "decode_part"]


def encode_part(blocks, z, L, backend, packed=None, dec=None) -> FixedPart:
    """Encode rows of ``blocks`` (rows, 8) with the designed ``L``-bit code.

    The words are packed into ``packed`` when given (zeroed bytes,
    ``ceil(rows L / 8)`` of them: a slice of a larger part that starts on a
    byte). With a ``dec`` array (rows, 8), the decoded rows are written into
    it too (the decoder's bits). ``z``: the dither rows, or one zero row.
    """
    from nqlib.kernels.cpu import nested as kern

    code = fixed_code(L)
    betas = np.array(code.betas, dtype=np.float32)
    b64 = betas.astype(np.float64)
    nb = blocks.shape[0]
    if backend == "numpy":
        from nqlib.reference.nested import encode_multiscale

        codes, index, _ = encode_multiscale(blocks, code.q, b64, z)
        if dec is not None:
            kern.decode_multiscale_rows(codes, index, code.q, b64, z, dec)
    else:  # encode, words and packing in one compiled call
        if packed is None:
            packed = np.zeros(-(-nb * L // 8), dtype=np.uint8)
        kern.encode_pack_rows(blocks, code.q, b64, z, L, packed,
                              np.empty((0, 8)) if dec is None else dec)
        return FixedPart(L=L, q=code.q, betas=betas, packed=packed)
    words = np.empty(nb, dtype=np.uint64)
    kern.mixed_radix_words(codes, index, code.q, words)
    if packed is None:
        packed = np.zeros(-(-nb * L // 8), dtype=np.uint8)
    kern.pack_words(words, L, packed)
    return FixedPart(L=L, q=code.q, betas=betas, packed=packed)


def plan(qm, sketch, stream=False):
    """``(h, L_hi, L_lo)`` for ``qm`` (its shape, flags and rate): the first
    ``h`` blocks of every vector get ``L_hi``-bit words, the others
    ``L_lo``-bit words (0: dropped, when ``sketch``); ValueError when the
    rate cannot be met. ``stream``: the rate is a stream's
    (:func:`~nqlib.quantizers.rate_control.code_budget_bits`; the plan is
    then part of the stream's configuration, not of what a call sends)."""
    from nqlib.quantizers.ratecurve import fixed_plan

    n_pad, a = qm.n_pad, qm.shape[1]
    B = n_pad // 8
    budget = code_budget_bits(qm, 0 if stream else FIXED_PAYLOAD_BYTES,
                              slack=RATE_TOLERANCE, stream=stream)
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
    return h, L_hi, L_lo


def part_for(count, L) -> FixedPart:
    """An ``L``-bit part of ``count`` words, its bytes zeroed (empty when
    either is 0)."""
    if L == 0 or count == 0:
        return FixedPart.empty()
    code = fixed_code(L)
    return FixedPart(L=L, q=code.q, betas=np.array(code.betas, np.float32),
                     packed=np.zeros(-(-count * L // 8), np.uint8))


def encode(qm, Y, backend, sketch, stream=False) -> Encoding:
    """Fixed-length words per 8-block of the coded rows ``Y`` (a, n_pad) of
    ``qm`` (see the module's description); ``stream`` as in :func:`plan`."""
    a, n_pad = Y.shape
    B = n_pad // 8
    h, L_hi, L_lo = plan(qm, sketch, stream)
    blocks = Y.reshape(a, B, 8)
    zb = (dither(qm.seed, n_pad, a, a * B, qm.dither_key).reshape(a, B, 8)
          if qm.dither else None)

    payload = FixedPayload(h=h, hi=part_for(a * h, L_hi),
                           lo=part_for(a * (B - h), L_lo))
    # The blocks are coded a chunk of vectors at a time (8k of them: each
    # chunk's words start on a byte of its part). Every block is coded alone,
    # so the words are those of one pass over all the blocks. The chunks are
    # coded when the MMSE pass asks for their reconstruction (raw_rows, in
    # order), so that no full-size decoded matrix is ever held; finish()
    # codes whatever it did not ask for.
    step = rows_per_chunk(n_pad)
    cursor = [0]

    def encode_rows(r0, r1, dec):
        for _, c, sl in payload.part_ranges(B):
            width = sl.stop - sl.start
            if c.L == 0 or width == 0:
                continue
            rows = np.ascontiguousarray(blocks[r0:r1, sl].reshape(-1, 8))
            z = (np.zeros((1, 8)) if zb is None
                 else np.ascontiguousarray(zb[r0:r1, sl].reshape(-1, 8)))
            L = c.L
            packed = c.packed[r0 * width * L // 8:-(-r1 * width * L // 8)]
            d = None if dec is None else np.empty((rows.shape[0], 8))
            encode_part(rows, z, L, backend, packed, d)
            if dec is not None:
                dec[:, sl] = d.reshape(r1 - r0, width, 8)

    def raw_rows(r0, r1):
        if r0 != cursor[0]:  # pragma: no cover - guards the chunk protocol
            raise RuntimeError("fixed-mode chunks must be coded in order")
        out = np.zeros((r1 - r0, B, 8))  # dropped blocks stay 0
        encode_rows(r0, r1, out)
        cursor[0] = r1
        return out.reshape(r1 - r0, n_pad)

    def finish():
        for r0 in range(cursor[0], a, step):
            encode_rows(r0, min(a, r0 + step), None)
        cursor[0] = a

    return Encoding(payload, raw_rows, finish)


def fixed_part_codes(part: FixedPart, count, start=0):
    """Codes (count, 8) and scale indices (count,) of the blocks ``start ..
    start + count - 1`` of one fixed-mode payload part (``start * L`` a
    multiple of 8 bits); ``ValueError`` when a word is out of range
    (corruption)."""
    from nqlib.kernels.cpu import nested as kern

    L = part.L
    first_byte = start * L // 8
    data = part.packed[first_byte:first_byte + -(-count * L // 8)]
    words = np.empty(count, dtype=np.uint64)
    kern.unpack_words(np.ascontiguousarray(data), L, count, words)
    codes = np.empty((count, 8), dtype=np.int64)
    index = np.empty(count, dtype=np.int64)
    kern.split_mixed_radix(words, part.q, codes, index)
    if count and (codes.max() >= part.q or index.max() >= len(part.betas)):
        raise ValueError("corrupted fixed-mode payload (code out of range)")
    return codes, index


def decode_part(part: FixedPart, count, z) -> np.ndarray:
    """The decoded blocks (count, 8) of one part (``z``: its dither rows,
    or one zero row)."""
    from nqlib.kernels.cpu import nested as kern

    codes, index = fixed_part_codes(part, count)
    out = np.empty((count, 8))
    kern.decode_multiscale_rows(codes, index, part.q,
                                part.betas.astype(np.float64), z, out)
    return out


def decode(qm) -> np.ndarray:
    """Raw decoded vectors (a, n_pad) of a fixed-mode matrix (no projection,
    no shrinkage); blocks of an empty part decode to 0."""
    n, a = qm.shape
    n_pad = qm.n_pad
    B = n_pad // 8
    zb = None
    if qm.dither:
        zb = dither(qm.seed, n_pad, a, a * B, qm.dither_key,
                    qm.version).reshape(a, B, 8)
    out = np.zeros((a, B, 8))
    for _, c, sl in qm.payload.part_ranges(B):
        count = a * (sl.stop - sl.start)
        if c.L == 0 or count == 0:
            continue
        zz = (np.ascontiguousarray(zb[:, sl].reshape(-1, 8)) if zb is not None
              else np.zeros((1, 8)))
        out[:, sl] = decode_part(c, count, zz).reshape(a, -1, 8)
    return out.reshape(a, n_pad)
