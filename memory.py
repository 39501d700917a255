"""
Memory plan: what one training step of a stage needs on one device, part by part, and whether it
fits a card. Run it before a long job instead of finding out from an out-of-memory traceback.

    python memory.py --model=135m --batch=16 --seq_len=2048
    python memory.py --model=qwen2.5-1.5b --stage=grpo --batch=4 --seq_len=1536 --rollouts=128 --card_gb=80
    python memory.py --model=qwen2.5-1.5b --stage=grpo --gradient_checkpointing=true --card_gb=24

The parts, for mixed precision as the stages train (fp32 weights and AdamW state, bf16 autocast):
    weights            4 bytes/param (fp32 master copy)
    autocast copies    2 bytes/param of every matmul weight (autocast casts each weight once per forward)
    gradients          4 bytes/param
    optimizer          8 bytes/param (AdamW exp_avg + exp_avg_sq, fp32)
    reference          GRPO with a KL (or KL logging): a second copy of the weights, 4 bytes/param as the
                       stages load it (fp32)
    KV cache           GRPO rollouts: rollouts x (prompt + completion) tokens x layers x 2 (K, V)
                       x kv_heads x head_dim x 2 bytes (bf16)
    activations        what autograd keeps for the backward, per token and layer (counted below,
                       checked against PyTorch's own saved tensors in tests/test_memory.py)
    loss               the output layer: full fp32 logits + their log-softmax with --kernels=torch,
                       one logits chunk + an fp32 dW with the fused Triton kernel
    overhead           CUDA context and allocator slack: 1 GiB + 5% of the rest (a rule of thumb)
The peak is what persists (weights, copies, optimizer, reference) plus the larger of the two phases of
a GRPO iteration: rollouts (KV cache) or the update (gradients, activations, loss).

Activations per token and layer (D = d_model, K = kv_heads x head_dim, F = d_ff, H = query heads),
from the saved tensors of model.Block:
    fp32:            9D + 2K + 4F + H + 2 floats
                     (each RMSNorm: input, 1/rms, normed; q, k, v after RoPE; attention output,
                      its reshaped copy, log-sum-exp per head; SwiGLU: gate, silu(gate), up, product)
    bf16 autocast:   32D + 4K + 8F + 4H + 8 bytes
                     (fp32 residual stream and norms; every matmul keeps its own bf16 copy of its input:
                      q/k/v cast the normed input three times, gate/up twice)
With activation checkpointing (`--gradient_checkpointing=true`) only each block's input is kept (4D bytes
per token and layer) and one block's activations are rebuilt at a time during the backward.
Deviation, stated: on CUDA, SDPA's flash backend may expand grouped K/V to the query heads (saving 2D
instead of 2K per token); the Triton kernel never does. The estimate uses the Triton kernel's layout.
"""
import dataclasses
import os
from dataclasses import dataclass

import torch

from model import model_config

GiB = 1024 ** 3


@dataclass
class MemoryConfig:
    model: str = "135m"                # model preset (model.py PRESETS)
    stage: str = "pretrain"            # pretrain | sft | grpo
    batch: int = 16                    # micro-batch: sequences per forward/backward
    seq_len: int = 2048                # tokens per training sequence
    gradient_checkpointing: bool = False
    kernels: str = "triton"            # triton (fused CE) | torch (full logits)
    dtype: str = "bf16"                # bf16 (autocast, as on CUDA) | fp32
    rollouts: int = 128                # grpo: sequences generated at once (prompts x group size)
    prompt_len: int = 256              # grpo: prompt tokens per rollout
    gen_len: int = 1024                # grpo: completion tokens per rollout
    reference: bool = True             # grpo: a reference model (beta > 0 or KL logging)
    card_gb: float = 0.0               # a card's memory in GB (1e9 bytes); 0 = report 24/40/80 GB cards


def param_counts(cfg, tie_embeddings=None, qkv_bias=None):
    """(total, in matmuls) parameter counts of a GPT with this config, without building it."""
    tie = getattr(cfg, "tie_embeddings", True) if tie_embeddings is None else tie_embeddings
    bias = getattr(cfg, "qkv_bias", False) if qkv_bias is None else qkv_bias
    hd = cfg.d_model // cfg.n_head
    q, kv = cfg.n_head * hd, cfg.n_kv_head * hd
    attn = cfg.d_model * (q + 2 * kv) + q * cfg.d_model + (q + 2 * kv if bias else 0)
    mlp = 3 * cfg.d_model * cfg.d_ff
    norms = 2 * cfg.d_model
    embed = cfg.vocab_size * cfg.d_model
    head = 0 if tie else embed
    total = cfg.n_layer * (attn + mlp + norms) + cfg.d_model + embed + head
    matmul = cfg.n_layer * (attn + mlp) + embed  # the output projection (tied or not) is one matmul
    return total, matmul


