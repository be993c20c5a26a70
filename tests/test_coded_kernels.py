"""The compiled coded-domain passes (:mod:`nqlib.kernels.cpu.coded`) and the
per-thread scratch buffers (:mod:`nqlib._scratch`).

The kernels replace numpy pipelines that hold the reference arithmetic:
numpy's pairwise sums, the centring, normalisation, padding and rotation of
:func:`~nqlib.quantizers.coded_domain.coded_rows`, the projection and MMSE
sums of :func:`~nqlib.quantizers.coded_domain.mmse_sums`, and the chunked
fixed-mode encoder. Each is checked against its reference bit for bit
(signed zeros included): the quantized bytes must not depend on which
path made them.
"""

import threading

import numpy as np
import pytest

from nqlib import _scratch
from nqlib.kernels.cpu import coded
from nqlib.quantizers import coded_domain, matrix
from nqlib.quantizers.hadamard import RandomHadamard


def _bits(x):
    return np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)


# --------------------------------------------------------- pairwise sums
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_pairwise_sum_is_numpys_sum(mode):
    rng = np.random.default_rng(3)
    lengths = list(range(0, 260)) + [383, 384, 1000, 1031, 4096, 10007, 65539]
    for n in lengths:
        a = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, size=n)
        b = rng.standard_normal(n)
        want = {0: np.sum(a), 1: np.sum(a * b), 2: np.sum(a * a)}[mode]
        got = coded.pairwise_sum(a, b, 0, n, mode)
        assert _bits(got) == _bits(want), (n, got, want)
        if n > 20:        # a run that starts inside the array
            want = {0: np.sum(a[7:]), 1: np.sum(a[7:] * b[7:]),
                    2: np.sum(a[7:] * a[7:])}[mode]
            assert _bits(coded.pairwise_sum(a, b, 7, n - 7, mode)) == _bits(want)


def test_pairwise_sum_signed_zeros():
    for n in (1, 5, 8, 100, 300):
        z = -np.zeros(n)
        assert _bits(coded.pairwise_sum(z, z, 0, n, 0)) == _bits(np.sum(z))


# ------------------------------------------------------------ coded rows
def _reference_coded_rows(A, n_pad, center, normalize, P):
    """The numpy pipeline of coded_rows (one chunk)."""
    X = np.array(A.T, dtype=np.float64, order="C")
    means = norms = None
    if center:
        means = X.mean(axis=1).astype(np.float32)
        X -= means.astype(np.float64)[:, None]
    if normalize:
        norms = np.sqrt((X * X).sum(axis=1)).astype(np.float32)
    return coded_domain.scaled_padded_rotated(X, n_pad, norms, P), means, norms


@pytest.mark.parametrize("n", [8, 24, 40, 64, 96, 130, 384, 576, 1000, 1536,
                               2752])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_coded_rows_kernel_is_the_numpy_pipeline(n, dtype):
    rng = np.random.default_rng(n)
    a = 9
    A = (rng.standard_normal((n, a)) * rng.uniform(0.01, 100, a)
         + rng.uniform(-3, 3, a)).astype(dtype)
    A[:, 2] = 0.0                        # a zero column: its norm is 0
    A[:, 3] = 1.5                        # a constant column: 0 once centred
    A[::3, 4] = -0.0
    n_pad = coded_domain.padded(n)
    for center in (False, True):
        for normalize in (False, True):
            for P in (None, RandomHadamard(n_pad, seed=n + 1)):
                for layout in (A, np.asfortranarray(A)):
                    got = coded_domain.coded_rows(layout, n_pad, center,
                                                  normalize, P)
                    want = _reference_coded_rows(layout, n_pad, center,
                                                 normalize, P)
                    np.testing.assert_array_equal(_bits(got[0]), _bits(want[0]))
                    for g, w in zip(got[1:], want[1:]):
                        if w is None:
                            assert g is None
                        else:
                            np.testing.assert_array_equal(g.view(np.uint32),
                                                          w.view(np.uint32))


def test_coded_rows_writes_into_out():
    A = np.random.default_rng(0).standard_normal((64, 5))
    P = RandomHadamard(64, seed=2)
    out = np.full((5, 64), np.nan)
    Y, _, _ = coded_domain.coded_rows(A, 64, True, True, P, out=out)
    assert Y is out
    np.testing.assert_array_equal(Y, coded_domain.coded_rows(A, 64, True, True, P)[0])


