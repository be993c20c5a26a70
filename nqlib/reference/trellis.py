"""Slow, obviously correct numpy oracles of the bitshift trellis code.

A sequence of ``T`` weights is a circular stream of ``Bs`` bits; step ``t``
shifts ``k_t = floor((t+1) Bs / T) - floor(t Bs / T)`` new bits into an
``L``-bit state (new bits at the least significant end) and decodes to
``values[state]``. The state after step ``t`` is the window of ``L`` stream
bits ending at bit ``floor((t+1) Bs / T)``, read circularly (tail-biting).

Costs use float32 arithmetic in the order of the numba kernels
(:mod:`nqlib.kernels.cpu.trellis`), so path costs agree exactly. Imports
nothing from nqlib.
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["schedule", "states_from_bits", "bits_from_inputs", "path_cost",
           "viterbi", "encode_tailbiting", "exact_tailbiting", "brute_force"]


def schedule(T: int, Bs: int) -> np.ndarray:
    """New bits per step: ``k_t = floor((t+1) Bs / T) - floor(t Bs / T)``."""
    t = np.arange(T + 1, dtype=np.int64)
    return np.diff(t * Bs // T)


def states_from_bits(bits, T: int, L: int) -> np.ndarray:
    """The ``T`` states of a circular stream ``bits`` (0/1 array)."""
    bits = np.asarray(bits, dtype=np.int64)
    Bs = bits.size
    ends = (np.arange(1, T + 1) * Bs) // T
    out = np.zeros(T, dtype=np.int64)
    for t, e in enumerate(ends):
        for i in range(L):  # bit e - L + i, most significant first
            out[t] = (out[t] << 1) | bits[(e - L + i) % Bs]
    return out


def bits_from_inputs(inputs, ks) -> np.ndarray:
    """The stream: the ``ks[t]`` new bits of every step, most significant
    first."""
    out = []
    for u, k in zip(inputs, ks):
        out.extend((int(u) >> i) & 1 for i in range(int(k) - 1, -1, -1))
    return np.array(out, dtype=np.int64)


def path_cost(x, states, values) -> np.float32:
    """``sum_t (x_t - values[s_t])^2``, summed in float32 in step order."""
    total = np.float32(0.0)
    for xt, s in zip(np.asarray(x, dtype=np.float32), states):
        d = np.float32(xt - values[s])
        total = np.float32(total + d * d)
    return total


def viterbi(x, ks, values, L, start=-1, start_bits=0, end=-1, end_bits=0):
    """Best path by dynamic programming over all ``2^L`` states.

    ``start >= 0`` forces the low ``start_bits`` bits of the state before
    step 0, ``end >= 0`` the low ``end_bits`` bits of the last state. Ties
    go to the smallest predecessor ``h`` (``np.argmin``), then to the
    smallest final state. Returns ``(cost, inputs, states)``; ``cost`` is
    ``inf`` (and the path empty) when no path meets the constraints.
    """
    x = np.asarray(x, dtype=np.float32)
    values = np.asarray(values, dtype=np.float32)
    S = 1 << L
    s_all = np.arange(S)
    cost = np.where((start < 0) | ((s_all & ((1 << start_bits) - 1)) == start),
                    np.float32(0.0), np.float32(np.inf)).astype(np.float32)
    back = []
    for t, k in enumerate(ks):
        k = int(k)
        # predecessors of s: (h << (L - k)) | (s >> k), h = 0 .. 2^k - 1
        preds = (np.arange(1 << k)[None, :] << (L - k)) | (s_all[:, None] >> k)
        cand = cost[preds]
        h = np.argmin(cand, axis=1)
        d = (x[t] - values).astype(np.float32)
        cost = (cand[s_all, h] + d * d).astype(np.float32)
        back.append(preds[s_all, h])
    ok = (end < 0) | ((s_all & ((1 << end_bits) - 1)) == end)
    masked = np.where(ok, cost, np.float32(np.inf))
    s = int(np.argmin(masked))
    if not np.isfinite(masked[s]):
        return np.inf, None, None
    states = np.zeros(len(ks), dtype=np.int64)
    for t in range(len(ks) - 1, -1, -1):
        states[t] = s
        s = int(back[t][s])
    inputs = np.array([st & ((1 << int(k)) - 1) for st, k in zip(states, ks)],
                      dtype=np.int64)
    return float(masked[int(states[-1])]), inputs, states


def _seam_window(T, ks, L, window):
    h = T // 2
    w = max(window, 1)
    while w < h:
        if int(np.sum(ks[h - w:h + w])) >= L:
            return w
        w += 1
    return 0


def encode_tailbiting(x, Bs, values, L, window):
    """The numba encoder's two passes, step by step (see
    :func:`nqlib.kernels.cpu.trellis.encode_tailbiting`). Returns
    ``(cost, inputs)``."""
    x = np.asarray(x, dtype=np.float32)
    T = x.size
    ks = schedule(T, Bs)
    h = T // 2
    rot = (np.arange(T) + h) % T
    _, ir, sr = viterbi(x[rot], ks[rot], values, L)
    w = _seam_window(T, ks, L, window)
    if w == 0:
        mb = L - int(ks[0])
        mem = int(sr[T - h - 1]) & ((1 << mb) - 1)
        cost, inputs, _ = viterbi(x, ks, values, L, mem, mb, mem, mb)
        return cost, inputs
    inputs = np.empty(T, dtype=np.int64)
    states = np.empty(T, dtype=np.int64)
    inputs[rot] = ir
    states[rot] = sr
    a, b = h - w, h + w
    mb = L - int(ks[b % T])
    _, iw, sw = viterbi(x[a:b], ks[a:b], values, L, int(states[a - 1]), L,
                        int(states[b - 1]) & ((1 << mb) - 1), mb)
    inputs[a:b] = iw
    states[a:b] = sw
    return float(path_cost(x, states, values)), inputs


def exact_tailbiting(x, Bs, values, L):
    """The best circular path: a constrained Viterbi for every memory (the
    low ``L - k_0`` bits of the state before step 0). Returns
    ``(cost, inputs)``."""
    T = len(x)
    ks = schedule(T, Bs)
    mb = L - int(ks[0])
    best = (np.inf, None)
    for mem in range(1 << mb):
        cost, inputs, _ = viterbi(x, ks, values, L, mem, mb, mem, mb)
        if cost < best[0]:
            best = (cost, inputs)
    return best


def brute_force(x, Bs, values, L):
    """The best circular stream of ``Bs`` bits, by trying all ``2^Bs``.
    Returns ``(cost, bits)``."""
    T = len(x)
    best = (np.inf, None)
    for bits in itertools.product((0, 1), repeat=Bs):
        c = float(path_cost(x, states_from_bits(bits, T, L), values))
        if c < best[0]:
            best = (c, np.array(bits))
    return best
