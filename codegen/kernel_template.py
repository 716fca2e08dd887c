"""The attention kernels every generated file shares; the pattern enters through
the `allowed`, `modify`, `modify_grad` and `modify_backward` functions and the
`MODIFIED` constant emitted above them.

FlashAttention-2 structure (as Triton's tutorial 06-fused-attention): the
forward runs an online softmax and saves the log-sum-exp; the backward computes
dK/dV per key block over the transposed schedule and dQ per query block over
the schedule.  `{tables}` and `{tables_call}` are replaced by the pattern's
tensor arguments.

The schedule reaches each kernel as two CSR tables of *runs* (ranges of
consecutive blocks) per row of blocks: `FullPtr[row] .. FullPtr[row + 1]` index
the row's full runs, `FullStart[r] .. FullEnd[r]` the blocks of run r, in which
every pair is allowed (no call to `allowed`); `PartPtr`, `PartStart`, `PartEnd`
likewise for its partial runs, where `allowed` decides pair by pair.  A row is a
query block (forward, dQ) or a key block (dK/dV, over the transposed schedule).

Each kernel's per-block work is one function (`_fwd_block`, `_dkdv_block`,
`_dq_block`) compiled three ways by its `MASK` constexpr, so that only the
blocks that need a mask pay for it.  The runs are walked up to the last block
that ends within the sequence (`lk // BLOCK_N` key blocks; `lq // BLOCK_M`
query blocks for dK/dV); a block's addresses are a loop-invariant tile of
pointers plus one scalar step per block (carrying the pointer tiles through
the loop instead costs Triton's pipeliner a register copy of each per step):

* MASK 0, full runs: unmasked loads, no bounds test, no predicate, no guard for
  rows that have seen no key yet (every row of a full block has a key, and the
  full runs come first), unless modifiers may make a logit -inf (a `bias`
  table holding -inf): then the guard stays, so such a row gives 0, not NaN.
* MASK 1, partial runs: `allowed` per pair and the guard for empty rows.
* MASK 2, the ragged last block (when the length is not a multiple of the
  block and a run reaches it, full or partial): bounds, `allowed` (true on
  every pair of a full block) and the guard; positions past the end are
  clamped for the pattern's table lookups.

dK/dV keeps two copies, MASK 0 and MASK 2: its partial runs, then the ragged
last query block of its full runs as one more run, all with bounds.  A third
copy of its body (two accumulators, and the dropout hash with DROPOUT) made
ptxas spill on sm_90 at 64 x 64 with 8 warps.

The softmax runs in base 2, as the tutorial's: the logits are scaled once by
|scale| * log2(e) inside the `exp2` argument (one fused multiply-add per pair),
the row maxima are kept in base-2 units and the forward converts the
log-sum-exp back to natural log on its way out (LSE: float32, natural log, -inf
for rows that allow no key).  A negative scale flips q's sign once (exact), so
the row maximum is taken of the unscaled dot products.  The backward kernels
take the log-sum-exp in base 2 (runtime/triton_backend.py multiplies it by
log2(e), +inf for empty rows).  Modifiers (`MODIFIED`) see natural logits, as
the language defines them; their result is scaled to base 2 after them.

Conventions: q/k/v/o/do are [batch, heads, len, dim] with unit stride on dim;
QK_DIM and V_DIM are the head dims of q/k and of v, HEAD_DIM and HEAD_DIM_V
the same rounded up to a power of two (the tiles' width); LSE/Delta are float32
[batch, heads, lq]; the gradients DK/DV accumulate per *query* head (float32)
and are summed over GQA groups by the caller.  Rows past lq (queries) and, in
dK/dV, columns past lk (keys) are computed but never stored, and nothing
summed reads them: only the sums over keys (forward, dQ) and over queries
(dK/dV) must mask the ragged end.

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
def _runs(row, part: tl.constexpr, FullPtr, PartPtr):
    """[first, last) of the runs of blocks `row` visits: its full runs (part 0) or partial runs (part 1)."""
    if part == 0:
        first = tl.load(FullPtr + row)
        last = tl.load(FullPtr + row + 1)
    else:
        first = tl.load(PartPtr + row)
        last = tl.load(PartPtr + row + 1)
    return first, last


@triton.jit
def _run_blocks(r, part: tl.constexpr, FullStart, FullEnd, PartStart, PartEnd):
    """[start, end) of the blocks of run r of the full (part 0) or partial (part 1) runs."""
    if part == 0:
        start = tl.load(FullStart + r)
        end = tl.load(FullEnd + r)
    else:
        start = tl.load(PartStart + r)
        end = tl.load(PartEnd + r)
    return start, end


# Each kernel walks its row's runs (`_runs`, `_run_blocks`) and calls its block function
# with every value by name.  The walk is not shared: Triton accepts a function as a
# `tl.constexpr` argument, but values packed into a tuple stop being constexpr when
# compiled (Triton 3.9: "arange's arguments must be of type tl.constexpr"), and each
# block function takes its own constexprs and some twenty values besides the pattern's
# tables (a different list in every file).


@triton.jit
def _load_rows(Base, offs, stride, offs_d, n, dim, UPCAST: tl.constexpr):
    """Rows `offs` of an [n, dim] matrix at Base (row stride `stride`), zero past n rows
    and dim columns; in float32 when UPCAST (Triton's interpreter multiplies bfloat16
    wrongly in tl.dot)."""
    x = tl.load(Base + offs[:, None] * stride + offs_d[None, :], mask=(offs[:, None] < n) & (offs_d[None, :] < dim),
                other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_tile(ptrs, rows, n, cols, DIM: tl.constexpr, WIDTH: tl.constexpr, BOUNDED: tl.constexpr,
               UPCAST: tl.constexpr):
    """The tile at `ptrs` (rows `rows`, columns `cols` of an [n, DIM] matrix), zero past
    DIM columns when the tile is wider, and past n rows only when BOUNDED."""
    if BOUNDED:
        if DIM < WIDTH:
            x = tl.load(ptrs, mask=(rows[:, None] < n) & (cols[None, :] < DIM), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n, other=0.0)
    elif DIM < WIDTH:
        x = tl.load(ptrs, mask=cols[None, :] < DIM, other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _positions(offs, Perm, n, offset, HAS_PERM: tl.constexpr, CLAMP: tl.constexpr = True):
    """Absolute positions of execution-order indices `offs` (layout undone).
    Indices past the end are clamped (CLAMP) to the last real one, so that the
    pattern's table lookups stay in bounds; their pairs are masked out anyway."""
    if CLAMP:
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


