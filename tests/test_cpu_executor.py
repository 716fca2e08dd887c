"""The fast CPU executor (runtime/cpu/) against the dense reference.

Forward output, log-sum-exp and the gradients of q, k, v (and of tensors that
modifiers read) are compared with `Program.reference`, through the public call
(`program(q, k, v, backend="cpu")`) and through `cpu_attention` directly.

Tolerances: float32 atol = rtol = 1e-5; float64 atol = rtol = 1e-9 (lse, float32
by contract, 1e-6); float16 / bfloat16 outputs and gradients against the float32
reference on the same (rounded) inputs: atol = rtol = 1e-2 for bfloat16 (8-bit
mantissa: one rounding of the result is 2**-9 relative), 2e-3 for float16.
"""

from __future__ import annotations

import math

import pytest
import torch
from maskc.runtime import cpu
from maskc.runtime.execute import run_prepared
from maskc.runtime.prepare import prepare

import maskc

TOL = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 1e-2, torch.float16: 2e-3}
BLOCK = 64  # the CPU executor's block size (runtime.tuning.POLICY.cpu_block)


def inputs(b, h, hk, lq, lk, d, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hk, lk, d, generator=g)
    v = torch.randn(b, hk, lk, dv or d, generator=g)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def close(actual, expected, tol, what):
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def check(program, q, k, v, extra=(), tol=None, **bindings):
    """Forward and lse of `program(..., backend="cpu")`, and all gradients of the
    executor (run in the schedule's token order by `run_prepared`, as the op does),
    against the reference."""
    tol = tol or TOL[q.dtype]
    out, lse = program(q, k, v, backend="cpu", return_lse=True, **bindings)
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    ref_in = [x.detach().to(wide).requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = program.reference(*ref_in, return_lse=True, **bindings)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1])
    assert lse.dtype == wide and lse.shape == q.shape[:3]
    close(out, ref_out, tol, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without keys differ"
    finite = torch.isfinite(ref_lse)
    close(lse[finite], ref_lse[finite].float(), max(tol, 1e-6), "lse")

    _, (out, _) = direct(program, q, k, v, **bindings)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, [q, k, v, *extra], grad.to(out.dtype))
    want = torch.autograd.grad(ref_out, [*ref_in, *extra], grad.to(ref_out.dtype))
    for name, a, b in zip(["dq", "dk", "dv", *[f"d extra{i}" for i in range(len(extra))]], got, want, strict=True):
        close(a, b, tol, name)
    return out, lse, got


def direct(program, q, k, v, scale=None, **bindings):
    """The executor below the torch.library op: prepare, permute, cpu_attention, permute back."""
    prepared = prepare(program, q, k, BLOCK, BLOCK, None, bindings)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return prepared, run_prepared("cpu", q, k, v, prepared, scale)


CASES = [
    # (spec, lq, lk, heads, kv heads, dim, bindings)
    ("window(37)", 300, 300, 2, 2, 16, {}),
    ("causal & window(100)", 333, 333, 2, 2, 40, {}),
    ("causal & window(70)", 150, 400, 2, 2, 16, {}),  # lq < lk: queries aligned to the end
    ("causal & window(70)", 290, 130, 2, 2, 16, {}),  # lq > lk: early rows see nothing
    ("dilated(20, 3)", 260, 260, 2, 2, 16, {}),
    ("block(48)", 250, 250, 2, 2, 72, {}),
    ("stride(50)", 230, 230, 2, 2, 16, {}),
    ("global(0 .. 3) | window(20)", 400, 400, 2, 2, 16, {}),
    ("causal", 270, 270, 4, 2, 16, {}),  # GQA
    ("causal & window(64)", 200, 200, 4, 1, 16, {}),  # MQA
    ("keys(5 .. 6) & queries(0 .. 3)", 100, 100, 2, 2, 16, {}),  # rows with no key
    ("causal(-70)", 200, 200, 2, 2, 16, {}),  # 70 empty rows, across a block border
    ("neighborhood((3, 3), dilation = (2, 2)) on grid(h, w)", 480, 480, 2, 2, 16, {"h": 20, "w": 24}),
    ("neighborhood((3, 3), dilation = (2, 2)) on grid(h, w)", 1024, 1024, 2, 2, 16, {"h": 16, "w": 64}),  # tiled
    ("heads { 0 .. 1: causal & window(30); 1 .. 3: block(64) | sink(2) }", 220, 220, 3, 3, 16, {}),
]


