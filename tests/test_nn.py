"""torch modules: QuantLinear, quantize_model, calibration and LDLQ rounding.

* ``QuantLinear.from_linear`` computes ``x @ W_hat.T + b`` with ``W_hat`` the
  dequantized QuantizedMatrix; with ``act_rate`` it computes
  ``nqlib.inner_products(quantize_columns(x.T, stream=True), qweight) + b``;
* the state dict holds the compressed bytes: a save/load round trip gives the
  same bytes and outputs, a tampered buffer fails to load with a clear error;
* ``quantize_model`` replaces exactly the layers it should and reports their
  bytes honestly;
* Hessian-aware rounding (``nested-ldlq``) writes standard fixed-mode files,
  reduces to the plain quantizer when ``H`` is the identity, and beats it on
  the output error when the inputs are correlated.

Tiny models only: everything here runs in seconds.
"""

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nqlib  # noqa: E402
import nqlib.quantizers.rate_control  # noqa: E402
from nqlib.nn import (  # noqa: E402
    QuantLinear,
    calibration_hessians,
    quantize_model,
)
from nqlib.quantizers.ldlq import quantize_ldlq  # noqa: E402
from nqlib.quantizers.matrix import quantize_columns  # noqa: E402

IN, OUT = 128, 48


def linear(bias=True, seed=0, n_in=IN, n_out=OUT):
    torch.manual_seed(seed)
    return torch.nn.Linear(n_in, n_out, bias=bias)


def inputs(rows=40, seed=1, n=IN):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=g)


def correlated_inputs(rows, n, seed, sample_seed=None):
    """Rows with a quickly decaying spectrum (a few strong directions), as
    transformer activations have: the mixing matrix comes from ``seed``, the
    samples from ``sample_seed`` (default: the same)."""
    mix = np.random.default_rng(seed).standard_normal((n, n)) * (
        0.93 ** np.arange(n))[None, :]
    z = np.random.default_rng([seed, 1 if sample_seed is None else sample_seed])
    return z.standard_normal((rows, n)) @ mix.T


# ------------------------------------------------------------ from_linear
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method,mode", [("nested", "fixed"), ("nested", "variable"),
                                         ("rtn-hadamard", "fixed")])
def test_forward_is_x_times_dequantized_weight(bias, method, mode):
    lin = linear(bias)
    rate = 4 if method.startswith("rtn") else 4.0
    ql = QuantLinear.from_linear(lin, rate, seed=3, method=method, mode=mode)
    W_hat = torch.from_numpy(ql.quantized_weight.dequantize(np.float32).T.copy())
    assert W_hat.shape == (OUT, IN)
    x = inputs().reshape(4, 10, IN)  # leading dimensions are kept
    y = ql(x)
    ref = x @ W_hat.T + (lin.bias.detach() if bias else 0.0)
    assert y.shape == (4, 10, OUT) and y.dtype == x.dtype
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    # and the dequantized weight is a good approximation of the weight
    W = lin.weight.detach()
    assert float(((W_hat - W) ** 2).mean() / (W ** 2).mean()) < 0.02


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method,act_mode,rate", [
    ("nested", "variable", 4.0), ("nested", "fixed", 4.0), ("nested", "variable", 3.0),
    ("rtn-hadamard", None, 4), ("rtn", "fixed", 8)])
def test_quantized_activations_equal_nqlib_matmul(bias, method, act_mode, rate):
    lin = linear(bias, seed=2)
    ql = QuantLinear.from_linear(lin, rate, act_rate=rate, seed=5, method=method,
                                 act_mode=act_mode)
    x = inputs(rows=64, seed=4)
    y = ql(x)
    kw = {} if method.startswith("rtn") else {"mode": act_mode}
    QX = quantize_columns(x.double().numpy().T, rate, seed=5, method=method,
                          stream=True, **kw)
    C = nqlib.inner_products(QX, ql.quantized_weight)  # (rows, OUT)
    if bias:
        C = C + lin.bias.detach().double().numpy()
    np.testing.assert_allclose(y.double().numpy(), C, rtol=1e-5,
                               atol=1e-5 * np.abs(C).max())
    assert ql.act_bits_per_entry == pytest.approx(QX.stream_bits_per_entry)
    assert ql.act_entries == x.numel()
    # the activations really are quantized: not the float product
    exact = (x @ lin.weight.detach().T).numpy()
    assert np.abs(y.detach().numpy() - exact - (lin.bias.detach().numpy()
                                                 if bias else 0)).max() > 1e-4


