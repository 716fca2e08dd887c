"""The reference semantics: a vectorised dense evaluator of `ir` patterns.

This module *defines* what every atom and modifier means (docs/language.md §8, §9); schedules
and kernels are tested against it.  Predicates are elementwise over two
broadcastable tensors of absolute positions, `qp` and `kp` (for a dense mask
`qp[:, None]` and `kp[None, :]`; for a batch of blocks `[n, bq, 1]` and
`[n, 1, bk]`).  Atoms that read a runtime tensor add a leading batch dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import ir
from .dynamic import (
    cluster_indices,
    cluster_members,
    expand_kv_heads,
    in_regions,
    membership_bits,
    region_ids,
    route_selection,
)
from .errors import MaskTypeError
from .random_blocks import draw
from .spec import Instance


@dataclass
class Tensors:
    """Call-time tensors and what is derived from them, shared by all heads."""

    values: dict[str, torch.Tensor]
    instance: Instance
    batch: int | None = None
    cache: dict = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.values:
            raise MaskTypeError(f"tensor '{name}' is not bound: pass {name}=... when calling the pattern")
        return self.values[name]


def coordinate(positions: torch.Tensor, coord: ir.Coord) -> torch.Tensor:
    c = positions % coord.mod if coord.mod is not None else positions
    return c if coord.div == 1 else torch.div(c, coord.div, rounding_mode="floor")


def _pair(qp: torch.Tensor, kp: torch.Tensor, coord: ir.Coord) -> tuple[torch.Tensor, torch.Tensor]:
    return coordinate(qp, coord), coordinate(kp, coord)


def _shape(qp: torch.Tensor, kp: torch.Tensor) -> torch.Size:
    if qp.dim() == kp.dim():  # the usual case, without broadcast_shapes' Python cost
        return torch.Size(a if b == 1 else b for a, b in zip(qp.shape, kp.shape, strict=True))
    return torch.broadcast_shapes(qp.shape, kp.shape)


def neighborhood_window(
    gc: torch.Tensor, group_len: torch.Tensor, w: int, s: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """[start, end) of the window of group coordinate gc in a group of
    group_len positions (docs/language.md §8.1); both are nondecreasing in gc."""
    if causal:
        leader = torch.minimum(torch.div(gc, s, rounding_mode="floor") * s + s - 1, group_len - 1)
        start = torch.clamp(leader - w + 1, min=0)
        end = torch.minimum(gc + 1, group_len)
        return start, end
    wl = w // 2
    wr = w // 2 + (w % 2) - 1
    leader = torch.minimum(torch.div(gc, s, rounding_mode="floor") * s + s // 2, group_len - 1)
    start = torch.clamp(leader - wl, min=0) + (leader + wr >= group_len).long() * (group_len - wr - leader - 1)
    return start, start + w


def group_length(length: int, group: torch.Tensor, d: int) -> torch.Tensor:
    """Positions of an axis of `length` that fall in dilation group `group`."""
    return torch.div(length - group + d - 1, d, rounding_mode="floor")


def neighborhood_range(c: torch.Tensor, node: ir.Neighborhood) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(group, start, end) of the keys a query at axis coordinate c attends to,
    in group coordinates (docs/language.md §8.1)."""
    d = node.dilation
    group = c % d
    gc = torch.div(c, d, rounding_mode="floor")
    start, end = neighborhood_window(gc, group_length(node.coord.size, group, d), node.window, node.stride, node.causal)
    return group, start, end


