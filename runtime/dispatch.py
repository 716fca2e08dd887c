"""`Program.__call__`: check inputs, pick a backend, lay tokens out, run.

Backends take execution-order q, k, v and a `Prepared`, and return
(out, lse): out like q (with v's head dim), lse float32 [batch, heads, lq]
(-inf for rows with no allowed key).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from maskc.codegen.plan import clustered_splits
from maskc.dsl.errors import MaskTypeError

from . import clustered
from . import op as _op
from .dropout import Dropout, draw_seed
from .inputs import check_dropout, check_inputs, check_scale, resolve_backend
from .prepare import Prepared
from .reference import pattern_reference

# Block sizes each backend schedules with (query block, key block); Triton's depend on the head dim.
BLOCKS = {"cpu": (64, 64), "flex": (128, 128)}

_MODULES = {
    "cpu": ("maskc.runtime.cpu", "cpu_attention"),
    "flex": ("maskc.runtime.flex", "flex_backend"),
    "triton": ("maskc.runtime.triton_backend", "triton_attention"),
}


def backend_function(name: str) -> Callable:
    module, attr = _MODULES[name]
    return getattr(importlib.import_module(module), attr)


def blocks_for(name: str, q: torch.Tensor, v: torch.Tensor, program=None) -> tuple[int, int]:
    """Block sizes to schedule with; Triton's depend on the head dim and on whether
    the pattern's modifiers read tables per pair (smaller tiles, see codegen/tiles.py)."""
    if name == "triton":
        from maskc.codegen.tiles import HEAVY_MODIFIERS, config

        heavy = program is not None and bool(program.spec.modifier_names() & set(HEAVY_MODIFIERS))
        c = config(max(q.shape[-1], v.shape[-1]), q.shape[2], heavy)
        return c.block_q, c.block_k
    block_q, block_k = BLOCKS[name]
    if name == "cpu":  # decoding and short chunks: a query block no taller than the rows
        block_q = min(block_q, 1 << max(q.shape[2] - 1, 0).bit_length())
    return block_q, block_k


def empty_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Attention when a dimension is 0 (batch, lq or lk), as SDPA gives it: empty output,
    or rows of zeros when there are no keys; (out, lse), differentiable."""
    from maskc.dsl.dynamic import expand_kv_heads

    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [B, H, lq, 0] or empty
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
        if dropout_p:
            bindings = {**bindings, "dropout_p": dropout_p, "dropout_seed": draw_seed()}
        return pattern_reference(
            program.spec, q, k, v, scale=scale, q_offset=q_offset, return_lse=return_lse, bindings=bindings
        )
    tensor_names = [n for n, x in bindings.items() if isinstance(x, torch.Tensor)]
    size_names = [n for n, x in bindings.items() if not isinstance(x, torch.Tensor)]
    out, lse = _op.attention(
        q,
        k,
        v,
        program.key,
        name,
        scale,
        q_offset,
        ",".join(tensor_names),
        [bindings[n] for n in tensor_names],
        ",".join(size_names),
        [bindings[n] for n in size_names],
        dropout_p,
    )
    return (out, lse) if return_lse else out


def clustered_heads(name: str, prepared: Prepared) -> list[clustered.ClusterHead] | None:
    """Clustered execution plan for maskc's own backends (FlexAttention keeps the block schedule)."""
    return clustered.plan(prepared) if name in ("cpu", "triton") else None


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def run_prepared(name: str, q, k, v, prepared: Prepared, scale: float, dropout: Dropout | None = None):
    """Permute into the schedule's token order, run the backend, permute back
    (clustered patterns: gather into cluster order instead, see runtime/clustered.py).
    `dropout` (None: none) reaches the CPU and Triton backends only."""
    heads = clustered_heads(name, prepared)
    if heads is not None:
        if dropout is not None:
            raise MaskTypeError(
                f"backend={name!r} has no attention dropout for clustered patterns (cluster(...) heads run "
                "gathered into cluster order): use dropout_p=0"
            )
        if name == "triton" and clustered_splits(prepared.forms) is not None:  # what AOT compiles, too
            from .clustered_triton import triton_clustered_attention

            return triton_clustered_attention(q, k, v, prepared, scale, heads)
        return clustered.clustered_attention(q, k, v, prepared, scale, heads)
    perm_q, perm_k = prepared.perm_q, prepared.perm_k
    if perm_q is not None:
        q = q[:, :, perm_q.to(q.device)]
    if perm_k is not None:
        k, v = k[:, :, perm_k.to(k.device)], v[:, :, perm_k.to(k.device)]
    if dropout is None:
        out, lse = backend_function(name)(q, k, v, prepared, scale)
    elif name in ("cpu", "triton"):
        out, lse = backend_function(name)(q, k, v, prepared, scale, dropout)
    else:
        raise MaskTypeError(f"backend={name!r} has no attention dropout: use backend='cpu' or 'triton'")
    if perm_q is not None:
        inverse = inverse_permutation(perm_q.to(q.device))
        out, lse = out[:, :, inverse], lse[:, :, inverse]
    return out, lse
