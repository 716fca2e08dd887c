"""Regressions from testing maskc from outside: right answers and clear errors at the
edges of the runtime (empty head groups, positions outside the keys, huge
constants, negative q_offset, bad arguments, tensors of the wrong kind).

Every backend is held to the dense reference; the Triton kernels run under the
interpreter (small shapes)."""

from __future__ import annotations

import pytest
import torch
from maskc.dsl.errors import MaskTypeError
from test_schedule import union_block_states

import maskc

BACKENDS = ["cpu", "triton", "flex"]
GRAD_BACKENDS = ["cpu", "triton"]


def _qkv(b, h, lq, lk, d, kv_heads=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or h
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, kv_heads, lk, d, generator=g)
    v = torch.randn(b, kv_heads, lk, d, generator=g)
    return [t.requires_grad_() for t in (q, k, v)]


def _check(program, q, k, v, backend, grads=True, **bindings):
    """Forward (and gradients for q, k, v and float tensor bindings) against the reference."""
    out = program(q, k, v, backend=backend, **bindings)
    ref = program(q, k, v, backend="reference", **bindings)
    torch.testing.assert_close(out, ref, atol=3e-5, rtol=3e-5)
    if not grads:
        return out
    leaves = [q, k, v, *(t for t in bindings.values() if isinstance(t, torch.Tensor) and t.requires_grad)]
    seed = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, seed, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, seed, allow_unused=True)
    # A modifier tensor's gradient sums a term per (batch, head, query, key): the flash
    # backward's float32 rounding adds up over all of them (1e-7 each), where the dense
    # reference's softmax backward cancels exactly.
    pairs = out.shape[0] * out.shape[1] * q.shape[2] * k.shape[2]
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is not None:
            assert torch.isfinite(a).all()
            atol = 3e-5 if i < 3 else max(3e-5, 1e-7 * pairs)
            torch.testing.assert_close(a, b, atol=atol, rtol=3e-5)
    return out


# ---------------------------------------------------------------- 1. empty head groups on the generic path

EMPTY_GROUP_SPECS = [
    "heads { 0 .. 1: none; 1 .. 2: causal } with softcap(30.0)",
    "none with softcap(5.0)",
    "causal & queries(1000 .. 2000) with softcap(30.0)",
]


@pytest.mark.parametrize("backend", ["cpu", "auto", "triton"])
@pytest.mark.parametrize("spec", EMPTY_GROUP_SPECS)
def test_group_without_blocks_on_the_generic_path(spec, backend):
    q, k, v = _qkv(1, 2, 64, 64, 16)
    program = maskc.compile(spec)
    out = _check(program, q, k, v, backend)
    if "none" in spec or "1000" in spec:
        assert torch.all(out[:, 0] == 0)


def test_group_without_blocks_flex_forward():
    q, k, v = _qkv(1, 2, 64, 64, 16)
    for spec in EMPTY_GROUP_SPECS:
        _check(maskc.compile(spec), q, k, v, "flex", grads=False)


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_bias_gradient_with_no_visited_block(backend):
    q, k, v = _qkv(1, 2, 64, 64, 16)
    table = torch.randn(2, 127, requires_grad=True)
    program = maskc.compile("pattern p(b: tensor) = none with bias(b)")
    out = _check(program, q, k, v, backend, b=table)
    assert torch.all(out == 0)


# ---------------------------------------------------------------- 2. segments outside the ids

SEGMENTS = "pattern d(ids: tensor) = segments(ids)"


@pytest.mark.parametrize("lq,lk,q_offset", [(4, 4, 2), (8, 4, None), (4, 4, -1), (8, 4, 3)])
def test_segments_queries_outside_the_ids_match_nothing(lq, lk, q_offset):
    program = maskc.compile(SEGMENTS)
    ids = torch.tensor([[0, 0, 1, 1]])
    mask = program.mask(lq, lk, q_offset=q_offset, ids=ids).reshape(lq, lk)
    offset = lk - lq if q_offset is None else q_offset
    for i in range(lq):
        p = offset + i
        for j in range(lk):
            want = 0 <= p < lk and bool(ids[0, p] == ids[0, j])
            assert bool(mask[i, j]) == want, (i, j)
    schedule = program.schedule(lq, lk, q_offset=q_offset, block_q=2, block_k=2, ids=ids)
    dense = program.mask(lq, lk, q_offset=q_offset, ids=ids)
    assert torch.equal(schedule.to_dense(), union_block_states(dense, 2, 2)), "schedule and mask disagree"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq,lk,q_offset", [(24, 16, None), (16, 16, 5), (16, 16, -5)])
