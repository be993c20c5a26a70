"""Fused decode-matmul of 4-bit fixed-mode weights on a GPU, against fp16.

For every shape (K x N: in_features x out_features; the weight W is N x K)
and batch M it times, with CUDA events after a warm-up (and inside a CUDA
graph when capture works), cycling through enough distinct copies of the
weights that their total is four times the L2 cache, so every call reads its
weights from memory (a single 4-bit layout replayed back to back would sit in
L2 while fp16 would not, inflating the speedup):

* ``kernel``: ``decode_matmul(x_rot, layout)`` -- the fused Triton kernel on
  rotated activations (``nqlib.kernels.gpu.matmul_triton``);
* ``layer``: ``quant_linear(x, layout)`` -- the whole QuantLinear forward:
  padding, randomised Hadamard rotation, row sums, kernel and epilogue;
* ``fp16``: ``x16 @ W16.T`` with torch.

It reports microseconds, the speedup of the kernel over fp16, and the
kernel's achieved bandwidth (weight bytes the kernel reads plus x and out)
against the device's peak (``--peak-gbps``, default 3350: an H100 SXM).
``--isa`` adds the instruction counts of the kernel loops compiled for
sm_90 (no GPU needed).

Weights are Gaussian matrices quantized at 4 bit/entry in fixed mode
(``--codes quantized``, the default; quantizing 8192 x 28672 on a CPU takes
minutes) or, **for timing only**, random codes and decisions of the same
code (``--codes random``): the kernel does the same work on them, but they
decode to no particular matrix. Each row of the output says which.

Without a CUDA device it prints a message and times nothing (``--isa``
still works). Usage::

    python benchmarks/gpu_matmul.py [--codes random] [--json out.json]
    python benchmarks/gpu_matmul.py --isa-only --json book/data/gpu_matmul.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from functools import partial

SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672)]
BATCHES = [1, 4, 16, 64]
RATE = 4.0
#: Where the timed tensors live (a dry run on CPU under TRITON_INTERPRET=1
#: may set it to "cpu" and replace gpu_time_us).
DEVICE = "cuda"
#: HBM3 bandwidth of an H100 SXM (GB/s), theory.md section 7.
H100_SXM_GBPS = 3350.0
#: (kind, BLOCK_M, BLOCK_N, BLOCK_B, num_warps) of the compiled loops reported
#: by --isa: what the launcher picks for M = 1, 2, 4, 16 and 64.
ISA_CONFIGS = [("gemv", 1, 16, 32, 4), ("fma", 2, 16, 32, 4),
               ("fma", 4, 16, 16, 4), ("dot", 16, 64, 16, 4),
               ("dot", 64, 64, 16, 4)]


def isa_counts():
    """Instruction counts of the fused kernel's loop, compiled for sm_90."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_isa import loop_instruction_counts

    rows = []
    for config in ISA_CONFIGS:
        for precision in ("ieee", "tf32") if config[0] == "dot" else ("ieee",):
            r = loop_instruction_counts(config, 4, 90, precision)
            rows.append(r)
            print(f"  {config[0]:4s} BLOCK_M={config[1]:2d} {precision:4s}: "
                  f"{r['sass_per_weight']:6.2f} SASS / {r['ptx_per_weight']:6.2f} "
                  f"PTX instructions per weight", flush=True)
    return rows


