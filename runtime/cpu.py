"""The fast CPU executor: the block schedule run by PyTorch's fused CPU kernel.

`cpu_attention(q, k, v, prepared, scale) -> (out, lse)` walks the schedule of
each head group (heads sharing a schedule run together).  Per group the query
blocks are bucketed, and every bucket becomes one call of
``aten._scaled_dot_product_flash_attention_for_cpu`` (a fused online-softmax
kernel that returns the natural-log log-sum-exp) over a *segment*: the bucket's
query blocks, each with the same number of key blocks.

* Query blocks (rows) are bucketed by the shape of their row of the schedule
  (how many key blocks, which of them full, whether they are contiguous).
  A bucket runs as one segment over all its blocks with an additive mask
  (0 on allowed pairs, -inf elsewhere; full blocks are zeros, their predicate
  is never evaluated) when that mask stays small: identical masks across the
  bucket (a sliding window's rows all look alike) are stored once and
  broadcast with stride 0.  Otherwise the row is split: its full blocks run in
  one segment with no mask at all, its partial blocks in another with the
  masks of `prepared.partial_block_mask`, and the two results are merged
  exactly through their log-sum-exps.
* Keys of a segment are a strided view of k and v (no copy) when every row's
  blocks form one contiguous span that moves by a fixed step from row to row,
  and are gathered otherwise.
* The last key block, when the keys do not fill it, is treated as partial so
  padding keys are always masked.
* Modifiers that only add to the logits (alibi, bias, polyline, decay) are
  folded into the additive mask.  Softcap, and modifiers whose tensors need a
  gradient, run the *generic path*: the same segments computed with
  differentiable torch ops (scores of the visited blocks only), autograd does
  the backward.  So does attention dropout: each visited block's probabilities
  are multiplied by the keep mask of runtime/dropout.py, scaled by 1 / (1 - p).
* The fused path's backward is a custom `torch.autograd.Function` that calls
  ``aten._scaled_dot_product_flash_attention_for_cpu_backward`` per segment
  with the *merged* output and log-sum-exp, which gives each segment's exact
  share of dQ, dK, dV; dK and dV are scatter-added onto the key tokens.  A
  gradient flowing into the returned log-sum-exp is added per segment.

* Threads: the bookkeeping (gathers, merges, scatters) runs on one thread.  With
  several threads and enough big calls, the fused calls (big segments cut into a
  few row chunks per thread) run on a small pool of single-threaded workers, so
  the load balances dynamically; a kernel's own static split waits for its
  slowest thread, which on a shared machine is often descheduled.  Small calls
  run on one thread, results are consumed in order (deterministic sums).

Memory grows with the visited blocks: nothing of size lq x lk is built.
Rows with no allowed key output 0, their log-sum-exp is -inf, and their
gradients are 0.  Compute is float32 for half types (float64 stays float64).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from maskc.dsl import ir
from torch.nn.functional import pad

from .dropout import Dropout, keep_mask
from .merge import merge_partials
from .prepare import Prepared

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

# A bucket runs as one masked segment when its (deduplicated) mask holds at most
# this many blocks per partial block of the bucket; otherwise full and partial
# blocks run apart and are merged.
MIXED_MASK_RATIO = 2
# Buckets whose partial masks fall into at most this many distinct kinds are split
# by kind, so each part stores its mask once (when each part keeps enough rows).
MAX_MASK_KINDS = 8
MIN_ROWS_PER_KIND = 4
# At most this many strided pieces per bucket; beyond that its keys are gathered.
MAX_PIECES = 16
# Gathered keys (or per-segment key gradients) of one call stay under this many elements.
CHUNK_ELEMENTS = 1 << 23
# Multiply-adds below which a fused call runs on one thread.
PARALLEL_WORK = 1 << 24
# Big segments are cut into about this many pieces per thread (dynamic load balance).
PIECES_PER_THREAD = 4
# Calls submitted ahead of the one whose result is consumed, per thread (bounds memory).
IN_FLIGHT_PER_THREAD = 3
# Masks hashed at once when looking for equal masks (elements).
HASH_CHUNK = 1 << 22


# ---------------------------------------------------------------- plan


@dataclass
class Segment:
    """Query blocks `rows` [m], each visiting the key blocks `cols[j]` [m, n]."""

    rows: torch.Tensor
    cols: torch.Tensor
    block_q: int
    block_k: int
    allowed: torch.Tensor | None  # bool [1 or B, 1 or m, bq, nk]; None: every pair allowed
    any_key: torch.Tensor | None  # bool [1 or B, 1 or m, bq]: rows with an allowed key; None: all
    row_step: int | None = None  # rows[j] = rows[0] + j * row_step
    col_step: int | None = None  # cols[j] = cols[0, 0] + j * col_step + arange(n)
    fresh: bool = False  # no earlier segment of the plan touches these rows: write, do not merge
    _float: dict = field(default_factory=dict, repr=False)

    @property
    def m(self) -> int:
        return self.rows.numel()

    @property
    def nk(self) -> int:
        return self.cols.shape[1] * self.block_k

    def slice(self, a: int, b: int) -> Segment:
        if a == 0 and b == self.m:
            return self

        def rows_of(x):
            return x if x is None or x.shape[1] == 1 else x[:, a:b]

        return Segment(
            self.rows[a:b],
            self.cols[a:b],
            self.block_q,
            self.block_k,
            rows_of(self.allowed),
            rows_of(self.any_key),
            self.row_step,
            self.col_step,
            self.fresh,
        )


def _affine(x: torch.Tensor) -> int | None:
    """The common nonnegative step of a 1-D sequence, or None."""
    if x.numel() == 1:
        return 0
    d = x[1:] - x[:-1]
    step = int(d[0])
    return step if step >= 0 and bool((d == step).all()) else None


class _GroupBlocks:
    """The visited blocks of one head group, row-major, with partial masks."""

    def __init__(self, prepared: Prepared, group: int) -> None:
        self.prepared = prepared
        self.group = group
        bk = prepared.block_k
        runs = prepared.runs(group)
        self.num_rows = runs.rows
        rows, cols, full = runs.blocks()
        self.rows, self.cols = rows, cols
        _, _, pmask = prepared.partial_block_mask(group)
        partial = ~full
        num_kb = math.ceil(prepared.lk / bk)
        ragged = full & (cols == num_kb - 1) if prepared.lk % bk else torch.zeros_like(full)
        # index of each block's mask in `masks` (-1: full block, no mask)
        self.mask_index = torch.full((rows.numel(),), -1, dtype=torch.long)
        masks = pmask if pmask.dim() == 4 else pmask[None]
        self.mask_index[partial] = torch.arange(int(partial.sum()))
        if bool(ragged.any()):
            extra = prepared.block_mask(group, rows[ragged], cols[ragged])
            extra = extra if extra.dim() == 4 else extra[None]
            if extra.shape[0] != masks.shape[0]:
                size = max(extra.shape[0], masks.shape[0])
                extra, masks = extra.expand(size, -1, -1, -1), masks.expand(size, -1, -1, -1)
            self.mask_index[ragged] = masks.shape[1] + torch.arange(int(ragged.sum()))
            masks = torch.cat([masks, extra], dim=1)
        self.masks = masks  # bool [1 or B, n_masks, bq, bk]
        self.kind = self._mask_kinds()
        counts = torch.bincount(rows, minlength=self.num_rows)
        self.ptr = torch.zeros(self.num_rows + 1, dtype=torch.long)
        self.ptr[1:] = torch.cumsum(counts, 0)
        self.counts = counts

    def _mask_kinds(self) -> torch.Tensor:
        """An id per mask, equal ids for equal masks (exact: hashed, then checked)."""
        n = self.masks.shape[1]
        if n == 0:
            return torch.zeros(0, dtype=torch.long)
        size = self.masks[:, 0].numel()
        gen = torch.Generator().manual_seed(0)
        weights = torch.randint(0, 1 << 20, (size,), generator=gen).to(torch.float64)
        step = max(1, HASH_CHUNK // size)
        hashes = torch.cat(
            [
                self.masks[:, i : i + step].transpose(0, 1).reshape(-1, size).to(torch.float64) @ weights
                for i in range(0, n, step)
            ]
        )  # sums of integers below 2**53: exact in any order
        _, kind = torch.unique(hashes, return_inverse=True)
        first = torch.full((int(kind.max()) + 1,), n, dtype=torch.long).scatter_reduce_(
            0, kind, torch.arange(n), "amin"
        )
        for i in range(0, n, step):
            if not bool((self.masks[:, i : i + step] == self.masks[:, first[kind[i : i + step]]]).all()):
                return torch.arange(n)  # a hash collision: give up sharing
        return kind

    def block_mask(self, index: torch.Tensor) -> torch.Tensor:
        """Allowed pairs of blocks `index` [r, n] laid out as rows: bool [1 or B, r, bq, n * bk]."""
        mi = self.mask_index[index]
        b, _, bq, bk = self.masks.shape
        if self.masks.shape[1] == 0:
            out = torch.ones(b, *index.shape, bq, bk, dtype=torch.bool)
        else:
            out = self.masks[:, mi.clamp(min=0)]
            out[:, mi < 0] = True
        return out.permute(0, 1, 3, 2, 4).reshape(b, index.shape[0], bq, -1)


def _segment(gb: _GroupBlocks, rows: torch.Tensor, index: torch.Tensor, allowed) -> list[Segment]:
    """Segments over blocks `index` [m, n] of query blocks `rows`; `allowed` as in
    Segment.  Rows whose blocks are contiguous are cut into pieces where both the
    rows and the first key block move by fixed steps, so keys are strided views."""
    cols = gb.cols[index]
    n = cols.shape[1]
    pieces = [(0, rows.numel())]
    if bool((cols[:, -1] - cols[:, 0] + 1 == n).all()) and _affine(cols[:, 0]) is None:
        cut = _affine_pieces(rows, cols[:, 0])
        if len(cut) <= MAX_PIECES:
            pieces = cut
    out = []
    for a, b in pieces:
        part = allowed if allowed is None or allowed.shape[1] == 1 else allowed[:, a:b]
        any_key = None
        if part is not None:
            any_key = part.any(-1)
            if bool(any_key.all()):
                any_key = None
        seg = Segment(rows[a:b], cols[a:b], gb.prepared.block_q, gb.prepared.block_k, part, any_key)
        seg.row_step = _affine(seg.rows)
        if bool((seg.cols[:, -1] - seg.cols[:, 0] + 1 == n).all()):
            seg.col_step = _affine(seg.cols[:, 0])
        out.append(seg)
    return out


def _affine_pieces(rows: torch.Tensor, first: torch.Tensor) -> list[tuple[int, int]]:
    """Greedy cut of [0, m) into ranges where rows and first both move by fixed steps."""
    r, f = rows.tolist(), first.tolist()
    pieces, a = [], 0
    for j in range(1, len(r)):
        if j - a == 1:
            broken = f[j] < f[a]  # steps must be nonnegative
        else:
            broken = r[j] - r[j - 1] != r[a + 1] - r[a] or f[j] - f[j - 1] != f[a + 1] - f[a]
        if broken:
            pieces.append((a, j))
            a = j
    pieces.append((a, len(r)))
    return pieces


def _split_by_kind(gb: _GroupBlocks, rows, index, masked: bool) -> list[Segment]:
    """Segments over blocks `index` [m, n] (one shape of row): one mask when the
    rows' masks agree, a few when they fall into a few kinds, else one per row."""
    if not masked:
        return _segment(gb, rows, index, None)
    mi = gb.mask_index[index]
    kinds = torch.where(mi >= 0, gb.kind[mi.clamp(min=0)], -1) if gb.kind.numel() else mi
    unique, inverse = torch.unique(kinds, dim=0, return_inverse=True)
    m = rows.numel()
    if unique.shape[0] == 1:
        return _segment(gb, rows, index, gb.block_mask(index[:1]))
    if unique.shape[0] <= MAX_MASK_KINDS and m >= MIN_ROWS_PER_KIND * unique.shape[0]:
        out = []
        for u in range(unique.shape[0]):
            pick = inverse == u
            out.extend(_segment(gb, rows[pick], index[pick], gb.block_mask(index[pick][:1])))
        return out
    return _segment(gb, rows, index, gb.block_mask(index))


