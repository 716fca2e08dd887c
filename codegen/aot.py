"""Ahead-of-time compilation of generated kernels for NVIDIA GPUs, without a GPU.

`triton.compile` with a `GPUTarget` lowers a kernel to PTX and cubin for
sm_80 / sm_90; `ptxas -v` on the PTX (the `ptxas-blackwell` that ships with
Triton accepts the PTX version Triton emits) reports registers and spill
bytes.  A configuration that spills, or needs more shared memory than the
GPU gives a block, is a bug in our defaults.

The build is the kernel that runs: Triton's launcher specialises a kernel on
its arguments (divisibility-16 hints on aligned pointers and on integers that
are multiples of 16, integers equal to 1 made constants), and those hints
decide whether K/V tiles load as vectors through cp.async pipelining or
element by element.  `compile_kernel` therefore runs Triton's own binder on
the arguments runtime/triton_backend.py passes for an aligned call (`Launch`)
and compiles what it specialises (tests/test_aot_launch.py checks the two
agree on captured launches).
"""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cache, plan, tiles
from .emit import KernelSource, emit, emit_clustered
from .plan import clustered_splits
from .tiles import KERNELS
from .version import __version__


@dataclass
class Resources:
    kernel: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    num_warps: int


_TABLE_DTYPES = {
    "random": torch.int32,
    "ids": torch.int32,
    "route": torch.int8,
    "vs_columns": torch.int8,
    "vs_diagonals": torch.int8,
    "cluster": torch.int64,
    "clusters": torch.int64,
    "alibi": torch.float32,
    "bias": torch.float32,
    "prefix_alpha": torch.float32,
    "prefix_beta": torch.float32,
}
_INT32_POINTERS = ("Heads", "PermQ", "PermK", "FullPtr", "FullStart", "FullEnd", "PartPtr", "PartStart", "PartEnd")
_TABLE_SCALAR = 3  # a table's strides and sizes depend on the call's data: no hint assumed
_DROPOUT_P = 0.1


@dataclass(frozen=True)
class Launch:
    """The sizes of the call an ahead-of-time build stands for.

    Triton's launcher specialises a kernel on its arguments: pointers whose
    address and integers whose value is a multiple of 16 get a divisibility
    hint, and an integer equal to 1 becomes a constant.  The build is only the
    kernel that runs if it makes the same assumptions, so `compile_kernel`
    hands Triton's own binder the arguments runtime/triton_backend.py would
    pass for this call, with contiguous tensors (torch allocations are aligned;
    q, k, v cut from one fused projection have the same hints when the head dim
    is a multiple of 8), and compiles what it specialises."""

    batch: int = 2
    heads: int = 2
    lq: int = 1024
    lk: int | None = None  # default: lq
    q_offset: int | None = None  # default: lk - lq
    kv_group: int = 1  # query heads per key/value head

    @property
    def keys(self) -> int:
        return self.lq if self.lk is None else self.lk


