"""A context-parallel plan: which rank holds which tokens, and which key blocks move.

The plan is made from the program's exact block schedule (blocks of `block`
tokens on both sides), so it is the same on every process that makes it with the
same arguments.  Query blocks go to ranks by `balance` (maskc/parallel/balance.py);
when lq == lk each rank holds the key blocks of its query blocks (a token's query,
key and value live together), otherwise keys are cut into `world` contiguous runs
of equal length.  For each rank the plan lists the remote key blocks its queries
visit, in (owner, block) order: what one all-to-all must bring, each block once.

Rows too heavy for one rank are split.  BigBird's global query blocks attend
every key: the rank holding one would do a whole row of work (more than its
share once there are many ranks) and receive all KV.  When dealing whole rows
cannot balance (`balance="blocks"` only), query blocks costing more than
SPLIT_OUTLIER times the median row are *split*: each rank holding keys of such
a row computes the row's attention over its own keys (its queries are sent
there: one block of q, not many blocks of KV), and the owner merges the pieces
by log-sum-exp.  `plan.split` lists them; `plan.guests[r]` the split blocks of
other ranks whose piece rank r computes, in (owner, block) order.

Which dealing: "blocks" tries a few and keeps, among those within
BALANCE_TOLERANCE, the one whose busiest rank receives least (else the best
balanced): whole runs of blocks in sequence order (and split rows), contiguous
and zigzag shards, and on a row-major grid the same dealing in block orders
whose runs are boxes of the grid — a range of one inner axis across the outer
ones, or m x n tiles of two axes (a video cut by time and by position within
the frame), so that neighborhoods and bands in other frames stay at home.

Patterns that read q and k (route, cluster) have no schedule until called: their
plan shards blocks contiguously (uniform cost) and each call lists the blocks to
move from the call's q and k (`with_schedule`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from maskc.codegen.schedule import BlockSchedule
from maskc.dsl import ir
from maskc.dsl.errors import MaskError

from . import balance as balancing

# Cost of a partial block relative to a full one in the CPU executor: a partial
# block also evaluates its mask.  Measured with `bench/context_parallel.py weights`
# (forward + backward, float32, 64 x 64 blocks, head dim 64, one thread, L = 4096):
# 555 us per partial block (`keys(% 2 == 0)`) against 421 us per full one (`all`), 1.32.
PARTIAL_BLOCK_COST = 1.3
FULL_BLOCK_COST = 1.0
# A query block is split over the ranks holding its keys when its cost exceeds this
# many times the median row's (and whole rows cannot be dealt within BALANCE_TOLERANCE).
SPLIT_OUTLIER = 4.0
# Tokens per block when the plan is not told: the CPU executor's tile (runtime/tuning.py).
DEFAULT_BLOCK = 64


def block_lengths(blocks: np.ndarray, length: int, block: int) -> np.ndarray:
    """Tokens in each listed block of a side of `length` tokens (the last block may be short)."""
    return np.minimum(block, length - np.asarray(blocks) * block)


def reads_qk(program, lq: int, lk: int, heads: int, sizes: dict) -> bool:
    """Whether the pattern's schedule depends on the contents of q and k."""
    instance = program.instantiate(lq, lk, heads=heads, **sizes)
    return any(ir.reads_qk(p.mask) for p in instance.patterns)


