"""The fused decode-matmul of fixed-mode weights, its users, and its code.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set by
conftest.py) on CPU tensors; on a CUDA machine the same tests run on the GPU.

* the decisions recorded in the layout reproduce numba's decoder, which
  they are needed for: at odd q its float64 round-off breaks exact ties;
* the halves and meta bytes the layout stores give numba's decode bit for
  bit (q = 13 .. 16, 8-bit halves, two parts, dropped blocks);
* the GPU decode equals the CPU decode bit for bit (float64), for two-part,
  8-bit, sketched (dropped blocks) and dithered matrices;
* ``decode_matmul`` equals ``x_rot @ decode.T`` to float32 round-off, for
  every kernel variant and awkward shapes (M = 1, M and N not multiples of
  the tiles);
* ``QuantLinear`` with ``backend="triton"`` equals its torch path, and
  ``nqlib.inner_products(..., backend="triton")`` equals the CPU path;
* every kernel compiles for sm_90 without a GPU; the GEMV loop has
  vectorised loads, no spills, and a bounded instruction count.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import nqlib  # noqa: E402
from nqlib import _backend  # noqa: E402
from nqlib.kernels.gpu import matmul_triton as mt  # noqa: E402
from nqlib.nn import QuantLinear  # noqa: E402
from nqlib.quantizers import fixed_layout  # noqa: E402
from nqlib.quantizers.cpu_layout import (  # noqa: E402
    decisions,
    e8_doubled_points,
    stored_fields,
)
from nqlib.quantizers.matrix import decode_codes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: (n, a, rate, options): two parts at q = 5 / 4 (nibbles); q = 43 / 38
#: (8-bit codes); sketching (the low part dropped, q = 3); dither; a single
#: part of q = 13 / 11 at 4 bit/entry
MATRICES = {
    "two-part": (64, 24, 4.0, {}),
    "8-bit": (100, 19, 7.0, {}),
    "sketched": (512, 24, 0.6, {}),
    "dither": (64, 24, 4.0, {"dither": True}),
    "4-bit": (1024, 20, 4.0, {}),
}


@pytest.fixture(scope="module")
def matrices():
    rng = np.random.default_rng(0)
    out = {}
    for name, (n, a, rate, kw) in MATRICES.items():
        A = rng.standard_normal((n, a)) + 0.3
        out[name] = nqlib.quantize(A, rate, mode="fixed", seed=3, **kw)
    return out


@pytest.fixture(scope="module")
def layouts(matrices):
    return {name: fixed_layout.gpu_layout(qm, DEVICE) for name, qm in matrices.items()}


# ---------------------------------------------------------------- decoding
def exact_rule_decode(codes, q):
    """E8 Voronoi decode in exact integer arithmetic with the library's tie
    rules (lowest index, integer coset): the residuals r = 2(y - q Q(y/q))."""
    Y = e8_doubled_points(codes)
    D = 2 * q
    best = None
    for s in (0, 1):
        f = (Y - q * s + q) // D
        r = Y - q * s - D * f
        odd = (f.sum(axis=1) & 1) == 1
        k = np.argmax(np.abs(r), axis=1)            # first maximum: lowest index
        rk = r[np.arange(len(r)), k]
        r[np.arange(len(r)), k] -= np.where(odd, np.where(rk >= 0, D, -D), 0)
        d = (r * r).sum(axis=1)
        best = (r, d) if best is None else (
            np.where((d < best[1])[:, None], r, best[0]), np.minimum(d, best[1]))
    return best[0]


@pytest.mark.parametrize("q", [3, 4, 13, 16, 43, 197])
def test_decisions_reproduce_numba(q):
    rng = np.random.default_rng(q)
    codes = rng.integers(0, q, size=(20000, 8))
    s, k, down, r = decisions(codes, q)     # checks itself against numba
    assert set(np.unique(s)) == {0, 1} and k.max() <= 7
    assert set(np.unique(down)) <= {0, 1}
    mismatch = np.any(exact_rule_decode(codes, q) != r, axis=1).mean()
    if q & (q - 1) == 0:
        # y / q exact in float64: round-off never decides, numba = exact rule
        assert mismatch == 0
    else:
        # round-off decides exact ties, each time by a coarse-lattice vector:
        # without the recorded decisions the GPU would disagree here
        assert mismatch > 0.001, mismatch


def stored_residuals(layout):
    """What the kernels compute from a layout, in numpy: the residuals
    ``r = 2 m + pi - q (+ delta at k)`` of every coded block (a, coded, 8)
    and the scale ``beta`` of each block (a, coded), from the words and the
    meta bytes only (the fix direction read from ``m_k``)."""
    a, coded = layout.vectors, layout.coded_blocks
    meta = layout.meta.cpu().numpy()[:, :coded].astype(np.int64)
    words = layout.words.cpu().numpy().view(np.uint32).astype(np.int64)
    if layout.code_bits == 4:
        w = words[:, :coded]
        m = (w[:, :, None] >> (4 * np.arange(8))) & 15
    else:
        w = words.reshape(a, -1, 2)[:, :coded]
        m = (w[:, :, np.arange(8) // 4] >> (8 * (np.arange(8) % 4))) & 255
    part = (np.arange(coded) >= layout.h).astype(np.int64)
    q = np.array(layout.q)[part][None, :]
    pi = (meta >> mt.PARITY_SHIFT) & 1
    odd = (meta >> mt.ODD_SHIFT) & 1
    k = (meta >> mt.FIX_SHIFT) & 7
    r = 2 * m + (pi - q)[:, :, None]
    r_k = np.take_along_axis(r, k[:, :, None], axis=2)[:, :, 0]
    delta = np.where(odd == 1, np.where(r_k >= 0, -2 * q, 2 * q), 0)
    np.put_along_axis(r, k[:, :, None], r_k[:, :, None] + delta[:, :, None], axis=2)
    betas = layout.betas.cpu().numpy()
    beta = betas[8 * part[None, :] + (meta >> mt.INDEX_SHIFT)]
    return r, beta


def assert_stored_is_numba(layout, want):
    """The decode of the stored residuals, ``beta r / 2`` in float64, is
    numba's decode bit for bit (dropped blocks: 0)."""
    r, beta = stored_residuals(layout)
    a, coded = beta.shape
    got = np.zeros((a, layout.n_pad))
    got[:, :8 * coded] = (beta[:, :, None] * (0.5 * r)).reshape(a, 8 * coded)
    np.testing.assert_array_equal(got, want)
    assert np.abs(r).max() <= 2 * max(layout.q)
    return r


