"""Numba kernels of the bitshift trellis code (``mode="trellis"``).

A sequence of ``T`` weights is described by a circular bit stream of ``Bs``
bits. Step ``t`` shifts ``k_t = P[t+1] - P[t]`` new bits into an ``L``-bit
state, ``P[t] = floor(t Bs / T)`` (so ``k_t`` is ``floor(Bs / T)`` or one
more), and the weight decodes to ``values[state]``. The state after step
``t`` is the window of ``L`` stream bits ending at bit ``P[t+1]`` (read
circularly: the stream is tail-biting, so no start state is stored).

Viterbi search: the predecessors of ``s'`` are ``(h << (L - k)) | (s' >> k)``
for ``h < 2^k``; they are shared by the ``2^k`` states with the same
``s' >> k`` (a *group*), so one step costs ``O(2^L)``: a minimum over the
``2^k`` predecessors of each of the ``2^(L-k)`` groups, then one add per
state. Costs are float32 (the oracle :mod:`nqlib.reference.trellis` does the
same float32 operations in the same order, so path costs agree exactly).

Arrays in, arrays out; no imports from the rest of nqlib but the guard.
Book: chapter "Beyond E8: trellis codes", label ``ch-trellis``.
"""

import numpy as np
from numba import njit, prange

from nqlib.kernels.cpu.guard import guard_module

MASK32 = np.uint64(0xFFFFFFFF)


@njit(cache=True, inline="always")
def state_index(s, mult, shift, qbits):
    """Table index of state ``s``: a multiplicative hash of the state
    (``h = s * mult mod 2^32``, ``h ^= h >> shift``, ``h = h * mult mod
    2^32``), its top ``qbits`` bits."""
    h = (np.uint64(s) * np.uint64(mult)) & MASK32
    h ^= h >> np.uint64(shift)
    h = (h * np.uint64(mult)) & MASK32
    return np.int64(h >> np.uint64(32 - qbits))


@njit(cache=True)
def state_values(L, mult, shift, qbits, table, out):
    """``out[s] = table[state_index(s)]`` for the ``2^L`` states."""
    for s in range(1 << L):
        out[s] = table[state_index(s, mult, shift, qbits)]


@njit(cache=True, inline="always")
def step_bits(t, T, Bs):
    """``P[t] = floor(t Bs / T)``: stream bits before step ``t``."""
    return (t * Bs) // T


@njit(cache=True)
def schedule(T, Bs, ks):
    """``ks[t] = P[t+1] - P[t]``: the new bits of step ``t``."""
    for t in range(T):
        ks[t] = step_bits(t + 1, T, Bs) - step_bits(t, T, Bs)


@njit(cache=True)
def group_min(cost, k, gmin, arg):
    """``gmin[g] = min_h cost[h 2^(L-k) + g]`` and ``arg[g]`` the smallest
    minimising ``h``, for the ``2^(L-k)`` groups ``g``.

    A tournament over the bits of ``h``, most significant first: level
    ``j`` halves the candidates, keeping the smaller cost (the smaller
    ``h`` on a tie) -- so the result is the lexicographic minimum of
    ``(cost, h)``, as a plain ``argmin`` gives. Each level is one
    contiguous, vectorisable pass; ``gmin`` and ``arg`` (``2^(L-1)``
    entries) hold the survivors in place.
    """
    n = cost.shape[0] >> 1
    for i in range(n):
        c0 = cost[i]
        c1 = cost[i + n]
        lt = c1 < c0
        gmin[i] = c1 if lt else c0
        arg[i] = np.uint8(lt)
    for _ in range(1, k):
        n >>= 1
        for i in range(n):
            c0 = gmin[i]
            c1 = gmin[i + n]
            b0 = arg[i]
            b1 = arg[i + n]
            # candidate h: 2 b0 (this bit 0) or 2 b1 + 1; on a tie the
            # smaller h, and 2 b1 + 1 < 2 b0 exactly when b1 < b0
            lt = (c1 < c0) | ((c1 == c0) & (b1 < b0))
            gmin[i] = c1 if lt else c0
            arg[i] = np.uint8(2) * (b1 if lt else b0) + np.uint8(lt)


