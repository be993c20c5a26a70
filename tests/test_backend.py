import numpy as np
import pytest

from nqlib import _backend


def test_auto_on_numpy_is_numba():
    assert _backend.resolve("auto", tensor_input=False) == "numba"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be"):
        _backend.resolve("cuda")
    with pytest.raises(ValueError, match="backend must be a string"):
        _backend.resolve(3)


def test_triton_on_numpy_input_says_why():
    with pytest.raises(RuntimeError, match="needs a torch.Tensor"):
        _backend.resolve("triton", tensor_input=False)


def test_triton_without_device_or_interpreter_says_why(monkeypatch):
    monkeypatch.setattr(_backend, "triton_usable", lambda: False)
    monkeypatch.setattr(_backend, "_has_module", lambda name: True)
    with pytest.raises(RuntimeError, match="CUDA device"):
        _backend.resolve("triton", tensor_input=True)


def test_auto_picks_triton_for_tensors_when_usable(monkeypatch):
    monkeypatch.setattr(_backend, "triton_usable", lambda: True)
    assert _backend.resolve("auto", tensor_input=True) == "triton"
    monkeypatch.setattr(_backend, "triton_usable", lambda: False)
    assert _backend.resolve("auto", tensor_input=True) == "numba"


def test_is_torch_tensor_without_torch_import():
    assert not _backend.is_torch_tensor(np.zeros(3))
    torch = pytest.importorskip("torch")
    assert _backend.is_torch_tensor(torch.zeros(3))
