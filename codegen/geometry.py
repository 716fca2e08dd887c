"""Where the tokens of each block sit: coordinate ranges of block ranges.

A side (queries or keys) is `length` tokens cut into blocks of `block`,
optionally reordered by a layout permutation.  For any range of blocks and any
`ir.Coord`, `ranges` gives the smallest and largest coordinate value and
whether every value in between occurs (`exact`), which is what makes a
"mixed" block label trustworthy.
"""

from __future__ import annotations

import math

import torch
from maskc.dsl import ir
from maskc.dsl.evaluate import coordinate


def ramp(counts: torch.Tensor) -> torch.Tensor:
    """0, 1, ..., c-1 for each count c, concatenated: the offsets inside runs of blocks
    expanded block by block."""
    return torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)


class Geometry:
    def __init__(self, length: int, block: int, offset: int = 0, perm: torch.Tensor | None = None) -> None:
        self.length = length
        self.block = block
        self.offset = offset
        self.perm = perm  # perm[i] = original index of the i-th token in execution order
        self.num_blocks = math.ceil(length / block)
        self._tables: dict[ir.Coord, tuple] = {}

    def positions(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions [n, block] of the given blocks and which are real."""
        index = blocks[:, None] * self.block + torch.arange(self.block)[None, :]
        valid = index < self.length
        index = torch.where(valid, index, torch.zeros_like(index))
        if self.perm is not None:
            index = self.perm[index]
        return index + self.offset, valid

    def ranges(self, coord: ir.Coord, b0: torch.Tensor, b1: torch.Tensor):
        """(lo, hi, exact) of the coordinate over blocks [b0, b1), elementwise."""
        if self.perm is None:
            return self._contiguous(coord, b0, b1)
        return self._permuted(coord, b0, b1)

    def _contiguous(self, coord: ir.Coord, b0, b1):
        s = b0 * self.block + self.offset
        e = torch.clamp(b1 * self.block, max=self.length) - 1 + self.offset
        if coord.mod is None:
            lo = torch.div(s, coord.div, rounding_mode="floor")
            hi = torch.div(e, coord.div, rounding_mode="floor")
            return lo, hi, torch.ones_like(lo, dtype=torch.bool)
        m = coord.mod
        sm, em = s % m, e % m
        lo = torch.div(sm, coord.div, rounding_mode="floor")
        hi = torch.div(em, coord.div, rounding_mode="floor")
        span = e - s + 1
        no_wrap = (span < m) & (sm <= em)
        wraps_all = (span >= m) | (hi + 1 >= lo)
        top = coord.size - 1
        full_lo, full_hi = torch.zeros_like(lo), torch.full_like(hi, top)
        out_lo = torch.where(no_wrap, lo, full_lo)
        out_hi = torch.where(no_wrap, hi, full_hi)
        exact = no_wrap | wraps_all
        return out_lo, out_hi, exact

    def _block_table(self, coord: ir.Coord):
        if coord not in self._tables:
            blocks = torch.arange(self.num_blocks)
            pos, valid = self.positions(blocks)
            values = coordinate(pos, coord)
            big = torch.iinfo(torch.int64).max
            lo = torch.where(valid, values, torch.full_like(values, big)).amin(1)
            hi = torch.where(valid, values, torch.full_like(values, -big)).amax(1)
            ordered = torch.sort(torch.where(valid, values, torch.full_like(values, big)), dim=1).values
            distinct = (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] != big)
            count = distinct.sum(1) + 1
            exact = count == hi - lo + 1
            self._tables[coord] = (_sparse_table(lo, torch.minimum), _sparse_table(hi, torch.maximum), exact)
        return self._tables[coord]

    def _permuted(self, coord: ir.Coord, b0, b1):
        lo_table, hi_table, exact = self._block_table(coord)
        lo = _query(lo_table, b0, b1, torch.minimum)
        hi = _query(hi_table, b0, b1, torch.maximum)
        single = b1 - b0 == 1
        return lo, hi, single & exact[torch.clamp(b0, max=self.num_blocks - 1)]


def _sparse_table(values: torch.Tensor, op) -> list[torch.Tensor]:
    table = [values]
    width = 1
    while 2 * width <= values.numel():
        prev = table[-1]
        table.append(op(prev[:-width], prev[width:]))
        width *= 2
    return table


def _query(table: list[torch.Tensor], b0: torch.Tensor, b1: torch.Tensor, op) -> torch.Tensor:
    span = (b1 - b0).clamp(min=1)
    level = torch.floor(torch.log2(span.double())).long()
    out = torch.empty_like(b0)
    for k in torch.unique(level).tolist():
        pick = level == k
        width = 1 << k
        row = table[k]
        out[pick] = op(row[b0[pick]], row[b1[pick] - width])
    return out
