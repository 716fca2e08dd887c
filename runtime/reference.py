"""Dense reference attention: SDPA over an explicit mask and modified logits.

Slow and exact; every faster path is tested against it.  A query row with no
allowed key outputs 0 and has finite gradients.  `pattern_reference` is
`Program.reference` (and the "reference" backend): the pattern's dense mask and
modifiers for a call's tensors, then `reference_attention`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from maskc.dsl import evaluate
from maskc.dsl.spec import Spec

from . import dropout as dropping
from .inputs import check_qkv
from .prepare import instantiate


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat grouped key/value heads to the query head count (GQA/MQA)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    score_mod: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    dropout_keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
):
    """q [B, H, lq, D], k/v [B, Hk, lk, D]; mask broadcastable to [B, H, lq, lk].

    Computes in float32 (float64 for float64 inputs) and returns q's dtype.
    The log-sum-exp is -inf for rows with no allowed key.  Dropout: the
    probabilities are multiplied by `dropout_keep` (bool, broadcastable to
    [B, H, lq, lk]) and scaled by 1 / (1 - dropout_p); the log-sum-exp is
    that of the undropped softmax.
    """
    heads = q.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qc = q.to(compute)
    kc = expand_heads(k, heads).to(compute)
    vc = expand_heads(v, heads).to(compute)
    logits = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if score_mod is not None:
        logits = score_mod(logits)
    mask = mask.to(logits.device)
    logits = logits.masked_fill(~mask, -math.inf)
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(logits - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    probs = weights / safe_total
    if dropout_keep is not None:
        probs = probs * (dropout_keep.to(probs.device) * (1.0 / (1.0 - dropout_p))).to(probs.dtype)
    out = torch.matmul(probs, vc).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(total > 0, torch.log(safe_total) + row_max, torch.full_like(total, -math.inf))
    return out, lse.squeeze(-1)


def pattern_reference(
    spec: Spec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    q_offset: int | None = None,
    return_lse: bool = False,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    bindings: dict,
):
    """Dense attention with the pattern of `spec`; see `Program.reference`."""
    check_qkv(q, k, v)
    bindings = {"q": q, "k": k, **bindings}
    instance, tensors = instantiate(spec, q.shape[2], k.shape[2], q.shape[1], q_offset, q.shape[0], bindings)
    allowed = evaluate.dense_mask(instance, tensors)
    if allowed.dim() == 3:
        allowed = allowed[None]

    def score_mod(logits: torch.Tensor) -> torch.Tensor:
        return evaluate.scores(instance, tensors, logits)

    keep, dropout_p = None, dropping.check_p(dropout_p)
    if dropout_p:
        seed = dropping.draw_seed() if dropout_seed is None else int(dropout_seed)
        qp, kp = evaluate.positions(instance)
        keep = dropping.dense_keep(dropping.Dropout(dropout_p, seed), q.shape[0], q.shape[1], qp, kp)
    return reference_attention(q, k, v, allowed, score_mod, scale, return_lse, keep, dropout_p)