def test_shared_input_is_quantized_once_and_inplace_writes_are_seen():
    torch.manual_seed(0)
    a, b = linear(seed=1), linear(seed=2)
    qa = QuantLinear.from_linear(a, 4.0, act_rate=4.0, seed=1)
    qb = QuantLinear.from_linear(b, 4.0, act_rate=4.0, seed=1)
    x = inputs(rows=32, seed=9)

    def reference(layer, ql, xx):
        QX = quantize_columns(xx.double().numpy().T, 4.0, seed=1,
                              mode="variable", stream=True)
        bias = layer.bias.detach().numpy()
        return nqlib.inner_products(QX, ql.quantized_weight) + bias

    for layer, ql in ((a, qa), (b, qb)):  # same tensor: second call reuses
        np.testing.assert_allclose(ql(x).numpy(), reference(layer, ql, x),
                                   rtol=1e-5, atol=1e-5)
    x.mul_(-2.0)  # an in-place write between calls must not reuse the cache
    np.testing.assert_allclose(qa(x).numpy(), reference(a, qa, x), rtol=1e-5,
                               atol=1e-4)
    with torch.inference_mode():  # tensors without version counters
        xi = inputs(rows=32, seed=10)
        np.testing.assert_allclose(qb(xi).numpy(), reference(b, qb, xi),
                                   rtol=1e-5, atol=1e-5)


def test_empty_batch():
    ql = QuantLinear.from_linear(linear(), 4.0, act_rate=4.0)
    assert ql(torch.zeros(0, IN)).shape == (0, OUT)
    assert QuantLinear.from_linear(linear(), 4.0)(torch.zeros(0, IN)).shape == (0, OUT)


# ------------------------------------------------------------- state dict
@pytest.mark.parametrize("act_rate", [None, 4.0])
def test_state_dict_round_trip(act_rate):
    src = QuantLinear.from_linear(linear(seed=0), 4.0, act_rate=act_rate, seed=11)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    # a fresh module of the same shape, holding other codes
    dst = QuantLinear.from_linear(linear(seed=7), 4.0, act_rate=act_rate, seed=2)
    x = inputs(rows=16, seed=3)
    assert not torch.equal(src(x), dst(x))
    dst.load_state_dict(torch.load(buf))
    assert torch.equal(src(x), dst(x))
    assert dst.qweight.dtype == torch.uint8
    assert bytes(dst.qweight.numpy()) == src.quantized_weight.to_bytes()
    assert dst.quantized_weight.to_bytes() == src.quantized_weight.to_bytes()
    assert dst.weight_nbytes == src.weight_nbytes == src.qweight.numel()


def test_state_dict_keeps_compressed_size():
    ql = QuantLinear.from_linear(linear(), 4.0)
    sd = ql.state_dict()
    assert set(sd) == {"qweight", "bias"}
    assert sd["qweight"].numel() == ql.weight_nbytes
    assert 8 * ql.weight_nbytes / (IN * OUT) == pytest.approx(
        ql.weight_bits_per_entry)
    tolerance = nqlib.quantizers.rate_control.RATE_TOLERANCE
    assert ql.weight_bits_per_entry <= 4.0 + tolerance


