"""torchao-style model API: ``QuantConfig``, ``quantize_``, and checkpoints.

* :class:`QuantConfig` -- a frozen, JSON-serialisable description of how to
  quantize a linear layer (method, mode, weight and activation rates, seed,
  calibration settings);
* :func:`quantize_` -- replace the ``nn.Linear`` layers that ``filter_fn``
  selects by :class:`~nqlib.nn.QuantLinear`, in place, torchao's
  ``quantize_(model, config, filter_fn)`` with ``filter_fn(module, fqn)``;
* :func:`save_quantized` / :func:`load_quantized` -- the quantized model as
  named tensors in a safetensors file (each quantized layer's exact
  :class:`~nqlib.QuantizedMatrix` bytes as a ``uint8`` tensor, every other
  tensor as it is) plus a JSON description, loadable into a fresh float or
  meta-device skeleton of the same architecture.

Everything here is re-exported by :mod:`nqlib.nn`; this module imports
torch (``import nqlib`` does not).

Book: chapter "Quantizing a language model", label ``ch-lm``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path

import numpy as np
import torch

from nqlib import _checks
from nqlib.quantizers import matrix as _matrix

__all__ = ["QuantConfig", "quantize_", "QuantEmbedding", "save_quantized",
           "load_quantized", "WEIGHTS_NAME", "CONFIG_NAME"]

#: the safetensors file written by :func:`save_quantized` (the name
#: ``from_pretrained`` looks for)
WEIGHTS_NAME = "model.safetensors"
#: the JSON description of the quantized layers
CONFIG_NAME = "nqlib_quantization.json"
#: non-persistent buffers (absent from a state dict; a meta skeleton needs
#: them), in their own file so that other loaders do not see them
BUFFERS_NAME = "nqlib_buffers.safetensors"
FORMAT = "nqlib-quantized-model"
FORMAT_VERSION = 1

_RTN = ("rtn", "rtn-hadamard")
_CONFIG_METHODS = (*_matrix.METHODS, "nested-ldlq")


# ------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How :func:`quantize_` quantizes each selected linear layer.

    Frozen (hashable, immutable) and JSON-serialisable
    (:meth:`to_json` / :meth:`from_json`); :func:`save_quantized` stores it
    beside the weights.

    Parameters
    ----------
    weight_rate : float
        Weight rate in bits per entry, all side information included (the
        integer bit width for the rtn methods), as in :func:`nqlib.quantize`.
    method : {"nested", "nested-ldlq", "rtn", "rtn-hadamard", "ecsq"}
        ``"nested-ldlq"`` is the fixed-mode nested quantizer with
        Hessian-aware rounding; it needs calibration data
        (``quantize_(..., calibration=...)``).
    mode : str or None
        Weight mode (:data:`nqlib.quantizers.matrix.MODES`, e.g.
        ``"fixed"``: random access; ``"variable"``: entropy coded). None:
        ``"fixed"`` for the nested methods, the method's own mode for the
        baselines.
    act_rate : float or None
        Quantize every selected layer's input at this rate on the fly, or
        None to keep activations in float.
    act_mode : str or None
        Mode of the activation quantizer (None: the method's default,
        ``"variable"`` for the nested methods); only with ``act_rate``.
    seed : int
        Shared seed of the weight and activation quantizers (rotation).
    damp : float or None
        ``nested-ldlq`` only: damping of the calibration second moment, a
        fraction of its mean diagonal (None: the library default,
        :data:`nqlib.quantizers.ldlq.DEFAULT_DAMP`).
    group_size : int or None
        rtn methods only: group length (None: :func:`nqlib.quantize`'s
        default).

    Raises
    ------
    ValueError
        An unknown method or mode, a rate out of range, an option that does
        not apply to the method.

    Examples
    --------
    >>> from nqlib.nn import QuantConfig
    >>> cfg = QuantConfig(weight_rate=3.0, act_rate=4.0)
    >>> QuantConfig.from_json(cfg.to_json()) == cfg
    True
    """

    weight_rate: float = 4.0
    method: str = "nested"
    mode: str | None = None
    act_rate: float | None = None
    act_mode: str | None = None
    seed: int = 0
    damp: float | None = None
    group_size: int | None = None

    def __post_init__(self):
        from nqlib.nn import _check_model_options

        _matrix._check_choice(self.method, "method", _CONFIG_METHODS)
        base = "nested" if self.method == "nested-ldlq" else self.method
        set_ = lambda name, value: object.__setattr__(self, name, value)
        rtn = self.method in _RTN
        set_("weight_rate", _matrix._check_rate(self.weight_rate, base))
        if self.act_rate is not None:
            set_("act_rate", _matrix._check_rate(self.act_rate, base))
        seed = _checks.check_int(self.seed, "seed", minimum=0)
        if seed >= 2**64:
            raise ValueError(f"seed must be < 2**64, got {seed}")
        set_("seed", seed)
        if self.damp is not None:
            if self.method != "nested-ldlq":
                raise ValueError("damp applies to method='nested-ldlq' only, "
                                 f"got method={self.method!r}")
            if (isinstance(self.damp, bool)
                    or not isinstance(self.damp, numbers.Real)
                    or not math.isfinite(self.damp) or self.damp < 0):
                raise ValueError(f"damp must be a finite real >= 0, got "
                                 f"{self.damp!r}")
            set_("damp", float(self.damp))
        if self.group_size is not None:
            if not rtn:
                raise ValueError("group_size applies to the rtn methods only, "
                                 f"got method={self.method!r}")
            set_("group_size", _checks.check_int(self.group_size, "group_size",
                                                 minimum=1))
        # the rules of quantize_model / QuantLinear.from_linear (modes the
        # method has, act_mode only with act_rate, ...)
        kw = self.linear_kwargs()
        _check_model_options(kw.pop("method"), kw.pop("mode"),
                             kw.pop("act_rate"), kw.pop("act_mode"),
                             {k: v for k, v in kw.items()
                              if k not in ("weight_rate", "seed")})

    # ------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON types only)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as a JSON object (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data) -> QuantConfig:
        """Rebuild from :meth:`to_dict`'s output; unknown keys raise."""
        if not isinstance(data, dict):
            raise TypeError(f"expected a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s) {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        """Rebuild from :meth:`to_json`'s output."""
        return cls.from_dict(json.loads(text))

    def linear_kwargs(self) -> dict:
        """Keyword arguments of :meth:`nqlib.nn.QuantLinear.from_linear`
        (and of :func:`nqlib.nn.quantize_model`) for this config, except the
        Hessian."""
        kw = dict(weight_rate=self.weight_rate, act_rate=self.act_rate,
                  seed=self.seed, method=self.method, mode=self.mode,
                  act_mode=self.act_mode)
        if self.damp is not None:
            kw["damp"] = self.damp
        if self.group_size is not None:
            kw["group_size"] = self.group_size
        return kw


# ------------------------------------------------------ tied embeddings
class QuantEmbedding(torch.nn.Module):
    """An embedding table tied to a quantized output layer.

    Language models often tie the token embedding to the output projection
    (the LM head): one ``vocab x dim`` matrix serves both. When
    :func:`quantize_` quantizes such a head, the embedding reads its rows
    from the same codes, so the matrix is stored once, quantized.

    The table is not a registered submodule or buffer (the head owns it):
    the state dict of this module is empty, and :func:`save_quantized`
    records the tie instead.

    Parameters
    ----------
    source : nqlib.nn.QuantLinear
        The quantized head, weight ``(num_embeddings, embedding_dim)``.
    padding_idx : int or None
        As in ``torch.nn.Embedding`` (only recorded: no gradient flows).

    Notes
    -----
    Each call decodes the whole table (:attr:`QuantLinear.weight`) and
    keeps nothing; a look-up that decodes only the requested rows is not
    implemented.
    """

    def __init__(self, source, padding_idx=None):
        super().__init__()
        from nqlib.nn import QuantLinear

        if not isinstance(source, QuantLinear):
            raise TypeError(f"source must be a QuantLinear, got "
                            f"{type(source).__name__}")
        object.__setattr__(self, "_source", source)  # not a submodule
        self.num_embeddings = source.out_features
        self.embedding_dim = source.in_features
        self.padding_idx = padding_idx

    @property
    def source(self):
        """The quantized layer that owns the table."""
        return self._source

    @property
    def weight(self) -> torch.Tensor:
        """The decoded table (num_embeddings x embedding_dim), float32,
        decoded on each access."""
        return self._source.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight.to(self._device()),
                                             self.padding_idx)

    def _device(self):
        b = next(iter(self._source.buffers()), None)
        return b.device if b is not None else torch.device("cpu")

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"tied to a QuantLinear")


