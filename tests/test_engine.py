"""The sampling engine against independent references: a full re-forward per step (greedy), the
model's own token log-probs, torch.multinomial's distribution (top-k/top-p), and each prompt alone."""
import os

import pytest
import torch
import torch.nn.functional as F

from engine import Engine, KVCache, generate, offset_attention, sample_next, stop_tokens_for
from model import GPT, ModelConfig

torch.set_num_threads(2)


def small_cfg(**kw):
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def naive_generate(model, prompt, n, stop_ids):
    """Greedy decoding by re-running the whole sequence each step, one prompt alone."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt in stop_ids:
            break
    return out


def random_prompts(lengths, vocab=97):
    return [torch.randint(0, vocab, (L,)).tolist() for L in lengths]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static-cache"])
def test_greedy_equals_reforward(static):
    """Left padding, offsets, compaction (rows stop at different steps) and, for `static`, the
    CUDA-graph decode path run eagerly: token-for-token equal to re-running the full sequence."""
    torch.manual_seed(1)
    model = GPT(small_cfg()).eval()
    prompts = random_prompts((3, 9, 1, 14, 6, 2))
    # stop ids that this model actually emits, so some rows stop early and the batch compacts
    firsts = [naive_generate(model, p, 4, set()) for p in prompts]
    stops = {firsts[0][2], firsts[3][1]}
    engine = Engine(model)
    engine.cuda_graphs = static  # on CPU the static path runs eagerly (same code the graph captures)
    got = engine.generate(prompts, max_new_tokens=12, stop_tokens=stops)
    n_stopped = 0
    for p, g in zip(prompts, got):
        ref = naive_generate(model, p, 12, stops)
        assert g[0].tokens == ref
        assert g[0].truncated == (ref[-1] not in stops)
        n_stopped += not g[0].truncated
    assert n_stopped >= 2  # the compaction really ran


def test_generate_helper_and_one_stop_id():
    torch.manual_seed(6)
    model = GPT(small_cfg()).eval()
    prompts = random_prompts((4, 7))
    ref = [naive_generate(model, p, 10, {5}) for p in prompts]
    assert generate(model, prompts, 10, stop_tokens=[5]) == ref


def test_stop_strings_end_a_row_at_the_token_that_completes_them():
    """A row ends at the first token whose text completes a stop string (spanning tokens, starting
    inside one), as HF generate's stop_strings; the reference is the full greedy output cut at the
    shortest prefix whose whole decoded text contains the string."""
    torch.manual_seed(8)
    model = GPT(small_cfg()).eval()
    decode = lambda ids: "".join(chr(ord("a") + i % 26) * (1 + i % 3) for i in ids)  # noqa: E731
    prompts = random_prompts((5, 11, 3, 8))
    full = [naive_generate(model, p, 20, set()) for p in prompts]
    text0 = decode(full[0])
    stop = text0[len(decode(full[0][:6])) - 1:][:5]  # 5 characters starting inside token 5
    got = Engine(model).generate(prompts, max_new_tokens=20, stop_strings=[stop], decode=decode)
    n_stopped = 0
    for f, g in zip(full, got):
        k = next((k for k in range(1, len(f) + 1) if stop in decode(f[:k])), None)
        assert g[0].tokens == (f if k is None else f[:k])
        assert g[0].truncated == (k is None)
        n_stopped += k is not None
    assert n_stopped >= 1 and len(got[0][0].tokens) < 20
    with pytest.raises(ValueError, match="decode"):
        Engine(model).generate(prompts, max_new_tokens=4, stop_strings=["x"])


def test_n_samples_share_the_prefill_and_match_their_prompt_alone():
    """Greedy: all n samples of a prompt equal the prompt decoded alone; max_batch smaller than
    prompts*n splits work into chunks (a prompt's samples across chunks too) without changing results."""
    torch.manual_seed(7)
    model = GPT(small_cfg()).eval()
    prompts = random_prompts((5, 11, 2))
    alone = [naive_generate(model, p, 6, set()) for p in prompts]
    for max_batch in (256, 4):
        out = Engine(model, max_batch=max_batch).generate(prompts, n=3, max_new_tokens=6)
        assert [len(o) for o in out] == [3, 3, 3]
        for o, a in zip(out, alone):
            assert all(s.tokens == a and s.truncated for s in o)


def test_logprobs_equal_the_models_token_logprobs():
    torch.manual_seed(8)
    model = GPT(small_cfg()).eval()
    prompts = random_prompts((3, 8))
    out = Engine(model).generate(prompts, n=2, max_new_tokens=7, temperature=1.0, seed=0, logprobs=True)
    for p, group in zip(prompts, out):
        for s in group:
            seq = torch.tensor([p + s.tokens])
            with torch.no_grad():
                ref = model.token_logprobs(seq[:, :-1], seq[:, 1:])[0, len(p) - 1:]
            torch.testing.assert_close(torch.tensor(s.logprobs), ref, rtol=1e-4, atol=1e-4)


def test_seeded_sampling_is_reproducible_and_samples_differ():
    torch.manual_seed(9)
    model = GPT(small_cfg()).eval()
    prompts = random_prompts((4,))
    eng = Engine(model)
    a = eng.generate(prompts, n=4, max_new_tokens=8, temperature=1.0, seed=3)
    b = eng.generate(prompts, n=4, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b
    assert len({tuple(s.tokens) for s in a[0]}) > 1


def test_sampling_respects_top_k():
    torch.manual_seed(2)
    model = GPT(small_cfg()).eval()
    prompt = [1, 2, 3]
    with torch.no_grad():
        top = set(torch.topk(model(torch.tensor([prompt]))[0, -1], 3).indices.tolist())
    out = Engine(model).generate([prompt], n=40, max_new_tokens=1, temperature=1.5, top_k=3, seed=0)
    firsts = {s.tokens[0] for s in out[0]}
    assert firsts <= top and len(firsts) > 1


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, 0, 0.75, gen)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.75: tokens 2 and 3 are never drawn
    seen = {int(sample_next(logits, 1.0, 0, 0.9, gen)) for _ in range(300)}
    assert seen == {0, 1, 2}
    assert {int(sample_next(logits, 1.0, 0, 0.4, gen)) for _ in range(50)} == {0}


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_offset_attention_matches_sdpa_on_each_rows_real_keys(dtype, T):
    """fp32 takes SDPA; bf16/fp16 on the CPU take grouped_attention: both against fp64 SDPA over each row's
    real keys only (query heads 0-2 share KV head 0, 3-5 KV head 1; T new tokens attend to the same keys).
    16-bit tolerances: twice the largest error seen over 300 seeds at this shape (1.7e-2 bf16, 2.5e-3 fp16:
    about one rounding step of the outputs)."""
    B, Hq, Hkv, S, D = 3, 6, 2, 11, 16
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    start = torch.tensor([0, 4, 10])
    bias = torch.zeros(B, S).masked_fill(torch.arange(S)[None] < start[:, None], float("-inf"))
    got = offset_attention(q.to(dtype), k.to(dtype), v.to(dtype), bias.to(dtype))
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 3.5e-2, torch.float16: 5e-3}[dtype]
    for b in range(B):
        s = int(start[b])
        qd, kd, vd = (t[b:b + 1].to(dtype).double() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qd, kd[:, :, s:], vd[:, :, s:], enable_gqa=True)
        torch.testing.assert_close(got[b:b + 1].double(), ref, rtol=tol, atol=tol)


