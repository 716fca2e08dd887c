"""maskc's generated kernels beside Triton's fused-attention tutorial, read from their SASS.

    .venv/bin/python bench/gpu_static.py [--arch 90] [--dtype fp16] [--head-dim 64]
        [--tiles maskc tutorial] [--patterns causal all ...] [--full] [--json PATH]

No GPU is needed: every kernel is compiled ahead of time (codegen/aot.py) as
Triton's launcher specialises it for an aligned call (4,096 rows; natten2d on a
64 x 64 grid), disassembled, and its steady-state loops found and counted
(codegen/sass.py).  Per kernel: registers, shared memory, stack (spill) bytes,
and for the loop over key blocks (query blocks in dK/dV) the instructions per
iteration, MMA instructions, MUFU.EX2, global loads, shared loads/stores
(LDS/STS/LDSM), async copies (LDGSTS) and TMA, and the MMA share.

maskc's kernels have a loop for full blocks and one for partial blocks: both are
shown, and `pred` is the partial loop's extra instructions (the predicate).  The
tutorial (bench/tutorial_attention.py; its tensor-descriptor forward `desc` and
the same forward with plain pointer loads `ptr`) runs causal attention as a loop
without a mask left of the diagonal and a masked loop on it, and full attention
as one loop; its backward is one kernel (dK/dV loops, then dQ loops).

Tiles: `maskc` compiles both at maskc's tiles (the first rung of the pattern's
ladder, codegen/tiles.py: block_q x block_k, the same for the tutorial's forward
and backward); `tutorial` at the tutorial's (forward 128 x 64, 4 warps, 2 stages;
backward 32 x 128 for dK/dV and 128 x 32 for dQ, 4 warps, 5 stages), maskc's
dK/dV and dQ kernels at those blocks too.  The default run is sm_90, fp16, head
dim 64 at maskc's tiles (a few minutes on two cores; Triton caches the
compiles); `--full` is sm_80 and sm_90, fp16 and bf16, head dims 64 and 128,
both tile sets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tutorial_attention as tut
from common import progress, table, write_json
from maskc.codegen import aot, cache, plan, sass, tiles

import maskc

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LENGTH = 4096
PATTERNS = {  # name -> (spec, sizes); `dilated`: every visited block partial
    "causal": ("causal", {}),
    "all": ("all", {}),
    "causal & window(4095, 0)": ("causal & window(4095, 0)", {}),
    "natten2d": ("natten2d", {"h": 64, "w": 64}),
    "dilated": ("dilated(128, 2)", {}),
}
TUTORIAL_CAUSAL = {"causal": True, "all": False}  # the patterns the tutorial runs itself


def _meta(dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device="meta")


def _loops(report: sass.KernelReport, n: int = 4) -> list[sass.Loop | None]:
    """The innermost MMA loops in address order, padded with None to at least n."""
    loops: list[sass.Loop | None] = list(report.mma_loops())
    return loops + [None] * max(0, n - len(loops))


def _record(who: str, pattern: str, kernel: str, block: tuple[int, int], warps: int, stages: int,
            report: sass.KernelReport, full: sass.Loop | None, partial: sass.Loop | None) -> dict:  # fmt: skip
    return {
        "who": who,
        "pattern": pattern,
        "kernel": kernel,
        "block": list(block),
        "warps": warps,
        "stages": stages,
        "registers": report.registers,
        "stack_bytes": report.stack_bytes,
        "shared_bytes": report.shared_bytes,
        "spill_instructions": report.counts.spill,
        "full_loop": full.as_dict() if full else None,
        "partial_loop": partial.as_dict() if partial else None,
        # the partial loop's extra instructions (maskc: the same blocks with `allowed`; the tutorial's
        # masked loops run blocks of another size, so they are not compared)
        "predicate_instructions": partial.counts.total - full.counts.total
        if full and partial and who == "maskc"
        else None,
    }


# ---------------------------------------------------------------- maskc


def maskc_kernels(name: str, dtype, head_dim: int, arch: int, blocks: dict[str, tuple[int, int, int]]) -> list[dict]:
    """maskc's three kernels for pattern `name`; `blocks`: kernel -> (block_q, block_k, warps)."""
    spec, sizes = PATTERNS[name]
    program = maskc.compile(spec)
    forms = plan.normal_forms(program.instantiate(LENGTH, heads=2, **sizes))
    out = []
    for kernel in aot.KERNELS:
        bq, bk, warps = blocks[kernel]
        tile = tiles.Config(bq, bk, warps, warps, warps)
        (source,) = aot.sources_for(forms, program.source(), tile)[:1]
        module = cache.load(cache.key_of(source.text, "aot", "0"), source.text, interpret=False)
        progress(f"maskc {name} {kernel} {bq}x{bk} sm_{arch}")
        compiled = aot.compile_kernel(module, kernel, source, dtype, head_dim, bq, bk, warps, arch,
                                      launch=aot.Launch(lq=LENGTH))  # fmt: skip
        report = sass.analyse(compiled)
        loops = _loops(report)
        full, partial = loops[:2]
        out.append(_record("maskc", name, kernel, (bq, bk), warps, compiled.metadata.num_stages, report, full, partial))
    return out


