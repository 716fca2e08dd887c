"""Content-dependent and structured patterns: route, cluster, polyline (issue 5).

Kernels (Triton under the interpreter, and the CPU executor) are compared with
the dense reference; polyline's alpha/beta gradients are also checked in
float64 against autograd through the dense reference.  fp32 tolerance: 2e-5.
"""

from __future__ import annotations

import pytest
import torch

import maskc

BACKENDS = ["triton", "cpu"]
POLYLINE = 'pattern p(alpha: tensor, beta: tensor) on grid(h, w) = {base} with polyline(alpha, beta, path = "{path}")'


def _qkv(b, h, lq, d, kv_heads=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=dtype)
    k = torch.randn(b, kv_heads or h, lq, d, generator=g, dtype=dtype)
    v = torch.randn(b, kv_heads or h, lq, d, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _decays(b, h, rows, cols, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    alpha = -torch.rand(b, h, rows, cols, generator=g, dtype=dtype) * 0.5
    beta = -torch.rand(b, h, rows, cols, generator=g, dtype=dtype) * 0.5
    return alpha.requires_grad_(), beta.requires_grad_()


def _assert_grads(out, ref, leaves, atol=2e-5):
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, leaves, grad)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m, i=i: f"input {i}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "base,path",
    [("all", "hv"), ("all", "vh"), ("neighborhood((3, 5))", "hv"), ("causal & window((1, 2))", "vh")],
)
def test_polyline_forward_and_all_gradients(backend, base, path):
    program = maskc.compile(POLYLINE.format(base=base, path=path))
    q, k, v = _qkv(2, 2, 6 * 7, 16)
    alpha, beta = _decays(2, 2, 6, 7)
    out = program(q, k, v, backend=backend, alpha=alpha, beta=beta, h=6, w=7)
    ref = program.reference(q, k, v, alpha=alpha, beta=beta, h=6, w=7)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    _assert_grads(out, ref, (q, k, v, alpha, beta))


@pytest.mark.parametrize("backend", BACKENDS)
def test_polyline_broadcast_decays_and_gqa(backend):
    program = maskc.compile(POLYLINE.format(base="all", path="hv"))
    q, k, v = _qkv(2, 4, 5 * 4, 16, kv_heads=2)
    alpha, beta = _decays(1, 4, 5, 4)  # one decay map for the whole batch
    out = program(q, k, v, backend=backend, alpha=alpha, beta=beta, h=5, w=4)
    ref = program.reference(q, k, v, alpha=alpha, beta=beta, h=5, w=4)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    _assert_grads(out, ref, (q, k, v, alpha, beta))


