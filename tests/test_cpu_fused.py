"""The fused CPU decode-matmul (nqlib.kernels.cpu.fused) and the CPU layout
(nqlib.quantizers.cpu_layout) behind QuantLinear on CPU.

* the layout decodes to numba's decode bit for bit (numpy oracle of the bit
  layout, and the layout's own reader), and rebuilds the file's bytes;
* the kernels equal decode-then-matmul to float32 round-off, for batch 1..65,
  shapes that are not multiples of the tile sizes, sketched and time-shared
  matrices, odd and even q, pipelines with steps switched off;
* QuantLinear on CPU holds only the layout (no float weight), runs the fused
  kernel for float32 / bfloat16 inputs and for quantized activations (W4A4),
  and keeps its state dict round trip.
"""

import copy
import io
import pickle

import numpy as np
import pytest

import nqlib
from nqlib.quantizers.cpu_layout import (
    CpuLayout,
    cpu_layout,
    e8_codes_of_residuals,
    e8_doubled_points,
    supports,
)
from nqlib.quantizers.matrix import decode_codes, quantize_columns
from nqlib.reference.fused import decode_cpu_layout

torch = pytest.importorskip("torch")

EPS32 = float(np.finfo(np.float32).eps)

# (n, a, rate, options): n not a multiple of 8 (padding), a not a multiple
# of 16 (padding rows), one K tile (up to 48 blocks) or several of 32
# blocks, the last one not filled (520: 65 blocks), fractional rates
# (time sharing between two word lengths, and sketching below ~1 bit)
CASES = [
    (100, 24, 4.0, {}),
    (520, 24, 4.0, {}),
    (256, 40, 4.0, {}),
    (300, 37, 4.2, {}),          # q = 15 / 13 (odd) and 14 (even) parts
    (384, 48, 3.0, {}),
    (200, 33, 1.0, {}),          # sketched: low part dropped
    (136, 19, 2.5, {}),
    (264, 21, 4.0, dict(center=False)),
    (264, 21, 4.0, dict(normalize=False)),
    (264, 21, 4.0, dict(rotate=False)),
    (264, 21, 4.0, dict(estimator="unbiased")),
]


def _qm(n, a, rate, opts, seed=0):
    rng = np.random.default_rng([n, a, seed])
    A = rng.standard_normal((n, a)) * rng.uniform(0.5, 2.0, size=a) + 0.3
    return nqlib.quantize(A, rate, mode="fixed", seed=seed + 7, **opts)


@pytest.fixture(scope="module", params=range(len(CASES)))
def case(request):
    n, a, rate, opts = CASES[request.param]
    qm = _qm(n, a, rate, opts)
    return qm, cpu_layout(qm)


def _ref_product(qm, x):
    """``x @ W_hat`` in float64 (the oracle: decode, then multiply)."""
    return np.asarray(x, dtype=np.float64) @ qm.dequantize()


def _tolerance(qm, x):
    """float32 round-off of a length-n_pad product (with the float32
    rotation of x): a few eps times sqrt(n_pad) times sum |x| |w|."""
    return 8 * EPS32 * np.sqrt(qm.n_pad) * (np.abs(x) @ np.abs(qm.dequantize()))


# --------------------------------------------------------------- layout
def test_layout_decodes_like_numba(case):
    qm, lay = case
    a = qm.shape[1]
    raw = decode_codes(qm)
    c = lay.coded
    oracle = decode_cpu_layout(lay.words, lay.nib, lay.kpl, lay.tab, lay.q[0],
                               lay.q[1], lay.h, a)
    np.testing.assert_array_equal(oracle, raw[:, :8 * c])
    assert not raw[:, 8 * c:].any()        # dropped blocks decode to 0
    r, index = lay.residuals()
    beta = np.where(np.arange(c) < lay.h, lay.tab[0][index], lay.tab[1][index])
    np.testing.assert_array_equal((beta[..., None] * (r / 2.0))[:a].reshape(a, -1),
                                  raw[:, :8 * c])


def test_layout_rebuilds_the_file(case):
    qm, lay = case
    assert lay.to_bytes() == qm.to_bytes()
    back = lay.to_quantized()
    np.testing.assert_array_equal(back.dequantize(), qm.dequantize())


def test_layout_bytes(case):
    qm, lay = case
    n, a = qm.shape
    G = lay.groups
    assert G % 2 == 0 and 8 * G >= a > 8 * G - 16
    # 39 bits per stored block, plus scales, means, norms, signs, odd factor
    codes = (32 + 4 + 3) * G * 8 * lay.coded / 8
    assert lay.code_nbytes == codes + 1
    side = 4 * a * (qm.center + qm.normalize) + (qm.n_pad if qm.rotate else 0)
    assert lay.nbytes == lay.code_nbytes + side + lay.tab.nbytes + lay.orth.nbytes