# ---------------------------------------------------------------- the tutorial


def _split_masked(loops: list[sass.Loop], parts: int) -> list[tuple[sass.Loop | None, sass.Loop | None]]:
    """(unmasked loop, masked loop) of each of `parts` consecutive parts of a tutorial kernel.

    A masked loop selects with `tl.where` (FSEL), an unmasked one does not; each part's
    masked loop, when there is one, comes before its unmasked loop (the diagonal first), but
    the compiler may unroll a masked loop of a constant trip count, so loops are assigned
    by kind in order rather than by position."""
    out: list[list] = [[None, None] for _ in range(parts)]
    part = 0
    for loop in loops:
        if part >= parts:
            break
        if loop.counts.fsel:
            out[part][1] = loop
        else:
            out[part][0] = loop
            part += 1
    return [tuple(x) for x in out]


def tutorial_forward(variant: str, causal: bool, dtype, head_dim: int, arch: int, bm: int, bn: int, warps: int,
                     stages: int) -> dict:  # fmt: skip
    z, h, n = 2, 2, LENGTH
    stage = 3 if causal else 1
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": bm, "BLOCK_N": bn, "STAGE": stage, "num_warps": warps,
              "num_stages": stages}  # fmt: skip
    x, f32 = _meta(dtype), _meta(torch.float32)
    if variant == "desc":
        fn, args = tut.attn_fwd_desc, [1.0, f32, z, h, x, x, x, x, n]
    else:
        fn, args = tut.attn_fwd_ptr, [x, x, x, 1.0, f32, x, h * n * head_dim, n * head_dim, head_dim, z, h, n]
    progress(f"tutorial {variant} fwd causal={causal} {bm}x{bn} sm_{arch}")
    report = sass.analyse(aot.compile_launch(fn, args, consts, arch))
    loops = report.mma_loops()  # left of the diagonal (no mask), then the diagonal (a loop unless one block)
    full = next((lp for lp in loops if not lp.counts.fsel), None)
    partial = next((lp for lp in loops if lp.counts.fsel), None)
    pattern = "causal" if causal else "all"
    return _record(f"tutorial ({variant})", pattern, "attn_fwd", (bm, bn), warps, stages, report, full, partial)


def tutorial_backward(causal: bool, dtype, head_dim: int, arch: int, blocks: dict, warps: int,
                      stages: int) -> list[dict]:  # fmt: skip
    """The tutorial's backward kernel, reported as its dK/dV part and its dQ part."""
    h, n = 2, LENGTH
    x, f32 = _meta(dtype), _meta(torch.float32)
    args = [x, x, x, 1.0, x, x, x, x, f32, f32, h * n * head_dim, n * head_dim, head_dim, h, n]
    consts = {**blocks, "HEAD_DIM": head_dim, "CAUSAL": causal, "num_warps": warps, "num_stages": stages}
    progress(f"tutorial bwd causal={causal} sm_{arch}")
    report = sass.analyse(aot.compile_launch(tut.attn_bwd, args, consts, arch))
    dkdv, dq = _split_masked(report.mma_loops(), 2)
    parts = {"attn_bwd_dkdv": dkdv, "attn_bwd_dq": dq}
    pattern = "causal" if causal else "all"
    out = []
    for kernel, (full, partial) in parts.items():
        block = (blocks["BLOCK_M1"], blocks["BLOCK_N1"]) if kernel == "attn_bwd_dkdv" else (
            blocks["BLOCK_M2"], blocks["BLOCK_N2"])  # fmt: skip
        out.append(_record("tutorial", pattern, kernel, block, warps, stages, report, full, partial))
    return out


# ---------------------------------------------------------------- one configuration