@pytest.mark.parametrize("rate,qs", [
    (4.6, (15, 13)), (4.8, (16, 15)), (5.0, (19, 16)), (0.6, (3, 0))])
def test_stored_residuals_are_numba_decode(rate, qs):
    """Real matrices: two parts at q = 15 / 13 and 16 / 15 (4-bit halves),
    19 / 16 (8-bit halves), and a sketched one (low part dropped)."""
    A = np.random.default_rng(7).standard_normal((256, 12)) + 0.2
    qm = nqlib.quantize(A, rate, mode="fixed", seed=2)
    layout = fixed_layout.gpu_layout(qm, DEVICE)
    assert layout.q == qs and layout.code_bits == (8 if max(qs) > 16 else 4)
    assert (layout.coded_blocks < qm.n_pad // 8) == (qs[1] == 0)
    assert_stored_is_numba(layout, decode_codes(qm))


@pytest.mark.parametrize("q_hi,q_lo", [(14, 13), (16, 15), (43, 14), (197, 256)])
def test_stored_residuals_of_any_codes(q_hi, q_lo):
    """Random codes at any q (14 is no designed code's q): the halves and
    meta bytes gpu_layout stores give numba's decode, for two parts and
    with blocks dropped past the coded ones."""
    from nqlib.kernels.cpu import nested as kern

    rng = np.random.default_rng(q_hi)
    a, h, coded, n = 9, 5, 12, 128
    # scales are stored as float32, as in a payload
    betas = {"hi": np.float32([0.03, 0.05, 0.07]), "lo": np.float32([0.11, 0.13])}
    codes = np.zeros((a, coded, 8), dtype=np.int64)
    meta = np.zeros((a, coded), dtype=np.int64)
    want = np.zeros((a, n))
    for name, b0, b1, q in (("hi", 0, h, q_hi), ("lo", h, coded, q_lo)):
        c = rng.integers(0, q, size=(a * (b1 - b0), 8))
        index = rng.integers(0, len(betas[name]), size=len(c))
        m, pi, odd, k, r = stored_fields(c, q)
        assert m.min() >= 0 and m.max() < q
        codes[:, b0:b1] = m.reshape(a, b1 - b0, 8)
        meta[:, b0:b1] = (pi << mt.PARITY_SHIFT | odd << mt.ODD_SHIFT
                          | k << mt.FIX_SHIFT
                          | index << mt.INDEX_SHIFT).reshape(a, b1 - b0)
        out = np.empty((len(c), 8))
        kern.decode_multiscale_rows(c, index, q, betas[name].astype(np.float64),
                                    np.zeros((len(c), 8)), out)
        want[:, 8 * b0:8 * b1] = out.reshape(a, 8 * (b1 - b0))
    bits = 4 if max(q_hi, q_lo) <= 16 else 8
    layout = mt.upload(fixed_layout.pack_layout(
        codes.astype(np.uint8), meta.astype(np.uint8), (n, a), h,
        {"hi": q_hi, "lo": q_lo}, betas, bits), DEVICE)
    r = assert_stored_is_numba(layout, want)
    assert (r % 2 != 0).any() and (r % 2 == 0).any()     # both parities
    np.testing.assert_array_equal(mt.decode_rows(layout).cpu().numpy(), want)


@pytest.mark.parametrize("name", list(MATRICES))
def test_gpu_decode_is_the_cpu_decode(name, matrices, layouts):
    qm, layout = matrices[name], layouts[name]
    want = decode_codes(qm)
    got = mt.decode_rows(layout, torch.float64)
    assert got.device.type == torch.device(DEVICE).type
    np.testing.assert_array_equal(got.cpu().numpy(), want)
    got32 = mt.decode_rows(layout, torch.float32)
    np.testing.assert_array_equal(got32.cpu().numpy(), want.astype(np.float32))


def test_layout_contents(matrices, layouts):
    L = layouts["two-part"]
    assert (L.code_bits, L.q) == (4, (5, 4)) and L.stride_b % mt.ROW_ALIGN == 0
    assert layouts["8-bit"].code_bits == 8
    S = layouts["sketched"]
    assert S.q[1] == 0 and S.coded_blocks == S.h < S.n_pad // 8
    # bytes per weight, honestly: 4 (or 8) bytes of halves and one meta byte
    # per coded 8-block, 8 bytes of per-vector constants, a 64-byte table
    for name, L in layouts.items():
        n, a = L.shape
        per_block = 5 if L.code_bits == 4 else 9
        consts = 0 if name == "dither" else 8 * a
        assert L.bytes_read == a * L.coded_blocks * per_block + consts + 64
        assert L.bits_per_weight == 8 * L.bytes_read / (n * a)
    # at 4 bit/entry the GPU layout costs 5 bits + the per-vector constants
    L, qm = layouts["4-bit"], matrices["4-bit"]
    assert L.coded_blocks == qm.n_pad // 8
    assert 5.0 < L.bits_per_weight < 5.1 and qm.bits_per_entry < 4.1


def test_layout_rejects_other_matrices():
    A = np.random.default_rng(1).standard_normal((64, 8))
    for kw in (dict(mode="variable"), dict(method="rtn")):
        with pytest.raises(ValueError, match="nested-lattice matrix in fixed"):
            fixed_layout.gpu_layout(nqlib.quantize(A, 4, **kw), DEVICE)
    with pytest.raises(ValueError, match="QuantizedMatrix"):
        fixed_layout.gpu_layout(A, DEVICE)


# ------------------------------------------------------------ fused matmul
def assert_roundoff(got, x, W, rtol=1e-5):
    """|got - x @ W.T| <= rtol |x_i| |w_j| entrywise (float64 reference)."""
    x = np.asarray(x, dtype=np.float64)
    ref = x @ W.T
    bound = np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(W, axis=1)[None, :]
    err = np.abs(np.asarray(got, dtype=np.float64) - ref)
    assert np.all(err <= rtol * bound + 1e-30), (err / (bound + 1e-30)).max()


@pytest.mark.parametrize("name", ["two-part", "8-bit", "sketched", "4-bit"])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 17])
def test_decode_matmul_equals_the_reference(name, m, matrices, layouts):
    qm, layout = matrices[name], layouts[name]
    W = decode_codes(qm)
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, qm.n_pad)).astype(np.float32)
    got = mt.decode_matmul(torch.from_numpy(x).to(DEVICE), layout)
    assert got.shape == (m, qm.shape[1]) and got.dtype == torch.float32
    assert_roundoff(got.cpu().numpy(), x, W)


