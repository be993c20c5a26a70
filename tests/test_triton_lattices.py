"""Triton closest point and Voronoi encode/decode equal numba, bit for bit.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set by
conftest.py) on CPU tensors; on a CUDA machine the same tests run on the GPU.
The interpreter is lax about what real compilation rejects and never fuses
multiply-adds, so one test also compiles every kernel to PTX for sm_90 (no GPU
needed) and inspects the instructions.
"""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from nqlib import _backend  # noqa: E402
from nqlib.kernels.gpu import lattice_triton, voronoi_triton  # noqa: E402
from nqlib.lattices import A2, E8, Dn, Zn  # noqa: E402
from nqlib.quantizers.voronoi import VoronoiCode, _torch_code_dtype  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LATTICES = {"Z4": Zn(4), "Z8": Zn(8), "D4": Dn(4), "D5": Dn(5), "A2": A2(),
            "E8": E8()}
QS = [2, 3, 5, 14, 16, 300]
SQRT3 = np.sqrt(3.0)
BITS = {torch.float16: torch.int16, torch.float32: torch.int32,
        torch.float64: torch.int64}


def same_bits(a, b):
    """Equal as bit patterns (so -0.0 != +0.0), dtypes and shapes included."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype,
                                                        a.shape, b.shape)
    bits = BITS.get(a.dtype)
    if bits is None:
        return torch.equal(a.cpu(), b.cpu())
    return torch.equal(a.cpu().view(bits), b.cpu().view(bits))


def tie_rows(lat):
    """Hand-made points on Voronoi-cell boundaries of ``lat`` (exact in
    float32 and float64), one per row."""
    d = lat.dim
    e0 = np.eye(d)[0]
    rows = [np.full(d, 0.5), np.full(d, -0.5), np.full(d, 1.5),
            np.resize([0.5, -0.5, 2.5, -1.5], d), np.zeros(d), e0, -e0]
    if lat.family == "Dn":
        # odd sum after rounding and two (or more) equally bad coordinates:
        # the lowest index must move
        rows += [np.resize([0.6, 0.6, 1.0], d), np.resize([1.0, 0.3, 2.7, -0.3], d),
                 np.resize([-0.5, 0.5, 1.0], d), np.resize([2.0, 0.25, -0.75], d)]
    if lat.family == "E8":
        # equidistant from both cosets (d0 == d1): the integer coset wins
        rows += [np.full(8, 0.25), np.full(8, -0.25), np.full(8, 0.75),
                 np.resize([0.25, -0.25], 8), np.resize([0.25, 0.75, -0.25], 8)]
    if lat.family == "A2":
        # midpoints between the two cosets and within one
        rows += [np.array([0.25, SQRT3 / 4]), np.array([-0.25, SQRT3 / 4]),
                 np.array([0.75, -SQRT3 / 4]), np.array([0.5, 0.0]),
                 np.array([0.0, SQRT3 / 2])]
    return np.array(rows, dtype=np.float64)


def sample_points(lat, rng, m, scale):
    """Gaussian rows, then multiples of 1/4 (full of ties), then tie_rows."""
    d = lat.dim
    gauss = rng.normal(scale=scale, size=(m, d))
    quarters = rng.integers(-4 * scale, 4 * scale + 1, size=(m // 2, d)) / 4
    return np.concatenate([gauss, quarters, tie_rows(lat) * max(1, scale // 4)])


def tensor(a, dtype=torch.float64):
    # a copy: cached arrays (lattice generators) are read-only
    return torch.tensor(np.ascontiguousarray(a)).to(device=DEVICE, dtype=dtype)


# ------------------------------------------------------------ closest point
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(LATTICES))
def test_closest_point_matches_numba(name, dtype):
    lat = LATTICES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    x = tensor(sample_points(lat, rng, 300, 3), dtype)
    got = lat.closest_point(x, backend="triton")
    want = lat.closest_point(x, backend="numba")
    assert got.device == x.device
    assert same_bits(got, want)


@pytest.mark.parametrize("name", ["D5", "A2", "E8"])
def test_closest_point_tie_rules(name):
    """The tie rules themselves, not only agreement with numba."""
    lat = LATTICES[name]
    got = lat.closest_point(tensor(tie_rows(lat)), backend="triton").cpu().numpy()
    if name == "D5":
        # odd sum, all errors equal: coordinate 0 moves towards v (u >= f: up)
        np.testing.assert_array_equal(got[0], [0, 1, 1, 1, 1])  # all 1/2
        np.testing.assert_array_equal(got[5], [2, 0, 0, 0, 0])  # e0
        np.testing.assert_array_equal(got[6], [0, 0, 0, 0, 0])  # -e0
        np.testing.assert_array_equal(got[7], [0, 1, 1, 1, 1])  # 0.6, 0.6, 1, ...
    elif name == "E8":
        np.testing.assert_array_equal(got[7], np.zeros(8))      # all 1/4
        np.testing.assert_array_equal(got[9], np.ones(8))       # all 3/4
    else:
        np.testing.assert_array_equal(got[7], [0.0, 0.0])       # (1/4, sqrt3/4)
        np.testing.assert_array_equal(got[10], [1.0, 0.0])      # (1/2, 0): up


def test_closest_point_keeps_shape_strides_and_half_dtype():
    lat = E8()
    rng = np.random.default_rng(1)
    x = tensor(rng.normal(scale=2.0, size=(8, 3, 5)), torch.float32)
    x = x.transpose(0, 2)                           # (5, 3, 8), not contiguous
    assert not x.is_contiguous()
    got = lat.closest_point(x, backend="triton")
    assert got.shape == x.shape
    assert same_bits(got, lat.closest_point(x, backend="numba"))
    # float16 in, float16 out: rounded once from float64, as numba does (A2
    # points are not representable, so double rounding would show)
    h = tensor(rng.normal(scale=3.0, size=(200, 2)), torch.float16)
    assert same_bits(A2().closest_point(h, backend="triton"),
                     A2().closest_point(h, backend="numba"))
    empty = torch.empty((0, 8), device=DEVICE)
    assert lat.closest_point(empty, backend="triton").shape == (0, 8)


# ------------------------------------------------------------- Voronoi code
@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("name", list(LATTICES))
def test_voronoi_matches_numba(name, q):
    lat = LATTICES[name]
    d = lat.dim
    rng = np.random.default_rng(1000 * q + len(name))
    # v = x / beta spreads over about one coarse cell: some rows overload
    v = sample_points(lat, rng, 120, max(1, q // 3))
    dithers = {
        "none": None,
        "shared": rng.uniform(-0.5, 0.5, size=d),
        "per-row": tensor(rng.uniform(-0.5, 0.5, size=(len(v), d))),
    }
    # float32 with beta = 1/2: x / beta is exact, so the ties of v survive;
    # float64 with beta = 0.37: x / beta lands within an ulp of the ties of
    # v, on either side, so any change in how v is computed shows
    for dtype, beta in ((torch.float32, 0.5), (torch.float64, 0.37)):
        x = tensor(beta * v, dtype)
        for label, z in dithers.items():
            codes, over = VoronoiCode(lat, q, beta).encode(x, z, backend="triton")
            ref_codes, ref_over = VoronoiCode(lat, q, beta).encode(
                x, z, backend="numba")
            msg = f"{name} q={q} {dtype} dither={label}"
            assert codes.dtype == _torch_code_dtype(q), msg
            assert codes.device == x.device and over.device == x.device, msg
            assert torch.equal(codes.cpu(), ref_codes.cpu()), msg
            assert torch.equal(over.cpu(), ref_over.cpu()), msg
            assert int(codes.min()) >= 0 and int(codes.max()) < q, msg
            out = VoronoiCode(lat, q, beta).decode(codes, z, backend="triton")
            ref = VoronoiCode(lat, q, beta).decode(ref_codes, z, backend="numba")
            assert out.dtype == torch.float32 and same_bits(out, ref), msg
    # the test data must exercise both outcomes of the overload test
    assert 0 < int(ref_over.sum()) < len(v), (name, q, int(ref_over.sum()))


@pytest.mark.parametrize("name", list(LATTICES))
def test_decode_rows_float64_matches_numba_kernel(name):
    """The launcher with a float64 output: the float32 cast of the public
    decoder would hide most differences in the float64 arithmetic."""
    from nqlib.kernels.cpu import lattice as kern

    lat = LATTICES[name]
    rng = np.random.default_rng(11)
    m, d = 300, lat.dim
    for q in (3, 16, 300):
        codes = rng.integers(0, q, size=(m, d)).astype(np.int64)
        z = rng.uniform(-0.5, 0.5, size=(m, d))
        want = np.empty((m, d))
        if lat.family == "E8":
            kern.decode_e8_rows(codes, q, 0.37, z, want)
        else:
            kern.decode_rows(lat.kind, codes, q, 0.37, z, lat.generator, want)
        got = torch.empty((m, d), dtype=torch.float64, device=DEVICE)
        voronoi_triton.decode_rows(lat.kind, tensor(codes, torch.int64), q, 0.37,
                                   tensor(z), tensor(lat.generator), got)
        assert same_bits(got, torch.from_numpy(want)), (name, q)


@pytest.mark.parametrize("name", ["D5", "A2", "E8"])
def test_voronoi_decode_of_arbitrary_codes(name):
    lat = LATTICES[name]
    rng = np.random.default_rng(7)
    for q, cdt in [(3, torch.uint8), (300, torch.int16), (5, torch.int64)]:
        codes = tensor(rng.integers(0, q, size=(2, 40, lat.dim)), cdt)
        z = rng.uniform(-0.5, 0.5, size=(2, 40, lat.dim))
        code = VoronoiCode(lat, q, beta=0.3)
        got = code.decode(codes, z, backend="triton")
        assert got.shape == codes.shape
        assert same_bits(got, code.decode(codes, z, backend="numba"))
    # integer-valued float codes are accepted, as by the numpy path
    fcodes = codes.to(torch.float64)
    assert same_bits(code.decode(fcodes, backend="triton"),
                     code.decode(codes, backend="numba"))


def test_voronoi_e8_ties_and_shapes():
    """E8 inputs equidistant from both cosets and on the coarse-cell
    boundary, with leading dimensions."""
    lat = E8()
    rng = np.random.default_rng(3)
    for q in (2, 4):
        code = VoronoiCode(lat, q, beta=1.0)
        v = np.concatenate([tie_rows(lat), tie_rows(lat) * q / 2,
                            rng.integers(-2 * q, 2 * q + 1, size=(30, 8)) / 4])
        x = tensor(v[: 4 * (len(v) // 4)].reshape(4, -1, 8))
        codes, over = code.encode(x, backend="triton")
        ref_codes, ref_over = code.encode(x, backend="numba")
        assert codes.shape == x.shape and over.shape == x.shape[:-1]
        assert torch.equal(codes.cpu(), ref_codes.cpu())
        assert torch.equal(over.cpu(), ref_over.cpu())
        assert same_bits(code.decode(codes, backend="triton"),
                         code.decode(ref_codes, backend="numba"))


# ------------------------------------------------------------------- errors
def test_launchers_reject_bad_tensors():
    x = torch.zeros((16, 8), device=DEVICE)
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="contiguous"):
        lattice_triton.closest_point_rows(lattice_triton.E8, x.t().contiguous().t(),
                                          out)
    with pytest.raises(ValueError, match="dtype"):
        lattice_triton.closest_point_rows(lattice_triton.E8, x.to(torch.int32), out)
    with pytest.raises(ValueError, match="dimension"):
        lattice_triton.closest_point_rows(lattice_triton.A2, x, out)
    with pytest.raises(ValueError, match="one device"):
        lattice_triton.closest_point_rows(lattice_triton.E8, x,
                                          torch.empty((16, 8), device="meta"))

    G = torch.as_tensor(E8().generator, device=DEVICE)
    z = torch.zeros((1, 8), dtype=torch.float64, device=DEVICE)
    codes = torch.empty((16, 8), dtype=torch.uint8, device=DEVICE)
    over = torch.empty(16, dtype=torch.bool, device=DEVICE)
    args = (lattice_triton.E8, x, 4, 1.0, z, G, G)
    with pytest.raises(ValueError, match="codes must have dtype"):
        voronoi_triton.encode_rows(*args, codes.float(), over)
    with pytest.raises(ValueError, match="cannot hold"):
        voronoi_triton.encode_rows(lattice_triton.E8, x, 300, 1.0, z, G, G, codes,
                                   over)
    with pytest.raises(ValueError, match="overload"):
        voronoi_triton.encode_rows(*args, codes, over.to(torch.uint8))
    with pytest.raises(ValueError, match="z must have dtype"):
        voronoi_triton.encode_rows(lattice_triton.E8, x, 4, 1.0, z.float(), G, G,
                                   codes, over)
    with pytest.raises(ValueError, match="1 or 16 rows"):
        voronoi_triton.encode_rows(lattice_triton.E8, x, 4, 1.0, z.expand(3, 8)
                                   .contiguous(), G, G, codes, over)
    with pytest.raises(ValueError, match="contiguous"):
        voronoi_triton.decode_rows(lattice_triton.E8, codes.t().contiguous().t(),
                                   4, 1.0, z, G, x)
    with pytest.raises(ValueError, match="codes must have dtype"):
        voronoi_triton.decode_rows(lattice_triton.E8, x, 4, 1.0, z, G, x)


def test_public_api_rejects_bad_tensors():
    lat = E8()
    code = VoronoiCode(lat, 4)
    ints = torch.ones((3, 8), dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="floating"):
        lat.closest_point(ints, backend="triton")
    with pytest.raises(ValueError, match="floating"):
        code.encode(ints, backend="triton")
    with pytest.raises(ValueError, match="NaN"):
        code.encode(torch.full((2, 8), math.nan, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="dither"):
        code.encode(ints.double(), torch.zeros((2, 8)), backend="triton")
    with pytest.raises(ValueError, match=r"\[0, q\)"):
        code.decode(ints * 4, backend="triton")
    with pytest.raises(ValueError, match="integers"):
        code.decode(ints * 0.5, backend="triton")
    with pytest.raises(ValueError, match="integers"):
        code.decode(ints.bool(), backend="triton")
    with pytest.raises(ValueError, match="last dimension"):
        code.decode(ints[:, :4], backend="triton")


def test_triton_unusable_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(_backend, "triton_usable", lambda: False)
    x = torch.zeros((2, 8), device=DEVICE)
    code = VoronoiCode(E8(), 4)
    calls = [lambda: E8().closest_point(x, backend="triton"),
             lambda: code.encode(x, backend="triton"),
             lambda: code.decode(x.long(), backend="triton")]
    for call in calls:
        with pytest.raises(RuntimeError, match="CUDA device.*TRITON_INTERPRET"):
            call()
    # and "auto" falls back to numba instead of failing
    assert same_bits(E8().closest_point(x), torch.zeros_like(x))


def test_launches_disable_fp_fusion(monkeypatch):
    """Every launch passes enable_fp_fusion=False (the interpreter ignores
    it, so record it)."""
    seen = []

    def recording(kernel):
        class Recorder:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    seen.append(kwargs.get("enable_fp_fusion"))
                    return kernel[grid](*args, **kwargs)
                return launch
        return Recorder()

    monkeypatch.setattr(lattice_triton, "_closest_point_kernel",
                        recording(lattice_triton._closest_point_kernel))
    for name in ("_encode_kernel", "_decode_kernel"):
        monkeypatch.setattr(voronoi_triton, name,
                            recording(getattr(voronoi_triton, name)))
    x = torch.zeros((4, 8), device=DEVICE)
    code = VoronoiCode(E8(), 4)
    E8().closest_point(x, backend="triton")
    code.decode(code.encode(x, backend="triton")[0], backend="triton")
    assert seen == [False, False, False]


# ------------------------------------------------------- compiled for a GPU
PTX_SCRIPT = textwrap.dedent(r"""
    import re, sys
    import triton
    from triton.backends import backends
    if "nvidia" not in backends:
        print("SKIP no nvidia backend"); sys.exit(0)
    from triton.backends.compiler import GPUTarget
    from nqlib.kernels.gpu import lattice_triton as L, voronoi_triton as V

    def compile_ptx(fn, sig, n, kind):
        dp, block_m = L.tile_shape(n)
        cx = dict(KIND=kind, N=n, DP=dp, BLOCK_M=block_m)
        sig = {**sig, **{k: "constexpr" for k in cx}}
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cx)
        opts = {"enable_fp_fusion": False}
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=opts).asm["ptx"]

    def opcodes(ptx):
        ops = []
        for line in ptx.splitlines():
            toks = line.split()
            if toks and toks[0].startswith("@"):          # predicate guard
                toks = toks[1:]
            if line.startswith("\t") and toks and not toks[0].startswith(
                    ("//", ".", "{", "}")):
                ops.append(toks[0])
        return ops

    f64 = "*fp64"
    sigs = {
        "closest": (L._closest_point_kernel, dict(
            x_ptr="*fp32", out_ptr="*fp32", consts_ptr=f64, M="i32")),
        "encode": (V._encode_kernel, dict(
            x_ptr="*fp32", z_ptr=f64, g_ptr=f64, ginv_ptr=f64, consts_ptr=f64,
            codes_ptr="*u8", overload_ptr="*i1", M="i32", q="i32",
            z_row_stride="i32")),
        "decode": (V._decode_kernel, dict(
            codes_ptr="*i16", z_ptr=f64, g_ptr=f64, consts_ptr=f64,
            out_ptr="*fp32", M="i32", q="i32", z_row_stride="i32")),
    }
    for kind, n in [(L.ZN, 4), (L.DN, 5), (L.E8, 8), (L.A2, 2)]:
        for op, (fn, sig) in sigs.items():
            ptx = compile_ptx(fn, sig, n, kind)
            code = opcodes(ptx)
            bad = sorted({c for c in code if c.startswith("fma") or ".ftz" in c
                          or ".approx" in c or ".full" in c})
            assert not bad, (op, kind, bad)
            assert "cvt.rmi.f64.f64" in code, (op, kind)      # floor, float64
            if op != "closest" or kind == L.A2:
                assert "div.rn.f64" in code, (op, kind)       # IEEE division
            print(op, kind, "ok")
""")


def test_kernels_compile_for_sm90_without_fma():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", PTX_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    if res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    assert res.stdout.count(" ok") == 12, res.stdout
