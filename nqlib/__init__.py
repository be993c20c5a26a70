"""nqlib: optimal quantization for matrix multiplication.

Two matrices ``A`` (n x a) and ``B`` (n x b) are compressed separately to
``R`` bits per entry; a decoder estimates ``A.T @ B``. nqlib implements the
nested-lattice construction of Ordentlich & Polyanskiy (arXiv 2410.13780) and
its practical follow-ups, with honest rate accounting and fast kernels.

Importing nqlib imports neither torch, triton nor numba: kernels are loaded on
first use.
"""

from nqlib import lattices
from nqlib._scratch import release as release_scratch
from nqlib.lattices import A2, D4, E8, Dn, Lattice, Zn, lattice
from nqlib.matmul import inner_products, matmul, matmul_distortion
from nqlib.quantizers.hadamard import RandomHadamard
from nqlib.quantizers.matrix import QuantizedMatrix, load, quantize
from nqlib.quantizers.voronoi import VoronoiCode

__version__ = "0.1.0"

__all__ = [
    "theory", "lattices", "Lattice", "Zn", "Dn", "A2", "D4", "E8", "lattice",
    "VoronoiCode", "RandomHadamard", "quantize", "QuantizedMatrix", "load",
    "inner_products", "matmul", "matmul_distortion", "release_scratch",
    "__version__",
]


def __getattr__(name):
    # Imported on first use, not by ``import nqlib``: ``nqlib.nn`` needs
    # torch, and ``nqlib.theory`` builds its closed forms with sympy.
    if name in ("nn", "theory"):
        import importlib

        return importlib.import_module(f"nqlib.{name}")
    raise AttributeError(f"module 'nqlib' has no attribute {name!r}")
