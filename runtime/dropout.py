"""Attention dropout: a counter-based keep mask, the same on every backend.

Whether the probability of query `qpos` for key `kpos` survives is a pure
function of (seed, batch index, query head, absolute query position, absolute
key position): murmur3's 32-bit finalizer (`fmix32`) applied to the seed, then
after folding in each counter in turn (XOR, then mix).  Positions are those of
the original sequence (`q_offset + i` for query i, key j at j), never the
execution order, so the mask does not depend on block sizes, layouts or the
backend.  A pair is kept when the top 31 bits of its hash reach
``threshold = floor(p * 2**31)``: with probability 1 - p up to 2**-31.  Kept
probabilities are scaled by 1 / (1 - p); the log-sum-exp stays that of the
undropped softmax (as FlashAttention does).

Here in torch with int64 arithmetic masked to 32 bits (a product of two 32-bit
values wraps past 2**63, but its low 32 bits stay right); the Triton kernels
(`_dropout_row` / `_dropout_keep` in codegen/kernel_template.py) compute the
same bits in uint32.

The seed is drawn from torch's default CPU generator when the forward runs
(`draw_seed`), so results are reproducible under `torch.manual_seed`, and the
backward regenerates the same mask from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from maskc.dsl.errors import MaskTypeError

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # folded into the seed first, so that seed 0 does not hash to 0
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35


def draw_seed() -> int:
    """The seed a forward with dropout draws: one `torch.randint` from the default CPU
    generator, so `torch.manual_seed(s); maskc.program.dropout_seed()` reproduces it."""
    return int(torch.randint(2**31 - 1, ()))


def check_p(p: object) -> float:
    """dropout_p as a float in [0, 1), else a clear error."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 <= p < 1:
        raise MaskTypeError(f"dropout_p must be a number with 0 <= dropout_p < 1, got {p!r}")
    return float(p)


@dataclass(frozen=True)
class Dropout:
    """Dropout of one forward call: probability `p` (0 < p < 1) and the drawn `seed`."""

    p: float
    seed: int

    @property
    def threshold(self) -> int:
        """Kept when (hash >> 1) >= threshold; below 2**31, so an int32 kernel argument."""
        return min(int(self.p * 2**31), 2**31 - 1)

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p)


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finalizer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _MASK32
    x = x ^ (x >> 13)
    x = (x * _C2) & _MASK32
    return x ^ (x >> 16)


def _u32(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.int64) & _MASK32


def row_state(seed: int, b, h, qpos) -> torch.Tensor:
    """The hash state of (seed, batch, head, query position); broadcasts over its arguments."""
    x = fmix32(_u32(seed ^ _GOLDEN))
    x = fmix32(x ^ _u32(b))
    x = fmix32(x ^ _u32(h))
    return fmix32(x ^ _u32(qpos))


def keep_from_row(row: torch.Tensor, kpos, threshold: int) -> torch.Tensor:
    """bool: whether the pairs of rows with state `row` and keys at `kpos` are kept."""
    return (fmix32(row ^ _u32(kpos)) >> 1) >= threshold


def keep_mask(dropout: Dropout, b, h, qpos, kpos) -> torch.Tensor:
    """bool keep mask; b, h, qpos, kpos are integer tensors (or ints) that broadcast together."""
    return keep_from_row(row_state(dropout.seed, b, h, qpos), kpos, dropout.threshold)


def dense_keep(dropout: Dropout, batch: int, heads: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """bool [batch, heads, lq, lk] for absolute positions qpos [lq], kpos [lk]."""
    b = torch.arange(batch)[:, None, None, None]
    h = torch.arange(heads)[None, :, None, None]
    return keep_mask(dropout, b, h, qpos[:, None], kpos[None, :])


__all__ = ["Dropout", "check_p", "dense_keep", "draw_seed", "keep_mask"]
