"""
Triton kernels vs plain PyTorch references computed in float64.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set in conftest.py) in
fp32 only (the interpreter cannot round to bf16 properly); with CUDA the same
tests also run in bf16/fp16, plus a few larger shapes. Every output and grad
buffer the kernels allocate is NaN-filled first (POISON), so an element a
kernel fails to write makes the comparison fail.
"""
import zlib

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (no wheels for this platform)")
from kernels import attention as A  # noqa: E402
from kernels import cross_entropy as X  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not A.INTERPRET:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

needs_cuda = pytest.mark.skipif(not CUDA, reason="bf16/fp16 and large shapes need a GPU")
DTYPES = [torch.float32,
          pytest.param(torch.bfloat16, marks=needs_cuda),
          pytest.param(torch.float16, marks=needs_cuda)]
# fp16 under the CPU interpreter (it has no bf16 dot, but fp16 works): a few small cases, so the 16-bit
# code paths (casts, fp32 accumulation of 16-bit products) run in every `make test`, not only on a GPU
FP16_ON_CPU = pytest.mark.skipif(CUDA, reason="on CUDA the fp16 cases run in the full DTYPES grid")


# On a GPU, autotuning every distinct shape/dtype of the grid would compile
# every candidate config per kernel variant (many minutes): use each tile
# class's default config instead; test_attention_every_autotune_config covers
# every candidate and test_attention_autotuned the autotuner itself.
@pytest.fixture(autouse=True)
def poison_and_pin(monkeypatch):
    monkeypatch.setattr(A, "POISON", True)
    monkeypatch.setattr(X, "POISON", True)
    monkeypatch.setattr(A, "AUTOTUNE", False)
    # fp32 torch matmuls (the fused CE's logits) must not silently become TF32
    # because some other module set a global precision
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


def seed(*params):
    # fresh inputs per test case, but reproducible run to run
    torch.manual_seed(zlib.crc32(repr(params).encode()))


def assert_fits(name, got, ref64, ref_lowp, dtype):
    """fp32: tight absolute/relative tolerance vs float64. 16-bit: the error vs
    float64 may be at most twice that of the same computation done by PyTorch in
    that dtype (plus a small floor), the usual FlashAttention test criterion."""
    assert got.shape == ref64.shape, f"{name}: shape {got.shape} vs {ref64.shape}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten or NaN)"
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), ref64, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    else:
        err = (got.double() - ref64).abs().max().item()
        ref_err = (ref_lowp.double() - ref64).abs().max().item()
        floor = 1e-3 * ref64.abs().max().item() + 1e-5
        assert err <= 2 * ref_err + floor, f"{name}: max err {err:.3e} vs torch {dtype} err {ref_err:.3e}"


# -----------------------------------------------------------------------------
# attention

# (B, Hq, Hkv, T, S, D, causal, q_scale). Interpreter tiles are 16x32 (fwd,
# dK/dV) and 32x16 (dQ), so these lengths hit ragged tails, multiple blocks and
# both loop stages; q_scale > 1 makes the softmax peaky, so the running max
# changes between blocks and the online rescaling is exercised.
ATTN_CASES = [
    (1, 2, 2, 1, 1, 32, True, 1.0),        # single token
    (2, 3, 1, 37, 37, 32, True, 1.0),      # GQA 3, odd length
    (1, 4, 1, 64, 64, 64, True, 3.0),      # GQA 4, exact blocks, peaky
    (1, 2, 1, 50, 50, 128, False, 1.0),    # D=128, non-causal
    (1, 4, 4, 45, 45, 64, False, 3.0),     # MHA, non-causal, peaky
    (1, 3, 1, 3, 70, 32, True, 1.0),       # decode: 3 queries vs 70 cached keys
    (1, 4, 1, 1, 83, 64, True, 1.0),       # decode: 1 query, GQA 4
    (1, 2, 2, 40, 25, 32, True, 1.0),      # T > S: first 15 rows see no key -> 0
    (1, 6, 2, 33, 100, 128, True, 2.0),    # GQA 3, D=128, T < S
    (1, 1, 1, 100, 100, 32, True, 1.0),    # many blocks
    (1, 2, 1, 7, 19, 64, False, 1.0),      # non-causal, T < S
]
ATTN_CASES_GPU = [
    (2, 8, 2, 300, 300, 64, True, 1.0),
    (1, 4, 4, 257, 513, 128, True, 2.0),
    (1, 9, 3, 1000, 1000, 64, True, 1.0),
    (2, 8, 2, 1, 777, 128, True, 1.0),
    (1, 4, 1, 200, 130, 64, True, 1.0),
    (1, 4, 2, 333, 333, 32, False, 1.0),
]
ATTN_PARAMS = ATTN_CASES + [pytest.param(*c, marks=needs_cuda) for c in ATTN_CASES_GPU]