def test_residual_codes_round_trip():
    rng = np.random.default_rng(3)
    for q in (3, 8, 13, 14):
        c = rng.integers(0, q, size=(500, 8))
        from nqlib.quantizers.cpu_layout import decisions

        r = decisions(c, q)[3]
        np.testing.assert_array_equal(e8_codes_of_residuals(r, q), c)
    Y = e8_doubled_points(c)
    Y[0, 0] += 2                                   # not a point of E8 any more
    with pytest.raises(ValueError, match="E8"):
        e8_codes_of_residuals(Y, 14)


def test_supports_says_why():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((64, 16))
    assert supports(nqlib.quantize(A, 4.0, mode="fixed")) is None
    assert "fixed mode" in supports(nqlib.quantize(A, 4.0, mode="variable"))
    assert "dither" in supports(nqlib.quantize(A, 4.0, mode="fixed", dither=True))
    B = rng.standard_normal((512, 64))
    assert "q = " in supports(nqlib.quantize(B, 5.5, mode="fixed"))
    assert "QuantizedMatrix" in supports(A)
    with pytest.raises(ValueError, match="fixed mode"):
        cpu_layout(nqlib.quantize(A, 4.0, method="rtn"))


# -------------------------------------------------------------- kernels
BATCHES = (1, 2, 3, 4, 5, 6, 7, 13, 16, 17, 33, 64, 65)


@pytest.mark.parametrize("M", BATCHES)
def test_kernel_equals_decode_then_matmul(case, M):
    qm, lay = case
    n, a = qm.shape
    x = np.random.default_rng(M).standard_normal((M, n)).astype(np.float32)
    bias = np.linspace(-1, 1, a).astype(np.float32)
    out = lay.linear(x, bias)
    assert out.dtype == np.float32 and out.shape == (M, a)
    ref = _ref_product(qm, x) + bias
    assert np.all(np.abs(out - ref) <= _tolerance(qm, x) + 4 * EPS32 * np.abs(bias))


def test_raw_products_equal_the_oracle(case):
    """The kernels' product in the coded domain against the numpy oracle of
    the bit layout, padding rows included (they are computed and dropped)."""
    qm, lay = case
    rng = np.random.default_rng(1)
    oracle = decode_cpu_layout(lay.words, lay.nib, lay.kpl, lay.tab, lay.q[0],
                               lay.q[1], lay.h, 8 * lay.groups)
    for M in (1, 9):
        xr = rng.standard_normal((M, qm.n_pad)).astype(np.float32)
        got = lay.raw_products(xr)
        ref = xr[:, :8 * lay.coded].astype(np.float64) @ oracle.T
        tol = 8 * EPS32 * np.sqrt(qm.n_pad) * (np.abs(xr[:, :8 * lay.coded])
                                               @ np.abs(oracle).T)
        assert np.all(np.abs(got - ref) <= tol)


def test_rotation_matches_the_library(case):
    qm, lay = case
    n = qm.shape[0]
    x = np.random.default_rng(2).standard_normal((3, n)).astype(np.float32)
    x_rot, xsum = lay.rotate(x)
    Z = np.zeros((3, qm.n_pad))
    Z[:, :n] = x - (x.mean(axis=1, keepdims=True) if qm.center else 0)
    P = qm.rotation()
    ref = P.apply(Z) if P is not None else Z
    assert np.abs(x_rot - ref).max() <= 16 * EPS32 * np.abs(ref).max() * np.log2(
        qm.n_pad)
    np.testing.assert_allclose(xsum, x.sum(axis=1), rtol=1e-5, atol=1e-5)


def test_empty_batch_and_bad_shapes(case):
    qm, lay = case
    n, a = qm.shape
    out = lay.linear(np.zeros((0, n), dtype=np.float32))
    assert out.shape == (0, a)
    with pytest.raises(ValueError, match="x must have shape"):
        lay.linear(np.zeros((2, n + 1), dtype=np.float32))
    with pytest.raises(ValueError, match="x must have shape"):
        lay.linear(np.zeros(n, dtype=np.float32))
    with pytest.raises(ValueError, match="bias must have shape"):
        lay.linear(np.zeros((2, n), dtype=np.float32), np.zeros(a + 1))
    with pytest.raises(ValueError, match="xsum must have shape"):
        lay.linear_rotated(np.zeros((2, qm.n_pad), np.float32), np.zeros(3))