@triton.jit
def _fwd_block(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, kb, qpos, drop_row, b, h, q_offset, lk, PermK, sm_abs, qk_scale,
    drop_threshold, drop_scale,{tables}
    offs_d, offs_dv, MASK: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PERM_K: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, QK_DIM: tl.constexpr, V_DIM: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, DROPOUT: tl.constexpr,
):
    """One key block of the online softmax (MASK: see the module docstring); returns (acc, m_i, l_i)."""
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_tile(k_ptrs, offs_n, lk, offs_d, QK_DIM, HEAD_DIM, MASK == 2, UPCAST)
    kpos = _positions(offs_n, PermK, lk, 0, HAS_PERM_K, MASK == 2)[None, :]
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    if MODIFIED:  # natural logits through the modifiers, then to base 2
        s = modify(s * sm_abs, qpos, kpos, b, h, q_offset,{tables_call}) * 1.4426950408889634
        scale = 1.0
    else:  # raw dot products; the scale is folded into the maximum and the exponent
        scale = qk_scale
    if MASK > 0:  # -inf outside the pattern and past the keys
        keep = allowed(qpos, kpos, b, h, q_offset,{tables_call})
        if MASK == 2:
            keep = keep & (offs_n[None, :] < lk)
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _maximum) * scale)
    m_use = m_new
    if MASK > 0 or MODIFIED:  # rows with no key yet keep their zeros (a bias may be -inf)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * scale - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.reduce(p, 1, _add)
    v = _load_tile(v_ptrs, offs_n, lk, offs_dv, V_DIM, HEAD_DIM_V, MASK == 2, UPCAST)
    acc = acc * alpha[:, None]
    if DROPOUT:  # the row sum above stays undropped; P V sees the kept P, scaled
        p = tl.where(_dropout_keep(drop_row, kpos, drop_threshold), p * drop_scale, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["drop_seed"])
