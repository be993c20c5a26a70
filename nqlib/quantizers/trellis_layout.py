"""The CPU layout of a trellis-mode weight: the packed stream as the fused
CPU kernel reads it.

A ``mode="trellis"`` :class:`~nqlib.QuantizedMatrix` is already in the form
its fused kernel (:mod:`nqlib.kernels.cpu.trellis_fused`) reads: one bit
stream, whose layout (the sequences, their stream offsets and bits) the
kernel recomputes from ``a``, ``keep``, ``seq_len`` and the stream's
length. So the layout is the stream itself (with a few zero bytes after
it, for the kernel's 64-bit reads) and the file's side information: the
column means and norms, ``alpha``, the code's parameters (``L``, the
table's index bits, ``beta``) and the rotation's signs and odd factor --
no decoded weight, no per-sequence table. The quantile table the states
index is the code's own constant (:func:`nqlib.quantizers.trellis.
quantile_table`, 16 KiB shared by every layer). :meth:`TrellisLayout.
to_quantized` rebuilds the file, byte for byte.

The products follow the fixed-mode layout (:mod:`nqlib.quantizers.
cpu_layout`): the activations are centred, padded and rotated in float32
(:func:`nqlib.kernels.cpu.fused.rotate_rows`), meet the raw decoded vectors
in the coded domain, and ``<x, W_hat_i> = alpha s_i <x_rot, raw_i> + mu_i
sum(x)``: the decoder's projections (padding, the mean direction) are
invisible to a centred, zero-padded ``x_rot``.

Book: chapter "Beyond E8: trellis codes", label ``ch-trellis``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nqlib.quantizers import trellis
from nqlib.quantizers.layout_common import (
    RotatedLayout,
    check_matrix,
    side_fields,
    threads,
)
from nqlib.quantizers.payloads import TrellisPayload

__all__ = ["TrellisLayout", "trellis_layout", "supports", "GEMV_ROWS"]

#: batches up to this many rows run the batch-1 kernel (rows of the weight
#: decoded in registers, at most 4 rows of activations at a time); larger
#: ones decode each tile once for all rows
GEMV_ROWS = 4


@dataclass(eq=False)
class TrellisLayout(RotatedLayout):
    """A trellis-mode weight as the fused CPU kernel reads it.

    Build with :func:`trellis_layout`. ``shape = (n, a)`` is the matrix's
    shape (``a`` coded vectors -- rows of the weight -- of ``n_pad``
    coordinates, the first ``keep`` of them coded).

    It keeps only what the file keeps: the stream (``data``: the payload's
    bytes and ``STREAM_PAD`` zero bytes), the code's parameters, and the
    side information every layout holds (:class:`~nqlib.quantizers.
    layout_common.RotatedLayout`: the float32 column means and norms,
    ``alpha``, the header fields, the rotation's signs and odd factor) --
    enough to rebuild the file (:meth:`to_quantized`) and to compute ``x @
    W_hat.T`` (:meth:`linear`). :attr:`nbytes` counts every array it holds.
    """

    L: int
    qbits: int
    seq_len: int
    keep: int
    beta: float                # a float32 value
    total_bits: int
    data: np.ndarray           # uint8: the stream, then STREAM_PAD zero bytes

    @property
    def stream_nbytes(self) -> int:
        """Bytes of the packed stream (the file's payload array)."""
        return -(-self.total_bits // 8)

    def code_arrays(self) -> dict:
        """The codes: the stream and its padding."""
        return dict(data=self.data)

    # ------------------------------------------------------------ kernels
    def _code(self):
        """The kernels' arguments that describe the code."""
        return (self.data, self.keep, self.seq_len, self.total_bits, self.L,
                trellis.hash_multiplier(), trellis.HASH_SHIFT, self.qbits,
                trellis.quantile_table(self.qbits), np.float32(self.beta))

    def raw_rows(self) -> np.ndarray:
        """The raw decoded vectors (a, n_pad) float32, decoded by the fused
        kernels' own decoder (:func:`nqlib.kernels.cpu.trellis_fused.
        decode_rows`; entries past ``keep`` are 0): the file decoder's values
        bit for bit. Not kept."""
        from nqlib.kernels.cpu import trellis_fused

        out = np.zeros((self.vectors, self.n_pad), dtype=np.float32)
        body = np.empty((self.vectors, self.keep), dtype=np.float32)
        data, *rest = self._code()
        trellis_fused.decode_rows(data, self.vectors, *rest, body)
        out[:, :self.keep] = body
        return out

    def raw_products(self, x_rot):
        """``x_rot @ raw.T`` (M, a) float32 for rows ``x_rot`` (M, n_pad) in
        the coded domain, ``raw`` the vectors as the file decodes them
        (before projections and shrinkage); never decodes the whole
        weight."""
        from nqlib.kernels.cpu import trellis_fused

        x_rot = self._rows(x_rot, "x_rot", self.n_pad)
        M = x_rot.shape[0]
        out = np.empty((M, self.vectors), dtype=np.float32)
        empty = np.zeros(0, dtype=np.float32)
        trellis_fused.products(x_rot, np.zeros(M, np.float32), *self._code(),
                               1.0, self.n_pad, empty, empty, empty, GEMV_ROWS,
                               threads(), out)
        return out

    def _product_args(self):
        """:func:`nqlib.kernels.cpu.trellis_fused.products`, its arguments
        between ``xsum`` and the side arrays, and :data:`GEMV_ROWS`."""
        from nqlib.kernels.cpu import trellis_fused

        return trellis_fused.products, (*self._code(), self.alpha,
                                        self.n_pad), GEMV_ROWS

    def _kernel_args(self, norms, means, bias):
        """:func:`nqlib.kernels.cpu.trellis_fused.linear` (rotation,
        product, scales, means and bias in one compiled call) and its
        arguments between ``x`` and the number of threads."""
        from nqlib.kernels.cpu import trellis_fused

        return trellis_fused.linear, (self.n_pad, self._signs(), self.orth,
                                      self.power_of_two, self.center,
                                      *self._code(), self.alpha, norms, means,
                                      bias, GEMV_ROWS)

    def gpu_layout(self, device):
        """The weight on ``device`` for the fused Triton kernel
        (:class:`nqlib.kernels.gpu.trellis_triton.TrellisGpuLayout`: the
        stream, the quantile table, the per-vector scales and means, the
        rotation)."""
        import torch

        from nqlib.kernels.gpu import trellis_triton

        def dev(arr, dtype):
            return torch.from_numpy(np.array(arr, dtype=dtype)).to(device)

        rotation = None
        if self.signs is not None:
            rotation = (dev(self.signs, np.float32), dev(self.orth, np.float32),
                        int(self.power_of_two))
        return trellis_triton.TrellisGpuLayout(
            shape=self.shape, n_pad=self.n_pad, keep=self.keep,
            seq_len=self.seq_len, total_bits=self.total_bits, L=self.L,
            qbits=self.qbits, beta=self.beta, mult=trellis.hash_multiplier(),
            shift=trellis.HASH_SHIFT,
            data=dev(self.data[:self.stream_nbytes], np.uint8),
            table=dev(trellis.quantile_table(self.qbits), np.float32),
            scale=dev(self.row_scales(), np.float32),
            means=None if self.means is None else dev(self.means, np.float32),
            rotation=rotation)

    # --------------------------------------------------------- the file back
    def to_quantized(self):
        """The :class:`~nqlib.QuantizedMatrix` this layout was built from:
        the same bytes (:meth:`to_bytes`)."""
        from nqlib.quantizers.matrix import QuantizedMatrix

        payload = TrellisPayload(
            L=self.L, qbits=self.qbits, seq_len=self.seq_len, keep=self.keep,
            beta=self.beta, total_bits=self.total_bits,
            packed=self.data[:self.stream_nbytes].copy())
        return QuantizedMatrix(method="nested", mode="trellis",
                               payload=payload, **self.header_fields())


def supports(qm) -> str | None:
    """None when :func:`trellis_layout` can hold ``qm``, else why not."""
    return check_matrix(qm, "trellis", "trellis layout")


def trellis_layout(qm) -> TrellisLayout:
    """The CPU layout of a trellis-mode QuantizedMatrix.

    Parameters
    ----------
    qm : QuantizedMatrix
        ``method="nested"``, ``mode="trellis"`` (any rate, sketched or not).

    Returns
    -------
    TrellisLayout

    Raises
    ------
    ValueError
        For a matrix the layout cannot hold (:func:`supports` says why).
    """
    from nqlib.kernels.cpu.trellis_fused import MAX_STATE_BITS, STREAM_PAD

    why = supports(qm)
    if why is not None:
        raise ValueError(why)
    p = qm.payload
    if not 1 <= p.L <= MAX_STATE_BITS:  # the file reader allows at most 20
        raise ValueError(f"the trellis layout reads at most {MAX_STATE_BITS} "
                         f"state bits, got L = {p.L}")
    data = np.zeros(p.packed.size + STREAM_PAD, dtype=np.uint8)
    data[:p.packed.size] = p.packed
    return TrellisLayout(
        L=int(p.L), qbits=int(p.qbits), seq_len=int(p.seq_len), keep=int(p.keep),
        beta=float(np.float32(p.beta)), total_bits=int(p.total_bits), data=data,
        **side_fields(qm))
