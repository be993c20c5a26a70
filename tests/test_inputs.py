"""The inputs users have, through the public API (issue 14, item 4).

LLM weights are usually ``torch.bfloat16`` or ``float16``; numpy users have
float16, Fortran-ordered and non-contiguous arrays. Every public entry point
takes them:

* ``quantize`` gives the same bytes as for a float64 C-contiguous copy of the
  same values (the values of every half type are exact in float64);
* ``Lattice.closest_point`` and ``VoronoiCode.encode`` give the points /
  codes of the float64 values, with the input's container, dtype and device
  (torch in, torch out);
* ``RandomHadamard`` keeps a tensor's dtype and device;
* ``matmul`` / ``matmul_distortion`` of such operands equal those of their
  float64 copies;
* ``QuantLinear.forward`` returns the input's dtype: its float32 result
  rounded once.
"""

import numpy as np
import pytest

import nqlib
from nqlib.lattices import A2, D4, E8, Dn, Zn

torch = pytest.importorskip("torch")

HALF = [torch.bfloat16, torch.float16]
LATTICES = [E8(), D4(), Dn(5), Zn(3), A2()]


def values(shape, seed=0, scale=1.0):
    """Gaussian values on the grid k / 16, |k| < 256, as float64: every half
    type (bfloat16: 8 significant bits; float16: 11) holds them exactly."""
    x = np.random.default_rng(seed).standard_normal(shape) * scale
    return np.clip(np.round(x * 16.0), -255, 255) / 16.0


def rounded(points, dtype):
    """float64 ``points`` rounded once to a torch dtype, as float64."""
    return torch.from_numpy(np.asarray(points)).to(dtype).double().numpy()


def layouts(X):
    """The same matrix in other memory layouts: Fortran order, a strided
    view, a transposed view, negative strides."""
    big = np.zeros((X.shape[0], 2 * X.shape[1]))
    big[:, ::2] = X
    rev = np.ascontiguousarray(X[::-1, ::-1])[::-1, ::-1]
    return {"fortran": np.asfortranarray(X), "strided": big[:, ::2],
            "transposed": np.ascontiguousarray(X.T).T, "reversed": rev}


# ---------------------------------------------------------------- quantize
QUANTIZERS = [dict(mode="variable"), dict(mode="fixed"), dict(mode="fixed",
              dither=True), dict(method="ecsq"), dict(method="rtn-hadamard")]


@pytest.mark.parametrize("kw", QUANTIZERS, ids=str)
def test_quantize_takes_every_dtype_and_layout(kw):
    X = values((200, 12), seed=1)
    rate = 4 if kw.get("method", "").startswith("rtn") else 4.0
    want = nqlib.quantize(X, rate, seed=3, **kw).to_bytes()
    t = torch.from_numpy(X)
    inputs = {f"torch {dt}": t.to(dt) for dt in HALF + [torch.float32]}
    inputs.update({"numpy float16": X.astype(np.float16),
                   "numpy float32": X.astype(np.float32),
                   "torch strided": t.to(torch.bfloat16).T.contiguous().T,
                   "torch requires_grad": t.float().requires_grad_(True)})
    inputs.update(layouts(X))
    for name, A in inputs.items():
        before = (A.detach().float().numpy().copy() if torch.is_tensor(A)
                  else np.array(A))
        got = nqlib.quantize(A, rate, seed=3, **kw).to_bytes()
        assert got == want, name
        # the input is left as it was
        after = A.detach().float().numpy() if torch.is_tensor(A) else A
        np.testing.assert_array_equal(after, before, err_msg=name)


def test_half_tensors_and_float32_give_the_same_bytes_at_scale():
    # the chunked float32 path of the quantizer against float64 input
    X = values((1000, 300), seed=2, scale=3.0) + 0.5   # still on the grid
    want = nqlib.quantize(X, 3.0, seed=1).to_bytes()
    assert nqlib.quantize(X.astype(np.float32), 3.0, seed=1).to_bytes() == want
    assert nqlib.quantize(torch.from_numpy(X).to(torch.bfloat16), 3.0,
                          seed=1).to_bytes() == want


