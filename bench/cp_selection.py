"""Context parallel selections (`route` scorers, `vertical_slash`): cost per rank against one process.

    .venv/bin/python bench/cp_selection.py [--len 16384] [--world 2] [--repeat 3]

For each form, `world` gloo ranks x 1 thread, each holding a contiguous share of
q and k (float32, 1 batch, 8 heads, 4 KV heads, head dim 64), compute the whole
sequence's selection with `runtime.blockset.route_tables`; one process x 1
thread computes it from the whole q and k (`dsl.dynamic`).  Reported: the
busiest rank's wall and CPU time (best of `repeat`; CPU time is what a shared
machine does not inflate), one process's, and the bytes each rank hands to the
collectives (all-reduce inputs and all-gather inputs), against the bytes of
its q and k share that gathering q and k would send.  Every rank's tables are
checked equal to one process's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time
from maskc.dsl import dynamic, ir
from maskc.runtime.blockset import route_tables

import maskc
from maskc.parallel.collective import GroupCollective

FORMS = {
    "moba (mean, per query)": ("moba", {"b": 512, "topk": 3}),
    "max": ('causal & route(topk = 4, block = 128, score = "max", causal = true, own = true)', {}),
    "quest (minmax)": ("quest", {"page": 16, "pages": 64}),
    "xattention (antidiagonal)": ("xattention", {"b": 128, "s": 8, "tau": 0.9}),
    "minference (vertical_slash)": ("minference_vs", {"v": 1000, "s": 2048}),
}
HEADS, KV_HEADS, DIM = 8, 4, 64


def _inputs(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, HEADS, length, DIM, generator=g), torch.randn(1, KV_HEADS, length, DIM, generator=g)


def _parts(table) -> tuple:
    return table if isinstance(table, tuple) else (table,)


def one_process(program, q: torch.Tensor, k: torch.Tensor) -> dict:
    """The selection tables from the whole q and k, keyed as route_tables keys them."""
    length = q.shape[2]
    instance = program.spec.instantiate(length, length, heads=HEADS)
    positions = torch.arange(length)
    out = {}
    for p in instance.patterns:
        for n in ir.walk(p.mask):
            if isinstance(n, ir.Route):
                out[("route", n)] = dynamic.route_selection(n, q, k, positions, positions)[:, 0]
            elif isinstance(n, ir.VerticalSlash):
                every = dataclasses.replace(n, head=0)  # one selection for all heads, as evaluate caches it
                if ("vertical_slash", every) not in out:
                    out[("vertical_slash", every)] = dynamic.vertical_slash_selection(every, q, k, 0)
    return out


class Counting(GroupCollective):
    """GroupCollective that adds up the bytes this rank hands to the collectives."""

    sent = 0

    def all_reduce(self, x, op):
        self.sent += x.numel() * x.element_size()
        return super().all_reduce(x, op)

    def all_gather(self, x):
        self.sent += x.numel() * x.element_size()
        return super().all_gather(x)


def _rank(rank: int, world: int, port: int, length: int, repeat: int, path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))  # fmt: skip
    q_all, k_all = _inputs(length)
    tokens = torch.arange(length).tensor_split(world)[rank]
    q, k = q_all[:, :, tokens].contiguous(), k_all[:, :, tokens].contiguous()
    results = {}
    for name, (spec, params) in FORMS.items():
        program = maskc.compile(spec, **params)
        coll = Counting()
        tables = route_tables(program, length, length, q, k, tokens, tokens, coll)
        sent = coll.sent

        def step(program=program):
            dist.barrier()
            route_tables(program, length, length, q, k, tokens, tokens, GroupCollective())
            dist.barrier()

        wall = best_time(step, repeat)
        cpu = best_time(step, repeat, clock=time.process_time)
        want = one_process(program, q_all, k_all)
        equal = all(
            all(torch.equal(x, y) for x, y in zip(_parts(value), _parts(want[key]), strict=True))
            for key, value in tables.items()
        )
        results[name] = {"wall": wall, "cpu": cpu, "sent": sent, "share": (q.numel() + k.numel()) * 4, "equal": equal}
    with open(f"{path}.{rank}", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def main() -> None:
    import socket

    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--len", type=int, default=16384)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank")
        mp.start_processes(_rank, args=(args.world, port, args.len, args.repeat, path), nprocs=args.world,
                           start_method="spawn")  # fmt: skip
        q, k = _inputs(args.len)
        ranks = []
        for r in range(args.world):
            with open(f"{path}.{r}") as f:
                ranks.append(json.load(f))
        print(f"L = {args.len}, {args.world} ranks x 1 thread (gloo), float32, {HEADS} heads / {KV_HEADS} KV x {DIM}")
        print("| form | one process wall / CPU | busiest rank wall / CPU | bytes to collectives per rank | "
              "its q + k share | tables equal |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for name, (spec, params) in FORMS.items():
            program = maskc.compile(spec, **params)
            wall = best_time(lambda program=program: one_process(program, q, k), args.repeat)
            cpu = best_time(lambda program=program: one_process(program, q, k), args.repeat, time.process_time)
            equal = all(res[name]["equal"] for res in ranks)
            busiest = max(ranks, key=lambda res, name=name: res[name]["cpu"])[name]
            print(f"| {name} | {wall * 1e3:.0f} / {cpu * 1e3:.0f} ms | {busiest['wall'] * 1e3:.0f} / "
                  f"{busiest['cpu'] * 1e3:.0f} ms | {max(res[name]['sent'] for res in ranks) / 2**20:.2f} MiB | "
                  f"{busiest['share'] / 2**20:.1f} MiB | {'yes' if equal else 'NO'} |")  # fmt: skip


if __name__ == "__main__":
    main()
