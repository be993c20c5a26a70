"""``mode="trellis"``: the tail-biting bitshift trellis code
(:mod:`nqlib.quantizers.trellis`) on every byte of the budget left after the
side information.

Book: chapter "Beyond E8: trellis codes", label ``ch-trellis``.
"""

from __future__ import annotations

import numpy as np

from nqlib.quantizers import trellis
from nqlib.quantizers.coded_domain import Encoding
from nqlib.quantizers.format import TRELLIS_PAYLOAD_BYTES
from nqlib.quantizers.rate_control import code_budget_bits

__all__ = ["encode", "decode"]


def encode(qm, Y, sketch, state_bits=None, stream=False) -> Encoding:
    """The trellis code of the coded rows ``Y`` (a, n_pad) of ``qm`` with
    ``state_bits`` state bits (None: the default); the reconstruction is the
    encoder's own (what the decoder returns). ``stream``: the rate is a
    stream's (:func:`~nqlib.quantizers.rate_control.code_budget_bits`)."""
    if qm.dither:
        raise ValueError("dither=True does not apply to mode='trellis' (its "
                         "codebook is not a lattice)")
    budget = code_budget_bits(qm, TRELLIS_PAYLOAD_BYTES, stream=stream)
    payload, raw = trellis.encode_matrix(Y, budget, sketch=sketch,
                                          L=state_bits)
    return Encoding(payload, lambda r0, r1: raw[r0:r1])


def decode(qm) -> np.ndarray:
    """Raw decoded vectors (a, n_pad) of a trellis-mode matrix."""
    return trellis.decode(qm.payload, qm.shape[1], qm.n_pad)