def _random_fields(rng, G, coded):
    """Arbitrary packed fields of ``G`` groups of 8 rows and ``coded``
    blocks (``words``, ``nib``, ``kpl``) and scale tables."""
    words = rng.integers(0, 2**32, size=(G, coded, 8), dtype=np.uint64)
    words = words.astype(np.uint32).view(np.int32)
    nib = rng.integers(0, 2**32, size=(G, coded), dtype=np.uint64).astype(np.uint32)
    kpl = rng.integers(0, 256, size=3 * G * coded + 1).astype(np.uint8)
    tab = rng.uniform(0.1, 1.0, size=(2, 8)).astype(np.float32)
    return words, nib, kpl, tab


def test_random_layout_odd_and_even_q_against_oracle():
    """Arbitrary fields (not from a quantizer), both parities of q, both
    parts: the kernels read exactly the documented bit layout."""
    rng = np.random.default_rng(5)
    G, coded, h = 4, 45, 19
    words, nib, kpl, tab = _random_fields(rng, G, coded)
    for q_hi, q_lo in ((13, 14), (16, 11)):
        oracle = decode_cpu_layout(words, nib, kpl, tab, q_hi, q_lo, h, 8 * G)
        for M in (1, 7):
            xr = rng.standard_normal((M, 8 * coded)).astype(np.float32)
            lay = CpuLayout(shape=(8 * coded, 8 * G), n_pad=8 * coded, h=h,
                            coded=coded, q=(q_hi, q_lo), L=(32, 32),
                            nscales=(8, 8), tab=tab, words=words, nib=nib,
                            kpl=kpl, means=None, norms=None, alpha=1.0, flags=0,
                            seed=0, rate=4.0, version=3, signs=None,
                            orth=np.ones((1, 1), np.float32), power_of_two=1)
            got = lay.raw_products(xr)
            ref = xr.astype(np.float64) @ oracle.T
            tol = 8 * EPS32 * np.sqrt(8 * coded) * (np.abs(xr) @ np.abs(oracle).T)
            assert np.all(np.abs(got - ref) <= tol)


@pytest.mark.parametrize("G", (1, 2, 3, 5, 9, 10))
def test_gemv_groups_at_a_time_and_left_over(G):
    """The batch-1 kernel decodes several groups of 8 rows per pass
    (``GEMV_GROUPS``) and the groups left over one at a time: every group
    count and every number of rows of activations against the oracle of the
    bit layout, both parities of q, both parts."""
    from nqlib.kernels.cpu import fused

    rng = np.random.default_rng([6, G])
    coded, h = 13, 5
    words, nib, kpl, tab = _random_fields(rng, G, coded)
    for q_hi, q_lo in ((13, 14), (16, 11)):
        oracle = decode_cpu_layout(words, nib, kpl, tab, q_hi, q_lo, h, 8 * G)
        for R in range(1, fused.GEMV_MAX_ROWS + 1):
            xr = rng.standard_normal((R, 8 * coded)).astype(np.float32)
            xs = np.empty((R, coded, 8), np.float32)
            xrev = np.empty_like(xs)
            xc = np.empty((R, coded, 2), np.float32)
            fused.gemv_activations(xr, coded, xs, xrev, xc)
            acc = np.full((R, 8 * G), np.nan, np.float32)
            fused.gemv(words, nib, kpl, tab, q_hi, q_lo, h, xs, xrev, xc, acc)
            ref = xr.astype(np.float64) @ oracle.T
            tol = 8 * EPS32 * np.sqrt(8 * coded) * (np.abs(xr) @ np.abs(oracle).T)
            assert np.all(np.abs(acc - ref) <= tol), (q_hi, R)


# ---------------------------------------------------------- QuantLinear
def _linear(n, a, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n, a)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(a, 1) + 0.5)
    return lin


def test_quantlinear_holds_only_the_layout():
    from nqlib.nn import QuantLinear

    n, a = 512, 96
    ql = QuantLinear.from_linear(_linear(n, a), 4.0)
    assert ql.cpu_layout is not None
    arrays = ql.resident_arrays()
    # no float array anywhere near the size of the weight
    for name, arr in arrays.items():
        size = arr.numel() if isinstance(arr, torch.Tensor) else arr.size
        floating = (arr.is_floating_point() if isinstance(arr, torch.Tensor)
                    else np.issubdtype(arr.dtype, np.floating))
        assert not (floating and size >= n), name
    assert "qweight" not in arrays            # the file's bytes are not kept
    x = torch.randn(5, n)
    ql(x)
    ql(x[:1])
    assert ql.resident_arrays().keys() == arrays.keys()   # nothing cached
    layout_bytes = ql.cpu_layout.nbytes
    assert ql.resident_nbytes == layout_bytes + 4 * a       # plus the bias
    # 39 bits per block of 8 weights, then 8 bytes per row, signs, scales
    assert ql.resident_nbytes - 4 * a <= 0.16 * 4 * n * a


