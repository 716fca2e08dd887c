"""Block schedules and normal forms, checked against the dense mask."""

from __future__ import annotations

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from maskc.codegen import plan, schedule
from maskc.codegen.normal import normalize
from maskc.dsl import evaluate, ir

import maskc

# ----------------------------------------------------------------- strategies

ONE_D_ATOMS = [
    lambda d: st.builds(lambda w: f"window({w})", st.integers(0, 12)),
    lambda d: st.builds(lambda l, r: f"window({l}, {r})", st.integers(0, 9), st.integers(0, 9)),
    lambda d: st.builds(lambda o: f"causal({o})", st.integers(-6, 6)),
    lambda d: st.just("causal"),
    lambda d: st.builds(lambda w, k: f"dilated({w}, {k})", st.integers(0, 5), st.integers(1, 4)),
    lambda d: st.builds(lambda b: f"block({b})", st.integers(1, 12)),
    lambda d: st.builds(lambda s: f"stride({s})", st.integers(1, 9)),
    lambda d: st.builds(lambda a, n: f"keys({a} .. {a + n})", st.integers(0, 40), st.integers(0, 20)),
    lambda d: st.builds(lambda m, r: f"queries(% {m} == {r})", st.integers(1, 9), st.integers(0, 8)),
    lambda d: st.builds(lambda m, a: f"keys(% {m} in {a} .. {a + 2})", st.integers(2, 9), st.integers(0, 6)),
    lambda d: st.builds(lambda n: f"sink({n})", st.integers(0, 6)),
    lambda d: st.builds(lambda a: f"global({a} .. {a + 3})", st.integers(0, 30)),
    lambda d: st.builds(
        lambda w, dil, s, c: f"neighborhood({w}, dilation = {dil}, stride = {min(s, w)}, causal = {c})",
        st.integers(1, 5),
        st.integers(1, 2),
        st.integers(1, 3),
        st.sampled_from(["true", "false"]),
    ),
    lambda d: st.builds(
        lambda r, b, seed, skip: f"random({r}, block = {b}, seed = {seed}, skip = {skip})",
        st.integers(0, 3),
        st.integers(1, 9),
        st.integers(0, 5),
        st.integers(0, 2),
    ),
    lambda d: st.builds(lambda b, w: f"on blocks({b}) window({w})", st.integers(1, 8), st.integers(0, 2)),
]


@st.composite
def one_d_spec(draw, depth: int = 2) -> str:
    if depth == 0 or draw(st.booleans()):
        return draw(draw(st.sampled_from(ONE_D_ATOMS))(1))
    op = draw(st.sampled_from(["|", "&", "-", "~"]))
    left = draw(one_d_spec(depth - 1))
    if op == "~":
        return f"~({left})"
    return f"({left}) {op} ({draw(one_d_spec(depth - 1))})"


