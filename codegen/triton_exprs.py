"""Normal forms -> Triton expressions over absolute positions.

`qpos` is [BLOCK_M, 1] and `kpos` is [1, BLOCK_N] (int32, absolute positions;
`qpos` is negative for queries that precede the keys).  Compiled Triton's `//`
and `%` round toward zero while the interpreter floors, so they are applied
only to non-negative operands: query coordinates go through `_floor_div` /
`_floor_mod`, differences k - q are reduced with ((d % m) + m) % m.  Everything from
the spec reaches the source only as validated integers and floats; tensor
arguments get names made here (T0, T1, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from maskc.dsl import ir


@dataclass(frozen=True)
class Table:
    """A tensor argument of the generated kernel and what fills it at call time.

    The kernel receives the pointer `name` followed by the integer scalars
    `name_s0 .. name_s{strides-1}` (element strides) and, for bias tables,
    `name_r0 ..` (the table's reach per axis)."""

    name: str
    kind: str  # "random", "ids", "route", "cluster", "clusters", "alibi", "bias", "prefix_alpha", "prefix_beta"
    node: object  # the ir node it serves (head-specific data comes from the group)
    strides: int
    reaches: int = 0

    def scalar_args(self) -> list[str]:
        return [f"{self.name}_s{i}" for i in range(self.strides)] + [f"{self.name}_r{i}" for i in range(self.reaches)]


@dataclass(frozen=True)
class GradTable:
    """A float32 buffer receiving d loss / d (a modifier's tensor), laid out like
    the forward table `like` (same strides); `kind` names what it holds."""

    name: str
    kind: str  # "alibi", "bias", "prefix_alpha", "prefix_beta"
    node: object
    like: str


@dataclass
class Emitter:
    tables: list[Table] = field(default_factory=list)
    grads: list[GradTable] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    counter: int = 0

    def grad(self, kind: str, node: object, like: str) -> str:
        for g in self.grads:
            if g.kind == kind and g.like == like:
                return g.name
        name = f"G{len(self.grads)}"
        self.grads.append(GradTable(name, kind, node, like))
        return name

    def table(self, kind: str, node: object, strides: int, reaches: int = 0) -> str:
        for t in self.tables:
            if t.kind == kind and _same_data(t.node, node):
                return t.name
        name = f"T{len(self.tables)}"
        self.tables.append(Table(name, kind, node, strides, reaches))
        return name

    def let(self, expr: str) -> str:
        """Bind an intermediate value to a fresh local name."""
        name = f"v{self.counter}"
        self.counter += 1
        self.lines.append(f"{name} = {expr}")
        return name

    def table_args(self) -> list[str]:
        out = []
        for t in self.tables:
            out.append(t.name)
            out.extend(t.scalar_args())
        return out + [g.name for g in self.grads]


def _same_data(a: object, b: object) -> bool:
    """Two nodes whose tables hold the same data (head-specific parts aside)."""
    return type(a) is type(b) and _strip_head(a) == _strip_head(b)


def _strip_head(node: object) -> object:
    from dataclasses import fields, replace

    names = {f.name for f in fields(node)}
    return replace(node, head=0) if "head" in names else node


def coord(pos: str, c: ir.Coord) -> str:
    """(pos % mod) // div, flooring like the reference.  Key positions are never
    negative; query positions are when queries precede the keys (q_offset < 0),
    so theirs go through `_floor_mod` / `_floor_div` (on [M, 1] vectors: cheap)."""
    if pos != "qpos":
        text = pos if c.mod is None else f"({pos} % {c.mod})"
        return text if c.div == 1 else f"({text} // {c.div})"
    if c.mod is not None:
        text = f"_floor_mod({pos}, {c.mod})"
        return text if c.div == 1 else f"({text} // {c.div})"  # non-negative after the floor mod
    return pos if c.div == 1 else f"_floor_div({pos}, {c.div})"


def _in_range(coords: list[tuple[str, int]]) -> str:
    """All coordinates c within [0, size): a query outside the table matches nothing."""
    return "(" + " & ".join(f"({c} >= 0) & ({c} < {_int(size)})" for c, size in coords) + ")"


def _int(value: int) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    return str(value)


def _float(value: float) -> str:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return repr(value)


def predicate(node: ir.Mask, e: Emitter) -> str:
    """A boolean Triton expression for `node` (broadcast [BLOCK_M, BLOCK_N])."""
    if isinstance(node, ir.Const):
        return "(qpos >= 0)" if node.value else "(qpos < 0)"
    if isinstance(node, ir.And):
        return "(" + " & ".join(predicate(p, e) for p in node.parts) + ")"
    if isinstance(node, ir.Or):
        return "(" + " | ".join(predicate(p, e) for p in node.parts) + ")"
    if isinstance(node, ir.Not):
        return f"({predicate(node.part, e)} == 0)"
    if isinstance(node, ir.Offset):
        d = e.let(f"{coord('kpos', node.coord)} - {coord('qpos', node.coord)}")
        parts = []
        if node.lo is not None:
            parts.append(f"({d} >= {_int(node.lo)})")
        if node.hi is not None:
            parts.append(f"({d} <= {_int(node.hi)})")
        return "(" + " & ".join(parts) + ")" if parts else "(qpos >= 0)"
    if isinstance(node, ir.OffsetMod):
        m = _int(node.modulus)
        d = e.let(f"{coord('kpos', node.coord)} - {coord('qpos', node.coord)}")
        return f"(((({d} % {m}) + {m}) % {m}) == {_int(node.residue % node.modulus)})"
    if isinstance(node, ir.PosSet):
        c = coord("qpos" if node.side == "q" else "kpos", node.coord)
        if node.modulus is not None:
            c = f"_floor_mod({c}, {_int(node.modulus)})" if node.side == "q" else f"({c} % {_int(node.modulus)})"
        lo = max(node.lo, -(2**31) + 1)
        hi = min(node.hi, 2**31 - 1)
        return f"(({c} >= {_int(lo)}) & ({c} < {_int(hi)}))"
    if isinstance(node, ir.Neighborhood):
        return _neighborhood(node, e)
    if isinstance(node, ir.RandomBlocks):
        # rows of draws from query block T_s1 on (negative when queries precede the keys)
        t = e.table("random", node, 2)
        qb = e.let(f"{coord('qpos', node.coord)} - {t}_s1")
        kb = e.let(coord("kpos", node.coord))
        hits = [f"(tl.load({t} + {qb} * {t}_s0 + {j}) == {kb})" for j in range(min(node.count, node.hi - node.lo))]
        return "(" + " | ".join(hits) + ")" if hits else "(qpos < 0)"
    if isinstance(node, ir.Segments):
        t = e.table("ids", node, 1)
        qc, kc = e.let(coord("qpos", node.coord)), e.let(coord("kpos", node.coord))
        n = node.coord.size
        inq, ink = e.let(_in_range([(qc, n)])), e.let(_in_range([(kc, n)]))
        ids_q = f"tl.load({t} + b * {t}_s0 + {qc}, mask={inq}, other=0)"
        ids_k = f"tl.load({t} + b * {t}_s0 + {kc}, mask={ink}, other=0)"
        return f"({inq} & {ink} & ({ids_q} == {ids_k}))"
    if isinstance(node, ir.Route):
        t = e.table("route", node, 2)
        rq = e.let(_region("qpos", node.regions))
        rk = e.let(_region("kpos", node.regions))
        inside = e.let(f"({_regions_in_range('qpos', node.regions)} & {_regions_in_range('kpos', node.regions)})")
        return f"({inside} & (tl.load({t} + b * {t}_s0 + {rq} * {t}_s1 + {rk}, mask={inside}, other=0) != 0))"
    if isinstance(node, ir.Cluster):
        t = e.table("cluster", node, 2)
        # T[b, q, k] would be L^2; instead a cluster bitmask per token: [b, 2, len] int64 (queries, keys).
        bits_q = f"tl.load({t} + b * {t}_s0 + (qpos - q_offset))"
        bits_k = f"tl.load({t} + b * {t}_s0 + {t}_s1 + kpos)"
        return f"(({bits_q} & {bits_k}) != 0)"
    raise TypeError(f"no Triton lowering for {node!r}")


@dataclass(frozen=True)
class ClusterBlocks:
    """The table of clustered execution (runtime/clustered.py): per batch element
    and head, four rows over the gathered sequence (true query position, true key
    position, query cluster bits, key cluster bits; -1 positions are padding)."""


def clustered_predicate(rest: ir.Mask | None, e: Emitter) -> str:
    """`allowed` over *gathered* rows: the same cluster, no padding, no earlier
    cluster shared by both tokens (each pair counts once in the union), and the
    pattern's static conjuncts on the true positions.

    The table's scalars: _s0, _s1 batch and head strides, _s2 the row length,
    _s3 the padded cluster width, _s4 the true query offset."""
    t = e.table("clusters", ClusterBlocks(), 5)
    cq = e.let(f"qpos // {t}_s3")
    ck = e.let(f"kpos // {t}_s3")
    base = e.let(f"{t} + b * {t}_s0 + h * {t}_s1")
    tq = e.let(f"tl.load({base} + qpos)")
    tk = e.let(f"tl.load({base} + {t}_s2 + kpos)")
    bits_q = e.let(f"tl.load({base} + 2 * {t}_s2 + qpos)")
    bits_k = e.let(f"tl.load({base} + 3 * {t}_s2 + kpos)")
    earlier = e.let(f"(tl.full([1, 1], 1, tl.int64) << {cq}.to(tl.int64)) - 1")
    ok = e.let(f"({cq} == {ck}) & ({tq} >= 0) & ({tk} >= 0) & (({bits_q} & {bits_k} & {earlier}) == 0)")
    if rest is None:
        return ok
    e.lines += [f"qpos = {tq} + {t}_s4", f"kpos = {tk}"]
    return f"({ok} & {predicate(rest, e)})"


def _region(pos: str, regions: tuple[ir.Coord, ...]) -> str:
    out = "0"
    for c in regions:
        out = f"({out} * {_int(c.size)} + {coord(pos, c)})"
    return out


def _regions_in_range(pos: str, regions: tuple[ir.Coord, ...]) -> str:
    """Whether `pos` lies in a region (regions tile the keys; see dsl.dynamic.in_regions)."""
    return _in_range([(coord(pos, c), c.size) for c in regions])


def _neighborhood(node: ir.Neighborhood, e: Emitter) -> str:
    d, w, s, length = node.dilation, node.window, node.stride, node.coord.size
    qc = e.let(coord("qpos", node.coord))
    kc = e.let(coord("kpos", node.coord))
    group = e.let(f"_floor_mod({qc}, {d})")
    gc = e.let(f"_floor_div({qc}, {d})")
    glen = e.let(f"({length} - {group} + {d - 1}) // {d}")
    if node.causal:
        leader = e.let(f"tl.minimum(_floor_div({gc}, {s}) * {s} + {s - 1}, {glen} - 1)")
        start = e.let(f"tl.maximum({leader} - {w - 1}, 0)")
        end = e.let(f"tl.minimum({gc} + 1, {glen})")
    else:
        wl, wr = w // 2, w // 2 + (w % 2) - 1
        leader = e.let(f"tl.minimum(_floor_div({gc}, {s}) * {s} + {s // 2}, {glen} - 1)")
        shift = f"tl.where({leader} + {wr} >= {glen}, {glen} - {wr} - {leader} - 1, 0)"
        start = e.let(f"tl.maximum({leader} - {wl}, 0) + {shift}")
        end = e.let(f"{start} + {w}")
    kg = e.let(f"{kc} // {d}")
    return f"((({kc} % {d}) == {group}) & ({kg} >= {start}) & ({kg} < {end}))"


@dataclass(frozen=True)
class Step:
    """One modifier: ("add", expr) or ("softcap", cap); `backward(ds)` gives the
    lines that add d loss / d (its tensor) given ds = d loss / d (its output)."""

    kind: str
    value: str
    backward: object = None


def modifier_steps(mods: tuple[ir.Modifier, ...], e: Emitter) -> list[Step]:
    steps = []
    for m in mods:
        if isinstance(m, ir.Softcap):
            steps.append(Step("softcap", _float(m.cap)))
        elif isinstance(m, ir.Alibi):
            t = e.table("alibi", m, 0)
            dist = f"tl.abs({coord('kpos', m.coord)} - {coord('qpos', m.coord)}).to(tl.float32)"
            backward = None
            if m.tensor is not None:
                g = e.grad("alibi", m, t)

                def backward(ds, g=g, dist=dist):
                    total = f"tl.reduce(tl.reduce({ds} * -{dist}, 1, _add), 0, _add)"
                    return [f"tl.atomic_add({g} + h, {total})"]

            steps.append(Step("add", f"(-tl.load({t} + h) * {dist})", backward))
        elif isinstance(m, ir.Decay):
            total = " + ".join(f"tl.abs({coord('kpos', c)} - {coord('qpos', c)})" for c in m.coords)
            steps.append(Step("add", f"({_float(m.log_gamma)} * ({total}).to(tl.float32))"))
        elif isinstance(m, ir.Bias):
            t = e.table("bias", m, len(m.coords) + 1, len(m.coords))
            index = [f"h * {t}_s0"]
            for axis, c in enumerate(m.coords):
                reach = f"{t}_r{axis}"
                delta = f"tl.minimum(tl.maximum({coord('kpos', c)} - {coord('qpos', c)}, -{reach}), {reach})"
                index.append(f"({delta} + {reach}) * {t}_s{axis + 1}")
            offset = e.let(" + ".join(index))
            g = e.grad("bias", m, t)
            steps.append(
                Step(
                    "add",
                    f"tl.load({t} + {offset}).to(tl.float32)",
                    lambda ds, g=g, offset=offset: [f"tl.atomic_add({g} + {offset}, {ds})"],
                )
            )
        elif isinstance(m, ir.Polyline):
            steps.append(_polyline(m, e))
        else:
            raise TypeError(f"no Triton lowering for modifier {m!r}")
    return steps


def _polyline(m: ir.Polyline, e: Emitter) -> Step:
    """PPMA's path mask from prefix sums: A[b, h, y, x] = cumsum of alpha along x,
    B[b, h, y, x] = cumsum of beta along y (both [batch, heads, h, w], contiguous).
    Its backward adds +ds / -ds at the two ends of each path segment into the
    gradients of A and B; the caller turns those into d alpha, d beta."""
    ta = e.table("prefix_alpha", m, 2)
    tb = e.table("prefix_beta", m, 2)
    ga = e.grad("prefix_alpha", m, ta)
    gb = e.grad("prefix_beta", m, tb)
    yc, xc = m.coords
    y1, x1 = e.let(coord("qpos", yc)), e.let(coord("qpos", xc))
    y2, x2 = e.let(coord("kpos", yc)), e.let(coord("kpos", xc))
    width = _int(xc.size)
    base_a = e.let(f"b * {ta}_s0 + h * {ta}_s1")
    base_b = e.let(f"b * {tb}_s0 + h * {tb}_s1")
    xlo, xhi = e.let(f"tl.minimum({x1}, {x2})"), e.let(f"tl.maximum({x1}, {x2})")
    ylo, yhi = e.let(f"tl.minimum({y1}, {y2})"), e.let(f"tl.maximum({y1}, {y2})")
    row, col = (y1, x2) if m.path == "hv" else (y2, x1)
    ends = [
        (ta, ga, f"{base_a} + {row} * {width} + {xhi}", "+"),
        (ta, ga, f"{base_a} + {row} * {width} + {xlo}", "-"),
        (tb, gb, f"{base_b} + {yhi} * {width} + {col}", "+"),
        (tb, gb, f"{base_b} + {ylo} * {width} + {col}", "-"),
    ]
    terms = [f"{sign} tl.load({t} + {offset})" for t, _, offset, sign in ends]
    value = " ".join(terms)[2:]  # the first term is positive: drop its "+ "

    def backward(ds):
        return [f"tl.atomic_add({g} + {offset}, {'' if sign == '+' else '-'}{ds})" for _, g, offset, sign in ends]

    return Step("add", f"({value})", backward)