def attn_inputs(B, Hq, Hkv, T, S, D, q_scale, dtype):
    q = (torch.randn(B, Hq, T, D, device=DEVICE) * q_scale).to(dtype)
    k = torch.randn(B, Hkv, S, D, device=DEVICE).to(dtype)
    v = torch.randn(B, Hkv, S, D, device=DEVICE).to(dtype)
    do = torch.randn(B, Hq, T, D, device=DEVICE).to(dtype)
    return q, k, v, do


def attn_fwd_bwd(fn, q, k, v, do, causal):
    q, k, v = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(q, k, v, causal=causal)
    o.backward(do)
    return o, q.grad, k.grad, v.grad


def check_attention(q, k, v, do, causal, dtype):
    got = attn_fwd_bwd(A.flash_attention, q, k, v, do, causal)
    ref64 = attn_fwd_bwd(A.attention_reference, q.double(), k.double(), v.double(), do.double(), causal)
    lowp = got if dtype == torch.float32 else attn_fwd_bwd(A.attention_reference, q, k, v, do, causal)
    for name, g, r, l in zip(("out", "dq", "dk", "dv"), got, ref64, lowp):
        assert g.dtype == dtype
        assert_fits(name, g, r, l, dtype)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,causal,q_scale", ATTN_PARAMS)
def test_attention(B, Hq, Hkv, T, S, D, causal, q_scale, dtype):
    seed(B, Hq, Hkv, T, S, D, causal, q_scale, dtype)
    q, k, v, do = attn_inputs(B, Hq, Hkv, T, S, D, q_scale, dtype)
    out = check_attention(q, k, v, do, causal, dtype)[0]
    if causal and S < T:  # rows that see no key are exactly 0, not NaN
        assert (out[:, :, : T - S] == 0).all()