def configuration(arch: int, dtype_name: str, head_dim: int, tileset: str, names: list[str]) -> list[dict]:
    dtype = DTYPES[dtype_name]
    if tileset == "maskc":
        first = tiles.config(head_dim, LENGTH)
        blocks = {k: (first.block_q, first.block_k, first.warps(k)) for k in aot.KERNELS}
        fwd = (first.block_q, first.block_k, first.fwd_warps, 3)
        bwd_blocks = {"BLOCK_M1": first.block_q, "BLOCK_N1": first.block_k, "BLOCK_M2": first.block_q,
                      "BLOCK_N2": first.block_k, "BLK_SLICE_FACTOR": 2}  # fmt: skip
        bwd_run = (first.dkdv_warps, 3)
    else:
        f, b = tut.FWD_TILE, tut.BWD_TILE
        blocks = {"attn_fwd": (f["BLOCK_M"], f["BLOCK_N"], f["num_warps"]),
                  "attn_bwd_dkdv": (b["BLOCK_M1"], b["BLOCK_N1"], b["num_warps"]),
                  "attn_bwd_dq": (b["BLOCK_M2"], b["BLOCK_N2"], b["num_warps"])}  # fmt: skip
        fwd = (f["BLOCK_M"], f["BLOCK_N"], f["num_warps"], f["num_stages"])
        bwd_blocks = {k: v for k, v in b.items() if k not in ("num_warps", "num_stages")}
        bwd_run = (b["num_warps"], b["num_stages"])
    records = []
    for name in names:
        records += maskc_kernels(name, dtype, head_dim, arch, blocks)
    for causal in (True, False):
        for variant in ("desc", "ptr"):
            try:
                records.append(tutorial_forward(variant, causal, dtype, head_dim, arch, *fwd))
            except Exception as e:  # a variant this Triton cannot build for this target
                progress(f"tutorial {variant} forward for sm_{arch} failed: {type(e).__name__}: {str(e)[:200]}")
        records += tutorial_backward(causal, dtype, head_dim, arch, bwd_blocks, *bwd_run)
    for r in records:
        r.update({"arch": arch, "dtype": dtype_name, "head_dim": head_dim, "tiles": tileset})
    return records


def rows(records: list[dict]) -> list[list]:
    out = []
    for r in records:
        full, part = r["full_loop"] or {}, r["partial_loop"] or {}

        def cell(loop: dict, key: str):
            return loop.get(key, "")

        out.append([
            f"sm_{r['arch']}", r["dtype"], r["head_dim"], r["who"], r["pattern"], r["kernel"].replace("attn_", ""),
            "x".join(map(str, r["block"])), r["warps"], r["registers"], round(r["shared_bytes"] / 1024, 1),
            r["stack_bytes"], cell(full, "total"), cell(full, "mma"), cell(full, "ex2"), cell(full, "ldg"),
            f"{cell(full, 'lds')}/{cell(full, 'sts')}/{cell(full, 'ldsm')}" if full else "",
            f"{cell(full, 'ldgsts')}/{cell(full, 'tma')}" if full else "",
            f"{full['mma_share']:.3f}" if full else "", cell(part, "total"),
            r["predicate_instructions"] if r["predicate_instructions"] is not None else "",
        ])  # fmt: skip
    return out


HEADER = ["arch", "dtype", "d", "kernel of", "pattern", "kernel", "block", "warps", "regs", "smem KB", "stack B",
          "loop", "MMA", "EX2", "LDG", "LDS/STS/LDSM", "LDGSTS/TMA", "MMA share", "partial loop", "pred"]  # fmt: skip


def markdown(records: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows(records)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--dtype", nargs="+", default=["fp16"], choices=list(DTYPES))
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64])
    parser.add_argument("--tiles", nargs="+", default=["maskc"], choices=["maskc", "tutorial"])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--full", action="store_true", help="sm_80 and sm_90, fp16 and bf16, d 64 and 128, both tiles")
    parser.add_argument("--json", default="bench/results/gpu_static.json", help="write the records here")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args()
    if args.full:
        args.arch, args.dtype, args.head_dim, args.tiles = [80, 90], ["fp16", "bf16"], [64, 128], ["maskc", "tutorial"]
    records = []
    for arch in args.arch:
        for dtype in args.dtype:
            for head_dim in args.head_dim:
                for tileset in args.tiles:
                    records += configuration(arch, dtype, head_dim, tileset, args.patterns)
    print(markdown(records) if args.markdown else table(rows(records), HEADER))
    write_json(args.json, records)


if __name__ == "__main__":
    main()
