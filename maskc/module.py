"""`maskc.SparseAttention`: a pattern as an `nn.Module`."""

from __future__ import annotations

import torch
from torch import nn

from maskc.program import compile as compile_spec


class SparseAttention(nn.Module):
    """Attention restricted to a pattern, like `F.scaled_dot_product_attention`.

    Example::

        >>> attn = maskc.SparseAttention("natten2d", k=7)
        >>> out = attn(q, k, v, h=56, w=56)      # q, k, v: [batch, heads, 3136, dim]

    `params` fix the pattern's parameters; `forward` takes the call-time
    bindings (grid sizes, tensors such as segment ids).  The call goes through
    the `maskc::attention` op, so `torch.compile(fullgraph=True)` traces it.
    """

    def __init__(
        self,
        spec: str,
        *,
        pattern: str | None = None,
        backend: str = "auto",
        scale: float | None = None,
        **params,
    ) -> None:
        super().__init__()
        self.program = compile_spec(spec, pattern=pattern, **params)
        self.backend = backend
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **bindings) -> torch.Tensor:
        return self.program(q, k, v, backend=self.backend, scale=self.scale, **bindings)

    def extra_repr(self) -> str:
        return f"{self.program.source().strip()!r}, backend={self.backend!r}"
