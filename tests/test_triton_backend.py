"""Generated Triton kernels under the interpreter: forward and all gradients vs the dense reference.

Tolerances: float32 atol = rtol = 2e-5 (accumulation order differs from the
reference's single matmul); bfloat16 atol 2e-2, rtol 2e-2 against the float32
reference of the same (rounded) inputs.
"""

from __future__ import annotations

import pytest
import torch

import maskc

CASES = [
    # (spec, lq, lk, heads, kv_heads, dim, bindings)
    ("window(5)", 70, 70, 2, 2, 16, {}),
    ("causal & window(20)", 100, 100, 2, 1, 40, {}),
    ("dilated(4, 3)", 65, 65, 1, 1, 16, {}),
    ("block(16)", 90, 90, 2, 2, 16, {}),
    ("causal & stride(7)", 80, 80, 1, 1, 16, {}),
    ("window(8) | global(0 .. 3)", 70, 70, 2, 2, 72, {}),
    ("neighborhood((3, 3), dilation = (2, 1)) on grid(h, w)", 80, 80, 2, 2, 16, {"h": 8, "w": 10}),
    ("neighborhood((5, 5)) on grid(h, w)", 256, 256, 1, 1, 16, {"h": 16, "w": 16}),
    ("heads { 0 .. 1: causal; 1 .. 3: window(6) - block(8) }", 70, 70, 3, 3, 16, {}),
    ("causal & window(30) with alibi(), softcap(5.0)", 90, 90, 2, 1, 16, {}),
    ("causal & window(12)", 17, 100, 2, 2, 16, {}),
    ("random(2, block = 16, seed = 3) | window(4)", 64, 64, 2, 2, 16, {}),
]


def _inputs(lq, lk, heads, kv_heads, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, lq, dim, generator=g).to(dtype)
    k = torch.randn(2, kv_heads, lk, dim, generator=g).to(dtype)
    v = torch.randn(2, kv_heads, lk, dim, generator=g).to(dtype)
    return [t.requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("spec,lq,lk,heads,kv_heads,dim,bindings", CASES, ids=[c[0] for c in CASES])
def test_forward_and_gradients_match_reference(spec, lq, lk, heads, kv_heads, dim, bindings):
    program = maskc.compile(spec)
    q, k, v = _inputs(lq, lk, heads, kv_heads, dim)
    out, lse = program(q, k, v, backend="triton", return_lse=True, **bindings)
    ref, ref_lse = program.reference(q, k, v, return_lse=True, **bindings)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"d{name}: {m}")


def test_empty_rows_give_zero_and_finite_gradients():
    program = maskc.compile("keys(40 .. 50) & queries(0 .. 20)")
    q, k, v = _inputs(64, 64, 1, 1, 16)
    out = program(q, k, v, backend="triton")
    assert torch.all(out[:, :, 20:] == 0)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, 20:] == 0)