def test_resident_bytes_of_a_4096_square_layer_are_below_016():
    """Deterministic bytes of the layout of a 4096 x 4096 rate-4 layer,
    computed from its shape and word lengths without quantizing it."""
    n = a = 4096
    G, coded = a // 8, n // 8
    codes = G * coded * (32 + 4 + 3) + 1
    side = 4 * a * 2 + n + 2 * 8 * 4 + 4
    assert (codes + side) / (4 * n * a) <= 0.16


@pytest.mark.parametrize("M", (1, 3, 16, 65))
def test_quantlinear_forward_is_the_fused_product(M):
    from nqlib.nn import QuantLinear

    n, a = 200, 70
    lin = _linear(n, a, seed=1)
    ql = QuantLinear.from_linear(lin, 4.0)
    qm = ql.quantized_weight
    x = torch.randn(M, n)
    y = ql(x)
    ref = _ref_product(qm, x.numpy()) + lin.bias.detach().numpy()
    assert np.all(np.abs(y.numpy() - ref)
                  <= _tolerance(qm, x.numpy()) + 1e-6)
    # leading dimensions and bfloat16 inputs: float32 arithmetic, input dtype out
    xb = torch.randn(2, 3, n).bfloat16()
    yb = ql(xb)
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, a)
    y32 = ql(xb.float())
    torch.testing.assert_close(yb, y32.bfloat16(), rtol=0, atol=0)


def test_quantlinear_backends_agree():
    from nqlib.nn import QuantLinear

    ql = QuantLinear.from_linear(_linear(136, 40, seed=2), 4.0)
    x = torch.randn(9, 136)
    y = ql(x)
    ql.backend = "torch"
    y_torch = ql(x)
    assert ql.resident_arrays().keys() == {"layout." + k for k in
                                           ql.cpu_layout.arrays()} | {"bias"}
    ql.backend = "numba"
    torch.testing.assert_close(ql(x), y)
    torch.testing.assert_close(y_torch, y, rtol=1e-5, atol=1e-5)
    ql.backend = "bogus"
    with pytest.raises(ValueError, match="backend"):
        ql(x)


def test_numba_backend_refuses_what_it_cannot_run():
    from nqlib.nn import QuantLinear

    ql = QuantLinear.from_linear(_linear(64, 16), 4.0, mode="variable")
    assert ql.cpu_layout is None
    ql.backend = "numba"
    with pytest.raises(ValueError, match="backend='numba' cannot run.*fixed mode"):
        ql(torch.randn(2, 64))


@pytest.mark.parametrize("act_mode", ["fixed", "variable"])
@pytest.mark.parametrize("M", (1, 6))
def test_w4a4_fused_equals_matmul_of_quantized_operands(act_mode, M):
    """Quantized activations meet the layout in the fused kernel: the
    estimate of nqlib.matmul on the two quantized operands, plus the bias."""
    from nqlib.nn import QuantLinear

    n, a = 264, 40
    lin = _linear(n, a, seed=5)
    ql = QuantLinear.from_linear(lin, 4.0, act_rate=4.0, act_mode=act_mode,
                                 seed=11)
    assert ql.cpu_layout is not None
    x = torch.randn(M, n) * 3 + 1
    y = ql(x)
    QX = quantize_columns(x.double().numpy().T, 4.0, seed=11, mode=act_mode,
                          stream=True)
    ref = nqlib.inner_products(QX, ql.quantized_weight) + lin.bias.detach().numpy()
    np.testing.assert_allclose(y.numpy(), ref, rtol=0,
                               atol=64 * EPS32 * np.abs(ref).max())
    assert ql.act_entries == M * n


