"""Content-dependent selections (`route`, `vertical_slash`) from shards of q and k.

Context parallelism splits the tokens over ranks.  Each rank calls these with
its own queries and keys (any subset, at the absolute positions given) and a
`Collective` joining the ranks; every rank gets the selection one process makes
on the whole q and k (`dsl.dynamic`), up to the rounding of sums taken in
another order.  What crosses ranks, per scorer:

- mean: each rank's share of the region means of q and k, one SUM all-reduce
  (counts follow from positions alone, as do the regions present); with fewer
  key regions than heads x dim, the k means first, then each rank's share of
  the logits (linear in the q means, heads summed when shared): fewer bytes,
  one more collective;
- max: q's region means (SUM) and K's region maxima (MAX): two all-reduces, as
  a sum is no max (an all-gather of both would be one collective but `world`
  times the bytes); logits instead of q means as for mean;
- minmax: K's region extrema (one MAX, the minimum as the max of its negation),
  then each rank's largest bounds of its queries against them (a second MAX:
  the bound needs the global extrema first);
- antidiagonal: the score of a query group sums products with every key group
  before its softmax, so it does not pool per region: K (inside the regions) is
  all-gathered, each rank scores the query groups it holds whole (a group cut
  by a shard border goes, gathered, to the rank holding its first position) and
  the per-region masses add up (SUM);
- vertical_slash: the last queries are all-gathered (small), each rank scores
  them against its keys; the softmax normalisers combine from each rank's row
  maxima and sums (one all-gather of [2, B, H, n]); then the per-key column sums
  (each from its owner) and the per-diagonal sums add up (SUM).

Routes with `scores = NAME` read a bound tensor, not q and k: nothing to share.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from . import ir, selection
from .dynamic import (
    choose,
    expand_kv_heads,
    in_regions,
    region_ids,
    route_heads,
    route_regions,
    vs_pick,
    vs_seen,
)


class Collective(Protocol):
    """The ranks' collectives (torch.distributed in context parallel; threads in tests)."""

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """x summed ("sum") or maximised ("max") elementwise over the ranks (same shape on every rank)."""
        ...

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x, in rank order (same shape and dtype on every rank)."""
        ...


def gather_rows(coll: Collective, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's `parts` concatenated along dim 0 in rank order.  Dim 0 may differ
    between ranks, the other dims and the dtype may not.  Two collectives whatever the
    parts: their row counts, then their bytes in one padded buffer."""
    device = parts[0].device
    counts = torch.tensor([p.shape[0] for p in parts], dtype=torch.int64, device=device)
    every = [c.tolist() for c in coll.all_gather(counts)]
    row_bytes = [math.prod(p.shape[1:]) * p.element_size() for p in parts]
    flat = [p.detach().contiguous().reshape(-1).view(torch.uint8) for p in parts]
    size = max(sum(c * b for c, b in zip(cs, row_bytes, strict=True)) for cs in every)
    buffer = torch.zeros(size, dtype=torch.uint8, device=device)
    mine = torch.cat(flat) if flat else buffer[:0]
    buffer[: mine.numel()] = mine
    out: list[list[torch.Tensor]] = [[] for _ in parts]
    for blob, cs in zip(coll.all_gather(buffer), every, strict=True):
        at = 0
        for i, (p, c, b) in enumerate(zip(parts, cs, row_bytes, strict=True)):
            out[i].append(blob[at : at + c * b].clone().view(p.dtype).view(c, *p.shape[1:]))
            at += c * b
    return [torch.cat(o) for o in out]


# ---------------------------------------------------------------- route


