"""CPU linear layers: nqlib's fused decode-matmul against torch's kernels.

For each weight shape (``in x out``) and batch, in one process and
interleaved, the script times

* ``fp32``  -- ``torch.nn.Linear`` in float32 (the reference of the ratios);
* ``bf16``  -- the same layer in bfloat16 (bfloat16 activations);
* ``int4``  -- torch's int4 weight-only kernel
  (``torch.ops.aten._weight_int4pack_mm_for_cpu``, groups of 128 -- 64 for
  ``in_features = 576`` --, weights
  packed by ``_convert_weight_to_int4pack_for_cpu``, bfloat16 activations:
  what torchao runs on CPU; its float32-activation path is ~15x slower);
* ``int8``  -- torch's int8 weight-only kernel
  (``torch.ops.aten._weight_int8pack_mm``, bfloat16 activations);
* ``nq-W4`` -- :class:`nqlib.nn.QuantLinear` at 4 bits per entry, fixed mode
  (the fused numba kernel on its CPU layout), float32 activations;
* ``nq-W4A4`` -- the same layer with its inputs quantized at 4 bits per entry
  on every call (fixed-mode activations; the activation encoder is timed
  inside the call, its cache cleared each time);
* ``nq-T2``, ``nq-T4`` -- :class:`nqlib.nn.QuantLinear` with a trellis-coded
  weight (``mode="trellis"``, the default ``L`` and sequence length) at 2
  and 4 bits per entry: the fused numba kernel of
  :mod:`nqlib.kernels.cpu.trellis_fused` on the packed stream, float32
  activations. The stream is drawn at random unless ``--trellis-encode``:
  every stream is a code word of the trellis, the kernel's work does not
  depend on its bits, and the Viterbi encode of a 4096 x 4096 layer takes
  minutes (the rest of the file -- means, norms, scales -- is the real
  pipeline's).

Columns: ``ms`` (best of the rounds' medians), ``x_fp32`` / ``x_int4``
(speed-up: the reference's time over this one's), ``res_MB`` (bytes the
module keeps: weights, side information, bias), ``res/fp32`` (over the
float32 layer's, bias included on both sides), ``w/fp32w`` (the same
without the bias: weight bytes and all their side information over the
float32 weight), ``roof_ms`` (the weight bytes one call reads divided by the
memory bandwidth measured here by a large array copy: the time of a purely
memory-bound kernel streaming from DRAM; weights that fit the last-level
cache can beat it) and ``x_roof`` (ms / roof_ms). Every configuration runs
with one thread and with all threads (``torch.set_num_threads`` and
``numba.set_num_threads``).

Usage: ``python benchmarks/cpu_linear.py [--quick] [--json PATH]
[--shapes NAME ...] [--batches M ...] [--threads T ...] [--trellis-encode]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
from _harness import machine_line, print_table

#: (name, in_features, out_features)
SHAPES = [
    ("4096x4096", 4096, 4096),
    ("4096x11008", 4096, 11008),
    ("11008x4096", 11008, 4096),
    ("MiniLM qkvo", 384, 384),
    ("MiniLM up", 384, 1536),
    ("MiniLM down", 1536, 384),
    ("SmolLM2 qo", 576, 576),
    ("SmolLM2 kv", 576, 192),
    ("SmolLM2 up", 576, 1536),
    ("SmolLM2 down", 1536, 576),
]
QUICK_SHAPES = ["4096x4096", "MiniLM qkvo", "MiniLM up", "MiniLM down"]
BATCHES = (1, 4, 16, 64)
QUICK_BATCHES = (1, 16)
GROUP = 128
SEED = 20251203


def memory_bandwidth(nbytes=1 << 28, repeat=5):
    """Bytes per second of a large array copy (read + write), best of
    ``repeat``, one thread (numpy)."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def timed(fns, rounds, calls):
    """For each named callable: the best over ``rounds`` of the median of
    ``calls`` timed calls, the callables interleaved (a busy machine then
    slows them alike). Returns seconds per call."""
    for fn in fns.values():
        fn()                                    # warm up, compile
    best = dict.fromkeys(fns, np.inf)
    for _ in range(rounds):
        for name, fn in fns.items():
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            best[name] = min(best[name], statistics.median(times))
    return best


