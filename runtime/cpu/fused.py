"""The CPU executor's fused path: each segment one call of PyTorch's fused CPU kernel.

Every segment of a head group's plan (runtime/cpu/plan.py) becomes one call of
``aten._scaled_dot_product_flash_attention_for_cpu`` (an online softmax that
returns the natural-log log-sum-exp) with the segment's additive mask: -inf off
the allowed pairs, plus the logits of modifiers that only add (alibi, bias,
polyline, decay); the partial results of a row are merged exactly through their
log-sum-exps.

The backward calls ``aten._scaled_dot_product_flash_attention_for_cpu_backward``
per segment with the *merged* output and log-sum-exp, which gives each
segment's exact share of dQ, dK, dV; dK and dV are scatter-added onto the key
tokens.  A gradient flowing into the returned log-sum-exp is added per segment.
`forward` and `backward_from_state` are the kernel pair that runtime/autograd.py
differentiates; `backward` starts from a saved (out, lse) instead.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.nn.functional import pad

from ..dropout import Dropout
from ..prepare import Prepared
from .layout import (
    Group,
    add_keys,
    add_rows,
    compute_dtype,
    expand_rows,
    group_inputs,
    head_groups,
    keys_view,
    pad_len,
    pick_heads,
    reduce_kv,
    rows_view,
    segment_positions,
    ungroup,
    write_rows,
)
from .plan import Segment
from .threads import chunks, intra_op_threads, run_calls

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _float_mask(prepared: Prepared, group: int, seg: Segment, dtype: torch.dtype, heads: int, batch: int):
    """Additive mask for the fused kernel: modifier logits on allowed pairs, -inf
    elsewhere; broadcastable to [batch * heads, m, bq, nk]; None when nothing to add."""
    key = (dtype, heads, batch)
    if key in seg.float_masks:
        return seg.float_masks[key]
    out = None
    if prepared.modifiers(group):
        qp, kp = segment_positions(prepared, seg)
        with torch.no_grad():
            zero = torch.zeros((), dtype=dtype)
            terms = prepared.apply_modifiers(group, zero, qp[:, :, None], kp[:, None, :]).to(dtype)
        terms = terms if terms.dim() == 4 else terms[None]
        if seg.allowed is not None:
            terms = terms.masked_fill(~seg.allowed, -math.inf)
        out = terms
    elif seg.allowed is not None:
        out = torch.zeros(seg.allowed.shape, dtype=dtype).masked_fill_(~seg.allowed, -math.inf)
    if out is not None and out.shape[0] > 1 and heads > 1:
        out = out[:, None].expand(-1, heads, -1, -1, -1).reshape(-1, *out.shape[1:])
    seg.float_masks[key] = out
    return out


def _merge(acc_out, acc_lse, seg: Segment, out, lse) -> None:
    """Fold one segment's (out, lse) into the accumulators at its rows."""
    if seg.fresh:
        write_rows(acc_out, seg, out)
        write_rows(acc_lse, seg, lse)
        return
    a_out = rows_view(acc_out.flatten(1, 2), seg, acc_out.shape[2])
    a_lse = rows_view(acc_lse.flatten(1, 2), seg, acc_lse.shape[2])
    new = torch.logaddexp(a_lse, lse)
    safe = torch.where(new == -math.inf, torch.zeros_like(new), new)
    merged = a_out * torch.exp(a_lse - safe)[..., None] + out * torch.exp(lse - safe)[..., None]
    write_rows(acc_out, seg, merged)
    write_rows(acc_lse, seg, new)


def _group_forward(prepared, group: Group, qg, kg, vg, scale: float, batch: int, threads: int):
    """(out [N, q_blocks, bq, Dv], lse [N, q_blocks, bq]) of one head group."""
    bq = prepared.block_q
    n, lq_pad, _ = qg.shape
    dv = vg.shape[-1]
    nqb = lq_pad // bq
    acc_out = torch.empty(n, nqb, bq, dv, dtype=qg.dtype)
    acc_lse = torch.empty(n, nqb, bq, dtype=qg.dtype)
    init = group.plan.init_rows
    if init.numel():
        acc_out[:, init] = 0
        acc_lse[:, init] = -math.inf
    heads = len(group.heads)

    def call(task):
        seg, mask = task[0], _mask_of(task)
        qs, ks, vs = rows_view(qg, seg, bq), keys_view(kg, seg, 0), keys_view(vg, seg, 1)
        out, lse = _FLASH(qs, ks, vs, 0.0, False, attn_mask=mask, scale=scale)
        if seg.any_key is not None:  # the kernel leaves lse = 0 on rows without keys
            lse = lse.masked_fill(~expand_rows(seg.any_key, heads, n), -math.inf)
        return out, lse

    for (seg, _), (out, lse) in run_calls(call, _tasks(prepared, group, qg, vg, batch, threads), threads, qg):
        _merge(acc_out, acc_lse, seg, out, lse)
    return acc_out, acc_lse


