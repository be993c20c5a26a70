"""``benchmarks/trellis.py`` runs on today's payloads (its decode section
once read the payload as a dict after the payloads became dataclasses):
each section at a tiny size, and the decoder it times gives the library's
values."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("trellis")


def test_decode_section_times_the_library_decoder(bench):
    out = bench.decode_speed(256, 8, 1)
    assert out["kernel_Mweights_per_s"] > 0 and out["kernel_Mweights_per_cpu_s"] > 0
    assert set(out["dequantize_Mps"]) == {"trellis", "fixed"}


def test_rows_section_counts_every_byte(bench):
    rows = bench.rows(256, 8, 8, (2,))
    assert [(r["mode"], r["R"]) for r in rows] == [("trellis", 2), ("fixed", 2)]
    for r in rows:
        assert 0 < r["bits"] <= 2.0 + 1e-9 and 0 < r["D"] < 1
    # the trellis file spends its whole budget, to the byte (header and side
    # information included)
    assert rows[0]["bits"] > 2.0 - 8 / (256 * 16)


def test_sweep_section(bench):
    rows = bench.sweep(2, 256, (8,), (2,))
    assert len(rows) == 1 and rows[0]["L"] == 8 and np.isfinite(rows[0]["gap"])
