"""Decoding: a few new queries against a KV cache, reading only the keys they attend.

Sequence b of a batch holds its keys in cache slots 0 .. key_lengths[b]-1 (the
cache has a fixed capacity C, the rest of it unused) and its n new queries
sit at positions positions[b] .. positions[b]+n-1.  The result is exactly
`program(q[b], k_cache[b, :, :key_lengths[b]], v_cache[b, ...], q_offset=positions[b])`:
tensors indexed by key position (segment ids) are given over the whole capacity.

Why a path of its own.  A decode step attends one row to a window of a long
cache: any work proportional to the cache (copying it into block-padded
buffers, rebuilding a schedule for a new length, recompiling for a new shape)
costs more than the attention.  Here:

* A pattern whose meaning at given positions does not depend on the sequence
  length (`length_invariant`: instantiated for two lengths it lowers to the same
  predicate once the sizes of coordinates are forgotten; no grids, neighborhoods,
  random blocks, routing, clusters, bias tables or polyline decays) gets a
  *skeleton*: the block schedule of tiles of `TILE` query positions against a
  plan length rounded up to a power of two, with `segments` relaxed to what
  it can allow (so one skeleton serves any ids).  Tiles are cached, so a step
  only looks its rows up: O(visited blocks), and a schedule is built once per
  `TILE` positions.
* The CPU step reads the visited key spans as strided views of the cache (no
  copy), evaluates the exact predicate only on partial blocks, adds modifiers,
  and does the softmax over the visited keys in float32.
* Other patterns fall back to calling the program on the cache prefix, per
  sequence: exact, and as slow as a full call.

Positions and lengths are data: under torch.compile the step is the custom op
`maskc::decode`, so advancing positions never recompile.  Decoding computes no
gradients (use the program itself to train).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from maskc.codegen import plan
from maskc.codegen.geometry import Geometry
from maskc.codegen.schedule import BlockSchedule, runs_from_intervals
from maskc.dsl import evaluate, ir
from maskc.dsl.errors import MaskTypeError
from maskc.dsl.lower import Sizes
from maskc.dsl.spec import Instance

from . import dispatch, triton_backend
from .call import bindings_of, joined
from .cpu.layout import compute_dtype
from .inputs import check_inputs, check_scale, resolve_backend
from .merge import merge_pair
from .prepare import Prepared, source_text
from .registry import program_for
from .tuning import POLICY

# Query positions per cached skeleton tile, and the query block it is scheduled with.
TILE = 1024
SKELETON_BLOCK_Q = 64
# Plan lengths are powers of two, at least this: a growing cache changes plan rarely.
MIN_PLAN_LENGTH = 4096
SKELETON_CACHE_SIZE = 256
# Nodes whose meaning depends on the sequence length (or on q and k): such patterns fall back.
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
# Up to this many visited keys, a step evaluates its predicate over all of them in one go.
WHOLE_MASK_KEYS = 1 << 14
_LENGTH_BOUND = (ir.Neighborhood, ir.RandomBlocks, ir.Route, ir.Cluster, ir.VerticalSlash)
_TABLE_MODIFIERS = (ir.Bias, ir.Polyline)

_INVARIANT: dict = {}
_QUICK: dict = {}  # (program key, backend, heads, capacity) -> Plan or None, for steps without bindings
_SKELETONS: OrderedDict = OrderedDict()


def plan_length(capacity: int) -> int:
    return max(MIN_PLAN_LENGTH, 1 << max(capacity - 1, 0).bit_length())


# ---------------------------------------------------------------- which patterns


def _forget_sizes(node: object) -> object:
    """`node` with every coordinate's size set to 0 (sizes follow the length)."""
    if isinstance(node, ir.Coord):
        return dataclasses.replace(node, size=0)
    if isinstance(node, tuple):
        return tuple(_forget_sizes(x) for x in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changes = {f.name: _forget_sizes(getattr(node, f.name)) for f in dataclasses.fields(node) if f.compare}
        return dataclasses.replace(node, **changes)
    return node


def _fast_nodes(instance: Instance) -> bool:
    for pattern in instance.patterns:
        for node in ir.walk(pattern.mask):
            if isinstance(node, _LENGTH_BOUND):
                return False
            if isinstance(node, ir.Segments) and node.coord.mod is not None:
                return False
        if any(isinstance(m, _TABLE_MODIFIERS) for m in pattern.modifiers):
            return False
    return not instance.grids


def length_invariant(program, heads: int, sizes: dict) -> bool:
    """Whether the pattern means the same at given positions whatever lq, lk and q_offset are."""
    key = (program.key, heads, tuple(sorted(sizes.items())))
    if key not in _INVARIANT:
        a = program.spec.instantiate(64, MIN_PLAN_LENGTH, heads=heads, q_offset=MIN_PLAN_LENGTH - 64, sizes=sizes)
        b = program.spec.instantiate(128, 2 * MIN_PLAN_LENGTH + 64, heads=heads, q_offset=100, sizes=sizes)
        _INVARIANT[key] = (
            _fast_nodes(a)
            and _fast_nodes(b)
            and a.head_group == b.head_group
            and _forget_sizes(tuple(a.patterns)) == _forget_sizes(tuple(b.patterns))
        )
    return _INVARIANT[key]


def map_segments(mask: ir.Mask, replace, allow: bool = True) -> ir.Mask:
    """`mask` with every `segments` atom s replaced by `replace(s, allow)`, where `allow`
    is False under an odd number of negations."""
    if isinstance(mask, ir.Segments):
        return replace(mask, allow)
    if isinstance(mask, ir.Not):
        return ir.Not(map_segments(mask.part, replace, not allow))
    if isinstance(mask, (ir.And, ir.Or)):
        return type(mask)(tuple(map_segments(p, replace, allow) for p in mask.parts))
    return mask


def relax(mask: ir.Mask) -> ir.Mask:
    """`mask` with every `segments` atom replaced by what keeps the most pairs
    (true where it allows, false under a negation): a superset of `mask` for any ids."""
    return map_segments(mask, lambda _, allow: ir.Const(allow))


# ---------------------------------------------------------------- skeletons


@dataclass
class Plan:
    """The pattern at one plan length, for every decode step whose cache fits it."""

    instance: Instance  # raw per-group patterns (exact at any position below `length`)
    relaxed: list[ir.Mask]  # per group, segments relaxed (what skeletons schedule)
    exact_full: bool  # skeleton's full blocks are full for the exact pattern (nothing relaxed)
    length: int
    key: tuple
    mask_groups: list[MaskGroup] = dataclasses.field(default_factory=list)
    segments: dict[str, ir.Segments] = dataclasses.field(default_factory=dict)  # ids tensors read
    forms: list[ir.HeadPattern] = dataclasses.field(default_factory=list)  # normal forms over the plan's range
    sources: dict = dataclasses.field(default_factory=dict)  # generated kernels, per (group, blocks)

    def __post_init__(self) -> None:
        self.no_tensors = evaluate.Tensors({}, self.instance, batch=1)
        self._at_capacity: dict = {}

    def exact_mask(self, mask: ir.Mask, capacity: int) -> ir.Mask:
        """`mask` with its segment ids read over a cache of `capacity` keys (not padded)."""
        key = (mask, capacity)
        if key not in self._at_capacity:
            if len(self._at_capacity) > 64:
                self._at_capacity.clear()
            self._at_capacity[key] = map_segments(mask, lambda node, _: _resized(node, capacity))
        return self._at_capacity[key]


@dataclass
class MaskGroup:
    """Heads sharing one mask (and so the keys they visit); their modifiers may differ."""

    mask: ir.Mask
    group: int  # a head group with this mask: whose skeleton rows to read
    heads: list[int]
    every: bool  # all the heads
    by_modifiers: dict[int, list[int]]  # head group -> indices into `heads`
    additive: bool  # no softcap: modifiers fold into an additive mask
    modified: bool  # some head has a modifier
    interval: bool = False  # one query's keys are intervals computed from the mask (`key_intervals`)


def _mask_groups(instance: Instance) -> list[MaskGroup]:
    heads_of: dict[ir.Mask, list[int]] = {}
    for h, g in enumerate(instance.head_group):
        heads_of.setdefault(instance.patterns[g].mask, []).append(h)
    out = []
    for mask, hs in heads_of.items():
        by_modifiers: dict[int, list[int]] = {}
        for i, h in enumerate(hs):
            by_modifiers.setdefault(instance.head_group[h], []).append(i)
        mods = [m for g in by_modifiers for m in instance.patterns[g].modifiers]
        additive = not any(isinstance(m, ir.Softcap) for m in mods)
        every = len(hs) == len(instance.head_group)
        group = MaskGroup(mask, instance.head_group[hs[0]], hs, every, by_modifiers, additive, bool(mods))
        group.interval = is_intervals(mask)
        out.append(group)
    return out


def is_intervals(mask: ir.Mask) -> bool:
    """Whether `key_intervals` can say which keys one query attends: constants, offsets
    and position sets on the flat sequence, under &, | and ~ (windows, sinks, causal,
    prefixes), not segments, strides, blocks or grids."""
    if isinstance(mask, ir.Const):
        return True
    if isinstance(mask, (ir.Offset, ir.PosSet)):
        flat = mask.coord.div == 1 and mask.coord.mod is None
        return flat and (not isinstance(mask, ir.PosSet) or mask.modulus is None)
    if isinstance(mask, ir.Not):
        return is_intervals(mask.part)
    if isinstance(mask, (ir.And, ir.Or)):
        return all(is_intervals(p) for p in mask.parts)
    return False


def key_intervals(mask: ir.Mask, q: int, n: int) -> list[tuple[int, int]]:
    """The keys among 0 .. n-1 that a query at position q attends, as sorted disjoint
    [a, b) intervals (masks for which `is_intervals` holds), in Python integers."""
    if isinstance(mask, ir.Const):
        return [(0, n)] if mask.value and n > 0 else []
    if isinstance(mask, ir.Offset):
        lo = 0 if mask.lo is None else max(q + mask.lo, 0)
        hi = n if mask.hi is None else min(q + mask.hi + 1, n)
        return [(lo, hi)] if lo < hi else []
    if isinstance(mask, ir.PosSet):
        if mask.side == "q":
            return [(0, n)] if mask.lo <= q < mask.hi and n > 0 else []
        lo, hi = max(mask.lo, 0), min(mask.hi, n)
        return [(lo, hi)] if lo < hi else []
    if isinstance(mask, ir.Not):
        out, at = [], 0
        for a, b in key_intervals(mask.part, q, n):
            if at < a:
                out.append((at, a))
            at = b
        return [*out, (at, n)] if at < n else out
    parts = [key_intervals(p, q, n) for p in mask.parts]
    if isinstance(mask, ir.Or):
        out = []
        for a, b in sorted(x for part in parts for x in part):
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
        return out
    out = parts[0]
    for part in parts[1:]:
        out = [(max(a, c), min(b, d)) for a, b in out for c, d in part if max(a, c) < min(b, d)]
    return out


def plan_for(program, heads: int, sizes: dict, capacity: int) -> Plan:
    length = plan_length(capacity)
    key = (program.key, heads, tuple(sorted(sizes.items())), length)
    if key not in _SKELETONS:
        instance = program.spec.instantiate(1, length, heads=heads, q_offset=0, sizes=sizes)
        relaxed = [relax(p.mask) for p in instance.patterns]
        exact = all(r == p.mask for r, p in zip(relaxed, instance.patterns, strict=True))
        segments = {
            node.tensor: node
            for pattern in instance.patterns
            for node in ir.walk(pattern.mask)
            if isinstance(node, ir.Segments)
        }
        whole = Instance(Sizes(length, length, heads, 0, instance.sizes.names), instance.patterns, instance.head_group)
        forms = plan.normal_forms(whole)
        _remember(key, Plan(instance, relaxed, exact, length, key, _mask_groups(instance), segments, forms))
    return _lookup(key)


def _remember(key, value) -> None:
    _SKELETONS[key] = value
    while len(_SKELETONS) > SKELETON_CACHE_SIZE:
        _SKELETONS.popitem(last=False)


def _lookup(key):
    _SKELETONS.move_to_end(key)
    return _SKELETONS[key]


@dataclass
class Tile:
    """Per head group, per query block of the tile: runs of key blocks (start, end, full)."""

    rows: list[list[list[tuple[int, int, bool]]]]


def tile(p: Plan, index: int, block_k: int) -> Tile:
    key = (*p.key, index, block_k)
    if key not in _SKELETONS:
        s = p.instance.sizes
        patterns = [ir.HeadPattern(mask, ()) for mask in p.relaxed]
        sizes = Sizes(TILE, p.length, s.heads, index * TILE, s.names)
        instance = Instance(sizes, patterns, p.instance.head_group)
        schedule = plan.plan_schedule(instance, SKELETON_BLOCK_Q, block_k, "rowmajor")
        groups = []
        for runs in schedule.groups:
            ptr, start, end, full = (x.tolist() for x in (runs.row_ptr, runs.start, runs.end, runs.full))
            rows = [list(zip(start[a:b], end[a:b], full[a:b], strict=True)) for a, b in itertools.pairwise(ptr)]
            groups.append(rows)
        _remember(key, Tile(groups))
    return _lookup(key)


def visited(p: Plan, group: int, lo: int, hi: int, block_k: int, key_length: int) -> list[tuple[int, int, bool]]:
    """Key block runs (start, end, full) that queries at positions [lo, hi) may attend,
    among the first `key_length` keys: a block is full only if full for every query."""
    per_row = []
    for qb in range(lo // SKELETON_BLOCK_Q, (hi - 1) // SKELETON_BLOCK_Q + 1):
        t = tile(p, qb * SKELETON_BLOCK_Q // TILE, block_k)
        per_row.append(t.rows[group][(qb * SKELETON_BLOCK_Q % TILE) // SKELETON_BLOCK_Q])
    runs = per_row[0] if len(per_row) == 1 else _union(per_row)
    limit = -(-key_length // block_k)
    ragged = key_length % block_k != 0  # the last block holds keys past the length
    out = []
    for start, end, full in runs:
        end = min(end, limit)
        if start >= end:
            continue
        if ragged and end == limit and full:
            if end - 1 > start:
                out.append((start, end - 1, True))
            out.append((end - 1, end, False))
        else:
            out.append((start, end, full))
    return out


def _union(per_row: list[list[tuple[int, int, bool]]]) -> list[tuple[int, int, bool]]:
    state: dict[int, list[int]] = {}
    for runs in per_row:
        for start, end, full in runs:
            for b in range(start, end):
                seen = state.setdefault(b, [0, 0])
                seen[0] += 1
                seen[1] += full
    out: list[tuple[int, int, bool]] = []
    for b in sorted(state):
        full = state[b][1] == len(per_row)
        if out and out[-1][1] == b and out[-1][2] == full:
            out[-1] = (out[-1][0], b + 1, full)
        else:
            out.append((b, b + 1, full))
    return out


# ---------------------------------------------------------------- inputs


def as_lengths(x, batch: int, name: str) -> list[int]:
    """An int, a sequence or an integer tensor [batch] -> a list of ints."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool or x.dim() > 1:
            raise MaskTypeError(f"{name} must be integers (an int or a tensor [batch]), got {x.dtype} {list(x.shape)}")
        values = x.reshape(-1).tolist()
    elif isinstance(x, int) and not isinstance(x, bool):
        values = [x]
    else:
        raise MaskTypeError(f"{name} must be an int or an integer tensor [batch], got {type(x).__name__}")
    if len(values) == 1:
        values = values * batch
    if len(values) != batch:
        raise MaskTypeError(f"{name} has {len(values)} entries for a batch of {batch}")
    return values


def check_steps(positions: list[int], key_lengths: list[int], rows: int, capacity: int) -> None:
    for b, (p, n) in enumerate(zip(positions, key_lengths, strict=True)):
        if p < 0 or p + rows > capacity:
            raise MaskTypeError(
                f"positions[{b}] = {p}: the {rows} queries must sit in the cache's slots 0 .. {capacity - 1}"
            )
        if not 0 <= n <= capacity:
            raise MaskTypeError(f"key_lengths[{b}] = {n} is outside the cache (capacity {capacity})")


# ---------------------------------------------------------------- the step


def decode(program, q, k, v, positions, key_lengths, backend: str, scale: float, bindings: dict):
    """(out [B, H, n, Dv], lse float32 [B, H, n]) for one decode step; see the module docstring."""
    batch, heads, rows, _ = q.shape
    capacity = k.shape[2]
    quick = (program.key, backend, heads, capacity) if not bindings else None  # the usual step: one lookup
    p = _QUICK.get(quick, False) if quick is not None else False
    sizes = {n: x for n, x in bindings.items() if not isinstance(x, torch.Tensor)}
    tensors = {n: x for n, x in bindings.items() if isinstance(x, torch.Tensor)}
    if p is False:
        fast = backend in ("cpu", "triton") and length_invariant(program, heads, sizes)
        p = plan_for(program, heads, sizes, capacity) if fast else None
        if quick is not None:
            if len(_QUICK) >= SKELETON_CACHE_SIZE:
                _QUICK.clear()
            _QUICK[quick] = p
    if batch == 1 and p is not None and backend == "cpu" and rows == 1 and len(p.mask_groups) == 1:
        mg = p.mask_groups[0]
        if mg.interval and mg.additive and not mg.modified and q.shape[-1] == v.shape[-1]:
            return _interval_step(mg, q, k, v, key_intervals(mg.mask, positions[0], key_lengths[0]), scale)
    if batch == 1 and p is not None and backend == "cpu" and key_lengths[0] > 0:  # no assembling
        o, s = cpu_step(p, q[0], k[0], v[0], positions[0], key_lengths[0], scale, _row(tensors, 0, p, capacity))
        return o[None], s[None]
    out = q.new_zeros(batch, heads, rows, v.shape[-1])
    lse = torch.full((batch, heads, rows), -math.inf, dtype=torch.float32, device=q.device)
    for b in range(batch):
        if key_lengths[b] == 0:
            continue
        if p is not None and backend == "cpu":
            row = _row(tensors, b, p, capacity)
            out[b], lse[b] = cpu_step(p, q[b], k[b], v[b], positions[b], key_lengths[b], scale, row)
        elif p is not None:
            row = _row(tensors, b, p, capacity, pad=True)
            o, s = triton_step(
                p, program, q[b : b + 1], k[b : b + 1], v[b : b + 1], positions[b], key_lengths[b], scale, row
            )
            out[b], lse[b] = o[0], s[0]
        else:
            o, s = _call_prefix(program, q, k, v, b, positions[b], key_lengths[b], backend, scale, sizes, tensors)
            out[b], lse[b] = o, s
    return out, lse


def _interval_step(mg: MaskGroup, q, k, v, spans: list[tuple[int, int]], scale: float):
    """The common generation step, kept short: one sequence, one query, a window or
    sinks (keys computed as intervals): one fused call per interval on a view of the
    cache, every head at once (each kv head's query heads stacked as its rows)."""
    _, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    if not spans:
        return q.new_zeros(q.shape), torch.full((1, heads, 1), -math.inf)
    compute = compute_dtype(q.dtype)
    qs = q.reshape(1, kv_heads, heads // kv_heads, dim)
    if qs.dtype != compute:
        qs = qs.to(compute)
    out = lse = None
    for a, b in spans:
        ks, vs = k[:, :, a:b], v[:, :, a:b]
        if ks.dtype != compute:
            ks, vs = ks.to(compute), vs.to(compute)
        o, s = _FLASH(qs, ks, vs, 0.0, False, scale=scale)
        out, lse = (o, s) if out is None else merge_pair(out, lse, o, s)
    return out.reshape(1, heads, 1, dim).to(q.dtype), lse.reshape(1, heads, 1).float()


def _row(tensors: dict, b: int, p: Plan, capacity: int, pad: bool = False) -> evaluate.Tensors:
    """Batch element b's tensors.  Segment ids are given over the cache's capacity;
    with `pad` (the kernels, generated for the plan's length) they are padded to the
    plan's length, where no query or kept key ever reads them."""
    if not tensors:
        return p.no_tensors
    row = {}
    for name, x in tensors.items():
        node = p.segments.get(name)
        if node is not None:
            given = _resized(node, capacity)
            ids = evaluate.segment_ids(given, evaluate.Tensors(tensors, None))  # checks dtype and shape
            x = ids[b if ids.shape[0] > 1 else 0][None]
            if pad:
                x = torch.nn.functional.pad(x, (0, node.coord.size - x.shape[-1]))
        row[name] = x
    return evaluate.Tensors(row, p.instance, batch=1)


def _resized(node: ir.Segments, capacity: int) -> ir.Segments:
    """The `segments` atom of a sequence of `capacity` keys."""
    return dataclasses.replace(node, coord=ir.Coord(node.coord.div, None, -(-capacity // node.coord.div)))


def _call_prefix(program, q, k, v, b, position, key_length, backend, scale, sizes, tensors):
    """The fallback: the program on sequence b's cache prefix."""
    instance = program.spec.instantiate(q.shape[2], key_length, heads=q.shape[1], q_offset=position, sizes=sizes)
    row = {}
    for name, x in tensors.items():
        x = x[b : b + 1] if x.dim() >= 2 and x.shape[0] > 1 else x
        for pattern in instance.patterns:
            for node in ir.walk(pattern.mask):
                if isinstance(node, ir.Segments) and node.tensor == name:
                    x = x[..., : node.coord.size]
        row[name] = x
    ks, vs = k[b : b + 1, :, :key_length], v[b : b + 1, :, :key_length]
    o, s = dispatch.run(
        program, q[b : b + 1], ks, vs, backend=backend, scale=scale, q_offset=position, return_lse=True, **sizes, **row
    )
    return o[0], s[0]


def cpu_step(p: Plan, q, k, v, position: int, key_length: int, scale: float, tensors):
    """One sequence: q [H, n, D], k and v [Hkv, C, D] -> (out [H, n, Dv], lse float32 [H, n])."""
    rows = q.shape[1]
    qp = None
    results = []
    for mg in p.mask_groups:
        if rows == 1 and mg.interval and mg.additive and not mg.modified:  # windows, sinks, causal
            # the exact keys in Python integers: no schedule lookup, no mask, views of the cache
            spans = key_intervals(mg.mask, position, key_length)
            if spans:
                results.append((mg, *_fused(p, mg, q, k, v, spans, None, None, None, scale, tensors)))
            continue
        runs = visited(p, mg.group, position, position + rows, SKELETON_BLOCK_Q, key_length)
        if not runs:
            continue
        if qp is None:
            qp = torch.arange(position, position + rows)[:, None]
        spans = _spans(runs, SKELETON_BLOCK_Q, key_length)
        kp = _positions(spans)[None, :]
        mask = mg.mask if not p.segments else p.exact_mask(mg.mask, k.shape[1])
        allowed = _allowed(p, mask, runs, spans, qp, kp, tensors)
        step = _fused if mg.additive else _softcapped
        results.append((mg, *step(p, mg, q, k, v, spans, qp, kp, allowed, scale, tensors)))
    if len(results) == 1 and results[0][0].every:  # the common case: nothing to assemble
        return results[0][1].to(q.dtype), results[0][2].float()
    out = q.new_zeros(q.shape[0], rows, v.shape[-1])
    lse = torch.full((q.shape[0], rows), -math.inf, dtype=torch.float32)
    for mg, o, s in results:
        out[mg.heads] = o.to(out.dtype)
        lse[mg.heads] = s.float()
    return out, lse


def triton_step(p: Plan, program, q, k, v, position: int, key_length: int, scale: float, tensors):
    """One sequence on the generated kernels: a schedule over the call's query blocks
    read off the skeleton (O(visited blocks)), kernels generated once per plan."""
    rows = q.shape[2]
    title = source_text(program.spec).strip()
    tiles = POLICY.choose("triton", p.forms, title, q.dtype, max(q.shape[-1], v.shape[-1]), rows, q.device)
    block_q, block_k = tiles.block_q, tiles.block_k
    query_blocks = -(-rows // block_q)
    groups = []
    for g in range(len(p.forms)):
        found: list[tuple[int, int, int, bool]] = []
        for j in range(query_blocks):
            lo, hi = position + j * block_q, position + min((j + 1) * block_q, rows)
            found += [(j, a, b, f and p.exact_full) for a, b, f in visited(p, g, lo, hi, block_k, key_length)]
        r, a, b, f = (torch.tensor([x[i] for x in found], dtype=torch.long) for i in range(4))
        groups.append(runs_from_intervals(r, a, b, f.bool(), query_blocks))
    s = p.instance.sizes
    sizes = Sizes(rows, key_length, s.heads, position, s.names)
    instance = Instance(sizes, p.instance.patterns, p.instance.head_group)
    masks = [form.mask for form in p.forms]
    schedule = BlockSchedule(
        rows, key_length, block_q, block_k, instance.head_group, groups, masks,
        Geometry(rows, block_q, position), Geometry(key_length, block_k), tensors,
    )  # fmt: skip
    prepared = Prepared.with_schedule(instance, p.forms, tensors, title, schedule, tiles)
    for g in range(len(p.forms)):
        key = (g, block_q, block_k)
        if key not in p.sources:
            p.sources[key] = triton_backend.kernel_source(prepared, g)
        prepared.artifacts.kernel_sources[g] = p.sources[key]
    ks, vs = k[:, :, :key_length], v[:, :, :key_length]
    return triton_backend.triton_attention(q, ks, vs, prepared, scale)


def _positions(spans: list[tuple[int, int]]) -> torch.Tensor:
    if len(spans) == 1:
        return torch.arange(*spans[0])
    return torch.cat([torch.arange(a, b) for a, b in spans])


def _terms(p: Plan, group: int, qp, kp, tensors) -> list[tuple[str, object]]:
    return evaluate.modifier_terms(p.instance.patterns[group].modifiers, qp, kp, tensors)


def _heads_view(mg: MaskGroup, q, k, compute):
    """q as [G, rows, D] against the cache's [G, C, D]: with every head, G = kv heads and
    each kv head's query heads stacked as rows (GQA without repeating the cache); else
    one row group per head, with the index of its kv head."""
    heads, kv_heads = q.shape[0], k.shape[0]
    reps = heads // kv_heads
    if mg.every:
        q = q if q.dtype == compute else q.to(compute)
        return q.reshape(kv_heads, reps * q.shape[1], -1), None
    return q[mg.heads].to(compute), torch.tensor([h // reps for h in mg.heads])


def _bias_for(p: Plan, mg: MaskGroup, qp, kp, allowed, compute, tensors) -> torch.Tensor | None:
    """Additive logits [len(heads) or 1, n, nk]: -inf where not allowed, plus each head's modifiers."""
    bias = None
    if allowed is not None:
        bias = torch.where(allowed, 0.0, -math.inf).to(compute)[None]
    if not mg.modified:
        return bias
    per_head = torch.zeros(len(mg.heads), qp.shape[0], kp.shape[-1], dtype=compute)
    for g, idx in mg.by_modifiers.items():
        per_head[idx] = evaluate.apply_terms(per_head[idx], _terms(p, g, qp, kp, tensors))
    return per_head if bias is None else per_head + bias


def _fused(p: Plan, mg: MaskGroup, q, k, v, spans, qp, kp, allowed, scale, tensors):
    """PyTorch's fused CPU attention on each contiguous span of the cache (strided views),
    spans merged through their log-sum-exps: (out [len(heads), n, Dv], lse [len(heads), n])."""
    compute = compute_dtype(q.dtype)
    rows = q.shape[1]
    qh, kv_index = _heads_view(mg, q, k, compute)
    stacked = qh.shape[1] // rows  # query heads stacked as rows of one kv head
    pieces = [(a, b, offset) for (a, b), offset in zip(spans, _offsets(spans), strict=True)]
    if allowed is not None and rows == 1:  # one query: cut each span to its allowed keys
        pieces, allowed = _trimmed(pieces, allowed)
        if not pieces:
            return q.new_zeros(len(mg.heads), rows, v.shape[-1]), qh.new_full((len(mg.heads), rows), -math.inf)
    bias = _bias_for(p, mg, qp, kp, allowed, compute, tensors)
    if bias is not None and bias.shape[0] > 1:
        bias = bias.reshape(qh.shape[0], qh.shape[1], -1)
    elif bias is not None and stacked > 1:
        bias = bias.repeat(1, stacked, 1)
    width = max(q.shape[-1], v.shape[-1])
    out = lse = None
    for a, b, offset in pieces:
        ks = k[:, a:b] if kv_index is None else k[kv_index, a:b]
        vs = v[:, a:b] if kv_index is None else v[kv_index, a:b]
        qs = qh
        if ks.dtype != compute:
            ks, vs = ks.to(compute), vs.to(compute)
        if q.shape[-1] != v.shape[-1]:  # the fused kernel wants one head dim: pad the narrower with zeros
            qs, ks, vs = (torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in (qs, ks, vs))
        mask = None if bias is None else bias[None, ..., offset : offset + b - a]
        o, s = _FLASH(qs[None], ks[None], vs[None], 0.0, False, attn_mask=mask, scale=scale)
        o, s = o[0, ..., : v.shape[-1]], s[0]
        if allowed is not None:  # rows that saw no key here: the kernel leaves their lse finite
            some = allowed[:, offset : offset + b - a].any(-1)
            if not bool(some.all()):
                some = some.repeat(stacked)
                s = s.masked_fill(~some, -math.inf)
                o = o.masked_fill(~some[:, None], 0)
        out, lse = (o, s) if out is None else merge_pair(out, lse, o, s)
    return out.reshape(len(mg.heads), rows, -1), lse.reshape(len(mg.heads), rows)


def _offsets(spans: list[tuple[int, int]]) -> list[int]:
    out, at = [], 0
    for a, b in spans:
        out.append(at)
        at += b - a
    return out


def _trimmed(pieces, allowed: torch.Tensor):
    """A single query's spans cut to their first and last allowed key.  When every
    span's allowed keys are contiguous no mask is left (None): the fused kernel then
    runs on exactly the kept keys, as SDPA on a hand-sliced cache would."""
    out, contiguous = [], True
    for a, b, offset in pieces:
        hits = allowed[0, offset : offset + b - a].nonzero()
        if hits.numel() == 0:
            continue
        first, last = int(hits[0, 0]), int(hits[-1, 0])
        contiguous = contiguous and hits.shape[0] == last - first + 1
        out.append((a + first, a + last + 1, offset + first))
    return out, (None if contiguous else allowed)


def _softcapped(p: Plan, mg: MaskGroup, q, k, v, spans, qp, kp, allowed, scale, tensors):
    """Logits through a softcap are not additive: scores of the visited keys in float,
    modified per head, softmax, then PV; (out [len(heads), n, Dv], lse [len(heads), n])."""
    compute = compute_dtype(q.dtype)
    rows = q.shape[1]
    qh, kv_index = _heads_view(mg, q, k, compute)
    parts = []
    for a, b in spans:
        ks = k[:, a:b] if kv_index is None else k[kv_index, a:b]
        parts.append(torch.matmul(qh, ks.to(compute).transpose(-1, -2)))
    scores = torch.cat(parts, -1).view(len(mg.heads), rows, -1) * scale
    modified = torch.empty_like(scores)
    for g, idx in mg.by_modifiers.items():
        modified[idx] = evaluate.apply_terms(scores[idx], _terms(p, g, qp, kp, tensors))
    if allowed is not None:
        modified = modified.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(modified, -1)
    probs = torch.exp(modified - lse.masked_fill(lse == -math.inf, 0)[..., None])
    probs = probs.view(qh.shape[0], -1, scores.shape[-1])
    out, offset = 0, 0
    for a, b in spans:
        vs = v[:, a:b] if kv_index is None else v[kv_index, a:b]
        out = out + torch.matmul(probs[..., offset : offset + b - a], vs.to(compute))
        offset += b - a
    return out.view(len(mg.heads), rows, -1), lse


def _spans(runs: list[tuple[int, int, bool]], block_k: int, key_length: int) -> list[tuple[int, int]]:
    """Contiguous key ranges [a, b) covering the runs, cut at the key length."""
    spans: list[tuple[int, int]] = []
    for start, end, _ in runs:
        a, b = start * block_k, min(end * block_k, key_length)
        if spans and spans[-1][1] == a:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    return spans


def _allowed(p: Plan, mask: ir.Mask, runs, spans, qp, kp, tensors) -> torch.Tensor | None:
    """bool [n, nk] over the spans' keys (`kp` [1, nk]), None when every block is full.
    The predicate is exact everywhere; it is evaluated over all the keys at once while
    they are few (each torch call costs more than its elements), else per partial block."""
    end = spans[-1][1]
    offset, partial = 0, []
    for start, stop, full in runs:
        a, b = start * SKELETON_BLOCK_Q, min(stop * SKELETON_BLOCK_Q, end)
        if a < b and not (full and p.exact_full):
            partial.append((a, b, offset))
        offset += max(b - a, 0)
    if not partial:
        return None
    if offset <= WHOLE_MASK_KEYS or (len(partial) == 1 and offset == partial[0][1] - partial[0][0]):
        return _evaluate(mask, qp, kp, tensors)
    allowed = _evaluate(mask, qp, torch.cat([torch.arange(a, b) for a, b, _ in partial])[None, :], tensors)
    out = torch.ones(qp.shape[0], offset, dtype=torch.bool)
    at = 0
    for a, b, column in partial:
        out[:, column : column + b - a] = allowed[:, at : at + b - a]
        at += b - a
    return out


def _evaluate(mask: ir.Mask, qp, kp, tensors) -> torch.Tensor:
    allowed = evaluate.mask(mask, qp, kp, tensors)
    if allowed.dim() == 3:
        allowed = allowed[0]
    return allowed.expand(qp.shape[0], kp.shape[-1])


# ---------------------------------------------------------------- eager and compiled


def run(program, q, k, v, positions, key_lengths, *, backend: str, scale, return_lse: bool, bindings: dict):
    """`Program.decode`: check, then step eagerly or through `maskc::decode` when traced."""
    check_inputs(q, k, v)
    name = resolve_backend(backend, q)
    if name == "reference":
        raise MaskTypeError("decode has no 'reference' backend: compare against program.reference on the prefix")
    scale = check_scale(scale, q.shape[-1])
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise MaskTypeError("decode computes no gradients: train with the program itself, prog(q, k, v)")
    if torch.compiler.is_compiling():
        positions, key_lengths = _as_tensors(positions, key_lengths, q)
        tensor_names, tensors, size_names, sizes = joined(bindings)
        out, lse = decode_op(
            q, k, v, positions, key_lengths, program.key, name, scale, tensor_names, tensors, size_names, sizes
        )
    else:
        out, lse = _step(program, q, k, v, positions, key_lengths, name, scale, bindings)
    return (out, lse) if return_lse else out


def _as_tensors(positions, key_lengths, q) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and lengths as integer tensors [batch]: data, not constants, in a traced graph."""
    batch = q.shape[0]
    if not isinstance(positions, torch.Tensor):
        positions = torch.tensor(as_lengths(positions, batch, "positions"))
    if key_lengths is None:
        key_lengths = positions + q.shape[2]
    elif not isinstance(key_lengths, torch.Tensor):
        key_lengths = torch.tensor(as_lengths(key_lengths, batch, "key_lengths"))
    return positions, key_lengths


def _step(program, q, k, v, positions, key_lengths, backend, scale, bindings):
    """One eager step: positions and lengths as ints, checked, then `decode`."""
    batch, rows = q.shape[0], q.shape[2]
    pos = as_lengths(positions, batch, "positions")
    lengths = [p + rows for p in pos] if key_lengths is None else as_lengths(key_lengths, batch, "key_lengths")
    check_steps(pos, lengths, rows, k.shape[2])
    with torch.no_grad():
        return decode(program, q, k, v, pos, lengths, backend, scale, bindings)


def _decode_impl(q, k, v, positions, key_lengths, key, backend, scale, tensor_names, tensors, size_names, sizes):
    bindings = bindings_of(tensor_names, tensors, size_names, sizes)
    return _step(program_for(key), q, k, v, positions, key_lengths, backend, scale, bindings)


@torch.library.custom_op("maskc::decode", mutates_args=())
def decode_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    key_lengths: torch.Tensor,
    program: str,
    backend: str,
    scale: float,
    tensor_names: str,
    tensors: list[torch.Tensor],
    size_names: str,
    sizes: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _decode_impl(q, k, v, positions, key_lengths, program, backend, scale, tensor_names, tensors,
                            size_names, sizes)  # fmt: skip
    return out.contiguous(), lse.contiguous()


@decode_op.register_fake
def _(q, k, v, positions, key_lengths, program, backend, scale, tensor_names, tensors, size_names, sizes):
    batch, heads, rows, _ = q.shape
    return q.new_empty(batch, heads, rows, v.shape[-1]), q.new_empty(batch, heads, rows, dtype=torch.float32)
