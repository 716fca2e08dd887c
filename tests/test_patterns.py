"""The pattern library (`patterns/*.mask`) against independent definitions.

Every expectation here is an independent re-implementation of the definition in
the pattern's paper or public code (the code where they differ) with plain Python loops or
numpy, never through the language or maskc's evaluator.  Data-dependent patterns
are checked against direct implementations of their definitions on small
hand-made tensors (PPMA's logits through `Program.reference`).  BigBird's random
blocks come from a re-implementation of the generator documented in
dsl/random_blocks.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from maskc.dsl.random_blocks import draw
from maskc.dsl.values import Env, evaluate

import maskc
from maskc import patterns
from maskc.cli import main as cli_main

# ---------------------------------------------------------------- helpers


def lib_mask(name: str, lq: int, lk: int | None = None, *, heads: int = 1, params=None, **bindings) -> np.ndarray:
    """The library pattern's dense mask as numpy bool: [heads, lq, lk] or [batch, heads, lq, lk]."""
    program = maskc.compile(name, **(params or {}))
    return program.mask(lq, lk, heads=heads, **bindings).numpy()


def expect(lq: int, lk: int | None, pred, heads: int = 1) -> np.ndarray:
    """bool [heads, lq, lk] from pred(head, i, j) on absolute positions (queries
    aligned to the end of the keys, as FlashAttention does)."""
    lk = lq if lk is None else lk
    off = lk - lq
    out = np.zeros((heads, lq, lk), dtype=bool)
    for h in range(heads):
        for a in range(lq):
            i = a + off
            for j in range(lk):
                out[h, a, j] = bool(pred(h, i, j))
    return out


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if not np.array_equal(actual, expected):
        diff = np.argwhere(actual != expected)
        pytest.fail(f"masks differ at {len(diff)} places, first {diff[:6].tolist()}")


