"""``mode="variable"``: the nearest point of ``beta E8`` of every 8-block,
entropy coded (rANS) under a fitted discretised-Gaussian model, ``beta`` set
by rate control so the code fits the budget.

Below the tangency rate of the measured distortion-rate curve (with
``sketch``) only the first ``keep`` blocks of every rotated vector are
coded; the rest decode to 0 -- the time sharing that reaches the lower
convex envelope.

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

import math

import numpy as np

from nqlib.quantizers import entropy
from nqlib.quantizers.coded_domain import Encoding, dither, rows_per_chunk
from nqlib.quantizers.format import VARIABLE_PAYLOAD_BYTES
from nqlib.quantizers.payloads import VariablePayload
from nqlib.quantizers.rate_control import code_budget_bits

__all__ = ["e8_points", "encode", "decode"]


def e8_points(blocks, beta, z, backend, out=None):
    """Doubled E8 points ``2 Q(x / beta + z)`` of the rows of ``blocks``
    (int32), written into ``out`` when given; ``backend="numpy"`` runs the
    reference oracle (the same points)."""
    if out is None:
        out = np.empty(blocks.shape, dtype=np.int32)
    if backend == "numpy":
        from nqlib.reference.lattices import closest_point_e8

        step = rows_per_chunk(8, 1)  # the oracle's temporaries stay small
        for r0 in range(0, blocks.shape[0], step):
            zz = z if z.shape[0] == 1 else z[r0:r0 + step]
            out[r0:r0 + step] = 2.0 * closest_point_e8(
                blocks[r0:r0 + step] * (1.0 / beta) + zz)
        return out
    from nqlib.kernels.cpu.nested import e8_points_rows

    e8_points_rows(blocks, 1.0 / beta, z, out)
    return out


def encode(qm, Y, backend, sketch, stream=False) -> Encoding:
    """Entropy-coded E8 points of the coded rows ``Y`` (a, n_pad) of ``qm``;
    ``beta`` set so the code fits the budget.

    With ``sketch`` and a budget below the tangency rate ``r*`` of the
    measured curve, only the first ``keep`` blocks of every rotated vector
    are coded (at about ``r*`` bits per entry); the rest decode to 0.
    """
    from nqlib.quantizers.ratecurve import variable_tangent

    a, n_pad = Y.shape
    B = n_pad // 8
    budget = code_budget_bits(qm, VARIABLE_PAYLOAD_BYTES, stream=stream) - 32
    keep = B
    r_star = variable_tangent()
    if sketch and budget / (a * n_pad) < r_star:
        keep = max(1, min(B, math.floor(B * budget / (a * n_pad) / r_star)))
    blocks = np.ascontiguousarray(Y.reshape(a, B, 8)[:, :keep].reshape(-1, 8))
    nb = blocks.shape[0]
    if qm.dither:
        zfull = dither(qm.seed, n_pad, a, a * B, qm.dither_key).reshape(a, B, 8)
        z = np.ascontiguousarray(zfull[:, :keep].reshape(-1, 8))
    else:
        z = np.zeros((1, 8))
    target = budget / blocks.size  # bits per coded entry
    # Rate control. The ideal code length falls by about one bit per entry
    # when log2(beta) grows by one (high-rate theory), so secant steps
    # converge in a few passes: first on a seeded subsample of blocks, then
    # on all of them. Only the final pass is entropy coded.
    rng = np.random.default_rng([qm.seed, 0x7263])  # 'rc': rate control
    if nb > 16384:
        idx = np.sort(rng.choice(nb, 16384, replace=False))
        sample = blocks[idx]
        zs = z if z.shape[0] == 1 else z[idx]
    else:
        sample, zs = blocks, z

    # one buffer of points per data set: every step overwrites the previous
    # step's points, which are not used again
    buffers = {}

    def rate_at(lb, data, zz):
        if id(data) not in buffers:
            buffers[id(data)] = np.empty(data.shape, dtype=np.int32)
        out = buffers[id(data)]
        T2 = e8_points(data, float(np.float32(2.0**lb)), zz, backend, out)
        st = entropy.e8_stats(T2)
        return entropy.e8_ideal_bits(T2, stats=st) / data.size, T2, st

    def secant(lb, data, zz, goal, tol, steps):
        r, T2, st = rate_at(lb, data, zz)
        slope = -1.0
        for _ in range(steps):
            if abs(r - goal) < tol:
                break
            lb_new = lb + (goal - r) / slope
            r_new, T2, st = rate_at(lb_new, data, zz)
            if lb_new != lb and r_new != r:
                slope = min((r_new - r) / (lb_new - lb), -0.05)
            lb, r = lb_new, r_new
        return lb, r, T2, st

    # start: h(N(0, 1)) - log2(beta) ~ rate for a unit-volume lattice
    lb0 = 0.5 * math.log2(2 * math.pi * math.e) - max(target, 0.5)
    lb, _, _, _ = secant(lb0, sample, zs, target, 2e-3, 10)
    # on all blocks, aim just under the budget (room for the coder's flush)
    goal = (budget - 96) / blocks.size
    for _ in range(12):
        lb, r, T2, st = secant(lb, blocks, z, goal, 2e-4, 4)
        params = entropy.e8_fit(T2, st)
        if r * blocks.size <= budget - 64:
            words = entropy.e8_encode(T2, params)
            if 32 * len(words) <= budget:
                break
        goal -= 64 / blocks.size
        lb += 1e-4
    else:
        raise ValueError(f"rate {qm.rate} cannot be met (rate control did not "
                         "converge)")
    if params[2] > 65535:
        raise ValueError("the lattice points are too large for the model "
                         "(rate too high for this data)")
    beta = float(np.float32(2.0**lb))
    payload = VariablePayload(beta=beta, sigma0=params[0], sigma1=params[1],
                              K=params[2], p1=params[3],
                              crc=entropy.symbols_crc(T2), keep=keep, words=words)
    points = T2.reshape(a, keep, 8)
    zk = z.reshape(a, keep, 8) if z.shape[0] > 1 else z

    def raw_rows(r0, r1):
        # the decoder's beta (t - z), dropped blocks 0 (a block of vectors)
        raw = np.empty((r1 - r0, B, 8))
        zz = zk[r0:r1] if zk.ndim == 3 else zk
        if backend == "numpy":
            raw[:, keep:] = 0.0
            raw[:, :keep] = beta * (0.5 * points[r0:r1] - zz)
        else:
            from nqlib.kernels.cpu.nested import scaled_points_rows

            z3 = zz.reshape(1, 1, 8) if zz.ndim == 2 else zz
            scaled_points_rows(points[r0:r1], beta, np.ascontiguousarray(z3), raw)
        return raw.reshape(r1 - r0, n_pad)

    return Encoding(payload, raw_rows)


def decode(qm) -> np.ndarray:
    """Raw decoded vectors (a, n_pad) of a variable-mode matrix (no
    projection, no shrinkage); ValueError when the stream does not decode
    to the encoded symbols."""
    n, a = qm.shape
    n_pad = qm.n_pad
    B = n_pad // 8
    p = qm.payload
    keep = p.keep
    try:
        T2 = entropy.e8_decode(p.words, a * keep, (p.sigma0, p.sigma1, p.K, p.p1),
                               qm.version)
    except Exception as exc:  # constriction raises on a bad stream
        raise ValueError(f"entropy-coded payload cannot be decoded: {exc}"
                         ) from None
    if entropy.symbols_crc(T2) != p.crc:
        raise ValueError("entropy-coded payload does not decode to the "
                         "encoded symbols (model mismatch or corruption)")
    pts = 0.5 * T2.reshape(a, keep, 8)
    if qm.dither:
        z = dither(qm.seed, n_pad, a, a * B, qm.dither_key, qm.version)
        pts = pts - z.reshape(a, B, 8)[:, :keep]
    out = np.zeros((a, B, 8))
    out[:, :keep] = float(np.float32(p.beta)) * pts
    return out.reshape(a, n_pad)
