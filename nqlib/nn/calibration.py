"""Calibration: the second moments of the inputs of linear layers.

The Hessian-aware rounding of ``method="nested-ldlq"``
(:mod:`nqlib.quantizers.ldlq`) minimises the output error of a layer under
its inputs, which enter through their second moment ``H = E[x x^T]``;
:func:`calibration_hessians` measures it by running calibration data
through the float model.

This module imports torch; ``import nqlib`` does not import it.

Book: chapter "Quantizing a sentence-embedding model", label ``ch-minilm``.
"""

from __future__ import annotations

import torch

__all__ = ["calibration_hessians"]


def calibration_hessians(model: torch.nn.Module, calibration,
                         layers=None) -> dict:
    """Second moments ``H = E[x x^T]`` of the inputs of linear layers.

    Forward pre-hooks on the layers accumulate ``sum x x^T`` (float64) over
    every input row (token) while ``calibration`` runs the model without
    gradients; they are removed afterwards.

    Parameters
    ----------
    model : torch.nn.Module
    calibration : callable or iterable
        ``calibration(model)``, or an iterable of batches, each called as
        ``model(batch)``.
    layers : list of str, optional
        Names (as in ``model.named_modules()``) of the ``nn.Linear`` layers to
        measure; all of them by default.

    Returns
    -------
    dict
        ``{name: ndarray (in_features, in_features)}``, the mean of
        ``x x^T`` over the rows the layer saw.

    Raises
    ------
    ValueError
        A name that is not an ``nn.Linear`` of ``model``, or a layer that the
        calibration never ran.
    """
    modules = dict(model.named_modules())
    names = ([n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
             if layers is None else list(layers))
    for name in names:
        if not isinstance(modules.get(name), torch.nn.Linear):
            raise ValueError(f"{name!r} is not an nn.Linear of the model")
    sums = {name: None for name in names}
    rows = dict.fromkeys(names, 0)

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features).to(
                "cpu", torch.float64)
            xtx = x.T @ x
            sums[name] = xtx if sums[name] is None else sums[name] + xtx
            rows[name] += x.shape[0]
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            if callable(calibration):
                calibration(model)
            else:
                for batch in calibration:
                    model(batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if rows[n] == 0]
    if missing:
        raise ValueError(f"the calibration never ran layer(s) {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}")
    return {n: (sums[n] / rows[n]).numpy() for n in names}
