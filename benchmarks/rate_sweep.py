"""nqlib's distortion-rate curve on iid Gaussian matrices, from 0.1 to 8 bits.

``A`` and ``B`` (n x a, n x b) have iid N(0, 1) entries; both are quantized
with ``nqlib.quantize`` at every target rate R in ``RATES`` (one shared seed),
in both modes (``variable``: entropy-coded E8 points; ``fixed``: fixed-length
words), with sketching below nqlib's tangency point (the default). For every
(mode, R) this reports

* ``bits``     -- achieved bits per entry, every byte of both files counted:
  ``8 (nbytes_A + nbytes_B) / (n (a + b))``;
* ``D``        -- ``||A^T B - C_hat||_F^2 / (n a b)``;
* ``Gamma``    -- the lower bound Gamma(R) at the target rate;
* ``D/Gamma``  -- D over Gamma(bits);
* ``gap``      -- ``bits - Gamma^{-1}(D)``, the bits lost to the bound;
* ``kept``     -- the fraction of each rotated column that is coded (1 when
  nothing is sketched away).

Checks (printed, and stored in the JSON): each file's achieved rate is at most
the target (variable mode) or the target plus ``RATE_TOLERANCE`` = 0.02
(fixed mode), and D decreases strictly with R in each mode.

Usage: ``python benchmarks/rate_sweep.py [--quick] [--json PATH]
[--plot PATH]``; ``--plot`` saves D against the achieved rate, with Gamma,
on a log scale.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from _harness import machine_line, print_table

import nqlib
from nqlib.quantizers.rate_control import RATE_TOLERANCE
from nqlib.quantizers.ratecurve import variable_tangent
from nqlib.theory import bound, gamma, gamma_inv

#: target rates, bits per entry (0.906 is about the ideal tangency point R*)
RATES = (0.1, 0.25, 0.5, 0.75, 0.906, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
MODES = ("variable", "fixed")
SEED = 1


def kept_fraction(Q) -> float:
    """Share of the 8-blocks of each rotated column that carry codes."""
    blocks = Q.n_pad // 8
    if Q.mode == "variable":
        return Q.payload.keep / blocks
    lo_dropped = Q.payload.lo.L == 0
    return Q.payload.h / blocks if lo_dropped else 1.0


def measure(A, B, mode, rate) -> dict:
    """One row: achieved rates, product distortion and gap at ``rate``."""
    t0 = time.perf_counter()
    QA = nqlib.quantize(A, rate, seed=SEED, mode=mode)
    QB = nqlib.quantize(B, rate, seed=SEED, mode=mode)
    C_hat = nqlib.inner_products(QA, QB)
    seconds = time.perf_counter() - t0
    D = nqlib.matmul_distortion(A, B, C_hat)
    n, a = A.shape
    b = B.shape[1]
    bits = 8.0 * (QA.nbytes + QB.nbytes) / (n * (a + b))
    limit = rate + (RATE_TOLERANCE if mode == "fixed" else 0.0)
    return {
        "mode": mode,
        "R": rate,
        "bits": bits,
        "bits_max": max(QA.bits_per_entry, QB.bits_per_entry),
        "rate_ok": max(QA.bits_per_entry, QB.bits_per_entry) <= limit,
        "D": D,
        "Gamma": float(gamma(rate)),
        "D/Gamma": D / float(gamma(bits)),
        "gap": float(bits - gamma_inv(D)) if 0 < D <= 1 else None,
        "kept": min(kept_fraction(QA), kept_fraction(QB)),
        "seconds": seconds,
    }


def gaussian_pair(n, a, b):
    rng = np.random.default_rng(20250607)
    return rng.standard_normal((n, a)), rng.standard_normal((n, b))


def run(n, a, b) -> list[dict]:
    A, B = gaussian_pair(n, a, b)
    rows = []
    for mode in MODES:
        for rate in RATES:
            rows.append(measure(A, B, mode, rate))
            print(".", end="", flush=True)
    print()
    return rows


def check(rows) -> list[dict]:
    """The rate promise of ``quantize`` and a strictly decreasing D."""
    checks = []
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        over = [r["R"] for r in mine if not r["rate_ok"]]
        slack = RATE_TOLERANCE if mode == "fixed" else 0.0
        checks.append({"check": f"{mode}: every file at most R + {slack:g} "
                                "bits per entry",
                       "value": max(r["bits_max"] - r["R"] for r in mine),
                       "met": not over})
        D = [r["D"] for r in mine]
        checks.append({"check": f"{mode}: D strictly decreasing in R",
                       "value": max(d2 / d1 for d1, d2 in zip(D, D[1:])),
                       "met": all(d2 < d1 for d1, d2 in zip(D, D[1:]))})
    return checks


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    r = np.linspace(0.0, 8.2, 600)
    ax.semilogy(r, gamma(r), "k-", lw=2, label=r"lower bound $\Gamma(R)$")
    ax.semilogy(r, bound.phi(r), "k:", lw=1,
                label=r"$\varphi(R)$ (every coordinate coded)")
    for mode, style in zip(MODES, ("o-", "s-")):
        mine = [x for x in rows if x["mode"] == mode]
        ax.semilogy([x["bits"] for x in mine], [x["D"] for x in mine], style,
                    ms=4, label=f"nqlib, mode={mode!r}")
    ax.axvline(bound.R_STAR, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("achieved rate (bits per entry, all side information)")
    ax.set_ylabel(r"$D = \|A^\top B - \hat C\|_F^2 / (nab)$")
    ax.set_ylim(1e-5, 1.5)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="n = 1024, a = b = 64 (a smoke run)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the rows and checks as JSON")
    parser.add_argument("--plot", metavar="PATH",
                        help="save the D-R plot (PNG, PDF or SVG) to PATH")
    args = parser.parse_args(argv)
    n, a, b = (1024, 64, 64) if args.quick else (4096, 256, 256)
    print(machine_line())
    print(f"iid N(0, 1): A {n} x {a}, B {n} x {b}; seed {SEED}; tangency "
          f"point of the variable mode's curve r* = {variable_tangent():.3f} "
          "bit per coded entry")
    A, B = gaussian_pair(n, a, b)
    D_zero = nqlib.matmul_distortion(A, B, np.zeros((a, b)))
    print(f"D of C_hat = 0 on this pair: {D_zero:.4f} (1 on average)")
    rows = run(n, a, b)
    print_table([{k: ("-" if v is None else v) for k, v in r.items()}
                 for r in rows])
    gaps = {m: [r["gap"] for r in rows
                if r["mode"] == m and r["gap"] is not None]
            for m in MODES}
    for mode in MODES:
        print(f"{mode}: gap {min(gaps[mode]):.3f}-{max(gaps[mode]):.3f} bit")
    checks = check(rows)
    for c in checks:
        print(f"{c['check']}: {c['value']:.4g} "
              f"{'met' if c['met'] else 'MISSED'}")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        out = {"machine": machine_line(), "n": n, "a": a, "b": b, "seed": SEED,
               "r_star_variable": variable_tangent(), "D_zero": D_zero,
               "rows": rows,
               "checks": checks}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, allow_nan=False)
            fh.write("\n")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
