"""The blocks a pattern's `random` atoms draw, so a schedule can label them apart.

A `random` atom allows pairs only inside the blocks its draws land in: at most
(query coordinates x count) blocks.  On every other block the atom is false on all
pairs, so there the pattern equals the pattern with the atom replaced by false,
whose schedule needs no isolating of the draws rectangle by rectangle.  The
schedule builder labels the drawn blocks one by one with the whole pattern.
"""

from __future__ import annotations

import torch
from maskc.dsl import ir
from maskc.dsl.random_blocks import draw

from .geometry import Geometry, ramp

# Drawn (query block, key block) pairs listed at most; beyond, the plain builder runs.
MAX_DRAWN = 1 << 24


def has_random(mask: ir.Mask) -> bool:
    return any(isinstance(n, ir.RandomBlocks) for n in ir.walk(mask))


def without_random(node: ir.Mask) -> ir.Mask:
    """The pattern with every `random` atom replaced by false."""
    if isinstance(node, ir.RandomBlocks):
        return ir.Const(False)
    if isinstance(node, ir.And):
        return ir.And(tuple(without_random(p) for p in node.parts))
    if isinstance(node, ir.Or):
        return ir.Or(tuple(without_random(p) for p in node.parts))
    if isinstance(node, ir.Not):
        return ir.Not(without_random(node.part))
    return node


def drawn_blocks(mask: ir.Mask, q: Geometry, k: Geometry) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, cols) of every block pair some `random` atom allows a pair in, sorted and
    distinct; None when a side is reordered, a coordinate wraps, or there are too many."""
    atoms = {n for n in ir.walk(mask) if isinstance(n, ir.RandomBlocks)}
    if q.perm is not None or k.perm is not None or any(a.coord.mod is not None for a in atoms):
        return None
    width = k.num_blocks + 1
    keys = []
    for atom in atoms:
        found = _atom_blocks(atom, q, k)
        if found is None:
            return None
        keys.append(found[0] * width + found[1])
    keys = torch.unique(torch.cat(keys)) if keys else torch.zeros(0, dtype=torch.long)
    return keys // width, keys % width


def _atom_blocks(atom: ir.RandomBlocks, q: Geometry, k: Geometry):
    blocks = torch.arange(q.num_blocks)
    lo, hi, _ = q.ranges(atom.coord, blocks, blocks + 1)  # query coordinates of each block
    per_block = hi - lo + 1
    if int(per_block.sum()) * max(atom.count, 1) > MAX_DRAWN:
        return None
    rows = torch.repeat_interleave(blocks, per_block)
    coords = torch.repeat_interleave(lo, per_block) + ramp(per_block)
    drawn = draw(coords, atom.count, atom.seed, atom.head, atom.lo, atom.hi, atom.skip)
    rows = rows[:, None].expand_as(drawn)[drawn >= 0]
    drawn = drawn[drawn >= 0]
    # key coordinate v holds positions v * div .. v * div + div - 1
    first = (drawn * atom.coord.div - k.offset).clamp(0, k.length)
    last = (drawn * atom.coord.div + atom.coord.div - 1 - k.offset).clamp(-1, k.length - 1)
    kb0 = torch.div(first, k.block, rounding_mode="floor")
    count = (torch.div(last, k.block, rounding_mode="floor") - kb0 + 1).clamp(min=0)
    count = torch.where(last >= first, count, 0)
    if int(count.sum()) > MAX_DRAWN:
        return None
    return torch.repeat_interleave(rows, count), torch.repeat_interleave(kb0, count) + ramp(count)