def test_state_dict_round_trip_rebuilds_the_layout():
    from nqlib.nn import QuantLinear

    src = QuantLinear.from_linear(_linear(128, 48, seed=3), 4.0)
    sd = src.state_dict()
    assert set(sd) == {"qweight", "bias"}
    assert bytes(sd["qweight"].numpy()) == src.quantized_weight.to_bytes()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    dst = QuantLinear.from_linear(_linear(128, 48, seed=4), 4.0)
    dst.load_state_dict(torch.load(buf))
    assert dst.cpu_layout is not None
    for name, arr in src.cpu_layout.arrays().items():
        np.testing.assert_array_equal(dst.cpu_layout.arrays()[name], arr)
    x = torch.randn(4, 128)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    # a state dict without the weight is refused by a strict load
    with pytest.raises(RuntimeError, match="qweight"):
        dst.load_state_dict({"bias": sd["bias"]})
    # pickling and copying keep the layout
    for other in (pickle.loads(pickle.dumps(src)), copy.deepcopy(src)):
        torch.testing.assert_close(other(x), src(x), rtol=0, atol=0)


_WORKQUEUE_SCRIPT = """
from concurrent.futures import ThreadPoolExecutor
import torch
from nqlib.kernels.cpu import fused, guard
from nqlib.nn import QuantLinear

assert guard.layer() == "workqueue", guard.layer()
assert hasattr(fused.gemm, "kernel") and hasattr(fused.linear, "kernel")
torch.manual_seed(0)
ql = QuantLinear.from_linear(torch.nn.Linear(136, 48), 4.0)
xs = [torch.randn(m, 136, generator=torch.Generator().manual_seed(m))
      for m in (1, 3, 9, 17)]

def work(i):
    with torch.no_grad():
        return ql(xs[i % len(xs)])

sequential = [work(i) for i in range(16)]
with ThreadPoolExecutor(max_workers=4) as pool:
    for got, want in zip(pool.map(work, range(16)), sequential):
        assert torch.equal(got, want)
print("ok")
"""


def test_fused_kernels_are_guarded_on_the_workqueue_layer():
    """Concurrent forwards on numba's workqueue layer (not thread-safe):
    the fused kernels and their drivers are serialised, results equal."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue",
               NUMBA_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _WORKQUEUE_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


_PORTABLE_SCRIPT = """
import pickle, sys
import numpy as np
from nqlib.kernels.cpu import fused

assert not fused.HAVE_AVX2
with open(sys.argv[1], "rb") as fh:
    lay, cases = pickle.load(fh)
for x, ref, tol in cases:
    assert np.all(np.abs(lay.linear(x) - ref) <= tol), len(x)
