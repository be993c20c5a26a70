"""Instruction counts of the fused decode-matmul loop, compiled for sm_90.

Compiles the Triton kernels of :mod:`nqlib.kernels.gpu.matmul_triton` for an
NVIDIA GPU of a given compute capability with Triton's own compiler (no GPU
needed) and counts the PTX and SASS instructions of their K loop (SASS by
``nvdisasm``, which ships with Triton's NVIDIA backend). This is measurement
tooling, not library code: it uses Triton's compiler API directly and the
``TRITON_INTERPRET`` environment variable (under the interpreter the
kernels are not compiled, so the compilation runs in a subprocess without
it).

Used by ``benchmarks/gpu_matmul.py --isa``, by the GPU-kernels chapter
(``book/09_kernels.md``) and by ``tests/test_triton_matmul.py``. Usage::

    python benchmarks/gpu_isa.py            # the GEMV loop, 4-bit halves
    python benchmarks/gpu_isa.py --counts '[["dot", 16, 64, 16, 4], 4, 90, "tf32"]'
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

#: (kind, BLOCK_M, BLOCK_N, BLOCK_B, num_warps) of the loop counted by default
GEMV_CONFIG = ("gemv", 1, 16, 32, 4)


def loop_body(lines, label_re, branch_re):
    """Line span ``(first, last)`` of the longest backward branch: the K
    loop (the fused kernels have one loop; the only other backward branch
    is the one-line trap at the end of SASS).

    Parameters
    ----------
    lines : list of str
        Assembly text, one instruction or label per line.
    label_re, branch_re : str
        Regular expressions whose group 1 is a label's name, where it is
        defined and where a branch jumps to it.

    Returns
    -------
    tuple of int
    """
    labels, body = {}, (0, -1)
    for i, line in enumerate(lines):
        m = re.match(label_re, line)
        if m:
            labels[m.group(1)] = i
        b = re.search(branch_re, line)
        if b and b.group(1) in labels and i - labels[b.group(1)] > body[1] - body[0]:
            body = (labels[b.group(1)], i)
    return body


def ptx_opcodes(ptx):
    """Opcodes (with their suffixes, e.g. ``fma.rn.f32``) of the loop in
    the PTX text ``ptx``, predicate guards dropped.

    Parameters
    ----------
    ptx : str

    Returns
    -------
    list of str
    """
    lines = ptx.splitlines()
    span = loop_body(lines, r"^(\$L__BB\d+_\d+):",
                     r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
    ops = []
    for line in lines[span[0]:span[1] + 1]:
        toks = line.split()
        if toks and toks[0].startswith("@"):            # predicate guard
            toks = toks[1:]
        if toks and re.match(r"[a-z]", toks[0]) and line.rstrip().endswith(";"):
            ops.append(toks[0])
    return ops


def sass_text(cubin):
    """The SASS of a compiled kernel by ``nvdisasm``.

    Parameters
    ----------
    cubin : bytes
        ``kernel.asm["cubin"]`` of a kernel compiled by :func:`compile_kernel`.

    Returns
    -------
    str or None
        The disassembly, or None when Triton's NVIDIA backend ships no
        ``nvdisasm``.
    """
    import triton.backends.nvidia as nv

    tool = Path(nv.__file__).parent / "bin" / "nvdisasm"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        return subprocess.run([str(tool), "-c", fh.name], capture_output=True,
                              text=True, check=True).stdout


def sass_opcodes(cubin):
    """Opcodes (with their suffixes) of the loop in the SASS of ``cubin``.

    Parameters
    ----------
    cubin : bytes

    Returns
    -------
    list of str or None
        None without ``nvdisasm``.
    """
    text = sass_text(cubin)
    if text is None:
        return None
    lines = text.splitlines()
    span = loop_body(lines, r"^(\.L_x_\d+):", r"\bBRA\s+`?\(?(\.L_x_\d+)")
    ops = []
    for line in lines[span[0]:span[1] + 1]:
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", line)
        if m:
            toks = m.group(1).split()
            if toks[0].startswith("@"):
                toks = toks[1:]
            ops.append(toks[0])
    return ops


def compile_kernel(fn, signature, constexprs, *, arch=90, attrs=None, **options):
    """Compile the ``@triton.jit`` function ``fn`` for an NVIDIA GPU of
    compute capability ``arch`` (no GPU needed).

    Parameters
    ----------
    fn : triton JITFunction
        E.g. ``matmul_triton.JIT_KERNELS["gemv"]``.
    signature : dict
        Argument name -> Triton type (``"*fp32"``, ``"i32"``, ...) for every
        argument that is not a compile-time constant.
    constexprs : dict
        Compile-time constants by name.
    arch : int
        Compute capability, e.g. 90 for an H100.
    attrs : dict, optional
        Argument attributes, e.g. ``{(0,): [["tt.divisibility", 16]]}``.
    **options
        Compiler options (``num_warps``, ``enable_fp_fusion``).

    Returns
    -------
    The compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    kw = {} if attrs is None else {"attrs": attrs}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs,
                                    **kw)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=options)


