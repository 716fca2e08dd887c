"""Modifiers (alibi, softcap, bias, polyline) and reference attention.

Every expectation is a dense softmax written here with plain loops from
docs/language.md §9 and README.md; `Program.reference` is the thing under test.
"""

from __future__ import annotations

import math

import pytest
import torch

import maskc

DT = torch.float64


# ---------------------------------------------------------------- helpers


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT) * scale


def qkv(batch=1, heads=2, lq=6, lk=None, dim=8, kv_heads=None, seed=0, scale=1.0):
    lk = lq if lk is None else lk
    kv_heads = heads if kv_heads is None else kv_heads
    q = rand(batch, heads, lq, dim, seed=seed, scale=scale)
    k = rand(batch, kv_heads, lk, dim, seed=seed + 1, scale=scale)
    v = rand(batch, kv_heads, lk, dim, seed=seed + 2)
    return q, k, v


def my_attention(q, k, v, allowed, transform=None, scale=None):
    """allowed(b, h, qpos, kpos) -> bool; transform(b, h, qpos, kpos, logit) -> logit.

    Absolute query positions are i + lk - lq.  Rows with no allowed key give 0.
    Key/value head of query head h is h // (heads / kv_heads).
    """
    nb, nh, lq, dim = q.shape
    lk = k.shape[2]
    group = nh // k.shape[1]
    scale = 1 / math.sqrt(dim) if scale is None else scale
    off = lk - lq
    out = torch.zeros(nb, nh, lq, v.shape[-1], dtype=DT)
    for b in range(nb):
        for h in range(nh):
            kh = h // group
            for i in range(lq):
                qp = i + off
                keys, logits = [], []
                for j in range(lk):
                    if not allowed(b, h, qp, j):
                        continue
                    logit = float(q[b, h, i].double() @ k[b, kh, j].double()) * scale
                    if transform is not None:
                        logit = transform(b, h, qp, j, logit)
                    keys.append(j)
                    logits.append(logit)
                if not keys:
                    continue
                m = max(logits)
                w = [math.exp(x - m) for x in logits]
                total = sum(w)
                for j, wj in zip(keys, w, strict=True):
                    out[b, h, i] += wj / total * v[b, kh, j].double()
    return out


def everything(b, h, q, k):
    return True


def close(actual, expected, tol=1e-10):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.double() - expected).abs().max().item()
    assert err < tol, f"max abs error {err}"


# ---------------------------------------------------------------- plain reference (no modifier)


def test_reference_matches_masked_softmax():
    q, k, v = qkv(batch=2, heads=2, lq=5)
    out = maskc.compile("causal & window(2, 0)").reference(q, k, v)
    close(out, my_attention(q, k, v, lambda b, h, i, j: i - 2 <= j <= i))


def test_reference_scale_and_fewer_queries():
    q, k, v = qkv(lq=3, lk=7)
    out = maskc.compile("causal").reference(q, k, v, scale=0.3)
    close(out, my_attention(q, k, v, lambda b, h, i, j: j <= i, scale=0.3))
    out = maskc.compile("causal").reference(q, k, v, q_offset=1)
    # explicit q_offset: query i sits at 1 + i
    exp = my_attention(q, k, v, lambda b, h, i, j: j <= i - (7 - 3) + 1)
    close(out, exp)


def test_call_is_reference():
    q, k, v = qkv()
    prog = maskc.compile("window(1)")
    close(prog(q, k, v), my_attention(q, k, v, lambda b, h, i, j: abs(i - j) <= 1))


# ---------------------------------------------------------------- alibi


def alibi_paper_slopes(n):
    """Press et al.'s get_slopes, written out."""

    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return pow2(n)
    closest = 2 ** math.floor(math.log2(n))
    return pow2(closest) + alibi_paper_slopes(2 * closest)[0::2][: n - closest]


def test_alibi_paper_slopes_helper():
    assert alibi_paper_slopes(8) == [2.0**-i for i in range(1, 9)]
    assert alibi_paper_slopes(4) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]
    assert alibi_paper_slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


def probabilities(prog, heads, lq, lk, **kw):
    """Attention weights: zero queries (logits = modifier terms only), v = identity."""
    q = torch.zeros(1, heads, lq, 4, dtype=DT)
    k = torch.zeros(1, heads, lk, 4, dtype=DT)
    v = torch.eye(lk, dtype=DT).expand(1, heads, lk, lk).contiguous()
    return prog.reference(q, k, v, **kw)


