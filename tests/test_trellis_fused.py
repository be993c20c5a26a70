"""The fused decode-matmul for trellis weights: the numba kernels
(nqlib.kernels.cpu.trellis_fused), the CPU layout
(nqlib.quantizers.trellis_layout) behind QuantLinear on CPU, and the Triton
kernel (nqlib.kernels.gpu.trellis_triton; the interpreter without a GPU).

* the kernels' own decoder gives the file decoder's values bit for bit, on
  matrices from the encoder and on random streams (every geometry: many
  sequences per vector, windows that wrap, L from 2 to 20, 1 to 8 bits
  per entry, sketching);
* the products equal decode-then-matmul to float32 round-off, for batch
  1..65, shapes that are not multiples of the tiles, sketched and
  time-shared matrices, pipelines with steps switched off;
* the layout rebuilds the file's bytes and holds the stream and the side
  information only;
* QuantLinear on CPU holds only the layout (no float weight), runs the fused
  kernel for float32 / bfloat16 inputs and for quantized activations, keeps
  nothing after a forward or a ``.weight`` read, and keeps its state dict
  round trip;
* the Triton kernel decodes the same bits and gives the same products, also
  through QuantLinear.
"""

import contextlib
import copy
import io
import pickle

import numpy as np
import pytest

import nqlib
from nqlib.kernels.cpu import trellis_fused as tf
from nqlib.matmul import same_domain
from nqlib.quantizers import trellis as tq
from nqlib.quantizers.matrix import decode_codes, quantize_columns
from nqlib.quantizers.payloads import TrellisPayload
from nqlib.quantizers.trellis_layout import TrellisLayout, supports, trellis_layout

torch = pytest.importorskip("torch")

EPS32 = float(np.finfo(np.float32).eps)

# (n, a, rate, seq_len, L, options): n not a multiple of 8 (padding), a not
# a multiple of 8 or 16 (padding rows), several sequences per vector,
# fractional rates (time sharing), sketching below one bit per entry,
# pipelines with steps switched off, the default L and sequence length
CASES = [
    (300, 37, 2.5, 64, 9, {}),
    (200, 21, 0.6, 50, 6, dict(sketch=True)),
    (520, 19, 4.0, 100, 12, dict(center=False)),
    (136, 24, 3.0, tq.DEFAULT_SEQ_LEN, tq.DEFAULT_L, dict(rotate=False)),
    (264, 9, 1.0, 40, 8, dict(normalize=False)),
    (128, 17, 6.5, 64, 11, {}),
    (96, 16, 2.0, 37, 7, dict(estimator="unbiased")),
]


@contextlib.contextmanager
def code_defaults(seq_len, L):
    """The trellis module's defaults, set for one quantize call (the
    encoder reads them at the call)."""
    old = tq.DEFAULT_SEQ_LEN, tq.DEFAULT_L
    tq.DEFAULT_SEQ_LEN, tq.DEFAULT_L = seq_len, L
    try:
        yield
    finally:
        tq.DEFAULT_SEQ_LEN, tq.DEFAULT_L = old


def _qm(n, a, rate, seq_len, L, opts, seed=0):
    rng = np.random.default_rng([n, a, seed])
    A = rng.standard_normal((n, a)) * rng.uniform(0.5, 2.0, size=a) + 0.3
    with code_defaults(seq_len, L):
        return nqlib.quantize(A, rate, mode="trellis", seed=seed + 7, **opts)


@pytest.fixture(scope="module", params=range(len(CASES)))
def case(request):
    qm = _qm(*CASES[request.param])
    return qm, trellis_layout(qm)


def _ref_product(qm, x):
    """``x @ W_hat`` in float64 (the oracle: decode, then multiply)."""
    return np.asarray(x, dtype=np.float64) @ qm.dequantize()


def _tolerance(qm, x):
    """float32 round-off of a length-n_pad product (with the float32
    rotation of x): a few eps times sqrt(n_pad) times sum |x| |w|."""
    return 8 * EPS32 * np.sqrt(qm.n_pad) * (np.abs(x) @ np.abs(qm.dequantize()))


def _code(payload):
    """The kernels' code arguments of a payload (stream padded)."""
    data = np.zeros(payload.packed.size + tf.STREAM_PAD, dtype=np.uint8)
    data[:payload.packed.size] = payload.packed
    return (data, payload.keep, payload.seq_len, payload.total_bits, payload.L,
            tq.hash_multiplier(), tq.HASH_SHIFT, payload.qbits,
            tq.quantile_table(payload.qbits), np.float32(payload.beta))


