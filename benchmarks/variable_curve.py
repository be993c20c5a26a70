"""Measure nqlib's variable-mode distortion-rate curve and write the data
file that :mod:`nqlib.quantizers.ratecurve` ships.

For iid Gaussian matrices it quantizes both operands at each code rate of
``ratecurve.CURVE_RATES`` (sketching off), forms the approximate product and
records the product distortion. The runtime library only reads the result;
this measurement needs ``quantize`` and the product, which sit above it.

Usage::

    python benchmarks/variable_curve.py     # rewrites nqlib/data/variable_curve.json
    python benchmarks/variable_curve.py --out x.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from nqlib import inner_products, matmul_distortion, quantize
from nqlib.quantizers import ratecurve

CURVE_SHAPE = (2048, 64)
CURVE_SEED = 20241017


def measure_variable_curve(rates=ratecurve.CURVE_RATES):
    """The variable mode's product distortion at each code rate on iid
    Gaussian matrices (sketching off). Returns a JSON-ready dict."""
    n, a = CURVE_SHAPE
    rng = np.random.default_rng(CURVE_SEED)
    A = rng.standard_normal((n, a))
    B = rng.standard_normal((n, a))
    Ds, achieved = [], []
    # side information (header, means, norms, model) costs about 80 bits per
    # column here; add it so the code itself runs at about r bits per entry
    side = 80 / n
    for r in tqdm(list(rates), desc="measuring the variable-mode curve"):
        QA = quantize(A, float(r) + side, sketch=False)
        QB = quantize(B, float(r) + side, sketch=False)
        Ds.append(matmul_distortion(A, B, inner_products(QA, QB)))
        coded = QA.shape[1] * QA.n_pad
        achieved.append(32 * len(QA.payload.words) / coded)
    return {"shape": list(CURVE_SHAPE), "seed": CURVE_SEED,
            "rate": [float(r) for r in achieved], "D": Ds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ratecurve.CURVE_PATH)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(measure_variable_curve(), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
