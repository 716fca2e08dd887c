"""The CPU executor's plan: a head group's visited blocks as segments of fused calls.

Query blocks (rows) are bucketed by the shape of their row of the schedule
(how many key blocks, which of them full, whether they are contiguous).  A
bucket runs as one segment over all its blocks with an additive mask (0 on
allowed pairs, -inf elsewhere; full blocks are zeros, their predicate is never
evaluated) when that mask stays small: identical masks across the bucket (a
sliding window's rows all look alike) are stored once and broadcast with
stride 0.  Otherwise the row is split: its full blocks run in one segment with
no mask at all, its partial blocks in another with the masks of
`prepared.partial_block_mask`, and the two results are merged exactly through
their log-sum-exps.  Keys of a segment are a strided view of k and v (no copy)
when every row's blocks form one contiguous span that moves by a fixed step
from row to row, and are gathered otherwise.  The last key block, when the keys
do not fill it, is treated as partial so padding keys are always masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..prepare import Prepared

# A bucket runs as one masked segment when its (deduplicated) mask holds at most
# this many blocks per partial block of the bucket; otherwise full and partial
# blocks run apart and are merged.
MIXED_MASK_RATIO = 2
# Buckets whose partial masks fall into at most this many distinct kinds are split
# by kind, so each part stores its mask once (when each part keeps enough rows).
MAX_MASK_KINDS = 8
MIN_ROWS_PER_KIND = 4
# At most this many strided pieces per bucket; beyond that its keys are gathered.
MAX_PIECES = 16
# Masks hashed at once when looking for equal masks (elements).
HASH_CHUNK = 1 << 22


@dataclass
class Segment:
    """Query blocks `rows` [m], each visiting the key blocks `cols[j]` [m, n]."""

    rows: torch.Tensor
    cols: torch.Tensor
    block_q: int
    block_k: int
    allowed: torch.Tensor | None  # bool [1 or B, 1 or m, bq, nk]; None: every pair allowed
    any_key: torch.Tensor | None  # bool [1 or B, 1 or m, bq]: rows with an allowed key; None: all
    row_step: int | None = None  # rows[j] = rows[0] + j * row_step
    col_step: int | None = None  # cols[j] = cols[0, 0] + j * col_step + arange(n)
    fresh: bool = False  # no earlier segment of the plan touches these rows: write, do not merge
    # additive masks of the fused kernel, by (dtype, heads, batch): made once (runtime/cpu/fused.py)
    float_masks: dict = field(default_factory=dict, repr=False)

    @property
    def m(self) -> int:
        return self.rows.numel()

    @property
    def nk(self) -> int:
        return self.cols.shape[1] * self.block_k

    def slice(self, a: int, b: int) -> Segment:
        if a == 0 and b == self.m:
            return self

        def rows_of(x):
            return x if x is None or x.shape[1] == 1 else x[:, a:b]

        return Segment(
            self.rows[a:b],
            self.cols[a:b],
            self.block_q,
            self.block_k,
            rows_of(self.allowed),
            rows_of(self.any_key),
            self.row_step,
            self.col_step,
            self.fresh,
        )


def _affine(x: torch.Tensor) -> int | None:
    """The common nonnegative step of a 1-D sequence, or None."""
    if x.numel() == 1:
        return 0
    d = x[1:] - x[:-1]
    step = int(d[0])
    return step if step >= 0 and bool((d == step).all()) else None


class _GroupBlocks:
    """The visited blocks of one head group, row-major, with partial masks."""

    def __init__(self, prepared: Prepared, group: int) -> None:
        self.prepared = prepared
        self.group = group
        bk = prepared.block_k
        runs = prepared.runs(group)
        self.num_rows = runs.rows
        rows, cols, full = runs.blocks()
        self.rows, self.cols = rows, cols
        _, _, pmask = prepared.partial_block_mask(group)
        partial = ~full
        num_kb = math.ceil(prepared.lk / bk)
        ragged = full & (cols == num_kb - 1) if prepared.lk % bk else torch.zeros_like(full)
        # index of each block's mask in `masks` (-1: full block, no mask)
        self.mask_index = torch.full((rows.numel(),), -1, dtype=torch.long)
        masks = pmask if pmask.dim() == 4 else pmask[None]
        self.mask_index[partial] = torch.arange(int(partial.sum()))
        if bool(ragged.any()):
            extra = prepared.block_mask(group, rows[ragged], cols[ragged])
            extra = extra if extra.dim() == 4 else extra[None]
            if extra.shape[0] != masks.shape[0]:
                size = max(extra.shape[0], masks.shape[0])
                extra, masks = extra.expand(size, -1, -1, -1), masks.expand(size, -1, -1, -1)
            self.mask_index[ragged] = masks.shape[1] + torch.arange(int(ragged.sum()))
            masks = torch.cat([masks, extra], dim=1)
        self.masks = masks  # bool [1 or B, n_masks, bq, bk]
        self.kind = self._mask_kinds()
        counts = torch.bincount(rows, minlength=self.num_rows)
        self.ptr = torch.zeros(self.num_rows + 1, dtype=torch.long)
        self.ptr[1:] = torch.cumsum(counts, 0)
        self.counts = counts

    def _mask_kinds(self) -> torch.Tensor:
        """An id per mask, equal ids for equal masks (exact: hashed, then checked)."""
        n = self.masks.shape[1]
        if n == 0:
            return torch.zeros(0, dtype=torch.long)
        size = self.masks[:, 0].numel()
        gen = torch.Generator().manual_seed(0)
        weights = torch.randint(0, 1 << 20, (size,), generator=gen).to(torch.float64)
        step = max(1, HASH_CHUNK // size)
        hashes = torch.cat(
            [
                self.masks[:, i : i + step].transpose(0, 1).reshape(-1, size).to(torch.float64) @ weights
                for i in range(0, n, step)
            ]
        )  # sums of integers below 2**53: exact in any order
        _, kind = torch.unique(hashes, return_inverse=True)
        first = torch.full((int(kind.max()) + 1,), n, dtype=torch.long).scatter_reduce_(
            0, kind, torch.arange(n), "amin"
        )
        for i in range(0, n, step):
            if not bool((self.masks[:, i : i + step] == self.masks[:, first[kind[i : i + step]]]).all()):
                return torch.arange(n)  # a hash collision: give up sharing
        return kind

    def block_mask(self, index: torch.Tensor) -> torch.Tensor:
        """Allowed pairs of blocks `index` [r, n] laid out as rows: bool [1 or B, r, bq, n * bk]."""
        mi = self.mask_index[index]
        b, _, bq, bk = self.masks.shape
        if self.masks.shape[1] == 0:
            out = torch.ones(b, *index.shape, bq, bk, dtype=torch.bool)
        else:
            out = self.masks[:, mi.clamp(min=0)]
            out[:, mi < 0] = True
        return out.permute(0, 1, 3, 2, 4).reshape(b, index.shape[0], bq, -1)


def _segment(gb: _GroupBlocks, rows: torch.Tensor, index: torch.Tensor, allowed) -> list[Segment]:
    """Segments over blocks `index` [m, n] of query blocks `rows`; `allowed` as in
    Segment.  Rows whose blocks are contiguous are cut into pieces where both the
    rows and the first key block move by fixed steps, so keys are strided views."""
    cols = gb.cols[index]
    n = cols.shape[1]
    pieces = [(0, rows.numel())]
    if bool((cols[:, -1] - cols[:, 0] + 1 == n).all()) and _affine(cols[:, 0]) is None:
        cut = _affine_pieces(rows, cols[:, 0])
        if len(cut) <= MAX_PIECES:
            pieces = cut
    out = []
    for a, b in pieces:
        part = allowed if allowed is None or allowed.shape[1] == 1 else allowed[:, a:b]
        any_key = None
        if part is not None:
            any_key = part.any(-1)
            if bool(any_key.all()):
                any_key = None
        seg = Segment(rows[a:b], cols[a:b], gb.prepared.block_q, gb.prepared.block_k, part, any_key)
        seg.row_step = _affine(seg.rows)
        if bool((seg.cols[:, -1] - seg.cols[:, 0] + 1 == n).all()):
            seg.col_step = _affine(seg.cols[:, 0])
        out.append(seg)
    return out


def _affine_pieces(rows: torch.Tensor, first: torch.Tensor) -> list[tuple[int, int]]:
    """Greedy cut of [0, m) into ranges where rows and first both move by fixed steps."""
    r, f = rows.tolist(), first.tolist()
    pieces, a = [], 0
    for j in range(1, len(r)):
        if j - a == 1:
            broken = f[j] < f[a]  # steps must be nonnegative
        else:
            broken = r[j] - r[j - 1] != r[a + 1] - r[a] or f[j] - f[j - 1] != f[a + 1] - f[a]
        if broken:
            pieces.append((a, j))
            a = j
    pieces.append((a, len(r)))
    return pieces


def _split_by_kind(gb: _GroupBlocks, rows, index, masked: bool) -> list[Segment]:
    """Segments over blocks `index` [m, n] (one shape of row): one mask when the
    rows' masks agree, a few when they fall into a few kinds, else one per row."""
    if not masked:
        return _segment(gb, rows, index, None)
    mi = gb.mask_index[index]
    kinds = torch.where(mi >= 0, gb.kind[mi.clamp(min=0)], -1) if gb.kind.numel() else mi
    unique, inverse = torch.unique(kinds, dim=0, return_inverse=True)
    m = rows.numel()
    if unique.shape[0] == 1:
        return _segment(gb, rows, index, gb.block_mask(index[:1]))
    if unique.shape[0] <= MAX_MASK_KINDS and m >= MIN_ROWS_PER_KIND * unique.shape[0]:
        out = []
        for u in range(unique.shape[0]):
            pick = inverse == u
            out.extend(_segment(gb, rows[pick], index[pick], gb.block_mask(index[pick][:1])))
        return out
    return _segment(gb, rows, index, gb.block_mask(index))


