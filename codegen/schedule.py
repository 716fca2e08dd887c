"""Exact block schedules, built in time that grows with the visited blocks.

For each distinct head pattern, the builder starts from one rectangle covering
all (query block, key block) pairs and labels it with `labels.classify`.
Rectangles proved empty are dropped, rectangles proved full are kept whole,
and the rest are split in four until single blocks remain; single blocks that
reasoning cannot decide are settled by evaluating the predicate on their
pairs.  The result stores, per query block, runs of consecutive key blocks that
are all full or all partial (CSR), so a sliding window costs O(query blocks).

Two shortcuts give the same runs in less time: a pattern that repeats along the
sequence labels one period of query blocks and reads the other rows off it
(`periodic`), and `random` blocks are relabelled where their draws land after
the pattern without them is built (`random_part`), instead of being isolated
rectangle by rectangle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from maskc.dsl import evaluate, ir

from . import labels, periodic, random_part
from .geometry import Geometry, ramp

EMPTY, PARTIAL, FULL = 0, 1, 2
# Block pairs evaluated at once when the predicate settles undecided blocks.
EVAL_CHUNK = 2048
# Patterns over call-time tensors with up to this many block pairs have every pair
# labelled in one pass (a constant bound: cost never grows with q_blocks x kv_blocks).
DIRECT_BLOCKS = 4096


@dataclass
class Runs:
    """Per row (query block), runs of key blocks [start, end) that are all full
    or all partial: CSR with `row_ptr` [rows + 1]."""

    row_ptr: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    full: torch.Tensor

    @property
    def rows(self) -> int:
        return self.row_ptr.numel() - 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.row_ptr, self.start, self.end, self.full))

    def visited(self) -> int:
        return int((self.end - self.start).sum())

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every visited block as (row, column, full), row-major."""
        lengths = (self.end - self.start).long()
        run_rows = torch.repeat_interleave(torch.arange(self.rows), (self.row_ptr[1:] - self.row_ptr[:-1]).long())
        rows = torch.repeat_interleave(run_rows, lengths)
        first = torch.repeat_interleave(self.start.long(), lengths)
        offset = torch.arange(rows.numel()) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        return rows, first + offset, torch.repeat_interleave(self.full, lengths)

    def to_dense(self, cols: int) -> torch.Tensor:
        out = torch.zeros(self.rows, cols, dtype=torch.int8)
        rows, columns, full = self.blocks()
        out[rows, columns] = torch.where(full, FULL, PARTIAL).to(torch.int8)
        return out


def runs_from_blocks(rows: torch.Tensor, cols: torch.Tensor, full: torch.Tensor, num_rows: int) -> Runs:
    """Group blocks into maximal runs of equal state within each row."""
    if rows.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int32)
        return Runs(torch.zeros(num_rows + 1, dtype=torch.int32), empty, empty, torch.zeros(0, dtype=torch.bool))
    order = torch.argsort(rows * (int(cols.max()) + 2) + cols)
    rows, cols, full = (torch.gather(x, 0, order) for x in (rows, cols, full))
    new_run = torch.ones(rows.numel(), dtype=torch.bool)
    new_run[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1) | (full[1:] != full[:-1])
    return runs_from_intervals(rows[new_run], cols[new_run], _run_ends(cols, new_run), full[new_run], num_rows)


def _run_ends(cols: torch.Tensor, new_run: torch.Tensor) -> torch.Tensor:
    last = torch.ones_like(new_run)
    last[:-1] = new_run[1:]
    return cols[last] + 1


def runs_from_intervals(rows, start, end, full, num_rows: int) -> Runs:
    """Runs (CSR by query block) of key-block intervals [start, end) given row by row, in order."""
    counts = torch.bincount(rows, minlength=num_rows)
    row_ptr = torch.zeros(num_rows + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(counts, 0)
    return Runs(row_ptr, start.to(torch.int32), end.to(torch.int32), full.to(torch.bool))


def _merge_intervals(rows, start, end, full, num_rows: int) -> Runs:
    """Sort disjoint row intervals and join neighbours of equal state."""
    if rows.numel() == 0:
        return runs_from_blocks(rows, start, full, num_rows)
    order = torch.argsort(rows * (int(end.max()) + 2) + start)
    rows, start, end, full = (torch.gather(x, 0, order) for x in (rows, start, end, full))  # faster than x[order]
    new_run = torch.ones(rows.numel(), dtype=torch.bool)
    new_run[1:] = (rows[1:] != rows[:-1]) | (start[1:] != end[:-1]) | (full[1:] != full[:-1])
    group = torch.cumsum(new_run.long(), 0) - 1
    run_end = torch.zeros(int(group[-1]) + 1, dtype=end.dtype).scatter_reduce_(
        0, group, end, "amax", include_self=False
    )
    return runs_from_intervals(rows[new_run], start[new_run], run_end, full[new_run], num_rows)


def build_runs(mask: ir.Mask, q: Geometry, k: Geometry, tensors: evaluate.Tensors | None) -> Runs:
    """Classify every block pair of one head pattern; see the module docstring."""
    if random_part.has_random(mask):
        drawn = random_part.drawn_blocks(mask, q, k)
        if drawn is not None:
            rest = build_runs(random_part.without_random(mask), q, k, tensors)
            return _relabel(rest, mask, q, k, *drawn, tensors)
    if not ir.is_dynamic(mask):
        found = periodic.periodic_runs(mask, q, k, partial(_label_sorted, mask))
        if found is not None:
            (row_ptr, start, end, full), tails = found
            if not tails:
                return Runs(row_ptr.int(), start, end, full)
            rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1), row_ptr[1:] - row_ptr[:-1])
            parts = [(rows, start.long(), end.long(), full), *tails]
            return _merge_intervals(*(torch.cat(p) for p in zip(*parts, strict=True)), q.num_blocks)
    return _merge_intervals(*_label_rect(mask, q, k, 0, q.num_blocks, 0, k.num_blocks, tensors), q.num_blocks)


