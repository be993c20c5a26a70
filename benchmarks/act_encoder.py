"""W4A4 on CPU: the activation encoder against the weight product, by width.

A W4A4 layer quantizes its input on every call; on a CPU the decoded input
rows then meet the weight in the same fused kernel as W4's, so everything
W4A4 adds to W4 is the activation code. Its cost per input entry is the same
for every layer, while the product's grows with the layer's outputs. For
each layer shape (``in x out``) and batch ``B``, in one process, one thread,
interleaved, the script times

* ``P``   -- :class:`nqlib.nn.QuantLinear` W4 (fixed mode): the product;
* ``A``   -- the same layer with ``act_rate=4`` (its activation cache
  cleared before each call) minus ``P``: what the activation code adds;
* ``Ek``  -- the multiscale E8 encoder alone
  (:func:`nqlib.kernels.cpu.nested.encode_multiscale_rows`, decoded blocks
  included) on ``B * in / 8`` Gaussian blocks, with the scales of the code
  the layer's activations use (``k`` of them: an E8 search per scale);
* ``E1``  -- the same encoder with one scale: the cheapest E8 Voronoi code
  (no scale to choose), a floor for any code of this kind.

All in ns per input entry, and over ``P``. A second table gives the
distortion the one-scale code would cost: the mean squared error per entry on
N(0, 1) blocks (the normalised, rotated rows look like them) of the
activations' code and of the best one-scale code with the same word length
(its ``q`` the largest with ``q^8 <= 2^L``, its scale the best of a grid),
measured on the same seeded blocks.

Usage: ``python benchmarks/act_encoder.py [--shapes NAME ...] [--batches B
...] [--rounds R] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import numpy as np
from _harness import best_time, machine_line, print_table

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

#: (name, in_features, out_features): the layers of MiniLM and SmolLM2, and
#: the 4096 x 4096 of the CPU issue's targets
SHAPES = [
    ("MiniLM qkvo", 384, 384),
    ("MiniLM up", 384, 1536),
    ("MiniLM down", 1536, 384),
    ("SmolLM2 kv", 576, 192),
    ("SmolLM2 qo", 576, 576),
    ("SmolLM2 up", 576, 1536),
    ("SmolLM2 down", 1536, 576),
    ("4096x4096", 4096, 4096),
]
SEED = 20261205
MSE_BLOCKS = 16384


def layers(n, a, rng):
    """W4 and W4A4 layers sharing one quantized random weight."""
    import torch

    from nqlib.nn import QuantLinear
    from nqlib.quantizers.matrix import quantize

    W = rng.standard_normal((a, n)) / np.sqrt(n)
    bias = torch.from_numpy(rng.standard_normal(a).astype(np.float32) * 0.1)
    qm = quantize(W.T, 4.0, mode="fixed", seed=SEED)
    return (QuantLinear(n, a, qm, bias),
            QuantLinear(n, a, qm, bias, act_rate=4.0, act_mode="fixed"))


def act_parts(n, batch, rng):
    """The fixed-mode parts (``hi``, ``lo``) that code ``batch`` rows of
    ``n`` activations, and the number of blocks of each."""
    from nqlib.quantizers.matrix import FixedRowsQuantizer

    qm = FixedRowsQuantizer(4.0, stream=True)(
        rng.standard_normal((batch, n)).astype(np.float32))
    pay = qm.payload
    blocks = qm.n_pad // 8
    return [(p, batch * nb) for p, nb in ((pay.hi, pay.h), (pay.lo, blocks - pay.h))
            if nb > 0]


def encoder(q, betas, x):
    """A call of the multiscale encoder on the blocks ``x`` (m, 8)."""
    from nqlib.kernels.cpu.nested import encode_multiscale_rows

    m = x.shape[0]
    z = np.zeros((1, 8))
    codes = np.empty((m, 8), np.int64)
    index = np.empty(m, np.int64)
    sqerr = np.empty(m)
    dec = np.empty((m, 8))
    b = np.asarray(betas, np.float64)

    def call():
        encode_multiscale_rows(x, q, b, z, codes, index, sqerr, dec)
        return dec
    return call


def callables(w4, w4a4, x, parts, rng):
    """The timed calls: the W4 layer, the W4A4 layer (quantizing its input
    on every call), and the encoder alone on as many Gaussian blocks as the
    input's parts code, with their scales (``Ek``) and with the one-scale
    code of each part's word length (``E1``)."""
    runs = {"k": [], "1": []}
    for p, nb in parts:
        blocks = rng.standard_normal((nb, 8))
        runs["k"].append(encoder(p.q, p.betas, blocks))
        q1, beta1 = one_scale(p.L)[:2]
        runs["1"].append(encoder(q1, [beta1], blocks))

    def w4a4_call():
        w4a4.act_cache.clear()      # quantize the input on every call
        return w4a4(x)

    def run_all(fns):
        return lambda: [f() for f in fns]

    return {"P": lambda: w4(x), "W4A4": w4a4_call, "Ek": run_all(runs["k"]),
            "E1": run_all(runs["1"])}


