"""
The sampling engine: every completion nanoforge samples (eval, GRPO rollouts, sampling scripts) comes
from `Engine.generate`. Shape after nanochat's `Engine`: token ids in, token ids out.

    engine = Engine(model)
    out = engine.generate(prompts, n=8, max_new_tokens=256, stop_tokens=[tok.end_id], temperature=1.0, seed=0)
    out[i][j].tokens, out[i][j].truncated, out[i][j].logprobs   # sample j of prompts[i]

What one call does, per chunk of at most `max_batch` rows:
  1. prefill: the chunk's distinct prompts, left-padded to the longest, in one forward; a prompt's
     keys/values are computed once and then copied to the rows of its n samples;
  2. decode: one token per row per step from the KV cache. Rows are left-padded, so every row writes
     its new key into the same cache slot; row b's real keys start at slot `start[b]` (its padding
     offset) and its positions count from 0 there. Attention takes the offsets, not a mask: the
     additive key bias (0 on real slots, -inf on padding) is built once per call and sliced per step;
  3. a row that produced a stop token is finished, and so is a row whose text now contains one of
     `stop_strings` (with `decode`: HF generate's `stop_strings`, the harness's `until`; only the last
     few tokens are decoded each step, enough to hold the longest string); once enough rows are
     finished the batch is compacted (cache, offsets, hidden states), so finished rows stop costing
     compute.
On CUDA (`cuda_graphs`), decode runs from a static cache (every step attends over the whole cache,
slots past the current one masked by the offsets) and each batch-size bucket's step is captured once
as a CUDA graph, which removes the per-operation launch overhead that dominates a small model.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Sample(NamedTuple):
    tokens: list          # the new tokens, cut after the first stop token (included) or the token that completed a stop string
    truncated: bool       # ran out of max_new_tokens without a stop token or stop string
    logprobs: list = None  # per new token: log softmax of the raw logits (temperature 1, no top-k/p); or None


def stop_tokens_for(tok, fmt):
    """Stop ids of a prompt format: chat ends at the end-of-turn token(s), a plain (base model)
    completion where the model starts a new document (<|bos|>)."""
    if fmt == "chat":
        extra = getattr(tok, "stop_ids", None) or []
        return sorted({tok.end_id, *extra})
    return [tok.bos_id]


def sample_next(logits, temperature, top_k, top_p, generator):
    """logits (B, V) -> next token (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# The KV cache and attention with per-row offsets

HALF_DTYPES = (torch.bfloat16, torch.float16)


def offset_attention(q, k, v, bias, backend="torch"):
    """Decode attention: q (B, Hq, T, D) against k, v (B, Hkv, S, D) with an additive key bias
    (B, S) in q's dtype (0 = attend, -inf = padding or not yet written). One SDPA call (GQA without
    repeating K/V where the backend can): a single op per layer matters, since a decode step is mostly
    per-operation overhead for a small model. bf16/fp16 on the CPU: grouped_attention instead."""
    if backend == "triton":
        from kernels.attention import decode_attention
        return decode_attention(q, k, v, bias)
    if q.device.type == "cpu" and q.dtype in HALF_DTYPES:
        return grouped_attention(q, k, v, bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :], enable_gqa=q.size(1) != k.size(1))