def test_tampered_qweight_fails_to_load():
    src = QuantLinear.from_linear(linear(), 4.0, seed=1)
    dst = QuantLinear.from_linear(linear(seed=3), 4.0, seed=1)
    before = dst.quantized_weight.to_bytes()
    sd = src.state_dict()
    sd["qweight"] = sd["qweight"].clone()
    sd["qweight"][len(sd["qweight"]) // 2] ^= 0x10
    with pytest.raises(ValueError, match="qweight.*checksum mismatch"):
        dst.load_state_dict(sd)
    assert dst.quantized_weight.to_bytes() == before  # left untouched
    sd["qweight"] = sd["qweight"][:-9]
    with pytest.raises(ValueError, match="qweight"):
        dst.load_state_dict(sd)


def test_qweight_of_another_shape_fails_to_load():
    src = QuantLinear.from_linear(linear(n_out=40), 4.0)
    dst = QuantLinear.from_linear(linear(), 4.0)
    with pytest.raises(ValueError, match="expected"):
        dst.load_state_dict(src.state_dict())


def test_state_dict_qweight_is_validated():
    """The loader checks the entry's type and every field of the file (a
    recomputed checksum does not get a lie through), and that the layer's
    activation rate suits the loaded weight's method."""
    import struct
    import zlib

    src = QuantLinear.from_linear(linear(), 4.0, seed=1)
    dst = QuantLinear.from_linear(linear(seed=3), 4.0, seed=1)
    sd = src.state_dict()
    sd["qweight"] = sd["qweight"].float()
    with pytest.raises(ValueError, match="qweight.*1-D uint8"):
        dst.load_state_dict(sd)
    body = bytearray(src.quantized_weight.to_bytes()[:-4])
    struct.pack_into("<f", body, 28, float("nan"))   # alpha
    data = bytes(body) + struct.pack("<I", zlib.crc32(body))
    sd["qweight"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with pytest.raises(ValueError, match="qweight.*corrupted.*alpha"):
        dst.load_state_dict(sd)
    rtn = QuantLinear.from_linear(linear(), 4, method="rtn")
    acts = QuantLinear.from_linear(linear(), 4.0, act_rate=4.5)
    with pytest.raises(ValueError, match="act_rate"):
        acts.load_state_dict(rtn.state_dict())


def test_repr_shows_rate_and_bytes():
    ql = QuantLinear.from_linear(linear(), 4.0, act_rate=4.0)
    r = repr(ql)
    assert f"in_features={IN}" in r and f"out_features={OUT}" in r
    assert "rate=4" in r and f"{ql.weight_bits_per_entry:.3f} bit/entry" in r
    assert f"{ql.weight_nbytes} bytes" in r and "act_rate=4" in r


def test_errors():
    ql = QuantLinear.from_linear(linear(), 4.0)
    with pytest.raises(ValueError, match="last dimension 100, expected 128"):
        ql(torch.zeros(3, 100))
    with pytest.raises(ValueError, match="torch.nn.Linear"):
        QuantLinear.from_linear(torch.nn.Conv1d(3, 3, 1), 4.0)
    with pytest.raises(ValueError, match="torch.nn.Linear"):
        QuantLinear.from_linear(ql, 4.0)
    with pytest.raises(ValueError, match="needs hessian"):
        QuantLinear.from_linear(linear(), 4.0, method="nested-ldlq")
    with pytest.raises(ValueError, match="nested-ldlq' only"):
        QuantLinear.from_linear(linear(), 4.0, hessian=np.eye(IN))
    with pytest.raises(ValueError, match="fixed or the trellis mode"):
        QuantLinear.from_linear(linear(), 4.0, method="nested-ldlq",
                                mode="variable", hessian=np.eye(IN))


# ---------------------------------------------------------- quantize_model
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(IN, 64)
        self.block = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                         torch.nn.ReLU())
        self.head = torch.nn.Linear(64, 16, bias=False)

    def forward(self, x):
        return self.head(self.block(self.inp(x)))


LINEARS = ["inp", "block.1", "head"]


@pytest.mark.parametrize("skip,kept", [((), []), (("head",), ["head"]),
                                       (lambda name, mod: mod.out_features == 64,
                                        ["inp", "block.1"])])
def test_quantize_model_replaces_linears(skip, kept):
    model = Tiny()
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
              if n in LINEARS}
    rep = quantize_model(model, 4.0, skip=skip, progress=False)
    mods = dict(model.named_modules())
    for name in LINEARS:
        cls = torch.nn.Linear if name in kept else QuantLinear
        assert type(mods[name]) is cls, name
    names = [r["name"] for r in rep.layers]
    assert names == [n for n in LINEARS if n not in kept]
    entries = sum(np.prod(shapes[n]) for n in names)
    assert rep.bytes_before == 4 * entries
    assert rep.bytes_after == sum(mods[n].weight_nbytes for n in names)
    assert rep.bits_per_entry == pytest.approx(8 * rep.bytes_after / entries)
    for r in rep.layers:
        assert r["shape"] == shapes[r["name"]]
        assert r["bits_per_entry"] == mods[r["name"]].weight_bits_per_entry
    assert f"{len(names)} layers" in str(rep)
    x = inputs(rows=8)
    assert model(x).shape == (8, 16)


