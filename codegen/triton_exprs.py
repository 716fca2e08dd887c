"""Triton source for the definitions of `dsl.semantics`: a printer of expressions.

`qpos` is [BLOCK_M, 1] and `kpos` is [1, BLOCK_N] (int32, absolute positions;
`qpos` is negative for queries that precede the keys).  Compiled Triton's `//`
and `%` round toward zero while the interpreter floors, so the printer uses them
only where the dividend cannot be negative (it tracks every integer's range)
and calls `_floor_div` / `_floor_mod` elsewhere; integer constants compared
with int32 values are clamped to int32.  Values the definitions name (`Named`)
become local variables with those names.  Everything from the spec reaches the
source only as validated integers and floats; tensor arguments get names made
here (T0, T1, ... and G0, G1, ... for gradients).

Tables keep the kernel-argument interface `runtime.triton_backend` fills
(`Table`, `GradTable`); `_address` lays each kind out as that module does.
The backward of a modifier (what `modify_backward` adds into the gradient of
each differentiable table) is derived from its definition: d term / d load
(`dsl.expr.derivative`) at every load, added atomically at the load's address,
or summed over the block first where the address is the same for every pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from maskc.dsl import expr, ir, semantics
from maskc.dsl.errors import MaskTypeError
from maskc.dsl.expr import Const, Expr, Load, Named, Op, Reach, Var

from .plan import MAX_TRITON_CLUSTERS


@dataclass(frozen=True)
class Table:
    """A tensor argument of the generated kernel and what fills it at call time.

    The kernel receives the pointer `name` followed by the integer scalars
    `name_s0 .. name_s{strides-1}` (element strides) and, for bias tables,
    `name_r0 ..` (the table's reach per axis)."""

    name: str
    kind: str  # "random", "ids", "route", "vs_columns", "vs_diagonals", "cluster", "clusters", "alibi", "bias", ...
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


# Names a generated function already uses: its parameters and emit.py's locals.
RESERVED = {"qpos", "kpos", "b", "h", "q_offset", "s", "g", "t", "ds", "tl", "triton"}


@dataclass
class Emitter:
    """The tables and local variables of the functions of one kernel file."""

    tables: list[Table] = field(default_factory=list)
    grads: list[GradTable] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    printed: dict[Expr, str] = field(default_factory=dict)  # named values with their local

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

    def let(self, text: str, hint: str = "v") -> str:
        """Bind `text` to a fresh local named after `hint` (hint, hint_2, ...)."""
        name, n = hint, 1
        while name in RESERVED or name in self.names or (name.startswith(("T", "G")) and name[1:].isdigit()):
            n += 1
            name = f"{hint}_{n}"
        self.names.add(name)
        self.lines.append(f"{name} = {text}")
        return name

    def new_scope(self) -> None:
        """Start the body of another function: no lines, no locals."""
        self.lines, self.names, self.printed = [], set(), {}

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
    names = {f.name for f in fields(node)}
    return replace(node, head=0) if "head" in names else node


# ---------------------------------------------------------------- printing

POSITION_BITS = 30  # positions lie in [-2**30, 2**30) (docs/language.md §6.1)
INT32 = (-(2**31) + 1, 2**31 - 1)
VARIABLES = {"q": "qpos", "k": "kpos", "b": "b", "h": "h", "q_offset": "q_offset"}
RANGES = {
    "q": (-(2**POSITION_BITS), 2**POSITION_BITS - 1),
    "k": (0, 2**POSITION_BITS - 1),
    "b": (0, INT32[1]),
    "h": (0, INT32[1]),
    "q_offset": (-(2**POSITION_BITS), 2**POSITION_BITS),
}

# Python precedence, loosest first: what needs brackets where
_CMP, _OR, _AND, _SUM, _PRODUCT, _UNARY, _ATOM = 1, 2, 3, 5, 6, 7, 9
_COMPARE = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_INFIX = {"add": ("+", _SUM), "sub": ("-", _SUM), "mul": ("*", _PRODUCT), "and": ("&", _AND),
          "bitand": ("&", _AND), "or": ("|", _OR)}  # fmt: skip


def _int(value: int) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    return str(value)


def _float(value: float) -> str:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return repr(value)


class Printer:
    """Triton text for expressions; named values go into `e.lines` as locals."""

    def __init__(self, e: Emitter, variables: dict[str, str] | None = None) -> None:
        self.e = e
        self.variables = VARIABLES if variables is None else variables
        self.ranges: dict[Expr, expr.Interval] = {}
        self.addresses: dict[Load, tuple[str, str]] = {}

    def __call__(self, x: Expr) -> str:
        return self._text(x, 0)

    def lines(self, x: Expr) -> str:
        """`x`, a long `|` of several parts broken into one line per part."""
        parts, stack = [], [x]
        while stack:
            part = stack.pop()
            if isinstance(part, Op) and part.name == "or":
                stack += reversed(part.args)
            else:
                parts.append(part)
        texts = [self._text(p, _OR + 1) for p in parts]
        if len(texts) < 3 or sum(len(t) for t in texts) < 80:
            return " | ".join(texts)
        return "(\n    " + "\n    | ".join(texts) + "\n)"

    def top(self, x: Expr) -> str:
        """`x`, its named values bound first: the query's, then the key's, then the pair's."""
        named = [n for n in expr.nodes([x]) if isinstance(n, Named) and n.value not in self.e.printed]
        for n in sorted(named, key=lambda n: ("k" in (v := expr.free_vars(n))) + ("q" in v and "k" in v)):
            self(n)
        return self.lines(x)

    def range(self, x: Expr) -> expr.Interval:
        if x not in self.ranges:
            self.ranges.update(expr.ranges([x], RANGES))
        return self.ranges[x]

    def _text(self, x: Expr, tightest: int) -> str:
        text, level = self._print(x)
        return f"({text})" if level < tightest else text

    def _print(self, x: Expr) -> tuple[str, int]:
        if isinstance(x, Var):
            return self.variables.get(x.name, x.name), _ATOM
        if isinstance(x, Const):
            return self._const(x.value)
        if isinstance(x, Named):
            if x.value not in self.e.printed:  # one local per value, named by its first hint
                self.e.printed[x.value] = self.e.let(self(x.value), x.hint)
            return self.e.printed[x.value], _ATOM
        if isinstance(x, Load):
            return self._load(x)
        if isinstance(x, Reach):
            name = self._table(x.table)
            return f"{name}_r{x.axis - 1}", _ATOM
        return self._op(x)

    def _const(self, value) -> tuple[str, int]:
        if isinstance(value, bool):  # a block-shaped boolean (only a whole predicate is constant)
            return ("qpos == qpos" if value else "qpos != qpos"), _CMP
        text = _float(value) if isinstance(value, float) else _int(value)
        return text, (_UNARY if text.startswith("-") else _ATOM)

    def _op(self, x: Op) -> tuple[str, int]:
        name, args = x.name, x.args
        if name in _COMPARE:
            a, b = (self._clamped(a, b) for a, b in ((args[0], args[1]), (args[1], args[0])))
            return f"{self._text(a, _CMP + 1)} {_COMPARE[name]} {self._text(b, _CMP + 1)}", _CMP
        if name in _INFIX:
            symbol, level = _INFIX[name]
            right = level if name in ("and", "or", "bitand") else level + 1  # a & (b & c) is a & b & c
            return f"{self._text(args[0], level)} {symbol} {self._text(args[1], right)}", level
        if name in ("floordiv", "floormod"):
            lo, hi = self.range(args[1])
            if not lo == hi > 0:
                raise ValueError(f"a divisor must be a positive constant, got {args[1]!r}")
            if self.range(args[0])[0] >= 0:
                symbol = "//" if name == "floordiv" else "%"
                return f"{self._text(args[0], _PRODUCT)} {symbol} {self._text(args[1], _UNARY)}", _PRODUCT
            return f"_floor_{name[5:]}({self(args[0])}, {self(args[1])})", _ATOM
        if name == "neg":
            return f"-{self._text(args[0], _UNARY)}", _UNARY
        if name == "not":
            return f"{self._text(args[0], _CMP + 1)} == 0", _CMP
        if name == "float":
            return f"{self._text(args[0], _ATOM)}.to(tl.float32)", _ATOM
        functions = {"abs": "tl.abs", "min": "tl.minimum", "max": "tl.maximum", "where": "tl.where"}
        if name in functions:
            return f"{functions[name]}({', '.join(self(a) for a in args)})", _ATOM
        raise TypeError(f"no Triton text for {name!r}")

    def _clamped(self, x: Expr, other: Expr) -> Expr:
        """An integer constant compared with an int32 value, brought into int32."""
        if isinstance(x, Const) and type(x.value) is int and not INT32[0] <= x.value <= INT32[1]:
            lo, hi = self.range(other)
            if INT32[0] < lo and hi < INT32[1]:
                return Const(min(max(x.value, INT32[0]), INT32[1]))
        return x

    # ------------------------------------------------------------ tables

    def _table(self, t: expr.TableRef) -> str:
        n = t.node
        strides = {
            "random": 2,
            "ids": 1,
            "route": 2,
            "vs_columns": 1,
            "vs_diagonals": 1,
            "cluster": 2,
            "alibi": 0,
            "prefix_alpha": 2,
            "prefix_beta": 2,
        }
        if t.kind == "bias":
            return self.e.table("bias", n, len(n.coords) + 1, len(n.coords))
        if t.kind == "cluster" and n.clusters > MAX_TRITON_CLUSTERS:
            raise MaskTypeError(f"the Triton backend handles at most {MAX_TRITON_CLUSTERS} clusters, got {n.clusters}")
        return self.e.table(t.kind, n, strides[t.kind])

    def address(self, load: Load) -> tuple[str, str]:
        """(the table's name, the element offset of `load` in it)."""
        if load not in self.addresses:
            name = self._table(load.table)
            offset = self(_address(load, name))
            if load.table.grad and not offset.isidentifier():  # the backward adds at the same offset
                offset = self.e.let(offset, _OFFSET_HINTS.get(load.table.kind, "at"))
            self.addresses[load] = name, offset
        return self.addresses[load]

    def _load(self, load: Load) -> tuple[str, int]:
        name, offset = self.address(load)
        pointer = f"{name} + {offset}"
        if load.guard is None:
            text = f"tl.load({pointer})"
        else:
            text = f"tl.load({pointer}, mask={self(load.guard)}, other=0)"
        if load.table.dtype == "bool":
            return f"{text} != 0", _CMP
        return text, _ATOM


_OFFSET_HINTS = {"bias": "bias_at", "prefix_alpha": "alpha_at", "prefix_beta": "beta_at"}


def _address(load: Load, name: str) -> Expr:
    """The offset of `load`'s element, as `runtime.triton_backend` lays out its table
    (`name_s{i}` are the table's scalar arguments)."""
    t, index = load.table, load.index

    def scalar(i: int) -> Var:
        return Var(f"{name}_s{i}")

    if t.kind == "random":  # [rows from the first query block s1 on, draws]
        row, j = index
        return expr.named("draws_at", (row - scalar(1)) * scalar(0)) + j
    if t.kind == "ids":  # [batch (stride 0: one row for all), n]
        batch, i = index
        return batch * scalar(0) + i
    if t.kind == "route":  # [batch, regions, regions]
        batch, rq, rk = index
        return batch * scalar(0) + rq * scalar(1) + rk
    if t.kind in ("vs_columns", "vs_diagonals"):  # [batch (stride 0: one row for all), n]
        batch, i = index
        return batch * scalar(0) + i
    if t.kind == "cluster":  # [batch, queries then keys, one word of bits]
        batch, word, i = index
        if word != Const(0):
            raise MaskTypeError(f"the Triton backend handles at most {MAX_TRITON_CLUSTERS} clusters")
        return batch * scalar(0) + (scalar(1) if t.part == "k" else Const(0)) + i
    if t.kind == "alibi":  # [heads]
        return index[0]
    if t.kind == "bias":  # [heads or 1 (stride 0), 2r + 1 per axis]
        offset: Expr = Const(0)
        for axis, i in enumerate(index):
            offset = offset + i * scalar(axis)
        return offset
    if t.kind in ("prefix_alpha", "prefix_beta"):  # [batch, heads, y, x]: contiguous rows
        batch, head, y, x = index
        width = t.node.coords[1].size
        return batch * scalar(0) + head * scalar(1) + y * width + x
    raise TypeError(f"no Triton layout for tables of kind {t.kind!r}")


# ---------------------------------------------------------------- masks


def predicate(node: ir.Mask, e: Emitter) -> str:
    """A boolean Triton expression for `node` (broadcast [BLOCK_M, BLOCK_N])."""
    return Printer(e).top(semantics.mask_expr(node))


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
    cq = e.let(f"qpos // {t}_s3", "cluster_q")
    ck = e.let(f"kpos // {t}_s3", "cluster_k")
    base = e.let(f"{t} + b * {t}_s0 + h * {t}_s1", "rows")
    tq = e.let(f"tl.load({base} + qpos)", "true_q")
    tk = e.let(f"tl.load({base} + {t}_s2 + kpos)", "true_k")
    bits_q = e.let(f"tl.load({base} + 2 * {t}_s2 + qpos)", "bits_q")
    bits_k = e.let(f"tl.load({base} + 3 * {t}_s2 + kpos)", "bits_k")
    earlier = e.let(f"(tl.full([1, 1], 1, tl.int64) << {cq}.to(tl.int64)) - 1", "earlier")
    ok = e.let(f"({cq} == {ck}) & ({tq} >= 0) & ({tk} >= 0) & (({bits_q} & {bits_k} & {earlier}) == 0)", "same_cluster")
    if rest is None:
        return ok
    e.lines += [f"qpos = {tq} + {t}_s4", f"kpos = {tk}"]
    return f"{ok} & ({predicate(rest, e)})"


# ---------------------------------------------------------------- modifiers


@dataclass(frozen=True)
class Step:
    """One modifier: ("add", expr) or ("softcap", cap); `backward(ds)` gives the
    lines that add d loss / d (its tensor) given ds = d loss / d (its output)."""

    kind: str
    value: str
    backward: object = None


def modifier_steps(mods: tuple[ir.Modifier, ...], e: Emitter) -> list[Step]:
    steps = []
    printer = Printer(e)
    for m in mods:
        kind, term = semantics.modifier_term(m)
        if kind == "softcap":
            steps.append(Step("softcap", _float(term)))
            continue
        printer.top(term)
        value = printer._text(term, _SUM + 1)  # added to the logit as a whole
        steps.append(Step("add", value, _backward(term, printer)))
    return steps


def _backward(term: Expr, printer: Printer):
    """The lines adding d loss / d table for every differentiable table `term` reads:
    ds times d term / d load at each load's address, summed over the block first
    where the address is the same for every pair.  None when nothing is differentiable."""
    loads = [n for n in expr.nodes([term]) if isinstance(n, Load) and n.table.grad]
    if not loads:
        return None
    e = printer.e
    targets = []
    for load in loads:
        name, offset = printer.address(load)  # already printed by the forward: the same local
        grad = e.grad(load.table.kind, load.table.node, name)
        slope = expr.derivative(term, load)
        uniform = not expr.free_vars(load) & {"q", "k"}
        targets.append((grad, offset, slope, uniform))

    def backward(ds: str) -> list[str]:
        lines = []
        for grad, offset, slope, uniform in targets:
            if slope == Const(1.0):
                value = ds
            elif slope == Const(-1.0):
                value = f"-{ds}"
            else:
                value = f"{ds} * {printer._text(slope, _PRODUCT + 1)}"
            if uniform:  # one address for the whole block: sum first, one atomic add
                value = f"tl.reduce(tl.reduce({value}, 1, _add), 0, _add)"
            lines.append(f"tl.atomic_add({grad} + {offset}, {value})")
        return lines

    return backward
