"""The torchao-style API: QuantConfig, quantize_, QuantLinear.weight,
save_quantized / load_quantized, and the Hugging Face registration.

* ``QuantConfig`` is frozen, validates its options and survives JSON;
* ``quantize_(model, config, filter_fn)`` calls ``filter_fn(module, fqn)``,
  replaces exactly the selected layers with the config's options (the same
  bytes as ``QuantLinear.from_linear`` with the same argument names), and
  quantizes a head tied to an embedding once;
* ``QuantLinear.weight`` is the decoded weight, read-only, and not kept;
* a saved model loads into a float or meta skeleton -- here and in a fresh
  Python process -- and computes identical logits; malformed checkpoints
  fail with a ValueError;
* after ``import nqlib.hf``, ``transformers.AutoModelForCausalLM.
  from_pretrained`` loads the checkpoint of a (tiny, random) Llama model.

Tiny models only: everything here runs in seconds.
"""

import dataclasses
import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nqlib.nn import (  # noqa: E402
    CONFIG_NAME,
    WEIGHTS_NAME,
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    load_quantized,
    quantize_,
    save_quantized,
)

HERE = Path(__file__).resolve().parent


class TinyLM(torch.nn.Module):
    """Embedding tied to the output head, a residual MLP, a layer norm and a
    non-persistent buffer: the parts of a language model that matter for
    saving and loading."""

    def __init__(self, vocab=96, dim=64, hidden=128, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim, bias=False)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("gain", torch.linspace(0.5, 1.5, dim),
                             persistent=False)

    def forward(self, ids):
        h = self.embed(ids) * self.gain
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        return self.head(h)


def token_ids(seed=3, shape=(2, 12), vocab=96):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids=None):
    with torch.no_grad():
        return model(token_ids() if ids is None else ids)


# ---------------------------------------------------------------- config
def test_config_is_frozen_and_hashable():
    cfg = QuantConfig(weight_rate=3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weight_rate = 2.0
    assert hash(cfg) == hash(QuantConfig(weight_rate=3))
    assert cfg == QuantConfig(weight_rate=3)  # rates normalised to float
    assert isinstance(QuantConfig(weight_rate=3).weight_rate, float)


@pytest.mark.parametrize("cfg", [
    QuantConfig(),
    QuantConfig(weight_rate=2.5, act_rate=4.0, act_mode="fixed", seed=7),
    QuantConfig(weight_rate=3.0, method="nested-ldlq", damp=0.05),
    QuantConfig(weight_rate=4, method="rtn-hadamard", group_size=64),
    QuantConfig(weight_rate=4.0, mode="variable"),
])
def test_config_json_round_trip(cfg):
    text = cfg.to_json()
    assert json.loads(text) == cfg.to_dict()
    assert QuantConfig.from_json(text) == cfg
    assert QuantConfig.from_dict(json.loads(text)) == cfg


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="gptq"), "method"),
    (dict(weight_rate=9.0), "rate"),
    (dict(weight_rate=float("nan")), "finite"),
    (dict(method="rtn", weight_rate=3.5), "integer bit width"),
    (dict(mode="turbo"), "mode"),
    (dict(act_mode="turbo"), "act_mode"),
    (dict(act_rate=0.0), "rate"),
    (dict(act_mode="fixed"), "act_rate"),
    (dict(method="ecsq", mode="fixed"), "mode"),
    (dict(seed=-1), "seed"),
    (dict(method="nested-ldlq", mode="variable"), "nested-ldlq. codes"),
    (dict(damp=0.01), "nested-ldlq"),
    (dict(method="nested-ldlq", damp=-1.0), "damp"),
    (dict(group_size=64), "rtn methods only"),
    (dict(method="rtn", weight_rate=4, group_size=0), "group_size"),
])
def test_config_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown QuantConfig field"):
        QuantConfig.from_dict({"weight_rate": 4.0, "bits": 4})
    with pytest.raises(TypeError):
        QuantConfig.from_dict([("weight_rate", 4.0)])


# ------------------------------------------------------------- quantize_
def test_quantize_calls_filter_with_module_and_fqn():
    model = TinyLM()
    seen = []

    def filter_fn(module, fqn):
        seen.append((type(module).__name__, fqn))
        return fqn == "up"

    rep = quantize_(model, QuantConfig(weight_rate=3.0, seed=5), filter_fn)
    assert ("Linear", "up") in seen and ("Linear", "down") in seen
    assert all(name == "Linear" for name, _ in seen)
    assert isinstance(model.up, QuantLinear)
    assert isinstance(model.down, torch.nn.Linear)
    assert isinstance(model.embed, torch.nn.Embedding)  # head not selected
    q = model.up.quantized_weight
    assert (q.method, q.mode, q.rate, q.seed) == ("nested", "fixed", 3.0, 5)
    assert [r["name"] for r in rep.layers] == ["up"]
    assert model.up.quant_config == QuantConfig(weight_rate=3.0, seed=5)
    # a second call quantizes other layers and leaves "up" alone
    before = model.up.quantized_weight
    quantize_(model, QuantConfig(weight_rate=4.0), lambda m, fqn: fqn == "down")
    assert model.up.quantized_weight is before
    assert isinstance(model.down, QuantLinear)