def test_quantize_model_progress_bar_can_be_disabled(capsys):
    quantize_model(Tiny(), 4.0, progress=False)
    assert "quantizing layers" not in capsys.readouterr().err
    quantize_model(Tiny(), 4.0, progress=True)
    assert "quantizing layers" in capsys.readouterr().err


def test_quantize_model_errors():
    with pytest.raises(ValueError, match="torch.nn.Module"):
        quantize_model(np.eye(3))
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(Tiny(), 4.0, method="nested-ldlq", progress=False)
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(Tiny(), 4.0, calibration=[inputs()], progress=False)


# ------------------------------------------------------------- calibration
def test_calibration_hessians_are_input_second_moments():
    model = Tiny()
    batches = [inputs(rows=20, seed=s).reshape(4, 5, IN) for s in range(3)]
    H = calibration_hessians(model, batches)
    assert set(H) == set(LINEARS)
    X = torch.cat([b.reshape(-1, IN) for b in batches]).double()
    np.testing.assert_allclose(H["inp"], (X.T @ X / len(X)).numpy(), rtol=1e-12)
    with torch.no_grad():
        Z = model.block(model.inp(X.float())).double()
    np.testing.assert_allclose(H["head"], (Z.T @ Z / len(Z)).numpy(), rtol=1e-5,
                               atol=1e-7)
    # hooks are gone; a callable works the same way
    assert not any(m._forward_pre_hooks for m in model.modules())
    H2 = calibration_hessians(model, lambda m: [m(b) for b in batches],
                              layers=["inp"])
    np.testing.assert_allclose(H2["inp"], H["inp"])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        calibration_hessians(model, batches, layers=["block.0"])
    with pytest.raises(ValueError, match="never ran"):
        calibration_hessians(model, [])


def test_calibration_hessians_of_layers_sharing_an_input():
    """Layers fed the same tensor share one product; a tensor changed in
    place in between is measured again."""

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(IN, 4) for _ in range(3))

        def forward(self, x):
            x = x.clone()
            out = self.q(x) + self.k(x)
            x.mul_(2.0)  # same tensor object, new values
            return out + self.v(x)

    batches = [inputs(rows=12, seed=s) for s in range(2)]
    H = calibration_hessians(Shared(), batches)
    X = torch.cat(batches).double()
    expected = (X.T @ X / len(X)).numpy()
    np.testing.assert_allclose(H["q"], expected, rtol=1e-12)
    np.testing.assert_array_equal(H["k"], H["q"])
    np.testing.assert_allclose(H["v"], 4 * expected, rtol=1e-12)
    # inference tensors keep no version counter: measured layer by layer
    with torch.inference_mode():
        Hi = calibration_hessians(Shared(), batches)
    for name in ("q", "k", "v"):
        np.testing.assert_allclose(Hi[name], H[name], rtol=1e-12)


# -------------------------------------------------------------------- LDLQ
def output_error(X, W, Q):
    """Relative output error ||X W^T - X W_hat^T||_F / ||X W^T||_F."""
    return float(np.linalg.norm(X @ (W.T - Q.dequantize())) / np.linalg.norm(X @ W.T))


