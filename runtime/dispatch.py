"""`Program.__call__`: check the arguments, pick a backend, describe the call, run it.

The call runs through runtime/op.py (autograd, or the torch.library ops under
`torch.compile`); the "reference" backend and calls with an empty dimension
are answered here.
"""

from __future__ import annotations

import torch
from maskc.dsl.dynamic import expand_kv_heads

from . import op
from .call import Call, joined
from .cpu.layout import compute_dtype
from .dropout import draw_seed
from .inputs import check_dropout, check_inputs, check_scale, resolve_backend
from .reference import pattern_reference


def empty_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Attention when a dimension is 0 (batch, lq or lk), as SDPA gives it: empty output,
    or rows of zeros when there are no keys; (out, lse), differentiable."""
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    logits = torch.matmul(q, k.transpose(-1, -2)).to(compute_dtype(q.dtype)) * scale  # [B, H, lq, 0] or empty
    return torch.matmul(logits.to(v.dtype), v), torch.logsumexp(logits, -1)


def run(
    program,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "auto",
    scale: float | None = None,
    return_lse: bool = False,
    q_offset: int | None = None,
    dropout_p: float = 0.0,
    **bindings,
):
    check_inputs(q, k, v)
    name = resolve_backend(backend, q)
    scale = check_scale(scale, q.shape[-1])
    if dropout_p != 0.0 or not isinstance(dropout_p, float):
        dropout_p = check_dropout(dropout_p, name)
    if 0 in (q.shape[0], q.shape[2], k.shape[2]):
        out, lse = empty_attention(q, k, v, scale)
        return (out, lse) if return_lse else out
    if name == "reference":
        seed = draw_seed() if dropout_p else None
        return pattern_reference(
            program.spec, q, k, v, scale=scale, q_offset=q_offset, return_lse=return_lse, dropout_p=dropout_p,
            dropout_seed=seed, bindings=bindings,
        )  # fmt: skip
    tensor_names, tensors, size_names, sizes = joined(bindings)
    call = Call(program.key, name, scale, q_offset, tensor_names, size_names, tuple(sizes), dropout_p)
    out, lse = op.attention(q, k, v, call, tensors)
    return (out, lse) if return_lse else out
