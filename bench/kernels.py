"""Static resources of the generated kernels: registers, shared memory, spills.

    .venv/bin/python bench/kernels.py [--arch 80 90] [--dtype fp16 bf16] [--head-dim 64 128] [--json PATH]

Every library pattern (at its documented example size) is lowered to Triton,
compiled ahead of time for each GPU architecture with `triton.compile`, and
`ptxas -v` on the PTX reports registers and spill bytes; shared memory comes
from Triton's metadata.  The tile configuration is the first rung of the
pattern's ladder (codegen/tiles.py) on which no kernel spills, the one the
runtime picks on that GPU.  No GPU is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import progress, table, write_json
from maskc.codegen import aot

import maskc
from maskc import patterns

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--patterns", nargs="+", default=None, help="library patterns (default: all)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    rows, results, spilled = [], [], 0
    for name in args.patterns or patterns.names():
        example = dict(patterns.entries()[name].example)
        lq = example.pop("lq", 1024)
        program = maskc.compile(name)
        for dtype in args.dtype:
            for head_dim in args.head_dim:
                for arch in args.arch:
                    progress(f"{name} {dtype} d={head_dim} sm_{arch}")
                    tile, resources = aot.check_program(program, lq, DTYPES[dtype], head_dim, arch, **example)
                    for r in resources:
                        spilled += r.spill_stores > 0
                        tile_size = [tile.block_q, tile.block_k]
                        results.append(
                            {"pattern": name, "dtype": dtype, "head_dim": head_dim, "tile": tile_size, **r.__dict__}
                        )
                        rows.append(
                            [name, dtype, head_dim, f"sm_{arch}", f"{tile.block_q}x{tile.block_k}", r.kernel,
                             r.num_warps, r.registers, r.shared_bytes, r.spill_stores, r.spill_loads]
                        )  # fmt: skip
    header = ["pattern", "dtype", "d", "arch", "tile", "kernel", "warps", "regs", "smem B", "spill st B", "spill ld B"]
    print(table(rows, header))
    print(f"\n{len(rows)} kernels compiled; {spilled} spill.")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