def _relabel(runs: Runs, mask: ir.Mask, q: Geometry, k: Geometry, rows, cols, tensors) -> Runs:
    """`runs` with the given distinct blocks (sorted by row, column) labelled afresh."""
    width = k.num_blocks + 1
    run_rows = torch.repeat_interleave(torch.arange(runs.rows), (runs.row_ptr[1:] - runs.row_ptr[:-1]).long())
    kept = _punch(run_rows, runs.start.long(), runs.end.long(), runs.full, rows * width + cols, width)
    state = _label_blocks(mask, q, k, rows, cols, tensors)
    keep = state != EMPTY
    parts = [kept, (rows[keep], cols[keep], cols[keep] + 1, state[keep] == FULL)]
    return _merge_intervals(*(torch.cat(p) for p in zip(*parts, strict=True)), q.num_blocks)


def _punch(rows, start, end, full, holes: torch.Tensor, width: int):
    """Row intervals [start, end) minus the blocks `holes` (row * width + column, sorted)."""
    if holes.numel() == 0:
        return rows, start, end, full
    first = torch.searchsorted(holes, rows * width + start)
    count = torch.searchsorted(holes, rows * width + end) - first
    owner = torch.repeat_interleave(torch.arange(rows.numel()), count + 1)
    piece = ramp(count + 1)  # piece j runs from after hole j - 1 to before hole j
    column = holes % width
    at = first[owner] + piece
    left = torch.where(piece == 0, start[owner], column[(at - 1).clamp(min=0)] + 1)
    right = torch.where(piece == count[owner], end[owner], column[at.clamp(max=holes.numel() - 1)])
    keep = left < right
    return rows[owner][keep], left[keep], right[keep], full[owner][keep]


def _label_blocks(mask: ir.Mask, q: Geometry, k: Geometry, rows, cols, tensors) -> torch.Tensor:
    """Exact states of single blocks: by reasoning, else on their pairs."""
    label = labels.classify(mask, labels.Rects(q, k, rows, rows + 1, cols, cols + 1, tensors))
    state = torch.where(label == labels.F, FULL, torch.where(label == labels.E, EMPTY, PARTIAL)).to(torch.int8)
    unsure = (label == labels.N) | (label == labels.U)
    state[unsure] = settle(mask, q, k, rows[unsure], cols[unsure], tensors)
    return state


def _label_sorted(mask: ir.Mask, q: Geometry, k: Geometry, qb0: int, qb1: int, kb0: int, kb1: int):
    """Maximal runs of a rectangle of blocks of a static pattern, by row then start."""
    runs = _merge_intervals(*_label_rect(mask, q, k, qb0, qb1, kb0, kb1, None), q.num_blocks)
    rows = torch.repeat_interleave(torch.arange(runs.rows), (runs.row_ptr[1:] - runs.row_ptr[:-1]).long())
    return rows, runs.start.long(), runs.end.long(), runs.full


