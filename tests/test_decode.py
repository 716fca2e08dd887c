"""`Program.decode`: a few queries per sequence against a fixed-capacity KV cache.

Every step is compared with the dense reference on that sequence's cache prefix
(`program.reference(q[b], k[b, :, :key_length], ..., q_offset=position)`).
"""

from __future__ import annotations

import pytest
import torch
from maskc.dsl.errors import MaskTypeError
from maskc.runtime import decode as decoding

import maskc

torch.manual_seed(0)


def check_step(program, q, k, v, positions, key_lengths=None, atol=2e-5, backend="auto", **bindings):
    out, lse = program.decode(q, k, v, positions, key_lengths=key_lengths, backend=backend, return_lse=True, **bindings)
    rows = q.shape[2]
    for b in range(q.shape[0]):
        position = int(positions[b]) if isinstance(positions, torch.Tensor) else positions
        length = position + rows if key_lengths is None else int(key_lengths[b])
        if length == 0:  # no keys: rows of zeros, like SDPA over an empty key set
            assert torch.equal(out[b], torch.zeros_like(out[b])) and bool((lse[b] == -torch.inf).all())
            continue
        row = {}
        for name, x in bindings.items():
            if isinstance(x, torch.Tensor) and x.dim() == 2:  # ids over the capacity: this sequence's prefix
                x = x[b : b + 1, :length]
            row[name] = x
        ref, ref_lse = program.reference(
            q[b : b + 1].float(),
            k[b : b + 1, :, :length].float(),
            v[b : b + 1, :, :length].float(),
            q_offset=position,
            return_lse=True,
            **row,
        )
        torch.testing.assert_close(out[b : b + 1].float(), ref, atol=atol, rtol=atol)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(finite, torch.isfinite(lse[b : b + 1]))
        torch.testing.assert_close(lse[b : b + 1][finite], ref_lse[finite].float(), atol=atol, rtol=atol)
    return out


def cache(batch, kv_heads, capacity, dim, dtype=torch.float32, fused=False):
    """k and v caches; `fused`: views into one [B, C, 2, Hkv, D] buffer, as a fused
    projection writes them (non-contiguous, heads not outermost)."""
    if fused:
        kv = torch.randn(batch, capacity, 2, kv_heads, dim, dtype=dtype)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return torch.randn(batch, kv_heads, capacity, dim, dtype=dtype), torch.randn(
        batch, kv_heads, capacity, dim, dtype=dtype
    )


FAST = [
    ("mistral", {"w": 40}),
    ("streaming", {"sinks": 4, "w": 50}),
    ("causal", {}),
    ("sliding_window", {"w": 33}),
    ("prefix_lm", {"n": 70}),
    ("sparse_strided", {"l": 24}),
    ("block_diffusion", {"d": 16}),
    ("s2_attention", {"b": 16, "local": 2, "stride": 3}),
    ("pattern p() = mistral(w = 30) with alibi()", {}),
    ("pattern p() = causal with softcap(2.5)", {}),
]


@pytest.mark.parametrize("spec,params", FAST, ids=[s.split("(")[0] for s, _ in FAST])
def test_fast_patterns_match_the_reference(spec, params):
    program = maskc.compile(spec, **params)
    assert decoding.length_invariant(program, 4, {}), "this pattern should take the fast path"
    k, v = cache(3, 2, 300, 16, fused=True)
    for rows in (1, 5):
        q = torch.randn(3, 4, rows, 16).transpose(1, 2).contiguous().transpose(1, 2)  # GQA, strided
        check_step(program, q, k, v, torch.tensor([0, 137, 300 - rows]))


def test_chunks_across_tiles_and_blocks():
    """A chunk of 70 queries straddling a skeleton tile, keys shorter than the capacity."""
    program = maskc.compile("streaming", sinks=4, w=300)
    k, v = cache(2, 1, decoding.TILE + 200, 8)
    q = torch.randn(2, 2, 70, 8)
    positions = torch.tensor([decoding.TILE - 33, 500])
    check_step(program, q, k, v, positions, key_lengths=torch.tensor([decoding.TILE + 37, 570]))
    # keys not yet written past a short length: queries see only the first key_lengths keys
    check_step(program, q, k, v, positions, key_lengths=torch.tensor([10, 0]))


def test_segments_over_the_capacity_and_padding():
    """Left padding as segment ids over the whole cache, per sequence."""
    program = maskc.compile("pattern p(ids: tensor) = mistral(w = 20) & segments(ids)")
    capacity = 160
    ids = torch.zeros(2, capacity, dtype=torch.long)
    ids[1, :30] = -1 - torch.arange(30)  # 30 padded slots on the left
    k, v = cache(2, 2, capacity, 16)
    q = torch.randn(2, 2, 1, 16)
    for position in (31, 45, 159):
        check_step(program, q, k, v, torch.tensor([position, position]), ids=ids)


def test_half_precision_and_per_head_modifiers():
    spec = "pattern p(s: tensor) = causal & ~causal(-25) with alibi(s)"
    program = maskc.compile(spec)
    k, v = cache(1, 2, 200, 16, dtype=torch.bfloat16)
    q = torch.randn(1, 4, 2, 16, dtype=torch.bfloat16)
    check_step(program, q, k, v, 150, atol=2e-2, s=torch.tensor([0.5, 0.25, 0.125, 0.0625]))


