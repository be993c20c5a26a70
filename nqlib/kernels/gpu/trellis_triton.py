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

Fused decode-matmul
-------------------
:func:`decode_matmul` computes ``x_rot @ raw.T`` (and the per-vector
epilogue of a linear layer) without writing ``raw`` anywhere: program
``(n, m)`` owns ``BLOCK_N`` coded vectors and ``BLOCK_M`` rows of
activations, and for each tile of ``BLOCK_K`` coordinates decodes the
``BLOCK_N x BLOCK_K`` weights in registers (:func:`_weight_tile`) and
multiplies them in, by one ``tl.dot`` (``BLOCK_M >= 16``, float32 inputs:
``input_precision="ieee"``) or by FMAs. Each weight is decoded on its own
from the stream: the sequence of coordinate ``k`` is ``i =
ceil((k + 1) per_col / keep) - 1`` (``per_col = ceil(keep / seq_len)``),
its first coordinate ``cut_i = floor(i keep / per_col)``, its stream
offset and bits follow from :class:`nqlib.quantizers.trellis.Layout`'s
rule (``floor(E B / (a keep))`` at its two ends), and the state is the
``L`` bits ending at ``P[t+1]``, read as two 32-bit big-endian windows
(the part before the stream's start wraps to its end). The decoded values
are :func:`_decode_kernel`'s (and numba's) bit for bit
(:func:`decode_rows` stores them for the tests).

Book: chapter "Beyond E8: trellis codes", label ``ch-trellis``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
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


# ------------------------------------------------------------ fused product
#: (BLOCK_M, BLOCK_N, BLOCK_K) of :func:`decode_matmul`: tl.dot tiles from
#: 16 rows of activations on, FMAs below
DOT_BLOCKS = (16, 64, 32)
FMA_BLOCKS = (4, 64, 32)


@triton.jit
def _read_bits(data_ptr, pos, n, nbytes):
    """``n`` (0..25) stream bits from bit ``pos`` (int64 tensors), most
    significant first; bytes past ``nbytes`` read as 0."""
    b = pos >> 3
    w = tl.zeros(pos.shape, dtype=tl.int64)
    for i in tl.static_range(4):
        at = b + i
        byte = tl.load(data_ptr + at, mask=at < nbytes, other=0).to(tl.int64)
        w = (w << 8) | byte
    one = tl.full(pos.shape, 1, dtype=tl.int64)
    return (w >> (32 - (pos & 7) - n)) & ((one << n) - 1)


@triton.jit
def _weight_tile(data_ptr, table_ptr, rn, kk, nbytes, A, keep, per_col,
                 total_bits, scale, mult, L: tl.constexpr, SHIFT: tl.constexpr,
                 QBITS: tl.constexpr):
    """The decoded weights (float32, ``[BLOCK_N, BLOCK_K]``) of the vectors
    ``rn`` (clamped to ``A - 1``) at the coordinates ``kk`` (0 from ``keep``
    on)."""
    k = tl.minimum(kk, keep - 1).to(tl.int64)
    i = ((k + 1) * per_col + keep - 1) // keep - 1
    c0 = i * keep // per_col
    T = (i + 1) * keep // per_col - c0
    t = k - c0
    row = tl.minimum(rn, A - 1).to(tl.int64)
    coded = A.to(tl.int64) * keep
    e0 = row[:, None] * keep + c0[None, :]
    off = e0 * total_bits // coded
    Bs = (e0 + T[None, :]) * total_bits // coded - off
    end = (t[None, :] + 1) * Bs // T[None, :]           # P[t+1], in 1..Bs
    lo_start = tl.maximum(end - L, 0)
    lo_n = end - lo_start
    hi_n = L - lo_n                                      # bits before the start
    hi = _read_bits(data_ptr, off + Bs - hi_n, hi_n, nbytes)
    lo = _read_bits(data_ptr, off + lo_start, lo_n, nbytes)
    state = (hi << lo_n) | lo
    m = mult.to(tl.uint64)
    h = (state.to(tl.uint64) * m) & 0xFFFFFFFF
    h = h ^ (h >> SHIFT)
    h = (h * m) & 0xFFFFFFFF
    idx = (h >> (32 - QBITS)).to(tl.int64)
    val = scale * tl.load(table_ptr + idx)
    return tl.where((kk < keep)[None, :], val, 0.0)


