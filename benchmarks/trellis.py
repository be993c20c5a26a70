"""The trellis mode (``mode="trellis"``) against nqlib's fixed E8 mode.

Rows (``--rows``): iid N(0, 1) matrices A (n x a), B (n x b), both quantized
at target rate R in 1..6 with the same seed, ``C_hat = nqlib.inner_products(QA, QB)``:

* ``bits``  -- ``8 (nbytes_A + nbytes_B) / (n (a + b))``: every byte of both
  files;
* ``D``     -- ``||A^T B - C_hat||_F^2 / (n a b)``;
* ``gap``   -- ``bits - Gamma^{-1}(D)`` (:func:`nqlib.theory.gamma_inv`);
* ``enc_s`` -- seconds to quantize A (all threads).

Decode (``--decode``): the numba decoder of a trellis payload on one thread
(``numba.set_num_threads(1)``) in M weights/s, by wall time and by the
process's CPU time (the machine may be shared), and the full parse +
``dequantize()`` of the trellis and fixed files, the latter as a ratio to
the fixed mode measured in the same process.

Layer (``--layer``): the encode time of one 4096 x 4096 Gaussian layer at
the default L with every thread numba has, at R = 2, 3, 4 (or ``--rates``):
``layer_rates``, and ``layer`` the one at R = 2.

Compare (``--compare``): the Viterbi encoder against the one it replaced
(the tournament kernel, copied below as the reference): ``nqlib.quantize``
of one 4096 x ``--cols`` Gaussian matrix at L = 15 and 16 (``--Ls``) and
R = 2, 4 (``--rates``), old and new interleaved in this process, best of
``--repeat``, by wall time and by the process's CPU time (all threads: on
a shared machine the wall time counts other processes' turns); the two
files must be identical byte for byte.

Sweep (``--sweep``): the coded-domain gap ``1/2 log2(D / 2^(-2r))`` and the
Viterbi cost per weight for L = 12..17 at r = 2, 3, 4 bits per coded entry
-- the measurement behind ``trellis.DEFAULT_L``.

Usage: ``python benchmarks/trellis.py [--rows] [--decode] [--layer]
[--sweep] [--compare] [--quick] [--L L] [--Ls L,..] [--rates R,..]
[--cols C] [--repeat N] [--json PATH]`` (no flag: rows and decode).
``--json`` updates the sections of an existing file, so the parts can be
measured in separate runs.
"""

from __future__ import annotations

import argparse
import json
import time

import numba
import numpy as np
from _harness import best_time, machine_line, print_table
from numba import njit, prange

import nqlib
from nqlib.kernels.cpu import trellis as kern
from nqlib.quantizers import trellis as tq
from nqlib.theory import gamma, gamma_inv

RATES = (1, 2, 3, 4, 5, 6)
MODES = ("trellis", "fixed")
SEED = 1
#: issue 17's targets
GAP_TARGET = 0.12
DECODE_TARGET_MPS = 100.0
LAYER_TARGET_S = 300.0
#: state bits of --sweep
SWEEP_LS = (12, 13, 14, 15, 16, 17)


def rows(n, a, b, rates) -> list[dict]:
    rng = np.random.default_rng(20250601)
    A = rng.standard_normal((n, a))
    B = rng.standard_normal((n, b))
    out = []
    for rate in rates:
        for mode in MODES:
            t0 = time.perf_counter()
            QA = nqlib.quantize(A, rate, seed=SEED, mode=mode)
            enc = time.perf_counter() - t0
            QB = nqlib.quantize(B, rate, seed=SEED, mode=mode)
            D = nqlib.matmul_distortion(A, B, nqlib.inner_products(QA, QB))
            bits = 8.0 * (QA.nbytes + QB.nbytes) / (n * (a + b))
            out.append({"mode": mode, "R": rate, "bits": bits, "D": D,
                        "D/Gamma": D / gamma(bits),
                        "gap": float(bits - gamma_inv(D)) if 0 < D <= 1 else None,
                        "enc_s": enc})
            print(".", end="", flush=True)
    print()
    return out