# ----------------------------------------------------------- quantize_
def _module_path(model, fqn):
    parent = model
    parts = fqn.split(".")
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1]


def _set_module(model, fqn, module):
    parent, name = _module_path(model, fqn)
    setattr(parent, name, module)


def quantize_(model: torch.nn.Module, config: QuantConfig, filter_fn=None, *,
              calibration=None, progress: bool = False):
    """Quantize the selected linear layers of ``model``, in place.

    torchao's ``quantize_(model, config, filter_fn)``: every
    ``torch.nn.Linear`` for which ``filter_fn(module, fqn)`` is true (all of
    them when ``filter_fn`` is None) becomes a
    :class:`~nqlib.nn.QuantLinear` built by
    :meth:`~nqlib.nn.QuantLinear.from_linear` with the config's options.
    Layers already quantized are left alone, so ``quantize_`` can be called
    again with another config and filter for other layers.

    A selected layer whose weight is tied to an ``nn.Embedding`` of the
    model (a language model's head tied to its token embedding) is
    quantized once: the embedding becomes a :class:`QuantEmbedding` that
    reads the same codes.

    Parameters
    ----------
    model : torch.nn.Module
    config : QuantConfig
    filter_fn : callable, optional
        ``filter_fn(module, fqn) -> bool``, ``fqn`` the layer's name in
        ``model.named_modules()``.
    calibration : callable, iterable or dict, optional
        ``method="nested-ldlq"`` only (and required there): calibration data
        run through the still-float model to measure each selected layer's
        input second moment -- see :func:`nqlib.nn.quantize_model`.
    progress : bool
        Show a progress bar over layers.

    Returns
    -------
    nqlib.nn.QuantizationReport
        Per layer: name, shape, bits per entry, bytes before (float32) and
        after. (torchao's ``quantize_`` returns None; the model is changed
        in place either way.)

    Raises
    ------
    TypeError
        ``model`` is not a module, ``config`` not a :class:`QuantConfig`,
        ``filter_fn`` not callable.
    ValueError
        Calibration missing for ``nested-ldlq`` or given to another method;
        anything :meth:`~nqlib.nn.QuantLinear.from_linear` rejects.

    Examples
    --------
    >>> import torch
    >>> from nqlib.nn import QuantConfig, quantize_
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
    ...                             torch.nn.Linear(32, 8))
    >>> report = quantize_(model, QuantConfig(weight_rate=4.0),
    ...                    filter_fn=lambda module, fqn: fqn == "0")
    >>> type(model[0]).__name__, type(model[2]).__name__
    ('QuantLinear', 'Linear')
    """
    from nqlib.nn import QuantLinear, quantize_model

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a nqlib.nn.QuantConfig, got "
                        f"{type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be callable as filter_fn(module, fqn)")
    selected = {fqn for fqn, mod in model.named_modules()
                if isinstance(mod, torch.nn.Linear)
                and (filter_fn is None or filter_fn(mod, fqn))}
    # embeddings tied to a selected layer's weight
    ties = {}
    for fqn, mod in model.named_modules():
        if isinstance(mod, torch.nn.Embedding):
            for lin in selected:
                if model.get_submodule(lin).weight is mod.weight:
                    ties[fqn] = lin
    kw = config.linear_kwargs()
    report = quantize_model(
        model, kw.pop("weight_rate"), kw.pop("act_rate"), kw.pop("method"),
        kw.pop("seed"), skip=lambda name, mod: name not in selected,
        mode=kw.pop("mode"), act_mode=kw.pop("act_mode"),
        calibration=calibration, progress=progress, **kw)
    for fqn in selected:
        ql = model.get_submodule(fqn)
        assert isinstance(ql, QuantLinear)
        ql.quant_config = config
    for fqn, lin in ties.items():
        emb = model.get_submodule(fqn)
        _set_module(model, fqn, QuantEmbedding(model.get_submodule(lin),
                                               emb.padding_idx))
    return report


