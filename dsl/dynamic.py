"""Content-dependent selections: which regions `route` keeps, which tokens each
`cluster` holds.  The dense evaluator and the runtime schedules both call these,
so the compiled kernels and the reference agree by construction."""

from __future__ import annotations

import math

import torch

from . import ir


def _regions(positions: torch.Tensor, regions: tuple[ir.Coord, ...]) -> list[torch.Tensor]:
    from . import expr, semantics  # semantics reads BITS_PER_WORD from here

    index, within = semantics.region(expr.Var("p"), regions)
    return expr.run((index, within), expr.Env({"p": positions}))


def region_ids(positions: torch.Tensor, regions: tuple[ir.Coord, ...]) -> torch.Tensor:
    """Row-major region index of each absolute position (meaningful where `in_regions`;
    `semantics.region` defines regions)."""
    ids = _regions(positions, regions)[0]
    return ids if isinstance(ids, torch.Tensor) else torch.full_like(positions, ids)


def in_regions(positions: torch.Tensor, regions: tuple[ir.Coord, ...]) -> torch.Tensor:
    """Whether each position lies in a region.  Regions tile the keys' positions;
    a query outside them (before the first key, or past the last region when
    lq > lk) belongs to no region and so attends no key."""
    inside = _regions(positions, regions)[1]
    return inside if isinstance(inside, torch.Tensor) else torch.full_like(positions, inside, dtype=torch.bool)


def expand_kv_heads(k: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat grouped key/value heads to the query head count (GQA)."""
    if k.shape[1] == heads:
        return k
    return k.repeat_interleave(heads // k.shape[1], dim=1)


def route_selection(
    node: ir.Route,
    q: torch.Tensor,
    k: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
) -> torch.Tensor:
    """Selected key regions per query region: bool [batch, 1 or heads, regions, regions].

    q [B, H, lq, D], k [B, Hk, lk, D].  Region queries/keys are means over the
    tokens present; scores are q_r . k_r summed over heads when shared (the
    full-dimension affinity of BiFormer).  Ties go to the lower region index.
    """
    return route_choose(node, *route_sums(node, q, k, q_positions, k_positions))


def route_sums(
    node: ir.Route, q: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What routing pools, as sums that add up over any split of the tokens (context
    parallel ranks sum theirs): (q sums [B, h, regions, D], q counts [regions],
    k sums, k counts), h = 1 for a per-head route, in the compute dtype."""
    n = math.prod(c.size for c in node.regions)
    k = expand_kv_heads(k, q.shape[1])
    if node.head is not None:
        q, k = q[:, node.head : node.head + 1], k[:, node.head : node.head + 1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.detach().to(compute), k.detach().to(compute)
    q_positions, k_positions = q_positions.to(q.device), k_positions.to(q.device)
    q_inside, k_inside = in_regions(q_positions, node.regions), in_regions(k_positions, node.regions)
    rq = region_ids(q_positions[q_inside], node.regions)
    rk = region_ids(k_positions[k_inside], node.regions)
    return (*_region_sums(q[:, :, q_inside], rq, n), *_region_sums(k[:, :, k_inside], rk, n))


def route_choose(
    node: ir.Route, q_sums: torch.Tensor, q_counts: torch.Tensor, k_sums: torch.Tensor, k_counts: torch.Tensor
) -> torch.Tensor:
    """`route_selection` from the pooled sums of `route_sums`."""
    n = k_counts.numel()
    pooled_q = q_sums / q_counts.clamp(min=1)[None, None, :, None]
    pooled_k = k_sums / k_counts.clamp(min=1)[None, None, :, None]
    device = pooled_q.device
    scores = torch.einsum("bhrd,bhsd->brs", pooled_q, pooled_k)  # sum over heads
    present = k_counts > 0
    scores = scores.masked_fill(~present[None, None, :], -math.inf)
    ids = torch.arange(n, device=device)
    if node.causal:
        scores = scores.masked_fill(ids[None, None, :] > ids[None, :, None], -math.inf)
    if node.own:
        scores = scores.masked_fill((ids[None, :] == ids[:, None])[None] & present[None, None, :], math.inf)
    # Stable descending order: equal scores keep the lower region first.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : node.topk]
    picked = torch.gather(scores, -1, order) > -math.inf
    selected = torch.zeros(scores.shape, dtype=torch.bool, device=device)
    selected.scatter_(-1, order, picked)
    return selected[:, None]


def _region_sums(x: torch.Tensor, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, _, d = x.shape
    sums = torch.zeros(b, h, n, d, dtype=x.dtype, device=x.device)
    sums.index_add_(2, ids, x)
    return sums, torch.bincount(ids, minlength=n).to(x.dtype)


def cluster_indices(x: torch.Tensor, centroids: torch.Tensor, size: int) -> torch.Tensor:
    """Each cluster's `size` nearest tokens by cosine similarity, as positions in
    ascending order: long [B, n, min(size, L)].

    x [B, L, D] for one head, centroids [n, D].  Ties go to the lower position.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = torch.nn.functional.normalize(x.detach().to(compute), dim=-1)
    mu = torch.nn.functional.normalize(centroids.detach().to(compute), dim=-1)
    sims = torch.einsum("bld,nd->bnl", x, mu)
    take = min(size, x.shape[1])
    # The take-th largest similarity is the threshold; among tokens equal to it the
    # lowest positions are taken first.  Linear time, unlike a full sort.
    threshold = torch.topk(sims, take, dim=-1).values[..., -1:]
    above = sims > threshold
    tied = sims == threshold
    room = take - above.sum(-1, keepdim=True)
    chosen = above | (tied & (torch.cumsum(tied, -1) <= room))
    positions = chosen.nonzero()[:, -1]  # row-major: ascending within each cluster
    return positions.view(*sims.shape[:-1], take)


def cluster_members(index: torch.Tensor, length: int) -> torch.Tensor:
    """Clusters from `cluster_indices` as a table: bool [B, n, length]."""
    members = torch.zeros(*index.shape[:2], length, dtype=torch.bool, device=index.device)
    return members.scatter_(-1, index, True)


# Clusters per int64 membership word (the sign bit stays clear).
BITS_PER_WORD = 63


def membership_bits(members: torch.Tensor) -> torch.Tensor:
    """[B, n, L] bool -> [B, words, L] int64: bit c % 63 of word c // 63 set when
    the token is in cluster c.  Two tokens share a cluster when any word has a
    common bit, without a dense L x L table."""
    b, n, length = members.shape
    words = -(-n // BITS_PER_WORD)
    clusters = torch.arange(n, device=members.device)
    shifted = members.to(torch.int64) << (clusters % BITS_PER_WORD)[None, :, None]  # distinct bits: sum = or
    out = torch.zeros(b, words, length, dtype=torch.int64, device=members.device)
    return out.index_add_(1, clusters // BITS_PER_WORD, shifted)
