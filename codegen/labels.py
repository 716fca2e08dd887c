"""Three-valued reasoning about rectangles of blocks.

For a batch of rectangles (query blocks [qb0, qb1) x key blocks [kb0, kb1)),
`classify` labels each one:

- E: no pair is allowed          - F: every pair is allowed
- M: some pairs are allowed and some are not (known exactly)
- N: at least one pair is allowed; maybe all
- U: unknown

Atoms are decided from coordinate ranges (exact for intervals, offsets,
congruences and NATTEN windows); `&`, `|`, `~` combine labels soundly.  The
schedule builder splits rectangles that are not E or F and evaluates the
predicate only on single blocks still labelled N or U.
"""

from __future__ import annotations

import torch
from maskc.dsl import ir
from maskc.dsl.evaluate import group_length, neighborhood_window
from maskc.dsl.random_blocks import draw

from . import dynamic_labels as dynamic
from .geometry import Geometry

E, F, M, N, U = 0, 1, 2, 3, 4
BIG = 2**62

_AND = torch.tensor(
    #  E  F  M  N  U   (right)
    [
        [E, E, E, E, E],  # E
        [E, F, M, N, U],  # F
        [E, M, U, U, U],  # M
        [E, N, U, U, U],  # N
        [E, U, U, U, U],  # U
    ],
    dtype=torch.int8,
)
_OR = torch.tensor(
    [
        [E, F, M, N, U],  # E
        [F, F, F, F, F],  # F
        [M, F, N, N, N],  # M
        [N, F, N, N, N],  # N
        [U, F, N, N, U],  # U
    ],
    dtype=torch.int8,
)
_NOT = torch.tensor([F, E, M, U, U], dtype=torch.int8)

# Rectangles with more query blocks than this leave `random` undecided (split first).
RANDOM_ROWS = 64


class Rects:
    """A batch of rectangles in block units, with the two sides' geometry and,
    for data-dependent atoms, the call's tensors."""

    def __init__(self, q: Geometry, k: Geometry, qb0, qb1, kb0, kb1, tensors=None) -> None:
        self.q, self.k = q, k
        self.tensors = tensors
        self.qb0, self.qb1, self.kb0, self.kb1 = qb0, qb1, kb0, kb1
        self._cache: dict = {}

    def __len__(self) -> int:
        return self.qb0.numel()

    def q_range(self, coord: ir.Coord):
        key = ("q", coord)
        if key not in self._cache:
            self._cache[key] = self.q.ranges(coord, self.qb0, self.qb1)
        return self._cache[key]

    def k_range(self, coord: ir.Coord):
        key = ("k", coord)
        if key not in self._cache:
            self._cache[key] = self.k.ranges(coord, self.kb0, self.kb1)
        return self._cache[key]