def attn_fwd(
    Q, K, V, O, LSE, Heads, PermQ, PermK,
    FullPtr, FullStart, FullEnd, PartPtr, PartStart, PartEnd,  # runs of key blocks per query block
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    num_heads, lq, lk, q_offset, sm_scale, group_heads, kv_group,
    drop_seed, drop_threshold, drop_scale,{tables}
    HAS_PERM_Q: tl.constexpr, HAS_PERM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, QK_DIM: tl.constexpr, V_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, DROPOUT: tl.constexpr,
):
    qb = tl.program_id(0)  # this program's query block
    pid = tl.program_id(1)  # and batch element and head (one of the group's)
    b = pid // group_heads
    h = tl.load(Heads + pid % group_heads)
    kvh = h // kv_group
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, lq, QK_DIM, UPCAST)
    # base 2: logits times |scale| log2(e), with q's sign flipped (exactly) for a negative
    # scale; kept above 0 so that masked logits stay -inf when the scale is 0
    q = tl.where(sm_scale < 0, -q, q)
    sm_abs = tl.abs(sm_scale)
    qk_scale = tl.maximum(sm_abs * 1.4426950408889634, 1e-30)
    qpos = _positions(offs_m, PermQ, lq, q_offset, HAS_PERM_Q)[:, None]
    if DROPOUT:
        drop_row = _dropout_row(drop_seed, b, h, qpos)
    else:
        drop_row = qpos  # unused
    # online softmax state per query row: running maximum (base 2), sum of exponentials, output
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM_V], 0.0, dtype=tl.float32)
    K_tile = K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    V_tile = V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :]
    step_k = BLOCK_N * stride_kn
    step_v = BLOCK_N * stride_vn
    inner = lk // BLOCK_N  # key blocks with no position past lk
    ragged_end = inner  # inner + 1 when a run reaches the ragged last block
    for part in tl.static_range(2):  # 0: the full runs, no mask; 1: the partial runs, `allowed` per pair
        first_run, last_run = _runs(qb, part, FullPtr, PartPtr)
        for r in range(first_run, last_run):
            start, end = _run_blocks(r, part, FullStart, FullEnd, PartStart, PartEnd)
            ragged_end = tl.maximum(ragged_end, end)
            for kb in range(start, tl.minimum(end, inner)):  # the key blocks of run r
                acc, m_i, l_i = _fwd_block(
                    acc, m_i, l_i, q, K_tile + kb * step_k, V_tile + kb * step_v, kb, qpos, drop_row, b, h, q_offset,
                    lk, PermK, sm_abs, qk_scale, drop_threshold, drop_scale,{tables_call} offs_d, offs_dv, part,
                    BLOCK_N, HAS_PERM_K, HEAD_DIM, HEAD_DIM_V, QK_DIM, V_DIM, INPUT_PRECISION, UPCAST, DROPOUT,
                )
    for kb in range(inner, ragged_end):  # the ragged last key block: bounds and `allowed`
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q, K_tile + kb * step_k, V_tile + kb * step_v, kb, qpos, drop_row, b, h, q_offset, lk, PermK,
            sm_abs, qk_scale, drop_threshold, drop_scale,{tables_call} offs_d, offs_dv, 2, BLOCK_N, HAS_PERM_K,
            HEAD_DIM, HEAD_DIM_V, QK_DIM, V_DIM, INPUT_PRECISION, UPCAST, DROPOUT,
        )
    # rows that allowed no key output 0, with log-sum-exp -inf; the rest back to natural log
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < lq) & (offs_dv[None, :] < V_DIM))
    tl.store(LSE + (b * num_heads + h) * lq + offs_m, lse, mask=offs_m < lq)


