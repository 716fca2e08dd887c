"""The documented deterministic generator behind `random(r, block = b, seed = x)`.

For query block qb of head h, the eligible key blocks are those in
[lo, hi) with |kb - qb| >= skip (skip = 0: all of them), in increasing order;
call them e(0) < e(1) < ... < e(n-1).  If r >= n all are kept.  Otherwise
Robert Floyd's sampling picks r distinct indices:

    S = {}
    for j in n-r .. n-1:
        t = u(seed, h, qb, j) mod (j + 1)
        S = S + {j} if t in S else S + {t}

and the kept blocks are {e(t) : t in S}.  `u` chains the 32-bit "lowbias32"
integer hash (Chris Wellons): u = H(H(H(H(seed) ^ h) ^ qb) ^ j), each input
taken modulo 2**32.  Every query block is drawn independently, so a schedule
can draw only the rows it needs, and any language can reproduce the stream.
"""

from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # Split the constant so no intermediate product exceeds 2**48 (no int64 overflow).
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_bits(seed: int, head: int, qb: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    h = lowbias32(torch.tensor(seed & _MASK, dtype=torch.int64))
    h = lowbias32(h ^ (head & _MASK))
    h = lowbias32(h ^ (qb & _MASK))
    return lowbias32(h ^ (j & _MASK))


def draw(
    qb: torch.Tensor,
    count: int,
    seed: int,
    head: int,
    lo: int,
    hi: int,
    skip: int,
) -> torch.Tensor:
    """Key blocks kept by each query block in `qb` ([n] int64): [n, r'] int64,
    r' = min(count, eligible); -1 pads rows with fewer eligible blocks."""
    qb = qb.to(torch.int64)
    # The excluded interval [ex_lo, ex_hi) around qb, clipped to [lo, hi).
    ex_lo = torch.clamp(qb - skip + 1, lo, hi) if skip > 0 else torch.full_like(qb, lo)
    ex_hi = torch.clamp(qb + skip, lo, hi) if skip > 0 else torch.full_like(qb, lo)
    ex_hi = torch.maximum(ex_hi, ex_lo)
    eligible = (hi - lo) - (ex_hi - ex_lo)
    width = min(count, max(hi - lo, 0))
    out = torch.full((qb.numel(), width), -1, dtype=torch.int64)
    if width == 0:
        return out
    # Rows with at most `count` eligible blocks keep all of them.
    take_all = eligible <= count
    ar = torch.arange(width, dtype=torch.int64)
    chosen = torch.where(ar[None, :] < eligible[:, None], ar[None, :], out)
    # Floyd's algorithm for the others, vectorised over rows (j counts from n - r).
    sampled = torch.full((qb.numel(), width), -1, dtype=torch.int64)
    for step in range(width):
        j = eligible - count + step  # per row
        t = uniform_bits(seed, head, qb, j) % (j + 1).clamp(min=1)
        seen = (sampled[:, :step] == t[:, None]).any(1) if step else torch.zeros_like(take_all)
        sampled[:, step] = torch.where(seen, j, t)
    chosen = torch.where(take_all[:, None], chosen, sampled)
    # Index among eligible blocks -> block number, stepping over the excluded interval.
    block = lo + chosen
    block = torch.where(block >= ex_lo[:, None], block + (ex_hi - ex_lo)[:, None], block)
    out = torch.where(chosen >= 0, block, out)
    return out
