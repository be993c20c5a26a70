"""torch integration: quantized layers, model quantization and checkpoints.

* :mod:`nqlib.nn.linear` -- :class:`QuantLinear` (a linear layer whose
  weight is stored as nqlib codes) and :class:`QuantEmbedding` (an
  embedding tied to a quantized layer);
* :mod:`nqlib.nn.activations` -- the on-the-fly activation quantizer of a
  layer and its per-model :class:`ActivationCache`;
* :mod:`nqlib.nn.options` -- the layer options, checked in one place;
* :mod:`nqlib.nn.calibration` -- :func:`calibration_hessians`, the input
  second moments that Hessian-aware rounding needs;
* :mod:`nqlib.nn.model` -- :func:`quantize_model` and its
  :class:`QuantizationReport`;
* :mod:`nqlib.nn.api` -- torchao-style :class:`QuantConfig` and
  :func:`quantize_`;
* :mod:`nqlib.nn.checkpoint` -- :func:`save_quantized` and
  :func:`load_quantized`.

The modules import each other in that order (none imports a later one).
``import nqlib.nn`` imports torch; ``import nqlib`` does not import this
package (``nqlib.nn`` is loaded on first access).
"""

from nqlib.nn.activations import ActivationCache
from nqlib.nn.api import QuantConfig, quantize_
from nqlib.nn.calibration import calibration_hessians
from nqlib.nn.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_quantized,
    save_quantized,
)
from nqlib.nn.linear import QuantEmbedding, QuantLinear
from nqlib.nn.model import QuantizationReport, quantize_model

__all__ = ["QuantLinear", "QuantEmbedding", "ActivationCache", "quantize_model",
           "QuantizationReport", "calibration_hessians", "QuantConfig",
           "quantize_", "save_quantized", "load_quantized", "WEIGHTS_NAME",
           "CONFIG_NAME"]