def _ppma_dense(q, k, v, alpha, beta, rows, cols, path):
    """PPMA straight from its definition: logits + M, M summed along the polyline."""
    n = rows * cols
    y = [i // cols for i in range(n)]
    x = [i % cols for i in range(n)]
    m = torch.zeros(*alpha.shape[:2], n, n, dtype=alpha.dtype)
    for i in range(n):
        for j in range(n):
            y1, x1, y2, x2 = y[i], x[i], y[j], x[j]
            row, col = (y1, x2) if path == "hv" else (y2, x1)
            horizontal = alpha[:, :, row, min(x1, x2) + 1 : max(x1, x2) + 1].sum(-1)
            vertical = beta[:, :, min(y1, y2) + 1 : max(y1, y2) + 1, col].sum(-1)
            m[:, :, i, j] = horizontal + vertical
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + m
    return torch.softmax(scores, -1) @ v


def test_polyline_decay_gradients_float64_against_dense_autograd():
    """Gradients of alpha and beta through the CPU executor in float64 equal
    autograd through PPMA's dense N x N computation."""
    rows, cols = 3, 4
    program = maskc.compile(POLYLINE.format(base="all", path="vh"))
    q, k, v = _qkv(1, 2, rows * cols, 8, dtype=torch.float64)
    alpha, beta = _decays(1, 2, rows, cols, dtype=torch.float64)
    out = program(q, k, v, backend="cpu", alpha=alpha, beta=beta, h=rows, w=cols)
    ref = _ppma_dense(q, k, v, alpha, beta, rows, cols, "vh")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    _assert_grads(out, ref, (alpha, beta), atol=1e-10)


def test_polyline_triton_decay_gradients_against_float64_dense():
    rows, cols = 3, 5
    program = maskc.compile(POLYLINE.format(base="all", path="hv"))
    q, k, v = _qkv(1, 2, rows * cols, 16)
    alpha, beta = _decays(1, 2, rows, cols)
    out = program(q, k, v, backend="triton", alpha=alpha, beta=beta, h=rows, w=cols)
    grad = torch.randn_like(out)
    da, db = torch.autograd.grad(out, (alpha, beta), grad)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, alpha, beta)]
    ref = _ppma_dense(*leaves64, rows, cols, "hv")
    ra, rb = torch.autograd.grad(ref, leaves64[3:], grad.double())
    torch.testing.assert_close(da.double(), ra, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db.double(), rb, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- route


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "spec,sizes",
    [
        ("route(topk = 2, block = 16)", {}),
        ("causal & route(topk = 2, block = 16, own = true, causal = true)", {}),
        ("route(topk = 3, block = 8, shared = false) | window(4)", {}),
        ("route(topk = 2, block = (4, 4)) on grid(h, w)", {"h": 8, "w": 12}),
    ],
)
def test_route_forward_and_gradients(backend, spec, sizes):
    program = maskc.compile(spec)
    q, k, v = _qkv(2, 2, 96, 16)
    out = program(q, k, v, backend=backend, **sizes)
    ref = program.reference(q, k, v, **sizes)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    _assert_grads(out, ref, (q, k, v))


def test_route_selection_keeps_topk_blocks_per_query_block():
    program = maskc.compile("route(topk = 3, block = 16)")
    q, k, _ = _qkv(1, 1, 128, 8)
    dense = program.mask(128, q=q, k=k)[0, 0]
    blocks = dense.view(8, 16, 8, 16).any(3).any(1)  # [q blocks, k blocks]
    assert torch.all(blocks.sum(1) == 3)
    # Whole blocks: a selected block pair is allowed for every token pair.
    assert torch.equal(dense, blocks.repeat_interleave(16, 0).repeat_interleave(16, 1))


# ----------------------------------------------------------------- cluster


@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_forward_and_gradients(backend):
    program = maskc.compile("cluster(3, size = 30)")
    q, k, v = _qkv(2, 2, 80, 16)
    centroids = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(5))
    out = program(q, k, v, backend=backend, centroids=centroids)
    ref = program.reference(q, k, v, centroids=centroids)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    _assert_grads(out, ref, (q, k, v))


