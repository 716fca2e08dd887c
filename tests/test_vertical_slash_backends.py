"""`vertical_slash` on every backend against the dense reference: forward and
gradients of q, k, v (the selection itself is not differentiable), with q, k, v
as views of one fused projection, grouped kv heads, a length that is no multiple
of any block, queries after the keys' start, and batch 0."""

from __future__ import annotations

import pytest
import torch
from maskc.runtime import flex, op
from test_flex_backend import _flex_with_a_cpu_backward
from torch.nn.attention import flex_attention as flex_module

import maskc

SPEC = (
    "causal & vertical_slash(4, 5, last = 8, sink = 1, local = 2) | window(1, 0) & vertical_slash(2, 1, causal = false)"
)
TOL = {"atol": 2e-5, "rtol": 2e-5}


def fused_qkv(batch: int, n: int, seed: int = 0):
    """q [B, 4, n, 16], k and v [B, 2, n, 16]: permuted views of one projection."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 8 * 16, generator=g, requires_grad=True)
    q, k, v = x.view(batch, n, 8, 16).permute(0, 2, 1, 3).split([4, 2, 2], dim=1)
    return x, q, k, v


def check(backend: str, batch: int = 2, n: int = 45) -> None:
    program = maskc.compile(SPEC)
    x, q, k, v = fused_qkv(batch, n)
    out = program(q, k, v, backend=backend)
    ref = program.reference(q, k, v)
    torch.testing.assert_close(out, ref, **TOL)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_forward_and_gradients(backend):
    check(backend)


def test_flex_forward_and_gradients(monkeypatch):
    """Flex's own backward, run on CPU through its eager path (as test_flex_backend does)."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda q, k, v: None)
    monkeypatch.setattr(flex, "flex_backend", _flex_with_a_cpu_backward(flex.flex_backend))
    monkeypatch.setattr(op, "flex_has_backward", lambda device: True)
    check("flex")


def test_cross_lengths_and_empty_batch():
    program = maskc.compile(SPEC)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, n, 16, generator=g) for n in (21, 50, 50))
    torch.testing.assert_close(program(q, k, v, backend="cpu"), program.reference(q, k, v), **TOL)
    _, q, k, v = fused_qkv(0, 30)
    assert program(q, k, v, backend="cpu").shape == (0, 4, 30, 16)