@triton.jit
def _dkdv_block(
    dk, dv, k, v, kpos, Q_base, DO_base, LSE_rows, Delta_rows, stride_qm, stride_dom, qb, b, h, q_offset, lq, PermQ,
    sm_scale, qk_scale, drop_seed, drop_threshold, drop_scale,{tables}
    offs_d, offs_dv, MASK: tl.constexpr, BLOCK_M: tl.constexpr, HAS_PERM_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, QK_DIM: tl.constexpr, V_DIM: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DROPOUT: tl.constexpr,
):
    """One query block's share of dK and dV (MASK: see the module docstring); returns (dk, dv).
    Rows past lq read LSE +inf, so their P is 0 with no mask."""
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ptrs = Q_base + offs_m[:, None] * stride_qm + offs_d[None, :]
    do_ptrs = DO_base + offs_m[:, None] * stride_dom + offs_dv[None, :]
    lse_ptrs = LSE_rows + offs_m
    delta_ptrs = Delta_rows + offs_m
    q = _load_tile(q_ptrs, offs_m, lq, offs_d, QK_DIM, HEAD_DIM, MASK == 2, UPCAST)
    do = _load_tile(do_ptrs, offs_m, lq, offs_dv, V_DIM, HEAD_DIM_V, MASK == 2, UPCAST)
    if MASK == 2:
        lse = tl.load(lse_ptrs, mask=offs_m < lq, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=offs_m < lq, other=0.0)
    else:
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    qpos = _positions(offs_m, PermQ, lq, q_offset, HAS_PERM_Q, MASK == 2)[:, None]
    # P again, from the forward's log-sum-exp (base 2)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    raw = qk * sm_scale  # natural logits, for the modifiers
    if MODIFIED:
        p = tl.exp2(modify(raw, qpos, kpos, b, h, q_offset,{tables_call}) * 1.4426950408889634 - lse[:, None])
    else:
        p = tl.exp2(qk * qk_scale - lse[:, None])
    if MASK > 0:
        p = tl.where(allowed(qpos, kpos, b, h, q_offset,{tables_call}), p, 0.0)
    # dV += P^T dO and dP = dO V^T; with dropout, dV from the kept P, scaled, dP through the same mask
    if DROPOUT:
        drop = _dropout_keep(_dropout_row(drop_seed, b, h, qpos), kpos, drop_threshold)
        drop = tl.where(drop, drop_scale, 0.0)
        dv = tl.dot(tl.trans((p * drop).to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION) * drop
    else:
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])  # d loss / d logits (after the modifiers)
    if SOFTCAP:
        ds = ds * modify_grad(raw, qpos, kpos, b, h, q_offset,{tables_call})
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["drop_seed"])
def attn_bwd_dkdv(
    Q, K, V, DO, LSE, Delta, DK, DV, Heads, PermQ, PermK,
    FullPtr, FullStart, FullEnd, PartPtr, PartStart, PartEnd,  # runs of query blocks per key block
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    num_heads, lq, lk, q_offset, sm_scale, group_heads, kv_group,
    drop_seed, drop_threshold, drop_scale,{tables}
    HAS_PERM_Q: tl.constexpr, HAS_PERM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, QK_DIM: tl.constexpr, V_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DROPOUT: tl.constexpr,
):
    kb = tl.program_id(0)  # this program's key block
    pid = tl.program_id(1)  # and batch element and head (one of the group's)
    b = pid // group_heads
    h = tl.load(Heads + pid % group_heads)
    kvh = h // kv_group
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    k = _load_rows(K + b * stride_kb + kvh * stride_kh, offs_n, stride_kn, offs_d, lk, QK_DIM, UPCAST)
    v = _load_rows(V + b * stride_vb + kvh * stride_vh, offs_n, stride_vn, offs_dv, lk, V_DIM, UPCAST)
    kpos = _positions(offs_n, PermK, lk, 0, HAS_PERM_K)[None, :]
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.full([BLOCK_N, HEAD_DIM], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, HEAD_DIM_V], 0.0, dtype=tl.float32)
    Q_base = Q + b * stride_qb + h * stride_qh
    DO_base = DO + b * stride_dob + h * stride_doh
    row_base = (b * num_heads + h) * lq
    inner = lq // BLOCK_M  # query blocks with no row past lq
    # The full runs up to `inner` without masks; then the partial runs and, as one more run, the
    # ragged last query block when a full run reaches it, with bounds and `allowed` (one copy of
    # the masked body: a third spills registers on sm_90 with dropout).
    ragged_end = inner
    first_run, last_run = _runs(kb, 0, FullPtr, PartPtr)
    for r in range(first_run, last_run):  # the full runs
        start, end = _run_blocks(r, 0, FullStart, FullEnd, PartStart, PartEnd)
        ragged_end = tl.maximum(ragged_end, end)
        for qb in range(start, tl.minimum(end, inner)):
            dk, dv = _dkdv_block(
                dk, dv, k, v, kpos, Q_base, DO_base, LSE + row_base, Delta + row_base, stride_qm, stride_dom, qb, b, h,
                q_offset, lq, PermQ, sm_scale, qk_scale, drop_seed, drop_threshold, drop_scale,{tables_call} offs_d,
                offs_dv, 0, BLOCK_M, HAS_PERM_Q, HEAD_DIM, HEAD_DIM_V, QK_DIM, V_DIM, INPUT_PRECISION, SOFTCAP, UPCAST,
                DROPOUT,
            )
    first_run, last_run = _runs(kb, 1, FullPtr, PartPtr)
    for r in range(first_run, last_run + 1):  # the partial runs, then [inner, ragged_end)
        if r < last_run:
            start, end = _run_blocks(r, 1, FullStart, FullEnd, PartStart, PartEnd)
        else:
            start, end = inner, ragged_end
        for qb in range(start, end):
            dk, dv = _dkdv_block(
                dk, dv, k, v, kpos, Q_base, DO_base, LSE + row_base, Delta + row_base, stride_qm, stride_dom, qb, b, h,
                q_offset, lq, PermQ, sm_scale, qk_scale, drop_seed, drop_threshold, drop_scale,{tables_call} offs_d,
                offs_dv, 2, BLOCK_M, HAS_PERM_Q, HEAD_DIM, HEAD_DIM_V, QK_DIM, V_DIM, INPUT_PRECISION, SOFTCAP, UPCAST,
                DROPOUT,
            )
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :], dk,
             mask=(offs_n[:, None] < lk) & (offs_d[None, :] < QK_DIM))
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :], dv,
             mask=(offs_n[:, None] < lk) & (offs_dv[None, :] < V_DIM))


