"""Exact softmax over partial results: the log-sum-exp merge.

A row's attention computed in pieces (over key chunks, or over the clusters a
query belongs to) is recovered exactly from each piece's output and
log-sum-exp: weights exp(lse_i - max) normalised over the row's pieces.
Differentiable; rows without any piece (or whose pieces saw no key) get output
0 and log-sum-exp -inf, with finite gradients.
"""

from __future__ import annotations

import math

import torch


def merge_partials(out: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, length: int):
    """out [N, P, Dv] and lse [N, P] of P pieces, piece p belonging to row rows[.., p]
    (rows [P] shared by all N, or [N, P]) -> (out [N, length, Dv], lse [N, length])."""
    n, _, dv = out.shape
    rows = rows.expand(n, -1)
    top = torch.full((n, length), -math.inf, dtype=lse.dtype, device=lse.device)
    top = top.scatter_reduce(1, rows, lse.detach(), "amax", include_self=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weight = torch.exp(lse - torch.gather(top, 1, rows))  # 0 for pieces without keys
    total = torch.zeros(n, length, dtype=lse.dtype, device=lse.device).scatter_add(1, rows, weight)
    num = torch.zeros(n, length, dv, dtype=out.dtype, device=out.device)
    num = num.scatter_add(1, rows[..., None].expand(-1, -1, dv), weight[..., None] * out)
    some = total > 0
    safe = torch.where(some, total, torch.ones_like(total))
    merged_lse = torch.where(some, torch.log(safe) + top, torch.full_like(total, -math.inf))
    return num / safe[..., None], merged_lse


def merge_pair(o1, s1, o2, s2):
    """`merge_partials` for two pieces of the same rows, in five tensor calls (a decode
    step's hot path): exact softmax over two key sets from their outputs and log-sum-exps (a row
    without keys in either has output 0 and log-sum-exp -inf)."""
    lse = torch.logaddexp(s1, s2)
    w1 = torch.exp(s1 - lse).nan_to_num_(0.0)  # nan only where both are -inf, whose outputs are 0
    return torch.lerp(o2, o1, w1[..., None]), lse
