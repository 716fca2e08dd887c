"""From an instance to what a kernel needs: normal forms, a layout, a schedule."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from maskc.dsl import evaluate, ir
from maskc.dsl.dynamic import BITS_PER_WORD
from maskc.dsl.errors import MaskTypeError
from maskc.dsl.spec import Instance

from .layout import tile_permutation, tile_shapes
from .normal import normalize
from .schedule import BlockSchedule, build_schedule

LAYOUTS = ("auto", "rowmajor", "tiled")
MAX_BLOCK = 2**16  # a block is a tile of tokens, far below this in any kernel


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Schedule building runs many small tensor ops; spreading them over threads
    costs more than it saves (and stalls badly on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def normal_forms(instance: Instance) -> list[ir.HeadPattern]:
    """Each distinct head pattern in normal form, simplified for the instance's sizes."""
    s = instance.sizes
    q_range = (s.q_offset, s.q_offset + s.lq - 1)
    k_range = (0, s.lk - 1)
    return [ir.HeadPattern(normalize(p.mask, q_range, k_range), p.modifiers) for p in instance.patterns]


def tiling(instance: Instance, block_q: int, block_k: int) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Candidate tile layouts: only for self-attention over a single grid."""
    s = instance.sizes
    if block_q != block_k or s.lq != s.lk or s.q_offset != 0 or len(instance.grids) != 1:
        return []
    grid = instance.grids[0]
    if len(grid) < 2:
        return []
    return [(shape, tile_permutation(grid, shape)) for shape in tile_shapes(grid, block_q)]


def plan_schedule(
    instance: Instance,
    block_q: int,
    block_k: int,
    layout: str = "auto",
    tensors: evaluate.Tensors | None = None,
) -> BlockSchedule:
    """The block schedule over blocks of block_q x block_k tokens (which blocks a backend
    runs is runtime/tuning.py's choice); with layout "auto", tile order is used when it
    visits fewer blocks than row-major order."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise MaskTypeError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_BLOCK:
            raise MaskTypeError(f"{name} must be a positive integer (at most {MAX_BLOCK}), got {value!r}")
    s = instance.sizes
    masks = [p.mask for p in normal_forms(instance)]
    with one_thread():
        best = None
        if layout in ("auto", "rowmajor"):
            best = build_schedule(masks, instance.head_group, s.lq, s.lk, s.q_offset, block_q, block_k, tensors=tensors)
        if layout in ("auto", "tiled"):
            candidates = tiling(instance, block_q, block_k)
            if layout == "tiled" and not candidates:
                raise MaskTypeError(
                    "layout='tiled': no tile layout fits: it needs self-attention on one grid whose sides "
                    f"divide into tiles of {block_q} tokens (grids here: {instance.grids or 'none'})"
                )
            for shape, perm in candidates[:3]:
                sched = build_schedule(
                    masks,
                    instance.head_group,
                    s.lq,
                    s.lk,
                    s.q_offset,
                    block_q,
                    block_k,
                    perm=perm,
                    tensors=tensors,
                    layout="tiled " + "x".join(map(str, shape)),
                )
                if best is None or sched.visited_blocks() < best.visited_blocks():
                    best = sched
    return best


def clustered_splits(forms) -> list[tuple] | None:
    """(cluster atom, static rest) per form when every form runs clustered on
    the Triton backend (runtime/clustered_triton.py), else None."""
    splits = [split_cluster(form) for form in forms]
    if any(split is None or split[0].clusters > MAX_TRITON_CLUSTERS for split in splits):
        return None
    return splits


# Triton kernels keep each token's clusters in one membership word.
MAX_TRITON_CLUSTERS = BITS_PER_WORD


def split_cluster(form: ir.HeadPattern) -> tuple[ir.Cluster, ir.Mask | None] | None:
    """(the cluster atom, the static rest or None) of a form `cluster(...) & static...`
    without modifiers, the forms that run gathered into cluster order; else None."""
    mask = form.mask
    if form.modifiers:
        return None
    if isinstance(mask, ir.Cluster):
        return mask, None
    if not isinstance(mask, ir.And):
        return None
    clusters = [p for p in mask.parts if isinstance(p, ir.Cluster)]
    rest = [p for p in mask.parts if not isinstance(p, ir.Cluster)]
    if len(clusters) != 1 or any(ir.is_dynamic(p) for p in rest):
        return None
    return clusters[0], rest[0] if len(rest) == 1 else ir.And(tuple(rest))