def test_quantize_matches_from_linear_with_the_same_argument_names():
    cfg = QuantConfig(weight_rate=3.5, act_rate=4.0, act_mode="fixed", seed=2)
    lin = TinyLM().up
    direct = QuantLinear.from_linear(lin, **cfg.linear_kwargs())
    model = TinyLM()
    quantize_(model, cfg, lambda m, fqn: fqn == "up")
    assert (model.up.quantized_weight.to_bytes()
            == direct.quantized_weight.to_bytes())
    assert (model.up.act_rate, model.up.act_mode) == (4.0, "fixed")
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.up(x), direct(x))


def test_quantize_rtn_and_ldlq_options_reach_the_layers():
    model = TinyLM()
    quantize_(model, QuantConfig(weight_rate=4, method="rtn", group_size=32),
              lambda m, fqn: fqn == "up")
    q = model.up.quantized_weight
    assert q.method == "rtn" and q.payload.group == 32
    calib = [token_ids(seed=s, shape=(4, 16)) for s in range(3)]
    quantize_(model, QuantConfig(weight_rate=3.0, method="nested-ldlq",
                                 damp=0.1),
              lambda m, fqn: fqn == "down", calibration=calib)
    assert model.down.quantized_weight.mode == "fixed"
    with pytest.raises(ValueError, match="calibration"):
        quantize_(TinyLM(), QuantConfig(method="nested-ldlq"))
    with pytest.raises(ValueError, match="calibration"):
        quantize_(TinyLM(), QuantConfig(), calibration=calib)


def test_quantize_rejects_bad_arguments():
    with pytest.raises(TypeError, match="Module"):
        quantize_(np.eye(3), QuantConfig())
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize_(TinyLM(), {"weight_rate": 4.0})
    with pytest.raises(TypeError, match="filter_fn"):
        quantize_(TinyLM(), QuantConfig(), filter_fn="up")


def test_tied_head_is_quantized_once():
    model = TinyLM()
    rep = quantize_(model, QuantConfig(weight_rate=4.0),
                    lambda m, fqn: fqn == "head")
    assert [r["name"] for r in rep.layers] == ["head"]
    assert isinstance(model.head, QuantLinear)
    assert isinstance(model.embed, QuantEmbedding)
    assert model.embed.source is model.head
    assert model.embed.padding_idx == 0
    assert not any(k.startswith("embed") for k in model.state_dict())
    ids = token_ids()
    with torch.no_grad():
        expect = torch.nn.functional.embedding(ids, model.head.weight)
        assert torch.equal(model.embed(ids), expect)
    with pytest.raises(TypeError, match="QuantLinear"):
        QuantEmbedding(torch.nn.Linear(4, 4))


# --------------------------------------------------------- .weight
@pytest.mark.parametrize("mode", ["fixed", "variable"])  # CPU layout / matrix
def test_weight_is_the_decoded_matrix_read_only_and_not_kept(mode):
    lin = TinyLM().up
    ql = QuantLinear.from_linear(lin, 4.0, mode=mode)
    assert (ql.cpu_layout is not None) == (mode == "fixed")
    qw = ql.quantized_weight
    held, kept = ql.resident_arrays().keys(), qw.resident_arrays().keys()
    W = ql.weight
    # decoding left nothing cached, on the layer or on the caller's matrix
    assert ql.resident_arrays().keys() == held
    assert qw.resident_arrays().keys() == kept
    assert W.shape == lin.weight.shape and W.dtype == torch.float32
    assert np.array_equal(W.numpy(), qw.dequantize(np.float32).T)
    ref = weakref.ref(W)
    del W
    gc.collect()
    assert ref() is None  # the module kept no reference to it
    W = ql.weight
    W.zero_()  # writing into the copy changes nothing
    assert torch.count_nonzero(ql.weight) > 0
    with pytest.raises(AttributeError):
        ql.weight = torch.zeros_like(W)
    with pytest.raises((AttributeError, KeyError)):
        ql.weight = torch.nn.Parameter(torch.zeros_like(W))
    assert torch.count_nonzero(ql.weight) > 0
    # the layer still computes x @ W_hat.T + b
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ql(x), x @ ql.weight.T + ql.bias, atol=1e-5)


