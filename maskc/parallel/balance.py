"""Which rank computes which query blocks: contiguous, zigzag, or balanced by cost.

Every function takes per-block costs (numpy, one entry per query block) and the
world size, and returns the owning rank of each block.  All are deterministic
(stable sorts, lowest rank on ties), so every process computes the same answer.

"blocks" cuts the sequence into `chunks` contiguous runs per rank and deals the
runs out greedily, most expensive first, to the least loaded rank that still has
room, trying 1, 2, 4, ... runs per rank and keeping the coarsest dealing within
`BALANCE_TOLERANCE` of perfect: coarse runs keep neighbours on one rank, so local
patterns (windows, neighborhoods) receive few remote blocks.  Each rank gets the
same number of blocks, to within one.  `base` (optional, per rank) is load a rank
carries before any block is dealt (pieces of split rows computed where their keys
live, maskc/parallel/plan.py).
"""

from __future__ import annotations

import numpy as np

BALANCES = ("blocks", "contiguous", "zigzag")
# Stop refining once max/mean cost is within this of 1: finer dealing balances better
# but scatters neighbours over ranks, and so moves more blocks (a causal window of
# 4096 at 128K on 8 ranks: contiguous is within 1.016 and receives 16 MiB a rank;
# the next finer dealing, 448 MiB, all of ring attention's).
BALANCE_TOLERANCE = 1.02


def contiguous(num_blocks: int, world: int) -> np.ndarray:
    """Rank r holds one run of blocks; the last `num_blocks % world` runs are one block longer
    (the last block may be short)."""
    sizes = np.full(world, num_blocks // world)
    sizes[world - num_blocks % world :] += 1
    return np.repeat(np.arange(world), sizes)


def zigzag(num_blocks: int, world: int) -> np.ndarray:
    """Ring attention's causal balance: 2P runs, rank r holds runs r and 2P - 1 - r."""
    if num_blocks < 2 * world:
        return contiguous(num_blocks, world)
    run = contiguous(num_blocks, 2 * world)
    return np.where(run < world, run, 2 * world - 1 - run)


def _units(num_blocks: int, world: int, per_rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous units [start, end): world * per_rank runs of equal length, plus the
    leftover blocks as single-block units spread evenly between them."""
    runs = world * per_rank
    length = num_blocks // runs
    left = num_blocks - runs * length
    sizes = np.full(runs, length)
    # a single block after run i for each leftover block, spread evenly
    after = (np.arange(left) * runs) // max(left, 1)
    is_single = np.zeros(runs + left, dtype=bool)
    is_single[after + np.arange(left)] = True
    all_sizes = np.ones(runs + left, dtype=np.int64)
    all_sizes[~is_single] = sizes
    ends = np.cumsum(all_sizes)
    return ends - all_sizes, ends, is_single


def deal(cost: np.ndarray, world: int, per_rank: int, base: np.ndarray | None = None) -> np.ndarray:
    """Owner of each block when units (see `_units`) are dealt greedily by cost."""
    num_blocks = cost.size
    starts, ends, single = _units(num_blocks, world, per_rank)
    prefix = np.concatenate([[0.0], np.cumsum(cost)])
    unit_cost = prefix[ends] - prefix[starts]
    load = np.zeros(world) if base is None else np.array(base, dtype=np.float64)
    owner_of_unit = np.empty(starts.size, dtype=np.int64)
    # runs first (each rank takes per_rank of them), then single blocks: the first
    # world * (left // world) at most left // world per rank, the rest at most one more
    runs = np.flatnonzero(~single)
    singles = np.flatnonzero(single)
    for units, cap_first, cap_rest, first in (
        (runs, per_rank, per_rank, runs.size),
        (singles, singles.size // world, singles.size // world + 1, world * (singles.size // world)),
    ):
        taken = np.zeros(world, dtype=np.int64)
        order = units[np.argsort(-unit_cost[units], kind="stable")]
        for i, u in enumerate(order):
            cap = cap_first if i < first else cap_rest
            room = taken < cap
            r = int(np.argmin(np.where(room, load, np.inf)))
            owner_of_unit[u] = r
            load[r] += unit_cost[u]
            taken[r] += 1
    return np.repeat(owner_of_unit, ends - starts)


def imbalance(cost: np.ndarray, owner: np.ndarray, world: int, base: np.ndarray | None = None) -> float:
    """max / mean of the per-rank cost (1.0: perfect; an all-zero cost counts as balanced)."""
    per_rank = np.bincount(owner, weights=cost, minlength=world)
    if base is not None:
        per_rank = per_rank + base
    mean = per_rank.mean()
    return float(per_rank.max() / mean) if mean > 0 else 1.0


def balanced(cost: np.ndarray, world: int, base: np.ndarray | None = None,
             order: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """The coarsest greedy dealing within BALANCE_TOLERANCE (else the best one tried).
    `order`: the blocks' order for dealing contiguous runs (default: their own)."""
    if order is not None:
        owner = np.empty(cost.size, dtype=np.int64)
        owner[order] = balanced(cost[order], world, base)
        return owner
    best, best_score = None, np.inf
    per_rank = 1
    while world * per_rank <= cost.size:
        owner = deal(cost, world, per_rank, base)
        score = imbalance(cost, owner, world, base)
        if score < best_score - 1e-12:
            best, best_score = owner, score
        if score <= BALANCE_TOLERANCE:
            break
        per_rank *= 2
    return best


def assign(balance: str, cost: np.ndarray, world: int) -> np.ndarray:
    if balance == "contiguous":
        return contiguous(cost.size, world)
    if balance == "zigzag":
        return zigzag(cost.size, world)
    return balanced(cost, world)