@st.composite
def grid_spec(draw) -> tuple[str, dict[str, int]]:
    h, w = draw(st.integers(3, 9)), draw(st.integers(3, 9))
    atoms = [
        st.builds(
            lambda a, b, dx, cy: f"neighborhood(({a}, {b}), dilation = (1, {dx}), causal = ({cy}, false))",
            st.integers(1, 3),
            st.integers(1, 3),
            st.integers(1, w // 3),
            st.sampled_from(["true", "false"]),
        ),
        st.builds(lambda a, b: f"window(({a}, {b}))", st.integers(0, 2), st.integers(0, 3)),
        st.builds(lambda a, b: f"block(({a}, {b}))", st.integers(1, 4), st.integers(1, 4)),
        st.builds(lambda a, b: f"stride(({a}, {b}))", st.integers(1, 3), st.integers(1, 3)),
        st.just("causal"),
        st.builds(lambda n: f"sink({n})", st.integers(0, 5)),
    ]
    first = draw(st.sampled_from(atoms))
    second = draw(st.sampled_from(atoms))
    op = draw(st.sampled_from(["|", "&", "-"]))
    spec = f"(({draw(first)}) {op} ({draw(second)})) on grid(h, w)"
    return spec, {"h": h, "w": w}


# ----------------------------------------------------------------- the truth


def block_states(dense: torch.Tensor, bq: int, bk: int, perm: torch.Tensor | None) -> torch.Tensor:
    """Block states [heads, q_blocks, k_blocks] straight from a dense [heads, lq, lk] mask."""
    if perm is not None:
        dense = dense[:, perm][:, :, perm]
    heads, lq, lk = dense.shape
    nq, nk = -(-lq // bq), -(-lk // bk)
    padded = torch.zeros(heads, nq * bq, nk * bk, dtype=torch.bool)
    valid = torch.zeros_like(padded)
    padded[:, :lq, :lk] = dense
    valid[:, :lq, :lk] = True
    some = padded.view(heads, nq, bq, nk, bk).any(4).any(2)
    every = (padded | ~valid).view(heads, nq, bq, nk, bk).all(4).all(2)
    return torch.where(every, 2, torch.where(some, 1, 0)).to(torch.int8)


def fits(program: maskc.Program, lq: int, lk: int, **sizes) -> bool:
    """Whether the sizes suit the pattern (a neighborhood needs w * d <= axis length)."""
    try:
        program.instantiate(lq, lk, **sizes)
    except maskc.MaskTypeError as e:
        assert "needs at least" in str(e), e
        return False
    return True


def assert_exact(
    program: maskc.Program, lq: int, lk: int, bq: int, bk: int, heads: int = 1, layout="rowmajor", **sizes
):
    sched = program.schedule(lq, lk, block_q=bq, block_k=bk, heads=heads, layout=layout, **sizes)
    dense = program.mask(lq, lk, heads=heads, **sizes)
    truth = block_states(dense, bq, bk, sched.perm_q)
    got = sched.to_dense()
    assert torch.equal(got, truth), f"\n{got}\n{truth}"
    assert torch.equal(sched.transposed_dense(), got.transpose(1, 2))
    assert sched.visited_blocks() == int((got > 0).sum())
    if sched.visited_blocks():
        visited_pairs = 0
        qv = torch.clamp(lq - torch.arange(sched.num_q_blocks) * bq, max=bq)
        kv = torch.clamp(lk - torch.arange(sched.num_k_blocks) * bk, max=bk)
        visited_pairs = int(((got > 0) * (qv[None, :, None] * kv[None, None, :])).sum())
        assert abs(sched.efficiency() - int(dense.sum()) / visited_pairs) < 1e-12
    return sched


# ----------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(
    spec=one_d_spec(),
    lq=st.integers(1, 70),
    extra=st.integers(0, 30),
    bq=st.sampled_from([1, 3, 4, 8, 16]),
    bk=st.sampled_from([1, 5, 8, 16]),
    heads=st.integers(1, 2),
)
def test_schedule_exact_1d(spec, lq, extra, bq, bk, heads):
    program = maskc.compile(spec)
    assume(fits(program, lq, lq + extra))
    assert_exact(program, lq, lq + extra, bq, bk, heads)


@settings(max_examples=80, deadline=None)
@given(case=grid_spec(), bq=st.sampled_from([4, 8, 9, 16]), layout=st.sampled_from(["rowmajor", "auto"]))
def test_schedule_exact_grid(case, bq, layout):
    spec, sizes = case
    n = sizes["h"] * sizes["w"]
    assert_exact(maskc.compile(spec), n, n, bq, bq, layout=layout, **sizes)


@settings(max_examples=150, deadline=None)
@given(spec=one_d_spec(depth=3), lq=st.integers(1, 50), extra=st.integers(0, 20))
def test_normal_form_preserves_mask(spec, lq, extra):
    program = maskc.compile(spec)
    assume(fits(program, lq, lq + extra))
    instance = program.instantiate(lq, lq + extra)
    qp, kp = evaluate.positions(instance)
    qp, kp = qp[:, None], kp[None, :]
    tensors = evaluate.Tensors({}, instance)
    for original, form in zip(instance.patterns, plan.normal_forms(instance), strict=True):
        assert torch.equal(evaluate.mask(original.mask, qp, kp, tensors), evaluate.mask(form.mask, qp, kp, tensors))
        # Without sizes the normal form must also be equivalent.
        unsized = normalize(original.mask)
        assert torch.equal(evaluate.mask(original.mask, qp, kp, tensors), evaluate.mask(unsized, qp, kp, tensors))


# ----------------------------------------------------------------- examples


def flat(n: int) -> ir.Coord:
    return ir.Coord(1, None, n)


def normal(spec: str, n: int = 64) -> ir.Mask:
    instance = maskc.compile(spec).instantiate(n)
    return plan.normal_forms(instance)[0].mask


def test_interval_union_merges():
    assert normal("window(2) | window(5)") == ir.Offset(flat(64), -5, 5)


def test_causal_window_intersects():
    assert normal("causal & window(8)") == ir.Offset(flat(64), -8, 0)


def test_idempotence_and_absorption():
    assert normal("window(3) | window(3) | (window(3) & sink(4))") == ir.Offset(flat(64), -3, 3)


def test_empty_and_full_for_sizes():
    assert normal("window(3) & ~window(3)") == ir.Const(False)
    assert normal("window(100)", n=64) == ir.Const(True)
    assert normal("causal | ~causal") == ir.Const(True)
    assert normal("keys(70 .. 80)", n=64) == ir.Const(False)


def test_window_runs_are_compact():
    sched = maskc.compile("causal & window(256)").schedule(65536, block_q=128, block_k=128)
    runs = sched.groups[0]
    # One full run and at most two partial runs per query block: O(query blocks) numbers.
    assert runs.start.numel() <= 3 * sched.num_q_blocks
    assert sched.nbytes <= 40 * sched.num_q_blocks  # 4-byte row pointer + three 9-byte runs


def test_identical_heads_share_one_schedule():
    sched = maskc.compile("heads { 0 .. 3: causal; 3 .. 8: window(4) }").schedule(256, heads=8, block_q=32, block_k=32)
    assert len(sched.groups) == 2
    assert sched.head_group == [0, 0, 0, 1, 1, 1, 1, 1]


def count_settled(monkeypatch) -> list[int]:
    """The number of blocks each call of `schedule.settle` decides pair by pair, appended
    to the returned list as schedules are built."""
    calls: list[int] = []
    real = schedule.settle

    def counting(mask, q, k, rows, cols, tensors):
        calls.append(rows.numel())
        return real(mask, q, k, rows, cols, tensors)

    monkeypatch.setattr(schedule, "settle", counting)
    return calls


def test_interval_patterns_never_evaluate_the_predicate(monkeypatch):
    """Build cost grows with visited blocks: pure interval reasoning, no pair evaluation."""
    calls = count_settled(monkeypatch)
    sched = maskc.compile("causal & window(256)").schedule(1 << 20, block_q=128, block_k=128)
    assert sum(calls) == 0
    assert sched.visited_blocks() < 3 * sched.num_q_blocks
    # Where a window meets the sinks, the union of two partial blocks is settled on its pairs: a few blocks.
    sched = maskc.compile("causal & window(256) | sink(4)").schedule(1 << 20, block_q=128, block_k=128)
    assert sum(calls) <= 4


def test_tiled_layout_is_exact_and_better_for_blocks():
    program = maskc.compile("block((4, 4)) on grid(h, w)")
    rowmajor = assert_exact(program, 256, 256, 16, 16, layout="rowmajor", h=16, w=16)
    tiled = assert_exact(program, 256, 256, 16, 16, layout="tiled", h=16, w=16)
    assert tiled.layout == "tiled 4x4"
    assert tiled.efficiency() == 1.0
    assert rowmajor.efficiency() < 1.0
    perm = tiled.perm_q
    assert sorted(perm.tolist()) == list(range(256))


def test_per_head_random_blocks_exact():
    assert_exact(maskc.compile("random(2, block = 8, seed = 1, skip = 2) | window(8)"), 128, 128, 8, 8, heads=3)


def test_lq_shorter_than_lk_is_exact():
    assert_exact(maskc.compile("causal & window(40)"), 17, 200, 16, 32)


# ----------------------------------------------------------------- data-dependent atoms


def union_block_states(dense: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """One schedule serves the batch: a block is visited if any element needs it, full if all fill it."""
    if dense.dim() == 3:
        return block_states(dense, bq, bk, None)
    some = block_states(dense.any(0), bq, bk, None)
    every = block_states(dense.all(0), bq, bk, None)
    return torch.where(every == 2, 2, torch.where(some > 0, 1, 0)).to(torch.int8)


DYNAMIC = [
    ("pattern p(ids: tensor) = causal & segments(ids)", {"ids": "ids"}),
    ("route(topk = 2, block = 16)", {}),
    ("causal & route(topk = 3, block = 16, own = true, causal = true) | window(3)", {}),
    ("route(topk = 2, block = (4, 4), shared = false) on grid(8, 16)", {}),
    ("cluster(4, size = 24)", {"centroids": "centroids"}),
    ("causal & cluster(3, size = 40) | sink(2)", {"centroids": "centroids"}),
]


@settings(max_examples=12, deadline=None)
@given(case=st.sampled_from(DYNAMIC), seed=st.integers(0, 1000), block=st.sampled_from([8, 16, 32]))
def test_dynamic_schedules_exact(case, seed, block):
    spec, needs = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, 128, 8, generator=g)
    k = torch.randn(2, 2, 128, 8, generator=g)
    bindings = {"q": q, "k": k}
    if "ids" in needs:
        cuts = torch.sort(torch.randint(1, 127, (2, 3), generator=g)).values
        bindings["ids"] = torch.stack([torch.bucketize(torch.arange(128), c, right=True) for c in cuts])
    if "centroids" in needs:
        n = int(spec.split("cluster(")[1].split(",")[0])
        bindings["centroids"] = torch.randn(2, n, 8, generator=g)
    program = maskc.compile(spec)
    sched = program.schedule(128, block_q=block, block_k=block, heads=2, layout="rowmajor", **bindings)
    dense = program.mask(128, heads=2, **bindings)
    assert torch.equal(sched.to_dense(), union_block_states(dense, block, block))
    assert torch.equal(sched.transposed_dense(), sched.to_dense().transpose(1, 2))
