"""The CPU executor's generic path: the same segments with differentiable torch ops.

Softcap (not additive), modifier tensors that need a gradient, and attention
dropout run here: scores of the visited blocks only, computed chunk by chunk,
and autograd does the backward.  Dropout multiplies each visited block's
probabilities by the keep mask of runtime/dropout.py, scaled by 1 / (1 - p).
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ..dropout import Dropout, keep_mask
from ..merge import merge_partials
from ..prepare import Prepared
from .layout import (
    compute_dtype,
    expand_rows,
    group_inputs,
    head_groups,
    keys_view,
    rows_view,
    segment_positions,
    ungroup,
)
from .threads import chunks


def attention(q, k, v, prepared: Prepared, scale: float, dropout: Dropout | None = None):
    """The same segments with differentiable torch ops, for softcap, for modifier
    tensors that need gradients, and for dropout.

    Each chunk of rows computes its own partial softmax (output and log-sum-exp)
    under non-reentrant checkpointing, so its scores are recomputed in the backward
    instead of kept: memory stays bounded by one chunk, not by every visited block.
    The partials of a row are merged exactly through their log-sum-exps."""
    compute = compute_dtype(q.dtype)
    batch, heads, lq, _ = q.shape
    kv_heads = k.shape[1]
    bq = prepared.block_q
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    groups = head_groups(prepared, heads, kv_heads)
    outs, lses = [], []
    for group in groups:
        qg, kg, vg = group_inputs(group, qc, kc, vc, prepared, fused=False)
        n, lq_pad, _ = qg.shape
        hg = len(group.heads)
        # dropout's (batch, head) per row of the group's [N = batch * hg] layout
        drop = None if dropout is None else (dropout, _batch_heads(batch, group.heads))
        rows_out, rows_lse, rows_index = [], [], []
        for whole in group.plan.segments:
            for a, b in chunks(whole, 4 * qg.shape[0] * max(qg.shape[-1], vg.shape[-1], bq)):
                seg = whole.slice(a, b)
                out_c, lse_c = checkpoint(
                    _chunk, prepared, group.index, seg, qg, kg, vg, scale, batch, hg, n, drop,
                    use_reentrant=False,
                )  # fmt: skip
                token_rows = (seg.rows[:, None] * bq + torch.arange(bq)[None, :]).reshape(-1)
                rows_out.append(out_c.reshape(n, -1, out_c.shape[-1]))
                rows_lse.append(lse_c.reshape(n, -1))
                rows_index.append(token_rows)
        if not rows_out:  # the group visits no block: one empty piece keeps the graph connected
            empty_out, empty_lse = _empty_piece(qg, kg, vg)
            rows_out, rows_lse, rows_index = [empty_out], [empty_lse], [torch.zeros(0, dtype=torch.long)]
        out, lse = merge_partials(torch.cat(rows_out, 1), torch.cat(rows_lse, 1), torch.cat(rows_index), lq_pad)
        outs.append(out.view(n, lq_pad // bq, bq, -1))
        lses.append(lse.view(n, lq_pad // bq, bq))
    dv = v.shape[-1]
    out = ungroup(outs, groups, batch, heads, lq, (dv,), compute).to(q.dtype)
    lse = ungroup(lses, groups, batch, heads, lq, (), compute)
    return out, lse


def _empty_piece(qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A partial result of no rows, (out [N, 0, Dv], lse [N, 0]), computed from the inputs
    so that rows output 0 with zero (not missing) gradients when a group visits no block."""
    logits = torch.matmul(qg[:, :0], kg[:, :1].transpose(-1, -2))  # [N, 0, 1]
    return torch.matmul(logits, vg[:, :1]), logits[..., 0]


def _batch_heads(batch: int, heads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, head index) [N, 1, 1, 1] of each row of a group's N = batch * len(heads)."""
    b = torch.arange(batch).repeat_interleave(len(heads))
    h = torch.tensor(heads).repeat(batch)
    return b.view(-1, 1, 1, 1), h.view(-1, 1, 1, 1)


def _chunk(prepared, group: int, seg, qg, kg, vg, scale, batch, hg, n, drop=None):
    """Partial softmax of a chunk: (out [N, m, bq, Dv], lse [N, m, bq]), -inf where a
    row has no allowed key in the chunk.  `drop`: (Dropout, (b, h) per row) or None;
    the log-sum-exp stays that of the undropped softmax."""
    bq = prepared.block_q
    qs, ks, vs = rows_view(qg, seg, bq), keys_view(kg, seg), keys_view(vg, seg)
    logits = torch.matmul(qs, ks.transpose(-1, -2)) * scale  # [N, m, bq, nk]
    if prepared.modifiers(group):
        qp, kp = segment_positions(prepared, seg)
        # scores as [B, m, Hg, bq, nk] so per-batch modifier terms [B, m, 1, bq, nk] line up
        s5 = logits.view(batch, hg, *logits.shape[1:]).transpose(1, 2)
        s5 = prepared.apply_modifiers(group, s5, qp[:, None, :, None], kp[:, None, None, :])
        logits = s5.transpose(1, 2).reshape(logits.shape)
    if seg.allowed is not None:
        logits = logits.masked_fill(~expand_rows(seg.allowed, hg, n), -math.inf)
    lse = torch.logsumexp(logits, -1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(logits - safe[..., None])
    if drop is not None:
        dropout, (b, h) = drop
        qp, kp = segment_positions(prepared, seg)
        keep = keep_mask(dropout, b, h, qp[:, :, None], kp[:, None, :])  # [N, m, bq, nk]
        probs = probs * (keep * dropout.scale).to(probs.dtype)
    out = torch.matmul(probs, vs)
    return out, lse
