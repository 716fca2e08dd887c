"""backend="flex": maskc's schedule and normal form lowered to FlexAttention.

Every case compares `Program(..., backend="flex")` with `Program.reference` on
CPU in float32, output and log-sum-exp, at atol = rtol = 1e-4 (Flex's CPU
kernel and the reference differ only by float32 rounding, seen ~1e-6).  On
CPU the output is Flex's and the log-sum-exp comes from maskc's CPU executor
(Flex's CPU lowering cannot return it).  FlexAttention has no CPU backward:
asking for gradients raises NotImplementedError (tested below).  Where Flex
has a backward (CUDA), gradients run Flex's forward under autograd and Flex's
own backward; a test below lends Flex its eager math backward on CPU to check
that wiring here.

The generated `mask_mod` / `score_mod` are also checked eagerly (no compile)
against the dense evaluator for many more patterns, at the end of the file.

torch.compile of Flex on CPU costs several seconds per distinct pattern, so
several features share one program (per-head patterns put many atoms into one
call) and the tests that only need a forward reuse earlier programs and shapes.
Every test runs with `create_block_mask` and `create_mask` patched to raise.
"""

from __future__ import annotations

import math

import pytest
import torch
from maskc.runtime import flex, op
from maskc.runtime.prepare import prepare
from maskc.runtime.tuning import POLICY
from torch.nn.attention import flex_attention as flex_module

import maskc

TOL = {"atol": 1e-4, "rtol": 1e-4}

NATTEN = "neighborhood((7, 7), dilation = (2, 2)) on grid(h, w)"
NATTEN_GRID = {"h": 32, "w": 64}
S2 = "causal & on blocks(16) (window(3, 0) | keys(% 4 == (4 - head % 4) % 4))"


@pytest.fixture(autouse=True)
def no_dense_block_masks(monkeypatch):
    """maskc hands Flex its own schedule: Flex's mask builders must never run."""

    def forbidden(*args, **kwargs):
        raise AssertionError("create_block_mask / create_mask must not be called")

    monkeypatch.setattr(flex_module, "create_block_mask", forbidden)
    monkeypatch.setattr(flex_module, "create_mask", forbidden)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def qkv(batch, heads, lq, lk=None, kv_heads=None, dim=40, seed=0):
    lk = lq if lk is None else lk
    kv_heads = heads if kv_heads is None else kv_heads
    q = randn(batch, heads, lq, dim, seed=seed)
    k = randn(batch, kv_heads, lk, dim, seed=seed + 1)
    v = randn(batch, kv_heads, lk, dim, seed=seed + 2)
    return q, k, v


def check(program, q, k, v, **bindings):
    out, lse = program(q, k, v, backend="flex", return_lse=True, **bindings)
    ref_out, ref_lse = program.reference(q, k, v, return_lse=True, **bindings)
    assert out.shape == ref_out.shape and out.dtype == q.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, **TOL)
    empty = ref_lse == -math.inf
    assert torch.equal(lse == -math.inf, empty)
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], **TOL)
    assert torch.all(out[empty] == 0)
    return empty


def test_one_dimensional_atoms_per_head():
    """Window, causal window, dilated, block, stride, global + window, an
    empty-row pattern and random blocks (drawn per head), one per head: heads
    with different normal forms and schedules.  Lengths not divisible by the
    block size, batch 2."""
    spec = (
        "heads { 0 .. 1: window(20); 1 .. 2: causal & window(40, 0); 2 .. 3: dilated(8, 3); "
        "3 .. 4: block(64); 4 .. 5: stride(7); 5 .. 6: window(16) | global(0 .. 4); "
        "6 .. 7: queries(0 .. 100) & causal; 7 .. 9: random(2, block = 32, seed = 3) | window(8) }"
    )
    program = maskc.compile(spec)
    masks = program.mask(300, heads=9)
    assert not torch.equal(masks[7], masks[8])  # two draws, one vectorised lookup table
    q, k, v = qkv(2, 9, 300)
    empty = check(program, q, k, v)
    assert empty[:, 6, 100:].all() and not empty[:, :6].any()


def test_heads_sharing_structure_with_gqa_and_head_dim_72():
    """S2-style: every head has the same tree with a different residue (one
    vectorised predicate); GQA with 2 key heads for 4 query heads."""
    program = maskc.compile(S2)
    assert len(program.normal_form(300, heads=4)) == 4
    check(program, *qkv(1, 4, 300, kv_heads=2, dim=72))


