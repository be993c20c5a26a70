"""The scalar baselines behind the same API: ``method="ecsq"`` (entropy-coded
uniform scalar quantization of the coded domain) and ``method="rtn"`` /
``"rtn-hadamard"`` (symmetric round-to-nearest per group, optionally after
the random Hadamard rotation).

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

import numpy as np

from nqlib.quantizers import entropy
from nqlib.quantizers.coded_domain import Encoding
from nqlib.quantizers.format import (
    ECSQ_PAYLOAD_BYTES,
    MAX_MODEL_RANGE,
    rotation_size_problem,
)
from nqlib.quantizers.hadamard import RandomHadamard
from nqlib.quantizers.payloads import EcsqPayload, RtnPayload
from nqlib.quantizers.rate_control import code_budget_bits

__all__ = ["encode_ecsq", "decode_ecsq", "encode_rtn", "decode_rtn"]


def encode_ecsq(qm, Y, stream=False) -> Encoding:
    """Uniform scalar quantization of the coded rows ``Y`` (a, n) of ``qm``,
    entropy coded; the step set by rate control so the code fits the
    budget."""
    a, n = Y.shape
    budget = code_budget_bits(qm, ECSQ_PAYLOAD_BYTES, stream=stream) - 32
    target = budget / Y.size
    flat = Y.ravel()
    rng = np.random.default_rng([qm.seed, 0x6563])
    sample = flat[rng.choice(flat.size, min(flat.size, 131072), replace=False)]

    def sym(data, lstep):
        return np.floor(data / float(np.float32(2.0**lstep)) + 0.5).astype(np.int64)

    lo, hi = -target - 4.0, -target + 6.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        r = entropy.scalar_ideal_bits(sym(sample, mid)) / sample.size
        lo, hi = (mid, hi) if r > target else (lo, mid)
        if hi - lo < 1e-4:
            break
    ls = hi
    for _ in range(12):
        U = sym(flat, ls)
        params = entropy.scalar_fit(U)
        ideal = entropy.scalar_ideal_bits(U, params)
        if ideal <= budget - 64:
            words = entropy.scalar_encode(U, params)
            if 32 * len(words) <= budget:
                break
            excess = 32 * len(words) - budget
        else:
            excess = ideal - (budget - 64)
        ls += (excess + 64) / flat.size + 1e-4
    else:
        raise ValueError(f"rate {qm.rate} cannot be met (rate control did not "
                         "converge)")
    if params[1] > MAX_MODEL_RANGE:
        raise ValueError("the scalar symbols are too large for the model "
                         "(rate too high for this data)")
    step = float(np.float32(2.0**ls))
    payload = EcsqPayload(step=step, sigma=params[0], K=params[1],
                          crc=entropy.symbols_crc(U), words=words)
    U = U.reshape(a, n)
    return Encoding(payload, lambda r0, r1: step * U[r0:r1].astype(np.float64))


def decode_ecsq(qm) -> np.ndarray:
    """Raw decoded vectors (a, n) of an ecsq matrix (no projection, no
    shrinkage); ValueError when the stream does not decode to the encoded
    symbols."""
    n, a = qm.shape
    p = qm.payload
    try:
        U = entropy.scalar_decode(p.words, a * qm.n_pad, (p.sigma, p.K), qm.version)
    except Exception as exc:
        raise ValueError(f"entropy-coded payload cannot be decoded: {exc}") from None
    if entropy.symbols_crc(U) != p.crc:
        raise ValueError("entropy-coded payload does not decode to the encoded "
                         "symbols (model mismatch or corruption)")
    return float(np.float32(p.step)) * U.reshape(a, qm.n_pad).astype(np.float64)


def encode_rtn(A, bits, seed, rotate, group_size) -> RtnPayload:
    """The rtn payload of ``A`` (n, a): ``bits``-bit symmetric codes per
    group of ``group_size`` entries of each column, after the seeded random
    Hadamard rotation when ``rotate``."""
    from nqlib.kernels.cpu import nested as kern
    from nqlib.quantizers.scalar import rtn_encode

    if group_size > 65535:
        raise ValueError(f"group_size must be <= 65535, got {group_size}")
    n, a = A.shape
    if rotate and (why := rotation_size_problem(n, a)):
        raise ValueError(f"A cannot be rotated: {why}; use method='rtn'")
    X = np.ascontiguousarray(A.T)
    if rotate:
        X = RandomHadamard(n, seed).apply(X)
    codes, scales = rtn_encode(X, bits, group_size)
    words = codes.ravel().astype(np.uint64)
    packed = np.zeros(-(-words.size * bits // 8), dtype=np.uint8)
    kern.pack_words(words, bits, packed)
    return RtnPayload(bits=bits, group=group_size, scales=scales, packed=packed)


def decode_rtn(qm) -> np.ndarray:
    """Decoded vectors (a, n) of an rtn matrix, in its (rotated) domain."""
    from nqlib.kernels.cpu import nested as kern
    from nqlib.quantizers.scalar import rtn_decode

    n, a = qm.shape
    p = qm.payload
    ng = p.scales.shape[1]
    count = a * ng * p.group
    words = np.empty(count, dtype=np.uint64)
    kern.unpack_words(p.packed, p.bits, count, words)
    codes = words.astype(np.int64).reshape(a, ng * p.group)
    return rtn_decode(codes, p.scales, p.bits, n)
