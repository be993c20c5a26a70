"""Language-model helpers (nqlib.lm) and the asymmetric RTN baseline.

* ``rtn_asym_encode`` / ``rtn_asym_decode``: codes in range, error at most
  half a step inside each group, ``b + 32 / g`` bits counted, exact on a grid;
  the torch activation coder does what the numpy one does;
* ``block_hadamard`` is orthogonal and mixes only inside its blocks;
  ``RTNLinear`` with a rotation computes ``x @ W_hat.T`` of its effective
  weight;
* ``perplexity`` of a model with uniform predictions is the vocabulary size;
* the evaluation and calibration texts share no module and no docstring;
* ``relative_output_errors`` is ``tr(D H D^T) / tr(W H W^T)``, with the
  denominators given or not; ``computed_weight`` (the forward pass on the
  unit vectors) is the decoded weight;
* ``quantize_cached`` gives the same model from the cache as from quantizing;
* while ``load_smollm2`` loads, a GGUF file is parsed once (one reader per
  file, the original class restored afterwards).

No language model is loaded here (the chapter loads SmolLM2).
"""

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nqlib import lm  # noqa: E402
from nqlib.nn import QuantConfig, QuantLinear, quantize_  # noqa: E402
from nqlib.quantizers.scalar import rtn_asym_decode, rtn_asym_encode  # noqa: E402


# ------------------------------------------------------------ asym RTN
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n,g", [(64, 64), (100, 32), (7, 4)])
def test_rtn_asym_codes_errors_and_bits(bits, n, g):
    X = np.random.default_rng(bits * n).standard_normal((9, n)) * 3 + 1
    codes, steps, mins = rtn_asym_encode(X, bits, g)
    ng = -(-n // g)
    assert codes.shape == (9, ng * g) and codes.dtype == np.uint8
    assert steps.shape == mins.shape == (9, ng) and steps.dtype == np.float16
    assert codes.max() <= 2**bits - 1
    Y = rtn_asym_decode(codes, steps, mins, n)
    # within a group: at most half a step, plus the float16 rounding of the
    # minimum and of the step times the largest code
    s = np.repeat(steps.astype(np.float64), g, axis=1)[:, :n]
    slack = np.abs(np.repeat(mins.astype(np.float64), g, axis=1)[:, :n]) * 2**-10
    assert np.all(np.abs(Y - X) <= 0.5 * s + (2**bits) * s * 2**-10 + slack)
    # what a file holds: the codes plus two float16 per group
    nbytes = -(-codes.size * bits // 8) + 2 * 2 * steps.size
    if n % g == 0 and (n * bits) % 8 == 0:
        assert 8 * nbytes / X.size == bits + 32 / g


def test_rtn_asym_is_exact_on_its_grid_and_rejects_bad_input():
    X = np.array([[0.0, 0.5, 1.0, 1.5, 0.5, 1.0, 0.0, 1.5]])
    codes, steps, mins = rtn_asym_encode(X, 2, 8)
    assert np.array_equal(rtn_asym_decode(codes, steps, mins, 8), X)
    const = np.full((2, 8), 0.25)  # zero range: step 0, every code 0
    c, s, m = rtn_asym_encode(const, 3, 4)
    assert np.array_equal(rtn_asym_decode(c, s, m, 8), const)
    for bad, match in ((np.ones(3), "2-D"), (np.full((1, 2), np.nan), "finite"),
                       (np.full((1, 2), 1e6), "float16")):
        with pytest.raises(ValueError, match=match):
            rtn_asym_encode(bad, 4, 2)
    with pytest.raises(ValueError, match="bits"):
        rtn_asym_encode(X, 9, 8)
    with pytest.raises(ValueError, match="group_size"):
        rtn_asym_encode(X, 4, 0)


def test_torch_activation_coder_matches_numpy():
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(0)) * 2
    got = lm._fake_quant_asym(x, 4, 64)
    codes, steps, mins = rtn_asym_encode(x.double().numpy(), 4, 64)
    want = rtn_asym_decode(codes, steps, mins, 128)
    assert np.allclose(got.numpy(), want, atol=1e-5)


# ------------------------------------------------------------- rotation
def test_block_hadamard_is_orthogonal_and_block_diagonal():
    R = lm.block_hadamard(192, 64, seed=3)
    assert torch.allclose(R @ R.T, torch.eye(192, dtype=R.dtype), atol=1e-12)
    assert torch.count_nonzero(R[:64, 64:]) == 0
    assert torch.count_nonzero(R[:64, :64]) == 64 * 64
    assert not torch.equal(R, lm.block_hadamard(192, 64, seed=4))
    with pytest.raises(ValueError, match="power of two"):
        lm.block_hadamard(192, 48)
    with pytest.raises(ValueError, match="power of two"):
        lm.block_hadamard(100, 64)


@pytest.mark.parametrize("hadamard", [False, True])
def test_rtn_linear_computes_with_its_effective_weight(hadamard):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 40)
    r = lm.RTNLinear(lin, 3, 64, hadamard=hadamard)
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.allclose(r(x), x @ r.weight.T + lin.bias, atol=1e-4)
    assert r.bits_per_entry == 3 + 32 / 64
    assert (r.rotation is not None) == hadamard
    # 8 bits is nearly the float layer
    r8 = lm.RTNLinear(lin, 8, 64, hadamard=hadamard)
    assert torch.allclose(r8.weight, lin.weight, atol=2e-3)
    with pytest.raises(ValueError, match="divide"):
        lm.RTNLinear(lin, 4, 48)
    with pytest.raises(ValueError, match="act_bits"):
        lm.RTNLinear(lin, 4, 64, act_bits=0)


