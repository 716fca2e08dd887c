"""The registry through which the `maskc::attention` op finds programs.

Programs are keyed by their canonical text and fixed parameters and held
weakly: one-shot `maskc.attention` calls must not accumulate programs, equal
programs share a key, and a key alone rebuilds a program that was collected
(a compiled graph keeps only the key).
"""

from __future__ import annotations

import gc
import math
import tracemalloc
import weakref

import torch
from maskc.runtime import op, registry

import maskc

SPEC = "causal & window(8)"


def qkv(length: int = 24, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, length, 8, generator=gen, requires_grad=requires_grad) for _ in range(3))


def test_one_shot_calls_keep_no_program_alive():
    """1,000 calls of `maskc.attention`: the registry and the traced memory stay flat."""
    q, k, v = qkv()
    for _ in range(100):  # warm every cache a call fills once
        maskc.attention(q, k, v, SPEC)
    gc.collect()
    before = len(registry.PROGRAMS)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(1000):
            maskc.attention(q, k, v, SPEC)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(registry.PROGRAMS) <= before
    # A kept program costs kilobytes (its syntax tree, spec, schedule): 1,000 would be megabytes.
    assert grown < 256 * 1024, grown


def test_a_dropped_program_is_collected():
    program = maskc.compile(SPEC)
    program(*qkv())
    ref = weakref.ref(program)
    del program
    gc.collect()
    assert ref() is None


def test_equal_programs_share_a_key():
    assert maskc.compile("causal&window( 8 )").key == maskc.compile(SPEC).key
    assert maskc.compile("causal & window(9)").key != maskc.compile(SPEC).key
    local = "pattern w(n = 4) = causal & window(n)"
    assert maskc.compile(local, n=8).key != maskc.compile(local, n=9).key
    assert maskc.compile(local, n=8).key != maskc.compile(local).key
    # The text of a called definition is part of the key.
    calls = "pattern band = window({})\npattern p = causal & band"
    assert maskc.compile(calls.format(3), pattern="p").key != maskc.compile(calls.format(5), pattern="p").key


def test_a_collected_program_is_rebuilt_from_its_key():
    """What a compiled graph does: call the op with only the key of a program that is gone."""
    text = "pattern band(w = 2) = window(w)\npattern p(n = 4) = causal & band(n)\npattern unused = all"
    program = maskc.compile(text, pattern="p", n=6)
    q, k, v = qkv(40)
    want = program.reference(q, k, v)
    key = program.key
    del program
    gc.collect()
    assert key not in registry.PROGRAMS
    out, _ = op.attention_op(q, k, v, key, "cpu", 1 / math.sqrt(8), None, "", [], "", [])
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    rebuilt = registry.program_for(key)
    assert rebuilt.key == key and rebuilt.params == {"n": 6}


def test_library_pattern_key_rebuilds_it():
    program = maskc.compile("natten2d", k=3)
    rebuilt = registry.rebuilt(program.key)
    assert rebuilt is not program and rebuilt.key == program.key
    q, k, v = qkv(36)
    torch.testing.assert_close(rebuilt(q, k, v, h=6, w=6), program.reference(q, k, v, h=6, w=6), atol=2e-5, rtol=2e-5)


def test_backward_of_a_one_shot_call_after_its_program_is_gone():
    q, k, v = qkv(40, requires_grad=True)
    out = maskc.attention(q, k, v, "causal & window(5) with softcap(3)", backend="cpu")
    gc.collect()
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = maskc.compile("causal & window(5) with softcap(3)").reference(q, k, v)
    for got, want in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_inference_mode_tensor_bindings_run_and_are_not_cached():
    """Inference tensors have no version counter: ids made under torch.inference_mode
    work, and a later in-place change to them is seen (the schedule is not kept)."""
    program = maskc.compile("documents_causal")
    q = torch.randn(1, 2, 40, 8)
    with torch.inference_mode():
        ids = torch.zeros(1, 40, dtype=torch.long)
        first = program(q, q, q, ids=ids)
        torch.testing.assert_close(first, program.reference(q, q, q, ids=ids))
        ids[:, 20:] = 1  # in place, unseen by any version counter
        second = program(q, q, q, ids=ids)
        torch.testing.assert_close(second, program.reference(q, q, q, ids=ids))
    assert not torch.allclose(first, second)


def test_fake_kernel_types_the_lse_like_the_real_one():
    """The op's fake kernel (what torch.compile traces with) and its real kernel agree: the
    log-sum-exp is float32, float64 for float64 inputs."""
    from maskc.runtime.call import Call

    program = maskc.compile(SPEC)
    for dtype in (torch.float32, torch.float64):
        q, k, v = (x.to(dtype) for x in qkv(20))
        args = (q, k, v, *Call(program.key, "cpu", 8**-0.5, None, "", "", ()).op_args([]))
        _, lse = op.attention_op(*args)
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.library.opcheck(op.attention_op, args, test_utils=("test_faketensor",))
