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
    gradients; they are removed afterwards. Layers called one after the
    other on the same input tensor (query, key and value projections) share
    one product.

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
    # layers fed the same tensor (an attention block's query, key and value;
    # a gated feed-forward's gate and up projections) share one x^T x: the
    # last input and its product are kept until a different tensor arrives
    last = {"input": None, "version": None, "xtx": None, "rows": 0}

    def hook_for(name):
        def hook(module, args):
            inp = args[0]
            version = _version(inp)
            if (version is None or last["input"] is not inp
                    or last["version"] != version):
                x = inp.detach().reshape(-1, module.in_features).to(
                    "cpu", torch.float64)
                last.update(input=inp, version=version, xtx=x.T @ x,
                            rows=x.shape[0])
            xtx = last["xtx"]
            sums[name] = xtx if sums[name] is None else sums[name] + xtx
            rows[name] += last["rows"]
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
        last.clear()
    missing = [n for n in names if rows[n] == 0]
    if missing:
        raise ValueError(f"the calibration never ran layer(s) {missing[:3]}"
                         f"{' ...' if len(missing) > 3 else ''}")
    return {n: (sums[n] / rows[n]).numpy() for n in names}


def _version(tensor):
    """The tensor's in-place version counter, or None where torch keeps none
    (inference tensors): such an input is never shared."""
    try:
        return tensor._version
    except RuntimeError:
        return None