@pytest.mark.parametrize(
    ("heads", "slopes"),
    [
        (8, [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]),
        (4, [1 / 4, 1 / 16, 1 / 64, 1 / 256]),
        (6, [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]),
        (1, [1 / 256]),
    ],
)
def test_alibi_default_slopes(heads, slopes):
    lq = lk = 6
    p = probabilities(maskc.compile("causal with alibi()"), heads, lq, lk)
    for h in range(heads):
        for i in range(lq):
            w = [math.exp(-slopes[h] * (i - j)) if j <= i else 0.0 for j in range(lk)]
            total = sum(w)
            expected = torch.tensor([x / total for x in w], dtype=DT)
            close(p[0, h, i], expected)


def test_alibi_default_slopes_random_qk():
    q, k, v = qkv(heads=8, lq=5)
    out = maskc.compile("all with alibi()").reference(q, k, v)
    slopes = alibi_paper_slopes(8)
    exp = my_attention(q, k, v, everything, lambda b, h, i, j, x: x - slopes[h] * abs(j - i))
    close(out, exp)


def test_alibi_slopes_tensor_and_absolute_positions():
    slopes = torch.tensor([0.7, 0.05, 2.0], dtype=DT)
    q, k, v = qkv(heads=3, lq=3, lk=7)
    prog = maskc.compile("pattern p(s: tensor) = all with alibi(s)")
    out = prog.reference(q, k, v, s=slopes)
    # query i is at absolute position i + 4
    exp = my_attention(q, k, v, everything, lambda b, h, i, j, x: x - float(slopes[h]) * abs(j - i))
    close(out, exp)


# ---------------------------------------------------------------- softcap


def test_softcap():
    q, k, v = qkv(lq=5, scale=3.0)
    out = maskc.compile("causal with softcap(2.5)").reference(q, k, v)
    exp = my_attention(q, k, v, lambda b, h, i, j: j <= i, lambda b, h, i, j, x: 2.5 * math.tanh(x / 2.5))
    close(out, exp)
    # the cap matters here: without it the result is different
    plain = my_attention(q, k, v, lambda b, h, i, j: j <= i)
    assert (plain - exp).abs().max() > 1e-3


def test_modifiers_apply_in_order_written():
    q, k, v = qkv(heads=2, lq=5, scale=3.0)
    slopes = alibi_paper_slopes(2)
    a_then_c = maskc.compile("all with alibi(), softcap(1.5)").reference(q, k, v)
    c_then_a = maskc.compile("all with softcap(1.5), alibi()").reference(q, k, v)
    close(
        a_then_c,
        my_attention(q, k, v, everything, lambda b, h, i, j, x: 1.5 * math.tanh((x - slopes[h] * abs(j - i)) / 1.5)),
    )
    close(
        c_then_a,
        my_attention(q, k, v, everything, lambda b, h, i, j, x: 1.5 * math.tanh(x / 1.5) - slopes[h] * abs(j - i)),
    )


def test_called_pattern_modifiers_apply_first():
    text = """
    pattern capped() = all with softcap(1.5)
    capped() & causal with alibi()
    """
    q, k, v = qkv(heads=2, lq=5, scale=3.0)
    slopes = alibi_paper_slopes(2)
    out = maskc.compile(text).reference(q, k, v)
    exp = my_attention(
        q,
        k,
        v,
        lambda b, h, i, j: j <= i,
        lambda b, h, i, j, x: 1.5 * math.tanh(x / 1.5) - slopes[h] * abs(j - i),
    )
    close(out, exp)


# ---------------------------------------------------------------- bias


def test_bias_1d_with_clamping():
    heads, r = 2, 2
    table = rand(heads, 2 * r + 1, seed=5)
    q, k, v = qkv(heads=heads, lq=7)
    out = maskc.compile("pattern p(t: tensor) = window(4) with bias(t)").reference(q, k, v, t=table)

    def add(b, h, i, j, x):
        d = max(-r, min(r, j - i))  # offset k - q, clamped to the table
        return x + float(table[h, d + r])

    close(out, my_attention(q, k, v, lambda b, h, i, j: abs(i - j) <= 4, add))