def timed(fns, rounds):
    """Best per-call seconds of each callable over ``rounds`` interleaved
    rounds (each round one :func:`_harness.best_time` measurement)."""
    best = dict.fromkeys(fns, np.inf)
    for _ in range(rounds):
        for name, f in fns.items():
            best[name] = min(best[name], best_time(f, repeat=1, min_time=0.02))
    return best


@functools.cache
def one_scale(L):
    """``(q, beta, mse, designed mse)``: the best one-scale code with
    ``L``-bit words (``q`` the largest with ``q^8 <= 2^L``, ``beta`` the best
    of the design's grid) and the MSE per entry of it and of the designed
    ``L``-bit code, on the same seeded N(0, 1) blocks."""
    from nqlib.quantizers.fixed import GRID, fixed_code

    x = np.random.default_rng(SEED + L).standard_normal((MSE_BLOCKS, 8))
    code = fixed_code(L)
    mse_k = float(np.mean((encoder(code.q, code.betas, x)() - x) ** 2))
    q1 = 2
    while (q1 + 1) ** 8 <= 1 << L:
        q1 += 1
    best = (np.inf, 0.0)
    for g in GRID:
        beta = float(np.float32(g / q1))
        best = min(best, (float(np.mean((encoder(q1, [beta], x)() - x) ** 2)),
                          beta))
    return q1, best[1], best[0], mse_k


def mse_table(Ls):
    """One row per word length: the designed code against the one-scale
    one."""
    from nqlib.quantizers.fixed import fixed_code

    rows = []
    for L in sorted(Ls):
        code = fixed_code(L)
        q1, beta1, mse1, mse_k = one_scale(L)
        rows.append(dict(L=L, q=code.q, k=code.k, mse=mse_k, q1=q1,
                         beta1=beta1, mse1=mse1, dB=10 * np.log10(mse1 / mse_k)))
    return rows


def main():
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="shape names (default: all)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    names = {s[0] for s in SHAPES}
    if args.shapes:
        unknown = set(args.shapes) - names
        if unknown:
            parser.error(f"unknown shapes {sorted(unknown)}; known: {sorted(names)}")
    if any(b < 1 for b in args.batches) or args.rounds < 1:
        parser.error("batches and rounds must be >= 1")
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes]
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    threadpool_limits(1)
    rng = np.random.default_rng(SEED)
    rows, Ls = [], set()
    with torch.inference_mode():
        for name, n, a in shapes:
            w4, w4a4 = layers(n, a, rng)
            for batch in args.batches:
                x = torch.from_numpy(rng.standard_normal((batch, n)).astype(np.float32))
                parts = act_parts(n, batch, rng)
                Ls.update(p.L for p, _ in parts)
                t = timed(callables(w4, w4a4, x, parts, rng), args.rounds)
                ks = "/".join(str(len(p.betas)) for p, _ in parts)
                per = 1e9 / (batch * n)
                P, A = t["P"] * per, (t["W4A4"] - t["P"]) * per
                Ek, E1 = t["Ek"] * per, t["E1"] * per
                rows.append(dict(shape=name, batch=batch, k=ks, P_ns=P, A_ns=A,
                                 A_over_P=A / P, Ek_ns=Ek, Ek_over_P=Ek / P,
                                 E1_ns=E1, E1_over_P=E1 / P))
                print(f"# {name} batch {batch}: P {P:.2f}, A {A:.2f}, Ek {Ek:.2f},"
                      f" E1 {E1:.2f} ns per input entry", flush=True)
    print(f"\nW4A4 activation code against the W4 product, ns per input entry; "
          f"{machine_line()}; torch {torch.__version__}; one thread; best of "
          f"{args.rounds} interleaved rounds")
    print_table(rows)
    mse = mse_table(Ls)
    print(f"\nMSE per entry on {MSE_BLOCKS} N(0, 1) blocks: the activations' codes "
          "(q, k scales) against the best one-scale code of the same word length")
    print_table(mse)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine_line(), torch=torch.__version__,
                           rows=rows, mse=mse), f, indent=1)


if __name__ == "__main__":
    main()
