"""Schedules of patterns that repeat along the sequence, from one period of query blocks.

Take P a common multiple of both block sizes and of the pattern's coordinate moduli and
divisors.  Atoms on coordinates that wrap every P tokens (`p % m`, m | P: positions in a
frame or a row) do not see whole periods.  Offsets between unwrapped coordinates
(`window`, `causal`, `dilated`, `stride`, frame windows) allow (q, k) exactly when they
allow (q + P, k + P).  A NATTEN neighborhood on the coordinate p // P keeps a window of
constant width whose start S(m) moves with the query's period m (clamped at the ends), so
it allows (q, k) exactly when it allows (q + j P, k + (S(m + j) - S(m)) P).  When all the
unwrapped atoms agree on S (offsets: S(m) = m), complete query block qb = r + m * (P /
block_q) sees key block kb exactly as query block r + m* (P / block_q) sees kb + (S(m*) -
S(m)) (P / block_k), with S(m*) the largest.  So the builder labels one period of query
rows against a key range stretched by S(m*) - min S periods (its cost does not grow with
the number of periods), and each complete row is a window of its representative's runs.
A last query or key block cut short by the length is labelled directly, as its missing
tokens break the shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from maskc.dsl import ir
from maskc.dsl.evaluate import neighborhood_window

from .geometry import Geometry

# Below this many periods of query blocks the plain builder is as cheap.
MIN_PERIODS = 3


def shift_period(mask: ir.Mask) -> int | None:
    """The smallest common multiple P of the atoms' coordinate moduli and divisors, or None
    when some atom is neither an offset, a neighborhood, nor a position set on a wrapping
    coordinate (those can shift with the sequence)."""
    period = 1
    for node in ir.walk(mask):
        if isinstance(node, (ir.And, ir.Or, ir.Not, ir.Const)):
            continue
        wraps = node.coord.mod is not None if hasattr(node, "coord") else False
        if not isinstance(node, (ir.Offset, ir.OffsetMod, ir.Neighborhood)) and not (
            isinstance(node, ir.PosSet) and wraps
        ):
            return None
        coord = node.coord
        period = math.lcm(period, coord.mod if wraps else coord.div)
    return period


def window_starts(mask: ir.Mask, period: int, offset: int, periods: int) -> torch.Tensor | None:
    """S(m) for query periods m = 0 .. periods - 1 of queries starting at absolute position
    `offset`, or None when the unwrapped atoms do not move together; see the module docstring."""
    first, misaligned = divmod(offset, period)
    starts = None
    for node in ir.walk(mask):
        coord = getattr(node, "coord", None)
        if coord is None or coord.mod is not None:
            continue  # a wrapping coordinate: any whole number of periods on either side
        if isinstance(node, ir.Neighborhood):
            if coord.div != period or misaligned or node.dilation != 1 or not 0 <= first <= coord.size - periods:
                return None
            v = torch.arange(coord.size)
            start, end = neighborhood_window(v, torch.tensor(coord.size), node.window, node.stride, node.causal)
            if not bool((end - start == node.window).all()):
                return None
            moved = start[first : first + periods]
        else:
            moved = torch.arange(periods)
        moved = moved - moved[0]
        if starts is not None and not torch.equal(starts, moved):
            return None
        starts = moved
    return torch.zeros(periods, dtype=torch.long) if starts is None else starts


def periodic_runs(mask: ir.Mask, q: Geometry, k: Geometry, label: Callable):
    """((row_ptr, start, end, full), tails), or None when the pattern is not shift-invariant
    or spans too few periods to gain.  The first part holds the maximal runs of the complete
    query blocks over the complete key blocks, CSR by row (start, end int32); `tails` the
    (rows, start, end, full) runs of the rest.  `label(q, k, qb0, qb1, kb0, kb1)` gives the
    maximal runs of a rectangle of blocks as (rows, start, end, full) sorted by row and start."""
    if q.perm is not None or k.perm is not None:
        return None
    period = shift_period(mask)
    if period is None:
        return None
    period = math.lcm(period, q.block, k.block)
    sq, sk = period // q.block, period // k.block
    nq, nk = q.length // q.block, k.length // k.block  # complete blocks
    if nq < MIN_PERIODS * sq or nk == 0:
        return None
    periods = -(-nq // sq)
    starts = window_starts(mask, period, q.offset, periods)
    if starts is None:
        return None
    rep = int(torch.argmax(starts))
    low = int(starts.min())
    vq = Geometry(sq * q.block, q.block, q.offset + rep * period)
    vk = Geometry((nk + (int(starts[rep]) - low) * sk) * k.block, k.block, k.offset)
    v_rows, v_start, v_end, v_full = label(vq, vk, 0, sq, 0, vk.num_blocks)
    # row qb = r + m * sq reads its representative r's runs over [shift, shift + nk)
    qb = torch.arange(nq)
    row = qb % sq
    shift = (starts[rep] - starts[qb // sq]) * sk
    width = vk.num_blocks + 1
    first = torch.searchsorted(v_rows * width + v_end, row * width + shift, right=True)
    stop = torch.searchsorted(v_rows * width + v_start, row * width + shift + nk)
    counts = stop - first
    row_ptr = torch.zeros(nq + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    # run j of the output is run j + (first - row_ptr) of the representatives, moved left by shift
    # (torch.gather: several times faster than indexing with a tensor on CPU)
    idx = torch.arange(int(row_ptr[-1]))
    idx += torch.repeat_interleave(first - row_ptr[:-1], counts)
    run_shift = torch.repeat_interleave(shift.int(), counts)
    start = torch.gather(v_start.int(), 0, idx) - run_shift
    end = torch.gather(v_end.int(), 0, idx) - run_shift
    ne = counts > 0  # only a row's first run can start left of 0, only its last end past nk
    start[row_ptr[:-1][ne]] = start[row_ptr[:-1][ne]].clamp(min=0)
    end[row_ptr[1:][ne] - 1] = end[row_ptr[1:][ne] - 1].clamp(max=nk)
    tails = []  # blocks cut short: the last key block of complete rows, then a last row of queries
    if nk < k.num_blocks:
        tails.append(label(q, k, 0, nq, nk, k.num_blocks))
    if nq < q.num_blocks:
        tails.append(label(q, k, nq, q.num_blocks, 0, k.num_blocks))
    return (row_ptr, start, end, torch.gather(v_full, 0, idx)), tails
