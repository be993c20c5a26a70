"""Triton decoder of the bitshift trellis code (``mode="trellis"``).

Every weight decodes on its own: step ``t`` of a sequence of ``T`` weights
and ``Bs`` stream bits (at stream bit ``off``) has the state made of the
``L`` stream bits that end at bit ``floor((t+1) Bs / T)``, read circularly
(modulo ``Bs``, the tail-biting stream), most significant first. The weight
is ``scale * table[hash(state) >> (32 - qbits)]`` with the multiplicative
hash of :func:`nqlib.kernels.cpu.trellis.state_index` -- the same integer
operations and the same float32 product as the numba decoder
:func:`nqlib.kernels.cpu.trellis.decode_sequences`, so the two agree bit
for bit.

Layout: program ``(j, b)`` decodes steps ``b BLOCK .. (b+1) BLOCK - 1`` of
sequence ``j``; the state is gathered one stream bit at a time (``L``
byte loads per weight). This is the plain, obviously-equal version: a
register-resident bit window would be the fast one.

Book: chapter "Beyond E8: trellis codes", label ``ch-trellis``.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

#: steps decoded per program
BLOCK = 256


@triton.jit
def _decode_kernel(
    data_ptr,             # uint8 stream
    starts_ptr,           # int64 (N,): first output index of each sequence
    lengths_ptr,          # int64 (N,): T, weights per sequence
    bits_ptr,             # int64 (N,): Bs, stream bits per sequence
    offsets_ptr,          # int64 (N,): first stream bit of each sequence
    table_ptr,            # float32 (2^qbits,): the quantile table
    out_ptr,              # float32 output, flat (a n')
    scale,                # float32 beta
    mult,                 # the hash multiplier (< 2^32)
    L: tl.constexpr,      # state bits
    SHIFT: tl.constexpr,  # the hash's xor-shift
    QBITS: tl.constexpr,  # table index bits
    BLOCK: tl.constexpr,  # steps per program
):
    j = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    T = tl.load(lengths_ptr + j)
    Bs = tl.load(bits_ptr + j)
    off = tl.load(offsets_ptr + j)
    first = tl.load(starts_ptr + j)
    mask = t < T
    end = ((t + 1) * Bs) // T
    state = tl.zeros([BLOCK], dtype=tl.int64)
    for i in tl.static_range(L):
        pos = off + (end - L + i + Bs) % Bs
        byte = tl.load(data_ptr + (pos >> 3), mask=mask, other=0).to(tl.int64)
        state = state * 2 + ((byte >> (7 - (pos & 7))) & 1)
    m = mult.to(tl.uint64)
    h = (state.to(tl.uint64) * m) & 0xFFFFFFFF
    h = h ^ (h >> SHIFT)
    h = (h * m) & 0xFFFFFFFF
    idx = (h >> (32 - QBITS)).to(tl.int64)
    val = scale * tl.load(table_ptr + idx, mask=mask, other=0.0)
    tl.store(out_ptr + first + t, val, mask=mask)


def decode_sequences(data, starts, lengths, bits, offsets, L, mult, shift,
                     qbits, table, beta, out):
    """Decode every trellis sequence into ``out``; the arguments and results
    of the numba kernel :func:`nqlib.kernels.cpu.trellis.decode_sequences`.

    Parameters
    ----------
    data : torch.Tensor of uint8
        The packed stream.
    starts, lengths, bits, offsets : torch.Tensor of int64, shape (N,)
        Per sequence: first output index, weights ``T``, stream bits ``Bs``
        and first stream bit.
    L : int
        State bits.
    mult, shift : int
        The hash multiplier (< 2^32) and its xor-shift.
    qbits : int
        Index bits of the quantile table.
    table : torch.Tensor of float32, shape (2**qbits,)
        The quantile table.
    beta : float
        The scale, a float32 value.
    out : torch.Tensor of float32
        Flat output; entries no sequence covers are left as they are.

    Notes
    -----
    Every tensor is contiguous and on one device (CUDA, or any device under
    the Triton interpreter). Returns None.
    """
    count = starts.shape[0]
    if count == 0:
        return
    grid = (count, triton.cdiv(int(lengths.max()), BLOCK))
    _decode_kernel[grid](
        data, starts, lengths, bits, offsets, table, out, float(np.float32(beta)),
        int(mult), L=int(L), SHIFT=int(shift), QBITS=int(qbits), BLOCK=BLOCK,
        enable_fp_fusion=False)
