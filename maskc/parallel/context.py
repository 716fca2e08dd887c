"""`ContextParallel`: one pattern's attention split over the ranks of a process group.

Each rank holds the tokens the plan gives it (queries, keys and values).  A call
brings in exactly the remote key blocks the plan lists with one uneven
all-to-all (`runtime.autograd.exchange`, whose backward returns dK/dV of received
blocks to their owners, summed there), then attends its query blocks against its
own and the received key blocks with the CPU executor or the Triton kernels
(`runtime.blockset.attend_block_subset`, over the plan's own schedule).  dQ never
leaves the rank.

Data-dependent patterns: everything is bound at `plan` time.  Segment ids are
full length ([batch, lk]: they are small) and folded into the plan's
fingerprint, so ranks that disagree are caught.  Patterns that read q and k
build their schedule at each call, the same on every rank, and move only the
key blocks it visits: `route` (every scorer) and `vertical_slash` select from
what each rank's own q and k contribute, combined with a few small collectives
(`runtime.blockset.route_tables`, `dsl/sharded.py`: region sums or extrema for
route, all-gathered keys for the antidiagonal scorer, the last queries and
softmax statistics for vertical_slash); `cluster` all-gathers q and k
(detached) to find the clusters, then attends with dense tiles over the
visited blocks (maskc/parallel/local.py: exact, slow), as maskc's kernels run
clusters gathered by cluster, not by block.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from maskc.codegen import plan as codegen_plan
from maskc.dsl import ir
from maskc.dsl.errors import MaskError
from maskc.runtime.autograd import exchange
from maskc.runtime.blockset import GlobalSchedule, attend_block_subset, prepare_blockset, route_tables
from maskc.runtime.cpu.layout import compute_dtype
from maskc.runtime.execute import inverse_permutation
from maskc.runtime.merge import merge_partials
from maskc.runtime.prepare import Prepared, instantiate
from maskc.runtime.tuning import Tiles

from . import local
from .collective import GroupCollective
from .local import token_ranges
from .plan import Plan, make_plan


def _clustered(program, plan: Plan) -> bool:
    """Whether the pattern has `cluster(...)`: runtime/blockset.py runs block schedules, and
    clustered patterns run gathered by cluster, so these take the dense-tile path."""
    sizes = {n: x for n, x in plan.bindings.items() if not isinstance(x, torch.Tensor)}
    instance = program.instantiate(plan.lq, plan.lk, heads=plan.heads, **sizes)
    return any(isinstance(n, ir.Cluster) for p in instance.patterns for n in ir.walk(p.mask))


def _tied(x: torch.Tensor, *received: torch.Tensor) -> torch.Tensor:
    """`x` plus a zero that depends on each received tensor (its empty slice summed), so
    that the tensor's reverse exchange runs in this rank's backward even when `x` does not
    otherwise depend on it: the other ranks run theirs."""
    return x + sum(t[..., :0].sum() for t in received).to(x.dtype)


def _joined(out: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> torch.Tensor:
    """`out`, made to depend on the buffers when it does not (a rank whose queries visit no
    key at all), so that its backward still joins the reverse exchange the other ranks run."""
    if out.grad_fn is not None or not (k_buf.requires_grad or v_buf.requires_grad):
        return out
    return _tied(out, k_buf, v_buf)


def _local_attention(plan: Plan, glob: GlobalSchedule, backend: str, scale: float | None):
    """`attend(q_blocks, q, k_buf, v_buf, buffer_blocks, only_buffer) -> (out, lse)`: the listed
    query blocks against a buffer of key blocks on the chosen backend (see
    `runtime.blockset.attend_block_subset`; "reference": dense tiles, maskc/parallel/local.py)."""
    if backend == "reference":
        p = glob.prepared

        def reference(q_blocks, q, k_buf, v_buf, buffer_blocks, only_buffer: bool):
            return local.attend(plan, p.instance, p.tensors, q, k_buf, v_buf, buffer_blocks, scale, q_blocks,
                                only_buffer)  # fmt: skip

        return reference

    def kernels(q_blocks, q, k_buf, v_buf, buffer_blocks, only_buffer: bool):
        return attend_block_subset(glob, q, k_buf, v_buf, torch.as_tensor(q_blocks), torch.as_tensor(buffer_blocks),
                                   scale=scale, return_lse=True, only_buffer=only_buffer)  # fmt: skip

    return kernels


class ContextParallel:
    """Context parallelism for `program` over `group` (default: the world).

    Example (under ``torchrun --nproc-per-node 2``)::

        cp = maskc.ContextParallel(maskc.compile("causal & window(4096)"))
        plan = cp.plan(65536, heads=8)
        q, k, v = plan.shard(q_full), plan.shard(k_full), plan.shard(v_full)
        out = cp(q, k, v, plan=plan)   # this rank's queries, differentiable
    """

    def __init__(self, program, group=None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise MaskError("ContextParallel needs torch.distributed initialised (init_process_group) first")
        self.program = program
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.last_exchange_bytes = 0  # bytes this rank sent in the last call's forward exchange
        self.last_exchange_received = 0  # and received

    def plan(self, lq: int, lk: int | None = None, *, heads: int = 1, balance: str = "blocks",
             block: int | None = None, layout: str = "auto", **bindings) -> Plan:  # fmt: skip
        """The plan for this group, checked to be the same on every rank (a collective call).

        `balance`: "blocks" (visited-block cost per rank, equal token counts), "contiguous"
        or "zigzag".  `block`: tokens per block, the unit of sharding and of exchange
        (default 64, the CPU executor's tile).  `layout`: the schedule's token order on grids ("auto" may tile,
        see `Program.schedule`).  `bindings`: grid sizes, parameters and tensors (segment
        ids over all keys; `centroids`), as for a one-process call."""
        plan = make_plan(self.program, lq, lk, heads=heads, balance=balance, block=block, world=self.world,
                         rank=self.rank, bindings=bindings, layout=layout)  # fmt: skip
        plan.group = self.group
        self.check_agreement(plan)
        return plan

    def check_agreement(self, plan: Plan) -> None:
        """Raise MaskError on every rank unless all ranks hold the same plan (checksum all-reduce)."""
        digest = torch.tensor([plan.fingerprint(), -plan.fingerprint()], dtype=torch.int64)
        dist.all_reduce(digest, op=dist.ReduceOp.MAX, group=self.group)
        if int(digest[0]) != -int(digest[1]):
            raise MaskError(
                "the ranks made different context-parallel plans (lengths, heads, block, balance, "
                "bindings or program differ between processes): every rank must call plan() alike"
            )

    # Under torch.compile the call runs eagerly (a graph break): its exchanges must run, and in the
    # same order, on every rank, which a compiled graph does not promise (it drops the zero-size
    # terms that keep every exchange in every rank's backward, and may reorder collectives).
    @torch.compiler.disable
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, plan: Plan, backend: str = "auto",
                 scale: float | None = None) -> torch.Tensor:  # fmt: skip
        """Exact attention of this rank's queries q [B, H, n, D] against all keys, with
        k, v [B, Hk, m, D] this rank's keys and values; differentiable in q, k and v.

        `backend`: "auto" (Triton on CUDA tensors, else the CPU executor), "cpu",
        "triton", or "reference" (dense attention on the visited tiles: slow, exact;
        what `cluster` patterns run)."""
        self._check(q, k, v, plan)
        if plan.schedule is None and _clustered(self.program, plan):
            return self._clustered_call(plan, q, k, v, scale)
        routes = None if plan.schedule is not None else self._selections(plan, q, k)
        glob = self.global_schedule(plan, backend, q, v, routes)
        if plan.schedule is None:
            plan = plan.with_schedule(glob.schedule)
        k_buf, v_buf = self.gather_kv(plan, k, v)
        attend = _local_attention(plan, glob, backend, scale)
        if plan.split.size:
            return self._split_call(plan, attend, q, k, v, k_buf, v_buf)
        out, _ = attend(plan.q_blocks(self.rank), q, k_buf, v_buf, plan.buffer_blocks(self.rank), False)
        return _joined(out, k_buf, v_buf)

    def _split_call(self, plan: Plan, attend, q, k, v, k_buf, v_buf) -> torch.Tensor:
        """Whole rows against the buffer; split rows (`plan.split`) in pieces where their keys
        live: their queries go to the helpers (an all-to-all), each attends them over its own
        keys, and the pieces (out, lse) come back by the reverse all-to-all and are merged by
        log-sum-exp.  Every exchanged tensor reaches the output on every rank, so that every
        rank's backward runs the same reverse exchanges (dQ of the pieces back to the owners,
        the pieces' gradients to the helpers)."""
        rank, group = self.rank, self.group
        own = plan.q_blocks(rank)
        lengths = plan.block_lengths(own, plan.lq)
        start_of = np.zeros(plan.num_q_blocks, dtype=np.int64)
        start_of[own] = np.cumsum(lengths) - lengths
        split = np.isin(own, plan.split)
        whole, heavy = own[~split], own[split]

        def tokens(blocks: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(token_ranges(blocks, start_of, plan, plan.lq), device=q.device)

        whole_idx, heavy_idx = tokens(whole), tokens(heavy)
        sends, guests = plan.split_sends(rank), plan.guests[rank]
        send_idx = tokens(np.concatenate(sends))
        send = [int(plan.block_lengths(b, plan.lq).sum()) for b in sends]
        recv = [int(plan.block_lengths(guests[plan.q_owner[guests] == s], plan.lq).sum()) for s in range(self.world)]
        q_guest = exchange(q.index_select(2, send_idx).permute(2, 0, 1, 3), send, recv, group).permute(1, 2, 0, 3)
        out_whole, _ = attend(whole, q.index_select(2, whole_idx), k_buf, v_buf, plan.buffer_blocks(rank), False)
        out_whole = _tied(out_whole, k_buf, v_buf)
        n = heavy_idx.numel()
        q_pieces = torch.cat([q.index_select(2, heavy_idx), q_guest], dim=2)
        out_p, lse_p = attend(np.concatenate([heavy, guests]), q_pieces, k, v, plan.k_blocks(rank), True)
        wide = compute_dtype(q.dtype)  # the pieces travel and merge in float32 (float64 for float64)
        out_p = _tied(out_p.to(wide), q_guest)
        lse_p = lse_p.to(wide)
        packed = torch.cat([out_p[:, :, n:], lse_p[:, :, n:, None]], dim=-1).permute(2, 0, 1, 3)
        back = exchange(packed, recv, send, group).permute(1, 2, 0, 3)
        position = torch.full((q.shape[2],), -1, dtype=torch.long, device=q.device)
        position[heavy_idx] = torch.arange(n, device=q.device)
        rows = torch.cat([torch.arange(n, device=q.device), position[send_idx]])
        pieces_out = torch.cat([out_p[:, :, :n], back[..., :-1]], dim=2)
        pieces_lse = torch.cat([lse_p[:, :, :n], back[..., -1]], dim=2)
        merged, _ = merge_partials(pieces_out.flatten(0, 1), pieces_lse.flatten(0, 1), rows, n)
        merged = merged.view(*q.shape[:2], n, v.shape[-1]).to(q.dtype)
        inverse = inverse_permutation(torch.cat([whole_idx, heavy_idx]))
        return torch.cat([out_whole, merged], dim=2).index_select(2, inverse)

    def _selections(self, plan: Plan, q: torch.Tensor, k: torch.Tensor) -> dict:
        """This call's `route` and `vertical_slash` selections over the whole sequence, the
        same on every rank, from each rank's own q and k (a few small collectives,
        dsl/sharded.py)."""
        tokens = (plan.q_tokens(self.rank), plan.k_tokens(self.rank))
        return route_tables(self.program, plan.lq, plan.lk, q.detach(), k.detach(), *tokens,
                            GroupCollective(self.group), **plan.bindings)  # fmt: skip

    def _clustered_call(self, plan: Plan, q, k, v, scale: float | None) -> torch.Tensor:
        """`cluster` patterns: q and k all-gathered (detached) to find the clusters, then the
        blocks they visit exchanged and attended with dense tiles."""
        values = {**plan.bindings, "q": plan.unshard(q, group=self.group)}
        values["k"] = plan.unshard(k, keys=True, group=self.group)
        schedule = self.program.schedule(plan.lq, plan.lk, block_q=plan.block, block_k=plan.block,
                                         heads=q.shape[1], layout="rowmajor", **values)  # fmt: skip
        plan = plan.with_schedule(schedule)
        k_buf, v_buf = self.gather_kv(plan, k, v)
        instance, tensors = instantiate(self.program.spec, plan.lq, plan.lk, q.shape[1], None, q.shape[0], values)
        out, _ = local.attend(plan, instance, tensors, q, k_buf, v_buf, plan.buffer_blocks(self.rank), scale)
        return _joined(out, k_buf, v_buf)

    def global_schedule(self, plan: Plan, backend: str, q: torch.Tensor, v: torch.Tensor,
                        routes: dict | None = None):  # fmt: skip
        """The program prepared for the whole sequence over the plan's schedule and blocks
        (runtime/blockset.py), kept on the plan for static patterns.  Patterns that select
        from q and k build the schedule here, from this call's `routes` (`_selections`)."""
        key = (backend, q.dtype, q.shape[-1], v.shape[-1], str(q.device))
        if routes is None and key in plan.kernels:
            return plan.kernels[key]
        base = prepare_blockset(self.program, plan.lq, plan.lk, heads=plan.heads,
                                backend="cpu" if backend == "reference" else backend, dtype=q.dtype,
                                head_dim=q.shape[-1], head_dim_v=v.shape[-1], device=q.device,
                                routes=routes, **plan.bindings)  # fmt: skip
        p = base.prepared
        schedule = plan.schedule
        if schedule is None:
            schedule = codegen_plan.plan_schedule(p.instance, plan.block, plan.block, "rowmajor", p.tensors)
        # the policy's kernel configuration when it runs the plan's blocks, else (Triton) the
        # configuration for blocks chosen by hand (runtime/tuning.py)
        tiles = Tiles(plan.block, plan.block, p.tiles.kernel if base.block == plan.block else None)
        glob = GlobalSchedule(Prepared.with_schedule(p.instance, p.forms, p.tensors, p.title, schedule, tiles),
                              base.backend)  # fmt: skip
        if routes is None:  # static pattern: the same for every call with this plan
            plan.kernels[key] = glob
        return glob

    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> None:
        if plan.world != self.world or plan.rank != self.rank:
            raise MaskError(
                f"the plan is for rank {plan.rank} of {plan.world}; this is rank {self.rank} of {self.world}"
            )
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.dim() != 4:
                raise MaskError(f"{name} must be [batch, heads, tokens, dim], got shape {tuple(x.shape)}")
        if q.shape[1] != plan.heads:
            raise MaskError(f"q has {q.shape[1]} heads; the plan was made for heads={plan.heads}")
        nq, nk = plan.q_tokens(self.rank).numel(), plan.k_tokens(self.rank).numel()
        if q.shape[2] != nq:
            raise MaskError(f"q holds {q.shape[2]} tokens; rank {self.rank}'s share of the plan is {nq} (plan.shard)")
        for name, x in (("k", k), ("v", v)):
            if x.shape[2] != nk:
                raise MaskError(
                    f"{name} holds {x.shape[2]} tokens; rank {self.rank}'s share of the plan is {nk} (plan.shard)"
                )
        if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1]:
            raise MaskError(
                f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v share batch and "
                "heads, and k's heads divide q's"
            )

    def gather_kv(self, plan: Plan, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's keys and values followed by the remote blocks the plan lists (one all-to-all)."""
        rank = self.rank
        own = plan.k_blocks(rank)
        lengths = plan.block_lengths(own, plan.lk)
        start_of = np.zeros(plan.num_k_blocks, dtype=np.int64)
        start_of[own] = np.cumsum(lengths) - lengths
        send_blocks = plan.sends(rank)
        index = torch.as_tensor(token_ranges(np.concatenate(send_blocks), start_of, plan))
        send = [int(plan.block_lengths(b, plan.lk).sum()) for b in send_blocks]
        mine = plan.recv[rank]
        recv = [int(plan.block_lengths(mine[plan.k_owner[mine] == s], plan.lk).sum()) for s in range(self.world)]
        dk = k.shape[-1]
        # only the outgoing rows are copied together (one exchange carries K and V)
        index = index.to(k.device)
        outgoing = torch.cat([k.index_select(2, index), v.index_select(2, index).to(k.dtype)], dim=-1)
        outgoing = outgoing.permute(2, 0, 1, 3)
        incoming = exchange(outgoing, send, recv, self.group).permute(1, 2, 0, 3)
        self.last_exchange_bytes = outgoing.numel() * outgoing.element_size()
        self.last_exchange_received = incoming.numel() * incoming.element_size()
        # the buffers always hold `incoming` (even empty): every rank's backward must join the reverse
        # exchange, which autograd runs only where the received rows reach the output
        k_in, v_in = incoming[..., :dk], incoming[..., dk:].to(v.dtype)
        return torch.cat([k, k_in], dim=2), torch.cat([v, v_in], dim=2)
