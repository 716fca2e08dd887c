"""One tile policy (runtime/tuning.py) decides the blocks every backend schedules with,
and `Program.schedule` without block sizes shows the schedule the default backend runs."""

from __future__ import annotations

import pytest
import torch
from maskc.codegen import plan, tiles
from maskc.dsl.errors import MaskTypeError
from maskc.runtime.prepare import prepared_for
from maskc.runtime.tuning import POLICY, Tiles

import maskc


def forms_of(spec: str, lq: int = 256, **sizes):
    program = maskc.compile(spec)
    return program, plan.normal_forms(program.instantiate(lq, **sizes))


@pytest.mark.parametrize(("lq", "block_q"), [(1, 1), (5, 8), (20, 32), (64, 64), (1000, 64)])
def test_cpu_blocks_follow_the_rows(lq, block_q):
    program, forms = forms_of("causal", lq)
    assert POLICY.choose("cpu", forms, program.source(), torch.float32, 64, lq, "cpu") == Tiles(block_q, 64)


def test_flex_blocks():
    program, forms = forms_of("causal")
    assert POLICY.choose("flex", forms, program.source(), torch.float16, 64, 256, "cpu") == Tiles(128, 128)


@pytest.mark.parametrize(
    ("spec", "head_dim", "lq"),
    [
        ("causal", 64, 256),
        ("causal", 128, 256),  # wide heads
        ("causal", 64, 8),  # decoding: short query tiles
        ("pattern p(t: tensor) = causal with bias(t)", 64, 256),  # heavy modifiers
    ],
)
def test_triton_under_the_interpreter_runs_the_ladders_first_rung(spec, head_dim, lq):
    program, forms = forms_of(spec, lq)
    chosen = POLICY.choose("triton", forms, program.source(), torch.float16, head_dim, lq, "cpu")
    first = tiles.config(head_dim, lq, tiles.heavy_forms(forms))
    assert chosen == Tiles(first.block_q, first.block_k, first)


def test_no_schedule_for_the_reference():
    program, forms = forms_of("causal")
    with pytest.raises(MaskTypeError, match="runs no block schedule"):
        POLICY.choose("reference", forms, program.source(), torch.float32, 64, 256, "cpu")
    with pytest.raises(MaskTypeError, match="runs no block schedule"):
        program.schedule(256, backend="reference")


@pytest.mark.parametrize("backend", ["cpu", "triton", "flex"])
def test_a_call_runs_the_schedule_program_schedule_shows(backend):
    """The blocks of a call's preparation are those of `Program.schedule(backend=...)`,
    and the schedules are the same."""
    program = maskc.compile("causal & window(40) | sink(2)")
    q = torch.randn(1, 2, 200, 32)
    prepared = prepared_for(program, backend, q, q, q, None, {})
    shown = program.schedule(200, heads=2, backend=backend, head_dim=32)
    assert (shown.block_q, shown.block_k) == (prepared.block_q, prepared.block_k)
    assert torch.equal(shown.to_dense(), prepared.schedule.to_dense())
    if backend == "triton":  # the kernels' configuration comes with the blocks
        assert (prepared.tiles.kernel.block_q, prepared.tiles.kernel.block_k) == (prepared.block_q, prepared.block_k)


def test_the_default_schedule_is_the_default_backends():
    program = maskc.compile("causal")
    backend = "triton" if torch.cuda.is_available() else "cpu"
    assert program.schedule(512).block_q == program.schedule(512, backend=backend).block_q
    if backend == "cpu":
        assert (program.schedule(512).block_q, program.schedule(512).block_k) == (64, 64)
        assert program.schedule(20).block_q == 32  # a query block no taller than the rows
    # blocks given by hand win, one or both
    assert program.schedule(512, block_q=16).block_q == 16
    assert (program.schedule(512, block_q=32, block_k=128).block_k) == 128
