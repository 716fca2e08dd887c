"""How `route` scores key regions and selects them (docs/language.md §8.4).

Scorers give block logits [batch, heads, query regions, key regions]:

- mean: mean-pooled q . mean-pooled k (BiFormer, MoBA);
- max: mean-pooled q . elementwise max of K over the region (SeerAttention's
  K max-pooling, without its learned projection);
- minmax: per query, sum_d max(q_d max_d, q_d min_d) over the region's
  elementwise K extrema (Quest's upper bound of any q . k in the region), then
  the largest bound over the region's queries;
- antidiagonal: XAttention's strided estimate, already a probability mass.

Selectors read the order (forced regions first by index, then decreasing logit,
ties to the lower index) and the probabilities P (softmax of the logits, times
dim^-0.5 for the q . k scorers, over the eligible key regions; the antidiagonal
masses normalised to sum to 1).  Everything here is deterministic and detached:
the selection is not differentiable.
"""

from __future__ import annotations

import math

import torch

from . import ir

_CHUNK = 2048  # query rows scored at a time by "minmax": bounds memory at long lengths
_SCORES_PER_CHUNK = 1 << 24  # antidiagonal logits held at once (64 MB in float32)


def region_reduce(x: torch.Tensor, ids: torch.Tensor, n: int, how: str) -> torch.Tensor:
    """x [B, H, tokens, D] reduced over each region's tokens ("mean", "amax", "amin"):
    [B, H, n, D] (regions without tokens hold 0)."""
    b, h, _, d = x.shape
    run = _equal_runs(ids, n)
    if run is not None:  # regions in order, of `run` tokens each: a reshape
        x = x.unflatten(2, (n, run))
        return x.mean(3) if how == "mean" else x.amax(3) if how == "amax" else x.amin(3)
    if how == "mean":
        sums = torch.zeros(b, h, n, d, dtype=x.dtype, device=x.device).index_add_(2, ids, x)
        counts = torch.bincount(ids, minlength=n).clamp(min=1).to(x.dtype)
        return sums / counts[None, None, :, None]
    out = torch.zeros(b, h, n, d, dtype=x.dtype, device=x.device)
    index = ids[None, None, :, None].expand_as(x)
    return out.scatter_reduce_(2, index, x, how, include_self=False)


def block_logits(
    node: ir.Route,
    q: torch.Tensor,
    k: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    rq: torch.Tensor,
    rk: torch.Tensor,
    sizes: tuple[int, int],
) -> torch.Tensor:
    """Block logits [B, H, nq, nk] of the q . k scorers, from the tokens inside the
    regions: q [B, H, tokens, D] at absolute `q_positions` in regions `rq`, and k."""
    nq, nk = sizes
    if node.score == "antidiagonal":
        return antidiagonal_mass(q, k, q_positions, k_positions, rq, rk, sizes, node.stride, node.causal)
    if node.score == "minmax":
        kmax, kmin = region_reduce(k, rk, nk, "amax"), region_reduce(k, rk, nk, "amin")
        return minmax_bounds(q, rq, nq, kmax, kmin).nan_to_num(neginf=0.0)  # regions without queries
    pooled_k = region_reduce(k, rk, nk, "amax" if node.score == "max" else "mean")
    return region_reduce(q, rq, nq, "mean") @ pooled_k.transpose(-1, -2)