def test_rtn_linear_rotates_block_by_block_as_the_dense_rotation():
    torch.manual_seed(4)
    lin = torch.nn.Linear(192, 24)
    r = lm.RTNLinear(lin, 3, 64, hadamard=True, seed=5)
    R = lm.block_hadamard(192, 64, seed=5)
    W = lin.weight.detach().double()
    codes, steps, mins = rtn_asym_encode((W @ R.T).numpy(), 3, 64)
    Wq = torch.from_numpy(rtn_asym_decode(codes, steps, mins, 192))
    assert r.rotation.shape == (3, 64, 64)
    assert torch.equal(r.weight_rot, Wq.float())
    assert torch.allclose(r.weight.double(), Wq @ R, atol=1e-6)
    x = torch.randn(7, 192)
    with torch.no_grad():
        want = (x.double() @ R.T) @ Wq.T + lin.bias.double()
        assert torch.allclose(r(x).double(), want, atol=1e-5)


def test_rtn_baseline_counts_bits_and_quantizes_activations():
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 64))
    info = lm.rtn_baseline_(model, 2, hadamard=True, act_bits=4,
                            filter_fn=lambda m, fqn: fqn == "2")
    assert isinstance(model[0], torch.nn.Linear)
    assert isinstance(model[2], lm.RTNLinear)
    assert info == dict(bytes=128 * 64 * 2 // 8 + 4 * 64 * 2, entries=128 * 64,
                        bits_per_entry=2.5)
    model(torch.randn(3, 64))
    assert model[2].act_entries == 3 * 128


