"""Attention dropout (`dropout_p`) on the CPU executor and the Triton kernels.

The keep mask is a counter-based hash of (seed, batch, head, absolute query and
key positions), written in torch (runtime/dropout.py) and in Triton
(codegen/kernel_template.py) with the same bits, so every backend equals the
dense reference given the same seed, forward and backward.  The seed is drawn
from torch's default generator when the forward runs (`dropout_seed()` draws it
the same way).  Triton runs under the interpreter: shapes are tiny, and most
Triton checks use 16 x 16 blocks (several blocks per row, cheap to interpret).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from maskc.runtime import execute, triton_backend
from maskc.runtime.dropout import Dropout, dense_keep, keep_mask
from maskc.runtime.prepare import prepare

import maskc
from maskc.program import dropout_seed

TOL = {"atol": 2e-5, "rtol": 2e-5}
B, H, HK, D = 2, 4, 2, 8  # GQA: two query heads per key/value head


def qkv(lq: int, lk: int | None = None, seed: int = 0, heads: int = H, kv_heads: int = HK):
    gen = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    q = torch.randn(B, heads, lq, D, generator=gen, requires_grad=True)
    k = torch.randn(B, kv_heads, lk, D, generator=gen, requires_grad=True)
    v = torch.randn(B, kv_heads, lk, D, generator=gen, requires_grad=True)
    return q, k, v


def assert_grads_match(out, ref, inputs) -> None:
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    got = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(ref, inputs, dout)
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"d{name}: {m}")


# ---------------------------------------------------------------- the keep mask


# The generated module's helpers, bound by the test below (the interpreter reads globals).
_dropout_row = _dropout_keep = None


@triton.jit
def _keep_kernel(Out, QPos, KPos, seed, b, h, threshold, M: tl.constexpr, N: tl.constexpr):  # noqa: N803
    qpos = tl.load(QPos + tl.arange(0, M))[:, None]
    kpos = tl.load(KPos + tl.arange(0, N))[None, :]
    kept = _dropout_keep(_dropout_row(seed, b, h, qpos), kpos, threshold)
    tl.store(Out + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :], kept.to(tl.int32))


def test_triton_hash_has_the_same_bits_as_torch(monkeypatch):
    """The kernels' `_dropout_row` / `_dropout_keep` against runtime/dropout.py, over seeds,
    batch and head indices and positions of both signs (a query offset can be negative)."""
    source = triton_backend.kernel_source(prepare(maskc.compile("causal"), *qkv(4)[:2], 16, 16, None, {}), 0)
    module = triton_backend.kernel_module(source, torch.float32, interpret=True)
    monkeypatch.setitem(globals(), "_dropout_row", module._dropout_row)
    monkeypatch.setitem(globals(), "_dropout_keep", module._dropout_keep)
    qpos = torch.tensor([-(2**31), -70000, -3, -1, 0, 1, 2, 63, 64, 65, 4095, 100003, 2**20, 2**30, 2**31 - 1, 7])
    kpos = torch.cat([torch.arange(24), torch.tensor([10**5, 2**24 + 1, 2**31 - 1, -5, 99, 1000, 4096, 31])])
    for seed, b, h, p in [(0, 0, 0, 0.5), (2**31 - 2, 3, 31, 0.1), (123456789, 1, 2, 0.9), (7, 0, 5, 0.0001)]:
        dropout = Dropout(p, seed)
        out = torch.empty(qpos.numel(), kpos.numel(), dtype=torch.int32)
        qp, kp = qpos.to(torch.int32), kpos.to(torch.int32)
        _keep_kernel[(1,)](out, qp, kp, seed, b, h, dropout.threshold, M=qpos.numel(), N=kpos.numel())
        want = keep_mask(dropout, b, h, qpos[:, None], kpos[None, :])
        assert torch.equal(out.bool(), want), (seed, b, h, p)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_is_one_minus_p(p):
    """Over n pairs the kept count is binomial(n, 1 - p) (up to 2**-31 of threshold rounding):
    the fraction lies within 5 standard deviations, sqrt(p (1 - p) / n), of 1 - p.  So does the
    fraction of adjacent pairs both kept, (1 - p)**2: neighbouring keys are not correlated."""
    qpos, kpos = torch.arange(-32, 224), torch.arange(256)
    keep = dense_keep(Dropout(p, seed=20240601), 2, 4, qpos, kpos)
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # Adjacent pairs share a key, so their indicators are correlated: per pair the variance is
    # q^2 (1 - q^2) plus twice the covariance with the next pair, q^3 - q^4 (q = 1 - p).
    both = keep[..., 1:] & keep[..., :-1]
    q = 1 - p
    sigma_pair = math.sqrt((q**2 * (1 - q**2) + 2 * (q**3 - q**4)) / both.numel())
    assert abs(both.float().mean().item() - q**2) < 5 * sigma_pair
    # every (batch, head) slice sees its own mask
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


def test_seed_comes_from_the_default_generator():
    torch.manual_seed(3)
    a = dropout_seed()
    torch.manual_seed(3)
    assert dropout_seed() == a and dropout_seed() != a
    assert 0 <= a < 2**31 - 1


# ---------------------------------------------------------------- CPU executor

CPU_CASES = [
    # spec, lq, lk, q_offset: lengths not multiples of the 64-token blocks
    ("causal & window(24)", 100, None, None),
    ("causal", 70, None, None),
    ("causal & window(30)", 37, 101, 64),  # decoding-like chunk after cached keys
]


@pytest.mark.parametrize(("spec", "lq", "lk", "q_offset"), CPU_CASES)
def test_cpu_matches_reference_forward_and_backward(spec, lq, lk, q_offset):
    program = maskc.compile(spec)
    q, k, v = qkv(lq, lk)
    torch.manual_seed(11)
    seed = dropout_seed()
    torch.manual_seed(11)
    out, lse = program(q, k, v, backend="cpu", dropout_p=0.3, q_offset=q_offset, return_lse=True)
    ref, ref_lse = program.reference(q, k, v, dropout_p=0.3, dropout_seed=seed, q_offset=q_offset, return_lse=True)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    # the log-sum-exp is the undropped softmax's
    torch.testing.assert_close(lse, program(q, k, v, backend="cpu", q_offset=q_offset, return_lse=True)[1], **TOL)
    assert not torch.allclose(out, program.reference(q, k, v, q_offset=q_offset), **TOL)  # something was dropped
    assert_grads_match(out, ref, (q, k, v))


def test_cpu_same_seed_same_output_other_seed_differs():
    program = maskc.compile("causal & window(24)")
    q, k, v = qkv(70)
    torch.manual_seed(0)
    a = program(q, k, v, backend="cpu", dropout_p=0.2)
    torch.manual_seed(0)
    b = program(q, k, v, backend="cpu", dropout_p=0.2)
    c = program(q, k, v, backend="cpu", dropout_p=0.2)  # the generator moved on: another seed
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_mask_ignores_layout_and_block_sizes():
    """Positions are the original tokens', so a tiled layout (tokens permuted into 2-D tiles)
    and other block sizes keep the same pairs: equal to the reference with the seed."""
    program = maskc.compile("natten2d", k=3)
    q, k, v = qkv(64)
    dropout = Dropout(0.25, seed=77)
    ref = program.reference(q, k, v, dropout_p=0.25, dropout_seed=77, h=8, w=8)
    for blocks, layout in (((16, 16), "tiled"), ((32, 64), "rowmajor")):
        prepared = prepare(program, q, k, *blocks, None, {"h": 8, "w": 8}, layout=layout)
        assert (prepared.perm_q is not None) == (layout == "tiled")
        out, _ = execute.run_prepared("cpu", q, k, v, prepared, 1 / math.sqrt(D), dropout)
        torch.testing.assert_close(out, ref, **TOL)


def test_p_zero_takes_todays_path(monkeypatch):
    """dropout_p=0 draws no seed and runs the fused CPU path (no generic path), with the
    same result as a call without dropout_p."""
    from maskc.runtime import cpu

    program = maskc.compile("causal & window(24)")
    q, k, v = qkv(70)
    plain = program(q, k, v, backend="cpu")

    def no_generic(*args, **kwargs):
        raise AssertionError("the generic path ran")

    monkeypatch.setattr(cpu.generic, "attention", no_generic)
    state = torch.get_rng_state()
    out = program(q, k, v, backend="cpu", dropout_p=0.0)
    out.sum().backward()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(out, plain)


def test_reference_backend_and_one_shot_attention_drop_alike():
    q, k, v = qkv(50)
    torch.manual_seed(4)
    cpu = maskc.attention(q, k, v, "causal & window(16)", dropout_p=0.4)
    torch.manual_seed(4)
    ref = maskc.compile("causal & window(16)")(q, k, v, backend="reference", dropout_p=0.4)
    torch.testing.assert_close(cpu, ref, **TOL)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), True, "0.1", None])
def test_bad_p_raises(p):
    program = maskc.compile("causal")
    q, k, v = qkv(8)
    for backend in ("cpu", "triton", "reference"):
        with pytest.raises(maskc.MaskTypeError, match="dropout_p"):
            program(q, k, v, backend=backend, dropout_p=p)
    with pytest.raises(maskc.MaskTypeError, match="dropout_p"):
        program.reference(q, k, v, dropout_p=p)


def test_backends_without_dropout_raise():
    q, k, v = qkv(16)
    with pytest.raises(maskc.MaskTypeError, match="flex"):
        maskc.compile("causal")(q, k, v, backend="flex", dropout_p=0.1)
    program = maskc.compile("cluster(2, size = 8)")
    centroids = torch.randn(H, 2, D, generator=torch.Generator().manual_seed(1))
    for backend in ("cpu", "triton"):
        with pytest.raises(maskc.MaskTypeError, match="clustered"):
            program(q, k, v, backend=backend, dropout_p=0.1, centroids=centroids)


# ---------------------------------------------------------------- Triton (interpreter)

TRITON_CASES = [
    # spec, lq, lk, q_offset on 16 x 16 blocks: several blocks per row, ragged last ones
    ("causal & window(10)", 37, None, None),
    ("causal", 21, 37, 16),
]


@pytest.mark.parametrize(("spec", "lq", "lk", "q_offset"), TRITON_CASES)
def test_triton_kernels_match_reference(spec, lq, lk, q_offset):
    program = maskc.compile(spec)
    q, k, v = qkv(lq, lk, heads=2, kv_heads=1)
    scale = 1 / math.sqrt(D)
    prepared = prepare(program, q, k, 16, 16, q_offset, {})
    out, lse = triton_backend.triton_attention(q, k, v, prepared, scale, Dropout(0.3, 1234))
    ref, ref_lse = program.reference(q, k, v, dropout_p=0.3, dropout_seed=1234, q_offset=q_offset, return_lse=True)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    assert_grads_match(out, ref, (q, k, v))
    if q_offset is None:  # once: the same seed gives the same output, another seed another
        with torch.no_grad():
            again, _ = triton_backend.triton_attention(q, k, v, prepared, scale, Dropout(0.3, 1234))
            other, _ = triton_backend.triton_attention(q, k, v, prepared, scale, Dropout(0.3, 1235))
        assert torch.equal(again, out.detach())
        assert not torch.equal(other, out.detach())


def test_triton_through_the_program():
    """The default tiles, the seed drawn by the call (the same way for every backend): equal to
    the reference and to the CPU executor with the same seed, forward and backward."""
    program = maskc.compile("causal & window(10)")
    q, k, v = qkv(37, heads=2, kv_heads=1)
    torch.manual_seed(21)
    seed = dropout_seed()
    torch.manual_seed(21)
    out = program(q, k, v, backend="triton", dropout_p=0.2)
    ref = program.reference(q, k, v, dropout_p=0.2, dropout_seed=seed)
    torch.testing.assert_close(out, ref, **TOL)
    assert_grads_match(out, ref, (q, k, v))
    torch.manual_seed(21)
    torch.testing.assert_close(program(q, k, v, backend="cpu", dropout_p=0.2), out, **TOL)


# ---------------------------------------------------------------- torch.compile


def test_compiled_training_step_matches_eager():
    """A training step (projection, maskc attention with dropout, loss, backward) compiled with
    inductor equals the eager step under the same torch.manual_seed: the compiled op draws its
    seed from the default generator when it runs, like the eager call."""
    torch._dynamo.reset()
    program = maskc.compile("causal & window(24)")
    proj = torch.nn.Linear(D, 3 * D)
    x = torch.randn(B, 70, D, generator=torch.Generator().manual_seed(2))

    def step(x):
        q, k, v = proj(x).view(B, 70, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        out = program(q, k, v, backend="cpu", dropout_p=0.25)
        return F.mse_loss(out, torch.ones_like(out))

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        torch.manual_seed(8)
        steps = []
        for _ in range(2):  # two steps: each draws a new seed
            proj.zero_grad()
            loss = fn(x)
            loss.backward()
            steps.append((loss.detach(), [p.grad.clone() for p in proj.parameters()]))
        results.append(steps)
    for (eager_loss, eager_grads), (loss, grads) in zip(*results, strict=True):
        torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-5)
        for a, b in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.equal(results[0][0][0], results[0][1][0])  # the two steps dropped differently
    torch._dynamo.reset()
