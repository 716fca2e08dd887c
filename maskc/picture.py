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


def head_ranges(heads: list[int]) -> str:
    """Ascending head indices as ranges: [0, 1, 2, 5] -> "0-2,5"."""
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
            lines.append(f"heads {head_ranges(heads)}:")
        border = "+" + "-" * fractions.shape[1] + "+"
        lines.append(border)
        for row in fractions.tolist():
            lines.append("|" + "".join(shade(f) for f in row) + "|")
        lines.append(border)
    return "\n".join(lines)


# PNG sizes: a side longer than PNG_MAX_CELLS positions (or blocks) is reduced by the
# smallest integer factor that fits; cells are then drawn PNG_TARGET // cells pixels
# wide (at least 1), an integer too, so every position is the same square of pixels
# (a non-integer ratio gives moire).
PNG_MAX_CELLS = 1024
PNG_TARGET = 512
PANEL_GAP = 8


def png_cell(lq: int, lk: int) -> int:
    """Positions per PNG pixel side: 1, or the integer reduction that fits PNG_MAX_CELLS."""
    return max(1, math.ceil(max(lq, lk) / PNG_MAX_CELLS))


def png_scale(rows: int, cols: int) -> int:
    """Pixels per cell side: the integer that brings the longer side near PNG_TARGET."""
    return max(1, PNG_TARGET // max(rows, cols))


@dataclass
class PngLayout:
    """Where a PNG's panels are, for captions and tests."""

    size: tuple[int, int]  # width, height in pixels
    scale: int  # pixels per cell side
    cell: int  # positions (mask) or blocks (schedule) per cell side
    origins: list[tuple[int, int]]  # top-left pixel of each panel

    def describe(self, unit: str) -> str:
        size, s, c = f"{self.size[0]} x {self.size[1]} px", self.scale, self.cell
        if c == 1:
            return f"{size}, each {unit} {s} x {s} px"
        square = "pixel" if s == 1 else f"{s} x {s} px square"
        return f"{size}, each {square} is {c} x {c} {unit}s"


def _upscale(pixels, scale: int):
    """Integer nearest-neighbour upscaling: every cell becomes scale x scale equal pixels."""
    return pixels.repeat(scale, axis=0).repeat(scale, axis=1)


def write_png(reduced: Reduced, path: str, scale: int | None = None) -> PngLayout:
    """One panel per distinct head pattern: allowed pairs black, others white; a reduced
    cell (several positions) is grey by its allowed fraction, at least light grey."""
    import numpy as np
    from PIL import Image

    panels = []
    for fractions in reduced.fractions:
        rows, cols = fractions.shape
        s = scale or png_scale(rows, cols)
        darkness = torch.where(fractions > 0, 0.3 + 0.7 * fractions, torch.zeros_like(fractions))
        pixels = (255 * (1 - darkness)).round().clamp(0, 255).to(torch.uint8).numpy()
        panels.append(_upscale(pixels, s))
    width = sum(p.shape[1] for p in panels) + PANEL_GAP * (len(panels) - 1)
    height = max(p.shape[0] for p in panels)
    canvas = np.full((height, width), 200, dtype=np.uint8)
    origins, x = [], 0
    for p in panels:
        canvas[: p.shape[0], x : x + p.shape[1]] = p
        origins.append((x, 0))
        x += p.shape[1] + PANEL_GAP
    Image.fromarray(canvas, mode="L").save(path)
    s = scale or png_scale(*reduced.fractions[0].shape)
    return PngLayout((width, height), s, reduced.cell[0], origins)


SCHEDULE_SHADES = {0: " ", 1: "+", 2: "#"}


# Schedule colours: full blocks dark blue, partial orange, empty white (in a grey frame).
STATE_COLOURS = {2: (31, 60, 150), 1: (245, 140, 30), 0: (255, 255, 255)}
STATE_NAMES = {2: "full", 1: "partial", 0: "empty"}
FRAME = (150, 150, 150)
MARGIN = 10


def _pool_states(grid: torch.Tensor, cell: int) -> torch.Tensor:
    """Block states (0 empty, 1 partial, 2 full) pooled over cell x cell blocks: the
    busiest wins, partial over full over empty, so one partial block marks its cell."""
    if cell == 1:
        return grid.long()
    rank = torch.tensor([0, 2, 1])[grid.long()]
    pooled = torch.nn.functional.max_pool2d(rank[None, None].float(), cell, ceil_mode=True)[0, 0].long()
    return torch.tensor([0, 2, 1])[pooled]


def _head_groups(schedule) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for h, g in enumerate(schedule.head_group):
        groups.setdefault(g, []).append(h)
    return list(groups.values())


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
    groups = _head_groups(schedule)
    for heads in groups:
        state = _pool_states(dense[heads[0]], cell)
        if len(groups) > 1:
            lines.append(f"heads {head_ranges(heads)}:")
        border = "+" + "-" * state.shape[1] + "+"
        lines.append(border)
        lines.extend("|" + "".join(SCHEDULE_SHADES[int(v)] for v in row) + "|" for row in state.tolist())
        lines.append(border)
    return "\n".join(lines)


def write_schedule_png(schedule, path: str) -> PngLayout:
    """Block states as an image, one framed panel per distinct head pattern (titled when
    there are several): full dark blue, partial orange, empty white, with a legend strip
    below that names the colours, the block size and any reduction."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    dense = schedule.to_dense()
    rows, cols = dense.shape[1:]
    cell = max(1, math.ceil(max(rows, cols) / PNG_MAX_CELLS))
    groups = _head_groups(schedule)
    states = [_pool_states(dense[heads[0]], cell) for heads in groups]
    s = png_scale(*states[0].shape)
    palette = np.array([STATE_COLOURS[i] for i in range(3)], dtype=np.uint8)
    panels = [_upscale(palette[st.numpy()], s) for st in states]

    font = ImageFont.load_default(size=13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = 18
    titled = len(groups) > 1
    notes = [
        f"blocks of {schedule.block_q} x {schedule.block_k} tokens, {rows} x {cols} blocks, layout {schedule.layout}",
        f"visited {schedule.visited_blocks()} blocks, efficiency {schedule.efficiency():.3f}",
    ]
    if cell > 1:
        notes.append(f"each {s} x {s} px square is {cell} x {cell} blocks: partial wins over full, full over empty")
    swatch = 14
    legend_width = sum(swatch + 6 + int(probe.textlength(STATE_NAMES[i], font=font)) + 18 for i in (2, 1, 0))
    text_width = max([legend_width, *(int(probe.textlength(n, font=font)) for n in notes)])
    panel_h, panel_w = panels[0].shape[:2]
    top = MARGIN + (line_height if titled else 0)
    panels_width = len(panels) * (panel_w + 2) + (len(panels) - 1) * PANEL_GAP
    width = 2 * MARGIN + max(panels_width, text_width)
    legend_top = top + panel_h + 2 + MARGIN
    height = legend_top + line_height * (1 + len(notes)) + MARGIN
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    origins, x = [], MARGIN
    for p in panels:
        canvas[top : top + panel_h + 2, x : x + panel_w + 2] = FRAME  # 1-pixel frame around the panel
        canvas[top + 1 : top + 1 + panel_h, x + 1 : x + 1 + panel_w] = p
        origins.append((x + 1, top + 1))
        x += panel_w + 2 + PANEL_GAP
    img = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(img)
    if titled:
        for (ox, _), heads in zip(origins, groups, strict=True):
            draw.text((ox, MARGIN), f"heads {head_ranges(heads)}", fill=(0, 0, 0), font=font)
    x = MARGIN
    for state in (2, 1, 0):
        y = legend_top + (line_height - swatch) // 2
        draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=STATE_COLOURS[state], outline=FRAME)
        draw.text((x + swatch + 6, legend_top), STATE_NAMES[state], fill=(0, 0, 0), font=font)
        x += swatch + 6 + int(draw.textlength(STATE_NAMES[state], font=font)) + 18
    for i, note in enumerate(notes):
        draw.text((MARGIN, legend_top + line_height * (i + 1)), note, fill=(0, 0, 0), font=font)
    img.save(path)
    return PngLayout((width, height), s, cell, origins)


def write_plan_png(plan, path: str) -> PngLayout:
    """Which rank computes each visited block of a context-parallel plan: one colour per
    rank (the query block's owner; for a split row the key block's), darker where the key
    block is received from another rank; empty blocks white.  A legend strip names the block size and any reduction."""
    import colorsys

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rows, cols = plan.num_q_blocks, plan.num_k_blocks
    cell = max(1, math.ceil(max(rows, cols) / PNG_MAX_CELLS))
    h, w = math.ceil(rows / cell), math.ceil(cols / cell)
    visited = np.zeros((h, w), dtype=bool)
    for runs in plan.schedule.groups:
        r, c, _ = runs.blocks()
        visited[r.numpy() // cell, c.numpy() // cell] = True
    row_blocks = np.minimum(np.arange(h) * cell, rows - 1)
    owner = plan.q_owner[row_blocks]
    key_owner = plan.k_owner[np.minimum(np.arange(w) * cell, cols - 1)]
    split = np.isin(row_blocks, plan.split)[:, None]
    remote = (key_owner[None, :] != owner[:, None]) & ~split
    hues = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.55, 0.95) for i in range(plan.world)]
    light = np.array([[int(255 * x) for x in rgb] for rgb in hues], dtype=np.uint8)
    dark = (light.astype(np.float64) * 0.55).astype(np.uint8)
    pixels = np.full((h, w, 3), 255, dtype=np.uint8)
    rank = np.where(split, key_owner[None, :], owner[:, None])
    pixels[visited & ~remote] = light[rank[visited & ~remote]]
    pixels[visited & remote] = dark[rank[visited & remote]]
    s = png_scale(h, w)
    panel = _upscale(pixels, s)
    font = ImageFont.load_default(size=13)
    line_height = 18
    notes = [
        f"{plan.world} ranks, balance {plan.balance!r}: colour = rank computing the block, darker = key block received",
        f"blocks of {plan.block} tokens, {rows} x {cols} blocks",
    ]
    if len(plan.split):
        notes.append(f"{len(plan.split)} split query blocks: computed by the ranks holding their keys")
    if cell > 1:
        notes.append(f"each {s} x {s} px square is {cell} x {cell} blocks")
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(probe.textlength(n, font=font)) for n in notes)
    panel_h, panel_w = panel.shape[:2]
    width = 2 * MARGIN + max(panel_w + 2, text_width)
    legend_top = MARGIN + panel_h + 2 + MARGIN
    height = legend_top + line_height * len(notes) + MARGIN
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    canvas[MARGIN : MARGIN + panel_h + 2, MARGIN : MARGIN + panel_w + 2] = FRAME
    canvas[MARGIN + 1 : MARGIN + 1 + panel_h, MARGIN + 1 : MARGIN + 1 + panel_w] = panel
    img = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(img)
    for i, note in enumerate(notes):
        draw.text((MARGIN, legend_top + line_height * i), note, fill=(0, 0, 0), font=font)
    img.save(path)
    return PngLayout((width, height), s, cell, [(MARGIN + 1, MARGIN + 1)])
