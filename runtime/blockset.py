"""Attention of a subset of query blocks against a buffer of key blocks: the local step
of context parallelism.

A rank of a context-parallel run holds some query blocks of the whole sequence
(global block indices, in any order: zigzag sharding gives non-contiguous ones)
and, after the exchange, a buffer of key blocks (its own and the received ones,
in whatever order the plan chose).  It needs the exact attention of its
queries over the *whole* pattern, computed from those key blocks only.

    glob = prepare_blockset(program, lq, lk=None, *, heads=1, backend="cpu",
                            dtype=torch.float32, head_dim=64, head_dim_v=None,
                            q_offset=None, layout="rowmajor", device="cpu", routes=None,
                            **bindings)
    out = attend_block_subset(glob, q_local, k_buf, v_buf, q_blocks, k_blocks,
                              *, scale=None, return_lse=False, only_buffer=False)

`prepare_blockset` prepares the program for the global problem, the same on
every rank: the global block schedule over square blocks of `glob.block`
tokens (queries and keys alike, the smaller of the backend's two tile sides,
so a rank's query and key tokens are the same blocks when lq == lk).
`bindings` are those of a one-process call over the whole sequence: grid
sizes, tensor parameters (`segments` ids over all lk keys, bias tables, ALiBi
slopes).  Patterns that select from q and k (`route`, `vertical_slash`):
either bind the global `q` and `k`, or pass `routes`, what
`route_tables(program, lq, lk, q_local, k_local, q_tokens, k_tokens,
collective, **bindings)` gives every rank from its own tokens (`dsl.sharded`:
a few small collectives); every rank then selects as one process does (up to
the rounding of sums taken in another order).  `backend` is "cpu" (the CPU
executor) or "triton" (the generated kernels; under Triton's interpreter on
CPU tensors); "auto" picks
Triton on a CUDA `device`.  `dtype`, `head_dim` and `device` only choose
Triton's tile rung.  FlexAttention and clustered patterns (`cluster(...)`)
raise `MaskTypeError`: context parallel runs the block schedule on cpu and
triton.  `layout="auto"` lets a grid pattern use the schedule's tile order
(NATTEN's); then blocks are tiles of the grid, so shard with `q_tokens`.

`glob` tells the plan what it needs: `glob.block`, `glob.num_q_blocks`,
`glob.num_k_blocks`; `glob.q_tokens(blocks)` and `glob.k_tokens(blocks)`, the
global token indices of the listed blocks concatenated in list order (what a
rank holds, `x[:, :, glob.q_tokens(mine)]`, and the positions for positional
encodings); `glob.visited(q_blocks)`, the sorted key blocks those query
blocks visit in any head; `glob.row_counts()`, the full and partial key
blocks each query block visits, summed over heads (for balancing);
`glob.block_costs()`, per head group the (query block, key block, full)
triples of the schedule.  `schedule_block(...)`, with the arguments of
`prepare_blockset`, gives the block size alone.

`attend_block_subset` takes `q_local` [batch, heads, n_q, dim] holding the
query blocks `q_blocks` (a 1-D integer tensor of distinct global block
indices) in that order, each `glob.block` tokens except the last block of the
sequence, which may be short; `k_buf`, `v_buf` [batch, kv_heads, n_k, dim]
likewise hold key blocks `k_blocks`.  It returns out [batch, heads, n_q, dv]
(and the log-sum-exp [batch, heads, n_q] with `return_lse`: float32, float64 for float64 inputs on the CPU), equal to
the rows of a one-process call, differentiable in q_local, k_buf and v_buf
(gradients of k_buf and v_buf are the partial sums of this rank's queries;
the owners add them up).  GQA, lq != lk, per-head patterns, modifiers and
data-dependent patterns work as in one process; a row with no allowed key
outputs 0 (lse -inf, gradients 0), an empty buffer included.  Bound modifier
tensors that require grad get this rank's share of their gradient on the CPU
executor (sum it over ranks); there is no dropout.  Inputs are checked like a
call's: a block listed twice or out of range, or tensors whose length is not
that of their blocks, raise `MaskTypeError`, and so does a key block that the
query blocks visit and that is missing from the buffer (naming both blocks);
keys in the buffer that no query visits are ignored.  With `only_buffer=True`
missing key blocks are skipped instead: the result is the rows' attention over
the buffer's keys alone, a piece to merge by log-sum-exp with the pieces over
the other keys (context parallelism's split rows, maskc/parallel/plan.py).

How: the global schedule's rows `q_blocks` are cut out and their key blocks
renumbered to buffer positions; the local tensors become the backend's
*execution order*, and the positions handed to predicates and modifiers are
the global ones through the layout-permutation machinery (each side's
`Geometry.perm` maps a local token to its global index), so the kernels and
the CPU executor run unchanged.  A short last block that is not last in its
list is moved to the end (a copy) so that padding stays at the end.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from maskc.codegen import plan
from maskc.codegen.geometry import Geometry, ramp
from maskc.codegen.schedule import BlockSchedule, Runs, runs_from_blocks
from maskc.dsl import ir, sharded
from maskc.dsl.errors import MaskTypeError

from .dispatch import empty_attention
from .execute import backend_function, inverse_permutation
from .inputs import backend_for, check_inputs, check_scale
from .prepare import Prepared, instantiate, source_text
from .tuning import POLICY, Tiles


def _one_thread(method):
    """Run block bookkeeping (many small tensor ops) on one thread: spread over threads
    it costs far more than it saves, and stalls on a busy machine (codegen/plan.one_thread)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with plan.one_thread():
            return method(*args, **kwargs)

    return wrapper


