"""Clustered attention (Routing Transformer) as a gather plus a block-diagonal schedule.

In the given token order, the members of a cluster are scattered over the
whole sequence, so an exact block schedule of `cluster(n, size = w)` visits
nearly every block.  In *cluster order* the same pattern is block diagonal:
per batch element and head, cluster c's w queries attend to cluster c's w keys,
n blocks of w x w instead of L x L.  This module runs that:

1. select each cluster's queries and keys (`dsl.evaluate.cluster_selection`,
   the same selection the reference uses) and gather q, k, v into cluster order;
2. attend within each cluster block, with the pattern's static conjuncts
   (`causal & cluster(...)`: causal on the true positions) as a mask;
3. merge each query's partial softmaxes over the clusters it belongs to through
   their log-sum-exps.

A token may sit in several clusters, and the mask is their union: a key that
shares two clusters with a query must count once, so in cluster c a pair is
kept only when c is the first cluster the two share.
Queries in no cluster output 0 with log-sum-exp -inf.

This module is the CPU backend's way (and the Triton backend's beyond 63
clusters): differentiable torch (batched matmuls, gathers and scatters on the
tensors' own device), so gradients come from autograd; the selection itself is
not differentiated, as in the Routing Transformer.  Memory per head grows with
n * w * w, not with L * L.  `runtime/clustered_triton.py` runs the same method
on the generated Triton kernels.  It applies when every head's pattern is one
`cluster` atom, possibly intersected with static atoms, without modifiers;
other patterns (`cluster(...) | window(...)`, heads mixing clusters and windows)
run on the exact block schedule instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from maskc.codegen.plan import split_cluster
from maskc.dsl import evaluate, ir
from maskc.dsl.dynamic import cluster_members, expand_kv_heads

from .merge import merge_partials
from .prepare import Prepared


@dataclass(frozen=True)
class ClusterHead:
    """Head `head` attends within the clusters of `node`, where `rest` also allows."""

    head: int
    node: ir.Cluster
    rest: ir.Mask | None


def plan(prepared: Prepared) -> list[ClusterHead] | None:
    """One entry per head when every head fits clustered execution, else None."""
    heads = []
    for head, group in enumerate(prepared.head_group):
        split = split_cluster(prepared.forms[group])
        if split is None:
            return None
        heads.append(ClusterHead(head, *split))
    return heads


def clustered_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: Prepared, scale: float, heads: list[ClusterHead]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out like q with v's head dim, lse [batch, heads, lq]: float32, float64 for float64 inputs)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    outs, lses = [], []
    for plan_h in heads:
        h = plan_h.head
        out, lse = _head(q[:, h].to(compute), k[:, h].to(compute), v[:, h].to(compute), prepared, scale, plan_h)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs, 1).to(q.dtype), torch.stack(lses, 1)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] at index [B, n, w] -> [B, n, w, D]."""
    b, n, w = index.shape
    flat = index.reshape(b, n * w, 1).expand(b, n * w, x.shape[-1])
    return torch.gather(x, 1, flat).view(b, n, w, x.shape[-1])


def _allowed(prepared: Prepared, plan_h: ClusterHead, index_q: torch.Tensor, index_k: torch.Tensor) -> torch.Tensor:
    """Pairs kept in each cluster block: bool [B, n, w, w].

    A pair is a duplicate in block c when an earlier cluster holds both tokens:
    the count of such clusters is a product of membership tables,
    [B, n, w, n] (query a of block c is in an earlier cluster c') times the
    transposed [B, n, w, n] (key b of block c is in cluster c')."""
    s = prepared.instance.sizes
    n = plan_h.node.clusters
    dtype = torch.float32
    in_q = cluster_members(index_q, s.lq).to(dtype)  # [B, n, lq]
    in_k = cluster_members(index_k, s.lk).to(dtype)
    q_in = _membership_of_gathered(in_q, index_q)  # [B, n(c), w, n(c')]
    k_in = _membership_of_gathered(in_k, index_k)
    earlier = torch.ones(n, n, dtype=torch.bool, device=index_q.device).tril(-1)  # [c, c']: c' < c
    q_in = q_in * earlier[None, :, None, :].to(dtype)
    allowed = torch.matmul(q_in, k_in.transpose(-1, -2)) == 0
    if plan_h.rest is not None:
        qp = (index_q + s.q_offset)[..., :, None]
        kp = index_k[..., None, :]
        allowed = allowed & evaluate.mask(plan_h.rest, qp.cpu(), kp.cpu(), prepared.tensors).to(allowed.device)
    return allowed


def _membership_of_gathered(members: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """members [B, n, L] read at the gathered tokens index [B, n, w]: [B, n, w, n]."""
    b, n, w = index.shape
    at = index.reshape(b, 1, n * w).expand(b, n, n * w)
    return torch.gather(members, 2, at).view(b, n, n, w).permute(0, 2, 3, 1)


def _head(q, k, v, prepared: Prepared, scale: float, plan_h: ClusterHead):
    """One head: q [B, lq, D], k [B, lk, D], v [B, lk, Dv] -> out [B, lq, Dv], lse [B, lq]."""
    index_q, index_k = evaluate.cluster_selection(prepared.tensors, plan_h.node)  # [B', n, w]
    batch = q.shape[0]
    index_q, index_k = index_q.expand(batch, -1, -1), index_k.expand(batch, -1, -1)
    allowed = _allowed(prepared, plan_h, index_q, index_k)
    qc, kc, vc = _gather(q, index_q), _gather(k, index_k), _gather(v, index_k)
    logits = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # [B, n, w, w]
    has_key = allowed.any(-1)
    logits = logits.masked_fill_(~allowed, -math.inf).masked_fill_(~has_key[..., None], 0.0)
    lse = torch.logsumexp(logits, -1)
    out = torch.matmul(torch.exp(logits - lse[..., None]), vc) * has_key[..., None]
    lse = lse.masked_fill(~has_key, -math.inf)
    return merge_partials(out.flatten(1, 2), lse.flatten(1), index_q.flatten(1), q.shape[1])
