"""The checks of a call's arguments: tensors, backend, scale, dropout.

Errors name what is wrong in the caller's terms (`MaskTypeError`) before any
schedule or kernel sees the tensors.
"""

from __future__ import annotations

import math

import torch
from maskc.dsl.errors import MaskTypeError

from .dropout import check_p

BACKENDS = ("auto", "triton", "cpu", "flex", "reference")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Clear errors for tensors that cannot be attention inputs."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise MaskTypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise MaskTypeError(f"{name} must have shape [batch, heads, len, dim], got {list(x.shape)}")
        if not x.is_floating_point():
            raise MaskTypeError(f"{name} must be floating point, got {x.dtype}")
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0]:
        raise MaskTypeError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise MaskTypeError(
            f"k and v must have the same number of heads, dividing q's: q {q.shape[1]}, k {k.shape[1]}, v {v.shape[1]}"
        )
    if k.shape[2] != v.shape[2]:
        raise MaskTypeError(f"k and v lengths differ: {k.shape[2]} vs {v.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise MaskTypeError(f"q and k head dims differ: {q.shape[3]} vs {k.shape[3]}")
    if q.device != k.device or k.device != v.device:
        raise MaskTypeError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend a call runs: "auto" is Triton on CUDA tensors, the CPU executor otherwise."""
    return backend_for(backend, q.is_cuda)


def backend_for(backend: str, cuda: bool) -> str:
    """The backend `backend` names for CUDA tensors (`cuda`) or others."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise MaskTypeError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "auto":
        return "triton" if cuda else "cpu"
    return backend


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """`check_qkv`, and what the backends need besides: one supported dtype, heads and head dims."""
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


def check_dropout(p: object, name: str) -> float:
    """dropout_p in [0, 1), on a backend that can drop (not FlexAttention)."""
    p = check_p(p)
    if p and name == "flex":
        raise MaskTypeError(
            f"backend='flex' has no attention dropout (dropout_p={p}): use backend='cpu' or 'triton' "
            "(or 'auto'), or dropout_p=0"
        )
    return p