@njit(cache=True)
def _add_k1(new, gmin, values, xt, G):
    """``new[s] = gmin[s >> 1] + (xt - values[s])^2`` (unrolled, k = 1)."""
    for g in range(G):
        m = gmin[g]
        d0 = xt - values[2 * g]
        d1 = xt - values[2 * g + 1]
        new[2 * g] = m + d0 * d0
        new[2 * g + 1] = m + d1 * d1


@njit(cache=True)
def _expand(gmin, G, R, out):
    """``out[g R + v] = gmin[g]`` for ``v < R``: each group minimum once per
    pair of its members, so that :func:`_add_k1` adds it (contiguous passes
    instead of a stride-``2^k`` gather)."""
    if R == 2:
        for g in range(G):
            m = gmin[g]
            out[2 * g] = m
            out[2 * g + 1] = m
    else:
        for g in range(G):
            m = gmin[g]
            b = g * R
            for v in range(R):
                out[b + v] = m


@njit(cache=True)
def _add_any(new, gmin, values, xt, G, K):
    """``new[s] = gmin[s // K] + (xt - values[s])^2`` (any ``K = 2^k``)."""
    for g in range(G):
        m = gmin[g]
        b = g * K
        for u in range(K):
            d = xt - values[b + u]
            new[b + u] = m + d * d


@njit(cache=True)
def viterbi(x, ks, values, L, start, start_bits, end, end_bits, cost, gmin, bp,
            inputs, states):
    """Best path of one sequence.

    Parameters
    ----------
    x : float32 (T,)
        The weights.
    ks : int64 (T,)
        New bits per step (1..8).
    values : float32 (2^L,)
        Reconstruction of every state.
    L : int
        State bits.
    start, start_bits : int
        ``start = -1``: any state before step 0. Otherwise the state before
        step 0 has low ``start_bits`` bits equal to ``start``.
    end, end_bits : int
        The same for the state after the last step (``-1``: free).
    cost : float32 (2^L,), gmin : float32 (2^L,), bp : uint8 (T, 2^(L-1))
        Scratch (the working set of one step: ``2^L`` costs, the values, the
        group minima in the first half of ``gmin`` and, for ``k = 2``,
        their expansion in the second).
    inputs : uint8 (T,), states : int64 (T,)
        Output: the ``ks[t]`` new bits of every step, and the state after it.

    Returns
    -------
    float
        The path cost ``sum_t (x_t - values[s_t])^2`` (float32 sums), or
        ``inf`` when no path meets the constraints. Ties go to the
        smallest predecessor, then to the smallest final state.
    """
    T = x.shape[0]
    S = 1 << L
    smask = (1 << start_bits) - 1
    for s in range(S):
        if start < 0 or (s & smask) == start:
            cost[s] = 0.0
        else:
            cost[s] = np.inf
    for t in range(T):
        # the group minima of the old costs, then the new costs in place
        k = ks[t]
        group_min(cost, k, gmin, bp[t])
        if k == 1:
            _add_k1(cost, gmin, values, x[t], S >> 1)
        elif k == 2:  # measured faster than a stride-4 add
            _expand(gmin, S >> k, 1 << (k - 1), gmin[S >> 1:])
            _add_k1(cost, gmin[S >> 1:], values, x[t], S >> 1)
        else:
            _add_any(cost, gmin, values, x[t], S >> k, 1 << k)
    best = np.float32(np.inf)
    state = 0
    emask = (1 << end_bits) - 1
    for s in range(S):
        if (end < 0 or (s & emask) == end) and cost[s] < best:
            best = cost[s]
            state = s
    if best == np.inf:
        return np.inf
    for t in range(T - 1, -1, -1):
        k = ks[t]
        states[t] = state
        inputs[t] = np.uint8(state & ((1 << k) - 1))
        g = state >> k
        state = (np.int64(bp[t, g]) << (L - k)) | g
    return np.float64(best)