@needs_cuda
def test_attention_production_shape_bf16():
    """The shape the 135M model trains at: bf16, T=2048, head dim 64, 9 query heads over 3 kv heads,
    in the model's own layout (q, k, v as transposed views of (B, T, H, D))."""
    seed("production")
    B, Hq, Hkv, T, D = 2, 9, 3, 2048, 64
    q = torch.randn(B, T, Hq, D, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(B, T, Hkv, D, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    do = torch.randn(B, Hq, T, D, device=DEVICE, dtype=torch.bfloat16)
    check_attention(q, k, v, do, True, torch.bfloat16)


@FP16_ON_CPU
@pytest.mark.parametrize("case", [ATTN_CASES[i] for i in (1, 3, 6, 7)], ids=["gqa-odd", "d128", "decode", "T>S"])
def test_attention_fp16_interpreted(case):
    B, Hq, Hkv, T, S, D, causal, q_scale = case
    seed("fp16", *case)
    check_attention(*attn_inputs(B, Hq, Hkv, T, S, D, q_scale, torch.float16), causal, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_strided_layouts(dtype):
    # q in the model's natural (B, T, H, D) memory, k/v a prefix of a bigger
    # KV-cache buffer, dO non-contiguous: no copies needed, results unchanged
    B, Hq, Hkv, T, S, S_max, D = 2, 4, 2, 21, 29, 40, 32
    seed("strided", dtype)
    q = torch.randn(B, T, Hq, D, device=DEVICE).to(dtype).transpose(1, 2)
    cache = torch.randn(2, B, Hkv, S_max, D, device=DEVICE).to(dtype)
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    do = torch.randn(B, T, Hq, D, device=DEVICE).to(dtype).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous() and not do.is_contiguous()
    out = check_attention(q, k, v, do, True, dtype)[0]
    assert out.stride() == q.stride()  # output keeps q's layout: out.transpose(1, 2) is contiguous


def test_attention_backward_twice():
    # retain_graph + a second backward must give exactly twice the grads:
    # nothing autograd saved may be modified in place
    seed("twice")
    q, k, v, do = attn_inputs(1, 4, 2, 19, 19, 32, 1.0, torch.float32)
    q, k, v = [x.requires_grad_() for x in (q, k, v)]
    o = A.flash_attention(q, k, v)
    o.backward(do, retain_graph=True)
    first = [x.grad.clone() for x in (q, k, v)]
    o.backward(do)
    for g1, x in zip(first, (q, k, v)):
        torch.testing.assert_close(x.grad, 2 * g1)


def test_attention_partial_grads():
    # the backward skips the dK/dV or the dQ kernel when autograd does not need it
    seed("partial")
    q, k, v, do = attn_inputs(1, 4, 2, 23, 31, 32, 1.0, torch.float32)
    qd, kd, vd = [x.double().requires_grad_() for x in (q, k, v)]
    A.attention_reference(qd, kd, vd).backward(do.double())
    for need in [(True, False, False), (False, True, True), (False, False, True)]:
        xs = [x.detach().clone().requires_grad_(n) for x, n in zip((q, k, v), need)]
        A.flash_attention(*xs).backward(do)
        for x, ref, n in zip(xs, (qd, kd, vd), need):
            if n:
                torch.testing.assert_close(x.grad.double(), ref.grad, atol=1e-4, rtol=1e-4)
            else:
                assert x.grad is None


def test_attention_expanded_grad():
    # o.sum() gives an all-stride-0 dO; the backward must cope
    seed("expanded")
    q, k, v, _ = attn_inputs(1, 2, 1, 9, 9, 32, 1.0, torch.float32)
    got = attn_fwd_bwd(A.flash_attention, q, k, v, torch.ones(1, 2, 9, 32, device=DEVICE).expand(1, 2, 9, 32), True)
    ref = attn_fwd_bwd(A.attention_reference, q.double(), k.double(), v.double(),
                       torch.ones(1, 2, 9, 32, device=DEVICE, dtype=torch.float64), True)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


def _every_config():
    # zip the fwd / dkdv / dq candidate lists of each tile class (shorter lists wrap)
    cases = []
    for cls in ("d64", "d128", "fp32"):
        lists = [A.TILES[k][cls] for k in ("fwd", "dkdv", "dq")]
        for i in range(max(map(len, lists))):
            tiles = tuple(l[i % len(l)] for l in lists)
            cases.append(pytest.param(cls, tiles, id=f"{cls}-" + "-".join(f"{t[0]}x{t[1]}w{t[2]}s{t[3]}" for t in tiles)))
    return cases


@pytest.mark.parametrize("cls,tiles", _every_config())
def test_attention_every_autotune_config(cls, tiles, monkeypatch):
    # the autotuner only runs the fastest config on the shapes it meets, so pin
    # each candidate in turn. On a GPU each tile class runs in its dtype; the
    # interpreter runs them all in fp32 at GPU tile sizes (num_warps/stages
    # mean nothing there, the block logic is what it checks).
    monkeypatch.setattr(A, "FORCE_CONFIG", {k: A.make_config(t) for k, t in zip(("fwd", "dkdv", "dq"), tiles)})
    dtype = torch.bfloat16 if CUDA and cls != "fp32" else torch.float32
    D = 128 if cls == "d128" else 64
    seed("tiles", cls, tiles)
    shapes = [(1, 4, 2, 150, 170, D, True)]  # GQA, T < S, ragged: one build per config on a GPU
    if not CUDA:  # the interpreter does not compile: one more shape costs little
        shapes.append((1, 2, 2, 90, 70, D, False))
    for B, Hq, Hkv, T, S, D, causal in shapes:
        q, k, v, do = attn_inputs(B, Hq, Hkv, T, S, D, 1.0, dtype)
        check_attention(q, k, v, do, causal, dtype)


def test_autotune_prune_by_tile_class():
    configs = [A.make_config(t, cls) for cls, tiles in A.TILES["fwd"].items() for t in tiles]
    for D, dtype, cls in [(64, torch.bfloat16, "d64"), (32, torch.float16, "d64"), (128, torch.bfloat16, "d128"),
                          (128, torch.float32, "fp32")]:
        kept = A._prune(configs, {"Q": torch.empty(1, 1, 1, D, dtype=dtype)}, HEAD_DIM=D)
        assert [c.tile_class for c in kept] == [cls] * len(A.TILES["fwd"][cls])


@needs_cuda
def test_attention_autotuned(monkeypatch):
    monkeypatch.setattr(A, "AUTOTUNE", True)
    seed("autotuned")
    q, k, v, do = attn_inputs(2, 9, 3, 515, 515, 64, 1.0, torch.bfloat16)
    check_attention(q, k, v, do, True, torch.bfloat16)


def test_poison_is_active():
    # the harness itself: buffers the launchers allocate really are NaN-filled
    assert torch.isnan(A._empty((3,), torch.float32, DEVICE)).all()
    assert torch.isnan(A._empty_like(torch.zeros(2, 3, device=DEVICE))).all()
    assert torch.isnan(X._empty((3,), torch.float32, DEVICE)).all()


# -----------------------------------------------------------------------------
# fused linear + cross-entropy / log-probs

# (N, d, V, chunk_size, n_ignored). Interpreter vocab block is 32, so V=100,
# 130, 257 leave ragged tails; chunk sizes leave a ragged last chunk.
CE_CASES = [
    (37, 32, 100, 16, 5),       # 3 chunks (16, 16, 5), some ignored rows
    (37, 32, 100, 16, 37),      # everything ignored -> loss 0, grads 0
    (1, 32, 7, None, 0),        # one token, vocab smaller than one block
    (64, 64, 257, 64, 3),       # one exact chunk
    (50, 48, 130, 7, 1),        # many small chunks, d not a power of two
    (37, 32, 100, None, 2),     # the default chunk (default_chunk_rows: 10 rows here, a ragged last chunk)
]
CE_CASES_GPU = [
    (1000, 256, 5000, None, 10),
    (2048, 512, 32768 + 17, 300, 100),
]
CE_PARAMS = CE_CASES + [pytest.param(*c, marks=needs_cuda) for c in CE_CASES_GPU]


def test_default_chunk_rows_never_above_liger():
    """The default logits chunk has at most as many rows as Liger-Kernel's rule gives
    (next_power_of_2(ceil(N / ceil(V / d)))), so its memory is never above Liger's."""
    def liger(N, V, d):
        c = -(-N // -(-V // d))
        return 1 << (c - 1).bit_length()
    for N, d, V in [(37, 32, 100), (1, 32, 7), (2048, 576, 49152), (8 * 2048, 576, 49152), (16 * 2048, 576, 49152),
                    (64 * 2048, 576, 49152), (16 * 2048, 1536, 151936), (4096, 4096, 128256), (10 ** 6, 4096, 128256)]:
        c = X.default_chunk_rows(N, V, d)
        assert 1 <= c <= min(N, liger(N, V, d)), (N, d, V, c, liger(N, V, d))
        assert c * V <= max(V, X.CHUNK_ELEMENTS)
    assert X.default_chunk_rows(16 * 2048, 49152, 576) == 352  # the 135M shape at 16 x 2048 tokens (notes)


def ce_inputs(N, d, V, n_ignored, dtype):
    h = torch.randn(N, d, device=DEVICE).to(dtype)
    w = (torch.randn(V, d, device=DEVICE) / d ** 0.5).to(dtype)
    t = torch.randint(0, V, (N,), device=DEVICE)
    t[torch.randperm(N, device=DEVICE)[:n_ignored]] = -100
    return h, w, t


def ce_fwd_bwd(fn, h, w, t, grad_scale, **kw):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, t, **kw)
    (loss * grad_scale).backward()  # a non-unit upstream grad checks the backward's scaling
    return loss, h.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,V,chunk,n_ignored", CE_PARAMS)
def test_linear_cross_entropy(N, d, V, chunk, n_ignored, dtype):
    seed(N, d, V, chunk, n_ignored, dtype)
    h, w, t = ce_inputs(N, d, V, n_ignored, dtype)
    got = ce_fwd_bwd(X.fused_linear_cross_entropy, h, w, t, 2.5, chunk_size=chunk)
    ref64 = ce_fwd_bwd(X.linear_cross_entropy_reference, h.double(), w.double(), t, 2.5)
    lowp = got if dtype == torch.float32 else ce_fwd_bwd(X.linear_cross_entropy_reference, h, w, t, 2.5)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    for name, g, r, l in zip(("loss", "dh", "dW"), got, ref64, lowp):
        assert_fits(name, g, r, l, dtype)
    if n_ignored == N:
        assert got[0].item() == 0.0 and (got[1] == 0).all() and (got[2] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,V,chunk,n_ignored", CE_PARAMS)
def test_linear_logprobs(N, d, V, chunk, n_ignored, dtype):
    """-100 tokens (n_ignored of them) get log-prob 0 and no grad, as on the PyTorch path."""
    seed("logprobs", N, d, V, chunk, dtype)
    h, w, tok = ce_inputs(N, d, V, n_ignored, dtype)
    g = torch.randn(N, device=DEVICE)

    def run(fn, h, w, **kw):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        lp = fn(h, w, tok, **kw)
        lp.backward(g.to(lp.dtype))
        return lp, h.grad, w.grad

    got = run(X.fused_linear_logprobs, h, w, chunk_size=chunk)
    ref64 = run(X.linear_logprobs_reference, h.double(), w.double())
    lowp = got if dtype == torch.float32 else run(X.linear_logprobs_reference, h, w)
    assert got[0].dtype == torch.float32
    for name, a, r, l in zip(("logprobs", "dh", "dW"), got, ref64, lowp):
        assert_fits(name, a, r, l, dtype)
    ignored = tok == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()


@FP16_ON_CPU
@pytest.mark.parametrize("case", [CE_CASES[0]], ids=["chunks-and-ignored"])
def test_linear_cross_entropy_and_logprobs_fp16_interpreted(case):
    test_linear_cross_entropy(*case, torch.float16)
    test_linear_logprobs(*case, torch.float16)


def test_cross_entropy_modes():
    seed("ce-modes")
    h, w, t = ce_inputs(3 * 11, 32, 70, 4, torch.float32)
    ref = X.linear_cross_entropy_reference(h.double(), w.double(), t)
    # leading dims are flattened
    loss = X.fused_linear_cross_entropy(h.view(3, 11, 32), w, t.view(3, 11), chunk_size=8)
    torch.testing.assert_close(loss.double(), ref)
    # no grad anywhere: forward only
    with torch.no_grad():
        torch.testing.assert_close(X.fused_linear_cross_entropy(h.clone().requires_grad_(), w, t).double(), ref)
    # only the weight needs a grad (e.g. frozen trunk), only h (frozen head)
    for need_h, need_w in [(False, True), (True, False)]:
        hh, ww = h.detach().clone().requires_grad_(need_h), w.detach().clone().requires_grad_(need_w)
        X.fused_linear_cross_entropy(hh, ww, t, chunk_size=8).backward()
        hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
        X.linear_cross_entropy_reference(hd, wd, t).backward()
        for x, xd, need in [(hh, hd, need_h), (ww, wd, need_w)]:
            if need:
                torch.testing.assert_close(x.grad.double(), xd.grad, atol=1e-4, rtol=1e-4)
            else:
                assert x.grad is None
    # the precomputed grads are consumed by the first backward: a second one must fail loudly
    hh = h.detach().clone().requires_grad_()
    loss = X.fused_linear_cross_entropy(hh, w, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_logprobs_shapes_and_expanded_grad():
    seed("lp-modes")
    h, w, tok = ce_inputs(2 * 9, 32, 50, 0, torch.float32)
    hh, ww = h.view(2, 9, 32).clone().requires_grad_(), w.clone().requires_grad_()
    lp = X.fused_linear_logprobs(hh, ww, tok.view(2, 9), chunk_size=5)
    assert lp.shape == (2, 9)
    lp.sum().backward()  # upstream grad is an expanded (stride-0) tensor
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    X.linear_logprobs_reference(hd, wd, tok).sum().backward()
    torch.testing.assert_close(hh.grad.view(-1, 32).double(), hd.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ww.grad.double(), wd.grad, atol=1e-4, rtol=1e-4)


@needs_cuda
def test_cross_entropy_autocast():
    # fp32 params and activations under bf16 autocast: matmuls in bf16 like
    # F.linear would, grads come back in fp32 (dW summed in fp32)
    seed("autocast")
    h, w, t = ce_inputs(512, 128, 3000, 7, torch.float32)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = X.fused_linear_cross_entropy(hh, ww, t, chunk_size=100)
    loss.backward()
    assert hh.grad.dtype == torch.float32 and ww.grad.dtype == torch.float32
    hb, wb = h.bfloat16(), w.bfloat16()
    ref64 = ce_fwd_bwd(X.linear_cross_entropy_reference, hb.double(), wb.double(), t, 1.0)
    lowp = ce_fwd_bwd(X.linear_cross_entropy_reference, hb, wb, t, 1.0)
    for name, g, r, l in zip(("loss", "dh", "dW"), (loss, hh.grad, ww.grad), ref64, lowp):
        assert_fits(name, g, r, l, torch.bfloat16)


# -----------------------------------------------------------------------------
# decode attention with per-row offsets (the sampling engine's Triton path)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)])
@pytest.mark.parametrize("B,Hq,Hkv,S,D", [(3, 6, 2, 70, 32), (2, 9, 3, 33, 64), (1, 4, 4, 5, 128)])
def test_decode_attention(B, Hq, Hkv, S, D, dtype):
    """Each row attends only to its slots [start, end): against SDPA on exactly those keys, in float64."""
    seed("decode", B, Hq, Hkv, S, D, dtype)
    q = torch.randn(B, Hq, 1, D, device=DEVICE).to(dtype)
    k, v = torch.randn(B, Hkv, S, D, device=DEVICE).to(dtype), torch.randn(B, Hkv, S, D, device=DEVICE).to(dtype)
    start = torch.randint(0, S // 2, (B,), device=DEVICE)
    end = torch.randint(S // 2 + 1, S + 1, (B,), device=DEVICE)  # static cache: slots past `end` not written yet
    slots = torch.arange(S, device=DEVICE)
    ok = (slots[None] >= start[:, None]) & (slots[None] < end[:, None])
    bias = torch.zeros(B, S, device=DEVICE).masked_fill(~ok, float("-inf"))
    got = A.decode_attention(q, k, v, bias)
    assert got.dtype == dtype and torch.isfinite(got).all()
    for b in range(B):
        s, e = int(start[b]), int(end[b])
        ref = A.attention_reference(q[b:b + 1].double(), k[b:b + 1, :, s:e].double(), v[b:b + 1, :, s:e].double(),
                                    causal=False)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[b:b + 1].double(), ref, atol=tol, rtol=tol)
