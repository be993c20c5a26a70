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

A step is one pass (:func:`viterbi_step`) from one cost array into another:
8 groups per vector, their ``2^k`` predecessors as ``2^k`` contiguous loads,
the minimum and its ``h`` by compares and selects, and the ``8 2^k`` new
costs as contiguous stores, each group minimum spread over its members by a
lane permute. It is written as LLVM vector IR (numba ``@intrinsic``)
without ``fastmath``, so it computes what the scalar loop computes, bit for
bit. The cost arrays are padded (:func:`slot`) so that the ``2^k`` rows of
predecessors, ``2^(L-k)`` states apart, do not fall into one L1 cache set.

Arrays in, arrays out; no imports from the rest of nqlib but the guard and
the IR helpers of :mod:`nqlib.kernels.cpu.fused`.
Book: chapter "Beyond E8: trellis codes", label ``ch-trellis``.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from nqlib.kernels.cpu.fused import Emit, array_data
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


# ---------------------------------------------------------------- the search
#: a cost array leaves ``PAD`` unused entries after every ``2^PAD_SHIFT``
#: states (:func:`slot`)
PAD_SHIFT = 10
PAD_LOG = 4
PAD = 1 << PAD_LOG
#: groups per vector of the step kernels (8 float32 lanes: one AVX2 register)
LANES = 8
#: largest ``k`` whose step kernel is unrolled over the ``2^k`` predecessors
UNROLLED_BITS = 4
#: most new bits per step (the search keeps the minimising ``h`` in a byte)
MAX_STEP_BITS = 8

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
_V8F = ir.VectorType(_F32, LANES)
_V8I = ir.VectorType(_I32, LANES)
_V8B = ir.VectorType(_I8, LANES)


@njit(cache=True, inline="always")
def slot(s):
    """Where the cost of state ``s`` lives in a cost array: ``s`` plus
    ``PAD`` unused entries per ``2^PAD_SHIFT`` states before it. The ``2^k``
    predecessors of a group are ``2^(L-k)`` states apart; without the
    padding, for large ``L`` they would all fall into one set of the L1
    cache and evict each other."""
    return s + ((s >> PAD_SHIFT) << PAD_LOG)


@njit(cache=True, inline="always")
def cost_size(L):
    """Entries of a cost array of ``2^L`` states (see :func:`slot`)."""
    return slot((1 << L) - 1) + 1


def _c64(v):
    return ir.Constant(_I64, v)


def _ir_slot(b, s):
    """:func:`slot` in IR."""
    return b.add(s, b.shl(b.lshr(s, _c64(PAD_SHIFT)), _c64(PAD_LOG)))


def _vload(b, ptr, at):
    return Emit(b).load_vec(ptr, at, _V8F)


def _vstore(b, val, ptr, at):
    Emit(b).store_vec(val, ptr, at, align=1)


def _keep_smaller(b, c, m, a, h):
    """One round of the group minimum: ``c < m`` takes the candidate
    (cost ``c``, predecessor ``h``); a tie keeps the earlier, smaller
    ``h``. Returns the new ``(m, a)``."""
    lt = b.fcmp_ordered("<", c, m)
    return b.select(lt, c, m), b.select(lt, h, a)


def _add_error(b, m, xs, pv, at, pn, to):
    """``new[to + i] = m_i + (x - values[at + i])^2`` for 8 lanes ``i``:
    float32 subtraction, product and sum, in the scalar order."""
    d = b.fsub(xs, _vload(b, pv, at))
    _vstore(b, b.fadd(m, b.fmul(d, d)), pn, to)


