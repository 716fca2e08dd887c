"""The public API: maskc.compile, Program.mask / reference, maskc.attention, and errors.

Expected values come from plain loops and hand-written masks, never from the
dense evaluator.
"""

from __future__ import annotations

import math

import pytest
import torch

import maskc


def dense(lq, lk, pred):
    off = lk - lq
    return torch.tensor([[bool(pred(i + off, j)) for j in range(lk)] for i in range(lq)])


def attention_loops(q, k, v, pred):
    """Masked softmax attention by loops; rows with no allowed key are 0."""
    nb, nh, lq, dim = q.shape
    lk = k.shape[2]
    group = nh // k.shape[1]
    out = torch.zeros(nb, nh, lq, v.shape[-1], dtype=torch.float64)
    for b in range(nb):
        for h in range(nh):
            for i in range(lq):
                keys = [j for j in range(lk) if pred(i + lk - lq, j)]
                if not keys:
                    continue
                logits = torch.stack([q[b, h, i] @ k[b, h // group, j] for j in keys]).double() / math.sqrt(dim)
                p = torch.softmax(logits, 0)
                out[b, h, i] = sum(p[n] * v[b, h // group, j].double() for n, j in enumerate(keys))
    return out


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


MULTI = """
# two patterns
pattern a() = causal
pattern b(w = 1, r = 0) = window(w, r)
"""


# ---------------------------------------------------------------- compile


def test_compile_from_text():
    prog = maskc.compile("causal & window(1, 0)")
    assert isinstance(prog, maskc.Program)
    assert torch.equal(prog.mask(4)[0], dense(4, 4, lambda q, k: q - 1 <= k <= q))


def test_compile_from_mask_file(tmp_path):
    path = tmp_path / "mine.mask"
    path.write_text("pattern local(w = 2) = causal & window(w, 0)\n")
    expected = dense(6, 6, lambda q, k: q - 2 <= k <= q)
    assert torch.equal(maskc.compile(str(path)).mask(6)[0], expected)
    assert torch.equal(maskc.compile(path).mask(6)[0], expected)  # os.PathLike
    assert torch.equal(maskc.compile(path, w=1).mask(6)[0], dense(6, 6, lambda q, k: q - 1 <= k <= q))


def test_compile_missing_file_is_mask_error(tmp_path):
    with pytest.raises(maskc.MaskError):
        maskc.compile(str(tmp_path / "nope.mask"))


def test_compile_library_name():
    prog = maskc.compile("mistral", w=2)
    assert prog.name == "mistral"
    assert torch.equal(prog.mask(5)[0], dense(5, 5, lambda q, k: q - 2 < k <= q))  # w keys, the query included
    assert prog.params == {"w": 2}


def test_pattern_selection(tmp_path):
    with pytest.raises(maskc.MaskError):
        maskc.compile(MULTI)  # several patterns and no choice
    assert torch.equal(maskc.compile(MULTI, pattern="a").mask(3)[0], dense(3, 3, lambda q, k: k <= q))
    assert torch.equal(maskc.compile(MULTI, pattern="b").mask(5)[0], dense(5, 5, lambda q, k: -1 <= k - q <= 0))
    assert torch.equal(
        maskc.compile(MULTI, pattern="b", w=2, r=1).mask(6)[0], dense(6, 6, lambda q, k: -2 <= k - q <= 1)
    )
    with pytest.raises(maskc.MaskError):
        maskc.compile(MULTI, pattern="c")
    path = tmp_path / "multi.mask"
    path.write_text(MULTI)
    assert torch.equal(maskc.compile(path, pattern="a").mask(3)[0], dense(3, 3, lambda q, k: k <= q))


def test_library_name_with_other_pattern_is_error():
    with pytest.raises(maskc.MaskError):
        maskc.compile("mistral", pattern="natten2d")


@pytest.mark.parametrize(
    ("spec", "params"),
    [
        ("mistral", {"x": 3}),  # unknown parameter
        ("causal", {"w": 3}),  # a bare expression has no parameters
        ("mistral", {"w": "wide"}),  # not a number
        ("mistral", {"w": 2.5}),  # not an integer
        ("pattern p(t: tensor) = all with alibi(t)", {"t": 1}),  # tensor parameters are passed at call time
        (MULTI, {"w": 1}),  # which pattern?
    ],
)
def test_bad_param_overrides(spec, params):
    with pytest.raises(maskc.MaskError):
        maskc.compile(spec, **params)


def test_syntax_and_type_errors_are_mask_errors():
    with pytest.raises(maskc.MaskSyntaxError) as e:
        maskc.compile("causal &")
    assert e.value.line == 1
    with pytest.raises(maskc.MaskTypeError) as e:
        maskc.compile("window(-1)")
    assert (e.value.line, e.value.column) == (1, 8)
    assert issubclass(maskc.MaskError, ValueError)
    with pytest.raises(maskc.MaskError):
        maskc.compile("nosuchatom(3)")
    with pytest.raises(maskc.MaskError):
        maskc.compile("")


# ---------------------------------------------------------------- Program.mask


def test_mask_shapes():
    prog = maskc.compile("causal")
    m = prog.mask(4)
    assert m.shape == (1, 4, 4) and m.dtype == torch.bool
    assert prog.mask(3, 5, heads=2).shape == (2, 3, 5)
    m = prog.mask(3, 5, heads=2, batch=3)
    assert m.shape == (3, 2, 3, 5)
    assert all(torch.equal(m[b, h], dense(3, 5, lambda q, k: k <= q)) for b in range(3) for h in range(2))


def test_mask_shape_with_segments():
    ids = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 2, 2]])
    m = maskc.compile("pattern p(ids: tensor) = segments(ids) & causal").mask(4, heads=2, ids=ids)
    assert m.shape == (3, 2, 4, 4)
    for b in range(3):
        assert torch.equal(m[b, 1], dense(4, 4, lambda q, k, b=b: ids[b, q] == ids[b, k] and k <= q))


def test_mask_shape_with_per_head_tables_is_not_batched():
    # a bias table [heads, 2r+1] and ALiBi slopes [heads] have no batch dim
    prog = maskc.compile("pattern p(t: tensor) = causal with bias(t)")
    assert prog.mask(4, heads=2, t=torch.zeros(2, 5)).shape == (2, 4, 4)
    q = k = v = randn(1, 2, 4, 8)
    assert prog.reference(q, k, v, t=torch.zeros(2, 5, dtype=torch.float64)).shape == (1, 2, 4, 8)


def test_grid_size_inferred_and_given():
    prog = maskc.compile("natten2d", k=3)
    full = prog.mask(12, h=3, w=4)
    assert torch.equal(prog.mask(12, h=3), full)
    assert torch.equal(prog.mask(12, w=4), full)


# ---------------------------------------------------------------- reference and attention


def test_reference_and_call():
    q, k, v = randn(2, 2, 5, 4, seed=1), randn(2, 2, 5, 4, seed=2), randn(2, 2, 5, 4, seed=3)
    prog = maskc.compile("causal | sink(1)")
    expected = attention_loops(q, k, v, lambda i, j: j <= i or j < 1)
    assert torch.allclose(prog.reference(q, k, v), expected, atol=1e-10)
    assert torch.allclose(prog(q, k, v), expected, atol=1e-10)


def test_attention_one_shot():
    q, k, v = randn(1, 2, 6, 4, seed=1), randn(1, 2, 6, 4, seed=2), randn(1, 2, 6, 4, seed=3)
    out = maskc.attention(q, k, v, "mistral", w=2)
    assert torch.allclose(out, attention_loops(q, k, v, lambda i, j: i - 2 < j <= i), atol=1e-10)
    out = maskc.attention(q, k, v, "causal & window(1, 0)")
    assert torch.allclose(out, attention_loops(q, k, v, lambda i, j: i - 1 <= j <= i), atol=1e-10)


def test_attention_param_named_k_and_grid_sizes():
    # natten2d's kernel-size parameter is called k, like the keys argument
    q, k, v = randn(1, 1, 16, 4, seed=1), randn(1, 1, 16, 4, seed=2), randn(1, 1, 16, 4, seed=3)
    out = maskc.attention(q, k, v, "natten2d", k=3, h=4, w=4)

    def natten(i, j):
        def axis(a, b):
            start = min(max(a - 1, 0), 4 - 3)
            return start <= b < start + 3

        return axis(i // 4, j // 4) and axis(i % 4, j % 4)

    assert torch.allclose(out, attention_loops(q, k, v, natten), atol=1e-10)


def test_attention_with_tensor_binding():
    q, k, v = randn(2, 1, 4, 4, seed=1), randn(2, 1, 4, 4, seed=2), randn(2, 1, 4, 4, seed=3)
    ids = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    out = maskc.attention(q, k, v, "pattern p(ids: tensor) = segments(ids)", ids=ids)
    for b in range(2):
        exp = attention_loops(q[b : b + 1], k[b : b + 1], v[b : b + 1], lambda i, j, b=b: ids[b, i] == ids[b, j])
        assert torch.allclose(out[b : b + 1], exp, atol=1e-10)


# ---------------------------------------------------------------- bad bindings


def expect_mask_error(fn):
    with pytest.raises(maskc.MaskError) as e:
        fn()
    assert str(e.value)
    return e.value


def test_missing_grid_size():
    expect_mask_error(lambda: maskc.compile("neighborhood((3, 3)) on grid(h, w)").mask(16))
    expect_mask_error(lambda: maskc.compile("natten2d", k=3).mask(16))
    # one size given but the length is not a multiple of it: nothing to infer
    expect_mask_error(lambda: maskc.compile("natten2d", k=3).mask(15, h=4))


def test_grid_product_differs_from_length():
    expect_mask_error(lambda: maskc.compile("window(1) on grid(4, 5)").mask(16))
    expect_mask_error(lambda: maskc.compile("natten2d", k=3).mask(16, h=4, w=5))
    # queries off the grid
    expect_mask_error(lambda: maskc.compile("window(1) on grid(2, 2)").mask(2, 4, q_offset=3))


def test_bad_sizes():
    prog = maskc.compile("causal")
    expect_mask_error(lambda: prog.mask(0))
    expect_mask_error(lambda: prog.mask(4, heads=0))
    expect_mask_error(lambda: maskc.compile("natten2d", k=3).mask(16, h=4.0, w=4))
    expect_mask_error(lambda: maskc.compile("heads { 0 .. 1: causal; 1 .. 2: all }").mask(4, heads=3))
    expect_mask_error(lambda: maskc.compile("neighborhood(5)").mask(4))


def test_unknown_bindings():
    expect_mask_error(lambda: maskc.compile("causal").mask(4, zz=3))
    expect_mask_error(lambda: maskc.compile("natten2d", k=3).mask(16, h=4, w=4, t=2))
    expect_mask_error(lambda: maskc.compile("causal").mask(4, ids=torch.zeros(1, 4, dtype=torch.long)))
    q = randn(1, 1, 4, 4)
    expect_mask_error(lambda: maskc.compile("causal").reference(q, q, q, extra=torch.zeros(3)))


def test_wrong_tensor_shapes():
    seg = maskc.compile("pattern p(ids: tensor) = segments(ids)")
    expect_mask_error(lambda: seg.mask(4, ids=torch.zeros(2, 5, dtype=torch.long)))  # wrong length
    expect_mask_error(lambda: seg.mask(4, ids=torch.zeros(2, 4)))  # float ids
    expect_mask_error(lambda: seg.mask(4))  # not bound
    slopes = maskc.compile("pattern p(s: tensor) = all with alibi(s)")
    q = randn(1, 2, 4, 8)
    expect_mask_error(lambda: slopes.reference(q, q, q, s=torch.ones(3)))
    bias = maskc.compile("pattern p(t: tensor) = all with bias(t)")
    expect_mask_error(lambda: bias.reference(q, q, q, t=torch.zeros(2, 3, 3)))  # 2-D table on 1-D
    expect_mask_error(lambda: bias.reference(q, q, q, t=torch.zeros(3, 3)))  # 3 heads for 2
    route = maskc.compile("route(topk = 1, block = 2)")
    expect_mask_error(lambda: route.mask(4))  # q/k not given
    expect_mask_error(lambda: route.mask(4, q=randn(1, 1, 5, 4), k=randn(1, 1, 4, 4)))
    cluster = maskc.compile("cluster(2, size = 2)")
    qq = randn(1, 1, 4, 4)
    expect_mask_error(lambda: cluster.mask(4, q=qq, k=qq))  # no centroids
    expect_mask_error(lambda: cluster.mask(4, q=qq, k=qq, centroids=randn(1, 3, 4)))
    expect_mask_error(lambda: cluster.mask(4, q=qq, k=qq, centroids=randn(1, 2, 3)))


def test_batch_disagreements():
    seg = maskc.compile("pattern p(ids: tensor) = segments(ids)")
    expect_mask_error(lambda: seg.mask(4, batch=3, ids=torch.zeros(2, 4, dtype=torch.long)))
    q = randn(3, 1, 4, 4)
    expect_mask_error(lambda: seg.reference(q, q, q, ids=torch.zeros(2, 4, dtype=torch.long)))


@pytest.mark.parametrize(
    ("qs", "ks", "vs"),
    [
        ((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 5, 8)),  # k/v lengths
        ((1, 2, 4, 8), (1, 3, 4, 8), (1, 3, 4, 8)),  # kv heads do not divide
        ((1, 4, 4, 8), (1, 2, 4, 8), (1, 1, 4, 8)),  # k/v heads differ
        ((2, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)),  # batch
        ((2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)),  # q not 4-D
        ((1, 2, 4, 8), (1, 2, 4, 7), (1, 2, 4, 8)),  # head dims
    ],
)
def test_mismatched_qkv(qs, ks, vs):
    q, k, v = randn(*qs), randn(*ks), randn(*vs)
    expect_mask_error(lambda: maskc.compile("causal").reference(q, k, v))
    expect_mask_error(lambda: maskc.attention(q, k, v, "causal"))


def test_integer_qkv_is_mask_error():
    q = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    expect_mask_error(lambda: maskc.compile("causal")(q, q, q))


def test_program_source_and_repr():
    prog = maskc.compile("causal & window(3)")
    again = maskc.compile(prog.source())
    assert torch.equal(prog.mask(7), again.mask(7))
    assert "Program(" in repr(prog)