@pytest.mark.parametrize("config", [
    ("gemv", 1, 16, 16, 4), ("fma", 2, 16, 32, 4), ("fma", 4, 16, 16, 4),
    ("dot", 16, 16, 16, 4), ("dot", 32, 32, 16, 4)])
def test_every_kernel_variant(config, matrices, layouts):
    """All variants on one shape where no dimension fits the tiles: 20
    vectors, 128 blocks of which the tiles cover 16 or 32, 5 rows."""
    qm, layout = matrices["4-bit"], layouts["4-bit"]
    W = decode_codes(qm)
    x = np.random.default_rng(2).standard_normal((5, qm.n_pad)).astype(np.float32)
    got = mt.decode_matmul(torch.from_numpy(x).to(DEVICE), layout, config=config)
    assert_roundoff(got.cpu().numpy(), x, W)


def test_decode_matmul_rejects_bad_input(layouts):
    L = layouts["two-part"]
    x = torch.zeros((2, 64), device=DEVICE)
    with pytest.raises(ValueError, match="dither"):
        mt.decode_matmul(x, layouts["dither"])
    with pytest.raises(ValueError, match="shape"):
        mt.decode_matmul(torch.zeros((2, 60), device=DEVICE), L)
    with pytest.raises(ValueError, match="dtype"):
        mt.decode_matmul(x.double(), L)
    with pytest.raises(ValueError, match="contiguous"):
        mt.decode_matmul(torch.zeros((64, 2), device=DEVICE).t(), L)
    with pytest.raises(ValueError, match="precision"):
        mt.decode_matmul(x, L, precision="bf16")
    with pytest.raises(ValueError, match="GpuLayout"):
        mt.decode_matmul(x, "layout")
    with pytest.raises(ValueError, match="tl.dot"):
        mt.decode_matmul(x, L, config=("dot", 8, 16, 16, 4))
    assert mt.decode_matmul(x[:0], L).shape == (0, 24)


