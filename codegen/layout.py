"""Token layouts: reorder a grid's tokens tile by tile so blocks become tiles.

With row-major tokens, a 64-token block of a 56-wide image is a strip of one
or two rows, and a 7x7 neighborhood touches many strips partially.  Ordering
tokens by 8x8 tiles (NATTEN's token permutation, PBS-Attn, PARO) makes each
block a square, and neighborhoods, windows and MaxViT blocks mostly cover
whole blocks.  The runtime gathers q, k, v in tile order and scatters the
output back; the mask's meaning is unchanged.
"""

from __future__ import annotations

import itertools
import math

import torch


def tile_permutation(grid: tuple[int, ...], tile: tuple[int, ...]) -> torch.Tensor:
    """perm[i] = row-major index of the i-th token in tile order (tiles
    row-major, tokens row-major inside a tile); every tile size divides its axis."""
    n = len(grid)
    index = torch.arange(math.prod(grid)).reshape(grid)
    # Split each axis a into (grid[a] // tile[a], tile[a]), then put tile axes last.
    split = index.reshape([x for g, t in zip(grid, tile, strict=True) for x in (g // t, t)])
    order = [2 * a for a in range(n)] + [2 * a + 1 for a in range(n)]
    return split.permute(order).reshape(-1).contiguous()


def tile_shapes(grid: tuple[int, ...], block: int) -> list[tuple[int, ...]]:
    """Tile shapes holding exactly `block` tokens that divide the grid, squarest first."""
    divisors = [[t for t in range(1, g + 1) if g % t == 0] for g in grid]
    shapes = [s for s in itertools.product(*divisors) if math.prod(s) == block]
    # Prefer shapes whose sides are close to each other (fewest cut neighborhoods).
    return sorted(shapes, key=lambda s: (max(s) / min(s), s[::-1]))
