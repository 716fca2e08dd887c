"""The collectives `dsl.sharded` needs, over a torch.distributed process group."""

from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class GroupCollective:
    """`dsl.sharded.Collective` over `group` (None: the world)."""

    def __init__(self, group=None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, op=_OPS[op], group=self.group)
        return out

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x, group=self.group)
        return out