def test_integer_and_bool_matrices_are_accepted_as_values():
    X = np.random.default_rng(0).integers(-5, 6, (64, 4))
    assert (nqlib.quantize(X, 4.0).to_bytes()
            == nqlib.quantize(X.astype(np.float64), 4.0).to_bytes())


def test_complex_tensors_are_refused():
    with pytest.raises(ValueError, match="A must be a real numeric array"):
        nqlib.quantize(torch.ones(16, 2, dtype=torch.complex64), 4.0)


# ----------------------------------------------------------- closest_point
@pytest.mark.parametrize("lattice", LATTICES, ids=lambda L: L.name)
@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=str)
def test_closest_point_of_tensors_keeps_type_dtype_device(lattice, dtype):
    x = values((50, lattice.dim), seed=3, scale=2.0)
    want = lattice.closest_point(x)  # float64 numpy
    t = torch.from_numpy(x).to(dtype)
    for backend in ("numba", "numpy"):
        got = lattice.closest_point(t, backend=backend)
        assert isinstance(got, torch.Tensor)
        assert got.dtype == dtype and got.device == t.device
        # the float64 points rounded once to the dtype (exact for the
        # integer and half-integer points of Z^n, D_n and E8)
        np.testing.assert_array_equal(got.double().numpy(), rounded(want, dtype))
    # a strided tensor (a transposed view)
    tt = torch.from_numpy(np.ascontiguousarray(x.T)).to(dtype).T
    np.testing.assert_array_equal(lattice.closest_point(tt).double().numpy(),
                                  rounded(want, dtype))


@pytest.mark.parametrize("lattice", LATTICES, ids=lambda L: L.name)
def test_closest_point_of_numpy_half_and_layouts(lattice):
    x = values((40, lattice.dim), seed=4, scale=2.0)
    want = lattice.closest_point(x)
    got = lattice.closest_point(x.astype(np.float16))
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want.astype(np.float16))
    for name, y in layouts(x).items():
        np.testing.assert_array_equal(lattice.closest_point(y), want, err_msg=name)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_closest_point_half_tensor_on_triton(dtype):
    from nqlib import _backend

    if not _backend.triton_usable():
        pytest.skip("triton cannot run here")
    x = values((20, 8), seed=5, scale=2.0)
    # a GPU when there is one, else the interpreter on CPU tensors
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = torch.from_numpy(x).to(device=device, dtype=dtype)
    got = E8().closest_point(t, backend="triton")
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.double().cpu().numpy(),
                                  rounded(E8().closest_point(x), dtype))


# ------------------------------------------------------------- VoronoiCode
@pytest.mark.parametrize("lattice", [E8(), D4(), A2()], ids=lambda L: L.name)
@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=str)
def test_voronoi_code_takes_half_tensors(lattice, dtype):
    code = nqlib.VoronoiCode(lattice, q=5, beta=0.5)
    x = values((60, lattice.dim), seed=6)
    z = values((lattice.dim,), seed=7) / 8.0  # still exact in half types
    want_codes, want_over = code.encode(x, dither=z)
    want_dec = code.decode(want_codes, dither=z)
    t = torch.from_numpy(x).to(dtype)
    for backend in ("numba", "numpy"):
        codes, over = code.encode(t, dither=torch.from_numpy(z).to(dtype),
                                  backend=backend)
        assert isinstance(codes, torch.Tensor) and codes.device == t.device
        np.testing.assert_array_equal(codes.numpy().astype(np.int64), want_codes)
        np.testing.assert_array_equal(over.numpy(), want_over)
        dec = code.decode(codes, dither=torch.from_numpy(z).to(dtype),
                          backend=backend)
        assert isinstance(dec, torch.Tensor) and dec.dtype == torch.float32
        np.testing.assert_array_equal(dec.numpy(), want_dec.astype(np.float32))


