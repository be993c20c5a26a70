"""Checkpoints of a quantized model: :func:`save_quantized` and
:func:`load_quantized`.

The quantized model is written as named tensors in a safetensors file (each
quantized layer's exact :class:`~nqlib.QuantizedMatrix` bytes as a
``uint8`` tensor, every other tensor as it is) plus a JSON description,
loadable into a fresh float or meta-device skeleton of the same
architecture. :func:`read_meta`, :func:`build_layer` and
:func:`tied_embedding` are the steps of loading, shared with the
``transformers`` integration (:mod:`nqlib.hf`).

This module imports torch (``import nqlib`` does not).

Book: chapter "Quantizing a language model", label ``ch-lm``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from nqlib.nn.api import QuantConfig
from nqlib.nn.linear import QuantEmbedding, QuantLinear
from nqlib.nn.model import module_path, set_module, share_activation_cache
from nqlib.quantizers.matrix import QuantizedMatrix

__all__ = ["save_quantized", "load_quantized", "read_meta", "build_layer",
           "tied_embedding", "WEIGHTS_NAME", "CONFIG_NAME", "BUFFERS_NAME",
           "FORMAT", "FORMAT_VERSION"]

#: the safetensors file written by :func:`save_quantized` (the name
#: ``from_pretrained`` looks for)
WEIGHTS_NAME = "model.safetensors"
#: the JSON description of the quantized layers
CONFIG_NAME = "nqlib_quantization.json"
#: non-persistent buffers (absent from a state dict; a meta skeleton needs
#: them), in their own file so that other loaders do not see them
BUFFERS_NAME = "nqlib_buffers.safetensors"
#: the ``format`` field of the JSON description
FORMAT = "nqlib-quantized-model"
#: the version of the checkpoint format this nqlib writes and reads
FORMAT_VERSION = 1


def _quantized_layers(model):
    return {fqn: m for fqn, m in model.named_modules()
            if isinstance(m, QuantLinear)}


def _layer_entry(ql, q) -> dict:
    """The JSON entry of layer ``ql`` whose QuantizedMatrix is ``q``."""
    cfg = getattr(ql, "quant_config", None)
    return dict(in_features=ql.in_features, out_features=ql.out_features,
                bias=ql.bias is not None, act_rate=ql.act_rate,
                act_mode=ql.act_mode,
                config=None if cfg is None else cfg.to_dict(),
                method=q.method, mode=q.mode,
                bits_per_entry=q.bits_per_entry, nbytes=q.nbytes)


def save_quantized(model: torch.nn.Module, directory) -> dict:
    """Write a model quantized by :func:`~nqlib.nn.quantize_` to ``directory``.

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
    tensors, quantized_bytes, entries = {}, 0, {}
    # each layer's QuantizedMatrix is rebuilt once (a layer held as a CPU
    # layout rebuilds it on request) and held until the state dict below has
    # been walked, whose qweight entries then serialise it without a rebuild
    held = {fqn: ql.quantized_weight for fqn, ql in layers.items()}
    for fqn, ql in layers.items():
        data = np.frombuffer(held[fqn].to_bytes(), dtype=np.uint8)
        tensors[f"{fqn}.qweight"] = torch.from_numpy(data.copy())
        entries[fqn] = _layer_entry(ql, held[fqn])
        quantized_bytes += data.size
        if ql.bias is not None:
            tensors[f"{fqn}.bias"] = ql.bias.detach().cpu().contiguous()
            quantized_bytes += ql.bias.numel() * ql.bias.element_size()
    prefixes = tuple(f"{fqn}." for fqn in layers)
    ties = {fqn: dict(source=next(k for k, v in layers.items() if v is m.source),
                      padding_idx=m.padding_idx)
            for fqn, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    aliases, seen, other_bytes = {}, {}, 0
    state = model.state_dict(keep_vars=True)
    del held
    for key, t in state.items():
        if key.startswith(prefixes):
            continue
        ident = (t.data_ptr(), tuple(t.shape), t.dtype, t.device)
        if ident in seen and t.numel() > 0:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().cpu().contiguous()
        other_bytes += t.numel() * t.element_size()
    persistent = set(state)
    buffers = {name: b.detach().cpu().contiguous()
               for name, b in model.named_buffers()
               if name not in persistent and not name.startswith(prefixes)}
    meta = dict(format=FORMAT, version=FORMAT_VERSION,
                layers=entries,
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


def read_meta(directory) -> dict:
    """The JSON description of the checkpoint in ``directory``, checked.

    Parameters
    ----------
    directory : str or path-like
        A directory written by :func:`save_quantized`.

    Returns
    -------
    dict
        The description: ``format``, ``version``, ``layers`` (per quantized
        layer: shape, options, config), ``tied_embeddings``, ``aliases``
        and ``buffers``.

    Raises
    ------
    ValueError
        The directory holds no description, or one that is not valid JSON,
        not of this format or version, or lacks a field.
    """
    directory = Path(directory)
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


def build_layer(fqn: str, entry: dict, tensors: dict) -> QuantLinear:
    """The :class:`~nqlib.nn.QuantLinear` of layer ``fqn``, rebuilt from
    its stored bytes and bias.

    Parameters
    ----------
    fqn : str
        The layer's name in the model.
    entry : dict
        Its entry in the ``layers`` of :func:`read_meta`'s description.
    tensors : dict
        The checkpoint's tensors by name (``<fqn>.qweight``, ``<fqn>.bias``).

    Raises
    ------
    ValueError
        A tensor is missing, ``qweight`` is not a 1-D uint8 tensor or its
        bytes are not a valid :class:`~nqlib.QuantizedMatrix`.
    """
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


def tied_embedding(model: torch.nn.Module, fqn: str, tie: dict,
                   meta: dict) -> QuantEmbedding:
    """The :class:`~nqlib.nn.QuantEmbedding` of the ``tied_embeddings``
    entry ``tie`` (for embedding ``fqn``) of the description ``meta``; its
    source layer must already be a quantized layer of ``model``.

    Raises
    ------
    ValueError
        The entry names no quantized layer of the checkpoint, or has a bad
        ``padding_idx``.
    """
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

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    directory = Path(directory)
    meta = read_meta(directory)
    tensors = load_file(str(directory / WEIGHTS_NAME))
    modules = dict(model.named_modules())
    # the tensors the model takes from the file: listed before the quantized
    # layers and tied embeddings are swapped in (their own entries are not
    # among them, and a QuantLinear held as a CPU layout would rebuild its
    # bytes just to list its qweight)
    prefixes = tuple(f"{fqn}." for fqn in meta["layers"])
    skip = prefixes + tuple(f"{fqn}." for fqn in meta["tied_embeddings"])
    expected = {k for k in model.state_dict() if not k.startswith(skip)}
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
        set_module(model, fqn, build_layer(fqn, entry, tensors))
    for fqn, tie in meta["tied_embeddings"].items():
        emb = modules.get(fqn)
        if not isinstance(emb, (torch.nn.Embedding, QuantEmbedding)):
            raise ValueError(f"the model has no embedding {fqn!r} to tie")
        set_module(model, fqn, tied_embedding(model, fqn, tie, meta))
    rest = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    aliases = meta["aliases"]
    missing = sorted(expected - set(rest) - set(aliases))
    unexpected = sorted(set(rest) - expected)
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit the model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(rest, strict=False, assign=True)
    for key, target in aliases.items():
        owner, name = module_path(model, key)
        src_owner, src_name = module_path(model, target)
        shared = getattr(src_owner, src_name)
        if name in owner._parameters:
            owner._parameters[name] = shared
        else:
            owner._buffers[name] = shared
    if meta["buffers"]:
        buffers = load_file(str(directory / BUFFERS_NAME))
        for name in meta["buffers"]:
            owner, attr = module_path(model, name)
            if attr not in owner._buffers:
                raise ValueError(f"the model has no buffer {name!r}")
            owner._buffers[attr] = buffers[name]
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers())
            if t.is_meta]
    if left:
        raise ValueError(f"tensors left on the meta device: {left[:5]}")
    share_activation_cache(model)
    return model