def test_fp16_grouped_attention_does_not_overflow_where_sdpa_does_not():
    """q.k = 64 * 40 * 30 * c_j = 76800 c_j exceeds fp16's 65504 for the first keys: the scores must be
    scaled before the matmul. The keys' scaled scores (9600 c_j) are far apart, so the answer is V's
    first key, exactly."""
    B, Hq, Hkv, S, D = 2, 4, 2, 6, 64
    q = torch.full((B, Hq, 1, D), 40.0).half()
    c = 1 - 0.1 * torch.arange(S)
    k = (30 * c[None, None, :, None] * torch.ones(B, Hkv, S, D)).half()
    v = torch.randn(B, Hkv, S, D).half()
    got = offset_attention(q, k, v, torch.zeros(B, S).half())
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-3)


def test_whole_slot_decode_attention_of_a_bf16_cpu_cache_sees_each_rows_written_keys_only():
    """bf16 on the CPU the cache attends over all S slots with the unwritten ones masked (whole_slots):
    each decode step, also after rows are dropped and reordered (keep), must equal fp64 attention over
    that row's slots start..written. Unwritten slots hold garbage here, so reading one would show."""
    B, Hq, Hkv, S, D = 3, 4, 2, 10, 8
    start = torch.tensor([0, 3, 5])
    cache = KVCache(1, B, Hkv, S, D, torch.device("cpu"), torch.bfloat16, start)
    assert cache.whole_slots
    cache.k.normal_(), cache.v.normal_()
    cache.k[:, :, :, 6:] += 50.0  # unwritten slots: must never be attended
    cache.len = 6
    kk, vv = cache.k[0, :, :, :6].clone(), cache.v[0, :, :, :6].clone()

    def step(rows_start):
        q, k, v = (torch.randn(len(rows_start), h, 1, D).bfloat16() for h in (Hq, Hkv, Hkv))
        got = cache[0].attend(q, k, v)
        nonlocal kk, vv
        kk, vv = torch.cat([kk, k], 2), torch.cat([vv, v], 2)
        for b, s in enumerate(rows_start.tolist()):
            ref = F.scaled_dot_product_attention(q[b:b + 1].double(), kk[b:b + 1, :, s:].double(),
                                                 vv[b:b + 1, :, s:].double(), enable_gqa=True)
            torch.testing.assert_close(got[b:b + 1].double(), ref, rtol=3e-2, atol=3e-2)
        cache.len += 1

    step(start)
    keep = torch.tensor([2, 0])
    cache.keep(keep)
    kk, vv = kk[keep], vv[keep]
    step(start[keep])
    step(start[keep])


