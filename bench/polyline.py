"""PPMA's polyline path mask, BiFormer-style routing and Routing Transformer
clusters: maskc vs dense attention, on CPU.

    .venv/bin/python bench/polyline.py [--json PATH] [--repeat N]

56 x 56 grid (N = 3136 tokens), 4 heads, head dim 32, batch 1, fp32.
- polyline: maskc (`all with polyline(alpha, beta)`, the CPU executor, mask
  from prefix sums inside the kernel) vs the dense approach (PPMA's code
  path: materialise the N x N mask from alpha and beta, then SDPA with it as
  a float mask).
- route: `route(topk = 12, block = (8, 8))` on the grid (49 regions of 8 x 8,
  about 25% of region pairs kept) vs dense SDPA with the same mask materialised,
  and vs full attention without a mask.
- cluster: `cluster(16, size = 196)` (Routing Transformer: 16 clusters of 196
  queries and keys each, about 6% of pairs) vs dense SDPA with the same mask
  materialised, and vs full attention.
Forward and forward + backward, best time of `--repeat` runs, and peak memory
(RSS above the process's baseline) from a fresh process per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, peak_rss_mb, progress, run_child, table, write_json

H, W, HEADS, DIM = 56, 56, 4, 32
N = H * W
POLY = "pattern ppma_core(alpha: tensor, beta: tensor) on grid(h, w) = all with polyline(alpha, beta)"
ROUTE = "route(topk = 12, block = (8, 8)) on grid(h, w)"
CLUSTER = "cluster(16, size = 196)"


def _inputs(grad: bool):
    import torch

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, N, DIM, generator=g) for _ in range(3))
    alpha = -torch.rand(1, HEADS, H, W, generator=g) * 0.3
    beta = -torch.rand(1, HEADS, H, W, generator=g) * 0.3
    tensors = [q, k, v, alpha, beta]
    if grad:
        for t in tensors:
            t.requires_grad_()
    return tensors


def _centroids():
    import torch

    return torch.randn(HEADS, 16, DIM, generator=torch.Generator().manual_seed(1))


def dense_polyline_mask(alpha, beta):
    """PPMA's N x N mask: row sums of alpha along the query's row, column sums of beta along the key's column."""
    import torch

    ca, cb = alpha.cumsum(-1), beta.cumsum(-2)
    idx = torch.arange(N)
    y, x = idx // W, idx % W
    y1, x1, y2, x2 = y[:, None], x[:, None], y[None, :], x[None, :]
    horizontal = ca[..., y1, torch.maximum(x1, x2)] - ca[..., y1, torch.minimum(x1, x2)]
    vertical = cb[..., torch.maximum(y1, y2), x2] - cb[..., torch.minimum(y1, y2), x2]
    return horizontal + vertical


def run_case(case: str, mode: str, repeat: int) -> dict:
    import torch.nn.functional as F

    import maskc

    grad = mode == "fwd+bwd"
    q, k, v, alpha, beta = _inputs(grad)

    if case == "maskc-polyline":
        program = maskc.compile(POLY)

        def fn():
            return program(q, k, v, alpha=alpha, beta=beta, h=H, w=W)
    elif case == "dense-polyline":

        def fn():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_polyline_mask(alpha, beta))
    elif case == "maskc-route":
        program = maskc.compile(ROUTE)

        def fn():
            return program(q, k, v, h=H, w=W)
    elif case == "dense-route":
        program = maskc.compile(ROUTE)

        def fn():
            mask = program.mask(N, heads=HEADS, h=H, w=W, q=q.detach(), k=k.detach())[0]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif case == "maskc-cluster":
        program = maskc.compile(CLUSTER)
        centroids = _centroids()

        def fn():
            return program(q, k, v, centroids=centroids)
    elif case == "dense-cluster":
        program = maskc.compile(CLUSTER)
        centroids = _centroids()

        def fn():
            mask = program.mask(N, heads=HEADS, q=q.detach(), k=k.detach(), centroids=centroids)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:  # full attention, no mask

        def fn():
            return F.scaled_dot_product_attention(q, k, v)

    def step():
        out = fn()
        if grad:
            out.sum().backward()
        return out

    base = peak_rss_mb()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    seconds = best_time(step, repeat)
    return {"first_s": first, "seconds": seconds, "peak_mb": peak_rss_mb() - base}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        case, mode, repeat = sys.argv[2], sys.argv[3], int(sys.argv[4])
        print(json.dumps(run_case(case, mode, repeat)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    script = str(Path(__file__).resolve())
    results: dict = {}
    groups = [
        ("polyline", "maskc-polyline", ["dense-polyline"]),
        ("route 25%", "maskc-route", ["dense-route", "full-attention"]),
        ("cluster 16x196", "maskc-cluster", ["dense-cluster", "full-attention"]),
    ]
    rows = []
    for title, ours, others in groups:
        for mode in ("fwd", "fwd+bwd"):
            progress(f"{title} {mode}: {ours}")
            mine = run_child(script, ours, mode, str(args.repeat))
            results[f"{ours} {mode}"] = mine
            for other in others:
                progress(f"{title} {mode}: {other}")
                theirs = run_child(script, other, mode, str(args.repeat))
                results[f"{other} {mode}"] = theirs
                rows.append(_row(title, mode, ours, mine, other, theirs))
    print(
        f"\n{N} tokens ({H}x{W}), {HEADS} heads, dim {DIM}, fp32, CPU; best of {args.repeat}; memory = peak RSS growth"
    )
    header = ["pattern", "pass", "maskc", "maskc mem", "vs", "time", "mem", "time ratio", "mem ratio"]
    print(table(rows, header))
    write_json(args.json, results)


def _row(title, mode, ours, mine, other, theirs):
    def t(x):
        return x["error"] if "error" in x else f"{x['seconds'] * 1e3:.0f} ms"

    def m(x):
        return "-" if "error" in x else f"{x['peak_mb']:.0f} MB"

    ok = "error" not in mine and "error" not in theirs
    ratio_t = f"{theirs['seconds'] / mine['seconds']:.2f}x" if ok else "-"
    ratio_m = f"{theirs['peak_mb'] / max(mine['peak_mb'], 1):.1f}x" if ok else "-"
    return [title, mode, t(mine), m(mine), other, t(theirs), m(theirs), ratio_t, ratio_m]


if __name__ == "__main__":
    main()
