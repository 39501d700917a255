"""
FlashAttention-2 in Triton: causal / non-causal, GQA, any sequence length.

    out = flash_attention(q, k, v, causal=True, sm_scale=None)

q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq % Hkv == 0; D in {32, 64, 128}.
Any strides are accepted as long as the last (head) dim is contiguous, so
q = x.view(B, T, H, D).transpose(1, 2) goes in without a copy, and the output
takes q's memory layout when q is dense (then out.transpose(1, 2) is contiguous).

GQA: query head h reads kv head h // (Hq // Hkv) directly, K/V are never
repeated; in the backward each dK/dV program loops over the query heads of its
group, so the group sum happens in registers (no atomics, deterministic).

Causal mask is bottom-right aligned: query i sees keys j <= i + (S - T). With
S == T this is the usual lower triangle; with S > T (a few new queries against
a longer KV cache) the last query sees every key, which is what decoding with
a KV cache needs. With S < T the first T - S queries see no key at all; such
fully masked rows return 0 (and get 0 gradient), never NaN.

Numerics: inputs fp32/fp16/bf16, every accumulation in fp32. fp32 inputs use
input_precision="ieee" for tl.dot so results match the fp32 reference on the
GPU too (Triton's default for fp32 would be TF32, 10-bit mantissa); fp16/bf16
inputs ignore the flag. The log-sum-exp is kept in base 2 (exp2 is the native
instruction) and saved for the backward, which recomputes P instead of storing it.

Kernel layout follows the Triton fused-attention tutorial: each kernel loops
over the other axis in two stages, first the blocks that need no mask at all,
then the (few) blocks that straddle the causal diagonal or a ragged tail.

Notes: needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); q, k, v must share
one dtype (cast RoPE'd fp32 q/k back before calling). fp32 on a GPU is exact
but slow (no tensor cores): meant for tests, train in bf16. Grid limit: B * Hq
<= 65535. Plain autograd.Function, not a torch.library op: not tried under
torch.compile (wrap the call in torch.compiler.disable if Dynamo objects).
NANOFORGE_AUTOTUNE=0 skips autotuning (uses each class's first tile).
"""
import math
import os
import re

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tests flip this: every output/grad buffer is then NaN-filled before the kernel
# runs, so an element a kernel forgets to write shows up as NaN, not as stale memory.
POISON = os.environ.get("NANOFORGE_KERNEL_POISON", "0") == "1"
# Tests can pin one triton.Config per kernel name ("fwd", "dq", "dkdv") to
# exercise every autotune config for correctness, not just the fastest one.
FORCE_CONFIG = {}


def _empty_like(t, dtype=None):
    if POISON:
        return torch.full_like(t, float("nan"), dtype=dtype)
    return torch.empty_like(t, dtype=dtype)


