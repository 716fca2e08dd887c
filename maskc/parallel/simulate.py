"""What a plan costs, without processes: KV bytes each rank receives and the blocks it visits.

Bytes count keys and values of the received blocks (`kv_heads` x (`head_dim` keys
+ `head_dim` values) x `dtype_bytes` per token, batch 1), against ring attention
and all-gather, which both bring every other rank's KV: (P - 1) / P of it.  Split
rows add what their pieces move: a helper receives their queries (`q_heads` x
`head_dim` x `dtype_bytes` per token), the owner each helper's partial output and
log-sum-exp (`q_heads` x (`head_dim` + 1) in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import Plan


@dataclass
class Summary:
    world: int
    balance: str
    block: int
    recv_bytes: np.ndarray  # per rank, everything: KV, and split rows' queries and pieces
    recv_blocks: np.ndarray  # per rank
    visited: np.ndarray  # per rank, summed over heads
    cost: np.ndarray  # per rank, weighted (partial blocks cost more)
    ring_bytes: float  # per rank: (P - 1) / P of all KV
    split_rows: int = 0  # query blocks split over the ranks holding their keys
    split_bytes: np.ndarray | None = None  # per rank, the part of recv_bytes that split rows move

    @property
    def imbalance(self) -> float:
        """max / mean visited blocks over ranks."""
        return float(self.visited.max() / self.visited.mean()) if self.visited.mean() > 0 else 1.0

    @property
    def cost_imbalance(self) -> float:
        return float(self.cost.max() / self.cost.mean()) if self.cost.mean() > 0 else 1.0

    @property
    def ring_fraction(self) -> float:
        """The most any rank receives, as a fraction of what ring attention sends it."""
        return float(self.recv_bytes.max() / self.ring_bytes) if self.ring_bytes else 0.0

    def text(self) -> str:
        mib = 1 << 20
        lines = [
            f"{self.world} ranks, balance {self.balance!r}, blocks of {self.block} tokens",
            f"received per rank: max {self.recv_bytes.max() / mib:.3f} MiB, mean {self.recv_bytes.mean() / mib:.3f}"
            f" MiB ({self.recv_blocks.max()} blocks max); ring attention / all-gather: {self.ring_bytes / mib:.3f} MiB"
            f" (max is {100 * self.ring_fraction:.2f}% of it)",
            f"visited blocks per rank: max {self.visited.max():.0f}, mean {self.visited.mean():.1f}, "
            f"imbalance {self.imbalance:.3f} (weighted by cost: {self.cost_imbalance:.3f})",
        ]
        if self.split_rows:
            lines.append(
                f"{self.split_rows} query blocks split over the ranks holding their keys: their queries and "
                f"pieces move up to {self.split_bytes.max() / mib:.3f} MiB a rank (in the figures above)"
            )
        if self.world <= 16:
            lines.append("rank  received (KiB)  KV blocks in  visited blocks")
            for r in range(self.world):
                kib = self.recv_bytes[r] / 1024
                lines.append(f"{r:4d}  {kib:14.1f}  {self.recv_blocks[r]:12d}  {self.visited[r]:14.0f}")
        return "\n".join(lines)


def summarize(plan: Plan, *, kv_heads: int = 1, head_dim: int = 64, dtype_bytes: int = 2,
              q_heads: int | None = None) -> Summary:  # fmt: skip
    """`q_heads` defaults to `kv_heads`."""
    per_token = kv_heads * 2 * head_dim * dtype_bytes
    q_heads = kv_heads if q_heads is None else q_heads
    tokens = np.array([plan.block_lengths(r, plan.lk).sum() for r in plan.recv], dtype=np.float64)
    ring = plan.lk * per_token * (plan.world - 1) / plan.world
    guest_tokens = np.array([plan.block_lengths(g, plan.lq).sum() for g in plan.guests], dtype=np.float64)
    piece_tokens = np.array(
        [sum(plan.block_lengths(b, plan.lq).sum() for b in plan.split_sends(r)) for r in range(plan.world)],
        dtype=np.float64,
    )
    split_bytes = guest_tokens * q_heads * head_dim * dtype_bytes + piece_tokens * q_heads * (head_dim + 1) * 4
    return Summary(
        plan.world,
        plan.balance,
        plan.block,
        tokens * per_token + split_bytes,
        np.array([r.size for r in plan.recv]),
        np.asarray(plan.visited),
        np.asarray(plan.cost),
        ring,
        int(np.asarray(plan.split).size),
        split_bytes,
    )