def _distinct_masks(gb: _GroupBlocks, index: torch.Tensor) -> int:
    mi = gb.mask_index[index]
    kinds = torch.where(mi >= 0, gb.kind[mi.clamp(min=0)], -1) if gb.kind.numel() else mi
    distinct = torch.unique(kinds, dim=0).shape[0]
    if distinct == 1 or (distinct <= MAX_MASK_KINDS and index.shape[0] >= MIN_ROWS_PER_KIND * distinct):
        return distinct
    return index.shape[0]


def _bucket(keys: torch.Tensor) -> list[torch.Tensor]:
    """Indices of equal rows of `keys` [r, c], one tensor per distinct row."""
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse)
    return list(torch.split(order, counts.tolist()))


def _row_blocks(gb: _GroupBlocks, rows: torch.Tensor, pick: torch.Tensor | None = None) -> torch.Tensor:
    """Indices [m, n] of the blocks (all, or those where `pick`) of ascending `rows`,
    each of which has the same number n of them."""
    if pick is None:
        return gb.ptr[rows][:, None] + torch.arange(int(gb.counts[rows[0]]))
    member = torch.zeros(gb.num_rows, dtype=torch.bool)
    member[rows] = True
    index = torch.nonzero(member[gb.rows] & pick).flatten()
    return index.view(rows.numel(), -1)


