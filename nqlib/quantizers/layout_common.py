"""What every CPU weight layout shares: the file's side information, the
rotation, and the activations' way into the coded domain.

A fused CPU layout (:class:`nqlib.quantizers.cpu_layout.CpuLayout` for the
fixed mode, :class:`nqlib.quantizers.trellis_layout.TrellisLayout` for the
trellis mode) holds a mode's packed codes plus the same side information:
the float32 column means and norms, ``alpha``, the header fields and the
rotation's signs (int8) and odd factor (float32). Its products all follow
one identity: the activations are centred, zero-padded and rotated in
float32 (:func:`nqlib.kernels.cpu.fused.rotate_rows`) and meet the raw
decoded vectors in the coded domain, where the decoder's projections
(padding, the mean direction) are invisible, so ``<x, W_hat_i> = alpha s_i
<x_rot, raw_i> + mu_i sum(x)`` with ``s_i = |a_i| / sqrt(n_pad)``.

:class:`RotatedLayout` holds those fields and the methods built on them
only; each mode adds its codes and kernels.

Book: chapter "Kernels: CPU and GPU", label ``ch-kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nqlib._scratch import scratch

__all__ = ["RotatedLayout", "side_fields", "check_matrix", "threads",
           "rotation_scratch"]


@dataclass(eq=False)
class RotatedLayout:
    """The side information of a fused CPU layout (a base class).

    ``shape = (n, a)`` is the matrix's shape: ``a`` coded vectors -- rows of
    the weight -- of ``n_pad`` coordinates. Subclasses add the codes
    (:meth:`code_arrays`) and the kernels.
    """

    shape: tuple
    n_pad: int
    means: np.ndarray | None   # (a,) float32
    norms: np.ndarray | None   # (a,) float32
    alpha: float
    flags: int
    seed: int
    rate: float
    version: int
    signs: np.ndarray | None   # (n_pad,) int8: the rotation's signs
    orth: np.ndarray           # (m, m) float32: its odd factor
    power_of_two: int

    @property
    def vectors(self) -> int:
        """Number of coded vectors (output features)."""
        return self.shape[1]

    def code_arrays(self) -> dict:
        """The arrays of the codes, by name (each mode's own)."""
        raise NotImplementedError

    def code_tables(self) -> dict:
        """The mode's small tables that are not codes (e.g. scales), by
        name; none by default."""
        return {}

    def arrays(self) -> dict:
        """Every array the layout holds, by name."""
        out = dict(self.code_arrays(), **self.code_tables(), orth=self.orth)
        for name in ("means", "norms", "signs"):
            arr = getattr(self, name)
            if arr is not None:
                out[name] = arr
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of all the arrays the layout holds (padding included)."""
        return int(sum(arr.nbytes for arr in self.arrays().values()))

    @property
    def code_nbytes(self) -> int:
        """Bytes of the codes alone (:meth:`code_arrays`)."""
        return int(sum(arr.nbytes for arr in self.code_arrays().values()))

    @property
    def bits_per_weight(self) -> float:
        """``8 * nbytes / (n * a)``: compare with the file's
        ``bits_per_entry``."""
        n, a = self.shape
        return 8.0 * self.nbytes / (n * a)

    @property
    def center(self) -> bool:
        """Whether the vectors were centred (their means are stored)."""
        return self.means is not None

    def row_scales(self) -> np.ndarray:
        """``alpha |a_i| / sqrt(n_pad)`` per vector (``alpha`` when not
        normalised), float32, computed on each call (not kept)."""
        if self.norms is None:
            return np.full(self.vectors, self.alpha, dtype=np.float32)
        s = self.alpha * self.norms.astype(np.float64) / np.sqrt(self.n_pad)
        return s.astype(np.float32)

    # ------------------------------------------------- arguments of kernels
    def _rows(self, x, name, width):
        """``x`` as C-contiguous float32 rows of length ``width``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"{name} must have shape (M, {width}), got "
                             f"{x.shape}")
        return x

    def _out(self, x, out):
        """The output array of :meth:`linear` for rows ``x``: ``out`` when
        given (checked: a writeable C-contiguous float32 array (M, a) apart
        from ``x``), else a new one."""
        shape = (x.shape[0], self.vectors)
        if out is None:
            return np.empty(shape, dtype=np.float32)
        if not (isinstance(out, np.ndarray) and out.dtype == np.float32
                and out.shape == shape and out.flags.c_contiguous
                and out.flags.writeable):
            got = (f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray)
                   else type(out).__name__)
            raise ValueError(f"out must be a writeable C-contiguous float32 "
                             f"array of shape {shape}, got {got}")
        if np.may_share_memory(out, x):
            raise ValueError("out must not overlap x")
        return out

    def _side(self, bias):
        """``(norms, means, bias)`` as the kernels take them (empty float32
        arrays for what is absent)."""
        if bias is not None and np.shape(bias) != (self.vectors,):
            raise ValueError(f"bias must have shape ({self.vectors},), got "
                             f"{np.shape(bias)}")
        empty = np.zeros(0, dtype=np.float32)
        norms = self.norms if self.norms is not None else empty
        means = self.means if self.means is not None else empty
        b = (np.ascontiguousarray(bias, dtype=np.float32) if bias is not None
             else empty)
        return norms, means, b

    def _signs(self):
        """The rotation's signs (an empty int8 array without rotation)."""
        return self.signs if self.signs is not None else np.zeros(0, np.int8)

    def _xsum(self, x_rot, xsum):
        """``xsum`` as a float32 vector, one entry per row of ``x_rot``."""
        xsum = np.ascontiguousarray(xsum, dtype=np.float32)
        if xsum.shape != (x_rot.shape[0],):
            raise ValueError(f"xsum must have shape ({x_rot.shape[0]},), got "
                             f"{xsum.shape}")
        return xsum

    def linear(self, x, bias=None, out=None) -> np.ndarray:
        """``x @ W_hat.T + bias`` (float32, (M, a)) for float32 rows ``x``
        (M, n), ``W_hat.T`` the dequantized matrix (``qm.dequantize()``),
        written into ``out`` when given (a C-contiguous float32 (M, a)
        array, e.g. a torch tensor's memory) and returned.

        ``x_rot = P [x - mean(x); 0]`` (the mean removed when the matrix is
        centred) meets the raw decoded vectors in the coded domain: the
        decoder's projections (padding, mean direction) are invisible to it,
        so ``<x, W_hat_i> = alpha s_i <x_rot, raw_i> + mu_i sum(x)``. One
        compiled call of the mode's fused kernel: rotation, product, scales,
        means and bias.
        """
        x = self._rows(x, "x", self.shape[0])
        out = self._out(x, out)
        return self.bound_linear(bias)(x, out)

    def bound_linear(self, bias=None):
        """:meth:`linear` with its arguments bound: a function ``f(x, out)``
        that writes ``x @ W_hat.T + bias`` into ``out`` and returns it,
        without checking them -- ``x`` must be a C-contiguous float32 array
        (M, n) and ``out`` a writeable C-contiguous float32 array (M, a)
        apart from ``x`` (:meth:`linear` checks both, then calls it).

        For callers that build both arrays themselves and call often with
        the same bias (:class:`nqlib.nn.QuantLinear` keeps one per layer):
        the layout's arrays and the bias (``bias`` is checked here, and
        converted once: a float32 ``bias`` is used in place, so later writes
        to it are seen) are gathered once instead of at every call. The
        number of threads is read at every call.
        """
        kernel, static = self._kernel_args(*self._side(bias))
        n_pad = self.n_pad

        def run(x, out):
            kernel(x, *static, threads(), out, *rotation_scratch(x, n_pad))
            return out

        return run

    def _kernel_args(self, norms, means, bias):
        """``(kernel, args)``: the mode's compiled ``linear`` and its
        arguments between ``x`` and the number of threads."""
        raise NotImplementedError

    def linear_rotated(self, x_rot, xsum, bias=None) -> np.ndarray:
        """``scale_i <x_rot, raw_i> + mean_i xsum + bias_i`` (M, a) float32,
        for activations already in the coded domain (e.g. the decoded rows of
        quantized activations, with ``xsum = n * their means``)."""
        x_rot = self._rows(x_rot, "x_rot", self.n_pad)
        xsum = self._xsum(x_rot, xsum)
        out = np.empty((x_rot.shape[0], self.vectors), dtype=np.float32)
        return self.bound_linear_rotated(bias)(x_rot, xsum, out)

    def bound_linear_rotated(self, bias=None):
        """:meth:`linear_rotated` with its arguments bound, as
        :meth:`bound_linear` binds :meth:`linear`: a function ``f(x_rot,
        xsum, out)`` that writes the products into ``out`` and returns it,
        without checking them -- ``x_rot`` a C-contiguous float32 array (M,
        n_pad), ``xsum`` a float32 vector (M,), ``out`` a writeable
        C-contiguous float32 array (M, a) apart from both."""
        kernel, static, gemv_rows = self._product_args()
        side = self._side(bias)

        def run(x_rot, xsum, out):
            kernel(x_rot, xsum, *static, *side, gemv_rows, threads(), out)
            return out

        return run

    def _product_args(self):
        """``(kernel, args, gemv_rows)``: the mode's compiled ``products``,
        its arguments between ``xsum`` and the side arrays, and its batch-1
        threshold."""
        raise NotImplementedError

    def rotate(self, x):
        """``(x_rot, xsum)`` for float32 rows ``x`` (M, n): the centred (when
        the matrix is), zero-padded, rotated rows (M, n_pad) and the row sums
        of ``x``, in float32."""
        from nqlib.kernels.cpu import fused

        x = self._rows(x, "x", self.shape[0])
        M = x.shape[0]
        x_rot = np.empty((M, self.n_pad), dtype=np.float32)
        xsum = np.empty(M, dtype=np.float32)
        fused.rotate_rows(x, self._signs(), self.orth, self.power_of_two,
                          self.center, x_rot, xsum)
        return x_rot, xsum

    # --------------------------------------------------------- the file back
    def to_quantized(self):
        """The :class:`~nqlib.QuantizedMatrix` this layout was built from."""
        raise NotImplementedError

    def header_fields(self) -> dict:
        """The container's fields other than the payload, as
        :class:`~nqlib.QuantizedMatrix` takes them (copies of the arrays)."""
        return dict(shape=tuple(self.shape), rate=self.rate, flags=self.flags,
                    seed=self.seed, alpha=self.alpha,
                    means=None if self.means is None else self.means.copy(),
                    norms=None if self.norms is None else self.norms.copy(),
                    version=self.version)

    def to_bytes(self) -> bytes:
        """The file's bytes (``to_quantized().to_bytes()``)."""
        return self.to_quantized().to_bytes()


