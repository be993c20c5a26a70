"""Lattices with exact closest-point decoders: Z^n, D_n, A2, D4 and E8.

A lattice ``L = G Z^d`` is given by a generator matrix ``G`` whose **columns**
are the basis vectors (``x = G @ u`` for integer ``u``). Its Voronoi cell
``V(L)`` is the set of points nearer to 0 than to any other lattice point,
its volume is ``|det G|`` and its normalized second moment is

    G(L) = (1/d) E||U||^2 / vol(L)^(2/d),   U uniform on V(L),

the dimensionless figure of merit of a lattice quantizer (lower is better;
1/12 for Z^d, 1/(2 pi e) in the limit of the best lattices).

Closest-point decoders follow Conway & Sloane (1982): rounding for Z^n, the
"re-round the worst coordinate" rule for D_n, and the union of two cosets for
E8 = D8 u (D8 + 1/2) and A2 = (Z x sqrt3 Z) u (that + (1/2, sqrt3/2)).

Book: chapter "Lattices and their Voronoi cells", label ``ch-lattices``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from nqlib import _backend, _checks

__all__ = ["Lattice", "Zn", "Dn", "A2", "D4", "E8", "lattice"]

# Kernel identifiers, equal to the KIND_* constants of nqlib.kernels.cpu.lattice
# (kept here so that importing nqlib does not import numba).
_KIND = {"Zn": 0, "Dn": 1, "E8": 2, "A2": 3}


@dataclass(frozen=True, eq=False)
class Lattice:
    """A lattice with an exact nearest-point decoder.

    Build one with :func:`Zn`, :func:`Dn`, :func:`A2`, :func:`D4`, :func:`E8`
    or :func:`lattice`; do not call the constructor directly.

    Attributes
    ----------
    name : str
        ``"Z8"``, ``"D4"``, ``"E8"``, ...
    family : str
        One of ``"Zn"``, ``"Dn"``, ``"E8"``, ``"A2"``: which decoder runs.
    dim : int
        Dimension d.
    generator : ndarray, shape (d, d)
        Basis vectors as **columns**: lattice points are ``generator @ u``,
        ``u`` integer. Read-only: lattices are cached and shared by the whole
        process (copy it to modify it).
    normalized_second_moment : float
        The known value of G(L) (Conway & Sloane, SPLAG table 2.3): Z 1/12,
        A2 5/(36 sqrt 3) = 0.0801875, D4 0.0766032, E8 929/12960; D_n from
        the closed form of Conway & Sloane (1982).
    """

    name: str
    family: str
    dim: int
    generator: np.ndarray = field(repr=False)
    normalized_second_moment: float = field(repr=False)

    def __post_init__(self):
        # Lattices are cached (E8() is E8()) and shared by every decoder in
        # the process: their arrays are private read-only copies, so that no
        # caller can change what every later decode uses.
        G = np.array(self.generator, dtype=np.float64)
        G.setflags(write=False)
        object.__setattr__(self, "generator", G)

    @property
    def volume(self) -> float:
        """Volume of the Voronoi cell, ``|det G|``."""
        return float(abs(np.linalg.det(self.generator)))

    @functools.cached_property
    def generator_inverse(self) -> np.ndarray:
        """``G^-1``: lattice coordinates of a point are ``G^-1 @ x``
        (read-only, like :attr:`generator`)."""
        inv = np.linalg.inv(self.generator)
        inv.setflags(write=False)
        return inv

    @property
    def kind(self) -> int:
        """The family's integer tag, as the kernels take it."""
        return _KIND[self.family]

    def __repr__(self) -> str:
        return (f"Lattice({self.name}, dim={self.dim}, volume={self.volume:.6g}, "
                f"G={self.normalized_second_moment:.7f})")

    def closest_point(self, x, *, backend: str = "auto"):
        """Nearest lattice point to each vector of ``x``.

        Parameters
        ----------
        x : ndarray or torch.Tensor, shape (..., dim)
            Points to quantize (vectors along the last axis), finite.
        backend : {"auto", "numba", "numpy", "triton"}
            ``"auto"`` uses Triton for torch tensors when a GPU (or the Triton
            interpreter) is present, numba otherwise; ``"numpy"`` runs the
            vectorised reference of :mod:`nqlib.reference.lattices`.

        Returns
        -------
        ndarray or torch.Tensor, shape (..., dim)
            The lattice points, with the type, dtype (and device) of ``x``:
            numpy in, numpy out; torch in, torch out. Integer arrays give
            float64. Half-precision inputs (numpy float16, torch float16 and
            bfloat16) are decoded in float64 and the points rounded to the
            input's dtype, which holds them exactly while their coordinates
            are at most 2^10 (float16) or 2^7 (bfloat16) in magnitude.

        Notes
        -----
        Arithmetic is float64 in every backend. Ties are broken by one rule
        everywhere: rounding is ``floor(v + 0.5)`` (halves go up); in D_n the
        re-rounded coordinate is the one with the largest rounding error,
        the lowest index among equals, moved towards ``v``; between the two
        cosets of E8 and A2 the second (shifted) one wins only when strictly
        nearer. Hence numpy, numba and Triton return the *same* point, not
        merely an equally near one.

        Examples
        --------
        >>> import nqlib
        >>> nqlib.lattices.D4().closest_point([0.6, 0.6, 0.1, 0.0])
        array([1., 1., 0., 0.])
        """
        tensor_input = _backend.is_torch_tensor(x)
        backend = _backend.resolve(backend, tensor_input=tensor_input,
                                   device=_backend.tensor_device(x))
        if backend == "triton":
            from nqlib.kernels.gpu import lattice_triton

            _checks.check_float_tensor(x, "x", self.dim)
            out = lattice_triton.closest_point(self, x)
            return out
        arr, restore = _to_numpy(x, "x", self.dim)
        rows = np.ascontiguousarray(arr.reshape(-1, self.dim), dtype=np.float64)
        if backend == "numba":
            from nqlib.kernels.cpu import lattice as kern

            out = np.empty_like(rows)
            if self.family == "E8":
                kern.closest_point_e8_rows(rows, out)
            else:
                kern.closest_point_rows(self.kind, rows, out)
        else:
            from nqlib.reference.lattices import CLOSEST_POINT

            out = CLOSEST_POINT[self.family](rows)
        return restore(out.reshape(arr.shape))


