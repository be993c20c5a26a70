"""The bitshift trellis code (``mode="trellis"``).

* the numba Viterbi search equals the numpy oracle (:mod:`nqlib.reference.
  trellis`) exactly -- path costs, inputs, tie-breaking -- free, constrained
  and tail-biting, on small L;
* on tiny sequences, the best circular path found by constrained Viterbi
  searches (kernel and oracle) equals a brute-force search over all 2^Bs
  streams, and the two-pass encoder is never better than it;
* tail-biting: the stored stream alone (read circularly) decodes to the path
  the encoder chose, at the cost it reported;
* the decoder equals the oracle's decode of the stream;
* through :func:`nqlib.quantize`: the file meets the rate (bits from the
  saved file size <= rate + 0.02), round trips, is deterministic, beats the
  fixed mode on Gaussian data, sketches below one bit per entry, and bad
  options and corrupted payloads raise ValueError;
* the Triton decoder (interpreter without a GPU) gives the numba decoder's
  bits; ``QuantLinear`` takes trellis weights (not trellis activations);
* Hessian-aware rounding (block LDLQ with the Viterbi search) is the plain
  code without a Hessian and lowers the output error with one.
"""

import io
import struct
import zlib

import numpy as np
import pytest

import nqlib
from nqlib.kernels.cpu import trellis as kern
from nqlib.quantizers import format as nqformat
from nqlib.quantizers import rate_control
from nqlib.quantizers import trellis as tq
from nqlib.quantizers.ldlq import quantize_ldlq_trellis
from nqlib.reference import trellis as ref


def random_case(rng, L, T, Bs):
    values = rng.standard_normal(1 << L).astype(np.float32)
    x = rng.standard_normal(T).astype(np.float32)
    return values, x


def kernel_viterbi(x, ks, values, L, start=-1, start_bits=0, end=-1, end_bits=0):
    T = x.size
    S = 1 << L
    inputs = np.zeros(T, dtype=np.uint8)
    states = np.zeros(T, dtype=np.int64)
    cost = kern.viterbi(x, ks, values, L, start, start_bits, end, end_bits,
                        np.empty(S, np.float32),
                        np.empty(S, np.float32),
                        np.empty((T, S >> 1), np.uint8), inputs, states)
    return cost, inputs, states


def kernel_encode(x, Bs, values, L, window):
    T = x.size
    inputs = np.zeros(T, dtype=np.uint8)
    costs = np.zeros(1)
    kern.encode_sequences(x, np.array([0]), np.array([T]), np.array([Bs]),
                          values, L, window, inputs, costs)
    return costs[0], inputs


# ------------------------------------------------------------ the kernels
@pytest.mark.parametrize("seed", range(12))
def test_viterbi_equals_oracle(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(3, 9))
    T = int(rng.integers(2, 40))
    kmax = min(L - 1, 4)
    Bs = int(rng.integers(T, kmax * T + 1))
    values, x = random_case(rng, L, T, Bs)
    ks = ref.schedule(T, Bs)
    assert ks.max() <= kmax
    cases = [(-1, 0, -1, 0)]
    mb = L - int(ks[0])
    mem = int(rng.integers(0, 1 << mb))
    cases.append((mem, mb, mem, mb))                      # tail-biting memory
    cases.append((int(rng.integers(0, 1 << L)), L, -1, 0))  # fixed start
    for c in cases:
        want = ref.viterbi(x, ks, values, L, *c)
        got = kernel_viterbi(x, ks, values, L, *c)
        assert got[0] == want[0]
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])


def test_viterbi_ties_go_to_the_smallest_predecessor():
    # a codebook of few distinct values makes many equal path costs
    rng = np.random.default_rng(3)
    L = 6
    values = rng.integers(-2, 3, 1 << L).astype(np.float32)
    for T, Bs in ((9, 18), (7, 21), (12, 12)):
        x = rng.integers(-2, 3, T).astype(np.float32)
        ks = ref.schedule(T, Bs)
        want = ref.viterbi(x, ks, values, L)
        got = kernel_viterbi(x, ks, values, L)
        assert got[0] == want[0]
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("L, k", [(8, 1), (8, 2), (8, 3), (8, 5), (12, 1), (12, 2),
                                  (12, 3), (12, 4), (12, 5), (12, 6), (12, 7),
                                  (12, 8), (9, 7), (11, 8)])