def _interpreted() -> bool:
    import triton

    from nqlib.kernels.gpu import matmul_triton as mt

    return not isinstance(mt.JIT_KERNELS["matmul"], triton.runtime.JITFunction)


def loop_instruction_counts(config=GEMV_CONFIG, code_bits=4, arch=90,
                            precision="ieee"):
    """Compile the fused kernel for an NVIDIA GPU of compute capability
    ``arch`` (no GPU needed) and count the instructions of its K loop.

    Parameters
    ----------
    config : tuple
        ``(kind, BLOCK_M, BLOCK_N, BLOCK_B, num_warps)``, ``kind`` one of
        ``matmul_triton.KINDS``.
    code_bits : {4, 8}
        Bits per stored half.
    arch : int
        Compute capability.
    precision : str
        ``tl.dot`` input precision (``"dot"`` kernels).

    Returns
    -------
    dict
        PTX and SASS instruction counts of one loop iteration (per thread),
        the weights one iteration decodes, the instructions per weight
        (``count * threads / weights per iteration``; each weight serves all
        ``BLOCK_M`` rows), whether a PTX instruction of the loop flushes
        subnormals (``ftz_in_loop``), and the SASS opcodes by frequency.
        Under ``TRITON_INTERPRET=1`` the kernels are interpreted, so the
        compilation runs in a subprocess without it.
    """
    if _interpreted():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        arg = json.dumps([list(config), code_bits, arch, precision])
        res = subprocess.run([sys.executable, str(Path(__file__).resolve()),
                              "--counts", arg], env=env, capture_output=True,
                             text=True, timeout=600)
        if res.returncode:
            raise RuntimeError(f"compiling for sm_{arch} failed:\n"
                               f"{res.stderr[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    from nqlib.kernels.gpu import matmul_triton as mt

    kind, block_m, block_n, block_b, warps = config
    cx = dict(CODE_BITS=code_bits, BLOCK_N=block_n, BLOCK_B=block_b,
              EPILOGUE=True, HAS_BIAS=True, SCALED=True)
    if kind != "gemv":
        cx.update(BLOCK_M=block_m, USE_DOT=kind == "dot", PRECISION=precision)
    fn = mt.JIT_KERNELS["gemv" if kind == "gemv" else "matmul"]
    f32 = "*fp32"
    sig = dict(x_ptr=f32, words_ptr="*i32", meta_ptr="*u8", tab_ptr=f32,
               out_ptr=f32, xsum_ptr=f32, scale_ptr=f32, offset_ptr=f32,
               bias_ptr=f32)
    # ints as Triton specialises them at run time: strides divisible by 16
    sig.update({k: "i32" for k in ("M", "N", "stride_b", "H", "q_hi", "q_lo",
                                   "stride_xm", "stride_om")})
    full = {**sig, **{k: "constexpr" for k in cx}}
    attrs = {(i,): [["tt.divisibility", 16]]
             for i, k in enumerate(full) if k.endswith("_ptr")
             or k in ("stride_b", "stride_xm", "stride_om")}
    kernel = compile_kernel(fn, sig, cx, arch=arch, attrs=attrs, num_warps=warps,
                            enable_fp_fusion=True)
    ptx_ops = ptx_opcodes(kernel.asm["ptx"])
    # the halves are read as subnormal floats: the loop must not flush them
    ftz = any(".ftz" in op for op in ptx_ops)
    sass_ops = sass_opcodes(kernel.asm["cubin"])
    threads = 32 * warps
    weights = block_n * block_b * 8
    out = dict(arch=f"sm_{arch}", config=list(config), code_bits=code_bits,
               precision=precision,
               threads=threads, weights_per_iteration=weights,
               ptx_per_iteration=len(ptx_ops),
               ptx_per_weight=len(ptx_ops) * threads / weights,
               ftz_in_loop=ftz)
    if sass_ops is not None:
        top = collections.Counter(o.split(".")[0] for o in sass_ops)
        out.update(sass_per_iteration=len(sass_ops),
                   sass_per_weight=len(sass_ops) * threads / weights,
                   sass_opcodes=dict(top.most_common()))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", help="JSON [config, code_bits, arch, "
                        "precision]; prints the counts as one JSON line")
    args = parser.parse_args(argv)
    config, code_bits, arch, precision = (
        json.loads(args.counts) if args.counts
        else [list(GEMV_CONFIG), 4, 90, "ieee"])
    print(json.dumps(loop_instruction_counts(tuple(config), int(code_bits),
                                             int(arch), precision)))


if __name__ == "__main__":
    main()
