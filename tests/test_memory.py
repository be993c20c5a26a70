"""Bounded memory without changed bytes (issue 14, item 7).

``quantize`` works a chunk of vectors at a time (``coded_domain.CHUNK_ENTRIES``)
and entropy-codes a chunk of blocks at a time
(``entropy.ENCODE_CHUNK_BLOCKS``). Every step is per vector, or follows
numpy's own pairwise summation tree, so the chunk sizes change no output
bit: checked here with tiny chunks against the default ones, for every mode,
with dither, padding and an odd rotation factor. The streaming entropy coder
gives the words of one ``encode_reverse`` per stream of ``e8_split``; the
chunked sums are ``np.sum`` bit for bit; and the peak of the memory that
numpy allocates while quantizing a float32 matrix stays within four times
the input (tracemalloc: deterministic, no timing). The RSS and speed figures
are in ``benchmarks/quantize_memory.py``.
"""

import tracemalloc

import numpy as np
import pytest

import nqlib
from nqlib.quantizers import coded_domain, entropy, matrix, rate_control

SHAPES = [(200, 37), (384, 20), (1000, 9)]  # padding; odd factor 3; n = 8 * 125
CONFIGS = [dict(rate=3.0), dict(rate=0.6), dict(rate=3.3, mode="fixed"),
           dict(rate=1.1, mode="fixed"), dict(rate=4.0, mode="fixed", dither=True),
           dict(rate=2.0, dither=True), dict(rate=2.5, estimator="unbiased"),
           dict(rate=3.0, center=False, normalize=False),
           dict(rate=2.0, method="ecsq"), dict(rate=2.0, mode="trellis")]


def run(A, cfg):
    kw = dict(cfg)
    return nqlib.quantize(A, kw.pop("rate"), seed=9, **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tiny_chunks_give_the_same_bytes(shape, monkeypatch):
    A = np.random.default_rng(sum(shape)).standard_normal(shape) * 2 + 1
    want = [run(A, cfg) for cfg in CONFIGS]
    monkeypatch.setattr(coded_domain, "CHUNK_ENTRIES", 40)
    monkeypatch.setattr(entropy, "ENCODE_CHUNK_BLOCKS", 7)
    for cfg, Q in zip(CONFIGS, want):
        got = run(A, cfg)
        assert got.to_bytes() == Q.to_bytes(), cfg
    # the activation path keeps the decoded rows: the same with tiny chunks
    kept = matrix.quantize_columns(A, 3.0, seed=9, keep_decoded=True)
    np.testing.assert_array_equal(kept.coded_rows(),
                                  run(A, dict(rate=3.0)).coded_rows())


def test_chunked_sums_are_numpy_sums(monkeypatch):
    rng = np.random.default_rng(5)
    monkeypatch.setattr(coded_domain, "CHUNK_ENTRIES", 24)
    for n in list(range(1, 70)) + [127, 128, 129, 500, 1031, 4096, 10007]:
        x, y = rng.standard_normal(n), rng.standard_normal(n) * 1e-3
        got = coded_domain.pairwise_sums(
            n, lambda s, e, x=x, y=y: (x[s:e] * y[s:e], x[s:e]))
        assert got == (float(np.sum(x * y)), float(np.sum(x))), n
    zeros = -np.zeros(300)
    assert str(coded_domain.pairwise_sums(300, lambda s, e: (zeros[s:e],))[0]) == \
        str(float(np.sum(zeros)))


def test_streaming_entropy_coder_matches_one_shot(monkeypatch):
    import constriction

    from nqlib.kernels.cpu.nested import e8_points_rows

    rng = np.random.default_rng(2)
    for m in (1, 9, 3000):
        x = rng.standard_normal((m, 8)) * 2.5
        T2 = np.empty((m, 8), dtype=np.int32)
        e8_points_rows(x, 1.0, np.zeros((1, 8)), T2)
        params = entropy.e8_fit(T2)
        # the reference: one encode_reverse per stream of e8_split
        coset, u, parity = entropy.e8_split(T2)
        s0, s1, K, p1 = params
        _, main, last = entropy._e8_tables(s0, s1, K)
        coder = constriction.stream.stack.AnsCoder()
        for c in (1, 0):
            for par in (1, 0):
                w, tab = last[c, par]
                sel = (coset == c) & (parity == par)
                sym = ((u[sel, 7] - par) >> 1) - w[0]
                if sym.size:
                    coder.encode_reverse(sym.astype(np.int32),
                                         entropy._categorical(tab))
        for c in (1, 0):
            sym = (u[coset == c, :7] + K).ravel()
            if sym.size:
                coder.encode_reverse(sym.astype(np.int32),
                                     entropy._categorical(main[c]))
        coder.encode_reverse(coset.astype(np.int32), entropy._categorical(
            np.array([65536.0 - p1, float(p1)])))
        want = coder.get_compressed()
        for chunk in (1 << 17, 5, 1):
            monkeypatch.setattr(entropy, "ENCODE_CHUNK_BLOCKS", chunk)
            np.testing.assert_array_equal(entropy.e8_encode(T2, params), want)
            T2_back = entropy.e8_decode(entropy.e8_encode(T2, params), m, params)
            np.testing.assert_array_equal(T2_back, T2)


@pytest.mark.parametrize("mode", ["variable", "fixed"])
def test_peak_allocation_is_within_four_times_the_input(mode, monkeypatch):
    # chunks small against this input, as the defaults are against large ones
    monkeypatch.setattr(coded_domain, "CHUNK_ENTRIES", 1 << 15)
    monkeypatch.setattr(entropy, "ENCODE_CHUNK_BLOCKS", 1 << 12)
    A = np.random.default_rng(0).standard_normal((2048, 1024), dtype=np.float32)
    nqlib.quantize(A[:, :16], 4.0, mode=mode)  # compile, load the tables
    tracemalloc.start()
    try:
        Q = nqlib.quantize(A, 4.0, mode=mode)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the coded matrix is float64 (2x) and, in variable mode, its E8 points
    # int32 (1x); everything else is a chunk
    assert peak <= 4 * A.nbytes, peak / A.nbytes
    assert Q.bits_per_entry <= 4.0 + rate_control.RATE_TOLERANCE
