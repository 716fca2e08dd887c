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