def _numba_decode(payload, a, n_pad):
    """The file decoder's values (float32) of a payload."""
    return tq.decode(payload, a, n_pad).astype(np.float32)


# --------------------------------------------------------------- layout
def test_layout_rebuilds_the_file(case):
    qm, lay = case
    assert lay.to_bytes() == qm.to_bytes()
    back = lay.to_quantized()
    np.testing.assert_array_equal(back.dequantize(), qm.dequantize())


def test_layout_holds_the_stream_and_the_side_information(case):
    qm, lay = case
    n, a = qm.shape
    p = qm.payload
    arrays = lay.arrays()
    np.testing.assert_array_equal(arrays["data"][:p.packed.size], p.packed)
    assert not arrays["data"][p.packed.size:].any()
    assert arrays["data"].size == p.packed.size + tf.STREAM_PAD
    for name, arr in arrays.items():     # no float array but the side information
        assert not np.issubdtype(arr.dtype, np.floating) or name in (
            "means", "norms", "orth"), name
    side = 4 * a * (qm.center + qm.normalize) + (qm.n_pad if qm.rotate else 0)
    assert lay.nbytes == p.packed.size + tf.STREAM_PAD + side + lay.orth.nbytes
    assert lay.code_nbytes == p.packed.size + tf.STREAM_PAD


def test_supports_says_why():
    A = np.random.default_rng(0).standard_normal((64, 16))
    assert "trellis mode" in supports(nqlib.quantize(A, 4.0, mode="fixed"))
    assert "QuantizedMatrix" in supports(A)
    with pytest.raises(ValueError, match="trellis mode"):
        trellis_layout(nqlib.quantize(A, 4.0, method="rtn"))


# ------------------------------------------------------------ decoding
def test_kernel_decoder_is_the_file_decoder(case):
    """The kernels' decoder (vector loop and scalar wrap-around steps) gives
    the file decoder's values bit for bit; entries past keep are 0."""
    qm, lay = case
    np.testing.assert_array_equal(lay.raw_rows().astype(np.float64),
                                  decode_codes(qm))


# (a, n_pad, keep, bits per kept entry, L, seq_len)
RANDOM_STREAMS = [
    (5, 64, 64, 2.0, 15, 64),
    (11, 40, 40, 1.0, 2, 40),         # the smallest L; 1 bit per entry
    (9, 96, 96, 8.0, 20, 48),         # the largest L; 8 bits per entry
    (3, 200, 200, 2.6, 20, 9),        # sequences of 8 or 9 weights: L ~ Bs
    (17, 128, 50, 1.37, 12, 20),      # sketched, fractional
    (8, 1000, 1000, 3.3, 13, 1000),
    (2, 24, 24, 4.0, 5, 4),           # sequences of 4 weights
]