def _tasks(prepared, group: Group, qg, vg, batch: int, threads: int) -> list[tuple[Segment, object]]:
    """(segment piece, its additive mask or a function making it) for every fused call.

    Boolean masks are made once per segment and cached; masks carrying modifier
    logits are made piece by piece when the piece runs, so that memory stays
    bounded by a chunk rather than by every visited block."""
    heads = len(group.heads)
    width = qg.shape[0] * max(qg.shape[-1], vg.shape[-1])
    out = []
    for whole in group.plan.segments:
        if prepared.modifiers(group.index):
            # Modifier logits are built through int64 coordinate temporaries: smaller pieces.
            for a, b in chunks(whole, 4 * max(width, batch * heads * whole.block_q), threads):
                piece = whole.slice(a, b)
                out.append(
                    (piece, functools.partial(_float_mask, prepared, group.index, piece, qg.dtype, heads, batch))
                )
            continue
        mask_whole = _float_mask(prepared, group.index, whole, qg.dtype, heads, batch)
        for a, b in chunks(whole, width, threads):
            out.append((whole.slice(a, b), _slice_mask(mask_whole, a, b, whole.m)))
    return out


def _mask_of(task) -> torch.Tensor | None:
    mask = task[1]
    return mask() if callable(mask) else mask


def _slice_mask(mask, a: int, b: int, m: int):
    if mask is None or mask.shape[1] == 1 or (a == 0 and b == m):
        return mask
    return mask[:, a:b]


def _group_backward(prepared, group: Group, qg, kg, vg, out, lse, gout, glse, scale, batch, threads):
    bq = prepared.block_q
    n = qg.shape[0]
    dq = torch.empty_like(qg).view(n, -1, bq, qg.shape[-1])
    if group.plan.init_rows.numel():
        dq[:, group.plan.init_rows] = 0
    dk = torch.zeros_like(kg)
    dv = torch.zeros_like(vg)
    lse_bwd = torch.where(lse == -math.inf, torch.full_like(lse, math.inf), lse)  # P = 0 on rows without keys
    out_rows = out.flatten(1, 2)
    gout_rows = gout.flatten(1, 2)
    lse_rows = lse_bwd.flatten(1, 2)
    glse_rows = None if glse is None else glse.flatten(1, 2)

    def call(task):
        seg, mask = task[0], _mask_of(task)
        qs, ks, vs = rows_view(qg, seg, bq), keys_view(kg, seg, 0), keys_view(vg, seg, 1)
        ls = rows_view(lse_rows, seg, bq)
        gos, outs = rows_view(gout_rows, seg, bq), rows_view(out_rows, seg, bq)
        dqs, dks, dvs = _FLASH_BWD(gos, qs, ks, vs, outs, ls, 0.0, False, attn_mask=mask, scale=scale)
        if glse_rows is not None:
            # d lse / d logits = P: dS += P * glse
            logits = torch.matmul(qs, ks.transpose(-1, -2)) * scale
            if mask is not None:
                logits = logits + mask
            ds = torch.exp(logits - ls[..., None]) * rows_view(glse_rows, seg, bq)[..., None]
            dqs = dqs + torch.matmul(ds, ks) * scale
            dks = dks + torch.matmul(ds.transpose(-1, -2), qs) * scale
        return dqs, dks, dvs

    tasks = _tasks(prepared, group, qg, vg, batch, threads)
    for (seg, _), (dqs, dks, dvs) in run_calls(call, tasks, threads, qg):
        if seg.fresh:
            write_rows(dq, seg, dqs)
        else:
            add_rows(dq, seg, dqs)
        add_keys(dk, seg, dks)
        add_keys(dv, seg, dvs)
    return dq.view(n, -1, qg.shape[-1]), dk, dv


