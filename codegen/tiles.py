"""Tile sizes and warps of the generated kernels.

Chosen with `ptxas -v` on sm_90a (bench/kernels.py) so that no kernel spills,
even with softcap, ALiBi and a bias table inlined: head dims up to 64 use
64 x 64 tiles (4 warps forward, 8 backward), wider heads 32 x 32 with 8 warps,
and short query sequences (decoding) a 16-row query tile.
"""

from __future__ import annotations

from dataclasses import dataclass

from maskc.dsl.errors import MaskTypeError

DECODE_ROWS = 16


@dataclass(frozen=True)
class Config:
    block_q: int
    block_k: int
    fwd_warps: int
    bwd_warps: int


def padded_dim(d: int) -> int:
    """Head dims are padded to a power of two of at least 16 inside the kernels."""
    if not 1 <= d <= 256:
        raise MaskTypeError(f"the Triton kernels support head dims 1 to 256, got {d}")
    return max(16, 1 << (d - 1).bit_length())


def config(head_dim: int, lq: int) -> Config:
    wide = padded_dim(head_dim) > 64
    block_k = 32 if wide else 64
    if lq <= DECODE_ROWS:
        return Config(DECODE_ROWS, block_k, 8 if wide else 4, 8 if wide else 4)
    return Config(32, 32, 8, 8) if wide else Config(64, 64, 4, 8)