@pytest.mark.parametrize("a,n_pad,keep,rate,L,seq_len", RANDOM_STREAMS)
def test_random_streams_decode_and_multiply(a, n_pad, keep, rate, L, seq_len):
    """Any stream is a code word: random bits over every geometry, against
    the numba decoder (bits) and decode-then-matmul (round-off)."""
    rng = np.random.default_rng([a, n_pad, L])
    total = int(rate * a * keep)
    lay = tq.layout(a, n_pad, keep, total, seq_len)
    lay.check(L)
    packed = rng.integers(0, 256, -(-total // 8)).astype(np.uint8)
    if total % 8:
        packed[-1] &= np.uint8((0xFF << (8 - total % 8)) & 0xFF)
    p = TrellisPayload(L=L, qbits=tq.TABLE_BITS, seq_len=seq_len, keep=keep,
                       beta=0.83, total_bits=total, packed=packed)
    want = _numba_decode(p, a, n_pad)
    data, *rest = _code(p)
    got = np.empty((a, keep), np.float32)
    tf.decode_rows(data, a, *rest, got)
    np.testing.assert_array_equal(got, want[:, :keep])
    empty = np.zeros(0, np.float32)
    for M in (1, 4, 5, 23):
        x = rng.standard_normal((M, n_pad)).astype(np.float32)
        out = np.empty((M, a), np.float32)
        tf.products(x, np.zeros(M, np.float32), data, *rest, 1.0, n_pad, empty,
                    empty, empty, 4, 1, out)
        ref = x.astype(np.float64) @ want.T.astype(np.float64)
        tol = 8 * EPS32 * np.sqrt(n_pad) * (np.abs(x) @ np.abs(want).T)
        assert np.all(np.abs(out - ref) <= tol), M


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


def test_raw_products_and_rotation(case):
    """The products in the coded domain against the decoded rows; the
    rotation against the library's."""
    qm, lay = case
    n = qm.shape[0]
    rng = np.random.default_rng(1)
    raw = decode_codes(qm)
    for M in (1, 9):
        xr = rng.standard_normal((M, qm.n_pad)).astype(np.float32)
        got = lay.raw_products(xr)
        ref = xr.astype(np.float64) @ raw.T
        tol = 8 * EPS32 * np.sqrt(qm.n_pad) * (np.abs(xr) @ np.abs(raw).T)
        assert np.all(np.abs(got - ref) <= tol)
    x = rng.standard_normal((3, n)).astype(np.float32)
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
    assert lay.linear(np.zeros((0, n), dtype=np.float32)).shape == (0, a)
    with pytest.raises(ValueError, match="x must have shape"):
        lay.linear(np.zeros((2, n + 1), dtype=np.float32))
    with pytest.raises(ValueError, match="x must have shape"):
        lay.linear(np.zeros(n, dtype=np.float32))
    with pytest.raises(ValueError, match="bias must have shape"):
        lay.linear(np.zeros((2, n), dtype=np.float32), np.zeros(a + 1))
    with pytest.raises(ValueError, match="xsum must have shape"):
        lay.linear_rotated(np.zeros((2, qm.n_pad), np.float32), np.zeros(3))
    with pytest.raises(ValueError, match="x_rot must have shape"):
        lay.raw_products(np.zeros((2, qm.n_pad - 1), np.float32))


def test_kernel_threads_give_the_same_products():
    """The tasks split rows only: one thread and two give the same bits."""
    import numba

    lay = trellis_layout(_qm(300, 37, 2.5, 64, 9, {}))
    x = np.random.default_rng(3).standard_normal((20, 300)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = [lay.linear(x[:1]), lay.linear(x)]
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = [lay.linear(x[:1]), lay.linear(x)]
    finally:
        numba.set_num_threads(before)
    for u, v in zip(one, two):
        np.testing.assert_array_equal(u, v)


# ---------------------------------------------------------- QuantLinear
def _linear(n, a, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n, a)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(a, 1) + 0.5)
    return lin


def _trellis_linear(n, a, rate=2.0, seed=0, **kw):
    from nqlib.nn import QuantLinear

    with code_defaults(64, 10):
        return QuantLinear.from_linear(_linear(n, a, seed), rate, mode="trellis",
                                       **kw)


def test_quantlinear_holds_only_the_stream():
    n, a = 512, 40
    ql = _trellis_linear(n, a)
    lay = ql.cpu_layout
    assert isinstance(lay, TrellisLayout)
    arrays = ql.resident_arrays()
    assert arrays.keys() == {"layout." + k for k in lay.arrays()} | {"bias"}
    for name, arr in arrays.items():  # no float array near the weight's size
        size = arr.numel() if isinstance(arr, torch.Tensor) else arr.size
        floating = (arr.is_floating_point() if isinstance(arr, torch.Tensor)
                    else np.issubdtype(arr.dtype, np.floating))
        assert not (floating and size >= n), name
    x = torch.randn(5, n)
    ql(x)
    ql(x[:1])
    _ = ql.weight
    _ = ql.dequantized_weight()
    assert ql.resident_arrays().keys() == arrays.keys()   # nothing cached
    qm = ql.quantized_weight
    assert ql.resident_nbytes == lay.nbytes + 4 * a
    # the file's stream and side information, 8 bytes of padding, and the
    # rotation's signs (one byte per coordinate) and odd factor
    assert qm.center and qm.normalize and qm.rotate
    assert lay.nbytes == (qm.payload.packed.nbytes + tf.STREAM_PAD + 8 * a
                          + qm.n_pad + lay.orth.nbytes)


@pytest.mark.parametrize("M", (1, 3, 16, 65))
def test_quantlinear_forward_is_the_fused_product(M):
    n, a = 200, 70
    ql = _trellis_linear(n, a, rate=3.0, seed=1)
    qm = ql.quantized_weight
    bias = ql.bias.detach().numpy()
    x = torch.randn(M, n)
    y = ql(x)
    ref = _ref_product(qm, x.numpy()) + bias
    assert np.all(np.abs(y.numpy() - ref) <= _tolerance(qm, x.numpy()) + 1e-6)
    # leading dimensions and bfloat16 inputs: float32 arithmetic, input dtype out
    xb = torch.randn(2, 3, n).bfloat16()
    yb = ql(xb)
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, a)
    torch.testing.assert_close(yb, ql(xb.float()).bfloat16(), rtol=0, atol=0)


def test_quantlinear_weight_is_decoded_lazily_and_not_kept():
    ql = _trellis_linear(136, 24, seed=2)
    held = ql.resident_arrays().keys()
    W = ql.weight
    assert ql.resident_arrays().keys() == held
    np.testing.assert_array_equal(W.numpy(),
                                  ql.quantized_weight.dequantize(np.float32).T)
    W.zero_()
    assert torch.count_nonzero(ql.weight) > 0


def test_quantlinear_backends_agree():
    ql = _trellis_linear(136, 40, seed=2)
    x = torch.randn(9, 136)
    y = ql(x)
    ql.backend = "torch"
    y_torch = ql(x)
    ql.backend = "numba"
    torch.testing.assert_close(ql(x), y)
    torch.testing.assert_close(y_torch, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M", (1, 6))
def test_quantized_activations_meet_the_stream(M):
    """W-trellis, A-quantized: the fused kernel gives the estimate of
    nqlib.inner_products on the two quantized operands, plus the bias."""
    n, a = 264, 40
    ql = _trellis_linear(n, a, rate=3.0, seed=5, act_rate=4.0, act_mode="fixed")
    assert ql.cpu_layout is not None
    x = torch.randn(M, n) * 3 + 1
    y = ql(x)
    QX = quantize_columns(x.double().numpy().T, 4.0, seed=0, mode="fixed",
                          stream=True)
    assert same_domain(QX, ql.quantized_weight)  # the fused path
    ref = (nqlib.inner_products(QX, ql.quantized_weight)
           + ql.bias.detach().numpy())
    np.testing.assert_allclose(y.numpy(), ref, rtol=0,
                               atol=64 * EPS32 * np.abs(ref).max())


def test_state_dict_round_trip_rebuilds_the_layout():
    from nqlib.nn import QuantLinear

    src = _trellis_linear(128, 48, seed=3)
    sd = src.state_dict()
    assert set(sd) == {"qweight", "bias"}
    assert bytes(sd["qweight"].numpy()) == src.quantized_weight.to_bytes()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    dst = QuantLinear.from_linear(_linear(128, 48, seed=4), 4.0)   # fixed mode
    dst.load_state_dict(torch.load(buf))
    assert isinstance(dst.cpu_layout, TrellisLayout)
    for name, arr in src.cpu_layout.arrays().items():
        np.testing.assert_array_equal(dst.cpu_layout.arrays()[name], arr)
    x = torch.randn(4, 128)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    for other in (pickle.loads(pickle.dumps(src)), copy.deepcopy(src)):
        torch.testing.assert_close(other(x), src(x), rtol=0, atol=0)


_WORKQUEUE_SCRIPT = """
from concurrent.futures import ThreadPoolExecutor
import torch
from nqlib.kernels.cpu import guard, trellis_fused
from nqlib.nn import QuantLinear

assert guard.layer() == "workqueue", guard.layer()
assert hasattr(trellis_fused.gemm, "kernel")
assert hasattr(trellis_fused.linear, "kernel")
torch.manual_seed(0)
ql = QuantLinear.from_linear(torch.nn.Linear(136, 48), 3.0, mode="trellis")
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


@pytest.mark.parametrize("cold", [
    False, pytest.param(True, marks=pytest.mark.slow)])
def test_fused_kernels_are_guarded_on_the_workqueue_layer(cold, tmp_path):
    """Concurrent forwards on numba's workqueue layer (not thread-safe):
    the trellis kernels and their drivers are serialised, results equal.
    ``cold``: with an empty numba cache, so that the drivers are compiled
    after the guard replaced the parallel kernels they call (the wrappers
    carry the kernels' numba types)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue",
               NUMBA_NUM_THREADS="2")
    if cold:
        env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba-cache")
    out = subprocess.run([sys.executable, "-c", _WORKQUEUE_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


# --------------------------------------------------------------- Triton
def _triton_device():
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("index", (0, 1, 2))
def test_triton_kernel_decodes_the_same_bits_and_products(index):
    """The Triton kernel's decoder gives numba's bits; its products (FMA
    and tl.dot tiles, with the epilogue) numba's, to float32 round-off."""
    from nqlib.kernels.gpu import trellis_triton as tt

    device = _triton_device()
    qm = _qm(*CASES[index])
    lay = trellis_layout(qm)
    p = qm.payload
    n, a = qm.shape
    data = torch.from_numpy(p.packed.copy()).to(device)
    table = torch.from_numpy(tq.quantile_table(p.qbits).copy()).to(device)
    code = (data, a, p.keep, p.seq_len, p.total_bits, p.L, tq.hash_multiplier(),
            tq.HASH_SHIFT, p.qbits, table, p.beta)
    got = tt.decode_rows(*code).cpu().numpy()
    np.testing.assert_array_equal(got, _numba_decode(p, a, qm.n_pad)[:, :p.keep])
    raw = decode_codes(qm)
    rng = np.random.default_rng(index)
    for M in (1, 3, 17):
        xr = rng.standard_normal((M, qm.n_pad)).astype(np.float32)
        out = tt.decode_matmul(torch.from_numpy(xr).to(device), *code)
        ref = xr.astype(np.float64) @ raw.T
        tol = 8 * EPS32 * np.sqrt(qm.n_pad) * (np.abs(xr) @ np.abs(raw).T)
        assert np.all(np.abs(out.cpu().numpy() - ref) <= tol), M
        np.testing.assert_allclose(out.cpu().numpy(), lay.raw_products(xr),
                                   rtol=0, atol=float(tol.max()) + 1e-30)


def test_triton_quant_linear_equals_the_cpu_kernel():
    device = _triton_device()
    ql = _trellis_linear(100, 21, rate=2.5, seed=6)
    x = torch.randn(2, 3, 100)
    want = ql(x)                                  # CPU: the numba kernel
    ql.backend = "triton"
    got = ql(x.to(device))
    assert got.shape == want.shape and got.device.type == device
    qm = ql.quantized_weight
    x2 = x.reshape(-1, 100).numpy()
    ref = _ref_product(qm, x2) + ql.bias.detach().numpy()
    tol = _tolerance(qm, x2) + 1e-6
    for out in (got.cpu(), want):
        assert np.all(np.abs(out.reshape(-1, 21).numpy() - ref) <= tol)
    assert "gpu_layout.data" in ql.resident_arrays()   # the device copy
    with pytest.raises(ValueError, match="float32"):
        from nqlib.kernels.gpu import trellis_triton as tt

        tt.decode_matmul(torch.zeros(2, 3, dtype=torch.float64).to(device),
                         torch.zeros(4, dtype=torch.uint8).to(device), 1, 3, 3,
                         6, 4, tq.hash_multiplier(), tq.HASH_SHIFT, tq.TABLE_BITS,
                         torch.from_numpy(tq.quantile_table().copy()).to(device),
                         1.0)


_PORTABLE_SCRIPT = """
import pickle, sys
import numpy as np
from nqlib.kernels.cpu import fused

assert not fused.HAVE_AVX2
with open(sys.argv[1], "rb") as fh:
    lay, raw, cases = pickle.load(fh)
np.testing.assert_array_equal(lay.raw_rows(), raw)
for x, ref, tol in cases:
    assert np.all(np.abs(lay.linear(x) - ref) <= tol), len(x)
print("ok")
"""


@pytest.mark.slow
def test_portable_build_without_avx2(tmp_path):
    """With a generic target CPU the gathers are lane-by-lane loads: the
    same decoded bits and products (a subprocess: the target is fixed when
    numba starts)."""
    import os
    import subprocess
    import sys

    qm = _qm(*CASES[0])
    lay = trellis_layout(qm)
    cases = []
    for M in (1, 7):
        x = np.random.default_rng(M).standard_normal((M, 300)).astype(np.float32)
        cases.append((x, _ref_product(qm, x), _tolerance(qm, x)))
    path = tmp_path / "case.pkl"
    path.write_bytes(pickle.dumps((lay, lay.raw_rows(), cases)))
    env = dict(os.environ, NUMBA_CPU_NAME="generic")
    out = subprocess.run([sys.executable, "-c", _PORTABLE_SCRIPT, str(path)],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
