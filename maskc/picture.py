"""Pictures of masks: ASCII for terminals, PNG for documents.

Large masks are reduced to one character per cell of positions; every
picture says how much was reduced and whether it was sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from maskc.dsl import evaluate
from maskc.dsl.spec import Instance

# Dense evaluation beyond this many pairs samples positions instead.
EXACT_PAIRS = 1 << 27
SHADES = " .o#"


@dataclass
class Reduced:
    """Fraction of allowed pairs per cell, one grid per distinct head pattern."""

    fractions: list[torch.Tensor]  # [rows, cols] float per head group
    groups: list[list[int]]  # heads in each group
    cell: tuple[int, int]  # positions per cell (queries, keys)
    sampled: bool


def reduce_mask(instance: Instance, tensors: evaluate.Tensors, max_cells: int = 64) -> Reduced:
    s = instance.sizes
    cell_q = max(1, math.ceil(s.lq / max_cells))
    cell_k = max(1, math.ceil(s.lk / max_cells))
    cell = max(cell_q, cell_k)
    cell_q = cell_k = cell
    sampled = s.lq * s.lk > EXACT_PAIRS
    qp_all, kp_all = evaluate.positions(instance)
    if sampled:
        per = 8
        qp = _sample(qp_all, cell_q, per)
        kp = _sample(kp_all, cell_k, per)
    else:
        qp, kp = qp_all, kp_all
    rows, cols = math.ceil(s.lq / cell_q), math.ceil(s.lk / cell_k)
    q_cells = torch.div(qp - s.q_offset, cell_q, rounding_mode="floor")
    k_cells = torch.div(kp, cell_k, rounding_mode="floor")
    fractions = []
    for pattern in instance.patterns:
        allowed = torch.zeros(rows, cols, dtype=torch.float64)
        total = torch.zeros(rows, cols, dtype=torch.float64)
        for start in range(0, qp.numel(), 2048):
            m = evaluate.mask(pattern.mask, qp[start : start + 2048, None], kp[None, :], tensors)
            m = m.double().mean(0) if m.dim() == 3 else m.double()
            qc = q_cells[start : start + 2048]
            index = (qc[:, None] * cols + k_cells[None, :]).reshape(-1)
            allowed.view(-1).index_add_(0, index, m.reshape(-1))
            total.view(-1).index_add_(0, index, torch.ones_like(m.reshape(-1)))
        fractions.append(allowed / total.clamp(min=1))
    groups = [[h for h, g in enumerate(instance.head_group) if g == i] for i in range(len(instance.patterns))]
    return Reduced(fractions, groups, (cell_q, cell_k), sampled)


def _sample(positions: torch.Tensor, cell: int, per: int) -> torch.Tensor:
    if cell <= per:
        return positions
    first = positions[0]
    cells = math.ceil(positions.numel() / cell)
    offsets = torch.linspace(0, cell - 1, per).round().long()
    picked = (torch.arange(cells)[:, None] * cell + offsets[None, :]).reshape(-1)
    picked = picked[picked < positions.numel()]
    return first + picked


def shade(fraction: float) -> str:
    if fraction <= 0:
        return SHADES[0]
    if fraction >= 1:
        return SHADES[3]
    return SHADES[1] if fraction < 0.5 else SHADES[2]


def _ranges(heads: list[int]) -> str:
    parts, start = [], heads[0]
    for prev, cur in zip(heads, [*heads[1:], None], strict=True):
        if cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(parts)


def ascii_picture(reduced: Reduced, lq: int, lk: int) -> str:
    cq, ck = reduced.cell
    lines = []
    if cq == 1 and ck == 1:
        lines.append(f"mask {lq} x {lk} (queries down, keys across); '#' allowed, ' ' not")
    else:
        how = "sampled" if reduced.sampled else "exact"
        lines.append(
            f"mask {lq} x {lk} downsampled: each character is {cq} x {ck} positions ({how} fraction allowed: "
            f"'#' all, 'o' half or more, '.' some, ' ' none)"
        )
    for fractions, heads in zip(reduced.fractions, reduced.groups, strict=True):
        if len(reduced.groups) > 1:
            lines.append(f"heads {_ranges(heads)}:")
        border = "+" + "-" * fractions.shape[1] + "+"
        lines.append(border)
        for row in fractions.tolist():
            lines.append("|" + "".join(shade(f) for f in row) + "|")
        lines.append(border)
    return "\n".join(lines)


def write_png(reduced: Reduced, path: str, scale: int | None = None) -> None:
    """One panel per distinct head pattern, allowed pairs dark."""
    from PIL import Image

    panels = []
    for fractions in reduced.fractions:
        rows, cols = fractions.shape
        s = scale or max(1, 512 // max(rows, cols))
        # Any allowed pair shows at least light grey, so sparse cells stay visible.
        darkness = torch.where(fractions > 0, 0.3 + 0.7 * fractions, torch.zeros_like(fractions))
        pixels = (255 * (1 - darkness)).round().clamp(0, 255).to(torch.uint8)
        img = Image.fromarray(pixels.numpy(), mode="L").resize((cols * s, rows * s), Image.NEAREST)
        panels.append(img)
    gap = 8
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    height = max(p.height for p in panels)
    canvas = Image.new("L", (width, height), 200)
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + gap
    canvas.save(path)


SCHEDULE_SHADES = {0: " ", 1: "+", 2: "#"}


def schedule_picture(schedule, max_cells: int = 64) -> str:
    """Block states per distinct head pattern: '#' full, '+' partial, ' ' empty;
    large schedules show the busiest state of each cell of blocks."""
    dense = schedule.to_dense()
    rows, cols = dense.shape[1:]
    cell = max(1, math.ceil(max(rows, cols) / max_cells))
    lines = [
        f"schedule {rows} x {cols} blocks of {schedule.block_q} x {schedule.block_k} tokens, layout {schedule.layout}; "
        f"'#' full, '+' partial, ' ' empty; visited {schedule.visited_blocks()} blocks, "
        f"efficiency {schedule.efficiency():.3f}"
    ]
    if cell > 1:
        lines.append(f"downsampled: each character is {cell} x {cell} blocks (partial wins over full, full over empty)")
    groups = {}
    for h, g in enumerate(schedule.head_group):
        groups.setdefault(g, []).append(h)
    for heads in groups.values():
        grid = dense[heads[0]].long()
        # Rank states so one partial block marks its cell: empty 0 < full 1 < partial 2.
        rank = torch.tensor([0, 2, 1])[grid]
        pooled = torch.nn.functional.max_pool2d(rank[None, None].float(), cell, ceil_mode=True)[0, 0].long()
        state = torch.tensor([0, 2, 1])[pooled]
        if len(groups) > 1:
            lines.append(f"heads {_ranges(heads)}:")
        border = "+" + "-" * state.shape[1] + "+"
        lines.append(border)
        lines.extend("|" + "".join(SCHEDULE_SHADES[int(v)] for v in row) + "|" for row in state.tolist())
        lines.append(border)
    return "\n".join(lines)


def write_schedule_png(schedule, path: str) -> None:
    """Block states as an image, one panel per distinct head pattern: full
    black, partial grey, empty white."""
    dense = schedule.to_dense()
    first_head = {g: h for h, g in reversed(list(enumerate(schedule.head_group)))}
    darkness = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    fractions = [darkness[dense[first_head[g]].long()] for g in sorted(first_head)]
    write_png(Reduced(fractions, [], (1, 1), False), path)