def minmax_bounds(q: torch.Tensor, rq: torch.Tensor, nq: int, kmax: torch.Tensor, kmin: torch.Tensor) -> torch.Tensor:
    """Quest's bounds [B, H, nq, nk]: the largest, over each query region's queries q
    [B, H, tokens, D] (in regions `rq`), of sum_d max(q_d kmax_d, q_d kmin_d) against
    each key region's extrema [B, H, nk, D]; -inf for regions without queries.  A max
    over queries: context-parallel ranks combine theirs with a MAX all-reduce."""
    run = _equal_runs(rq, nq)
    chunk = _CHUNK if run is None else max(1, _CHUNK // run) * run
    # sum_d max(q_d max_d, q_d min_d) = relu(q) . max - relu(-q) . min: one product
    extrema = torch.cat([kmax, -kmin], dim=-1).transpose(-1, -2)
    out = torch.full((*q.shape[:2], nq, kmax.shape[2]), -math.inf, dtype=q.dtype, device=q.device)
    for s in range(0, q.shape[2], chunk):
        part = q[:, :, s : s + chunk]
        bound = torch.cat([part.clamp(min=0), (-part).clamp(min=0)], dim=-1) @ extrema
        if run is not None:  # region i holds queries [i run, (i + 1) run): a reshape
            out[:, :, s // run : (s + part.shape[2]) // run] = bound.unflatten(2, (-1, run)).amax(3)
        else:
            index = rq[s : s + chunk][None, None, :, None].expand_as(bound)
            out.scatter_reduce_(2, index, bound, "amax")
    return out


def _equal_runs(ids: torch.Tensor, n: int) -> int | None:
    """r when token t lies in region t // r for every token (all n regions, in order,
    of r tokens each), else None: the common 1-D layout, reduced by a reshape."""
    if n == 0 or ids.numel() % n:
        return None
    r = ids.numel() // n
    return r if torch.equal(ids, torch.arange(ids.numel(), device=ids.device) // r) else None


def antidiagonal_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    rq: torch.Tensor,
    rk: torch.Tensor,
    sizes: tuple[int, int],
    stride: int,
    causal: bool,
) -> torch.Tensor:
    """XAttention's block estimate [B, H, nq, nk] (`xattn_estimate`, select_mode
    "inverse"): positions fall in groups of `stride`; query group i and key group j
    score sum_t q[i S + S-1-t] . k[j S + t] / (sqrt(D) S) (one antidiagonal of their
    S x S tile; missing positions count as zeros); each query group's scores are
    softmax-normalised over the key groups present (and j <= i when causal), and a
    block pair's mass is the sum over the group pairs it holds."""
    nq, nk = sizes
    b, h, _, d = q.shape
    groups_q, groups_k = q_positions // stride, k_positions // stride
    ngq = int(groups_q.max()) + 1 if groups_q.numel() else 0
    ngk = int(groups_k.max()) + 1 if groups_k.numel() else 0
    out = torch.zeros(b, h, nq, nk, dtype=q.dtype, device=q.device)
    if ngq == 0 or ngk == 0:
        return out
    qr = torch.zeros(b, h, ngq, stride, d, dtype=q.dtype, device=q.device)
    qr[:, :, groups_q, stride - 1 - q_positions % stride] = q
    kr = torch.zeros(b, h, ngk, stride, d, dtype=k.dtype, device=k.device)
    kr[:, :, groups_k, k_positions % stride] = k
    qr, kr = qr.flatten(-2), kr.flatten(-2)
    q_present = torch.zeros(ngq, dtype=torch.bool, device=q.device)
    q_present[groups_q] = True
    k_present = torch.zeros(ngk, dtype=torch.bool, device=q.device)
    k_present[groups_k] = True
    region_of_q = torch.zeros(ngq, dtype=torch.long, device=q.device)
    region_of_q[groups_q] = rq  # groups nest in regions: one region per group
    region_of_k = torch.zeros(ngk, dtype=torch.long, device=q.device)
    region_of_k[groups_k] = rk
    key_groups = torch.arange(ngk, device=q.device)
    scale = 1.0 / (math.sqrt(d) * stride)
    chunk = max(1, _SCORES_PER_CHUNK // max(1, b * h * ngk))  # rows of [B, H, rows, ngk] logits at a time
    present_rows = torch.nonzero(q_present).flatten()  # a context-parallel rank holds a few groups
    for s in range(0, present_rows.numel(), chunk):
        rows = present_rows[s : s + chunk]
        logits = (qr[:, :, rows] @ kr.transpose(-1, -2)) * scale
        masked = ~k_present[None, :]
        if causal:
            masked = masked | (key_groups[None, :] > rows[:, None])
        logits = logits.masked_fill(masked, -math.inf)
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a group with no eligible key: no mass
        per_key_region = torch.zeros(b, h, len(rows), nk, dtype=p.dtype, device=p.device)
        per_key_region.index_add_(3, region_of_k, p)
        out.index_add_(2, region_of_q[rows], per_key_region)
    return out


def select(
    node: ir.Route, logits: torch.Tensor, eligible: torch.Tensor, forced: torch.Tensor, normalised: bool
) -> torch.Tensor:
    """The selected key regions, bool [B, nq, nk], from logits [B, nq, nk].

    `eligible` [nq, nk]: regions that may be selected; `forced` ⊆ eligible: always
    kept.  `normalised`: the logits are masses (antidiagonal), so P is them over
    their row's sum rather than a softmax."""
    logits = logits.masked_fill(~eligible, -math.inf)
    # Forced regions first (by index), then decreasing logits, ties to the lower region.
    key = logits.masked_fill(forced, math.inf)
    n_forced = forced.sum(-1)
    if node.topk is not None:
        return _first(key, torch.clamp(n_forced, min=node.topk)) & eligible
    logits = logits.double()
    if normalised:
        mass = logits.clamp(min=0).nan_to_num(0.0)
        probs = mass / mass.sum(-1, keepdim=True).clamp(min=torch.finfo(mass.dtype).tiny)
    else:
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    if node.threshold is not None:
        return forced | (eligible & (probs >= node.threshold))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # stable: ties in index order
    cumulative = torch.cumsum(torch.gather(probs, -1, order), dim=-1)
    if node.mass is not None:  # XAttention: take regions until the mass before them reaches mass
        before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
        count = (before < node.mass).sum(-1)
    else:  # SpargeAttn: the regions whose cumulative mass stays within cdf, at least one
        count = (cumulative <= node.cdf).sum(-1).clamp(min=1)
    count = torch.maximum(count, n_forced)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < count[..., None]) & eligible


def _first(key: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The `count` largest keys of each row, ties to the lower index, without a full
    sort: the count-th largest value is the cut; of the keys equal to it, the
    lowest indices fill the remaining room."""
    n = key.shape[-1]
    count = count.expand(key.shape[:-1])
    most = int(count.max()) if count.numel() else 0
    if most >= n:
        return torch.ones_like(key, dtype=torch.bool)
    cut = torch.topk(key, max(most, 1), dim=-1).values.gather(-1, (count.clamp(min=1) - 1)[..., None])
    above = key > cut
    tied = key == cut
    room = count[..., None] - above.sum(-1, keepdim=True)
    chosen = above | (tied & (torch.cumsum(tied, dim=-1) <= room))
    return chosen & (count[..., None] > 0)