def grouped_attention(q, k, v, bias):
    """offset_attention as two batched matmuls, for bf16/fp16 on the CPU, where SDPA with a mask took 1.6x
    (batch 1) to 5x (batch 64) as long as this at the 135M preset's decode shapes (torch 2.13, 1 thread). The
    Hq/Hkv query heads that share a KV head are stacked as rows of one matmul (GQA without repeating K/V).
    Precision: q is scaled by 1/sqrt(D) before the matmul (so fp16 scores cannot overflow where SDPA's do
    not); the scores leave the matmul in q's dtype, rounded once as every projection's output is, then the
    softmax runs in fp32 and the probabilities are cast to V's dtype for the second matmul. SDPA keeps the
    scores in fp32: at the 135M decode shapes (batch 1/8/64, 200 of 320 slots written, one random draw each)
    this path's largest error against fp64 was 2.3e-3 / 2.9e-3 / 6.3e-3, SDPA's own bf16 error 1.6e-3 /
    1.3e-3 / 1.8e-3. fp32 scores would need K upcast every step (2.4x slower at batch 64)."""
    B, Hq, T, D = q.shape
    Hkv = k.size(1)
    qg = (q * D ** -0.5).reshape(B, Hkv, Hq // Hkv * T, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() + bias[:, None, None, :].float()
    return torch.matmul(scores.softmax(-1).to(v.dtype), v).reshape(B, Hq, T, D)



class KVCache:
    """All layers' keys and values, (n_layer, B, Hkv, S, D) each, rows left-padded.

    `start` (B,): slot of each row's first real token. `bias` (B, S): 0 on slots >= start, -inf
    before, built once. `len`: slots written so far (the same for every row). The model calls
    `cache[layer].attend(q, k, v)`, which stores the new keys/values and attends."""

    def __init__(self, n_layer, B, n_kv_head, S, head_dim, device, dtype, start, backend="torch", static=False):
        self.k = torch.zeros(n_layer, B, n_kv_head, S, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.start = start
        self.slots = torch.arange(S, device=device)
        self.bias = torch.zeros(B, S, device=device, dtype=dtype).masked_fill(self.slots[None, :] < start[:, None],
                                                                                float("-inf"))
        self.len = 0
        self.backend = backend
        self.static = static        # attend over all S slots, write at the tensor position `cur` (graph-safe)
        self.cur = torch.zeros(1, dtype=torch.long, device=device)
        self.step_bias = None       # static mode: this step's bias, shared by the layers
        self.prefilling = False     # set by the engine around the prefill forward
        self.prefill_mask = None    # prefill with padding: (B, 1, T, T) causal-among-real-tokens mask
        # bf16/fp16 on the CPU: decode attends over all S slots, those not yet written masked, because the
        # (B, Hkv, :len) slice of the cache is not one block and the matmul would copy it every layer and step
        self.whole_slots = device.type == "cpu" and dtype in HALF_DTYPES and backend == "torch" and not static

    def __getitem__(self, layer):
        return _LayerCache(self, layer)

    def keep(self, rows):
        """Keep only these rows (LongTensor), in this order: compaction and prompt -> samples expansion."""
        self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
        self.start, self.bias = self.start.index_select(0, rows), self.bias.index_select(0, rows)

    def begin_static_step(self):
        valid = (self.slots[None, :] >= self.start[:, None]) & (self.slots[None, :] <= self.cur)
        self.step_bias = torch.zeros_like(self.bias).masked_fill(~valid, float("-inf"))


class _LayerCache:
    def __init__(self, cache, layer):
        self.c, self.i = cache, layer

    def attend(self, q, k, v):
        c, T = self.c, q.size(2)
        kc, vc = c.k[self.i], c.v[self.i]
        if c.prefilling:  # prefill: slots 0..T-1, causal among each row's real tokens
            kc[:, :, :T], vc[:, :, :T] = k, v
            if c.prefill_mask is None:  # no padding: the plain causal kernel (no mask tensor at all)
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=c.prefill_mask, enable_gqa=q.size(1) != k.size(1))
        if c.static:
            kc.index_copy_(2, c.cur, k)
            vc.index_copy_(2, c.cur, v)
            return offset_attention(q, kc, vc, c.step_bias, c.backend)
        end = c.len + T
        kc[:, :, c.len:end], vc[:, :, c.len:end] = k, v
        if c.whole_slots:  # (B, S) mask per layer: microseconds beside the attention's milliseconds
            return offset_attention(q, kc, vc, c.bias.masked_fill(c.slots[None, :] >= end, float("-inf")), c.backend)
        return offset_attention(q, kc[:, :, :end], vc[:, :, :end], c.bias[:, :end], c.backend)


# ----------------------------------------------------------------------------------------------

def _bucket(n):
    """Batch-size buckets of the CUDA graphs: powers of two."""
    return 1 << (max(n, 1) - 1).bit_length()


class Engine:
    def __init__(self, model, max_batch=256, cuda_graphs="auto", decode_attention="auto"):
        """max_batch: rows decoded at once. cuda_graphs: "auto" (on for CUDA) / True / False.
        decode_attention: "auto" (torch) / "torch" / "triton" (kernels.attention.decode_attention)."""
        self.model = model
        self.max_batch = max_batch
        device = model.embed.weight.device
        self.device = device
        if cuda_graphs == "auto":
            cuda_graphs = device.type == "cuda"
        if cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        self.cuda_graphs = bool(cuda_graphs)
        if decode_attention == "auto":
            decode_attention = "torch"
        if decode_attention not in ("torch", "triton"):
            raise ValueError(f"decode_attention must be auto, torch or triton, got {decode_attention!r}")
        self.decode_attention = decode_attention
        self._graphs = {}  # (bucket, S) -> _GraphStep

    @torch.no_grad()
    def generate(self, prompts, n=1, max_new_tokens=256, stop_tokens=(), temperature=0.0, top_k=0, top_p=1.0,
                 generator=None, seed=None, logprobs=False, stop_strings=(), decode=None):
        """out[i][j] = Sample j of prompts[i]; see the module docstring. stop_strings need `decode`
        (token ids -> text); the text after a stop string is the caller's to cut, as with HF generate."""
        if stop_strings and decode is None:
            raise ValueError("stop_strings need decode= (the tokenizer's decode) to read the generated text")
        cfg = self.model.cfg
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: give at least one token (e.g. <|bos|>)")
            if len(p) + max_new_tokens > cfg.max_seq_len:
                raise ValueError(f"prompt {i} ({len(p)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                                 f"max_seq_len {cfg.max_seq_len}")
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"n ({n}) and max_new_tokens ({max_new_tokens}) must be >= 1")
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        stops = sorted(set(int(s) for s in stop_tokens))
        # work items (prompt index, samples), packed into chunks of at most max_batch rows
        items = [(i, min(self.max_batch, n - j)) for i in range(len(prompts)) for j in range(0, n, self.max_batch)]
        chunks, cur, rows = [], [], 0
        for it in items:
            if rows + it[1] > self.max_batch:
                chunks.append(cur)
                cur, rows = [], 0
            cur.append(it)
            rows += it[1]
        if cur:
            chunks.append(cur)
        out = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            for chunk in chunks:
                samples = self._generate_chunk([prompts[i] for i, _ in chunk], [k for _, k in chunk], max_new_tokens,
                                               stops, temperature, top_k, top_p, generator, logprobs,
                                               list(stop_strings), decode)
                r = 0
                for i, k in chunk:
                    out[i] += samples[r:r + k]
                    r += k
        finally:
            self.model.train(was_training)
        return out

    def _generate_chunk(self, prompts, counts, max_new, stops, temperature, top_k, top_p, generator, want_lp,
                        stop_strings=(), decode=None):
        model, cfg, device = self.model, self.model.cfg, self.device
        U = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], device=device)
        P = int(lens.max())
        S = P + max_new
        static = self.cuda_graphs
        if static:  # round the cache length up so graphs are reused across calls
            S = min(-(-S // 256) * 256, P + cfg.max_seq_len)
        pad = P - lens
        idx = torch.zeros(U, P, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            idx[b, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        head_dim = cfg.d_model // cfg.n_head
        cache = KVCache(cfg.n_layer, U, cfg.n_kv_head, S, head_dim, device, model.embed.weight.dtype, pad,
                        self.decode_attention, static)
        # 1. prefill the distinct prompts once
        t_slots = torch.arange(P, device=device)
        real = t_slots[None, :] >= pad[:, None]  # (U, P)
        mask = real[:, None, None, :] & (t_slots[None, None, :, None] >= t_slots[None, None, None, :])
        if int(pad.max()) > 0:  # padded queries attend to all: no NaN, never read
            cache.prefill_mask = mask | ~real[:, None, :, None]
        positions = (t_slots[None, :] - pad[:, None]).clamp(min=0)
        cache.prefilling = True
        h = model.hidden_states(idx, positions, cache)[:, -1]
        cache.prefilling, cache.prefill_mask = False, None
        cache.len = P
        # ... and copy each prompt's cache to its samples' rows
        R = sum(counts)
        if R != U:  # (one sample per prompt: the rows are already in place, no copy of the whole cache)
            expand = torch.repeat_interleave(torch.arange(U, device=device), torch.tensor(counts, device=device))
            cache.keep(expand)
            h = h.index_select(0, expand)

        stop_t = torch.tensor(stops, dtype=torch.long, device=device)
        window = max([len(x.encode()) for x in stop_strings] + [1])
        string_stop = [False] * R
        out = torch.full((R, max_new), -1, dtype=torch.long, device=device)
        out_lp = torch.zeros(R, max_new, device=device) if want_lp else None
        rows = torch.arange(R, device=device)        # original row of each live batch row
        alive = torch.ones(R, dtype=torch.bool, device=device)  # per live batch row
        n_alive = R
        graph = None
        for t in range(max_new):
            logits = F.linear(h, model.lm_head_weight).float()
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            out[rows, t] = torch.where(alive, nxt, out[rows, t])
            if want_lp:
                lp = torch.log_softmax(logits, -1).gather(-1, nxt[:, None])[:, 0]
                out_lp[rows, t] = torch.where(alive, lp, out_lp[rows, t])
            if len(stops):
                alive &= ~torch.isin(nxt, stop_t)
            if stop_strings:  # each stop-string byte comes from a different token at worst: decode that many
                live = torch.nonzero(alive)[:, 0].tolist()
                tails = out[rows[live], max(0, t + 1 - window):t + 1].tolist()
                for b, tail in zip(live, tails):
                    if any(x in decode(tail) for x in stop_strings):
                        alive[b] = False
                        string_stop[int(rows[b])] = True
            if len(stops) or stop_strings:
                n_alive = int(alive.sum())
                if n_alive == 0:
                    break
            if t == max_new - 1:
                break
            # compaction: drop finished rows once they are a quarter of the batch (graphs: a smaller bucket)
            B = len(rows)
            target = _bucket(n_alive) if static else n_alive
            if n_alive < B and (static and target < B or not static and B - n_alive >= max(1, B // 4)):
                keep = torch.nonzero(alive)[:, 0]
                if static and target > n_alive:  # fill the bucket with finished rows (computed, never read)
                    keep = torch.cat([keep, torch.nonzero(~alive)[:target - n_alive, 0]])
                cache.keep(keep)
                rows, alive, h, nxt = rows[keep], alive[keep], h[keep], nxt[keep]
                graph = None
            pos = (cache.len - cache.start)[:, None]
            if static:
                if graph is None:
                    graph = self._graph_step(cache, len(rows))
                h = graph.step(cache, nxt, pos)
            else:
                h = model.hidden_states(nxt[:, None], pos, cache)[:, -1]
            cache.len += 1

        toks = out.tolist()
        lps = out_lp.tolist() if want_lp else None
        stop_set = set(stops)
        samples = []
        for r in range(R):
            row = toks[r]
            end = next((j for j, x in enumerate(row) if x in stop_set or x < 0), None)
            if end is not None and row[end] >= 0:   # a stop token: keep it
                end += 1
            n_tok = len(row) if end is None else end
            truncated = not (n_tok > 0 and row[n_tok - 1] in stop_set) and not string_stop[r]
            samples.append(Sample(row[:n_tok], truncated, lps[r][:n_tok] if want_lp else None))
        return samples

    def _graph_step(self, cache, B):
        """The static decode step for this batch size, as a CUDA graph (or run eagerly when not on CUDA,
        which is how the static path is tested on CPU)."""
        if self.device.type != "cuda":
            return _EagerStaticStep(self.model)
        key = (B, cache.k.size(3), cache.k.dtype)
        g = self._graphs.get(key)
        if g is None:
            g = _GraphStep(self.model, cache, B)
            self._graphs[key] = g
        return g


class _EagerStaticStep:
    def __init__(self, model):
        self.model = model

    def step(self, cache, tokens, positions):
        cache.cur.fill_(cache.len)
        cache.begin_static_step()
        return self.model.hidden_states(tokens[:, None], positions, cache)[:, -1]


class _GraphStep:
    """One decode step captured as a CUDA graph over static buffers: tokens, positions, the cache
    tensors (the graph owns them; the live cache is copied in when the batch changes), offsets."""

    def __init__(self, model, cache, B):
        self.model, self.B = model, B
        dev = cache.k.device
        self.cache = KVCache(cache.k.size(0), B, cache.k.size(2), cache.k.size(3), cache.k.size(4), dev,
                             cache.k.dtype, torch.zeros(B, dtype=torch.long, device=dev), cache.backend, True)
        self.tokens = torch.zeros(B, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.bound = None  # the engine cache whose tensors were last copied in
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm up (allocator, cuBLAS handles, Triton autotune) outside the capture
                self._run()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.h = self._run()

    def _run(self):
        self.cache.begin_static_step()
        return self.model.hidden_states(self.tokens[:, None], self.positions, self.cache)[:, -1]

    def step(self, cache, tokens, positions):
        c = self.cache
        if self.bound is not cache or cache.k is not self._bound_k:
            # a new call or a compaction: copy the live cache into the graph's buffers, then alias them
            c.k.copy_(cache.k)
            c.v.copy_(cache.v)
            c.start.copy_(cache.start)
            c.bias.copy_(cache.bias)
            cache.k, cache.v, cache.start, cache.bias = c.k, c.v, c.start, c.bias
            self.bound, self._bound_k = cache, c.k
        c.cur.fill_(cache.len)
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.h.clone()


def generate(model, prompts, max_new_tokens, stop_tokens=(), temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """One sample per prompt: the new tokens of each (stop token included)."""
    out = Engine(model).generate(prompts, 1, max_new_tokens, stop_tokens, temperature, top_k, top_p, generator)
    return [o[0].tokens for o in out]