@dataclass
class GroupPlan:
    """The segments of one head group, in order, and the query blocks that no
    segment writes first (they start from out = 0, lse = -inf)."""

    segments: list[Segment]
    init_rows: torch.Tensor


def build_plan(prepared: Prepared, group: int) -> GroupPlan:
    """The segments of one head group (see the module docstring)."""
    gb = _GroupBlocks(prepared, group)
    segments = _plan_segments(gb) if gb.rows.numel() else []
    covered = torch.zeros(gb.num_rows, dtype=torch.bool)
    written = torch.zeros(gb.num_rows, dtype=torch.bool)
    for seg in segments:
        seg.fresh = not bool(covered[seg.rows].any())
        covered[seg.rows] = True
        if seg.fresh:
            written[seg.rows] = True
    return GroupPlan(segments, torch.nonzero(~written).flatten())


def _plan_segments(gb: _GroupBlocks) -> list[Segment]:
    busy = torch.nonzero(gb.counts).flatten()
    partial = gb.mask_index >= 0
    # row shape: number of blocks, contiguous or not, which positions are partial
    width = int(gb.counts.max())
    slots = gb.ptr[busy][:, None] + torch.arange(width)
    inside = torch.arange(width)[None] < gb.counts[busy][:, None]
    flags = torch.where(inside, partial[slots.clamp(max=gb.rows.numel() - 1)].long(), 2)
    first = gb.cols[gb.ptr[busy]]
    last = gb.cols[gb.ptr[busy + 1] - 1]
    contiguous = (last - first + 1 == gb.counts[busy]).long()
    keys = torch.cat([gb.counts[busy][:, None], contiguous[:, None], flags], dim=1)
    segments: list[Segment] = []
    split_rows = []
    for pick in _bucket(keys):
        rows = busy[pick]
        index = _row_blocks(gb, rows)
        npart = int(partial[index[0]].sum())
        if npart == 0:
            segments.extend(_split_by_kind(gb, rows, index, masked=False))
            continue
        # one masked segment if its mask stays within MIXED_MASK_RATIO x the partial masks
        if _distinct_masks(gb, index) * index.shape[1] <= MIXED_MASK_RATIO * npart * rows.numel():
            segments.extend(_split_by_kind(gb, rows, index, masked=True))
        else:
            split_rows.append(rows)
    if split_rows:
        rows_all = torch.cat(split_rows)
        for want_partial in (False, True):
            pick = partial if want_partial else ~partial
            n_of = torch.zeros(gb.num_rows, dtype=torch.long).index_add_(0, gb.rows, pick.long())[rows_all]
            has = rows_all[n_of > 0]
            n_has = n_of[n_of > 0]
            for sub in _bucket(n_has[:, None]):
                rows = has[sub].sort().values
                index = _row_blocks(gb, rows, pick)
                segments.extend(_split_by_kind(gb, rows, index, masked=want_partial))
    return segments


def group_plan(prepared: Prepared, group: int) -> GroupPlan:
    key = ("cpu-plan", group)
    if key not in prepared._block_masks:
        prepared._block_masks[key] = build_plan(prepared, group)
    return prepared._block_masks[key]


# ---------------------------------------------------------------- helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _modifier_tensors(prepared: Prepared) -> list[str]:
    names = []
    for form in prepared.forms:
        for m in form.modifiers:
            for attr in ("tensor", "alpha", "beta"):
                name = getattr(m, attr, None)
                if isinstance(name, str):
                    names.append(name)
    return names


