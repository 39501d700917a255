import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, ModelConfig, attention, output_logprobs, output_loss

torch.set_num_threads(2)


def small_cfg(**kw):
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def test_future_tokens_never_change_past_logits():
    torch.manual_seed(0)
    model = GPT(small_cfg()).eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])  # and the future really did change


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(3)
    gqa = GPT(small_cfg(n_head=4, n_kv_head=2)).eval()
    mha = GPT(small_cfg(n_head=4, n_kv_head=4)).eval()
    state = gqa.state_dict()
    hd = 32 // 4
    for k, v in list(state.items()):
        if k.endswith("k_proj.weight") or k.endswith("v_proj.weight"):
            # (Hkv*hd, d) -> each kv head repeated for the 2 query heads that share it
            state[k] = v.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    x = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def naive_attention(q, k, v, causal):
    q, k, v = q.double(), k.double(), v.double()
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if causal:
        T, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
def test_attention_function_matches_naive(causal, hq, hkv):
    q = torch.randn(2, hq, 13, 16)
    k, v = torch.randn(2, hkv, 13, 16), torch.randn(2, hkv, 13, 16)
    got = attention(q, k, v, causal=causal)
    torch.testing.assert_close(got.double(), naive_attention(q, k, v, causal), rtol=1e-4, atol=1e-5)


def test_loss_and_logprob_functions_match_naive():
    h, w = torch.randn(23, 16), torch.randn(50, 16)
    t = torch.randint(0, 50, (23,))
    t_ignored = t.clone()
    t_ignored[::3] = -100
    logp = torch.log_softmax(h.double() @ w.double().T, -1)
    picked = logp[torch.arange(23), t]
    keep = t_ignored != -100
    torch.testing.assert_close(output_loss(h, w, t_ignored).double(), -picked[keep].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output_logprobs(h, w, t).double(), picked, rtol=1e-5, atol=1e-5)
    all_ignored = torch.full_like(t, -100)
    assert output_loss(h, w, all_ignored).item() == 0.0


def test_token_logprobs_equals_log_softmax_of_logits():
    torch.manual_seed(4)
    model = GPT(small_cfg()).eval()
    x = torch.randint(0, 97, (3, 11))
    y = torch.randint(0, 97, (3, 11))
    with torch.no_grad():
        ref = F.log_softmax(model(x), -1).gather(-1, y[..., None])[..., 0]
        torch.testing.assert_close(model.token_logprobs(x, y), ref, rtol=1e-5, atol=1e-5)


def test_triton_kernels_path_matches_torch_path():
    """The model wired to kernels/ (compiled on CUDA, interpreted on CPU) gives the PyTorch path's loss,
    log-probs (-100 targets included: 0 on both paths) and grads."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(5)
    cfg = dict(vocab_size=61, n_layer=1, n_head=2, n_kv_head=1, d_model=64, d_ff=96, max_seq_len=32)
    ref = GPT(small_cfg(**cfg, kernels="torch")).to(device)
    tri = GPT(small_cfg(**cfg, kernels="triton")).to(device)
    tri.load_state_dict(ref.state_dict())
    x = torch.randint(0, 61, (2, 19), device=device)
    y = torch.randint(0, 61, (2, 19), device=device)
    y[0, :5] = -100
    ref(x, y).backward()
    loss = tri(x, y)
    loss.backward()
    torch.testing.assert_close(loss, ref(x, y), rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(ref.named_parameters(), tri.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)
    with torch.no_grad():
        lp_tri, lp_ref = tri.token_logprobs(x, y), ref.token_logprobs(x, y)
        torch.testing.assert_close(lp_tri, lp_ref, rtol=1e-4, atol=1e-5)
        assert (lp_tri[0, :5] == 0).all() and (lp_tri[0, 5:] < 0).all()
