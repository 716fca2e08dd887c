"""Labels of rectangles for atoms that read call-time tensors.

Each atom is summarised once per schedule build as block-level tables, then
any rectangle of blocks is labelled from prefix sums or range extrema:

- `segments`: per block and batch element, the smallest and largest id. No
  common id is possible when the ranges are disjoint (E); one id throughout
  means every pair matches (F); otherwise undecided (U), except for a single
  block, which is E or M by whether its two sides' sorted ids share one.
- `route`: C[b, qb, kb], the number of allowed pairs in each block pair,
  is Nq @ sel @ Nk^T with N the tokens each block has in each region: exact
  E, F and M for any rectangle, in any layout.
- `vertical_slash`: prefix sums of the selected columns per key block and of the
  selected diagonals: a rectangle without a selected column or diagonal in its
  ranges is E, one whose keys are all selected columns or whose offsets are all
  selected diagonals is F; a single block is settled exactly from its keys (every
  unselected key needs all its offsets selected), so no pair is evaluated.
- `cluster`: which clusters each block touches; blocks sharing none are E,
  the rest are settled on their pairs (U).

A block counts as visited when any batch element needs it and as full when
every batch element fills it, because one schedule serves the whole batch.
These tables cost O(query blocks x key blocks): routing scores every region
pair anyway.
"""

from __future__ import annotations

import torch
from maskc.dsl import evaluate, ir
from maskc.dsl.dynamic import BITS_PER_WORD, in_regions, region_ids

E, F, M, U = 0, 1, 2, 4


def classify(node, r) -> torch.Tensor:
    if isinstance(node, ir.Segments):
        return _segments(node, r)
    if isinstance(node, ir.Route):
        return _route(node, r)
    if isinstance(node, ir.VerticalSlash):
        return _vertical_slash(node, r)
    return _cluster(node, r)


def _cached(r, key, build):
    cache = r.tensors.cache
    full_key = (key, id(r.q), id(r.k))
    if full_key not in cache:
        cache[full_key] = build()
    return cache[full_key]


def _label(empty, full, exact) -> torch.Tensor:
    out = torch.full(empty.shape, U, dtype=torch.int8)
    out[exact] = M
    out[full] = F
    out[empty] = E
    return out


# ----------------------------------------------------------------- prefix sums


def _prefix2d(x: torch.Tensor) -> torch.Tensor:
    """Inclusive 2-D prefix sums over the last two dims, zero-padded at the front."""
    out = torch.zeros(*x.shape[:-2], x.shape[-2] + 1, x.shape[-1] + 1, dtype=x.dtype)
    out[..., 1:, 1:] = x.cumsum(-2).cumsum(-1)
    return out


def _rect_sum(prefix: torch.Tensor, r) -> torch.Tensor:
    p = prefix
    return p[..., r.qb1, r.kb1] - p[..., r.qb0, r.kb1] - p[..., r.qb1, r.kb0] + p[..., r.qb0, r.kb0]


def _block_pairs(r) -> torch.Tensor:
    """Real (query, key) pairs in each block pair: [q_blocks, k_blocks]."""
    qn = torch.clamp(r.q.length - torch.arange(r.q.num_blocks) * r.q.block, max=r.q.block)
    kn = torch.clamp(r.k.length - torch.arange(r.k.num_blocks) * r.k.block, max=r.k.block)
    return qn[:, None].double() * kn[None, :].double()


# ----------------------------------------------------------------- segments


