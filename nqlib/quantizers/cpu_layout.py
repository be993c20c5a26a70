"""The decoder's decisions, and the CPU layout of a fixed-mode weight.

A fixed-mode :class:`~nqlib.QuantizedMatrix` stores every 8-block of every
rotated, normalised vector as one mixed-radix word: the codes ``c`` of an
E8 Voronoi code with nesting ratio ``q`` and the index of its scale
``beta``. Its decoder (numba, float64) returns ``beta r / 2`` with integer
residuals ``r`` (:func:`decisions`); the floating-point round-off of its
division by ``q`` breaks the ties between equally near lattice points, so
the fused kernels do not re-run it: the layouts store what it decided
(:func:`stored_fields`, shared with the GPU layout of
:mod:`nqlib.quantizers.fixed_layout`).

CPU layout
----------
With ``r_j + q = 2 m_j + pi`` (halves ``m_j`` in [0, q), one parity bit
``pi`` per block) and the D8 parity fix moving ``r_k`` by ``2q`` towards 0
on the blocks where it applies (``odd``), the CPU layout stores, for ``q <=
16``,

    u_j = m_j - T + 8,   T = q / 2 (q even),  (q + 1) / 2 - pi (q odd),

in [0, 16). Then ``r / 2 = u + c(pi) + fix e_k`` with ``c = -8 + pi / 2``
(even q) or ``-7.5 - pi / 2`` (odd q), and the fix goes down (``fix = -q``)
exactly when ``u_k >= 8``: the kernel reads its direction from one bit. The
``odd`` flag costs nothing when ``q`` is odd: a decoded block ``r / 2`` is a
point of E8 (``y - q Q(y / q)`` with ``y`` and ``Q(.)`` in E8), so its
coordinates sum to an even number, the fix changes the sum by ``q``, and
``odd`` is the parity of ``u_0 + .. + u_7``. When ``q`` is even the same
argument makes ``u_0 + .. + u_7`` even, so the lowest bit of ``u_7`` is not
stored and ``odd`` takes its place. Per block: 32 bits of halves, 4 bits of
scale index and parity, 3 bits for ``k`` -- 39 bits, 4.875 bits per weight
(:mod:`nqlib.kernels.cpu.fused` has the bit layout). The file itself packs
the same information into ``L`` bits (32 at 4 bits per entry); the layout
is a lossless recoding of it, and :meth:`CpuLayout.to_quantized` rebuilds the
file's bytes exactly.

Book: chapter "Kernels: CPU and GPU", label ``ch-kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nqlib.quantizers.coded_domain import padded
from nqlib.quantizers.fixed_mode import fixed_part_codes
from nqlib.quantizers.layout_common import (
    RotatedLayout,
    check_matrix,
    side_fields,
    threads,
)
from nqlib.quantizers.payloads import FixedPart, FixedPayload

__all__ = ["CpuLayout", "cpu_layout", "decisions", "stored_fields",
           "supports"]

#: vectors decoded per numba call while building a layout (bounds memory)
LAYOUT_CHUNK = 4096
#: rows are stored in groups of 8 (one SIMD lane each), tiles of 16
ROW_ALIGN = 16
#: largest q with 4-bit halves
MAX_Q = 16
#: batches up to this many rows run the batch-1 kernel row by row; larger
#: ones decode each tile once for all rows (nqlib.kernels.cpu.fused.gemm)
GEMV_ROWS = 4


# ------------------------------------------------------- decoder decisions
def e8_doubled_points(codes):
    """``Y = 2 G c`` (int64) for the basis of :func:`nqlib.lattices.E8`."""
    c = codes
    Y = np.empty_like(c)
    Y[:, 0] = 4 * c[:, 0] - 2 * c[:, 1] + c[:, 7]
    Y[:, 1:6] = 2 * (c[:, 1:6] - c[:, 2:7]) + c[:, 7:8]
    Y[:, 6] = 2 * c[:, 6] + c[:, 7]
    Y[:, 7] = c[:, 7]
    return Y


def e8_codes_of_residuals(r, q):
    """The codes ``c`` (int64, in [0, q)) whose decode has residuals ``r``
    (m, 8): ``r / 2 = G c - q u`` with ``u`` in E8, so ``c = G^-1 (r / 2)
    mod q``, computed by the suffix sums of the basis and checked exactly
    (``ValueError`` when ``r / 2`` is not a point of E8)."""
    r = np.asarray(r, dtype=np.int64)
    k = np.empty_like(r)
    r7 = r[:, 7]
    s = np.zeros(r.shape[0], dtype=np.int64)
    for j in range(6, 0, -1):
        s += r[:, j]
        k[:, j] = (s - (7 - j) * r7) // 2
    k[:, 0] = (s + r[:, 0] - 7 * r7) // 4
    k[:, 7] = r7
    if not np.array_equal(e8_doubled_points(k), r):
        raise ValueError("residuals are not twice a point of E8")
    return np.mod(k, q)


def decisions(codes, q):
    """numba's decoding decisions for each row of ``codes`` (m, 8): coset
    ``s``, coordinate ``k`` moved by the parity fix (0 if none), ``down``
    (1 when that move lowers ``r_k`` by ``D``), and the residuals ``r``
    (output = beta r / 2).

    Runs :func:`nqlib.kernels.cpu.nested.decode_multiscale_rows` at scale 1
    without dither (its output is then exactly ``r / 2``), reads the chosen
    point ``u = (Y - r) / D`` back, and checks that the integer decoder of
    the kernels, given the decisions, returns the same ``r``.
    """
    from nqlib.kernels.cpu import nested as kern

    m = codes.shape[0]
    half = np.empty((m, 8))
    kern.decode_multiscale_rows(codes, np.zeros(m, dtype=np.int64), q,
                                np.ones(1), np.zeros((1, 8)), half)
    r = (2.0 * half).astype(np.int64)
    Y = e8_doubled_points(codes)
    D = 2 * q
    u2 = (Y - r) // q                      # 2u, u the chosen E8 point
    s = u2[:, 0] & 1
    f = (u2 - s[:, None]) // 2             # u = f + s/2
    f_plain = (Y - q * s[:, None] + q) // D
    moved = f != f_plain
    k = np.argmax(moved, axis=1)
    down = (f - f_plain)[np.arange(m), k] == 1
    # the integer decoder with these decisions (what the kernels compute)
    r_int = Y - q * s[:, None] - D * f_plain
    odd = (f_plain.sum(axis=1) & 1) == 1
    hit = odd[:, None] & (np.arange(8)[None, :] == k[:, None])
    r_int = np.where(hit, r_int - np.where(down, D, -D)[:, None], r_int)
    if (not np.array_equal(r_int, r) or np.any(moved.sum(axis=1) > 1)
            or np.any(moved.any(axis=1) != odd) or np.any((2 * half) != r)):
        raise AssertionError("integer E8 decoder disagrees with numba")
    return s, k, down.astype(np.int64), r


def stored_fields(codes, q):
    """What the layouts store for each row of ``codes`` (m, 8): the halves
    ``m`` (m, 8) in [0, q), the parity ``pi``, whether the D8 parity fix
    applies (``odd``) and the coordinate ``k`` it moves; and numba's
    residuals ``r`` (output = beta r / 2).

    With numba's decisions (:func:`decisions`) and ``f_j = floor((a_j + q)
    / D)`` for ``a = Y - q s``, the residuals before the fix, ``r_j = a_j -
    D f_j``, lie in ``[-q, q)`` and all have the parity of ``c_7 + q s``
    (``Y_j = c_7`` mod 2, ``D`` even), so ``r_j + q = 2 m_j + pi`` with
    ``m_j`` in ``[0, q)`` and ``pi`` one bit per block. The fix moves
    ``r_k`` by ``D`` towards 0 -- down when ``r_k >= 0`` -- which the kernels
    read from ``m_k``: a move the other way would make ``|r|^2`` larger by
    ``4 D |r_k|`` than this one, so numba never makes it (at ``r_k = 0`` its
    float64 comparison is exact). Checked here on every
    block: ``2 m + pi - q`` with the fix is numba's ``r``, bit for bit.
    """
    s, k, down, r = decisions(codes, q)
    Y = e8_doubled_points(np.asarray(codes, dtype=np.int64))
    D = 2 * q
    a = Y - q * s[:, None]
    f = (a + q) // D
    r_pre = a - D * f
    odd = (f.sum(axis=1) & 1) == 1
    pi = (r_pre[:, 0] + q) & 1
    m = (r_pre + q - pi[:, None]) // 2
    rows = np.arange(len(k))
    r_k = 2 * m[rows, k] + pi - q
    fixed = 2 * m + (pi - q)[:, None]
    fixed[rows, k] += np.where(odd, np.where(r_k >= 0, -D, D), 0)
    if (not np.array_equal(fixed, r) or (len(m) and (m.min() < 0 or m.max() >= q))
            or np.any((k != 0) & ~odd)):
        raise AssertionError("stored halves disagree with numba's decode")
    return m, pi, odd.astype(np.int64), k, r


# ------------------------------------------------------------- CPU layout
@dataclass(eq=False)
class CpuLayout(RotatedLayout):
    """A fixed-mode weight as the fused CPU kernels read it.

    Build with :func:`cpu_layout`. ``shape = (n, a)`` is the matrix's shape
    (``a`` vectors -- rows of the weight -- of length ``n``, coded in
    ``n_pad = 8 B`` coordinates); blocks ``[0, h)`` of every vector belong to
    part hi, ``[h, coded)`` to part lo, and blocks from ``coded`` on were
    dropped (sketching). Rows are stored in groups of 8, padded with zero
    rows to a multiple of 16.

    Besides the packed codes (``words``, ``nib``, ``kpl``; see
    :mod:`nqlib.kernels.cpu.fused`), it keeps only what the file keeps: the
    scales of the two parts and the side information every layout holds
    (:class:`~nqlib.quantizers.layout_common.RotatedLayout`: the float32
    column means and norms, ``alpha``, the header fields, the rotation's
    signs and odd factor) -- enough to rebuild the file (:meth:`to_quantized`) and to
    compute ``x @ W_hat.T`` (:meth:`linear`). :attr:`nbytes` counts every
    array it holds.
    """

    h: int
    coded: int
    q: tuple                   # (q_hi, q_lo); 0 for an absent part
    L: tuple                   # word lengths of the file's two parts
    nscales: tuple             # scales per part
    tab: np.ndarray            # (2, 8) float32: the scales of hi and lo
    words: np.ndarray          # (G, coded, 8) int32
    nib: np.ndarray            # (G, coded) uint32
    kpl: np.ndarray            # (3 G coded + 1,) uint8

    @property
    def groups(self) -> int:
        """Number of groups of 8 vectors."""
        return self.words.shape[0]

    def code_arrays(self) -> dict:
        """The packed codes: ``words``, ``nib``, ``kpl``."""
        return dict(words=self.words, nib=self.nib, kpl=self.kpl)

    def code_tables(self) -> dict:
        """The scales of the two parts (``tab``)."""
        return dict(tab=self.tab)

    # ------------------------------------------------------------ products
    def raw_products(self, x_rot):
        """``x_rot @ raw.T`` (M, 8 G) float32 for rows ``x_rot`` (M, n_pad)
        in the coded domain, ``raw`` the vectors as the file decodes them
        (before projections and shrinkage), padding rows included; never
        decodes the whole weight."""
        from nqlib.kernels.cpu import fused

        x_rot = self._rows(x_rot, "x_rot", self.n_pad)
        M, rows = x_rot.shape[0], 8 * self.groups
        out = np.empty((M, rows), dtype=np.float32)
        empty = np.zeros(0, dtype=np.float32)
        fused.products(x_rot, np.zeros(M, np.float32), self.words, self.nib,
                       self.kpl, self.tab, self.q[0], self.q[1], self.h, 1.0,
                       self.n_pad, empty, empty, empty, GEMV_ROWS,
                       threads(), out)
        return out

    def _product_args(self):
        """:func:`nqlib.kernels.cpu.fused.products`, its arguments between
        ``xsum`` and the side arrays, and :data:`GEMV_ROWS`."""
        from nqlib.kernels.cpu import fused

        return fused.products, (self.words, self.nib, self.kpl, self.tab,
                                self.q[0], self.q[1], self.h, self.alpha,
                                self.n_pad), GEMV_ROWS

    def _kernel_args(self, norms, means, bias):
        """:func:`nqlib.kernels.cpu.fused.linear` (rotation, product,
        scales, means and bias in one compiled call) and its arguments
        between ``x`` and the number of threads."""
        from nqlib.kernels.cpu import fused

        return fused.linear, (self.n_pad, self._signs(), self.orth,
                              self.power_of_two, self.center, self.words,
                              self.nib, self.kpl, self.tab, self.q[0],
                              self.q[1], self.h, self.alpha, norms, means,
                              bias, GEMV_ROWS)

    # --------------------------------------------------------- the file back
    def fields(self, g0=0, g1=None):
        """The stored fields of the row groups ``[g0, g1)``: ``u`` (rows,
        coded, 8), ``pi``, ``odd``, ``k``, ``index`` (rows, coded), rows
        ``8 g0 .. 8 g1 - 1``; read back from the packed arrays."""
        g1 = self.groups if g1 is None else g1
        W = self.words[g0:g1].view(np.uint32).astype(np.int64)    # (g, c, 8)
        G, c = W.shape[0], self.coded
        u = np.empty(W.shape + (8,), dtype=np.int64)
        for j in range(8):
            u[..., j] = (W >> (4 * j)) & 15
        nib = self.nib[g0:g1].astype(np.int64)
        lanes = np.arange(8)
        nibl = (nib[..., None] >> (4 * lanes)) & 15                # (g, c, 8)
        kb = self.kpl[3 * g0 * c:3 * g1 * c].reshape(G, c, 3).astype(np.int64)
        kw = kb[..., 0] | kb[..., 1] << 8 | kb[..., 2] << 16
        k = 7 - ((kw[..., None] >> (3 * lanes)) & 7)
        index, pi = nibl & 7, nibl >> 3
        qv = np.where(np.arange(c) < self.h, self.q[0], self.q[1])[None, :, None]
        even = qv % 2 == 0
        odd_even_q = u[..., 7] & 1
        par = u[..., :7].sum(axis=-1) & 1
        u7_even = (u[..., 7] & 14) | par
        u[..., 7] = np.where(even, u7_even, u[..., 7])
        odd = np.where(even, odd_even_q, u.sum(axis=-1) & 1)

        def rows(v):
            return np.moveaxis(v, 2, 1).reshape((8 * G, c) + v.shape[3:])

        return rows(u), rows(pi), rows(odd), rows(k), rows(index)

    def residuals(self, g0=0, g1=None):
        """Integer residuals ``r`` (rows, coded, 8) (decoded block = ``beta r /
        2``) and scale indices (rows, coded) of the row groups ``[g0, g1)``."""
        u, pi, odd, k, index = self.fields(g0, g1)
        c = self.coded
        qv = np.where(np.arange(c) < self.h, self.q[0], self.q[1])[None, :]
        c2 = np.where(qv % 2 == 0, -16 + pi, -15 - pi)           # 2 c(pi)
        r = 2 * u + c2[..., None]
        down = np.take_along_axis(u, k[..., None], -1)[..., 0] >= 8
        fix = np.where(odd == 1, np.where(down, -2 * qv, 2 * qv), 0)
        np.put_along_axis(r, k[..., None],
                          np.take_along_axis(r, k[..., None], -1) + fix[..., None],
                          -1)
        return r, index

    def to_quantized(self):
        """The :class:`~nqlib.QuantizedMatrix` this layout was built from,
        rebuilt from the packed codes: the same bytes (:meth:`to_bytes`)."""
        from nqlib.kernels.cpu import nested as kern
        from nqlib.quantizers.matrix import QuantizedMatrix

        n, a = self.shape
        parts = {}
        spans = {"hi": (0, self.h), "lo": (self.h, self.coded)}
        for slot, name in enumerate(("hi", "lo")):
            b0, b1 = spans[name]
            L = self.L[slot]
            if L == 0:
                parts[name] = FixedPart.empty()
                continue
            q = self.q[slot]
            per = b1 - b0
            packed = np.zeros(-(-a * per * L // 8), dtype=np.uint8)
            step = LAYOUT_CHUNK // 8
            for g0 in range(0, -(-a // 8), step):
                g1 = min(-(-a // 8), g0 + step)
                v0, v1 = 8 * g0, min(a, 8 * g1)
                r, index = self.residuals(g0, g1)
                codes = e8_codes_of_residuals(r[:v1 - v0, b0:b1].reshape(-1, 8), q)
                words = np.empty(len(codes), dtype=np.uint64)
                kern.mixed_radix_words(codes, index[:v1 - v0, b0:b1].reshape(-1),
                                       q, words)
                chunk = np.zeros(-(-len(words) * L // 8), dtype=np.uint8)
                kern.pack_words(words, L, chunk)
                start = v0 * per * L // 8          # v0 is a multiple of 8
                packed[start:start + len(chunk)] |= chunk
            parts[name] = FixedPart(L=L, q=q, betas=self.tab[
                slot, :self.nscales[slot]].copy(), packed=packed)
        return QuantizedMatrix(method="nested", mode="fixed",
                               payload=FixedPayload(h=self.h, **parts),
                               **self.header_fields())


def supports(qm) -> str | None:
    """None when :func:`cpu_layout` can hold ``qm``, else why not."""
    why = check_matrix(qm, "fixed", "CPU layout")
    if why is not None:
        return why
    if qm.dither:
        return ("the CPU layout does not hold dithered matrices (the dither is "
                "a dense matrix of its own)")
    qs = [part.q for part in (qm.payload.hi, qm.payload.lo) if part.L]
    if qs and max(qs) > MAX_Q:
        return (f"the CPU layout stores 4-bit halves (q <= {MAX_Q}); this "
                f"matrix has q = {max(qs)} (rates above about 4.3 bits per "
                "entry)")
    return None


def cpu_layout(qm) -> CpuLayout:
    """The CPU layout of a fixed-mode nested-lattice QuantizedMatrix.

    Parameters
    ----------
    qm : QuantizedMatrix
        ``method="nested"``, ``mode="fixed"``, without dither, ``q <= 16``
        in both parts (rates up to about 4.3 bits per entry); either part
        may be absent and the low part may be dropped (sketching).

    Returns
    -------
    CpuLayout

    Raises
    ------
    ValueError
        For a matrix the layout cannot hold (:func:`supports` says why).

    Notes
    -----
    Runs numba's decoder once over every block and derives the fields from
    its residuals (:func:`nqlib.kernels.cpu.fused.layout_fields`), checking
    on every block the rules the kernels rely on.
    Book: chapter "Kernels: CPU and GPU", label ``ch-kernels``.
    """
    from nqlib.kernels.cpu import fused

    why = supports(qm)
    if why is not None:
        raise ValueError(why)
    n, a = qm.shape
    n_pad = padded(n)
    B = n_pad // 8
    p = qm.payload
    h = int(p.h)
    spans = {"hi": (0, h), "lo": (h, B)}
    present = [name for name in ("hi", "lo")
               if getattr(p, name).L and spans[name][1] > spans[name][0]]
    coded = max((spans[name][1] for name in present), default=0)
    a_pad = -(-a // ROW_ALIGN) * ROW_ALIGN
    G = a_pad // 8
    words_r = np.zeros((a_pad, coded), dtype=np.uint32)
    nib_r = np.zeros((a_pad, coded), dtype=np.uint32)
    kp_r = np.zeros((a_pad, coded), dtype=np.uint32)
    tab = np.zeros((2, 8), dtype=np.float32)
    for slot, name in enumerate(("hi", "lo")):
        betas = np.asarray(getattr(p, name).betas, dtype=np.float32)
        tab[slot, :len(betas)] = betas
    for name in present:
        part = getattr(p, name)
        q = int(part.q)
        b0, b1 = spans[name]
        per = b1 - b0
        for v0 in range(0, a, LAYOUT_CHUNK):   # v0 * per * L is a multiple of 8
            v1 = min(a, v0 + LAYOUT_CHUNK)
            codes, index = fixed_part_codes(part, (v1 - v0) * per, v0 * per)
            w = np.empty(len(codes), dtype=np.int32)
            nb = np.empty(len(codes), dtype=np.int64)
            kk = np.empty(len(codes), dtype=np.int64)
            if fused.layout_fields(codes, index, q, w, nb, kk):
                raise AssertionError("CPU layout fields break the kernels' "
                                     "rules (the decoder changed?)")
            shape = (v1 - v0, per)
            words_r[v0:v1, b0:b1] = w.view(np.uint32).reshape(shape)
            nib_r[v0:v1, b0:b1] = nb.astype(np.uint32).reshape(shape)
            kp_r[v0:v1, b0:b1] = kk.astype(np.uint32).reshape(shape)
    # one lane per row: (G, 8, coded) -> (G, coded, 8)
    words = np.ascontiguousarray(
        words_r.reshape(G, 8, coded).transpose(0, 2, 1)).view(np.int32)
    lanes = np.arange(8, dtype=np.uint32)
    nib = (nib_r.reshape(G, 8, coded) << (4 * lanes)[None, :, None]).sum(
        axis=1, dtype=np.uint32)
    kw = (kp_r.reshape(G, 8, coded) << (3 * lanes)[None, :, None]).sum(
        axis=1, dtype=np.uint32)
    kpl = np.zeros(3 * G * coded + 1, dtype=np.uint8)
    kpl[:-1] = kw.reshape(-1, 1).view(np.uint8).reshape(-1, 4)[:, :3].reshape(-1)
    return CpuLayout(
        h=h, coded=coded,
        q=tuple(int(part.q) if part.L else 0 for part in (p.hi, p.lo)),
        L=tuple(int(part.L) for part in (p.hi, p.lo)),
        nscales=tuple(len(part.betas) for part in (p.hi, p.lo)),
        tab=tab, words=words, nib=np.ascontiguousarray(nib), kpl=kpl,
        **side_fields(qm))
