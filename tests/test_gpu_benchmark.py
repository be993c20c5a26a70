"""The GPU benchmark's operand rotation (runs without a GPU: the layout is
built on CPU tensors, as the Triton interpreter uses them)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

SPEC = importlib.util.spec_from_file_location(
    "gpu_matmul_bench",
    Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_matmul.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_copies_fill_four_times_l2(monkeypatch):
    monkeypatch.setattr(bench, "l2_bytes", lambda: 50 * 2**20)
    # a 4096 x 4096 4-bit layout (~10 MiB) needs 20 copies; fp16 (32 MiB) 7
    assert bench.copies_past_l2(10 * 2**20) == 20
    assert bench.copies_past_l2(2 * 4096 * 4096) == 7
    n = bench.copies_past_l2(2 * 4096 * 4096)
    assert n * 2 * 4096 * 4096 >= 4 * 50 * 2**20 > (n - 1) * 2 * 4096 * 4096
    assert bench.copies_past_l2(2**40) == 2       # never a single copy
    assert bench.copies_past_l2(1) == 64          # capped


def test_clone_layout_has_its_own_memory_and_same_codes():
    import nqlib
    from nqlib.kernels.gpu import matmul_triton as mt
    from nqlib.quantizers.fixed_layout import gpu_layout

    A = np.random.default_rng(0).standard_normal((256, 16))
    # a GPU when there is one, else CPU tensors under the interpreter
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layout = gpu_layout(nqlib.quantize(A, 4.0, mode="fixed", seed=3), device)
    copy = bench.clone_layout(layout)
    for name in ("words", "meta", "tab", "betas"):
        a, b = getattr(layout, name), getattr(copy, name)
        assert torch.equal(a, b)
        assert a.data_ptr() != b.data_ptr(), name
    np.testing.assert_array_equal(mt.decode_rows(layout, torch.float64).cpu().numpy(),
                                  mt.decode_rows(copy, torch.float64).cpu().numpy())