@triton.jit
def _decode_rows_kernel(data_ptr, table_ptr, out_ptr, nbytes, A, keep, per_col,
                        total_bits, scale, mult, L: tl.constexpr,
                        SHIFT: tl.constexpr, QBITS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    w = _weight_tile(data_ptr, table_ptr, rn, kk, nbytes, A, keep, per_col,
                     total_bits, scale, mult, L, SHIFT, QBITS)
    mask = (rn < A)[:, None] & (kk < keep)[None, :]
    tl.store(out_ptr + rn.to(tl.int64)[:, None] * keep + kk[None, :], w,
             mask=mask)


@triton.jit
def _decode_matmul_kernel(x_ptr, data_ptr, table_ptr, out_ptr, scale_ptr,
                          mean_ptr, xsum_ptr, bias_ptr, M, nbytes, A, keep,
                          per_col, total_bits, beta, mult, stride_x, stride_o,
                          L: tl.constexpr, SHIFT: tl.constexpr,
                          QBITS: tl.constexpr, EPILOGUE: tl.constexpr,
                          HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    n_ok = rn < A
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, keep, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        w = _weight_tile(data_ptr, table_ptr, rn, kk, nbytes, A, keep, per_col,
                         total_bits, beta, mult, L, SHIFT, QBITS)
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_x + kk[None, :],
                    mask=m_ok[:, None] & (kk < keep)[None, :], other=0.0)
        if USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if EPILOGUE:
        s = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)
        mu = tl.load(mean_ptr + rn, mask=n_ok, other=0.0)
        xs = tl.load(xsum_ptr + rm, mask=m_ok, other=0.0)
        acc = acc * s[None, :] + xs[:, None] * mu[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_o + rn[None, :], acc,
             mask=m_ok[:, None] & n_ok[None, :])


def _check_code(data, table, a, keep, seq_len, total_bits, L, qbits):
    if not (isinstance(data, torch.Tensor) and data.dtype == torch.uint8
            and data.ndim == 1 and data.is_contiguous()):
        raise ValueError("data must be a contiguous 1-D uint8 tensor (the "
                         "packed stream)")
    if data.numel() * 8 < total_bits:
        raise ValueError(f"data holds {data.numel()} bytes, the stream needs "
                         f"{-(-total_bits // 8)}")
    if not (isinstance(table, torch.Tensor) and table.dtype == torch.float32
            and table.shape == (1 << qbits,) and table.device == data.device):
        raise ValueError(f"table must be a float32 tensor of {1 << qbits} "
                         "entries on the stream's device")
    if min(a, keep, seq_len) < 1 or not 1 <= L <= 25:
        raise ValueError(f"bad code geometry: a={a}, keep={keep}, "
                         f"seq_len={seq_len}, L={L}")


