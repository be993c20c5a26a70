"""The GPU side of the layering: kernels are leaves, the host-side layout
builder needs no torch, and the device layout is the host arrays uploaded.

* no module under ``nqlib/kernels/`` imports anything of nqlib above the
  kernels, counting imports inside functions (``kernels/gpu`` not even
  ``kernels/cpu``);
* :func:`nqlib.quantizers.fixed_layout.fixed_layout_arrays` runs without
  importing torch or triton;
* :func:`nqlib.kernels.gpu.matmul_triton.upload` copies every array and
  scalar of the host layout, and the rotation as float32;
* :func:`nqlib._backend.default_torch_device` follows torch's CUDA probe.
"""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nqlib

KERNELS = Path(nqlib.__file__).resolve().parent / "kernels"
#: what a kernel module may import from nqlib
ALLOWED = ("nqlib.kernels", "nqlib._backend", "nqlib._checks")


def nqlib_imports(path):
    """``(line, module)`` of every nqlib import in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "nqlib":
                found += [(node.lineno, f"nqlib.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, m) for line, m in found if m.split(".")[0] == "nqlib"]


def test_the_checker_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from nqlib import _backend\n\ndef f():\n"
                   "    from nqlib.quantizers import voronoi\n"
                   "    import nqlib.matmul as mm\n")
    assert nqlib_imports(src) == [(1, "nqlib._backend"),
                                  (4, "nqlib.quantizers"), (5, "nqlib.matmul")]


def test_kernels_are_leaves():
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) >= 10
    bad = []
    for path in files:
        rel = path.relative_to(KERNELS.parent)
        for line, mod in nqlib_imports(path):
            if not any(mod == a or mod.startswith(a + ".") for a in ALLOWED):
                bad.append(f"{rel}:{line} imports {mod}")
            if rel.parts[1] == "gpu" and mod.startswith("nqlib.kernels.cpu"):
                bad.append(f"{rel}:{line} (GPU) imports {mod}")
    assert not bad, "\n".join(bad)


def test_host_layout_needs_no_torch():
    code = (
        "import sys\n"
        "import numpy as np, nqlib\n"
        "from nqlib.quantizers.fixed_layout import fixed_layout_arrays\n"
        "A = np.random.default_rng(0).standard_normal((100, 6)) + 0.2\n"
        "arr = fixed_layout_arrays(nqlib.quantize(A, 4.0, mode='fixed'))\n"
        "assert arr.words.dtype == np.int32 and arr.meta.dtype == np.uint8\n"
        "print(','.join(m for m in ('torch', 'triton') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"imported {out.stdout.strip()}"


@pytest.mark.parametrize("kw", [{}, {"dither": True}, {"rotate": False},
                                {"center": False}])
def test_upload_copies_the_host_layout(kw):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from nqlib.kernels.gpu import matmul_triton as mt
    from nqlib.quantizers import fixed_layout as fl

    A = np.random.default_rng(3).standard_normal((100, 9)) + 0.3
    qm = nqlib.quantize(A, 7.0, mode="fixed", seed=2, **kw)
    arrays = fl.fixed_layout_arrays(qm)
    layout = mt.upload(arrays, "cpu")
    for name in ("shape", "n_pad", "h", "coded_blocks", "stride_b", "q",
                 "code_bits"):
        assert getattr(layout, name) == getattr(arrays, name), name
    for name in ("words", "meta", "tab", "betas", "dither", "row_scale",
                 "row_offset"):
        a, t = getattr(arrays, name), getattr(layout, name)
        assert (a is None) == (t is None), name
        if a is not None:
            assert t.device.type == "cpu" and t.dtype == torch.from_numpy(a).dtype
            np.testing.assert_array_equal(t.numpy(), a, err_msg=name)
    assert (layout.dither is None) == (not qm.dither)
    assert (layout.row_scale is None) == qm.dither
    P = qm.rotation()
    assert (layout.rotation is None) == (P is None)
    if P is not None:
        signs, O, p = layout.rotation
        assert signs.dtype == O.dtype == torch.float32 and p == P.power_of_two
        np.testing.assert_array_equal(signs.numpy(), P.signs.astype(np.float32))
        np.testing.assert_array_equal(O.numpy(), P.orthogonal.astype(np.float32))
    # the convenience is the same two steps
    again = fl.gpu_layout(qm, "cpu")
    assert torch.equal(again.words, layout.words)
    assert torch.equal(again.meta, layout.meta)


def test_host_layout_rejects_other_matrices():
    from nqlib.quantizers.fixed_layout import fixed_layout_arrays

    A = np.random.default_rng(1).standard_normal((64, 8))
    with pytest.raises(ValueError, match="nested-lattice matrix in fixed"):
        fixed_layout_arrays(nqlib.quantize(A, 4, mode="variable"))
    with pytest.raises(ValueError, match="QuantizedMatrix"):
        fixed_layout_arrays(A)


def test_default_torch_device_follows_cuda(monkeypatch):
    torch = pytest.importorskip("torch")
    from nqlib import _backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _backend.default_torch_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _backend.default_torch_device() == "cpu"
