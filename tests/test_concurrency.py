"""No shared mutable state (issue 14, item 5).

* Cached arrays -- lattice generators, the fixed-code design sample and
  table, the measured rate curve, rotation factors, the theory's numeric
  bound -- are read-only: writing into one raises instead of corrupting
  every later call in the process.
* The activation cache of ``nn`` belongs to the layers (one per model from
  ``quantize_model``), not to the module; ``QuantLinear.backend`` is an
  instance attribute.
* Calls from several Python threads at once (``quantize``, decoding,
  ``closest_point``, ``VoronoiCode``, ``QuantLinear.forward``) give the same
  bytes and outputs as sequential calls, on numba's default threading layer
  and on ``workqueue``, which is not thread-safe and which nqlib guards with
  a lock (checked in a subprocess).
"""

import copy
import os
import pickle
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import nqlib
from nqlib.lattices import A2, D4, E8, Dn, Zn


# ------------------------------------------------------- read-only caches
@pytest.mark.parametrize("lattice", [E8(), D4(), Dn(6), Zn(8), A2()],
                         ids=lambda L: L.name)
def test_lattice_generators_are_read_only(lattice):
    for arr in (lattice.generator, lattice.generator_inverse):
        assert not arr.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            arr[0, 0] = 3.0
    # and the cached lattice is the one every later call gets
    same = nqlib.lattices.lattice(lattice.name) if lattice.name != "A2" else A2()
    assert same is lattice


def test_writing_into_e8_generator_raises_and_decoding_stays_right():
    with pytest.raises(ValueError):
        nqlib.E8().generator[0, 0] = 3
    G = np.array(nqlib.E8().generator)
    G[0, 0] = 3  # a copy may be changed freely
    assert nqlib.E8().generator[0, 0] == 2.0
    x = np.full(8, 0.5)
    np.testing.assert_array_equal(nqlib.E8().closest_point(x), x)
    code = nqlib.VoronoiCode(nqlib.E8(), q=4)
    c, _ = code.encode(np.full(8, 0.5))
    np.testing.assert_array_equal(code.decode(c), x)


def test_other_cached_arrays_are_read_only():
    from nqlib.quantizers import fixed, hadamard, ratecurve

    sample, weights = fixed._design_sample()
    P = nqlib.RandomHadamard(24, seed=3)
    arrays = {"design sample": sample, "design weights": weights,
              "rotation signs": P.signs, "rotation odd factor": P.orthogonal}
    assert P.signs is hadamard._rotation_parameters(24, 3, P.version)[0]
    curve = ratecurve.variable_curve()
    if curve is not None:
        arrays.update({"curve rates": curve[0], "curve D": curve[1]})
    for name, arr in arrays.items():
        assert not arr.flags.writeable, name
        with pytest.raises(ValueError):
            arr[0] = arr[0]
    table = fixed._table()
    with pytest.raises(TypeError):
        table[8] = None
    code = fixed.fixed_code(12)
    with pytest.raises(AttributeError):
        code.q = 3  # a frozen dataclass with a tuple of scales
    assert isinstance(code.betas, tuple)


def test_theory_tables_are_read_only():
    from nqlib.theory import bound, montecarlo

    with pytest.raises(TypeError):
        bound._numeric()["r_star"] = 1.0
    rows = montecarlo._haar_rows(16, 4, 0)
    assert not rows.flags.writeable


def test_decoded_rows_cache_is_read_only():
    Q = nqlib.quantize(np.random.default_rng(0).standard_normal((64, 4)), 4.0)
    with pytest.raises(ValueError):
        Q.coded_rows()[0, 0] = 1.0


# ---------------------------------------------------------------- threads
def _matrices(count, shape=(300, 20)):
    rng = np.random.default_rng(11)
    return [rng.standard_normal(shape) * (1 + i) for i in range(count)]


CONFIGS = [dict(rate=3.0), dict(rate=4.0, mode="fixed"),
           dict(rate=2.5, mode="fixed", dither=True), dict(rate=3.0, method="ecsq"),
           dict(rate=4, method="rtn-hadamard"), dict(rate=1.0, mode="variable")]


