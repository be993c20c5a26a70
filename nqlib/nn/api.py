"""torchao-style configuration: :class:`QuantConfig` and :func:`quantize_`.

* :class:`QuantConfig` -- a frozen, JSON-serialisable description of how to
  quantize a linear layer (method, mode, weight and activation rates, seed,
  calibration settings);
* :func:`quantize_` -- replace the ``nn.Linear`` layers that ``filter_fn``
  selects by :class:`~nqlib.nn.QuantLinear`, in place, torchao's
  ``quantize_(model, config, filter_fn)`` with ``filter_fn(module, fqn)``.

Checkpoints of the result: :mod:`nqlib.nn.checkpoint`. This module imports
torch (``import nqlib`` does not).

Book: chapter "Quantizing a language model", label ``ch-lm``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers

import torch

from nqlib import _checks
from nqlib.nn.linear import QuantEmbedding, QuantLinear
from nqlib.nn.model import QuantizationReport, quantize_model, set_module
from nqlib.nn.options import LAYER_METHODS, LDLQ_METHOD, check_model_options
from nqlib.quantizers.rate_control import check_choice, check_rate, check_state_bits

__all__ = ["QuantConfig", "quantize_"]

_RTN = ("rtn", "rtn-hadamard")


# ------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How :func:`quantize_` quantizes each selected linear layer.

    Frozen (hashable, immutable) and JSON-serialisable
    (:meth:`to_json` / :meth:`from_json`); :func:`~nqlib.nn.save_quantized` stores it
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
        None to keep activations in float. The rate of the stream of a
        layer's inputs: each call's codes, means, norms and per-call fields
        count (see :class:`~nqlib.nn.QuantLinear`).
    act_mode : str or None
        Mode of the activation quantizer (None: the method's default,
        ``"variable"`` for the nested methods); only with ``act_rate``.
        For one token per call (generation) ``"fixed"`` keeps more of the
        rate for the codes: a variable-mode call also sends its entropy
        coder's parameters (28 bytes, 0.39 bit per entry at 576).
    seed : int
        Shared seed of the weight and activation quantizers (rotation).
    damp : float or None
        ``nested-ldlq`` only: damping of the calibration second moment, a
        fraction of its mean diagonal (None: the library default,
        :data:`nqlib.quantizers.ldlq.DEFAULT_DAMP`).
    group_size : int or None
        rtn methods only: group length (None: :func:`nqlib.quantize`'s
        default).
    state_bits : int or None
        ``mode="trellis"`` only: state bits of the trellis code, as in
        :func:`nqlib.quantize` (None: the library default,
        :data:`nqlib.quantizers.trellis.DEFAULT_L`). Fewer bits encode
        faster (half the time per bit) for a slightly larger error.

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
    state_bits: int | None = None

    def __post_init__(self):
        check_choice(self.method, "method", LAYER_METHODS)
        base = "nested" if self.method == LDLQ_METHOD else self.method
        set_ = lambda name, value: object.__setattr__(self, name, value)
        rtn = self.method in _RTN
        set_("weight_rate", check_rate(self.weight_rate, base))
        if self.act_rate is not None:
            set_("act_rate", check_rate(self.act_rate, base))
        seed = _checks.check_int(self.seed, "seed", minimum=0)
        if seed >= 2**64:
            raise ValueError(f"seed must be < 2**64, got {seed}")
        set_("seed", seed)
        if self.damp is not None:
            if self.method != LDLQ_METHOD:
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
        set_("state_bits", check_state_bits(self.state_bits, base, self.mode))
        # the rules of quantize_model / QuantLinear.from_linear (modes the
        # method has, act_mode only with act_rate, ...)
        kw = self.linear_kwargs()
        check_model_options(kw.pop("method"), kw.pop("mode"),
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
        if self.state_bits is not None:
            kw["state_bits"] = self.state_bits
        return kw


def quantize_(model: torch.nn.Module, config: QuantConfig, filter_fn=None, *,
              calibration=None, progress: bool = False) -> QuantizationReport:
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
        set_module(model, fqn, QuantEmbedding(model.get_submodule(lin),
                                              emb.padding_idx))
    return report
