"""maskc's Triton kernels timed against FlexAttention, dense flash SDPA and NATTEN on a CUDA GPU.

    .venv/bin/python bench/gpu.py [--workloads causal-window natten2d bigbird documents_causal]
        [--lengths 4096 16384 65536] [--modes fwd fwd+bwd] [--dtype bf16] [--json PATH]

For each workload and length, forward and forward + backward, batch 1, 16 heads,
head dim 64 (`--heads`, `--head-dim`):

* maskc: `program(q, k, v, backend="triton")`, its generated kernels;
* flex (maskc's BlockMask): `backend="flex"`: compiled `flex_attention` with the
  BlockMask built from maskc's schedule (runtime/flex.py);
* flex (create_block_mask): compiled `flex_attention` with the BlockMask of Flex's own
  `create_block_mask` (compiled), from the same `mask_mod` (maskc's generated one, in
  row-major order); the mask is built outside the timed region;
* dense flash: `scaled_dot_product_attention` with the flash backend, full attention
  (causal for the causal patterns), no mask;
* NATTEN's `na2d` for natten2d, when NATTEN is installed.

TFLOP/s are counted on the pairs maskc's schedule visits (every contender gets the
same count: the ratio of two contenders is the ratio of their times), 4 * d FLOPs
per pair forward and 14 * d forward + backward (the tutorial's 2.5x for the
backward); dense flash's own TFLOP/s count its own pairs, and `of flash` is a
contender's TFLOP/s over dense flash's.  Times are `triton.testing.do_bench`
medians.  Without a CUDA device the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_json

NO_CUDA = 2  # exit status without a CUDA device


@dataclass(frozen=True)
class Workload:
    name: str
    spec: str
    causal: bool  # dense flash runs causal attention for comparison
    lengths: tuple[int, ...]
    params: dict = field(default_factory=dict)


WORKLOADS = {
    "causal-window": Workload("causal-window", "causal & window(1023, 0)", True, (4096, 16384, 65536)),
    "natten2d": Workload("natten2d", "natten2d", False, (64 * 64, 96 * 96, 128 * 128), {"k": 7}),
    "bigbird": Workload("bigbird", "bigbird", False, (4096, 16384, 65536)),
    "documents_causal": Workload("documents_causal", "documents_causal", True, (4096, 16384, 65536)),
}
MODES = ("fwd", "fwd+bwd")


# ---------------------------------------------------------------- counting (no GPU needed)


def visited_pairs(schedule) -> int:
    """(query, key) pairs in the blocks a `BlockSchedule` visits, summed over heads; the
    last block of each side holds only the tokens left."""
    lq, lk, bq, bk = schedule.lq, schedule.lk, schedule.block_q, schedule.block_k
    total = 0
    per_group = []
    for runs in schedule.groups:
        rows, cols, _ = runs.blocks()
        rows_in = (lq - rows * bq).clamp(max=bq)
        cols_in = (lk - cols * bk).clamp(max=bk)
        per_group.append(int((rows_in * cols_in).sum()))
    for g in schedule.head_group:
        total += per_group[g]
    return total


def dense_pairs(length: int, causal: bool) -> int:
    """Pairs per head of dense attention over `length` tokens (causal: the lower triangle)."""
    return length * (length + 1) // 2 if causal else length * length


def flops(pairs: int, head_dim: int, mode: str) -> float:
    """FLOPs of attention over `pairs` pairs (summed over heads and batch): 4 d per pair forward
    (q k^T and p v), 14 d forward + backward (the backward recomputes q k^T and adds four products)."""
    per_pair = {"fwd": 4, "fwd+bwd": 14}[mode] * head_dim
    return float(per_pair) * pairs


def tflops(total_flops: float, ms: float | None) -> float | None:
    return None if ms is None or ms <= 0 else total_flops / (ms * 1e-3) / 1e12


def rows(results: list[dict]) -> list[list]:
    """Table rows: one per (workload, length, mode, contender), with TFLOP/s and the fraction of flash."""
    flash = {(r["workload"], r["length"], r["mode"]): r for r in results if r["contender"] == "dense flash"}
    out = []
    for r in results:
        base = flash.get((r["workload"], r["length"], r["mode"]))
        fraction = ""
        if base and base.get("tflops") and r.get("tflops") is not None:
            fraction = f"{r['tflops'] / base['tflops']:.2f}"
        ms = "" if r.get("ms") is None else f"{r['ms']:.3f}"
        tf = "" if r.get("tflops") is None else f"{r['tflops']:.1f}"
        out.append([r["workload"], r["length"], r["mode"], r["contender"], ms, tf, fraction, r.get("error", "")])
    return out


HEADER = ["workload", "L", "mode", "contender", "ms", "TFLOP/s", "of flash", "note"]


# ---------------------------------------------------------------- timing (CUDA)


def _bindings(workload: Workload, length: int, batch: int, device) -> dict:
    import torch

    import maskc

    if workload.name == "natten2d":
        side = math.isqrt(length)
        return {"h": side, "w": side}
    if workload.name == "documents_causal":  # documents of 1/16 to 1/4 of the length, packed
        g = torch.Generator().manual_seed(0)
        sizes, left = [], length
        while left > 0:
            n = min(left, int(torch.randint(length // 16, length // 4 + 1, (1,), generator=g)))
            sizes.append(n)
            left -= n
        return {"ids": maskc.document_ids(sizes).to(device).expand(batch, length).contiguous()}
    return {}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:100] if text else ""


def _timed(fn, backward: bool, inputs) -> float:
    import torch
    from triton.testing import do_bench

    if not backward:
        with torch.no_grad():
            return do_bench(fn)
    out = fn()
    grad = torch.randn_like(out)

    def step():
        fn().backward(grad)

    return do_bench(step, grad_to_none=inputs)


def contenders(workload: Workload, length: int, args, device) -> dict:
    """name -> a function computing attention on fresh q, k, v (or an error message)."""
    import torch
    import torch.nn.functional as F
    from maskc.runtime.flex import compiled_flex_attention, lower
    from maskc.runtime.prepare import prepare
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    import maskc

    program = maskc.compile(workload.spec, **workload.params)
    bindings = _bindings(workload, length, args.batch, device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    shape = (args.batch, args.heads, length, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    found: dict = {"inputs": (q, k, v)}
    found["maskc"] = lambda: program(q, k, v, backend="triton", **bindings)
    found["flex (maskc's BlockMask)"] = lambda: program(q, k, v, backend="flex", **bindings)
    rowmajor = prepare(program, q, k, 128, 128, None, bindings, layout="rowmajor")
    lowering = lower(rowmajor, device)
    try:
        own = create_block_mask(lowering.mask_mod, 1, args.heads, length, length, device=device, _compile=True)
        flex = compiled_flex_attention()
        found["flex (create_block_mask)"] = lambda: flex(q, k, v, score_mod=lowering.score_mod, block_mask=own)
    except Exception as e:  # e.g. a mask_mod reading tables that create_block_mask's vmap cannot trace
        found["flex (create_block_mask)"] = f"create_block_mask: {type(e).__name__}: {_first_line(e)}"

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=workload.causal)

    found["dense flash"] = flash
    if workload.name == "natten2d" and importlib.util.find_spec("natten") is not None:
        import natten

        side = math.isqrt(length)

        def na2d():  # NATTEN takes [batch, height, width, heads, dim]
            grid = [x.transpose(1, 2).reshape(args.batch, side, side, args.heads, args.head_dim) for x in (q, k, v)]
            return natten.functional.na2d(*grid, kernel_size=workload.params.get("k", 7))

        found["natten"] = na2d
    return found


def measure(workload: Workload, length: int, args, device) -> list[dict]:
    import torch

    import maskc

    program = maskc.compile(workload.spec, **workload.params)
    bindings = _bindings(workload, length, args.batch, device)
    schedule = program.schedule(length, heads=args.heads, backend="triton", head_dim=args.head_dim, **bindings)
    pairs = visited_pairs(schedule) * args.batch  # one batch element's schedule (documents: the same ids)
    found = contenders(workload, length, args, device)
    inputs = list(found.pop("inputs"))
    out = []
    for mode in args.modes:
        for name, fn in found.items():
            record = {"workload": workload.name, "length": length, "mode": mode, "contender": name,
                      "visited_pairs": pairs}  # fmt: skip
            count = dense_pairs(length, workload.causal) * args.heads * args.batch if name == "dense flash" else pairs
            if isinstance(fn, str):  # the contender could not be set up
                record["error"] = fn
                out.append(record)
                continue
            try:
                record["ms"] = _timed(fn, mode == "fwd+bwd", inputs)
                record["tflops"] = tflops(flops(count, args.head_dim, mode), record["ms"])
            except Exception as e:  # one contender failing (memory, an unsupported case) is reported
                record["error"] = f"{type(e).__name__}: {_first_line(e)}"
                torch.cuda.empty_cache()
            out.append(record)
            print("  ", *rows([record])[0], file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--lengths", type=int, nargs="+", help="override every workload's lengths")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--dtype", default="bf16", choices=["fp16", "bf16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--json", default="bench/results/gpu.json")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py times GPU kernels and needs a CUDA device; none is available here "
              f"(torch {torch.__version__}). bench/gpu_static.py compares the kernels without one.",
              file=sys.stderr)  # fmt: skip
        return NO_CUDA
    device = torch.device("cuda")
    results = []
    for name in args.workloads:
        workload = WORKLOADS[name]
        for length in args.lengths or workload.lengths:
            if name == "natten2d" and math.isqrt(length) ** 2 != length:
                continue  # natten2d runs on square grids
            results += measure(workload, length, args, device)
    print(table(rows(results), HEADER))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, batch {args.batch}, "
          f"{args.heads} heads, d {args.head_dim}")  # fmt: skip
    write_json(args.json, {"device": torch.cuda.get_device_name(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