@njit(cache=True)
def seam_window(T, ks, L, window):
    """Steps on each side of the seam that :func:`encode_tailbiting`
    re-solves: ``window``, raised until the ``2 w`` steps hold at least
    ``L`` bits; 0 when that needs more than ``T // 2 - 1`` steps (then the
    whole sequence is re-solved)."""
    h = T // 2
    w = max(window, 1)
    while w < h:
        if step_bits_sum(ks, h - w, h + w) >= L:
            return w
        w += 1
    return 0


@njit(cache=True)
def step_bits_sum(ks, a, b):
    """``sum(ks[a:b])``."""
    n = 0
    for t in range(a, b):
        n += ks[t]
    return n


@njit(cache=True)
def encode_tailbiting(x, ks, values, L, window, cost, gmin, bp, inputs, states,
                      xr, kr, ir, sr):
    """Tail-biting path of one sequence: a circular stream.

    Pass 1 runs a free Viterbi over the sequence rotated by ``h = T // 2``
    steps (``x[h:]`` then ``x[:h]``). Read back in the original order, its
    path is circular everywhere except at the *seam* between steps
    ``h - 1`` and ``h``, where its two free ends meet. Pass 2 re-solves the
    ``2 w`` steps around the seam (:func:`seam_window`) with both ends tied
    to the pass-1 path: the state before them fixed, the state after them
    agreeing in the ``L - k`` bits that the next step keeps. The result is
    a circular path, optimal among those equal to the pass-1 path outside
    the window. When the sequence is too short for a window, pass 2 instead
    re-solves the whole sequence with the pass-1 state at the seam as a
    tail-biting memory. ``xr``, ``kr``, ``ir``, ``sr``: scratch of length
    ``T``. Returns the path cost (float32 sums, as :func:`viterbi`).
    """
    T = x.shape[0]
    h = T // 2
    for i in range(T):
        j = (i + h) % T
        xr[i] = x[j]
        kr[i] = ks[j]
    viterbi(xr, kr, values, L, -1, 0, -1, 0, cost, gmin, bp, ir, sr)
    w = seam_window(T, ks, L, window)
    if w == 0:
        # the state after step h - 1 (rotated index T - h - 1) as memory
        mb = L - ks[0]
        mem = sr[T - h - 1] & ((1 << mb) - 1)
        return viterbi(x, ks, values, L, mem, mb, mem, mb, cost, gmin, bp,
                       inputs, states)
    for i in range(T):
        j = (i + h) % T
        inputs[j] = ir[i]
        states[j] = sr[i]
    a = h - w
    b = h + w
    mb = L - ks[b % T]
    start = states[a - 1]
    end = states[b - 1] & ((1 << mb) - 1)
    viterbi(x[a:b], ks[a:b], values, L, start, L, end, mb, cost, gmin, bp,
            inputs[a:b], states[a:b])
    total = np.float32(0.0)
    for t in range(T):
        d = x[t] - values[states[t]]
        total += d * d
    return np.float64(total)


@njit(cache=True, parallel=True)
def encode_sequences(x, starts, lengths, bits, values, L, window, inputs, costs):
    """Tail-biting paths of many sequences, in parallel.

    ``x`` (float32, flat): the weights; sequence ``j`` is
    ``x[starts[j] : starts[j] + lengths[j]]`` with ``bits[j]`` stream bits.
    Writes the per-step new bits into ``inputs`` (uint8, same layout as
    ``x``) and the path costs into ``costs`` (float64, one per sequence).
    """
    S = 1 << L
    for j in prange(lengths.shape[0]):
        T = lengths[j]
        a = starts[j]
        cost = np.empty(S, dtype=np.float32)
        gmin = np.empty(S, dtype=np.float32)
        bp = np.empty((T, S >> 1), dtype=np.uint8)
        ks = np.empty(T, dtype=np.int64)
        schedule(T, bits[j], ks)
        xr = np.empty(T, dtype=np.float32)
        kr = np.empty(T, dtype=np.int64)
        ir = np.empty(T, dtype=np.uint8)
        sr = np.empty(T, dtype=np.int64)
        states = np.empty(T, dtype=np.int64)
        costs[j] = encode_tailbiting(x[a:a + T], ks, values, L, window, cost,
                                     gmin, bp, inputs[a:a + T], states, xr, kr,
                                     ir, sr)


