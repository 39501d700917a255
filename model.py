"""
The model: a Llama-style decoder (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases,
tied embeddings). Sampling (the KV cache, batching, stop tokens) lives in engine.py. Two switches make
it a Qwen2 too (`qkv_bias`, `tie_embeddings=False`), so Hugging Face Llama/Qwen2 checkpoints map onto
it one tensor for one tensor (hf.py).

Attention and the output loss each go through one function (`attention`, `output_loss`,
`output_logprobs`) so the Triton kernels of kernels/ drop in behind `kernels="triton"`.
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    d_model: int = 576
    d_ff: int = 1536
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False          # biases on the q/k/v projections (Qwen2); o_proj and the MLP never have one
    tie_embeddings: bool = True     # output layer = input embedding; False gives a separate lm_head (untied)
    kernels: str = "torch"  # "torch" or "triton"; not part of the weights, chosen per run


PRESETS = {
    # the CPU demo: ~1M parameters, trains in minutes on 2 cores
    "tiny": dict(n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_ff=384, max_seq_len=256),
    # real text on a laptop CPU: 9.4M parameters in the blocks, +3.1M in the embedding at an 8k vocabulary
    # (12.6M); a context of 512 holds almost every GSM8K question + solution
    "cpu": dict(n_layer=6, n_head=6, n_kv_head=2, d_model=384, d_ff=1024, max_seq_len=512),
    # SmolLM2-135M exactly (its config.json / GGUF metadata): 30 layers, d 576, 9 heads / 3 KV heads,
    # SwiGLU 1536, vocab 49152, rope_theta 1e5, RMSNorm eps 1e-5, 8192 positions, tied embeddings
    "135m": dict(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536, max_seq_len=8192,
                 rope_theta=100000.0, norm_eps=1e-5),
    # Qwen2.5-1.5B's shape (tied embeddings, biases on q/k/v as in its config): the size the RL recipes start
    # from, for memory plans and the 1.5B GRPO run
    "qwen2.5-1.5b": dict(vocab_size=151936, n_layer=28, n_head=12, n_kv_head=2, d_model=1536, d_ff=8960,
                         max_seq_len=4096, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True),
}

SIZE_FLAGS = ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff")  # the dials that override a preset


def model_config(preset, **overrides):
    """A preset's config with `overrides` applied (None or 0 = keep the preset's value), checked so a
    bad combination is one clear line, not a shape error deep in the model."""
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown model config '{preset}'; choose one of {sorted(PRESETS)}")
    cfg = ModelConfig(**{**PRESETS[preset], **{k: v for k, v in overrides.items() if v not in (None, 0)}})
    for name in SIZE_FLAGS:
        if getattr(cfg, name) < 1:
            raise SystemExit(f"error: --{name} must be positive, got {getattr(cfg, name)}")
    if cfg.d_model % cfg.n_head or (cfg.d_model // cfg.n_head) % 2:
        raise SystemExit(f"error: --d_model={cfg.d_model} must be a multiple of --n_head={cfg.n_head} with an even "
                         f"head size (RoPE rotates pairs); e.g. --d_model={cfg.n_head * 64}")
    if cfg.n_head % cfg.n_kv_head:
        raise SystemExit(f"error: --n_head={cfg.n_head} must be a multiple of --n_kv_head={cfg.n_kv_head} "
                         f"(grouped-query attention shares each KV head among n_head / n_kv_head query heads)")
    return cfg


# ----------------------------------------------------------------------------------------------
# The two swappable functions: attention and the output-layer loss.

def attention(q, k, v, causal, kernels="torch"):
    """q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq a multiple of Hkv."""
    if kernels == "triton":
        from kernels.attention import flash_attention
        return flash_attention(q, k, v, causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.size(1) != k.size(1))


def output_loss(hidden, weight, targets, kernels="torch"):
    """Mean cross-entropy of softmax(hidden @ weight.T) over targets != -100.
    hidden: (N, d), weight: (V, d), targets: (N,)."""
    if kernels == "triton":
        from kernels.cross_entropy import fused_linear_cross_entropy
        return fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100)
    logits = F.linear(hidden, weight).float()
    if (targets != -100).sum() == 0:  # no supervised token: zero loss rather than NaN
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=-100)


def output_logprobs(hidden, weight, tokens, kernels="torch"):
    """log softmax(hidden @ weight.T)[i, tokens[i]], float32, shape (N,)."""
    if kernels == "triton":
        from kernels.cross_entropy import fused_linear_logprobs
        return fused_linear_logprobs(hidden, weight, tokens)
    logits = F.linear(hidden, weight).float()
    return -F.cross_entropy(logits, tokens, reduction="none")


# ----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim, max_len, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (max_len, D/2)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos, sin: (B or 1, T, D/2). Rotates the two halves of each head (Llama layout)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, kernels, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: the engine's cache stores k, v and attends (engine.KVCache)
            y = cache.attend(q, k, v)
        else:
            y = attention(q, k, v, causal=True, kernels=kernels)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kernels, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, kernels, cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0
        self.cfg = cfg
        self.gradient_checkpointing = False  # per run, not part of the weights: set by the stage's config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.d_model // cfg.n_head, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # residual projections scaled down with depth (GPT-2)
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    @property
    def lm_head_weight(self):
        return self.embed.weight if self.cfg.tie_embeddings else self.lm_head.weight

    @classmethod
    def from_state_dict(cls, cfg, state):
        """The model holding `state`'s tensors themselves (no random init, no copy, their dtype kept):
        built on the meta device, then the tensors assigned. Raises RuntimeError when they do not fit."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(state, assign=True)
        device = model.embed.weight.device
        cos, sin = rope_tables(cfg.d_model // cfg.n_head, cfg.max_seq_len, cfg.rope_theta)
        model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
        return model

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, positions=None, caches=None):
        """Final-normed hidden states (B, T, d). positions: (B, T) or None for 0..T-1.
        caches: generation's engine.KVCache (caches[i] is layer i's), or None."""
        B, T = idx.shape
        if positions is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[:T][None], self.rope_sin[:T][None]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.embed(idx)
        # activation checkpointing: keep only each block's input, rebuild its activations in the backward
        recompute = self.gradient_checkpointing and caches is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, self.cfg.kernels, use_reentrant=False)
            else:
                x = block(x, cos, sin, self.cfg.kernels, None if caches is None else caches[i])
        return self.norm(x)

    def forward(self, idx, targets=None):
        """Logits (B, T, V) or, given targets (B, T) with -100 = ignore, the mean loss."""
        h = self.hidden_states(idx)
        if targets is None:
            return F.linear(h, self.lm_head_weight).float()
        return output_loss(h.flatten(0, 1), self.lm_head_weight, targets.flatten(), self.cfg.kernels)

    def token_logprobs(self, idx, targets):
        """log p(targets[b, t] | idx[b, :t+1]), shape (B, T); GRPO's per-token log-probs."""
        h = self.hidden_states(idx)
        lp = output_logprobs(h.flatten(0, 1), self.lm_head_weight, targets.flatten(), self.cfg.kernels)
        return lp.view(targets.shape)
