"""Design of the fixed-rate code: a union of E8 Voronoi codes at k scales.

A block of 8 rotated, normalised entries (close to N(0, I_8)) is encoded by
the E8 Voronoi code with nesting ratio ``q`` at each of ``k`` scales
``beta_1 < ... < beta_k``; the encoder keeps the scale whose decoded output is
nearest (NestQuant uses the first scale without overload; taking the nearest
is never worse). A block costs one word of ``L`` bits holding
``index * q^8 + code`` in mixed radix, so ``k q^8 <= 2^L``: random access at
``L / 8`` bits per entry.

For a word length ``L`` the library chooses ``q``, ``k`` and the scales by
minimising the Monte Carlo mean squared error on Gaussian blocks (a fixed,
seeded sample): for each candidate ``q`` the errors of every block at every
scale of a geometric grid are computed once, then the ``k`` scales are picked
greedily and improved by coordinate descent (each scale in turn moved to the
best grid point given the others). The encoder's cost grows with ``k``, so
``k`` is capped (``MAX_SCALES``).

Book: chapter "The practical quantizer", label ``ch-practical``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

#: most scales per code: encoding costs one E8 Voronoi encode per scale
MAX_SCALES = 8
#: Monte Carlo blocks used by the design (seeded; fixed), and the tail
#: stratum: TAIL_BLOCKS blocks conditioned on a norm beyond the
#: (1 - TAIL_MASS) quantile
DESIGN_BLOCKS = 16384
TAIL_BLOCKS = 4096
TAIL_MASS = 1e-3
#: grid of beta * q values searched for the scales (geometric)
GRID = np.geomspace(0.75, 16.0, 72)
DESIGN_SEED = 20250213


@dataclass(frozen=True)
class FixedCode:
    """A designed fixed-rate E8 code: ``L``-bit words, nesting ratio ``q``,
    scales ``betas`` (float32 values, as stored), and its design MSE per
    entry on N(0, 1) data."""

    L: int
    q: int
    betas: tuple
    mse: float

    @property
    def k(self) -> int:
        """Number of scales."""
        return len(self.betas)


@functools.cache
def _design_sample():
    """Seeded Gaussian blocks and their weights for the design objective.

    Overload at every scale is rare but costly (the error is a coarse-lattice
    vector), so a plain sample under-represents it. The sample is therefore
    stratified by the block norm r: ``DESIGN_BLOCKS`` ordinary N(0, I_8)
    blocks stand for the event ``r <= r0`` and ``TAIL_BLOCKS`` blocks drawn
    conditionally on ``r > r0`` stand for the tail of probability
    ``TAIL_MASS``; the weights make the weighted mean an unbiased estimate of
    the mean error.
    """
    from scipy.stats import chi2

    rng = np.random.default_rng(DESIGN_SEED)
    x = rng.standard_normal((DESIGN_BLOCKS, 8))
    r0sq = chi2.isf(TAIL_MASS, 8)
    direction = rng.standard_normal((TAIL_BLOCKS, 8))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    rsq = chi2.isf(TAIL_MASS * rng.random(TAIL_BLOCKS), 8)
    tail = direction * np.sqrt(rsq)[:, None]
    main_w = ((x * x).sum(axis=1) <= r0sq) / DESIGN_BLOCKS
    tail_w = np.full(TAIL_BLOCKS, TAIL_MASS / TAIL_BLOCKS)
    sample, weights = np.vstack([x, tail]), np.concatenate([main_w, tail_w])
    sample.setflags(write=False)  # cached: shared by every design
    weights.setflags(write=False)
    return sample, weights


def _errors_on_grid(q, grid_betas):
    from nqlib.kernels.cpu.nested import encode_multiscale_rows

    x, _ = _design_sample()
    m = x.shape[0]
    z = np.zeros((1, 8))
    codes = np.empty((m, 8), dtype=np.int64)
    idx = np.empty(m, dtype=np.int64)
    se = np.empty(m)
    E = np.empty((m, len(grid_betas)))
    for j, b in enumerate(grid_betas):
        encode_multiscale_rows(x, q, np.array([b]), z, codes, idx, se,
                               np.empty((0, 8)))
        E[:, j] = se
    return E


def _pick_scales(E, weights, k):
    """Greedy choice of ``k`` grid columns minimising the weighted mean of
    ``min_s E[b, s]``, then coordinate descent. Returns (objective, sorted
    column indices)."""
    m, J = E.shape
    chosen = []
    cur = np.full(m, np.inf)
    for _ in range(k):
        vals = weights @ np.minimum(cur[:, None], E)
        vals[chosen] = np.inf
        j = int(np.argmin(vals))
        chosen.append(j)
        cur = np.minimum(cur, E[:, j])
    best = float(weights @ cur)
    for _sweep in range(6):
        improved = False
        for i in range(k):
            rest = [s for t, s in enumerate(chosen) if t != i]
            others = E[:, rest].min(axis=1) if rest else np.full(m, np.inf)
            vals = weights @ np.minimum(others[:, None], E)
            vals[rest] = np.inf
            j = int(np.argmin(vals))
            if vals[j] < best * (1 - 1e-12):
                best = float(vals[j])
                chosen[i] = j
                improved = True
        if not improved:
            break
    return best, sorted(chosen)


@functools.cache
def design(L: int) -> FixedCode:
    """The best fixed-rate E8 code with ``L``-bit words per 8-block.

    For each number of scales ``k = 1 .. MAX_SCALES`` only the largest
    ``q`` with ``k q^8 <= 2^L`` is a candidate (a finer code at the same
    ``k`` and ``L``). Deterministic (seeded sample); cached per process.
    """
    if not 8 <= L <= 64:
        raise ValueError(f"word length L must be in [8, 64] bits, got {L}")
    best = None
    candidates = {}
    for k in range(1, MAX_SCALES + 1):
        q = int(np.floor((2.0**L / k) ** 0.125 + 1e-9))
        while (q + 1) ** 8 * k <= 1 << L:
            q += 1
        while q**8 * k > 1 << L:
            q -= 1
        if q >= 2:
            candidates[q] = min(MAX_SCALES, (1 << L) // q**8)
    for q, k in sorted(candidates.items()):
        grid = (GRID / q).astype(np.float32).astype(np.float64)
        E = _errors_on_grid(q, grid)
        err, cols = _pick_scales(E, _design_sample()[1], k)
        mse = err / 8
        if best is None or mse < best.mse:
            best = FixedCode(L, q, tuple(float(grid[c]) for c in cols), mse)
    return best


# ------------------------------------------------------------------ table
#: The designs are deterministic but take seconds each, so the library ships
#: them in nqlib/data/fixed_codes.json, generated by ``python -m
#: nqlib.quantizers.fixed`` (and checked against a fresh design by the
#: tests). The key records every design parameter; a stale file is ignored.
def _design_key() -> str:
    return (f"v1 blocks={DESIGN_BLOCKS} tail={TAIL_BLOCKS}@{TAIL_MASS:g} "
            f"grid={GRID[0]:g}..{GRID[-1]:g}x{len(GRID)} k<={MAX_SCALES} "
            f"seed={DESIGN_SEED}")


def _table_path():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "data" / "fixed_codes.json"


@functools.cache
def _table() -> MappingProxyType:
    import json

    path = _table_path()
    if not path.exists():
        return MappingProxyType({})
    data = json.loads(path.read_text())
    if data.get("key") != _design_key():
        return MappingProxyType({})
    # cached and shared by every quantizer in the process: read-only
    return MappingProxyType(
        {int(L): FixedCode(int(L), int(c["q"]), tuple(c["betas"]), float(c["mse"]))
         for L, c in data["codes"].items()})


def fixed_code(L: int) -> FixedCode:
    """The fixed-rate code for ``L``-bit words: from the shipped table when
    it is current, else designed now (:func:`design`)."""
    table = _table()
    return table[L] if L in table else design(L)


def build_table(lengths=range(8, 65)) -> dict:
    """Design every word length and return the JSON-ready table."""
    from tqdm.auto import tqdm

    codes = {}
    for L in tqdm(list(lengths), desc="designing fixed-rate E8 codes"):
        c = design(L)
        codes[str(L)] = {"q": c.q, "betas": list(c.betas), "mse": c.mse}
    return {"key": _design_key(), "codes": codes}


if __name__ == "__main__":
    import json

    path = _table_path()
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(build_table(), indent=1) + "\n")
    print(f"wrote {path}")
