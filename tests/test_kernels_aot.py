"""Generated kernels compile ahead of time for sm_80 and sm_90 without spilling.

`aot.check_program` walks the pattern's tile ladder (codegen/tiles.py) and
keeps the first configuration whose kernels compile without spill stores.

The whole library matrix (every pattern, forward and backward, fp16 and bf16,
head dims 64 and 128, sm_80 and sm_90) takes tens of minutes on two cores, so
it carries the `slow` mark: run it with `pytest -m slow tests/test_kernels_aot.py`.
The default run compiles one representative pattern.
"""

from __future__ import annotations

import pytest
import torch
from maskc.codegen import aot

import maskc
from maskc import patterns


def _example(name: str) -> tuple[int, dict[str, int]]:
    example = dict(patterns.entries()[name].example)
    lq = example.pop("lq", 1024)
    return lq, example


def test_representative_pattern_compiles_for_sm90_without_spills():
    program = maskc.compile("causal & window(256) | sink(4) with softcap(30.0)")
    tile, resources = aot.check_program(program, 1024, torch.float16, 64, 90)
    assert tile.block_q >= 16 and tile.block_k >= 16
    assert {r.kernel for r in resources} == set(aot.KERNELS)
    for r in resources:
        assert r.spill_stores == 0, r
        assert 0 < r.registers <= 255, r
        assert 0 < r.shared_bytes <= aot.shared_limit(90), r


@pytest.mark.slow
@pytest.mark.parametrize("name", patterns.names())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("arch", [80, 90])
def test_library_kernels_compile_without_spills(name, dtype, head_dim, arch):
    lq, sizes = _example(name)
    _, resources = aot.check_program(maskc.compile(name), lq, dtype, head_dim, arch, **sizes)
    assert resources
    for r in resources:
        assert r.spill_stores == 0, (name, r)
        assert r.shared_bytes <= aot.shared_limit(arch), (name, r)


def test_modifier_gradient_kernels_compile_for_sm90():
    """Polyline and bias gradients use atomics into float32 buffers: typed as pointers ahead of time."""
    program = maskc.compile(
        "pattern p(a: tensor, b: tensor, t: tensor) on grid(h, w) = all with polyline(a, b), bias(t)"
    )
    _, resources = aot.check_program(program, 64, torch.float16, 64, 90, h=8, w=8)
    assert all(r.spill_stores == 0 for r in resources), resources


def test_dropout_kernels_compile_for_sm90_without_spills():
    """With attention dropout (the DROPOUT constexpr: the keep-mask hash in uint32, regenerated in
    both backward kernels) the kernels still compile for sm_90 on the default tiles, without
    spills, and differ from the kernels without dropout."""
    from maskc.codegen import cache, tiles

    program = maskc.compile("causal & window(256)")
    tile = tiles.config(64, 1024)
    (source,) = aot.kernel_sources(program, 1024, head_dim=64, tile=tile)
    module = cache.load(cache.key_of(source.text, "aot", "0"), source.text, interpret=False)
    for kernel in aot.KERNELS:
        warps = tile.warps(kernel)
        plain, dropped = (
            aot.compile_kernel(
                module, kernel, source, torch.float16, 64, tile.block_q, tile.block_k, warps, 90, dropout=dropout
            )
            for dropout in (False, True)
        )
        assert dropped.asm["ptx"] != plain.asm["ptx"], kernel
        regs, spill_stores, _ = aot.ptxas_resources(dropped.asm["ptx"], 90)
        assert spill_stores == 0 and 0 < regs <= 255, (kernel, regs, spill_stores)


def test_tile_choice_is_remembered(tmp_path, monkeypatch):
    """The runtime's choice per pattern structure and GPU is compiled once, then read back."""
    from maskc.codegen import plan
    from maskc.runtime import tuning

    monkeypatch.setenv("MASKC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_CHOICES", {})
    program = maskc.compile("causal & window(64)")
    forms = plan.normal_forms(program.instantiate(512))
    chosen = tuning.spill_free_config(forms, program.source(), torch.float16, 64, 512, 90)
    assert (tmp_path / "tiles.json").exists()
    monkeypatch.setattr(tuning, "_CHOICES", {})  # a new process: only the file remains

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(aot, "choose_config", no_compiling)
    assert tuning.spill_free_config(forms, program.source(), torch.float16, 64, 512, 90) == chosen


def _tutorial():
    """bench/tutorial_attention.py: Triton's fused-attention tutorial kernels (the reference point)."""
    import importlib.util
    from pathlib import Path

    from maskc.codegen import cache

    path = Path(__file__).resolve().parents[1] / "bench" / "tutorial_attention.py"
    spec = importlib.util.spec_from_file_location("tutorial_attention", path)
    module = importlib.util.module_from_spec(spec)
    with cache.mode(interpret=False):  # compiled JIT functions, not the interpreter's (tests default to it)
        spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_causal_full_block_forward_loop_is_within_10_percent_of_the_tutorial():
    """The instruction target of issue 15: at 64 x 64 on sm_90 (fp16, head dim 64, 4 warps,
    Triton's default 3 stages, as launched), maskc's `causal` forward loop over full key blocks
    runs at most 1.10x the instructions per key block of the tutorial's loop without a mask (its
    tensor-descriptor version), with the same MMA and exponential counts."""
    from maskc.codegen import cache, sass, tiles

    tile = tiles.Config(64, 64, 4, 8, 8)
    (source,) = aot.kernel_sources(maskc.compile("causal"), 4096, head_dim=64, tile=tile)
    module = cache.load(cache.key_of(source.text, "aot", "0"), source.text, interpret=False)
    ours = sass.analyse(aot.compile_kernel(module, "attn_fwd", source, torch.float16, 64, 64, 64, 4, 90,
                                           launch=aot.Launch(lq=4096)))  # fmt: skip
    full = ours.mma_loops()[0]  # the full-block loop comes first (codegen/sass.py)

    x, lse = torch.empty(0, dtype=torch.float16, device="meta"), torch.empty(0, device="meta")
    theirs = sass.analyse(
        aot.compile_launch(
            _tutorial().attn_fwd_desc,
            [1.0, lse, 2, 2, x, x, x, x, 4096],
            {"HEAD_DIM": 64, "BLOCK_M": 64, "BLOCK_N": 64, "STAGE": 3, "num_warps": 4, "num_stages": 3},
            90,
        )
    )
    reference = theirs.mma_loops()[0]  # left of the diagonal: no mask
    assert (full.counts.mma, full.counts.ex2) == (reference.counts.mma, reference.counts.ex2)
    assert ours.stack_bytes == 0
    assert full.counts.total <= 1.10 * reference.counts.total, (
        f"maskc's full-block loop: {full.counts.total} instructions, the tutorial's: {reference.counts.total}"
    )
