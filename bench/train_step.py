"""
Pretraining step speed: the 135M preset's training step (bf16 autocast, T=2048, AdamW, the largest
micro-batch that fits) with --kernels=triton vs torch, each with and without torch.compile:
tokens/s, MFU against the card's peak bf16 dense FLOP/s, peak memory.

    python bench/train_step.py                      # on a CUDA machine: the four configurations
    python bench/train_step.py --smoke              # anywhere: a tiny shape, to know it runs (CPU: torch kernels)
    python bench/train_step.py --configs=triton,torch --micro_batch=16

FLOPs per token (PaLM appendix B / nanoGPT's estimate): 6 * params (every matmul: forward 2, backward 4;
tied embeddings count once, as the output head) + 6 * n_layer * T * d_model (causal attention: the
12 L T d of QK^T and PV halved by the mask). MFU = achieved FLOP/s / peak. One JSON row per
configuration is appended to --out as soon as it is measured (device, versions, commit, date in each).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

from model import GPT, model_config

# peak dense bf16 tensor-core FLOP/s (no sparsity), from the vendors' data sheets
PEAK_BF16_TFLOPS = {"H100 SXM": 989, "H100 NVL": 835, "H100 PCIe": 756, "H100": 989, "H200": 989, "B200": 2250,
                    "A100": 312, "L40S": 362, "L4": 121, "A10": 125}


def peak_tflops(name):
    n = name.replace(" ", "").replace("80GBHBM3", "SXM").lower()
    for key, v in PEAK_BF16_TFLOPS.items():
        if key.replace(" ", "").lower() in n:
            return v
    return None


def _cmd(*args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        return None


def build(preset, kernels, compile_, device, T, overrides):
    torch.manual_seed(0)
    model = GPT(model_config(preset, kernels=kernels, max_seq_len=max(T, 16), **overrides)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if compile_ else model
    return model, fwd, opt


def train_step(model, fwd, opt, x, y, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = fwd(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def fits(model, fwd, opt, B, T, device):
    x = torch.randint(0, model.cfg.vocab_size, (B, T), device=device)
    try:
        train_step(model, fwd, opt, x, x, device)
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def largest_micro_batch(model, fwd, opt, T, device, limit=256):
    B, best = 1, None
    while B <= limit and fits(model, fwd, opt, B, T, device):
        best, B = B, B * 2
    return best


def measure(args, kernels, compile_, device, meta, out_files):
    overrides = dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128) if args.smoke else {}
    model, fwd, opt = build(args.preset, kernels, compile_, device, args.seq, overrides)
    row = dict(meta, preset=args.preset if not args.smoke else "smoke", kernels=kernels, compile=compile_,
               seq=args.seq, params=model.num_params())
    try:
        B = args.micro_batch
        if not B:
            B = largest_micro_batch(model, fwd, opt, args.seq, device) if device.type == "cuda" else 2
            if B is None:
                raise RuntimeError(f"even micro-batch 1 at T={args.seq} does not fit")
        x = torch.randint(0, model.cfg.vocab_size, (B, args.seq), device=device)
        y = torch.randint(0, model.cfg.vocab_size, (B, args.seq), device=device)
        t_compile = time.perf_counter()
        for _ in range(args.warmup):  # compile / autotune / allocator warm-up
            train_step(model, fwd, opt, x, y, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t_compile = time.perf_counter() - t_compile
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = train_step(model, fwd, opt, x, y, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.steps
        tokens = B * args.seq
        flops_per_token = 6 * row["params"] + 6 * model.cfg.n_layer * args.seq * model.cfg.d_model
        row.update(micro_batch=B, step_s=round(dt, 4), tokens_per_s=round(tokens / dt, 1),
                   model_tflops=round(flops_per_token * tokens / dt / 1e12, 2), warmup_s=round(t_compile, 1),
                   loss=round(float(loss), 4))
        if device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            peak = peak_tflops(meta["device"])
            if peak:
                row.update(peak_tflops=peak, mfu=round(row["model_tflops"] / peak, 4))
    except Exception as e:  # reported, and the next configuration still runs
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    line = json.dumps(row)
    for path in out_files:
        with open(path, "a") as f:
            f.write(line + "\n")
    print(line, flush=True)
    del model, fwd, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="135m")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro_batch", type=int, default=0, help="0 = the largest power of two that fits (CUDA)")
    ap.add_argument("--configs", default="triton,torch,triton+compile,torch+compile")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny model, T=64, 2 steps: checks the script runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configs = args.configs.split(",")
    if args.smoke:
        args.seq, args.steps, args.warmup = 64, 2, 1
        if device.type != "cuda":  # the Triton kernels would run interpreted (minutes), compile is slow on CPU
            configs = ["torch"]
    elif device.type != "cuda":
        print("bench/train_step.py: no CUDA here, running the --smoke shape instead", flush=True)
        args.smoke, args.seq, args.steps, args.warmup = True, 64, 2, 1
        configs = ["torch"]
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                driver=_cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
                torch=torch.__version__, cuda=torch.version.cuda, git=_cmd("git", "rev-parse", "HEAD"),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    out = args.out or os.path.join("bench", "results", f"train_step-{device.type}{'-smoke' if args.smoke else ''}.jsonl")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    out_files = [out] + ([os.path.join(os.environ["OUT"], os.path.basename(out))] if os.environ.get("OUT") else [])
    rows = []
    for c in configs:
        kernels, _, comp = c.partition("+")
        rows.append(measure(args, kernels, comp == "compile", device, meta, out_files))
    print("\n| kernels | compile | micro-batch | tokens/s | MFU | peak GiB |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kernels']} | {r['compile']} | {r.get('micro_batch', '-')} | {r.get('tokens_per_s', r.get('error'))} "
              f"| {r.get('mfu', '-')} | {r.get('peak_mem_gib', '-')} |")
    sys.exit(1 if any("error" in r for r in rows) else 0)


if __name__ == "__main__":
    main()
