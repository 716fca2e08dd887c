"""Schedules of shift-invariant patterns from one period of query blocks.

A pattern built only from offsets (`window`, `causal`, `dilated`, `stride`, frame
windows on a grid) allows (q, k) exactly when it allows (q + P, k + P), for P a
common multiple of its coordinates' divisors and moduli and of both block sizes.
Complete query block qb = r + m * (P / block_q) then sees key block kb exactly as
query block r + M * (P / block_q) sees kb + (M - m) * (P / block_k), for any M >= m.
So the builder labels only the last period of query rows against a key range
stretched by M periods (its cost does not grow with the number of periods), and
each complete row is a window of its representative's runs.  A last query or key
block cut short by the length is labelled directly, as its missing tokens break
the shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from maskc.dsl import ir

from .geometry import Geometry

# Below this many periods of query blocks the plain builder is as cheap.
MIN_PERIODS = 3


def shift_period(mask: ir.Mask) -> int | None:
    """The smallest P > 0 (tokens) with mask(q + P, k + P) == mask(q, k) that this
    module can prove from the atoms, or None when some atom is not shift-invariant."""
    period = 1
    for node in ir.walk(mask):
        if isinstance(node, (ir.And, ir.Or, ir.Not, ir.Const)):
            continue
        if not isinstance(node, (ir.Offset, ir.OffsetMod)):
            return None
        coord = node.coord
        # (p % mod) // div repeats every mod tokens; p // div moves by one every div tokens,
        # which an offset between two such coordinates does not see.
        period = math.lcm(period, coord.mod if coord.mod is not None else coord.div)
    return period


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
    last = (nq - 1) // sq  # periods before the representatives
    vq = Geometry(sq * q.block, q.block, q.offset + last * period)
    vk = Geometry((nk + last * sk) * k.block, k.block, k.offset)
    v_rows, v_start, v_end, v_full = label(vq, vk, 0, sq, 0, vk.num_blocks)
    # row qb = r + m * sq reads its representative r's runs over [shift, shift + nk)
    qb = torch.arange(nq)
    rep = qb % sq
    shift = (last - qb // sq) * sk
    width = vk.num_blocks + 1
    first = torch.searchsorted(v_rows * width + v_end, rep * width + shift, right=True)
    stop = torch.searchsorted(v_rows * width + v_start, rep * width + shift + nk)
    counts = stop - first
    row_ptr = torch.zeros(nq + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    # run j of the output is run j + (first - row_ptr) of the representatives, moved left by shift
    idx = torch.arange(int(row_ptr[-1]), dtype=torch.int32)
    idx += torch.repeat_interleave((first - row_ptr[:-1]).int(), counts)
    run_shift = torch.repeat_interleave(shift.int(), counts)
    start = v_start.int()[idx] - run_shift
    end = v_end.int()[idx] - run_shift
    ne = counts > 0  # only a row's first run can start left of 0, only its last end past nk
    start[row_ptr[:-1][ne]] = start[row_ptr[:-1][ne]].clamp(min=0)
    end[row_ptr[1:][ne] - 1] = end[row_ptr[1:][ne] - 1].clamp(max=nk)
    tails = []  # blocks cut short: the last key block of complete rows, then a last row of queries
    if nk < k.num_blocks:
        tails.append(label(q, k, 0, nq, nk, k.num_blocks))
    if nq < q.num_blocks:
        tails.append(label(q, k, nq, q.num_blocks, 0, k.num_blocks))
    return (row_ptr, start, end, v_full[idx]), tails
