"""Triton fast Walsh--Hadamard transform over rows, and the randomised
Hadamard rotation in torch.

The Sylvester Hadamard matrix of order ``2^k`` is ``H = H_2 ⊗ ... ⊗ H_2``
(``H_2 = [[1, 1], [1, -1]]``); ``H x`` takes ``k`` butterfly stages. Stage
``h = 1, 2, 4, ..., 2^(k-1)`` replaces every pair ``(x_j, x_(j+h))``, ``j``
with bit ``h`` clear, by ``(x_j + x_(j+h), x_j - x_(j+h))``; the scale is
applied once, at the end. This is the order of the numba kernel
:func:`nqlib.kernels.cpu.hadamard.fwht_rows`: every output is produced by
the same additions in the same order, so float64 rows give the same bits as
numba, float32 rows the float32 rounding of the same sums, and dyadic data
(exactly representable sums) the same values in any precision.

Layout: one program owns ``BLOCK_M`` rows of length ``N`` as a
``[BLOCK_M, N]`` register tile. A stage views the tile as
``[BLOCK_M, N / 2h, 2, h]`` (the middle axis of size 2 selects the partner),
splits it into the two halves, and joins the sums and differences back.
Rows longer than ``MAX_TILE`` are transformed in passes: ``H_(ab) =
H_a ⊗ H_b``, and the stages of ``H_b`` (on contiguous chunks of length
``b``) come first in the butterfly order, then those of ``H_a`` (on the
strided ``a``-axis), so passes keep the order and the bits.

Book: chapter "Kernels: CPU and GPU", label ``ch-kernels``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nqlib.kernels.gpu.lattice_triton import FLOATS, check_rows

#: Longest row transformed in one pass (a [BLOCK_M, N] tile in registers:
#: 8192 float32 values are 64 per thread at 4 warps).
MAX_TILE = 8192
#: Elements per program; BLOCK_M = max(1, TILE // N).
TILE = 4096


@triton.jit
def _fwht_kernel(
    x_ptr,                  # (M, N) float32 or float64, row-major, in place
    scale_ptr,              # (1,) same dtype as x: factor applied at the end
    M,                      # number of rows
    N: tl.constexpr,        # row length, a power of two
    LOG_N: tl.constexpr,    # log2(N): number of butterfly stages
    BLOCK_M: tl.constexpr,  # rows per program
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, N)
    offs = rows[:, None] * N + cols[None, :]
    mask = (rows < M)[:, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(LOG_N):
        # stage h = 2^s: column j = 2h g + h t + i -> axes (g, t, i), and
        # t (the bit of weight h) picks the partner
        v = tl.reshape(x, [BLOCK_M, N // (2 << s), 2, 1 << s])
        a, b = tl.split(tl.permute(v, [0, 1, 3, 2]))      # t = 0, t = 1
        v = tl.permute(tl.join(a + b, a - b), [0, 1, 3, 2])
        x = tl.reshape(v, [BLOCK_M, N])
    x = x * tl.load(scale_ptr)
    tl.store(x_ptr + offs, x, mask=mask)


_SCALES: dict = {}


def _scale_tensor(scale, dtype, device):
    """``scale`` as a one-element tensor on the device, made once per
    (scale, dtype, device): later launches copy nothing from the host, so
    they can be captured in a CUDA graph."""
    key = (float(scale), dtype, str(device))
    t = _SCALES.get(key)
    if t is None:
        t = _SCALES[key] = torch.tensor([scale], dtype=dtype, device=device)
    return t


def _launch(rows, scale):
    """One pass on contiguous (m, n) rows, n <= MAX_TILE a power of two."""
    m, n = rows.shape
    block_m = max(1, TILE // n)
    scale_t = _scale_tensor(scale, rows.dtype, rows.device)
    grid = (triton.cdiv(m, block_m),)
    _fwht_kernel[grid](rows, scale_t, m, N=n, LOG_N=n.bit_length() - 1,
                       BLOCK_M=block_m, num_warps=4 if n <= 2048 else 8,
                       enable_fp_fusion=False)


def fwht_rows(x, scale, *, max_tile=MAX_TILE):
    """In place: every row of ``x`` (m, 2^k) becomes ``scale * H x_row``.

    Same contract and butterfly order as the numba kernel of the same name.
    ``x`` is a contiguous float32 or float64 tensor on a CUDA device (any
    device under the Triton interpreter); ``scale`` is rounded once to x's
    dtype. Rows longer than ``max_tile`` go in passes of at most ``max_tile``
    (a power of two). Returns None.
    """
    n = x.shape[-1] if isinstance(x, torch.Tensor) and x.ndim else 0
    check_rows(x, "x", n, FLOATS)
    if n < 1 or n & (n - 1):
        raise ValueError(f"row length must be a power of two, got {n}")
    if max_tile < 1 or max_tile & (max_tile - 1):
        raise ValueError(f"max_tile must be a power of two, got {max_tile}")
    m = x.shape[0]
    if m == 0 or n == 1:
        x.mul_(torch.tensor(scale, dtype=x.dtype))
        return
    if n <= max_tile:
        _launch(x, scale)
        return
    # H_n = H_a ⊗ H_b with b = max_tile: first the stages inside the
    # contiguous chunks of length b, then H_a along the strided axis
    b = max_tile
    a = n // b
    _launch(x.view(m * a, b), 1.0)
    t = x.view(m, a, b).transpose(1, 2).contiguous().view(m * b, a)
    fwht_rows(t, scale, max_tile=max_tile)
    x.copy_(t.view(m, b, a).transpose(1, 2).reshape(m, n))


def random_hadamard(x, signs, orthogonal, power_of_two, inverse=False):
    """The rotation ``P = (H_p / sqrt(p)) ⊗ O_m · diag(signs)`` of
    :class:`nqlib.RandomHadamard` (or ``P^T`` when ``inverse``) on the rows
    of ``x``.

    Parameters
    ----------
    x : torch.Tensor, shape (r, n)
        float32 or float64 rows, on a CUDA device (any device under the
        Triton interpreter); not modified.
    signs : torch.Tensor, shape (n,)
        The +-1 signs, x's dtype and device.
    orthogonal : torch.Tensor, shape (m, m)
        The odd factor ``O_m``, x's dtype and device.
    power_of_two : int
        ``p``, with ``n = p m``.
    inverse : bool
        Apply ``P^T`` instead of ``P``.

    Returns
    -------
    torch.Tensor, shape (r, n)
        A new tensor of x's dtype. The operations are those of the numba
        backend (signs, then ``O_m`` along the ``m``-axis, then the Hadamard
        transform along the ``p``-axis; reversed for the inverse), so float64
        results agree with it to the round-off of the ``O_m`` product (bit
        for bit when ``m = 1``).

    Notes
    -----
    Book: chapter "Kernels: CPU and GPU", label ``ch-kernels``.
    """
    r, n = x.shape
    p = int(power_of_two)
    m = n // p
    rows = x.clone() if inverse else x * signs
    if m > 1:
        O = orthogonal.T if inverse else orthogonal
        rows = (rows.reshape(r * p, m) @ O.T).reshape(r, n)
    if p > 1:
        t = rows.reshape(r, p, m).transpose(1, 2).contiguous().reshape(r * m, p)
        fwht_rows(t, 1.0 / math.sqrt(p))
        rows = t.reshape(r, m, p).transpose(1, 2).reshape(r, n)
    if inverse:
        rows = rows * signs
    return rows.contiguous()