# ------------------------------------------------------------- QuantLinear
@pytest.mark.parametrize("in_features,rate,bias,kw", [
    (64, 4.0, True, {}),
    (20, 8.0, True, {}),                         # n_pad = 24: padding
    (20, 8.0, False, {}),
    (48, 6.0, True, {"center": False, "rotate": False}),
    (40, 6.0, False, {"normalize": False}),      # 40 = 8 x 5: O_5 factor
])
def test_quant_linear_triton_equals_torch_path(in_features, rate, bias, kw):
    torch.manual_seed(in_features)
    lin = torch.nn.Linear(in_features, 33, bias=bias)
    with torch.no_grad():
        lin.weight += 0.05                       # a common offset: means
    ql = QuantLinear.from_linear(lin, rate, **kw)
    x = torch.randn(2, 3, in_features)
    want = ql(x)                                 # CPU tensor: torch path
    ql.backend = "triton"
    got = ql(x.to(DEVICE))
    assert got.shape == want.shape and got.device.type == torch.device(DEVICE).type
    W = ql.dequantized_weight().double().numpy()
    x2 = x.reshape(-1, in_features).double().numpy()
    ref = x2 @ W.T + (lin.bias.detach().double().numpy() if bias else 0.0)
    bound = (np.linalg.norm(x2, axis=1)[:, None] * np.linalg.norm(W, axis=1)
             + (np.abs(lin.bias.detach().numpy()) if bias else 0.0))
    for out in (got.cpu(), want):
        err = np.abs(out.reshape(-1, 33).double().numpy() - ref)
        assert np.all(err <= 1e-5 * bound), (err / bound).max()


