"""Triton's fused-attention tutorial kernels, as a reference point for maskc's generated kernels.

Reproduces the forward and backward kernels of Triton's tutorial
`python/tutorials/06-fused-attention.py` (https://github.com/triton-lang/triton,
"Fused Attention", credited there to the OpenAI kernel team; FlashAttention-2
structure), rewritten here for ahead-of-time compilation by bench/gpu_static.py
and the instruction-count test.  The algorithm and loop structure are the
tutorial's; these kernels are not part of maskc.

* `attn_fwd_desc`: the tutorial's current forward, which loads q, k, v and stores o
  through tensor descriptors (`tl.make_tensor_descriptor` over the
  [batch * heads * len, head_dim] matrices: TMA on sm_90, the tutorial's own path
  when it is handed pointers instead of host descriptors).
* `attn_fwd_ptr`: the same kernel with plain pointer loads (pointers advanced by a
  fixed step per key block).
* `attn_bwd`: the tutorial's backward (its `_attn_bwd`: dK/dV per key block of
  BLOCK_N1 over query blocks of BLOCK_M1, then dQ per query block of BLOCK_M2 over
  key blocks of BLOCK_N2; the diagonal blocks in steps BLK_SLICE_FACTOR times
  smaller, masked).  It expects k pre-multiplied by sm_scale / ln 2, as the
  tutorial's wrapper does, and the log-sum-exp `M` in base 2.

Causal attention is STAGE = 3 (a loop over the blocks left of the diagonal without
a mask, then the diagonal blocks with one); full attention is STAGE = 1 (one loop
without a mask).  The tutorial converts p to float16 before P V; here p takes the
inputs' dtype, so that bfloat16 builds too.  The tutorial requires the length to
be a multiple of the blocks (no bounds masks).
"""

# ruff: noqa: N803, N806  (Triton naming: upper-case pointers and constexprs, as in the tutorial)
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.44269504  # 1 / ln 2
LN2 = 0.6931471824645996  # ln 2


