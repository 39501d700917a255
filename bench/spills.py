"""
Register use and spills of the attention kernels' autotune configurations, compiled for a GPU that
need not be here (default sm_90a, the H100), as ptxas reports them. No GPU needed: Triton compiles to
PTX and its bundled ptxas assembles it with -v.

    python bench/spills.py                 # the installed Triton, sm_90a, bf16
    PYTHONPATH=/path/to/triton36 python bench/spills.py --arch=90   # another Triton (e.g. the GPU box's 3.6)

Prints one line per (kernel, tile class, config): registers per thread, spill stores/loads (bytes).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import attention as A

POINTERS = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ"}
FP32_POINTERS = {"LSE", "DELTA"}
FLOATS = {"sm_scale", "qk_scale"}
KERNELS = {"fwd": A._attn_fwd_kernel, "dkdv": A._attn_bwd_dkdv_kernel, "dq": A._attn_bwd_dq_kernel}


def compile_ptx(fn, tile, head_dim, dtype, arch):
    m, n, warps, stages = tile
    constexprs = dict(BLOCK_M=m, BLOCK_N=n, HEAD_DIM=head_dim, CAUSAL=True, PRECISION="tf32")
    sig, consts = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[p.name] = constexprs[p.name]
        elif p.name in POINTERS:
            sig[p.name] = "*" + dtype
        elif p.name in FP32_POINTERS:
            sig[p.name] = "*fp32"
        elif p.name in FLOATS:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    # as a real launch specializes them: pointers 16-byte aligned (torch allocations), strides multiples of 16
    # (every stride of a (B, H, T, D) tensor with D in {64, 128} is)
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
             if sig[p.name].startswith("*") or p.name.startswith("stride_")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    k = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
    return k.asm["ptx"]


def ptxas_report(ptx, arch):
    # the ptxas Triton bundles; newer Tritons emit PTX versions only their "-blackwell" (newer CUDA) build reads
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    version = re.search(r"^\.version (\d+)\.(\d+)", ptx, re.M)
    names = ["ptxas", "ptxas-blackwell"] if version and (int(version.group(1)), int(version.group(2))) < (8, 9) \
        else ["ptxas-blackwell", "ptxas"]
    ptxas = next((os.path.join(bin_dir, n) for n in names if os.path.exists(os.path.join(bin_dir, n))),
                 shutil.which("ptxas"))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None,
            int(spill.group(2)) if spill else None, text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--kernels", default="fwd,dkdv,dq")
    ap.add_argument("--classes", default="d64,d128")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}", flush=True)
    n_spilling = n_total = 0
    for name in args.kernels.split(","):
        fn = KERNELS[name].fn
        for cls in args.classes.split(","):
            for tile in A.TILES[name][cls]:
                head_dim = 128 if cls == "d128" else 64
                try:
                    regs, st, ld, err = ptxas_report(compile_ptx(fn, tile, head_dim, args.dtype, args.arch), args.arch)
                except Exception as e:
                    print(f"{name:5s} {cls:5s} {tile}: compile failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                if regs is None:
                    print(f"{name:5s} {cls:5s} {tile}: no ptxas report: {(err or '')[:300]}", flush=True)
                    continue
                n_total += 1
                n_spilling += bool(st or ld)
                flag = "  SPILLS" if (st or ld) else ""
                print(f"{name:5s} {cls:5s} BLOCK_M={tile[0]:<3d} BLOCK_N={tile[1]:<3d} warps={tile[2]} stages={tile[3]}: "
                      f"{regs} registers, spill stores {st} B, loads {ld} B{flag}", flush=True)
    print(f"{n_spilling} of {n_total} configurations spill")


if __name__ == "__main__":
    main()
