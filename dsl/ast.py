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


@dataclass(frozen=True)
class BinOp:
    """Integer arithmetic (`+ - * // %`) or a comparison (`== != < <= > >=`)."""

    op: str
    left: Value
    right: Value
    span: Span = _span()


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


@dataclass(frozen=True)
class SetOp:
    """`left op right` with op in `|`, `&`, `-`."""

    op: str
    left: Expr
    right: Expr
    span: Span = _span()


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


def children(node: object) -> tuple[object, ...]:
    """The child nodes of any AST node (values, args, patterns, definitions)."""
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