def activation_bytes_per_token_layer(cfg, dtype="bf16"):
    D, F, H = cfg.d_model, cfg.d_ff, cfg.n_head
    K = cfg.n_kv_head * (cfg.d_model // cfg.n_head)
    copy = D if H > 1 else 0  # (B, H, T, hd) -> (B, T, H*hd) is a view, not a copy, with one head
    if dtype == "fp32":
        return 4 * (8 * D + copy + 2 * K + 4 * F + H + 2)
    return 30 * D + 2 * copy + 4 * K + 8 * F + 4 * H + 8


def loss_bytes(cfg, tokens, kernels, dtype="bf16"):
    """Peak extra memory of the output layer's loss for `tokens` rows."""
    V, D = cfg.vocab_size, cfg.d_model
    if kernels == "torch":
        # bf16 logits -> fp32 copy -> log-softmax output kept for the backward; its gradient in the backward
        return tokens * V * ((2 if dtype == "bf16" else 0) + 4 + 4 + 4)
    chunk_rows = max(1, min(tokens, 2 ** 28 // V))
    return chunk_rows * V * (2 if dtype == "bf16" else 4) + V * D * 4 + tokens * D * 4


def estimate(cfg, mc):
    """-> dict of part name -> bytes for one training step of `mc.stage` with model config `cfg`."""
    total, matmul = param_counts(cfg)
    tokens = mc.batch * mc.seq_len
    parts = {"weights": 4 * total,
             "autocast copies": 2 * matmul if mc.dtype == "bf16" else 0,
             "gradients": 4 * total,
             "optimizer (AdamW)": 8 * total}
    if mc.stage == "grpo":
        parts["reference"] = 4 * total if mc.reference else 0
        hd = cfg.d_model // cfg.n_head
        parts["KV cache (rollouts)"] = (mc.rollouts * (mc.prompt_len + mc.gen_len) * cfg.n_layer
                                        * 2 * cfg.n_kv_head * hd * 2)
    per_layer = activation_bytes_per_token_layer(cfg, mc.dtype)
    final_norm = 4 * (2 * cfg.d_model + 1)
    if mc.gradient_checkpointing:
        acts = tokens * (cfg.n_layer * 4 * cfg.d_model + per_layer + final_norm)
    else:
        acts = tokens * (cfg.n_layer * per_layer + final_norm)
    parts["activations"] = acts
    parts["loss"] = loss_bytes(cfg, tokens, mc.kernels, mc.dtype)
    return parts


def peak_bytes(parts):
    """Rollouts and the update never overlap (the KV cache is freed before the backward, gradients are
    freed after each optimizer step): peak = what persists + the larger phase + overhead."""
    kv = parts.get("KV cache (rollouts)", 0)
    update = parts["gradients"] + parts["activations"] + parts["loss"]
    persistent = sum(parts.values()) - kv - update
    sub = persistent + max(kv, update)
    return sub + GiB + 0.05 * sub  # CUDA context + allocator slack (a rule of thumb)


def largest_micro_batch(cfg, mc, card_bytes):
    """The largest micro-batch whose estimate fits `card_bytes` (0 if even 1 does not)."""
    best, mb = 0, 1
    while mb <= 4096:
        trial = dataclasses.replace(mc, batch=mb)
        if peak_bytes(estimate(cfg, trial)) > card_bytes:
            break
        best, mb = mb, mb * 2
    if best:  # refine between best and 2*best
        lo, hi = best, best * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = dataclasses.replace(mc, batch=mid)
            lo, hi = (mid, hi) if peak_bytes(estimate(cfg, trial)) <= card_bytes else (lo, mid)
        best = lo
    return best


def available_bytes(device):
    """Memory a run on `device` may use: the GPU's total, or the host's available RAM."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def probe_fits(model, micro, seq_len, device, budget):
    """CUDA: run one forward+backward of `micro` random sequences and compare its peak (+ the AdamW state
    the first optimizer step will allocate) with `budget`. Out of memory counts as not fitting."""
    from common import autocast
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        x = torch.randint(0, model.cfg.vocab_size, (micro, seq_len), device=device)
        with autocast(device):
            loss = model(x, x)
        loss.backward()
        peak = torch.cuda.max_memory_allocated(device) + 8 * model.num_params()
    except torch.cuda.OutOfMemoryError:
        peak = float("inf")
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return peak <= budget


def auto_micro_batch(model, global_batch, seq_len, device, kernels, headroom=0.9):
    """The largest micro-batch (a divisor of `global_batch`, so the global batch stays exact) whose training
    step fits `headroom` of the device's memory: probed on CUDA, from the estimate elsewhere.
    -> (micro_batch, grad_accum)."""
    budget = headroom * available_bytes(device)
    on_cuda = torch.device(device).type == "cuda"
    mc = MemoryConfig(seq_len=seq_len, kernels=kernels if on_cuda else "torch", dtype="bf16" if on_cuda else "fp32",
                      gradient_checkpointing=model.gradient_checkpointing)
    for micro in sorted((d for d in range(1, global_batch + 1) if global_batch % d == 0), reverse=True):
        if on_cuda:
            fits = probe_fits(model, micro, seq_len, device, budget)
        else:
            fits = peak_bytes(estimate(model.cfg, dataclasses.replace(mc, batch=micro))) <= budget
        if fits:
            return micro, global_batch // micro
    raise SystemExit(f"error: not even one sequence of {seq_len} tokens fits {budget / GiB:.1f} GiB on {device}; "
                     f"try --gradient_checkpointing=true or a shorter --seq_len (python memory.py shows the plan)")


def nothing_fits_hint(cfg, mc, card_bytes):
    """What to change when not even one sequence fits."""
    fixed = peak_bytes({**estimate(cfg, dataclasses.replace(mc, batch=1)), "activations": 0, "loss": 0,
                        "KV cache (rollouts)": 0})
    if fixed > card_bytes:
        return (f"weights, gradients, AdamW state" + (", reference" if mc.stage == "grpo" and mc.reference else "")
                + f" and overhead alone need {fixed / GiB:.1f} GiB: this card cannot fully "
                f"fine-tune the model; use a bigger card or shard across GPUs")
    hint = [] if mc.gradient_checkpointing else ["--gradient_checkpointing=true"]
    return "try " + ", ".join(hint + ["a shorter --seq_len"] + (["fewer --rollouts"] if mc.stage == "grpo" else []))


def report(cfg, mc):
    parts = estimate(cfg, mc)
    total_params, _ = param_counts(cfg)
    lines = [f"memory plan: {mc.model} ({total_params / 1e6:.1f}M params), stage {mc.stage}, micro-batch {mc.batch} "
             f"x {mc.seq_len} tokens, {mc.dtype}, kernels {mc.kernels}, "
             f"activation checkpointing {'on' if mc.gradient_checkpointing else 'off'}"
             + (f", {mc.rollouts} rollouts of {mc.prompt_len}+{mc.gen_len} tokens" if mc.stage == "grpo" else "")]
    for name, b in parts.items():
        lines.append(f"  {name:<26} {b / GiB:8.2f} GiB")
    total = peak_bytes(parts)
    lines.append(f"  {'peak (with overhead)':<26} {total / GiB:8.2f} GiB"
                 + ("   (rollouts and update do not overlap)" if mc.stage == "grpo" else ""))
    cards = [mc.card_gb] if mc.card_gb > 0 else [24, 40, 80]
    for gb in cards:
        fits = total <= gb * 1e9
        mb = largest_micro_batch(cfg, mc, gb * 1e9)
        lines.append(f"  {gb:g} GB card: {'fits' if fits else 'does NOT fit'}; largest micro-batch that fits: "
                     + (f"{mb}" if mb else "none (" + nothing_fits_hint(cfg, mc, gb * 1e9) + ")"))
    return "\n".join(lines), total


def main(mc):
    if mc.stage not in ("pretrain", "sft", "grpo"):
        raise SystemExit(f"error: --stage must be pretrain, sft or grpo, got '{mc.stage}'")
    if mc.kernels not in ("triton", "torch") or mc.dtype not in ("bf16", "fp32"):
        raise SystemExit("error: --kernels must be triton or torch and --dtype bf16 or fp32")
    cfg = model_config(mc.model)
    text, _ = report(cfg, mc)
    print(text)


if __name__ == "__main__":
    from common import parse_config
    main(parse_config(MemoryConfig()))