def launch_values(fn, source: KernelSource, dtype: torch.dtype, head_dim: int, launch: Launch,
                  dropout: bool = False) -> dict:  # fmt: skip
    """Every runtime argument of kernel `fn` as runtime/triton_backend.py fills it for `launch`
    (tensors as empty meta tensors: only their dtype and address matter here)."""
    tables = {t.name: t.kind for t in source.tables}
    grads = {g.name for g in source.grads}
    h, lq, lk, d = launch.heads, launch.lq, launch.keys, head_dim
    rows = {"q": (h, lq), "o": (h, lq), "do": (h, lq), "dq": (h, lq), "k": (h // launch.kv_group, lk),
            "v": (h // launch.kv_group, lk), "dk": (h, lk), "dv": (h, lk)}  # fmt: skip
    threshold = math.floor(_DROPOUT_P * 2**31) if dropout else 0
    scalars = {
        "num_heads": h,
        "group_heads": h,
        "kv_group": launch.kv_group,
        "lq": lq,
        "lk": lk,
        "q_offset": lk - lq if launch.q_offset is None else launch.q_offset,
        "sm_scale": 1.0 / math.sqrt(d),
        "drop_seed": 0,
        "drop_threshold": threshold,
        "drop_scale": 1.0 / (1.0 - _DROPOUT_P) if dropout else 1.0,
    }

    def meta(dt):
        return torch.empty(0, dtype=dt, device="meta")

    values = {}
    for name in fn.arg_names:
        if name in ("Q", "K", "V", "O", "DO"):
            values[name] = meta(dtype)
        elif name in ("LSE", "Delta", "DK", "DV", "DQ") or name in grads:
            values[name] = meta(torch.float32)
        elif name in _INT32_POINTERS:
            values[name] = meta(torch.int32)
        elif name in tables:
            values[name] = meta(_TABLE_DTYPES[tables[name]])
        elif name.startswith("stride_") and name[7:-1] in rows:
            heads_of, length = rows[name[7:-1]]
            values[name] = {"b": heads_of * length * d, "h": length * d}.get(name[-1], d)
        elif name in scalars:
            values[name] = scalars[name]
        elif not name.isupper():  # constexprs are upper case
            values[name] = _TABLE_SCALAR
    return values


class SpecialisationUnavailableError(RuntimeError):
    """The installed Triton lacks the launcher internals `specialization` reuses."""


def specialization(fn, args: list, kwargs: dict, arch: int):
    """(options, signature, constexprs, attrs) that Triton's launcher derives for a launch of
    JIT function `fn` with these arguments on an `sm_{arch}` GPU (its own binder, no GPU).

    These are Triton internals (`create_function_from_signature`, `JITFunction._pack_args`,
    as in Triton 3.9); without them `SpecialisationUnavailableError` is raised."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    try:
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:
        raise SpecialisationUnavailableError(f"this Triton has no launcher binder to specialise with: {e}") from e
    if not hasattr(fn, "_pack_args"):
        raise SpecialisationUnavailableError("this Triton's JIT functions have no _pack_args")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, spec, options)


def kernel_constexprs(fn, source: KernelSource, dtype: torch.dtype, head_dim: int, block_m: int, block_n: int,
                      dropout: bool = False) -> dict:  # fmt: skip
    """The constexpr arguments runtime/triton_backend.py passes (no layout permutation)."""
    constexprs = {
        "HAS_PERM_Q": False,
        "HAS_PERM_K": False,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "HEAD_DIM": tiles.padded_dim(head_dim),
        "HEAD_DIM_V": tiles.padded_dim(head_dim),
        "QK_DIM": head_dim,
        "V_DIM": head_dim,
        "INPUT_PRECISION": "ieee",
        "UPCAST": False,
        "DROPOUT": dropout,
        "SOFTCAP": source.softcap,
        "TENSOR_GRADS": False,
    }
    return {k: v for k, v in constexprs.items() if k in fn.arg_names}


def launch_specialization(fn, source: KernelSource, dtype: torch.dtype, head_dim: int, block_m: int, block_n: int,
                          num_warps: int, arch: int, dropout: bool = False, launch: Launch | None = None):  # fmt: skip
    """(options, signature, constexprs, attrs) of kernel `fn` as Triton's launcher specialises
    it for `launch` (default: an aligned call of 1,024 rows, two heads): what `compile_kernel` builds."""
    values = launch_values(fn, source, dtype, head_dim, launch or Launch(), dropout)
    constexprs = kernel_constexprs(fn, source, dtype, head_dim, block_m, block_n, dropout)
    return specialization(fn, list(values.values()), {**constexprs, "num_warps": num_warps}, arch)


def compile_kernel(module, name: str, source: KernelSource, dtype: torch.dtype, head_dim: int,
                   block_m: int, block_n: int, num_warps: int, arch: int, dropout: bool = False,
                   launch: Launch | None = None):  # fmt: skip
    """Compile one kernel of a generated module for `sm_{arch}` (with attention dropout when
    `dropout`) as Triton's launcher specialises it for `launch`; returns Triton's compiled kernel."""
    fn = getattr(module, name)
    return compile_specialized(fn, launch_specialization(fn, source, dtype, head_dim, block_m, block_n, num_warps,
                                                         arch, dropout, launch), arch)  # fmt: skip


def compile_launch(fn, args: list, kwargs: dict, arch: int):
    """Compile JIT function `fn` for `sm_{arch}` as a launch `fn[grid](*args, **kwargs)` would
    (tensors may be meta tensors: only their dtype and alignment count)."""
    return compile_specialized(fn, specialization(fn, args, kwargs, arch), arch)


def compile_specialized(fn, spec, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options, signature, constants, attrs = spec
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                          options=options.__dict__)  # fmt: skip


def ptxas_path() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"


_INFO = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_resources(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v`."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        done = subprocess.run(
            [str(ptxas_path()), "-v", f"--gpu-name={gpu}", str(path), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = done.stderr + done.stdout
    regs = [int(m.group(1)) for m in _INFO.finditer(text)]
    spills = [(int(m.group(1)), int(m.group(2))) for m in _SPILL.finditer(text)]
    return max(regs, default=0), max((s for s, _ in spills), default=0), max((l for _, l in spills), default=0)


def kernel_sources(program, lq: int, heads: int = 2, head_dim: int = 64, tile=None, **sizes) -> list[KernelSource]:
    """The distinct kernel files a program needs for these sizes (and tiles)."""
    forms = plan.normal_forms(program.instantiate(lq, heads=heads, **sizes))
    tile = tile or tiles.config(head_dim, lq, tiles.heavy_forms(forms))
    return sources_for(forms, program.source(), tile)


def sources_for(forms, title: str, tile) -> list[KernelSource]:
    """The distinct kernel files of these normal forms on `tile`'s blocks."""
    seen: dict[str, KernelSource] = {}
    splits = clustered_splits(forms)
    for i, form in enumerate(forms):
        if splits is not None:
            source = emit_clustered(form, splits[i][1], title, tile.block_q, tile.block_k, __version__)
        else:
            source = emit(form, title, tile.block_q, tile.block_k, __version__)
        seen.setdefault(source.text, source)
    return list(seen.values())


def resources_of(load, sources, dtype, head_dim: int, tile, kernel: str, warps: int, arch: int) -> list[Resources]:
    """Compile one kernel of every source with these warps; its resources per source."""
    out = []
    for source in sources:
        module = load(source)
        compiled = compile_kernel(module, kernel, source, dtype, head_dim, tile.block_q, tile.block_k, warps, arch)
        regs, spill_st, spill_ld = ptxas_resources(compiled.asm["ptx"], arch)
        out.append(Resources(kernel, arch, regs, spill_st, spill_ld, compiled.metadata.shared, warps))
    return out


# The most shared memory one block may use (bytes, with the opt-in attribute Triton sets): a
# kernel above it compiles but cannot launch.  Hinted builds pipeline their loads through
# shared memory (num_stages = 3), so wide tiles reach it on the GPUs with the least.
SHARED_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                103: 232448, 120: 101376}  # fmt: skip


# What `choose_config` checks on a rung (part of the key under which runtime/tuning.py keeps choices).
RUNG_CHECK = "launcher-specialised builds; no spill stores; shared memory within SHARED_LIMIT"


def shared_limit(arch: int) -> int:
    """Shared memory per block on `sm_{arch}` (an unknown architecture: the smallest of its generation's)."""
    return SHARED_LIMIT.get(arch, min((v for a, v in SHARED_LIMIT.items() if a // 10 == arch // 10), default=65536))


def fits(resources: list[Resources]) -> bool:
    """No spill stores and shared memory within the architecture's limit."""
    return all(r.spill_stores == 0 and r.shared_bytes <= shared_limit(r.arch) for r in resources)


def choose_config(load, forms, title: str, dtype, head_dim: int, lq: int, arch: int):
    """The first rung of the tile ladder on which every kernel compiles without
    spills for `arch`, within its shared memory (trying each kernel's preferred
    warps, then the other count).

    `load(source)` imports a kernel source as a module.  Returns (config,
    resources); if no rung fits, the last rung and its resources."""
    ladder = tiles.candidates(head_dim, lq, tiles.heavy_forms(forms))
    resources: list[Resources] = []
    for tile in ladder:
        sources = sources_for(forms, title, tile)
        chosen, resources = tile, []
        for kernel in KERNELS:
            preferred = tile.warps(kernel)
            for warps in (preferred, 12 - preferred):  # 4 <-> 8
                found = resources_of(load, sources, dtype, head_dim, tile, kernel, warps, arch)
                if fits(found):
                    break
            chosen = chosen.with_warps(kernel, warps)
            resources += found
        if fits(resources):
            return chosen, resources
    return chosen, resources


def check_program(program, lq: int, dtype: torch.dtype, head_dim: int, arch: int, **sizes):
    """Choose a spill-free configuration for a program and report (config, resources)."""
    forms = plan.normal_forms(program.instantiate(lq, heads=2, **sizes))

    def load(source):
        return cache.load(cache.key_of(source.text, "aot", "0"), source.text, interpret=False)

    return choose_config(load, forms, program.source(), dtype, head_dim, lq, arch)