CLUSTER_CASES = [
    # spec, lq, lk, kv_heads: overlapping clusters (90 slots over 80 tokens), causal on true
    # positions, a static window, more than 63 clusters (two words of membership bits),
    # cross attention with lq != lk, grouped kv heads, per-head data in the static part;
    # most queries of the sparse ones belong to no cluster (rows without keys)
    ("cluster(3, size = 30)", 80, 80, None),
    ("causal & cluster(4, size = 16)", 64, 64, None),
    ("cluster(5, size = 12) & window(20)", 70, 70, 1),
    ("cluster(70, size = 3)", 90, 90, 1),
    ("causal & cluster(3, size = 10)", 24, 56, None),
    ("cluster(3, size = 24) & random(3, block = 8)", 64, 64, None),  # per-head random draws
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec,lq,lk,kv_heads", CLUSTER_CASES)
def test_clustered_execution_matches_reference(backend, spec, lq, lk, kv_heads):
    from maskc.runtime import execute
    from maskc.runtime.prepare import prepared_for

    program = maskc.compile(spec)
    g = torch.Generator().manual_seed(3)
    # the CPU path in float64 (tolerance 1e-10), the Triton kernels in float32 (2e-5)
    dtype, tol = (torch.float64, 1e-10) if backend == "cpu" else (torch.float32, 2e-5)
    q = torch.randn(2, 2, lq, 16, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads or 2, lk, 16, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(2, kv_heads or 2, lk, 16, generator=g, dtype=dtype, requires_grad=True)
    clusters = int(spec.split("cluster(")[1].split(",")[0])
    centroids = torch.randn(2, clusters, 16, generator=g, dtype=dtype)
    bindings = {"q": q, "k": k, "centroids": centroids}
    prepared = prepared_for(program, backend, q, k, v, None, bindings)
    assert execute.clustered_heads(backend, prepared) is not None  # gathered, not the block schedule
    out, lse = program(q, k, v, backend=backend, centroids=centroids, return_lse=True)
    ref, ref_lse = program.reference(q, k, v, centroids=centroids, return_lse=True)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=1e-5)  # lse is float32
    assert torch.isinf(ref_lse).any() or "size = 30" in spec or "size = 16" in spec
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_clustered_triton_kernels_run_gathered_and_bf16_matches():
    """The Triton backend runs clusters through its generated kernels over the
    gathered rows (the emitted predicate reads the clusters table)."""
    from maskc.runtime import clustered_triton

    program = maskc.compile("causal & cluster(4, size = 20)")
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 70, 32, generator=g).bfloat16().float() for _ in range(3))  # exact in bf16
    centroids = torch.randn(2, 4, 32, generator=g)
    calls = []
    real = clustered_triton.triton_backend.triton_attention

    def spy(*args):
        calls.append(args[3])
        return real(*args)

    clustered_triton.triton_backend.triton_attention = spy
    try:
        out = program(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="triton", centroids=centroids)
    finally:
        clustered_triton.triton_backend.triton_attention = real
    assert len(calls) == 1 and "clusters" in calls[0].extra_tables
    assert "gathered into cluster order" in calls[0].artifacts.kernel_sources[0].text
    ref = program.reference(q, k, v, centroids=centroids)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_in_a_union_runs_on_the_block_schedule(backend):
    from maskc.runtime import execute
    from maskc.runtime.prepare import prepared_for

    program = maskc.compile("cluster(3, size = 20) | window(2)")
    q, k, v = _qkv(1, 2, 48, 16)
    centroids = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(5))
    prepared = prepared_for(program, backend, q, k, v, None, {"q": q, "k": k, "centroids": centroids})
    assert execute.clustered_heads(backend, prepared) is None
    out = program(q, k, v, backend=backend, centroids=centroids)
    ref = program.reference(q, k, v, centroids=centroids)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    _assert_grads(out, ref, (q, k, v))


def test_sparse_attention_keeps_centroids_and_updates_them_in_training():
    attn = maskc.SparseAttention("causal & cluster(4, size = 16)", backend="cpu")
    q, k, v = _qkv(1, 2, 64, 8)
    attn.eval()
    first = attn(q, k, v)
    frozen = attn.centroids.clone()
    second = attn(q, k, v)
    assert torch.equal(first, second) and torch.equal(attn.centroids, frozen)
    ref = attn.program.reference(q, k, v, centroids=frozen)
    torch.testing.assert_close(first, ref, atol=2e-5, rtol=2e-5)
    attn.train()
    attn(q, k, v)
    assert not torch.equal(attn.centroids, frozen)
    torch.testing.assert_close(attn.centroids.norm(dim=-1), torch.ones(2, 4))


def test_polyline_attention_module_matches_ppma():
    torch.manual_seed(0)
    module = maskc.PolylineAttention(2, backend="triton")
    q, k, v = _qkv(1, 2, 12, 16)
    dt_alpha, dt_beta = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    out = module(q, k, v, dt_alpha, dt_beta, h=3, w=4)
    alpha, beta = module.decays(dt_alpha, dt_beta)
    assert (alpha <= 0).all() and (beta <= 0).all()
    ref = 0.5 * (_ppma_dense(q, k, v, alpha, beta, 3, 4, "hv") + _ppma_dense(q, k, v, alpha, beta, 3, 4, "vh"))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    _assert_grads(out, ref, (q, k, v, module.dt_bias, module.A_log))
