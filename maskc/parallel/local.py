"""Attention of one rank's query blocks against its KV buffer (own and received key blocks).

Exact and differentiable: query blocks are taken a few at a time, each batch
against only the buffer blocks the schedule says they visit, with the pattern's
mask and modifiers evaluated at the tokens' global positions (dense reference
attention on those tiles, runtime/reference.py).  A row with no allowed key
outputs 0 with finite gradients.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from maskc.dsl import evaluate
from maskc.runtime.cpu.layout import compute_dtype
from maskc.runtime.reference import reference_attention

from .plan import Plan

# Query tokens attended together (bounds the dense tiles' memory).
ROWS_PER_STEP = 512


def visited_pairs(plan: Plan, q_blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query block, key block) pairs visited by any head, for the listed query blocks, in
    the list's order (then by key block)."""
    position = np.full(plan.num_q_blocks, -1, dtype=np.int64)
    position[q_blocks] = np.arange(q_blocks.size)
    rows, cols = [], []
    for runs in plan.schedule.groups:
        r, c, _ = runs.blocks()
        r, c = r.numpy(), c.numpy()
        listed = position[r] >= 0
        rows.append(position[r[listed]])
        cols.append(c[listed])
    codes = np.unique(np.concatenate(rows) * plan.num_k_blocks + np.concatenate(cols))
    return q_blocks[codes // plan.num_k_blocks], codes % plan.num_k_blocks


def token_ranges(blocks: np.ndarray, start_of: np.ndarray, plan: Plan, length: int | None = None) -> np.ndarray:
    """Buffer indices of the tokens of key `blocks` (query blocks with `length=plan.lq`),
    whose tokens start at `start_of[block]`."""
    lengths = plan.block_lengths(blocks, plan.lk if length is None else length)
    first = np.repeat(start_of[blocks] - (np.cumsum(lengths) - lengths), lengths)
    return first + np.arange(int(lengths.sum()))


def _mask_and_mod(instance, tensors, qp: torch.Tensor, kp: torch.Tensor):
    """Allowed pairs [batch or 1, heads, n, m] and a score modifier, at absolute positions."""
    per_group = [evaluate.mask(p.mask, qp[:, None], kp[None, :], tensors) for p in instance.patterns]
    batch = max((m.shape[0] for m in per_group if m.dim() == 3), default=1)
    per_group = [m.expand(batch, *m.shape[-2:]) if m.dim() == 3 else m[None].expand(batch, *m.shape) for m in per_group]
    mask = torch.stack([per_group[g] for g in instance.head_group], dim=1)
    terms = [evaluate.modifier_terms(p.modifiers, qp[:, None], kp[None, :], tensors) for p in instance.patterns]
    if not any(terms):
        return mask, None

    def score_mod(logits: torch.Tensor) -> torch.Tensor:
        heads = []
        for h, g in enumerate(instance.head_group):
            t = [(kind, v.to(logits.device) if isinstance(v, torch.Tensor) else v) for kind, v in terms[g]]
            heads.append(evaluate.apply_terms(logits[:, h], t))
        return torch.stack(heads, dim=1)

    return mask, score_mod


def attend(plan: Plan, instance, tensors, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
           buffer_blocks: np.ndarray, scale: float | None, q_blocks: np.ndarray | None = None,
           only_buffer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out, lse) of the queries q [B, H, n, D] of `q_blocks` (default: rank `plan.rank`'s)
    against the buffer's keys and values [B, Hk, m, D], which hold the tokens of
    `buffer_blocks` (global key blocks) in order.  `only_buffer`: visited key blocks
    missing from the buffer are skipped (a piece of a split row), else they must be there."""
    q_blocks = plan.q_blocks(plan.rank) if q_blocks is None else np.asarray(q_blocks, dtype=np.int64)
    offset = instance.sizes.q_offset
    # where each key block's tokens start in the buffer
    lengths = plan.block_lengths(buffer_blocks, plan.lk)
    start_of = np.full(plan.num_k_blocks, -1, dtype=np.int64)
    start_of[buffer_blocks] = np.cumsum(lengths) - lengths
    q_lengths = plan.block_lengths(q_blocks, plan.lq)
    q_start = np.cumsum(q_lengths) - q_lengths
    local_index = np.full(plan.num_q_blocks, -1, dtype=np.int64)
    local_index[q_blocks] = np.arange(q_blocks.size)
    rows, cols = visited_pairs(plan, q_blocks)
    if only_buffer:
        rows, cols = rows[start_of[cols] >= 0], cols[start_of[cols] >= 0]
    assert (start_of[cols] >= 0).all(), "a visited key block is missing from the buffer"
    per_step = max(1, ROWS_PER_STEP // plan.block)
    step_of = local_index[rows] // per_step
    bounds = np.searchsorted(step_of, np.arange(0, -(-q_blocks.size // per_step) + 1))
    outs, lses = [], []
    dv = v_buf.shape[-1]
    for s in range(bounds.size - 1):
        first, last = s * per_step, min((s + 1) * per_step, q_blocks.size)
        t0, t1 = int(q_start[first]), int(q_start[last - 1] + q_lengths[last - 1])
        q_s = q[:, :, t0:t1]
        blocks = np.unique(cols[bounds[s] : bounds[s + 1]])
        if blocks.size == 0:
            keep = (q_s.sum() + k_buf.sum() + v_buf.sum()) * 0  # zeros that stay in the graph
            outs.append(q_s.new_zeros((*q_s.shape[:-1], dv)) + keep)
            lses.append(torch.full(q_s.shape[:-1], -math.inf, dtype=compute_dtype(q.dtype), device=q.device))
            continue
        index = torch.as_tensor(token_ranges(blocks, start_of, plan))
        qp = plan.block_tokens(q_blocks[first:last], plan.lq) + offset
        kp = plan.block_tokens(blocks, plan.lk)
        mask, score_mod = _mask_and_mod(instance, tensors, qp, kp)
        k_s, v_s = k_buf.index_select(2, index.to(k_buf.device)), v_buf.index_select(2, index.to(v_buf.device))
        out, lse = reference_attention(q_s, k_s, v_s, mask, score_mod, scale, return_lse=True)
        outs.append(out)
        lses.append(lse)
    if not outs:  # no query rows
        none = torch.zeros((1, 1, q.shape[2], 0), dtype=torch.bool)
        return reference_attention(q, k_buf[:, :, :0], v_buf[:, :, :0], none, None, scale, return_lse=True)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