def l2_bytes() -> int:
    """The device's L2 cache size in bytes (50 MiB if torch cannot tell)."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def copies_past_l2(nbytes: int, *, factor: int = 4, cap: int = 64) -> int:
    """How many distinct copies of ``nbytes`` of operands make the replayed
    working set at least ``factor`` times the L2 cache, so every call reads
    its weights from memory, not from L2 (at most ``cap``)."""
    return max(2, min(cap, -(-factor * l2_bytes() // max(1, nbytes))))


def clone_layout(layout):
    """A copy of a GpuLayout with its own device memory (same codes)."""
    import dataclasses

    import torch

    fields = {f.name: getattr(layout, f.name)
              for f in dataclasses.fields(layout)}
    for name, value in fields.items():
        if isinstance(value, torch.Tensor):
            fields[name] = value.clone()
        elif isinstance(value, tuple) and value and all(
                isinstance(v, torch.Tensor) for v in value):
            fields[name] = tuple(v.clone() for v in value)
    return type(layout)(**fields)


def gpu_time_us(fns, *, warmup=10, repeat=50):
    """Mean time of one call, in microseconds, over calls that cycle through
    ``fns`` (one callable per copy of the operands, so the weights are read
    from memory, not replayed from L2), with CUDA events; replayed from a
    CUDA graph when capture works (no launch overhead), else eagerly.
    Returns (microseconds, "graph" | "eager")."""
    import torch

    def fn():
        for f in fns:
            f()

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    mode = "eager"
    run = fn
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
        mode = "graph"
    except Exception as exc:  # noqa: BLE001 - any capture failure: eager timing
        print(f"    (CUDA graph capture failed, timing eagerly: {exc})",
              file=sys.stderr)
    for _ in range(warmup):
        run()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeat):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (repeat * len(fns)), mode


def random_layout(n, a, q, betas, *, device=None, seed=0):
    """A layout of random halves and random meta bytes, **for timing only**:
    it decodes to arbitrary lattice vectors, not to any matrix. One part of
    ``q`` (and the given scales) covers all ``n / 8`` blocks; per-vector
    constants are 1 and 0, no rotation. Building it costs no quantization
    (an 8192 x 28672 matrix takes minutes to quantize on a CPU)."""
    import numpy as np

    from nqlib.kernels.gpu import matmul_triton as mt
    from nqlib.kernels.gpu.fixed_format import FIX_SHIFT, INDEX_SHIFT, ODD_SHIFT
    from nqlib.quantizers.fixed_layout import pack_layout

    B = -(-n // 8)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, q, size=(a, B, 8), dtype=np.uint8)
    meta = (rng.integers(0, len(betas), size=(a, B)) << INDEX_SHIFT
            | rng.integers(0, 32, size=(a, B)))
    # a block without the fix has k = 0 (as the layout builder stores it)
    no_fix = (meta >> ODD_SHIFT & 1) == 0
    meta = np.where(no_fix, meta & ~(7 << FIX_SHIFT), meta).astype(np.uint8)
    arrays = pack_layout(codes, meta, (n, a), B, {"hi": int(q)}, {"hi": betas},
                         4 if q <= 16 else 8,
                         row_scale=np.ones(a, dtype=np.float32),
                         row_offset=np.zeros(a, dtype=np.float32))
    return mt.upload(arrays, device)


def build_layout(k, n, codes, seed):
    """(layout, label) for a K x N layer at RATE bit/entry."""
    import numpy as np

    from nqlib.quantizers.fixed_layout import gpu_layout

    if codes == "random":
        from nqlib.quantizers.fixed import fixed_code

        code = fixed_code(int(8 * RATE))     # 32-bit words: q = 13, 5 scales
        return (random_layout(k, n, code.q, code.betas, device=DEVICE,
                              seed=seed), f"random codes q={code.q}")
    import nqlib

    t0 = time.perf_counter()
    W = np.random.default_rng(seed).standard_normal((n, k))
    qm = nqlib.quantize(W.T, RATE, mode="fixed", seed=seed)
    print(f"    quantized {k} x {n} in {time.perf_counter() - t0:.1f} s: "
          f"{qm.bits_per_entry:.3f} bit/entry", flush=True)
    return gpu_layout(qm, DEVICE), (f"quantized, q={qm.payload.hi.q}/"
                                    f"{qm.payload.lo.q}, "
                                    f"{qm.bits_per_entry:.3f} bit/entry")


def time_gpu(args):
    import torch

    from nqlib.kernels.gpu import matmul_triton as mt

    peak = args.peak_gbps * 1e9
    rows = []
    for k, n in SHAPES:
        print(f"shape {k} x {n} (K x N)", flush=True)
        layout, label = build_layout(k, n, args.codes, args.seed)
        # distinct copies of each operand, cycled, so that neither the 4-bit
        # layout nor the fp16 weight is served from L2 (a single replayed
        # 4-bit layout fits in an H100's L2 and fp16 does not)
        n_q = copies_past_l2(layout.bytes_read)
        n_16 = copies_past_l2(2 * n * k)
        layouts = [layout] + [clone_layout(layout) for _ in range(n_q - 1)]
        W16s = [torch.randn((n, k), device=DEVICE, dtype=torch.float16)
                for _ in range(n_16)]
        print(f"    {n_q} layout copies, {n_16} fp16 copies "
              f"(L2 {l2_bytes() / 2**20:.0f} MiB)", flush=True)
        for m in BATCHES:
            x = torch.randn((m, layout.n_pad), device=DEVICE)
            x16 = torch.randn((m, k), device=DEVICE, dtype=torch.float16)
            xin = x[:, :k].contiguous()
            t_kernel, mode = gpu_time_us([partial(
                mt.decode_matmul, x, lay, precision=args.precision)
                for lay in layouts])
            t_layer, _ = gpu_time_us([partial(
                mt.quant_linear, xin, lay, precision=args.precision)
                for lay in layouts])
            t_fp16, _ = gpu_time_us([partial(torch.matmul, x16, W.T)
                                     for W in W16s])
            moved = layout.bytes_read + 4 * m * (layout.n_pad + n)
            moved16 = 2 * (n * k + m * (k + n))
            row = dict(K=k, N=n, M=m, codes=label, precision=args.precision,
                       timing=mode, kernel_us=t_kernel, layer_us=t_layer,
                       fp16_us=t_fp16, speedup_vs_fp16=t_fp16 / t_kernel,
                       kernel_gbps=moved / t_kernel / 1e3,
                       fp16_gbps=moved16 / t_fp16 / 1e3,
                       kernel_roof_us=moved / peak * 1e6,
                       fp16_roof_us=moved16 / peak * 1e6,
                       bits_per_weight=layout.bits_per_weight)
            rows.append(row)
            share = row["kernel_gbps"] / args.peak_gbps
            print(f"  M={m:3d}: kernel {t_kernel:8.1f} us  layer {t_layer:8.1f} "
                  f"us  fp16 {t_fp16:8.1f} us  x{row['speedup_vs_fp16']:.2f}  "
                  f"{row['kernel_gbps']:7.0f} GB/s ({share:.0%} of peak)",
                  flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codes", choices=("quantized", "random"),
                        default="quantized",
                        help="quantized Gaussian weights, or random codes "
                             "(timing only)")
    parser.add_argument("--precision", choices=("ieee", "tf32", "tf32x3"),
                        default="ieee", help="tl.dot input precision (M > 4)")
    parser.add_argument("--peak-gbps", type=float, default=H100_SXM_GBPS,
                        help="device memory bandwidth in GB/s (default: H100 SXM)")
    parser.add_argument("--isa", action="store_true",
                        help="also count the loop instructions compiled for sm_90")
    parser.add_argument("--isa-only", action="store_true",
                        help="only the instruction counts (no GPU needed)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        import torch
        import triton
    except ImportError as exc:
        print(f"torch and triton are needed ({exc}); nothing was run",
              file=sys.stderr)
        return
    result = dict(benchmark="benchmarks/gpu_matmul.py", rate_bits=RATE,
                  peak_gbps=args.peak_gbps, shapes_KxN=SHAPES, batches=BATCHES,
                  triton=triton.__version__, torch=torch.__version__,
                  python=platform.python_version())
    has_gpu = torch.cuda.is_available()
    result["device"] = torch.cuda.get_device_name() if has_gpu else "none"
    if args.isa or args.isa_only:
        print("instructions per weight of the fused kernel's loop (sm_90):")
        result["isa"] = isa_counts()
    rows = []
    if not args.isa_only:
        if not has_gpu:
            print("no CUDA device: GPU timings need one (nothing was timed; "
                  "--isa-only counts instructions without a GPU)", file=sys.stderr)
        else:
            rows = time_gpu(args)
    result["timings"] = rows
    if not rows:
        result["note"] = ("GPU timings not measured: this file was written "
                          "without a CUDA device. The instruction counts are "
                          "from code compiled for sm_90 offline.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
            fh.write("\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