def mask(node: ir.Mask, qp: torch.Tensor, kp: torch.Tensor, t: Tensors) -> torch.Tensor:
    """Allowed pairs for broadcastable query and key position tensors."""
    if isinstance(node, ir.Const):
        return torch.full(_shape(qp, kp), node.value, dtype=torch.bool)
    if isinstance(node, ir.And):
        out = mask(node.parts[0], qp, kp, t)
        for part in node.parts[1:]:
            out = out & mask(part, qp, kp, t)
        return out
    if isinstance(node, ir.Or):
        out = mask(node.parts[0], qp, kp, t)
        for part in node.parts[1:]:
            out = out | mask(part, qp, kp, t)
        return out
    if isinstance(node, ir.Not):
        return ~mask(node.part, qp, kp, t)
    if isinstance(node, ir.Offset):
        q, k = _pair(qp, kp, node.coord)
        d = k - q
        if node.lo is not None and node.hi is not None:
            return (d >= node.lo) & (d <= node.hi)
        if node.lo is not None:
            return d >= node.lo
        if node.hi is not None:
            return d <= node.hi
        return torch.ones(d.shape, dtype=torch.bool)
    if isinstance(node, ir.OffsetMod):
        q, k = _pair(qp, kp, node.coord)
        return (k - q) % node.modulus == node.residue
    if isinstance(node, ir.PosSet):
        c = coordinate(qp if node.side == "q" else kp, node.coord)
        if node.modulus is not None:
            c = c % node.modulus
        inside = (c >= node.lo) & (c < node.hi)
        return inside.expand(_shape(qp, kp))
    if isinstance(node, ir.Neighborhood):
        q, k = _pair(qp, kp, node.coord)
        group, start, end = neighborhood_range(q, node)
        kg = torch.div(k, node.dilation, rounding_mode="floor")
        return (k % node.dilation == group) & (kg >= start) & (kg < end)
    if isinstance(node, ir.RandomBlocks):
        q, k = _pair(qp, kp, node.coord)
        blocks, inverse = torch.unique(q, return_inverse=True)
        rows = draw(blocks, node.count, node.seed, node.head, node.lo, node.hi, node.skip)[inverse]
        out = torch.zeros(_shape(qp, kp), dtype=torch.bool)
        for j in range(rows.shape[-1]):
            out |= rows[..., j] == k
        return out
    if isinstance(node, ir.Segments):
        return _segments(node, qp, kp, t)
    if isinstance(node, ir.Route):
        return _route(node, qp, kp, t)
    if isinstance(node, ir.Cluster):
        return _cluster(node, qp, kp, t)
    raise TypeError(f"unknown pattern node {node!r}")


def segment_ids(node: ir.Segments, t: Tensors) -> torch.Tensor:
    """The checked ids tensor of a `segments` atom, as [batch or 1, n]."""
    ids = t.get(node.tensor)
    n = node.coord.size
    if ids.dim() == 1:
        ids = ids[None]
    integer = not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)
    if ids.dim() != 2 or ids.shape[-1] != n or not integer:
        raise MaskTypeError(
            f"tensor '{node.tensor}' must be integer ids of shape [batch, {n}] or [{n}], "
            f"got {ids.dtype} {list(ids.shape)}"
        )
    return ids


def _segments(node: ir.Segments, qp, kp, t: Tensors) -> torch.Tensor:
    ids = segment_ids(node, t).cpu()
    n = node.coord.size
    q, k = _pair(qp, kp, node.coord)
    return (ids[:, q.clamp(0, n - 1)] == ids[:, k.clamp(0, n - 1)]) & (in_segment_range(q, n) & in_segment_range(k, n))


def in_segment_range(c: torch.Tensor, n: int) -> torch.Tensor:
    """Whether segment coordinates fall inside the ids tensor: a position outside it
    (a query before the first key or past the last one) belongs to no segment."""
    return (c >= 0) & (c < n)


