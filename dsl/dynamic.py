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
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selected key regions per query region: bool [batch, 1, query regions, key regions].

    q [B, H, lq, D], k [B, Hk, lk, D]; `scores` [B or 1, H, nq, nk] replaces the
    scorer (and q, k, then None) when the pattern names one.  Block logits (`dsl.selection`) are summed
    over heads when shared (the full-dimension affinity of BiFormer), then one
    selector picks regions among the eligible ones (present, and not later than
    the query's own region when causal), forced regions first.  Ties go to the
    lower region index.
    """
    from . import selection

    nq = math.prod(c.size for c in node.query_regions)
    nk = math.prod(c.size for c in node.regions)
    device = (q if scores is None else scores).device
    if node.head is not None and scores is not None:
        scores = scores[:, node.head : node.head + 1]
    if scores is None:
        q, k = route_heads(node, q, k)
    q_positions, k_positions = q_positions.to(device), k_positions.to(device)
    q_inside, k_inside, rq, rk = route_regions(node, q_positions, k_positions)
    if scores is not None:
        logits = scores.detach().to(device=device, dtype=torch.float64)
    else:
        if not bool(q_inside.all()):  # copies only when some tokens lie outside the regions
            q, q_positions = q[:, :, q_inside], q_positions[q_inside]
        if not bool(k_inside.all()):
            k, k_positions = k[:, :, k_inside], k_positions[k_inside]
        logits = selection.block_logits(node, q, k, q_positions, k_positions, rq, rk, (nq, nk))
        if node.score != "antidiagonal":
            logits = logits * q.shape[-1] ** -0.5  # softmax temperature of q . k, as SDPA's default scale
    q_present = torch.zeros(nq, dtype=torch.bool, device=device)
    q_present[rq] = True
    k_present = torch.zeros(nk, dtype=torch.bool, device=device)
    k_present[rk] = True
    return choose(node, logits, q_present, k_present, normalised=scores is None and node.score == "antidiagonal")


def choose(
    node: ir.Route,
    logits: torch.Tensor,
    q_present: torch.Tensor,
    k_present: torch.Tensor,
    normalised: bool,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The selection from block logits [B, H, nq, nk] and which regions hold tokens.
    Rows are selected independently: `rows` (query regions) selects those alone, from
    their logits [B, H, len(rows), nk]."""
    from . import selection

    device = logits.device
    nk = k_present.numel()
    logits = logits.sum(1)  # [B, nq, nk]: one head, or all heads shared
    own = own_regions(node, device)  # [nq]: the key region holding each query region's last position
    if rows is not None:
        own, q_present = own[rows], q_present[rows]
    ids = torch.arange(nk, device=device)
    eligible = q_present[:, None] & k_present[None, :]
    if node.causal:
        eligible &= ids[None, :] <= own[:, None]
    forced = torch.zeros_like(eligible)
    if node.own:
        forced |= ids[None, :] == own[:, None]
    if node.first:
        forced[:, 0] = True
    forced &= eligible
    return selection.select(node, logits, eligible, forced, normalised)[:, None]


def route_heads(node: ir.Route, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as routing scores them: kv heads repeated (GQA), the route's head alone
    when it is per head, detached, in the compute dtype."""
    k = expand_kv_heads(k, q.shape[1])
    if node.head is not None:
        q, k = q[:, node.head : node.head + 1], k[:, node.head : node.head + 1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.detach().to(compute), k.detach().to(compute)


def route_regions(
    node: ir.Route, q_positions: torch.Tensor, k_positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which queries and keys lie in the route's regions, and the region of each that does."""
    q_inside = in_regions(q_positions, node.query_regions)
    k_inside = in_regions(k_positions, node.regions)
    rq = region_ids(q_positions[q_inside], node.query_regions)
    return q_inside, k_inside, rq, region_ids(k_positions[k_inside], node.regions)


def own_regions(node: ir.Route, device: torch.device | str = "cpu") -> torch.Tensor:
    """For each query region, the key region holding its last position (per axis):
    the diagonal block, the query's own block for `own` and `causal`.  With equal
    query and key regions it is the query region itself."""
    nq = math.prod(c.size for c in node.query_regions)
    if node.q_regions is None:
        return torch.arange(nq, device=device)
    index = torch.zeros(nq, dtype=torch.long, device=device)
    rest = torch.arange(nq, device=device)
    strides = [math.prod(c.size for c in node.query_regions[a + 1 :]) for a in range(len(node.regions))]
    for qc, kc, step in zip(node.query_regions, node.regions, strides, strict=True):
        coordinate = rest // step
        rest = rest % step
        last = ((coordinate + 1) * qc.div - 1) // kc.div
        index = index * kc.size + last.clamp(max=kc.size - 1)
    return index


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


# ---------------------------------------------------------------- vertical-slash (MInference)


def vertical_slash_selection(
    node: ir.VerticalSlash, q: torch.Tensor, k: torch.Tensor, q_offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's index selection, for every query head at once (the node's head is
    ignored): (columns bool [B, H, lk], diagonals bool [B, H, lq + lk - 1]); diagonal i
    is the offset k - row = i - (lq - 1), row = q - q_offset.

    q [B, H, lq, D], k [B, Hk, lk, D].  The last `node.last` queries attend every key
    (keys up to their own position when causal) with softmax(q.k / sqrt(D)); a column
    scores its probability summed over those queries, a diagonal the probabilities on
    it.  Candidates are the keys and diagonals those pairs reach, plus the first `sink`
    keys; the first `sink` keys and the diagonals with |k - q| < local rank first (as
    MInference's infinities do), then the highest scores.  Ties: the lower key; the
    nearer diagonal (smaller |k - q|, then k - q < 0 first).
    """
    batch, heads, lq, dim = q.shape
    lk, groups = k.shape[2], heads // k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    n = min(node.last, lq)
    device = q.device
    # Grouped heads share their key head: [B, Hk, groups * n, D] against [B, Hk, lk, D].
    qs = q[:, :, lq - n :].detach().to(compute).reshape(batch, k.shape[1], groups * n, dim)
    logits = torch.matmul(qs, k.detach().to(compute).transpose(2, 3)).view(batch, heads, n, lk) / math.sqrt(dim)
    q_pos = torch.arange(lq - n, lq, device=device) + q_offset
    k_pos = torch.arange(lk, device=device)
    seen = vs_seen(node, q_pos, k_pos)
    if node.causal:  # only keys after the first scored query need the mask
        cut = int(min(max(int(q_pos[0]) + 1, 0), lk)) if n else lk
        logits[..., cut:] = logits[..., cut:].masked_fill(~seen[:, cut:], -math.inf)
    probs = torch.softmax(logits, dim=-1).masked_fill(~seen.any(-1)[:, None], 0.0)
    flat = batch * heads
    slash = _diagonal_sums(probs.view(flat, n, lk))
    return vs_pick(node, probs.sum(2).view(flat, lk), slash, lq, q_offset, (batch, heads))


def vs_seen(node: ir.VerticalSlash, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Which keys (positions `k_pos`) each scored query (positions `q_pos`) sees: bool [n, keys]."""
    if node.causal:
        return k_pos[None, :] <= q_pos[:, None]
    return torch.ones(q_pos.numel(), k_pos.numel(), dtype=torch.bool, device=q_pos.device)


def vs_pick(
    node: ir.VerticalSlash,
    columns: torch.Tensor,
    slash: torch.Tensor,
    lq: int,
    q_offset: int,
    batch_heads: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`vertical_slash_selection` from the scored queries' probabilities summed per key,
    columns [B * H, lk] (`batch_heads`: (B, H)), and per diagonal of the scored rows, slash [B * H, lk + n - 1]
    (entry j: k - row = j - (n - 1) for the n scored rows).  Everything else (which keys
    and diagonals the scored queries reach) follows from positions alone, so context
    parallel ranks reduce just these two sums."""
    flat, lk = columns.shape
    n = slash.shape[1] - lk + 1
    device = columns.device
    q_pos = torch.arange(lq - n, lq, device=device) + q_offset
    k_pos = torch.arange(lk, device=device)
    seen = vs_seen(node, q_pos, k_pos)
    forced_cols = k_pos < node.sink
    picked_columns = _select(columns, seen.any(0) | forced_cols, forced_cols, node.vertical)

    # Diagonal i of the table is k - row + lq - 1; the scored rows reach i < lk + n - 1.
    width, reach = lq + lk - 1, lk + n - 1
    table = torch.zeros(flat, width, dtype=slash.dtype, device=device)
    table[:, :reach] = slash
    reached = torch.zeros(width, dtype=torch.bool, device=device)
    reached[:reach] = _diagonal_sums(seen[None].to(slash.dtype))[0] > 0
    offset = torch.arange(width, device=device) - (lq - 1) - q_offset  # k - q
    forced_diags = reached & (offset.abs() < node.local)
    # Nearer diagonals first among equals: rank the table in that order, then map back.
    order = torch.argsort(offset.abs() * 2 + (offset > 0), stable=True)
    picked = _select(table[:, order], reached[order], forced_diags[order], node.slash)
    diagonals = torch.zeros_like(picked).index_copy_(1, order, picked)
    return picked_columns.view(*batch_heads, lk), diagonals.view(*batch_heads, width)


def _diagonal_sums(x: torch.Tensor) -> torch.Tensor:
    """[B, n, lk] -> [B, lk + n - 1]: entry j sums x[:, i, j - (n - 1 - i)] over rows i
    (a skewed view of a zero-padded copy: row i shifted right by n - 1 - i)."""
    b, n, lk = x.shape
    w = lk + 2 * n
    padded = torch.zeros(b, n, w, dtype=x.dtype, device=x.device)
    padded[:, :, n : n + lk] = x
    skewed = padded.as_strided((b, n, lk + n - 1), (n * w, w + 1, 1), padded.storage_offset() + 1)
    return skewed.sum(1)


def _select(scores: torch.Tensor, candidate: torch.Tensor, forced: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` best candidates per row of scores [B, N]: forced ones first, then the
    highest scores; among equals the lower index.  Linear time, unlike a full sort."""
    take = min(count, int(candidate.sum()))
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if take == 0 or scores.shape[0] == 0:
        return chosen
    key = scores.masked_fill(forced, math.inf).masked_fill(~candidate, -math.inf)
    threshold = torch.topk(key, take, dim=-1).values[..., -1:]
    above = key > threshold
    tied = key == threshold
    room = take - above.sum(-1, keepdim=True)
    return above | (tied & (torch.cumsum(tied, -1) <= room))
