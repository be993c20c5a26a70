"""Backend resolution: the only module that probes devices and environment.

nqlib runs every operation through one of three backends:

``"numpy"``
    The slow, obviously-correct oracles in :mod:`nqlib.reference`. Always
    available; what the book uses for didactic comparisons and what the tests
    trust.
``"numba"``
    Compiled CPU kernels in :mod:`nqlib.kernels.cpu`. The default on CPU.
``"triton"``
    GPU kernels in :mod:`nqlib.kernels.gpu`, for torch tensors on a CUDA
    device, or on CPU tensors when the Triton interpreter is switched on with
    ``TRITON_INTERPRET=1`` (slow; for tests).

``"auto"`` picks Triton for torch tensors when it can run, numba otherwise.
Nothing here imports torch, triton or numba at module import time.
"""

from __future__ import annotations

import functools
import importlib.util
import os

BACKENDS = ("numpy", "numba", "triton")


def is_torch_tensor(x) -> bool:
    """True for a ``torch.Tensor``, decided without importing torch."""
    return type(x).__module__.split(".")[0] == "torch"


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def numba_usable() -> bool:
    """True when numba can be imported."""
    return _has_module("numba")


def triton_interpreter_on() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set (Triton runs on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_usable() -> bool:
    """True when Triton kernels can run: triton and torch importable, and a
    CUDA device or the Triton interpreter present."""
    if not (_has_module("triton") and _has_module("torch")):
        return False
    if triton_interpreter_on():
        return True
    import torch

    return bool(torch.cuda.is_available())


def _why_no_triton(tensor_input: bool) -> str:
    if not tensor_input:
        return "backend='triton' needs a torch.Tensor input, got a numpy array"
    if not _has_module("torch"):
        return "backend='triton' needs torch, which is not installed"
    if not _has_module("triton"):
        return ("backend='triton' needs the triton package "
                "(pip install 'nqlib[gpu]'), which is not installed")
    return ("backend='triton' needs a CUDA device (none is visible to torch) "
            "or the Triton CPU interpreter (set TRITON_INTERPRET=1 before "
            "importing triton)")


def tensor_device(x) -> str | None:
    """``"cuda"``/``"cpu"``/... for a torch tensor, None for anything else."""
    return x.device.type if is_torch_tensor(x) else None


def resolve(backend: str, *, tensor_input: bool = False,
            device: str | None = None) -> str:
    """Turn ``"auto"`` into a concrete backend; reject impossible requests.

    Parameters
    ----------
    backend : {"auto", "numpy", "numba", "triton"}
        The requested backend.
    tensor_input : bool
        Whether the data is a torch tensor (Triton only runs on tensors).
    device : str, optional
        The tensor's device type. ``"auto"`` sends a CPU tensor to Triton only
        under the interpreter; on a CUDA machine CPU tensors go to numba.

    Returns
    -------
    str
        One of :data:`BACKENDS`.

    Raises
    ------
    ValueError
        For an unknown backend name.
    RuntimeError
        When the requested backend cannot run here; the message says what is
        missing.
    """
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        on_gpu = device in (None, "cuda") or triton_interpreter_on()
        if tensor_input and on_gpu and triton_usable():
            return "triton"
        return "numba" if numba_usable() else "numpy"
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}"
        )
    if backend == "numba" and not numba_usable():
        raise RuntimeError("backend='numba' needs numba, which is not installed")
    if backend == "triton" and not (tensor_input and triton_usable()):
        raise RuntimeError(_why_no_triton(tensor_input))
    return backend


def default_torch_device() -> str:
    """The torch device the Triton path uses when none is given.

    Returns
    -------
    str
        ``"cuda"`` when torch sees a CUDA device, else ``"cpu"`` (CPU
        tensors, which Triton runs on under ``TRITON_INTERPRET=1``).

    Notes
    -----
    Imports torch, so call it only on a path that needs torch anyway.
    """
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