def test_step_equals_argmin(L, k):
    """One step of the search against numpy: the group minima over the
    strided predecessors, the smallest minimising h on a tie, and the new
    costs in the padded layout (L = 12 pads; 9, 7 and 11, 8 leave fewer than
    8 groups: the scalar path)."""
    rng = np.random.default_rng(10 * L + k)
    S, K = 1 << L, 1 << k
    G = S >> k
    cost = rng.integers(0, 4, S).astype(np.float32)  # many ties
    cost[rng.integers(0, S, S // 16)] = np.inf
    values = rng.standard_normal(S).astype(np.float32)
    xt = np.float32(rng.standard_normal())
    slots = np.array([kern.slot(s) for s in range(S)])
    n = kern.cost_size(L)
    assert n == slots[-1] + 1 and np.unique(slots).size == S
    old = np.full(n, np.nan, np.float32)  # the padding is never read
    old[slots] = cost
    new = np.full(n, np.nan, np.float32)
    arg = np.full(S >> 1, 255, np.uint8)
    kern.viterbi_step(old, new, values, xt, arg, k, S)
    cand = cost.reshape(K, G)  # cand[h, g] = cost[h G + g]
    m = cand.min(axis=0)
    np.testing.assert_array_equal(arg[:G], np.argmin(cand, axis=0))
    assert (arg[G:] == 255).all()
    d = (xt - values).astype(np.float32)
    want = (np.repeat(m, K) + d * d).astype(np.float32)
    np.testing.assert_array_equal(new[slots], want)
    assert np.isnan(np.delete(new, slots)).all()


@pytest.mark.parametrize("seed", range(6))
def test_viterbi_equals_oracle_padded(seed):
    """Trellises of 2^11 .. 2^12 states (cost arrays with padding, every
    vector step kernel, k = 1 .. 8), with ties, against the numpy oracle;
    the scratch of 2^L entries is too small for the padding and is
    replaced."""
    rng = np.random.default_rng(400 + seed)
    L = int(rng.integers(11, 13))
    T = int(rng.integers(6, 24))
    Bs = int(rng.integers(T, 8 * T + 1))
    ks = ref.schedule(T, Bs)
    if seed % 2:
        values = rng.integers(-2, 3, 1 << L).astype(np.float32)
        x = rng.integers(-2, 3, T).astype(np.float32)
    else:
        values, x = random_case(rng, L, T, Bs)
    mb = L - int(ks[0])
    mem = int(rng.integers(0, 1 << mb))
    for c in [(-1, 0, -1, 0), (mem, mb, mem, mb)]:
        want = ref.viterbi(x, ks, values, L, *c)
        got = kernel_viterbi(x, ks, values, L, *c)
        assert got[0] == want[0]
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])


def test_encode_sequences_shares_equal_the_oracle():
    """Sequences of different lengths and rates, split into 1, 2, 3 or 7
    shares (one scratch per share), give the oracle's paths and costs."""
    rng = np.random.default_rng(17)
    L = 11
    lengths = np.array([40, 33, 57, 40, 21, 64, 35])
    per = np.array([1.0, 2.0, 1.5, 3.0, 4.0, 2.3, 7.9])
    bits = np.maximum(lengths, (per * lengths).astype(np.int64))
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    x = rng.standard_normal(int(lengths.sum())).astype(np.float32)
    values = rng.standard_normal(1 << L).astype(np.float32)
    want_in = np.zeros(x.size, np.uint8)
    want_c = np.zeros(lengths.size)
    for j, (a, T, Bs) in enumerate(zip(starts, lengths, bits)):
        c, i = ref.encode_tailbiting(x[a:a + T], int(Bs), values, L, 4)
        want_in[a:a + T] = i
        want_c[j] = np.float32(c)
    for shares in (1, 2, 3, 7):
        inputs = np.zeros(x.size, np.uint8)
        costs = np.zeros(lengths.size)
        kern._encode_shares(x, starts, lengths, bits, values, L, 4, inputs, costs,
                            shares)
        np.testing.assert_array_equal(inputs, want_in)
        np.testing.assert_array_equal(costs, want_c)
    inputs = np.zeros(x.size, np.uint8)
    costs = np.zeros(lengths.size)
    kern.encode_sequences(x, starts, lengths, bits, values, L, 4, inputs, costs)
    np.testing.assert_array_equal(inputs, want_in)


