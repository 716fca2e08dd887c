"""Content-dependent selections (`route`, `vertical_slash`) from shards of q and k.

Context parallelism splits the tokens over ranks.  Each rank calls these with
its own queries and keys (any subset, at the absolute positions given) and a
`Collective` joining the ranks; every rank gets the selection one process makes
on the whole q and k (`dsl.dynamic`), up to the rounding of sums taken in
another order.

`route` selects each query region's row of key regions independently, so a
rank selects the rows of the query regions it holds whole, and the ranks add
up their rows as bits (one SUM all-reduce of a byte per 8 key regions) rather
than the [B, H, query regions, key regions] scores.  A region cut between ranks
(a few at shard borders) has its scores reduced over the ranks first; every
rank then selects it alike.  What crosses ranks before that, per scorer:

- mean: each rank's share of the key regions' means (SUM, with the flags of the
  cut regions riding along); logits are linear in the query means, so a cut
  row adds up the ranks' shares of its logits;
- max: the key regions' elementwise maxima (MAX), then as for mean;
- minmax: the key regions' extrema (MAX, the minimum as the max of the
  negation); a cut row takes the max of the ranks' bounds;
- antidiagonal: a query group's score sums products with every key group
  before its softmax, so it does not pool per region: K (inside the regions)
  is all-gathered, each rank scores the query groups it holds whole (a group
  cut by a shard border goes, gathered, to the rank holding its first
  position); a cut row adds up the ranks' masses;
- vertical_slash: the last queries are all-gathered (small), each rank scores
  them against its keys; the softmax normalisers combine from each rank's row
  maxima and sums (one all-gather of [2, B, H, n]); then the per-key column sums
  (each from its owner) and the per-diagonal sums add up (SUM).

Routes with `scores = NAME` read a bound tensor, not q and k: nothing to share.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

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
    counts = (torch.bincount(all_rq, minlength=nq), torch.bincount(all_rk, minlength=nk))
    q_positions, k_positions = q_positions.to(device), k_positions.to(device)
    if node.score == "antidiagonal":
        mass, scored = _antidiagonal(node, q, k, q_positions, k_positions, every_q, (nq, nk), coll)
        rows = _rows(scored, counts[0])
        cut = coll.all_reduce(rows.partial.to(mass.dtype), "max") > 0
        mass = _cut_rows(coll, mass, cut, "sum")
        return _share_rows(node, mass, rows.whole, cut, counts, coll, normalised=True)
    q, k = route_heads(node, q, k)
    q_inside, k_inside, rq, rk = route_regions(node, q_positions, k_positions)
    q, k = q[:, :, q_inside], k[:, :, k_inside]
    b, h, _, d = q.shape
    rows = _rows(rq, counts[0])
    index = rk[None, None, :, None].expand_as(k)
    if node.score == "minmax":  # elementwise extrema, the minimum as the max of the negation
        keys = torch.full((2, b, h, nk, d), -math.inf, dtype=k.dtype, device=device)
        keys[0].scatter_reduce_(2, index, k, "amax")
        keys[1].scatter_reduce_(2, index, -k, "amax")
    elif node.score == "max":
        keys = torch.full((b, h, nk, d), -math.inf, dtype=k.dtype, device=device).scatter_reduce_(2, index, k, "amax")
    else:  # this rank's share of each key region's mean
        keys = torch.zeros(b, h, nk, d, dtype=k.dtype, device=device).index_add_(2, rk, k)
        keys = keys / counts[1].clamp(min=1).to(k.dtype)[:, None]
    op = "sum" if node.score == "mean" else "max"
    keys, cut = _with_flags(coll, keys, rows.partial, op)
    keys = keys.nan_to_num(neginf=0.0)  # regions without keys: 0, as one process pools them
    if node.score == "minmax":
        # bounds of the query regions this rank holds (numbered densely: a contiguous share of
        # whole regions takes minmax_bounds' reshape); a region cut between ranks: their max
        held, local = torch.unique(rq, return_inverse=True)
        logits = torch.full((b, h, nq, nk), -math.inf, dtype=q.dtype, device=device)
        logits[:, :, held] = selection.minmax_bounds(q, local, held.numel(), keys[0], -keys[1])
        logits = _cut_rows(coll, logits, cut, "max").nan_to_num(neginf=0.0)
    else:  # logits are linear in the query means: a region cut between ranks adds up their shares
        held = torch.unique(rq)
        q_means = torch.zeros(b, h, nq, d, dtype=q.dtype, device=device).index_add_(2, rq, q)[:, :, held]
        q_means = q_means / counts[0][held].clamp(min=1).to(q.dtype)[:, None]
        logits = torch.zeros(b, h, nq, nk, dtype=q.dtype, device=device)
        logits[:, :, held] = q_means @ keys.transpose(-1, -2)
        logits = _cut_rows(coll, logits, cut, "sum")
    return _share_rows(node, logits * d**-0.5, rows.whole, cut, counts, coll, normalised=False)


class _Rows(NamedTuple):
    whole: torch.Tensor  # bool [nq]: query regions whose every query is on this rank
    partial: torch.Tensor  # bool [nq]: regions this rank holds some, not all, queries of


def _rows(rq: torch.Tensor, q_counts: torch.Tensor) -> _Rows:
    """Which query regions (rows of the selection) this rank holds whole or in part, from
    the regions `rq` of the queries it scores and each region's count over all ranks."""
    held = torch.bincount(rq, minlength=q_counts.numel())
    return _Rows((held == q_counts) & (q_counts > 0), (held > 0) & (held < q_counts))