def test_segments_outside_the_ids_on_every_backend(backend, lq, lk, q_offset):
    program = maskc.compile(SEGMENTS)
    ids = torch.tensor([[0] * 5 + [1] * 6 + [2] * 5, [0] * 9 + [3] * 7])
    q, k, v = _qkv(2, 2, lq, lk, 8)
    _check(program, q, k, v, backend, grads=backend != "flex", q_offset=q_offset, ids=ids)


# ---------------------------------------------------------------- 3. route outside the keys

ROUTE = "route(topk = 2, block = 4)"


@pytest.mark.parametrize("lq,lk,q_offset", [(16, 16, 7), (16, 16, -3), (24, 16, None)])
def test_route_with_queries_outside_the_keys(lq, lk, q_offset):
    program = maskc.compile(ROUTE)
    q, k, v = _qkv(1, 2, lq, lk, 8)
    mask = program.mask(lq, lk, q_offset=q_offset, heads=2, q=q, k=k)
    offset = lk - lq if q_offset is None else q_offset
    positions = torch.arange(lq) + offset
    outside = (positions < 0) | (positions >= lk)
    assert not mask[..., outside, :].any(), "a query outside every region attends nothing"
    assert mask[..., ~outside, :].any()
    schedule = program.schedule(lq, lk, q_offset=q_offset, heads=2, block_q=4, block_k=4, q=q, k=k)
    assert torch.equal(schedule.to_dense(), union_block_states(mask, 4, 4))
    for backend in BACKENDS:
        _check(program, q, k, v, backend, grads=backend != "flex", q_offset=q_offset)


# ---------------------------------------------------------------- 4. large positions and constants


def test_positions_beyond_the_limit_are_refused():
    program = maskc.compile("queries(2147483653 .. 1099511627776)")
    with pytest.raises(MaskTypeError, match=r"positions must lie in \[-2\*\*30, 2\*\*30\)"):
        program.mask(4, q_offset=2**31)
    with pytest.raises(MaskTypeError, match="q_offset = -1073741825"):
        program.mask(4, q_offset=-(2**30) - 1)


@pytest.mark.parametrize(
    "spec",
    [
        "queries(2147483653 .. 1099511627776) | window(2)",
        "causal(-2199023255552) | window(1)",
        "keys(-1099511627776 .. 3) | queries(1073741820 .. 4611686018427387904)",
        "window(4611686018427387904, 0) & keys(0 .. 3) | causal(-1073741800) | window(1)",
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_constants_are_exact_on_every_backend(spec, backend):
    program = maskc.compile(spec)
    q, k, v = _qkv(1, 1, 8, 16, 8)
    _check(program, q, k, v, backend, grads=backend != "flex", q_offset=2**30 - 8)
    _check(program, q, k, v, backend, grads=backend != "flex", q_offset=-(2**30))


# ---------------------------------------------------------------- 5. negative q_offset on Triton

NEGATIVE_OFFSET_SPECS = [
    "causal & window(5)",
    "window(3)",
    "neighborhood(5)",
    "random(1, block = 4, seed = 3)",
    "keys(% 3 == 1) | queries(% 4 == 2)",
    "on blocks(4) (window(1, 0))",
    "stride(3) & window(6)",
    "dilated(2, 3)",
    "queries(-5 .. 3) & keys(0 .. 7)",
    "pattern a(sl: tensor) = window(4) with alibi(sl)",
]


@pytest.mark.parametrize("spec", NEGATIVE_OFFSET_SPECS)
def test_triton_queries_before_the_keys(spec):
    program = maskc.compile(spec)
    q, k, v = _qkv(1, 2, 20, 12, 16)
    bindings = {"sl": torch.rand(2)} if "sl" in spec else {}
    _check(program, q, k, v, "triton", **bindings)  # default q_offset = -8
    _check(program, q, k, v, "triton", q_offset=-13, **bindings)


# ---------------------------------------------------------------- 10. bad arguments, empty inputs


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"block_q": 0}, "block_q must be a positive integer"),
        ({"block_q": -4}, "block_q must be a positive integer"),
        ({"block_k": 2.5}, r"block_k must be a positive integer .* got 2.5"),
        ({"block_q": True}, "block_q must be a positive integer .* got True"),
        ({"layout": "x"}, "layout must be one of 'auto', 'rowmajor', 'tiled', got 'x'"),
    ],
)
def test_schedule_arguments_are_checked(kwargs, message):
    with pytest.raises(MaskTypeError, match=message):
        maskc.compile("causal").schedule(16, **kwargs)


