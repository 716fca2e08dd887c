"""Clear errors from the runtime for inputs that cannot work."""

from __future__ import annotations

import pytest
import torch

import maskc


@pytest.fixture
def program():
    return maskc.compile("causal & window(4)")


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_bad_inputs(program, backend):
    q = t(1, 2, 8, 16)
    cases = [
        ((t(2, 8, 16), q, q), "shape \\[batch, heads, len, dim\\]"),
        ((q, t(1, 3, 8, 16), t(1, 3, 8, 16)), "dividing q's"),
        ((q, t(1, 2, 8, 8), t(1, 2, 8, 8)), "head dims differ"),
        ((q, t(1, 2, 8, 16), t(1, 2, 9, 16)), "lengths differ"),
        ((q, t(2, 2, 8, 16), t(2, 2, 8, 16)), "batch sizes differ"),
        ((q.long(), q, q), "floating point"),
    ]
    for args, message in cases:
        with pytest.raises(maskc.MaskError, match=message):
            program(*args, backend=backend)


def test_mixed_dtypes_and_unknown_backend(program):
    q = t(1, 2, 8, 16)
    with pytest.raises(maskc.MaskError, match="share a dtype"):
        program(q, q.half(), q.half(), backend="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        program(q, q, q, backend="cuda")


def test_bindings_that_do_not_fit(program):
    q = t(1, 1, 16, 16)
    grid = maskc.compile("natten2d", k=3)
    with pytest.raises(maskc.MaskError, match="grid size 'w' is not bound"):
        grid(q, q, q, backend="cpu", h=5)
    with pytest.raises(maskc.MaskError, match="holds 25 positions"):
        grid(q, q, q, backend="cpu", h=5, w=5)
    with pytest.raises(maskc.MaskError, match="unknown"):
        program(q, q, q, backend="cpu", nonsense=3)
    docs = maskc.compile("documents")
    with pytest.raises(maskc.MaskError, match="ids"):
        docs(q, q, q, backend="cpu", ids=torch.zeros(1, 7, dtype=torch.long))


def test_triton_head_dim_limit(program):
    q = t(1, 1, 8, 300)
    with pytest.raises(maskc.MaskError, match="head dims"):
        program(q, q, q, backend="triton")
