"""Ahead-of-time compilation of generated kernels for NVIDIA GPUs, without a GPU.

`triton.compile` with a `GPUTarget` lowers a kernel to PTX and cubin for
sm_80 / sm_90; `ptxas -v` on the PTX (the `ptxas-blackwell` that ships with
Triton accepts the PTX version Triton emits) reports registers and spill
bytes.  A configuration that spills is a bug in our defaults.
"""

from __future__ import annotations

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

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_TABLE_TYPES = {
    "random": "*i32",
    "ids": "*i32",
    "route": "*i8",
    "vs_columns": "*i8",
    "vs_diagonals": "*i8",
    "cluster": "*i64",
    "clusters": "*i64",
    "alibi": "*fp32",
    "bias": "*fp32",
    "prefix_alpha": "*fp32",
    "prefix_beta": "*fp32",
}


@dataclass
class Resources:
    kernel: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    num_warps: int


def _signature(fn, source: KernelSource, dtype: torch.dtype, constexprs: dict) -> dict:
    data = "*" + _DTYPES[dtype]
    kinds = {t.name: t.kind for t in source.tables}
    grads = {g.name for g in source.grads}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "O", "DO"):
            sig[name] = data
        elif name in ("LSE", "Delta", "DK", "DV", "DQ"):
            sig[name] = "*fp32"
        elif name in ("Heads", "PermQ", "PermK", "FullPtr", "FullStart", "FullEnd", "PartPtr", "PartStart", "PartEnd"):
            sig[name] = "*i32"
        elif name in ("sm_scale", "drop_scale"):
            sig[name] = "fp32"
        elif name in kinds:
            sig[name] = _TABLE_TYPES[kinds[name]]
        elif name in grads:
            sig[name] = "*fp32"  # gradient buffers of modifier tensors
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(module, name: str, source: KernelSource, dtype: torch.dtype, head_dim: int,
                   block_m: int, block_n: int, num_warps: int, arch: int, dropout: bool = False):  # fmt: skip
    """Compile one kernel of a generated module for `sm_{arch}` (with attention dropout when
    `dropout`); returns Triton's compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(module, name)
    constexprs = {
        "HAS_PERM_Q": False,
        "HAS_PERM_K": False,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "HEAD_DIM": head_dim,
        "HEAD_DIM_V": head_dim,
        "QK_DIM": head_dim,
        "V_DIM": head_dim,
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST": False,
        "DROPOUT": dropout,
    }
    if name != "attn_fwd":
        constexprs["SOFTCAP"] = source.softcap
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    ast_source = ASTSource(fn=fn, signature=_signature(fn, source, dtype, constexprs), constexprs=constexprs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(ast_source, target=target, options={"num_warps": num_warps})


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
        compiled = compile_kernel(module, kernel, source, dtype, tiles.padded_dim(head_dim), tile.block_q,
                                  tile.block_k, warps, arch)  # fmt: skip
        regs, spill_st, spill_ld = ptxas_resources(compiled.asm["ptx"], arch)
        out.append(Resources(kernel, arch, regs, spill_st, spill_ld, compiled.metadata.shared, warps))
    return out


def choose_config(load, forms, title: str, dtype, head_dim: int, lq: int, arch: int):
    """The first rung of the tile ladder on which every kernel compiles without
    spills for `arch` (trying each kernel's preferred warps, then the other count).

    `load(source)` imports a kernel source as a module.  Returns (config,
    resources); if no rung is spill-free, the last rung and its resources."""
    ladder = tiles.candidates(head_dim, lq, tiles.heavy_forms(forms))
    resources: list[Resources] = []
    for tile in ladder:
        sources = sources_for(forms, title, tile)
        chosen, resources = tile, []
        for kernel in KERNELS:
            preferred = tile.warps(kernel)
            for warps in (preferred, 12 - preferred):  # 4 <-> 8
                found = resources_of(load, sources, dtype, head_dim, tile, kernel, warps, arch)
                if all(r.spill_stores == 0 for r in found):
                    break
            chosen = chosen.with_warps(kernel, warps)
            resources += found
        if all(r.spill_stores == 0 for r in resources):
            return chosen, resources
    return chosen, resources


def check_program(program, lq: int, dtype: torch.dtype, head_dim: int, arch: int, **sizes):
    """Choose a spill-free configuration for a program and report (config, resources)."""
    forms = plan.normal_forms(program.instantiate(lq, heads=2, **sizes))

    def load(source):
        return cache.load(cache.key_of(source.text, "aot", "0"), source.text, interpret=False)

    return choose_config(load, forms, program.source(), dtype, head_dim, lq, arch)
