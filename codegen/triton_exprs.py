"""Normal forms -> Triton expressions over absolute positions.

`qpos` is [BLOCK_M, 1] and `kpos` is [1, BLOCK_N] (int32, absolute positions,
never negative).  Integer `//` and `%` are applied only to non-negative
operands, because compiled Triton rounds toward zero while the interpreter
floors; differences k - q are reduced with ((d % m) + m) % m.  Everything from
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
    kind: str  # "random", "ids", "route", "cluster", "alibi", "bias", "prefix_alpha", "prefix_beta"
    node: object  # the ir node it serves (head-specific data comes from the group)
    strides: int
    reaches: int = 0

    def scalar_args(self) -> list[str]:
        return [f"{self.name}_s{i}" for i in range(self.strides)] + [f"{self.name}_r{i}" for i in range(self.reaches)]


@dataclass
class Emitter:
    tables: list[Table] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    counter: int = 0

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
        return out


def _same_data(a: object, b: object) -> bool:
    """Two nodes whose tables hold the same data (head-specific parts aside)."""
    return type(a) is type(b) and _strip_head(a) == _strip_head(b)


def _strip_head(node: object) -> object:
    from dataclasses import fields, replace

    names = {f.name for f in fields(node)}
    return replace(node, head=0) if "head" in names else node


def coord(pos: str, c: ir.Coord) -> str:
    text = pos if c.mod is None else f"({pos} % {c.mod})"
    return text if c.div == 1 else f"({text} // {c.div})"


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
            c = f"({c} % {_int(node.modulus)})"
        lo = max(node.lo, -(2**31) + 1)
        hi = min(node.hi, 2**31 - 1)
        return f"(({c} >= {_int(lo)}) & ({c} < {_int(hi)}))"
    if isinstance(node, ir.Neighborhood):
        return _neighborhood(node, e)
    if isinstance(node, ir.RandomBlocks):
        t = e.table("random", node, 1)
        qb = e.let(coord("qpos", node.coord))
        kb = e.let(coord("kpos", node.coord))
        hits = [f"(tl.load({t} + {qb} * {t}_s0 + {j}) == {kb})" for j in range(min(node.count, node.hi - node.lo))]
        return "(" + " | ".join(hits) + ")" if hits else "(qpos < 0)"
    if isinstance(node, ir.Segments):
        t = e.table("ids", node, 1)
        qc, kc = coord("qpos", node.coord), coord("kpos", node.coord)
        return f"(tl.load({t} + b * {t}_s0 + {qc}) == tl.load({t} + b * {t}_s0 + {kc}))"
    if isinstance(node, ir.Route):
        t = e.table("route", node, 2)
        rq = e.let(_region("qpos", node.regions))
        rk = e.let(_region("kpos", node.regions))
        return f"(tl.load({t} + b * {t}_s0 + {rq} * {t}_s1 + {rk}) != 0)"
    if isinstance(node, ir.Cluster):
        t = e.table("cluster", node, 2)
        # T[b, q, k] would be L^2; instead a cluster bitmask per token: [b, 2, len] int64 (queries, keys).
        bits_q = f"tl.load({t} + b * {t}_s0 + (qpos - q_offset))"
        bits_k = f"tl.load({t} + b * {t}_s0 + {t}_s1 + kpos)"
        return f"(({bits_q} & {bits_k}) != 0)"
    raise TypeError(f"no Triton lowering for {node!r}")


def _region(pos: str, regions: tuple[ir.Coord, ...]) -> str:
    out = "0"
    for c in regions:
        out = f"({out} * {_int(c.size)} + {coord(pos, c)})"
    return out


def _neighborhood(node: ir.Neighborhood, e: Emitter) -> str:
    d, w, s, length = node.dilation, node.window, node.stride, node.coord.size
    qc = e.let(coord("qpos", node.coord))
    kc = e.let(coord("kpos", node.coord))
    group = e.let(f"{qc} % {d}")
    gc = e.let(f"{qc} // {d}")
    glen = e.let(f"({length} - {group} + {d - 1}) // {d}")
    if node.causal:
        leader = e.let(f"tl.minimum(({gc} // {s}) * {s} + {s - 1}, {glen} - 1)")
        start = e.let(f"tl.maximum({leader} - {w - 1}, 0)")
        end = e.let(f"tl.minimum({gc} + 1, {glen})")
    else:
        wl, wr = w // 2, w // 2 + (w % 2) - 1
        leader = e.let(f"tl.minimum(({gc} // {s}) * {s} + {s // 2}, {glen} - 1)")
        shift = f"tl.where({leader} + {wr} >= {glen}, {glen} - {wr} - {leader} - 1, 0)"
        start = e.let(f"tl.maximum({leader} - {wl}, 0) + {shift}")
        end = e.let(f"{start} + {w}")
    kg = e.let(f"{kc} // {d}")
    return f"((({kc} % {d}) == {group}) & ({kg} >= {start}) & ({kg} < {end}))"


def modifier_steps(mods: tuple[ir.Modifier, ...], e: Emitter) -> list[tuple[str, str]]:
    """Each modifier as ("add", expr) or ("softcap", cap) in order."""
    steps = []
    for m in mods:
        if isinstance(m, ir.Softcap):
            steps.append(("softcap", _float(m.cap)))
        elif isinstance(m, ir.Alibi):
            t = e.table("alibi", m, 0)
            dist = f"tl.abs({coord('kpos', m.coord)} - {coord('qpos', m.coord)})"
            steps.append(("add", f"(-tl.load({t} + h) * {dist}.to(tl.float32))"))
        elif isinstance(m, ir.Decay):
            total = " + ".join(f"tl.abs({coord('kpos', c)} - {coord('qpos', c)})" for c in m.coords)
            steps.append(("add", f"({_float(m.log_gamma)} * ({total}).to(tl.float32))"))
        elif isinstance(m, ir.Bias):
            t = e.table("bias", m, len(m.coords) + 1, len(m.coords))
            index = [f"h * {t}_s0"]
            for axis, c in enumerate(m.coords):
                reach = f"{t}_r{axis}"
                delta = f"tl.minimum(tl.maximum({coord('kpos', c)} - {coord('qpos', c)}, -{reach}), {reach})"
                index.append(f"({delta} + {reach}) * {t}_s{axis + 1}")
            steps.append(("add", f"tl.load({t} + {' + '.join(index)}).to(tl.float32)"))
        elif isinstance(m, ir.Polyline):
            steps.append(("add", _polyline(m, e)))
        else:
            raise TypeError(f"no Triton lowering for modifier {m!r}")
    return steps


def _polyline(m: ir.Polyline, e: Emitter) -> str:
    """PPMA's path mask from prefix sums: A[b, h, y, x] = cumsum of alpha along x,
    B[b, h, y, x] = cumsum of beta along y (both [batch, heads, h, w], contiguous)."""
    ta = e.table("prefix_alpha", m, 2)
    tb = e.table("prefix_beta", m, 2)
    yc, xc = m.coords
    y1, x1 = e.let(coord("qpos", yc)), e.let(coord("qpos", xc))
    y2, x2 = e.let(coord("kpos", yc)), e.let(coord("kpos", xc))
    width = _int(xc.size)
    base_a = f"b * {ta}_s0 + h * {ta}_s1"
    base_b = f"b * {tb}_s0 + h * {tb}_s1"
    xlo, xhi = f"tl.minimum({x1}, {x2})", f"tl.maximum({x1}, {x2})"
    ylo, yhi = f"tl.minimum({y1}, {y2})", f"tl.maximum({y1}, {y2})"
    if m.path == "hv":
        row, col = y1, x2
    else:
        row, col = y2, x1
    horizontal = (
        f"(tl.load({ta} + {base_a} + {row} * {width} + {xhi}) - tl.load({ta} + {base_a} + {row} * {width} + {xlo}))"
    )
    vertical = (
        f"(tl.load({tb} + {base_b} + {yhi} * {width} + {col}) - tl.load({tb} + {base_b} + {ylo} * {width} + {col}))"
    )
    return f"({horizontal} + {vertical})"
