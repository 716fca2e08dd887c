"""The ahead-of-time build is the kernel Triton's launcher compiles for the same call.

The runtime's launches (runtime/triton_backend.py) are captured instead of run, and Triton's
own binder specialises each kernel on the captured arguments, as `JITFunction.run` does on a
GPU: divisibility-16 hints on aligned pointers and on integers that are multiples of 16, and
integers equal to 1 made constants.  `aot.launch_specialization` (what `aot.compile_kernel`
compiles) must give the same signature, constants and hints for a `Launch` of the same sizes.
Nothing is compiled or run: the arguments are CPU tensors (aligned as CUDA allocations are).
"""

from __future__ import annotations

import pytest
import torch
from maskc.codegen import aot, cache
from maskc.runtime import triton_backend

import maskc

SPEC = "causal & window(100, 0) | sink(4) with softcap(30.0)"


def _captured_launches(monkeypatch, q, k, v) -> list:
    """(kernel, args, kwargs) of every launch of a forward and backward on the Triton backend."""
    launches = []

    class Kernel:  # `kernel[grid](*args, **kwargs)` records the launch
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

    class Capture:
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            return Kernel(getattr(self.module, name))

    def compiled_module(source, dtype, interpret):  # the JIT functions, not the interpreter's
        return Capture(cache.kernel_module(source.text, dtype, False))

    monkeypatch.setattr(triton_backend, "kernel_module", compiled_module)
    out = maskc.compile(SPEC)(q, k, v, backend="triton")
    out.float().sum().backward()
    return launches


def _expected(launches, arch: int = 90):
    return {fn.__name__: aot.specialization(fn, list(args), dict(kwargs), arch) for fn, args, kwargs in launches}


@pytest.mark.parametrize(
    "lq, kv_heads, fused",
    [(256, 4, True), (200, 2, False)],
    ids=["aligned-fused-projection", "ragged-gqa"],
)
def test_aot_build_has_the_launchers_specialisation(monkeypatch, lq, kv_heads, fused):
    batch, heads, d = 2, 4, 64
    torch.manual_seed(0)
    if fused:  # q, k, v cut from one projection [batch, len, 3, heads, d]: strided views
        qkv = torch.randn(batch, lq, 3, heads, d, dtype=torch.float16, requires_grad=True)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q = torch.randn(batch, heads, lq, d, dtype=torch.float16, requires_grad=True)
        k, v = (torch.randn(batch, kv_heads, lq, d, dtype=torch.float16, requires_grad=True) for _ in range(2))
    launches = _captured_launches(monkeypatch, q, k, v)
    expected = _expected(launches)
    assert sorted(expected) == sorted(aot.KERNELS)
    launch = aot.Launch(batch=batch, heads=heads, lq=lq, kv_group=heads // kv_heads)
    for fn, _, kwargs in launches:
        source = next(s for s in _sources(lq) if s.text.count(fn.__name__))
        want_options, want_sig, want_consts, want_attrs = expected[fn.__name__]
        options, sig, consts, attrs = aot.launch_specialization(
            fn, source, torch.float16, d, kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], 90, launch=launch
        )
        assert sig == want_sig, fn.__name__
        assert consts == want_consts, fn.__name__
        assert attrs == want_attrs, fn.__name__
        assert options.num_warps == want_options.num_warps
        hinted = {name for i, name in enumerate(fn.arg_names) if attrs.get((i,))}
        assert {"Q", "K", "V", "stride_kn", "stride_qm"} <= hinted, fn.__name__  # aligned pointers and strides
        assert ("lq" in hinted) == (lq % 16 == 0), fn.__name__
        assert ((fn.arg_names.index("kv_group"),) in consts) == (kv_heads == heads)  # 1: a constant


def _sources(lq: int):
    program = maskc.compile(SPEC)
    return aot.kernel_sources(program, lq, heads=4, head_dim=64)


def test_a_triton_without_the_binder_runs_the_first_rung(tmp_path, monkeypatch):
    """Older Triton releases lack the launcher internals the AOT build reuses: the tile policy
    then runs the ladder's first rung instead of failing, and remembers nothing."""
    from maskc.codegen import plan, tiles
    from maskc.runtime import tuning

    monkeypatch.setenv("MASKC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_CHOICES", {})

    def unavailable(*args, **kwargs):
        raise aot.SpecialisationUnavailableError("no binder")

    monkeypatch.setattr(aot, "choose_config", unavailable)
    program = maskc.compile("causal & window(64)")
    forms = plan.normal_forms(program.instantiate(512))
    chosen = tuning.spill_free_config(forms, program.source(), torch.float16, 128, 512, 90)
    assert chosen == tiles.config(128, 512)
    assert not (tmp_path / "tiles.json").exists()
