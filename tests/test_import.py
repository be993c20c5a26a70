"""`import nqlib` must stay light: no torch, numba, triton (nor sympy, which
only ``nqlib.theory`` needs and loads on first use)."""

import subprocess
import sys


def test_import_pulls_in_no_heavy_modules():
    code = (
        "import sys, nqlib\n"
        "heavy = [m for m in ('torch', 'numba', 'triton', 'sympy')\n"
        "         if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "", f"import nqlib imported {out.stdout.strip()}"


def test_version_and_public_names():
    import nqlib

    assert isinstance(nqlib.__version__, str)
    for name in nqlib.__all__:
        assert hasattr(nqlib, name), name


def test_lazy_submodules_load_on_first_use():
    import nqlib

    assert nqlib.theory.gamma(4.0) > 0
    assert hasattr(nqlib.nn, "QuantLinear")