def side_fields(qm) -> dict:
    """The :class:`RotatedLayout` fields of a QuantizedMatrix ``qm``: its
    shape, padded length, float32 means and norms, header fields and
    rotation (signs as int8, odd factor as float32)."""
    P = qm.rotation()
    if P is not None:
        signs = P.signs.astype(np.int8)
        orth = P.orthogonal.astype(np.float32)
        p2 = P.power_of_two
    else:
        signs, orth, p2 = None, np.ones((1, 1), dtype=np.float32), 1
    return dict(
        shape=tuple(qm.shape), n_pad=int(qm.n_pad),
        means=None if qm.means is None else np.array(qm.means, dtype=np.float32),
        norms=None if qm.norms is None else np.array(qm.norms, dtype=np.float32),
        alpha=float(qm.alpha), flags=int(qm.flags), seed=int(qm.seed),
        rate=float(qm.rate), version=int(qm.version), signs=signs, orth=orth,
        power_of_two=int(p2))


def check_matrix(qm, mode: str, what: str) -> str | None:
    """None when ``qm`` is a nested-lattice QuantizedMatrix in ``mode``, else
    why not (``what`` names the layout in the message)."""
    from nqlib.quantizers.matrix import QuantizedMatrix

    if not isinstance(qm, QuantizedMatrix):
        return f"expected a QuantizedMatrix, got {type(qm).__name__}"
    if qm.method != "nested" or qm.mode != mode:
        return (f"the {what} needs a nested-lattice matrix in {mode} mode, "
                f"got method={qm.method!r}, mode={qm.mode!r}")
    return None


def threads() -> int:
    """numba's current number of threads (what the kernels split over)."""
    import numba

    return numba.get_num_threads()


#: rotated activations of up to this many floats go to fresh arrays (small
#: allocations are recycled by the allocator without faulting; a fresh array
#: is cheaper to ask for than the scratch)
SMALL_ROTATED = 1 << 16


def rotation_scratch(x, n_pad):
    """``(x_rot, xsum)``: arrays for the rotated rows of ``x`` (M, n_pad) and
    their sums (M,), float32, as the fused kernels' ``linear`` takes them:
    this thread's scratch (:mod:`nqlib._scratch`) unless they are small."""
    M = x.shape[0]
    if M * n_pad <= SMALL_ROTATED:
        return np.empty((M, n_pad), np.float32), np.empty(M, np.float32)
    return (scratch("x_rot", (M, n_pad), np.float32),
            scratch("xsum", (M,), np.float32))