def test_lse_gradient_flows():
    """Merging shards uses the log-sum-exp, so its gradient must be right too."""
    program = maskc.compile("causal & window(10)")
    q, k, v = _inputs(40, 40, 1, 1, 16)
    out, lse = program(q, k, v, backend="triton", return_lse=True)
    ref, ref_lse = program.reference(q, k, v, return_lse=True)
    w = torch.randn_like(lse)
    got = torch.autograd.grad((out.sum() + (lse * w).sum()), (q, k, v))
    want = torch.autograd.grad((ref.sum() + (ref_lse * w).sum()), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_bfloat16_close_to_float32_reference():
    program = maskc.compile("causal & window(16)")
    q, k, v = _inputs(50, 50, 2, 2, 16, dtype=torch.bfloat16)
    out = program(q, k, v, backend="triton")
    assert out.dtype == torch.bfloat16
    ref = program.reference(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_decoding_path_single_query():
    program = maskc.compile("causal & window(30) | sink(4)")
    q, k, v = _inputs(1, 200, 4, 2, 16)
    out = program(q, k, v, backend="triton")
    torch.testing.assert_close(out, program.reference(q, k, v), atol=2e-5, rtol=2e-5)


def test_data_dependent_patterns_match_reference():
    g = torch.Generator().manual_seed(1)
    q, k, v = _inputs(96, 96, 2, 2, 16, seed=3)
    ids = torch.tensor([[0] * 30 + [1] * 40 + [2] * 26, [0] * 60 + [1] * 36])
    cases = [
        ("pattern p(ids: tensor) = causal & segments(ids)", {"ids": ids}),
        ("route(topk = 2, block = 16) | window(2)", {}),
        ("causal & route(topk = 2, block = (4, 4), own = true, shared = false) on grid(8, 12)", {}),
        ("cluster(3, size = 40)", {"centroids": torch.randn(2, 3, 16, generator=g)}),
    ]
    for spec, bindings in cases:
        program = maskc.compile(spec)
        out = program(q, k, v, backend="triton", **bindings)
        ref = program.reference(q, k, v, **bindings)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5, msg=lambda m, spec=spec: f"{spec}: {m}")
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        want = torch.autograd.grad(ref, (q, k, v), grad)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, spec=spec: f"{spec}: {m}")


# The kernels run each block one of three ways (codegen/kernel_template.py): full blocks that end
# within the sequence without masks or predicate, partial blocks with `allowed`, and the ragged
# last block (length not a multiple of 64) with bounds too.  Each case's schedule on the
# interpreter's 64 x 64 blocks holds the paths named, checked below so a schedule change cannot
# silently drop one.
FULL_BLOCK_CASES = [
    # (spec, lq, lk, scale, (full interior, full ragged, partial))
    ("all", 70, 150, None, (True, True, False)),  # full runs ending on the ragged key (and query) block
    # rows 64 .. 69 allow no key: empty rows inside partial blocks, next to full ones; the ragged
    # diagonal block partial; a negative scale
    ("causal & queries(70 .. 140)", 140, 140, -0.7, (True, False, True)),
]


@pytest.mark.parametrize("spec,lq,lk,scale,paths", FULL_BLOCK_CASES, ids=[c[0] for c in FULL_BLOCK_CASES])
def test_block_paths_with_views_of_a_fused_projection(spec, lq, lk, scale, paths):
    """q, k, v as users hold them: strided views of one fused projection, two query heads per
    key/value head (GQA); forward, log-sum-exp and the gradient of the projection."""
    program = maskc.compile(spec)
    dense = program.schedule(lq, lk, block_q=64, block_k=64).groups[0].to_dense(3)
    ragged = lk // 64  # the last key block, shorter than 64
    assert (
        bool((dense[:, :ragged] == 2).any()),
        bool((dense[:, ragged] == 2).any()),
        bool((dense == 1).any()),
    ) == paths
    g = torch.Generator().manual_seed(5)
    proj = torch.randn(1, max(lq, lk), 4, 16, generator=g, requires_grad=True)  # heads: q, q, k, v
    q = proj[:, :lq, :2].transpose(1, 2)
    k, v = (proj[:, :lk, i : i + 1].transpose(1, 2) for i in (2, 3))
    assert not q.is_contiguous()
    out, lse = program(q, k, v, backend="triton", return_lse=True, scale=scale)
    ref, ref_lse = program.reference(q, k, v, return_lse=True, scale=scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-5, rtol=2e-5)
    w, w_lse = torch.randn_like(out), torch.randn_like(lse)

    def loss(o, m):  # through both outputs; empty rows' log-sum-exp (-inf) left out
        return (o * w).sum() + (m.masked_fill(torch.isinf(m), 0.0) * w_lse).sum()

    (got,) = torch.autograd.grad(loss(out, lse), proj)
    (want,) = torch.autograd.grad(loss(ref, ref_lse.float()), proj)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