def decode_speed(n, a, repeat) -> dict:
    """One-thread decode speeds, trellis kernel and full dequantize."""
    numba.set_num_threads(1)
    A = np.random.default_rng(5).standard_normal((n, a))
    Q = {m: nqlib.quantize(A, 2.0, seed=SEED, mode=m) for m in MODES}
    p = Q["trellis"].payload
    lay = tq.layout(a, Q["trellis"].n_pad, p.keep, p.total_bits, p.seq_len)
    data = np.zeros(p.packed.size + 8, dtype=np.uint8)
    data[:p.packed.size] = p.packed
    out = np.zeros(a * Q["trellis"].n_pad, dtype=np.float32)
    args = (data, lay.starts, lay.lengths, lay.bits, lay.offsets, p.L,
            tq.hash_multiplier(), tq.HASH_SHIFT, p.qbits,
            tq.quantile_table(p.qbits), np.float32(p.beta), out)
    t_kernel = best_time(kern.decode_sequences, *args, repeat=repeat)
    # on a shared machine the wall time counts other processes' turns: the
    # CPU time of this (one-thread) process is the kernel's own
    cpu = []
    for _ in range(repeat):
        c0 = time.process_time()
        for _ in range(5):
            kern.decode_sequences(*args)
        cpu.append((time.process_time() - c0) / 5)
    blobs = {m: q.to_bytes() for m, q in Q.items()}
    t_full = {m: best_time(lambda m=m: nqlib.QuantizedMatrix.from_bytes(
        blobs[m]).dequantize(), repeat=repeat) for m in MODES}
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return {"kernel_Mweights_per_s": A.size / t_kernel / 1e6,
            "kernel_Mweights_per_cpu_s": A.size / min(cpu) / 1e6,
            "dequantize_Mps": {m: A.size / t / 1e6 for m, t in t_full.items()},
            "dequantize_time_ratio_trellis_over_fixed":
                t_full["trellis"] / t_full["fixed"]}


def layer_time(rates=(2, 3, 4), n=4096) -> list[dict]:
    A = np.random.default_rng(9).standard_normal((n, n)).astype(np.float32)
    nqlib.quantize(A[:256, :8], 2.0, mode="trellis")  # compile
    out = []
    for rate in rates:
        c0, t0 = time.process_time(), time.perf_counter()
        Q = nqlib.quantize(A, float(rate), mode="trellis", seed=SEED)
        secs = time.perf_counter() - t0
        cpu = time.process_time() - c0
        out.append({"shape": [n, n], "R": rate, "L": Q.payload.L, "seconds": secs,
                    "cpu_seconds": cpu, "threads": numba.get_num_threads(),
                    "bits": Q.bits_per_entry})
        print(json.dumps(out[-1]), flush=True)
    return out


def compare(Ls, rates, n, cols, repeat) -> list[dict]:
    """Encode time of the new and the old Viterbi kernel, interleaved: the
    quantizer's ``kern.encode_sequences`` is swapped for the old one."""
    A = np.random.default_rng(9).standard_normal((n, cols)).astype(np.float32)
    kernels = {"new": kern.encode_sequences, "old": _old_encode_sequences}
    saved = tq.DEFAULT_L
    out = []
    try:
        for fn in kernels.values():  # compile
            kern.encode_sequences = fn
            nqlib.quantize(A[:256, :8], 2.0, mode="trellis")
        for L in Ls:
            tq.DEFAULT_L = L
            for rate in rates:
                secs = {name: [] for name in kernels}
                cpu = {name: [] for name in kernels}
                blobs = {}
                for _ in range(repeat):
                    for name, fn in kernels.items():
                        kern.encode_sequences = fn
                        c0, t0 = time.process_time(), time.perf_counter()
                        Q = nqlib.quantize(A, float(rate), mode="trellis", seed=SEED)
                        secs[name].append(time.perf_counter() - t0)
                        cpu[name].append(time.process_time() - c0)
                        blobs[name] = Q.to_bytes()
                        assert Q.payload.L == L
                row = {"L": L, "R": rate, "shape": [n, cols],
                       "old_s": min(secs["old"]), "new_s": min(secs["new"]),
                       "new/old": min(secs["new"]) / min(secs["old"]),
                       "old_cpu_s": min(cpu["old"]), "new_cpu_s": min(cpu["new"]),
                       "new/old_cpu": min(cpu["new"]) / min(cpu["old"]),
                       "identical": blobs["old"] == blobs["new"],
                       "old_all_s": secs["old"], "new_all_s": secs["new"]}
                out.append(row)
                print({k: v for k, v in row.items() if not k.endswith("all_s")},
                      flush=True)
    finally:
        kern.encode_sequences = kernels["new"]
        tq.DEFAULT_L = saved
    return out