def _segments(node: ir.Segments, r) -> torch.Tensor:
    def build():
        ids = r.tensors.get(node.tensor).cpu()
        ids = (ids[None] if ids.dim() == 1 else ids).long()
        top = int(ids.max()) if ids.numel() else 0
        if top >= torch.iinfo(torch.int64).max - 2:  # no room above the ids for the markers below
            ids = torch.unique(ids, return_inverse=True)[1]
            top = int(ids.max())
        out = []
        # a position that is padding or outside the ids matches nothing: a marker above every id,
        # one for queries and another for keys
        for geometry, marker in ((r.q, top + 1), (r.k, top + 2)):
            pos, valid = geometry.positions(torch.arange(geometry.num_blocks))
            c = evaluate.coordinate(pos, node.coord)
            inside = evaluate.in_segment_range(c, ids.shape[1])
            values = ids[:, c.clamp(0, ids.shape[1] - 1)]
            big = torch.iinfo(torch.int64).max
            lo = torch.where(valid & inside, values, big).amin(-1)
            hi = torch.where(valid & inside, values, -big).amax(-1)
            outside = (valid & ~inside).any(-1).to(torch.int8)
            ranges = (_table(lo, torch.minimum), _table(hi, torch.maximum), _table(outside, torch.maximum))
            out.append((*ranges, torch.where(valid & inside, values, marker).sort(-1).values))
        return out

    (qlo_t, qhi_t, qout_t, q_ids), (klo_t, khi_t, kout_t, k_ids) = _cached(r, ("segments", node), build)
    qlo, qhi = _range(qlo_t, r.qb0, r.qb1, torch.minimum), _range(qhi_t, r.qb0, r.qb1, torch.maximum)
    klo, khi = _range(klo_t, r.kb0, r.kb1, torch.minimum), _range(khi_t, r.kb0, r.kb1, torch.maximum)
    outside = (_range(qout_t, r.qb0, r.qb1, torch.maximum) | _range(kout_t, r.kb0, r.kb1, torch.maximum)) != 0
    empty = ((qhi < klo) | (khi < qlo)).all(0)
    full = ((qlo == qhi) & (klo == khi) & (qlo == klo)).all(0) & ~outside
    # single blocks: some pair matches exactly when the two blocks' sorted ids share one
    single = torch.nonzero((r.qb1 - r.qb0 == 1) & (r.kb1 - r.kb0 == 1) & ~empty & ~full).squeeze(1)
    exact = torch.zeros_like(empty)
    if single.numel():
        qs, ks = q_ids[:, r.qb0[single]], k_ids[:, r.kb0[single]]  # [B, n, block]
        at = torch.searchsorted(ks, qs).clamp(max=ks.shape[-1] - 1)
        shared = (ks.gather(-1, at) == qs).any(-1).any(0)
        empty[single] = ~shared
        exact[single] = shared
    return _label(empty, full, exact)


def _table(values: torch.Tensor, op) -> list[torch.Tensor]:
    """Sparse table over the last dim for range extrema."""
    table = [values]
    width = 1
    while 2 * width <= values.shape[-1]:
        prev = table[-1]
        table.append(op(prev[..., :-width], prev[..., width:]))
        width *= 2
    return table


def _range(table, b0, b1, op) -> torch.Tensor:
    level = torch.floor(torch.log2((b1 - b0).clamp(min=1).double())).long()
    out = torch.empty(*table[0].shape[:-1], b0.numel(), dtype=table[0].dtype)
    for k in torch.unique(level).tolist():
        pick = level == k
        row = table[k]
        out[..., pick] = op(row[..., b0[pick]], row[..., b1[pick] - (1 << k)])
    return out


# ----------------------------------------------------------------- route


def _incidence(geometry, regions: tuple[ir.Coord, ...], n: int) -> torch.Tensor:
    """Tokens of each block in each region: sparse [blocks, regions] float64 (a block
    meets few regions, so products with it cost what it holds, not blocks x regions)."""
    pos, valid = geometry.positions(torch.arange(geometry.num_blocks))
    ids = region_ids(pos, regions).clamp(0, n - 1)
    rows = torch.arange(geometry.num_blocks)[:, None].expand_as(ids)
    weights = (valid & in_regions(pos, regions)).double()
    index = torch.stack([rows.reshape(-1), ids.reshape(-1)])
    shape = (geometry.num_blocks, n)
    return torch.sparse_coo_tensor(index, weights.reshape(-1), shape, check_invariants=False).coalesce()


