"""The typed payloads of a :class:`~nqlib.quantizers.matrix.QuantizedMatrix`.

A quantized matrix is a header (shape, method, mode, flags, seed, rate,
shrinkage), the per-column side information (means, norms) and a *payload*:
what the method's encoder produced and its decoder needs. There is one
payload type per (method, mode); :mod:`nqlib.quantizers.format` reads and
writes each of them field by field, in the order the fields are declared
here.

Every payload type has :meth:`arrays`, the arrays it holds by name (what a
layer that keeps the matrix resident pays for).

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

__all__ = ["VariablePayload", "FixedPart", "FixedPayload", "TrellisPayload",
           "RtnPayload", "EcsqPayload", "Payload"]


class _Arrays:
    """Mixin: :meth:`arrays` lists the ndarray fields (recursively)."""

    def arrays(self) -> dict:
        """Every numpy array of the payload, by (dotted) field name."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                out[f.name] = v
            elif isinstance(v, _Arrays):
                out.update({f"{f.name}.{k}": a for k, a in v.arrays().items()})
        return out


@dataclass(eq=False)
class VariablePayload(_Arrays):
    """``method="nested", mode="variable"``: entropy-coded E8 points.

    Attributes
    ----------
    beta : float
        The lattice scale (float32 value).
    sigma0, sigma1 : float
        The fitted discretised-Gaussian widths of the two E8 cosets.
    K : int
        The model's range (tables of ``2 K + 1`` symbols).
    p1 : int
        Probability of the odd coset, out of 65536.
    crc : int
        CRC-32 of the coded symbols (detects a model mismatch).
    keep : int
        8-blocks coded per vector (the rest, sketched away, decode to 0).
    words : ndarray of uint32
        The rANS stream.
    """

    beta: float
    sigma0: float
    sigma1: float
    K: int
    p1: int
    crc: int
    keep: int
    words: np.ndarray


@dataclass(eq=False)
class FixedPart(_Arrays):
    """One part of a fixed-mode payload: ``L``-bit words of a union of E8
    Voronoi codes of base ``q`` at the scales ``betas`` (``L = 0``: the part
    is empty, its blocks decode to 0).

    Attributes
    ----------
    L : int
        Bits per 8-block word.
    q : int
        Base of the Voronoi codes.
    betas : ndarray of float32
        The scales (at most :data:`nqlib.quantizers.fixed.MAX_SCALES`).
    packed : ndarray of uint8
        The words, ``L`` bits each, packed little-endian.
    """

    L: int
    q: int
    betas: np.ndarray
    packed: np.ndarray

    @classmethod
    def empty(cls) -> FixedPart:
        """A part that codes nothing."""
        return cls(L=0, q=0, betas=np.zeros(0, dtype=np.float32),
                   packed=np.zeros(0, dtype=np.uint8))


@dataclass(eq=False)
class FixedPayload(_Arrays):
    """``method="nested", mode="fixed"``: the first ``h`` 8-blocks of every
    rotated vector are coded by part ``hi``, the others by part ``lo``.

    Attributes
    ----------
    h : int
        Blocks per vector in the ``hi`` part.
    hi, lo : FixedPart
    """

    h: int
    hi: FixedPart
    lo: FixedPart

    def part_ranges(self, blocks: int):
        """``(name, part, slice of blocks)`` of both parts for vectors of
        ``blocks`` 8-blocks."""
        return (("hi", self.hi, slice(0, self.h)),
                ("lo", self.lo, slice(self.h, blocks)))


@dataclass(eq=False)
class TrellisPayload(_Arrays):
    """``method="nested", mode="trellis"``: a tail-biting bitshift trellis
    code (:mod:`nqlib.quantizers.trellis`).

    Attributes
    ----------
    L : int
        State bits.
    qbits : int
        Bits of the quantile table's index.
    seq_len : int
        Entries per trellis sequence.
    keep : int
        Entries coded per vector (the rest decode to 0).
    beta : float
        The scale (float32 value).
    total_bits : int
        Stream bits.
    packed : ndarray of uint8
        The stream.
    """

    L: int
    qbits: int
    seq_len: int
    keep: int
    beta: float
    total_bits: int
    packed: np.ndarray


@dataclass(eq=False)
class RtnPayload(_Arrays):
    """``method="rtn"`` or ``"rtn-hadamard"``: symmetric round-to-nearest.

    Attributes
    ----------
    bits : int
        Bit width.
    group : int
        Group length.
    scales : ndarray of float16, shape (a, groups)
        Per-group scales.
    packed : ndarray of uint8
        The codes, ``bits`` each, packed.
    """

    bits: int
    group: int
    scales: np.ndarray
    packed: np.ndarray


@dataclass(eq=False)
class EcsqPayload(_Arrays):
    """``method="ecsq"``: entropy-coded uniform scalar quantization.

    Attributes
    ----------
    step : float
        Step size (float32 value).
    sigma : float
        Fitted model width.
    K : int
        Model range.
    crc : int
        CRC-32 of the symbols.
    words : ndarray of uint32
        The rANS stream.
    """

    step: float
    sigma: float
    K: int
    crc: int
    words: np.ndarray


#: any payload
Payload = VariablePayload | FixedPayload | TrellisPayload | RtnPayload | EcsqPayload
