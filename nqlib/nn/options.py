"""The options of a quantized linear layer, checked in one place.

:meth:`~nqlib.nn.QuantLinear.from_linear`, :func:`~nqlib.nn.quantize_model`
and :class:`~nqlib.nn.QuantConfig` take the same options (method, modes,
rates, keyword arguments of the weight quantizer); the functions here check
them, so that a bad option is rejected before any layer is touched.
"""

from __future__ import annotations

import inspect

from nqlib.nn.activations import check_act_mode
from nqlib.quantizers.matrix import METHODS, quantize
from nqlib.quantizers.rate_control import (
    OPTION_VALUES,
    check_rate,
    check_state_bits,
    resolve_options,
)

__all__ = ["LDLQ_METHOD", "LAYER_METHODS", "weight_quantizer", "check_keywords",
           "check_model_options"]

#: the fixed-mode nested quantizer with Hessian-aware rounding (LDLQ)
LDLQ_METHOD = "nested-ldlq"
#: every weight method a layer takes: those of :func:`nqlib.quantize` and LDLQ
LAYER_METHODS = (*METHODS, LDLQ_METHOD)


def weight_quantizer(method: str, mode: str | None):
    """The function that quantizes a weight by ``method`` in ``mode``.

    Parameters
    ----------
    method : str
        A method of :func:`nqlib.quantize`, or ``"nested-ldlq"``.
    mode : str or None

    Returns
    -------
    callable
        :func:`nqlib.quantize`; for ``"nested-ldlq"``
        :func:`nqlib.quantizers.ldlq.quantize_ldlq`, or with
        ``mode="trellis"`` :func:`nqlib.quantizers.ldlq.quantize_ldlq_trellis`
        (the Viterbi search as the block quantizer).

    Raises
    ------
    ValueError
        ``"nested-ldlq"`` with a mode other than None, ``"fixed"`` and
        ``"trellis"``.
    """
    if method != LDLQ_METHOD:
        return quantize
    if mode not in (None, "fixed", "trellis"):
        raise ValueError("method='nested-ldlq' codes the fixed or the trellis "
                         f"mode, got mode={mode!r}")
    from nqlib.quantizers import ldlq

    return ldlq.quantize_ldlq_trellis if mode == "trellis" else ldlq.quantize_ldlq


def check_keywords(quantizer, kwargs, method: str) -> None:
    """Check that every key of ``kwargs`` is a keyword-only option of
    ``quantizer`` (``nqlib.quantize`` or a ``quantize_ldlq``).

    Raises
    ------
    ValueError
        A key ``quantizer`` has no keyword-only option for (its message
        names ``method`` and the options there are).
    """
    params = inspect.signature(quantizer).parameters
    options = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY]
    for key in kwargs:
        if key not in options:
            raise ValueError(f"{key}= does not apply to method={method!r}: "
                             f"{quantizer.__name__} has no such option (it "
                             f"has {', '.join(options)})")


def check_model_options(method: str, mode, act_rate, act_mode, kwargs) -> None:
    """Check the options of :func:`~nqlib.nn.quantize_model` as
    :meth:`~nqlib.nn.QuantLinear.from_linear` checks them.

    Parameters
    ----------
    method : str
        One of :data:`LAYER_METHODS`.
    mode, act_mode : str or None
        Modes of the weight and activation quantizers.
    act_rate : float or None
        Activation rate (None: float activations).
    kwargs : dict
        Keyword arguments for the weight quantizer.

    Raises
    ------
    ValueError
        An unknown method, a mode the method does not have, ``act_mode``
        without ``act_rate``, a keyword the weight quantizer does not take,
        an option value or an activation rate the method does not
        implement.
    """
    base = "nested" if method == LDLQ_METHOD else method
    if base not in METHODS:
        raise ValueError(f"method must be one of {(LDLQ_METHOD, *METHODS)}, "
                         f"got {method!r}")
    quantizer = weight_quantizer(method, mode)
    if act_rate is None and act_mode is not None:
        raise ValueError(f"act_mode={act_mode!r} does not apply without act_rate "
                         "(the activations stay in float)")
    check_keywords(quantizer, kwargs, method)
    options = {k: v for k, v in kwargs.items() if k in OPTION_VALUES[base]}
    resolve_options(base, mode=mode, **options)
    if "state_bits" in kwargs:
        check_state_bits(kwargs["state_bits"], base, mode)
    if act_rate is not None:
        check_rate(act_rate, base)
        check_act_mode(act_mode, base)
