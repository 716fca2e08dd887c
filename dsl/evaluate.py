"""The reference semantics: a vectorised dense evaluator of `ir` patterns.

Every atom and modifier is defined once, as an expression, in `dsl.semantics`
(docs/language.md §8, §9); this module runs those expressions on torch tensors
and is what schedules and kernels are tested against.  Predicates are
elementwise over two broadcastable tensors of absolute positions, `qp` and `kp`
(for a dense mask `qp[:, None]` and `kp[None, :]`; for a batch of blocks
`[n, bq, 1]` and `[n, 1, bk]`).  Atoms that read a runtime tensor add a leading
batch dim.  It also fills the tables the definitions read (`_DenseEnv.read`),
from the call's tensors, which other torch backends reuse (`table_data`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from . import expr, ir, semantics
from .dynamic import (
    cluster_indices,
    cluster_members,
    expand_kv_heads,
    membership_bits,
    route_selection,
    vertical_slash_selection,
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
    (value,) = expr.run((semantics.coordinate(expr.Var("p"), coord),), expr.Env({"p": positions}))
    return value


def _shape(qp: torch.Tensor, kp: torch.Tensor) -> torch.Size:
    if qp.dim() == kp.dim():  # the usual case, without broadcast_shapes' Python cost
        return torch.Size(a if b == 1 else b for a, b in zip(qp.shape, kp.shape, strict=True))
    return torch.broadcast_shapes(qp.shape, kp.shape)


def neighborhood_window(
    gc: torch.Tensor, group_len: torch.Tensor, w: int, s: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """[start, end) of the window of group coordinate gc in a group of
    group_len positions (`semantics.neighborhood_window`); both nondecreasing in gc."""
    window = semantics.neighborhood_window(expr.Var("gc"), expr.Var("len"), w, s, causal)
    start, end = expr.run(window, expr.Env({"gc": gc, "len": group_len}))
    return start, end


def group_length(length: int, group: torch.Tensor, d: int) -> torch.Tensor:
    """Positions of an axis of `length` that fall in dilation group `group`."""
    (value,) = expr.run((semantics.group_length(length, expr.Var("g"), d),), expr.Env({"g": group}))
    return value


def mask(node: ir.Mask, qp: torch.Tensor, kp: torch.Tensor, t: Tensors) -> torch.Tensor:
    """Allowed pairs for broadcastable query and key position tensors."""
    (out,) = _run(semantics.mask_expr(node), node, qp, kp, t)
    shape = (*_batch(node, t), *_shape(qp, kp))
    if not isinstance(out, torch.Tensor):
        return torch.full(shape, bool(out), dtype=torch.bool)
    if out.shape != shape:  # a predicate of one side only, or a batched part folded away
        out = out.expand(shape)
    return out


def _batch(node: ir.Mask, t: Tensors) -> tuple[int, ...]:
    """The leading batch dim of a mask that reads per-batch tensors (1 or the batch):
    there even where constants fold those atoms away (`none & segments(ids)`)."""
    sizes = []
    for n in _batched(node):
        if isinstance(n, ir.Segments):
            ids = segment_ids(n, t)
            sizes.append(ids.shape[0] if ids.dim() == 2 else 1)
        elif isinstance(n, ir.Route):
            sizes.append(route_table(t, n).shape[0])
        elif isinstance(n, ir.VerticalSlash):
            sizes.append(vertical_slash_table(t, n)[0].shape[0])
        else:
            sizes.append(cluster_table(t, n)[0].shape[0])
    return (max(sizes),) if sizes else ()


@lru_cache(maxsize=4096)
def _batched(node: ir.Mask) -> tuple[ir.Mask, ...]:
    return tuple(n for n in ir.walk(node) if isinstance(n, ir.DYNAMIC))


def _run(e: expr.Expr, node: object, qp: torch.Tensor, kp: torch.Tensor, t: Tensors) -> list:
    program = expr.compiled(e)
    head = semantics.head_of(node) if "h" in program.variables else 0
    return program(_DenseEnv(head, qp, kp, t))


class _DenseEnv(expr.Env):
    """The dense evaluator's bindings: position tensors, every batch element at once
    (tables indexed by batch add a leading dim), the head, and tables read from the
    call's tensors."""

    def __init__(self, head: int, qp: torch.Tensor, kp: torch.Tensor, t: Tensors) -> None:
        q_offset = t.instance.sizes.q_offset if t.instance is not None else 0
        super().__init__({"q": qp, "k": kp, "b": expr.ALL, "h": head, "q_offset": q_offset})
        self.t = t
        self.memo: dict = {}

    def data(self, table: expr.TableRef) -> torch.Tensor:
        if table not in self.memo:
            self.memo[table] = table_data(table, self.t)
        return self.memo[table]

    def read(self, load: expr.Load, index: list, guard) -> object:
        table = load.table
        if table.kind == "random":  # drawn for the query blocks at hand
            rows, j = index
            key = (table, id(rows))
            if key not in self.memo:
                blocks, inverse = torch.unique(rows, return_inverse=True)
                n = table.node
                self.memo[key] = (rows, draw(blocks, n.count, n.seed, n.head, n.lo, n.hi, n.skip)[inverse])
            return self.memo[key][1][..., j]
        if table.kind == "alibi":
            m = table.node
            return alibi_slopes(m, self.t)[index[0]] if m.tensor is not None else m.slope
        return expr.gather(self.data(table), index, clamp=guard is not None)

    def reach(self, table: expr.TableRef, axis: int) -> int:
        return (self.data(table).shape[axis] - 1) // 2