@pytest.mark.parametrize(("spec", "lq", "lk", "heads", "kv_heads", "dim", "bindings"), CASES)
def test_matches_reference(spec, lq, lk, heads, kv_heads, dim, bindings):
    program = maskc.compile(spec)
    q, k, v = inputs(1, heads, kv_heads, lq, lk, dim)
    check(program, q, k, v, **bindings)


def test_tiled_layout_is_exercised():
    program = maskc.compile("neighborhood((3, 3), dilation = (2, 2)) on grid(h, w)")
    q = torch.zeros(1, 2, 1024, 16)
    assert prepare(program, q, q, BLOCK, BLOCK, None, {"h": 16, "w": 64}).schedule.layout.startswith("tiled")


def test_empty_rows_output_zero_and_zero_gradients():
    program = maskc.compile("causal(-70)")
    q, k, v = inputs(1, 2, 2, 200, 200, 16)
    out, lse, (dq, _, _) = check(program, q, k, v)
    assert (out[:, :, :70] == 0).all() and torch.isinf(lse[:, :, :70]).all() and (lse[:, :, :70] < 0).all()
    assert (dq[:, :, :70] == 0).all()


def test_batch_and_value_dim():
    program = maskc.compile("causal & window(90)")
    q, k, v = inputs(3, 2, 2, 210, 210, 32, dv=24)
    check(program, q, k, v)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    program = maskc.compile("causal & window(100) | sink(3)")
    q, k, v = inputs(1, 2, 2, 200, 200, 16, dtype=dtype)
    check(program, q, k, v)


def test_segments_batched_masks():
    """A runtime tensor gives every batch element its own block masks."""
    ids = torch.stack(
        [
            torch.repeat_interleave(torch.arange(3), torch.tensor([100, 90, 110])),
            torch.repeat_interleave(torch.arange(4), torch.tensor([30, 150, 64, 56])),
        ]
    )
    program = maskc.compile("pattern p(ids: tensor) = (segments(ids) & causal) | sink(1)")
    q, k, v = inputs(2, 3, 3, 300, 300, 16)
    check(program, q, k, v, ids=ids)


# ---------------------------------------------------------------- modifiers


def test_alibi_and_softcap():
    check(maskc.compile("causal & window(100) with alibi()"), *inputs(1, 2, 2, 230, 230, 16))
    check(maskc.compile("window(40) with alibi(), softcap(2.0)"), *inputs(1, 2, 2, 230, 230, 16))


def test_alibi_slope_gradients():
    program = maskc.compile("pattern p(s: tensor) = causal & window(80) with alibi(s)")
    slopes = torch.tensor([0.25, 0.0625], requires_grad=True)
    check(program, *inputs(1, 2, 2, 200, 200, 16), extra=(slopes,), s=slopes)


def test_bias_table_gradients():
    program = maskc.compile("pattern p(t: tensor) = window(6) with bias(t)")
    table = torch.randn(2, 13, generator=torch.Generator().manual_seed(3)).requires_grad_()
    check(program, *inputs(1, 2, 2, 200, 200, 16), extra=(table,), t=table)


def test_polyline_gradients():
    program = maskc.compile("pattern p(a: tensor, b: tensor) on grid(h, w) = neighborhood((5, 5)) with polyline(a, b)")
    g = torch.Generator().manual_seed(4)
    alpha = (-torch.rand(2, 2, 12, 12, generator=g)).requires_grad_()
    beta = (-torch.rand(2, 2, 12, 12, generator=g)).requires_grad_()
    check(program, *inputs(2, 2, 2, 144, 144, 16), extra=(alpha, beta), a=alpha, b=beta, h=12, w=12)


def test_constant_modifiers_take_the_fused_path():
    program = maskc.compile("causal & window(50) with polyline(decay = 0.9) on grid(h, w)")
    q, k, v = inputs(1, 2, 2, 256, 256, 16)
    prepared = prepare(program, q, k, BLOCK, BLOCK, None, {"h": 16, "w": 16})
    assert not cpu.needs_generic(prepared)
    check(program, q, k, v, h=16, w=16)


# ---------------------------------------------------------------- direct calls


