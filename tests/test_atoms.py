"""Semantic tests of every atom, operator and coordinate frame.

Expected masks are written by hand or computed by plain Python loops taken
directly from docs/language.md §8 / §8.1 (or, for published patterns, from an
independent re-implementation of the paper's definition); the dense evaluator
is never used to produce an expectation.
"""

from __future__ import annotations

import math

import pytest
import torch

import maskc

# ---------------------------------------------------------------- helpers


def mask_of(spec: str, lq: int, lk: int | None = None, **kw) -> torch.Tensor:
    return maskc.compile(spec).mask(lq, lk, **kw)


def unbatched(m: torch.Tensor) -> torch.Tensor:
    """[heads, lq, lk] from a mask that may carry a batch dim of 1 (data-dependent atoms)."""
    if m.dim() == 4:
        assert m.shape[0] == 1, m.shape
        return m[0]
    assert m.dim() == 3
    return m


def dense(lq: int, lk: int | None, pred, q_offset: int | None = None) -> torch.Tensor:
    """bool [lq, lk] from pred(q, k) on absolute positions."""
    lk = lq if lk is None else lk
    off = lk - lq if q_offset is None else q_offset
    return torch.tensor([[bool(pred(i + off, j)) for j in range(lk)] for i in range(lq)], dtype=torch.bool)


def from_rows(rows: list[str]) -> torch.Tensor:
    """A hand-drawn mask: '#' allowed, '.' not."""
    return torch.tensor([[c == "#" for c in r] for r in rows], dtype=torch.bool)


def keys_only(lq: int, lk: int, allowed_keys) -> torch.Tensor:
    return dense(lq, lk, lambda q, k: k in set(allowed_keys))