def test_voronoi_code_takes_numpy_half_and_layouts():
    code = nqlib.VoronoiCode(E8(), q=4, beta=0.7)
    x = values((30, 8), seed=8)
    want, over = code.encode(x)
    got, got_over = code.encode(x.astype(np.float16))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_over, over)
    for name, y in layouts(x).items():
        np.testing.assert_array_equal(code.encode(y)[0], want, err_msg=name)
    # codes in Fortran order / as a strided view decode the same
    dec = code.decode(want)
    np.testing.assert_array_equal(code.decode(np.asfortranarray(want)), dec)
    np.testing.assert_array_equal(code.decode(want.astype(np.float16)), dec)


# --------------------------------------------------------- RandomHadamard
@pytest.mark.parametrize("n", [64, 96])
@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=str)
def test_random_hadamard_keeps_tensor_dtype(n, dtype):
    P = nqlib.RandomHadamard(n, seed=2)
    x = values((5, n), seed=9)
    want = P.apply(x)
    t = torch.from_numpy(x).to(dtype)
    for op, ref in ((P.apply, want), (P.inverse, P.inverse(x))):
        got = op(t, backend="numba")
        assert got.dtype == dtype and got.shape == t.shape
        # computed in float64, rounded once to the tensor's dtype
        np.testing.assert_array_equal(
            got.numpy() if dtype == torch.float32 else got.float().numpy(),
            torch.from_numpy(ref).to(dtype).float().numpy())


def test_random_hadamard_numpy_half_and_layouts():
    P = nqlib.RandomHadamard(48, seed=1)
    x = values((7, 48), seed=10)
    want = P.apply(x)
    got = P.apply(x.astype(np.float16))
    assert got.dtype == np.float64  # documented: numpy in, float64 out
    np.testing.assert_array_equal(got, want)
    for name, y in layouts(x).items():
        np.testing.assert_array_equal(P.apply(y), want, err_msg=name)
        np.testing.assert_array_equal(P.inverse(y), P.inverse(x), err_msg=name)


# ------------------------------------------------------------------ matmul
def test_matmul_and_distortion_of_half_operands():
    A, B = values((256, 6), seed=11), values((256, 5), seed=12)
    want = nqlib.inner_products(nqlib.quantize(A, 3.0, seed=1),
                                nqlib.quantize(B, 3.0, seed=1))
    tA, tB = torch.from_numpy(A).to(torch.bfloat16), torch.from_numpy(B).half()
    got = nqlib.inner_products(nqlib.quantize(tA, 3.0, seed=1),
                               nqlib.quantize(np.asfortranarray(tB.numpy()), 3.0,
                                              seed=1))
    np.testing.assert_array_equal(got, want)
    d = nqlib.matmul_distortion(A, B, want)
    assert nqlib.matmul_distortion(tA, tB, torch.from_numpy(want).float()) == \
        pytest.approx(d, rel=1e-6)


# -------------------------------------------------------------- QuantLinear
@pytest.mark.parametrize("act_rate", [None, 4.0])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_quant_linear_forward_keeps_half_dtype(dtype, act_rate):
    from nqlib.nn import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    ql = QuantLinear.from_linear(lin, 4.0, act_rate=act_rate, seed=2)
    x = torch.randn(3, 5, 64).to(dtype)
    y = ql(x)
    assert y.dtype == dtype and y.shape == (3, 5, 16)
    # the float32 result of the same values, rounded once
    ref = ql(x.float())
    torch.testing.assert_close(y, ref.to(dtype), rtol=0, atol=0)


def test_quant_linear_in_a_half_model():
    from nqlib.nn import QuantLinear, quantize_model

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(),
                                torch.nn.Linear(48, 8)).to(torch.bfloat16)
    quantize_model(model, 4.0, progress=False)
    assert all(isinstance(m, QuantLinear) for m in (model[0], model[2]))
    model = model.to(torch.bfloat16)   # bias follows the model's dtype
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