def sweep(a, n, Ls, rates) -> list[dict]:
    Y = np.random.default_rng(11).standard_normal((a, n))
    out = []
    for L in Ls:
        for r in rates:
            t0 = time.process_time()
            _, dec = tq.encode(Y, int(r * a * n), L=L)
            cpu = time.process_time() - t0
            D = float(((Y - dec) ** 2).mean())
            out.append({"L": L, "r": r, "gap": 0.5 * np.log2(D / 2.0 ** (-2 * r)),
                        "cpu_us_per_weight": cpu / Y.size * 1e6})
            print(".", end="", flush=True)
    print()
    return out


# ------------------------------------------- the encoder before issue 17's speed-up
# The numba Viterbi encoder as it was before the one-pass vector step
# (nqlib.kernels.cpu.trellis), kept here only as the reference of --compare:
# a k-level tournament for the group minima, in place on one cost array.
@njit(cache=True)
def _old_group_min(cost, k, gmin, arg):
    """``gmin[g] = min_h cost[h 2^(L-k) + g]``, ``arg[g]`` the smallest such
    ``h``: a tournament over the bits of ``h``."""
    n = cost.shape[0] >> 1
    for i in range(n):
        c0 = cost[i]
        c1 = cost[i + n]
        lt = c1 < c0
        gmin[i] = c1 if lt else c0
        arg[i] = np.uint8(lt)
    for _ in range(1, k):
        n >>= 1
        for i in range(n):
            c0 = gmin[i]
            c1 = gmin[i + n]
            b0 = arg[i]
            b1 = arg[i + n]
            lt = (c1 < c0) | ((c1 == c0) & (b1 < b0))
            gmin[i] = c1 if lt else c0
            arg[i] = np.uint8(2) * (b1 if lt else b0) + np.uint8(lt)


@njit(cache=True)
def _old_add_k1(new, gmin, values, xt, G):
    for g in range(G):
        m = gmin[g]
        d0 = xt - values[2 * g]
        d1 = xt - values[2 * g + 1]
        new[2 * g] = m + d0 * d0
        new[2 * g + 1] = m + d1 * d1


@njit(cache=True)
def _old_expand(gmin, G, R, out):
    if R == 2:
        for g in range(G):
            m = gmin[g]
            out[2 * g] = m
            out[2 * g + 1] = m
    else:
        for g in range(G):
            m = gmin[g]
            b = g * R
            for v in range(R):
                out[b + v] = m


@njit(cache=True)
def _old_add_any(new, gmin, values, xt, G, K):
    for g in range(G):
        m = gmin[g]
        b = g * K
        for u in range(K):
            d = xt - values[b + u]
            new[b + u] = m + d * d


