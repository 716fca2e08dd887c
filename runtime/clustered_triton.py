"""Clustered attention on the generated Triton kernels.

The same kernels that walk a block schedule run over sequences gathered into
cluster order (see runtime/clustered.py for the method): each cluster's w
members are padded to a whole number of blocks, so the schedule over the
gathered rows is block diagonal, and the emitted `allowed` predicate
(`codegen.emit.emit_clustered`) reads one small table per batch element and
head: the true position and the cluster bits of every gathered row.  Scores are
never materialised; the gathers, the kernels' own backward and the exact merge
of each query's clusters compose under autograd.
"""

from __future__ import annotations

import math

import torch
from maskc.codegen.emit import emit_clustered
from maskc.codegen.geometry import Geometry
from maskc.codegen.schedule import BlockSchedule, Runs
from maskc.codegen.version import __version__
from maskc.dsl import evaluate, ir
from maskc.dsl.dynamic import cluster_members, expand_kv_heads, membership_bits
from maskc.dsl.lower import Sizes
from maskc.dsl.spec import Instance

from . import triton_backend
from .clustered import ClusterHead
from .merge import merge_partials
from .prepare import Prepared
from .tuning import POLICY, Tiles


def triton_clustered_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: Prepared, scale: float, heads: list[ClusterHead]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q with v's head dim, lse float32 [batch, heads, lq])."""
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    outs: dict[int, torch.Tensor] = {}
    lses: dict[int, torch.Tensor] = {}
    for group in _groups(heads):
        out, lse = _group(q, k, v, prepared, scale, group)
        for i, plan_h in enumerate(group):
            outs[plan_h.head], lses[plan_h.head] = out[:, i], lse[:, i]
    order = range(q.shape[1])
    return torch.stack([outs[h] for h in order], 1), torch.stack([lses[h] for h in order], 1)


def _groups(heads: list[ClusterHead]) -> list[list[ClusterHead]]:
    """Heads that can share one launch: the same cluster shape and the same static
    rest, per-head data included (the rest's tables, such as random draws, are
    filled once per launch)."""
    groups: dict[tuple, list[ClusterHead]] = {}
    for plan_h in heads:
        groups.setdefault((plan_h.node.clusters, plan_h.node.size, plan_h.rest), []).append(plan_h)
    return list(groups.values())


def _group(q, k, v, prepared: Prepared, scale: float, group: list[ClusterHead]):
    s = prepared.instance.sizes
    batch, _, _, d = q.shape
    dv = v.shape[-1]
    node = group[0].node
    selections = [evaluate.cluster_selection(prepared.tensors, plan_h.node) for plan_h in group]
    width = max(max(iq.shape[-1], ik.shape[-1]) for iq, ik in selections)
    # the tiles for the gathered rows (on a GPU: the clustered kernels' first spill-free rung)
    tile = POLICY.choose("triton", prepared.forms, prepared.title, q.dtype, max(d, dv), node.clusters * width, q.device)
    step = max(tile.block_q, tile.block_k)
    padded = math.ceil(width / step) * step  # each cluster fills whole blocks
    rows = node.clusters * padded
    true_q, true_k, table = [], [], []
    for index_q, index_k in selections:
        pq = _pad(index_q.expand(batch, -1, -1), padded)  # [B, n * padded], -1 for padding
        pk = _pad(index_k.expand(batch, -1, -1), padded)
        bits_q = _bits_at(index_q.expand(batch, -1, -1), s.lq, pq)
        bits_k = _bits_at(index_k.expand(batch, -1, -1), s.lk, pk)
        table.append(torch.stack([pq, pk, bits_q, bits_k], 1))  # [B, 4, rows]
        true_q.append(pq)
        true_k.append(pk)
    table_t = torch.stack(table, 1).contiguous()  # [B, G, 4, rows] int64
    head_ids = [plan_h.head for plan_h in group]
    qg = _gather(q[:, head_ids], torch.stack(true_q, 1))
    kg = _gather(k[:, head_ids], torch.stack(true_k, 1))
    vg = _gather(v[:, head_ids], torch.stack(true_k, 1))
    gathered = _prepared(prepared, group, rows, padded, tile, table_t)
    out_g, lse_g = triton_backend.triton_attention(qg, kg, vg, gathered, scale)  # [B, G, rows, Dv], [B, G, rows]
    where = torch.stack(true_q, 1).clamp(min=0)
    g = len(group)
    out, lse = merge_partials(out_g.float().flatten(0, 1), lse_g.flatten(0, 1), where.flatten(0, 1), s.lq)
    return out.view(batch, g, s.lq, dv).to(q.dtype), lse.view(batch, g, s.lq)


