"""Hugging Face ``transformers`` integration: ``quant_method="nqlib"``.

Importing this module registers nqlib as an out-of-tree quantization method
of ``transformers`` (``register_quantization_config`` and
``register_quantizer``), so that a directory written by
:func:`nqlib.nn.save_quantized` from a ``transformers`` model loads with the
usual call::

    import nqlib.hf  # noqa: F401  (registers quant_method="nqlib")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(directory)

The quantized layers come back as :class:`nqlib.nn.QuantLinear` (and a tied
embedding as :class:`nqlib.nn.QuantEmbedding`) with the stored codes: the
loaded model computes exactly what the saved one did. Loading only:
quantizing inside ``from_pretrained`` is not supported (quantize a float
model with :func:`nqlib.nn.quantize_` and save it).

Without ``import nqlib.hf``, ``transformers`` does not know the method: it
warns and loads the float skeleton with the quantized layers' weights
missing. This module imports ``transformers``; nothing else in nqlib does.

Book: chapter "Quantizing a language model", label ``ch-lm``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.quantizers import (
    HfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from nqlib.nn.api import QuantConfig
from nqlib.nn.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    build_layer,
    read_meta,
    tied_embedding,
)
from nqlib.nn.model import set_module, share_activation_cache

__all__ = ["NqlibConfig", "NqlibHfQuantizer", "QUANT_METHOD"]

QUANT_METHOD = "nqlib"


class NqlibConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an nqlib checkpoint's ``config.json``.

    Parameters
    ----------
    format, version : str, int
        The checkpoint format (:data:`nqlib.nn.checkpoint.FORMAT` and version).
    configs : list of dict
        The :class:`nqlib.nn.QuantConfig` of the quantized layers (for the
        record; each layer's own options are in ``nqlib_quantization.json``).
    """

    def __init__(self, format=FORMAT, version=FORMAT_VERSION, configs=None,
                 **kwargs):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.version = version
        self.configs = list(configs or [])
        if format != FORMAT:
            raise ValueError(f"quantization_config format must be "
                             f"{FORMAT!r}, got {format!r}")
        if version != FORMAT_VERSION:
            raise ValueError(f"nqlib checkpoint format version {version!r}; this "
                             f"nqlib reads version {FORMAT_VERSION}")
        for c in self.configs:  # validated now, not at the first forward
            QuantConfig.from_dict(c)

    def to_dict(self) -> dict:
        return dict(quant_method=QUANT_METHOD, format=self.format,
                    version=self.version, configs=list(self.configs))


class _PendingQuantLinear(torch.nn.Module):
    """Skeleton of a quantized layer while ``transformers`` loads tensors:
    a ``qweight`` byte buffer of the stored length (and the bias), replaced
    by a :class:`nqlib.nn.QuantLinear` after loading."""

    def __init__(self, fqn, entry, nbytes, bias_dtype):
        super().__init__()
        self.fqn = fqn
        self.entry = entry
        self.in_features = entry["in_features"]
        self.out_features = entry["out_features"]
        self.register_buffer("qweight", torch.zeros(nbytes, dtype=torch.uint8))
        if entry["bias"]:
            self.bias = torch.nn.Parameter(
                torch.zeros(self.out_features, dtype=bias_dtype),
                requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x):  # pragma: no cover - replaced before any call
        raise RuntimeError("nqlib layer not loaded yet")


def _checkpoint_dir(checkpoint_files) -> Path:
    if not checkpoint_files:
        raise ValueError("quant_method='nqlib' loads saved checkpoints only "
                         "(save one with nqlib.nn.save_quantized)")
    return Path(checkpoint_files[0]).parent


class NqlibHfQuantizer(HfQuantizer):
    """Loads :func:`nqlib.nn.save_quantized` checkpoints in
    ``from_pretrained``.

    Before the weights are read it swaps each quantized layer of the meta
    skeleton for a placeholder holding a byte buffer of the stored length
    (and a tied embedding for a module without tensors); ``transformers``
    fills the buffers from ``model.safetensors`` like any other tensor;
    afterwards each placeholder becomes a :class:`nqlib.nn.QuantLinear` built
    from its bytes.
    """

    requires_calibration = True  # loading only: the checkpoint is quantized

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._meta = None

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("quant_method='nqlib' does not support disk "
                             "offloading")

    def update_dtype(self, dtype):
        return torch.float32 if dtype is None else dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None,
                                             dtype=None, **kwargs):
        from safetensors import safe_open

        directory = _checkpoint_dir(checkpoint_files)
        meta = read_meta(directory)
        self._meta = meta
        with safe_open(str(directory / WEIGHTS_NAME), "pt") as fh:
            lengths = {k: fh.get_slice(k).get_shape()[0] for k in fh.keys()
                       if k.endswith(".qweight")}
        for fqn, entry in meta["layers"].items():
            old = model.get_submodule(fqn)
            if not isinstance(old, torch.nn.Linear):
                raise ValueError(f"the model has no linear layer {fqn!r}")
            if f"{fqn}.qweight" not in lengths:
                raise ValueError(f"the checkpoint lacks the tensor {fqn}.qweight")
            bias_dtype = (old.bias.dtype if old.bias is not None
                          else torch.float32)
            set_module(model, fqn, _PendingQuantLinear(
                fqn, entry, lengths[f"{fqn}.qweight"], bias_dtype))
        for fqn in meta["tied_embeddings"]:
            # tensor-free until the head is built (after loading)
            set_module(model, fqn, torch.nn.Identity())
        if meta["tied_embeddings"]:
            # the embedding's table is the quantized head's: nothing to tie
            model.config.tie_word_embeddings = False
            if hasattr(model, "_tied_weights_keys"):
                model._tied_weights_keys = None
            if hasattr(model, "all_tied_weights_keys"):
                model.all_tied_weights_keys = {}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        meta = self._meta
        for fqn, entry in meta["layers"].items():
            pending = model.get_submodule(fqn)
            tensors = {f"{fqn}.qweight": pending.qweight.detach().cpu()}
            if pending.bias is not None:
                tensors[f"{fqn}.bias"] = pending.bias.detach().cpu()
            set_module(model, fqn, build_layer(fqn, entry, tensors))
        for fqn, tie in meta["tied_embeddings"].items():
            set_module(model, fqn, tied_embedding(model, fqn, tie, meta))
        share_activation_cache(model)
        return model

    def is_serializable(self, safe_serialization=None):
        return False  # save with nqlib.nn.save_quantized

    @property
    def is_trainable(self) -> bool:
        return False


def _register():
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not NqlibConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(NqlibConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not NqlibHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(NqlibHfQuantizer)


_register()