def int4_group(K):
    """Groups of 128 inputs, or of 64 when ``K`` is not a multiple of 128
    (SmolLM2's 576)."""
    return GROUP if K % GROUP == 0 else GROUP // 2


def int4_pack(W):
    """torchao's CPU int4 weight-only format: asymmetric 4-bit codes per
    group of inputs (:func:`int4_group`), bfloat16 scales and zeros."""
    import torch

    N, K = W.shape
    g = int4_group(K)
    Wg = W.reshape(N, K // g, g)
    lo, hi = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-8) / 15
    zero = lo + 8 * scale
    q = ((Wg - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([scale.reshape(N, -1).t(), zero.reshape(N, -1).t()],
                     dim=-1).contiguous().bfloat16()
    return packed, sz


def trellis_layer(W, bias, rate, rng, encode=False):
    """A QuantLinear with a trellis-coded weight at ``rate`` (the module's
    default ``L`` and sequence length). Without ``encode`` the stream is
    drawn at random instead of by the Viterbi search (see the module
    docstring); everything else is what :func:`nqlib.quantize` makes."""
    from nqlib.nn import QuantLinear
    from nqlib.quantizers import trellis as tq
    from nqlib.quantizers.matrix import quantize
    from nqlib.quantizers.payloads import TrellisPayload

    a, n = W.shape
    real = tq.encode_matrix

    def random_stream(Y, budget_bits, *, sketch, **_):
        total, keep = tq.budget_plan(budget_bits, *Y.shape, sketch=sketch)
        lay = tq.layout(*Y.shape, keep, total, tq.DEFAULT_SEQ_LEN)
        L = tq.choose_L(lay, tq.DEFAULT_L)
        lay.check(L)
        packed = rng.integers(0, 256, -(-total // 8), dtype=np.uint8)
        if total % 8:              # the padding bits of the stream are zero
            packed[-1] &= np.uint8((0xFF << (8 - total % 8)) & 0xFF)
        beta = tq.scale_grid(total / (Y.shape[0] * keep))[1]
        payload = TrellisPayload(L=L, qbits=tq.TABLE_BITS,
                                 seq_len=tq.DEFAULT_SEQ_LEN, keep=keep,
                                 beta=float(beta), total_bits=total,
                                 packed=packed)
        return payload, tq.decode(payload, *Y.shape)

    if not encode:
        tq.encode_matrix = random_stream
    try:
        qm = quantize(W.double().numpy().T, rate, mode="trellis", seed=SEED)
    finally:
        tq.encode_matrix = real
    return QuantLinear(n, a, qm, bias)


def build(n, a, rng, trellis_encode=False):
    """The float layer and its quantized versions for a random weight."""
    import torch

    from nqlib.nn import QuantLinear
    from nqlib.quantizers.matrix import quantize

    W = torch.from_numpy((rng.standard_normal((a, n)) / np.sqrt(n))
                         .astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal(a).astype(np.float32) * 0.1)
    lin = torch.nn.Linear(n, a)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(bias)
    lin_bf16 = torch.nn.Linear(n, a).bfloat16()
    with torch.no_grad():
        lin_bf16.weight.copy_(W)
        lin_bf16.bias.copy_(bias)
    packed, sz = int4_pack(W)
    w8 = torch.clamp(torch.round(W / W.abs().amax(1, keepdim=True) * 127),
                     -127, 127).to(torch.int8)
    s8 = (W.abs().amax(1) / 127).bfloat16()
    qm = quantize(W.double().numpy().T, 4.0, mode="fixed", seed=SEED)
    w4 = QuantLinear(n, a, qm, bias)
    w4a4 = QuantLinear(n, a, qm, bias, act_rate=4.0, act_mode="fixed")
    del qm
    t2 = trellis_layer(W, bias, 2.0, rng, trellis_encode)
    t4 = trellis_layer(W, bias, 4.0, rng, trellis_encode)
    return dict(lin=lin, lin_bf16=lin_bf16, packed=packed, sz=sz, w8=w8, s8=s8,
                bias=bias, w4=w4, w4a4=w4a4, t2=t2, t4=t4)


def weight_bytes(m, n, a):
    """(bytes one call reads, bytes the module keeps, of which bias) per
    method."""
    bias = 4 * a
    lay = m["w4"].cpu_layout
    nq_read = lay.code_nbytes + lay.tab.nbytes + 8 * a
    int4 = m["packed"].numel() + m["sz"].numel() * 2
    int8 = n * a + 2 * a

    def trellis_read(ql):  # the stream, means and norms, the quantile table
        return ql.cpu_layout.code_nbytes + 8 * a + 4 * 4096

    return {
        "fp32": (4 * n * a, 4 * n * a + bias, bias),
        "bf16": (2 * n * a, 2 * n * a + 2 * a, 2 * a),
        "int4": (int4, int4 + bias, bias),
        "int8": (int8, int8 + bias, bias),
        "nq-W4": (nq_read, m["w4"].resident_nbytes, bias),
        "nq-W4A4": (nq_read, m["w4a4"].resident_nbytes, bias),
        "nq-T2": (trellis_read(m["t2"]), m["t2"].resident_nbytes, bias),
        "nq-T4": (trellis_read(m["t4"]), m["t4"].resident_nbytes, bias),
    }


def callables(m, x):
    """The timed calls for the layers ``m`` and the float32 input ``x``."""
    import torch

    xb = x.bfloat16()
    w4a4 = m["w4a4"]

    def nq_w4a4():
        w4a4.act_cache.clear()     # quantize the input on every call
        return w4a4(x)

    ops = torch.ops.aten
    return {
        "fp32": lambda: m["lin"](x),
        "bf16": lambda: m["lin_bf16"](xb),
        "int4": lambda: ops._weight_int4pack_mm_for_cpu(
            xb, m["packed"], int4_group(x.shape[1]), m["sz"]) + m["bias"],
        "int8": lambda: ops._weight_int8pack_mm(xb, m["w8"], m["s8"]) + m["bias"],
        "nq-W4": lambda: m["w4"](x),
        "nq-W4A4": nq_w4a4,
        "nq-T2": lambda: m["t2"](x),
        "nq-T4": lambda: m["t4"](x),
    }


def run(shapes, batches, thread_counts, rounds, calls, progress=True,
        trellis_encode=False):
    import numba
    import torch

    rng = np.random.default_rng(SEED)
    bw = memory_bandwidth()
    rows = []
    for name, n, a in [s for s in SHAPES if s[0] in shapes]:
        t0 = time.perf_counter()
        m = build(n, a, rng, trellis_encode)
        if progress:
            print(f"# {name}: built in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        nbytes = weight_bytes(m, n, a)
        for threads in thread_counts:
            torch.set_num_threads(threads)
            numba.set_num_threads(threads)
            for M in batches:
                x = torch.from_numpy(rng.standard_normal((M, n)).astype(np.float32))
                fns = callables(m, x)
                with torch.no_grad():
                    t = timed(fns, rounds, calls)
                for method, sec in t.items():
                    read, resident, bias_bytes = nbytes[method]
                    roof = read / bw
                    rows.append(dict(
                        shape=name, batch=M, threads=threads, method=method,
                        ms=1e3 * sec, x_fp32=t["fp32"] / sec,
                        x_int4=t["int4"] / sec, res_MB=resident / 1e6,
                        **{"res/fp32": resident / nbytes["fp32"][1],
                           "w/fp32w": (resident - bias_bytes) / (4 * n * a)},
                        roof_ms=1e3 * roof, x_roof=sec / roof))
                if progress:
                    print(f"# {name} batch {M} threads {threads}: " + ", ".join(
                        f"{k} {1e3 * v:.3f} ms" for k, v in t.items()), flush=True)
    return rows, bw


def main():
    import numba
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="4096x4096 and MiniLM shapes, batches 1 and 16, "
                             "fewer repeats")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="shape names (default: all, or the quick ones)")
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--threads", nargs="+", type=int, default=None)
    parser.add_argument("--trellis-encode", action="store_true",
                        help="encode the trellis layers by the Viterbi search "
                             "(minutes per 4096 x 4096 layer) instead of "
                             "drawing their streams")
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else [s[0] for s in SHAPES]
    if args.shapes:
        known = [s[0] for s in SHAPES]
        bad = [s for s in args.shapes if s not in known]
        if bad:
            parser.error(f"unknown shapes {bad}; known: {known}")
        shapes = args.shapes
    batches = args.batches or (QUICK_BATCHES if args.quick else BATCHES)
    most = min(os.cpu_count() or 1, numba.config.NUMBA_NUM_THREADS)
    thread_counts = (1,) if most == 1 else (1, most)
    if args.threads:
        thread_counts = tuple(args.threads)
    rounds, calls = (3, 5) if args.quick else (5, 7)
    print(f"CPU linear layers; {machine_line()}; torch {torch.__version__}, "
          f"threads {thread_counts}; trellis streams "
          f"{'encoded' if args.trellis_encode else 'drawn at random'}")
    rows, bw = run(shapes, batches, thread_counts, rounds, calls,
                   trellis_encode=args.trellis_encode)
    print(f"\nmemory bandwidth (one-thread array copy): {bw / 1e9:.1f} GB/s")
    print_table(rows, ["shape", "batch", "threads", "method", "ms", "x_fp32",
                       "x_int4", "res_MB", "res/fp32", "w/fp32w", "roof_ms",
                       "x_roof"])
    # thread scaling and the targets (4096 x 4096)
    by = {(r["shape"], r["batch"], r["threads"], r["method"]): r for r in rows}
    if len(thread_counts) > 1:
        print("\nthread scaling (time with 1 thread / time with "
              f"{thread_counts[-1]}):")
        scale = []
        for (shape, M, th, method), r in by.items():
            if th == 1 and (shape, M, thread_counts[-1], method) in by:
                other = by[(shape, M, thread_counts[-1], method)]
                scale.append(dict(shape=shape, batch=M, method=method,
                                  speedup=r["ms"] / other["ms"]))
        print_table(scale)
    if ("4096x4096", 1, 1, "nq-W4") in by:
        r1 = by[("4096x4096", 1, 1, "nq-W4")]
        print(f"\ntarget batch 1, one thread: x_fp32 {r1['x_fp32']:.2f} "
              f"(>= 2.5: {'met' if r1['x_fp32'] >= 2.5 else 'NOT met'}), "
              f"int4 time / nqlib time {r1['x_int4']:.2f} (>= 1/1.3: "
              f"{'met' if r1['x_int4'] >= 1 / 1.3 else 'NOT met'})")
        if ("4096x4096", 16, 1, "nq-W4") in by:
            r16 = by[("4096x4096", 16, 1, "nq-W4")]
            print(f"target batch 16, one thread: x_fp32 {r16['x_fp32']:.2f} "
                  f"(>= 1: {'met' if r16['x_fp32'] >= 1 else 'NOT met'})")
        for method in ("nq-T2", "nq-T4"):
            parts = [f"batch {M}: x_fp32 {by[key]['x_fp32']:.3f}"
                     for M in (1, 16)
                     if (key := ("4096x4096", M, 1, method)) in by]
            print(f"trellis {method}, one thread: " + ", ".join(parts)
                  + f"; weight bytes {by[('4096x4096', 1, 1, method)]['w/fp32w']:.4f}"
                  " of the fp32 weight")
        w = r1["w/fp32w"]
        print(f"target resident bytes (weight and all its side information, "
              f"bias apart): {w:.4f} of the fp32 weight (<= 0.16: "
              f"{'met' if w <= 0.16 else 'NOT met'}); with the bias on both "
              f"sides {r1['res/fp32']:.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine_line(), "bandwidth": bw, "rows": rows},
                      fh, indent=1)


if __name__ == "__main__":
    main()