@njit(cache=True)
def pack_inputs(inputs, starts, lengths, bits, offsets, out):
    """Write the new bits of every step into the stream ``out`` (uint8,
    zeroed), most significant bit first: sequence ``j`` occupies stream bits
    ``offsets[j] .. offsets[j] + bits[j] - 1``."""
    for j in range(lengths.shape[0]):
        T = lengths[j]
        Bs = bits[j]
        a = starts[j]
        pos = offsets[j]
        for t in range(T):
            k = step_bits(t + 1, T, Bs) - step_bits(t, T, Bs)
            u = np.int64(inputs[a + t])
            for i in range(k - 1, -1, -1):
                if (u >> i) & 1:
                    out[pos >> 3] |= np.uint8(0x80 >> (pos & 7))
                pos += 1


@njit(cache=True, inline="always")
def _read_bits(data, pos, n):
    """``n`` (<= 57) stream bits from bit ``pos``, most significant first."""
    v = np.uint64(0)
    first = pos >> 3
    last = (pos + n - 1) >> 3
    for b in range(first, last + 1):
        v = (v << np.uint64(8)) | np.uint64(data[b])
    drop = (last + 1) * 8 - (pos + n)
    return np.int64((v >> np.uint64(drop)) & ((np.uint64(1) << np.uint64(n))
                                              - np.uint64(1)))


@njit(cache=True, inline="always")
def _circular_bits(data, off, Bs, pos, n):
    """``n`` bits of a circular stream of ``Bs`` bits at ``off``, starting at
    (stream-relative) ``pos`` taken modulo ``Bs``."""
    pos = pos % Bs
    if pos + n <= Bs:
        return _read_bits(data, off + pos, n)
    first = Bs - pos
    hi = _read_bits(data, off + pos, first)
    return (hi << (n - first)) | _read_bits(data, off, n - first)


@njit(cache=True, parallel=True)
def decode_sequences(data, starts, lengths, bits, offsets, L, mult, shift, qbits,
                     table, scale, out):
    """``out[starts[j] + t] = scale * table[state_index(s_t)]`` (float32
    product) for every step ``t`` of every sequence ``j``.

    ``data`` is the stream with at least one byte of padding after it. The
    schedule is kept by Bresenham's rule (``k_t = q + 1`` exactly when
    ``(t r) mod T + r >= T``, ``Bs = q T + r``), and the ``k_t <= 8`` new
    bits are read from two bytes.
    """
    mask = (1 << L) - 1
    for j in prange(lengths.shape[0]):
        T = lengths[j]
        Bs = bits[j]
        off = offsets[j]
        a = starts[j]
        s = _circular_bits(data, off, Bs, Bs - L, L)
        q = Bs // T
        r = Bs - q * T
        e = 0
        pos = off
        for t in range(T):
            e += r
            k = q
            if e >= T:
                e -= T
                k += 1
            b = pos >> 3
            w = (np.int64(data[b]) << 8) | np.int64(data[b + 1])
            u = (w >> (16 - (pos & 7) - k)) & ((1 << k) - 1)
            pos += k
            s = ((s << k) | u) & mask
            out[a + t] = scale * table[state_index(s, mult, shift, qbits)]


# serialised when numba's threading layer is not thread-safe
guard_module(globals())