def _step_codegen(k):
    """IR of one step over ``nb`` blocks of 8 groups from group ``c0`` (see
    :func:`viterbi_step`). ``k <= UNROLLED_BITS``: the ``2^k`` predecessors
    and the ``2^k`` vectors of new costs are unrolled; the caller keeps
    ``c0 .. c0 + 8 nb`` inside one padding period, so each predecessor row
    and the new costs are contiguous. Larger ``k``: loops over them, with
    :func:`slot` per access."""
    K = 1 << k

    def codegen(context, builder, sig, args):
        old, new, values, xt, arg, c0, G, nb = args
        t = sig.args
        b = builder
        em = Emit(b)
        po = array_data(context, b, t[0], old)
        pn = array_data(context, b, t[1], new)
        pv = array_data(context, b, t[2], values)
        pa = array_data(context, b, t[4], arg)
        xs = em.splat(xt, _V8F)
        # the minimising h rides along as a float (exact below 2^24): its
        # selects are the same blends as the minimum's, and one conversion
        # to bytes ends the block
        zero = ir.Constant(_V8F, [0.0] * LANES)
        undef = ir.Constant(_V8F, ir.Undefined)
        if k <= UNROLLED_BITS:
            rows = [_ir_slot(b, b.add(b.mul(G, _c64(h)), c0)) for h in range(K)]
            vbase = b.mul(c0, _c64(K))
            nbase = _ir_slot(b, vbase)
            with cgutils.for_range(b, nb) as loop:
                g = b.mul(loop.index, _c64(LANES))
                m = _vload(b, po, b.add(rows[0], g))
                a = zero
                for h in range(1, K):
                    m, a = _keep_smaller(b, _vload(b, po, b.add(rows[h], g)), m, a,
                                         ir.Constant(_V8F, [float(h)] * LANES))
                _vstore(b, b.fptoui(a, _V8B), pa, b.add(c0, g))
                gK = b.mul(g, _c64(K))
                for j in range(K):
                    # new states g K + 8 j .. + 7: groups (8 j + lane) / K
                    mask = [(LANES * j + lane) // K for lane in range(LANES)]
                    mv = b.shuffle_vector(m, undef, ir.Constant(_V8I, mask))
                    o = b.add(gK, _c64(LANES * j))
                    _add_error(b, mv, xs, pv, b.add(vbase, o), pn, b.add(nbase, o))
            return context.get_dummy_value()
        m_slot = cgutils.alloca_once(b, _V8F)
        a_slot = cgutils.alloca_once(b, _V8F)
        one = _c64(1)
        with cgutils.for_range(b, nb) as loop:
            g = b.add(c0, b.mul(loop.index, _c64(LANES)))
            b.store(_vload(b, po, _ir_slot(b, g)), m_slot)
            b.store(zero, a_slot)
            with cgutils.for_range_slice(b, one, _c64(K), one, inc=True) as (h, _):
                c = _vload(b, po, _ir_slot(b, b.add(b.mul(G, h), g)))
                m, a = _keep_smaller(b, c, b.load(m_slot), b.load(a_slot),
                                     em.splat(b.uitofp(h, _F32), _V8F))
                b.store(m, m_slot)
                b.store(a, a_slot)
            m = b.load(m_slot)
            _vstore(b, b.fptoui(b.load(a_slot), _V8B), pa, g)
            for lane in range(LANES):
                ml = em.splat(b.extract_element(m, ir.Constant(_I32, lane)), _V8F)
                s0 = b.mul(b.add(g, _c64(lane)), _c64(K))
                with cgutils.for_range(b, _c64(K // LANES)) as q:
                    o = b.add(s0, b.mul(q.index, _c64(LANES)))
                    _add_error(b, ml, xs, pv, o, pn, _ir_slot(b, o))
        return context.get_dummy_value()

    return codegen


def _contiguous(ty, dtype):
    return (isinstance(ty, types.Array) and ty.ndim == 1 and ty.layout == "C"
            and ty.dtype == dtype)


def _step_intrinsic(k):
    @intrinsic
    def _step(typingctx, old, new, values, xt, arg, c0, G, nb):
        if not (_contiguous(old, types.float32) and _contiguous(new, types.float32)
                and _contiguous(values, types.float32)
                and _contiguous(arg, types.uint8)):
            raise TypingError("the Viterbi step needs contiguous float32 costs "
                              "and values and a contiguous uint8 row of bp")
        sig = types.void(old, new, values, types.float32, arg, types.int64,
                         types.int64, types.int64)
        return sig, _step_codegen(k)

    return _step


_step_k1, _step_k2, _step_k3, _step_k4 = (_step_intrinsic(k) for k in range(1, 5))
_step_k5, _step_k6, _step_k7, _step_k8 = (_step_intrinsic(k) for k in range(5, 9))


@njit(cache=True)
def _step_scalar(old, new, values, xt, arg, k, S):
    """:func:`viterbi_step` one group at a time (fewer than 8 groups)."""
    K = 1 << k
    G = S >> k
    for g in range(G):
        m = old[slot(g)]
        a = 0
        for h in range(1, K):
            c = old[slot(h * G + g)]
            if c < m:
                m = c
                a = h
        arg[g] = np.uint8(a)
        for u in range(K):
            s = g * K + u
            d = xt - values[s]
            new[slot(s)] = m + d * d


@njit(cache=True)
def viterbi_step(old, new, values, xt, arg, k, S):
    """One step of the search, ``k`` new bits, ``S = 2^L`` states.

    For every group ``g < G = S / 2^k``: ``m = min_h old[slot(h G + g)]``
    over its ``2^k`` predecessors ``h G + g``, ``arg[g]`` the smallest
    minimising ``h``, and for its members ``s = g 2^k + u``: ``new[slot(s)]
    = m + (xt - values[s])^2`` (float32: subtraction, square, sum). One pass
    per step, 8 groups per vector: the predecessors are 8 contiguous costs
    per ``h``, the group minima are spread over the new costs by lane
    permutes (LLVM vector IR: numba's auto-vectoriser turns neither the
    strided minimum nor the spread into vector code), no ``fastmath``, so
    the results are those of the scalar loop, bit for bit.

    ``old`` and ``new`` (:func:`cost_size` entries, :func:`slot` layout) are
    distinct arrays; ``arg`` holds at least ``G`` bytes.
    """
    G = S >> k
    if G < LANES:
        _step_scalar(old, new, values, xt, arg, k, S)
        return
    # blocks of 8 groups; for k <= 4, chunks inside one padding period
    CH = min(G, (1 << PAD_SHIFT) >> k)
    nb = CH // LANES
    if k == 1:
        for c0 in range(0, G, CH):
            _step_k1(old, new, values, xt, arg, c0, G, nb)
    elif k == 2:
        for c0 in range(0, G, CH):
            _step_k2(old, new, values, xt, arg, c0, G, nb)
    elif k == 3:
        for c0 in range(0, G, CH):
            _step_k3(old, new, values, xt, arg, c0, G, nb)
    elif k == 4:
        for c0 in range(0, G, CH):
            _step_k4(old, new, values, xt, arg, c0, G, nb)
    elif k == 5:
        _step_k5(old, new, values, xt, arg, 0, G, G // LANES)
    elif k == 6:
        _step_k6(old, new, values, xt, arg, 0, G, G // LANES)
    elif k == 7:
        _step_k7(old, new, values, xt, arg, 0, G, G // LANES)
    else:
        _step_k8(old, new, values, xt, arg, 0, G, G // LANES)


@njit(cache=True)
def _search(x, ks, values, L, start, start_bits, end, end_bits, cost, spare, bp,
            inputs, states):
    """:func:`viterbi` on checked arguments and scratch of full size."""
    T = x.shape[0]
    S = 1 << L
    smask = (1 << start_bits) - 1
    for s in range(S):
        if start < 0 or (s & smask) == start:
            cost[slot(s)] = 0.0
        else:
            cost[slot(s)] = np.inf
    old = cost
    new = spare
    for t in range(T):
        viterbi_step(old, new, values, x[t], bp[t], ks[t], S)
        old, new = new, old
    best = np.float32(np.inf)
    state = 0
    emask = (1 << end_bits) - 1
    for s in range(S):
        c = old[slot(s)]
        if (end < 0 or (s & emask) == end) and c < best:
            best = c
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
def viterbi(x, ks, values, L, start, start_bits, end, end_bits, cost, spare, bp,
            inputs, states):
    """Best path of one sequence.

    Parameters
    ----------
    x : float32 (T,)
        The weights.
    ks : int64 (T,)
        New bits per step (1 .. min(8, L - 1)).
    values : float32 (2^L,), contiguous
        Reconstruction of every state.
    L : int
        State bits.
    start, start_bits : int
        ``start = -1``: any state before step 0. Otherwise the state before
        step 0 has low ``start_bits`` bits equal to ``start``.
    end, end_bits : int
        The same for the state after the last step (``-1``: free).
    cost, spare : float32, contiguous
        Scratch: the costs of the states before and after a step, in the
        layout of :func:`slot` (:func:`cost_size` entries; smaller arrays,
        such as ``2^L`` entries for ``L > 10``, are replaced by new ones).
    bp : uint8 (T, >= 2^(L - min(ks))), C order
        Scratch: the minimising predecessor of every group of every step.
    inputs : uint8 (T,), states : int64 (T,)
        Output: the ``ks[t]`` new bits of every step, and the state after it.

    Returns
    -------
    float
        The path cost ``sum_t (x_t - values[s_t])^2`` (float32 sums), or
        ``inf`` when no path meets the constraints. Ties go to the
        smallest predecessor, then to the smallest final state.

    Raises
    ------
    ValueError
        On a step of ``ks`` outside 1 .. min(8, L - 1), or ``values``,
        ``bp``, ``inputs``, ``states`` too small.
    """
    T = x.shape[0]
    S = 1 << L
    kmin = MAX_STEP_BITS
    for t in range(T):
        k = ks[t]
        if k < 1 or k > MAX_STEP_BITS or k >= L:
            raise ValueError("viterbi: every step needs 1 to min(8, L - 1) new "
                             "bits")
        kmin = min(kmin, k)
    if values.shape[0] < S:
        raise ValueError("viterbi: values needs 2^L entries")
    if T > 0 and (bp.shape[0] < T or bp.shape[1] < (S >> kmin)):
        raise ValueError("viterbi: bp needs (T, 2^(L - min(ks))) entries")
    if inputs.shape[0] < T or states.shape[0] < T:
        raise ValueError("viterbi: inputs and states need T entries")
    n = cost_size(L)
    if cost.shape[0] < n:
        cost = np.empty(n, dtype=np.float32)
    if spare.shape[0] < n:
        spare = np.empty(n, dtype=np.float32)
    return _search(x, ks, values, L, start, start_bits, end, end_bits, cost, spare,
                   bp, inputs, states)


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
def encode_tailbiting(x, ks, values, L, window, cost, spare, bp, inputs, states,
                      xr, kr, ur, sr):
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
    tail-biting memory. ``cost``, ``spare``, ``bp``: the scratch of
    :func:`viterbi`, full size (``cost_size(L)``; ``bp`` rows of ``2^(L -
    min(ks))``); ``xr``, ``kr``, ``ur``, ``sr``: scratch of length ``T``.
    Returns the path cost (float32 sums, as :func:`viterbi`).
    """
    T = x.shape[0]
    h = T // 2
    for i in range(T):
        j = (i + h) % T
        xr[i] = x[j]
        kr[i] = ks[j]
    _search(xr, kr, values, L, -1, 0, -1, 0, cost, spare, bp, ur, sr)
    w = seam_window(T, ks, L, window)
    if w == 0:
        # the state after step h - 1 (rotated index T - h - 1) as memory
        mb = L - ks[0]
        mem = sr[T - h - 1] & ((1 << mb) - 1)
        return _search(x, ks, values, L, mem, mb, mem, mb, cost, spare, bp,
                       inputs, states)
    for i in range(T):
        j = (i + h) % T
        inputs[j] = ur[i]
        states[j] = sr[i]
    a = h - w
    b = h + w
    mb = L - ks[b % T]
    start = states[a - 1]
    end = states[b - 1] & ((1 << mb) - 1)
    _search(x[a:b], ks[a:b], values, L, start, L, end, mb, cost, spare, bp,
            inputs[a:b], states[a:b])
    total = np.float32(0.0)
    for t in range(T):
        d = x[t] - values[states[t]]
        total += d * d
    return np.float64(total)


def encode_sequences(x, starts, lengths, bits, values, L, window, inputs, costs):
    """Tail-biting paths of many sequences, in parallel.

    ``x`` (float32, flat): the weights; sequence ``j`` is
    ``x[starts[j] : starts[j] + lengths[j]]`` with ``bits[j]`` stream bits
    (``1 <= bits[j] / lengths[j] <= min(8, L - 1)``). ``values``: float32
    (2^L,), contiguous. Writes the per-step new bits into ``inputs``
    (uint8, same layout as ``x``) and the path costs into ``costs``
    (float64, one per sequence). Each of numba's threads allocates its
    scratch once (two cost arrays and about ``T 2^(L - k)`` bytes of back
    pointers) and runs a contiguous share of the sequences.
    """
    _encode_shares(x, starts, lengths, bits, values, L, window, inputs, costs,
                   numba.get_num_threads())


@njit(cache=True, parallel=True)
def _encode_shares(x, starts, lengths, bits, values, L, window, inputs, costs,
                   threads):
    """:func:`encode_sequences` in ``min(threads, count)`` shares."""
    S = 1 << L
    n = lengths.shape[0]
    if values.shape[0] < S:
        raise ValueError("encode_sequences: values needs 2^L entries")
    Tmax = 0
    kmin = MAX_STEP_BITS
    for j in range(n):
        T = lengths[j]
        B = bits[j]
        if T < 1 or B < T or B > min(MAX_STEP_BITS, L - 1) * T:
            raise ValueError("encode_sequences: every sequence needs 1 to "
                             "min(8, L - 1) bits per weight")
        Tmax = max(Tmax, T)
        kmin = min(kmin, B // T)
    chunks = min(n, threads)
    for c in prange(chunks):
        cost = np.empty(cost_size(L), dtype=np.float32)
        spare = np.empty(cost_size(L), dtype=np.float32)
        bp = np.empty((Tmax, S >> kmin), dtype=np.uint8)
        ks = np.empty(Tmax, dtype=np.int64)
        xr = np.empty(Tmax, dtype=np.float32)
        kr = np.empty(Tmax, dtype=np.int64)
        ur = np.empty(Tmax, dtype=np.uint8)
        sr = np.empty(Tmax, dtype=np.int64)
        states = np.empty(Tmax, dtype=np.int64)
        for j in range(c * n // chunks, (c + 1) * n // chunks):
            T = lengths[j]
            a = starts[j]
            schedule(T, bits[j], ks[:T])
            costs[j] = encode_tailbiting(x[a:a + T], ks[:T], values, L, window,
                                         cost, spare, bp, inputs[a:a + T],
                                         states[:T], xr[:T], kr[:T], ur[:T],
                                         sr[:T])


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