def route_selection(
    node: ir.Route,
    q: torch.Tensor,
    k: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    sizes: tuple[int, int, int],
    coll: Collective,
) -> torch.Tensor:
    """`dynamic.route_selection` of the whole q and k, from this rank's share: q
    [B, H, n, D] at absolute `q_positions`, k [B, Hk, m, D] at `k_positions`;
    `sizes` (lq, lk, q_offset) of the whole problem.  A collective call: every rank
    calls it for the same atoms in the same order."""
    lq, lk, q_offset = sizes
    device = q.device
    every_q = torch.arange(lq, device=device) + q_offset
    every_k = torch.arange(lk, device=device)
    nq = math.prod(c.size for c in node.query_regions)
    nk = math.prod(c.size for c in node.regions)
    _, _, all_rq, all_rk = route_regions(node, every_q, every_k)
    q_counts = torch.bincount(all_rq, minlength=nq)
    k_counts = torch.bincount(all_rk, minlength=nk)
    q_positions, k_positions = q_positions.to(device), k_positions.to(device)
    if node.score == "antidiagonal":
        logits = _antidiagonal(node, q, k, q_positions, k_positions, every_q, (nq, nk), coll)
        return choose(node, logits, q_counts > 0, k_counts > 0, normalised=True)
    q, k = route_heads(node, q, k)
    q_inside, k_inside, rq, rk = route_regions(node, q_positions, k_positions)
    q, k = q[:, :, q_inside], k[:, :, k_inside]
    b, h, _, d = q.shape
    if node.score == "minmax":
        extrema = torch.full((2, b, h, nk, d), -math.inf, dtype=q.dtype, device=device)
        index = rk[None, None, :, None].expand_as(k)
        extrema[0].scatter_reduce_(2, index, k, "amax")
        extrema[1].scatter_reduce_(2, index, -k, "amax")
        extrema = coll.all_reduce(extrema, "max").nan_to_num(neginf=0.0)  # regions without keys: 0
        # the bounds of the query regions this rank holds (numbered densely: a contiguous share
        # of whole regions takes minmax_bounds' reshape), maxima over the ranks
        held, local = torch.unique(rq, return_inverse=True)
        bounds = torch.full((b, h, nq, nk), -math.inf, dtype=q.dtype, device=device)
        bounds[:, :, held] = selection.minmax_bounds(q, local, held.numel(), extrema[0], -extrema[1])
        logits = coll.all_reduce(bounds, "max").nan_to_num(neginf=0.0)
    else:
        q_means = torch.zeros(b, h, nq, d, dtype=q.dtype, device=device).index_add_(2, rq, q)
        q_means = q_means / q_counts.clamp(min=1).to(q.dtype)[:, None]  # this rank's share of each mean
        if node.score == "max":
            k_pooled = torch.full((b, h, nk, d), -math.inf, dtype=k.dtype, device=device)
            k_pooled.scatter_reduce_(2, rk[None, None, :, None].expand_as(k), k, "amax")
        else:
            k_pooled = torch.zeros(b, h, nk, d, dtype=k.dtype, device=device).index_add_(2, rk, k)
            k_pooled = k_pooled / k_counts.clamp(min=1).to(k.dtype)[:, None]
        if nk < h * d:
            # Logits are linear in the query means: after the key side, each rank's share of the
            # logits (heads summed, as `choose` does) is fewer values than its share of the means.
            k_pooled = coll.all_reduce(k_pooled, "max" if node.score == "max" else "sum").nan_to_num(neginf=0.0)
            logits = coll.all_reduce((q_means @ k_pooled.transpose(-1, -2)).sum(1, keepdim=True), "sum")
        elif node.score == "max":
            q_means = coll.all_reduce(q_means, "sum")
            k_pooled = coll.all_reduce(k_pooled, "max").nan_to_num(neginf=0.0)
            logits = q_means @ k_pooled.transpose(-1, -2)
        else:
            both = coll.all_reduce(torch.cat([q_means, k_pooled], dim=2), "sum")
            logits = both[:, :, :nq] @ both[:, :, nq:].transpose(-1, -2)
    logits = logits * d**-0.5
    return choose(node, logits, q_counts > 0, k_counts > 0, normalised=False)