def _empty(shape, dtype, device):
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# Autotune candidates, (BLOCK_M, BLOCK_N, num_warps, num_stages), per tile class:
# "d64" = fp16/bf16 with D <= 64, "d128" = fp16/bf16 with D = 128, "fp32" = fp32
# inputs (tl.dot in exact-fp32 "ieee" mode runs on FMA units and needs small
# tiles). Chosen from ptxas register/spill and shared-memory reports for sm_90
# and sm_80 builds: 128-row tiles with 8 warps suit Hopper, 64-row tiles and
# fewer stages fit Ampere/Ada shared memory (a config that does not fit a card
# is skipped by the autotuner), BLOCK_M=16 is for decoding (T of 1..16 queries
# against a long KV cache). The first tile of each list is a conservative
# default, used as is when autotuning is off (NANOFORGE_AUTOTUNE=0).
TILES = {
    "fwd": {
        "d64": [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4),
                (64, 32, 4, 4), (16, 64, 4, 3), (16, 128, 4, 2)],
        "d128": [(64, 32, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 3), (128, 32, 8, 3),
                 (64, 64, 8, 3), (16, 64, 4, 3), (16, 128, 8, 2)],
        "fp32": [(16, 32, 8, 2), (32, 32, 8, 2)],
    },
    # dK/dV: BLOCK_N keys are owned by a program, BLOCK_M queries stream past
    "dkdv": {
        "d64": [(32, 64, 8, 3), (32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3),
                (64, 64, 8, 3), (16, 64, 4, 2)],
        "d128": [(16, 64, 8, 2), (32, 64, 8, 2), (32, 64, 8, 3), (16, 128, 8, 2), (32, 128, 8, 2),
                 (32, 32, 8, 2), (16, 32, 4, 2)],
        "fp32": [(16, 32, 8, 2)],
    },
    # dQ: BLOCK_M queries are owned by a program, BLOCK_N keys stream past
    "dq": {
        "d64": [(64, 32, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 16, 4, 2)],
        "d128": [(64, 32, 4, 3), (64, 32, 8, 3), (128, 32, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 16, 4, 2)],
        "fp32": [(32, 16, 8, 2), (64, 16, 8, 2)],
    },
}
# Triton 3.6 (the GPU machine's version) allocates registers differently. `python bench/spills.py` (ptxas -v
# on sm_90a, bf16, causal, pointers and strides specialized as a launch does) under Triton 3.6.0 reported spills
# in these tiles, so they are left out on Triton < 3.7. dK/dV d128 on 3.6 runs on two BLOCK_N=32 tiles, (32, 32, 8, 2)
# (177 registers) and (16, 32, 4, 2) (178), no spills under 3.6.0 nor 3.9.0; (32, 64, 8, 2) spilled 8 B on 3.6 and is
# left out there. After this list, `PYTHONPATH=<triton 3.6.0> python bench/spills.py`: 0 of 28 tiles spill.
# (Under 3.9 the same script found 3 small spills in the 40 tiles before the two BLOCK_N=32 ones were added.)
SPILLS_BEFORE_3_7 = {
    "fwd": {"d64": {(16, 128, 4, 2)}, "d128": {(64, 64, 8, 3), (16, 64, 4, 3), (16, 128, 8, 2)}},
    "dkdv": {"d64": {(64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 3)},
             "d128": {(16, 64, 8, 2), (32, 64, 8, 2), (32, 64, 8, 3), (16, 128, 8, 2), (32, 128, 8, 2)}},
    "dq": {"d128": {(64, 32, 8, 3), (64, 64, 4, 3)}},
}
if tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2]) < (3, 7):
    for _name, _classes in SPILLS_BEFORE_3_7.items():
        for _cls, _bad in _classes.items():
            TILES[_name][_cls] = [t for t in TILES[_name][_cls] if t not in _bad]