def test_dilated_neighborhood_on_tiled_grid():
    """A tile layout (execution order != token order) and maskc's schedule as the BlockMask."""
    program = maskc.compile(NATTEN)
    q, k, v = qkv(1, 2, 32 * 64)
    prepared = prepare(program, q, k, *POLICY.flex_blocks, None, dict(NATTEN_GRID))
    assert prepared.schedule.layout.startswith("tiled") and prepared.perm is not None
    check(program, q, k, v, **NATTEN_GRID)
    bm = flex.lower(prepared, "cpu").block_mask
    sched = prepared.schedule.to_dense()  # [heads, q blocks, kv blocks]: 0 empty, 1 partial, 2 full
    assert (bm.BLOCK_SIZE, bm.seq_lengths) == (POLICY.flex_blocks, (32 * 64, 32 * 64))
    assert bm.kv_num_blocks.shape[:2] == (1, 1)  # heads share one schedule: broadcast
    assert torch.equal(_dense(bm.kv_num_blocks, bm.kv_indices)[0].expand_as(sched), sched == 1)
    assert torch.equal(_dense(bm.full_kv_num_blocks, bm.full_kv_indices)[0].expand_as(sched), sched == 2)


def test_block_mask_counts_per_head():
    """Heads with different schedules get their own rows; full blocks go to full_kv_* (no compile)."""
    program = maskc.compile("heads { 0 .. 1: causal; 1 .. 2: window(130); 2 .. 3: causal }")
    q, k, _ = qkv(1, 3, 700)
    prepared = prepare(program, q, k, *POLICY.flex_blocks, None, {})
    bm = flex.lower(prepared, "cpu").block_mask
    sched = prepared.schedule.to_dense()
    assert (sched == 2).any() and (sched == 1).any() and (sched == 0).any()
    assert bm.kv_num_blocks.shape[:2] == (1, 3)
    assert torch.equal(_dense(bm.kv_num_blocks, bm.kv_indices)[0], sched == 1)
    assert torch.equal(_dense(bm.full_kv_num_blocks, bm.full_kv_indices)[0], sched == 2)
    assert torch.equal(bm.kv_num_blocks[0], (sched == 1).sum(-1).int())
    assert torch.equal(bm.full_kv_num_blocks[0], (sched == 2).sum(-1).int())


