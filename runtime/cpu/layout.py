"""Data movement of the CPU executor: heads grouped by schedule, lengths padded to
whole blocks, a segment's rows and keys as views (strided when they can be), and
results written or added back."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn.functional import pad

from ..prepare import Prepared
from .plan import GroupPlan, Segment, group_plan
from .threads import scratch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the executor computes in: float32 for half and single types, else float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Group:
    """The heads of one schedule group, their kv heads and the group's plan."""

    index: int
    heads: list[int]
    head_index: torch.Tensor | None  # None: every head
    kv_index: torch.Tensor | None  # kv head of each head in the group; None: k's heads as they are
    plan: GroupPlan


def head_groups(prepared: Prepared, heads: int, kv_heads: int) -> list[Group]:
    """The schedule's groups that have heads (kv heads shared by `heads // kv_heads` each)."""
    rep = heads // kv_heads
    out = []
    for g in range(len(prepared.schedule.groups)):
        hs = prepared.group_heads(g)
        if not hs:
            continue
        every = hs == list(range(heads))
        kv = [h // rep for h in hs]
        out.append(
            Group(
                g,
                hs,
                None if every else torch.tensor(hs),
                None if kv == list(range(kv_heads)) else torch.tensor(kv),
                group_plan(prepared, g),
            )
        )
    return out


def pick_heads(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.head_index is None else x.index_select(1, group.head_index)


def pad_len(x: torch.Tensor, length: int, width: int | None = None) -> torch.Tensor:
    """Zero-pad dim 2 to `length` (and the last dim to `width`)."""
    extra = 0 if width is None else width - x.shape[-1]
    return x if x.shape[2] == length and extra == 0 else pad(x, (0, extra, 0, length - x.shape[2]))


def group_inputs(group: Group, q, k, v, prepared: Prepared, fused: bool = True):
    """Per group q [N, lq_pad, W], k [N, lk_pad, W], v [N, lk_pad, W] with N = batch *
    group heads, lengths padded to whole blocks.  The fused kernel needs one head dim:
    W = max(D, Dv), the narrower side padded with zeros (which changes no logit and
    no output column); the generic path keeps D and Dv."""
    bq, bk = prepared.block_q, prepared.block_k
    lq_pad = math.ceil(q.shape[2] / bq) * bq
    lk_pad = math.ceil(k.shape[2] / bk) * bk
    width = max(q.shape[-1], v.shape[-1]) if fused else None
    qg = q if group.head_index is None else q.index_select(1, group.head_index)
    kg = k if group.kv_index is None else k.index_select(1, group.kv_index)
    vg = v if group.kv_index is None else v.index_select(1, group.kv_index)
    qg = pad_len(qg, lq_pad, width).contiguous()
    kg = pad_len(kg, lk_pad, width).contiguous()
    vg = pad_len(vg, lk_pad, width).contiguous()
    n = q.shape[0] * qg.shape[1]
    return qg.view(n, lq_pad, -1), kg.view(n, lk_pad, -1), vg.view(n, lk_pad, -1)


def ungroup(x_groups, groups: list[Group], batch: int, heads: int, length: int, shape_tail, dtype):
    """Per-group [N, padded, ...] tensors -> [B, H, length, ...]."""
    if len(groups) == 1 and groups[0].head_index is None:
        x = x_groups[0]
        return x.reshape(batch, heads, -1, *shape_tail)[:, :, :length]
    out = torch.zeros(batch, heads, length, *shape_tail, dtype=dtype)
    for group, x in zip(groups, x_groups, strict=True):
        x = x.reshape(batch, len(group.heads), -1, *shape_tail)[:, :, :length]
        out[:, group.heads] = x
    return out


def reduce_kv(dk_groups, groups: list[Group], batch: int, kv_heads: int, length: int, dim: int, dtype):
    """Per-group key gradients [N, lk_pad, D] -> [B, Hk, lk, D] (summing GQA heads)."""
    if len(groups) == 1 and groups[0].kv_index is None:
        return dk_groups[0].reshape(batch, kv_heads, -1, dim)[:, :, :length]
    out = torch.zeros(batch, kv_heads, length, dim, dtype=dtype)
    for group, x in zip(groups, dk_groups, strict=True):
        x = x.reshape(batch, len(group.heads), -1, dim)[:, :, :length]
        index = group.kv_index if group.kv_index is not None else torch.arange(kv_heads)
        out.index_add_(1, index, x)
    return out


def segment_positions(prepared: Prepared, seg: Segment):
    """Absolute positions qp [m, bq], kp [m, nk] of a segment."""
    qp, _, kp, _ = prepared.block_positions(seg.rows, seg.cols.reshape(-1))
    return qp, kp.reshape(seg.m, -1)


def rows_view(x: torch.Tensor, seg: Segment, block: int) -> torch.Tensor:
    """x [N, rows * block, ...] -> the segment's rows [N, m, block, ...]."""
    n = x.shape[0]
    inner = x.shape[2:]
    blocks = x.view(n, -1, block, *inner)
    if seg.row_step is not None:
        start = int(seg.rows[0])
        if seg.row_step == 1:
            return blocks[:, start : start + seg.m]
        stride = list(blocks.stride())
        stride[1] *= seg.row_step
        return blocks.as_strided((n, seg.m, block, *inner), stride, blocks.storage_offset() + start * blocks.stride(1))
    return blocks.index_select(1, seg.rows)


def keys_view(x: torch.Tensor, seg: Segment, slot: int | None = None) -> torch.Tensor:
    """x [N, lk_padded, D] -> the segment's keys [N, m, nk, D] (a view when strided)."""
    n, _, d = x.shape
    bk = seg.block_k
    if seg.col_step is not None:
        start = int(seg.cols[0, 0]) * bk
        s = x.stride()
        strides = (s[0], seg.col_step * bk * s[1], s[1], s[2])
        return x.as_strided((n, seg.m, seg.nk, d), strides, x.storage_offset() + start * s[1])
    # whole blocks at a time: a few long copies instead of one short copy per token
    index = seg.cols.reshape(-1).long()
    if slot is None:
        blocks = x.view(n, -1, bk * d).index_select(1, index)
    else:
        buffer = scratch(slot, (n, index.numel(), bk * d), x.dtype)
        blocks = torch.index_select(x.view(n, -1, bk * d), 1, index, out=buffer)
    return blocks.view(n, seg.m, seg.nk, d)


def write_rows(acc: torch.Tensor, seg: Segment, value: torch.Tensor) -> None:
    if seg.row_step == 1:
        start = int(seg.rows[0])
        acc[:, start : start + seg.m] = value
    else:
        acc.index_copy_(1, seg.rows, value)


def add_rows(acc: torch.Tensor, seg: Segment, value: torch.Tensor) -> None:
    if seg.row_step == 1:
        start = int(seg.rows[0])
        acc[:, start : start + seg.m] += value
    else:
        acc.index_add_(1, seg.rows, value)


def add_keys(acc: torch.Tensor, seg: Segment, value: torch.Tensor) -> None:
    """acc [N, lk_padded, D] += value [N, m, nk, D] at the segment's key tokens."""
    n, m, _, d = value.shape
    if seg.col_step is not None and seg.col_step >= seg.cols.shape[1] and m > 1:
        # non-overlapping strided windows: a strided view receives the sum directly
        view = keys_view(acc, seg)
        view += value
        return
    bk = seg.block_k
    acc.view(n, -1, bk * d).index_add_(1, seg.cols.reshape(-1).long(), value.reshape(n, -1, bk * d))


def expand_rows(x: torch.Tensor, heads: int, n: int) -> torch.Tensor:
    """[1 or B, 1 or m, ...] -> broadcastable against [N = B * heads, m, ...]."""
    if x.shape[0] == 1 or heads == 1:
        return x
    return x[:, None].expand(-1, heads, *x.shape[1:]).reshape(n, *x.shape[1:])
