"""Nested-lattice (Voronoi) codes.

For a fine lattice ``L = G Z^d`` and an integer nesting ratio ``q >= 2`` the
coarse lattice is ``qL`` and the codebook is ``L ∩ q V(L)``: the fine points in
the coarse Voronoi cell. It has exactly ``q^d`` points, one per coset of
``qL`` in ``L``, so a point costs ``d log2 q`` bits -- ``log2 q`` per entry.
With a scale ``beta`` and a dither ``z``:

    encode:  t = Q_L(x / beta + z),   c = (G^-1 t) mod q   (d integers in [0, q))
             overload  <=>  Q_L(t / q) != 0
    decode:  y = G c,   x_hat = beta ((y - q Q_L(y / q)) - z)

Without overload, ``x_hat = beta (Q_L(x / beta + z) - z)``: the fine-lattice
quantizer, with the coarse lattice only wrapping the index. With overload the
decoder is off by a coarse-lattice vector.

Book: chapter "Nested lattices and Voronoi codes", label ``ch-voronoi``.
"""

from __future__ import annotations

import math

import numpy as np

from nqlib import _backend, _checks
from nqlib.lattices import Lattice

__all__ = ["VoronoiCode", "code_dtype"]


def code_dtype(q: int) -> np.dtype:
    """Smallest unsigned integer dtype holding the values ``0 .. q - 1``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if q - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


class VoronoiCode:
    """The nested-lattice code ``L ∩ q V(L)``, scaled by ``beta``.

    Parameters
    ----------
    lattice : Lattice
        The fine lattice ``L`` (e.g. ``nqlib.lattices.E8()``).
    q : int
        Nesting ratio, any integer >= 2. The code has ``q**dim`` points and a
        rate of ``log2(q)`` bits per entry.
    beta : float, default 1.0
        Scale: the code quantizes ``x / beta``, so its points are ``beta``
        times lattice points.

    Notes
    -----
    The codes are the coordinates of the fine point in the basis ``G``
    (columns), reduced mod ``q``. The tie rules of
    :meth:`nqlib.lattices.Lattice.closest_point` apply in both the encoder
    and the decoder, so encoding and decoding agree bit for bit across
    backends. Book: chapter "Nested lattices and Voronoi codes", label
    ``ch-voronoi``.

    Examples
    --------
    >>> import numpy as np, nqlib
    >>> code = nqlib.VoronoiCode(nqlib.lattices.E8(), q=4, beta=0.5)
    >>> codes, overload = code.encode(np.full(8, 0.3))
    >>> code.decode(codes)
    array([0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25])
    """

    def __init__(self, lattice: Lattice, q: int, beta: float = 1.0):
        if not isinstance(lattice, Lattice):
            raise ValueError(f"lattice must be an nqlib Lattice, got {lattice!r}")
        self.lattice = lattice
        self.q = _checks.check_int(q, "q", minimum=2)
        self.beta = _checks.check_positive(beta, "beta")

    @property
    def dim(self) -> int:
        """Dimension of the lattice."""
        return self.lattice.dim

    @property
    def bits_per_entry(self) -> float:
        """``log2(q)``: the rate of the code in bits per entry."""
        return math.log2(self.q)

    @property
    def size(self) -> int:
        """Number of codewords, ``q**dim``."""
        return self.q ** self.dim

    @property
    def code_dtype(self) -> np.dtype:
        """The smallest unsigned dtype that holds a coordinate of a code."""
        return code_dtype(self.q)

    def __repr__(self) -> str:
        return (f"VoronoiCode({self.lattice.name}, q={self.q}, beta={self.beta:g}, "
                f"{self.bits_per_entry:.4g} bit/entry)")

    # ------------------------------------------------------------------ utils
    def _dither_rows(self, dither, m):
        """Dither as a float64 (1, d) or (m, d) array."""
        d = self.dim
        if dither is None:
            return np.zeros((1, d))
        # (a tensor of any dtype, bfloat16 included: as_float_array converts)
        z = _checks.as_float_array(dither, "dither", last_dim=d, dtype=np.float64)
        if z.ndim == 1:
            return z.reshape(1, d)
        z = z.reshape(-1, d)
        if z.shape[0] not in (1, m):
            raise ValueError(f"dither must have shape ({d},) or match x's "
                             f"{m} vectors, got {z.shape[0]} vectors")
        return np.ascontiguousarray(z)

    # ------------------------------------------------ torch tensors (Triton)
    def _dither_tensor(self, dither, m, device):
        """The dither as a contiguous float64 (1, d) or (m, d) tensor on
        ``device``, validated like :meth:`_dither_rows` (torch dithers stay
        on their device until moved to ``device``)."""
        import torch

        d = self.dim
        if dither is None:
            return torch.zeros((1, d), dtype=torch.float64, device=device)
        if not _backend.is_torch_tensor(dither):
            return torch.from_numpy(self._dither_rows(dither, m)).to(device)
        if dither.is_complex():
            raise ValueError("dither must be a real numeric array, got dtype "
                             f"{dither.dtype}")
        if dither.ndim == 0 or dither.shape[-1] != d:
            raise ValueError(f"dither must have last dimension {d}, got shape "
                             f"{tuple(dither.shape)}")
        z = dither.detach().to(device=device, dtype=torch.float64)
        if not bool(torch.isfinite(z).all()):
            raise ValueError("dither contains NaN or Inf")
        z = z.reshape(-1, d)
        if dither.ndim > 1 and z.shape[0] not in (1, m):
            raise ValueError(f"dither must have shape ({d},) or match x's {m} "
                             f"vectors, got {z.shape[0]} vectors")
        return z.contiguous()

    def _generators(self, device):
        """``(G, G^-1)`` as contiguous float64 tensors on ``device`` (copies:
        the lattice's cached generators are read-only numpy arrays)."""
        import torch

        lat = self.lattice
        G = torch.tensor(lat.generator, dtype=torch.float64, device=device)
        Ginv = torch.tensor(lat.generator_inverse, dtype=torch.float64,
                            device=device)
        return G.contiguous(), Ginv.contiguous()

    def _check_code_tensor(self, codes):
        """Validate a codes tensor on its device, with the rules and messages
        of :meth:`_check_codes`; return it with an integer dtype the Triton
        decoder reads."""
        import torch

        from nqlib.kernels.gpu.voronoi_triton import CODE_DTYPES

        d, q = self.dim, self.q
        if codes.dtype == torch.bool or codes.is_complex():
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.is_floating_point():
            if not bool((torch.isfinite(codes) & (codes == codes.round())).all()):
                raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
            codes = codes.to(torch.int64)
        if codes.ndim == 0 or codes.shape[-1] != d:
            raise ValueError(f"codes must have last dimension {d}, got shape "
                             f"{tuple(codes.shape)}")
        if codes.dtype not in CODE_DTYPES:
            codes = codes.to(torch.int64)
        if codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= q:
                raise ValueError(f"codes must lie in [0, q) = [0, {q}), got "
                                 f"values in [{lo}, {hi}]")
        return codes

    def _encode_triton(self, x, dither):
        """``encode(x, dither, backend="triton")`` for a validated tensor."""
        from nqlib.kernels.gpu import voronoi_triton

        d = self.dim
        m = x.numel() // d
        z = self._dither_tensor(dither, m, x.device)
        G, Ginv = self._generators(x.device)
        return voronoi_triton.encode(x, self.lattice.kind, self.q, self.beta, G,
                                     Ginv, z, _torch_code_dtype(self.q))

    def _decode_triton(self, codes, dither):
        """``decode(codes, dither, backend="triton")``: validates the codes on
        their device (same rules as :meth:`_check_codes`)."""
        from nqlib.kernels.gpu import voronoi_triton

        codes = self._check_code_tensor(codes.detach())
        m = codes.numel() // self.dim
        z = self._dither_tensor(dither, m, codes.device)
        G, _ = self._generators(codes.device)
        return voronoi_triton.decode(codes, self.lattice.kind, self.q, self.beta,
                                     G, z)

    # ---------------------------------------------------------------- encode
    def encode(self, x, dither=None, *, backend: str = "auto"):
        """Encode each vector of ``x``.

        Parameters
        ----------
        x : ndarray or torch.Tensor, shape (..., dim)
            Finite real vectors, of any real dtype (numpy float16, torch
            float16 / bfloat16 included; the arithmetic is float64) and any
            memory layout.
        dither : array_like, shape (dim,) or (..., dim), optional
            Subtractive dither ``z`` (shared with the decoder), one for all
            vectors or one per vector. None means no dither.
        backend : {"auto", "numba", "numpy", "triton"}
            As for :meth:`nqlib.lattices.Lattice.closest_point`.

        Returns
        -------
        codes : ndarray or torch.Tensor, shape (..., dim)
            Integers in ``[0, q)``, of the smallest unsigned dtype that holds
            them (``uint8`` for q <= 256); for torch input, ``int16`` /
            ``int32`` / ``int64`` (torch lacks wide unsigned types).
        overload : ndarray or torch.Tensor of bool, shape (...)
            True where the decoder will *not* return the fine-lattice point
            ``beta (Q(x / beta + z) - z)``.
        """
        tensor_input = _backend.is_torch_tensor(x)
        backend = _backend.resolve(backend, tensor_input=tensor_input,
                                   device=_backend.tensor_device(x))
        d = self.dim
        if backend == "triton":
            _checks.check_float_tensor(x, "x", d)
            return self._encode_triton(x, dither)
        if tensor_input:
            _checks.check_float_tensor(x, "x", d)
        # numpy or torch, any float dtype (float16 / bfloat16 widen exactly)
        # and any layout; float64 arithmetic in the kernels
        arr = _checks.as_float_array(x, "x", last_dim=d)
        lead = arr.shape[:-1]
        rows = np.ascontiguousarray(arr.reshape(-1, d))
        m = rows.shape[0]
        z = self._dither_rows(dither, m)
        lat = self.lattice
        if backend == "numba":
            from nqlib.kernels.cpu import lattice as kern

            codes = np.empty((m, d), dtype=self.code_dtype)
            overload = np.empty(m, dtype=np.bool_)
            if lat.family == "E8":
                kern.encode_e8_rows(rows, self.q, self.beta, z, codes, overload)
            else:
                kern.encode_rows(lat.kind, rows, self.q, self.beta, z,
                                 lat.generator, lat.generator_inverse, codes,
                                 overload)
        else:
            from nqlib.reference import lattices as ref

            codes, overload = ref.voronoi_encode(
                rows, ref.CLOSEST_POINT[lat.family], lat.generator,
                lat.generator_inverse, self.q, self.beta, z)
        codes = codes.astype(self.code_dtype, copy=False).reshape(lead + (d,))
        overload = overload.reshape(lead)
        if tensor_input:
            import torch

            tdt = _torch_code_dtype(self.q)
            return (torch.from_numpy(codes.astype(np.int64)).to(
                        device=x.device, dtype=tdt),
                    torch.from_numpy(overload).to(device=x.device))
        return codes, overload

    # ---------------------------------------------------------------- decode
    def _check_codes(self, codes):
        arr = np.asarray(_checks.to_numpy(codes))
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            if np.issubdtype(arr.dtype, np.floating) and np.all(
                    np.isfinite(arr)) and np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            else:
                raise ValueError("codes must be integers, got dtype "
                                 f"{arr.dtype}")
        if arr.ndim == 0 or arr.shape[-1] != self.dim:
            raise ValueError(f"codes must have last dimension {self.dim}, got "
                             f"shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.q):
            raise ValueError(f"codes must lie in [0, q) = [0, {self.q}), got "
                             f"values in [{arr.min()}, {arr.max()}]")
        return arr

    def decode(self, codes, dither=None, *, dtype=np.float64,
               backend: str = "auto"):
        """Decode codes to points of the code (scaled by ``beta``).

        Parameters
        ----------
        codes : ndarray or torch.Tensor of int, shape (..., dim)
            Values in ``[0, q)``.
        dither : array_like, shape (dim,) or (..., dim), optional
            The dither used by the encoder.
        dtype : numpy dtype, default float64
            Output dtype for numpy output (arithmetic is float64 and then
            cast). Torch codes give a float32 tensor on their device (codes
            are integers: there is no input float dtype to follow).
        backend : {"auto", "numba", "numpy", "triton"}

        Returns
        -------
        ndarray or torch.Tensor, shape (..., dim)
            ``beta ((y - q Q(y / q)) - z)`` with ``y = G c``.
        """
        tensor_input = _backend.is_torch_tensor(codes)
        backend = _backend.resolve(backend, tensor_input=tensor_input,
                                   device=_backend.tensor_device(codes))
        d = self.dim
        if backend == "triton":
            return self._decode_triton(codes, dither)
        arr = self._check_codes(codes)
        lead = arr.shape[:-1]
        rows = np.ascontiguousarray(arr.reshape(-1, d))
        m = rows.shape[0]
        z = self._dither_rows(dither, m)
        lat = self.lattice
        if backend == "numba":
            from nqlib.kernels.cpu import lattice as kern

            # float32 / float64 output is written by the kernel directly: it
            # rounds each float64 result on store, as astype would, and saves
            # a pass over a float64 buffer (1.5x faster for float32)
            store = np.dtype(np.float32 if tensor_input else dtype)
            if store not in (np.float32, np.float64):
                store = np.dtype(np.float64)
            out = np.empty((m, d), dtype=store)
            if lat.family == "E8":
                kern.decode_e8_rows(rows, self.q, self.beta, z, out)
            else:
                kern.decode_rows(lat.kind, rows, self.q, self.beta, z,
                                 lat.generator, out)
        else:
            from nqlib.reference import lattices as ref

            out = ref.voronoi_decode(rows.astype(np.int64),
                                     ref.CLOSEST_POINT[lat.family],
                                     lat.generator, self.q, self.beta, z)
        out = out.reshape(lead + (d,))
        if tensor_input:
            import torch

            return torch.from_numpy(out.astype(np.float32)).to(codes.device)
        return out.astype(dtype, copy=False)

    def codebook(self) -> np.ndarray:
        """All ``q**dim`` points of the (unscaled, undithered) code, shape
        ``(q**dim, dim)``, in the order of ``itertools.product(range(q),
        repeat=dim)`` of their codes. Guarded to at most 2**24 points."""
        if self.size > 1 << 24:
            raise ValueError(f"codebook of {self.size} points is too large to "
                             "enumerate (limit 2**24)")
        grids = np.indices((self.q,) * self.dim).reshape(self.dim, -1).T
        return VoronoiCode(self.lattice, self.q, 1.0).decode(grids)


def _torch_code_dtype(q):
    import torch

    if q - 1 <= 32767:
        return torch.int16 if q > 128 else torch.uint8
    return torch.int32 if q - 1 <= 2**31 - 1 else torch.int64
