"""`Program.__call__`: check inputs, pick a backend, lay tokens out, run.

Backends take execution-order q, k, v and a `Prepared`, and return
(out, lse): out like q (with v's head dim), lse float32 [batch, heads, lq]
(-inf for rows with no allowed key).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
from maskc.codegen.plan import clustered_splits
from maskc.dsl.errors import MaskTypeError

from . import clustered
from . import op as _op
from .dropout import Dropout, check_p, draw_seed
from .prepare import Prepared

BACKENDS = ("auto", "triton", "cpu", "flex", "reference")

# Block sizes each backend schedules with (query block, key block); Triton's depend on the head dim.
BLOCKS = {"cpu": (64, 64), "flex": (128, 128)}

_MODULES = {
    "cpu": ("maskc.runtime.cpu", "cpu_attention"),
    "flex": ("maskc.runtime.flex", "flex_backend"),
    "triton": ("maskc.runtime.triton_backend", "triton_attention"),
}


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise MaskTypeError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda else "cpu"
    return backend


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


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    from maskc.program import check_qkv

    check_qkv(q, k, v)
    if not (q.dtype == k.dtype == v.dtype):
        raise MaskTypeError(f"q, k, v must share a dtype: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise MaskTypeError(f"unsupported dtype {q.dtype}: use float16, bfloat16 or float32")
    if k.shape[1] == 0:
        raise MaskTypeError(f"k and v need at least one head, got shapes {list(k.shape)} and {list(v.shape)}")
    if q.shape[3] == 0 or v.shape[3] == 0:
        raise MaskTypeError(f"head dims must be at least 1: q has {q.shape[3]}, v has {v.shape[3]}")


def check_scale(scale: object, head_dim: int) -> float:
    """The softmax scale: 1/sqrt(head dim) by default, else a finite real number."""
    if scale is None:  # int(): a symbolic head dim under torch.compile(dynamic=True) is specialised
        return 1.0 / math.sqrt(int(head_dim))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise MaskTypeError(f"scale must be a finite number (or None for 1/sqrt(head dim)), got {scale!r}")
    return float(scale)


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
        return program.reference(q, k, v, scale=scale, q_offset=q_offset, return_lse=return_lse, **bindings)
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


def check_dropout(p: object, name: str) -> float:
    """dropout_p in [0, 1), on a backend that can drop (not FlexAttention)."""
    p = check_p(p)
    if p and name == "flex":
        raise MaskTypeError(
            f"backend='flex' has no attention dropout (dropout_p={p}): use backend='cpu' or 'triton' "
            "(or 'auto'), or dropout_p=0"
        )
    return p


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
