"""Streams: the rate of inputs quantized on every call of a layer.

``quantize_columns(..., stream=True)`` counts what one call of a stream of
matrices (one length, one set of options) must send -- the codes, means,
norms, the count of columns, ``alpha``, the payload's data-dependent fields
-- and not the stream's configuration, sent once. These tests check

* the accounting, against an independent recount of the file's fields;
* that the code meets the rate by that count (fixed: within its tolerance);
* that one column is then coded far more finely than a one-column file at
  the same rate, which pays its header -- in the fixed mode about as finely
  as a batch's columns;
* that such files read back, and that a layer's ``act_bits_per_entry``
  counts the same bytes;
* a clear error when one call cannot carry even its side information.
"""

import numpy as np
import pytest

from nqlib.quantizers import format as fmt
from nqlib.quantizers.matrix import QuantizedMatrix, quantize_columns
from nqlib.quantizers.rate_control import RATE_TOLERANCE

#: (method, mode) pairs whose rate the budget controls
CONTROLLED = [("nested", "fixed"), ("nested", "variable"), ("ecsq", "variable"),
              ("nested", "trellis")]


def _columns(n, a, seed):
    rng = np.random.default_rng([n, a, seed])
    return rng.standard_normal((n, a)) * rng.uniform(0.5, 2.0) + rng.uniform(-1, 1)


def _static_bytes(Q):
    """The stream's configuration in Q's file, recounted from the layout of
    :mod:`nqlib.quantizers.format`: magic, version, the header without the
    column count, the CRC, and the fixed mode's split and parts (the rtn
    payload's bit width and group)."""
    static = 3 + 1 + (24 - 4) + 4
    p = Q.payload
    if Q.mode == "fixed" and Q.method == "nested":
        static += 4 + (4 + 4 * len(p.hi.betas)) + (4 + 4 * len(p.lo.betas))
    if Q.method.startswith("rtn"):
        static += 3
    return static


@pytest.mark.parametrize("method,mode", CONTROLLED + [("rtn", "fixed")],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("n", (256, 384, 576))
@pytest.mark.parametrize("a", (1, 3, 40))
def test_stream_bytes_are_the_file_without_its_configuration(method, mode, n, a):
    rate = 4
    Q = quantize_columns(_columns(n, a, 1), rate, seed=3, method=method,
                         mode=mode, stream=True)
    assert Q.nbytes - Q.stream_nbytes == _static_bytes(Q)
    assert Q.stream_bits_per_entry == pytest.approx(8 * Q.stream_nbytes / (n * a))
    if method != "rtn":       # rtn's rate is its bit width, not a budget
        tol = RATE_TOLERANCE if mode == "fixed" else 0.0
        assert Q.stream_bits_per_entry <= rate + tol + 1e-12
    if mode == "fixed":     # the budget is used, to a word or two per column
        assert Q.stream_bits_per_entry > rate - 0.1
    # and the file reads back, with the same stream bytes and decode
    R = QuantizedMatrix.from_bytes(Q.to_bytes())
    assert R.stream_nbytes == Q.stream_nbytes
    np.testing.assert_array_equal(R.dequantize(), Q.dequantize())


@pytest.mark.parametrize("mode", ("fixed", "variable"))
@pytest.mark.parametrize("n", (384, 576))
def test_one_column_of_a_stream_is_coded_like_a_batch(mode, n):
    """Columns quantized one at a time as a stream: a one-column file at
    the same rate pays its configuration too, ``saved`` bits per entry
    more, and has about ``2^(2 saved)`` times their error (the high-rate
    law; at least 0.8 of it here). In the fixed mode they have about the
    error of the same columns quantized together: a call's count and alpha
    cost 64 bits, 0.17 bit per entry at 384 (about 1.3 x the error). The
    variable mode's call also sends its coder's parameters (28 bytes) and
    loses more."""
    A = _columns(n, 32, 7)
    energy = float(np.mean(A**2))

    def rel_err(stream, batch):
        errs = []
        for c0 in range(0, A.shape[1], batch):
            X = A[:, c0:c0 + batch]
            Q = quantize_columns(X, 4.0, seed=2, mode=mode, stream=stream)
            errs.append(np.sum((Q.dequantize() - X) ** 2))
        return float(np.sum(errs)) / A.size / energy

    single = rel_err(True, 1)
    Q1 = quantize_columns(A[:, :1], 4.0, seed=2, mode=mode, stream=True)
    saved = 8 * (Q1.nbytes - Q1.stream_nbytes) / n
    assert saved > 0.3
    assert rel_err(False, 1) > 0.8 * 2 ** (2 * saved) * single
    if mode == "fixed":
        batch = rel_err(True, 32)
        assert single < 1.5 * batch, (single, batch)


def test_a_call_that_cannot_carry_its_side_information_raises():
    # 8 entries at 4 bits: 32 bits, less than the count, alpha, mean and norm
    with pytest.raises(ValueError, match="cannot be met"):
        quantize_columns(_columns(8, 1, 0), 4.0, mode="fixed", stream=True)
    with pytest.raises(ValueError, match="cannot be met"):
        quantize_columns(_columns(8, 1, 0), 4.0, mode="variable", stream=True)
    Q = quantize_columns(_columns(64, 1, 0), 4.0, mode="fixed", stream=True)
    assert Q.stream_bits_per_entry <= 4.0 + RATE_TOLERANCE


def test_stream_nbytes_refuses_what_is_not_a_payload():
    Q = quantize_columns(_columns(64, 2, 0), 4.0, mode="fixed", stream=True)
    Q.payload = object()
    with pytest.raises(TypeError, match="not a payload"):
        fmt.stream_nbytes(Q)


def test_a_layer_counts_its_inputs_as_a_stream():
    """One token at a time: the layer's activation rate is the stream's, at
    most the rate, and (fixed mode) its output error about the batched
    one's."""
    torch = pytest.importorskip("torch")
    from nqlib.nn import QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(384, 64)
    x = torch.randn(16, 384)
    exact = lin(x).detach()
    errs = {}
    for mode in ("fixed", "variable"):
        for batch in (16, 1):
            ql = QuantLinear.from_linear(lin, 4.0, act_rate=4.0, act_mode=mode,
                                         seed=1)
            y = torch.cat([ql(x[i:i + batch]) for i in range(0, 16, batch)])
            errs[mode, batch] = float(((y - exact) ** 2).mean())
            tol = RATE_TOLERANCE if mode == "fixed" else 0.0
            assert 3.5 < ql.act_bits_per_entry <= 4.0 + tol + 1e-12
            QX = quantize_columns(x[:batch].double().numpy().T, 4.0, seed=1,
                                  mode=mode, stream=True)
            ql.act_cache.clear()
            ql.act_cache.reset_counts()
            ql._act_counts = [0, 0]
            ql(x[:batch])
            assert ql.act_bits_per_entry == pytest.approx(QX.stream_bits_per_entry)
    assert errs["fixed", 1] < 1.5 * errs["fixed", 16], errs