# The interpreter runs each program in numpy: one config only (autotuning would
# multiply test time), with small, unequal blocks so that tiny test sequences
# still cross several block boundaries and both loop stages.
INTERP_TILES = {"fwd": (16, 32, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
AUTOTUNE = os.environ.get("NANOFORGE_AUTOTUNE", "1") != "0"


def tile_class(head_dim, dtype):
    return "fp32" if dtype == torch.float32 else ("d128" if head_dim > 64 else "d64")


def make_config(tile, cls=None):
    m, n, w, s = tile
    cfg = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    cfg.tile_class = cls
    return cfg


def _configs(name):
    if INTERPRET:
        return [make_config(INTERP_TILES[name])]
    return [make_config(t, cls) for cls, tiles in TILES[name].items() for t in tiles]


def _prune(configs, named_args, **kwargs):
    # keep only the candidates of this call's tile class (head dim and dtype);
    # read both off Q: older Tritons pass only the positional args here
    q = named_args["Q"]
    cls = tile_class(q.shape[-1], q.dtype)
    return [c for c in configs if getattr(c, "tile_class", None) in (cls, None)] or configs


_PRUNE = {"early_config_prune": _prune}
# Autotune keys are power-of-two buckets of T and S, not T and S themselves,
# or KV-cache decoding (S grows by one per step) would retune every step. The
# kernels are jitted with do_not_specialize on the lengths (and the GQA group
# size, a plain runtime loop bound): otherwise Triton builds separate variants
# when a value is 1 (it becomes a constant) or a multiple of 16, which would
# only cost compile time (and autotuning), e.g. when decoding.
_KEY = ["T_KEY", "S_KEY", "HEAD_DIM", "CAUSAL", "GROUP"]

LOG2E = 1.4426950408889634


def _launch(name, kernel, grid, *args, **kwargs):
    cfg = FORCE_CONFIG.get(name)
    if cfg is None and not AUTOTUNE and not INTERPRET:
        cfg = make_config(TILES[name][tile_class(kwargs["HEAD_DIM"], args[0].dtype)][0])
    if cfg is None:
        kernel[grid](*args, **kwargs)
    else:
        kernel.fn[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# -----------------------------------------------------------------------------
# forward


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                    lo, hi, S, causal_off, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # K is loaded transposed, (D, BLOCK_N), so q @ kT needs no tl.trans
        kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            kt = tl.load(kt_ptrs, mask=offs_n[None, :] < S, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
        qk = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if MASKED:
            keep = offs_n[None, :] < S
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_off)
            qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # a row with no visible key so far has m_new = -inf; subtracting it
            # would give exp2(-inf + inf) = NaN, so shift by 0 instead (p = 0)
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_shift = m_new
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < S, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs("fwd"), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["T", "S", "T_KEY", "S_KEY", "GROUP"])
def _attn_fwd_kernel(Q, K, V, O, LSE, qk_scale,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                     Hq, T, S, T_KEY, S_KEY,
                     GROUP, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)

    causal_off = S - T
    if CAUSAL:
        # keys [0, full_hi) are visible to every row of this block, [full_hi, hi) to some
        full_hi = tl.minimum(S, start_m + causal_off + 1)
        hi = tl.maximum(tl.minimum(S, start_m + BLOCK_M + causal_off), 0)
    else:
        full_hi = S
        hi = S
    full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                                    0, full_hi, S, causal_off, qk_scale,
                                    False, CAUSAL, PRECISION, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                                    full_hi, hi, S, causal_off, qk_scale,
                                    True, CAUSAL, PRECISION, BLOCK_N)
    # fully masked rows (l = 0): output 0, and lse = +inf so the backward's
    # exp2(s - lse) is 0 for them whatever s is
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    row_ok = offs_m < T
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)
    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])


# -----------------------------------------------------------------------------
# backward: delta pre-pass, then dK/dV (one program per kv block and kv head),
# then dQ (one program per query block and query head)


@triton.jit(do_not_specialize=["T"])
def _attn_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                           Hq, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                         offs_n, offs_d, lo, hi, T, causal_off, qk_scale,
                         MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    # Works on the transposed problem (keys along rows) so that dv += pT @ dO and
    # dk += dsT @ Q are plain dots. Query rows >= T load as q = dO = 0 and
    # lse = +inf, which makes pT = dsT = 0: no row mask needed on the math.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        qt = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale
        if MASKED:
            st = tl.where(offs_m[None, :] + causal_off >= offs_n[:, None], st, float("-inf"))
        pt = tl.math.exp2(st - lse[None, :])
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_configs("dkdv"), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["T", "S", "T_KEY", "S_KEY", "GROUP"])
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, sm_scale, qk_scale,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                          stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                          Hq, Hkv, T, S, T_KEY, S_KEY,
                          GROUP, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n[:, None] < S
    # keys >= S load as 0; their rows of dk/dv are junk but never stored
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=key_ok, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=key_ok, other=0.0)

    causal_off = S - T
    if CAUSAL:
        # query i sees key j iff i >= j - causal_off: rows [lo, mid) see part of
        # this key block (need the mask), rows [mid, T) see all of it
        lo = tl.maximum(start_n - causal_off, 0) // BLOCK_M * BLOCK_M
        mid = tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0)
        mid = (mid + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        lo = 0
        mid = 0
    masked_hi = tl.minimum(mid, T)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # GQA: sum the contributions of every query head that shares this kv head
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * T
        delta_base = DELTA + bh * T
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                      offs_n, offs_d, lo, masked_hi, T, causal_off, qk_scale,
                                      True, PRECISION, BLOCK_M)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                      offs_n, offs_d, mid, T, T, causal_off, qk_scale,
                                      False, PRECISION, BLOCK_M)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=key_ok)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=key_ok)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                       lo, hi, S, causal_off, qk_scale,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]
        vt_ptrs = v_base + offs_n[None, :] * stride_vt + offs_d[:, None]
        if MASKED:
            kt = tl.load(kt_ptrs, mask=offs_n[None, :] < S, other=0.0)
            vt = tl.load(vt_ptrs, mask=offs_n[None, :] < S, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if MASKED:
            keep = offs_n[None, :] < S
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_off)
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_configs("dq"), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["T", "S", "T_KEY", "S_KEY", "GROUP"])
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, sm_scale, qk_scale,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                        stride_dqb, stride_dqh, stride_dqt,
                        Hq, T, S, T_KEY, S_KEY,
                        GROUP, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    causal_off = S - T
    if CAUSAL:
        full_hi = tl.minimum(S, start_m + causal_off + 1)
        hi = tl.maximum(tl.minimum(S, start_m + BLOCK_M + causal_off), 0)
    else:
        full_hi = S
        hi = S
    full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                            0, full_hi, S, causal_off, qk_scale, False, CAUSAL, PRECISION, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                            full_hi, hi, S, causal_off, qk_scale, True, CAUSAL, PRECISION, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# -----------------------------------------------------------------------------
