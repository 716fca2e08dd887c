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

from .emit import KernelSource

KERNELS = ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_TABLE_TYPES = {
    "random": "*i32",
    "ids": "*i32",
    "route": "*i8",
    "cluster": "*i64",
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
        elif name in ("LSE", "Delta", "DK", "DV_", "DQ"):
            sig[name] = "*fp32"
        elif name in ("Heads", "PermQ", "PermK", "FullPtr", "FullStart", "FullEnd", "PartPtr", "PartStart", "PartEnd"):
            sig[name] = "*i32"
        elif name == "sm_scale":
            sig[name] = "fp32"
        elif name in kinds:
            sig[name] = _TABLE_TYPES[kinds[name]]
        elif name in grads:
            sig[name] = "*fp32"  # gradient buffers of modifier tensors
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(module, name: str, source: KernelSource, dtype: torch.dtype, head_dim: int,
                   block_m: int, block_n: int, num_warps: int, arch: int):  # fmt: skip
    """Compile one kernel of a generated module for `sm_{arch}`; returns Triton's compiled kernel."""
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
        "D": head_dim,
        "DV": head_dim,
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST": False,
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


def kernel_sources(program, lq: int, heads: int = 2, head_dim: int = 64, **sizes) -> list[KernelSource]:
    """The distinct kernel files a program needs for these sizes."""
    import maskc

    from . import plan, tiles
    from .emit import emit

    instance = program.instantiate(lq, heads=heads, **sizes)
    forms = plan.normal_forms(instance)
    tile = tiles.config(head_dim, lq, tiles.heavy_forms(forms))
    seen: dict[str, KernelSource] = {}
    for form in forms:
        source = emit(form, program.source(), tile.block_q, tile.block_k, maskc.__version__)
        seen.setdefault(source.text, source)
    return list(seen.values())


def check_program(program, lq: int, dtype: torch.dtype, head_dim: int, arch: int, **sizes) -> list[Resources]:
    """Compile every kernel of a program ahead of time; report resources per kernel."""
    from maskc.runtime import cache

    from . import tiles

    from . import plan

    heavy = tiles.heavy_forms(plan.normal_forms(program.instantiate(lq, heads=2, **sizes)))
    tile = tiles.config(head_dim, lq, heavy)
    out = []
    for source in kernel_sources(program, lq, head_dim=head_dim, **sizes):
        key = cache.key_of(source.text, "aot", "0")
        module = cache.load(key, source.text, interpret=False)
        for name in KERNELS:
            warps = {"attn_fwd": tile.fwd_warps, "attn_bwd_dkdv": tile.dkdv_warps}.get(name, tile.dq_warps)
            compiled = compile_kernel(module, name, source, dtype, tiles.padded_dim(head_dim), tile.block_q,
                                      tile.block_k, warps, arch)  # fmt: skip
            regs, spill_st, spill_ld = ptxas_resources(compiled.asm["ptx"], arch)
            out.append(Resources(name, arch, regs, spill_st, spill_ld, compiled.metadata.shared, warps))
    return out