def test_bad_input_is_one_clear_error():
    model = GPT(small_cfg()).eval()
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        Engine(model).generate([[1] * 60], max_new_tokens=10)
    with pytest.raises(ValueError, match="empty"):
        Engine(model).generate([[]], max_new_tokens=1)


def test_stop_tokens_for_formats():
    class Tok:
        bos_id, end_id = 1, 2
    assert stop_tokens_for(Tok(), "chat") == [2]
    assert stop_tokens_for(Tok(), "plain") == [1]
    Tok.stop_ids = [7, 2]
    assert stop_tokens_for(Tok(), "chat") == [2, 7]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_eager_on_gpu(dtype):
    torch.manual_seed(11)
    model = GPT(small_cfg(n_layer=3)).cuda().to(dtype).eval()
    prompts = random_prompts((3, 9, 1, 14, 6))
    eager = Engine(model, cuda_graphs=False).generate(prompts, n=3, max_new_tokens=20, stop_tokens=[5, 7],
                                                      logprobs=True)
    graphs = Engine(model, cuda_graphs=True)
    for _ in range(2):  # the second call replays the captured graphs
        got = graphs.generate(prompts, n=3, max_new_tokens=20, stop_tokens=[5, 7], logprobs=True)
        if dtype == torch.float32:
            assert [[s.tokens for s in g] for g in got] == [[s.tokens for s in g] for g in eager]
        else:  # bf16: a near-tie may flip; most tokens agree
            same = sum(a.tokens == b.tokens for ga, gb in zip(got, eager) for a, b in zip(ga, gb))
            assert same >= 0.8 * 15


def test_greedy_equals_transformers_generate():
    """The same weights in transformers' Llama: its greedy `generate` gives the same tokens."""
    pytest.importorskip("transformers")
    from bench.generate import hf_generate, hf_llama_from
    torch.manual_seed(12)
    model = GPT(small_cfg(n_layer=3, max_seq_len=128)).eval()
    hf = hf_llama_from(model)
    prompts = random_prompts((8, 8, 8))  # equal lengths: transformers' left padding would shift nothing
    ours = Engine(model).generate(prompts, max_new_tokens=20)
    with torch.no_grad():
        ref = hf_generate(hf, torch.tensor(prompts), 20, static=False).tolist()
    assert [o[0].tokens for o in ours] == ref


def test_triton_decode_attention_in_the_engine():
    """decode_attention="triton" (interpreted on CPU): the same greedy tokens as the PyTorch path."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(13)
    model = GPT(small_cfg(n_layer=1, n_head=2, n_kv_head=1, d_model=64)).to(device).eval()  # head dim 32
    prompts = random_prompts((3, 7, 1))
    ref = Engine(model, cuda_graphs=False).generate(prompts, max_new_tokens=6, stop_tokens=[5])
    got = Engine(model, cuda_graphs=False, decode_attention="triton").generate(prompts, max_new_tokens=6,
                                                                               stop_tokens=[5])
    assert got == ref