def _dense(num: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """BlockMask rows -> bool [B, H, q blocks, kv blocks]."""
    cols = indices.shape[-1]
    used = torch.arange(cols) < num[..., None]
    out = torch.zeros(*indices.shape[:-1], cols + 1, dtype=torch.bool)
    out.scatter_(-1, torch.where(used, indices.long(), cols), True)
    return out[..., :cols]


def test_modifiers_with_fewer_queries_than_keys_and_mqa():
    """ALiBi (slopes differ per head: looked up by head group), a bias table, then
    softcap; lq != lk (queries aligned to the end of the keys); one key head."""
    program = maskc.compile(
        "pattern p(t: tensor) = (causal & window(60, 0) | sink(3)) with alibi(), bias(t), softcap(3.0)"
    )
    q, k, v = qkv(1, 4, 200, lk=300, kv_heads=1, seed=3)
    check(program, q, k, v, t=randn(4, 21, seed=9))


def test_grid_modifiers_bias_polyline():
    program = maskc.compile(
        "pattern p(t: tensor, a: tensor, b: tensor) on grid(h, w) = neighborhood((5, 5)) with bias(t), polyline(a, b)"
    )
    q, k, v = qkv(2, 2, 16 * 16, seed=4)
    alpha = -randn(2, 2, 16, 16, seed=10).abs()
    beta = -randn(2, 1, 16, 16, seed=11).abs()
    check(program, q, k, v, h=16, w=16, t=randn(2, 5, 7, seed=12), a=alpha, b=beta)


def test_dynamic_segments_route_cluster():
    """Segment ids that differ per batch element, routing and clusters."""
    program = maskc.compile(
        "pattern p(ids: tensor) = segments(ids) & causal | route(topk = 2, block = 32) | cluster(3, size = 40)"
    )
    q, k, v = qkv(2, 2, 300, seed=8)
    pos = torch.arange(300)
    ids = torch.stack([torch.zeros(300, dtype=torch.long), (pos >= 100).long() + (pos >= 170).long()])
    check(program, q, k, v, ids=ids, centroids=randn(2, 3, 40, seed=14))


def test_gradients_are_refused_on_cpu():
    """Documented behaviour: FlexAttention has no CPU backward, so the flex backend
    raises NotImplementedError when a gradient is needed (the shapes of the S2 test)."""
    program = maskc.compile(S2)
    q, k, v = qkv(1, 4, 300, kv_heads=2, dim=72)
    q.requires_grad_()
    prepared = prepare(program, q, k, *POLICY.flex_blocks, None, {})
    with pytest.raises(NotImplementedError, match="no CPU backward"):
        flex.flex_backend(q, k, v, prepared, 1.0 / math.sqrt(72))
    out = program(q, k, v, backend="flex")  # the forward runs (under the op's no_grad) ...
    with pytest.raises(NotImplementedError, match="no CPU backward"):
        out.sum().backward()  # ... and the backward says why it cannot


def test_compiled_gradients_are_refused_on_cpu():
    """Under torch.compile the refusal comes from the backward op, with the same reason."""
    program = maskc.compile(S2)
    q, k, v = qkv(1, 4, 300, kv_heads=2, dim=72)
    q.requires_grad_()
    out = torch.compile(lambda q, k, v: program(q, k, v, backend="flex"), backend="aot_eager", fullgraph=True)(q, k, v)
    with pytest.raises(NotImplementedError, match="no CPU backward"):
        out.sum().backward()


def _flex_with_a_cpu_backward(real_backend):
    """The flex backend where gradients are wanted, as on CUDA, but through eager
    `flex_attention` (Flex's math path, whose backward is Flex's own), since Flex's
    compiled CPU path refuses inputs that require grad."""

    def backend(q, k, v, prepared, scale, need_lse=True):
        if not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))):
            return real_backend(q, k, v, prepared, scale, need_lse)
        lowering = flex.lower(prepared, q.device, compute_q_blocks=True)
        out, aux = flex_module.flex_attention(
            q,
            k,
            v,
            score_mod=lowering.score_mod,
            block_mask=lowering.block_mask,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
            return_aux=flex_module.AuxRequest(lse=True),
        )
        empty = ~(aux.lse > -math.inf)
        return out.masked_fill(empty[..., None], 0), aux.lse.float().masked_fill(empty, -math.inf)

    return backend