@pytest.mark.parametrize("rate", [3.0, 4.0])
def test_ldlq_beats_plain_rounding_on_correlated_inputs(rate):
    n, a = 256, 64
    W = np.random.default_rng(0).standard_normal((a, n))
    X = correlated_inputs(2000, n, seed=1)
    H = X.T @ X / len(X)
    plain = nqlib.quantize(W.T, rate, mode="fixed", seed=4)
    ldlq = quantize_ldlq(W.T, rate, H, seed=4)
    assert ldlq.nbytes == plain.nbytes  # same plan, same file size
    assert ldlq.mode == "fixed" and ldlq.method == "nested"
    e_plain, e_ldlq = output_error(X, W, plain), output_error(X, W, ldlq)
    assert e_ldlq < 0.7 * e_plain, (e_plain, e_ldlq)
    # on fresh inputs from the same distribution too (no overfitting to X)
    X2 = correlated_inputs(2000, n, seed=1, sample_seed=2)
    assert output_error(X2, W, ldlq) < 0.7 * output_error(X2, W, plain)
    # the weights themselves are not more accurate: the error moved to where
    # the inputs do not look
    assert np.mean((ldlq.dequantize() - W.T) ** 2) > np.mean(
        (plain.dequantize() - W.T) ** 2)


def test_ldlq_with_identity_hessian_is_the_plain_quantizer():
    A = np.random.default_rng(3).standard_normal((256, 40))
    plain = nqlib.quantize(A, 4.0, mode="fixed", seed=2, center=False)
    ldlq = quantize_ldlq(A, 4.0, np.eye(256), seed=2, center=False)
    for part in ("hi", "lo"):
        np.testing.assert_array_equal(getattr(ldlq.payload, part).packed,
                                      getattr(plain.payload, part).packed)
    assert ldlq.alpha == pytest.approx(plain.alpha, rel=1e-6)


@pytest.mark.parametrize("shape", [(100, 24), (77, 9)], ids=str)
def test_ldlq_file_is_a_standard_fixed_mode_file(shape):
    n, a = shape
    rng = np.random.default_rng(5)
    A = rng.standard_normal(shape)
    X = correlated_inputs(500, n, seed=6)
    Q = quantize_ldlq(A, 4.5, X.T @ X / len(X), seed=1, dither=True)
    again = nqlib.QuantizedMatrix.from_bytes(Q.to_bytes())
    np.testing.assert_array_equal(again.dequantize(), Q.dequantize())
    assert Q.bits_per_entry <= 4.5 + nqlib.quantizers.rate_control.RATE_TOLERANCE
    # the numpy oracles choose the same words
    Qn = quantize_ldlq(A, 4.5, X.T @ X / len(X), seed=1, dither=True,
                       backend="numpy")
    assert Qn.to_bytes() == Q.to_bytes()
    B = rng.standard_normal((n, 5))
    QB = nqlib.quantize(B, 4.5, seed=1)
    np.testing.assert_allclose(nqlib.inner_products(Q, QB),
                               Q.dequantize().T @ QB.dequantize(), atol=1e-9)


def test_ldlq_lazy_feedback_chooses_the_words_of_the_per_block_update(
        monkeypatch):
    """The error feedback applied once per group of blocks picks the same
    words as the update after every block (the same sums, in another
    order), here over several groups and both parts of the plan."""
    import nqlib.quantizers.ldlq as ldlq_module

    n, a = 520, 48  # n_pad 528: 66 blocks, several lazy groups
    rng = np.random.default_rng(11)
    A = rng.standard_normal((n, a))
    X = correlated_inputs(1500, n, seed=12)
    H = X.T @ X / len(X)
    lazy = [quantize_ldlq(A, r, H, seed=3).to_bytes() for r in (2.3, 3.0)]
    assert ldlq_module.LAZY_BLOCKS < 66 // 2
    monkeypatch.setattr(ldlq_module, "LAZY_BLOCKS", 1)
    assert lazy == [quantize_ldlq(A, r, H, seed=3).to_bytes() for r in (2.3, 3.0)]