def _needs_generic(prepared: Prepared, for_backward: bool = False) -> bool:
    """Softcap is not additive; modifier tensors that need a gradient need autograd."""
    if any(isinstance(m, ir.Softcap) for f in prepared.forms for m in f.modifiers):
        return True
    if not (torch.is_grad_enabled() or for_backward):
        return False
    values = prepared.tensors.values
    return any(name in values and values[name].requires_grad for name in _modifier_tensors(prepared))


def _positions(prepared: Prepared, seg: Segment):
    """Absolute positions qp [m, bq], kp [m, nk] of a segment."""
    qp, _, kp, _ = prepared.block_positions(seg.rows, seg.cols.reshape(-1))
    return qp, kp.reshape(seg.m, -1)


def _float_mask(prepared: Prepared, group: int, seg: Segment, dtype: torch.dtype, heads: int, batch: int):
    """Additive mask for the fused kernel: modifier logits on allowed pairs, -inf
    elsewhere; broadcastable to [batch * heads, m, bq, nk]; None when nothing to add."""
    key = (dtype, heads, batch)
    if key in seg._float:
        return seg._float[key]
    out = None
    if prepared.modifiers(group):
        qp, kp = _positions(prepared, seg)
        with torch.no_grad():
            zero = torch.zeros((), dtype=dtype)
            terms = prepared.apply_modifiers(group, zero, qp[:, :, None], kp[:, None, :]).to(dtype)
        terms = terms if terms.dim() == 4 else terms[None]
        if seg.allowed is not None:
            terms = terms.masked_fill(~seg.allowed, -math.inf)
        out = terms
    elif seg.allowed is not None:
        out = torch.zeros(seg.allowed.shape, dtype=dtype).masked_fill_(~seg.allowed, -math.inf)
    if out is not None and out.shape[0] > 1 and heads > 1:
        out = out[:, None].expand(-1, heads, -1, -1, -1).reshape(-1, *out.shape[1:])
    seg._float[key] = out
    return out


def _rows_view(x: torch.Tensor, seg: Segment, block: int) -> torch.Tensor:
    """x [N, rows * block, ...] -> the segment's rows [N, m, block, ...]."""
    n = x.shape[0]
    inner = x.shape[2:]
    blocks = x.view(n, -1, block, *inner)
    if seg.row_step is not None:
        start = int(seg.rows[0])
        if seg.row_step == 1:
            return blocks[:, start : start + seg.m]
        stride = list(blocks.stride())
        stride[1] *= seg.row_step
        return blocks.as_strided((n, seg.m, block, *inner), stride, blocks.storage_offset() + start * blocks.stride(1))
    return blocks.index_select(1, seg.rows)


def _keys_view(x: torch.Tensor, seg: Segment, slot: int | None = None) -> torch.Tensor:
    """x [N, lk_padded, D] -> the segment's keys [N, m, nk, D] (a view when strided)."""
    n, _, d = x.shape
    bk = seg.block_k
    if seg.col_step is not None:
        start = int(seg.cols[0, 0]) * bk
        s = x.stride()
        strides = (s[0], seg.col_step * bk * s[1], s[1], s[2])
        return x.as_strided((n, seg.m, seg.nk, d), strides, x.storage_offset() + start * s[1])
    # whole blocks at a time: a few long copies instead of one short copy per token
    index = seg.cols.reshape(-1).long()
    if slot is None:
        blocks = x.view(n, -1, bk * d).index_select(1, index)
    else:
        scratch = _buffer(slot, (n, index.numel(), bk * d), x.dtype)
        blocks = torch.index_select(x.view(n, -1, bk * d), 1, index, out=scratch)
    return blocks.view(n, seg.m, seg.nk, d)


_BUFFERS = threading.local()


def _buffer(slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch tensor reused across calls: fresh gathers of tens of
    megabytes cost more in page faults than in copying."""
    pool = _BUFFERS.__dict__.setdefault("pool", {})
    size = math.prod(shape)
    held = pool.get((slot, dtype))
    if held is None or held.numel() < size:
        held = pool[(slot, dtype)] = torch.empty(size, dtype=dtype)
    return held[:size].view(shape)


def _chunks(seg: Segment, width: int, threads: int = 1):
    """Row ranges of a segment: gathered keys (and key gradients), `width` elements
    per key token, stay under CHUNK_ELEMENTS, and big segments give each thread a
    few pieces to balance."""
    step = max(1, CHUNK_ELEMENTS // max(1, seg.nk * width))
    if threads > 1 and seg.m * seg.block_q * seg.nk * width >= PARALLEL_WORK:
        step = min(step, max(1, math.ceil(seg.m / (PIECES_PER_THREAD * threads))))
    for a in range(0, seg.m, step):
        yield a, min(seg.m, a + step)


def _merge(acc_out, acc_lse, seg: Segment, out, lse) -> None:
    """Fold one segment's (out, lse) into the accumulators at its rows."""
    if seg.fresh:
        _write_rows(acc_out, seg, out)
        _write_rows(acc_lse, seg, lse)
        return
    a_out = _rows_view(acc_out.flatten(1, 2), seg, acc_out.shape[2])
    a_lse = _rows_view(acc_lse.flatten(1, 2), seg, acc_lse.shape[2])
    new = torch.logaddexp(a_lse, lse)
    safe = torch.where(new == -math.inf, torch.zeros_like(new), new)
    merged = a_out * torch.exp(a_lse - safe)[..., None] + out * torch.exp(lse - safe)[..., None]
    _write_rows(acc_out, seg, merged)
    _write_rows(acc_lse, seg, new)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run with n intra-op threads.  The executor's bookkeeping (copies, merges,
    scatters) runs on one thread; only the fused kernels use them all: on a
    busy machine every extra parallel region can stall on a descheduled thread."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_rows(acc: torch.Tensor, seg: Segment, value: torch.Tensor) -> None:
    if seg.row_step == 1:
        start = int(seg.rows[0])
        acc[:, start : start + seg.m] = value
    else:
        acc.index_copy_(1, seg.rows, value)