def test_gradients_run_flex_own_backward_where_flex_has_one(monkeypatch):
    """The wiring of CUDA training, run on CPU: the op asks `flex_has_backward`, which
    says yes here, and Flex gets a CPU backward (its device check lifted, its eager
    path).  Eagerly and compiled, the q, k, v gradients (with GQA, through output
    and log-sum-exp) equal the reference backend's."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda q, k, v: None)
    monkeypatch.setattr(flex, "flex_backend", _flex_with_a_cpu_backward(flex.flex_backend))
    monkeypatch.setattr(op, "flex_has_backward", lambda device: True)
    program = maskc.compile(S2)
    q, k, v = (x.requires_grad_() for x in qkv(1, 4, 300, kv_heads=2, dim=72, seed=3))

    def loss(backend, call=program):
        out, lse = call(q, k, v, backend=backend, return_lse=True)
        return (out * torch.linspace(-1, 1, out.shape[-1])).sum() + lse.sum()

    want = torch.autograd.grad(loss("reference"), (q, k, v))
    compiled = torch.compile(lambda q, k, v, **kw: program(q, k, v, **kw), backend="aot_eager", fullgraph=True)
    for got in (
        torch.autograd.grad(loss("flex"), (q, k, v)),
        torch.autograd.grad(loss("flex", compiled), (q, k, v)),
    ):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **TOL)


def test_without_lse():
    """need_lse=False: Flex alone (what a benchmark of the kernel times)."""
    program = maskc.compile(S2)
    q, k, v = qkv(1, 4, 300, kv_heads=2, dim=72, seed=1)
    prepared = prepare(program, q, k, *POLICY.flex_blocks, None, {})
    scale = 1.0 / math.sqrt(72)  # the scale the S2 test compiled with (a new one recompiles)
    out, lse = flex.flex_backend(q, k, v, prepared, scale, need_lse=False)
    assert lse is None
    torch.testing.assert_close(out, program.reference(q, k, v, scale=scale), **TOL)


def test_float64_is_refused_on_cpu():
    program = maskc.compile("causal")
    q, k, v = (x.double() for x in qkv(1, 1, 64))
    with pytest.raises(maskc.MaskTypeError, match="float32"):
        program(q, k, v, backend="flex")


# ---------------------------------------------------------------- the generated functions, eagerly
# mask_mod and score_mod are plain torch expressions: evaluated eagerly on broadcast
# index tensors (no torch.compile) they must equal the dense evaluator, in execution order.

TRANSLATIONS = [
    ("window(5)", 40, 40, 1, {}),
    ("causal & window(7, 2) | sink(3)", 30, 50, 2, {}),
    ("~window(3) & keys(% 5 in 1 .. 3) | queries(0 .. 4)", 40, 40, 1, {}),
    ("dilated(4, 3) - stride(2)", 40, 40, 1, {}),
    ("block(6) | global(0 .. 2)", 40, 40, 1, {}),
    ("heads { 0 .. 1: all; 1 .. 2: none; 2 .. 3: causal; 3 .. 4: window(5); 4 .. 5: causal(-3) }", 24, 24, 5, {}),
    (S2.replace("16", "4"), 40, 40, 4, {}),
    ("neighborhood((3, 5), dilation = (2, 1), stride = (1, 2)) on grid(h, w)", 48, 48, 1, {"h": 6, "w": 8}),
    ("(neighborhood((3, 3), causal = (true, false)) | window(2)) on grid(h, w)", 48, 48, 1, {"h": 6, "w": 8}),
    ("heads { 0 .. 1: causal; 1 .. 2: window((9, 1)) } on grid(4, 6)", 24, 24, 2, {}),  # mod / no mod
    ("heads { 0 .. 1: keys(% 3 == 0); 1 .. 2: on blocks(4) keys(% 3 == 0) }", 24, 24, 2, {}),
    (
        "heads { 0 .. 1: neighborhood((3, 3)); 1 .. 2: neighborhood((5, 3), causal = (true, false)) } on grid(8, 16)",
        128,
        128,
        2,
        {},
    ),
    ("random(2, block = 4, seed = 5, skip = 1) | window(1)", 40, 40, 3, {}),
    ("random(1, block = 3) & causal", 20, 30, 2, {}),
    ("on blocks(4) (window(1, 0) | keys(% 3 == 0)) & causal", 40, 40, 1, {}),
]


def _index_grid(batch, heads, lq, lk):
    b = torch.arange(batch).view(-1, 1, 1, 1)
    h = torch.arange(heads).view(1, -1, 1, 1)
    return b, h, torch.arange(lq).view(1, 1, -1, 1), torch.arange(lk).view(1, 1, 1, -1)


def _eager_mask(lowering, prepared, batch):
    b, h, qi, ki = _index_grid(batch, prepared.heads, prepared.lq, prepared.lk)
    out = lowering.mask_mod(b, h, qi, ki)
    return out.expand(batch, prepared.heads, prepared.lq, prepared.lk)


def _execution_order(dense, prepared):
    if prepared.perm_q is not None:
        dense = dense[..., prepared.perm_q, :]
    return dense if prepared.perm_k is None else dense[..., prepared.perm_k]


@pytest.mark.parametrize(("spec", "lq", "lk", "heads", "sizes"), TRANSLATIONS)
def test_mask_mod_equals_dense_mask(spec, lq, lk, heads, sizes):
    program = maskc.compile(spec)
    q = torch.zeros(1, heads, lq, 8)
    k = torch.zeros(1, heads, lk, 8)
    prepared = prepare(program, q, k, 16, 16, None, dict(sizes))
    lowering = flex.lower(prepared, "cpu")
    dense = program.mask(lq, lk, heads=heads, **sizes)
    assert torch.equal(_eager_mask(lowering, prepared, 1)[0], _execution_order(dense, prepared))


def test_mask_mod_of_tiled_layout_and_runtime_tensors():
    """Tile permutation, per-batch segment ids, routing and clusters."""
    program = maskc.compile(NATTEN)
    q = torch.zeros(1, 1, 32 * 64, 8)
    prepared = prepare(program, q, q, 128, 128, None, dict(NATTEN_GRID))
    assert prepared.perm is not None
    b, h, qi, ki = _index_grid(1, 1, 2048, 2048)
    rows = torch.arange(0, 2048, 97)  # a sample of rows: the full mask is 2048 x 2048
    got = flex.lower(prepared, "cpu").mask_mod(b, h, qi[..., rows, :], ki)
    dense = _execution_order(program.mask(2048, **NATTEN_GRID), prepared)
    assert torch.equal(got.expand(1, 1, len(rows), 2048)[0, 0], dense[0, rows])

    program = maskc.compile(
        "pattern p(ids: tensor) = segments(ids) & causal | route(topk = 1, block = 4) | cluster(2, size = 5)"
    )
    q, k = randn(2, 2, 24, 8, seed=20), randn(2, 1, 24, 8, seed=21)
    ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 15 + [2] * 6])
    bindings = {"ids": ids, "centroids": randn(2, 2, 8, seed=22)}
    prepared = prepare(program, q, k, 16, 16, None, dict(bindings))
    dense = program.mask(24, heads=2, q=q, k=k, **bindings)
    assert torch.equal(_eager_mask(flex.lower(prepared, "cpu"), prepared, 2), dense)


SCORES = [
    ("causal with alibi(), softcap(2.0)", 20, 30, 3, {}),
    ("pattern p(s: tensor, t: tensor) = all with alibi(s), bias(t)", 20, 20, 2, {"s": "slopes", "t": (2, 7)}),
    ("pattern p(t: tensor) on grid(h, w) = all with bias(t)", 24, 24, 2, {"h": 4, "w": 6, "t": (1, 3, 5)}),
    ("pattern p(a: tensor, b: tensor) on grid(4, 6) = all with polyline(a, b)", 24, 24, 2, {"a": "ab", "b": "ab"}),
    ('pattern p(a: tensor, b: tensor) on grid(4, 6) = all with polyline(a, b, path = "vh")', 24, 24, 2, {"a": "ab"}),
    ("all with polyline(decay = 0.6) on grid(4, 6)", 24, 24, 1, {}),
    ("heads { 0 .. 1: causal; 1 .. 2: window(3); 2 .. 3: all } with alibi(), softcap(head + 2)", 16, 16, 3, {}),
]


def _bindings(spec_bindings, heads, seed):
    out = {}
    for n, (name, value) in enumerate(spec_bindings.items()):
        if value == "slopes":
            out[name] = randn(heads, seed=seed + n).abs()
        elif value == "ab":
            out[name] = -randn(2, heads, 4, 6, seed=seed + n).abs()
        elif isinstance(value, tuple):
            out[name] = randn(*value, seed=seed + n)
        else:
            out[name] = value
    return out


@pytest.mark.parametrize(("spec", "lq", "lk", "heads", "given"), SCORES)
def test_score_mod_equals_reference_modifiers(spec, lq, lk, heads, given):
    from maskc.dsl import evaluate

    program = maskc.compile(spec)
    bindings = _bindings(given, heads, seed=30)
    if '"vh"' in spec:
        bindings["b"] = -randn(2, heads, 4, 6, seed=40).abs()
    q, k = torch.zeros(2, heads, lq, 8), torch.zeros(2, heads, lk, 8)
    prepared = prepare(program, q, k, 16, 16, None, dict(bindings))
    logits = randn(2, heads, lq, lk, seed=31) * 3
    expected = evaluate.scores(prepared.instance, prepared.tensors, logits)
    score_mod = flex.lower(prepared, "cpu").score_mod
    assert score_mod is not None
    got = score_mod(logits, *_index_grid(2, heads, lq, lk))
    torch.testing.assert_close(got, expected, **TOL)


def test_key_chunks_of_8_mod_16_on_cpu():
    """Flex's compiled CPU kernel (torch 2.13, AVX2) spills q @ k^T past a chunk of 8 mod 16
    keys onto the row maxima of queries 0..7: wrong or NaN rows, depending on the memory
    after k (bench/flex_cpu_bug.py).  maskc pads the keys to a multiple of 16, masked.
    `keys(% 6 == 4)` at L = 40 is the reported case (several inputs: it was intermittent);
    `all` at 24 keys makes the padded block one the schedule calls full, and 5 queries
    put the spill onto the row sums too."""
    assert flex.cpu_key_length(40, 128) == 48 and flex.cpu_key_length(48, 128) == 48
    reported = maskc.compile("keys(% 6 == 4)")
    for seed in range(4):
        check(reported, *qkv(1, 2, 40, dim=16, seed=10 * seed))
    full = maskc.compile("all with alibi")
    for seed in range(3):
        check(full, *qkv(2, 2, 5, 24, dim=8, seed=7 + seed))
