"""The Triton Walsh--Hadamard transform and RandomHadamard on torch tensors.

Without a GPU the kernel runs under ``TRITON_INTERPRET=1`` (set by
conftest.py) on CPU tensors; on a CUDA machine the same tests run on the GPU.

* float64 rows: the same bits as the numba kernel (same butterfly order),
  in one pass and in several (rows longer than the tile);
* float32 rows: within float32 round-off of numba's float64 result, and
  exactly equal on dyadic data;
* ``RandomHadamard.apply`` / ``.inverse`` on tensors: equal to the numpy
  path, tensor in, tensor out (device and dtype kept);
* bad tensors and an unusable Triton are refused with clear errors.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from nqlib import RandomHadamard, _backend  # noqa: E402
from nqlib.kernels.cpu.hadamard import fwht_rows as fwht_numba  # noqa: E402
from nqlib.kernels.gpu.hadamard_triton import fwht_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    return torch.equal(a.cpu().view(BITS[a.dtype]), b.cpu().view(BITS[b.dtype]))


def numba_fwht(x, scale):
    out = np.array(x, dtype=np.float64)
    fwht_numba(out, scale)
    return out


@pytest.mark.parametrize("n", [1, 2, 8, 64, 1024])
def test_float64_equals_numba_bit_for_bit(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((5, n)) * 10.0 ** rng.integers(-3, 4, size=(5, 1))
    scale = 1.0 / math.sqrt(n)
    want = torch.from_numpy(numba_fwht(x, scale))
    got = torch.from_numpy(x.copy()).to(DEVICE)
    fwht_rows(got, scale)
    assert same_bits(got, want)
    # rows longer than the tile go in passes, with the same butterflies
    for max_tile in (2, 8):
        if n > max_tile:
            multi = torch.from_numpy(x.copy()).to(DEVICE)
            fwht_rows(multi, scale, max_tile=max_tile)
            assert same_bits(multi, want), max_tile


@pytest.mark.parametrize("n", [16, 256, 4096])
def test_float32_within_roundoff_and_exact_on_dyadic_data(n):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, n)).astype(np.float32)
    scale = 1.0 / math.sqrt(n)
    want = numba_fwht(x, scale)
    got = torch.from_numpy(x.copy()).to(DEVICE)
    fwht_rows(got, scale)
    # each output is a sum over log2(n) butterfly stages, each rounding once
    # relative to a partial sum bounded by sum |x|: error <= (k + 1) eps |x|_1
    k = int(math.log2(n))
    bound = (k + 1) * 2.0**-24 * np.abs(x).sum(axis=1, keepdims=True) * scale
    err = np.abs(got.cpu().numpy().astype(np.float64) - want)
    assert np.all(err <= bound)
    assert err.max() > 0          # float32 really is coarser than numba
    # dyadic data (multiples of 1/64, |x| <= 4): every partial sum is exact
    # in float32, and n = 4^j makes the scale a power of two
    d = (rng.integers(-256, 257, size=(6, n)) / 64).astype(np.float32)
    got = torch.from_numpy(d.copy()).to(DEVICE)
    fwht_rows(got, scale)
    np.testing.assert_array_equal(got.cpu().numpy(), numba_fwht(d, scale))


@pytest.mark.parametrize("n", [8, 12, 40, 384, 1024])
def test_random_hadamard_tensors_equal_the_numpy_path(n):
    P = RandomHadamard(n, seed=5)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((2, 3, n))
    t = torch.from_numpy(x).to(DEVICE)
    for op, top in ((P.apply, P.apply), (P.inverse, P.inverse)):
        want = op(x, backend="numba")
        got = top(t, backend="triton")
        assert isinstance(got, torch.Tensor) and got.device == t.device
        assert got.dtype == torch.float64 and got.shape == t.shape
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=0, atol=1e-12)
    # round trip, and float32 stays float32 (computed in float32)
    f = t.float()
    back = P.inverse(P.apply(f, backend="triton"), backend="triton")
    assert back.dtype == torch.float32
    np.testing.assert_allclose(back.cpu().numpy(), x, rtol=0, atol=1e-5)


def test_powers_of_two_equal_numba_bit_for_bit():
    """m = 1: signs then one FWHT, the same operations as numba."""
    P = RandomHadamard(256, seed=2)
    x = np.random.default_rng(1).standard_normal((4, 256))
    got = P.apply(torch.from_numpy(x).to(DEVICE), backend="triton")
    assert same_bits(got, torch.from_numpy(P.apply(x, backend="numba")))


def test_tensor_types_and_backends():
    P = RandomHadamard(24, seed=1)
    x = torch.arange(48, dtype=torch.float64).reshape(2, 24) / 7
    ref = P.apply(x.numpy())
    # numba and numpy backends accept tensors too, and return tensors
    for backend in ("numba", "numpy"):
        out = P.apply(x, backend=backend)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
        np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)
    half = P.apply(x.to(DEVICE).half(), backend="triton")
    assert half.dtype == torch.float16
    ints = P.apply(torch.arange(24, device=DEVICE), backend="triton")
    assert ints.dtype == torch.float32
    np.testing.assert_allclose(ints.cpu().numpy(),
                               P.apply(np.arange(24.0)), rtol=0, atol=1e-5)


def test_bad_tensors_are_refused():
    P = RandomHadamard(8, seed=0)
    with pytest.raises(ValueError, match="last dimension 8"):
        P.apply(torch.zeros((2, 7), device=DEVICE), backend="triton")
    bad = torch.zeros((2, 8), device=DEVICE)
    bad[1, 3] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        P.apply(bad, backend="triton")
    with pytest.raises(ValueError, match="real numeric"):
        P.inverse(torch.zeros(8, dtype=torch.bool, device=DEVICE),
                  backend="triton")
    x = torch.zeros((4, 8), device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        fwht_rows(x.t().contiguous().t(), 1.0)
    with pytest.raises(ValueError, match="dtype"):
        fwht_rows(x.long(), 1.0)
    with pytest.raises(ValueError, match="power of two"):
        fwht_rows(torch.zeros((4, 6), device=DEVICE), 1.0)


def test_unusable_triton_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(_backend, "triton_usable", lambda: False)
    P = RandomHadamard(16, seed=3)
    x = torch.ones((2, 16), device=DEVICE)
    with pytest.raises(RuntimeError, match="CUDA device.*TRITON_INTERPRET"):
        P.apply(x, backend="triton")
    # "auto" falls back to numba and still returns a tensor
    out = P.apply(x)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.cpu().numpy(), P.apply(np.ones((2, 16))),
                               rtol=0, atol=1e-6)