@njit(cache=True)
def _old_viterbi(x, ks, values, L, start, start_bits, end, end_bits, cost, gmin,
                 bp, inputs, states):
    T = x.shape[0]
    S = 1 << L
    smask = (1 << start_bits) - 1
    for s in range(S):
        cost[s] = 0.0 if start < 0 or (s & smask) == start else np.inf
    for t in range(T):
        k = ks[t]
        _old_group_min(cost, k, gmin, bp[t])
        if k == 1:
            _old_add_k1(cost, gmin, values, x[t], S >> 1)
        elif k == 2:
            _old_expand(gmin, S >> k, 1 << (k - 1), gmin[S >> 1:])
            _old_add_k1(cost, gmin[S >> 1:], values, x[t], S >> 1)
        else:
            _old_add_any(cost, gmin, values, x[t], S >> k, 1 << k)
    best = np.float32(np.inf)
    state = 0
    emask = (1 << end_bits) - 1
    for s in range(S):
        if (end < 0 or (s & emask) == end) and cost[s] < best:
            best = cost[s]
            state = s
    if best == np.inf:
        return np.inf
    for t in range(T - 1, -1, -1):
        k = ks[t]
        states[t] = state
        inputs[t] = np.uint8(state & ((1 << k) - 1))
        g = state >> k
        state = (np.int64(bp[t, g]) << (L - k)) | g
    return np.float64(best)


@njit(cache=True)
def _old_encode_tailbiting(x, ks, values, L, window, cost, gmin, bp, inputs,
                           states, xr, kr, ur, sr):
    T = x.shape[0]
    h = T // 2
    for i in range(T):
        j = (i + h) % T
        xr[i] = x[j]
        kr[i] = ks[j]
    _old_viterbi(xr, kr, values, L, -1, 0, -1, 0, cost, gmin, bp, ur, sr)
    w = kern.seam_window(T, ks, L, window)
    if w == 0:
        mb = L - ks[0]
        mem = sr[T - h - 1] & ((1 << mb) - 1)
        return _old_viterbi(x, ks, values, L, mem, mb, mem, mb, cost, gmin, bp,
                            inputs, states)
    for i in range(T):
        j = (i + h) % T
        inputs[j] = ur[i]
        states[j] = sr[i]
    a = h - w
    b = h + w
    mb = L - ks[b % T]
    start = states[a - 1]
    end = states[b - 1] & ((1 << mb) - 1)
    _old_viterbi(x[a:b], ks[a:b], values, L, start, L, end, mb, cost, gmin, bp,
                 inputs[a:b], states[a:b])
    total = np.float32(0.0)
    for t in range(T):
        d = x[t] - values[states[t]]
        total += d * d
    return np.float64(total)


