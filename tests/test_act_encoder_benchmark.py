"""``benchmarks/act_encoder.py`` runs on today's activation path: the parts
it times are the layers' (the activation code of a stream, its scales), and
its one-scale comparison really is one scale, at a distortion above the
designed codes'."""

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("act_encoder")


def test_parts_are_the_layers_activation_code(bench):
    from nqlib.quantizers.fixed import fixed_code

    rng = np.random.default_rng(0)
    parts = bench.act_parts(384, 1, rng)
    # one token of 384 entries: a stream's code uses (almost) all 4 bits
    bits = sum(p.L * nb for p, nb in parts)
    assert 3.5 * 384 < bits <= 4.02 * 384
    for p, _ in parts:
        assert p.q == fixed_code(p.L).q and len(p.betas) == fixed_code(p.L).k


def test_one_scale_code_is_coarser_than_the_designed_one(bench):
    q1, beta1, mse1, mse_k = bench.one_scale(30)
    assert q1**8 <= 2**30 < (q1 + 1) ** 8
    assert 0 < mse_k < mse1
    rows = bench.mse_table({30})
    assert rows[0]["L"] == 30 and rows[0]["dB"] > 1.0


def test_timed_calls_run(bench):
    torch = pytest.importorskip("torch")

    rng = np.random.default_rng(1)
    w4, w4a4 = bench.layers(64, 16, rng)
    x = torch.randn(2, 64)
    parts = bench.act_parts(64, 2, rng)
    t = bench.timed(bench.callables(w4, w4a4, x, parts, rng), rounds=1)
    assert set(t) == {"P", "W4A4", "Ek", "E1"} and all(v > 0 for v in t.values())