def _antidiagonal(
    node: ir.Route,
    q: torch.Tensor,
    k: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    every_q: torch.Tensor,
    sizes: tuple[int, int],
    coll: Collective,
) -> torch.Tensor:
    """XAttention's block masses [B, H, nq, nk] summed over the ranks (see the module docstring)."""
    heads, stride = q.shape[1], node.stride
    q, k = q.detach(), k.detach()
    if node.head is not None:  # only the route's own head and the key head it reads cross ranks
        kv_head = node.head // (heads // k.shape[1])
        q, k = q[:, node.head : node.head + 1], k[:, kv_head : kv_head + 1]
    k_inside = in_regions(k_positions, node.regions)
    q_inside = in_regions(q_positions, node.query_regions)
    q, q_positions = q[:, :, q_inside], q_positions[q_inside]
    # query groups (of `stride` positions) this rank holds only in part are gathered; each
    # is scored by the rank holding its first position
    every_q = every_q[in_regions(every_q, node.query_regions)]
    groups = every_q // stride
    count = int(groups.max()) + 1 if groups.numel() else 0
    whole = torch.bincount(groups, minlength=count)
    first = torch.zeros_like(whole).scatter_reduce_(0, groups, every_q, "amin", include_self=False)
    held = torch.bincount(q_positions // stride, minlength=count)
    send = ((held > 0) & (held < whole))[q_positions // stride]
    k_rows, k_pos, cut_rows, cut_pos = gather_rows(
        coll,
        [k[:, :, k_inside].permute(2, 0, 1, 3), k_positions[k_inside], q[:, :, send].permute(2, 0, 1, 3),
         q_positions[send]],
    )  # fmt: skip
    leads = torch.zeros(count, dtype=torch.bool, device=q.device)  # the groups whose first position is here
    leads[q_positions[q_positions == first[q_positions // stride]] // stride] = True
    take = leads[cut_pos // stride]
    q_rows = torch.cat([q[:, :, ~send].permute(2, 0, 1, 3), cut_rows[take]])
    q_pos = torch.cat([q_positions[~send], cut_pos[take]])
    k_all = k_rows.permute(1, 2, 0, 3)
    if node.head is None:
        k_all = expand_kv_heads(k_all, heads)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_all = q_rows.permute(1, 2, 0, 3).to(compute)
    rq = region_ids(q_pos, node.query_regions)
    rk = region_ids(k_pos, node.regions)
    mass = selection.antidiagonal_mass(q_all, k_all.to(compute), q_pos, k_pos, rq, rk, sizes, stride, node.causal)
    return coll.all_reduce(mass, "sum")


# ---------------------------------------------------------------- vertical_slash


def vertical_slash_selection(
    node: ir.VerticalSlash,
    q: torch.Tensor,
    k: torch.Tensor,
    q_tokens: torch.Tensor,
    k_tokens: torch.Tensor,
    sizes: tuple[int, int, int],
    coll: Collective,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dynamic.vertical_slash_selection` of the whole q and k, from this rank's share:
    q [B, H, n, D] at token indices `q_tokens` (0 .. lq - 1), k [B, Hk, m, D] at
    `k_tokens`; `sizes` (lq, lk, q_offset).  A collective call."""
    lq, lk, q_offset = sizes
    batch, heads, _, dim = q.shape
    device = q.device
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    n = min(node.last, lq)
    q, k = q.detach(), k.detach()
    q_tokens, k_tokens = q_tokens.to(device), k_tokens.to(device)
    scored = q_tokens >= lq - n
    (rows, row_tokens) = gather_rows(coll, [q[:, :, scored].permute(2, 0, 1, 3), q_tokens[scored]])
    last = torch.empty_like(rows).index_copy_(0, row_tokens - (lq - n), rows)  # in position order
    last = last.permute(1, 2, 0, 3).detach().to(compute)  # [B, H, n, D]
    kx = expand_kv_heads(k.detach().to(compute), heads)
    logits = torch.matmul(last, kx.transpose(2, 3)) / math.sqrt(dim)  # [B, H, n, m]
    q_pos = torch.arange(lq - n, lq, device=device) + q_offset
    seen = vs_seen(node, q_pos, k_tokens)  # [n, m]
    logits = logits.masked_fill(~seen, -math.inf)
    # softmax normalisers over every rank's keys: M = max of the maxima, S = sum of s_r exp(m_r - M)
    top = logits.amax(-1) if logits.shape[-1] else logits.new_full(logits.shape[:-1], -math.inf)
    safe = top.nan_to_num(neginf=0.0)
    local = torch.exp(logits - safe[..., None]).sum(-1)
    parts = torch.stack(coll.all_gather(torch.stack([top, local])))  # [world, 2, B, H, n]
    peak = parts[:, 0].amax(0)
    peak_safe = peak.nan_to_num(neginf=0.0)
    total = (parts[:, 1] * torch.exp(parts[:, 0] - peak_safe)).sum(0)
    probs = torch.exp(logits - peak_safe[..., None]) / total.clamp(min=torch.finfo(compute).tiny)[..., None]
    flat = batch * heads
    probs = probs.reshape(flat, n, k_tokens.numel())
    columns = torch.zeros(flat, lk, dtype=compute, device=device).index_add_(1, k_tokens, probs.sum(1))
    # diagonal table entry j: k - row = j - (n - 1), row i of the n scored queries
    diagonal = (k_tokens[None, :] + (n - 1) - torch.arange(n, device=device)[:, None]).reshape(-1)
    slash = torch.zeros(flat, lk + n - 1, dtype=compute, device=device)
    slash.index_add_(1, diagonal, probs.reshape(flat, diagonal.numel()))
    both = coll.all_reduce(torch.cat([columns, slash], dim=1), "sum")
    return vs_pick(node, both[:, :lk], both[:, lk:], lq, q_offset, (batch, heads))