@njit(cache=True, parallel=True)
def _old_encode_sequences(x, starts, lengths, bits, values, L, window, inputs,
                          costs):
    S = 1 << L
    for j in prange(lengths.shape[0]):
        T = lengths[j]
        a = starts[j]
        cost = np.empty(S, dtype=np.float32)
        gmin = np.empty(S, dtype=np.float32)
        bp = np.empty((T, S >> 1), dtype=np.uint8)
        ks = np.empty(T, dtype=np.int64)
        kern.schedule(T, bits[j], ks)
        xr = np.empty(T, dtype=np.float32)
        kr = np.empty(T, dtype=np.int64)
        ur = np.empty(T, dtype=np.uint8)
        sr = np.empty(T, dtype=np.int64)
        states = np.empty(T, dtype=np.int64)
        costs[j] = _old_encode_tailbiting(x[a:a + T], ks, values, L, window, cost,
                                          gmin, bp, inputs[a:a + T], states, xr,
                                          kr, ur, sr)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("rows", "decode", "layer", "sweep", "compare"):
        parser.add_argument(f"--{flag}", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="n = 1024, a = b = 32 (a smoke run)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--L", type=int, default=None,
                        help="state bits for quantize (sets trellis.DEFAULT_L "
                             "for this run; default: the library's)")
    parser.add_argument("--rates", default=None,
                        help="comma-separated rates of --rows (default 1..6), "
                             "--layer (2,3,4) and --compare (2,4)")
    parser.add_argument("--Ls", default="15,16",
                        help="comma-separated state bits of --compare")
    parser.add_argument("--cols", type=int, default=4096,
                        help="columns of the 4096 x C matrix of --compare")
    parser.add_argument("--repeat", type=int, default=3,
                        help="interleaved repeats of --compare (best of)")
    args = parser.parse_args(argv)
    if args.L is not None:
        tq.DEFAULT_L = args.L
    given = None if args.rates is None else tuple(
        int(r) for r in args.rates.split(","))
    rates = RATES if given is None else given
    if not (args.rows or args.decode or args.layer or args.sweep or args.compare):
        args.rows = args.decode = True
    n, a, b = (1024, 32, 32) if args.quick else (4096, 256, 256)
    print(machine_line())
    result = {"machine": machine_line(), "n": n, "a": a, "b": b, "seed": SEED,
              "L": tq.DEFAULT_L, "seq_len": tq.DEFAULT_SEQ_LEN}
    if args.rows:
        result["rows"] = rows(n, a, b, rates)
        print_table([{k: ("-" if v is None else v) for k, v in r.items()}
                     for r in result["rows"]])
        found = {(r["mode"], r["R"]): r for r in result["rows"]}
        checks = []
        for rate in (r for r in (2, 3, 4) if r in rates):
            g = found["trellis", rate]["gap"]
            checks.append({"target": f"trellis gap at R={rate} <= {GAP_TARGET}",
                           "value": g, "met": g is not None and g <= GAP_TARGET})
        for rate in rates:
            dt, df = found["trellis", rate]["D"], found["fixed", rate]["D"]
            checks.append({"target": f"trellis D < fixed D at R={rate}",
                           "value": dt / df, "met": dt < df})
        result["targets"] = checks
        for c in checks:
            v = "-" if c["value"] is None else f"{c['value']:.4g}"
            print(f"{c['target']}: {v} {'met' if c['met'] else 'MISSED'}")
    if args.decode:
        result["decode"] = decode_speed(n, a, 3 if not args.quick else 2)
        print(json.dumps(result["decode"], indent=1))
        for key in ("kernel_Mweights_per_s", "kernel_Mweights_per_cpu_s"):
            s = result["decode"][key]
            print(f"trellis decode kernel >= {DECODE_TARGET_MPS} M weights/s "
                  f"(one thread, {key}): {s:.4g} "
                  f"{'met' if s >= DECODE_TARGET_MPS else 'MISSED'}")
    if args.layer:
        # "layer": the row at 2 bits (the first rate when 2 is not measured)
        result["layer_rates"] = layer_time((2, 3, 4) if given is None else given)
        result["layer"] = next((r for r in result["layer_rates"] if r["R"] == 2),
                               result["layer_rates"][0])
        for row in result["layer_rates"]:
            t = row["seconds"]
            print(f"4096 x 4096 encode at R={row['R']}, L={row['L']} <= "
                  f"{LAYER_TARGET_S} s: {t:.1f} "
                  f"{'met' if t <= LAYER_TARGET_S else 'MISSED'}")
    if args.compare:
        Ls = tuple(int(v) for v in args.Ls.split(","))
        result["compare"] = compare(Ls, (2, 4) if given is None else given,
                                    1024 if args.quick else 4096,
                                    64 if args.quick else args.cols, args.repeat)
        print_table([{k: v for k, v in r.items()
                      if k not in ("shape", "old_all_s", "new_all_s")}
                     for r in result["compare"]])
    if args.sweep:
        result["sweep"] = sweep(8 if args.quick else 32, 4096, SWEEP_LS,
                                (2, 3, 4))
        print_table(result["sweep"])
    if args.json:
        # sections of earlier runs (other flags) are kept; this run's replace
        try:
            with open(args.json) as fh:
                result = {**json.load(fh), **result}
        except FileNotFoundError:
            pass
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, allow_nan=False)
            fh.write("\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