def table_data(table: expr.TableRef, t: Tensors) -> torch.Tensor:
    """The tensor behind a table of `dsl.semantics` (kinds ids, route, vs_*, cluster, bias,
    prefix_alpha, prefix_beta), laid out by its logical indices, on the CPU for the
    tables computed from q and k."""
    node = table.node
    if table.kind == "ids":
        return segment_ids(node, t).cpu()
    if table.kind == "route":
        return route_table(t, node)
    if table.kind in ("vs_columns", "vs_diagonals"):
        return vertical_slash_table(t, node)[table.kind == "vs_diagonals"]
    if table.kind == "cluster":
        bits_q, bits_k = cluster_table(t, node)
        return bits_q if table.part == "q" else bits_k
    if table.kind == "bias":
        return bias_table(node, t)
    if table.kind in ("prefix_alpha", "prefix_beta"):
        alpha, beta = polyline_decays(node, t)
        return torch.cumsum(alpha, dim=-1) if table.kind == "prefix_alpha" else torch.cumsum(beta, dim=-2)
    raise TypeError(f"no data for a table of kind {table.kind!r}")


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
        s = t.instance.sizes
        all_q = torch.arange(s.lq) + s.q_offset
        if node.scores is not None:
            selected = route_selection(node, None, None, all_q, torch.arange(s.lk), route_scores(t, node))
        else:
            q, k = _qk(t, "route")
            selected = route_selection(node, q, k, all_q, torch.arange(s.lk))
        selected = selected[:, 0].cpu()
        if selected.shape[0] == 1 and t.batch is not None and t.batch > 1:  # one score table for the batch
            selected = selected.expand(t.batch, *selected.shape[1:])
        t.cache[key] = selected
    return t.cache[key]


def vertical_slash_table(t: Tensors, node: ir.VerticalSlash) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's selected columns [B, lk] and diagonals [B, lq + lk - 1] of the
    node's head (bool, on the CPU; `dynamic.vertical_slash_selection`), computed once
    per call for all heads."""
    every_head = dataclasses.replace(node, head=0)
    key = ("vertical_slash", every_head)
    if key not in t.cache:
        q, k = _qk(t, "vertical_slash")
        columns, diagonals = vertical_slash_selection(every_head, q, k, t.instance.sizes.q_offset)
        t.cache[key] = (columns.cpu(), diagonals.cpu())
    columns, diagonals = t.cache[key]
    return columns[:, node.head], diagonals[:, node.head]


def route_scores(t: Tensors, node: ir.Route) -> torch.Tensor:
    """The checked block scores of `route(scores = ...)`: float [batch or 1, heads,
    query regions, key regions].  Detached: no gradient flows to them."""
    s = t.instance.sizes
    x = floating(t.get(node.scores), node.scores, "route block scores")
    nq = math.prod(c.size for c in node.query_regions)
    nk = math.prod(c.size for c in node.regions)
    if x.dim() != 4 or x.shape[1] != s.heads or tuple(x.shape[2:]) != (nq, nk):
        raise MaskTypeError(
            f"tensor '{node.scores}' (route block scores) must have shape [batch, {s.heads}, {nq}, {nk}] "
            f"([batch, heads, query blocks, key blocks]), got {list(x.shape)}"
        )
    return x.detach()


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


# ---------------------------------------------------------------- modifiers

ScoreTransform = Callable[[torch.Tensor], torch.Tensor]


def modifier_terms(
    mods: tuple[ir.Modifier, ...], qp: torch.Tensor, kp: torch.Tensor, t: Tensors
) -> list[tuple[str, object]]:
    """Each modifier as ("add", logits [.., nq, nk]) or ("softcap", c), in order."""
    terms: list[tuple[str, object]] = []
    for m in mods:
        kind, value = semantics.modifier_term(m)
        if kind == "add":
            (value,) = _run(value, m, qp, kp, t)
        terms.append((kind, value))
    return terms


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
            elif isinstance(node, ir.VerticalSlash):
                vertical_slash_table(t, node)
            elif isinstance(node, ir.Cluster):
                cluster_selection(t, node)
        for m in pattern.modifiers:
            if isinstance(m, ir.Alibi) and m.tensor is not None:
                alibi_slopes(m, t)
            elif isinstance(m, ir.Bias):
                bias_table(m, t)
            elif isinstance(m, ir.Polyline):
                polyline_decays(m, t)


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
