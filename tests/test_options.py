"""Options that do not apply raise (issue 14, item 6).

Every option of ``nqlib.quantize`` against every method: a value the method
implements is honoured (and visible in the result), any other value raises
a ``ValueError`` that names the option and the method -- nothing is dropped
silently. The expectations are written out here, independently of the
library's own table. ``QuantLinear.from_linear``, ``QuantLinear`` and
``quantize_model`` check their options the same way (``quantize_model``
before any calibration or quantization runs).
"""

import itertools

import numpy as np
import pytest

import nqlib
from nqlib.quantizers import matrix

A = np.random.default_rng(0).standard_normal((256, 6)) + 0.3

#: what each method implements (None: the option has no value to give)
IMPLEMENTS = {
    "nested": dict(mode=("variable", "fixed", "trellis"),
                   estimator=("mmse", "unbiased"), dither=(False, True),
                   center=(True, False), normalize=(True, False),
                   rotate=(True, False), sketch=(True, False), group_size=()),
    "ecsq": dict(mode=("variable",), estimator=("mmse", "unbiased"),
                 dither=(False,), center=(True, False), normalize=(True, False),
                 rotate=(True, False), sketch=(False,), group_size=()),
    "rtn": dict(mode=("fixed",), estimator=("unbiased",), dither=(False,),
                center=(False,), normalize=(False,), rotate=(False,),
                sketch=(False,), group_size=(32, 128)),
    "rtn-hadamard": dict(mode=("fixed",), estimator=("unbiased",), dither=(False,),
                         center=(False,), normalize=(False,), rotate=(True,),
                         sketch=(False,), group_size=(32, 128)),
}
CANDIDATES = dict(mode=("variable", "fixed", "trellis"),
                  estimator=("mmse", "unbiased"), dither=(False, True),
                  center=(True, False), normalize=(True, False),
                  rotate=(True, False), sketch=(True, False), group_size=(32, 128))
CASES = [(method, option, value) for method in IMPLEMENTS
         for option, values in CANDIDATES.items() for value in values]


def rate_of(method):
    return 4 if method.startswith("rtn") else 4.0


def test_every_method_and_mode_is_covered_here():
    assert set(IMPLEMENTS) == set(matrix.METHODS)
    assert set(CANDIDATES["mode"]) == set(matrix.MODES)
    assert set(CANDIDATES) == set(matrix.OPTION_VALUES["nested"])


def observed(Q, option):
    """What the quantized matrix says about ``option``."""
    if option == "group_size":
        return Q.payload.group
    if option == "sketch":  # a code that drops no block: nothing sketched
        return None
    return getattr(Q, option)


@pytest.mark.parametrize("method,option,value", CASES,
                         ids=[f"{m}-{o}={v}" for m, o, v in CASES])
def test_option_is_honoured_or_refused(method, option, value):
    kw = {"method": method, option: value}
    if value in IMPLEMENTS[method][option]:
        Q = nqlib.quantize(A, rate_of(method), **kw)
        if observed(Q, option) is not None:
            assert observed(Q, option) == value
        if option == "mode":
            # the file says so too, and reads back
            assert nqlib.QuantizedMatrix.from_bytes(Q.to_bytes()).mode == value
    else:
        with pytest.raises(ValueError, match=f"{option}={value!r} does not apply "
                           f"to method={method!r}"):
            nqlib.quantize(A, rate_of(method), **kw)


@pytest.mark.parametrize("method", sorted(IMPLEMENTS))
def test_defaults_are_the_first_implemented_values(method):
    Q = nqlib.quantize(A, rate_of(method), method=method)
    for option in ("mode", "estimator", "dither", "center", "normalize", "rotate"):
        assert getattr(Q, option) == IMPLEMENTS[method][option][0], option
    if method.startswith("rtn"):
        assert Q.payload.group == 128


def test_the_issue_example_raises():
    with pytest.raises(ValueError, match="mode='fixed' does not apply to "
                       "method='ecsq'"):
        nqlib.quantize(A, 4, method="ecsq", mode="fixed", dither=True)
    with pytest.raises(ValueError, match="dither=True does not apply to "
                       "method='ecsq'"):
        nqlib.quantize(A, 4, method="ecsq", dither=True)


def test_sketch_false_is_honoured_where_it_exists():
    # at a low rate the nested method sketches by default, not when asked not to
    B = np.random.default_rng(1).standard_normal((1024, 8))
    kept = nqlib.quantize(B, 0.5).payload.keep
    assert kept < 1024 // 8
    with pytest.raises(ValueError, match="rate"):
        nqlib.quantize(B, 0.5, mode="fixed", sketch=False)


@pytest.mark.parametrize("pair", [dict(mode="trellis", dither=True)], ids=str)
def test_combinations_a_mode_does_not_implement(pair):
    with pytest.raises(ValueError, match="dither=True does not apply to "
                       "mode='trellis'"):
        nqlib.quantize(A, 4.0, **pair)


@pytest.mark.parametrize("combo", list(itertools.product(
    ("variable", "fixed"), (False, True), (False, True), (False, True))),
    ids=str)