def _add_rows(acc: torch.Tensor, seg: Segment, value: torch.Tensor) -> None:
    if seg.row_step == 1:
        start = int(seg.rows[0])
        acc[:, start : start + seg.m] += value
    else:
        acc.index_add_(1, seg.rows, value)


def _add_keys(acc: torch.Tensor, seg: Segment, value: torch.Tensor) -> None:
    """acc [N, lk_padded, D] += value [N, m, nk, D] at the segment's key tokens."""
    n, m, _, d = value.shape
    if seg.col_step is not None and seg.col_step >= seg.cols.shape[1] and m > 1:
        # non-overlapping strided windows: a strided view receives the sum directly
        view = _keys_view(acc, seg)
        view += value
        return
    bk = seg.block_k
    acc.view(n, -1, bk * d).index_add_(1, seg.cols.reshape(-1).long(), value.reshape(n, -1, bk * d))


# ---------------------------------------------------------------- per group


@dataclass
class _Group:
    index: int
    heads: list[int]
    head_index: torch.Tensor | None  # None: every head
    kv_index: torch.Tensor | None  # kv head of each head in the group; None: k's heads as they are
    plan: GroupPlan


def _groups(prepared: Prepared, heads: int, kv_heads: int) -> list[_Group]:
    rep = heads // kv_heads
    out = []
    for g in range(len(prepared.schedule.groups)):
        hs = prepared.group_heads(g)
        if not hs:
            continue
        every = hs == list(range(heads))
        kv = [h // rep for h in hs]
        out.append(
            _Group(
                g,
                hs,
                None if every else torch.tensor(hs),
                None if kv == list(range(kv_heads)) else torch.tensor(kv),
                group_plan(prepared, g),
            )
        )
    return out


def _pad_len(x: torch.Tensor, length: int, width: int | None = None) -> torch.Tensor:
    """Zero-pad dim 2 to `length` (and the last dim to `width`)."""
    extra = 0 if width is None else width - x.shape[-1]
    return x if x.shape[2] == length and extra == 0 else pad(x, (0, extra, 0, length - x.shape[2]))


def _group_inputs(group: _Group, q, k, v, prepared: Prepared, fused: bool = True):
    """Per group q [N, lq_pad, W], k [N, lk_pad, W], v [N, lk_pad, W] with N = batch *
    group heads, lengths padded to whole blocks.  The fused kernel needs one head dim:
    W = max(D, Dv), the narrower side padded with zeros (which changes no logit and
    no output column); the generic path keeps D and Dv."""
    bq, bk = prepared.block_q, prepared.block_k
    lq_pad = math.ceil(q.shape[2] / bq) * bq
    lk_pad = math.ceil(k.shape[2] / bk) * bk
    width = max(q.shape[-1], v.shape[-1]) if fused else None
    qg = q if group.head_index is None else q.index_select(1, group.head_index)
    kg = k if group.kv_index is None else k.index_select(1, group.kv_index)
    vg = v if group.kv_index is None else v.index_select(1, group.kv_index)
    qg = _pad_len(qg, lq_pad, width).contiguous()
    kg = _pad_len(kg, lk_pad, width).contiguous()
    vg = _pad_len(vg, lk_pad, width).contiguous()
    n = q.shape[0] * qg.shape[1]
    return qg.view(n, lq_pad, -1), kg.view(n, lk_pad, -1), vg.view(n, lk_pad, -1)


def _fused_group_forward(prepared, group: _Group, qg, kg, vg, scale: float, batch: int, threads: int):
    """(out [N, q_blocks, bq, Dv], lse [N, q_blocks, bq]) of one head group."""
    bq = prepared.block_q
    n, lq_pad, _ = qg.shape
    dv = vg.shape[-1]
    nqb = lq_pad // bq
    acc_out = torch.empty(n, nqb, bq, dv, dtype=qg.dtype)
    acc_lse = torch.empty(n, nqb, bq, dtype=qg.dtype)
    init = group.plan.init_rows
    if init.numel():
        acc_out[:, init] = 0
        acc_lse[:, init] = -math.inf
    heads = len(group.heads)

    def call(task):
        seg, mask = task[0], _mask_of(task)
        qs, ks, vs = _rows_view(qg, seg, bq), _keys_view(kg, seg, 0), _keys_view(vg, seg, 1)
        out, lse = _FLASH(qs, ks, vs, 0.0, False, attn_mask=mask, scale=scale)
        if seg.any_key is not None:  # the kernel leaves lse = 0 on rows without keys
            lse = lse.masked_fill(~_expand_rows(seg.any_key, heads, n), -math.inf)
        return out, lse

    for (seg, _), (out, lse) in _run(call, _tasks(prepared, group, qg, vg, batch, threads), threads, qg):
        _merge(acc_out, acc_lse, seg, out, lse)
    return acc_out, acc_lse


def _tasks(prepared, group: _Group, qg, vg, batch: int, threads: int) -> list[tuple[Segment, object]]:
    """(segment piece, its additive mask or a function making it) for every fused call.

    Boolean masks are made once per segment and cached; masks carrying modifier
    logits are made piece by piece when the piece runs, so that memory stays
    bounded by a chunk rather than by every visited block."""
    heads = len(group.heads)
    width = qg.shape[0] * max(qg.shape[-1], vg.shape[-1])
    out = []
    for whole in group.plan.segments:
        if prepared.modifiers(group.index):
            # Modifier logits are built through int64 coordinate temporaries: smaller pieces.
            for a, b in _chunks(whole, 4 * max(width, batch * heads * whole.block_q), threads):
                piece = whole.slice(a, b)
                out.append(
                    (piece, functools.partial(_float_mask, prepared, group.index, piece, qg.dtype, heads, batch))
                )
            continue
        mask_whole = _float_mask(prepared, group.index, whole, qg.dtype, heads, batch)
        for a, b in _chunks(whole, width, threads):
            out.append((whole.slice(a, b), _slice_mask(mask_whole, a, b, whole.m)))
    return out


def _mask_of(task) -> torch.Tensor | None:
    mask = task[1]
    return mask() if callable(mask) else mask


def _work(seg: Segment, qg: torch.Tensor) -> int:
    return qg.shape[0] * seg.m * seg.block_q * seg.nk * qg.shape[-1]


def _run(call, tasks: list, threads: int, qg: torch.Tensor):
    """Yield (task, call(task)) in order.  With several threads and enough big
    tasks, the calls run on a pool of single-threaded workers, which balances the
    load dynamically (a kernel's own static split waits for its slowest thread,
    and on a shared machine one of them is often descheduled); otherwise inline,
    each call with all threads when it is big enough to profit."""
    big = sum(_work(seg, qg) >= PARALLEL_WORK for seg, _ in tasks)
    if threads > 1 and big >= 2 * threads:
        pool = _pool(threads)
        pending: deque = deque()
        for task in tasks:  # at most IN_FLIGHT_PER_THREAD * threads results wait, in order
            pending.append((task, pool.submit(_no_grad_call, call, task)))
            if len(pending) >= IN_FLIGHT_PER_THREAD * threads:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
        return
    for task in tasks:
        with _threads(threads if _work(task[0], qg) >= PARALLEL_WORK else 1):
            result = call(task)
        yield task, result


def _no_grad_call(call, task):
    with torch.no_grad():  # grad mode is per thread; these calls never build graphs
        return call(task)


_POOL: dict = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """Workers that run one kernel call at a time on one intra-op thread each.
    Created (and first used) while the caller runs on one thread, so ATen's lazy
    per-thread setup gives them one thread; the initializer makes that explicit."""
    key = (os.getpid(), threads)
    if key not in _POOL:
        for old in _POOL.values():
            old.shutdown(wait=False)
        _POOL.clear()
        _POOL[key] = ThreadPoolExecutor(
            threads, thread_name_prefix="maskc-cpu", initializer=torch.set_num_threads, initargs=(1,)
        )
    return _POOL[key]


def _slice_mask(mask, a: int, b: int, m: int):
    if mask is None or mask.shape[1] == 1 or (a == 0 and b == m):
        return mask
    return mask[:, a:b]


def _expand_rows(x: torch.Tensor, heads: int, n: int) -> torch.Tensor:
    """[1 or B, 1 or m, ...] -> broadcastable against [N = B * heads, m, ...]."""
    if x.shape[0] == 1 or heads == 1:
        return x
    return x[:, None].expand(-1, heads, *x.shape[1:]).reshape(n, *x.shape[1:])


def _fused_group_backward(prepared, group: _Group, qg, kg, vg, out, lse, gout, glse, scale, batch, threads):
    bq = prepared.block_q
    n = qg.shape[0]
    dq = torch.empty_like(qg).view(n, -1, bq, qg.shape[-1])
    if group.plan.init_rows.numel():
        dq[:, group.plan.init_rows] = 0
    dk = torch.zeros_like(kg)
    dv = torch.zeros_like(vg)
    lse_bwd = torch.where(lse == -math.inf, torch.full_like(lse, math.inf), lse)  # P = 0 on rows without keys
    out_rows = out.flatten(1, 2)
    gout_rows = gout.flatten(1, 2)
    lse_rows = lse_bwd.flatten(1, 2)
    glse_rows = None if glse is None else glse.flatten(1, 2)

    def call(task):
        seg, mask = task[0], _mask_of(task)
        qs, ks, vs = _rows_view(qg, seg, bq), _keys_view(kg, seg, 0), _keys_view(vg, seg, 1)
        ls = _rows_view(lse_rows, seg, bq)
        gos, outs = _rows_view(gout_rows, seg, bq), _rows_view(out_rows, seg, bq)
        dqs, dks, dvs = _FLASH_BWD(gos, qs, ks, vs, outs, ls, 0.0, False, attn_mask=mask, scale=scale)
        if glse_rows is not None:
            # d lse / d logits = P: dS += P * glse
            logits = torch.matmul(qs, ks.transpose(-1, -2)) * scale
            if mask is not None:
                logits = logits + mask
            ds = torch.exp(logits - ls[..., None]) * _rows_view(glse_rows, seg, bq)[..., None]
            dqs = dqs + torch.matmul(ds, ks) * scale
            dks = dks + torch.matmul(ds.transpose(-1, -2), qs) * scale
        return dqs, dks, dvs

    tasks = _tasks(prepared, group, qg, vg, batch, threads)
    for (seg, _), (dqs, dks, dvs) in _run(call, tasks, threads, qg):
        if seg.fresh:
            _write_rows(dq, seg, dqs)
        else:
            _add_rows(dq, seg, dqs)
        _add_keys(dk, seg, dks)
        _add_keys(dv, seg, dvs)
    return dq.view(n, -1, qg.shape[-1]), dk, dv


def _ungroup(x_groups, groups: list[_Group], batch: int, heads: int, length: int, shape_tail, dtype):
    """Per-group [N, padded, ...] tensors -> [B, H, length, ...]."""
    if len(groups) == 1 and groups[0].head_index is None:
        x = x_groups[0]
        return x.reshape(batch, heads, -1, *shape_tail)[:, :, :length]
    out = torch.zeros(batch, heads, length, *shape_tail, dtype=dtype)
    for group, x in zip(groups, x_groups, strict=True):
        x = x.reshape(batch, len(group.heads), -1, *shape_tail)[:, :, :length]
        out[:, group.heads] = x
    return out


def _reduce_kv(dk_groups, groups: list[_Group], batch: int, kv_heads: int, length: int, dim: int, dtype):
    """Per-group key gradients [N, lk_pad, D] -> [B, Hk, lk, D] (summing GQA heads)."""
    if len(groups) == 1 and groups[0].kv_index is None:
        return dk_groups[0].reshape(batch, kv_heads, -1, dim)[:, :, :length]
    out = torch.zeros(batch, kv_heads, length, dim, dtype=dtype)
    for group, x in zip(groups, dk_groups, strict=True):
        x = x.reshape(batch, len(group.heads), -1, dim)[:, :, :length]
        index = group.kv_index if group.kv_index is not None else torch.arange(kv_heads)
        out.index_add_(1, index, x)
    return out


def _fused_forward(q, k, v, prepared: Prepared, scale: float):
    """(out, lse, groups, per-group (out, lse) in compute dtype and block layout)."""
    threads = torch.get_num_threads()
    with _threads(1):
        compute = _compute_dtype(q.dtype)
        batch, heads, lq, _ = q.shape
        qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
        groups = _groups(prepared, heads, k.shape[1])
        results = []
        for group in groups:
            qg, kg, vg = _group_inputs(group, qc, kc, vc, prepared)
            results.append(_fused_group_forward(prepared, group, qg, kg, vg, scale, batch, threads))
        dv = v.shape[-1]
        out = _ungroup([r[0][..., :dv] for r in results], groups, batch, heads, lq, (dv,), compute).to(q.dtype)
        lse = _ungroup([r[1] for r in results], groups, batch, heads, lq, (), compute).to(torch.float32)
    return out, lse, groups, results


def _fused_backward(q, k, v, prepared: Prepared, scale: float, groups, results, gout, glse):
    """dq, dk, dv from per-group (out, lse) as `_fused_forward` leaves them."""
    threads = torch.get_num_threads()
    with _threads(1):
        batch, heads, lq, d = q.shape
        kv_heads, lk, dvdim = k.shape[1], k.shape[2], v.shape[3]
        compute = _compute_dtype(q.dtype)
        bq = prepared.block_q
        qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
        gout = torch.zeros(batch, heads, lq, dvdim, dtype=compute) if gout is None else gout.to(compute)
        if glse is not None:
            glse = glse.to(compute)
            if not bool(glse.any()):
                glse = None
        dqs, dks, dvs = [], [], []
        for group, (out, lse) in zip(groups, results, strict=True):
            qg, kg, vg = _group_inputs(group, qc, kc, vc, prepared)
            go = _pad_len(_pick_heads(gout, group), qg.shape[1], qg.shape[-1]).reshape(
                qg.shape[0], -1, bq, qg.shape[-1]
            )
            gl = None
            if glse is not None:
                gl = _pick_heads(glse, group)
                gl = pad(gl, (0, qg.shape[1] - lq)).reshape(qg.shape[0], -1, bq)
            dq, dk, dv = _fused_group_backward(prepared, group, qg, kg, vg, out, lse, go, gl, scale, batch, threads)
            dqs.append(dq[..., :d])
            dks.append(dk[..., :d])
            dvs.append(dv[..., :dvdim])
        dq = _ungroup(dqs, groups, batch, heads, lq, (d,), compute).to(q.dtype)
        dk = _reduce_kv(dks, groups, batch, kv_heads, lk, d, compute).to(k.dtype)
        dv = _reduce_kv(dvs, groups, batch, kv_heads, lk, dvdim, compute).to(v.dtype)
    return dq, dk, dv


def _pick_heads(x: torch.Tensor, group: _Group) -> torch.Tensor:
    return x if group.head_index is None else x.index_select(1, group.head_index)


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prepared: Prepared, scale: float):
        out, lse, groups, results = _fused_forward(q, k, v, prepared, scale)
        ctx.save_for_backward(q, k, v)
        ctx.prepared, ctx.scale, ctx.groups, ctx.results = prepared, scale, groups, results
        return out, lse

    @staticmethod
    def backward(ctx, gout, glse):
        q, k, v = ctx.saved_tensors
        grads = _fused_backward(q, k, v, ctx.prepared, ctx.scale, ctx.groups, ctx.results, gout, glse)
        ctx.results = None
        return (*grads, None, None)