def _distinct_masks(gb: _GroupBlocks, index: torch.Tensor) -> int:
    mi = gb.mask_index[index]
    kinds = torch.where(mi >= 0, gb.kind[mi.clamp(min=0)], -1) if gb.kind.numel() else mi
    distinct = torch.unique(kinds, dim=0).shape[0]
    if distinct == 1 or (distinct <= MAX_MASK_KINDS and index.shape[0] >= MIN_ROWS_PER_KIND * distinct):
        return distinct
    return index.shape[0]


def _bucket(keys: torch.Tensor) -> list[torch.Tensor]:
    """Indices of equal rows of `keys` [r, c], one tensor per distinct row."""
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse)
    return list(torch.split(order, counts.tolist()))


def _row_blocks(gb: _GroupBlocks, rows: torch.Tensor, pick: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [m, n] of the blocks (all, or those where `pick`) of ascending `rows`,
    each of which has the same number n of them."""
    if pick is None:
        return gb.ptr[rows][:, None] + torch.arange(int(gb.counts[rows[0]]))
    member = torch.zeros(gb.num_rows, dtype=torch.bool)
    member[rows] = True
    index = torch.nonzero(member[gb.rows] & pick).flatten()
    return index.view(rows.numel(), -1)


@dataclass
class GroupPlan:
    """The segments of one head group, in order, and the query blocks that no
    segment writes first (they start from out = 0, lse = -inf)."""

    segments: list[Segment]
    init_rows: torch.Tensor


def build_plan(prepared: Prepared, group: int) -> GroupPlan:
    """The segments of one head group (see the module docstring)."""
    gb = _GroupBlocks(prepared, group)
    segments = _plan_segments(gb) if gb.rows.numel() else []
    covered = torch.zeros(gb.num_rows, dtype=torch.bool)
    written = torch.zeros(gb.num_rows, dtype=torch.bool)
    for seg in segments:
        seg.fresh = not bool(covered[seg.rows].any())
        covered[seg.rows] = True
        if seg.fresh:
            written[seg.rows] = True
    return GroupPlan(segments, torch.nonzero(~written).flatten())


def _plan_segments(gb: _GroupBlocks) -> list[Segment]:
    busy = torch.nonzero(gb.counts).flatten()
    partial = gb.mask_index >= 0
    # row shape: number of blocks, contiguous or not, which positions are partial
    width = int(gb.counts.max())
    slots = gb.ptr[busy][:, None] + torch.arange(width)
    inside = torch.arange(width)[None] < gb.counts[busy][:, None]
    flags = torch.where(inside, partial[slots.clamp(max=gb.rows.numel() - 1)].long(), 2)
    first = gb.cols[gb.ptr[busy]]
    last = gb.cols[gb.ptr[busy + 1] - 1]
    contiguous = (last - first + 1 == gb.counts[busy]).long()
    keys = torch.cat([gb.counts[busy][:, None], contiguous[:, None], flags], dim=1)
    segments: list[Segment] = []
    split_rows = []
    for pick in _bucket(keys):
        rows = busy[pick]
        index = _row_blocks(gb, rows)
        npart = int(partial[index[0]].sum())
        if npart == 0:
            segments.extend(_split_by_kind(gb, rows, index, masked=False))
            continue
        # one masked segment if its mask stays within MIXED_MASK_RATIO x the partial masks
        if _distinct_masks(gb, index) * index.shape[1] <= MIXED_MASK_RATIO * npart * rows.numel():
            segments.extend(_split_by_kind(gb, rows, index, masked=True))
        else:
            split_rows.append(rows)
    if split_rows:
        rows_all = torch.cat(split_rows)
        for want_partial in (False, True):
            pick = partial if want_partial else ~partial
            n_of = torch.zeros(gb.num_rows, dtype=torch.long).index_add_(0, gb.rows, pick.long())[rows_all]
            has = rows_all[n_of > 0]
            n_has = n_of[n_of > 0]
            for sub in _bucket(n_has[:, None]):
                rows = has[sub].sort().values
                index = _row_blocks(gb, rows, pick)
                segments.extend(_split_by_kind(gb, rows, index, masked=want_partial))
    return segments


def group_plan(prepared: Prepared, group: int) -> GroupPlan:
    """The plan of a head group, built once per `Prepared`."""
    plans = prepared.artifacts.cpu_plans
    if group not in plans:
        plans[group] = build_plan(prepared, group)
    return plans[group]