# ---------------------------------------------- fixed mode, decode kept
CASES = [
    ((512, 16), 4.0),      # h < B: two parts
    ((384, 40), 4.0),
    ((4096, 11), 4.0),     # parts longer than PART_CHUNK blocks, with tails
    ((1536, 11), 2.0),
    ((256, 30), 8.0),      # the highest rate
    ((1024, 12), 0.6),     # sketching: blocks dropped (L_lo = 0)
]


@pytest.mark.parametrize("shape,rate", CASES)
@pytest.mark.parametrize("options", [{}, {"center": False},
                                     {"normalize": False, "rotate": False}])
def test_whole_matrix_fixed_path_is_the_chunked_path(shape, rate, options,
                                                     monkeypatch):
    """quantize_columns(keep_decoded=True) codes all the vectors in one
    compiled call and sums the MMSE shrinkage over the whole decode; the
    bytes are those of the chunked encoder and chunked MMSE pass
    (keep_decoded=False with chunks of 8 vectors), and the kept rows are
    those of decoding the file."""
    from nqlib.kernels.cpu import coded as kern
    from nqlib.quantizers import fixed_mode

    calls = []
    whole = kern.code_fixed_rows

    def counted(*args):
        calls.append(args[0].shape[0])
        return whole(*args)

    monkeypatch.setattr(kern, "code_fixed_rows", counted)
    monkeypatch.setattr(coded_domain, "CHUNK_ENTRIES", 8)   # 8 vectors a chunk
    assert fixed_mode.rows_per_chunk(shape[0]) == 8 < shape[1]
    rng = np.random.default_rng(shape[0] + shape[1])
    A = rng.standard_normal(shape) * 2.0 + 0.3
    A[:, 1] = 0.0
    A = A.astype(np.float32)
    kept = matrix.quantize_columns(A, rate, seed=5, mode="fixed",
                                   keep_decoded=True, **options)
    assert calls == [shape[1]]          # one call for all the vectors
    plain = matrix.quantize_columns(A, rate, seed=5, mode="fixed", **options)
    assert calls == [shape[1]]          # the chunked encoder only
    assert kept.to_bytes() == plain.to_bytes()
    again = matrix.QuantizedMatrix.from_bytes(kept.to_bytes())
    np.testing.assert_array_equal(_bits(kept.coded_rows()),
                                  _bits(again.coded_rows()))
    if rate < 1:
        assert kept.payload.lo.L == 0
    assert coded.PART_CHUNK % 8 == 0


def test_fixed_path_leaves_no_reference_to_the_scratch():
    A = np.random.default_rng(1).standard_normal((128, 6)).astype(np.float32)
    Q1 = matrix.quantize_columns(A, 4.0, mode="fixed", keep_decoded=True)
    rows = Q1.coded_rows().copy()
    data = Q1.to_bytes()
    matrix.quantize_columns(A[::-1].copy() * 3, 4.0, mode="fixed",
                            keep_decoded=True)
    np.testing.assert_array_equal(Q1.coded_rows(), rows)
    assert Q1.to_bytes() == data