# ------------------------------------------------------- save and load
def _quantized_layers(model):
    from nqlib.nn import QuantLinear

    return {fqn: m for fqn, m in model.named_modules()
            if isinstance(m, QuantLinear)}


def _layer_entry(ql) -> dict:
    cfg = getattr(ql, "quant_config", None)
    q = ql.quantized_weight
    return dict(in_features=ql.in_features, out_features=ql.out_features,
                bias=ql.bias is not None, act_rate=ql.act_rate,
                act_mode=ql.act_mode,
                config=None if cfg is None else cfg.to_dict(),
                method=q.method, mode=q.mode,
                bits_per_entry=q.bits_per_entry, nbytes=q.nbytes)


def save_quantized(model: torch.nn.Module, directory) -> dict:
    """Write a model quantized by :func:`quantize_` to ``directory``.

    Files:

    * ``model.safetensors`` -- named tensors: for each quantized layer
      ``<fqn>.qweight`` (``uint8``, the exact bytes of its
      :class:`~nqlib.QuantizedMatrix`: codes and side information) and
      ``<fqn>.bias``; every other tensor of the state dict as it is. A
      tensor shared by several names (tied weights) is written once.
    * ``nqlib_quantization.json`` -- the format, each quantized layer's
      shape, options and :class:`QuantConfig`, the tied embeddings and the
      shared names;
    * ``nqlib_buffers.safetensors`` -- non-persistent buffers (not in a
      state dict, e.g. rotary tables), which a meta-device skeleton lacks;
    * ``config.json`` -- when the model has a Hugging Face ``config``, that
      config with ``quantization_config = {"quant_method": "nqlib", ...}``,
      so that ``from_pretrained(directory)`` loads the quantized model after
      ``import nqlib.hf``.

    Parameters
    ----------
    model : torch.nn.Module
    directory : str or path-like
        Created if missing; files of these names are overwritten.

    Returns
    -------
    dict
        ``{"quantized_bytes": ..., "other_bytes": ..., "file_bytes": ...}``:
        the bytes of the quantized layers' tensors (qweight and bias), of
        the other tensors, and the size of ``model.safetensors``.

    Raises
    ------
    TypeError
        ``model`` is not a module.
    ValueError
        The model has no quantized layer.
    """
    from safetensors.torch import save_file

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    layers = _quantized_layers(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layer: quantize it with "
                         "nqlib.nn.quantize_ first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, quantized_bytes = {}, 0
    for fqn, ql in layers.items():
        data = np.frombuffer(ql.quantized_weight.to_bytes(), dtype=np.uint8)
        tensors[f"{fqn}.qweight"] = torch.from_numpy(data.copy())
        quantized_bytes += data.size
        if ql.bias is not None:
            tensors[f"{fqn}.bias"] = ql.bias.detach().cpu().contiguous()
            quantized_bytes += ql.bias.numel() * ql.bias.element_size()
    prefixes = tuple(f"{fqn}." for fqn in layers)
    ties = {fqn: dict(source=next(k for k, v in layers.items() if v is m.source),
                      padding_idx=m.padding_idx)
            for fqn, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    aliases, seen, other_bytes = {}, {}, 0
    for key, t in model.state_dict(keep_vars=True).items():
        if key.startswith(prefixes):
            continue
        ident = (t.data_ptr(), tuple(t.shape), t.dtype, t.device)
        if ident in seen and t.numel() > 0:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().cpu().contiguous()
        other_bytes += t.numel() * t.element_size()
    persistent = set(model.state_dict())
    buffers = {name: b.detach().cpu().contiguous()
               for name, b in model.named_buffers()
               if name not in persistent and not name.startswith(prefixes)}
    meta = dict(format=FORMAT, version=FORMAT_VERSION,
                layers={fqn: _layer_entry(ql) for fqn, ql in layers.items()},
                tied_embeddings=ties, aliases=aliases,
                buffers=sorted(buffers))
    save_file(tensors, str(directory / WEIGHTS_NAME),
              metadata={"format": "pt", "nqlib": FORMAT})
    save_file(buffers, str(directory / BUFFERS_NAME))
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=1,
                                                    sort_keys=True))
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_json_file"):
        _write_hf_config(hf_config, directory, meta)
    return dict(quantized_bytes=quantized_bytes, other_bytes=other_bytes,
                file_bytes=(directory / WEIGHTS_NAME).stat().st_size)