def test_every_nested_combination_of_flags_runs(combo):
    mode, dither, center, rotate = combo
    Q = nqlib.quantize(A, 4.0, mode=mode, dither=dither, center=center,
                       rotate=rotate, seed=2)
    assert (Q.mode, Q.dither, Q.center, Q.rotate) == combo
    R = nqlib.QuantizedMatrix.from_bytes(Q.to_bytes())
    np.testing.assert_array_equal(R.dequantize(), Q.dequantize())


@pytest.mark.parametrize("name,value,match", [
    ("mode", "vq", "mode must be one of"),
    ("estimator", "ml", "estimator must be one of"),
    ("group_size", 0, "group_size must be >= 1"),
    ("sketch", "no", "sketch must be True or False"),
    ("method", "gptq", "method must be one of"),
])
def test_unknown_values_name_the_option(name, value, match):
    with pytest.raises(ValueError, match=match):
        nqlib.quantize(A, 4.0, **{name: value})


# --------------------------------------------------------------------- nn
torch = pytest.importorskip("torch")


def linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 16)


@pytest.mark.parametrize("kw,match", [
    (dict(act_mode="fixed"), "act_mode='fixed' does not apply without act_rate"),
    (dict(method="rtn", act_rate=4, act_mode="variable"),
     "act_mode='variable' does not apply to method='rtn'"),
    (dict(method="ecsq", mode="fixed"), "mode='fixed' does not apply to "
     "method='ecsq'"),
    (dict(method="ecsq", dither=True), "dither=True does not apply"),
    (dict(group_size=32), "group_size=32 does not apply to method='nested'"),
    (dict(method="rtn", center=True), "center=True does not apply"),
    (dict(damp=0.1), "damp= does not apply to method='nested'"),
    (dict(method="nested-ldlq", hessian=np.eye(64), group_size=32),
     "group_size= does not apply to method='nested-ldlq'"),
    (dict(method="nested-ldlq", hessian=np.eye(64), mode="variable"),
     "fixed or the trellis mode"),
    (dict(hessian=np.eye(64)), "hessian= is used by method='nested-ldlq' only"),
    (dict(method="rtn-hadamard", rotate=False), "rotate=False does not apply"),
], ids=lambda v: str(v)[:40])
def test_from_linear_refuses_options_that_do_not_apply(kw, match):
    from nqlib.nn import QuantLinear

    rate = 4 if kw.get("method", "").startswith("rtn") else 4.0
    with pytest.raises(ValueError, match=match):
        QuantLinear.from_linear(linear(), rate, **kw)


def test_from_linear_honours_what_applies():
    from nqlib.nn import QuantLinear

    ql = QuantLinear.from_linear(linear(), 4.0)
    assert ql.quantized_weight.mode == "fixed"          # weights: random access
    assert QuantLinear.from_linear(linear(), 4.0, method="ecsq"
                                   ).quantized_weight.mode == "variable"
    rtn = QuantLinear.from_linear(linear(), 4, method="rtn", mode="fixed",
                                  group_size=32, act_rate=4, act_mode="fixed")
    assert rtn.quantized_weight.payload.group == 32
    rtn(torch.randn(3, 64))
    H = np.eye(64)
    ldlq = QuantLinear.from_linear(linear(), 4.0, method="nested-ldlq", hessian=H,
                                   damp=0.05, dither=True)
    assert ldlq.quantized_weight.dither


def test_quant_linear_constructor_checks_act_options():
    from nqlib.nn import QuantLinear

    qw = nqlib.quantize(linear().weight.detach().numpy().T, 4.0, mode="fixed")
    with pytest.raises(ValueError, match="act_mode='variable' does not apply "
                       "without act_rate"):
        QuantLinear(64, 16, qw, act_mode="variable")
    with pytest.raises(ValueError, match="act_cache must be"):
        QuantLinear(64, 16, qw, act_cache={})
    with pytest.raises(ValueError, match="act_mode must be one of"):
        QuantLinear(64, 16, qw, act_rate=4.0, act_mode="vq")


@pytest.mark.parametrize("kw,match", [
    (dict(method="ecsq", mode="fixed"), "mode='fixed' does not apply"),
    (dict(method="nested", group_size=64), "group_size=64 does not apply"),
    (dict(act_mode="variable"), "act_mode='variable' does not apply without"),
    (dict(method="rtn", act_rate=4, act_mode="variable"),
     "act_mode='variable' does not apply to method='rtn'"),
    (dict(method="nested-ldlq", calibration={}, mode="variable"),
     "fixed or the trellis mode"),
    (dict(method="nested-ldlq", calibration={}, bogus=1),
     "bogus= does not apply"),
    (dict(method="nested", act_rate=9.0), "rate must be in"),
    (dict(method="vq"), "method must be one of"),
], ids=lambda v: str(v)[:40])
def test_quantize_model_checks_options_before_any_work(kw, match):
    from nqlib.nn import quantize_model

    model = torch.nn.Sequential(linear(), torch.nn.Linear(16, 8))
    before = [m for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        quantize_model(model, kw.pop("weight_rate", 4.0), progress=False, **kw)
    # nothing was replaced
    assert [m for m in model.modules()] == before
    assert all(type(m) in (torch.nn.Sequential, torch.nn.Linear)
               for m in model.modules())