def _pad(index: torch.Tensor, padded: int) -> torch.Tensor:
    """[B, n, w] positions -> [B, n * padded], each cluster padded with -1."""
    b, n, w = index.shape
    out = torch.full((b, n, padded), -1, dtype=torch.int64, device=index.device)
    out[..., :w] = index
    return out.view(b, n * padded)


def _bits_at(index: torch.Tensor, length: int, rows: torch.Tensor) -> torch.Tensor:
    """Cluster bits (one int64 word) of the tokens at gathered rows; 0 for padding."""
    bits = membership_bits(cluster_members(index, length))[:, 0]  # [B, length]
    picked = torch.gather(bits, 1, rows.clamp(min=0))
    return torch.where(rows >= 0, picked, torch.zeros_like(picked))


def _gather(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, G, L, D] at rows [B, G, R] (-1: any row; the predicate masks it) -> [B, G, R, D]."""
    at = rows.clamp(min=0)[..., None].expand(*rows.shape, x.shape[-1])
    return torch.gather(x, 2, at)


def _prepared(original: Prepared, group: list[ClusterHead], rows: int, padded: int, tile: Tiles, table) -> Prepared:
    """The gathered problem as the Triton backend sees it: G heads of `rows`
    tokens, a block-diagonal schedule, and the clustered kernel source."""
    rest = group[0].rest
    mask = rest if rest is not None else ir.Const(True)
    heads = len(group)
    sizes = Sizes(rows, rows, heads, 0, {})
    instance = Instance(sizes, [ir.HeadPattern(mask)], [0] * heads)
    bq, bk = tile.block_q, tile.block_k
    schedule = _block_diagonal(rows, padded, bq, bk, heads, mask)
    tensors = evaluate.Tensors({}, instance)
    prepared = Prepared.with_schedule(instance, [ir.HeadPattern(mask)], tensors, original.title, schedule, tile)
    g = table.shape[1]
    q_offset = original.instance.sizes.q_offset
    prepared.extra_tables["clusters"] = [table, g * 4 * rows, 4 * rows, rows, padded, q_offset]
    form = ir.HeadPattern(ir.And((group[0].node, rest)) if rest is not None else group[0].node)
    source = emit_clustered(form, rest, original.title, bq, bk, __version__)
    prepared.artifacts.kernel_sources[0] = source
    return prepared


def _block_diagonal(rows: int, padded: int, bq: int, bk: int, heads: int, mask: ir.Mask) -> BlockSchedule:
    """Query block r visits the key blocks of its own cluster, as one partial run."""
    q_blocks = rows // bq
    cluster = torch.arange(q_blocks) // (padded // bq)
    start = (cluster * (padded // bk)).to(torch.int32)
    runs = Runs(
        torch.arange(q_blocks + 1, dtype=torch.int32),
        start,
        start + padded // bk,
        torch.zeros(q_blocks, dtype=torch.bool),
    )
    q, k = Geometry(rows, bq), Geometry(rows, bk)
    return BlockSchedule(rows, rows, bq, bk, [0] * heads, [runs], [mask], q, k)