def _apply_rows(incidence: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """incidence [m, n] (sparse) applied to the second-last dim of x [B, n, c]: [B, m, c]."""
    b, n, c = x.shape
    out = torch.sparse.mm(incidence, x.permute(1, 0, 2).reshape(n, b * c))
    return out.reshape(incidence.shape[0], b, c).permute(1, 0, 2)


def _route(node: ir.Route, r) -> torch.Tensor:
    def build():
        sel = evaluate.route_table(r.tensors, node).double()  # [B, query regions, key regions]
        nq, nk = sel.shape[-2:]
        per_query_block = _apply_rows(_incidence(r.q, node.query_regions, nq), sel)  # [B, q blocks, nk]
        counts = _apply_rows(_incidence(r.k, node.regions, nk), per_query_block.transpose(1, 2)).transpose(1, 2)
        return _prefix2d(counts.round()), _prefix2d(_block_pairs(r))

    counts, pairs = _cached(r, ("route", node), build)
    allowed = _rect_sum(counts, r)  # [B, rects]
    total = _rect_sum(pairs, r)
    return _label((allowed == 0).all(0), (allowed == total).all(0), torch.ones(len(r), dtype=torch.bool))


# ----------------------------------------------------------------- vertical-slash


def _vertical_slash(node: ir.VerticalSlash, r) -> torch.Tensor:
    def build():
        columns, diagonals = evaluate.vertical_slash_table(r.tensors, node)  # [B, lk], [B, lq + lk - 1]
        pos, valid = r.k.positions(torch.arange(r.k.num_blocks))
        picked = (columns[:, pos.clamp(0, columns.shape[1] - 1)] & valid).sum(-1)  # [B, key blocks]
        keys = torch.zeros(r.k.num_blocks + 1, dtype=torch.long)
        keys[1:] = valid.sum(-1).cumsum(0)
        col_prefix = torch.zeros(columns.shape[0], r.k.num_blocks + 1, dtype=torch.long)
        col_prefix[:, 1:] = picked.cumsum(-1)
        diag_prefix = torch.zeros(diagonals.shape[0], diagonals.shape[1] + 1, dtype=torch.long)
        diag_prefix[:, 1:] = diagonals.long().cumsum(-1)
        return columns, col_prefix, keys, diag_prefix

    columns, col_prefix, keys, diag_prefix = _cached(r, ("vertical_slash", node), build)
    a, b, ex_q = r.q_range(node.coord)
    c, d, ex_k = r.k_range(node.coord)
    base = node.rows - 1 + r.q.offset  # table index of offset k - q is k - q + base
    top = diag_prefix.shape[1] - 1

    def diagonal_count(lo, hi):  # selected diagonals with index in [lo, hi]
        lo, hi = lo.clamp(0, top), (hi + 1).clamp(0, top)
        return diag_prefix[:, hi] - diag_prefix[:, lo.clamp(max=hi)]

    col_count = col_prefix[:, r.kb1] - col_prefix[:, r.kb0]
    diag_count = diagonal_count(c - b + base, d - a + base)
    empty = ((col_count == 0) & (diag_count == 0)).all(0)
    full = (col_count == (keys[r.kb1] - keys[r.kb0])) | (diag_count == d - a - (c - b) + 1)
    out = _label(empty, full.all(0), torch.zeros_like(empty))
    # Single blocks with contiguous positions: exact.  A pair is allowed when its key is a
    # selected column or its offset a selected diagonal; a block is full when every key
    # that is no selected column has all its offsets k - b .. k - a selected.
    single = (r.qb1 - r.qb0 == 1) & (r.kb1 - r.kb0 == 1) & ex_q & ex_k & ~empty & ~full.all(0)
    if single.any():
        pick = torch.nonzero(single).squeeze(1)
        kp, kv = r.k.positions(r.kb0[pick])  # [n, block]
        qa, qb = a[pick, None], b[pick, None]
        covered = columns[:, kp.clamp(0, columns.shape[1] - 1)] | (
            diagonal_count(kp - qb + base, kp - qa + base) == qb - qa + 1
        )
        every = (covered | ~kv).all(-1).all(0)
        out[pick] = torch.where(every, F, M).to(torch.int8)
    return out


# ----------------------------------------------------------------- cluster


def _cluster(node: ir.Cluster, r) -> torch.Tensor:
    def build():
        s = r.tensors.instance.sizes
        bits_q, bits_k = evaluate.cluster_table(r.tensors, node)  # [B, words, len]
        touch = []
        for geometry, bits, offset in ((r.q, bits_q, s.q_offset), (r.k, bits_k, 0)):
            pos, valid = geometry.positions(torch.arange(geometry.num_blocks))
            rows = (pos - offset).clamp(0, bits.shape[-1] - 1)
            hit = bits[:, :, rows] * valid.long()  # [B, words, blocks, block]
            clusters = torch.arange(BITS_PER_WORD)
            # [B, words * BITS_PER_WORD, blocks]: which clusters each block touches
            any_bit = ((hit[:, :, None] >> clusters[None, None, :, None, None]) & 1).amax(-1)
            touch.append(any_bit.flatten(1, 2))
        shared = torch.einsum("bnq,bnk->bqk", touch[0].double(), touch[1].double()) > 0
        return _prefix2d(shared.double())

    shared = _cached(r, ("cluster", node), build)
    return _label(
        (_rect_sum(shared, r) == 0).all(0), torch.zeros(len(r), dtype=torch.bool), torch.zeros(len(r), dtype=torch.bool)
    )