def test_tiled_layout_that_cannot_fit_names_the_argument():
    with pytest.raises(MaskTypeError, match="layout='tiled': no tile layout fits"):
        maskc.compile("natten2d", k=3).schedule(88, h=11, w=8, layout="tiled")


@pytest.mark.parametrize(
    "shapes,kwargs,message",
    [
        (((1, 2, 8, 0), (1, 2, 8, 0)), {}, "head dims must be at least 1"),
        (((1, 2, 8, 4), (1, 0, 8, 4)), {}, "k and v must have the same number of heads"),
        (((1, 2, 8, 4), (1, 2, 8, 4)), {"scale": "a"}, "scale must be a finite number"),
        (((1, 2, 8, 4), (1, 2, 8, 4)), {"scale": float("nan")}, "scale must be a finite number"),
        (((1, 2, 8, 4), (1, 2, 8, 4)), {"backend": "x"}, "backend must be one of 'auto'"),
    ],
)
def test_call_arguments_are_checked(shapes, kwargs, message):
    q = torch.randn(*shapes[0])
    kv = torch.randn(*shapes[1])
    with pytest.raises(MaskTypeError, match=message):
        maskc.compile("causal")(q, kv, kv, **kwargs)


@pytest.mark.parametrize("backend", ["cpu", "triton", "flex", "reference"])
@pytest.mark.parametrize("shape_q,shape_kv", [((0, 2, 8, 4), (0, 1, 8, 4)), ((1, 2, 0, 4), (1, 1, 8, 4)),
                                               ((1, 2, 5, 4), (1, 1, 0, 4)), ((1, 2, 0, 4), (1, 1, 0, 4))])  # fmt: skip
def test_empty_inputs_behave_like_sdpa(backend, shape_q, shape_kv):
    q = torch.randn(*shape_q, requires_grad=True)
    k = torch.randn(*shape_kv, requires_grad=True)
    v = torch.randn(*shape_kv, requires_grad=True)
    out, lse = maskc.compile("causal")(q, k, v, backend=backend, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    assert q.grad.shape == q.shape and torch.all(q.grad == 0)


# ---------------------------------------------------------------- 11. tensors of the wrong kind


@pytest.mark.parametrize("backend", ["cpu", "triton", "flex", "reference"])
@pytest.mark.parametrize(
    "spec,name,tensor,message",
    [
        ("pattern b(t: tensor) = causal with bias(t)", "t", torch.ones(2, 9, dtype=torch.long), "must be floating"),
        ("pattern a(s: tensor) = causal with alibi(s)", "s", torch.ones(2, dtype=torch.int32), "must be floating"),
        ("pattern d(ids: tensor) = segments(ids)", "ids", torch.ones(1, 8, dtype=torch.bool), "integer ids"),
        ("pattern d(ids: tensor) = segments(ids)", "ids", torch.ones(1, 8, dtype=torch.long, device="meta"),
         "is on meta, but q is on cpu"),
    ],
)  # fmt: skip
def test_tensor_bindings_of_the_wrong_kind(backend, spec, name, tensor, message):
    x = torch.randn(1, 2, 8, 4)
    with pytest.raises(MaskTypeError, match=message):
        maskc.compile(spec)(x, x, x, backend=backend, **{name: tensor})


# ---------------------------------------------------------------- found by the every-backend property test

ALIBI_CASES = [
    ("pattern base = all with alibi\nheads { 0 .. 1: base; 1 .. 2: none }", 2),
    ("pattern base(slopes: tensor) = all with alibi(slopes)\nheads { 0 .. 1: base; 1 .. 2: causal }", 2),
    ("all with alibi(slopes), alibi", 1),
    ("pattern p(p0 = 0, p1 = 0) = prefix(head % 3)\n\np with alibi, alibi(slopes)", 3),
]


@pytest.mark.parametrize("spec,heads", ALIBI_CASES)
def test_triton_alibi_slopes_per_term_and_group(spec, heads):
    """Each ALiBi term reads its own slopes, and groups without ALiBi do not crash."""
    program = maskc.compile(spec)
    q, k, v = _qkv(1, heads, 16, 24, 16, kv_heads=1)
    bindings = {"slopes": torch.rand(heads, requires_grad=True)} if "slopes" in spec else {}
    _check(program, q, k, v, "triton", q_offset=16 if heads == 3 else None, **bindings)
