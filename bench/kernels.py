"""
Benchmark the Triton kernels against what PyTorch (and flash-attn, if installed) offer.

    python3 bench/kernels.py            # from the repo root, on a CUDA machine

Attention (bf16, causal): forward and forward+backward TFLOP/s, ours vs
F.scaled_dot_product_attention pinned to its flash backend, vs flash-attn.
Fused linear + cross-entropy (bf16, N=16384 tokens): forward+backward time and
peak memory, ours vs F.linear + F.cross_entropy.
Timings are triton.testing.do_bench medians. Every row is appended to
bench/results/kernels-<device>.jsonl (and $OUT/ when set) the moment it is measured, with device,
driver, versions, git commit and date in it, so a crash or a time limit keeps the rows before it;
--only=attention,decode,ce runs a subset.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    sys.exit("bench/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure here.")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("bench/kernels.py: unset TRITON_INTERPRET, the interpreter is not what we want to time.")

import triton
from triton.testing import do_bench

from engine import offset_attention
from kernels.attention import decode_attention, flash_attention
from kernels.cross_entropy import fused_linear_cross_entropy

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

DEVICE = "cuda"
DTYPE = torch.bfloat16
ATTN_SHAPES = [(8, 9, 2048, 64), (4, 16, 4096, 128), (16, 9, 1024, 64)]  # (B, H, T, D), causal
# GQA rows for ours (the model's layout: 9 query heads share 3 kv heads)
ATTN_GQA = [(8, 9, 3, 2048, 64), (16, 9, 3, 1024, 64)]
# KV-cache decoding: 1 new query per sequence against S cached keys, forward only
DECODE_SHAPES = [(16, 9, 3, 4096, 64), (4, 16, 16, 8192, 128)]  # (B, Hq, Hkv, S, D)
CE_SHAPES = [(16384, d, V) for d in (576, 1536) for V in (49152, 151936)]  # (N, d, V)


META = {}       # device, versions, commit, date: filled by main, copied into every row
ROW_FILES = []  # where each row is appended


def emit(section, row):
    """Append one measured row (with META) to the JSONL files now, and return it."""
    line = json.dumps(dict(META, section=section, **row))
    for path in ROW_FILES:
        with open(path, "a") as f:
            f.write(line + "\n")
    return row


def _cmd(*args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        return None


def err(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


def bench(fn, grad_to_none=None):
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")  # ms


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_gqa(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def time_attention(name, fn, q, k, v, do, flops_fwd):
    row = {"impl": name}
    try:
        qg, kg, vg = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        fn(qg, kg, vg)  # compile / autotune outside the timing
        ms_f = bench(lambda: fn(q, k, v))

        def fwd_bwd():
            fn(qg, kg, vg).backward(do)
        fwd_bwd()
        ms_fb = bench(fwd_bwd, grad_to_none=[qg, kg, vg])
        # backward does 2.5x the forward's matmul work (5 matmuls vs 2)
        row.update(fwd_ms=ms_f, fwd_bwd_ms=ms_fb, fwd_tflops=flops_fwd / ms_f * 1e-9,
                   fwd_bwd_tflops=3.5 * flops_fwd / ms_fb * 1e-9)
    except Exception as e:  # a baseline that cannot run this shape is reported, not fatal
        row["error"] = err(e)
    return row


def bench_attention():
    rows = []
    for B, Hq, Hkv, T, D in [(B, H, H, T, D) for B, H, T, D in ATTN_SHAPES] + ATTN_GQA:
        torch.manual_seed(0)
        q = torch.randn(B, Hq, T, D, device=DEVICE, dtype=DTYPE)
        k = torch.randn(B, Hkv, T, D, device=DEVICE, dtype=DTYPE)
        v = torch.randn(B, Hkv, T, D, device=DEVICE, dtype=DTYPE)
        do = torch.randn_like(q)
        flops_fwd = 4 * B * Hq * T * T * D / 2  # two matmuls, half the square (causal)
        shape = dict(B=B, Hq=Hq, Hkv=Hkv, T=T, D=D, causal=True, dtype=str(DTYPE))
        impls = [("triton (ours)", lambda q, k, v: flash_attention(q, k, v, causal=True))]
        if Hq == Hkv:
            impls.append(("sdpa flash", sdpa_flash))
        else:
            impls.append(("sdpa gqa", sdpa_gqa))
        if flash_attn_func is not None:
            # flash-attn wants (B, T, H, D); the transposes are views, it handles GQA natively
            impls.append(("flash-attn", lambda q, k, v: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)))
        ref = sdpa_gqa(q, k, v) if Hq != Hkv else sdpa_flash(q, k, v)
        for name, fn in impls:
            row = dict(shape, **time_attention(name, fn, q, k, v, do, flops_fwd))
            if "error" not in row:
                row["max_abs_diff_vs_sdpa"] = (fn(q, k, v).float() - ref.float()).abs().max().item()
            rows.append(emit("attention", row))
            print(fmt_attn(row), flush=True)
        del q, k, v, do, ref
        torch.cuda.empty_cache()
    return rows


def bench_decode():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for B, Hq, Hkv, S, D in DECODE_SHAPES:
        torch.manual_seed(0)
        q = torch.randn(B, Hq, 1, D, device=DEVICE, dtype=DTYPE)
        k = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=DTYPE)
        v = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=DTYPE)

        def sdpa(q, k, v):  # one query sees every key: causal (bottom-right) == no mask
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                              SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)

        ref = sdpa(q, k, v)
        bias = torch.zeros(B, S, device=DEVICE)  # the engine's per-row offsets (none padded here)
        impls = [("triton (ours)", lambda q, k, v: flash_attention(q, k, v, causal=True)), ("sdpa", sdpa),
                 ("triton decode, offsets (engine)", lambda q, k, v: decode_attention(q, k, v, bias)),
                 ("torch offsets (engine)", lambda q, k, v: offset_attention(q, k, v, bias))]
        for name, fn in impls:
            row = dict(B=B, Hq=Hq, Hkv=Hkv, T=1, S=S, D=D, dtype=str(DTYPE), impl=name)
            try:
                out = fn(q, k, v)
                row["max_abs_diff_vs_sdpa"] = (out.float() - ref.float()).abs().max().item()
                row["fwd_ms"] = bench(lambda: fn(q, k, v))
                # bytes of K and V read once: decoding is bandwidth-bound
                row["kv_gbps"] = 2 * k.numel() * k.element_size() / row["fwd_ms"] * 1e-6
            except Exception as e:
                row["error"] = err(e)
            rows.append(emit("decode", row))
            print(fmt_decode(row), flush=True)
    return rows


def ce_baseline(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t)


def ce_baseline_bf16_logits(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


def liger_peak_extra_gib(N, d, V, elem):
    """Liger-Kernel's fused linear CE extra memory for this shape, read off its code
    (src/liger_kernel/ops/fused_linear_cross_entropy.py: chunk = next_pow2(ceil(N / ceil(V / d))) rows
    of logits, grad_input like the input, grad_weight like the weight (accum_dtype=None) or fp32 plus
    the final cast (accum_dtype=fp32), fp32 loss per row); grads of h and w included as measured here.
    Not a measurement: Liger publishes peak memory only for d=4096, V=128256 (its
    benchmark/data/all_benchmark_data.csv)."""
    c = -(-N // -(-V // d))
    chunk = 1 << (c - 1).bit_length()
    common = chunk * V * elem + N * d * elem + N * 4
    return {"liger_rule_peak_extra_gib": (common + V * d * elem) / 2 ** 30,
            "liger_rule_fp32_accum_peak_extra_gib": (common + V * d * (4 + elem)) / 2 ** 30}


def bench_cross_entropy():
    rows = []
    impls = [("triton fused (ours)", fused_linear_cross_entropy),
             # the default chunk follows Liger's rule (small); the former 2^28-element chunk: more memory,
             # fewer passes over the fp32 dW (is the default slower?)
             ("triton fused, 2^28-element chunk", lambda h, w, t: fused_linear_cross_entropy(
                 h, w, t, chunk_size=max(128, 2 ** 28 // w.shape[0] // 128 * 128))),
             ("F.linear + F.cross_entropy", ce_baseline_bf16_logits),
             ("F.linear + .float() + F.cross_entropy", ce_baseline)]
    for N, d, V in CE_SHAPES:
        torch.manual_seed(0)
        h = torch.randn(N, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
        w = (torch.randn(V, d, device=DEVICE) / d ** 0.5).to(DTYPE).requires_grad_()
        t = torch.randint(0, V, (N,), device=DEVICE)
        ref = None
        for name, fn in impls:
            row = dict(N=N, d=d, V=V, dtype=str(DTYPE), impl=name, **liger_peak_extra_gib(N, d, V, h.element_size()))
            try:
                def fwd_bwd():
                    fn(h, w, t).backward()
                h.grad = w.grad = None
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                loss = fn(h, w, t)
                loss.backward()
                torch.cuda.synchronize()
                # peak above what was allocated before (inputs), grads of h and w included
                row["peak_mem_gib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
                row["loss"] = loss.item()
                if ref is None:
                    ref = (loss.item(), h.grad.float(), w.grad.float())
                else:
                    row["loss_diff_vs_ours"] = abs(loss.item() - ref[0])
                    row["dh_max_diff_vs_ours"] = (h.grad.float() - ref[1]).abs().max().item()
                    row["dw_max_diff_vs_ours"] = (w.grad.float() - ref[2]).abs().max().item()
                row["fwd_bwd_ms"] = bench(fwd_bwd, grad_to_none=[h, w])
            except torch.cuda.OutOfMemoryError as e:
                row["error"] = "OOM"
            except Exception as e:
                row["error"] = err(e)
            h.grad = w.grad = None
            rows.append(emit("cross_entropy", row))
            print(fmt_ce(row), flush=True)
        del h, w, t, ref
        torch.cuda.empty_cache()
    return rows


def fmt_attn(r):
    shape = f"B={r['B']:<3d} Hq={r['Hq']:<3d} Hkv={r['Hkv']:<3d} T={r['T']:<5d} D={r['D']:<4d}"
    if "error" in r:
        return f"{shape} {r['impl']:<15s} ERROR {r['error']}"
    return (f"{shape} {r['impl']:<15s} fwd {r['fwd_ms']:8.3f} ms {r['fwd_tflops']:7.1f} TFLOP/s | "
            f"fwd+bwd {r['fwd_bwd_ms']:8.3f} ms {r['fwd_bwd_tflops']:7.1f} TFLOP/s | "
            f"max|diff| vs sdpa {r.get('max_abs_diff_vs_sdpa', float('nan')):.2e}")


def fmt_decode(r):
    shape = f"B={r['B']:<3d} Hq={r['Hq']:<3d} Hkv={r['Hkv']:<3d} T=1 S={r['S']:<5d} D={r['D']:<4d}"
    if "error" in r:
        return f"{shape} {r['impl']:<15s} ERROR {r['error']}"
    return (f"{shape} {r['impl']:<15s} fwd {r['fwd_ms']:8.4f} ms  K+V read at {r['kv_gbps']:7.1f} GB/s | "
            f"max|diff| vs sdpa {r['max_abs_diff_vs_sdpa']:.2e}")


def fmt_ce(r):
    shape = f"N={r['N']} d={r['d']:<5d} V={r['V']:<7d}"
    if "error" in r:
        return f"{shape} {r['impl']:<38s} ERROR {r['error']}"
    return (f"{shape} {r['impl']:<38s} fwd+bwd {r['fwd_bwd_ms']:8.3f} ms   peak {r['peak_mem_gib']:7.2f} GiB "
            f"(target, Liger's rule: {r['liger_rule_fp32_accum_peak_extra_gib']:.2f} GiB with an fp32 dW as ours, "
            f"{r['liger_rule_peak_extra_gib']:.2f} GiB with its default bf16 dW)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="attention,decode,ce", help="comma-separated: attention, decode, ce")
    only = ap.parse_args().only.split(",")
    dev = torch.cuda.get_device_name()
    git = _cmd("git", "rev-parse", "HEAD")
    META.update(device=dev, driver=_cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, git=git,
                flash_attn=getattr(sys.modules.get("flash_attn"), "__version__", None),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    slug = re.sub(r"[^a-z0-9]+", "-", dev.lower()).strip("-")
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    ROW_FILES.append(os.path.join(out_dir, f"kernels-{slug}.jsonl"))
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        ROW_FILES.append(os.path.join(os.environ["OUT"], f"kernels-{slug}.jsonl"))
    print(" ".join(f"{k}={v}" for k, v in META.items()), flush=True)
    print(f"rows appended to {', '.join(ROW_FILES)} as they are measured", flush=True)
    sections = [("attention", "== attention, causal, bf16 (median of do_bench) ==", bench_attention),
                ("decode", "== decode (1 query vs KV cache), bf16, forward ==", bench_decode),
                ("ce", "== fused linear + cross-entropy, bf16, fwd+bwd ==", bench_cross_entropy)]
    failed = 0
    for key, title, fn in sections:
        if key not in only:
            continue
        print("\n" + title, flush=True)
        try:
            fn()
        except Exception as e:  # one section's crash keeps the others' rows
            failed += 1
            print(f"section {key} failed: {err(e)}", flush=True)
            emit(key, {"error": err(e)})
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
