"""What every atom and modifier means: one definition each, as an expression.

docs/language.md §8 and §9 in code.  `mask_expr(node)` is the predicate of a
pattern node over one (query, key) pair; `modifier_term(m)` is what a modifier
does to a logit: ("add", expression) or ("softcap", cap).  Every backend derives
its code from these (`dsl.evaluate` runs them densely, `codegen.flex` for
FlexAttention, `codegen.triton_exprs` prints Triton), so a new primitive is
defined here once (docs/adding-a-primitive.md).

The expressions read the variables of `dsl.expr` (`q`, `k`, `b`, `h`,
`q_offset`) and the call's data through tables (`TableRef`):

| kind | holds (logical indices) |
|---|---|
| random | [query block, j]: the j-th key block drawn for the query block (-1: none) |
| ids | [batch, n]: segment ids (`segments`) |
| route | [batch, query region, key region]: whether `route` keeps the key region |
| vs_columns | [batch, key]: whether `vertical_slash` keeps the key's column |
| vs_diagonals | [batch, k - row + lq - 1]: whether `vertical_slash` keeps the diagonal |
| cluster (parts q, k) | [batch, word, query row / key position]: cluster membership bits |
| alibi | [head]: the head's ALiBi slope |
| bias | [head, 2r_1 + 1, ...]: a relative position bias table |
| prefix_alpha, prefix_beta | [batch, head, y, x]: alpha summed along x, beta along y (inclusive) |
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from . import ir
from .dynamic import BITS_PER_WORD
from .expr import (
    Q_OFFSET,
    TRUE,
    B,
    Const,
    Expr,
    H,
    K,
    Load,
    Q,
    Reach,
    TableRef,
    all_of,
    any_of,
    bitand,
    const,
    maximum,
    minimum,
    named,
    to_float,
    where,
)

Term = tuple[str, object]  # ("add", Expr) or ("softcap", float)


# ---------------------------------------------------------------- coordinates


def coordinate(position: Expr, c: ir.Coord) -> Expr:
    """(p mod m) // d: the coordinate of an absolute position (ir.Coord)."""
    x = position if c.mod is None else position % c.mod
    return x // c.div


def pair(c: ir.Coord, hint: str = "") -> tuple[Expr, Expr]:
    """The query's and the key's coordinate."""
    return named(f"q{hint or 'c'}", coordinate(Q, c)), named(f"k{hint or 'c'}", coordinate(K, c))


def inside(c: Expr, size: int) -> Expr:
    """0 <= c < size: positions outside the keys' range lie in no segment or region."""
    return (c >= 0) & (c < size)


def region(position: Expr, regions: tuple[ir.Coord, ...]) -> tuple[Expr, Expr]:
    """(row-major region index, whether the position lies in a region at all)."""
    index: Expr = Const(0)
    within: Expr = TRUE
    for c in regions:
        x = coordinate(position, c)
        index = index * c.size + x
        within = within & inside(x, c.size)
    return index, within


# ---------------------------------------------------------------- NATTEN


def group_length(length, group, dilation: int) -> Expr:
    """How many positions of an axis of `length` fall in dilation group `group`."""
    return (const(length) - group + (dilation - 1)) // dilation


