"""The local step of context parallelism against one process, on one thread.

    .venv/bin/python bench/blockset.py [--len 32768] [--ranks 2] [--heads 4] [--repeat 5]

Causal window 256 (`causal & window(255, 0)`), float32, batch 1, head dim 64.
The query blocks are cut into `--ranks` contiguous shares; each share's keys
are the key blocks its queries visit (what a rank holds after the exchange).
Timed, forward + backward, best of `--repeat`, interleaved round by round
(the machine is shared and noisy): one process over the whole sequence
(`program(q, k, v, backend="cpu")`), and each share's
`runtime.blockset.attend_block_subset` in turn.  The ideal share is 1 / ranks
of the one-process time; the exchange itself is not measured here.
"""

from __future__ import annotations

import argparse
import time

import torch
from maskc.runtime.blockset import attend_block_subset, prepare_blockset

import maskc

D = 64
SPEC = "causal & window(255, 0)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--len", type=int, default=32768)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    program = maskc.compile(SPEC)
    q, k, v = (torch.randn(1, args.heads, args.len, D, requires_grad=True) for _ in range(3))
    glob = prepare_blockset(program, args.len, heads=args.heads, head_dim=D)
    shares = []
    for q_blocks in torch.arange(glob.num_q_blocks).tensor_split(args.ranks):
        k_blocks = glob.visited(q_blocks)
        qt, kt = glob.q_tokens(q_blocks), glob.k_tokens(k_blocks)
        local = [x.detach()[:, :, t].requires_grad_() for x, t in ((q, qt), (k, kt), (v, kt))]
        shares.append((q_blocks, k_blocks, local))

    def whole() -> None:
        program(q, k, v, backend="cpu").sum().backward()

    def share(i: int) -> None:
        q_blocks, k_blocks, (ql, kl, vl) = shares[i]
        attend_block_subset(glob, ql, kl, vl, q_blocks, k_blocks).sum().backward()

    runs = [("one process", whole)] + [(f"rank {i}", lambda i=i: share(i)) for i in range(args.ranks)]
    best = {name: float("inf") for name, _ in runs}
    for _, f in runs:  # warm: schedules, plans, kept preparations
        f()
    for _ in range(args.repeat):
        for name, f in runs:
            start = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - start)
    one = best["one process"]
    print(f"{SPEC}, L = {args.len}, H = {args.heads}, D = {D}, float32, 1 thread, forward + backward")
    for name, _ in runs:
        print(f"  {name:12s} {best[name] * 1e3:9.1f} ms  {best[name] / one:5.2f}x")


if __name__ == "__main__":
    main()