# launchers


def _check(q, k, v):
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "expected (B, H, T, D) tensors"
    B, Hq, T, D = q.shape
    assert k.shape == v.shape and k.shape[0] == B and k.shape[3] == D, f"bad shapes {q.shape} {k.shape} {v.shape}"
    assert Hq % k.shape[1] == 0, f"query heads {Hq} not a multiple of kv heads {k.shape[1]}"
    assert k.shape[2] > 0, "no keys"
    assert D in (32, 64, 128), f"head dim {D} not supported (32, 64, 128)"
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16), \
        f"dtypes {q.dtype} {k.dtype} {v.dtype}"
    assert q.device == k.device == v.device
    assert q.is_cuda or INTERPRET, "flash_attention runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1)"


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored by tl.dot for 16-bit inputs


def _attn_fwd(q, k, v, causal, sm_scale):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    o = _empty_like(q)  # same strides as q: (B, T, H, D) memory in, (B, T, H, D) memory out
    lse = _empty((B, Hq, T), torch.float32, q.device)
    grid = lambda META: (triton.cdiv(T, META["BLOCK_M"]), B * Hq)
    _launch("fwd", _attn_fwd_kernel, grid, q, k, v, o, lse, sm_scale * LOG2E,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            Hq, T, S, triton.next_power_of_2(T), triton.next_power_of_2(S),
            GROUP=Hq // Hkv, HEAD_DIM=D, CAUSAL=causal, PRECISION=_precision(q.dtype))
    return o, lse


def _attn_bwd(q, k, v, o, lse, do, causal, sm_scale, need_dq=True, need_dkdv=True):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    do = _last_dim_contiguous(do)
    delta = _empty((B, Hq, T), torch.float32, q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(T, 64), B * Hq)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], Hq, T, HEAD_DIM=D, BLOCK_M=64)
    dq = dk = dv = None
    keys = (triton.next_power_of_2(T), triton.next_power_of_2(S))
    common = dict(GROUP=Hq // Hkv, HEAD_DIM=D, CAUSAL=causal, PRECISION=_precision(q.dtype))
    if need_dkdv:
        dk, dv = _empty_like(k), _empty_like(v)
        grid = lambda META: (triton.cdiv(S, META["BLOCK_N"]), B * Hkv)
        _launch("dkdv", _attn_bwd_dkdv_kernel, grid, q, k, v, do, dk, dv, lse, delta, sm_scale, sm_scale * LOG2E,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
                *dk.stride()[:3], *dv.stride()[:3], Hq, Hkv, T, S, *keys, **common)
    if need_dq:
        dq = _empty_like(q)
        grid = lambda META: (triton.cdiv(T, META["BLOCK_M"]), B * Hq)
        _launch("dq", _attn_bwd_dq_kernel, grid, q, k, v, do, dq, lse, delta, sm_scale, sm_scale * LOG2E,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
                Hq, T, S, *keys, **common)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        o, lse = _attn_fwd(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        dq, dk, dv = _attn_bwd(q, k, v, o, lse, do, ctx.causal, ctx.sm_scale, need[0], need[1] or need[2])
        return dq, dk, dv, None, None


def flash_attention(q, k, v, causal=True, sm_scale=None):
    """softmax(q k^T * sm_scale [+ causal mask]) v, FlashAttention-2 style.

    q: (B, Hq, T, D), k/v: (B, Hkv, S, D), Hq % Hkv == 0, D in {32, 64, 128},
    same dtype (fp32/fp16/bf16), on a CUDA device (or any device under
    TRITON_INTERPRET=1). Causal mask is bottom-right aligned (query i sees keys
    j <= i + S - T), rows that see no key output 0. sm_scale defaults to 1/sqrt(D).
    Returns (B, Hq, T, D) in q's dtype and memory layout.
    """
    _check(q, k, v)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    return _FlashAttention.apply(q, k, v, bool(causal), float(sm_scale))


def attention_reference(q, k, v, causal=True, sm_scale=None):
    """Plain PyTorch attention with the same semantics as flash_attention
    (GQA by repeat_interleave, bottom-right causal mask, fully masked rows -> 0).
    Runs in the input dtype, except the softmax, which is done in at least fp32."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    group = Hq // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-2, -1)) * sm_scale
    s = s.to(torch.promote_types(s.dtype, torch.float32))
    if causal:
        i = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        keep = j <= i + (S - T)
    else:
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device)
    s = s.masked_fill(~keep, float("-inf"))
    # a row with no visible key would be softmax(all -inf) = NaN: softmax a
    # finite row instead and zero it with the mask (gradient 0 through it too)
    s = s.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    p = torch.softmax(s, dim=-1) * keep
    return p.to(v.dtype) @ v


# -----------------------------------------------------------------------------
# Decoding with per-row offsets: one new query per sequence against its KV cache


@triton.jit
def _decode_kernel(Q, K, V, BIAS, O, qk_scale, S,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                   stride_bb, stride_ob, stride_oh,
                   GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PRECISION: tl.constexpr):
    # one program per (sequence, kv head): the GROUP query heads that share this kv head are the
    # rows of one tile (padded to BLOCK_G >= 16 for tl.dot), so each key block is read once
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < GROUP
    q_ptrs = Q + b * stride_qb + (hk * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    for n0 in range(0, S, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        # bias is 0 (attend) or -inf (padding / not yet written), in natural-log units
        bias = tl.load(BIAS + b * stride_bb + offs_n, mask=n_ok, other=float("-inf"))
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias[None, :] * 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of only masked keys
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row with no visible key -> 0
    o_ptrs = O + b * stride_ob + (hk * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=g_ok[:, None])


def decode_attention(q, k, v, bias, sm_scale=None):
    """Decode-step attention for the sampling engine: q (B, Hq, 1, D) against k, v (B, Hkv, S, D)
    with an additive key bias (B, S) of 0 (attend) / -inf (left padding, unwritten slots), i.e. each
    row's offsets. Forward only. Equals engine.offset_attention (its PyTorch twin, the reference)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    assert T == 1, "decode_attention: one query per sequence"
    assert Hq % Hkv == 0 and D in (32, 64, 128) and q.dtype == k.dtype == v.dtype
    assert (q.is_cuda or INTERPRET) and bias.shape == (B, S)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    bias = bias.float().contiguous()
    o = _empty((B, Hq, 1, D), q.dtype, q.device)
    group = Hq // Hkv
    _decode_kernel[(B, Hkv)](q, k, v, bias, o, sm_scale * LOG2E, S,
                             q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                             v.stride(0), v.stride(1), v.stride(2), bias.stride(0), o.stride(0), o.stride(1),
                             GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
                             BLOCK_N=32 if INTERPRET else 64, HEAD_DIM=D, PRECISION=_precision(q.dtype),
                             num_warps=4)
    return o
