"""SparseAttention inside a model traced by torch.compile(fullgraph=True), with the default
(inductor) backend, which also checks the strides the custom ops promise."""

from __future__ import annotations

import torch
from torch import nn

import maskc


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, backend: str) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn = maskc.SparseAttention("pattern local(w = 4) = causal & window(w)", w=8, backend=backend)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = self.attn(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


def test_fullgraph_compile_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    model = Block(32, 2, backend="triton")
    x = torch.randn(2, 40, 32, requires_grad=True)
    eager = model(x)
    (gx_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(model, fullgraph=True)
    traced = compiled(x)
    (gx_traced,) = torch.autograd.grad(traced.sum(), x)
    torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(gx_traced, gx_eager)


def test_module_matches_reference():
    attn = maskc.SparseAttention("natten2d", k=3, backend="triton")
    q, k, v = (torch.randn(1, 2, 36, 16) for _ in range(3))
    torch.testing.assert_close(attn(q, k, v, h=6, w=6), attn.program.reference(q, k, v, h=6, w=6), atol=2e-5, rtol=2e-5)
    assert "natten2d" in repr(attn)


def test_fullgraph_compile_of_clustered_attention_from_the_first_call():
    """The module creates its centroids inside the traced graph, runs the gathered
    block-diagonal path, and updates the centroids in training mode."""
    attn = maskc.SparseAttention("causal & cluster(4, size = 16)", backend="cpu").eval()
    q, k, v = (
        torch.randn(1, 2, 64, 8, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(3)
    )
    compiled = torch.compile(lambda q, k, v: attn(q, k, v), fullgraph=True)
    out = compiled(q, k, v)
    assert attn.centroids.shape == (2, 4, 8)
    ref = attn.program.reference(q, k, v, centroids=attn.centroids)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    attn.train()
    before = attn.centroids.clone()
    torch.compile(lambda q, k, v: attn(q, k, v), fullgraph=True)(q, k, v)
    assert not torch.equal(attn.centroids, before)