@triton.jit
def _fwd_inner_desc(acc, l_i, m_i, q, desc_k, desc_v, offset_y, start_m, qk_scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGE: tl.constexpr,
                    offs_m: tl.constexpr, offs_n: tl.constexpr, N_CTX: tl.constexpr):  # fmt: skip
    # which key blocks this stage visits: left of the diagonal, the diagonal, or all
    if STAGE == 1:
        lo, hi = 0, start_m * BLOCK_M
    elif STAGE == 2:
        lo, hi = start_m * BLOCK_M, (start_m + 1) * BLOCK_M
        lo = tl.multiple_of(lo, BLOCK_M)
    else:
        lo, hi = 0, N_CTX
    row = offset_y + lo
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = desc_k.load([row, 0]).T
        qk = tl.dot(q, k)
        if STAGE == 2:  # the diagonal block: mask future keys
            mask = offs_m[:, None] >= (start_n + offs_n[None, :])
            qk = qk * qk_scale + tl.where(mask, 0, -1.0e6)
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk -= m_ij[:, None]
        else:  # scale and subtract the running maximum in one multiply-add
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_ij = tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([row, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        l_i = l_i * alpha + l_ij
        m_i = m_ij
        row += BLOCK_N
    return acc, l_i, m_i


@triton.jit
def attn_fwd_desc(sm_scale, M, Z, H, Q, K, V, O, N_CTX, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGE: tl.constexpr):  # fmt: skip
    tl.static_assert(BLOCK_N <= HEAD_DIM)
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    y_dim = Z * H * N_CTX
    desc_q = tl.make_tensor_descriptor(Q, shape=[y_dim, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])  # fmt: skip
    desc_k = tl.make_tensor_descriptor(K, shape=[y_dim, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])  # fmt: skip
    desc_v = tl.make_tensor_descriptor(V, shape=[y_dim, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])  # fmt: skip
    desc_o = tl.make_tensor_descriptor(O, shape=[y_dim, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])  # fmt: skip
    offset_y = off_z * (N_CTX * H) + off_h * N_CTX
    qo_offset_y = offset_y + start_m * BLOCK_M
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504  # exp2 instead of exp: fold 1 / ln 2 into the scale
    q = desc_q.load([qo_offset_y, 0])
    if STAGE & 1:  # off the diagonal (causal), or everything (STAGE 1 passes 3)
        acc, l_i, m_i = _fwd_inner_desc(acc, l_i, m_i, q, desc_k, desc_v, offset_y, start_m, qk_scale,
                                        BLOCK_M, BLOCK_N, 4 - STAGE, offs_m, offs_n, N_CTX)  # fmt: skip
    if STAGE & 2:  # the diagonal blocks
        acc, l_i, m_i = _fwd_inner_desc(acc, l_i, m_i, q, desc_k, desc_v, offset_y, start_m, qk_scale,
                                        BLOCK_M, BLOCK_N, 2, offs_m, offs_n, N_CTX)  # fmt: skip
    m_i += tl.math.log2(l_i)
    acc = acc / l_i[:, None]
    tl.store(M + off_hz * N_CTX + offs_m, m_i)
    desc_o.store([qo_offset_y, 0], acc.to(O.dtype.element_ty))


@triton.jit
def _fwd_inner_ptr(acc, l_i, m_i, q, K, V, stride_tok, start_m, qk_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, STAGE: tl.constexpr,
                   offs_m: tl.constexpr, offs_n: tl.constexpr, N_CTX: tl.constexpr):  # fmt: skip
    if STAGE == 1:
        lo, hi = 0, start_m * BLOCK_M
    elif STAGE == 2:
        lo, hi = start_m * BLOCK_M, (start_m + 1) * BLOCK_M
        lo = tl.multiple_of(lo, BLOCK_M)
    else:
        lo, hi = 0, N_CTX
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = K + (lo + offs_n)[None, :] * stride_tok + offs_d[:, None]  # k transposed: [HEAD_DIM, BLOCK_N]
    v_ptrs = V + (lo + offs_n)[:, None] * stride_tok + offs_d[None, :]
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = tl.load(k_ptrs)
        qk = tl.dot(q, k)
        if STAGE == 2:
            mask = offs_m[:, None] >= (start_n + offs_n[None, :])
            qk = qk * qk_scale + tl.where(mask, 0, -1.0e6)
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk -= m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_ij = tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc)
        l_i = l_i * alpha + l_ij
        m_i = m_ij
        k_ptrs += BLOCK_N * stride_tok
        v_ptrs += BLOCK_N * stride_tok
    return acc, l_i, m_i


@triton.jit
def attn_fwd_ptr(Q, K, V, sm_scale, M, O, stride_z, stride_h, stride_tok, Z, H, N_CTX, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGE: tl.constexpr):  # fmt: skip
    tl.static_assert(BLOCK_N <= HEAD_DIM)
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    base = off_z.to(tl.int64) * stride_z + off_h.to(tl.int64) * stride_h
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504
    q = tl.load(Q + base + offs_m[:, None] * stride_tok + offs_d[None, :])
    if STAGE & 1:
        acc, l_i, m_i = _fwd_inner_ptr(acc, l_i, m_i, q, K + base, V + base, stride_tok, start_m, qk_scale,
                                       BLOCK_M, BLOCK_N, HEAD_DIM, 4 - STAGE, offs_m, offs_n, N_CTX)  # fmt: skip
    if STAGE & 2:
        acc, l_i, m_i = _fwd_inner_ptr(acc, l_i, m_i, q, K + base, V + base, stride_tok, start_m, qk_scale,
                                       BLOCK_M, BLOCK_N, HEAD_DIM, 2, offs_m, offs_n, N_CTX)  # fmt: skip
    m_i += tl.math.log2(l_i)
    acc = acc / l_i[:, None]
    tl.store(M + off_hz * N_CTX + offs_m, m_i)
    tl.store(O + base + offs_m[:, None] * stride_tok + offs_d[None, :], acc.to(O.dtype.element_ty))


@triton.jit
def _bwd_dkdv(dk, dv, Q, k, v, DO, M, D, stride_tok, N_CTX,
              BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, HEAD_DIM: tl.constexpr,
              start_n, start_m, num_steps, MASK: tl.constexpr):  # fmt: skip
    """dK, dV of one key block over `num_steps` query blocks from `start_m` (k pre-scaled)."""
    offs_m = start_m + tl.arange(0, BLOCK_M1)
    offs_n = start_n + tl.arange(0, BLOCK_N1)
    offs_d = tl.arange(0, HEAD_DIM)
    qT_ptrs = Q + offs_m[None, :] * stride_tok + offs_d[:, None]
    do_ptrs = DO + offs_m[:, None] * stride_tok + offs_d[None, :]
    tl.static_assert(BLOCK_N1 % BLOCK_M1 == 0)
    curr_m = start_m
    for _ in range(num_steps):
        qT = tl.load(qT_ptrs)
        offs_m = curr_m + tl.arange(0, BLOCK_M1)
        m = tl.load(M + offs_m)  # before the dot, to hide its latency
        qkT = tl.dot(k, qT)
        pT = tl.math.exp2(qkT - m[None, :])
        if MASK:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        do = tl.load(do_ptrs)
        dv += tl.dot(pT.to(do.dtype), do)
        Di = tl.load(D + offs_m)
        dpT = tl.dot(v, tl.trans(do)).to(tl.float32)
        dsT = pT * (dpT - Di[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))
        curr_m += BLOCK_M1
        qT_ptrs += BLOCK_M1 * stride_tok
        do_ptrs += BLOCK_M1 * stride_tok
    return dk, dv


@triton.jit
def _bwd_dq(dq, q, K, V, do, m, D, stride_tok, N_CTX,
            BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, HEAD_DIM: tl.constexpr,
            start_m, start_n, num_steps, MASK: tl.constexpr):  # fmt: skip
    """dQ of one query block over `num_steps` key blocks from `start_n`."""
    offs_m = start_m + tl.arange(0, BLOCK_M2)
    offs_n = start_n + tl.arange(0, BLOCK_N2)
    offs_d = tl.arange(0, HEAD_DIM)
    kT_ptrs = K + offs_n[None, :] * stride_tok + offs_d[:, None]
    vT_ptrs = V + offs_n[None, :] * stride_tok + offs_d[:, None]
    Di = tl.load(D + offs_m)
    tl.static_assert(BLOCK_M2 % BLOCK_N2 == 0)
    curr_n = start_n
    for _ in range(num_steps):
        kT = tl.load(kT_ptrs)
        vT = tl.load(vT_ptrs)
        qk = tl.dot(q, kT)
        p = tl.math.exp2(qk - m)
        if MASK:
            offs_n = curr_n + tl.arange(0, BLOCK_N2)
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, vT).to(tl.float32)
        ds = p * (dp - Di[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT))  # k was pre-scaled: dQ is scaled at the end
        curr_n += BLOCK_N2
        kT_ptrs += BLOCK_N2 * stride_tok
        vT_ptrs += BLOCK_N2 * stride_tok
    return dq