print("ok")
"""


@pytest.mark.slow
def test_portable_build_without_avx2(tmp_path):
    """With a generic target CPU the permutes are built from selects: the
    same products (a subprocess: the target is fixed when numba starts; the
    layout is built here, so that it compiles only the fused kernels)."""
    import os
    import subprocess
    import sys

    qm = _qm(300, 37, 4.2, {})
    lay = cpu_layout(qm)
    cases = []
    for M in (1, 7):
        x = np.random.default_rng(M).standard_normal((M, 300)).astype(np.float32)
        cases.append((x, _ref_product(qm, x), _tolerance(qm, x)))
    path = tmp_path / "case.pkl"
    path.write_bytes(pickle.dumps((lay, cases)))
    env = dict(os.environ, NUMBA_CPU_NAME="generic")
    out = subprocess.run([sys.executable, "-c", _PORTABLE_SCRIPT, str(path)],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_linear_writes_into_a_given_output():
    from nqlib.nn import QuantLinear

    ql = QuantLinear.from_linear(_linear(64, 24, seed=8), 4.0)
    lay = ql.cpu_layout
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    want = lay.linear(x)
    out = np.full((5, 24), np.nan, np.float32)
    assert lay.linear(x, out=out) is out
    np.testing.assert_array_equal(out, want)
    for bad in (np.empty((5, 23), np.float32), np.empty((5, 24)),
                np.empty((24, 5), np.float32).T, [[0.0] * 24] * 5):
        with pytest.raises(ValueError, match="out must be"):
            lay.linear(x, out=bad)
    big = np.zeros(5 * 64 + 200, np.float32)
    xs = big[:320].reshape(5, 64)
    with pytest.raises(ValueError, match="overlap"):
        lay.linear(xs, out=big[100:220].reshape(5, 24))


@pytest.mark.parametrize("mode", ("fixed", "trellis"))
def test_bound_linear_and_the_layers_bias(mode):
    """``bound_linear`` gives ``linear``'s bits; a QuantLinear keeps one
    per bias and sees in-place writes to a float32 bias, a new bias object,
    new memory under the same object, a bias of another dtype and no bias;
    copies and pickles do not carry it."""
    import copy
    import pickle

    from nqlib.nn import QuantLinear

    n, a = 72, 24
    if mode == "trellis":
        from test_trellis_fused import code_defaults

        with code_defaults(64, 10):           # a short trellis: a fast encode
            ql = QuantLinear.from_linear(_linear(n, a, seed=9), 2.0,
                                         mode="trellis")
    else:
        ql = QuantLinear.from_linear(_linear(n, a, seed=9), 4.0)
    lay = ql.cpu_layout
    x = torch.randn(6, n)
    xn = x.numpy()
    b = np.linspace(-1, 1, a).astype(np.float32)
    out = np.full((6, a), np.nan, np.float32)
    assert lay.bound_linear(b)(xn, out) is out
    np.testing.assert_array_equal(out, lay.linear(xn, b))
    with pytest.raises(ValueError, match="bias must have shape"):
        lay.bound_linear(b[:-1])

    def want():
        bias = None if ql.bias is None else ql.bias.detach().float().numpy()
        return lay.linear(xn, bias)

    np.testing.assert_array_equal(ql(x).numpy(), want())
    fn = ql._bound[3]["linear"]
    np.testing.assert_array_equal(ql(x).numpy(), want())
    assert ql._bound[3]["linear"] is fn            # kept between calls
    with torch.no_grad():
        ql.bias += 1.0                             # in place: seen
    np.testing.assert_array_equal(ql(x).numpy(), want())
    assert ql._bound[3]["linear"] is fn
    ql.bias.data = torch.full((a,), 3.0)           # new memory, same object
    np.testing.assert_array_equal(ql(x).numpy(), want())
    ql.bias = torch.nn.Parameter(torch.full((a,), -2.0))   # a new object
    np.testing.assert_array_equal(ql(x).numpy(), want())
    ql.bias.data = ql.bias.data.bfloat16()         # another dtype
    np.testing.assert_array_equal(ql(x).numpy(), want())
    ql.bias = None
    np.testing.assert_array_equal(ql(x).numpy(), want())
    ql.bias = torch.nn.Parameter(torch.full((a,), 0.5))
    ql(x)
    for twin in (copy.deepcopy(ql), pickle.loads(pickle.dumps(ql))):
        assert twin._bound is None
        with torch.no_grad():
            twin.bias += 1.0                       # the copy's own bias
        np.testing.assert_array_equal(twin(x).numpy(),
                                      lay.linear(xn, np.full(a, 1.5, np.float32)))
    np.testing.assert_array_equal(ql(x).numpy(), want())


@pytest.mark.parametrize("mode", ("fixed", "trellis"))
def test_bound_linear_rotated_and_the_w4a4_layers_bias(mode):
    """``bound_linear_rotated`` gives ``linear_rotated``'s bits, and a W4A4
    layer (fixed-mode activations, the fused CPU product) keeps it per bias
    as the W4 layer keeps ``bound_linear``: in-place writes to the bias,
    new memory, a bias of another dtype and no bias are all seen, with the
    output of ``linear_rotated`` on the quantized input's rows."""
    from nqlib.nn import QuantLinear

    n, a = 72, 24
    if mode == "trellis":
        from test_trellis_fused import code_defaults

        with code_defaults(64, 10):
            ql = QuantLinear.from_linear(_linear(n, a, seed=4), 2.0,
                                         mode="trellis", act_rate=4.0,
                                         act_mode="fixed")
    else:
        ql = QuantLinear.from_linear(_linear(n, a, seed=4), 4.0, act_rate=4.0,
                                     act_mode="fixed")
    lay = ql.cpu_layout
    rng = np.random.default_rng(2)
    xr = rng.standard_normal((5, lay.n_pad)).astype(np.float32)
    xsum = rng.standard_normal(5).astype(np.float32)
    b = np.linspace(-1, 1, a).astype(np.float32)
    out = np.full((5, a), np.nan, np.float32)
    assert lay.bound_linear_rotated(b)(xr, xsum, out) is out
    np.testing.assert_array_equal(out, lay.linear_rotated(xr, xsum, b))
    with pytest.raises(ValueError, match="bias must have shape"):
        lay.bound_linear_rotated(b[:-1])

    x = torch.randn(6, n)
    cache = ql.act_cache

    def want():
        QX = cache.quantized(x, ql.act_rate, ql._header, ql.act_mode)
        rows = cache.rows_float32(QX)
        bias = None if ql.bias is None else ql.bias.detach().float().numpy()
        return lay.linear_rotated(rows, np.float32(n) * QX.means, bias)

    np.testing.assert_array_equal(ql(x).numpy(), want())
    fn = ql._bound[3]["linear_rotated"]
    with torch.no_grad():
        ql.bias += 1.0                             # in place: seen
    np.testing.assert_array_equal(ql(x).numpy(), want())
    assert ql._bound[3]["linear_rotated"] is fn
    ql.bias.data = torch.full((a,), 3.0)           # new memory, same object
    np.testing.assert_array_equal(ql(x).numpy(), want())
    ql.bias.data = ql.bias.data.bfloat16()         # another dtype
    np.testing.assert_array_equal(ql(x).numpy(), want())
    ql.bias = None
    np.testing.assert_array_equal(ql(x).numpy(), want())
    assert ql.act_entries == 5 * x.numel()
    assert ql.act_bits_per_entry > 0