def coords(p: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major coordinates of flat index p."""
    out = []
    for s in reversed(sizes):
        out.append(p % s)
        p //= s
    return tuple(reversed(out))


def grid_pred(sizes, axis_pred):
    """pred(q, k) = AND over axes of axis_pred(axis, qa, ka)."""

    def pred(q, k):
        cq, ck = coords(q, sizes), coords(k, sizes)
        return all(axis_pred(a, cq[a], ck[a]) for a in range(len(sizes)))

    return pred


def assert_mask(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.bool
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if not torch.equal(actual, expected):
        diff = (actual != expected).nonzero().tolist()
        pytest.fail(f"masks differ at {len(diff)} places, first {diff[:8]}")


def check(spec: str, pred, lq: int, lk: int | None = None, q_offset=None, **kw) -> None:
    """Single-head mask of `spec` equals pred on absolute positions."""
    m = mask_of(spec, lq, lk, q_offset=q_offset, **kw)
    assert m.shape[0] == 1
    assert_mask(m[0], dense(lq, lk, pred, q_offset))


# ---------------------------------------------------------------- simple atoms


def test_all_and_none():
    assert_mask(mask_of("all", 3, 5)[0], torch.ones(3, 5, dtype=torch.bool))
    assert_mask(mask_of("none", 3, 5)[0], torch.zeros(3, 5, dtype=torch.bool))


def test_causal_hand():
    assert_mask(mask_of("causal", 4)[0], from_rows(["#...", "##..", "###.", "####"]))


def test_causal_offset_hand():
    assert_mask(mask_of("causal(-1)", 3)[0], from_rows(["...", "#..", "##."]))
    assert_mask(mask_of("causal(1)", 3)[0], from_rows(["##.", "###", "###"]))
    assert_mask(mask_of("causal(-2)", 4)[0], from_rows(["....", "....", "#...", "##.."]))


@pytest.mark.parametrize("o", [-3, -1, 0, 2, 5])
def test_causal_offset_loop(o):
    check(f"causal({o})", lambda q, k: k <= q + o, 7)


def test_window_hand():
    assert_mask(mask_of("window(1)", 4)[0], from_rows(["##..", "###.", ".###", "..##"]))
    # truncated at the borders: row 0 of window(2) has 3 keys, not 5
    m = mask_of("window(2)", 6)[0]
    assert m[0].tolist() == [True, True, True, False, False, False]
    assert m[5].tolist() == [False, False, False, True, True, True]
    assert_mask(mask_of("window(0)", 3)[0], torch.eye(3, dtype=torch.bool))


@pytest.mark.parametrize(("l", "r"), [(2, 0), (0, 2), (1, 3), (0, 0), (4, 1)])
def test_window_lr(l, r):
    check(f"window({l}, {r})", lambda q, k: -l <= k - q <= r, 8)


def test_window_w_is_symmetric():
    check("window(2)", lambda q, k: abs(k - q) <= 2, 8)


def test_dilated():
    m = mask_of("dilated(2, 2)", 9)[0]
    assert m[4].nonzero().flatten().tolist() == [0, 2, 4, 6, 8]
    assert m[0].nonzero().flatten().tolist() == [0, 2, 4]
    m = mask_of("dilated(1, 3)", 10)[0]
    assert m[5].nonzero().flatten().tolist() == [2, 5, 8]
    for w, d in [(2, 2), (1, 3), (3, 1), (0, 2)]:
        check(f"dilated({w}, {d})", lambda q, k, w=w, d=d: abs(k - q) <= w * d and (k - q) % d == 0, 11)


def test_block():
    m = mask_of("block(3)", 7)[0]
    assert m[6].nonzero().flatten().tolist() == [6]
    assert m[4].nonzero().flatten().tolist() == [3, 4, 5]
    check("block(3)", lambda q, k: q // 3 == k // 3, 8)


def test_stride():
    m = mask_of("stride(3)", 7)[0]
    assert m[4].nonzero().flatten().tolist() == [1, 4]
    assert m[0].nonzero().flatten().tolist() == [0, 3, 6]
    check("stride(3)", lambda q, k: (q - k) % 3 == 0, 8)


# ---------------------------------------------------------------- position sets


def test_keys_range():
    assert_mask(mask_of("keys(2 .. 5)", 3, 6)[0], keys_only(3, 6, [2, 3, 4]))


def test_queries_range():
    m = mask_of("queries(1 .. 3)", 4)[0]
    assert_mask(m, dense(4, 4, lambda q, k: q in (1, 2)))


def test_keys_modulo():
    assert_mask(mask_of("keys(% 3 == 1)", 2, 10)[0], keys_only(2, 10, [1, 4, 7]))
    assert_mask(mask_of("keys(% 4 in 1 .. 3)", 2, 12)[0], keys_only(2, 12, [1, 2, 5, 6, 9, 10]))


def test_keys_several_sets_and_bare_number():
    assert_mask(mask_of("keys(0 .. 2, % 5 == 4, 7)", 2, 12)[0], keys_only(2, 12, [0, 1, 4, 7, 9]))
    assert_mask(mask_of("keys(3)", 2, 6)[0], keys_only(2, 6, [3]))


def test_queries_modulo_and_absolute_positions():
    check("queries(% 2 == 0)", lambda q, k: q % 2 == 0, 5)
    # lq = 3, lk = 6: the queries sit at absolute positions 3, 4, 5
    m = mask_of("queries(4 .. 6)", 3, 6)[0]
    assert m.any(dim=1).tolist() == [False, True, True]


def test_sink_and_prefix():
    assert_mask(mask_of("sink(2)", 5)[0], keys_only(5, 5, [0, 1]))
    assert_mask(mask_of("prefix(3)", 4)[0], keys_only(4, 4, [0, 1, 2]))
    # prefix-LM (T5 / UniLM), its definition re-implemented: j <= i or j < n_prefix
    check("causal | prefix(3)", lambda q, k: k <= q or k < 3, 7)


def test_global():
    check("global(1 .. 3)", lambda q, k: q in (1, 2) or k in (1, 2), 6)
    # Longformer (Beltagy et al. 2020), its definition re-implemented: |i - j| <= w or i in G or j in G
    check("window(1) | global(0 .. 1)", lambda q, k: abs(q - k) <= 1 or q == 0 or k == 0, 7)


# ---------------------------------------------------------------- NATTEN neighborhoods


def natten_axis(i: int, j: int, length: int, w: int, d: int = 1, s: int = 1, causal: bool = False) -> bool:
    """docs/language.md §8.1, transcribed as plain integer arithmetic."""
    g = i % d
    if j % d != g:
        return False
    c = i // d
    lg = -(-(length - g) // d)  # ceil((length - g) / d)
    if causal:
        leader = min((c // s) * s + s - 1, lg - 1)
        start = max(leader - w + 1, 0)
        end = min(c + 1, lg)
    else:
        wl = w // 2
        wr = w // 2 + (w % 2) - 1
        leader = min((c // s) * s + s // 2, lg - 1)
        start = max(leader - wl, 0) + ((lg - wr - leader - 1) if leader + wr >= lg else 0)
        end = start + w
    return start <= j // d < end


def test_natten_design_example():
    m = mask_of("neighborhood(3)", 10)[0]
    assert m[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert m[9].nonzero().flatten().tolist() == [7, 8, 9]
    assert m[4].nonzero().flatten().tolist() == [3, 4, 5]


def test_natten_shifted_window_words():
    # "a window of exactly w keys, shifted (not truncated) at borders":
    # keys [c - wl, c + wr] moved into [0, L); even w has one extra key on the left.
    for length, w in [(10, 3), (9, 4), (7, 7), (8, 5), (6, 2)]:
        wl, wr = w // 2, w // 2 + w % 2 - 1

        def pred(q, k, w=w, wl=wl, length=length):
            start = min(max(q - wl, 0), length - w)
            return start <= k < start + w

        check(f"neighborhood({w})", pred, length)
        assert wl + wr + 1 == w
        m = mask_of(f"neighborhood({w})", length)[0]
        assert (m.sum(1) == w).all()


def test_natten_dilation_hand():
    # L = 10, d = 2: groups {0,2,4,6,8} and {1,3,5,7,9}, windows of 3 in each
    m = mask_of("neighborhood(3, dilation = 2)", 10)[0]
    assert m[0].nonzero().flatten().tolist() == [0, 2, 4]
    assert m[9].nonzero().flatten().tolist() == [5, 7, 9]
    assert m[4].nonzero().flatten().tolist() == [2, 4, 6]
    # L = 7, d = 2: group 0 has 4 positions, group 1 has 3
    m = mask_of("neighborhood(3, dilation = 2)", 7)[0]
    assert m[6].nonzero().flatten().tolist() == [2, 4, 6]
    assert m[5].nonzero().flatten().tolist() == [1, 3, 5]
    assert m[1].nonzero().flatten().tolist() == [1, 3, 5]


def test_natten_stride_equal_window_is_blocked():
    # NATTEN (Hassani et al.): stride s = w gives blocked attention
    check("neighborhood(4, stride = 4)", lambda q, k: q // 4 == k // 4, 8)
    m = mask_of("neighborhood(3, stride = 3)", 9)[0]
    assert m[1].nonzero().flatten().tolist() == [0, 1, 2]
    assert m[2].nonzero().flatten().tolist() == [0, 1, 2]


def test_natten_stride_leader_hand():
    # L = 10, w = 5, s = 2: queries 2 and 3 share leader 3 -> keys 1..5
    m = mask_of("neighborhood(5, stride = 2)", 10)[0]
    assert m[2].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]
    assert m[3].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]
    # queries 8 and 9: leader min(9, 9) = 9 -> shifted to 5..9
    assert m[8].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]


def test_natten_causal_is_causal_window():
    check("neighborhood(3, causal = true)", lambda q, k: 0 <= q - k <= 2, 7)
    m = mask_of("neighborhood(3, causal = true, stride = 3)", 9)[0]
    # stride group 0..2 has leader 2: start 0, end = c + 1
    assert m[0].nonzero().flatten().tolist() == [0]
    assert m[1].nonzero().flatten().tolist() == [0, 1]
    assert m[5].nonzero().flatten().tolist() == [3, 4, 5]


@pytest.mark.parametrize("length", [1, 2, 3, 5, 7, 9])
def test_natten_sweep(length):
    cases = 0
    for w in range(1, length + 1):
        for d in range(1, length // w + 1):
            for s in range(1, w + 1):
                for causal in (False, True):
                    spec = f"neighborhood({w}, dilation = {d}, stride = {s}, causal = {str(causal).lower()})"
                    expected = dense(length, length, lambda q, k: natten_axis(q, k, length, w, d, s, causal))  # noqa: B023
                    assert_mask(mask_of(spec, length)[0], expected)
                    cases += 1
    assert cases > 0


def test_natten_2d():
    sizes = (4, 5)
    spec = "neighborhood((3, 3)) on grid(4, 5)"
    pred = grid_pred(sizes, lambda a, qa, ka: natten_axis(qa, ka, sizes[a], 3))
    check(spec, pred, 20)
    # the corner (0, 0) sees rows 0..2 and columns 0..2
    m = mask_of(spec, 20)[0]
    assert sorted(coords(k, sizes) for k in m[0].nonzero().flatten().tolist()) == [
        (y, x) for y in range(3) for x in range(3)
    ]


def test_natten_2d_per_axis_options():
    sizes = (6, 5)
    spec = "neighborhood((3, 2), dilation = (2, 1), stride = (1, 2), causal = (false, true)) on grid(6, 5)"
    opts = [(3, 2, 1, False), (2, 1, 2, True)]

    def axis(a, qa, ka):
        w, d, s, c = opts[a]
        return natten_axis(qa, ka, sizes[a], w, d, s, c)

    check(spec, grid_pred(sizes, axis), 30)


def test_natten_3d_video_causal_in_time():
    sizes = (3, 3, 4)
    spec = "neighborhood((2, 3, 3), causal = (true, false, false)) on grid(3, 3, 4)"
    opts = [(2, True), (3, False), (3, False)]

    def axis(a, qa, ka):
        w, c = opts[a]
        return natten_axis(qa, ka, sizes[a], w, causal=c)

    check(spec, grid_pred(sizes, axis), 36)


def test_natten_scalar_broadcast_on_grid():
    a = mask_of("neighborhood(3) on grid(4, 4)", 16)
    b = mask_of("neighborhood((3, 3)) on grid(4, 4)", 16)
    assert torch.equal(a, b)
    check("neighborhood(3) on grid(4, 4)", grid_pred((4, 4), lambda ax, qa, ka: natten_axis(qa, ka, 4, 3)), 16)


def test_natten_fewer_queries():
    # lq = 4 of lk = 10: queries at positions 6..9
    check("neighborhood(3)", lambda q, k: natten_axis(q, k, 10, 3), 4, 10)


def test_natten_constraints():
    with pytest.raises(maskc.MaskError):
        mask_of("neighborhood(4)", 3)
    with pytest.raises(maskc.MaskError):
        mask_of("neighborhood(3, dilation = 2)", 5)
    with pytest.raises(maskc.MaskError):
        maskc.compile("neighborhood(3, stride = 4)")


# ---------------------------------------------------------------- random blocks

M32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


def u(seed: int, h: int, qb: int, j: int) -> int:
    x = lowbias32(seed & M32)
    x = lowbias32(x ^ (h & M32))
    x = lowbias32(x ^ (qb & M32))
    return lowbias32(x ^ (j & M32))


def kept_blocks(qb: int, r: int, seed: int, h: int, lo: int, hi: int, skip: int) -> set[int]:
    eligible = [kb for kb in range(lo, hi) if abs(kb - qb) >= skip]
    n = len(eligible)
    if r >= n:
        return set(eligible)
    chosen: set[int] = set()
    for j in range(n - r, n):
        t = u(seed, h, qb, j) % (j + 1)
        chosen.add(j if t in chosen else t)
    return {eligible[t] for t in chosen}


def random_expected(lq, lk, heads, r, b, seed, lo=None, hi=None, skip=0):
    nb = -(-lk // b)
    lo = 0 if lo is None else max(lo, 0)
    hi = nb if hi is None else min(hi, nb)
    off = lk - lq
    out = torch.zeros(heads, lq, lk, dtype=torch.bool)
    for h in range(heads):
        rows = {}
        for i in range(lq):
            qb = (i + off) // b
            if qb not in rows:
                rows[qb] = kept_blocks(qb, r, seed, h, lo, hi, skip)
            for j in range(lk):
                out[h, i, j] = j // b in rows[qb]
    return out


def test_lowbias32_reference_is_a_bijection_sample():
    # sanity of the plain-Python hash used as the reference below
    values = {lowbias32(x) for x in range(2000)}
    assert len(values) == 2000
    assert lowbias32(0) == 0


@pytest.mark.parametrize(
    ("spec", "lq", "lk", "heads", "args"),
    [
        ("random(2, block = 2, seed = 7)", 16, 16, 3, dict(r=2, b=2, seed=7)),
        ("random(3, block = 4)", 40, 40, 2, dict(r=3, b=4, seed=0)),
        ("random(1, block = 3, seed = 5)", 10, 10, 2, dict(r=1, b=3, seed=5)),
        ("random(2, block = 2, seed = 1)", 6, 20, 2, dict(r=2, b=2, seed=1)),
        (
            "random(2, block = 2, seed = 3, among = 1 .. 9, skip = 2)",
            20,
            20,
            4,
            dict(r=2, b=2, seed=3, lo=1, hi=9, skip=2),
        ),
        ("random(3, block = 1, seed = 11, skip = 1)", 12, 12, 2, dict(r=3, b=1, seed=11, skip=1)),
        ("random(20, block = 2)", 8, 8, 1, dict(r=20, b=2, seed=0)),
        (
            "random(2, block = 2, seed = -5, among = 0 .. 100)",
            12,
            12,
            1,
            dict(r=2, b=2, seed=-5, lo=0, hi=100),
        ),
    ],
)
def test_random_matches_documented_generator(spec, lq, lk, heads, args):
    expected = random_expected(lq, lk, heads, **args)
    assert_mask(mask_of(spec, lq, lk, heads=heads), expected)


def test_random_properties():
    nb, b, r = 16, 2, 3
    spec = f"random({r}, block = {b}, seed = 4)"
    m = mask_of(spec, nb * b, heads=4)
    for h in range(4):
        for qb in range(nb):
            rows = m[h, qb * b : (qb + 1) * b]
            assert (rows == rows[0]).all()  # the whole query block shares its key blocks
            blocks = rows[0].reshape(nb, b)
            assert (blocks.all(1) | ~blocks.any(1)).all()  # whole key blocks
            assert int(blocks.any(1).sum()) == r  # r distinct blocks
    assert torch.equal(m, mask_of(spec, nb * b, heads=4))  # deterministic
    assert not all(torch.equal(m[0], m[h]) for h in range(1, 4))  # heads differ
    other = mask_of(f"random({r}, block = {b}, seed = 5)", nb * b, heads=4)
    assert not torch.equal(m, other)  # seeds differ


def test_random_bigbird_exclusion():
    # BigBird: random blocks from 1 .. nb-1 excluding qb-1 .. qb+1
    nb, b = 10, 2
    m = mask_of(f"random(2, block = {b}, seed = 9, among = 1 .. {nb - 1}, skip = 2)", nb * b, heads=2)
    for h in range(2):
        for qb in range(nb):
            picked = m[h, qb * b].reshape(nb, b).any(1).nonzero().flatten().tolist()
            assert len(picked) == 2
            assert all(1 <= kb < nb - 1 and abs(kb - qb) >= 2 for kb in picked)


# ---------------------------------------------------------------- segments


def test_segments_batch():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    m = mask_of("pattern p(ids: tensor) = segments(ids)", 6, heads=2, ids=ids)
    assert m.shape == (2, 2, 6, 6)
    for b in range(2):
        expected = dense(6, 6, lambda q, k, b=b: ids[b, q] == ids[b, k])
        for h in range(2):
            assert_mask(m[b, h], expected)


def test_segments_with_causal_and_sink():
    ids = torch.tensor([[3, 3, 3, 5, 5, 7, 7, 7]])
    spec = "pattern p(ids: tensor) = (segments(ids) & causal) | sink(1)"
    m = mask_of(spec, 8, ids=ids)
    assert m.shape[-2:] == (8, 8)
    expected = dense(8, 8, lambda q, k: (ids[0, q] == ids[0, k] and k <= q) or k < 1)
    assert_mask(m.reshape(-1, 8, 8)[0], expected)


def test_segments_fewer_queries():
    ids = torch.tensor([[0, 0, 1, 1, 2, 2]])
    m = mask_of("pattern p(ids: tensor) = segments(ids)", 2, 6, ids=ids)
    expected = dense(2, 6, lambda q, k: ids[0, q] == ids[0, k])
    assert_mask(m.reshape(-1, 2, 6)[0], expected)


# ---------------------------------------------------------------- route

# Four regions of two tokens; the pooled score of (query region r, key region s) is P[r][s].
P = [
    [4.0, 1.0, 3.0, 2.0],
    [1.0, 2.0, 5.0, 3.0],
    [0.0, 6.0, 1.0, 2.0],
    [3.0, 1.0, 0.0, 2.0],
]


def route_qk(prefs, tokens_per_region=2):
    """q/k [1, heads, 4 * t, 4] whose mean-pooled regions give scores prefs[h][r][s];
    the tokens of a region differ (only their mean is designed)."""
    heads = len(prefs)
    n = len(prefs[0])
    t = tokens_per_region
    q = torch.zeros(1, heads, n * t, n, dtype=torch.float64)
    k = torch.zeros(1, heads, n * t, n, dtype=torch.float64)
    spread = torch.tensor([5.0, -5.0, 5.0, -5.0], dtype=torch.float64)
    for h in range(heads):
        for r in range(n):
            for i in range(t):
                sign = 1 if i % 2 == 0 else -1
                q[0, h, r * t + i] = torch.tensor(prefs[h][r], dtype=torch.float64) + sign * spread
                k[0, h, r * t + i] = torch.eye(n, dtype=torch.float64)[r] + sign * 0.25 * spread.flip(0)
    return q, k


def region_mask(selected: dict[int, set[int]], length: int, b: int) -> torch.Tensor:
    return dense(length, length, lambda q, k: k // b in selected[q // b])


def test_route_mean_pooling_design():
    # the designed tensors really have pooled scores P (checked without maskc)
    q, k = route_qk([P])
    pq = q[0, 0].reshape(4, 2, 4).mean(1)
    pk = k[0, 0].reshape(4, 2, 4).mean(1)
    assert torch.allclose(pq @ pk.T, torch.tensor(P, dtype=torch.float64))


def test_route_topk():
    q, k = route_qk([P])
    m = unbatched(mask_of("route(topk = 2, block = 2)", 8, q=q, k=k))[0]
    assert_mask(m, region_mask({0: {0, 2}, 1: {2, 3}, 2: {1, 3}, 3: {0, 3}}, 8, 2))
    m = unbatched(mask_of("route(topk = 1, block = 2)", 8, q=q, k=k))[0]
    assert_mask(m, region_mask({0: {0}, 1: {2}, 2: {1}, 3: {0}}, 8, 2))


def test_route_own():
    q, k = route_qk([P])
    m = unbatched(mask_of("route(topk = 2, block = 2, own = true)", 8, q=q, k=k))[0]
    assert_mask(m, region_mask({0: {0, 2}, 1: {1, 2}, 2: {2, 1}, 3: {3, 0}}, 8, 2))


def test_route_causal():
    q, k = route_qk([P])
    m = unbatched(mask_of("route(topk = 2, block = 2, causal = true)", 8, q=q, k=k))[0]
    assert_mask(m, region_mask({0: {0}, 1: {0, 1}, 2: {1, 2}, 3: {0, 3}}, 8, 2))
    # MoBA: own block always, causal
    m = unbatched(mask_of("route(topk = 2, block = 2, causal = true, own = true)", 8, q=q, k=k))[0]
    assert_mask(m, region_mask({0: {0}, 1: {0, 1}, 2: {1, 2}, 3: {0, 3}}, 8, 2))
    m = unbatched(mask_of("route(topk = 1, block = 2, causal = true, own = true)", 8, q=q, k=k))[0]
    assert_mask(m, region_mask({0: {0}, 1: {1}, 2: {2}, 3: {3}}, 8, 2))


P2 = [
    [0.0, 0.0, 2.5, 3.0],
    [7.0, 0.0, 1.0, 0.0],
    [0.0, 0.0, 1.0, 8.0],
    [1.0, 0.0, 9.0, 0.0],
]


def test_route_shared_vs_per_head():
    q, k = route_qk([P, P2])
    per_head = unbatched(mask_of("route(topk = 1, block = 2, shared = false)", 8, heads=2, q=q, k=k))
    assert_mask(per_head[0], region_mask({0: {0}, 1: {2}, 2: {1}, 3: {0}}, 8, 2))
    assert_mask(per_head[1], region_mask({0: {3}, 1: {0}, 2: {3}, 3: {2}}, 8, 2))
    # shared: one routing for all heads, scored by the sum over heads (P + P2);
    # in row 0 the sum picks region 2, which neither head picks alone
    shared = unbatched(mask_of("route(topk = 1, block = 2)", 8, heads=2, q=q, k=k))
    expected = region_mask({0: {2}, 1: {0}, 2: {3}, 3: {2}}, 8, 2)
    assert_mask(shared[0], expected)
    assert_mask(shared[1], expected)


def test_route_gqa_keys():
    q, k = route_qk([P, P2])
    k1 = k[:, :1]  # one key head shared by both query heads
    m = unbatched(mask_of("route(topk = 1, block = 2, shared = false)", 8, heads=2, q=q, k=k1))
    assert_mask(m[0], region_mask({0: {0}, 1: {2}, 2: {1}, 3: {0}}, 8, 2))
    assert_mask(m[1], region_mask({0: {3}, 1: {0}, 2: {3}, 3: {2}}, 8, 2))


def test_route_batch():
    q1, k1 = route_qk([P])
    q2, k2 = route_qk([P2])
    m = mask_of("route(topk = 1, block = 2)", 8, q=torch.cat([q1, q2]), k=torch.cat([k1, k2]))
    assert m.shape == (2, 1, 8, 8)
    assert_mask(m[0, 0], region_mask({0: {0}, 1: {2}, 2: {1}, 3: {0}}, 8, 2))
    assert_mask(m[1, 0], region_mask({0: {3}, 1: {0}, 2: {3}, 3: {2}}, 8, 2))


def test_route_fewer_queries():
    # lq = 4 of lk = 8: the queries are tokens 4..7 (regions 2 and 3)
    q, k = route_qk([P])
    m = unbatched(mask_of("route(topk = 2, block = 2)", 4, 8, q=q[:, :, 4:], k=k))[0]
    top2 = {2: {1, 3}, 3: {0, 3}}
    assert_mask(m, dense(4, 8, lambda a, b: b // 2 in top2[a // 2]))


def test_route_on_grid():
    # grid 4 x 4, regions of 2 x 2 tokens, row-major: region(y, x) = (y // 2) * 2 + x // 2
    length = 16
    q = torch.zeros(1, 1, length, 4, dtype=torch.float64)
    k = torch.zeros(1, 1, length, 4, dtype=torch.float64)
    for p in range(length):
        y, x = coords(p, (4, 4))
        r = (y // 2) * 2 + x // 2
        q[0, 0, p] = torch.tensor(P[r], dtype=torch.float64)
        k[0, 0, p, r] = 1.0
    m = unbatched(mask_of("route(topk = 1, block = 2) on grid(4, 4)", length, q=q, k=k))[0]
    top1 = {0: 0, 1: 2, 2: 1, 3: 0}

    def region(p):
        y, x = coords(p, (4, 4))
        return (y // 2) * 2 + x // 2

    assert_mask(m, dense(length, length, lambda a, b: region(b) == top1[region(a)]))


# ---------------------------------------------------------------- cluster


def unit(rows):
    x = torch.tensor(rows, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


CQ = unit([[1, 0.1], [0.1, 1], [1, 0.2], [0.2, 1]])
CK = unit([[0, 1], [1, 0], [0.1, 1], [1, 0.3]])
CENT = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)


def test_cluster_balanced():
    # cluster 0 holds queries {0, 2} and keys {1, 3}; cluster 1 queries {1, 3}, keys {0, 2}
    q, k = CQ[None, None], CK[None, None]
    m = unbatched(mask_of("cluster(2, size = 2)", 4, q=q, k=k, centroids=CENT))[0]
    assert_mask(m, from_rows([".#.#", "#.#.", ".#.#", "#.#."]))


def test_cluster_size_one_leaves_rows_empty():
    q, k = CQ[None, None], CK[None, None]
    m = unbatched(mask_of("cluster(2, size = 1)", 4, q=q, k=k, centroids=CENT))[0]
    assert_mask(m, from_rows([".#..", "#...", "....", "...."]))


def test_cluster_per_head_centroids():
    q = torch.stack([CQ, CQ])[None]
    k = torch.stack([CK, CK])[None]
    cent = torch.cat([CENT, CENT.flip(1)])  # head 1 swaps the two centroids: same clusters
    m = unbatched(mask_of("cluster(2, size = 2)", 4, heads=2, q=q, k=k, centroids=cent))
    assert torch.equal(m[0], m[1])
    # head 1 with centroids that group differently: [1, 1] and [1, -1] directions
    cent2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [-1.0, 1.0]]], dtype=torch.float64)
    m = unbatched(mask_of("cluster(2, size = 1)", 4, heads=2, q=q, k=k, centroids=cent2))
    # head 1: nearest query to [1,1] is 3 ([0.2,1]) ... compute by cosine in plain Python
    qn, kn = CQ.tolist(), CK.tolist()

    def best(vectors, c):
        sims = [(v[0] * c[0] + v[1] * c[1]) / math.hypot(*c) for v in vectors]
        return max(range(len(sims)), key=lambda i: (sims[i], -i))

    cs = cent2[1].tolist()
    pairs = {(best(qn, c), best(kn, c)) for c in cs}
    assert_mask(m[1], dense(4, 4, lambda a, b: (a, b) in pairs))


# ---------------------------------------------------------------- set operators


def test_union_binds_looser_than_intersection():
    a, b, c = "keys(0 .. 2)", "keys(1 .. 4)", "keys(3 .. 6)"
    assert_mask(mask_of(f"{a} | {b} & {c}", 1, 7)[0], keys_only(1, 7, [0, 1, 3]))
    assert_mask(mask_of(f"({a} | {b}) & {c}", 1, 7)[0], keys_only(1, 7, [3]))


def test_difference_is_left_associative():
    a, b, c = "keys(0 .. 6)", "keys(1 .. 3)", "keys(2 .. 5)"
    assert_mask(mask_of(f"{a} - {b} - {c}", 1, 7)[0], keys_only(1, 7, [0, 5]))
    assert_mask(mask_of(f"{a} - ({b} - {c})", 1, 7)[0], keys_only(1, 7, [0, 2, 3, 4, 5]))


def test_difference_binds_tighter_than_intersection():
    a, b, c = "keys(0 .. 4)", "keys(0 .. 2)", "keys(1 .. 3)"
    assert_mask(mask_of(f"{a} - {b} & {c}", 1, 5)[0], keys_only(1, 5, [2]))
    assert_mask(mask_of(f"{a} - ({b} & {c})", 1, 5)[0], keys_only(1, 5, [0, 2, 3]))


def test_complement_binds_tightest():
    assert_mask(mask_of("~keys(0 .. 2) & keys(1 .. 4)", 1, 5)[0], keys_only(1, 5, [2, 3]))
    assert_mask(mask_of("~(keys(0 .. 2) & keys(1 .. 4))", 1, 5)[0], keys_only(1, 5, [0, 2, 3, 4]))
    assert_mask(mask_of("~keys(1) | keys(1 .. 3)", 1, 4)[0], keys_only(1, 4, [0, 1, 2, 3]))
    assert_mask(mask_of("~~causal", 4)[0], from_rows(["#...", "##..", "###.", "####"]))


def test_long_chains_with_repeated_terms():
    """A chain is lowered as one node with repeated terms kept once: which must not
    drop the first term of a difference when it is repeated after it."""
    a, b = "keys(0 .. 4)", "keys(2 .. 6)"
    assert_mask(mask_of(" | ".join([a, b] * 50), 1, 7)[0], keys_only(1, 7, range(6)))
    assert_mask(mask_of(" & ".join([a, b] * 50), 1, 7)[0], keys_only(1, 7, [2, 3]))
    assert_mask(mask_of(" - ".join([a] + [b] * 50), 1, 7)[0], keys_only(1, 7, [0, 1]))
    assert_mask(mask_of(" - ".join([a] * 50), 1, 7)[0], keys_only(1, 7, []))
    assert_mask(mask_of(f"{a} - {b} - {a}", 1, 7)[0], keys_only(1, 7, []))
    check(" | ".join(f"window({i % 3}, 0)" for i in range(300)), lambda q, k: 0 <= q - k <= 2, 6)


def test_operators_on_two_sided_atoms():
    check("causal - window(1)", lambda q, k: k <= q and abs(k - q) > 1, 6)
    check("~causal | block(2)", lambda q, k: k > q or q // 2 == k // 2, 6)


# ---------------------------------------------------------------- on blocks


def test_on_blocks_1d():
    check("on blocks(2) causal", lambda q, k: k // 2 <= q // 2, 6)
    check("on blocks(3) window(1)", lambda q, k: abs(k // 3 - q // 3) <= 1, 10)
    check("on blocks(2) keys(1)", lambda q, k: k in (2, 3), 6)
    check("causal & on blocks(4) window(1, 0)", lambda q, k: k <= q and 0 <= q // 4 - k // 4 <= 1, 12)
    # blocks of absolute positions when lq != lk
    check("on blocks(3) window(0)", lambda q, k: q // 3 == k // 3, 4, 9)


def test_on_blocks_nested():
    check("on blocks(2) on blocks(3) window(0)", lambda q, k: q // 6 == k // 6, 13)


def test_on_blocks_on_grid():
    sizes = (4, 6)
    pred = grid_pred(sizes, lambda a, qa, ka: -1 <= ka // 2 - qa // 2 <= 0)
    check("on blocks(2) window(1, 0) on grid(4, 6)", pred, 24)
    bs = (2, 3)
    pred = grid_pred(sizes, lambda a, qa, ka: abs(ka // bs[a] - qa // bs[a]) <= (1, 0)[a])
    check("on blocks((2, 3)) window((1, 0)) on grid(4, 6)", pred, 24)


def test_on_blocks_grid_sizes_not_dividing():
    sizes = (5, 3)
    check(
        "on blocks(2) window(1) on grid(5, 3)",
        grid_pred(sizes, lambda a, qa, ka: abs(qa // 2 - ka // 2) <= 1),
        15,
    )
    check("on blocks(2) window(0) on grid(5, 3)", grid_pred(sizes, lambda a, qa, ka: qa // 2 == ka // 2), 15)
    check("block(2) on grid(3, 5)", grid_pred((3, 5), lambda a, qa, ka: qa // 2 == ka // 2), 15)


def test_flat_atoms_inside_blocks_on_grid_are_rejected():
    with pytest.raises(maskc.MaskError):
        maskc.compile("on blocks(2) causal on grid(4, 4)")


# ---------------------------------------------------------------- grids


def test_grid_tuples_per_axis():
    sizes = (3, 5)
    check("window((1, 2)) on grid(3, 5)", grid_pred(sizes, lambda a, qa, ka: abs(ka - qa) <= (1, 2)[a]), 15)
    check(
        "window((1, 0), (0, 2)) on grid(3, 5)",
        grid_pred(sizes, lambda a, qa, ka: -(1, 0)[a] <= ka - qa <= (0, 2)[a]),
        15,
    )
    s4 = (4, 6)
    check("block((2, 3)) on grid(4, 6)", grid_pred(s4, lambda a, qa, ka: qa // (2, 3)[a] == ka // (2, 3)[a]), 24)
    # MaxViT grid attention with G = 2: stride H/G, W/G per axis
    check("stride((2, 3)) on grid(4, 6)", grid_pred(s4, lambda a, qa, ka: (qa - ka) % (2, 3)[a] == 0), 24)
    check(
        "dilated((1, 2), (2, 1)) on grid(5, 5)",
        grid_pred(
            (5, 5),
            lambda a, qa, ka: abs(ka - qa) <= (1, 2)[a] * (2, 1)[a] and (ka - qa) % (2, 1)[a] == 0,
        ),
        25,
    )


def test_grid_scalar_broadcast():
    check("window(1) on grid(4, 4)", grid_pred((4, 4), lambda a, qa, ka: abs(qa - ka) <= 1), 16)
    assert torch.equal(mask_of("window(1) on grid(4, 4)", 16), mask_of("window((1, 1)) on grid(4, 4)", 16))
    check("stride(2) on grid(4, 4)", grid_pred((4, 4), lambda a, qa, ka: (qa - ka) % 2 == 0), 16)


def test_grid_3d():
    sizes = (2, 3, 4)
    check(
        "window((0, 1, 1)) on grid(2, 3, 4)",
        grid_pred(sizes, lambda a, qa, ka: abs(qa - ka) <= (0, 1, 1)[a]),
        24,
    )
    check(
        "block((1, 3, 2)) on grid(2, 3, 4)",
        grid_pred(sizes, lambda a, qa, ka: qa // (1, 3, 2)[a] == ka // (1, 3, 2)[a]),
        24,
    )


def test_flat_atoms_on_grid_read_flat_index():
    sizes = (3, 3)
    w1 = grid_pred(sizes, lambda a, qa, ka: abs(qa - ka) <= 1)
    check("causal & window(1) on grid(3, 3)", lambda q, k: k <= q and w1(q, k), 9)
    check("keys(0 .. 4) | window(0) on grid(3, 3)", lambda q, k: k < 4 or q == k, 9)
    check(
        "sink(1) | global(4) | block(3) on grid(3, 3)",
        lambda q, k: (
            k < 1
            or q == 4
            or k == 4
            or (
                coords(q, sizes)[0] // 3 == coords(k, sizes)[0] // 3
                and coords(q, sizes)[1] // 3 == coords(k, sizes)[1] // 3
            )
        ),
        9,
    )


def test_on_grid_inside_expression():
    g = grid_pred((2, 4), lambda a, qa, ka: qa // 2 == ka // 2)
    check("(on grid(2, 4) block(2)) | sink(1)", lambda q, k: g(q, k) or k < 1, 8)
    check(
        "causal & on grid(2, 4) window((0, 1))",
        lambda q, k: k <= q and q // 4 == k // 4 and abs(q % 4 - k % 4) <= 1,
        8,
    )


def test_grid_sizes_bound_at_call_time():
    pred = grid_pred((3, 4), lambda a, qa, ka: abs(qa - ka) <= 1)
    assert_mask(mask_of("window(1) on grid(h, w)", 12, h=3, w=4)[0], dense(12, 12, pred))
    assert_mask(mask_of("window(1) on grid(h, w)", 12, h=3)[0], dense(12, 12, pred))  # w inferred
    assert_mask(mask_of("window(1) on grid(h, w)", 12, w=4)[0], dense(12, 12, pred))  # h inferred


def test_grid_fewer_queries():
    # grid 3 x 4 of keys; lq = 4 queries = the last row (positions 8..11)
    pred = grid_pred((3, 4), lambda a, qa, ka: abs(qa - ka) <= 1)
    check("window(1) on grid(3, 4)", pred, 4, 12)
    check("window(1) on grid(3, 4)", pred, 4, 12, q_offset=4)


# ---------------------------------------------------------------- lq != lk


def test_q_offset_default_and_explicit():
    m = mask_of("causal", 3, 6)[0]
    assert_mask(m, from_rows(["####..", "#####.", "######"]))
    m = mask_of("causal", 3, 6, q_offset=0)[0]
    assert_mask(m, from_rows(["#.....", "##....", "###..."]))
    check("window(1, 0)", lambda q, k: -1 <= k - q <= 0, 3, 7, q_offset=2)
    check("window(1)", lambda q, k: abs(k - q) <= 1, 2, 5)
    # more queries than keys: q_offset = lk - lq < 0
    check("causal", lambda q, k: k <= q, 5, 3)
    check("block(2) | sink(1)", lambda q, k: q // 2 == k // 2 or k < 1, 4, 8, q_offset=1)


# ---------------------------------------------------------------- heads


def per_head_expected(heads, lq, lk, pred):
    return torch.stack([dense(lq, lk, lambda q, k, h=h: pred(h, q, k)) for h in range(heads)])


def test_heads_block_and_head_name():
    spec = "heads { 0 .. 2: causal; 2 .. 4: window(head) }"
    m = mask_of(spec, 6, heads=4)
    expected = per_head_expected(4, 6, 6, lambda h, q, k: k <= q if h < 2 else abs(k - q) <= h)
    assert_mask(m, expected)


def test_head_in_position_set():
    m = mask_of("keys(% 4 == head)", 2, 8, heads=4)
    assert_mask(m, per_head_expected(4, 2, 8, lambda h, q, k: k % 4 == h))
    m = mask_of("causal(head - heads + 1)", 4, heads=3)
    assert_mask(m, per_head_expected(3, 4, 4, lambda h, q, k: k <= q + h - 2))


def test_s2_attention_pattern():
    # The s2 example of docs/language.md §12 versus S2-Attention's definition (Lin et al. 2024,
    # linxihui/dkernel), re-implemented here with step = 1, off = 0:
    # j <= i and (qb - kb < L or (kb + h) mod S = 0)
    text = """
    pattern s2(b = 64, local = 16, s = 8) =
        causal & on blocks(b) (window(local - 1, 0) | keys(% s == (s - head % s) % s))
    """
    blk, n_local, vstride, heads, n = 2, 2, 4, 4, 32
    m = maskc.compile(text, b=blk, local=n_local, s=vstride).mask(n, heads=heads)

    def pred(h, i, j):
        qb, kb = i // blk, j // blk
        return j <= i and (qb - kb < n_local or (kb + h) % vstride == 0)

    assert_mask(m, per_head_expected(heads, n, n, pred))
    # heads together cover every causal block (heterogeneous sharding)
    assert torch.equal(m.any(0), dense(n, n, lambda q, k: k <= q))


# ---------------------------------------------------------------- user-defined and library patterns


def test_user_patterns_keyword_positional_defaults():
    text = """
    pattern loc(w = 2, r = 0) = window(w, r)
    pattern main(a = 1) = loc(3) | loc(r = a, w = 0) | loc()
    """
    m = maskc.compile(text, pattern="main").mask(8)[0]
    assert_mask(m, dense(8, 8, lambda q, k: -3 <= k - q <= 0 or 0 <= k - q <= 1 or -2 <= k - q <= 0))
    m = maskc.compile(text, pattern="main", a=3).mask(8)[0]
    assert_mask(m, dense(8, 8, lambda q, k: -3 <= k - q <= 3))


def test_user_pattern_on_grid_called():
    text = """
    pattern tile(t = 2) on grid(h, w) = block((t, t))
    pattern main() on grid(h, w) = tile(2) | window(0)
    """
    sizes = (4, 4)
    pred = grid_pred(sizes, lambda a, qa, ka: qa // 2 == ka // 2)
    m = maskc.compile(text, pattern="main").mask(16, h=4, w=4)[0]
    assert_mask(m, dense(16, 16, pred))


def test_bare_expression_calls_user_pattern():
    text = """
    pattern band(n = 1) = window(n, 0)
    band(2) & ~keys(0)
    """
    check_m = maskc.compile(text).mask(6)[0]
    assert_mask(check_m, dense(6, 6, lambda q, k: -2 <= k - q <= 0 and k != 0))


def test_library_mistral():
    m = maskc.compile("mistral", w=4).mask(10)[0]
    assert_mask(m, dense(10, 10, lambda q, k: q - 4 < k <= q))  # w keys, the query included
    check("mistral(w = 2) | sink(1)", lambda q, k: q - 2 < k <= q or k < 1, 7)


def test_library_natten2d():
    sizes = (5, 6)
    m = maskc.compile("natten2d", k=3).mask(30, h=5, w=6)[0]
    pred = grid_pred(sizes, lambda a, qa, ka: natten_axis(qa, ka, sizes[a], 3))
    assert_mask(m, dense(30, 30, pred))
    m = maskc.compile("natten2d", k=3, d=2).mask(36, h=6, w=6)[0]
    pred = grid_pred((6, 6), lambda a, qa, ka: natten_axis(qa, ka, 6, 3, d=2))
    assert_mask(m, dense(36, 36, pred))


def test_library_longformer_and_streaming():
    m = maskc.compile("longformer", w=1, g=2).mask(8)[0]
    assert_mask(m, dense(8, 8, lambda i, j: abs(i - j) <= 1 or i < 2 or j < 2))
    # StreamingLLM (Xiao et al. 2023), its definition re-implemented: causal and (j < n_sink or i - j < w)
    m = maskc.compile("streaming", sinks=2, w=3).mask(9)[0]
    assert_mask(m, dense(9, 9, lambda i, j: j <= i and (j < 2 or i - j < 3)))


# ---------------------------------------------------------------- integer expressions


def test_integer_expressions():
    check("window(max(1, 3 // 2), abs(0 - 2))", lambda q, k: -1 <= k - q <= 2, 7)
    check("window(min(4, 2 * 3 - 5), 1 + 2 % 2)", lambda q, k: -1 <= k - q <= 1, 7)
    # // and % follow Python (floor) semantics on negative numbers
    check("causal(-7 // 2)", lambda q, k: k <= q - 4, 8)
    check("keys(% 4 == -1 % 4)", lambda q, k: k % 4 == 3, 2, 9)
    # lq, lk name the lengths
    check("keys(lk - 2 .. lk) | queries(lk - lq .. lk - lq + lq // 2)", lambda q, k: k >= 7 or q == 6, 3, 9)


def test_comparison_in_bool_argument():
    m = mask_of("neighborhood(3, causal = head > 0)", 6, heads=2)
    assert_mask(m[0], dense(6, 6, lambda q, k: natten_axis(q, k, 6, 3)))
    assert_mask(m[1], dense(6, 6, lambda q, k: natten_axis(q, k, 6, 3, causal=True)))


def test_global_with_modulo_set():
    check("global(% 4 == 0)", lambda q, k: q % 4 == 0 or k % 4 == 0, 9)


def test_route_partial_last_region():
    # lk = 7, block = 3: regions {0,1,2}, {3,4,5}, {6}; the pooled key is a mean,
    # so the one-token region is not under-weighted (a sum would pick region 0).
    length = 7
    prefs = [[1.0, 0.5, 2.0], [0.0, 1.0, 0.5], [3.0, 0.0, 1.0]]
    q = torch.zeros(1, 1, length, 3, dtype=torch.float64)
    k = torch.zeros(1, 1, length, 3, dtype=torch.float64)
    spread = [torch.tensor([1.0, -2.0, 1.0]), torch.tensor([-1.0, 2.0, -1.0]), torch.zeros(3)]
    for p in range(length):
        r = p // 3
        q[0, 0, p] = torch.tensor(prefs[r]) + (spread[p % 3] if r < 2 else 0)
        k[0, 0, p, r] = 1.0
        if r < 2:
            k[0, 0, p] += 0.5 * spread[p % 3].double()
    m = unbatched(mask_of("route(topk = 1, block = 3)", length, q=q, k=k))[0]
    top1 = {0: 2, 1: 1, 2: 0}
    assert_mask(m, dense(length, length, lambda a, b: b // 3 == top1[a // 3]))