@dataclass
class Plan:
    """Where tokens live and which key blocks each rank receives; see the module docstring."""

    lq: int
    lk: int
    block: int
    world: int
    heads: int
    balance: str
    q_owner: np.ndarray  # rank of each query block
    k_owner: np.ndarray  # rank of each key block
    schedule: BlockSchedule | None  # None until called, for patterns that read q and k
    bindings: dict  # sizes and tensors the schedule was made with
    source: str  # the program's text, part of the fingerprint
    rank: int | None = None  # the rank this process is (None: a simulation)
    recv: list[np.ndarray] = field(default_factory=list)  # per rank: remote key blocks, (owner, block) order
    split: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # query blocks split by keys
    guests: list[np.ndarray] = field(default_factory=list)  # per rank: others' split blocks it computes a piece of
    cost: np.ndarray | None = None  # per rank: weighted visited blocks
    visited: np.ndarray | None = None  # per rank: visited blocks summed over heads
    kernels: dict = field(default_factory=dict, repr=False)  # prepared global schedules (ContextParallel)
    group: object = field(default=None, repr=False)  # the process group the plan was made for (None: the world)

    # ------------------------------------------------------------ blocks and tokens

    @property
    def perm(self) -> torch.Tensor | None:
        """The schedule's token order (tiled grids), shared by queries and keys, or None."""
        return None if self.schedule is None else self.schedule.perm_q

    @property
    def num_q_blocks(self) -> int:
        return self.q_owner.size

    @property
    def num_k_blocks(self) -> int:
        return self.k_owner.size

    def q_blocks(self, rank: int) -> np.ndarray:
        return np.flatnonzero(self.q_owner == rank)

    def k_blocks(self, rank: int) -> np.ndarray:
        return np.flatnonzero(self.k_owner == rank)

    def buffer_blocks(self, rank: int) -> np.ndarray:
        """The key blocks rank's KV buffer holds after the exchange: its own, then those received."""
        return np.concatenate([self.k_blocks(rank), self.recv[rank]])

    def sends(self, rank: int) -> list[np.ndarray]:
        """Per destination, the key blocks `rank` sends it, in increasing order."""
        return [r[self.k_owner[r] == rank] for r in self.recv]

    def split_sends(self, rank: int) -> list[np.ndarray]:
        """Per helper, the split query blocks of `rank` whose piece it computes (increasing):
        their queries go there, and their partial results come back in the same order."""
        return [g[self.q_owner[g] == rank] for g in self.guests]

    def block_tokens(self, blocks: np.ndarray, length: int) -> torch.Tensor:
        """Token indices (original order) of the given blocks, concatenated."""
        b = torch.as_tensor(blocks, dtype=torch.long)
        index = (b[:, None] * self.block + torch.arange(self.block)[None, :]).flatten()
        index = index[index < length]
        return index if self.perm is None else self.perm[index]

    def q_tokens(self, rank: int) -> torch.Tensor:
        return self.block_tokens(self.q_blocks(rank), self.lq)

    def k_tokens(self, rank: int) -> torch.Tensor:
        return self.block_tokens(self.k_blocks(rank), self.lk)

    def block_lengths(self, blocks: np.ndarray, length: int) -> np.ndarray:
        return block_lengths(blocks, length, self.block)

    def _this_rank(self) -> int:
        if self.rank is None:
            raise MaskError("this plan was made for simulation (no process group): shard and unshard need a rank")
        return self.rank

    @property
    def local_positions(self) -> torch.Tensor:
        """The token positions (0 .. lq - 1) of this rank's queries, in local order."""
        return self.q_tokens(self._this_rank())

    @property
    def local_key_positions(self) -> torch.Tensor:
        """The token positions (0 .. lk - 1) of this rank's keys and values, in local order."""
        return self.k_tokens(self._this_rank())

    def shard(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """This rank's tokens of a full tensor ([batch, heads, len, dim]; `dim` is the token axis).
        A length of lq takes query tokens, of lk key tokens."""
        rank, length = self._this_rank(), x.shape[dim]
        if length == self.lq:
            return x.index_select(dim, self.q_tokens(rank).to(x.device))
        if length == self.lk:
            return x.index_select(dim, self.k_tokens(rank).to(x.device))
        raise MaskError(
            f"shard: the token axis (dim {dim}) has {length} tokens; the plan is for lq={self.lq}, lk={self.lk}"
        )

    def unshard(self, x_local: torch.Tensor, *, keys: bool = False, group=None, dim: int = 2) -> torch.Tensor:
        """The full tensor from every rank's shard (an all-gather over the plan's group; not
        differentiable).  `keys=True` for key-side tensors when lq != lk."""
        import torch.distributed as dist

        group = self.group if group is None else group
        length = self.lk if keys else self.lq
        tokens = [self.k_tokens(r) if keys else self.q_tokens(r) for r in range(self.world)]
        rank = self._this_rank()
        if x_local.shape[dim] != tokens[rank].numel():
            raise MaskError(f"unshard: rank {rank} holds {tokens[rank].numel()} tokens, got {x_local.shape[dim]}")
        longest = max(t.numel() for t in tokens)
        moved = x_local.detach().movedim(dim, 0)
        padded = torch.zeros((longest, *moved.shape[1:]), dtype=moved.dtype, device=moved.device)
        padded[: moved.shape[0]] = moved
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        out = torch.empty((length, *moved.shape[1:]), dtype=moved.dtype, device=moved.device)
        for r, t in enumerate(tokens):
            out[t.to(out.device)] = parts[r][: t.numel()]
        return out.movedim(0, dim)

    # ------------------------------------------------------------ identity

    def fingerprint(self) -> int:
        """A 63-bit digest of everything the ranks must agree on (compared by all-reduce)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(repr((self.lq, self.lk, self.block, self.world, self.heads, self.balance, self.source)).encode())
        for name in sorted(self.bindings):
            value = self.bindings[name]
            h.update(name.encode())
            if isinstance(value, torch.Tensor):
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
            else:
                h.update(repr(value).encode())
        h.update(self.q_owner.tobytes())
        h.update(self.k_owner.tobytes())
        h.update(np.asarray(self.split, dtype=np.int64).tobytes())
        for r in self.recv:
            h.update(np.int64(r.size).tobytes())
            h.update(r.tobytes())
        return int.from_bytes(h.digest(), "little") >> 1

    def with_schedule(self, schedule: BlockSchedule) -> Plan:
        """The same sharding with the exchange lists of another schedule (a call's route or clusters)."""
        recv, guests, cost, visited = exchange_lists(schedule, self.q_owner, self.k_owner, self.world, self.split)
        return replace(self, schedule=schedule, recv=recv, guests=guests, cost=cost, visited=visited, kernels={})


# ---------------------------------------------------------------- making a plan


def _run_rows(runs) -> np.ndarray:
    """The query block of each run of a CSR `Runs`."""
    counts = np.diff(runs.row_ptr.numpy())
    return np.repeat(np.arange(counts.size), counts)


def block_cost(schedule: BlockSchedule) -> tuple[np.ndarray, np.ndarray]:
    """Per query block, (weighted cost, visited blocks), summed over heads (run by run, never
    expanding runs into blocks)."""
    reach = reach_of(schedule)
    return reach.cost, reach.visited


@dataclass(frozen=True)
class Reach:
    """What a plan needs of a schedule, computed once for all the dealings it compares: the
    key-block intervals each query block visits (adjacent runs merged, per head group) and
    each query block's weighted cost and visited blocks."""

    rows: np.ndarray
    start: np.ndarray
    end: np.ndarray
    cost: np.ndarray
    visited: np.ndarray


def reach_of(schedule: BlockSchedule) -> Reach:
    heads_per_group = np.bincount(np.asarray(schedule.head_group), minlength=len(schedule.groups))
    cost = np.zeros(schedule.num_q_blocks)
    visited = np.zeros(schedule.num_q_blocks)
    rows, starts, ends = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for runs, n in zip(schedule.groups, heads_per_group, strict=True):
        row = _run_rows(runs)
        start, end = runs.start.numpy().astype(np.int64), runs.end.numpy().astype(np.int64)
        if row.size == 0 or n == 0:
            continue
        length = (end - start).astype(np.float64) * n
        weight = np.where(runs.full.numpy(), FULL_BLOCK_COST, PARTIAL_BLOCK_COST)
        cost += np.bincount(row, weights=length * weight, minlength=cost.size)
        visited += np.bincount(row, weights=length, minlength=cost.size)
        first = np.ones(row.size, dtype=bool)  # a run that does not continue the previous one
        first[1:] = (row[1:] != row[:-1]) | (start[1:] != end[:-1])
        at = np.flatnonzero(first)
        rows.append(row[at])
        starts.append(start[at])
        ends.append(end[np.append(at[1:] - 1, row.size - 1)])
    return Reach(np.concatenate(rows), np.concatenate(starts), np.concatenate(ends), cost, visited)


def split_blocks(schedule: BlockSchedule, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every visited block of the marked query blocks (`rows`: a mask over query blocks) as
    (query block, key block, weighted cost, heads visiting it), one entry per head group."""
    heads_per_group = np.bincount(np.asarray(schedule.head_group), minlength=len(schedule.groups))
    parts = []
    for runs, n in zip(schedule.groups, heads_per_group, strict=True):
        run_rows = _run_rows(runs)
        keep = rows[run_rows] if n else np.zeros(run_rows.size, dtype=bool)
        start, end = runs.start.numpy()[keep].astype(np.int64), runs.end.numpy()[keep].astype(np.int64)
        lengths = end - start
        first = np.repeat(start - (np.cumsum(lengths) - lengths), lengths)
        weight = np.where(runs.full.numpy()[keep], FULL_BLOCK_COST, PARTIAL_BLOCK_COST) * n
        parts.append((np.repeat(run_rows[keep], lengths), first + np.arange(int(lengths.sum())),
                      np.repeat(weight, lengths), np.full(int(lengths.sum()), float(n))))  # fmt: skip
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4)) if parts else (np.zeros(0),) * 4


def _by_owner(blocks: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Blocks sorted by (owner, block)."""
    blocks = np.sort(blocks)
    return blocks[np.argsort(owner[blocks], kind="stable")].astype(np.int64)


def exchange(schedule: BlockSchedule, q_owner: np.ndarray, k_owner: np.ndarray, world: int,
             split: np.ndarray | None = None, reach: Reach | None = None):  # fmt: skip
    """(which remote key blocks each rank needs, bool [world, key blocks]; guest split blocks
    per rank in (owner, block) order; weighted cost per rank; visited blocks per rank).

    A rank's needed key blocks are the union of its unsplit rows' intervals, found with one
    difference array per rank ([world, key blocks + 1]) rather than block by block.  A split
    row's blocks are computed, and counted, where their keys live.  `reach`: `reach_of(schedule)`
    when the caller has it."""
    reach = reach_of(schedule) if reach is None else reach
    nkb, nqb = k_owner.size, q_owner.size
    is_split = np.zeros(nqb, dtype=bool)
    if split is not None:
        is_split[split] = True
    width = nkb + 1
    rows, start, end = reach.rows, reach.start, reach.end
    if is_split.any():
        whole = ~is_split[rows]
        rows, start, end = rows[whole], start[whole], end[whole]
    at = q_owner[rows] * width
    diff = np.bincount(at + start, minlength=world * width) - np.bincount(at + end, minlength=world * width)
    needed = np.cumsum(diff.reshape(world, width), axis=1)[:, :nkb] > 0
    needed &= k_owner[None, :] != np.arange(world)[:, None]
    cost, visited = reach.cost, reach.visited
    per_rank = np.bincount(q_owner[~is_split], weights=cost[~is_split], minlength=world)
    visited_per_rank = np.bincount(q_owner[~is_split], weights=visited[~is_split], minlength=world)
    guests = [np.zeros(0, dtype=np.int64) for _ in range(world)]
    if is_split.any():
        rows, cols, weight, heads = split_blocks(schedule, is_split)
        helper = k_owner[cols]
        per_rank += np.bincount(helper, weights=weight, minlength=world)
        visited_per_rank += np.bincount(helper, weights=heads, minlength=world)
        pairs = np.unique(helper * nqb + rows)
        helper, rows = pairs // nqb, pairs % nqb
        remote = helper != q_owner[rows]
        guests = [_by_owner(rows[remote & (helper == r)], q_owner) for r in range(world)]
    return needed, guests, per_rank, visited_per_rank


def exchange_lists(schedule: BlockSchedule, q_owner: np.ndarray, k_owner: np.ndarray, world: int,
                   split: np.ndarray | None = None, reach: Reach | None = None):  # fmt: skip
    """(remote key blocks per rank, guest split blocks per rank, both in (owner, block) order;
    weighted cost per rank, visited blocks per rank); see `exchange`."""
    needed, guests, per_rank, visited = exchange(schedule, q_owner, k_owner, world, split, reach)
    recv = [_by_owner(np.flatnonzero(needed[r]), k_owner) for r in range(world)]
    return recv, guests, per_rank, visited


def split_heavy_rows(schedule: BlockSchedule, cost: np.ndarray, q_owner: np.ndarray, k_owner: np.ndarray,
                     world: int, self_attention: bool,
                     order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(q_owner, k_owner, split): the dealing of whole rows, or, when it misses
    BALANCE_TOLERANCE and splitting the outlier rows (see the module docstring) balances
    better, a dealing with those rows split.  With lq == lk a block's owner computes both
    its row (when whole) and the split rows' pieces over its keys, so blocks are dealt by
    the sum; otherwise keys stay contiguous and the pieces are load the ranks start with."""
    none = np.zeros(0, dtype=np.int64)
    score = balancing.imbalance(cost, q_owner, world)
    positive = cost[cost > 0]
    if score <= balancing.BALANCE_TOLERANCE or positive.size == 0:
        return q_owner, k_owner, none
    heavy = cost > SPLIT_OUTLIER * np.median(positive)
    if not heavy.any():
        return q_owner, k_owner, none
    _, cols, weight, _ = split_blocks(schedule, heavy)
    whole = np.where(heavy, 0.0, cost)
    if self_attention:
        combined = whole + np.bincount(cols, weights=weight, minlength=cost.size)
        owner = balancing.balanced(combined, world, order=order)
        new_score, new_k_owner = balancing.imbalance(combined, owner, world), owner.copy()
    else:
        base = np.bincount(k_owner[cols], weights=weight, minlength=world)
        owner = balancing.balanced(whole, world, base, order)
        new_score, new_k_owner = balancing.imbalance(whole, owner, world, base), k_owner
    if new_score < score:
        return owner, new_k_owner, np.flatnonzero(heavy).astype(np.int64)
    return q_owner, k_owner, none


def _block_coordinates(grid: tuple[int, ...], block: int, num_blocks: int) -> list[tuple[int, np.ndarray, int]]:
    """Per grid axis whose ranges blocks never straddle (a block covers one value of it, or
    a whole number of values within one row of the axis before): the axis, each block's
    coordinate along it, counted in blocks, and the number of such coordinates (axes with
    one are left out)."""
    first = np.arange(num_blocks) * block  # each block's first token
    axes = []
    for axis in range(len(grid)):
        stride = math.prod(grid[axis + 1 :])
        span = max(1, block // stride)  # values of the axis one block covers
        if (block % stride and stride % block) or (grid[axis] * stride) % block:
            continue
        if grid[axis] // span > 1:
            axes.append((axis, (first // stride) % grid[axis] // span, grid[axis] // span))
    return axes


def grid_orders(program, lq: int, lk: int, heads: int, block: int, world: int, sizes: dict,
                schedule: BlockSchedule) -> list[np.ndarray]:  # fmt: skip
    """Block orders of a row-major grid whose contiguous runs are boxes of the grid: sorted
    by the coordinate along one inner axis (a range of it across every outer coordinate),
    or by tiles of m x n ranges along two axes with m * n = world (a video's frames cut
    both by time and by position within the frame).  Only for self-attention over one grid
    covering the sequence."""
    if lq != lk or schedule.perm_q is not None:
        return []
    grids = program.instantiate(lq, lk, heads=heads, **sizes).grids
    if len(grids) != 1 or math.prod(grids[0]) != lq:
        return []
    num_blocks = -(-lq // block)
    first = np.arange(num_blocks)
    axes = _block_coordinates(grids[0], block, num_blocks)
    # sorted by the outermost axis, blocks keep the sequence's own order (dealt already)
    orders = [np.lexsort((first, c)) for axis, c, _ in axes if axis > 0]
    for i, (_, ci, ei) in enumerate(axes):
        for _, cj, ej in axes[i + 1 :]:
            for m in range(2, min(ei, world // 2) + 1):
                n = world // m
                if m * n == world and n <= ej:
                    orders.append(np.lexsort((first, cj * n // ej, ci * m // ei)))
    return orders


def _received_tokens(needed: np.ndarray, guests: list[np.ndarray], q_owner: np.ndarray, q_len: np.ndarray,
                     k_len: np.ndarray) -> float:  # fmt: skip
    """Tokens the busiest rank receives: keys and values, and split rows' queries and pieces."""
    per_rank = needed.astype(np.float64) @ k_len + np.array([q_len[g].sum() for g in guests])
    every = np.concatenate(guests)  # each (split block, helper) pair sends a piece to the block's owner
    per_rank += np.bincount(q_owner[every], weights=q_len[every], minlength=len(guests))
    return float(per_rank.max())


def _dealings(program, schedule: BlockSchedule, cost: np.ndarray, lq: int, lk: int, heads: int, block: int,
              world: int, sizes: dict) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:  # fmt: skip
    """The (q_owner, k_owner, split) candidates "blocks" balance chooses from."""
    nkb = -(-lk // block)
    candidates = []
    for order in [None, *grid_orders(program, lq, lk, heads, block, world, sizes, schedule)]:
        q_owner = balancing.balanced(cost, world, order=order)
        k_owner = q_owner.copy() if lq == lk else balancing.contiguous(nkb, world)
        candidates.append(split_heavy_rows(schedule, cost, q_owner, k_owner, world, lq == lk, order))
    none = np.zeros(0, dtype=np.int64)
    for q_owner in (balancing.contiguous(cost.size, world), balancing.zigzag(cost.size, world)):
        k_owner = q_owner.copy() if lq == lk else balancing.contiguous(nkb, world)
        candidates.append((q_owner, k_owner, none))
    return candidates


def choose_dealing(program, schedule: BlockSchedule, reach: Reach, lq: int, lk: int, heads: int, block: int,
                   world: int, sizes: dict) -> Plan:  # fmt: skip
    """The "blocks" dealing: of the candidates (see the module docstring), the one within
    BALANCE_TOLERANCE whose busiest rank receives least, else the best balanced; as a plan
    without schedule, bindings or rank."""
    q_len = block_lengths(np.arange(-(-lq // block)), lq, block).astype(np.float64)
    k_len = block_lengths(np.arange(-(-lk // block)), lk, block).astype(np.float64)
    scored, seen = [], set()
    for q_owner, k_owner, split in _dealings(program, schedule, reach.cost, lq, lk, heads, block, world, sizes):
        key = (q_owner.tobytes(), k_owner.tobytes(), split.tobytes())
        if key in seen:
            continue
        seen.add(key)
        needed, guests, per_rank, visited = exchange(schedule, q_owner, k_owner, world, split, reach)
        mean = per_rank.mean()
        score = float(per_rank.max() / mean) if mean > 0 else 1.0
        received = _received_tokens(needed, guests, q_owner, q_len, k_len)
        scored.append((score, received, (q_owner, k_owner, split, needed, guests, per_rank, visited)))
    balanced = [s for s in scored if s[0] <= balancing.BALANCE_TOLERANCE]
    best = min(balanced, key=lambda s: s[1]) if balanced else min(scored, key=lambda s: s[0])  # first of equals
    q_owner, k_owner, split, needed, guests, per_rank, visited = best[2]
    recv = [_by_owner(np.flatnonzero(needed[r]), k_owner) for r in range(world)]
    return Plan(lq, lk, block, world, heads, "blocks", q_owner, k_owner, None, {}, "", recv=recv, split=split,
                guests=guests, cost=per_rank, visited=visited)  # fmt: skip


def plan_schedule(program, lq: int, lk: int, heads: int, block: int, bindings: dict,
                  layout: str = "auto") -> BlockSchedule | None:  # fmt: skip
    """The schedule a plan is made from (None for patterns that read q and k).  On a grid,
    self-attention may use a tiled layout (`layout`, as for `Program.schedule`): fewer
    visited blocks, so fewer blocks to move, but slower to build."""
    sizes = {n: v for n, v in bindings.items() if not isinstance(v, torch.Tensor)}
    if reads_qk(program, lq, lk, heads, sizes):
        return None
    layout = layout if lq == lk else "rowmajor"
    return program.schedule(lq, lk, block_q=block, block_k=block, heads=heads, layout=layout, **bindings)


def make_plan(program, lq: int, lk: int | None, *, heads: int = 1, balance: str = "blocks",
              block: int | None = None, world: int, rank: int | None = None, bindings: dict,
              layout: str = "auto", schedule: BlockSchedule | None = None) -> Plan:  # fmt: skip
    """The plan for `world` ranks; see the module docstring.  `schedule` reuses one made by
    `plan_schedule` for the same arguments (sweeps over world sizes and balances)."""
    lk = lq if lk is None else lk
    block = DEFAULT_BLOCK if block is None else block
    if balance not in balancing.BALANCES:
        raise MaskError(f"balance must be one of {', '.join(map(repr, balancing.BALANCES))}, got {balance!r}")
    if not isinstance(world, int) or world < 1:
        raise MaskError(f"world size must be a positive integer, got {world!r}")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise MaskError(f"block must be a positive integer, got {block!r}")
    nqb, nkb = -(-lq // block), -(-lk // block)
    if world > min(nqb, nkb):
        raise MaskError(
            f"world size {world} is larger than the number of blocks (lq={lq}: {nqb}, lk={lk}: {nkb} blocks "
            f"of {block} tokens): every rank needs a block; pass a smaller block="
        )
    if schedule is None:
        schedule = plan_schedule(program, lq, lk, heads, block, bindings, layout)
    if balance == "blocks" and schedule is not None:
        sizes = {n: v for n, v in bindings.items() if not isinstance(v, torch.Tensor)}
        chosen = choose_dealing(program, schedule, reach_of(schedule), lq, lk, heads, block, world, sizes)
        return replace(chosen, schedule=schedule, bindings=dict(bindings), source=program.source(), rank=rank)
    cost = np.ones(nqb) if schedule is None else block_cost(schedule)[0]
    q_owner = balancing.assign(balance, cost, world)
    k_owner = q_owner.copy() if lq == lk else balancing.contiguous(nkb, world)
    plan = Plan(lq, lk, block, world, heads, balance, q_owner, k_owner, None, dict(bindings), program.source(), rank)
    if schedule is None:
        plan.recv = [np.zeros(0, dtype=np.int64) for _ in range(world)]
        plan.guests = [np.zeros(0, dtype=np.int64) for _ in range(world)]
        return plan
    return plan.with_schedule(schedule)