def test_plan_without_words_is_the_plain_quantizers_header():
    """LDLQ starts from quantize_columns(code_words=False): the plain
    quantizer's side information and plan, no word coded."""
    from nqlib.quantizers.matrix import quantize_columns

    A = np.random.default_rng(9).standard_normal((200, 30))
    for rate, dither in ((3.0, False), (4.5, True), (1.0, False)):
        full = nqlib.quantize(A, rate, mode="fixed", seed=2, dither=dither)
        plan = quantize_columns(A, rate, mode="fixed", seed=2, dither=dither,
                                code_words=False)
        assert plan.alpha == 1.0 and plan.nbytes == full.nbytes
        assert (plan.flags, plan.dither_key) == (full.flags, full.dither_key)
        np.testing.assert_array_equal(plan.means, full.means)
        np.testing.assert_array_equal(plan.norms, full.norms)
        assert plan.payload.h == full.payload.h
        for name in ("hi", "lo"):
            p, f = getattr(plan.payload, name), getattr(full.payload, name)
            assert (p.L, p.q) == (f.L, f.q)
            np.testing.assert_array_equal(p.betas, f.betas)
            assert p.packed.shape == f.packed.shape and not p.packed.any()
    with pytest.raises(ValueError, match="code_words=False"):
        quantize_columns(A, 3.0, mode="variable", code_words=False)


def test_ldlq_errors():
    A = np.ones((64, 8)) + np.arange(8)
    with pytest.raises(ValueError, match="H must have shape"):
        quantize_ldlq(A, 4.0, np.eye(63))
    with pytest.raises(ValueError, match="NaN"):
        quantize_ldlq(A, 4.0, np.full((64, 64), np.nan))
    with pytest.raises(ValueError, match="damp"):
        quantize_ldlq(A, 4.0, np.eye(64), damp=-1.0)
    with pytest.raises(ValueError, match="positive definite"):
        quantize_ldlq(A, 4.0, -np.eye(64))
    # no activation energy at all: nothing to weigh, the plain words
    Q0 = quantize_ldlq(A, 4.0, np.zeros((64, 64)))
    assert Q0.payload.hi.packed.tobytes() == nqlib.quantize(
        A, 4.0, mode="fixed").payload.hi.packed.tobytes()


def test_quantize_model_ldlq_with_calibration():
    n = 96
    rng = np.random.default_rng(8)
    mix = torch.from_numpy(rng.standard_normal((n, n)) * (0.9 ** np.arange(n)))
    batches = [(torch.from_numpy(rng.standard_normal((64, n))) @ mix.T).float()
               for _ in range(4)]
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(n, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 32))
    plain = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    rep = quantize_model(model, 4.0, method="nested-ldlq", calibration=batches,
                         seed=3, progress=False)
    quantize_model(plain, 4.0, seed=3, progress=False)
    assert all(isinstance(model[i], QuantLinear) for i in (0, 2))
    assert rep.bytes_after == sum(plain[i].weight_nbytes for i in (0, 2))
    test = (torch.from_numpy(rng.standard_normal((256, n))) @ mix.T).float()
    with torch.no_grad():
        y, y_ldlq, y_plain = ref(test), model(test), plain(test)
    assert float((y_ldlq - y).norm()) < float((y_plain - y).norm())
    # precomputed second moments give the same files
    again = copy.deepcopy(ref)
    quantize_model(again, 4.0, method="nested-ldlq", seed=3, progress=False,
                   calibration=calibration_hessians(ref, batches))
    for i in (0, 2):
        assert (again[i].quantized_weight.to_bytes()
                == model[i].quantized_weight.to_bytes())
    with pytest.raises(ValueError, match="no second moment"):
        quantize_model(copy.deepcopy(ref), 4.0, method="nested-ldlq",
                       calibration={"0": np.eye(n)}, progress=False)


@pytest.mark.parametrize("act_rate", [0.0, -1.0, float("nan"), 9.0, "4"])
def test_bad_act_rate_is_refused_when_building(act_rate):
    lin = torch.nn.Linear(64, 16)
    with pytest.raises(ValueError, match="rate"):
        QuantLinear.from_linear(lin, 4.0, act_rate=act_rate)


def test_bad_act_mode_is_refused_when_building():
    lin = torch.nn.Linear(64, 16)
    with pytest.raises(ValueError, match="act_mode"):
        QuantLinear.from_linear(lin, 4.0, act_rate=4.0, act_mode="fast")
