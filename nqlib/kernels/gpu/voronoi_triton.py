"""Triton Voronoi-code encoder and decoder, plus their launchers.

The kernels reproduce :func:`nqlib.kernels.cpu.lattice.encode_rows` /
``decode_rows`` (and their E8 versions) bit for bit, under the arithmetic
contract of :mod:`nqlib.reference.lattices` (float64 throughout, launched
with ``enable_fp_fusion=False``):

    encode:  v = x / beta + z,  t = Q(v),  k = round(G^-1 t),  c = k mod q,
             overload  <=>  round(G^-1 Q((G c) / q)) * q != c - k  (int64)
    decode:  y = G c,  out = beta * ((y - q * Q(y / q)) - z)

``k mod q`` is the float formula of the numba kernels,
``k - q * floor(k / q)``. Products with ``G`` and ``G^-1`` are written as the
numba kernels write them:

* E8: the explicit suffix-sum formulas of the basis of
  :func:`nqlib.lattices.E8` (every term a half-integer, so exact);
* Z^n: ``G = G^-1 = I``, so ``G^-1 t = t`` and ``G c = c`` exactly (the
  generic product adds only signed zeros, which the rounding and the
  non-negative codes cannot see); no loop over the dimension;
* D_n, A2: the generic product, ``s_j = G[j, 0] u_0``, then
  ``s_j = s_j + G[j, i] u_i`` for ``i = 1 .. N-1`` in index order: one
  rank-1 update of a [BLOCK_M, DP] tile per column of the input tile.

Tile layout, masking and the closest-point step are those of
:mod:`nqlib.kernels.gpu.lattice_triton`. ``beta`` travels in the float64
``consts`` tensor (a Python float kernel argument would be float32).

Book: ``ch-voronoi`` (the code); the GPU-kernels chapter (planned) describes
the layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nqlib.kernels.gpu.lattice_triton import (
    A2,
    CONST_BETA,
    CONST_SQRT3,
    DN,
    E8,
    FLOATS,
    KIND_E8,
    KIND_ZN,
    ZN,
    as_kernel_floats,
    check_rows,
    closest_point_tile,
    column,
    constants,
    put_column,
    round_half_up,
    tile_shape,
)

#: Integer dtypes the decoder reads codes from.
CODE_DTYPES = tuple(
    getattr(torch, name)
    for name in ("uint8", "int8", "int16", "uint16", "int32", "uint32", "int64")
    if hasattr(torch, name)
)


# ----------------------------------------------------------------- helpers
@triton.jit
def _matvec_in_order(m_ptr, u, cols, N: tl.constexpr):
    """Rows of ``M u`` for the row-major float64 (N, N) matrix at ``m_ptr``:
    ``s_j = M[j, 0] u_0 + M[j, 1] u_1 + ...``, summed in index order."""
    inside = cols < N
    s = tl.load(m_ptr + cols * N, mask=inside, other=0.0)[None, :] * \
        column(u, cols, 0)[:, None]
    for i in tl.static_range(1, N):
        m_i = tl.load(m_ptr + cols * N + i, mask=inside, other=0.0)
        s = s + m_i[None, :] * column(u, cols, i)[:, None]
    return s


@triton.jit
def _coordinates(t, cols, ginv_ptr, KIND: tl.constexpr, N: tl.constexpr):
    """Integer coordinates ``round(G^-1 t)`` of the lattice points ``t``,
    as integer-valued float64."""
    if KIND == KIND_ZN:
        k = t
    elif KIND == KIND_E8:
        # k_j = round(t_j + ... + t_6 - (7 - j) t_7), j = 6 .. 1;
        # k_0 = round((t_0 + ... + t_6 - 7 t_7) / 2); k_7 = round(2 t_7)
        t7 = column(t, cols, 7)
        k = put_column(tl.zeros_like(t), cols, 7, round_half_up(2.0 * t7))
        s = column(t, cols, 6)
        k = put_column(k, cols, 6, round_half_up(s - t7))
        for i in tl.static_range(5):
            j = 5 - i
            s = s + column(t, cols, j)
            k = put_column(k, cols, j, round_half_up(s - (7 - j) * t7))
        k0 = round_half_up(((s + column(t, cols, 0)) - 7.0 * t7) * 0.5)
        k = put_column(k, cols, 0, k0)
    else:
        k = round_half_up(_matvec_in_order(ginv_ptr, t, cols, N))
    return k


@triton.jit
def _point(c, cols, g_ptr, KIND: tl.constexpr, N: tl.constexpr):
    """Lattice points ``G c`` of the integer-valued float64 coordinates c."""
    if KIND == KIND_ZN:
        y = c
    elif KIND == KIND_E8:
        # y_0 = (2 c_0 - c_1) + h, y_j = (c_j - c_{j+1}) + h (j = 1..5),
        # y_6 = c_6 + h, y_7 = h, with h = c_7 / 2
        h = 0.5 * column(c, cols, 7)
        nxt = column(c, cols, 1)
        y = put_column(tl.zeros_like(c), cols, 0,
                        (2.0 * column(c, cols, 0) - nxt) + h)
        for j in tl.static_range(1, 6):
            cur = nxt
            nxt = column(c, cols, j + 1)
            y = put_column(y, cols, j, (cur - nxt) + h)
        y = put_column(y, cols, 6, nxt + h)
        y = put_column(y, cols, 7, h)
    else:
        y = _matvec_in_order(g_ptr, c, cols, N)
    return y


# ----------------------------------------------------------------- kernels
@triton.jit
def _encode_kernel(
    x_ptr,          # (M, N) float32 or float64, row-major: vectors to encode
    z_ptr,          # (1, N) or (M, N) float64, row-major: dither
    g_ptr,          # (N, N) float64, row-major: generator G (basis = columns)
    ginv_ptr,       # (N, N) float64, row-major: G^-1
    consts_ptr,     # (2,) float64: sqrt(3), beta
    codes_ptr,      # (M, N) integer, row-major: codes in [0, q)
    overload_ptr,   # (M,) bool: overload flags
    M,              # number of rows
    q,              # nesting ratio (integer >= 2)
    z_row_stride,   # 0 (one dither for all rows) or N (one per row)
    KIND: tl.constexpr,     # ZN, DN, E8 or A2
    N: tl.constexpr,        # lattice dimension
    DP: tl.constexpr,       # N rounded up to a power of two
    BLOCK_M: tl.constexpr,  # rows per program
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, DP)
    inside = (cols < N)[None, :]
    row_ok = rows < M
    mask = row_ok[:, None] & inside
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    z = tl.load(z_ptr + rows[:, None] * z_row_stride + cols[None, :], mask=mask,
                other=0.0)
    sqrt3 = tl.load(consts_ptr + CONST_SQRT3)
    beta = tl.load(consts_ptr + CONST_BETA)
    qf = q.to(tl.float64)

    t = closest_point_tile(x / beta + z, cols, sqrt3, KIND, N)
    k = _coordinates(t, cols, ginv_ptr, KIND, N)
    c = k - qf * tl.floor(k / qf)
    # the decoder will see y = G c and return y - q Q(y / q): it returns t
    # iff Q(y / q) = G (c - k) / q, compared in integer coordinates
    u = closest_point_tile(_point(c, cols, g_ptr, KIND, N) / qf, cols, sqrt3, KIND, N)
    uk = _coordinates(u, cols, ginv_ptr, KIND, N)
    ci = c.to(tl.int64)
    bad = (uk.to(tl.int64) * q != ci - k.to(tl.int64)) & inside
    overload = tl.max(bad.to(tl.int32), axis=1) > 0

    tl.store(codes_ptr + offs, ci.to(codes_ptr.dtype.element_ty), mask=mask)
    tl.store(overload_ptr + rows, overload, mask=row_ok)


@triton.jit
def _decode_kernel(
    codes_ptr,      # (M, N) integer, row-major: codes in [0, q)
    z_ptr,          # (1, N) or (M, N) float64, row-major: dither
    g_ptr,          # (N, N) float64, row-major: generator G (basis = columns)
    consts_ptr,     # (2,) float64: sqrt(3), beta
    out_ptr,        # (M, N) float32 or float64, row-major: decoded vectors
    M,              # number of rows
    q,              # nesting ratio (integer >= 2)
    z_row_stride,   # 0 (one dither for all rows) or N (one per row)
    KIND: tl.constexpr,     # ZN, DN, E8 or A2
    N: tl.constexpr,        # lattice dimension
    DP: tl.constexpr,       # N rounded up to a power of two
    BLOCK_M: tl.constexpr,  # rows per program
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, DP)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    c = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float64)
    z = tl.load(z_ptr + rows[:, None] * z_row_stride + cols[None, :], mask=mask,
                other=0.0)
    sqrt3 = tl.load(consts_ptr + CONST_SQRT3)
    beta = tl.load(consts_ptr + CONST_BETA)
    qf = q.to(tl.float64)

    y = _point(c, cols, g_ptr, KIND, N)
    u = closest_point_tile(y / qf, cols, sqrt3, KIND, N)
    out = beta * ((y - qf * u) - z)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------- launchers
def _check_common(kind, q, beta, z, G, n, device):
    if kind not in (ZN, DN, E8, A2):
        raise ValueError(f"unknown lattice kind {kind!r}")
    if kind == E8 and n != 8 or kind == A2 and n != 2 or kind == DN and n < 2:
        raise ValueError(f"lattice kind {kind} does not have dimension {n}")
    if isinstance(q, bool) or not isinstance(q, int) or q < 2:
        raise ValueError(f"q must be an integer >= 2, got {q!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    check_rows(z, "z", n, (torch.float64,), device)
    check_rows(G, "G", n, (torch.float64,), device)
    if G.shape[0] != n:
        raise ValueError(f"G must have shape ({n}, {n}), got {tuple(G.shape)}")


def _z_row_stride(z, m, n):
    if z.shape[0] == 1:
        return 0
    if z.shape[0] != m:
        raise ValueError(f"z must have 1 or {m} rows, got {z.shape[0]}")
    return n


def encode_rows(kind, x, q, beta, z, G, Ginv, codes, overload):
    """Voronoi-encode every row of ``x`` (m, n); same contract and results as
    the numba kernel of the same name.

    ``x``: float32/float64 (m, n); ``z``: float64 (1, n) or (m, n) dither;
    ``G``, ``Ginv``: float64 (n, n); ``codes``: integer (m, n) output;
    ``overload``: bool (m,) output. All contiguous, on one CUDA device (any
    device under the Triton interpreter). Returns None.
    """
    n = x.shape[-1] if isinstance(x, torch.Tensor) and x.ndim else 0
    check_rows(x, "x", n, FLOATS)
    dev = x.device
    _check_common(kind, q, beta, z, G, n, dev)
    check_rows(Ginv, "Ginv", n, (torch.float64,), dev)
    check_rows(codes, "codes", n, CODE_DTYPES, dev)
    m = x.shape[0]
    if codes.shape[0] != m:
        raise ValueError(f"codes must have shape {tuple(x.shape)}, got "
                         f"{tuple(codes.shape)}")
    if not (isinstance(overload, torch.Tensor) and overload.dtype == torch.bool
            and overload.shape == (m,) and overload.is_contiguous()
            and overload.device == dev):
        raise ValueError(f"overload must be a contiguous bool tensor of shape "
                         f"({m},) on {dev}")
    if q - 1 > torch.iinfo(codes.dtype).max:
        raise ValueError(f"codes dtype {codes.dtype} cannot hold values up to "
                         f"q - 1 = {q - 1}")
    stride = _z_row_stride(z, m, n)
    if m == 0:
        return
    dp, block_m = tile_shape(n)
    grid = (triton.cdiv(m, block_m),)
    _encode_kernel[grid](
        x, z, G, Ginv, constants(dev, beta), codes, overload, m, q, stride,
        KIND=kind, N=n, DP=dp, BLOCK_M=block_m, enable_fp_fusion=False)


def decode_rows(kind, codes, q, beta, z, G, out):
    """Voronoi-decode every row of ``codes`` (m, n) into ``out`` (m, n); same
    contract and results as the numba kernel of the same name (``out`` may be
    float32: the float64 result is rounded to nearest once).

    ``codes``: integer (m, n), values in [0, q) (not checked here);
    ``z``: float64 (1, n) or (m, n); ``G``: float64 (n, n). All contiguous, on
    one CUDA device (any device under the Triton interpreter). Returns None.
    """
    n = codes.shape[-1] if isinstance(codes, torch.Tensor) and codes.ndim else 0
    check_rows(codes, "codes", n, CODE_DTYPES)
    dev = codes.device
    _check_common(kind, q, beta, z, G, n, dev)
    check_rows(out, "out", n, FLOATS, dev)
    m = codes.shape[0]
    if out.shape[0] != m:
        raise ValueError(f"out must have shape {tuple(codes.shape)}, got "
                         f"{tuple(out.shape)}")
    stride = _z_row_stride(z, m, n)
    if m == 0:
        return
    dp, block_m = tile_shape(n)
    grid = (triton.cdiv(m, block_m),)
    _decode_kernel[grid](
        codes, z, G, constants(dev, beta), out, m, q, stride,
        KIND=kind, N=n, DP=dp, BLOCK_M=block_m, enable_fp_fusion=False)


# ------------------------------------------------------------ whole arrays
def encode(x, kind, q, beta, G, Ginv, z, code_dtype):
    """Voronoi-encode the vectors of a tensor of any shape (..., n).

    Backs ``VoronoiCode.encode(x, dither, backend="triton")``, which
    validates ``x`` and builds the other arguments.

    Parameters
    ----------
    x : torch.Tensor, shape (..., n)
        Finite floating vectors, any layout (float16 / bfloat16 widen
        exactly to float32).
    kind : int
        Lattice kind (:data:`~nqlib.kernels.gpu.lattice_triton.ZN`, ``DN``,
        ``E8`` or ``A2``).
    q : int
        Nesting ratio, >= 2.
    beta : float
        Scale, > 0.
    G, Ginv : torch.Tensor, shape (n, n)
        Contiguous float64 generator and its inverse, on ``x``'s device.
    z : torch.Tensor, shape (1, n) or (m, n)
        Contiguous float64 dither rows on ``x``'s device, ``m`` the number of
        vectors of ``x``.
    code_dtype : torch.dtype
        Integer dtype of the codes, one of :data:`CODE_DTYPES`.

    Returns
    -------
    codes : torch.Tensor, shape ``x.shape``
        Integers in ``[0, q)`` of dtype ``code_dtype``.
    overload : torch.Tensor of bool, shape ``x.shape[:-1]``
        Equal to the numba backend's.
    """
    n = x.shape[-1]
    rows = as_kernel_floats(x.detach()).reshape(-1, n).contiguous()
    m = rows.shape[0]
    dev = rows.device
    codes = torch.empty((m, n), dtype=code_dtype, device=dev)
    overload = torch.empty(m, dtype=torch.bool, device=dev)
    encode_rows(kind, rows, q, beta, z, G, Ginv, codes, overload)
    return codes.reshape(x.shape), overload.reshape(x.shape[:-1])


def decode(codes, kind, q, beta, G, z):
    """Voronoi-decode the codes of a tensor of any shape (..., n).

    Backs ``VoronoiCode.decode(codes, dither, backend="triton")``, which
    validates ``codes`` and builds the other arguments.

    Parameters
    ----------
    codes : torch.Tensor, shape (..., n)
        Integers in ``[0, q)`` (not checked here), any layout.
    kind, q, beta, G :
        As for :func:`encode`.
    z : torch.Tensor, shape (1, n) or (m, n)
        Contiguous float64 dither rows on ``codes``' device.

    Returns
    -------
    torch.Tensor, shape ``codes.shape``
        float32 on ``codes``' device: the float64 decoder output rounded
        once, equal to the numba backend's.
    """
    n = codes.shape[-1]
    rows = codes.detach()
    if rows.dtype not in CODE_DTYPES:
        rows = rows.to(torch.int64)
    rows = rows.reshape(-1, n).contiguous()
    m = rows.shape[0]
    out = torch.empty((m, n), dtype=torch.float32, device=rows.device)
    decode_rows(kind, rows, q, beta, z, G, out)
    return out.reshape(codes.shape)
