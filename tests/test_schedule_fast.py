"""The fast schedule paths (periodic patterns, random blocks, documents) give exactly
the schedule of the plain builder and of the dense mask."""

from __future__ import annotations

import contextlib

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from maskc.codegen import periodic, random_part
from test_schedule import assert_exact, count_settled, fits, union_block_states

import maskc

SHIFT_INVARIANT = [
    st.builds(lambda w: f"window({w})", st.integers(0, 12)),
    st.builds(lambda l, r: f"window({l}, {r})", st.integers(0, 9), st.integers(0, 9)),
    st.builds(lambda o: f"causal({o})", st.integers(-6, 6)),
    st.just("causal"),
    st.builds(lambda w, k: f"dilated({w}, {k})", st.integers(0, 5), st.integers(1, 4)),
    st.builds(lambda b: f"block({b})", st.integers(1, 12)),
    st.builds(lambda s: f"stride({s})", st.integers(1, 9)),
    st.builds(lambda b, w: f"on blocks({b}) window({w})", st.integers(1, 8), st.integers(0, 2)),
]


@st.composite
def shift_invariant_spec(draw, depth: int = 2) -> str:
    if depth == 0 or draw(st.booleans()):
        return draw(st.one_of(SHIFT_INVARIANT))
    op = draw(st.sampled_from(["|", "&", "-", "~"]))
    left = draw(shift_invariant_spec(depth - 1))
    if op == "~":
        return f"~({left})"
    return f"({left}) {op} ({draw(shift_invariant_spec(depth - 1))})"


@contextlib.contextmanager
def plain_builder():
    """The schedule builder without its shortcuts (periodic patterns, drawn random blocks)."""
    real = periodic.periodic_runs, random_part.has_random
    periodic.periodic_runs = lambda *args: None
    random_part.has_random = lambda mask: False
    try:
        yield
    finally:
        periodic.periodic_runs, random_part.has_random = real


def assert_same_as_plain(program: maskc.Program, lq: int, lk: int, bq: int, bk: int, heads: int = 1, **sizes):
    """Exact against the dense mask, and the same runs (not just the same blocks) as the plain builder."""
    fast = assert_exact(program, lq, lk, bq, bk, heads, **sizes)
    with plain_builder():
        plain = program.schedule(lq, lk, block_q=bq, block_k=bk, heads=heads, layout="rowmajor", **sizes)
    for a, b in zip(fast.groups, plain.groups, strict=True):
        for name in ("row_ptr", "start", "end", "full"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y), name


@settings(max_examples=60, deadline=None)
@given(
    spec=shift_invariant_spec(),
    lq=st.integers(1, 90),
    extra=st.integers(-20, 30),
    bq=st.sampled_from([1, 2, 4, 8]),
    bk=st.sampled_from([1, 3, 4, 8]),
)
def test_periodic_schedules_match_plain_builder(spec, lq, extra, bq, bk):
    """Lengths not multiples of the blocks (cut-short last row and column), lq != lk
    (query offset), different query and key blocks."""
    lk = max(1, lq + extra)
    program = maskc.compile(spec)
    assume(fits(program, lq, lk))
    assert_same_as_plain(program, lq, lk, bq, bk)


def test_periodic_path_taken_for_frames_and_windows():
    """Radial attention on a frame grid, a causal window and NATTEN on a video take the
    periodic path, exactly, with and without a cut-short last block."""
    calls = []
    real = periodic.periodic_runs

    def counting(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    periodic.periodic_runs = counting
    try:
        radial = maskc.compile("radial", f=32)
        assert_same_as_plain(radial, 32 * 12, 32 * 12, 8, 8, t=12)
        assert_same_as_plain(maskc.compile("causal & window(10)"), 203, 203, 8, 8)
        assert_same_as_plain(maskc.compile("causal & window(10)"), 150, 203, 16, 4)
        assert_same_as_plain(maskc.compile("natten3d", k=3), 8 * 4 * 8, 8 * 4 * 8, 16, 16, t=8, h=4, w=8)
        assert_same_as_plain(maskc.compile("natten3d", k=1, kt=5, st=2), 9 * 2 * 4, 9 * 2 * 4, 8, 8, t=9, h=2, w=4)
    finally:
        periodic.periodic_runs = real
    assert calls == [True, True, True, True, True]
    assert periodic.shift_period(maskc.compile("sink(4)").instantiate(64, 64).patterns[0].mask) is None


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(3, 9),
    h=st.sampled_from([2, 3, 4]),
    w=st.sampled_from([2, 4, 8]),
    kernel=st.sampled_from([(1, 1, 1), (3, 3, 3), (5, 3, 1), (3, 1, 5)]),
    step=st.sampled_from([(1, 1, 1), (2, 1, 1), (1, 2, 2)]),
    dilation=st.sampled_from([(1, 1, 1), (1, 2, 1), (2, 1, 1)]),
    causal=st.sampled_from(["false", "(false, true, true)", "(true, false, false)"]),
    block=st.sampled_from([2, 4, 8]),
)
def test_neighborhood_frames_match_plain_builder(t, h, w, kernel, step, dilation, causal, block):
    """NATTEN on a video grid: windows clamped at the first and last frames move by
    steps along the frames; strides, dilations and causal frames (the plain builder)."""
    program = maskc.compile(
        f"neighborhood({kernel}, stride = {tuple(min(a, b) for a, b in zip(step, kernel, strict=True))}, "
        f"dilation = {dilation}, causal = {causal}) on grid(t, h, w)"
    )
    n = t * h * w
    assume(fits(program, n, n, t=t, h=h, w=w))
    assert_same_as_plain(program, n, n, block, block, t=t, h=h, w=w)