def backward(q, k, v, out, lse, dout, dlse, prepared: Prepared, scale: float):
    """Gradients (dq, dk, dv) from a forward's (out, lse), without recomputing it
    (execution order, like `cpu_attention`; modifier tensors get no gradient here)."""
    if _needs_generic(prepared, for_backward=True):
        raise ValueError("this pattern's modifiers need the generic path: differentiate cpu_attention instead")
    compute = _compute_dtype(q.dtype)
    groups = _groups(prepared, q.shape[1], k.shape[1])
    bq = prepared.block_q
    lq_pad = math.ceil(q.shape[2] / bq) * bq
    results = []
    for group in groups:
        o = _pad_len(_pick_heads(out.to(compute), group), lq_pad, max(q.shape[-1], v.shape[-1]))
        lg = pad(_pick_heads(lse.to(compute), group), (0, lq_pad - q.shape[2]), value=-math.inf)
        n = o.shape[0] * o.shape[1]
        results.append((o.reshape(n, -1, bq, o.shape[-1]), lg.reshape(n, -1, bq)))
    return _fused_backward(q, k, v, prepared, scale, groups, results, dout, dlse)


# ---------------------------------------------------------------- generic path


def _generic(q, k, v, prepared: Prepared, scale: float, dropout: Dropout | None = None):
    """The same segments with differentiable torch ops, for softcap, for modifier
    tensors that need gradients, and for dropout.

    Each chunk of rows computes its own partial softmax (output and log-sum-exp)
    under non-reentrant checkpointing, so its scores are recomputed in the backward
    instead of kept: memory stays bounded by one chunk, not by every visited block.
    The partials of a row are merged exactly through their log-sum-exps."""
    from torch.utils.checkpoint import checkpoint

    compute = _compute_dtype(q.dtype)
    batch, heads, lq, _ = q.shape
    kv_heads = k.shape[1]
    bq = prepared.block_q
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    groups = _groups(prepared, heads, kv_heads)
    outs, lses = [], []
    for group in groups:
        qg, kg, vg = _group_inputs(group, qc, kc, vc, prepared, fused=False)
        n, lq_pad, _ = qg.shape
        hg = len(group.heads)
        # dropout's (batch, head) per row of the group's [N = batch * hg] layout
        drop = None if dropout is None else (dropout, _batch_heads(batch, group.heads))
        rows_out, rows_lse, rows_index = [], [], []
        for whole in group.plan.segments:
            for a, b in _chunks(whole, 4 * qg.shape[0] * max(qg.shape[-1], vg.shape[-1], bq)):
                seg = whole.slice(a, b)
                out_c, lse_c = checkpoint(
                    _generic_chunk, prepared, group.index, seg, qg, kg, vg, scale, batch, hg, n, drop,
                    use_reentrant=False,
                )  # fmt: skip
                token_rows = (seg.rows[:, None] * bq + torch.arange(bq)[None, :]).reshape(-1)
                rows_out.append(out_c.reshape(n, -1, out_c.shape[-1]))
                rows_lse.append(lse_c.reshape(n, -1))
                rows_index.append(token_rows)
        if not rows_out:  # the group visits no block: one empty piece keeps the graph connected
            empty_out, empty_lse = _empty_piece(qg, kg, vg)
            rows_out, rows_lse, rows_index = [empty_out], [empty_lse], [torch.zeros(0, dtype=torch.long)]
        out, lse = merge_partials(torch.cat(rows_out, 1), torch.cat(rows_lse, 1), torch.cat(rows_index), lq_pad)
        outs.append(out.view(n, lq_pad // bq, bq, -1))
        lses.append(lse.view(n, lq_pad // bq, bq))
    dv = v.shape[-1]
    out = _ungroup(outs, groups, batch, heads, lq, (dv,), compute).to(q.dtype)
    lse = _ungroup(lses, groups, batch, heads, lq, (), compute).to(torch.float32)
    return out, lse


def _empty_piece(qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A partial result of no rows, (out [N, 0, Dv], lse [N, 0]), computed from the inputs
    so that rows output 0 with zero (not missing) gradients when a group visits no block."""
    logits = torch.matmul(qg[:, :0], kg[:, :1].transpose(-1, -2))  # [N, 0, 1]
    return torch.matmul(logits, vg[:, :1]), logits[..., 0]


def _batch_heads(batch: int, heads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, head index) [N, 1, 1, 1] of each row of a group's N = batch * len(heads)."""
    b = torch.arange(batch).repeat_interleave(len(heads))
    h = torch.tensor(heads).repeat(batch)
    return b.view(-1, 1, 1, 1), h.view(-1, 1, 1, 1)


def _generic_chunk(prepared, group: int, seg, qg, kg, vg, scale, batch, hg, n, drop=None):
    """Partial softmax of a chunk: (out [N, m, bq, Dv], lse [N, m, bq]), -inf where a
    row has no allowed key in the chunk.  `drop`: (Dropout, (b, h) per row) or None;
    the log-sum-exp stays that of the undropped softmax."""
    bq = prepared.block_q
    qs, ks, vs = _rows_view(qg, seg, bq), _keys_view(kg, seg), _keys_view(vg, seg)
    logits = torch.matmul(qs, ks.transpose(-1, -2)) * scale  # [N, m, bq, nk]
    if prepared.modifiers(group):
        qp, kp = _positions(prepared, seg)
        # scores as [B, m, Hg, bq, nk] so per-batch modifier terms [B, m, 1, bq, nk] line up
        s5 = logits.view(batch, hg, *logits.shape[1:]).transpose(1, 2)
        s5 = prepared.apply_modifiers(group, s5, qp[:, None, :, None], kp[:, None, None, :])
        logits = s5.transpose(1, 2).reshape(logits.shape)
    if seg.allowed is not None:
        logits = logits.masked_fill(~_expand_rows(seg.allowed, hg, n), -math.inf)
    lse = torch.logsumexp(logits, -1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(logits - safe[..., None])
    if drop is not None:
        dropout, (b, h) = drop
        qp, kp = _positions(prepared, seg)
        keep = keep_mask(dropout, b, h, qp[:, :, None], kp[:, None, :])  # [N, m, bq, nk]
        probs = probs * (keep * dropout.scale).to(probs.dtype)
    out = torch.matmul(probs, vs)
    return out, lse


# ---------------------------------------------------------------- entry point


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: Prepared, scale: float,
                  dropout: Dropout | None = None):  # fmt: skip
    """Attention over the schedule in `prepared`: (out like q with v's head dim,
    lse float32 [batch, heads, lq], -inf for rows with no allowed key).
    With `dropout`, the generic path (autograd differentiates it)."""
    if dropout is not None:
        return _generic(q, k, v, prepared, scale, dropout)
    if _needs_generic(prepared):
        return _generic(q, k, v, prepared, scale)
    return _FusedAttention.apply(q, k, v, prepared, scale)


__all__ = ["backward", "build_plan", "cpu_attention"]
