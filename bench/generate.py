"""
Generation speed: nanoforge's engine vs transformers' `generate` (plain dynamic cache, and static
cache) on the same 135M-shaped weights (SmolLM2-135M's shape, random weights: speed does not depend
on the values; no stop token, every row runs all new tokens). Greedy, B distinct random prompts of
`prompt` tokens each, `new` new tokens, repetitions interleaved (engine, hf, hf-static, engine, ...)
so a noisy shared machine slows every contender alike. Ratios are taken within the run.
The `floor` row times the linear layers alone for the same prefill and decode steps (same dtype and
threads): no sampler at this dtype can beat it, so floor / best hf is the most any sampler could get
over transformers here (on a CPU both are bound by these matmuls; the floor leaves attention out,
which at batch 64 and 320 cached positions reads 0.94 GB of fp32 K/V per step, more than the 0.54 GB
of 135M fp32 weights).

    python bench/generate.py                                   # CPU: batch 1, 8, 64
    python bench/generate.py --batches=1,8 --new=64 --reps=2   # shorter
    python bench/generate.py --device=cuda --dtype=bfloat16    # GPU: also prints the batch-1 bandwidth bound

Writes one JSON row per measurement (appended as it goes) to --out (default
bench/results/generate-<device>.jsonl), with device, versions, git commit and date in every row.
transformers is needed here (a bench, not training/inference code).
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
import torch.nn.functional as F

from engine import Engine
from model import GPT, model_config


def hf_llama_from(model):
    """A transformers LlamaForCausalLM holding exactly `model`'s weights (same RoPE half-split layout,
    tied embeddings, RMSNorm eps). Bench/test helper; issue 7's hf.py is the real import/export."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.cfg
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                         num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                         max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                         tie_word_embeddings=True, attention_bias=False, mlp_bias=False, head_dim=c.d_model // c.n_head,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf_cfg.rope_parameters = {"rope_type": "default", "rope_theta": c.rope_theta}  # transformers >= 5 reads this
    hf = LlamaForCausalLM(hf_cfg)
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = b.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = b.mlp_norm.weight
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = getattr(b.attn, n).weight
        for n in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{n}.weight"] = getattr(b.mlp, n).weight
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied
    assert not missing and not unexpected, (missing, unexpected)
    hf.tie_weights()
    return hf.to(device=model.embed.weight.device, dtype=model.embed.weight.dtype).eval()


def hf_generate(hf, ids, new, static):
    kw = dict(cache_implementation="static") if static else {}
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    return out[:, ids.size(1):]


def matmul_floor(model, B, prompt, new):
    """The linear layers alone of one generate call, timed as a sampler is (the bound that any sampler at this
    dtype meets): one prefill's projections over B x prompt tokens (the output layer on the B last
    positions only), then `new` decode steps' projections and output layer over B rows, all run (not
    extrapolated, so a noisy machine slows it as much as the samplers). Attention, norms, RoPE,
    sampling and everything else are left out."""
    c = model.cfg
    ws = [w for b in model.blocks for w in (b.attn.q_proj.weight, b.attn.k_proj.weight, b.attn.v_proj.weight,
                                            b.attn.o_proj.weight, b.mlp.gate_proj.weight, b.mlp.up_proj.weight,
                                            b.mlp.down_proj.weight)]
    head = model.lm_head_weight
    dev, dt = head.device, head.dtype
    hq = c.n_head * (c.d_model // c.n_head)

    def run(rows, last_rows):
        x, xa, xf = (torch.randn(rows, n, device=dev, dtype=dt) for n in (c.d_model, hq, c.d_ff))
        for i, w in enumerate(ws):
            F.linear(xf if i % 7 == 6 else xa if i % 7 == 3 else x, w)
        F.linear(x[:last_rows], head)

    run(B * prompt, B)
    for _ in range(new):
        run(B, B)


def env_info(device):
    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return None
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git=git("rev-parse", "HEAD"), torch=torch.__version__, python=sys.version.split()[0],
                threads=torch.get_num_threads(), loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    driver=_nvidia_smi("driver_version"), gpu_mem_gib=round(p.total_memory / 2**30, 1))
    else:
        info["device"] = "cpu"
    return info


def _nvidia_smi(field):
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        return None


# peak HBM bandwidth (GB/s) by product name, from the vendors' data sheets
PEAK_BANDWIDTH_GBS = {"H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "H200": 4800,
                      "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100": 1555, "L4": 300, "A10": 600}