# Local preparations kept per global schedule (a training loop repeats its block lists).
SUBSETS_KEPT = 8


@dataclass
class GlobalSchedule:
    """A program prepared for the whole sequence, shared by every rank (see the module docstring)."""

    prepared: Prepared  # the global problem: instance over lq, lk; square tiles
    backend: str  # "cpu" or "triton"
    subsets: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def schedule(self) -> BlockSchedule:
        return self.prepared.schedule

    @property
    def block(self) -> int:
        return self.prepared.block_q

    @property
    def lq(self) -> int:
        return self.prepared.lq

    @property
    def lk(self) -> int:
        return self.prepared.lk

    @property
    def num_q_blocks(self) -> int:
        return self.schedule.num_q_blocks

    @property
    def num_k_blocks(self) -> int:
        return self.schedule.num_k_blocks

    @_one_thread
    def q_tokens(self, blocks) -> torch.Tensor:
        """Global query indices (0 .. lq) of the listed query blocks, concatenated in order."""
        return _tokens(self.schedule.q_geometry, _blocks(blocks, self.num_q_blocks, "q_blocks"))

    @_one_thread
    def k_tokens(self, blocks) -> torch.Tensor:
        """Global key indices (0 .. lk) of the listed key blocks, concatenated in order."""
        return _tokens(self.schedule.k_geometry, _blocks(blocks, self.num_k_blocks, "k_blocks"))

    @_one_thread
    def visited(self, q_blocks) -> torch.Tensor:
        """The key blocks (sorted) that any head of the listed query blocks visits."""
        rows = _blocks(q_blocks, self.num_q_blocks, "q_blocks")
        cols = [_row_blocks(g, rows)[1] for g in self.schedule.groups]
        return torch.unique(torch.cat(cols)) if cols else torch.zeros(0, dtype=torch.long)

    @_one_thread
    def block_costs(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per head group (`schedule.head_group[h]` is head h's), every visited block
        as (query block, key block, full)."""
        return [g.blocks() for g in self.schedule.groups]

    @_one_thread
    def row_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(full, partial): visited key blocks per query block, summed over heads, long [num_q_blocks]
        each (a partial block also evaluates the predicate: the plan weighs the two)."""
        full = torch.zeros(self.num_q_blocks, dtype=torch.long)
        partial = torch.zeros(self.num_q_blocks, dtype=torch.long)
        heads = torch.bincount(torch.tensor(self.schedule.head_group), minlength=len(self.schedule.groups))
        for runs, n in zip(self.schedule.groups, heads.tolist(), strict=True):
            rows = torch.repeat_interleave(torch.arange(runs.rows), (runs.row_ptr[1:] - runs.row_ptr[:-1]).long())
            lengths = (runs.end - runs.start).long() * n
            full.index_add_(0, rows[runs.full], lengths[runs.full])
            partial.index_add_(0, rows[~runs.full], lengths[~runs.full])
        return full, partial

    @_one_thread
    def subset(self, q_blocks: torch.Tensor, k_blocks: torch.Tensor, only_buffer: bool = False) -> Prepared:
        """The local preparation for these block lists (kept for static patterns)."""
        key = (tuple(q_blocks.tolist()), tuple(k_blocks.tolist()), only_buffer)
        if key in self.subsets:
            self.subsets.move_to_end(key)
            return self.subsets[key]
        local = _subset(self.prepared, q_blocks, k_blocks, only_buffer)
        if not any(ir.reads_qk(p.mask) for p in self.prepared.instance.patterns):
            self.subsets[key] = local
            while len(self.subsets) > SUBSETS_KEPT:
                self.subsets.popitem(last=False)
        return local


class SubsetPrepared(Prepared):
    """A preparation whose tokens are a subset of the global ones: lengths are the local ones
    (the schedule's geometries), sizes of the instance stay global (positions, tables)."""

    @property
    def lq(self) -> int:
        return self.schedule.lq

    @property
    def lk(self) -> int:
        return self.schedule.lk


def prepare_blockset(program, lq: int, lk: int | None = None, *, heads: int = 1, backend: str = "cpu",
                     dtype: torch.dtype = torch.float32, head_dim: int = 64, head_dim_v: int | None = None,
                     q_offset: int | None = None, layout: str = "rowmajor", device="cpu",
                     routes: dict | None = None, **bindings) -> GlobalSchedule:  # fmt: skip
    """The program prepared for the global problem (see the module docstring)."""
    device = torch.device(device)
    name = backend_for(backend, device.type == "cuda")
    if name not in ("cpu", "triton"):
        raise MaskTypeError(f"context parallel runs on cpu and triton, not backend={name!r}")
    lk = lq if lk is None else lk
    for what, n in (("lq", lq), ("lk", lk), ("heads", heads)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise MaskTypeError(f"{what} must be a positive integer, got {n!r}")
    if routes is not None and not isinstance(routes, dict):
        raise MaskTypeError(f"routes must be what route_tables returns (a dict), not {type(routes).__name__}")
    derived = None if routes is None else lambda _: dict(routes)
    instance, tensors = instantiate(program.spec, lq, lk, heads, q_offset, None, bindings, derived)
    if any(isinstance(n, ir.Cluster) for p in instance.patterns for n in ir.walk(p.mask)):
        raise MaskTypeError(
            "context parallel runs the block schedule: cluster(...) patterns run gathered by cluster "
            "and are not supported"
        )
    forms = plan.normal_forms(instance)
    title = source_text(program.spec).strip()
    width = max(head_dim, head_dim if head_dim_v is None else head_dim_v)
    tiles = POLICY.choose(name, forms, title, dtype, width, lq, device)
    block = min(tiles.block_q, tiles.block_k)
    square = Tiles(block, block, tiles.kernel)
    prepared = Prepared(instance, forms, tensors, title, lambda: square, layout)
    return GlobalSchedule(prepared, name)


def schedule_block(program, lq: int, lk: int | None = None, **kwargs) -> int:
    """The block size (queries and keys) that `prepare_blockset` with these arguments schedules with."""
    return prepare_blockset(program, lq, lk, **kwargs).block


def attend_block_subset(glob: GlobalSchedule, q_local: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                        q_blocks, k_blocks, *, scale: float | None = None, return_lse: bool = False,
                        only_buffer: bool = False):  # fmt: skip
    """The listed query blocks' exact attention over the whole pattern, from the listed key blocks
    (see the module docstring)."""
    if not isinstance(glob, GlobalSchedule):
        raise MaskTypeError(f"attend_block_subset takes what prepare_blockset returns, not {type(glob).__name__}")
    check_inputs(q_local, k_buf, v_buf)
    scale = check_scale(scale, q_local.shape[-1])
    batch = glob.prepared.tensors.batch
    if batch not in (None, 1) and q_local.shape[0] != batch:
        raise MaskTypeError(f"q_local has batch {q_local.shape[0]}, the bound tensors have batch {batch}")
    q_blocks = _blocks(q_blocks, glob.num_q_blocks, "q_blocks")
    k_blocks = _blocks(k_blocks, glob.num_k_blocks, "k_blocks")
    _check_length(glob.schedule.q_geometry, q_blocks, q_local, "q_local", "q_blocks")
    _check_length(glob.schedule.k_geometry, k_blocks, k_buf, "k_buf", "k_blocks")
    if q_local.shape[1] != glob.prepared.heads:
        raise MaskTypeError(
            f"q_local has {q_local.shape[1]} heads, the schedule was prepared for {glob.prepared.heads}"
        )
    q_order = _short_last(glob.schedule.q_geometry, q_blocks)
    k_order = _short_last(glob.schedule.k_geometry, k_blocks)
    q_run, k_run, v_run = q_local, k_buf, v_buf
    if q_order is not None:
        q_blocks, q_run = q_blocks[q_order[0]], q_local[:, :, q_order[1]]
    if k_order is not None:
        k_blocks, k_run, v_run = k_blocks[k_order[0]], k_buf[:, :, k_order[1]], v_buf[:, :, k_order[1]]
    local = glob.subset(q_blocks, k_blocks, only_buffer)
    if 0 in (q_run.shape[0], q_run.shape[2], k_run.shape[2]):
        out, lse = empty_attention(q_run, k_run, v_run, scale)
    else:
        out, lse = backend_function(glob.backend)(q_run, k_run, v_run, local, scale)
    if q_order is not None:
        inverse = inverse_permutation(q_order[1])
        out, lse = out[:, :, inverse], lse[:, :, inverse]
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------- blocks and tokens


def _blocks(blocks, count: int, name: str) -> torch.Tensor:
    """Distinct block indices in 0 .. count as a 1-D long tensor on the CPU."""
    x = torch.as_tensor(blocks)
    if x.dim() != 1 or (x.numel() and (x.is_floating_point() or x.dtype == torch.bool)):
        raise MaskTypeError(f"{name} must be a 1-D tensor of block indices, got {x.dtype} of shape {list(x.shape)}")
    x = x.long().cpu()
    if x.numel():
        bad = (x < 0) | (x >= count)
        if bool(bad.any()):
            raise MaskTypeError(f"{name} holds block {int(x[bad][0])}, outside the {count} blocks of the sequence")
        if torch.unique(x).numel() != x.numel():
            values, counts = torch.unique(x, return_counts=True)
            raise MaskTypeError(f"{name} lists block {int(values[counts > 1][0])} more than once")
    return x


def _sizes(geometry: Geometry, blocks: torch.Tensor) -> torch.Tensor:
    """Tokens in each listed block (the last block of the sequence may be short)."""
    return torch.clamp(geometry.length - blocks * geometry.block, max=geometry.block)


def _tokens(geometry: Geometry, blocks: torch.Tensor) -> torch.Tensor:
    """Global token indices of the listed blocks, concatenated in list order."""
    index = (blocks[:, None] * geometry.block + torch.arange(geometry.block)[None, :]).reshape(-1)
    index = index[index < geometry.length]
    return index if geometry.perm is None else geometry.perm[index]


def _check_length(geometry: Geometry, blocks: torch.Tensor, x: torch.Tensor, name: str, list_name: str) -> None:
    want = int(_sizes(geometry, blocks).sum())
    if x.shape[2] != want:
        last = geometry.length - (geometry.num_blocks - 1) * geometry.block
        raise MaskTypeError(
            f"{name} holds {x.shape[2]} tokens, but the {blocks.numel()} blocks of {list_name} hold {want} "
            f"(blocks of {geometry.block} tokens, the sequence's last one {last})"
        )


def _short_last(geometry: Geometry, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(block order, token order) moving a short block to the end of the list, or None when
    no block is short or it is last already."""
    sizes = _sizes(geometry, blocks)
    short = torch.nonzero(sizes < geometry.block).flatten()
    if short.numel() == 0 or int(short[0]) == blocks.numel() - 1:
        return None
    s = int(short[0])
    order = torch.cat([torch.arange(s), torch.arange(s + 1, blocks.numel()), torch.tensor([s])])
    starts = torch.cumsum(sizes, 0) - sizes
    tokens = torch.cat([torch.arange(int(starts[b]), int(starts[b] + sizes[b])) for b in order.tolist()])
    return order, tokens


# ---------------------------------------------------------------- the local schedule


def _row_blocks(runs: Runs, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every visited block of the listed rows as (position in `rows`, key block, full)."""
    ptr = runs.row_ptr.long()
    counts = ptr[rows + 1] - ptr[rows]
    run = torch.repeat_interleave(ptr[rows], counts) + ramp(counts)
    owner = torch.repeat_interleave(torch.arange(rows.numel()), counts)
    lengths = (runs.end[run] - runs.start[run]).long()
    first = torch.repeat_interleave(runs.start[run].long(), lengths)
    cols = first + ramp(lengths)
    return torch.repeat_interleave(owner, lengths), cols, torch.repeat_interleave(runs.full[run], lengths)


def _local_geometry(geometry: Geometry, blocks: torch.Tensor) -> Geometry:
    """The local side as a geometry: local token j sits at the global index `perm[j]`."""
    tokens = _tokens(geometry, blocks)
    return Geometry(tokens.numel(), geometry.block, geometry.offset, tokens)


def _subset(prepared: Prepared, q_blocks: torch.Tensor, k_blocks: torch.Tensor,
            only_buffer: bool = False) -> SubsetPrepared:  # fmt: skip
    """The global schedule's rows `q_blocks`, key blocks renumbered to positions in `k_blocks`
    (`only_buffer`: blocks not in `k_blocks` dropped, else an error)."""
    glob = prepared.schedule
    where = torch.full((glob.num_k_blocks,), -1, dtype=torch.long)
    where[k_blocks] = torch.arange(k_blocks.numel())
    groups = []
    for runs in glob.groups:
        rows, cols, full = _row_blocks(runs, q_blocks)
        local = where[cols]
        missing = local < 0
        if only_buffer:
            rows, local, full = rows[~missing], local[~missing], full[~missing]
        elif bool(missing.any()):
            i = int(torch.nonzero(missing)[0])
            raise MaskTypeError(
                f"query block {int(q_blocks[rows[i]])} visits key block {int(cols[i])}, which is not in k_blocks "
                f"(the buffer holds {k_blocks.numel()} blocks)"
            )
        groups.append(runs_from_blocks(rows, local, full, q_blocks.numel()))
    q_geo = _local_geometry(glob.q_geometry, q_blocks)
    k_geo = _local_geometry(glob.k_geometry, k_blocks)
    schedule = BlockSchedule(q_geo.length, k_geo.length, glob.block_q, glob.block_k, list(glob.head_group), groups,
                             list(glob.patterns), q_geo, k_geo, glob.tensors, glob.layout)  # fmt: skip
    return SubsetPrepared(prepared.instance, prepared.forms, prepared.tensors, prepared.title,
                          _tiles=prepared.tiles, _schedule=schedule)  # fmt: skip


# ---------------------------------------------------------------- selections from every rank's share


def route_tables(program, lq: int, lk: int | None, q_local: torch.Tensor, k_local: torch.Tensor,
                 q_tokens: torch.Tensor, k_tokens: torch.Tensor, collective: sharded.Collective, *,
                 q_offset: int | None = None, **bindings) -> dict:  # fmt: skip
    """The selections of the pattern's `route` and `vertical_slash` atoms over the whole q
    and k, from this rank's queries `q_local` (global token indices `q_tokens`) and keys
    `k_local` (`k_tokens`), the ranks joined by `collective` (`dsl.sharded`: a collective
    call, every rank alike).  Pass them as `prepare_blockset(..., routes=...)`: every rank
    then schedules as one process does on the whole q and k.  Routes scored by a bound
    tensor (`scores = NAME`) are left to the bindings; empty without such atoms."""
    lk = lq if lk is None else lk
    sizes = {n: x for n, x in bindings.items() if not isinstance(x, torch.Tensor)}
    instance = program.spec.instantiate(lq, lk, heads=q_local.shape[1], q_offset=q_offset, sizes=sizes)
    offset = instance.sizes.q_offset
    q_tokens = torch.as_tensor(q_tokens).long().to(q_local.device)
    k_tokens = torch.as_tensor(k_tokens).long().to(q_local.device)
    whole = (lq, lk, offset)
    tables = {}
    for node in _selections(instance):
        if isinstance(node, ir.Route):
            selected = sharded.route_selection(node, q_local, k_local, q_tokens + offset, k_tokens, whole, collective)
            tables[("route", node)] = selected[:, 0].cpu()
        else:
            columns, diagonals = sharded.vertical_slash_selection(
                node, q_local, k_local, q_tokens, k_tokens, whole, collective
            )
            tables[("vertical_slash", node)] = (columns.cpu(), diagonals.cpu())
    return tables


def _selections(instance) -> list:
    """The distinct route atoms that read q and k, and the vertical_slash selections (one
    for all heads, keyed as `evaluate.vertical_slash_table` keeps it), in a fixed order
    (the same on every rank)."""
    found = {}
    for p in instance.patterns:
        for n in ir.walk(p.mask):
            if isinstance(n, ir.Route) and n.scores is None:
                found[n] = None
            elif isinstance(n, ir.VerticalSlash):
                found[dataclasses.replace(n, head=0)] = None
    return list(found)