def neighborhood_window(gc, group_len, window: int, stride: int, causal: bool) -> tuple[Expr, Expr]:
    """[start, end) of the keys (group coordinates) of a query at group coordinate gc
    in a group of group_len positions (docs/language.md §8.1); both nondecreasing in gc."""
    gc, group_len = const(gc), const(group_len)
    if causal:
        # up to `window` keys ending at the last index of the stride group, cut at the query
        leader = named("leader", minimum(gc // stride * stride + (stride - 1), group_len - 1))
        start = named("start", maximum(leader - (window - 1), 0))
        return start, named("end", minimum(gc + 1, group_len))
    left = window // 2
    right = window // 2 + window % 2 - 1
    # centred on the middle of the stride group, shifted (not cut) to stay inside the group
    leader = named("leader", minimum(gc // stride * stride + stride // 2, group_len - 1))
    start = named(
        "start", maximum(leader - left, 0) + where(leader + right >= group_len, group_len - right - leader - 1, 0)
    )
    return start, named("end", start + window)


def _neighborhood(n: ir.Neighborhood) -> Expr:
    qc, kc = pair(n.coord)
    d = n.dilation
    group = named("group", qc % d)
    start, end = neighborhood_window(
        named("gq", qc // d), named("group_len", group_length(n.coord.size, group, d)), n.window, n.stride, n.causal
    )
    gk = named("gk", kc // d)
    return (kc % d).eq(group) & (gk >= start) & (gk < end)


# ---------------------------------------------------------------- atoms


def _offset(n: ir.Offset) -> Expr:
    qc, kc = pair(n.coord)
    d = named("d", kc - qc)
    if n.lo is not None and n.lo == n.hi:
        return d.eq(n.lo)
    out = TRUE
    if n.lo is not None:
        out = out & (d >= n.lo)
    if n.hi is not None:
        out = out & (d <= n.hi)
    return out


def _offset_mod(n: ir.OffsetMod) -> Expr:
    qc, kc = pair(n.coord)
    return (named("d", kc - qc) % n.modulus).eq(n.residue)


def _pos_set(n: ir.PosSet) -> Expr:
    c = named(f"{n.side}c", coordinate(Q if n.side == "q" else K, n.coord))
    if n.modulus is not None:
        c = c % n.modulus
    return (c >= n.lo) & (c < n.hi)


def _random_blocks(n: ir.RandomBlocks) -> Expr:
    table = TableRef("random", n)
    qb, kb = pair(n.coord, "b")
    return any_of(Load(table, (qb, Const(j))).eq(kb) for j in range(min(n.count, n.hi - n.lo)))


def _segments(n: ir.Segments) -> Expr:
    ids = TableRef("ids", n, shared=True)
    qc, kc = pair(n.coord)
    q_in, k_in = named("q_in", inside(qc, n.coord.size)), named("k_in", inside(kc, n.coord.size))
    return q_in & k_in & Load(ids, (B, qc), q_in).eq(Load(ids, (B, kc), k_in))


def _route(n: ir.Route) -> Expr:
    kept = TableRef("route", n, dtype="bool")
    rq, q_in = region(Q, n.query_regions)
    rk, k_in = region(K, n.regions)
    both = named("in_regions", q_in & k_in)
    return both & Load(kept, (B, named("rq", rq), named("rk", rk)), both)


def _vertical_slash(n: ir.VerticalSlash) -> Expr:
    columns = TableRef("vs_columns", n, dtype="bool")
    diagonals = TableRef("vs_diagonals", n, dtype="bool")
    k_in = named("k_in", inside(K, n.coord.size))
    diagonal = named("diagonal", K - (Q - Q_OFFSET) + (n.rows - 1))
    d_in = named("d_in", inside(diagonal, n.rows + n.coord.size - 1))
    return k_in & Load(columns, (B, K), k_in) | d_in & Load(diagonals, (B, diagonal), d_in)


def _cluster(n: ir.Cluster) -> Expr:
    bits_q, bits_k = TableRef("cluster", n, "q"), TableRef("cluster", n, "k")
    row = named("q_row", Q - Q_OFFSET)
    words = -(-n.clusters // BITS_PER_WORD)
    return any_of(bitand(Load(bits_q, (B, Const(w), row)), Load(bits_k, (B, Const(w), K))).ne(0) for w in range(words))


# Each ir node type's definition: a pattern node's predicate, a modifier's term
# (`&`, `|` and `~` of pattern nodes are the expressions' own: `mask_expr`).
DEFINITIONS: dict[type, Callable] = {
    ir.Const: lambda n: Const(bool(n.value)),
    ir.Offset: _offset,
    ir.OffsetMod: _offset_mod,
    ir.PosSet: _pos_set,
    ir.Neighborhood: _neighborhood,
    ir.RandomBlocks: _random_blocks,
    ir.Segments: _segments,
    ir.Route: _route,
    ir.Cluster: _cluster,
    ir.VerticalSlash: _vertical_slash,
}


# ---------------------------------------------------------------- modifiers


def _alibi(m: ir.Alibi) -> Term:
    qc, kc = pair(m.coord)
    slope = Load(TableRef("alibi", m, dtype="float", shared=True, grad=m.tensor is not None), (H,))
    return "add", -slope * named("dist", to_float(abs(kc - qc)))


def _bias(m: ir.Bias) -> Term:
    table = TableRef("bias", m, dtype="float", shared=True, grad=True)
    index = [H]
    for axis, c in enumerate(m.coords, start=1):
        qc, kc = pair(c)
        reach = Reach(table, axis)
        index.append(minimum(maximum(kc - qc, -reach), reach) + reach)  # offsets beyond the reach use the edges
    return "add", Load(table, tuple(index))


def _polyline(m: ir.Polyline) -> Term:
    """PPMA's path sum (docs/language.md §9.5) from prefix sums: a segment of a row
    (column) is the difference of two prefix sums along it."""
    rows = TableRef("prefix_alpha", m, dtype="float", shared=True, grad=True)
    columns = TableRef("prefix_beta", m, dtype="float", shared=True, grad=True)
    ycoord, xcoord = m.coords
    y1, y2 = pair(ycoord, "y")
    x1, x2 = pair(xcoord, "x")
    x_lo, x_hi = named("x_lo", minimum(x1, x2)), named("x_hi", maximum(x1, x2))
    y_lo, y_hi = named("y_lo", minimum(y1, y2)), named("y_hi", maximum(y1, y2))
    # "hv": along the query's row to the key's column, then along that column;
    # "vh": along the query's column to the key's row, then along that row
    row, column = (y1, x2) if m.path == "hv" else (y2, x1)
    horizontal = Load(rows, (B, H, row, x_hi)) - Load(rows, (B, H, row, x_lo))
    vertical = Load(columns, (B, H, y_hi, column)) - Load(columns, (B, H, y_lo, column))
    return "add", horizontal + vertical


def _decay(m: ir.Decay) -> Term:
    total: Expr = Const(0)
    for c in m.coords:
        qc, kc = pair(c)
        total = total + abs(kc - qc)
    return "add", m.log_gamma * to_float(total)


DEFINITIONS.update(
    {
        ir.Alibi: _alibi,
        ir.Softcap: lambda m: ("softcap", float(m.cap)),
        ir.Bias: _bias,
        ir.Polyline: _polyline,
        ir.Decay: _decay,
    }
)


@lru_cache(maxsize=4096)
def define(node: object):
    """The definition of `node`: an expression for a pattern node, a term for a modifier."""
    if type(node) not in DEFINITIONS:
        raise TypeError(f"unknown pattern node or modifier {node!r}")
    return DEFINITIONS[type(node)](node)


@lru_cache(maxsize=4096)
def mask_expr(node: ir.Mask) -> Expr:
    """Whether the pair is allowed by `node` (a boolean expression).  Walks `&`, `|`
    and `~` without recursion: a spec may nest them some hundreds deep."""
    done: dict[int, Expr] = {}
    stack: list[tuple[ir.Mask, bool]] = [(node, False)]
    while stack:
        n, ready = stack.pop()
        parts = n.parts if isinstance(n, (ir.And, ir.Or)) else (n.part,) if isinstance(n, ir.Not) else ()
        if parts and not ready:
            stack.append((n, True))
            stack.extend((p, False) for p in parts)
            continue
        if isinstance(n, ir.And):
            done[id(n)] = all_of(done[id(p)] for p in parts)
        elif isinstance(n, ir.Or):
            done[id(n)] = any_of(done[id(p)] for p in parts)
        elif isinstance(n, ir.Not):
            done[id(n)] = ~done[id(n.part)]
        else:
            done[id(n)] = define(n)
    return done[id(node)]


def modifier_term(m: ir.Modifier) -> Term:
    """What `m` does to a logit: ("add", a float expression) or ("softcap", cap)."""
    return define(m)


def head_of(node: object) -> int:
    """The head a node was instantiated for (the `h` the dense evaluator binds): every
    node of one head's pattern that names a head names the same one."""
    for n in ir.walk(node) if not isinstance(node, ir.Modifier) else (node,):
        head = getattr(n, "head", None)
        if head is not None:
            return head
    return 0