@pytest.mark.parametrize("n, a, center", [(128, 24, True), (384, 40, True),
                                           (128, 24, False), (130, 16, True)])
def test_w4a4_lean_path_is_the_general_path(n, a, center):
    """A W4A4 layer (fixed-mode activations, the fused CPU product) whose
    input the cache's lean path takes (``fused_operand``: no quantized
    matrix is built) gives the bits, the counts and the quantized input of
    the general path (``quantized`` then ``rows_float32``), over batch
    shapes, dtypes and strides; where the lean path does not apply (a
    weight coded in another domain, a length that needs padding) the layer
    takes the general path. Layers fed the same input quantize it once,
    and ``quantized`` then returns the matrix of the lean path's code."""
    from nqlib.nn import ActivationCache, QuantLinear

    lin = _linear(n, a, seed=7)
    lean = QuantLinear.from_linear(lin, 4.0, act_rate=4.0, act_mode="fixed",
                                   center=center)
    general = copy.deepcopy(lean)
    general.act_cache = ActivationCache()
    applies = center and n % 8 == 0
    torch.manual_seed(3)
    base = torch.randn(12, n)
    inputs = [base[:5], base.reshape(2, 6, n), base.bfloat16(),
              torch.cat([base, base], dim=1)[:, ::2], base[:1], base[3]]
    # at a quarter bit per entry one row cannot carry its side
    # information (the count, alpha, mean and norm of a call of the stream)
    low = QuantLinear.from_linear(lin, 4.0, act_rate=0.25, act_mode="fixed",
                                  center=center)
    with pytest.raises(ValueError, match="cannot be met"):
        low(base[:1])                                   # the lean path
    with pytest.raises(ValueError, match="cannot be met"):
        low._forward_quantized_acts(base[:1], fused=True)   # the general one
    for x in inputs:
        x2 = x.reshape(-1, n)
        got = lean(x)
        want = general._forward_quantized_acts(x2, fused=True).to(x.dtype)
        assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], a)
        np.testing.assert_array_equal(got.float().numpy(),
                                      want.reshape(got.shape).float().numpy())
        run = lean.act_cache._local.entry.run
        assert (run is not None) == applies
        # the matrix of the lean path's code: the bytes of the general one
        QX = lean.act_cache.quantized(x2, 4.0, lean._header, "fixed")
        QG = general.act_cache.quantized(x2, 4.0, general._header, "fixed")
        assert QX.to_bytes() == QG.to_bytes()
        np.testing.assert_array_equal(QX.coded_rows(), QG.coded_rows())
        if applies:
            rows = lean.act_cache.rows_float32(QX)
            assert lean.act_cache.fused_operand(
                x2, 4.0, lean._header, "fixed")[0] is rows
            np.testing.assert_array_equal(
                rows, general.act_cache.rows_float32(QG))
    assert lean.act_bits_per_entry == general.act_bits_per_entry
    assert lean.act_entries == general.act_entries
    assert (lean.act_cache.quantized_calls, lean.act_cache.quantized_entries
            ) == (general.act_cache.quantized_calls,
                  general.act_cache.quantized_entries)
    # q, k, v: one input, one quantization
    others = [copy.deepcopy(lean) for _ in range(2)]
    for o in others:
        o.act_cache = lean.act_cache
    calls = lean.act_cache.quantized_calls
    x = torch.randn(3, n)
    outs = [m(x) for m in (lean, *others)]
    assert lean.act_cache.quantized_calls == calls + 1
    for y in outs[1:]:
        np.testing.assert_array_equal(y.numpy(), outs[0].numpy())
    bad = torch.randn(6, n)
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        lean(bad)