def _qk(t: Tensors, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = t.instance.sizes
    q, k = t.get("q"), t.get("k")
    if q.dim() != 4 or k.dim() != 4:
        raise MaskTypeError(f"{what} needs q and k of shape [batch, heads, len, dim]")
    if q.shape[2] != s.lq or k.shape[2] != s.lk or q.shape[1] != s.heads or s.heads % k.shape[1]:
        raise MaskTypeError(
            f"{what} needs q [batch, {s.heads}, {s.lq}, dim] and k [batch, heads dividing {s.heads}, "
            f"{s.lk}, dim]; got q {list(q.shape)}, k {list(k.shape)}"
        )
    return q.detach(), k.detach()


def route_table(t: Tensors, node: ir.Route) -> torch.Tensor:
    """Selected key regions per query region, bool [B, regions, regions] on the CPU:
    computed once per call on the tensors' own device (only the table moves)."""
    key = ("route", node)
    if key not in t.cache:
        q, k = _qk(t, "route")
        s = t.instance.sizes
        all_q = torch.arange(s.lq) + s.q_offset
        t.cache[key] = route_selection(node, q, k, all_q, torch.arange(s.lk))[:, 0].cpu()
    return t.cache[key]


def cluster_selection(t: Tensors, node: ir.Cluster) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each cluster's queries and keys, long [B, n, w] ascending, on the
    tensors' device; computed once per call."""
    key = ("cluster-index", node)
    if key not in t.cache:
        q, k = _qk(t, "cluster")
        centroids = t.get("centroids").detach()
        if centroids.dim() != 3 or centroids.shape[0] != q.shape[1] or centroids.shape[1] != node.clusters:
            raise MaskTypeError(
                f"cluster({node.clusters}, ...) needs centroids of shape [{q.shape[1]}, {node.clusters}, dim], "
                f"got {list(centroids.shape)}"
            )
        if centroids.shape[2] != q.shape[3]:
            raise MaskTypeError(f"centroids have dim {centroids.shape[2]}, q has {q.shape[3]}")
        k = expand_kv_heads(k, q.shape[1])
        h = node.head
        centroids = centroids.to(q.device)
        t.cache[key] = (
            cluster_indices(q[:, h], centroids[h], node.size),
            cluster_indices(k[:, h], centroids[h], node.size),
        )
    return t.cache[key]


def cluster_table(t: Tensors, node: ir.Cluster) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster membership bits of queries [B, words, lq] and keys [B, words, lk]
    (int64, on the CPU)."""
    key = ("cluster", node)
    if key not in t.cache:
        s = t.instance.sizes
        index_q, index_k = cluster_selection(t, node)
        bits_q = membership_bits(cluster_members(index_q, s.lq))
        bits_k = membership_bits(cluster_members(index_k, s.lk))
        t.cache[key] = (bits_q.cpu(), bits_k.cpu())
    return t.cache[key]


def _route(node: ir.Route, qp, kp, t: Tensors) -> torch.Tensor:
    selected = route_table(t, node)
    last = selected.shape[-1] - 1
    inside = in_regions(qp, node.regions) & in_regions(kp, node.regions)
    rq, rk = region_ids(qp, node.regions).clamp(0, last), region_ids(kp, node.regions).clamp(0, last)
    return selected[:, rq, rk] & inside


def _cluster(node: ir.Cluster, qp, kp, t: Tensors) -> torch.Tensor:
    bits_q, bits_k = cluster_table(t, node)
    s = t.instance.sizes
    common = bits_q[:, :, qp - s.q_offset] & bits_k[:, :, kp]  # [B, words, ...]
    return (common != 0).any(1)


# ---------------------------------------------------------------- modifiers

ScoreTransform = Callable[[torch.Tensor], torch.Tensor]


def modifier_terms(
    mods: tuple[ir.Modifier, ...], qp: torch.Tensor, kp: torch.Tensor, t: Tensors
) -> list[tuple[str, object]]:
    """Each modifier as ("add", logits [.., nq, nk]) or ("softcap", c), in order."""
    terms: list[tuple[str, object]] = []
    for m in mods:
        if isinstance(m, ir.Softcap):
            terms.append(("softcap", m.cap))
        else:
            terms.append(("add", _additive(m, qp, kp, t)))
    return terms


def _additive(m: ir.Modifier, qp, kp, t: Tensors) -> torch.Tensor:
    if isinstance(m, ir.Alibi):
        q, k = _pair(qp, kp, m.coord)
        if m.tensor is not None:
            slope = alibi_slopes(m, t)[m.head]
        else:
            slope = torch.tensor(m.slope, dtype=torch.float64)
        return -slope * (k - q).abs().to(slope.dtype)
    if isinstance(m, ir.Decay):
        total = 0
        for coord in m.coords:
            q, k = _pair(qp, kp, coord)
            total = total + (k - q).abs()
        return m.log_gamma * total.to(torch.float64)
    if isinstance(m, ir.Bias):
        return _bias(m, qp, kp, t)
    if isinstance(m, ir.Polyline):
        return _polyline(m, qp, kp, t)
    raise TypeError(f"unknown modifier {m!r}")


def floating(x: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """`x` itself, if it holds real numbers: an integer table would silently
    truncate what a user meant as a learned bias."""
    if not x.is_floating_point():
        raise MaskTypeError(f"tensor '{name}' ({what}) must be floating point, got {x.dtype}")
    return x


def alibi_slopes(m: ir.Alibi, t: Tensors) -> torch.Tensor:
    """The checked slopes tensor of an `alibi` modifier: float [heads]."""
    slopes = floating(t.get(m.tensor), m.tensor, "ALiBi slopes")
    heads = t.instance.sizes.heads
    if slopes.shape != (heads,):
        raise MaskTypeError(f"tensor '{m.tensor}' (ALiBi slopes) must have shape [{heads}], got {list(slopes.shape)}")
    return slopes


def bias_table(m: ir.Bias, t: Tensors) -> torch.Tensor:
    """The checked table of a `bias` modifier: float [heads or 1, 2*r0+1, ...]."""
    table = floating(t.get(m.tensor), m.tensor, "relative position bias")
    heads = t.instance.sizes.heads
    n = len(m.coords)
    if table.dim() != n + 1 or table.shape[0] not in (1, heads) or any(s % 2 == 0 for s in table.shape[1:]):
        raise MaskTypeError(
            f"tensor '{m.tensor}' (relative position bias) must have shape [heads or 1, "
            f"{', '.join(f'2*r{i}+1' for i in range(n))}] (odd sizes), got {list(table.shape)}"
        )
    return table


def polyline_decays(m: ir.Polyline, t: Tensors) -> list[torch.Tensor]:
    """The checked alpha and beta of a `polyline` modifier: float [batch, heads or 1, h, w]."""
    ycoord, xcoord = m.coords
    h, w = ycoord.size, xcoord.size
    heads = t.instance.sizes.heads
    out = []
    for name in (m.alpha, m.beta):
        x = floating(t.get(name), name, "polyline decay")
        if x.dim() != 4 or x.shape[1] not in (1, heads) or tuple(x.shape[2:]) != (h, w):
            raise MaskTypeError(
                f"tensor '{name}' (polyline decay) must have shape [batch, heads or 1, {h}, {w}], got {list(x.shape)}"
            )
        out.append(x)
    return out


def check_tensors(instance: Instance, t: Tensors) -> None:
    """Check every tensor the patterns read (shape, dtype, device) before any backend
    reads it: backends that copy tables into kernels never evaluate the reference."""
    device = t.values["q"].device if "q" in t.values else None
    for name, x in t.values.items():
        if device is not None and x.device != device:
            raise MaskTypeError(f"tensor '{name}' is on {x.device}, but q is on {device}: move it to {device}")
    for pattern in instance.patterns:
        for node in ir.walk(pattern.mask):
            if isinstance(node, ir.Segments):
                segment_ids(node, t)
            elif isinstance(node, ir.Route):
                route_table(t, node)
            elif isinstance(node, ir.Cluster):
                cluster_selection(t, node)
        for m in pattern.modifiers:
            if isinstance(m, ir.Alibi) and m.tensor is not None:
                alibi_slopes(m, t)
            elif isinstance(m, ir.Bias):
                bias_table(m, t)
            elif isinstance(m, ir.Polyline):
                polyline_decays(m, t)


def _bias(m: ir.Bias, qp, kp, t: Tensors) -> torch.Tensor:
    table = bias_table(m, t)
    index: list[torch.Tensor] = []
    for axis, coord in enumerate(m.coords):
        reach = (table.shape[axis + 1] - 1) // 2
        q, k = _pair(qp, kp, coord)
        index.append(torch.clamp(k - q, -reach, reach) + reach)
    head_table = table[m.head if table.shape[0] > 1 else 0]
    return head_table[tuple(index)]


def _polyline(m: ir.Polyline, qp, kp, t: Tensors) -> torch.Tensor:
    ycoord, xcoord = m.coords
    h, w = ycoord.size, xcoord.size
    alpha, beta = (x[:, m.head if x.shape[1] > 1 else 0] for x in polyline_decays(m, t))
    # Every path is one row segment plus one column segment.  All segments of a
    # grid form two small tables, rows [B, h, w, w] and columns [B, w, h, h]
    # (O(N^1.5) for an N-token grid), so each pair costs two lookups, and the
    # backward scatters into the tables rather than into alpha and beta per pair.
    rows = _segment_table(torch.cumsum(alpha, dim=-1))  # [B, y, x1, x2]: alpha summed over (x1, x2]
    columns = _segment_table(torch.cumsum(beta, dim=-2).transpose(-1, -2))  # [B, x, y1, y2]
    y1, y2 = _pair(qp, kp, ycoord)
    x1, x2 = _pair(qp, kp, xcoord)
    if m.path == "hv":  # along the query's row to the key's column, then along that column
        row_at, column_at = (y1 * w + x1) * w + x2, (x2 * h + y1) * h + y2
    else:  # along the query's column to the key's row, then along that row
        column_at, row_at = (x1 * h + y1) * h + y2, (y2 * w + x1) * w + x2
    return _lookup(rows, row_at) + _lookup(columns, column_at)


def _segment_table(sums: torch.Tensor) -> torch.Tensor:
    """[B, lines, n] inclusive prefix sums -> [B, lines, n, n]: the sum over the
    positions after min(a, b) up to max(a, b) of each line."""
    a, b = sums[..., :, None], sums[..., None, :]
    n = sums.shape[-1]
    later = torch.arange(n)[:, None] >= torch.arange(n)[None, :]
    return torch.where(later.to(sums.device), a - b, b - a)


def _lookup(table: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """table [B, ...] read at flat indices `at` [...]: [B, *at.shape]."""
    flat = table.reshape(table.shape[0], -1)
    return flat.index_select(1, at.reshape(-1)).view(table.shape[0], *at.shape)


def apply_terms(scores: torch.Tensor, terms: list[tuple[str, object]]) -> torch.Tensor:
    for kind, value in terms:
        if kind == "softcap":
            scores = value * torch.tanh(scores / value)
        else:
            scores = scores + value.to(scores.dtype)
    return scores


# ---------------------------------------------------------------- whole instances


def positions(instance: Instance) -> tuple[torch.Tensor, torch.Tensor]:
    s = instance.sizes
    return torch.arange(s.lq, dtype=torch.int64) + s.q_offset, torch.arange(s.lk, dtype=torch.int64)


def dense_mask(instance: Instance, tensors: Tensors, row_chunk: int = 4096) -> torch.Tensor:
    """bool [heads, lq, lk], or [batch, heads, lq, lk] when tensors vary per batch."""
    qp, kp = positions(instance)
    qp, kp = qp[:, None], kp[None, :]
    per_group = []
    for pattern in instance.patterns:
        chunks = [mask(pattern.mask, qp[i : i + row_chunk], kp, tensors) for i in range(0, qp.shape[0], row_chunk)]
        per_group.append(torch.cat(chunks, dim=-2))
    out = torch.stack([per_group[g] for g in instance.head_group], dim=-3)
    if tensors.batch is not None and out.dim() == 3:
        out = out.expand(tensors.batch, *out.shape)
    elif out.dim() == 4 and tensors.batch is not None and out.shape[0] != tensors.batch:
        out = out.expand(tensors.batch, *out.shape[1:])
    return out


def scores(instance: Instance, tensors: Tensors, logits: torch.Tensor) -> torch.Tensor:
    """Apply every head's modifiers to raw logits [batch, heads, lq, lk]."""
    qp, kp = positions(instance)
    group_terms = [modifier_terms(p.modifiers, qp[:, None], kp[None, :], tensors) for p in instance.patterns]
    if not any(group_terms):
        return logits
    heads = []
    for h, g in enumerate(instance.head_group):
        terms = [(kind, v.to(logits.device) if isinstance(v, torch.Tensor) else v) for kind, v in group_terms[g]]
        heads.append(apply_terms(logits[:, h], terms))
    return torch.stack(heads, dim=1)