def _label(empty: torch.Tensor, full: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    out = torch.full(empty.shape, U, dtype=torch.int8)
    out[exact] = M
    out[full] = F
    out[empty] = E
    return out


def classify(node: ir.Mask, r: Rects) -> torch.Tensor:
    if isinstance(node, ir.Const):
        return torch.full((len(r),), F if node.value else E, dtype=torch.int8)
    if isinstance(node, ir.And):
        out = classify(node.parts[0], r)
        for part in node.parts[1:]:
            if not (out == E).all():
                out = _AND[out.long(), classify(part, r).long()]
        return out
    if isinstance(node, ir.Or):
        out = classify(node.parts[0], r)
        for part in node.parts[1:]:
            if not (out == F).all():
                out = _OR[out.long(), classify(part, r).long()]
        return out
    if isinstance(node, ir.Not):
        return _NOT[classify(node.part, r).long()]
    if isinstance(node, ir.Offset):
        return _offset(node, r)
    if isinstance(node, ir.OffsetMod):
        return _offset_mod(node, r)
    if isinstance(node, ir.PosSet):
        return _pos_set(node, r)
    if isinstance(node, ir.Neighborhood):
        return _neighborhood(node, r)
    if isinstance(node, ir.RandomBlocks):
        return _random(node, r)
    if r.tensors is not None and isinstance(node, (ir.Segments, ir.Route, ir.Cluster, ir.VerticalSlash)):
        return dynamic.classify(node, r)
    return torch.full((len(r),), U, dtype=torch.int8)


def _offset(node: ir.Offset, r: Rects) -> torch.Tensor:
    a, b, ex_q = r.q_range(node.coord)
    c, d, ex_k = r.k_range(node.coord)
    dmin, dmax = c - b, d - a
    lo = -BIG if node.lo is None else node.lo
    hi = BIG if node.hi is None else node.hi
    empty = (dmax < lo) | (dmin > hi)
    full = (dmin >= lo) & (dmax <= hi)
    return _label(empty, full, ex_q & ex_k)


def _offset_mod(node: ir.OffsetMod, r: Rects) -> torch.Tensor:
    a, b, ex_q = r.q_range(node.coord)
    c, d, ex_k = r.k_range(node.coord)
    dmin, dmax = c - b, d - a
    first = dmin + (node.residue - dmin) % node.modulus
    empty = first > dmax
    full = ~empty & ((dmin == dmax) | (node.modulus == 1))
    return _label(empty, full, ex_q & ex_k)


def _pos_set(node: ir.PosSet, r: Rects) -> torch.Tensor:
    a, b, exact = r.q_range(node.coord) if node.side == "q" else r.k_range(node.coord)
    if node.modulus is None:
        count = (torch.clamp(b + 1, max=node.hi) - torch.clamp(a, min=node.lo)).clamp(min=0)
    else:
        m = node.modulus
        lo, hi = min(max(node.lo, 0), m), min(max(node.hi, 0), m)
        width = max(hi - lo, 0)

        def upto(x: torch.Tensor) -> torch.Tensor:  # values v < x with v % m in [lo, hi)
            return torch.div(x, m, rounding_mode="floor") * width + ((x % m) - lo).clamp(0, width)

        count = upto(b + 1) - upto(a)
    return _label(count == 0, count == b - a + 1, exact)


def _neighborhood(node: ir.Neighborhood, r: Rects) -> torch.Tensor:
    a, b, ex_q = r.q_range(node.coord)
    c, d, ex_k = r.k_range(node.coord)
    dil, length = node.dilation, node.coord.size
    nonempty = torch.zeros(a.shape, dtype=torch.bool)
    for g in range(dil):
        gq_lo = _ceil_div(a - g, dil)
        gq_hi = torch.div(b - g, dil, rounding_mode="floor")
        gk_lo = _ceil_div(c - g, dil)
        gk_hi = torch.div(d - g, dil, rounding_mode="floor")
        glen = group_length(length, torch.tensor(g), dil)
        start, _ = neighborhood_window(gq_lo, glen, node.window, node.stride, node.causal)
        _, end = neighborhood_window(gq_hi, glen, node.window, node.stride, node.causal)
        nonempty |= (gq_lo <= gq_hi) & (gk_lo <= gk_hi) & (gk_hi >= start) & (gk_lo < end)
    if dil == 1:
        start_last, _ = neighborhood_window(b, torch.tensor(length), node.window, node.stride, node.causal)
        _, end_first = neighborhood_window(a, torch.tensor(length), node.window, node.stride, node.causal)
        full = (c >= start_last) & (d < end_first)
    else:
        full = nonempty & (a == b) & (c == d)
    return _label(~nonempty, full, ex_q & ex_k)


def _ceil_div(x: torch.Tensor, d: int) -> torch.Tensor:
    return -torch.div(-x, d, rounding_mode="floor")


def _random(node: ir.RandomBlocks, r: Rects) -> torch.Tensor:
    a, b, ex_q = r.q_range(node.coord)
    c, d, ex_k = r.k_range(node.coord)
    out = torch.full(a.shape, U, dtype=torch.int8)
    rows = b - a + 1
    small = rows <= RANDOM_ROWS
    if not small.any():
        return out
    idx = torch.nonzero(small).squeeze(1)
    counts = rows[idx]
    owner = torch.repeat_interleave(idx, counts)
    starts = torch.cumsum(counts, 0) - counts
    qb = a[owner] + torch.arange(owner.numel()) - torch.repeat_interleave(starts, counts)
    drawn = draw(qb, node.count, node.seed, node.head, node.lo, node.hi, node.skip)
    inside = ((drawn >= c[owner, None]) & (drawn <= d[owner, None])).sum(1)
    width = (d - c + 1)[owner]
    hits = torch.zeros(a.shape, dtype=torch.long).index_add_(0, owner, (inside > 0).long())
    full_rows = torch.zeros(a.shape, dtype=torch.long).index_add_(0, owner, (inside == width).long())
    labels = _label(hits == 0, full_rows == rows, ex_q & ex_k)
    out[small] = labels[small]
    return out
