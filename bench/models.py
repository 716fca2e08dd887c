"""Decode-step latency: one new query against a growing KV cache (batch 1, 8 heads, d 64).

Compares maskc (CPU executor) with SDPA over the whole cache and with SDPA over
the cache sliced to exactly the keys the pattern keeps (the lower bound: same
keys, no mask).  Each step appends one key, as generation does, so a schedule
keyed on the cache length is rebuilt every step.

    .venv/bin/python bench/models.py [--lk 4096 16384 65536] [--steps 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, progress, table, write_json

import maskc

HEADS, DIM = 8, 64
PATTERNS = {
    "mistral(w = 4096)": (maskc.compile("mistral", w=4096), lambda lk: [(max(0, lk - 4096), lk)]),
    "streaming(sinks = 4, w = 1024)": (
        maskc.compile("streaming", sinks=4, w=1024),
        lambda lk: [(0, min(4, lk)), (max(4, lk - 1024), lk)],
    ),
}


def decode_steps(lk: int, steps: int, step_fn) -> float:
    """Mean seconds per step over `steps` steps starting at cache length lk."""
    lengths = range(lk, lk + steps)

    def run():
        for n in lengths:
            step_fn(n)

    return best_time(run, repeat=2) / steps


def measure(name: str, lk: int, steps: int) -> dict:
    program, kept = PATTERNS[name]
    g = torch.Generator().manual_seed(0)
    cache_k = torch.randn(1, HEADS, lk + steps, DIM, generator=g)
    cache_v = torch.randn(1, HEADS, lk + steps, DIM, generator=g)
    q = torch.randn(1, HEADS, 1, DIM, generator=g)

    def maskc_step(n):
        return program(q, cache_k[:, :, :n], cache_v[:, :, :n])

    def full_step(n):
        return F.scaled_dot_product_attention(q, cache_k[:, :, :n], cache_v[:, :, :n])

    def sliced_step(n):
        ranges = kept(n)
        k = torch.cat([cache_k[:, :, a:b] for a, b in ranges], 2)
        v = torch.cat([cache_v[:, :, a:b] for a, b in ranges], 2)
        return F.scaled_dot_product_attention(q, k, v)

    n = lk + steps - 1
    torch.testing.assert_close(maskc_step(n), sliced_step(n), atol=1e-5, rtol=1e-5)
    maskc_step(lk)  # first call: compile and cache what does not depend on lk
    t_maskc = decode_steps(lk, steps, maskc_step)
    t_full = decode_steps(lk, steps, full_step)
    t_sliced = decode_steps(lk, steps, sliced_step)
    return {
        "pattern": name,
        "lk": lk,
        "maskc_ms": round(t_maskc * 1e3, 3),
        "sdpa_full_ms": round(t_full * 1e3, 3),
        "sdpa_sliced_ms": round(t_sliced * 1e3, 3),
        "maskc_vs_sliced": round(t_maskc / t_sliced, 1),
        "full_vs_maskc": round(t_full / t_maskc, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lk", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for name in PATTERNS:
        for lk in args.lk:
            progress(f"{name} at lk = {lk}")
            rows.append(measure(name, lk, args.steps))
    print(table([list(r.values()) for r in rows], list(rows[0])))
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