# ---------------------------------------------------------- the scratch
def test_scratch_is_reused_per_thread_and_name():
    _scratch.release()
    a = _scratch.scratch("t", (4, 5), np.float32)
    assert a.shape == (4, 5) and a.dtype == np.float32 and a.flags.c_contiguous
    assert a.ctypes.data % 64 == 0
    b = _scratch.scratch("t", (2, 3), np.float32)
    assert b.ctypes.data == a.ctypes.data         # the same buffer
    c = _scratch.scratch("u", (4, 5), np.float32)
    assert c.ctypes.data != a.ctypes.data         # another name
    d = _scratch.scratch("t", (4, 5), np.float64)
    assert d.dtype == np.float64 and d.ctypes.data != a.ctypes.data
    big = _scratch.scratch("t", (100, 100), np.float64)
    assert big.shape == (100, 100)
    assert _scratch.kept_bytes() >= big.nbytes + c.nbytes
    other = {}
    t = threading.Thread(target=lambda: other.update(
        p=_scratch.scratch("t", (100, 100), np.float64).ctypes.data))
    t.start()
    t.join()
    assert other["p"] != big.ctypes.data          # each thread its own
    huge = (_scratch.MAX_KEEP_BYTES // 8 + 1,)
    kept = _scratch.kept_bytes()
    assert _scratch.scratch("t", huge, np.float64).shape == huge
    assert _scratch.kept_bytes() == kept          # not kept
    _scratch.release()
    assert _scratch.kept_bytes() == 0


def test_layer_outputs_do_not_share_the_scratch():
    torch = pytest.importorskip("torch")
    from nqlib.nn import QuantLinear
    from nqlib.quantizers.layout_common import SMALL_ROTATED

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    for act_rate in (None, 4.0):
        ql = QuantLinear.from_linear(lin, 4.0, act_rate=act_rate,
                                     act_mode=None if act_rate is None
                                     else "fixed")
        # more rotated floats than SMALL_ROTATED: the scratch is used
        x1, x2 = torch.randn(700, 96), torch.randn(900, 96)
        assert 700 * 96 > SMALL_ROTATED
        y1 = ql(x1)
        keep = y1.clone()
        ql(x2)
        assert torch.equal(y1, keep)
        assert torch.equal(ql(x1), keep)


# ------------------------------------------------------------- packing
def test_pack_words_is_the_bit_by_bit_packing():
    from nqlib.kernels.cpu.nested import pack_words, unpack_words

    rng = np.random.default_rng(0)
    for nbits in range(1, 65):
        for count in (0, 1, 2, 3, 7, 8, 9, 17, 65):
            words = (rng.integers(0, 2**63, size=count, dtype=np.uint64)
                     * np.uint64(2) + rng.integers(0, 2, size=count,
                                                   dtype=np.uint64))
            want = np.zeros(-(-count * nbits // 8), np.uint8)
            for i, w in enumerate(words):          # bit i * nbits + k
                for k in range(nbits):
                    bit = i * nbits + k
                    want[bit // 8] |= np.uint8(((int(w) >> k) & 1) << (bit % 8))
            got = np.zeros_like(want)
            pack_words(words, nbits, got)
            np.testing.assert_array_equal(got, want, err_msg=f"{nbits} {count}")
            back = np.empty(count, np.uint64)
            unpack_words(got, nbits, count, back)
            mask = np.uint64(2**64 - 1) if nbits == 64 else np.uint64(2**nbits - 1)
            np.testing.assert_array_equal(back, words & mask)


def test_cache_rows_float32_are_computed_once_per_input():
    torch = pytest.importorskip("torch")
    from nqlib.nn import ActivationCache, QuantLinear

    cache = ActivationCache()
    torch.manual_seed(1)
    layers = [QuantLinear.from_linear(torch.nn.Linear(64, 24), 4.0,
                                      act_rate=4.0, act_mode="fixed",
                                      seed=2) for _ in range(2)]
    for ql in layers:
        ql.act_cache = cache
    x = torch.randn(10, 64)
    QX = cache.quantized(x, 4.0, layers[0]._header, "fixed")
    rows = cache.rows_float32(QX)
    want = (QX.coded_rows() * QX.row_scales()[:, None]).astype(np.float32)
    np.testing.assert_array_equal(rows, want)
    assert cache.rows_float32(QX) is rows               # once per input
    y = [ql(x) for ql in layers]                        # a hit: the same rows
    assert cache.quantized_calls == 1
    x2 = torch.randn(10, 64)
    QX2 = cache.quantized(x2, 4.0, layers[0]._header, "fixed")
    rows2 = cache.rows_float32(QX2)
    assert rows2 is rows                                # the array is reused
    np.testing.assert_array_equal(
        rows2, (QX2.coded_rows() * QX2.row_scales()[:, None]).astype(np.float32))
    with pytest.raises(ValueError, match="last quantized"):
        cache.rows_float32(QX)
    assert all(t.shape == (10, 24) for t in y)
    # the general path (variable mode; a padded length) reuses it too
    for n in (64, 60):
        rows_v = []
        for _ in range(2):
            xv = torch.randn(10, n)
            QV = cache.quantized(xv, 4.0, layers[0]._header, "variable")
            rows_v.append(cache.rows_float32(QV))
            np.testing.assert_array_equal(
                rows_v[-1],
                (QV.coded_rows() * QV.row_scales()[:, None]).astype(np.float32))
        assert rows_v[1] is rows_v[0]


# ------------------------------------------------- one task, one thread
@pytest.mark.parametrize("n", [64, 384, 576])
def test_one_task_loops_are_the_parallel_loops(n):
    """Kernels whose loop has one task (one row, one chunk of blocks) run it
    in the calling thread (:func:`nqlib.kernels.cpu.guard.serial`); each
    row coded alone has the bits it gets inside a batch, which the kernels
    split over threads: the coded rows, the multiscale encoder, the
    projection, the scaled rows, and the fused kernels' rotation."""
    from nqlib.kernels.cpu import fused, nested
    from nqlib.kernels.cpu.lattice import CHUNK

    rng = np.random.default_rng(n)
    a = 9
    X = (rng.standard_normal((a, n)) * 3.0 + 0.5).astype(np.float32)
    P = RandomHadamard(n, 4)
    rot = coded_domain.rotation_arrays(P, n)

    def coded_rows(rows):
        Y = np.empty((len(rows), n))
        means = np.empty(len(rows), np.float32)
        norms = np.empty(len(rows), np.float32)
        coded.coded_rows_into(rows, True, True, *rot, Y, means, norms)
        return Y, means, norms

    whole = coded_rows(X)
    alone = [coded_rows(X[i:i + 1]) for i in range(a)]
    for k in range(3):
        np.testing.assert_array_equal(
            _bits(whole[k]), _bits(np.concatenate([r[k] for r in alone])))

    Y = whole[0]
    u = coded_domain.unit_mean_direction(P, n, n)
    R = Y.copy()
    coded._project_rows(R, u, True)
    for i in range(a):
        Ri = Y[i:i + 1].copy()
        coded._project_rows(Ri, u, True)
        np.testing.assert_array_equal(_bits(R[i:i + 1]), _bits(Ri))
    rows32 = np.empty((a, n), np.float32)
    S = R.copy()
    coded._scaled_outputs(S, 0.93, whole[2], True, rows32)
    for i in range(a):
        Si, r32 = R[i:i + 1].copy(), np.empty((1, n), np.float32)
        coded._scaled_outputs(Si, 0.93, whole[2][i:i + 1], True, r32)
        np.testing.assert_array_equal(_bits(S[i:i + 1]), _bits(Si))
        np.testing.assert_array_equal(rows32[i:i + 1], r32)

    # the encoder: more blocks than one chunk, against each chunk alone
    blocks = np.concatenate([Y.reshape(-1, 8)] * (1 + 2 * CHUNK // (a * n // 8)))
    m = len(blocks)
    assert m > 2 * CHUNK
    betas = np.array([0.4, 0.55, 0.7, 1.0])
    z = np.zeros((1, 8))

    def encode(x):
        k = len(x)
        out = (np.empty((k, 8), np.int64), np.empty(k, np.int64),
               np.empty(k), np.empty((k, 8)))
        nested.encode_multiscale_rows(x, 13, betas, z, *out)
        return out

    full = encode(blocks)
    for c0 in range(0, m, CHUNK):
        part = encode(blocks[c0:c0 + CHUNK])
        for k in range(4):
            np.testing.assert_array_equal(_bits(full[k][c0:c0 + CHUNK]),
                                          _bits(part[k]))

    # the fused kernels' float32 rotation, rows alone against the batch
    signs = np.asarray(P.signs).astype(np.int8)
    orth = np.ascontiguousarray(P.orthogonal).astype(np.float32)
    out = np.empty((a, n), np.float32)
    xsum = np.empty(a, np.float32)
    fused.rotate_rows(X, signs, orth, int(P.power_of_two), True, out, xsum)
    for i in range(a):
        o1, s1 = np.empty((1, n), np.float32), np.empty(1, np.float32)
        fused.rotate_rows(X[i:i + 1], signs, orth, int(P.power_of_two), True,
                          o1, s1)
        np.testing.assert_array_equal(out[i:i + 1].view(np.uint32),
                                      o1.view(np.uint32))
        assert s1[0] == xsum[i]