def rowmajor(p: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s in reversed(sizes):
        out.append(p % s)
        p //= s
    return tuple(reversed(out))


def on_grid(sizes: tuple[int, ...], axis_ok):
    """pred(h, i, j) = AND over axes of axis_ok(axis, qa, ka) on row-major coordinates."""

    def pred(h, i, j):
        ci, cj = rowmajor(i, sizes), rowmajor(j, sizes)
        return all(axis_ok(a, ci[a], cj[a]) for a in range(len(sizes)))

    return pred


# ---------------------------------------------------------------- the library itself

REQUIRED = {
    "mistral",
    "sliding_window",
    "streaming",
    "longformer",
    "longformer_dilated",
    "prefix_lm",
    "bigbird",
    "sparse_strided",
    "sparse_fixed",
    "s2_attention",
    "natten1d",
    "natten2d",
    "natten3d",
    "sta2d",
    "sta3d",
    "swin",
    "swin_shifted",
    "maxvit_block",
    "maxvit_grid",
    "criss_cross",
    "documents",
    "documents_causal",
    "block_diffusion",
    "bd3lm_train",
    "radial",
    "biformer",
    "moba",
    "routing",
    "routing_causal",
    "ppma",
    "ppma_transposed",
    "ppma_row",
    "ppma_column",
    "xattention",
    "quest",
    "seer",
    "sparge",
}


def test_maskc_patterns_lists_the_whole_library(capsys):
    assert set(patterns.names()) >= REQUIRED
    assert cli_main(["patterns"]) == 0
    listed = {line.split("(")[0] for line in capsys.readouterr().out.splitlines()}
    assert set(patterns.names()) <= listed


@pytest.mark.parametrize("name", sorted(REQUIRED | set(patterns.names())))
def test_every_pattern_is_documented_and_instantiates_at_its_example(name):
    entry = patterns.entries()[name]
    assert len(entry.doc.splitlines()) >= 3, entry.doc  # source, meaning, parameters
    example = dict(entry.example)
    assert "lq" in example, f"{name} has no '# example:' line"
    lq = example.pop("lq")
    program = maskc.compile(name)
    instance = program.instantiate(lq, heads=2, **example)
    assert instance.patterns


# ---------------------------------------------------------------- local 1-D


@pytest.mark.parametrize(("lq", "lk", "w"), [(37, 37, 5), (1, 1, 3), (10, 37, 4), (20, 20, 40), (9, 9, 1), (6, 6, 0)])
def test_mistral(lq, lk, w):
    # Mistral 7B as in Hugging Face's `sliding_window = w`: w keys, the query included.
    assert_same(lib_mask("mistral", lq, lk, params={"w": w}), expect(lq, lk, lambda h, i, j: i - w < j <= i))


@pytest.mark.parametrize(("n", "w"), [(33, 4), (9, 0), (12, 20)])
def test_sliding_window(n, w):
    assert_same(lib_mask("sliding_window", n, params={"w": w}), expect(n, n, lambda h, i, j: abs(i - j) <= w))


@pytest.mark.parametrize(("n", "w", "g"), [(40, 3, 2), (17, 1, 0), (25, 30, 1)])
def test_longformer(n, w, g):
    pred = lambda h, i, j: abs(i - j) <= w or i < g or j < g  # noqa: E731
    assert_same(lib_mask("longformer", n, params={"w": w, "g": g}), expect(n, n, pred))


@pytest.mark.parametrize(("n", "w", "d", "g"), [(41, 3, 2, 0), (30, 2, 3, 2), (13, 5, 4, 1)])
def test_longformer_dilated(n, w, d, g):
    def pred(h, i, j):
        keys = {i + d * m for m in range(-w, w + 1) if 0 <= i + d * m < n}
        return j in keys or i < g or j < g

    assert_same(lib_mask("longformer_dilated", n, params={"w": w, "d": d, "g": g}), expect(n, n, pred))


@pytest.mark.parametrize(("lq", "lk", "sinks", "w"), [(40, 40, 4, 8), (5, 40, 2, 3), (12, 12, 0, 1), (9, 9, 20, 2)])
def test_streaming(lq, lk, sinks, w):
    pred = lambda h, i, j: j <= i and (j < sinks or i - j < w)  # noqa: E731
    assert_same(lib_mask("streaming", lq, lk, params={"sinks": sinks, "w": w}), expect(lq, lk, pred))


@pytest.mark.parametrize(("lq", "lk", "n"), [(30, 30, 7), (6, 30, 10), (8, 8, 0)])
def test_prefix_lm(lq, lk, n):
    assert_same(lib_mask("prefix_lm", lq, lk, params={"n": n}), expect(lq, lk, lambda h, i, j: j <= i or j < n))


# ---------------------------------------------------------------- strided 1-D


@pytest.mark.parametrize(("n", "l"), [(50, 7), (16, 4), (9, 1)])
def test_sparse_strided(n, l):
    pred = lambda h, i, j: j <= i and (i - j < l or (i - j) % l == 0)  # noqa: E731
    assert_same(lib_mask("sparse_strided", n, params={"l": l}), expect(n, n, pred))


@pytest.mark.parametrize(("n", "l", "c", "nv", "heads"), [(50, 8, 2, 1, 1), (45, 8, 2, 3, 4), (30, 6, 3, 2, 3)])
def test_sparse_fixed(n, l, c, nv, heads):
    def pred(h, i, j):
        g = h % nv
        return j <= i and (j // l == i // l or l - (g + 1) * c <= j % l < l - g * c)

    got = lib_mask("sparse_fixed", n, heads=heads, params={"l": l, "c": c, "num_verts": nv})
    assert_same(got, expect(n, n, pred, heads))


def s2_pred(b, local, stride, heads, kv_heads=None, dense=0, off=0, homo=False):
    """S2-Attention (Lin et al. 2024) as in linxihui/dkernel `get_sparse_attn_mask`, re-implemented."""
    kv_heads = kv_heads or heads
    step = max(1, int(stride / heads))

    def pred(h, i, j):
        kv = h // (heads // kv_heads)
        if j > i:
            return False
        if kv >= kv_heads - dense:
            return True
        hh = 0 if homo else kv
        qb, kb = i // b, j // b
        return qb - kb < local or (kb + hh * step + off) % stride == 0

    return pred


@pytest.mark.parametrize(
    ("n", "lq", "params", "heads"),
    [
        (70, 70, {"b": 4, "local": 2, "stride": 4}, 4),
        (70, 70, {"b": 4, "local": 2, "stride": 8}, 2),
        (66, 66, {"b": 3, "local": 1, "stride": 3, "kv_heads": 2, "dense": 1}, 4),
        (64, 64, {"b": 4, "local": 3, "stride": 5, "off": 1}, 3),
        (64, 64, {"b": 4, "local": 2, "stride": 4, "homo": 1}, 4),
        (64, 10, {"b": 4, "local": 2, "stride": 4}, 2),
    ],
)
def test_s2_attention(n, lq, params, heads):
    kw = {"kv_heads": params.get("kv_heads"), "dense": params.get("dense", 0), "off": params.get("off", 0)}
    pred = s2_pred(params["b"], params["local"], params["stride"], heads, homo=bool(params.get("homo")), **kw)
    assert_same(lib_mask("s2_attention", lq, n, heads=heads, params=params), expect(lq, n, pred, heads))


def test_s2_heads_cover_every_block():
    m = lib_mask("s2_attention", 256, heads=8, params={"b": 4, "local": 1, "stride": 8})
    assert m.any(0)[-1].all()  # the last query sees every key through some head


# ---------------------------------------------------------------- BigBird

M32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32, as documented in dsl/random_blocks.py."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def uniform(seed: int, head: int, qb: int, j: int) -> int:
    return lowbias32(lowbias32(lowbias32(lowbias32(seed & M32) ^ (head & M32)) ^ (qb & M32)) ^ (j & M32))


def random_blocks(qb: int, r: int, seed: int, head: int, lo: int, hi: int, skip: int) -> set[int]:
    """Floyd's sampling of r of the eligible blocks (dsl/random_blocks.py docstring)."""
    eligible = [kb for kb in range(lo, hi) if abs(kb - qb) >= skip]
    n = len(eligible)
    if r >= n:
        return set(eligible)
    chosen: set[int] = set()
    for j in range(n - r, n):
        t = uniform(seed, head, qb, j) % (j + 1)
        chosen.add(j if t in chosen else t)
    return {eligible[t] for t in chosen}


def bigbird_pred(n, b, r, seed):
    nb = -(-n // b)
    rand = {}

    def pred(h, i, j):
        qb, kb = i // b, j // b
        if qb in (0, nb - 1) or kb in (0, nb - 1) or abs(qb - kb) <= 1:
            return True
        if (h, qb) not in rand:
            rand[h, qb] = random_blocks(qb, r, seed, h, 1, nb - 1, 2)
        return kb in rand[h, qb]

    return pred


@pytest.mark.parametrize(
    ("r", "seed", "head", "lo", "hi", "skip"), [(3, 0, 0, 1, 11, 2), (2, 99, 3, 0, 40, 0), (5, 7, 1, 2, 9, 1)]
)
def test_random_blocks_reimplementation_agrees_with_the_generator(r, seed, head, lo, hi, skip):
    # The docstring's algorithm, written out above, against dsl/random_blocks.py itself.
    qb = torch.arange(hi + 2)
    drawn = draw(qb, r, seed, head, lo, hi, skip)
    for row, block in zip(drawn.tolist(), qb.tolist(), strict=True):
        want = random_blocks(block, r, seed, head, lo, hi, skip)
        assert {kb for kb in row if kb >= 0} == want
        assert len(want) == min(r, len([kb for kb in range(lo, hi) if abs(kb - block) >= skip]))


@pytest.mark.parametrize(
    ("n", "b", "r", "seed", "heads"), [(64, 4, 2, 0, 2), (45, 4, 3, 7, 3), (40, 5, 1, 123, 1), (24, 4, 9, 1, 2)]
)
def test_bigbird(n, b, r, seed, heads):
    got = lib_mask("bigbird", n, heads=heads, params={"b": b, "r": r, "seed": seed})
    assert_same(got, expect(n, n, bigbird_pred(n, b, r, seed), heads))
    if heads > 1 and r < n // b - 5:  # every head draws its own blocks
        assert not np.array_equal(got[0], got[1])


# ---------------------------------------------------------------- NATTEN and STA


def natten_keys(c: int, length: int, w: int, d: int = 1, s: int = 1, causal: bool = False) -> set[int]:
    """Key coordinates of query coordinate c on one axis (NATTEN, Hassani et al., and
    docs/language.md §8.1): a window of exactly w keys in the query's dilation group,
    shifted inside the group at the borders, stride groups sharing their
    leader's window, causal windows truncated on the left."""
    group = c % d
    members = list(range(group, length, d))  # the dilation group, in order
    lg = len(members)
    gc = c // d
    if causal:
        leader = min((gc // s) * s + s - 1, lg - 1)
        lo, hi = max(leader - w + 1, 0), min(gc + 1, lg)
    else:
        leader = min((gc // s) * s + s // 2, lg - 1)
        left = w // 2  # even windows have the extra key on the left
        lo = min(max(leader - left, 0), lg - w)  # shift, do not truncate
        hi = lo + w
    return set(members[lo:hi])


def natten_pred(sizes, ks, ds, ss, cs):
    tables = []
    for length, w, d, s, c in zip(sizes, ks, ds, ss, cs, strict=True):
        tables.append([natten_keys(q, length, w, d, s, c) for q in range(length)])
    return on_grid(sizes, lambda a, qa, ka: ka in tables[a][qa])


def test_natten_reimplementation_matches_design_example():
    assert natten_keys(0, 10, 3) == {0, 1, 2}
    assert natten_keys(9, 10, 3) == {7, 8, 9}


@pytest.mark.parametrize(
    ("n", "params"),
    [
        (23, {"k": 5}),
        (23, {"k": 4, "d": 2}),
        (30, {"k": 5, "d": 3, "s": 2}),
        (17, {"k": 6, "s": 6}),
        (19, {"k": 5, "causal": True}),
        (26, {"k": 4, "d": 2, "s": 3, "causal": True}),
    ],
)
def test_natten1d(n, params):
    k, d, s, c = params["k"], params.get("d", 1), params.get("s", 1), params.get("causal", False)
    assert_same(lib_mask("natten1d", n, params=params), expect(n, n, natten_pred((n,), (k,), (d,), (s,), (c,))))


@pytest.mark.parametrize(
    ("h", "w", "params"),
    [
        (5, 6, {"k": 3}),
        (7, 9, {"k": 3, "d": 2}),
        (8, 9, {"kh": 3, "kw": 5, "dh": 2, "sw": 2}),
        (7, 8, {"k": 4, "s": 2, "ch": True}),
        (6, 10, {"kh": 2, "kw": 3, "dw": 3, "causal": True}),
    ],
)
def test_natten2d(h, w, params):
    k, d, s, c = params.get("k", 7), params.get("d", 1), params.get("s", 1), params.get("causal", False)
    ks = (params.get("kh", k), params.get("kw", k))
    ds = (params.get("dh", d), params.get("dw", d))
    ss = (params.get("sh", s), params.get("sw", s))
    cs = (params.get("ch", c), params.get("cw", c))
    got = lib_mask("natten2d", h * w, params=params, h=h, w=w)
    assert_same(got, expect(h * w, None, natten_pred((h, w), ks, ds, ss, cs)))


@pytest.mark.parametrize(
    ("t", "h", "w", "params"),
    [
        (4, 5, 6, {"k": 3}),
        (5, 4, 7, {"kt": 2, "kh": 3, "kw": 5, "dw": 1, "ct": True}),
        (6, 5, 5, {"k": 3, "dt": 2, "sh": 2, "sw": 3}),
    ],
)
def test_natten3d(t, h, w, params):
    k, d, s, c = params.get("k", 7), params.get("d", 1), params.get("s", 1), params.get("causal", False)
    ks = tuple(params.get(n, k) for n in ("kt", "kh", "kw"))
    ds = tuple(params.get(n, d) for n in ("dt", "dh", "dw"))
    ss = tuple(params.get(n, s) for n in ("st", "sh", "sw"))
    cs = tuple(params.get(n, c) for n in ("ct", "ch", "cw"))
    got = lib_mask("natten3d", t * h * w, params=params, t=t, h=h, w=w)
    assert_same(got, expect(t * h * w, None, natten_pred((t, h, w), ks, ds, ss, cs)))


def sta_pred(canvas, kernel, tile):
    """attn-gym `generate_sta_mask_mod_3d` (and _2d) without text tokens."""
    tiles = [c // t for c, t in zip(canvas, tile, strict=True)]
    ktiles = [k // t for k, t in zip(kernel, tile, strict=True)]
    numel = math.prod(tile)

    def tile_coords(idx):
        return rowmajor(idx // numel, tuple(tiles))

    def pred(h, i, j):
        qt, kt = tile_coords(i), tile_coords(j)
        for a in range(len(canvas)):
            left = ktiles[a] // 2
            right = ktiles[a] // 2 + (ktiles[a] % 2 - 1)
            centre = min(max(qt[a], left), tiles[a] - 1 - right)
            if not centre - left <= kt[a] <= centre + right:
                return False
        return True

    return pred


@pytest.mark.parametrize(
    ("h", "w", "params"),
    [
        (8, 8, {"kh": 6, "kw": 6, "th": 2, "tw": 2}),
        (12, 8, {"kh": 6, "kw": 4, "th": 3, "tw": 2}),
        (8, 12, {"kh": 4, "kw": 6, "th": 2, "tw": 3}),  # even window in tiles
    ],
)
def test_sta2d(h, w, params):
    kernel, tile = (params["kh"], params["kw"]), (params["th"], params["tw"])
    got = lib_mask("sta2d", h * w, params=params, h=h, w=w)
    assert_same(got, expect(h * w, None, sta_pred((h, w), kernel, tile)))


@pytest.mark.parametrize(
    ("t", "h", "w", "params"),
    [
        (4, 6, 6, {"kt": 2, "kh": 6, "kw": 4, "tt": 1, "th": 2, "tw": 2}),
        (6, 4, 4, {"kt": 6, "kh": 4, "kw": 4, "tt": 2, "th": 2, "tw": 2}),
    ],
)
def test_sta3d(t, h, w, params):
    kernel = (params["kt"], params["kh"], params["kw"])
    tile = (params["tt"], params["th"], params["tw"])
    got = lib_mask("sta3d", t * h * w, params=params, t=t, h=h, w=w)
    assert_same(got, expect(t * h * w, None, sta_pred((t, h, w), kernel, tile)))


# ---------------------------------------------------------------- windows on images


@pytest.mark.parametrize(("name", "h", "w", "p"), [("swin", 8, 12, 4), ("swin", 7, 10, 3), ("maxvit_block", 6, 9, 3)])
def test_block_windows(name, h, w, p):
    pred = on_grid((h, w), lambda a, qa, ka: qa // p == ka // p)
    assert_same(lib_mask(name, h * w, params={"p": p}, h=h, w=w), expect(h * w, None, pred))


def swin_shifted_pred(h, w, p, s):
    """microsoft/Swin-Transformer SW-MSA: roll by (-s, -s), region labels from the
    slices (0, -p), (-p, -s), (-s, None), same window and same label."""

    def region(c, length):
        if c < length - p:
            return 0
        return 1 if c < length - s else 2

    def key(y, x):
        ys, xs = (y - s) % h, (x - s) % w  # position in the rolled image
        return ys // p, xs // p, region(ys, h) * 3 + region(xs, w)

    def pred(head, i, j):
        return key(*rowmajor(i, (h, w))) == key(*rowmajor(j, (h, w)))

    return pred


@pytest.mark.parametrize(("h", "w", "p", "s"), [(8, 8, 4, 2), (9, 12, 3, 1), (12, 8, 4, 3), (6, 6, 3, 0), (4, 4, 4, 2)])
def test_swin_shifted(h, w, p, s):
    got = lib_mask("swin_shifted", h * w, params={"p": p, "s": s}, h=h, w=w)
    assert_same(got, expect(h * w, None, swin_shifted_pred(h, w, p, s)))


@pytest.mark.parametrize(("h", "w", "g"), [(8, 8, 2), (9, 12, 3), (6, 10, 2)])
def test_maxvit_grid(h, w, g):
    # MaxViT's grid_partition: reshape (g, h // g) per axis, group by the inner index
    pred = on_grid((h, w), lambda a, qa, ka: qa % ((h, w)[a] // g) == ka % ((h, w)[a] // g))
    assert_same(lib_mask("maxvit_grid", h * w, params={"g": g}, h=h, w=w), expect(h * w, None, pred))


@pytest.mark.parametrize(("h", "w"), [(5, 7), (1, 6), (6, 6)])
def test_criss_cross(h, w):
    def pred(head, i, j):
        (y1, x1), (y2, x2) = rowmajor(i, (h, w)), rowmajor(j, (h, w))
        return y1 == y2 or x1 == x2

    assert_same(lib_mask("criss_cross", h * w, h=h, w=w), expect(h * w, None, pred))


# ---------------------------------------------------------------- diffusion


@pytest.mark.parametrize(("lq", "lk", "d"), [(30, 30, 4), (7, 30, 4), (13, 13, 1), (10, 10, 16)])
def test_block_diffusion(lq, lk, d):
    assert_same(lib_mask("block_diffusion", lq, lk, params={"d": d}), expect(lq, lk, lambda h, i, j: i // d >= j // d))


def bd3lm_pred(n, d):
    """kuleshov-group/bd3lms `block_diff_mask` over [x_t ; x_0]."""

    def pred(h, i, j):
        x0_q, x0_k = i >= n, j >= n
        bq, bk = (i - n if x0_q else i) // d, (j - n if x0_k else j) // d
        diagonal = bq == bk and x0_q == x0_k
        offset_causal = bq > bk and x0_k and not x0_q
        causal = bq >= bk and x0_k and x0_q
        return diagonal or offset_causal or causal

    return pred


@pytest.mark.parametrize(("n", "d"), [(16, 4), (12, 3), (10, 4), (8, 1)])
def test_bd3lm_train(n, d):
    assert_same(lib_mask("bd3lm_train", 2 * n, params={"d": d}), expect(2 * n, None, bd3lm_pred(n, d)))
    assert_same(lib_mask("bd3lm_train", 2 * n, params={"d": d}, n=n), expect(2 * n, None, bd3lm_pred(n, d)))


# ---------------------------------------------------------------- radial attention


def radial_expect(t, f, qpos, decay=1.0, block=128, wan=False) -> np.ndarray:
    """mit-han-lab/radial-attention `attn_mask.py` at token level: `get_window_width`
    and `get_diagonal_split_mask` per frame pair (model_type "hunyuan" or "wan"),
    for the query positions `qpos` against all t * f keys: bool [len(qpos), t * f]."""

    def window_width(dist):
        if wan:
            if dist < 1:
                return f
            if dist == 1:
                return f // 2
        elif dist <= 1:
            return f
        group = dist.bit_length()
        decay_length = 2 ** f.bit_length() / 2**group * decay
        return decay_length if decay_length >= block else block

    def split_keeps(dist):
        group = dist.bit_length()
        decay_length = 2 ** f.bit_length() / 2**group
        if decay_length >= 128:
            return True
        return dist % int(128 / decay_length) == 0

    width = np.array([window_width(d) for d in range(t)], dtype=np.float64)
    keep = np.array([split_keeps(d) for d in range(t)])
    a, r = np.divmod(np.asarray(qpos)[:, None], f)
    b, c = np.divmod(np.arange(t * f)[None, :], f)
    dist = np.abs(a - b)
    out = (np.abs(c - r) <= width[dist]) & keep[dist]
    if wan:  # attention sink: key frame 0
        out |= b == 0
    return out


@pytest.mark.parametrize(
    ("t", "f", "params", "rows"),
    [
        (34, 8, {"b": 2}, None),  # p = 16: every frame pair but the diagonal dropped
        (20, 12, {"b": 1, "decay_num": 1, "decay_den": 2, "wan": 1}, None),
        (5, 130, {"b": 16}, (3 * 130, 5 * 130)),  # p = 256: distances 0, 1, 2, 4 kept
        (3, 200, {"b": 32, "decay_num": 3, "decay_den": 4, "wan": 1}, (350, 600)),
        (40, 128, {"b": 8}, (39 * 128, 40 * 128)),  # the last frame's queries: distances up to 39
        (40, 128, {"b": 8, "wan": 1}, (0, 128)),  # the first frame's queries
        (36, 256, {"b": 4, "decay_num": 1, "decay_den": 2}, (20 * 256 + 100, 20 * 256 + 132)),
        (80, 1024, {"b": 4}, (79 * 1024 + 500, 79 * 1024 + 502)),  # p = 2048, distances up to 79
        (600, 1024, {"b": 1}, (599 * 1024 + 500, 599 * 1024 + 501)),  # distances up to 599: every term
        (21, 1560, {"b": 128, "wan": 1}, (10 * 1560 + 700, 10 * 1560 + 704)),  # Wan 2.1 480p, 81 frames
    ],
)
def test_radial(t, f, params, rows):
    lk = t * f
    first, last = (0, lk) if rows is None else rows
    got = lib_mask("radial", last - first, lk, params=params, f=f, q_offset=first)[0]
    decay = params.get("decay_num", 1) / params.get("decay_den", 1)
    want = radial_expect(t, f, range(first, last), decay=decay, block=params["b"], wan=bool(params.get("wan")))
    assert_same(got, want)


@pytest.mark.parametrize("f", [1, 2, 3, 7, 8, 9, 100, 1560, 2**20 - 1, 2**20, 2**24 - 1])
def test_radial_power_of_two_is_two_to_the_bit_length(f):
    # radial's parameter p (a default computed from f with integer arithmetic)
    definition = patterns.lookup("radial").node
    default = next(p.default for p in definition.params if p.name == "p")
    assert evaluate(default, Env({"f": f})) == 2 ** f.bit_length()


# ---------------------------------------------------------------- packed documents


def test_documents():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7, 9]])
    n = ids.shape[1]
    rows = ids.tolist()
    for name, causal in (("documents", False), ("documents_causal", True)):
        got = lib_mask(name, n, heads=2, ids=ids)
        assert got.shape == (2, 2, n, n)
        for b in range(2):

            def pred(h, i, j, r=rows[b], causal=causal):
                return r[i] == r[j] and (j <= i or not causal)

            assert_same(got[b], expect(n, n, pred, heads=2))


# ---------------------------------------------------------------- content-dependent


def region_topk(pooled_q, pooled_k, topk, forced=None, allowed=None):
    """Top-k key regions per query region by score, ties to the lower index."""
    nq, nk = pooled_q.shape[0], pooled_k.shape[0]
    out = np.zeros((nq, nk), dtype=bool)
    for rq in range(nq):
        scored = []
        for rk in range(nk):
            if allowed is not None and not allowed(rq, rk):
                continue
            score = math.inf if forced is not None and forced(rq, rk) else float(pooled_q[rq] @ pooled_k[rk])
            scored.append((-score, rk))
        for _, rk in sorted(scored)[:topk]:
            out[rq, rk] = True
    return out


def test_biformer():
    h, w, s, heads, dim = 6, 8, 2, 2, 4
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, h * w, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(2, heads, h * w, dim, generator=gen, dtype=torch.float64)
    rh, rw = h // s, w // s
    region = [(y // rh) * s + x // rw for y in range(h) for x in range(w)]
    for topk in (1, 2, 4):
        got = lib_mask("biformer", h * w, heads=heads, params={"s": s, "topk": topk}, h=h, w=w, q=q, k=k)
        for b in range(2):
            # region means of q and k over all heads' dims together (full qk dim)
            qf = q[b].permute(1, 0, 2).reshape(h * w, heads * dim).numpy()
            kf = k[b].permute(1, 0, 2).reshape(h * w, heads * dim).numpy()
            pq = np.stack([qf[[t for t in range(h * w) if region[t] == r]].mean(0) for r in range(s * s)])
            pk = np.stack([kf[[t for t in range(h * w) if region[t] == r]].mean(0) for r in range(s * s)])
            sel = region_topk(pq, pk, topk)
            want = expect(h * w, None, lambda hh, i, j, sel=sel: sel[region[i], region[j]], heads)
            assert_same(got[b], want)


@pytest.mark.parametrize(("n", "b", "topk", "kv_heads"), [(40, 8, 2, 2), (43, 8, 3, 1), (24, 4, 1, 2)])
def test_moba(n, b, topk, kv_heads):
    heads, dim = 2, 5
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(1, heads, n, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, kv_heads, n, dim, generator=gen, dtype=torch.float64)
    got = lib_mask("moba", n, heads=heads, params={"b": b, "topk": topk}, q=q, k=k)[0]
    nb = -(-n // b)
    for h in range(heads):
        kh = k[0, h // (heads // kv_heads)].numpy()
        qh = q[0, h].numpy()
        # MoBA gates each query token: q_i . mean(K_block), its own block forced, no later block
        pk = np.stack([kh[r * b : (r + 1) * b].mean(0) for r in range(nb)])
        sel = region_topk(qh, pk, topk, forced=lambda i, rk: rk == i // b, allowed=lambda i, rk: rk <= i // b)
        want = expect(n, None, lambda hh, i, j, sel=sel: j <= i and sel[i, j // b])[0]
        assert_same(got[h], want)


def balanced_members(x: np.ndarray, centroids: np.ndarray, size: int) -> list[set[int]]:
    """Each centroid's `size` nearest tokens by cosine similarity (ties: lower position)."""
    xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
    cn = centroids / np.linalg.norm(centroids, axis=-1, keepdims=True)
    out = []
    for c in range(cn.shape[0]):
        sims = xn @ cn[c]
        order = sorted(range(len(sims)), key=lambda t: (-sims[t], t))
        out.append(set(order[:size]))
    return out


@pytest.mark.parametrize(("name", "causal"), [("routing", False), ("routing_causal", True)])
def test_routing_transformer(name, causal):
    n, heads, dim, clusters, size = 16, 2, 4, 3, 5
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, heads, n, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, heads, n, dim, generator=gen, dtype=torch.float64)
    centroids = torch.randn(heads, clusters, dim, generator=gen, dtype=torch.float64)
    got = lib_mask(name, n, heads=heads, params={"n": clusters, "w": size}, q=q, k=k, centroids=centroids)[0]
    for h in range(heads):
        mq = balanced_members(q[0, h].numpy(), centroids[h].numpy(), size)
        mk = balanced_members(k[0, h].numpy(), centroids[h].numpy(), size)

        def pred(hh, i, j, mq=mq, mk=mk):
            return any(i in a and j in b for a, b in zip(mq, mk, strict=True)) and (j <= i or not causal)

        assert_same(got[h], expect(n, None, pred)[0])
    assert not got.all(-1).any()  # balanced clusters leave most pairs out


# ---------------------------------------------------------------- PPMA


def segsum(values: np.ndarray, a: int, b: int) -> float:
    """Sum of values over the coordinates (min(a, b), max(a, b)]."""
    lo, hi = min(a, b), max(a, b)
    return float(values[lo + 1 : hi + 1].sum())


def segsums(values: np.ndarray) -> np.ndarray:
    """PPMA's `generate_structed_mask_1d` for one line: [a, b] -> segsum over (min, max]."""
    n = len(values)
    return np.array([[segsum(values, a, b) for b in range(n)] for a in range(n)])


def ppma_logits(alpha: np.ndarray, beta: np.ndarray, h: int, w: int) -> np.ndarray:
    """zhongchenzhao/PPMA `PathEmbeding2D` (full mode): M[(y1, x1), (y2, x2)] =
    segsum of alpha along row y1 + segsum of beta along column x2."""
    m = np.zeros((h * w, h * w))
    for i in range(h * w):
        y1, x1 = divmod(i, w)
        for j in range(h * w):
            y2, x2 = divmod(j, w)
            m[i, j] = segsum(alpha[y1], x1, x2) + segsum(beta[:, x2], y1, y2)
    return m


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ppma_inputs(h, w, heads=2, batch=2, dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, h * w, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    alpha = -torch.rand(batch, heads, h, w, generator=gen, dtype=torch.float64) * 2
    beta = -torch.rand(batch, heads, h, w, generator=gen, dtype=torch.float64) * 2
    return q, k, v, alpha, beta


@pytest.mark.parametrize(("h", "w"), [(3, 4), (4, 3)])
def test_ppma_single_paths_and_layer(h, w):
    q, k, v, alpha, beta = ppma_inputs(h, w)
    hv = maskc.compile("ppma").reference(q, k, v, alpha=alpha, beta=beta, h=h, w=w)
    vh = maskc.compile("ppma_transposed").reference(q, k, v, alpha=alpha, beta=beta, h=h, w=w)
    for b in range(q.shape[0]):
        for head in range(q.shape[1]):
            m = ppma_logits(alpha[b, head].numpy(), beta[b, head].numpy(), h, w)
            s = q[b, head].numpy() @ k[b, head].numpy().T / math.sqrt(q.shape[-1])
            vv = v[b, head].numpy()
            np.testing.assert_allclose(hv[b, head].numpy(), softmax(s + m) @ vv, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(vh[b, head].numpy(), softmax(s + m.T) @ vv, rtol=1e-10, atol=1e-12)
            # PPMA's MambaAttentionAllDouble: the mean of the two softmaxes
            layer = (0.5 * softmax(s + m) + 0.5 * softmax(s + m.T)) @ vv
            np.testing.assert_allclose(((hv + vh) / 2)[b, head].numpy(), layer, rtol=1e-10, atol=1e-12)


def test_ppma_chunk_mode_is_row_then_column_attention():
    h, w = 3, 5
    q, k, v, alpha, beta = ppma_inputs(h, w, seed=1)
    row, col = maskc.compile("ppma_row"), maskc.compile("ppma_column")

    def run(program, values):
        return program.reference(q, k, values, alpha=alpha, beta=beta, h=h, w=w)

    got = 0.5 * run(col, run(row, v)) + 0.5 * run(row, run(col, v))
    scale = 1 / math.sqrt(q.shape[-1])
    for b in range(q.shape[0]):
        for head in range(q.shape[1]):
            a, be = alpha[b, head].numpy(), beta[b, head].numpy()
            qq = q[b, head].numpy().reshape(h, w, -1)
            kk = k[b, head].numpy().reshape(h, w, -1)
            vv = v[b, head].numpy().reshape(h, w, -1)
            # PPMA's MambaAttentionChunkDouble: softmax along each row (+ segsum of
            # alpha), softmax along each column (+ segsum of beta), both orders.
            pw = np.stack([softmax(qq[y] @ kk[y].T * scale + segsums(a[y])) for y in range(h)])
            ph = np.stack([softmax(qq[:, x] @ kk[:, x].T * scale + segsums(be[:, x])) for x in range(w)])
            rows = np.einsum("yab,ybd->yad", pw, vv)  # (h, w, d)
            out1 = np.einsum("xab,bxd->axd", ph, rows)
            cols = np.einsum("xab,bxd->axd", ph, vv)
            out2 = np.einsum("yab,ybd->yad", pw, cols)
            want = (0.5 * out1 + 0.5 * out2).reshape(h * w, -1)
            np.testing.assert_allclose(got[b, head].numpy(), want, rtol=1e-10, atol=1e-12)