# ------------------------------------------------------- save and load
@pytest.mark.parametrize("head", [False, True])
def test_save_load_round_trip_into_float_and_meta_skeletons(tmp_path, head):
    model = TinyLM()
    select = (lambda m, fqn: True) if head else (lambda m, fqn: fqn != "head")
    quantize_(model, QuantConfig(weight_rate=3.0, seed=4), select)
    out = logits(model)
    info = save_quantized(model, tmp_path)
    assert {WEIGHTS_NAME, CONFIG_NAME} <= {p.name for p in tmp_path.iterdir()}
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert set(meta["layers"]) == ({"up", "down", "head"} if head else {"up", "down"})
    if head:
        assert meta["tied_embeddings"] == {"embed": {"source": "head",
                                                     "padding_idx": 0}}
    else:  # the float tied weight is written once
        assert meta["aliases"] == {"head.weight": "embed.weight"}
    qbytes = sum(m.quantized_weight.nbytes for m in model.modules()
                 if isinstance(m, QuantLinear))
    assert info["quantized_bytes"] == qbytes + 4 * 128  # + the float bias of up
    assert info["file_bytes"] >= info["quantized_bytes"] + info["other_bytes"]
    assert info["file_bytes"] <= info["quantized_bytes"] + info["other_bytes"] + 4096

    fresh = TinyLM(seed=9)  # other float weights: everything must be loaded
    load_quantized(fresh, tmp_path)
    assert torch.equal(logits(fresh), out)
    if not head:
        assert fresh.head.weight is fresh.embed.weight
    with torch.device("meta"):
        skeleton = TinyLM()
    load_quantized(skeleton, tmp_path)
    assert torch.equal(logits(skeleton), out)
    assert torch.equal(skeleton.gain, model.gain)  # non-persistent buffer


def test_save_rebuilds_each_layout_once_and_load_never(tmp_path, monkeypatch):
    """A layer held as a CPU layout rebuilds its QuantizedMatrix on request
    (a full decode of the layout): save_quantized asks once per layer,
    load_quantized not at all."""
    from nqlib.quantizers import cpu_layout

    model = TinyLM()
    quantize_(model, QuantConfig(weight_rate=3.0, seed=2))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.cpu_layout is not None for m in layers)
    out = logits(model)
    calls = []
    original = cpu_layout.CpuLayout.to_quantized

    def counting(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(cpu_layout.CpuLayout, "to_quantized", counting)
    save_quantized(model, tmp_path)
    assert len(calls) == len(layers)
    assert {id(c) for c in calls} == {id(m.cpu_layout) for m in layers}
    calls.clear()
    with torch.device("meta"):
        skeleton = TinyLM()
    load_quantized(skeleton, tmp_path)
    assert calls == []
    assert torch.equal(logits(skeleton), out)


CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_nn_api import TinyLM, logits
from nqlib.nn import load_quantized
with torch.device("meta"):
    model = TinyLM()
load_quantized(model, sys.argv[2])
torch.save(logits(model), sys.argv[3])
"""


def test_round_trip_in_a_fresh_process_gives_identical_logits(tmp_path):
    model = TinyLM()
    quantize_(model, QuantConfig(weight_rate=4.0, act_rate=4.0, seed=1))
    out = logits(model)
    save_quantized(model, tmp_path / "ckpt")
    result = tmp_path / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(HERE),
                           str(tmp_path / "ckpt"), str(result)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(torch.load(result), out)


def test_load_rejects_bad_checkpoints(tmp_path):
    model = TinyLM()
    quantize_(model, QuantConfig(weight_rate=4.0), lambda m, fqn: fqn != "head")
    save_quantized(model, tmp_path)
    with pytest.raises(ValueError, match="holds no"):
        load_quantized(TinyLM(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no linear layer|does not fit"):
        load_quantized(torch.nn.Sequential(torch.nn.Linear(64, 128)), tmp_path)
    with pytest.raises(ValueError, match=r"\(in, out\)"):
        load_quantized(TinyLM(hidden=96), tmp_path)
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(TinyLM(), tmp_path / "float")
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        load_quantized(TinyLM(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    # one flipped byte in a stored matrix: the reader refuses it
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    tensors["up.qweight"][40] ^= 0xFF
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="up.qweight"):
        load_quantized(TinyLM(), tmp_path)


# -------------------------------------------------- Hugging Face loading
def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
        tie_word_embeddings=True, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("head", [False, True])
def test_from_pretrained_after_import_nqlib_hf(tmp_path, head):
    transformers = pytest.importorskip("transformers")
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    import nqlib.hf

    assert AUTO_QUANTIZER_MAPPING["nqlib"] is nqlib.hf.NqlibHfQuantizer
    model = _tiny_llama()
    select = None if head else (lambda m, fqn: fqn != "lm_head")
    quantize_(model, QuantConfig(weight_rate=3.0, seed=2), select)
    ids = token_ids(shape=(1, 10))
    out = logits(model, ids).logits
    save_quantized(model, tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["quantization_config"]["quant_method"] == "nqlib"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    n_quant = sum(isinstance(m, QuantLinear) for m in loaded.modules())
    assert n_quant == 2 * 7 + head  # an unknown method would load floats
    assert isinstance(loaded.model.embed_tokens,
                      QuantEmbedding if head else torch.nn.Embedding)
    assert torch.equal(logits(loaded, ids).logits, out)
    # the output embedding's weight reads the decoded head
    W = loaded.get_output_embeddings().weight
    assert W.shape == (96, 64)