def peak_bandwidth_gbs(device):
    name = torch.cuda.get_device_name(device)
    for key, bw in PEAK_BANDWIDTH_GBS.items():
        if key.replace(" ", "").lower() in name.replace(" ", "").replace("80GBHBM3", "SXM").lower():
            return bw, key
    p = torch.cuda.get_device_properties(device)
    clock, bus = getattr(p, "memory_clock_rate", None), getattr(p, "memory_bus_width", None)
    if clock and bus:  # kHz, bits; DDR: two transfers per clock
        return 2 * clock * 1e3 * bus / 8 / 1e9, "from clock and bus width"
    return None, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--new_at", default="", help="per-batch new tokens, e.g. 64:32 (batch 64 runs 32 new tokens)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--impls", default="engine,hf,hf_static,floor",
                    help="engine, engine_eager (CUDA: no graphs), hf, hf_static, floor (the linear layers alone: "
                         "matmul_floor)")
    ap.add_argument("--preset", default="135m")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    out_path = args.out or os.path.join("bench", "results", f"generate-{device.type}.jsonl")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    impls = args.impls.split(",")
    if device.type == "cuda" and "engine_eager" not in impls and "engine" in impls:
        impls.insert(1, "engine_eager")
    new_at = {int(k): int(v) for k, v in (kv.split(":") for kv in args.new_at.split(",") if kv)}

    torch.manual_seed(0)
    model = GPT(model_config(args.preset)).to(device=device, dtype=dtype).eval()
    n_params = model.num_params()
    hf = hf_llama_from(model) if any(i.startswith("hf") for i in impls) else None
    engines = {"engine": Engine(model), "engine_eager": Engine(model, cuda_graphs=False)}
    info = env_info(device)
    info.update(preset=args.preset, params=n_params, dtype=str(dtype).replace("torch.", ""), prompt=args.prompt)
    print(json.dumps(info))
    if device.type == "cuda":
        bw, src = peak_bandwidth_gbs(device)
        if bw:
            bytes_per_token = n_params * torch.finfo(dtype).bits / 8  # every weight read once per decode step
            bound = bw * 1e9 / bytes_per_token
            info["batch1_bandwidth_bound_tok_s"] = round(bound, 1)
            print(f"batch-1 memory-bandwidth bound: {bw} GB/s ({src}) / {bytes_per_token / 1e6:.0f} MB of weights "
                  f"= {bound:.0f} tokens/s (target: >= half of it)")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = {}
    with open(out_path, "a") as f:
        for B in [int(b) for b in args.batches.split(",")]:
            new = new_at.get(B, args.new)
            g = torch.Generator().manual_seed(B)
            ids = torch.randint(0, model.cfg.vocab_size, (B, args.prompt), generator=g).to(device)
            prompts = ids.tolist()
            for rep in range(-1, args.reps):  # rep -1: warm-up (graphs captured, caches allocated), not recorded
                for impl in impls:
                    sync()
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        if impl == "floor":
                            matmul_floor(model, B, args.prompt, new if rep >= 0 else 1)
                        elif impl.startswith("engine"):
                            engines[impl].generate(prompts, max_new_tokens=new if rep >= 0 else min(new, 8))
                        else:
                            hf_generate(hf, ids, new if rep >= 0 else min(new, 8), static=impl == "hf_static")
                    sync()
                    dt = time.perf_counter() - t0
                    if rep < 0:
                        continue
                    tok_s = B * new / dt
                    results.setdefault((B, impl), []).append(tok_s)
                    row = dict(info, batch=B, new_tokens=new, impl=impl, rep=rep, seconds=round(dt, 3),
                               tokens_per_s=round(tok_s, 1), loadavg_now=os.getloadavg())
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    print(f"batch {B:3d} new {new} {impl:13s} rep {rep}: {tok_s:8.1f} tok/s ({dt:.2f} s)", flush=True)
    print(f"\nbest of {args.reps} reps, tokens/s (load average now {os.getloadavg()}):")
    print("| batch | " + " | ".join(impls) + " | engine / best hf | floor / best hf (the most any sampler gets) |")
    print("|---:|" + "---:|" * (len(impls) + 2))
    for B in [int(b) for b in args.batches.split(",")]:
        best = {i: max(results.get((B, i), [float("nan")])) for i in impls}
        hfs = [best[i] for i in impls if i.startswith("hf")]
        ratio = best.get("engine", float("nan")) / max(hfs) if hfs else float("nan")
        ceiling = best.get("floor", float("nan")) / max(hfs) if hfs else float("nan")
        print(f"| {B} | " + " | ".join(f"{best[i]:.1f}" for i in impls) + f" | {ratio:.2f}x | {ceiling:.2f}x |")
    print(f"raw rows appended to {out_path}")


if __name__ == "__main__":
    main()