def _label_rect(mask, q: Geometry, k: Geometry, q0: int, q1: int, k0: int, k1: int, tensors):
    """(rows, start, end, full) intervals, unordered, of the blocks [q0, q1) x [k0, k1)
    that some pair visits: rectangles are split until proved empty or full, and single
    blocks still undecided are settled on their pairs."""
    if ir.is_dynamic(mask) and (q1 - q0) * (k1 - k0) <= DIRECT_BLOCKS:
        # rebuilt on every call and few blocks: label them all at once, not level by level
        qb0 = torch.arange(q0, q1).repeat_interleave(k1 - k0)
        kb0 = torch.arange(k0, k1).repeat(q1 - q0)
        qb1, kb1 = qb0 + 1, kb0 + 1
    else:
        qb0, qb1 = torch.tensor([q0]), torch.tensor([q1])
        kb0, kb1 = torch.tensor([k0]), torch.tensor([k1])
    kept: list[tuple] = []  # (qb0, qb1, kb0, kb1, full) rectangles of final state
    undecided: list[tuple[torch.Tensor, torch.Tensor]] = []
    while qb0.numel():
        label = labels.classify(mask, labels.Rects(q, k, qb0, qb1, kb0, kb1, tensors))
        single = (qb1 - qb0 == 1) & (kb1 - kb0 == 1)
        full = label == labels.F
        kept.append((qb0[full], qb1[full], kb0[full], kb1[full], True))
        mixed = single & (label == labels.M)
        kept.append((qb0[mixed], qb1[mixed], kb0[mixed], kb1[mixed], False))
        unsure = single & ((label == labels.N) | (label == labels.U))
        undecided.append((qb0[unsure], kb0[unsure]))
        split = ~single & (label != labels.E) & (label != labels.F)
        qb0, qb1, kb0, kb1 = _split(qb0[split], qb1[split], kb0[split], kb1[split])
    rows, starts, ends, fulls = [], [], [], []
    for a0, a1, c0, c1, is_full in kept:
        counts = a1 - a0
        rows.append(torch.repeat_interleave(a0, counts) + ramp(counts))
        starts.append(torch.repeat_interleave(c0, counts))
        ends.append(torch.repeat_interleave(c1, counts))
        fulls.append(torch.full((int(counts.sum()),), is_full, dtype=torch.bool))
    u_rows = torch.cat([u[0] for u in undecided])
    u_cols = torch.cat([u[1] for u in undecided])
    state = settle(mask, q, k, u_rows, u_cols, tensors)
    keep = state != EMPTY
    rows.append(u_rows[keep])
    starts.append(u_cols[keep])
    ends.append(u_cols[keep] + 1)
    fulls.append(state[keep] == FULL)
    return torch.cat(rows), torch.cat(starts), torch.cat(ends), torch.cat(fulls)


