"""The typed syntax tree of the pattern language.

Nodes are frozen dataclasses; their `span` is excluded from equality so that a
printed-and-reparsed tree compares equal to the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Span

NO_SPAN = Span(0, 0, 0, 0)


def _span() -> Span:
    return field(default=NO_SPAN, compare=False, repr=False)


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class IntLit:
    value: int
    span: Span = _span()


@dataclass(frozen=True)
class FloatLit:
    value: float
    span: Span = _span()


@dataclass(frozen=True)
class BoolLit:
    value: bool
    span: Span = _span()


@dataclass(frozen=True)
class StrLit:
    value: str
    span: Span = _span()


@dataclass(frozen=True)
class Name:
    id: str
    span: Span = _span()


@dataclass(frozen=True)
class Negate:
    operand: Value
    span: Span = _span()


# Binary operators by level: a chain reads left to right within one level.
_SUM_OPS = frozenset({"+", "-"})
_PRODUCT_OPS = frozenset({"*", "//", "%"})
COMPARE_OPS = frozenset({"==", "!=", "<", "<=", ">", ">="})


def _level(op: str) -> frozenset[str]:
    for level in (_SUM_OPS, _PRODUCT_OPS, COMPARE_OPS):
        if op in level:
            return level
    raise ValueError(f"not a binary operator: {op!r}")


@dataclass(frozen=True, init=False)
class BinOp:
    """Integer arithmetic (`a + b - c`, `a * b // c`) or a comparison (`a < b`).

    A chain of one level is one node, `operands[0] ops[0] operands[1] ops[1] ...`
    read left to right, so that a long sum needs no deep tree (nor deep
    recursion to check, evaluate or print it).  `BinOp(op, left, right)` builds
    one link; a left operand of the same level continues its chain, which is
    what left associativity means.  A comparison has exactly two operands.
    """

    ops: tuple[str, ...]
    operands: tuple[Value, ...]
    span: Span = _span()

    def __init__(self, op: str | tuple[str, ...], *operands: Value, span: Span = NO_SPAN) -> None:
        ops = (op,) * (len(operands) - 1) if isinstance(op, str) else tuple(op)
        if len(ops) != len(operands) - 1 or not ops:
            raise ValueError(f"BinOp needs one operator fewer than its {len(operands)} operands")
        level = _level(ops[0])
        if any(_level(o) is not level for o in ops) or (level is COMPARE_OPS and len(ops) > 1):
            raise ValueError(f"operators {ops} do not form one left-to-right chain")
        first = operands[0]
        if level is not COMPARE_OPS and isinstance(first, BinOp) and _level(first.ops[0]) is level:
            ops, operands = first.ops + ops, first.operands + operands[1:]
        object.__setattr__(self, "ops", ops)
        object.__setattr__(self, "operands", tuple(operands))
        object.__setattr__(self, "span", span)

    @property
    def op(self) -> str:
        """The last operator: the chain is `left op right`."""
        return self.ops[-1]

    @property
    def left(self) -> Value:
        return self.operands[0] if len(self.operands) == 2 else BinOp(self.ops[:-1], *self.operands[:-1])

    @property
    def right(self) -> Value:
        return self.operands[-1]


@dataclass(frozen=True)
class Func:
    """A built-in integer function: `min`, `max`, `abs`."""

    name: str
    args: tuple[Value, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Tuple:
    items: tuple[Value, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Range:
    """`a .. b`: the half-open interval [a, b)."""

    start: Value
    stop: Value
    span: Span = _span()


@dataclass(frozen=True)
class ModEq:
    """`% m == r`: positions p with p mod m = r."""

    modulus: Value
    residue: Value
    span: Span = _span()


@dataclass(frozen=True)
class ModIn:
    """`% m in a .. b`: positions p with a <= p mod m < b."""

    modulus: Value
    start: Value
    stop: Value
    span: Span = _span()


Value = IntLit | FloatLit | BoolLit | StrLit | Name | Negate | BinOp | Func | Tuple | Range | ModEq | ModIn


@dataclass(frozen=True)
class Arg:
    """A call argument; `name` is None for a positional one."""

    name: str | None
    value: Value
    span: Span = _span()


# ---------------------------------------------------------------- patterns


@dataclass(frozen=True)
class Call:
    """An atom, a modifier or a call of a named pattern (`causal`, `window(3)`)."""

    name: str
    args: tuple[Arg, ...] = ()
    span: Span = _span()


@dataclass(frozen=True, init=False)
class SetOp:
    """`a op b op c ...` with op one of `|`, `&`, `-`, read left to right.

    A chain is one node (`a | b | ... | z` may have tens of thousands of terms,
    and no walk over it should recurse per term).  `SetOp(op, left, right)`
    builds one link; a left operand with the same operator continues its chain,
    as left associativity reads it (`(a - b) - c` is `a - b - c`).
    """

    op: str
    operands: tuple[Expr, ...]
    span: Span = _span()

    def __init__(self, op: str, *operands: Expr, span: Span = NO_SPAN) -> None:
        if op not in ("|", "&", "-") or len(operands) < 2:
            raise ValueError(f"SetOp needs an operator of | & - and two or more operands, got {op!r}")
        first = operands[0]
        if isinstance(first, SetOp) and first.op == op:
            operands = first.operands + operands[1:]
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "operands", tuple(operands))
        object.__setattr__(self, "span", span)

    @property
    def left(self) -> Expr:
        return self.operands[0] if len(self.operands) == 2 else SetOp(self.op, *self.operands[:-1])

    @property
    def right(self) -> Expr:
        return self.operands[-1]


@dataclass(frozen=True)
class Complement:
    operand: Expr
    span: Span = _span()


@dataclass(frozen=True)
class OnBlocks:
    """`on blocks(b) e`: e evaluated on block indices floor(i / b)."""

    size: Value
    body: Expr
    span: Span = _span()


@dataclass(frozen=True)
class OnGrid:
    """`on grid(s1, ..., sn) e`: e evaluated on row-major grid coordinates."""

    sizes: tuple[Value, ...]
    body: Expr
    span: Span = _span()


@dataclass(frozen=True)
class HeadCase:
    start: Value
    stop: Value
    body: Expr
    span: Span = _span()


@dataclass(frozen=True)
class PerHead:
    """`heads { a .. b: e; ... }`: heads in [a, b) use e."""

    cases: tuple[HeadCase, ...]
    span: Span = _span()


Expr = Call | SetOp | Complement | OnBlocks | OnGrid | PerHead


# ---------------------------------------------------------------- definitions


@dataclass(frozen=True)
class Body:
    """A pattern expression with its modifiers and optional grid."""

    expr: Expr
    modifiers: tuple[Call, ...] = ()
    grid: tuple[Value, ...] | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Param:
    name: str
    type: str | None = None
    default: Value | None = None
    span: Span = _span()


@dataclass(frozen=True)
class PatternDef:
    name: str
    params: tuple[Param, ...]
    body: Body
    span: Span = _span()


@dataclass(frozen=True)
class Module:
    """A whole spec: named definitions and at most one bare expression."""

    defs: tuple[PatternDef, ...] = ()
    main: Body | None = None
    span: Span = _span()


# Where each node class keeps its child nodes: (field, holds a tuple of them).
# Walks over a large spec visit every node, so this is looked up, not derived.
_CHILD_FIELDS: dict[type, tuple[tuple[str, bool], ...]] = {
    IntLit: (),
    FloatLit: (),
    BoolLit: (),
    StrLit: (),
    Name: (),
    Negate: (("operand", False),),
    BinOp: (("operands", True),),
    Func: (("args", True),),
    Tuple: (("items", True),),
    Range: (("start", False), ("stop", False)),
    ModEq: (("modulus", False), ("residue", False)),
    ModIn: (("modulus", False), ("start", False), ("stop", False)),
    Arg: (("value", False),),
    Call: (("args", True),),
    SetOp: (("operands", True),),
    Complement: (("operand", False),),
    OnBlocks: (("size", False), ("body", False)),
    OnGrid: (("sizes", True), ("body", False)),
    HeadCase: (("start", False), ("stop", False), ("body", False)),
    PerHead: (("cases", True),),
    Body: (("expr", False), ("modifiers", True), ("grid", True)),
    Param: (("default", False),),
    PatternDef: (("params", True), ("body", False)),
    Module: (("defs", True), ("main", False)),
}


def children(node: object) -> tuple[object, ...]:
    """The child nodes of any AST node (values, args, patterns, definitions)."""
    fields = _CHILD_FIELDS.get(type(node))
    if fields is None:  # not a node of this module: its dataclass fields that are nodes
        return _dataclass_children(node)
    out: list[object] = []
    for name, many in fields:
        value = getattr(node, name)
        if value is None:
            continue
        if many:
            out.extend(value)
        else:
            out.append(value)
    return tuple(out)


def _dataclass_children(node: object) -> tuple[object, ...]:
    out: list[object] = []
    for name in getattr(node, "__dataclass_fields__", ()):
        if name == "span":
            continue
        value = getattr(node, name)
        if isinstance(value, tuple):
            out.extend(v for v in value if hasattr(v, "__dataclass_fields__"))
        elif hasattr(value, "__dataclass_fields__"):
            out.append(value)
    return tuple(out)


def depth(node: object) -> int:
    """Nesting depth, computed without recursion so that any input is safe."""
    deepest = 0
    stack = [(node, 1)]
    while stack:
        current, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children(current))
    return deepest
