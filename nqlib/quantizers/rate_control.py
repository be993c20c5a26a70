"""What :func:`nqlib.quantize` accepts, and how many bits the code may use.

* :func:`check_rate`, :func:`check_choice` and :func:`resolve_options` turn
  the user's arguments into checked values (a ``ValueError`` names whatever
  does not apply; no option is silently dropped);
* :data:`OPTION_VALUES` lists the options each method implements;
* :func:`code_budget_bits` is the rate control's starting point: the bits
  left for the codes once every byte of side information is counted.

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from nqlib import _checks
from nqlib.quantizers import trellis
from nqlib.quantizers.format import (
    ESTIMATORS,
    MAX_RATE,
    MIN_RATE,
    MODES,
    side_information_bits,
    stream_side_information_bits,
)

__all__ = ["check_rate", "check_choice", "check_state_bits", "resolve_options",
           "OPTION_VALUES", "RATE_TOLERANCE", "code_budget_bits"]

#: allowed excess of the achieved rate over the target in fixed mode (bits
#: per entry): its words have a whole number of bits per 8-block
RATE_TOLERANCE = 0.02


def check_choice(value, name, choices):
    """``value`` if it is one of ``choices``, else a ValueError naming
    ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_rate(rate, method) -> float:
    """The target rate as a float, checked for ``method``: a real in
    ``[MIN_RATE, MAX_RATE]`` bits per entry, or the integer bit width 2..8
    of the rtn baselines; ValueError otherwise."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise ValueError(f"rate must be a real number, got {rate!r}")
    rate = float(rate)
    if not math.isfinite(rate):
        raise ValueError(f"rate must be finite, got {rate}")
    if method in ("rtn", "rtn-hadamard"):
        if rate != int(rate) or not 2 <= rate <= 8:
            raise ValueError(f"for method={method!r}, rate is the integer bit "
                             f"width, 2..8; got {rate}")
        return rate
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"rate must be in [{MIN_RATE}, {MAX_RATE}] bits per entry "
                         f"for method={method!r}, got {rate}")
    return rate


def check_state_bits(state_bits, method, mode):
    """The trellis state bits for ``method`` / ``mode`` (already resolved):
    None (the default, :data:`nqlib.quantizers.trellis.DEFAULT_L` at the
    call) or an integer in ``[MIN_L, MAX_L]`` with ``method="nested"`` and
    ``mode="trellis"``; ValueError otherwise."""
    if state_bits is None:
        return None
    if (method, mode) != ("nested", "trellis"):
        raise ValueError(f"state_bits={state_bits!r} does not apply to method="
                         f"{method!r}, mode={mode!r}: only the trellis mode "
                         "has states (mode='trellis')")
    return _checks.check_int(state_bits, "state_bits", minimum=trellis.MIN_L,
                             maximum=trellis.MAX_L)


_BOTH = (True, False)
_RTN_RULES = dict(mode=("fixed",), estimator=("unbiased",), dither=(False,),
                  center=(False,), normalize=(False,), sketch=(False,),
                  group_size=int)
#: The options of :func:`quantize` each method implements: the values it
#: honours (the first one is its default, what ``None`` means), ``int`` for
#: any integer (default 128), or None where the option has no meaning for
#: the method. Anything else raises: no option is silently dropped.
OPTION_VALUES = {
    "nested": dict(mode=MODES, estimator=ESTIMATORS, dither=(False, True),
                   center=_BOTH, normalize=_BOTH, rotate=_BOTH, sketch=_BOTH,
                   group_size=None),
    "ecsq": dict(mode=("variable",), estimator=ESTIMATORS, dither=(False,),
                 center=_BOTH, normalize=_BOTH, rotate=_BOTH, sketch=(False,),
                 group_size=None),
    "rtn": dict(_RTN_RULES, rotate=(False,)),
    "rtn-hadamard": dict(_RTN_RULES, rotate=(True,)),
}
#: why an option value does not apply: (method or "*", option) -> reason
_NOT_APPLICABLE = {
    ("ecsq", "mode"): "its symbols are entropy coded (variable length)",
    ("rtn", "mode"): "its codes have a fixed length",
    ("*", "dither"): "only method='nested' is dithered",
    ("*", "sketch"): "only method='nested' sketches",
    ("rtn", "estimator"): "the rtn baselines decode without shrinkage",
    ("rtn", "center"): "the rtn baselines scale each group of group_size "
                       "entries instead of centring and normalising columns",
    ("rtn", "rotate"): "method='rtn' never rotates (method='rtn-hadamard' does)",
    ("rtn-hadamard", "rotate"): "method='rtn-hadamard' always rotates "
                                "(method='rtn' does not)",
    ("*", "group_size"): "group_size is the group length of the rtn baselines",
}
#: option values a mode does not implement: mode -> {option: (values it
#: implements, why)}
_MODE_OPTIONS = {
    "trellis": {"dither": ((False,), "the trellis code has no subtractive "
                           "dither (it implements dither=False)")},
}


def resolve_options(method: str, **given) -> dict:
    """The options of :func:`quantize` for ``method``: each value checked
    (type, then whether ``method`` implements it) and ``None`` replaced by
    the method's default. ``ValueError`` names an option that does not
    apply."""
    out = {}
    for name, value in given.items():
        allowed = OPTION_VALUES[method][name]
        if name in ("mode", "estimator") and value is not None:
            check_choice(value, name, MODES if name == "mode" else ESTIMATORS)
        elif name == "group_size" and value is not None:
            value = _checks.check_int(value, "group_size", minimum=1)
        elif value is not None and not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        if value is None:
            out[name] = (None if allowed is None else 128 if allowed is int
                         else allowed[0])
            continue
        if allowed is int or (allowed is not None and value in allowed):
            out[name] = bool(value) if isinstance(value, np.bool_) else value
            continue
        family = "rtn" if method.startswith("rtn") and name != "rotate" else method
        why = (_NOT_APPLICABLE.get((family, name))
               or _NOT_APPLICABLE.get((family, "center" if name == "normalize"
                                       else name))
               or _NOT_APPLICABLE.get(("*", name)))
        honoured = ("" if allowed is None else " (it implements "
                    + " or ".join(f"{name}={v!r}" for v in allowed) + ")")
        raise ValueError(f"{name}={value!r} does not apply to method="
                         f"{method!r}: {why}{honoured}")
    for name, (allowed, why) in _MODE_OPTIONS.get(out.get("mode"), {}).items():
        if name in out and out[name] not in allowed:
            raise ValueError(f"{name}={out[name]!r} does not apply to mode="
                             f"{out['mode']!r}: {why}")
    return out


def code_budget_bits(qm, payload_fixed_bytes, slack=0.0, stream=False) -> int:
    """Bits left for the codes of ``qm`` at its target rate (plus ``slack``
    bits per entry) once the side information and the payload's
    ``payload_fixed_bytes`` fixed fields are counted; ValueError when
    nothing is left. With ``stream`` the rate is a stream's (see
    :data:`~nqlib.quantizers.format.STREAM_CALL_BYTES`): only what one call
    sends is counted, ``payload_fixed_bytes`` then the payload's per-call
    fields."""
    overhead = (stream_side_information_bits if stream else side_information_bits)(
        qm.shape, qm.flags, payload_fixed_bytes)
    budget = math.floor((qm.rate + slack) * qm.entries)
    code = budget - overhead
    if code <= 0:
        raise ValueError(f"rate {qm.rate} cannot be met: the side information "
                         f"alone needs {overhead / qm.entries:.3f} bits per entry "
                         f"for shape {qm.shape}")
    return code