@pytest.mark.parametrize(
    ("spec", "lq", "lk", "bindings"),
    [
        ("causal & window(100)", 300, 300, {}),
        ("global(0 .. 2) | dilated(10, 4)", 150, 330, {}),
        ("neighborhood((5, 5)) on grid(h, w)", 576, 576, {"h": 24, "w": 24}),
    ],
)
def test_cpu_attention_directly(spec, lq, lk, bindings):
    program = maskc.compile(spec)
    q, k, v = inputs(2, 4, 2, lq, lk, 16)
    _, (out, lse) = direct(program, q, k, v, scale=0.3, **bindings)
    ref_out, ref_lse = program.reference(q, k, v, scale=0.3, return_lse=True, **bindings)
    close(out, ref_out, 1e-5, "out")
    close(lse, ref_lse, 1e-5, "lse")
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse)  # the lse is differentiable too
    loss = (out * grad_out).sum() + (lse * grad_lse).sum()
    ref_loss = (ref_out * grad_out).sum() + (ref_lse * grad_lse).sum()
    for a, b, name in zip(
        torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(ref_loss, (q, k, v)), "qkv", strict=True
    ):
        close(a, b, 1e-5, "d" + name)


@pytest.mark.parametrize(
    ("spec", "tensors", "bindings"),
    [
        ("causal & window(100)", {}, {}),
        ("global(0 .. 2) | window(30)", {}, {}),
        ("causal with softcap(2.0)", {}, {}),
        ("pattern p(s: tensor) = causal with alibi(s)", {"s": (2,)}, {}),
        ("neighborhood((3, 3), dilation = (2, 2)) on grid(h, w)", {}, {"h": 16, "w": 64}),
    ],
)
def test_gradients_through_program(spec, tensors, bindings):
    """Gradients through the public call (the torch.library op and its backward)."""
    program = maskc.compile(spec)
    length = 1024 if "h" in bindings else 200
    q, k, v = inputs(1, 2, 2, length, length, 16)
    extra = {name: torch.rand(shape).requires_grad_() for name, shape in tensors.items()}
    out = program(q, k, v, backend="cpu", **bindings, **extra)
    ref = program.reference(q, k, v, **bindings, **extra)
    grad = torch.randn_like(out)
    leaves = [q, k, v, *extra.values()]
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad), strict=True):
        close(a, b, 1e-5, "grad")


def test_backward_function_matches_autograd():
    """`cpu.backward` (gradients from a saved out/lse, no recomputation)."""
    program = maskc.compile("causal & window(70) | sink(2)")
    q, k, v = inputs(1, 4, 2, 200, 200, 16)
    prepared = prepare(program, q, k, BLOCK, BLOCK, None, {})
    out, lse = cpu.cpu_attention(q, k, v, prepared, 0.25)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    want = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    got = cpu.backward(q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), dout, dlse, prepared, 0.25)
    for a, b, name in zip(got, want, "qkv", strict=True):
        close(a, b, 1e-5, "d" + name)


def test_plan_strided_keys_and_shared_masks():
    """A sliding window runs as strided views with one mask for all interior rows."""
    program = maskc.compile("causal & window(256)")
    q = torch.zeros(1, 1, 4096, 8)
    prepared = prepare(program, q, q, BLOCK, BLOCK, None, {})
    plan = cpu.group_plan(prepared, 0)
    big = max(plan.segments, key=lambda s: s.m)
    assert big.m >= 56 and big.col_step == 1 and big.row_step == 1
    assert big.allowed is not None and big.allowed.shape[1] == 1
    visited = sum(s.m * s.cols.shape[1] for s in plan.segments)
    assert visited == prepared.schedule.visited_blocks()


@pytest.mark.parametrize(
    ("spec", "length", "bindings"),
    [
        ("causal & window(100)", 333, {}),
        ("global(0 .. 3) | window(20)", 400, {}),
        ("neighborhood((5, 5)) on grid(h, w)", 576, {"h": 24, "w": 24}),
    ],
)
def test_worker_pool_and_chunked_calls(spec, length, bindings, monkeypatch):
    """Big problems run their fused calls on a pool of workers, in row chunks;
    forced here on small ones by lowering the thresholds."""
    monkeypatch.setattr(cpu.threads, "PARALLEL_WORK", 1)
    monkeypatch.setattr(cpu.threads, "CHUNK_ELEMENTS", 1 << 14)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check(maskc.compile(spec), *inputs(2, 2, 1, length, length, 16), **bindings)
    finally:
        torch.set_num_threads(threads)