# ----------------------------------------------------------- perplexity
class Uniform(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        class Out:
            logits = torch.zeros(*ids.shape, self.vocab)
        return Out()


def test_perplexity_of_uniform_predictions_is_the_vocabulary_size():
    ids = torch.arange(1000) % 37
    # (float32 log-softmax: about 1e-6 relative)
    assert math.isclose(lm.perplexity(Uniform(50), ids, context=100), 50,
                        rel_tol=1e-5)
    with pytest.raises(ValueError, match="window"):
        lm.perplexity(Uniform(50), ids[:10], context=100)
    assert lm.windows(ids, 300).shape == (3, 300)


class WordTokenizer:
    """Whitespace tokenizer: one id per distinct word."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text):
        class Out:
            input_ids = [self.vocab.setdefault(w, len(self.vocab))
                         for w in text.split()]
        return Out()


def test_token_splits_share_no_text():
    from nqlib.datasets import stdlib_documents

    tok = WordTokenizer()
    ev, cal = lm.stdlib_token_splits(tok, 5000, 4000, seed=1)
    assert ev.shape == (5000,) and cal.shape == (4000,)
    words = {i: w for w, i in tok.vocab.items()}
    ev_text = " ".join(words[int(i)] for i in ev)
    cal_text = " ".join(words[int(i)] for i in cal)
    docs = stdlib_documents()
    # a long document of one half never appears in the other
    for _, text in docs:
        if len(text.split()) > 30 and text in ev_text:
            assert text not in cal_text
    ev2, _ = lm.stdlib_token_splits(WordTokenizer(), 5000, 10, seed=1)
    assert torch.equal(ev2, ev)  # same seed, same tokenizer: same stream
    with pytest.raises(ValueError, match="fewer than"):
        lm.stdlib_token_splits(WordTokenizer(), 10**8, 10)


# --------------------------------------------------- per-layer errors
def test_relative_output_errors_formula():
    torch.manual_seed(1)
    float_model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    quant = torch.nn.Sequential(lm.RTNLinear(float_model[0], 2, 32))
    X = np.random.default_rng(0).standard_normal((500, 32))
    H = X.T @ X / 500
    err = lm.relative_output_errors(float_model, quant, {"0": H})
    W = float_model[0].weight.detach().double().numpy()
    D = quant[0].weight.double().numpy() - W
    want = np.sum((X @ D.T) ** 2) / np.sum((X @ W.T) ** 2)
    assert set(err) == {"0"} and math.isclose(err["0"], want, rel_tol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_computed_weight_is_the_decoded_weight(bias):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(64, 24, bias=bias),
                                torch.nn.Linear(64, 24, bias=bias))
    rtn = lm.RTNLinear(model[1], 3, 32, hadamard=True)
    quantize_(model, QuantConfig(weight_rate=3.0),
              filter_fn=lambda module, fqn: fqn == "0")
    for layer in (model[0], rtn):
        want = layer.weight.detach()
        got = lm.computed_weight(layer)
        assert got.shape == (24, 64) and got.dtype == torch.float32
        assert torch.allclose(got, want, rtol=0, atol=1e-6 * want.abs().max())
    # a layer that quantizes its inputs: its weight, not its forward pass
    act = QuantLinear(64, 24, model[0].quantized_weight, model[0].bias,
                      act_rate=4.0)
    assert torch.equal(lm.computed_weight(act), act.weight)
    with pytest.raises(TypeError, match="in_features"):
        lm.computed_weight(torch.nn.ReLU())


def test_dense_equivalent_computes_the_same_function():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(),
                                torch.nn.Linear(48, 32, bias=False),
                                torch.nn.Linear(32, 8))
    quantize_(model, QuantConfig(weight_rate=3.0),
              filter_fn=lambda module, fqn: fqn in ("0", "2"))
    model[3] = lm.RTNLinear(model[3], 3, 32, hadamard=True)
    dense = lm.dense_equivalent(model)
    assert isinstance(model[0], QuantLinear)  # the original is untouched
    assert all(type(dense[i]) is torch.nn.Linear for i in (0, 2, 3))
    assert dense[2].bias is None
    x = torch.randn(7, 64)
    with torch.no_grad():
        want, got = model(x), dense(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())
    model[0] = QuantLinear(64, 48, model[0].quantized_weight, model[0].bias,
                           act_rate=4.0)
    with pytest.raises(ValueError, match="'0' quantizes its inputs"):
        lm.dense_equivalent(model)


def test_relative_output_errors_with_given_energies():
    torch.manual_seed(3)
    float_model = torch.nn.Sequential(torch.nn.Linear(128, 64),
                                      torch.nn.Linear(64, 32))
    quant = copy.deepcopy(float_model)
    quantize_(quant, QuantConfig(weight_rate=4.0))
    rng = np.random.default_rng(1)
    H = {}
    for fqn, n in (("0", 128), ("1", 64)):
        X = rng.standard_normal((200, n))
        H[fqn] = X.T @ X / 200
    energies = lm.output_energies(float_model, H)
    W = float_model[1].weight.detach().double().numpy()
    assert math.isclose(energies["1"], np.trace(W @ H["1"] @ W.T), rel_tol=1e-5)
    a = lm.relative_output_errors(float_model, quant, H)
    b = lm.relative_output_errors(float_model, quant, H, energies=energies)
    assert a == b and list(a) == ["0", "1"] and all(v > 0 for v in a.values())
    with pytest.raises(ValueError, match="no entry for layer '1'"):
        lm.relative_output_errors(float_model, quant, H,
                                  energies={"0": energies["0"]})


# -------------------------------------------------------------- caching
def test_quantize_cached_hits_give_the_same_model(tmp_path):
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                   torch.nn.Linear(64, 32))

    cfg = QuantConfig(weight_rate=3.0)
    a, b = make(), make()
    rep_a, hit_a = lm.quantize_cached(a, cfg, tag="mlp", cache_dir=tmp_path)
    rep_b, hit_b = lm.quantize_cached(b, cfg, tag="mlp", cache_dir=tmp_path)
    assert (hit_a, hit_b) == (False, True)
    assert rep_a.bytes_after == rep_b.bytes_after
    assert [r["name"] for r in rep_a.layers] == [r["name"] for r in rep_b.layers]
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    c = make()
    _, hit_c = lm.quantize_cached(c, cfg, tag="other", cache_dir=tmp_path)
    assert not hit_c  # another tag, another entry
    d = make()
    rep, hit = lm.quantize_cached(d, cfg)  # no cache directory
    assert not hit and isinstance(d[0], QuantLinear)
    e = make()
    quantize_(e, cfg)
    assert lm.model_report(e).bytes_after == rep.bytes_after


# ------------------------------------------------------------ GGUF reader
def test_one_gguf_reader_parses_each_file_once(tmp_path):
    gguf = pytest.importorskip("gguf")
    paths = []
    for k in range(2):
        path = tmp_path / f"m{k}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_uint32("nqlib.test", 7 + k)
        w.add_tensor("t", np.arange(4, dtype=np.float32) + k)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        paths.append(path)
    original = gguf.GGUFReader
    with lm._one_gguf_reader():
        first = gguf.GGUFReader(paths[0])
        assert gguf.GGUFReader(str(paths[0])) is first  # same file, once
        other = gguf.GGUFReader(paths[1])
        assert other is not first
        assert int(other.fields["nqlib.test"].contents()) == 8
        np.testing.assert_array_equal(first.tensors[0].data, np.arange(4))
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(paths[0]) is not first


def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_stepwise_perplexity_is_the_windows_one_for_a_float_model():
    """Fed one token per call with the key-value cache, a float model
    predicts what it predicts from the whole window."""
    model = _tiny_llama()
    ids = torch.randint(0, 50, (96,), generator=torch.Generator().manual_seed(1))
    want = lm.perplexity(model, ids, context=32)
    assert math.isclose(lm.stepwise_perplexity(model, ids, context=32), want,
                        rel_tol=1e-5)
    with pytest.raises(ValueError, match="window"):
        lm.stepwise_perplexity(model, ids[:10], context=32)


def test_stepwise_perplexity_quantizes_one_token_per_call():
    """A W4A4 model fed one token per call quantizes every layer input one
    token at a time (each call one row, counted as a stream: at most the
    rate), unlike the window pass (one call per window)."""
    model = _tiny_llama(2)
    quantize_(model, QuantConfig(weight_rate=4.0, act_rate=4.0, act_mode="fixed"),
              filter_fn=lambda module, fqn: fqn != "lm_head")
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    ids = torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(3))
    cache = qls[0].act_cache
    cache.reset_counts()
    # per block four distinct inputs (q, k and v share theirs, as do gate
    # and up), of 128, 128, 128 and 256 entries; two blocks, two windows
    per_token = 2 * (3 * 128 + 256)
    window = lm.perplexity(model, ids, context=32)
    assert cache.quantized_calls == 2 * 2 * 4            # a window per call
    assert cache.quantized_entries == 2 * 32 * per_token
    cache.reset_counts()
    step = lm.stepwise_perplexity(model, ids, context=32)
    assert cache.quantized_calls == 2 * 31 * 2 * 4       # a token per call
    assert cache.quantized_entries == 2 * 31 * per_token
    assert math.isfinite(step) and math.isfinite(window)
    for m in qls:
        assert m.act_bits_per_entry <= 4.0 + 0.02 + 1e-12