def _with_flags(coll: Collective, x: torch.Tensor, flags: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x reduced over the ranks with `op`, and the regions some rank flags (cut between
    ranks), in one all-reduce: the flags ride along as 0 / 1 (a sum or max of them > 0)."""
    both = coll.all_reduce(torch.cat([x.reshape(-1), flags.to(x.dtype)]), op)
    return both[: x.numel()].view(x.shape), both[x.numel() :] > 0


def _cut_rows(coll: Collective, stats: torch.Tensor, cut: torch.Tensor, op: str) -> torch.Tensor:
    """stats [B, h, nq, nk] with the rows of regions cut between ranks reduced over them (the
    same on every rank); other rows as this rank has them.  No collective when none is cut."""
    if bool(cut.any()):
        stats = stats.clone()
        stats[:, :, cut] = coll.all_reduce(stats[:, :, cut].contiguous(), op)
    return stats


def _share_rows(
    node: ir.Route,
    logits: torch.Tensor,
    whole: torch.Tensor,
    cut: torch.Tensor,
    counts: tuple[torch.Tensor, torch.Tensor],
    coll: Collective,
    normalised: bool,
) -> torch.Tensor:
    """The selection [B, 1, nq, nk] of every rank's rows.  Rows are selected independently,
    so each rank selects only the rows it holds whole and the cut rows (complete after
    `_cut_rows`, the same everywhere), and the ranks add up their rows as bits (one
    byte per 8 key regions, one SUM all-reduce of disjoint bits) rather than the logits."""
    rows = torch.nonzero(whole | cut).flatten()
    selected = torch.zeros(logits.shape[0], *logits.shape[2:], dtype=torch.bool, device=logits.device)
    selected[:, rows] = choose(node, logits[:, :, rows], counts[0] > 0, counts[1] > 0, normalised, rows)[:, 0]
    nk = selected.shape[-1]
    mine = selected & whole[:, None]
    padded = torch.zeros(*mine.shape[:-1], -(-nk // 8) * 8, dtype=torch.uint8, device=mine.device)
    padded[..., :nk] = mine
    weights = 2 ** torch.arange(8, dtype=torch.uint8, device=mine.device)
    packed = (padded.unflatten(-1, (-1, 8)) * weights).sum(-1, dtype=torch.uint8)
    total = coll.all_reduce(packed, "sum")
    bits = (total[..., None] >> torch.arange(8, dtype=torch.uint8, device=mine.device)) & 1
    return (bits.flatten(-2)[..., :nk].bool() | (selected & cut[:, None]))[:, None]


def _antidiagonal(
    node: ir.Route,
    q: torch.Tensor,
    k: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    every_q: torch.Tensor,
    sizes: tuple[int, int],
    coll: Collective,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of XAttention's block masses [B, H, nq, nk] (the query groups it
    scores; see the module docstring), and the regions of the queries it scored."""
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
    return mass, rq


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