def test_bias_shared_table_for_all_heads():
    table = rand(1, 3, seed=6)
    q, k, v = qkv(heads=3, lq=5)
    out = maskc.compile("pattern p(t: tensor) = all with bias(t)").reference(q, k, v, t=table)
    exp = my_attention(q, k, v, everything, lambda b, h, i, j, x: x + float(table[0, max(-1, min(1, j - i)) + 1]))
    close(out, exp)


def test_bias_2d_on_grid():
    heads, ry, rx, gh, gw = 2, 1, 2, 3, 4
    table = rand(heads, 2 * ry + 1, 2 * rx + 1, seed=7)
    q, k, v = qkv(heads=heads, lq=gh * gw)
    prog = maskc.compile("pattern p(t: tensor) on grid(h, w) = all with bias(t)")
    out = prog.reference(q, k, v, t=table, h=gh, w=gw)

    def add(b, h, i, j, x):
        dy = max(-ry, min(ry, j // gw - i // gw))
        dx = max(-rx, min(rx, j % gw - i % gw))
        return x + float(table[h, dy + ry, dx + rx])

    close(out, my_attention(q, k, v, everything, add))


def test_bias_even_table_is_an_error():
    q, k, v = qkv(heads=2, lq=4)
    with pytest.raises(maskc.MaskError):
        maskc.compile("pattern p(t: tensor) = all with bias(t)").reference(q, k, v, t=torch.zeros(2, 4))


# ---------------------------------------------------------------- polyline


def polyline_term(alpha, beta, path, y1, x1, y2, x2):
    """docs/language.md §9.5 (PPMA): hv = along the query's row, then along the key's column;
    vh = along the query's column, then along the key's row."""
    if path == "hv":
        horiz = sum(alpha[y1, x] for x in range(min(x1, x2) + 1, max(x1, x2) + 1))
        vert = sum(beta[y, x2] for y in range(min(y1, y2) + 1, max(y1, y2) + 1))
    else:
        vert = sum(beta[y, x1] for y in range(min(y1, y2) + 1, max(y1, y2) + 1))
        horiz = sum(alpha[y2, x] for x in range(min(x1, x2) + 1, max(x1, x2) + 1))
    return float(horiz + vert)


def test_polyline_term_helper_by_hand():
    alpha = torch.tensor([[-1.0, -2.0, -4.0], [-8.0, -16.0, -32.0]])
    beta = torch.tensor([[-100.0, -200.0, -300.0], [-400.0, -500.0, -600.0]])
    # query (0, 0) -> key (1, 2): hv = alpha[0,1] + alpha[0,2] + beta[1,2]
    assert polyline_term(alpha, beta, "hv", 0, 0, 1, 2) == -2 - 4 - 600
    # vh = beta[1,0] + alpha[1,1] + alpha[1,2]
    assert polyline_term(alpha, beta, "vh", 0, 0, 1, 2) == -400 - 16 - 32
    # symmetric intervals: query (1, 2) -> key (0, 0): hv = alpha[1,1] + alpha[1,2] + beta[1,0]
    assert polyline_term(alpha, beta, "hv", 1, 2, 0, 0) == -16 - 32 - 400
    assert polyline_term(alpha, beta, "hv", 1, 1, 1, 1) == 0


@pytest.mark.parametrize("path", ["hv", "vh"])
def test_polyline_paths(path):
    nb, nh, gh, gw = 2, 2, 3, 4
    alpha = -torch.rand(nb, nh, gh, gw, generator=torch.Generator().manual_seed(1), dtype=DT)
    beta = -torch.rand(nb, nh, gh, gw, generator=torch.Generator().manual_seed(2), dtype=DT) * 2
    q, k, v = qkv(batch=nb, heads=nh, lq=gh * gw)
    path_arg = "" if path == "hv" else ', path = "vh"'
    prog = maskc.compile(f"pattern p(a: tensor, b: tensor) on grid(h, w) = all with polyline(a, b{path_arg})")
    out = prog.reference(q, k, v, a=alpha, b=beta, h=gh, w=gw)

    def add(b, h, i, j, x):
        return x + polyline_term(alpha[b, h], beta[b, h], path, i // gw, i % gw, j // gw, j % gw)

    close(out, my_attention(q, k, v, everything, add))


def test_polyline_hv_and_vh_differ_and_heads_broadcast():
    gh, gw = 3, 3
    alpha = -torch.rand(1, 1, gh, gw, generator=torch.Generator().manual_seed(3), dtype=DT) * 3
    beta = -torch.rand(1, 1, gh, gw, generator=torch.Generator().manual_seed(4), dtype=DT) * 3
    q, k, v = qkv(heads=2, lq=9)
    outs = {}
    for path in ("hv", "vh"):
        prog = maskc.compile(
            f'pattern p(a: tensor, b: tensor) on grid(3, 3) = causal with polyline(a, b, path = "{path}")'
        )
        outs[path] = prog.reference(q, k, v, a=alpha, b=beta)

        def add(b, h, i, j, x, path=path):
            return x + polyline_term(alpha[0, 0], beta[0, 0], path, i // gw, i % gw, j // gw, j % gw)

        close(outs[path], my_attention(q, k, v, lambda b, h, i, j: j <= i, add))
    assert (outs["hv"] - outs["vh"]).abs().max() > 1e-4


def test_polyline_decay_on_grid_and_1d():
    g = 0.6
    q, k, v = qkv(heads=2, lq=12)
    out = maskc.compile("all with polyline(decay = 0.6) on grid(3, 4)").reference(q, k, v)

    def add(b, h, i, j, x):
        return x + math.log(g) * (abs(i % 4 - j % 4) + abs(i // 4 - j // 4))

    close(out, my_attention(q, k, v, everything, add))
    out = maskc.compile("causal with polyline(decay = 0.6)").reference(q, k, v)
    close(
        out,
        my_attention(q, k, v, lambda b, h, i, j: j <= i, lambda b, h, i, j, x: x + math.log(g) * abs(i - j)),
    )


def test_polyline_bad_tensors():
    q, k, v = qkv(heads=2, lq=4)
    prog = maskc.compile("pattern p(a: tensor, b: tensor) on grid(2, 2) = all with polyline(a, b)")
    with pytest.raises(maskc.MaskError):
        prog.reference(q, k, v, a=torch.zeros(1, 2, 4), b=torch.zeros(1, 2, 2, 2))
    with pytest.raises(maskc.MaskError):
        prog.reference(q, k, v, a=torch.zeros(1, 2, 2, 2))  # beta missing
    with pytest.raises(maskc.MaskError):
        maskc.compile("pattern p(a: tensor, b: tensor) = all with polyline(a, b)")  # 1-D


# ---------------------------------------------------------------- empty rows and gradients


@pytest.mark.parametrize(
    "spec",
    [
        "queries(2 .. 6)",
        "queries(2 .. 6) with alibi()",
        "queries(% 2 == 0) & causal with softcap(2.0)",
        "none",
    ],
)
def test_empty_rows_are_zero_with_finite_gradients(spec):
    q, k, v = qkv(heads=2, lq=6)
    for x in (q, k, v):
        x.requires_grad_(True)
    out = maskc.compile(spec).reference(q, k, v)
    prog_rows = maskc.compile(spec).mask(6, heads=2)
    empty = ~prog_rows.any(-1)  # [heads, lq]
    assert empty.any()
    assert (out.detach()[0][empty] == 0).all()
    (out * torch.arange(out.numel(), dtype=DT).reshape(out.shape)).sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[0][empty] == 0).all()


def test_lse_is_minus_inf_for_empty_rows():
    q, k, v = qkv(heads=1, lq=4)
    _, lse = maskc.compile("queries(1 .. 4) & causal").reference(q, k, v, return_lse=True)
    assert lse.shape == (1, 1, 4)
    assert lse[0, 0, 0] == -math.inf
    scale = 1 / math.sqrt(8)
    for i in range(1, 4):
        logits = [float(q[0, 0, i] @ k[0, 0, j]) * scale for j in range(i + 1)]
        m = max(logits)
        expected = m + math.log(sum(math.exp(x - m) for x in logits))
        assert abs(float(lse[0, 0, i]) - expected) < 1e-10


def test_gradients_match_dense_softmax():
    q, k, v = qkv(heads=2, lq=5)
    for x in (q, k, v):
        x.requires_grad_(True)
    out = maskc.compile("causal with alibi()").reference(q, k, v)
    out.square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    # the same computation with torch's own softmax on an explicit bias
    q2, k2, v2 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    slopes = torch.tensor(alibi_paper_slopes(2), dtype=DT)
    pos = torch.arange(5)
    bias = -slopes[:, None, None] * (pos[None, :] - pos[:, None]).abs()[None].to(DT)
    logits = q2 @ k2.transpose(-1, -2) / math.sqrt(8) + bias
    logits = logits.masked_fill(pos[None, :] > pos[:, None], -math.inf)
    (torch.softmax(logits, -1) @ v2).square().sum().backward()
    for a, b in zip(grads, (q2.grad, k2.grad, v2.grad), strict=True):
        close(a, b, 1e-10)


# ---------------------------------------------------------------- GQA / MQA


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa(kv_heads):
    q, k, v = qkv(heads=4, kv_heads=kv_heads, lq=6)
    out = maskc.compile("causal & window(3, 0) with alibi()").reference(q, k, v)
    slopes = alibi_paper_slopes(4)
    exp = my_attention(q, k, v, lambda b, h, i, j: i - 3 <= j <= i, lambda b, h, i, j, x: x - slopes[h] * abs(i - j))
    close(out, exp)


def test_gqa_per_head_pattern():
    q, k, v = qkv(heads=4, kv_heads=2, lq=5)
    out = maskc.compile("heads { 0 .. 1: causal; 1 .. 4: window(head - 1) }").reference(q, k, v)
    exp = my_attention(q, k, v, lambda b, h, i, j: j <= i if h == 0 else abs(i - j) <= h - 1)
    close(out, exp)


def test_dtype_kept():
    q, k, v = (x.float() for x in qkv(lq=4))
    out = maskc.compile("causal").reference(q, k, v)
    assert out.dtype == torch.float32
    close(out, my_attention(q.double(), k.double(), v.double(), lambda b, h, i, j: j <= i), 1e-5)


def test_grid_modifiers_with_fewer_queries():
    # grid 3 x 4 of keys, the 4 queries are the last row (absolute positions 8..11)
    gh, gw = 3, 4
    alpha = -torch.rand(1, 2, gh, gw, generator=torch.Generator().manual_seed(8), dtype=DT)
    beta = -torch.rand(1, 2, gh, gw, generator=torch.Generator().manual_seed(9), dtype=DT)
    table = rand(2, 3, 3, seed=10)
    q, k, v = qkv(heads=2, lq=4, lk=12)
    prog = maskc.compile(
        "pattern p(a: tensor, b: tensor, t: tensor) on grid(3, 4) = window(1) with polyline(a, b), bias(t)"
    )
    out = prog.reference(q, k, v, a=alpha, b=beta, t=table)

    def allowed(b, h, i, j):
        return abs(i // gw - j // gw) <= 1 and abs(i % gw - j % gw) <= 1

    def add(b, h, i, j, x):
        y1, x1, y2, x2 = i // gw, i % gw, j // gw, j % gw
        x = x + polyline_term(alpha[0, h], beta[0, h], "hv", y1, x1, y2, x2)
        return x + float(table[h, max(-1, min(1, y2 - y1)) + 1, max(-1, min(1, x2 - x1)) + 1])

    close(out, my_attention(q, k, v, allowed, add))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_bias_of_minus_infinity_empties_rows_without_nan(backend):
    # A bias table may forbid pairs with -inf.  A head whose every pair is -inf
    # has empty rows (output 0, as the reference); on Triton such rows lie in
    # full blocks, which skip the empty-row guard unless modifiers are present.
    torch.manual_seed(0)
    table = torch.randn(2, 2 * 40 + 1, dtype=torch.float64)
    table[0] = -math.inf  # head 0: every pair forbidden
    table[1, 40 + 3 :] = -math.inf  # head 1: keys more than 2 after the query
    q, k, v = (torch.randn(1, 2, 37, 16, dtype=torch.float32, requires_grad=True) for _ in range(3))
    prog = maskc.compile("pattern p(t: tensor) = all with bias(t)")
    out = prog(q, k, v, t=table.float(), backend=backend)
    expected = prog.reference(q.double(), k.double(), v.double(), t=table)
    assert not out.isnan().any() and torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v))