def _split(qb0, qb1, kb0, kb1):
    """Halve each rectangle along every side longer than one block."""
    qm = torch.where(qb1 - qb0 > 1, (qb0 + qb1) // 2, qb1)
    km = torch.where(kb1 - kb0 > 1, (kb0 + kb1) // 2, kb1)
    parts = [
        (qb0, qm, kb0, km),
        (qm, qb1, kb0, km),
        (qb0, qm, km, kb1),
        (qm, qb1, km, kb1),
    ]
    a0 = torch.cat([p[0] for p in parts])
    a1 = torch.cat([p[1] for p in parts])
    c0 = torch.cat([p[2] for p in parts])
    c1 = torch.cat([p[3] for p in parts])
    keep = (a1 > a0) & (c1 > c0)
    return a0[keep], a1[keep], c0[keep], c1[keep]


def pair_mask(
    mask: ir.Mask, q: Geometry, k: Geometry, rows, cols, tensors, per_batch: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allowed pairs [n, bq, bk] of the given blocks, and which pairs are real.
    Patterns over runtime tensors: the union over the batch, or with `per_batch`
    the pairs of each batch element, [batch, n, bq, bk]."""
    qp, qv = q.positions(rows)
    kp, kv = k.positions(cols)
    allowed = evaluate.mask(mask, qp[:, :, None], kp[:, None, :], tensors or _no_tensors())
    if allowed.dim() == 4 and not per_batch:  # a block is as busy as its busiest batch
        allowed = allowed.any(0)
    return allowed, qv[:, :, None] & kv[:, None, :]


def settle(mask: ir.Mask, q: Geometry, k: Geometry, rows, cols, tensors) -> torch.Tensor:
    """Exact states of single blocks by evaluating the predicate on their pairs."""
    state = torch.zeros(rows.numel(), dtype=torch.int8)
    for i in range(0, rows.numel(), EVAL_CHUNK):
        allowed, valid = pair_mask(mask, q, k, rows[i : i + EVAL_CHUNK], cols[i : i + EVAL_CHUNK], tensors, True)
        if allowed.dim() == 3:
            allowed = allowed[None]
        # visited if some batch element has a pair there; full only if every batch element allows every pair
        some = (allowed & valid).flatten(2).any(2).any(0)
        every = (allowed | ~valid).flatten(2).all(2).all(0)
        state[i : i + EVAL_CHUNK] = torch.where(every, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8)
    return state


def _no_tensors() -> evaluate.Tensors:
    return evaluate.Tensors({}, None)


@dataclass
class BlockSchedule:
    """Which key blocks each query block visits, per distinct head pattern.

    `groups[head_group[h]]` holds head h's runs.  Block b of the queries holds
    the tokens `perm_q[b*block_q : (b+1)*block_q]` when the schedule carries a
    layout permutation (`perm_q` is not None), else tokens b*block_q onwards.
    """

    lq: int
    lk: int
    block_q: int
    block_k: int
    head_group: list[int]
    groups: list[Runs]
    patterns: list[ir.Mask]
    q_geometry: Geometry
    k_geometry: Geometry
    tensors: evaluate.Tensors | None = None
    layout: str = "rowmajor"
    _transposed: list[Runs] | None = field(default=None, repr=False)

    @property
    def num_q_blocks(self) -> int:
        return self.q_geometry.num_blocks

    @property
    def num_k_blocks(self) -> int:
        return self.k_geometry.num_blocks

    @property
    def perm_q(self) -> torch.Tensor | None:
        return self.q_geometry.perm

    @property
    def perm_k(self) -> torch.Tensor | None:
        return self.k_geometry.perm

    @property
    def heads(self) -> int:
        return len(self.head_group)

    def to_dense(self) -> torch.Tensor:
        """int8 [heads, q_blocks, kv_blocks]: 0 empty, 1 partial, 2 full (tests, pictures)."""
        per_group = [g.to_dense(self.num_k_blocks) for g in self.groups]
        return torch.stack([per_group[g] for g in self.head_group])

    def visited_blocks(self) -> int:
        """Visited (query block, key block) pairs summed over heads."""
        per_group = [g.visited() for g in self.groups]
        return sum(per_group[g] for g in self.head_group)

    @property
    def nbytes(self) -> int:
        total = sum(g.nbytes for g in self.groups)
        if self._transposed is not None:
            total += sum(g.nbytes for g in self._transposed)
        for perm in (self.perm_q, self.perm_k):
            if perm is not None:
                total += perm.numel() * perm.element_size()
        return total

    def transposed(self) -> list[Runs]:
        """Per key block, the runs of query blocks that visit it (for dK/dV)."""
        if self._transposed is None:
            out = []
            for g in self.groups:
                rows, cols, full = g.blocks()
                out.append(runs_from_blocks(cols, rows, full, self.num_k_blocks))
            self._transposed = out
        return self._transposed

    def transposed_dense(self) -> torch.Tensor:
        per_group = [g.to_dense(self.num_q_blocks) for g in self.transposed()]
        return torch.stack([per_group[g] for g in self.head_group])

    def allowed_pairs(self) -> int:
        """Allowed (query, key) pairs summed over heads, counted block by block."""
        per_group = []
        for runs, pattern in zip(self.groups, self.patterns, strict=True):
            rows, cols, full = runs.blocks()
            qv = self._valid(self.q_geometry, rows)
            kv = self._valid(self.k_geometry, cols)
            total = int((qv * kv)[full].sum())
            partial = ~full
            prow, pcol = rows[partial], cols[partial]
            for i in range(0, prow.numel(), EVAL_CHUNK):
                allowed, valid = pair_mask(
                    pattern,
                    self.q_geometry,
                    self.k_geometry,
                    prow[i : i + EVAL_CHUNK],
                    pcol[i : i + EVAL_CHUNK],
                    self.tensors,
                )
                if allowed.dim() == 4:  # average over the batch
                    total += int((allowed & valid).sum()) / allowed.shape[0]
                else:
                    total += int((allowed & valid).sum())
            per_group.append(total)
        return sum(per_group[g] for g in self.head_group)

    @staticmethod
    def _valid(geometry: Geometry, blocks: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(geometry.length - blocks * geometry.block, max=geometry.block)).long()

    def efficiency(self) -> float:
        """Allowed pairs / pairs in visited blocks (1.0: no wasted work)."""
        visited = 0
        for h in range(self.heads):
            rows, cols, _ = self.groups[self.head_group[h]].blocks()
            visited += int((self._valid(self.q_geometry, rows) * self._valid(self.k_geometry, cols)).sum())
        return self.allowed_pairs() / visited if visited else 1.0


def build_schedule(
    patterns: list[ir.Mask],
    head_group: list[int],
    lq: int,
    lk: int,
    q_offset: int,
    block_q: int,
    block_k: int,
    perm: torch.Tensor | None = None,
    tensors: evaluate.Tensors | None = None,
    layout: str = "rowmajor",
    perm_k: torch.Tensor | None = None,
) -> BlockSchedule:
    """`perm` reorders queries (and keys, unless `perm_k` reorders them differently)."""
    q = Geometry(lq, block_q, q_offset, perm)
    k = Geometry(lk, block_k, 0, perm if perm_k is None else perm_k)
    groups = [build_runs(p, q, k, tensors) for p in patterns]
    return BlockSchedule(lq, lk, block_q, block_k, list(head_group), groups, list(patterns), q, k, tensors, layout)