def forward(q, k, v, prepared: Prepared, scale: float, dropout: Dropout | None = None):
    """(out, lse, state): state holds the head groups and their (out, lse) in compute
    dtype and block layout, for `backward_from_state`.  No dropout on this path."""
    if dropout is not None:
        raise ValueError("the fused CPU path has no dropout: dropout runs the generic path")
    threads = torch.get_num_threads()
    with intra_op_threads(1):
        compute = compute_dtype(q.dtype)
        batch, heads, lq, _ = q.shape
        qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
        groups = head_groups(prepared, heads, k.shape[1])
        results = []
        for group in groups:
            qg, kg, vg = group_inputs(group, qc, kc, vc, prepared)
            results.append(_group_forward(prepared, group, qg, kg, vg, scale, batch, threads))
        dv = v.shape[-1]
        out = ungroup([r[0][..., :dv] for r in results], groups, batch, heads, lq, (dv,), compute).to(q.dtype)
        lse = ungroup([r[1] for r in results], groups, batch, heads, lq, (), compute)
    return out, lse, (groups, results)


def _backward_groups(q, k, v, prepared: Prepared, scale: float, groups, results, gout, glse):
    """dq, dk, dv from per-group (out, lse) as `forward` leaves them."""
    threads = torch.get_num_threads()
    with intra_op_threads(1):
        batch, heads, lq, d = q.shape
        kv_heads, lk, dvdim = k.shape[1], k.shape[2], v.shape[3]
        compute = compute_dtype(q.dtype)
        bq = prepared.block_q
        qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
        gout = torch.zeros(batch, heads, lq, dvdim, dtype=compute) if gout is None else gout.to(compute)
        if glse is not None:
            glse = glse.to(compute)
            if not bool(glse.any()):
                glse = None
        dqs, dks, dvs = [], [], []
        for group, (out, lse) in zip(groups, results, strict=True):
            qg, kg, vg = group_inputs(group, qc, kc, vc, prepared)
            go = pad_len(pick_heads(gout, group), qg.shape[1], qg.shape[-1]).reshape(qg.shape[0], -1, bq, qg.shape[-1])
            gl = None
            if glse is not None:
                gl = pick_heads(glse, group)
                gl = pad(gl, (0, qg.shape[1] - lq)).reshape(qg.shape[0], -1, bq)
            dq, dk, dv = _group_backward(prepared, group, qg, kg, vg, out, lse, go, gl, scale, batch, threads)
            dqs.append(dq[..., :d])
            dks.append(dk[..., :d])
            dvs.append(dv[..., :dvdim])
        dq = ungroup(dqs, groups, batch, heads, lq, (d,), compute).to(q.dtype)
        dk = reduce_kv(dks, groups, batch, kv_heads, lk, d, compute).to(k.dtype)
        dv = reduce_kv(dvs, groups, batch, kv_heads, lk, dvdim, compute).to(v.dtype)
    return dq, dk, dv


def backward_from_state(q, k, v, out, lse, dout, dlse, prepared: Prepared, scale: float, dropout, state):
    """dq, dk, dv from `forward`'s state, which holds its out and lse per head group."""
    groups, results = state
    return _backward_groups(q, k, v, prepared, scale, groups, results, dout, dlse)


def backward(q, k, v, out, lse, dout, dlse, prepared: Prepared, scale: float):
    """Gradients (dq, dk, dv) from a forward's (out, lse), without recomputing it
    (execution order, like `cpu_attention`; modifier tensors get no gradient here)."""
    compute = compute_dtype(q.dtype)
    groups = head_groups(prepared, q.shape[1], k.shape[1])
    bq = prepared.block_q
    lq_pad = math.ceil(q.shape[2] / bq) * bq
    results = []
    for group in groups:
        o = pad_len(pick_heads(out.to(compute), group), lq_pad, max(q.shape[-1], v.shape[-1]))
        lg = pad(pick_heads(lse.to(compute), group), (0, lq_pad - q.shape[2]), value=-math.inf)
        n = o.shape[0] * o.shape[1]
        results.append((o.reshape(n, -1, bq, o.shape[-1]), lg.reshape(n, -1, bq)))
    return _backward_groups(q, k, v, prepared, scale, groups, results, dout, dlse)
