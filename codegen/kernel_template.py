"""The attention kernels every generated file shares; the pattern enters through
the `allowed`, `modify` and `modify_grad` functions emitted above them.

FlashAttention-2 structure: the forward runs an online softmax and saves the
log-sum-exp; the backward computes dK/dV per key block over the transposed
schedule and dQ per query block over the schedule.  Loops walk CSR runs of key
(or query) blocks: full runs never call `allowed`, partial runs do.  `{tables}`
and `{tables_call}` are replaced by the pattern's tensor arguments.

Conventions: q/k/v/o/do are [batch, heads, len, dim] with unit stride on dim;
LSE/Delta are float32 [batch, heads, lq]; dK/dV accumulate per *query* head
(float32) and are summed over GQA groups by the caller.

Dropout (the DROPOUT constexpr; kernels without it are unchanged): the keep
mask is a hash of (seed, batch, head, absolute query and key positions), the
same bits as runtime/dropout.py.  The forward sums the undropped row (so LSE is
the undropped softmax's) and multiplies P by keep / (1 - p) before P V; the
backward regenerates the mask: dV takes the dropped, scaled P, and dP is
multiplied by keep / (1 - p) before dS = P * (dP - Delta).
"""

KERNELS = '''
# Only Triton builtins below (no tl.sum / tl.max / tl.zeros): those standard-library
# functions are fixed to interpreter or compiler mode by whichever Triton import came
# first in the process, and maskc runs the same files in both modes.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _floor_mod(x, d):
    """x mod d in [0, d) for any sign of x, in both interpreter and compiled modes."""
    return ((x % d) + d) % d


@triton.jit
def _floor_div(x, d):
    """floor(x / d) for any sign of x: x minus its floor remainder divides exactly."""
    return (x - _floor_mod(x, d)) // d


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _positions(offs, Perm, n, offset, HAS_PERM: tl.constexpr):
    """Absolute positions of execution-order indices `offs` (layout undone).
    Indices past the end are clamped to the last real one, so that the pattern's
    table lookups stay in bounds; their pairs are masked out anyway."""
    offs = tl.minimum(offs, n - 1)
    if HAS_PERM:
        idx = tl.load(Perm + offs)
    else:
        idx = offs
    return idx + offset


@triton.jit
def _fmix32(x):
    """murmur3's 32-bit finalizer on uint32 (runtime/dropout.py computes the same bits in torch)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _dropout_row(seed, b, h, qpos):
    """Dropout's hash state per query row: (seed, batch, head, absolute query position)."""
    x = _fmix32(seed.to(tl.uint32, bitcast=True) ^ 0x9E3779B9)
    x = _fmix32(x ^ b.to(tl.uint32, bitcast=True))
    x = _fmix32(x ^ h.to(tl.uint32, bitcast=True))
    return _fmix32(x ^ qpos.to(tl.uint32, bitcast=True))


@triton.jit
def _dropout_keep(row, kpos, threshold):
    """Whether dropout keeps the pairs of rows `row` [M, 1] and keys at absolute `kpos` [1, N]."""
    x = _fmix32(row ^ kpos.to(tl.uint32, bitcast=True))
    return (x >> 1).to(tl.int32, bitcast=True) >= threshold


@triton.jit(do_not_specialize=["drop_seed"])
def attn_fwd(
    Q, K, V, O, LSE, Heads, PermQ, PermK,
    FullPtr, FullStart, FullEnd, PartPtr, PartStart, PartEnd,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    num_heads, lq, lk, q_offset, sm_scale, group_heads, kv_group,
    drop_seed, drop_threshold, drop_scale,{tables}
    HAS_PERM_Q: tl.constexpr, HAS_PERM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, DROPOUT: tl.constexpr,
):
    qb = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // group_heads
    h = tl.load(Heads + pid % group_heads)
    kvh = h // kv_group
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < lq) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:  # Triton's interpreter multiplies bfloat16 wrongly in tl.dot
        q = q.to(tl.float32)
    qpos = _positions(offs_m, PermQ, lq, q_offset, HAS_PERM_Q)[:, None]
    if DROPOUT:
        drop_row = _dropout_row(drop_seed, b, h, qpos)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM_V], 0.0, dtype=tl.float32)
    K_base = K + b * stride_kb + kvh * stride_kh
    V_base = V + b * stride_vb + kvh * stride_vh
    for part in tl.static_range(2):
        if part == 0:
            r0 = tl.load(FullPtr + qb)
            r1 = tl.load(FullPtr + qb + 1)
        else:
            r0 = tl.load(PartPtr + qb)
            r1 = tl.load(PartPtr + qb + 1)
        for r in range(r0, r1):
            if part == 0:
                c0 = tl.load(FullStart + r)
                c1 = tl.load(FullEnd + r)
            else:
                c0 = tl.load(PartStart + r)
                c1 = tl.load(PartEnd + r)
            for kb in range(c0, c1):
                offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
                k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                            mask=(offs_n[:, None] < lk) & (offs_d[None, :] < D), other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                kpos = _positions(offs_n, PermK, lk, 0, HAS_PERM_K)[None, :]
                s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * sm_scale
                s = modify(s, qpos, kpos, b, h, q_offset,{tables_call})
                keep = offs_n[None, :] < lk
                if part == 1:
                    keep = keep & allowed(qpos, kpos, b, h, q_offset,{tables_call})
                s = tl.where(keep, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.reduce(s, 1, _maximum))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_use[:, None])
                alpha = tl.exp(m_i - m_use)
                l_i = l_i * alpha + tl.reduce(p, 1, _add)
                v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :],
                            mask=(offs_n[:, None] < lk) & (offs_dv[None, :] < DV), other=0.0)
                if UPCAST:
                    v = v.to(tl.float32)
                acc = acc * alpha[:, None]
                if DROPOUT:  # the row sum above stays undropped; P V sees the kept P, scaled
                    p = tl.where(_dropout_keep(drop_row, kpos, drop_threshold), p * drop_scale, 0.0)
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
                m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < lq) & (offs_dv[None, :] < DV))
    tl.store(LSE + (b * num_heads + h) * lq + offs_m, lse, mask=offs_m < lq)


@triton.jit(do_not_specialize=["drop_seed"])
def attn_bwd_dkdv(
    Q, K, V, DO, LSE, Delta, DK, DV_, Heads, PermQ, PermK,
    FullPtr, FullStart, FullEnd, PartPtr, PartStart, PartEnd,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    num_heads, lq, lk, q_offset, sm_scale, group_heads, kv_group,
    drop_seed, drop_threshold, drop_scale,{tables}
    HAS_PERM_Q: tl.constexpr, HAS_PERM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DROPOUT: tl.constexpr,
):
    kb = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // group_heads
    h = tl.load(Heads + pid % group_heads)
    kvh = h // kv_group
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    k = tl.load(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=(offs_n[:, None] < lk) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :],
                mask=(offs_n[:, None] < lk) & (offs_dv[None, :] < DV), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kpos = _positions(offs_n, PermK, lk, 0, HAS_PERM_K)[None, :]
    dk = tl.full([BLOCK_N, HEAD_DIM], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, HEAD_DIM_V], 0.0, dtype=tl.float32)
    Q_base = Q + b * stride_qb + h * stride_qh
    DO_base = DO + b * stride_dob + h * stride_doh
    row_base = (b * num_heads + h) * lq
    for part in tl.static_range(2):
        if part == 0:
            r0 = tl.load(FullPtr + kb)
            r1 = tl.load(FullPtr + kb + 1)
        else:
            r0 = tl.load(PartPtr + kb)
            r1 = tl.load(PartPtr + kb + 1)
        for r in range(r0, r1):
            if part == 0:
                c0 = tl.load(FullStart + r)
                c1 = tl.load(FullEnd + r)
            else:
                c0 = tl.load(PartStart + r)
                c1 = tl.load(PartEnd + r)
            for qb in range(c0, c1):
                offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
                row_ok = offs_m < lq
                q = tl.load(Q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                            mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                do = tl.load(DO_base + offs_m[:, None] * stride_dom + offs_dv[None, :],
                             mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
                delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
                qpos = _positions(offs_m, PermQ, lq, q_offset, HAS_PERM_Q)[:, None]
                raw = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * sm_scale
                s = modify(raw, qpos, kpos, b, h, q_offset,{tables_call})
                keep = (offs_n[None, :] < lk) & row_ok[:, None]
                if part == 1:
                    keep = keep & allowed(qpos, kpos, b, h, q_offset,{tables_call})
                p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
                if DROPOUT:  # dV from the kept P, scaled; dP through the same mask
                    drop = _dropout_keep(_dropout_row(drop_seed, b, h, qpos), kpos, drop_threshold)
                    drop = tl.where(drop, drop_scale, 0.0)
                    dv = tl.dot(tl.trans((p * drop).to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
                    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION) * drop
                else:
                    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
                    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
                ds = p * (dp - delta[:, None])
                if SOFTCAP:
                    ds = ds * modify_grad(raw, qpos, kpos, b, h, q_offset,{tables_call})
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=INPUT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :], dk,
             mask=(offs_n[:, None] < lk) & (offs_d[None, :] < D))
    tl.store(DV_ + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :], dv,
             mask=(offs_n[:, None] < lk) & (offs_dv[None, :] < DV))


@triton.jit(do_not_specialize=["drop_seed"])
def attn_bwd_dq(
    Q, K, V, DO, LSE, Delta, DQ, Heads, PermQ, PermK,
    FullPtr, FullStart, FullEnd, PartPtr, PartStart, PartEnd,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    num_heads, lq, lk, q_offset, sm_scale, group_heads, kv_group,
    drop_seed, drop_threshold, drop_scale,{tables}
    HAS_PERM_Q: tl.constexpr, HAS_PERM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    TENSOR_GRADS: tl.constexpr, DROPOUT: tl.constexpr,
):
    qb = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // group_heads
    h = tl.load(Heads + pid % group_heads)
    kvh = h // kv_group
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_m < lq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = (b * num_heads + h) * lq
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    qpos = _positions(offs_m, PermQ, lq, q_offset, HAS_PERM_Q)[:, None]
    if DROPOUT:
        drop_row = _dropout_row(drop_seed, b, h, qpos)
    dq = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    K_base = K + b * stride_kb + kvh * stride_kh
    V_base = V + b * stride_vb + kvh * stride_vh
    for part in tl.static_range(2):
        if part == 0:
            r0 = tl.load(FullPtr + qb)
            r1 = tl.load(FullPtr + qb + 1)
        else:
            r0 = tl.load(PartPtr + qb)
            r1 = tl.load(PartPtr + qb + 1)
        for r in range(r0, r1):
            if part == 0:
                c0 = tl.load(FullStart + r)
                c1 = tl.load(FullEnd + r)
            else:
                c0 = tl.load(PartStart + r)
                c1 = tl.load(PartEnd + r)
            for kb in range(c0, c1):
                offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
                k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                            mask=(offs_n[:, None] < lk) & (offs_d[None, :] < D), other=0.0)
                v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :],
                            mask=(offs_n[:, None] < lk) & (offs_dv[None, :] < DV), other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                kpos = _positions(offs_n, PermK, lk, 0, HAS_PERM_K)[None, :]
                raw = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * sm_scale
                s = modify(raw, qpos, kpos, b, h, q_offset,{tables_call})
                keep = (offs_n[None, :] < lk) & row_ok[:, None]
                if part == 1:
                    keep = keep & allowed(qpos, kpos, b, h, q_offset,{tables_call})
                p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
                if DROPOUT:
                    dp = tl.where(_dropout_keep(drop_row, kpos, drop_threshold), dp * drop_scale, 0.0)
                ds = p * (dp - delta[:, None])
                if TENSOR_GRADS:
                    modify_backward(ds, raw, qpos, kpos, b, h, q_offset,{tables_call})
                if SOFTCAP:
                    ds = ds * modify_grad(raw, qpos, kpos, b, h, q_offset,{tables_call})
                dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :], dq,
             mask=row_ok[:, None] & (offs_d[None, :] < D))
'''
