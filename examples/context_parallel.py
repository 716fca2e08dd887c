"""Context parallelism on this machine's CPU: one attention pattern over 2 processes.

    torchrun --nproc-per-node 2 examples/context_parallel.py [--len 65536]

Each rank holds half of the tokens (as the plan assigns them), brings in only
the key/value blocks its queries visit (one all-to-all), and computes its
queries' attention; the backward returns dK/dV of the blocks it received to
their owners.  Two patterns: a causal window of 1024 tokens, and packed
documents (`documents_causal`, uneven lengths).  Rank 0 checks the output and
all gradients against one process (float32, 1e-5) and prints what moved.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import maskc
from maskc.parallel.simulate import summarize

HEADS, DIM = 4, 64


def run(name: str, program, length: int, **bindings) -> None:
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)  # every rank makes the same full tensors (a stand-in for a model)
    q, k, v, dout = (torch.randn(1, HEADS, length, DIM, generator=g) for _ in range(4))

    cp = maskc.ContextParallel(program)
    plan = cp.plan(length, heads=HEADS, **bindings)
    q_local, k_local, v_local = (plan.shard(t).requires_grad_() for t in (q, k, v))
    start = time.perf_counter()
    out = cp(q_local, k_local, v_local, plan=plan)
    out.backward(plan.shard(dout))
    seconds = time.perf_counter() - start

    got = {
        "out": plan.unshard(out),
        "dq": plan.unshard(q_local.grad),
        "dk": plan.unshard(k_local.grad),
        "dv": plan.unshard(v_local.grad),
    }
    if rank == 0:
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        want = program(*full, backend="cpu", **bindings)
        want.backward(dout)
        expected = {"out": want, "dq": full[0].grad, "dk": full[1].grad, "dv": full[2].grad}
        worst = max((got[n] - expected[n]).abs().max().item() for n in got)
        ok = all(torch.allclose(got[n], expected[n], atol=1e-5, rtol=1e-5) for n in got)
        s = summarize(plan, kv_heads=HEADS, head_dim=DIM, dtype_bytes=4)
        print(f"{name}, {length} tokens on {plan.world} ranks: forward + backward {seconds:.2f} s on rank 0")
        received = ", ".join(f"{b / 2**20:.2f}" for b in s.recv_bytes)
        print(f"  KV received per rank: {received} MiB (ring attention: {s.ring_bytes / 2**20:.2f} MiB)")
        print(f"  visited blocks per rank: {s.visited.astype(int).tolist()}")
        print(f"  equals one process (out, dq, dk, dv; max difference {worst:.2e}): {'yes' if ok else 'NO'}")
        if not ok:
            raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--len", type=int, default=65536, help="tokens (default 65536)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{dist.get_world_size()} ranks (gloo), float32, {HEADS} heads of dim {DIM}")
    run("causal & window(1024)", maskc.compile("causal & window(1024)"), args.len)
    # packed documents of uneven lengths: the ids are small, every rank passes all of them
    cuts = torch.tensor([0, 7, 19, 20, 28, 37, 43, 51, 60, 71, 77, 80, 92, 100]) * args.len // 100
    ids = torch.repeat_interleave(torch.arange(cuts.numel() - 1), cuts[1:] - cuts[:-1])[None]
    run("documents_causal", maskc.compile("documents_causal"), args.len, ids=ids)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