def _quantize_bytes(args):
    A, cfg = args
    kw = dict(cfg)
    return nqlib.quantize(A, kw.pop("rate"), seed=5, **kw).to_bytes()


def test_concurrent_quantize_gives_the_sequential_bytes():
    jobs = [(A, cfg) for A in _matrices(4) for cfg in CONFIGS]
    sequential = [_quantize_bytes(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=6) as pool:
        for _ in range(2):
            assert list(pool.map(_quantize_bytes, jobs)) == sequential


def test_concurrent_decode_and_lattice_calls_match_sequential():
    files = [_quantize_bytes((A, cfg)) for A in _matrices(2) for cfg in CONFIGS]
    rng = np.random.default_rng(3)
    X = rng.standard_normal((5000, 8)) * 3
    code = nqlib.VoronoiCode(E8(), q=5, beta=0.4)

    def work(i):
        if i % 3 == 0:
            return nqlib.QuantizedMatrix.from_bytes(files[i % len(files)]
                                                    ).dequantize().tobytes()
        if i % 3 == 1:
            return E8().closest_point(X[i:]).tobytes()
        codes, over = code.encode(X[i:])
        return codes.tobytes() + code.decode(codes).tobytes()

    sequential = [work(i) for i in range(36)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        assert list(pool.map(work, range(36))) == sequential


@pytest.mark.parametrize("act_mode", ("variable", "fixed"))
def test_concurrent_quant_linear_forward_matches_sequential(act_mode):
    torch = pytest.importorskip("torch")
    from nqlib.nn import QuantLinear, quantize_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 32))
    # fixed-mode activations take the lean rows quantizer, whose plans the
    # threads share
    quantize_model(model, 4.0, act_rate=4.0, act_mode=act_mode, progress=False)
    lone = QuantLinear.from_linear(torch.nn.Linear(64, 16), 4.0, seed=1)
    inputs = [torch.randn(8, 64, generator=torch.Generator().manual_seed(i))
              for i in range(12)]

    def work(i):
        with torch.no_grad():
            x = inputs[i % len(inputs)]
            return model(x), lone(x)

    sequential = [work(i) for i in range(24)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        for got, want in zip(pool.map(work, range(24)), sequential):
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_parallel_kernels_are_guarded_only_when_the_layer_is_not_threadsafe():
    from nqlib.kernels.cpu import guard, hadamard, lattice, nested

    kernels = [hadamard.fwht_rows, lattice.closest_point_e8_rows,
               nested.encode_multiscale_rows, nested.e8_points_rows]
    wrapped = [hasattr(k, "kernel") for k in kernels]
    assert wrapped == [not guard.threadsafe()] * len(kernels)
    assert guard.layer() in ("tbb", "omp", "workqueue")


_WORKQUEUE_SCRIPT = textwrap.dedent("""
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    import nqlib
    from nqlib.kernels.cpu import coded, guard, nested
    from nqlib.quantizers.matrix import quantize_columns

    assert guard.layer() == "workqueue", guard.layer()
    assert hasattr(nested.encode_multiscale_rows, "kernel")  # guarded
    # drivers that run parallel kernels inside are guarded too
    assert hasattr(coded.project_mmse, "kernel")
    assert hasattr(coded.encode_fixed_rows, "kernel")
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((512, 48)) for _ in range(6)]
    X = rng.standard_normal((20000, 8))

    def work(i):
        A = mats[i % len(mats)]
        q = nqlib.quantize(A, 3.0, mode="fixed" if i % 2 else "variable")
        # activations: the decode kept (the compiled whole-matrix passes)
        k = quantize_columns(A, 4.0, mode="fixed", keep_decoded=True)
        return (q.to_bytes() + k.to_bytes() + k.coded_rows().tobytes()
                + nqlib.E8().closest_point(X).tobytes())

    sequential = [work(i) for i in range(12)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            assert list(pool.map(work, range(12))) == sequential
    print("ok")
""")


def test_workqueue_layer_is_guarded_in_a_subprocess():
    """numba's workqueue layer aborts the process on concurrent parallel
    launches; nqlib serialises its kernels there."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue",
               NUMBA_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _WORKQUEUE_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


# ------------------------------------------ nn: no module-global state
def test_activation_cache_belongs_to_the_model():
    torch = pytest.importorskip("torch")
    from nqlib import nn as qnn

    assert not hasattr(qnn, "_ACT_CACHE")

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))

    m1, m2 = model(), model()
    qnn.quantize_model(m1, 4.0, act_rate=4.0, progress=False)
    qnn.quantize_model(m2, 4.0, act_rate=4.0, progress=False)
    assert m1[0].act_cache is m1[1].act_cache          # shared in a model
    assert m1[0].act_cache is not m2[0].act_cache      # not across models
    x = torch.randn(4, 64)
    y1 = m1(x)
    # a copy starts empty, still shared by its layers, and gives the same output
    for clone in (copy.deepcopy(m1), pickle.loads(pickle.dumps(m1))):
        assert clone[0].act_cache is clone[1].act_cache
        assert clone[0].act_cache is not m1[0].act_cache
        assert getattr(clone[0].act_cache._local, "entry", None) is None
        assert clone[0].act_cache.quantized_calls == 0 < m1[0].act_cache.quantized_calls
        torch.testing.assert_close(clone(x), y1, rtol=0, atol=0)
    lone = qnn.QuantLinear.from_linear(torch.nn.Linear(64, 8), 4.0, act_rate=4.0)
    assert isinstance(lone.act_cache, qnn.ActivationCache)
    assert lone.act_cache is not m1[0].act_cache


def test_layers_fed_the_same_input_quantize_it_once(monkeypatch):
    torch = pytest.importorskip("torch")
    from nqlib import nn as qnn

    class Fan(torch.nn.Module):  # three layers on one input, like q, k, v
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(64, 16) for _ in range(3))

        def forward(self, x):
            return self.q(x) + self.k(x) + self.v(x)

    torch.manual_seed(2)
    fan = Fan()
    qnn.quantize_model(fan, 4.0, act_rate=4.0, progress=False)
    # separately built layers, each with its own cache
    solo = Fan()
    for name in ("q", "k", "v"):
        setattr(solo, name, qnn.QuantLinear.from_linear(
            getattr(solo, name), 4.0, act_rate=4.0))
    from nqlib.nn import activations

    calls = []  # the quantizer's real calls, against which the counts are checked
    real = activations.quantize_columns
    monkeypatch.setattr(activations, "quantize_columns",
                        lambda X, *a, **k: calls.append(X.size) or real(X, *a, **k))
    shared = fan.q.act_cache
    assert shared is fan.k.act_cache is fan.v.act_cache
    assert (shared.quantized_calls, shared.quantized_entries) == (0, 0)
    fan(torch.randn(5, 64))
    assert (shared.quantized_calls, shared.quantized_entries) == (1, 5 * 64)
    assert calls == [5 * 64]
    fan(torch.randn(5, 64))  # another input: quantized once more
    assert shared.quantized_calls == 2
    shared.reset_counts()
    assert (shared.quantized_calls, shared.quantized_entries) == (0, 0)
    solo(torch.randn(5, 64))
    caches = [getattr(solo, name).act_cache for name in ("q", "k", "v")]
    assert len({id(c) for c in caches}) == 3
    assert [(c.quantized_calls, c.quantized_entries) for c in caches] == \
        [(1, 5 * 64)] * 3
    assert calls == [5 * 64] * 5


def test_backend_is_an_instance_attribute():
    torch = pytest.importorskip("torch")
    from nqlib.nn import QuantLinear

    assert "backend" not in vars(QuantLinear)
    a = QuantLinear.from_linear(torch.nn.Linear(64, 8), 4.0)
    b = QuantLinear.from_linear(torch.nn.Linear(64, 8), 4.0)
    assert a.backend == b.backend == "auto"
    a.backend = "torch"
    assert b.backend == "auto" and "backend" in vars(a)
    b.backend = "bogus"
    with pytest.raises(ValueError, match="QuantLinear.backend"):
        b(torch.randn(2, 64))
    a(torch.randn(2, 64))  # unaffected