def test_quant_linear_backend_choice(monkeypatch):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    ql = QuantLinear.from_linear(lin, 4.0)
    x = torch.randn(3, 64)

    def boom(*args):
        raise AssertionError("the fused kernel ran")

    # "auto" keeps CPU tensors on the torch path, as does "torch"
    monkeypatch.setattr(QuantLinear, "_forward_triton", boom)
    if DEVICE == "cpu":
        ql(x)
    ql.backend = "torch"
    ql(x.to(DEVICE))
    monkeypatch.undo()
    ql.backend = "cuda"
    with pytest.raises(ValueError, match="QuantLinear.backend"):
        ql(x)
    ql.backend = "triton"
    ql.act_rate = 4.0
    with pytest.raises(ValueError, match="float activations"):
        ql(x.to(DEVICE))
    ql.act_rate = None
    dithered = QuantLinear.from_linear(lin, 4.0, dither=True)
    dithered.backend = "triton"
    with pytest.raises(ValueError, match="without dither"):
        dithered(x.to(DEVICE))
    monkeypatch.setattr(_backend, "triton_usable", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA device"):
        ql(x.to(DEVICE))


# ------------------------------------------------------------ nqlib.matmul
@pytest.mark.parametrize("left,right", [
    ({}, {}), ({"dither": True}, {"dither": True}),
    ({"center": False, "rotate": False}, {"center": False, "rotate": False}),
    ({"normalize": False}, {}),
    ({}, {"rotate": False}),                  # different domains: dequantize
])
def test_matmul_triton_equals_cpu(left, right):
    rng = np.random.default_rng(4)
    A = rng.standard_normal((100, 12)) + 0.5
    B = rng.standard_normal((100, 7)) - 0.25
    QA = nqlib.quantize(A, 6, mode="fixed", seed=5, **left)
    QB = nqlib.quantize(B, 6, mode="fixed", seed=5, **right)
    want = nqlib.inner_products(QA, QB)
    got = nqlib.inner_products(QA, QB, backend="triton")
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    assert got.shape == (12, 7)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


def test_matmul_backend_errors(monkeypatch):
    A = np.random.default_rng(5).standard_normal((64, 8))
    QA = nqlib.quantize(A, 5, mode="fixed")
    QV = nqlib.quantize(A, 5, mode="variable")
    with pytest.raises(ValueError, match="nested fixed-mode"):
        nqlib.inner_products(QA, QV, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        nqlib.inner_products(QA, QA, backend="cuda")
    np.testing.assert_array_equal(nqlib.inner_products(QA, QA, backend="numpy"),
                                  nqlib.inner_products(QA, QA))
    monkeypatch.setattr(_backend, "triton_usable", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA device.*TRITON_INTERPRET"):
        nqlib.inner_products(QA, QA, backend="triton")


# ------------------------------------------------------- compiled for sm_90
GPU_ISA = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_isa.py"

SM90_SCRIPT = textwrap.dedent(r"""
    import importlib.util, json, sys
    from triton.backends import backends
    if "nvidia" not in backends:
        print("SKIP no nvidia backend"); sys.exit(0)
    from nqlib.kernels.gpu import hadamard_triton as H, matmul_triton as M

    spec = importlib.util.spec_from_file_location("gpu_isa", sys.argv[1])
    isa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(isa)

    out = {}
    for config, bits in [(("gemv", 1, 16, 32, 4), 4), (("gemv", 1, 16, 32, 4), 8),
                         (("fma", 2, 16, 32, 4), 4), (("dot", 16, 64, 16, 4), 4)]:
        out[f"{config[0]}-{bits}"] = isa.loop_instruction_counts(config, bits)
    f64, f32 = "*fp64", "*fp32"
    isa.compile_kernel(M.JIT_KERNELS["decode_rows"], dict(
        words_ptr="*i32", meta_ptr="*u8", beta_ptr=f64, z_ptr=f64,
        out_ptr=f64, N="i32", BC="i32", stride_b="i32", H="i32", q_hi="i32",
        q_lo="i32", row_len="i32"), dict(CODE_BITS=4, BLOCK_N=16, BLOCK_B=32,
        HAS_DITHER=True), enable_fp_fusion=False)
    for bits in (4, 8):
        isa.compile_kernel(M.JIT_KERNELS["tile"], dict(
            xr_ptr=f32, out_ptr=f32, M="i32", BC="i32", stride_xr="i32",
            T="i32"), dict(CODE_BITS=bits, BLOCK_B=32), enable_fp_fusion=False)
    k = isa.compile_kernel(H._fwht_kernel, dict(x_ptr=f32, scale_ptr=f32, M="i32"),
                           dict(N=4096, LOG_N=12, BLOCK_M=1), num_warps=8)
    sass = isa.sass_text(k.asm["cubin"])
    out["fwht_spills"] = None if sass is None else ("LDL" in sass or "STL" in sass)
    print(json.dumps(out))
""")


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", SM90_SCRIPT, str(GPU_ISA)], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    if res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    import json

    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["fwht_spills"] in (False, None)
    for name in ("gemv-4", "gemv-8"):
        counts = out[name]
        ops = counts["sass_opcodes"]
        assert "LDL" not in ops and "STL" not in ops, name      # no spills
        assert "BAR" not in ops, name          # no shared-memory shuffles
        # decode and multiply-add in about 7.4 instructions per weight
        # (sm_90 SASS, Triton 3.9; 17.5 before the layout stored halves);
        # fail loudly if a change brings back most of that
        assert 4 < counts["sass_per_weight"] < 12, counts
        # the halves are read as subnormal floats: nothing may flush them
        assert counts["ftz_in_loop"] is False, name
        # no int-to-float conversion per weight: at most one per block
        per_thread = counts["weights_per_iteration"] / counts["threads"]
        assert ops.get("I2F", 0) + ops.get("I2FP", 0) <= per_thread / 8, ops
    assert out["fma-4"]["sass_per_weight"] < 2 * out["gemv-4"]["sass_per_weight"]
    assert out["dot-4"]["sass_per_weight"] < 16 * out["gemv-4"]["sass_per_weight"]


@pytest.mark.parametrize("name", ["two-part", "8-bit", "sketched"])
@pytest.mark.parametrize("m,block_m,block_b", [(1, 1, 32), (3, 4, 16), (5, 16, 16)])
def test_activation_tiles(layouts, name, m, block_m, block_b):
    """The one-launch tiling kernel writes what the fused kernels expect:
    scaled coordinates (exact powers of two), block sums, plain coordinates,
    zeros past the coded blocks and on the padding rows."""
    lay = layouts[name]
    rng = np.random.default_rng(m)
    x_rot = torch.from_numpy(rng.standard_normal((m, lay.n_pad)).astype(np.float32))
    x = mt.tiled_activations(x_rot.to(DEVICE), lay, block_m, block_b).cpu().numpy()
    T = -(-lay.stride_b // block_b)
    rows = -(-m // block_m) * block_m
    assert x.shape == (rows, T, mt.X_ROWS, block_b)
    full = np.zeros((rows, T * block_b, 8), dtype=np.float32)
    bc = lay.coded_blocks
    full[:m, :bc] = x_rot.numpy()[:, :8 * bc].reshape(m, bc, 8)
    got = x.transpose(0, 1, 3, 2).reshape(rows, T * block_b, mt.X_ROWS)
    scale = np.array([2.0 ** (23 - p) for p in mt.FIELD_SHIFTS[lay.code_bits]],
                     dtype=np.float32)
    np.testing.assert_array_equal(got[..., :8], full * scale)
    np.testing.assert_allclose(got[..., 8], full.sum(axis=2), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[..., 9:], full)


@pytest.mark.parametrize("m", [1, 3, 20])
def test_fused_matmul_with_flushed_subnormals(layouts, matrices, m):
    """With flush-to-zero on (torch.set_flush_denormal), the interpreter
    path must not read the halves as subnormals (they would all become 0):
    the launcher falls back to normal-float halves, same answers."""
    if DEVICE == "cuda" or not torch.set_flush_denormal(True):
        pytest.skip("needs the interpreter on a CPU that can flush denormals")
    try:
        assert not mt.subnormals_kept("cpu")
        lay = layouts["4-bit"]
        x = torch.from_numpy(np.random.default_rng(m).standard_normal(
            (m, lay.n_pad)).astype(np.float32))
        got = mt.decode_matmul(x, lay).numpy().astype(np.float64)
    finally:
        torch.set_flush_denormal(False)
    assert mt.subnormals_kept("cpu")
    ref = x.numpy().astype(np.float64) @ decode_codes(matrices["4-bit"]).T
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
