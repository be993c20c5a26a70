"""Model-level quantization: :func:`quantize_model` and its report.

:func:`quantize_model` replaces the ``nn.Linear`` layers of a model by
:class:`~nqlib.nn.QuantLinear`, in place, and returns a
:class:`QuantizationReport`; :func:`module_path`, :func:`set_module` and
:func:`share_activation_cache` are the helpers that change a model's layers
(used by :mod:`nqlib.nn.api`, :mod:`nqlib.nn.checkpoint` and the
integrations :mod:`nqlib.hf` and :mod:`nqlib.lm`).

This module imports torch; ``import nqlib`` does not import it.

Book: chapter "Quantizing a sentence-embedding model", label ``ch-minilm``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nqlib.nn.activations import ActivationCache
from nqlib.nn.calibration import calibration_hessians
from nqlib.nn.linear import QuantLinear
from nqlib.nn.options import check_model_options

__all__ = ["QuantizationReport", "quantize_model", "module_path", "set_module",
           "share_activation_cache"]


def module_path(model: torch.nn.Module, fqn: str):
    """The parent module of the submodule (or tensor) named ``fqn`` and its
    attribute name there.

    Parameters
    ----------
    model : torch.nn.Module
    fqn : str
        A dotted name, as in ``model.named_modules()`` or ``state_dict()``.

    Returns
    -------
    parent : torch.nn.Module
    name : str
    """
    parent = model
    parts = fqn.split(".")
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1]


def set_module(model: torch.nn.Module, fqn: str, module: torch.nn.Module) -> None:
    """Replace the submodule named ``fqn`` of ``model`` by ``module``, in
    place."""
    parent, name = module_path(model, fqn)
    setattr(parent, name, module)


def share_activation_cache(model: torch.nn.Module) -> ActivationCache:
    """Give every :class:`~nqlib.nn.QuantLinear` of ``model`` one activation
    cache (a new one) and return it: layers fed the same input quantize it
    once."""
    cache = ActivationCache()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.act_cache = cache
    return cache


@dataclass
class QuantizationReport:
    """What :func:`quantize_model` did, layer by layer."""

    layers: list = field(default_factory=list)

    def add(self, name: str, layer: QuantLinear) -> None:
        """Append the row of the quantized layer ``layer`` named ``name``
        (its float weight counted as float32 before)."""
        out_f, in_f = layer.out_features, layer.in_features
        self.layers.append(dict(
            name=name, shape=(out_f, in_f), entries=out_f * in_f,
            bits_per_entry=layer.weight_bits_per_entry,
            bytes_before=4 * out_f * in_f, bytes_after=layer.weight_nbytes))

    @property
    def bytes_before(self) -> int:
        """Bytes of the float weights the report covers."""
        return sum(r["bytes_before"] for r in self.layers)

    @property
    def bytes_after(self) -> int:
        """Bytes of their quantized replacements (every byte counted)."""
        return sum(r["bytes_after"] for r in self.layers)

    @property
    def bits_per_entry(self) -> float:
        """Bits per weight over all the quantized layers."""
        entries = sum(r["entries"] for r in self.layers)
        return 8.0 * self.bytes_after / entries if entries else float("nan")

    def __str__(self) -> str:
        lines = [f"{'layer':40s} {'shape':>12s} {'bit/entry':>9s} {'bytes':>10s}"]
        for r in self.layers:
            shape = "x".join(str(s) for s in r["shape"])
            lines.append(f"{r['name'][:40]:40s} {shape:>12s} "
                         f"{r['bits_per_entry']:9.3f} {r['bytes_after']:10d}")
        lines.append(f"{len(self.layers)} layers: {self.bytes_before} -> "
                     f"{self.bytes_after} bytes ({self.bits_per_entry:.3f} "
                     "bit/entry of weights)")
        return "\n".join(lines)


def quantize_model(model: torch.nn.Module, weight_rate: float = 4.0,
                   act_rate=None, method: str = "nested", seed: int = 0,
                   skip=(), *, mode: str | None = None,
                   act_mode: str | None = None, calibration=None,
                   progress: bool = True, **quantize_kwargs) -> QuantizationReport:
    """Replace every ``nn.Linear`` of ``model`` by a :class:`QuantLinear`, in
    place.

    Parameters
    ----------
    model : torch.nn.Module
    weight_rate : float
        Weight rate (bits per entry; the integer width for rtn methods).
    act_rate : float or None
        Quantize each replaced layer's input at this rate.
    method : {"nested", "nested-ldlq", "rtn", "rtn-hadamard", "ecsq"}
        ``"nested-ldlq"`` needs ``calibration``.
    seed : int
    skip : iterable of str or callable
        Layer names (as in ``model.named_modules()``) to leave in float, or a
        predicate ``skip(name, module) -> bool``.
    mode, act_mode : {"fixed", "variable"}, optional
        Modes of the weight and activation quantizers, as in
        :meth:`QuantLinear.from_linear` (None: ``"fixed"`` weights and
        ``"variable"`` activations for the nested method, the method's own
        mode for the baselines).
    calibration : callable, iterable or dict, optional
        For ``method="nested-ldlq"``: calibration data, run through the
        (still float) model to measure each layer's input second moment (see
        :func:`~nqlib.nn.calibration_hessians`): a callable ``calibration(model)``, or
        an iterable of batches, each called as ``model(batch)``; or the
        dict that :func:`~nqlib.nn.calibration_hessians` returned (reused as is).
    progress : bool
        Show a progress bar over layers.
    **quantize_kwargs
        Passed on to :meth:`QuantLinear.from_linear`.

    Returns
    -------
    QuantizationReport
        Per layer: name, shape, bits/entry, bytes before (float32) and
        after.

    Raises
    ------
    ValueError
        ``model`` is not a module; ``method="nested-ldlq"`` without
        ``calibration``, or ``calibration`` with another method; an option
        that does not apply to ``method`` (as in
        :meth:`QuantLinear.from_linear`), checked before any calibration or
        quantization runs.

    Notes
    -----
    The replaced layers share one :class:`ActivationCache` (layers fed the
    same input quantize it once); it belongs to the model, not the process.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, torch.nn.Module):
        raise ValueError("model must be a torch.nn.Module")
    if (method == "nested-ldlq") != (calibration is not None):
        raise ValueError("calibration= is needed by, and only by, "
                         f"method='nested-ldlq' (got method={method!r}, "
                         f"calibration={'None' if calibration is None else 'given'})")
    check_model_options(method, mode, act_rate, act_mode, quantize_kwargs)
    skip_fn = skip if callable(skip) else (lambda name, mod, s=set(skip): name in s)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and not skip_fn(name, mod)]
    hessians = {}
    if isinstance(calibration, dict):
        missing = [name for name, _ in targets if name not in calibration]
        if missing:
            raise ValueError(f"calibration has no second moment for layer(s) "
                             f"{missing[:3]}{' ...' if len(missing) > 3 else ''}")
        hessians = calibration
    elif calibration is not None:
        hessians = calibration_hessians(model, calibration,
                                        layers=[name for name, _ in targets])
    report = QuantizationReport()
    for name, mod in tqdm(targets, desc="quantizing layers", disable=not progress):
        ql = QuantLinear.from_linear(mod, weight_rate, act_rate, seed,
                                     method=method, mode=mode, act_mode=act_mode,
                                     hessian=hessians.get(name), **quantize_kwargs)
        set_module(model, name, ql)
        report.add(name, ql)
    # one activation cache for the model's layers (q, k and v share inputs)
    share_activation_cache(model)
    return report