def _write_hf_config(hf_config, directory, meta):
    """``config.json`` with an nqlib ``quantization_config`` (a copy: the
    model's own config is left unchanged)."""
    import copy

    cfg = copy.deepcopy(hf_config)
    configs = {json.dumps(e["config"], sort_keys=True)
               for e in meta["layers"].values() if e["config"] is not None}
    cfg.quantization_config = dict(
        quant_method="nqlib", format=FORMAT, version=FORMAT_VERSION,
        configs=[json.loads(c) for c in sorted(configs)])
    cfg.to_json_file(str(directory / "config.json"))


def _read_meta(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{directory} holds no {CONFIG_NAME}: not a directory "
                         "written by nqlib.nn.save_quantized")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an nqlib quantized-model description")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('version')!r}; "
                         f"this nqlib reads version {FORMAT_VERSION}")
    for key in ("layers", "tied_embeddings", "aliases", "buffers"):
        if key not in meta:
            raise ValueError(f"{path} lacks the field {key!r}")
    return meta


def _build_layer(fqn, entry, tensors):
    """The QuantLinear of ``fqn`` from its stored bytes and bias."""
    from nqlib.nn import QuantLinear
    from nqlib.quantizers.matrix import QuantizedMatrix

    key = f"{fqn}.qweight"
    if key not in tensors:
        raise ValueError(f"the checkpoint lacks the tensor {key!r}")
    data = tensors[key]
    if data.dtype != torch.uint8 or data.ndim != 1:
        raise ValueError(f"{key} must be a 1-D uint8 tensor, got "
                         f"{data.dtype} of shape {tuple(data.shape)}")
    try:
        qw = QuantizedMatrix.from_bytes(data.numpy().tobytes())
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    bias = None
    if entry["bias"]:
        if f"{fqn}.bias" not in tensors:
            raise ValueError(f"the checkpoint lacks the tensor {fqn}.bias")
        bias = tensors[f"{fqn}.bias"]
    ql = QuantLinear(entry["in_features"], entry["out_features"], qw, bias,
                     act_rate=entry["act_rate"], act_mode=entry["act_mode"])
    if entry.get("config") is not None:
        ql.quant_config = QuantConfig.from_dict(entry["config"])
    return ql