def _to_numpy(x, name, dim):
    """``x`` as a validated float ndarray, and a function restoring its type."""
    if _backend.is_torch_tensor(x):
        import torch

        _checks.check_float_tensor(x, name, dim)
        # bfloat16 arrives as float32 (numpy has no bfloat16); the arithmetic
        # is float64 anyway and the result is cast back to x's dtype
        arr = _checks.to_numpy(x)

        def restore(out):
            return torch.from_numpy(np.ascontiguousarray(out)).to(
                device=x.device, dtype=x.dtype)

        return arr, restore
    arr = _checks.as_float_array(x, name, last_dim=dim)
    given = np.asarray(x).dtype
    # floats keep their dtype (float16 included: the points are computed in
    # float64 and rounded once); integers and booleans give float64
    dtype = given if np.issubdtype(given, np.floating) else arr.dtype

    def restore(out):
        return out.astype(dtype, copy=False)

    return arr, restore


def _e8_generator() -> np.ndarray:
    # Columns: 2e1, e2-e1, ..., e7-e6, (1/2)(1,...,1): a basis of
    # E8 = D8 u (D8 + 1/2 1) with determinant 1 (Conway & Sloane, SPLAG ch. 4).
    G = np.zeros((8, 8))
    G[0, 0] = 2.0
    for k in range(1, 7):
        G[k, k] = 1.0
        G[k - 1, k] = -1.0
    G[:, 7] = 0.5
    return G


def _dn_generator(n: int) -> np.ndarray:
    # Columns: 2e1 and e_k - e_{k-1}: integer vectors with even sum, det 2.
    G = np.zeros((n, n))
    G[0, 0] = 2.0
    for k in range(1, n):
        G[k, k] = 1.0
        G[k - 1, k] = -1.0
    return G


def _dn_second_moment(n: int) -> float:
    # Conway & Sloane (1982), "Voronoi regions of lattices, second moments of
    # polytopes, and quantization": the Voronoi cell of D_n has normalized
    # second moment 2^(-2/n) (1/12 + 1/(2 n (n + 1))). It gives 1/12 for D2
    # (a rotated Z^2), 0.0787451 for D3 (fcc) and 0.0766032 for D4; the
    # chapter checks it by Monte Carlo.
    return float(2.0 ** (-2.0 / n) * (1.0 / 12.0 + 1.0 / (2.0 * n * (n + 1))))


@functools.cache
def Zn(n: int) -> Lattice:
    """The integer lattice Z^n (generator: the identity). G = 1/12."""
    n = _checks.check_int(n, "n", minimum=1)
    return Lattice(f"Z{n}", "Zn", n, np.eye(n), 1.0 / 12.0)


@functools.cache
def Dn(n: int) -> Lattice:
    """The checkerboard lattice D_n = {z in Z^n : sum z even}, n >= 2."""
    n = _checks.check_int(n, "n", minimum=2)
    return Lattice(f"D{n}", "Dn", n, _dn_generator(n), _dn_second_moment(n))


def D4() -> Lattice:
    """D4, the densest lattice packing in 4 dimensions; G = 0.0766032."""
    return Dn(4)


@functools.cache
def A2() -> Lattice:
    """The hexagonal lattice, basis (1, 0) and (1/2, sqrt3/2); G = 5/(36 sqrt 3)."""
    G = np.array([[1.0, 0.5], [0.0, np.sqrt(3.0) / 2]])
    return Lattice("A2", "A2", 2, G, 5.0 / (36.0 * np.sqrt(3.0)))


@functools.cache
def E8() -> Lattice:
    """The Gosset lattice E8 = D8 u (D8 + 1/2), volume 1; G = 929/12960."""
    return Lattice("E8", "E8", 8, _e8_generator(), float(Fraction(929, 12960)))


def lattice(name: str) -> Lattice:
    """A lattice by name: ``"E8"``, ``"A2"``, ``"D4"``, ``"Dn"``-style
    ``"D<n>"``, or ``"Z<n>"``.

    Examples
    --------
    >>> import nqlib
    >>> nqlib.lattices.lattice("E8").dim
    8
    """
    if not isinstance(name, str) or len(name) < 2:
        raise ValueError(f"unknown lattice name {name!r}")
    if name == "E8":
        return E8()
    if name == "A2":
        return A2()
    head, tail = name[0], name[1:]
    if head in "ZD" and tail.isdigit():
        return Zn(int(tail)) if head == "Z" else Dn(int(tail))
    raise ValueError(f"unknown lattice name {name!r}; expected 'E8', 'A2', "
                     "'Z<n>' or 'D<n>'")