@triton.jit
def _dq_block(
    dq, q, do, lse, delta, qpos, drop_row, k_ptrs, v_ptrs, kb, b, h, q_offset, lk, PermK, sm_scale, qk_scale,
    drop_threshold, drop_scale,{tables}
    offs_d, offs_dv, MASK: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PERM_K: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, QK_DIM: tl.constexpr, V_DIM: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, TENSOR_GRADS: tl.constexpr, DROPOUT: tl.constexpr,
):
    """One key block's share of dQ (MASK: see the module docstring); returns dq.
    Rows past lq read LSE +inf, so their P (and dS) is 0 with no mask."""
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_tile(k_ptrs, offs_n, lk, offs_d, QK_DIM, HEAD_DIM, MASK == 2, UPCAST)
    v = _load_tile(v_ptrs, offs_n, lk, offs_dv, V_DIM, HEAD_DIM_V, MASK == 2, UPCAST)
    kpos = _positions(offs_n, PermK, lk, 0, HAS_PERM_K, MASK == 2)[None, :]
    # P again, from the forward's log-sum-exp (base 2)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    raw = qk * sm_scale  # natural logits, for the modifiers
    if MODIFIED:
        p = tl.exp2(modify(raw, qpos, kpos, b, h, q_offset,{tables_call}) * 1.4426950408889634 - lse[:, None])
    else:
        p = tl.exp2(qk * qk_scale - lse[:, None])
    if MASK > 0:  # 0 outside the pattern and past the keys
        keep = allowed(qpos, kpos, b, h, q_offset,{tables_call})
        if MASK == 2:
            keep = keep & (offs_n[None, :] < lk)
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    if DROPOUT:
        dp = tl.where(_dropout_keep(drop_row, kpos, drop_threshold), dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])  # d loss / d logits (after the modifiers)
    if TENSOR_GRADS:  # atomic adds into the gradients of the modifiers' tensors; returns nothing
        modify_backward(ds, raw, qpos, kpos, b, h, q_offset,{tables_call})
    if SOFTCAP:
        ds = ds * modify_grad(raw, qpos, kpos, b, h, q_offset,{tables_call})
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["drop_seed"])
def attn_bwd_dq(
    Q, K, V, DO, LSE, Delta, DQ, Heads, PermQ, PermK,
    FullPtr, FullStart, FullEnd, PartPtr, PartStart, PartEnd,  # runs of key blocks per query block
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    num_heads, lq, lk, q_offset, sm_scale, group_heads, kv_group,
    drop_seed, drop_threshold, drop_scale,{tables}
    HAS_PERM_Q: tl.constexpr, HAS_PERM_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, QK_DIM: tl.constexpr, V_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    TENSOR_GRADS: tl.constexpr, DROPOUT: tl.constexpr,
):
    qb = tl.program_id(0)  # this program's query block
    pid = tl.program_id(1)  # and batch element and head (one of the group's)
    b = pid // group_heads
    h = tl.load(Heads + pid % group_heads)
    kvh = h // kv_group
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_m < lq
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, lq, QK_DIM, UPCAST)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dom, offs_dv, lq, V_DIM, UPCAST)
    row_base = (b * num_heads + h) * lq
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    qpos = _positions(offs_m, PermQ, lq, q_offset, HAS_PERM_Q)[:, None]
    if DROPOUT:
        drop_row = _dropout_row(drop_seed, b, h, qpos)
    else:
        drop_row = qpos  # unused
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    K_tile = K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    V_tile = V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :]
    step_k = BLOCK_N * stride_kn
    step_v = BLOCK_N * stride_vn
    inner = lk // BLOCK_N  # key blocks with no position past lk
    ragged_end = inner  # inner + 1 when a run reaches the ragged last block
    for part in tl.static_range(2):  # 0: the full runs, no mask; 1: the partial runs, `allowed` per pair
        first_run, last_run = _runs(qb, part, FullPtr, PartPtr)
        for r in range(first_run, last_run):
            start, end = _run_blocks(r, part, FullStart, FullEnd, PartStart, PartEnd)
            ragged_end = tl.maximum(ragged_end, end)
            for kb in range(start, tl.minimum(end, inner)):  # the key blocks of run r
                dq = _dq_block(
                    dq, q, do, lse, delta, qpos, drop_row, K_tile + kb * step_k, V_tile + kb * step_v, kb, b, h,
                    q_offset, lk, PermK, sm_scale, qk_scale, drop_threshold, drop_scale,{tables_call} offs_d, offs_dv,
                    part, BLOCK_N, HAS_PERM_K, HEAD_DIM, HEAD_DIM_V, QK_DIM, V_DIM, INPUT_PRECISION, SOFTCAP, UPCAST,
                    TENSOR_GRADS, DROPOUT,
                )
    for kb in range(inner, ragged_end):  # the ragged last key block: bounds and `allowed`
        dq = _dq_block(
            dq, q, do, lse, delta, qpos, drop_row, K_tile + kb * step_k, V_tile + kb * step_v, kb, b, h, q_offset, lk,
            PermK, sm_scale, qk_scale, drop_threshold, drop_scale,{tables_call} offs_d, offs_dv, 2, BLOCK_N, HAS_PERM_K,
            HEAD_DIM, HEAD_DIM_V, QK_DIM, V_DIM, INPUT_PRECISION, SOFTCAP, UPCAST, TENSOR_GRADS, DROPOUT,
        )
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :], dq,
             mask=row_ok[:, None] & (offs_d[None, :] < QK_DIM))
'''
