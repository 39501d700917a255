"""
Fused (linear -> softmax cross-entropy / log-prob) without materializing N x V logits.

    loss = fused_linear_cross_entropy(h, weight, targets, ignore_index=-100)
    logp = fused_linear_logprobs(h, weight, tokens)

h: (N, d) (or (..., d), flattened), weight: (V, d) as in nn.Linear / a tied
embedding, targets/tokens: (N,) int64. The tokens are processed in chunks of
C rows: a (C, V) logits buffer is filled by one matmul, a Triton kernel does an
online log-sum-exp over vocab blocks for each row and overwrites the row in
place with d(loss)/d(logits), and two more matmuls turn that into this chunk's
dh rows and its contribution to dW (accumulated in fp32). So peak extra memory
is one (C, V) chunk plus an fp32 dW and dh, instead of N x V logits (+ their grad).
C by default follows Liger-Kernel's rule (a chunk no bigger than the (N, d) input),
so the extra memory is at most Liger's with the same dW dtype; see default_chunk_rows.

Cross-entropy computes its gradients during the forward (the upstream grad of a
scalar loss is just a scale, applied in the backward), which saves recomputing
the logits. Log-probs get an arbitrary (N,) upstream grad, so their backward
recomputes each logits chunk from the saved per-row log-sum-exp instead.

Under torch.autocast the matmuls run in the autocast dtype (as F.linear would);
otherwise in h's dtype (weight is cast to it). The row math is always fp32.

Notes: CUDA tensors (or TRITON_INTERPRET=1 on CPU). Targets outside [0, V)
other than ignore_index are not checked. The cross-entropy's fp32 dW (V x d x 4
bytes) and dh exist from its forward until its backward, and that backward can
run only once per forward (retain_graph + a second backward raises); no grads
are computed under torch.no_grad or when neither h nor weight requires grad.
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
POISON = os.environ.get("NANOFORGE_KERNEL_POISON", "0") == "1"  # NaN-fill outputs (tests)
# Upper bound on one (C, V) logits chunk, in elements (512 MiB in bf16); the rows
# per chunk are otherwise set by default_chunk_rows (Liger-Kernel's rule).
CHUNK_ELEMENTS = 2 ** 28
# vocab block per iteration of the row kernel; small under the interpreter so
# tests cross several blocks and a ragged tail with a tiny vocab
BLOCK_V = 32 if INTERPRET else 4096
NUM_WARPS = 8
IGNORE_INDEX = -100  # fused_linear_logprobs: a token of -100 has log-prob 0 and no gradient (PyTorch's convention)


def _empty(shape, dtype, device):
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# -----------------------------------------------------------------------------
# kernels: one program per row of the logits chunk


@triton.jit
def _write_dlogits(row_ptr, V, lse, target, scale, BLOCK_V: tl.constexpr):
    # row <- scale * (softmax(row) - onehot(target)), in place
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(row_ptr + cols, (g * scale).to(row_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _xent_fwd_kernel(LOGITS, stride_row, TARGETS, LOSS, LSE, INV_N, V, ignore_index,
                     WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    # online log-sum-exp: running max m and sum d of exp(x - m), one block at a time
    m = float("-inf")
    d = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    valid = target != ignore_index
    # the target logit must be read before the grad pass overwrites the row
    x_t = tl.load(row_ptr + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))
    tl.store(LSE + row, lse)
    if WRITE_GRAD:
        # d(mean loss)/d(logits): ignored rows get exactly 0 (they still go through the dh/dW matmuls)
        scale = tl.where(valid, tl.load(INV_N), 0.0)
        _write_dlogits(row_ptr, V, lse, target, scale, BLOCK_V)


@triton.jit
def _logprob_bwd_kernel(LOGITS, stride_row, TOKENS, LSE, GRAD, V, BLOCK_V: tl.constexpr):
    # d logp_i / d logits_i = onehot - softmax: the CE gradient scaled by -grad_i
    row = tl.program_id(0).to(tl.int64)
    _write_dlogits(LOGITS + row * stride_row, V, tl.load(LSE + row), tl.load(TOKENS + row),
                   -tl.load(GRAD + row), BLOCK_V)


# -----------------------------------------------------------------------------
# chunked launcher pieces


def _compute_dtype(h):
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


def default_chunk_rows(N, V, d):
    """Rows per logits chunk: Liger-Kernel's rule (ops/fused_linear_cross_entropy.py:
    chunk = next_power_of_2(ceil(N / ceil(V / d))), i.e. a (chunk, V) logits buffer about
    as big as the (N, d) input) without its round-up to a power of two, and rounded down
    to a multiple of 32 rows when >= 32; capped at CHUNK_ELEMENTS. Never more rows than
    Liger's, so with the same dW dtype the peak extra memory is never above Liger's. Smaller
    chunks mean more passes over the fp32 dW (the dW matmul's reduction is C long): at the
    135M shape (d 576, V 49152) and N = 16 x 2048 tokens, 352 rows (33 MiB in bf16; Liger: 512)
    instead of the 5376 rows (504 MiB) of a 2**28-element chunk."""
    c = -(-N // -(-V // d))
    if c >= 32:
        c = c // 32 * 32
    return max(1, min(N, c, CHUNK_ELEMENTS // V))


def _chunk_rows(N, V, d, chunk_size):
    if chunk_size is None:
        return default_chunk_rows(N, V, d)
    return max(1, min(N, chunk_size))


_ADDMM_FP32_OUT = {}


def _addmm_fp32_(acc, a, b):
    """acc (fp32) += a @ b for a, b in a 16-bit dtype, without rounding the
    product to 16 bits first. Uses addmm's out_dtype overload where this torch /
    device has it (CUDA, torch >= 2.8), probed once on a tiny problem; otherwise
    falls back to adding the 16-bit product (which is still what F.linear's own
    backward would produce for this chunk, and the sum over chunks stays fp32)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    key = (acc.device.type, a.dtype)
    if key not in _ADDMM_FP32_OUT:
        ok = False
        try:
            # small integers / 4: exact in bf16 and fp16, and no draw from the user's RNG stream
            x = (torch.arange(8 * 24, device=a.device).view(8, 24) % 7 - 3).to(a.dtype) / 4
            y = (torch.arange(24 * 16, device=a.device).view(24, 16) % 5 - 2).to(a.dtype) / 4
            z = (torch.arange(8 * 16, device=a.device).view(8, 16) % 3 - 1).float()
            ref = z.double() + x.double() @ y.double()
            torch.addmm(z, x, y, out_dtype=torch.float32, out=z)
            ok = z.dtype == torch.float32 and torch.allclose(z.double(), ref, atol=1e-4, rtol=1e-4)
        except Exception:
            ok = False
        _ADDMM_FP32_OUT[key] = ok
    if _ADDMM_FP32_OUT[key]:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(a @ b)


def _check(h, weight, targets):
    assert h.shape[-1] == weight.shape[1] and weight.dim() == 2, f"bad shapes {h.shape} {weight.shape}"
    assert targets.shape == h.shape[:-1], f"targets {targets.shape} vs h {h.shape}"
    assert not targets.dtype.is_floating_point
    assert h.device == weight.device == targets.device
    assert h.is_cuda or INTERPRET, "fused linear kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1)"


def _ce_forward(h, weight, targets, ignore_index, chunk_size, need_dh, need_dw):
    """-> (loss, dh, dw): the loss and, if asked, its gradients for grad_loss = 1."""
    N, V = h.shape[0], weight.shape[0]
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        hc, wc = h.to(dtype), weight.to(dtype)
        targets = targets.contiguous()
        n_valid = (targets != ignore_index).sum()
        # 1/max(n, 1): an all-ignored batch gives loss 0 and grads 0, not NaN
        inv_n = 1.0 / n_valid.clamp(min=1).to(torch.float32)
        loss_rows = _empty((N,), torch.float32, h.device)
        lse = _empty((N,), torch.float32, h.device)
        dh = _empty((N, h.shape[1]), dtype, h.device) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_dw else None
        C = _chunk_rows(N, V, h.shape[1], chunk_size)
        buf = _empty((C, V), dtype, h.device)
        for s in range(0, N, C):
            e = min(s + C, N)
            logits = buf[: e - s]
            torch.mm(hc[s:e], wc.t(), out=logits)
            _xent_fwd_kernel[(e - s,)](logits, logits.stride(0), targets[s:e], loss_rows[s:e], lse[s:e],
                                       inv_n, V, ignore_index, WRITE_GRAD=need_dh or need_dw,
                                       BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
            # logits now holds d(loss)/d(logits) for these rows
            if need_dh:
                torch.mm(logits, wc, out=dh[s:e])
            if need_dw:
                _addmm_fp32_(dw, logits.t(), hc[s:e])
        return loss_rows.sum() * inv_n, dh, dw


class _LinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk_size):
        loss, dh, dw = _ce_forward(h, weight, targets, ignore_index, chunk_size,
                                   ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        # private buffers, not saved inputs: the backward scales them in place and
        # hands them out, so a second backward through this graph is refused
        ctx.grads = (dh, dw)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy: backward can only run once per forward "
                               "(its gradients are precomputed and consumed in place)")
        dh, dw = ctx.grads
        ctx.grads = None
        if dh is not None:
            dh = dh.mul_(grad_loss.to(dh.dtype)).to(ctx.dtypes[0])
        if dw is not None:
            dw = dw.mul_(grad_loss.to(dw.dtype)).to(ctx.dtypes[1])
        return dh, dw, None, None, None


def fused_linear_cross_entropy(h, weight, targets, ignore_index=-100, *, chunk_size=None):
    """mean over non-ignored rows of cross_entropy(h @ weight.T, targets), as a
    float32 scalar; 0 (not NaN) when every target is ignore_index.
    h: (..., d), weight: (V, d), targets: (...) int64 in [0, V) or ignore_index.
    chunk_size: rows per logits chunk (default: default_chunk_rows, Liger-Kernel's rule)."""
    _check(h, weight, targets)
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if h.shape[0] == 0:
        return (h.sum() + weight.sum()).float() * 0.0
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        return _ce_forward(h, weight, targets, int(ignore_index), chunk_size, False, False)[0]
    return _LinearCrossEntropy.apply(h, weight, targets, int(ignore_index), chunk_size)


class _LinearLogprobs(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, weight, tokens, chunk_size):
        N, V = h.shape[0], weight.shape[0]
        dtype = _compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            tokens = tokens.contiguous()
            loss_rows = _empty((N,), torch.float32, h.device)
            lse = _empty((N,), torch.float32, h.device)
            C = _chunk_rows(N, V, h.shape[1], chunk_size)
            buf = _empty((C, V), dtype, h.device)
            for s in range(0, N, C):
                e = min(s + C, N)
                logits = buf[: e - s]
                torch.mm(hc[s:e], wc.t(), out=logits)
                # rows whose token is -100 get log-prob 0 (and grad 0), as PyTorch's cross_entropy gives
                _xent_fwd_kernel[(e - s,)](logits, logits.stride(0), tokens[s:e], loss_rows[s:e], lse[s:e],
                                           lse, V, IGNORE_INDEX, WRITE_GRAD=False, BLOCK_V=BLOCK_V,
                                           num_warps=NUM_WARPS)
        ctx.save_for_backward(h, weight, tokens, lse)
        ctx.dtype, ctx.chunk = dtype, C
        return loss_rows.neg_()

    @staticmethod
    def backward(ctx, grad):
        h, weight, tokens, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V = h.shape[0], weight.shape[0]
        dtype, C = ctx.dtype, ctx.chunk
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            grad = grad.to(torch.float32).masked_fill(tokens == IGNORE_INDEX, 0.0).contiguous()  # ignored: no grad
            dh = _empty((N, h.shape[1]), dtype, h.device) if need_dh else None
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_dw else None
            buf = _empty((C, V), dtype, h.device)
            for s in range(0, N, C):
                e = min(s + C, N)
                logits = buf[: e - s]
                torch.mm(hc[s:e], wc.t(), out=logits)
                _logprob_bwd_kernel[(e - s,)](logits, logits.stride(0), tokens[s:e], lse[s:e], grad[s:e], V,
                                              BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
                if need_dh:
                    torch.mm(logits, wc, out=dh[s:e])
                if need_dw:
                    _addmm_fp32_(dw, logits.t(), hc[s:e])
        return (dh.to(h.dtype) if need_dh else None, dw.to(weight.dtype) if need_dw else None, None, None)


def fused_linear_logprobs(h, weight, tokens, *, chunk_size=None):
    """log_softmax(h @ weight.T)[i, tokens[i]] as float32 of tokens' shape,
    differentiable w.r.t. h and weight. tokens in [0, V), or -100: log-prob 0, no grad
    (what -F.cross_entropy(..., reduction="none") gives, the PyTorch path of model.output_logprobs)."""
    _check(h, weight, tokens)
    shape = tokens.shape
    h, tokens = h.reshape(-1, h.shape[-1]), tokens.reshape(-1)
    if h.shape[0] == 0:
        return h.new_zeros(shape, dtype=torch.float32)
    return _LinearLogprobs.apply(h, weight, tokens, chunk_size).view(shape)


# -----------------------------------------------------------------------------
# references: the plain PyTorch computation (full logits), softmax in >= fp32


def _ref_logits(h, weight):
    logits = h.reshape(-1, h.shape[-1]) @ weight.t()
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def linear_cross_entropy_reference(h, weight, targets, ignore_index=-100):
    targets = targets.reshape(-1)
    loss = F.cross_entropy(_ref_logits(h, weight), targets, ignore_index=ignore_index, reduction="sum")
    return loss / (targets != ignore_index).sum().clamp(min=1)


def linear_logprobs_reference(h, weight, tokens):
    # PyTorch's own convention for -100: cross_entropy(reduction="none") gives 0 there
    return -F.cross_entropy(_ref_logits(h, weight), tokens.reshape(-1), reduction="none").view(tokens.shape)
