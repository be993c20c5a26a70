"""Triton closest-point kernel for Z^n, D_n, E8 and A2, plus its launcher.

The kernel reproduces :func:`nqlib.kernels.cpu.lattice.closest_point_rows`
bit for bit. The arithmetic contract of :mod:`nqlib.reference.lattices` is
followed step by step:

* every value is converted to float64 on load and all arithmetic is float64;
* rounding is ``floor(v + 0.5)``;
* D_n re-rounds the coordinate with the largest ``|u - f|``, the lowest index
  among equals (computed explicitly as the smallest index attaining the row
  maximum, not with ``tl.argmax``, whose tie rule is not documented);
* squared distances are summed over coordinates in index order, one column
  at a time (never with a tree reduction), and the second coset of E8 / A2
  wins only when strictly nearer;
* kernels are launched with ``enable_fp_fusion=False``: a product followed by
  a sum (``r * sqrt3 + s``, ``d + e * e``) is never contracted into an FMA,
  which would round once instead of twice.

Layout: one program owns ``BLOCK_M`` consecutive rows, held as a
``[BLOCK_M, DP]`` register tile, where ``DP`` is the dimension ``N`` rounded
up to a power of two (``tl.arange`` needs one); columns ``N <= j < DP`` are
masked. Per-row reductions (parity, worst coordinate) are ``tl.sum`` /
``tl.max`` / ``tl.min`` along the columns, which are exact for integers and
for max/min; the sequential float sums extract one column at a time with a
masked ``tl.sum`` (one nonzero entry plus zeros, hence exact).

Constants that are not exact in float32 (``sqrt(3)``) are passed in a
float64 tensor: a Python float literal in a kernel may be materialised as a
float32 constant by some Triton versions.

Book: ``ch-lattices`` (the decoders); the GPU-kernels chapter (planned)
describes the layout.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nqlib import _backend

# Lattice identifiers, equal to nqlib.kernels.cpu.lattice.KIND_* (Python ints
# for the launchers, constexprs for the kernels).
ZN, DN, E8, A2 = 0, 1, 2, 3
KIND_ZN = tl.constexpr(ZN)
KIND_DN = tl.constexpr(DN)
KIND_E8 = tl.constexpr(E8)
KIND_A2 = tl.constexpr(A2)

#: sqrt(3) in float64, the same double as ``np.sqrt(3.0)`` (correctly rounded).
SQRT3 = math.sqrt(3.0)
#: Index of sqrt(3) and of beta in the float64 ``consts`` tensor of a launch.
CONST_SQRT3 = tl.constexpr(0)
CONST_BETA = tl.constexpr(1)
#: Elements of one [BLOCK_M, DP] register tile; BLOCK_M = TILE // DP.
TILE = 512


# ----------------------------------------------------------------- helpers
@triton.jit
def round_half_up(v):
    """Nearest integer, halves up: ``floor(v + 0.5)``."""
    return tl.floor(v + 0.5)


@triton.jit
def column(a, cols, j: tl.constexpr):
    """Column ``j`` of the tile ``a`` as a [BLOCK_M] vector.

    A masked row sum: the one selected entry plus zeros, exact (a -0.0 entry
    comes back as +0.0; no caller can tell them apart).
    """
    return tl.sum(tl.where(cols[None, :] == j, a, 0.0), axis=1)


@triton.jit
def put_column(a, cols, j: tl.constexpr, values):
    """The tile ``a`` with column ``j`` replaced by the [BLOCK_M] ``values``."""
    return tl.where(cols[None, :] == j, values[:, None], a)


@triton.jit
def _sum_in_order(a, cols, N: tl.constexpr):
    """Row sums of ``a`` over columns 0..N-1, added left to right."""
    total = column(a, cols, 0)
    for j in tl.static_range(1, N):
        total = total + column(a, cols, j)
    return total


@triton.jit
def _dn_point(v, shift, cols, N: tl.constexpr):
    """Nearest point of D_n + shift (shift times the all-ones vector) to v.

    Conway & Sloane: round ``u = v - shift``; if the coordinate sum is odd,
    move the worst-rounded coordinate (largest ``|u - f|``, lowest index
    among equals) one step towards ``u``.
    """
    inside = (cols < N)[None, :]
    u = v - shift
    f = tl.where(inside, round_half_up(u), 0.0)
    odd = (tl.sum(f.to(tl.int64), axis=1) & 1) == 1
    err = tl.where(inside, tl.abs(u - f), -1.0)  # padding never wins
    worst_err = tl.max(err, axis=1)
    worst = tl.min(tl.where(err == worst_err[:, None], cols[None, :], N), axis=1)
    fix = odd[:, None] & (cols[None, :] == worst[:, None])
    f = tl.where(fix, f + tl.where(u >= f, 1.0, -1.0), f)
    return f + shift


@triton.jit
def _a2_coset_point(v, s0, s1, sqrt3, cols):
    """Nearest point of (Z x sqrt3 Z) + (s0, s1) to the 2-vectors v.

    Column 0 is ``round(v0 - s0) + s0``, column 1 is
    ``round((v1 - s1) / sqrt3) * sqrt3 + s1``; column 0 is computed with the
    same expression and scale 1.0, which divides and multiplies exactly.
    """
    first = cols[None, :] == 0
    shift = tl.where(first, s0, s1)
    scale = tl.where(first, 1.0, sqrt3)
    return round_half_up((v - shift) / scale) * scale + shift


@triton.jit
def closest_point_tile(v, cols, sqrt3, KIND: tl.constexpr, N: tl.constexpr):
    """Nearest lattice point to every row of the float64 tile ``v``."""
    if KIND == KIND_ZN:
        y = round_half_up(v)
    elif KIND == KIND_DN:
        y = _dn_point(v, 0.0, cols, N)
    elif KIND == KIND_E8:
        # E8 = D8 u (D8 + 1/2): the integer coset wins ties
        y0 = _dn_point(v, 0.0, cols, N)
        y1 = _dn_point(v, 0.5, cols, N)
        e0 = v - y0
        e1 = v - y1
        d0 = _sum_in_order(e0 * e0, cols, N)
        d1 = _sum_in_order(e1 * e1, cols, N)
        y = tl.where((d1 < d0)[:, None], y1, y0)
    else:
        # A2 = R u (R + (1/2, sqrt3/2)), R = Z x sqrt3 Z
        y0 = _a2_coset_point(v, 0.0, 0.0, sqrt3, cols)
        y1 = _a2_coset_point(v, 0.5, sqrt3 / 2, sqrt3, cols)
        e0 = v - y0
        e1 = v - y1
        d0 = _sum_in_order(e0 * e0, cols, 2)
        d1 = _sum_in_order(e1 * e1, cols, 2)
        y = tl.where((d1 < d0)[:, None], y1, y0)
    return y


# ------------------------------------------------------------------ kernel
@triton.jit
def _closest_point_kernel(
    x_ptr,              # (M, N) float32 or float64, row-major: points
    out_ptr,            # (M, N) float32 or float64, row-major: lattice points
    consts_ptr,         # (2,) float64: sqrt(3), beta (beta unused here)
    M,                  # number of rows
    KIND: tl.constexpr,     # ZN, DN, E8 or A2
    N: tl.constexpr,        # lattice dimension
    DP: tl.constexpr,       # N rounded up to a power of two
    BLOCK_M: tl.constexpr,  # rows per program
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, DP)
    offs = rows[:, None] * N + cols[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    sqrt3 = tl.load(consts_ptr + CONST_SQRT3)
    y = closest_point_tile(v, cols, sqrt3, KIND, N)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------- launchers
def check_rows(t, name, n, dtypes, device=None):
    """Check that ``t`` is a contiguous (m, n) tensor of one of ``dtypes`` on
    ``device`` (default: its own, which must be usable by Triton).

    Raises ``ValueError`` naming the argument and the problem.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2 or t.shape[1] != n:
        raise ValueError(f"{name} must have shape (m, {n}), got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major); call "
                         ".contiguous() first")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all "
                         "arguments must be on one device)")
    if t.device.type != "cuda" and not _backend.triton_interpreter_on():
        raise ValueError(f"{name} is on {t.device}: Triton kernels need CUDA "
                         "tensors (or TRITON_INTERPRET=1 for CPU tensors)")


