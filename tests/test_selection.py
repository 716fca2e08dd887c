"""`route`'s scorers and selectors (issue 13) against independent implementations.

Each expectation below is written here, in plain torch and Python loops, from
the published rule of a paper's code — never through maskc:

- XAttention (mit-han-lab/x-attention): `xattn_estimate`'s strided
  antidiagonal reshaping ("inverse" mode), softmax, block sums, and
  `find_blocks_chunked`'s causal mass rule (first and diagonal blocks forced,
  then blocks in decreasing mass while the mass taken is below the threshold);
- Quest (mit-han-lab/Quest): per-page key min/max, the upper bound
  sum_d max(q_d max_d, q_d min_d) per query, top pages with the current page kept;
- SpargeAttn (thu-ml/SpargeAttn): `get_block_map_meansim`'s mean pooling,
  softmax and `searchsorted(cdf, tau, right=True)` count (at least one);
- SeerAttention-style external scores: softmax over the eligible blocks, threshold.

The papers sort without a tie rule; maskc's is "the lower key block first", and
the references here use stable sorts so that planted ties are checked too.
Masks are compared exactly on random and planted inputs (a strong key column,
a diagonal); the backends are compared with the dense reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import maskc
from maskc import testing


def _qk(b, h, n, d, seed, kv_heads=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, kv_heads or h, n, d, generator=g, dtype=torch.float64)
    return q, k


def _dense(sel: torch.Tensor, lq: int, bq: int, bk: int, causal: bool) -> torch.Tensor:
    """Token mask [lq, lq] from selected blocks [nq, nk] (or per token: bq = 1)."""
    i = torch.arange(lq)[:, None]
    j = torch.arange(lq)[None, :]
    out = sel[i // bq, j // bk]
    return out & (j <= i) if causal else out


def _ranked(values: list[float]) -> list[int]:
    """Indices by decreasing value, ties to the lower index."""
    return sorted(range(len(values)), key=lambda c: (-values[c], c))


# ---------------------------------------------------------------- XAttention


def xattention_blocks(q: torch.Tensor, k: torch.Tensor, b: int, s: int, tau: float) -> torch.Tensor:
    """One head [L, D] -> selected blocks [n, n], causal (XAttention's prefill)."""
    length, d = q.shape
    n = -(-length // b)
    padded = n * b
    qp = torch.zeros(padded, d, dtype=q.dtype)
    kp = torch.zeros(padded, d, dtype=k.dtype)
    qp[:length], kp[:length] = q, k
    # inverse mode: key row j holds k[j s + t], query row i holds q[i s + s - 1 - t], t = 0 .. s-1
    rk = torch.cat([kp[t::s] for t in range(s)], dim=-1)
    rq = torch.cat([qp[s - 1 - t :: s] for t in range(s)], dim=-1)
    w = rq @ rk.T / math.sqrt(d) / s
    groups = padded // s
    real = -(-length // s)
    w = w.masked_fill(torch.ones(groups, groups, dtype=torch.bool).triu(1), -math.inf)
    w[:, real:] = -math.inf
    p = torch.softmax(w, dim=-1)
    p[real:] = 0
    sums = p.view(n, b // s, n, b // s).sum(3).sum(1)
    # find_blocks_chunked, causal prefill: column 0 and the diagonal forced, then
    # others by decreasing mass while the mass taken so far is below tau * total
    sel = torch.zeros(n, n, dtype=torch.bool)
    for r in range(n):
        forced = {0, r}
        taken = sum(float(sums[r, c]) for c in forced)
        required = float(sums[r].sum()) * tau
        for c in forced:
            sel[r, c] = True
        for c in _ranked([float(x) for x in sums[r]]):
            if c in forced:
                continue
            if taken >= required:
                break
            sel[r, c] = True
            taken += float(sums[r, c])
    return sel & torch.ones(n, n, dtype=torch.bool).tril()


def _plant_column(q, k, column, scale=6.0):
    """Every query shares a direction; the key at `column` points along it."""
    u = torch.nn.functional.normalize(torch.ones(q.shape[-1], dtype=q.dtype), dim=0)
    q = q + 2 * u
    k = k.clone()
    k[..., column, :] = scale * math.sqrt(q.shape[-1]) * u
    return q, k


def _plant_diagonal(q, k, offset=-1, scale=3.0):
    """k[i + offset] = scale * q[i]: a slash (a previous-token head for offset -1)."""
    k = k.clone()
    n = q.shape[-2]
    k[..., max(0, offset) : n + min(0, offset), :] = scale * q[..., max(0, -offset) : n - max(0, offset), :]
    return q, k


@pytest.mark.parametrize("plant", ["random", "column", "diagonal"])
@pytest.mark.parametrize(("length", "b", "s", "tau"), [(64, 8, 4, 0.9), (45, 8, 2, 0.6), (48, 16, 8, 0.95)])
def test_xattention_equals_find_blocks_chunked(plant, length, b, s, tau):
    heads = 2
    q, k = _qk(1, heads, length, 16, seed=length + s)
    if plant == "column":
        q, k = _plant_column(q, k, column=length // 2)
    elif plant == "diagonal":
        q, k = _plant_diagonal(q, k)
    got = maskc.compile("xattention", b=b, s=s, tau=tau).mask(length, heads=heads, q=q, k=k)[0]
    for h in range(heads):
        sel = xattention_blocks(q[0, h], k[0, h], b, s, tau)
        assert torch.equal(got[h], _dense(sel, length, b, b, causal=True)), f"head {h}"
        if plant == "column":  # the planted key's block is kept by every query block that sees it
            kb = (length // 2) // b
            assert sel[kb:, kb].all()


def test_antidiagonal_finds_a_planted_slash():
    """topk = 1 without forced blocks: a previous-token slash puts each query block's
    mass on its own block (the antidiagonals of an even stride cross offset -1)."""
    q, k = _qk(1, 1, 64, 16, seed=3)
    q, k = _plant_diagonal(q, k, offset=-1, scale=4.0)
    m = maskc.compile('route(topk = 1, block = 8, score = "antidiagonal", stride = 4, causal = true)')
    got = m.mask(64, q=q, k=k)[0, 0]
    assert torch.equal(got, _dense(torch.eye(8, dtype=torch.bool), 64, 8, 8, causal=False))


# ---------------------------------------------------------------- Quest


def quest_bounds(q: torch.Tensor, k: torch.Tensor, page: int) -> torch.Tensor:
    """One head: Quest's upper bound of each query [L, D] on each page: [L, pages]."""
    n = -(-k.shape[0] // page)
    kmax = torch.stack([k[p * page : (p + 1) * page].amax(0) for p in range(n)])
    kmin = torch.stack([k[p * page : (p + 1) * page].amin(0) for p in range(n)])
    return torch.stack([torch.maximum(q * kmax[p], q * kmin[p]).sum(-1) for p in range(n)], dim=-1)


def quest_pages(bounds: list[float], own: int, budget: int) -> set[int]:
    """The own page, then the best earlier pages by bound, `budget` in all."""
    return {own, *_ranked(bounds[:own])[: budget - 1]}


@pytest.mark.parametrize("plant", ["random", "column"])
@pytest.mark.parametrize(("length", "page", "budget", "kv_heads"), [(50, 4, 3, 2), (33, 8, 2, 1)])
def test_quest_equals_the_page_upper_bound(plant, length, page, budget, kv_heads):
    """In a prefill the queries of a page share their choice, by their largest bound."""
    heads = 2
    q, k = _qk(1, heads, length, 8, seed=page + budget, kv_heads=kv_heads)
    if plant == "column":
        q, k = _plant_column(q, k, column=5)
    got = maskc.compile("quest", page=page, pages=budget).mask(length, heads=heads, q=q, k=k)[0]
    n = -(-length // page)
    for h in range(heads):
        bounds = quest_bounds(q[0, h], k[0, h // (heads // kv_heads)], page)
        sel = torch.zeros(n, n, dtype=torch.bool)
        for r in range(n):
            block_bound = bounds[r * page : (r + 1) * page].amax(0)
            sel[r, list(quest_pages([float(x) for x in block_bound], r, budget))] = True
        assert torch.equal(got[h], _dense(sel, length, page, page, causal=True)), f"head {h}"
        if plant == "column":
            assert sel[1:, 5 // page].all()


def test_quest_decoding_is_per_query():
    """A decoding step attends to exactly the pages Quest picks for that query."""
    page, budget, pos = 4, 3, 29
    program = maskc.compile("quest", page=page, pages=budget)
    q, k = _qk(1, 2, 30, 8, seed=9)
    v = torch.randn(1, 2, 30, 8, dtype=torch.float64)
    step = program.decode(q[:, :, pos : pos + 1], k, v, torch.tensor([pos]), backend="cpu")
    for h in range(2):
        bounds = quest_bounds(q[0, h, pos : pos + 1], k[0, h], page)[0]
        pages = quest_pages([float(x) for x in bounds], pos // page, budget)
        keys = [j for j in range(pos + 1) if j // page in pages]
        p = torch.softmax(q[0, h, pos] @ k[0, h, keys].T / math.sqrt(8), dim=-1)
        torch.testing.assert_close(step[0, h, 0], p @ v[0, h, keys], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("length", [37, 64])
def test_per_query_selection(length):
    """query_block = 1: every query token chooses for itself (Quest's rule per query)."""
    page, budget = 4, 3
    q, k = _qk(1, 1, length, 8, seed=length)
    spec = (
        f'causal & route(topk = {budget}, block = {page}, query_block = 1, score = "minmax", causal = true, own = true)'
    )
    got = maskc.compile(spec).mask(length, q=q, k=k)[0, 0]
    bounds = quest_bounds(q[0, 0], k[0, 0], page)
    sel = torch.zeros(length, -(-length // page), dtype=torch.bool)
    for i in range(length):
        sel[i, list(quest_pages([float(x) for x in bounds[i]], i // page, budget))] = True
    assert torch.equal(got, _dense(sel, length, 1, page, causal=True))


# ---------------------------------------------------------------- SpargeAttn


def sparge_blocks(q: torch.Tensor, k: torch.Tensor, bq: int, bk: int, tau: float) -> torch.Tensor:
    """One head: get_block_map_meansim without the self-similarity filter, non-causal."""
    nq, nk = -(-q.shape[0] // bq), -(-k.shape[0] // bk)
    pq = torch.stack([q[r * bq : (r + 1) * bq].mean(0) for r in range(nq)])
    pk = torch.stack([k[r * bk : (r + 1) * bk].mean(0) for r in range(nk)])
    probs = torch.softmax(pq @ pk.T * q.shape[-1] ** -0.5, dim=-1)
    sel = torch.zeros(nq, nk, dtype=torch.bool)
    for r in range(nq):
        order = _ranked([float(x) for x in probs[r]])
        cdf = torch.cumsum(probs[r, order], 0)
        count = max(1, int(torch.searchsorted(cdf, torch.tensor([tau], dtype=cdf.dtype), right=True)))
        sel[r, order[:count]] = True
    return sel


@pytest.mark.parametrize("plant", ["random", "column", "tie"])
@pytest.mark.parametrize(("length", "bq", "bk", "tau"), [(64, 8, 4, 0.5), (43, 16, 8, 0.9)])
def test_sparge_equals_its_cdf_selection(plant, length, bq, bk, tau):
    heads = 2
    q, k = _qk(1, heads, length, 8, seed=bq * bk)
    if plant == "column":
        q, k = _plant_column(q, k, column=length - 3)
    elif plant == "tie":  # key blocks 1 and 3 identical: equal scores, the lower one first
        k[..., 3 * bk : 4 * bk, :] = k[..., bk : 2 * bk, :]
    got = maskc.compile("sparge", bq=bq, bk=bk, tau=tau).mask(length, heads=heads, q=q, k=k)[0]
    for h in range(heads):
        sel = sparge_blocks(q[0, h], k[0, h], bq, bk, tau)
        assert torch.equal(got[h], _dense(sel, length, bq, bk, causal=False)), f"head {h}"


# ---------------------------------------------------------------- other scorers, ties


@pytest.mark.parametrize("score", ["mean", "max", "minmax"])
def test_scorers_topk_with_a_planted_tie(score):
    """Key blocks 2 and 5 are identical: every query block that takes exactly one of
    them takes block 2 (ties go to the lower block)."""
    q, k = _qk(1, 1, 64, 8, seed=11)
    k[..., 40:48, :] = k[..., 16:24, :]
    b = 8
    got = maskc.compile(f'route(topk = 3, block = 8, score = "{score}")').mask(64, q=q, k=k)[0, 0]
    qh, kh = q[0, 0], k[0, 0]
    blocks = range(8)
    for r in blocks:
        qs = qh[r * b : (r + 1) * b]
        values = []
        for c in blocks:
            kc = kh[c * b : (c + 1) * b]
            if score == "mean":
                values.append(float(qs.mean(0) @ kc.mean(0)))
            elif score == "max":  # SeerAttention's K max-pooling; q mean-pooled
                values.append(float(qs.mean(0) @ kc.amax(0)))
            else:  # Quest's bound, the largest over the block's queries
                values.append(float(torch.maximum(qs * kc.amax(0), qs * kc.amin(0)).sum(-1).max()))
        keep = _ranked(values)[:3]
        want = torch.zeros(64, dtype=torch.bool)
        for c in keep:
            want[c * b : (c + 1) * b] = True
        assert torch.equal(got[r * b], want), (score, r)
        assert not (2 not in keep and 5 in keep)


def test_external_scores_threshold_topk_and_mass():
    """scores = gate: the model's own block scores, softmax over the eligible blocks."""
    heads, n, b = 2, 40, 8
    nb = 5
    g = torch.Generator().manual_seed(4)
    gate = torch.randn(2, heads, nb, nb, generator=g, dtype=torch.float64)
    gate[..., 3] = gate[..., 1]  # a tie
    for spec, rule in [
        ("seer(b = 8, t = 0.15)", "threshold"),
        ("causal & route(topk = 2, block = 8, scores = gate, causal = true, shared = false)", "topk"),
        ("causal & route(mass = 0.8, block = 8, scores = gate, causal = true, shared = false, first = true)", "mass"),
    ]:
        got = maskc.compile(spec).mask(n, heads=heads, gate=gate)
        for bi in range(2):
            for h in range(heads):
                sel = torch.zeros(nb, nb, dtype=torch.bool)
                for r in range(nb):
                    p = torch.softmax(gate[bi, h, r, : r + 1], 0)
                    order = _ranked([float(x) for x in gate[bi, h, r, : r + 1]])
                    if rule == "threshold":
                        sel[r, : r + 1] = p >= 0.15
                        sel[r, r] = True  # the diagonal block
                    elif rule == "topk":
                        sel[r, order[:2]] = True
                    else:  # first block forced, then by score until the mass before reaches 0.8
                        order = [0] + [c for c in order if c != 0]
                        taken = 0.0
                        for c in order:
                            if taken >= 0.8 and c != 0:
                                break
                            sel[r, c] = True
                            taken += float(p[c])
                assert torch.equal(got[bi, h], _dense(sel, n, b, b, causal=True)), (spec, bi, h)


# ---------------------------------------------------------------- backends, gradients, schedules


def _fused(b, h, kv, n, d, seed):
    """q, k, v as non-contiguous views of one fused projection (GQA: kv heads < h)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, (h + 2 * kv) * d, generator=g).requires_grad_()
    q, k, v = x.view(b, n, h + 2 * kv, d).permute(0, 2, 1, 3).split([h, kv, kv], dim=1)
    return x, q, k, v


BACKEND_SPECS = [
    ("xattention(b = 8, s = 4, tau = 0.8)", {}),
    ("quest(page = 4, pages = 2)", {}),
    ("sparge(bq = 8, bk = 4, tau = 0.7)", {}),
    ("seer(b = 8, t = 0.2)", {"gate": (5, 5)}),
    ('route(cdf = 0.6, block = 6, query_block = 3, score = "max", first = true) | window(2)', {}),
]


@pytest.mark.parametrize(("spec", "tensors"), BACKEND_SPECS)
def test_cpu_against_the_reference(spec, tensors):
    program = maskc.compile(spec)
    x, q, k, v = _fused(2, 4, 2, 37, 8, seed=len(spec))
    extra = {n: torch.randn(2, 4, *shape, requires_grad=True) for n, shape in tensors.items()}
    out = program(q, k, v, backend="cpu", **extra)
    ref = program.reference(q, k, v, **extra)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *extra.values()], grad, allow_unused=True)
    (want,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)
    # selection is not differentiable: nothing reaches the scores (None, or zeros from the op)
    assert all(g is None or not g.any() for g in got[1:])


def test_flex_against_the_reference():
    """FlexAttention reads the same [query regions, key regions] table (SpargeAttn's
    query blocks differ from its key blocks); every form differs only in that table's
    contents, which the CPU tests above check."""
    program = maskc.compile("sparge(bq = 8, bk = 4, tau = 0.7)")
    _, q, k, v = _fused(1, 2, 2, 37, 8, seed=5)
    with torch.no_grad():
        out = program(q, k, v, backend="flex")
        ref = program.reference(q, k, v)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_triton_interpreter_against_the_reference():
    """SpargeAttn's query blocks differ from its key blocks: the kernels read a
    [query regions, key regions] table."""
    program = maskc.compile("sparge(bq = 8, bk = 4, tau = 0.7)")
    x, q, k, v = _fused(1, 2, 1, 20, 16, seed=1)
    out = program(q, k, v, backend="triton")
    ref = program.reference(q, k, v)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fuzz_schedules_and_cpu_backend():
    """`maskc fuzz`: schedules exact against the dense mask, CPU forward and gradients
    (the library's defaults are fuzzed by tests/test_library_fuzz.py)."""
    union = maskc.compile(" | ".join(f"({s})" for s, _ in BACKEND_SPECS))
    report = testing.fuzz(union, examples=3, backends=("cpu",), max_len=48, seed=0)
    assert report.ok, str(report)


def test_batch_zero_and_lq_not_lk():
    program = maskc.compile("xattention(b = 8, s = 4)")
    q = torch.randn(0, 2, 16, 8)
    assert program(q, q, q).shape == (0, 2, 16, 8)
    # the schedule of a batch of no sequences visits nothing (it crashed reshaping and dividing by 0)
    empty = torch.randn(0, 2, 300, 8)
    for spec in ("xattention", "quest", "moba", "sparge", "minference_vs(v = 4, s = 4)"):
        assert maskc.compile(spec).schedule(300, q=empty, k=empty, heads=2).visited_blocks() == 0
    q, k = _qk(1, 2, 40, 8, seed=2)
    v = torch.randn(1, 2, 40, 8, dtype=torch.float64)
    out = program(q[:, :, 24:], k, v, backend="cpu")
    torch.testing.assert_close(out, program.reference(q[:, :, 24:], k, v))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("spec", "message", "where"),
    [
        ("route(topk = 2, mass = 0.5, block = 8)", "takes one selector, got topk and mass", "mass = 0.5"),
        ("route(block = 8)", "needs a selector", "route(block = 8)"),
        ("route(topk = 1, block = 8, stride = 4)", 'needs score = "antidiagonal"', "stride = 4"),
        ('route(topk = 1, block = 8, score = "avg")', "must be one of", 'score = "avg"'),
        ('route(topk = 1, block = 8, score = "max", scores = s)', "not both", 'score = "max"'),
        ("route(mass = 0, block = 8)", "must be in (0, 1]", "mass = 0"),
        ('route(topk = 1, block = 6, score = "antidiagonal", stride = 4)', "multiple of its stride", "stride = 4"),
        (
            'route(topk = 1, block = (2, 2), score = "antidiagonal", stride = 2) on grid(4, 4)',
            "1-D sequence",
            'score = "antidiagonal"',
        ),
    ],
)
def test_bad_combinations_are_located(spec, message, where):
    with pytest.raises(maskc.MaskError) as info:
        maskc.compile(spec).mask(16, q=torch.randn(1, 1, 16, 4), k=torch.randn(1, 1, 16, 4))
    e = info.value
    assert message in str(e)
    assert e.line == 1 and spec[e.column - 1 :].startswith(where), (e.line, e.column)


def test_wrong_scores_tensor_names_the_binding():
    program = maskc.compile("seer(b = 8)")
    with pytest.raises(
        maskc.MaskError, match=r"tensor 'gate' \(route block scores\) must have shape \[batch, 2, 3, 3\]"
    ):
        program.mask(24, heads=2, gate=torch.randn(1, 2, 3, 4))
    with pytest.raises(maskc.MaskError, match="floating point"):
        program.mask(24, heads=2, gate=torch.ones(1, 2, 3, 3, dtype=torch.long))