@triton.jit
def attn_bwd(Q, K, V, sm_scale, DO, DQ, DK, DV, M, D, stride_z, stride_h, stride_tok, H, N_CTX,
             BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
             BLK_SLICE_FACTOR: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr):  # fmt: skip
    bhid = tl.program_id(2)
    off_chz = (bhid * N_CTX).to(tl.int64)
    adj = (stride_h * (bhid % H) + stride_z * (bhid // H)).to(tl.int64)
    pid = tl.program_id(0)
    Q += adj
    K += adj
    V += adj
    DO += adj
    DQ += adj
    DK += adj
    DV += adj
    M += off_chz
    D += off_chz
    offs_d = tl.arange(0, HEAD_DIM)
    # dK and dV of key block pid
    start_n = pid * BLOCK_N1
    start_m = 0
    MASK_BLOCK_M1: tl.constexpr = BLOCK_M1 // BLK_SLICE_FACTOR
    offs_n = start_n + tl.arange(0, BLOCK_N1)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    dk = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    k = tl.load(K + offs_n[:, None] * stride_tok + offs_d[None, :])
    v = tl.load(V + offs_n[:, None] * stride_tok + offs_d[None, :])
    if CAUSAL:  # the diagonal query blocks first, in smaller masked steps
        start_m = start_n
        num_steps = BLOCK_N1 // MASK_BLOCK_M1
        dk, dv = _bwd_dkdv(dk, dv, Q, k, v, DO, M, D, stride_tok, N_CTX, MASK_BLOCK_M1, BLOCK_N1, HEAD_DIM,
                           start_n, start_m, num_steps, MASK=True)  # fmt: skip
        start_m += num_steps * MASK_BLOCK_M1
    num_steps = (N_CTX - start_m) // BLOCK_M1
    dk, dv = _bwd_dkdv(dk, dv, Q, k, v, DO, M, D, stride_tok, N_CTX, BLOCK_M1, BLOCK_N1, HEAD_DIM,
                       start_n, start_m, num_steps, MASK=False)  # fmt: skip
    tl.store(DV + offs_n[:, None] * stride_tok + offs_d[None, :], dv)
    dk *= sm_scale
    tl.store(DK + offs_n[:, None] * stride_tok + offs_d[None, :], dk)
    # dQ of query block pid
    start_m = pid * BLOCK_M2
    start_n = 0
    num_steps = N_CTX // BLOCK_N2
    MASK_BLOCK_N2: tl.constexpr = BLOCK_N2 // BLK_SLICE_FACTOR
    offs_m = start_m + tl.arange(0, BLOCK_M2)
    q = tl.load(Q + offs_m[:, None] * stride_tok + offs_d[None, :])
    dq = tl.zeros([BLOCK_M2, HEAD_DIM], dtype=tl.float32)
    do = tl.load(DO + offs_m[:, None] * stride_tok + offs_d[None, :])
    m = tl.load(M + offs_m)[:, None]
    if CAUSAL:  # the diagonal key blocks, masked, then those left of them
        end_n = start_m + BLOCK_M2
        num_steps = BLOCK_M2 // MASK_BLOCK_N2
        dq = _bwd_dq(dq, q, K, V, do, m, D, stride_tok, N_CTX, BLOCK_M2, MASK_BLOCK_N2, HEAD_DIM,
                     start_m, end_n - num_steps * MASK_BLOCK_N2, num_steps, MASK=True)  # fmt: skip
        end_n -= num_steps * MASK_BLOCK_N2
        num_steps = end_n // BLOCK_N2
        start_n = end_n - num_steps * BLOCK_N2
    dq = _bwd_dq(dq, q, K, V, do, m, D, stride_tok, N_CTX, BLOCK_M2, BLOCK_N2, HEAD_DIM,
                 start_m, start_n, num_steps, MASK=False)  # fmt: skip
    dq *= 0.6931471824645996  # ln 2
    tl.store(DQ + offs_m[:, None] * stride_tok + offs_d[None, :], dq)


# The tutorial's launch configurations: its forward's test configuration (its autotuner
# searches BLOCK_M in 64, 128, BLOCK_N in 32, 64, 128, 2-4 stages, 4 or 8 warps) and its
# backward's fixed one.
FWD_TILE = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
BWD_TILE = {"BLOCK_M1": 32, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 32, "BLK_SLICE_FACTOR": 2,
            "num_warps": 4, "num_stages": 5}  # fmt: skip