def constants(device, beta=1.0):
    """The float64 ``consts`` tensor of a launch: ``[sqrt(3), beta]``."""
    return torch.tensor([SQRT3, float(beta)], dtype=torch.float64, device=device)


def tile_shape(n):
    """``(DP, BLOCK_M)``: padded width and rows per program for dimension n."""
    dp = triton.next_power_of_2(n)
    return dp, max(1, TILE // dp)


FLOATS = (torch.float32, torch.float64)


def closest_point_rows(kind, x, out):
    """Nearest lattice point of every row of ``x`` (m, n) into ``out`` (m, n).

    Same contract and results as the numba kernel of the same name.
    ``kind`` is one of ``ZN``, ``DN``, ``E8``, ``A2``; ``x`` and ``out`` are
    contiguous float32 or float64 tensors on one CUDA device (any device under
    the Triton interpreter). Returns None.
    """
    if kind not in (ZN, DN, E8, A2):
        raise ValueError(f"unknown lattice kind {kind!r}")
    n = x.shape[-1] if isinstance(x, torch.Tensor) and x.ndim else 0
    check_rows(x, "x", n, FLOATS)
    check_rows(out, "out", n, FLOATS, x.device)
    if out.shape[0] != x.shape[0]:
        raise ValueError(f"out must have shape {tuple(x.shape)}, got "
                         f"{tuple(out.shape)}")
    if kind == E8 and n != 8 or kind == A2 and n != 2 or kind == DN and n < 2:
        raise ValueError(f"lattice kind {kind} does not have dimension {n}")
    m = x.shape[0]
    if m == 0:
        return
    dp, block_m = tile_shape(n)
    grid = (triton.cdiv(m, block_m),)
    _closest_point_kernel[grid](
        x, out, constants(x.device), m,
        KIND=kind, N=n, DP=dp, BLOCK_M=block_m, enable_fp_fusion=False)


def as_kernel_floats(x):
    """``x`` as float32 or float64 (half types widen exactly to float32)."""
    return x if x.dtype in FLOATS else x.to(torch.float32)


def closest_point(lattice, x):
    """Nearest point of ``lattice`` to each vector of the tensor ``x``.

    Backs ``Lattice.closest_point(x, backend="triton")``. ``x`` (..., dim) is
    a finite floating tensor (validated by the caller); it may be strided.
    Returns a tensor of ``x``'s shape, dtype and device, equal bit for bit to
    the numba backend's result.
    """
    d = lattice.dim
    rows = as_kernel_floats(x.detach()).reshape(-1, d).contiguous()
    # half types: float64 points, cast once (as the numba backend does)
    out = torch.empty(rows.shape, device=rows.device,
                      dtype=x.dtype if x.dtype in FLOATS else torch.float64)
    closest_point_rows(lattice.kind, rows, out)
    return out.reshape(x.shape).to(x.dtype)