def test_search_refuses_what_it_cannot_hold():
    L, T = 6, 8
    S = 1 << L
    x = np.zeros(T, np.float32)
    values = np.zeros(S, np.float32)

    def run(ks, values=values, width=S >> 1):
        return kern.viterbi(x, ks, values, L, -1, 0, -1, 0, np.empty(S, np.float32),
                            np.empty(S, np.float32), np.empty((T, width), np.uint8),
                            np.zeros(T, np.uint8), np.zeros(T, np.int64))

    for k in (0, L, 9):
        with pytest.raises(ValueError, match="new bits"):
            run(np.full(T, k))
    with pytest.raises(ValueError, match="values"):
        run(np.full(T, 2), values=values[:S // 2])
    with pytest.raises(ValueError, match="bp"):
        run(np.full(T, 1), width=S >> 2)
    with pytest.raises(ValueError, match="bits per weight"):
        kern.encode_sequences(x, np.array([0]), np.array([T]), np.array([T * L]),
                              values, L, 4, np.zeros(T, np.uint8), np.zeros(1))


@pytest.mark.parametrize("seed", range(10))
def test_two_pass_encoder_equals_oracle(seed):
    rng = np.random.default_rng(100 + seed)
    L = int(rng.integers(3, 8))
    T = int(rng.integers(3, 48))
    Bs = int(rng.integers(max(T, L), min(L - 1, 3) * T + 1))
    values, x = random_case(rng, L, T, Bs)
    for window in (1, 3, 1000):  # seam window, and the whole-sequence pass 2
        c_ref, i_ref = ref.encode_tailbiting(x, Bs, values, L, window)
        c_k, i_k = kernel_encode(x, Bs, values, L, window)
        assert c_k == np.float32(c_ref)
        np.testing.assert_array_equal(i_k, i_ref)


@pytest.mark.parametrize("seed", range(8))
def test_tail_biting_search_equals_brute_force(seed):
    rng = np.random.default_rng(200 + seed)
    L = int(rng.integers(3, 6))
    T = int(rng.integers(3, 7))
    Bs = int(rng.integers(max(T, L), min(2 * T, 12) + 1))
    values, x = random_case(rng, L, T, Bs)
    brute, _ = ref.brute_force(x, Bs, values, L)
    exact, _ = ref.exact_tailbiting(x, Bs, values, L)
    assert exact == brute
    # the same search with the numba kernel, one memory at a time
    ks = ref.schedule(T, Bs)
    mb = L - int(ks[0])
    best = min(kernel_viterbi(x, ks, values, L, m, mb, m, mb)[0]
               for m in range(1 << mb))
    assert best == brute
    # the two-pass heuristic returns a circular path: never below the optimum
    for window in (1, 1000):
        assert kernel_encode(x, Bs, values, L, window)[0] >= brute


@pytest.mark.parametrize("seed", range(6))
def test_stream_is_tail_biting(seed):
    """The stream alone, read circularly, gives the encoder's path and cost:
    no start state is stored."""
    rng = np.random.default_rng(300 + seed)
    L = int(rng.integers(4, 10))
    T = int(rng.integers(8, 80))
    Bs = int(rng.integers(max(T, L), min(L - 1, 4) * T + 1))
    values, x = random_case(rng, L, T, Bs)
    cost, inputs = kernel_encode(x, Bs, values, L, 4)
    ks = ref.schedule(T, Bs)
    bits = ref.bits_from_inputs(inputs, ks)
    assert bits.size == Bs
    states = ref.states_from_bits(bits, T, L)
    assert ref.path_cost(x, states, values) == np.float32(cost)
    # every state follows from the previous one by the shift rule, across
    # the wrap too
    prev = states[-1]
    for s, k in zip(states, ks):
        assert s >> k == prev & ((1 << (L - k)) - 1)
        prev = s


def test_decoder_equals_oracle():
    rng = np.random.default_rng(7)
    a, n_pad, L = 3, 200, 9
    total = int(2.7 * a * n_pad)
    lay = tq.layout(a, n_pad, 150, total, 64)
    lay.check(L)
    packed = rng.integers(0, 256, -(-total // 8) + 8).astype(np.uint8)
    out = np.zeros(a * n_pad, dtype=np.float32)
    table = tq.quantile_table()
    beta = np.float32(0.93)
    kern.decode_sequences(packed, lay.starts, lay.lengths, lay.bits, lay.offsets,
                          L, tq.hash_multiplier(), tq.HASH_SHIFT, tq.TABLE_BITS,
                          table, beta, out)
    values = (beta * tq.state_values(L)).astype(np.float32)
    stream = np.unpackbits(packed)
    want = np.zeros(a * n_pad, dtype=np.float32)
    for j in range(lay.count):
        o, Bs, T = lay.offsets[j], lay.bits[j], lay.lengths[j]
        st = ref.states_from_bits(stream[o:o + Bs], T, L)
        want[lay.starts[j]:lay.starts[j] + T] = values[st]
    np.testing.assert_array_equal(out, want)


def test_layout_covers_the_kept_entries_once():
    a, n_pad, keep, seq_len = 5, 104, 97, 30
    total = 2 * a * keep + 7
    lay = tq.layout(a, n_pad, keep, total, seq_len)
    hit = np.zeros(a * n_pad, dtype=int)
    for s, t in zip(lay.starts, lay.lengths):
        hit[s:s + t] += 1
        assert t <= seq_len
    want = np.zeros((a, n_pad), dtype=int)
    want[:, :keep] = 1
    np.testing.assert_array_equal(hit.reshape(a, n_pad), want)
    assert lay.bits.sum() == total
    np.testing.assert_array_equal(lay.offsets[1:], np.cumsum(lay.bits)[:-1])
    # bits in proportion to length: floor(T B / E) or one more
    share = lay.lengths * total // (a * keep)
    assert np.all((lay.bits == share) | (lay.bits == share + 1))


@pytest.mark.parametrize("keep, total", [(4000, 4000), (4001, 4003), (97, 776)])
def test_layout_gives_every_sequence_its_bits(keep, total):
    """Sequences of unequal lengths at the lowest and highest rates still
    get 1 to 8 bits per entry (the sketched 1-bit case of a 4096 x 256
    matrix once failed here)."""
    for a in (1, 3, 256):
        lay = tq.layout(a, 4096, keep, total * a, 1024)
        assert np.all(lay.bits >= lay.lengths)
        assert np.all(lay.bits <= tq.MAX_K * lay.lengths)


def test_code_design_is_built_by_code():
    assert tq.hash_multiplier() == 2654435769
    t = tq.quantile_table()
    assert t.size == 1 << tq.TABLE_BITS and np.all(np.diff(t) > 0)
    assert abs(float(np.mean(t.astype(np.float64) ** 2)) - 1.0) < 1e-6
    v = tq.state_values(12)
    # the hashed states look like N(0, 1) draws: moments, and the table
    # indices spread evenly over 64 bins (chi-square, 63 degrees of freedom)
    v64 = v.astype(np.float64)
    assert abs(v64.mean()) < 0.05 and abs(v64.var() - 1.0) < 0.05
    counts = np.bincount(np.searchsorted(t, v) >> (tq.TABLE_BITS - 6),
                         minlength=64)
    chi2 = float((((counts - counts.mean()) ** 2) / counts.mean()).sum())
    assert chi2 < 100  # the 0.999 quantile of chi-square(63) is 103


def test_kernels_import_no_higher_layer():
    import inspect

    src = inspect.getsource(kern)
    for layer in ("nqlib.quantizers", "nqlib.matmul", "nqlib.nn", "nqlib.theory"):
        assert layer not in src


# ------------------------------------------------------- through quantize
def gaussian(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("rate", [1.0, 1.5, 2.0, 3.3, 4.0])
def test_rate_from_the_saved_file(rate, tmp_path):
    n, a = 1024, 4
    Q = nqlib.quantize(gaussian((n, a)), rate, mode="trellis", seed=2)
    path = tmp_path / "w.nqm"
    Q.save(path)
    bits = 8 * path.stat().st_size / (n * a)
    assert bits <= rate + rate_control.RATE_TOLERANCE
    assert bits > rate - 0.05  # the budget is spent
    # at 1 bit, this small shape's side information (0.17 bit per entry)
    # leaves less than a bit per entry: the code sketches
    assert (Q.payload.keep == Q.n_pad) == (rate >= 1.5)


def test_round_trip_and_product():
    A, B = gaussian((200, 5), 1), gaussian((200, 4), 2)
    QA = nqlib.quantize(A, 3.0, mode="trellis", seed=5)
    QB = nqlib.quantize(B, 3.0, mode="trellis", seed=5)
    buf = io.BytesIO()
    QA.save(buf)
    buf.seek(0)
    R = nqlib.load(buf)
    assert R.to_bytes() == QA.to_bytes() and R.mode == "trellis"
    np.testing.assert_array_equal(R.dequantize(), QA.dequantize())
    C = nqlib.inner_products(R, QB)
    np.testing.assert_allclose(C, QA.dequantize().T @ QB.dequantize(),
                               rtol=1e-10, atol=1e-10)
    assert nqlib.matmul_distortion(A, B, C) < 0.1
    # deterministic: the same input gives the same bytes
    again = nqlib.quantize(A, 3.0, mode="trellis", seed=5)
    assert again.to_bytes() == QA.to_bytes()


def test_beats_the_fixed_mode_on_gaussian_data():
    A = gaussian((1024, 8), 4)
    for rate in (2.0, 3.0):
        err = {}
        for mode in ("fixed", "trellis"):
            Q = nqlib.quantize(A, rate, mode=mode, seed=1)
            err[mode] = float(((Q.dequantize() - A) ** 2).mean())
        assert err["trellis"] < err["fixed"], (rate, err)


def test_sketch_below_one_bit():
    A = gaussian((512, 4), 6)
    Q = nqlib.quantize(A, 0.6, mode="trellis")
    assert Q.payload.keep < Q.n_pad
    assert Q.bits_per_entry <= 0.6 + rate_control.RATE_TOLERANCE
    err = float(((Q.dequantize() - A) ** 2).mean())
    assert err < 0.85 * float((A * A).mean())  # better than decoding to 0
    with pytest.raises(ValueError, match="at least 1 bit per coded entry"):
        nqlib.quantize(A, 0.6, mode="trellis", sketch=False)


def test_bad_options():
    A = gaussian((64, 3))
    with pytest.raises(ValueError, match="dither"):
        nqlib.quantize(A, 2.0, mode="trellis", dither=True)
    with pytest.raises(ValueError, match="mode"):
        nqlib.quantize(A, 2.0, mode="trelis")


def trellis_file():
    Q = nqlib.quantize(gaussian((128, 3), 9), 2.0, mode="trellis", seed=4)
    data = Q.to_bytes()
    body = data[:-4]
    npk = Q.payload.packed.size
    start = len(body) - npk - nqformat.TRELLIS_PAYLOAD_BYTES
    # the file ends with the payload (no zero padding at this rate)
    assert struct.unpack_from("<" + nqformat.TRELLIS_HEADER, body, start)[0] == \
        Q.payload.L
    return Q, body, start


def edited(body, start, **fields):
    names = ("L", "qbits", "seq_len", "keep", "beta", "total_bits")
    head = struct.unpack_from("<" + nqformat.TRELLIS_HEADER, body, start)
    vals = dict(zip(names, head))
    vals.update(fields)
    head = struct.pack("<" + nqformat.TRELLIS_HEADER, *(vals[k] for k in names))
    out = body[:start] + head + body[start + len(head):]
    return out + struct.pack("<I", zlib.crc32(out))


@pytest.mark.parametrize("field, value, message", [
    ("L", 1, "state bits"),
    ("L", 21, "state bits"),
    ("L", 2, "L = 2 state bits"),
    ("qbits", 11, "table bits"),
    ("seq_len", 0, "sequence length"),
    ("keep", 0, "kept entries"),
    ("keep", 10**6, "kept entries"),
    ("beta", float("nan"), "beta"),
    ("beta", float("inf"), "beta"),
    ("beta", -1.0, "beta"),
    ("total_bits", 10, "bits for"),
    ("total_bits", 2**40, "bits for"),
])
def test_corrupted_payload_is_refused(field, value, message):
    _, body, start = trellis_file()
    with pytest.raises(ValueError, match=message):
        nqlib.QuantizedMatrix.from_bytes(edited(body, start, **{field: value}))


def test_truncated_or_padded_stream_is_refused():
    Q, body, start = trellis_file()
    total = Q.payload.total_bits
    # one bit more than the stream holds: a byte is missing (or the
    # file's length no longer matches)
    longer = edited(body, start, total_bits=total + 8)
    with pytest.raises(ValueError):
        nqlib.QuantizedMatrix.from_bytes(longer)
    if total % 8:
        last = bytearray(body)
        last[-1] |= 1  # a padding bit of the stream
        with pytest.raises(ValueError, match="padding bits"):
            nqlib.QuantizedMatrix.from_bytes(bytes(last) + struct.pack(
                "<I", zlib.crc32(bytes(last))))


def test_triton_decoder_is_bit_identical():
    """The Triton decoder (the interpreter on a CPU-only machine) gives the
    numba decoder's bits."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    import torch

    from nqlib.quantizers.payloads import TrellisPayload

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(12)
    for a, n_pad, keep, rate, L, seq_len in ((3, 200, 200, 2.6, 9, 64),
                                             (2, 96, 40, 1.0, 6, 300)):
        total = int(rate * a * keep)
        lay = tq.layout(a, n_pad, keep, total, seq_len)
        lay.check(L)
        packed = rng.integers(0, 256, -(-total // 8)).astype(np.uint8)
        payload = TrellisPayload(L=L, qbits=tq.TABLE_BITS, seq_len=seq_len,
                                 keep=keep, beta=0.91, total_bits=total,
                                 packed=packed)
        want = tq.decode(payload, a, n_pad)
        got = tq.decode_tensor(payload, a, n_pad, device=device)
        np.testing.assert_array_equal(got.cpu().numpy().astype(np.float64), want)


def test_quant_linear_with_a_trellis_weight():
    torch = pytest.importorskip("torch")
    from nqlib.nn import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 6)
    q = QuantLinear.from_linear(lin, 3.0, mode="trellis")
    assert q.quantized_weight.mode == "trellis"
    x = torch.randn(4, 512)
    W = q.dequantized_weight()
    with torch.no_grad():
        want = x @ W.T + lin.bias
        np.testing.assert_allclose(q(x).numpy(), want.numpy(), rtol=1e-5,
                                   atol=1e-5)
        rel = float(((W - lin.weight) ** 2).mean() / (lin.weight ** 2).mean())
    assert rel < 0.05
    # activations are encoded at every call: not by a Viterbi search
    with pytest.raises(ValueError, match="act_mode='trellis'"):
        QuantLinear.from_linear(lin, 3.0, mode="trellis", act_rate=4.0,
                                act_mode="trellis")


# ---------------------------------------------- Hessian-aware rounding
def output_loss(A, A_hat, H):
    E = A_hat - A
    return float(np.einsum("ia,ij,ja->", E, H, E))


def test_ldlq_without_a_hessian_is_the_plain_code():
    A = gaussian((256, 5), 21)
    plain = nqlib.quantize(A, 3.0, mode="trellis", center=False, seed=2)
    q = quantize_ldlq_trellis(A, 3.0, np.eye(256), center=False, seed=2,
                         seq_len=tq.DEFAULT_SEQ_LEN)
    assert q.payload.beta == plain.payload.beta
    np.testing.assert_array_equal(q.payload.packed, plain.payload.packed)


def test_ldlq_lowers_the_output_error():
    rng = np.random.default_rng(22)
    n, a = 512, 8
    A = rng.standard_normal((n, a))
    X = rng.standard_normal((4 * n, 16)) @ rng.standard_normal((16, n))
    X += 0.1 * rng.standard_normal(X.shape)  # activations near a 16-dim space
    H = X.T @ X / X.shape[0]
    q = quantize_ldlq_trellis(A, 2.0, H, seed=3)
    plain = quantize_ldlq_trellis(A, 2.0, np.eye(n), seed=3)  # same layout, no H
    assert q.bits_per_entry <= 2.0
    R = nqlib.QuantizedMatrix.from_bytes(q.to_bytes())
    np.testing.assert_array_equal(R.dequantize(), q.dequantize())
    assert output_loss(A, q.dequantize(), H) < 0.7 * output_loss(
        A, plain.dequantize(), H)


def test_ldlq_bad_hessian():
    A = gaussian((64, 3))
    with pytest.raises(ValueError, match="H must have shape"):
        quantize_ldlq_trellis(A, 2.0, np.eye(63))
    with pytest.raises(ValueError, match="damp"):
        quantize_ldlq_trellis(A, 2.0, np.eye(64), damp=-1.0)


def test_quant_linear_ldlq_with_the_trellis():
    torch = pytest.importorskip("torch")
    from nqlib.nn import QuantLinear

    torch.manual_seed(1)
    lin = torch.nn.Linear(256, 4)
    X = np.random.default_rng(2).standard_normal((512, 256))
    H = X.T @ X / 512
    q = QuantLinear.from_linear(lin, 3.0, method="nested-ldlq", mode="trellis",
                                hessian=H)
    assert q.quantized_weight.mode == "trellis"
    with pytest.raises(ValueError, match="fixed or the trellis mode"):
        QuantLinear.from_linear(lin, 3.0, method="nested-ldlq",
                                mode="variable", hessian=H)


# ------------------------------------------------------ the state bits
def test_state_bits_option():
    A = gaussian((1024, 4), 31)
    small = nqlib.quantize(A, 2.0, mode="trellis", seed=1, state_bits=8)
    default = nqlib.quantize(A, 2.0, mode="trellis", seed=1)
    assert small.payload.L == 8 and default.payload.L == tq.DEFAULT_L
    # this shape does not lower L = 8, and the decoder reads L from the file
    lay = tq.layout(4, small.n_pad, small.n_pad, small.payload.total_bits,
                    tq.DEFAULT_SEQ_LEN)
    assert tq.choose_L(lay, 8) == 8
    R = nqlib.QuantizedMatrix.from_bytes(small.to_bytes())
    np.testing.assert_array_equal(R.dequantize(), small.dequantize())
    assert small.bits_per_entry == default.bits_per_entry
    # fewer states, a larger error (the same budget)
    err = {q.payload.L: float(((q.dequantize() - A) ** 2).mean())
           for q in (small, default)}
    assert err[8] > err[tq.DEFAULT_L], err
    ldlq = quantize_ldlq_trellis(A, 2.0, np.eye(1024), seed=1, state_bits=9)
    assert ldlq.payload.L == 9


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="fixed", state_bits=12), "state_bits=12 does not apply"),
    (dict(state_bits=12), "only the trellis mode"),
    (dict(method="ecsq", state_bits=12), "state_bits=12 does not apply"),
    (dict(mode="trellis", state_bits=1), "state_bits must be >= 2"),
    (dict(mode="trellis", state_bits=21), "state_bits must be <= 20"),
    (dict(mode="trellis", state_bits=12.0), "state_bits must be an integer"),
])
def test_state_bits_refused_where_it_does_not_apply(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nqlib.quantize(gaussian((64, 3)), 2.0, **kwargs)


def test_state_bits_in_the_layer_config():
    pytest.importorskip("torch")
    from nqlib.nn import QuantConfig, QuantLinear

    cfg = QuantConfig(weight_rate=2.0, mode="trellis", state_bits=10)
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert cfg.linear_kwargs()["state_bits"] == 10
    # a config written before the field existed still reads
    old = {k: v for k, v in cfg.to_dict().items() if k != "state_bits"}
    assert QuantConfig.from_dict(old).state_bits is None
    for bad in (dict(weight_rate=2.0, state_bits=10),
                dict(weight_rate=2.0, method="nested-ldlq", state_bits=10),
                dict(weight_rate=2, method="rtn", state_bits=10)):
        with pytest.raises(ValueError, match="state_bits"):
            QuantConfig(**bad)
    import torch

    lin = torch.nn.Linear(256, 4)
    q = QuantLinear.from_linear(lin, 2.0, mode="trellis", state_bits=10)
    assert q.quantized_weight.payload.L == 10
    with pytest.raises(ValueError, match="state_bits"):
        QuantLinear.from_linear(lin, 2.0, mode="fixed", state_bits=10)
