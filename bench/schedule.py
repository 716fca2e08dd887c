"""Schedule build time and memory: maskc vs FlexAttention's create_block_mask.

    .venv/bin/python bench/schedule.py [--json results.json] [--quick]

Table 1: a causal sliding window (W = 256, blocks of 128) at several lengths,
each measurement in a fresh process (time: best of 3 steady-state calls; first
call separately, it includes compilation; memory: peak RSS above the process's
own baseline).  Table 2: schedule efficiency (allowed pairs / pairs in visited
blocks) for grid patterns, maskc row-major, maskc tiled, and Flex's BlockMask
for the same mask at the same block size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, peak_rss_mb, progress, run_child, table, write_json

WINDOW, BLOCK = 256, 128
SPEC = f"causal & window({WINDOW})"


def child_maskc(length: int) -> dict:
    import maskc

    warm = maskc.compile(SPEC)
    warm.schedule(4096, block_q=BLOCK, block_k=BLOCK)
    base = peak_rss_mb()
    start = time.perf_counter()
    program = maskc.compile(SPEC)
    sched = program.schedule(length, block_q=BLOCK, block_k=BLOCK)
    first = time.perf_counter() - start
    steady = best_time(lambda: program.schedule(length, block_q=BLOCK, block_k=BLOCK))
    return {
        "first_s": first,
        "steady_s": steady,
        "peak_mb": peak_rss_mb() - base,
        "schedule_bytes": sched.nbytes,
        "visited": sched.visited_blocks(),
    }


def child_flex(length: int, compiled: bool) -> dict:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding(b, h, q, k):
        return (q >= k) & (q - k <= WINDOW)

    def make():
        return create_block_mask(sliding, 1, 1, length, length, device="cpu", BLOCK_SIZE=BLOCK, _compile=compiled)

    make_small = lambda: create_block_mask(  # noqa: E731
        sliding, 1, 1, 4096, 4096, device="cpu", BLOCK_SIZE=BLOCK, _compile=compiled
    )
    start = time.perf_counter()
    make_small()  # compile (or warm) on a small size first
    compile_s = time.perf_counter() - start
    base = peak_rss_mb()
    start = time.perf_counter()
    mask = make()
    first = time.perf_counter() - start
    steady = best_time(make, repeat=2)
    nbytes = sum(t.numel() * t.element_size() for t in mask.as_tuple() if isinstance(t, torch.Tensor))
    visited = int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())
    return {
        "compile_s": compile_s,
        "first_s": first,
        "steady_s": steady,
        "peak_mb": peak_rss_mb() - base,
        "schedule_bytes": nbytes,
        "visited": visited,
    }


def child(args: list[str]) -> None:
    kind, length = args[0], int(args[1])
    if kind == "maskc":
        out = child_maskc(length)
    else:
        out = child_flex(length, compiled=kind == "flex-compiled")
    print(json.dumps(out))


def fmt_s(x: dict, key: str = "steady_s") -> str:
    return x["error"] if "error" in x else f"{x[key] * 1e3:.1f} ms"


def fmt_mb(x: dict) -> str:
    return "-" if "error" in x else f"{x['peak_mb']:.0f} MB"


def ratio(a: dict, b: dict) -> str:
    if "error" in a or "error" in b:
        return "-"
    return f"{b['steady_s'] / a['steady_s']:.0f}x"


def build_times(lengths: list[int], eager_max: int) -> dict:
    results = {}
    rows = []
    script = str(Path(__file__).resolve())
    for length in lengths:
        progress(f"L = {length}: maskc")
        m = run_child(script, "maskc", str(length))
        progress(f"L = {length}: create_block_mask compiled")
        fc = run_child(script, "flex-compiled", str(length))
        fe = {"error": "skipped (does not fit)"}
        if length <= eager_max:
            progress(f"L = {length}: create_block_mask eager")
            fe = run_child(script, "flex-eager", str(length))
        results[length] = {"maskc": m, "flex_compiled": fc, "flex_eager": fe}
        rows.append(
            [
                f"{length // 1024}K",
                fmt_s(m),
                fmt_s(m, "first_s"),
                fmt_mb(m),
                fmt_s(fc),
                fmt_mb(fc),
                ratio(m, fc),
                fmt_s(fe),
                ratio(m, fe),
            ]
        )
    header = [
        "L",
        "maskc",
        "maskc 1st",
        "maskc mem",
        "flex compiled",
        "flex mem",
        "ratio",
        "flex eager",
        "ratio",
    ]
    print(f"\nSchedule build, {SPEC}, block {BLOCK} (steady state; ratio = flex time / maskc time)")
    print(table(rows, header))
    return results


def million() -> dict:
    progress("L = 1M: maskc")
    m = run_child(str(Path(__file__).resolve()), "maskc", str(1 << 20))
    ok_t = "error" not in m and m["steady_s"] < 0.1
    ok_m = "error" not in m and m["peak_mb"] < 50
    print(
        f"\nmaskc alone at L = 1M: {fmt_s(m)} (first call {fmt_s(m, 'first_s')}), peak memory {fmt_mb(m)}, "
        f"schedule {m.get('schedule_bytes', 0) / 1e6:.2f} MB; targets < 0.1 s: {'met' if ok_t else 'MISSED'}, "
        f"< 50 MB: {'met' if ok_m else 'MISSED'}"
    )
    return m


GRID_PATTERNS = [
    ("NATTEN 2-D 7x7, 56x56", "neighborhood((7, 7)) on grid(h, w)", {"h": 56, "w": 56}),
    ("MaxViT block P=7, 56x56", "block((7, 7)) on grid(h, w)", {"h": 56, "w": 56}),
    ("MaxViT grid G=7, 56x56", "stride((h // 7, w // 7)) on grid(h, w)", {"h": 56, "w": 56}),
    ("NATTEN 3-D 3x7x7, 8x32x32", "neighborhood((3, 7, 7)) on grid(t, h, w)", {"t": 8, "h": 32, "w": 32}),
]


def flex_efficiency(dense, block: int) -> tuple[int, float]:
    """Visited blocks and efficiency of Flex's BlockMask for a dense [n, n] mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = dense.shape[-1]

    def lookup(b, h, q, k):
        return dense[q, k]

    bm = create_block_mask(lookup, 1, 1, n, n, device="cpu", BLOCK_SIZE=block)
    visited, pairs = 0, 0
    for qb in range(-(-n // block)):
        rows_here = min(block, n - qb * block)
        for indices, counts in (
            (bm.kv_indices, bm.kv_num_blocks),
            (bm.full_kv_indices, bm.full_kv_num_blocks),
        ):
            for kb in indices[0, 0, qb, : counts[0, 0, qb]].tolist():
                visited += 1
                pairs += rows_here * min(block, n - kb * block)
    return visited, int(dense.sum()) / pairs


def efficiency_table(block: int = 64) -> dict:
    import maskc

    rows, results = [], {}
    for title, spec, sizes in GRID_PATTERNS:
        progress(f"efficiency: {title}")
        program = maskc.compile(spec)
        n = 1
        for v in sizes.values():
            n *= v
        row_major = program.schedule(n, block_q=block, block_k=block, layout="rowmajor", **sizes)
        tiled = program.schedule(n, block_q=block, block_k=block, layout="auto", **sizes)
        dense = program.mask(n, **sizes)[0]
        flex_visited, flex_eff = flex_efficiency(dense, block)
        results[title] = {
            "rowmajor": [row_major.visited_blocks(), row_major.efficiency()],
            "auto": [tiled.visited_blocks(), tiled.efficiency(), tiled.layout],
            "flex": [flex_visited, flex_eff],
        }
        rows.append(
            [
                title,
                f"{row_major.efficiency():.3f} ({row_major.visited_blocks()})",
                f"{tiled.efficiency():.3f} ({tiled.visited_blocks()}, {tiled.layout})",
                f"{flex_eff:.3f} ({flex_visited})",
            ]
        )
    print(
        f"\nSchedule efficiency, block {block} (allowed pairs / pairs in visited blocks; visited blocks in parentheses)"
    )
    print(table(rows, ["pattern", "maskc row-major", "maskc auto layout", "flex BlockMask"]))
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write all figures here")
    parser.add_argument("--quick", action="store_true", help="only 4K and 16K, and the efficiency table")
    args = parser.parse_args()
    lengths = [4096, 16384] if args.quick else [4096, 16384, 65536, 131072]
    results = {"build": build_times(lengths, eager_max=16384)}
    if not args.quick:
        results["million"] = million()
    results["efficiency"] = efficiency_table()
    write_json(args.json, results)


if __name__ == "__main__":
    main()