def test_quantlinear_numba_path_input_forms():
    """The fused CPU path takes a vector, leading dimensions, an input that
    requires grad, a non-contiguous input and an empty batch, with the
    bits of the 2-D call with the same rows."""
    from nqlib.nn import QuantLinear

    n, a = 40, 16
    ql = QuantLinear.from_linear(_linear(n, a, seed=10), 4.0)
    x = torch.randn(6, n)
    y = ql(x)
    assert ql(x[2]).shape == (a,)
    np.testing.assert_array_equal(ql(x[2]).numpy(), ql(x[2:3])[0].numpy())
    np.testing.assert_array_equal(ql(x.reshape(2, 3, n)).numpy(),
                                  y.reshape(2, 3, a).numpy())
    yg = ql(x.clone().requires_grad_())
    assert not yg.requires_grad
    np.testing.assert_array_equal(yg.numpy(), y.numpy())
    wide = torch.zeros(6, 2 * n)
    wide[:, ::2] = x
    np.testing.assert_array_equal(ql(wide[:, ::2]).numpy(), y.numpy())
    assert ql(x[:0]).shape == (0, a)
    assert ql(x.reshape(2, 3, n)[:, :0]).shape == (2, 0, a)


def _rotation_case(n):
    """``(n_pad, P, signs, orth, rows)`` for rows of length ``n``: the
    rotation of the padded length, its factors as the fused kernels take
    them, and ``rows(M)``, M random float32 rows whose scales span six
    decades."""
    n_pad = -(-n // 8) * 8
    P = nqlib.RandomHadamard(n_pad, seed=n)
    rng = np.random.default_rng(n)

    def rows(M):
        return (rng.standard_normal((M, n))
                * 10.0 ** rng.uniform(-3, 3, (M, 1))).astype(np.float32)

    return (n_pad, P, P.signs.astype(np.int8),
            P.orthogonal.astype(np.float32), rows)


@pytest.mark.parametrize("n", (64, 512, 24, 48, 96, 192, 384, 1536, 3072,
                               40, 100, 576, 896))
def test_rotation_is_the_float32_oracle_bit_for_bit(n):
    """Every path of the fused kernels' rotation -- the Hadamard factor
    alone (m = 1), O_3 with eight windows of 24 floats per SIMD step and
    the single-window tail (m = 3: 24 ... 3072), the panels of eight rows
    (m > 3), padded lengths -- has the bits of the numpy oracle that does
    the documented float32 operations in their order, given the kernel's
    row sums; with and without centring and rotation, over batches."""
    from nqlib.kernels.cpu import fused
    from nqlib.reference.hadamard import rotate_rows_float32

    n_pad, P, signs, orth, rows = _rotation_case(n)
    for M in (1, 8, 9, 17):
        x = rows(M)
        x[0] = 0.0
        for center in (True, False):
            for sg in (signs, signs[:0]):
                out = np.empty((M, n_pad), np.float32)
                xsum = np.empty(M, np.float32)
                fused.rotate_rows(x, sg, orth, P.power_of_two, center, out,
                                  xsum)
                ref = rotate_rows_float32(x, xsum, sg, P.power_of_two, orth,
                                          center)
                np.testing.assert_array_equal(out.view(np.uint32),
                                              ref.view(np.uint32))
                exact = x.sum(axis=1, dtype=np.float64)
                assert np.all(np.abs(xsum - exact)
                              <= n * EPS32 * np.abs(x).sum(axis=1))


@pytest.mark.parametrize("n", (40, 72, 100, 200, 576, 640, 896, 960))
def test_rotation_panels_are_the_rows_bits(n):
    """Rows rotated eight at a time, one per SIMD lane (the path of odd
    factors m > 3: 576 = 64 x 9, 896 = 128 x 7, ...), give the bits of
    each row rotated alone, whatever the batch: zero rows, non-finite
    entries, lengths that need padding, with and without centring."""
    from nqlib.kernels.cpu import fused

    n_pad, P, signs, orth, rows = _rotation_case(n)
    assert n_pad // P.power_of_two > 3
    for M in (8, 9, 17, 33):
        x = rows(M)
        x[1] = 0.0
        x[2, 3] = np.nan
        x[M - 1, 0] = np.inf
        for center in (True, False):
            out = np.empty((M, n_pad), np.float32)
            xsum = np.empty(M, np.float32)
            fused.rotate_rows(x, signs, orth, P.power_of_two, center, out, xsum)
            for r in range(M):
                one = np.empty((1, n_pad), np.float32)
                s = np.empty(1, np.float32)
                fused.rotate_rows(x[r:r + 1], signs, orth, P.power_of_two,
                                  center, one, s)
                np.testing.assert_array_equal(out[r].view(np.uint32),
                                              one[0].view(np.uint32))
                assert s.view(np.uint32)[0] == xsum[r:r + 1].view(np.uint32)[0]
