"""Tile sizes and warps of the generated kernels.

Chosen with `ptxas -v` on sm_90a (bench/kernels.py) so that no kernel spills.
"Heavy" patterns read tables per pair in their modifiers (polyline prefix
sums, bias tables) and need smaller tiles:

| head dim | pattern | tiles (q x k) | warps fwd / dK,dV / dQ |
|---|---|---|---|
| <= 64 | light | 64 x 64 | 4 / 8 / 8 |
| > 64 | light | 32 x 32 | 8 / 8 / 8 |
| <= 64 | heavy | 32 x 32 | 4 / 4 / 8 |
| > 64 | heavy | 16 x 32 | 8 / 8 / 8 |

Short query sequences (decoding, lq <= 16) use a 16-row query tile.
"""

from __future__ import annotations

from dataclasses import dataclass

from maskc.dsl.errors import MaskTypeError

DECODE_ROWS = 16
# Modifiers that read a table for every (query, key) pair.
HEAVY_MODIFIERS = ("polyline", "bias")


@dataclass(frozen=True)
class Config:
    block_q: int
    block_k: int
    fwd_warps: int
    dkdv_warps: int
    dq_warps: int


def padded_dim(d: int) -> int:
    """Head dims are padded to a power of two of at least 16 inside the kernels."""
    if not 1 <= d <= 256:
        raise MaskTypeError(f"the Triton kernels support head dims 1 to 256, got {d}")
    return max(16, 1 << (d - 1).bit_length())


def config(head_dim: int, lq: int, heavy: bool = False) -> Config:
    wide = padded_dim(head_dim) > 64
    if lq <= DECODE_ROWS:
        block_k = 32 if wide or heavy else 64
        warps = 8 if wide else 4
        return Config(DECODE_ROWS, block_k, warps, warps, 8 if heavy else warps)
    if heavy:
        return Config(16, 32, 8, 8, 8) if wide else Config(32, 32, 4, 4, 8)
    return Config(32, 32, 8, 8, 8) if wide else Config(64, 64, 4, 8, 8)


def heavy_forms(forms) -> bool:
    """Whether any head pattern (an `ir.HeadPattern`) reads tables in its modifiers."""
    from maskc.dsl import ir

    return any(isinstance(m, (ir.Polyline, ir.Bias)) for form in forms for m in form.modifiers)
