"""Packed sequences as users hold them: lengths or cumulative offsets -> segment ids.

FlashAttention's varlen API takes `cu_seqlens` (offsets [0, l0, l0 + l1, ...]);
xFormers' `BlockDiagonalMask.from_seqlens` takes the lengths.  maskc's
`segments(ids)` (and the library's `documents` / `documents_causal`) takes one id
per token; `document_ids` turns either form into those ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from maskc.dsl.errors import MaskTypeError


def document_ids(
    seqlens: Sequence[int] | torch.Tensor | None = None,
    *,
    cu_seqlens: Sequence[int] | torch.Tensor | None = None,
    total: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Segment ids long [1, total] for documents packed back to back.

    Give the document lengths (`seqlens`) or their offsets (`cu_seqlens`, which
    starts at 0).  Tokens past the last document, up to `total`, are padding:
    each gets an id of its own, so it attends (and is attended by) nothing else.

    Example::

        >>> ids = maskc.document_ids([3, 2])
        >>> ids
        tensor([[0, 0, 0, 1, 1]])
        >>> prog = maskc.compile("documents_causal")
        >>> out = prog(q, k, v, ids=ids)  # q, k, v: [batch, heads, 5, dim]
    """
    if (seqlens is None) == (cu_seqlens is None):
        raise MaskTypeError("document_ids takes seqlens or cu_seqlens (exactly one)")
    if cu_seqlens is not None:
        offsets = _integers(cu_seqlens, "cu_seqlens")
        if offsets.numel() == 0 or int(offsets[0]) != 0:
            raise MaskTypeError(f"cu_seqlens must start at 0, got {offsets.tolist()[:4]}")
        lengths = offsets.diff()
    else:
        lengths = _integers(seqlens, "seqlens")
    if bool((lengths < 0).any()):
        raise MaskTypeError(f"document lengths must be >= 0, got {lengths.tolist()}")
    used = int(lengths.sum())
    total = used if total is None else total
    if isinstance(total, bool) or not isinstance(total, int) or total < used:
        raise MaskTypeError(f"total must be an integer >= the packed length {used}, got {total!r}")
    ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    padding = torch.arange(lengths.numel(), lengths.numel() + total - used)  # one id per padding token
    return torch.cat([ids, padding])[None].to(device)


def _integers(values, name: str) -> torch.Tensor:
    x = torch.as_tensor(values).cpu()
    if x.dim() != 1 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise MaskTypeError(f"{name} must be a 1-D sequence of integers, got {x.dtype} {list(x.shape)}")
    return x.long()


__all__ = ["document_ids"]