def decode_rows(data, a, keep, seq_len, total_bits, L, mult, shift, qbits,
                table, beta):
    """The decoded vectors (a, keep) float32 of a trellis stream, by the
    fused kernel's own decoder (:func:`_weight_tile`): the values of
    :func:`decode_sequences` and of numba's decoder, bit for bit.

    ``data`` (uint8) is the packed stream, ``table`` the quantile table
    (float32, ``2^qbits`` entries), both on one device; ``beta`` a float32
    value; the other arguments are the payload's and the hash's integers.
    """
    _check_code(data, table, a, keep, seq_len, total_bits, L, qbits)
    per_col = -(-keep // seq_len)
    out = torch.empty((a, keep), dtype=torch.float32, device=data.device)
    bn, bk = 32, 64
    grid = (triton.cdiv(a, bn), triton.cdiv(keep, bk))
    _decode_rows_kernel[grid](
        data, table, out, data.numel(), a, keep, per_col, total_bits,
        float(np.float32(beta)), int(mult), L=int(L), SHIFT=int(shift),
        QBITS=int(qbits), BLOCK_N=bn, BLOCK_K=bk, enable_fp_fusion=False)
    return out


def decode_matmul(x_rot, data, a, keep, seq_len, total_bits, L, mult, shift,
                  qbits, table, beta, *, scale=None, means=None, xsum=None,
                  bias=None, blocks=None):
    """``x_rot @ raw.T`` for the trellis-coded vectors ``raw`` (a, n_pad),
    decoded in registers, never written; with ``scale``, the epilogue of a
    linear layer: ``scale_i <x_rot, raw_i> + mu_i xsum_m + bias_i``.

    Parameters
    ----------
    x_rot : torch.Tensor, shape (M, width)
        float32 rows in the coded domain (``width >= keep``; coordinates
        from ``keep`` on meet zeros), row-major, on the stream's device.
    data, table, a, keep, seq_len, total_bits, L, mult, shift, qbits, beta
        The code: as :func:`decode_rows`.
    scale : torch.Tensor of float32, shape (a,), optional
        Per-vector scales; turns the epilogue on (then ``means`` and
        ``xsum`` are required: float32, shapes (a,) and (M,); ``bias``
        optional, (a,)).
    blocks : tuple, optional
        ``(BLOCK_M, BLOCK_N, BLOCK_K)``; tl.dot from ``BLOCK_M >= 16``
        (:data:`DOT_BLOCKS`), FMAs below (:data:`FMA_BLOCKS`, the default
        up to 4 rows).

    Returns
    -------
    torch.Tensor, shape (M, a), float32
    """
    _check_code(data, table, a, keep, seq_len, total_bits, L, qbits)
    if not (isinstance(x_rot, torch.Tensor) and x_rot.dtype == torch.float32
            and x_rot.ndim == 2 and x_rot.shape[1] >= keep
            and x_rot.stride(1) == 1 and x_rot.device == data.device):
        raise ValueError(f"x_rot must be a float32 (M, >= {keep}) tensor with "
                         "contiguous rows on the stream's device")
    M = x_rot.shape[0]
    dev = data.device
    epilogue = scale is not None
    if epilogue:
        for name, t, n in (("scale", scale, a), ("means", means, a),
                           ("xsum", xsum, M)):
            if not (isinstance(t, torch.Tensor) and t.dtype == torch.float32
                    and t.shape == (n,) and t.device == dev):
                raise ValueError(f"{name} must be a float32 tensor of shape "
                                 f"({n},) on the stream's device")
        if bias is not None and not (isinstance(bias, torch.Tensor)
                                     and bias.dtype == torch.float32
                                     and bias.shape == (a,)
                                     and bias.device == dev):
            raise ValueError(f"bias must be a float32 tensor of shape ({a},) "
                             "on the stream's device")
    elif means is not None or xsum is not None or bias is not None:
        raise ValueError("means, xsum and bias need scale (the epilogue)")
    out = torch.empty((M, a), dtype=torch.float32, device=dev)
    if M == 0:
        return out
    bm, bn, bk = blocks or (DOT_BLOCKS if M > FMA_BLOCKS[0] else FMA_BLOCKS)
    use_dot = bm >= 16
    dummy = table
    grid = (triton.cdiv(a, bn), triton.cdiv(M, bm))
    _decode_matmul_kernel[grid](
        x_rot, data, table, out, scale if epilogue else dummy,
        means if epilogue else dummy, xsum if epilogue else dummy,
        bias if bias is not None else dummy, M, data.numel(), a, keep,
        -(-keep // seq_len), total_bits, float(np.float32(beta)), int(mult),
        x_rot.stride(0), out.stride(0), L=int(L), SHIFT=int(shift),
        QBITS=int(qbits), EPILOGUE=epilogue, HAS_BIAS=bias is not None,
        USE_DOT=use_dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        enable_fp_fusion=False)
    return out


# ------------------------------------------------------------ linear layers
@dataclass(eq=False)
class TrellisGpuLayout:
    """A trellis-mode weight on a device, as :func:`quant_linear` reads it:
    the stream (``data``, uint8), the quantile table, the per-vector scales
    ``alpha |a_i| / sqrt(n_pad)`` and means (float32; ``means`` None when
    the matrix is not centred), the rotation as ``(signs, O, p)`` float32
    tensors (None: no rotation) and the code's integers. Built by
    :meth:`nqlib.quantizers.trellis_layout.TrellisLayout.gpu_layout`."""

    shape: tuple
    n_pad: int
    keep: int
    seq_len: int
    total_bits: int
    L: int
    qbits: int
    beta: float
    mult: int
    shift: int
    data: torch.Tensor
    table: torch.Tensor
    scale: torch.Tensor
    means: torch.Tensor | None
    rotation: tuple | None

    @property
    def nbytes(self) -> int:
        """Device memory held by the layout's tensors."""
        ts = [self.data, self.table, self.scale]
        ts += [t for t in (self.means,) if t is not None]
        if self.rotation is not None:
            ts += list(self.rotation[:2])
        return int(sum(t.numel() * t.element_size() for t in ts))


def quant_linear(x, layout, bias=None):
    """``x @ W_hat.T + bias`` (float32, (M, a)) for the trellis weight
    ``layout`` (:class:`TrellisGpuLayout`, ``W_hat.T`` of shape (n, a)):
    the rows of ``x`` (M, n) are centred (when the matrix is), zero-padded
    and rotated, and meet the raw decoded vectors in the fused kernel,
    ``out_i = scale_i <x_rot, raw_i> + mu_i sum(x) + bias_i`` -- the
    decoder's projections (padding, mean direction) are invisible to such
    an ``x_rot``."""
    if not isinstance(layout, TrellisGpuLayout):
        raise ValueError(f"layout must be a TrellisGpuLayout, got "
                         f"{type(layout).__name__}")
    n, a = layout.shape
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != n:
        raise ValueError(f"x must be a tensor of shape (M, {n}), got "
                         f"{tuple(getattr(x, 'shape', ()))}")
    dev = layout.data.device
    xf = x.detach().to(device=dev, dtype=torch.float32)
    m = xf.shape[0]
    xsum = xf.sum(dim=1).contiguous()
    x_rot = torch.zeros((m, layout.n_pad), dtype=torch.float32, device=dev)
    centred = layout.means is not None
    x_rot[:, :n] = xf - xf.mean(dim=1, keepdim=True) if centred else xf
    if layout.rotation is not None and m:
        from nqlib.kernels.gpu.hadamard_triton import random_hadamard

        signs, O, p = layout.rotation
        x_rot = random_hadamard(x_rot, signs, O, p).contiguous()
    means = (layout.means if layout.means is not None
             else torch.zeros(a, dtype=torch.float32, device=dev))
    if bias is not None:
        bias = bias.detach().to(device=dev, dtype=torch.float32).contiguous()
    return decode_matmul(x_rot, layout.data, a, layout.keep, layout.seq_len,
                         layout.total_bits, layout.L, layout.mult, layout.shift,
                         layout.qbits, layout.table, layout.beta,
                         scale=layout.scale, means=means, xsum=xsum, bias=bias)