def _tied_embedding(model, fqn, tie, meta):
    """The :class:`QuantEmbedding` of a ``tied_embeddings`` entry."""
    if not isinstance(tie, dict) or tie.get("source") not in meta["layers"]:
        raise ValueError(f"tied embedding {fqn!r}: its source is not a "
                         "quantized layer of the checkpoint")
    pad = tie.get("padding_idx")
    if pad is not None and not isinstance(pad, int):
        raise ValueError(f"tied embedding {fqn!r}: bad padding_idx {pad!r}")
    return QuantEmbedding(model.get_submodule(tie["source"]), pad)


def load_quantized(model: torch.nn.Module, directory) -> torch.nn.Module:
    """Load a :func:`save_quantized` checkpoint into ``model``, in place.

    ``model`` is a skeleton of the same architecture -- its float weights,
    or parameters on the ``meta`` device (e.g. built under
    ``torch.device("meta")``): the quantized layers are rebuilt as
    :class:`~nqlib.nn.QuantLinear` from their stored bytes (the shapes must
    match the skeleton's ``nn.Linear``), tied embeddings are re-tied, and
    every other tensor is assigned from the file. The result computes
    exactly what the saved model computed.

    Parameters
    ----------
    model : torch.nn.Module
    directory : str or path-like

    Returns
    -------
    torch.nn.Module
        ``model``.

    Raises
    ------
    ValueError
        The directory is not an nqlib checkpoint, a stored matrix is
        corrupted, a layer's shape does not match the skeleton, a tensor the
        model needs is missing from the file or the file holds one the model
        does not have, or a meta tensor is left unloaded.
    """
    from safetensors.torch import load_file

    from nqlib.nn import QuantLinear

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    directory = Path(directory)
    meta = _read_meta(directory)
    tensors = load_file(str(directory / WEIGHTS_NAME))
    modules = dict(model.named_modules())
    for fqn, entry in meta["layers"].items():
        old = modules.get(fqn)
        if not isinstance(old, (torch.nn.Linear, QuantLinear)):
            raise ValueError(f"the model has no linear layer {fqn!r} to load "
                             "a quantized layer into")
        shape = (old.in_features, old.out_features)
        if shape != (entry["in_features"], entry["out_features"]):
            raise ValueError(f"{fqn}: the model's layer has (in, out) = {shape}, "
                             f"the checkpoint's "
                             f"{(entry['in_features'], entry['out_features'])}")
        _set_module(model, fqn, _build_layer(fqn, entry, tensors))
    for fqn, tie in meta["tied_embeddings"].items():
        emb = modules.get(fqn)
        if not isinstance(emb, (torch.nn.Embedding, QuantEmbedding)):
            raise ValueError(f"the model has no embedding {fqn!r} to tie")
        _set_module(model, fqn, _tied_embedding(model, fqn, tie, meta))
    prefixes = tuple(f"{fqn}." for fqn in meta["layers"])
    rest = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    expected = {k for k in model.state_dict() if not k.startswith(prefixes)}
    aliases = meta["aliases"]
    missing = sorted(expected - set(rest) - set(aliases))
    unexpected = sorted(set(rest) - expected)
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit the model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(rest, strict=False, assign=True)
    for key, target in aliases.items():
        owner, name = _module_path(model, key)
        src_owner, src_name = _module_path(model, target)
        shared = getattr(src_owner, src_name)
        if name in owner._parameters:
            owner._parameters[name] = shared
        else:
            owner._buffers[name] = shared
    if meta["buffers"]:
        buffers = load_file(str(directory / BUFFERS_NAME))
        for name in meta["buffers"]:
            owner, attr = _module_path(model, name)
            if attr not in owner._buffers:
                raise ValueError(f"the model has no buffer {name!r}")
            owner._buffers[attr] = buffers[name]
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers())
            if t.is_meta]
    if left:
        raise ValueError(f"tensors left on the meta device: {left[:5]}")
    _share_activation_cache(model)
    return model


def _share_activation_cache(model):
    """One activation cache for the model's quantized layers, as
    :func:`nqlib.nn.quantize_model` gives them (layers fed the same input
    quantize it once)."""
    from nqlib.nn import _share_activation_cache as share

    share(model)