@pytest.mark.parametrize(
    "spec,params",
    [("natten1d", {"k": 7}), ("bigbird", {"b": 16, "r": 1}), ("pattern p() = causal & ~causal(-lk // 2)", {})],
)
def test_length_dependent_patterns_fall_back_exactly(spec, params):
    program = maskc.compile(spec, **params)
    assert not decoding.length_invariant(program, 2, {})
    k, v = cache(2, 2, 96, 8)
    check_step(program, torch.randn(2, 2, 3, 8), k, v, torch.tensor([40, 93]))


@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_other_backends(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    program = maskc.compile("streaming", sinks=2, w=20)
    k, v = cache(2, 1, 80, 16)
    check_step(program, torch.randn(2, 2, 1, 16), k, v, torch.tensor([5, 79]), backend=backend)


def test_triton_steps_from_the_skeleton():
    """The generated kernels on a schedule read off the skeleton: a chunk across key
    blocks, segment ids over the capacity, a softcap, GQA, a strided cache."""
    pytest.importorskip("triton")
    program = maskc.compile("pattern p(ids: tensor) = mistral(w = 40) & segments(ids) with softcap(3.0)")
    capacity = 150
    ids = torch.zeros(2, capacity, dtype=torch.long)
    ids[0, :20] = -1 - torch.arange(20)
    k, v = cache(2, 1, capacity, 16, fused=True)
    q = torch.randn(2, 2, 6, 16)
    check_step(
        program, q, k, v, torch.tensor([60, 140]), key_lengths=torch.tensor([66, 150]), backend="triton", ids=ids
    )


def test_bad_steps_raise_clear_errors():
    program = maskc.compile("mistral", w=16)
    k, v = cache(2, 1, 32, 8)
    q = torch.randn(2, 1, 1, 8)
    with pytest.raises(MaskTypeError, match="positions\\[1\\] = 32"):
        program.decode(q, k, v, torch.tensor([0, 32]))
    with pytest.raises(MaskTypeError, match="key_lengths\\[0\\] = 33"):
        program.decode(q, k, v, 3, key_lengths=torch.tensor([33, 3]))
    with pytest.raises(MaskTypeError, match="3 entries for a batch of 2"):
        program.decode(q, k, v, torch.tensor([1, 2, 3]))
    with pytest.raises(MaskTypeError, match="positions must be integers"):
        program.decode(q, k, v, torch.tensor([1.0, 2.0]))
    with pytest.raises(MaskTypeError, match="no gradients"):
        program.decode(q.requires_grad_(), k, v, 4)


def test_batch_of_zero_and_empty_cache():
    program = maskc.compile("causal")
    k, v = cache(0, 1, 16, 8)
    assert program.decode(torch.randn(0, 2, 1, 8), k, v, 3).shape == (0, 2, 1, 8)
    k, v = cache(1, 1, 16, 8)
    out = program.decode(torch.randn(1, 1, 1, 8), k, v, 0, key_lengths=0)
    assert torch.equal(out, torch.zeros_like(out))


def test_skeletons_are_reused_across_steps():
    """One schedule per tile of positions, not per step (a strided pattern: windows and
    sinks need no schedule at all, their keys are computed as intervals)."""
    program = maskc.compile("sparse_strided", l=32)
    assert not decoding.is_intervals(program.instantiate(1, 64).patterns[0].mask)
    k, v = cache(1, 1, 3 * decoding.TILE, 8)
    q = torch.randn(1, 1, 1, 8)
    decoding._SKELETONS.clear()
    positions = range(100, 100 + 2 * decoding.TILE, 97)
    for position in positions:
        program.decode(q, k, v, position)
    tiles = [key for key in decoding._SKELETONS if len(key) > 4]
    assert len(tiles) == len({p // decoding.TILE for p in positions}) == 3


@pytest.mark.parametrize("spec,params", FAST[:5], ids=[s for s, _ in FAST[:5]])
def test_window_and_sink_patterns_take_the_interval_path(spec, params):
    """Their keys for one query are intervals computed in Python integers."""
    program = maskc.compile(spec, **params)
    instance = program.instantiate(1, 300, q_offset=150)
    mask = instance.patterns[0].mask
    assert decoding.is_intervals(mask)
    for q in (0, 1, 37, 150, 299):
        dense = program.mask(1, 300, q_offset=q)[0, 0]
        expected = torch.zeros(300, dtype=torch.bool)
        for a, b in decoding.key_intervals(mask, q, 300):
            expected[a:b] = True
        assert torch.equal(dense, expected), (q, decoding.key_intervals(mask, q, 300))


def test_compiled_decode_loop_does_not_recompile():
    """Positions are data: 256 steps with advancing positions compile once, and match eager."""
    program = maskc.compile("streaming", sinks=2, w=24)
    capacity, steps = 300, 256
    k_cache, v_cache = cache(2, 1, capacity, 8)
    queries = torch.randn(steps, 2, 2, 1, 8)

    def step(q, k, v, positions):
        return program.decode(q, k, v, positions) * 2

    compiled = torch.compile(step, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    start = torch.tensor([10, 37])
    for i in range(steps):
        positions = start + i
        out = compiled(queries[i], k_cache, v_cache, positions)
        if i % 51 == 0:
            torch.testing.assert_close(out, step(queries[i], k_cache, v_cache, positions))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1, f"compiled {frames} graphs for {steps} steps"