RANDOM = st.builds(
    lambda r, b, seed, skip: f"random({r}, block = {b}, seed = {seed}, skip = {skip})",
    st.integers(0, 3),
    st.integers(1, 9),
    st.integers(0, 5),
    st.integers(0, 2),
)
OTHERS = st.sampled_from(["window(3)", "causal", "sink(2)", "global(0 .. 2)", "block(5)", "stride(3)", "keys(4 .. 30)"])


@settings(max_examples=40, deadline=None)
@given(
    parts=st.tuples(RANDOM, OTHERS, RANDOM),
    shape=st.sampled_from(["{0} | {1}", "({0} | {2}) & {1}", "~{0} & {1}", "({0}) - ({1}) | {2}", "{0} & {2}"]),
    lq=st.integers(1, 80),
    extra=st.integers(-20, 30),
    bq=st.sampled_from([1, 3, 4, 8]),
    bk=st.sampled_from([1, 4, 5, 8]),
    heads=st.integers(1, 2),
)
def test_random_blocks_match_plain_builder(parts, shape, lq, extra, bq, bk, heads):
    """Random blocks anywhere in the expression (under `&`, `~`, two atoms), draw
    blocks larger and smaller than the schedule's, lengths not multiples of the blocks,
    lq != lk, per-head draws."""
    lk = max(1, lq + extra)
    program = maskc.compile(shape.format(*parts))
    assume(fits(program, lq, lk))
    assert_same_as_plain(program, lq, lk, bq, bk, heads=heads)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    other=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    spec=st.sampled_from(["causal & segments(ids)", "segments(ids)", "segments(ids) & window(9) | sink(1)"]),
    shuffle=st.booleans(),
    block=st.sampled_from([1, 4, 8, 16]),
    lq=st.integers(0, 30),
)
def test_document_schedules_exact(lengths, other, spec, shuffle, block, lq):
    """Packed documents: 1-token documents, documents over many blocks, lengths not
    multiples of the block, ids that repeat apart (`shuffle`), two batch elements with
    different documents, fewer queries than keys."""
    n = sum(lengths)
    second = (other * n)[:n]
    rows = []
    for sizes in (lengths, second):
        ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[:n]
        rows.append(ids % 3 if shuffle else ids)
    ids = torch.stack(rows)
    lq = max(1, min(n, lq or n))
    program = maskc.compile(f"pattern p(ids: tensor) = {spec}")
    sched = program.schedule(lq, n, block_q=block, block_k=block, layout="rowmajor", ids=ids)
    dense = program.mask(lq, n, ids=ids)
    assert torch.equal(sched.to_dense(), union_block_states(dense, block, block))


def test_document_blocks_with_overlapping_but_disjoint_ids(monkeypatch):
    """Blocks whose id ranges overlap without a common id are empty; a common id in one
    batch element only makes the block visited.  Single blocks are decided from their
    ids, without evaluating pairs."""
    calls = count_settled(monkeypatch)
    program = maskc.compile("pattern p(ids: tensor) = segments(ids)")
    ids = torch.tensor([[0, 0, 2, 2, 1, 1, 1, 1, 3, 1, 3]])
    sched = program.schedule(11, block_q=4, block_k=4, layout="rowmajor", ids=ids)
    assert sched.to_dense()[0].tolist() == [[1, 0, 0], [0, 2, 1], [0, 1, 1]]
    assert sum(calls) == 0
    both = torch.cat([ids, torch.tensor([[0, 0, 2, 1, 1, 1, 1, 1, 3, 1, 3]])])
    sched = program.schedule(11, block_q=4, block_k=4, layout="rowmajor", ids=both)
    assert torch.equal(sched.to_dense(), union_block_states(program.mask(11, ids=both), 4, 4))
    assert sched.to_dense()[0, 0].tolist() == [1, 1, 1]
