"""Typed evaluation of value expressions (integers, booleans, tuples, sets).

One evaluator serves compile time and call time: names not yet known (grid
sizes, `head`, `lq` at compile time) evaluate to `Unknown`, which carries its
type so type errors are still found, and checks that need the number wait for
call time.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import ast
from .errors import MaskTypeError, Span

INT_LIMIT = 2**62
# Token positions (q_offset + query index, key index) lie in [-POSITION_LIMIT, POSITION_LIMIT).
# Kernels compute positions in int32, and with positions this small every backend
# is exact for any constant the language accepts (differences of positions stay
# within int32; constants beyond them are clamped without changing any comparison).
POSITION_LIMIT = 2**30


@dataclass(frozen=True)
class Unknown:
    """A value known only by its type until call time."""

    type: str  # "int", "bool", "float"


@dataclass(frozen=True)
class TensorRef:
    """A runtime tensor, passed by name at call time."""

    name: str


@dataclass(frozen=True)
class RangeVal:
    start: object
    stop: object


@dataclass(frozen=True)
class ModSetVal:
    """Positions p with lo <= p mod modulus < hi."""

    modulus: object
    lo: object
    hi: object


INT, BOOL = Unknown("int"), Unknown("bool")


def type_name(value: object) -> str:
    if isinstance(value, Unknown):
        return value.type
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, TensorRef):
        return "tensor"
    if isinstance(value, tuple):
        return "tuple"
    if isinstance(value, RangeVal):
        return "range"
    if isinstance(value, ModSetVal):
        return "position set"
    return type(value).__name__


def is_int(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or value == INT


def is_bool(value: object) -> bool:
    return isinstance(value, bool) or value == BOOL


def is_number(value: object) -> bool:
    return is_int(value) or isinstance(value, float) or value == Unknown("float")


def known(*values: object) -> bool:
    # Not any(...) over a generator: this runs for every argument of every call.
    return not [v for v in values if isinstance(v, Unknown)]


class Env:
    """Names visible while evaluating one definition's values."""

    def __init__(self, names: dict[str, object]) -> None:
        self.names = names

    def lookup(self, node: ast.Name) -> object:
        try:
            return self.names[node.id]
        except KeyError:
            raise MaskTypeError(f"unknown name '{node.id}'", node.span) from None


# name -> (function, smallest and largest argument count)
_BUILTIN_FUNCS = {
    "min": (min, 2, None),
    "max": (max, 2, None),
    "abs": (abs, 1, 1),
    "bit_length": (lambda x: abs(x).bit_length(), 1, 1),  # bits of |x|: 0 -> 0, 5 -> 3
    "pow": (lambda a, b: a**b, 2, 2),  # exponent 0 .. 62
}


def evaluate(node: object, env: Env) -> object:
    """Evaluate a value expression; raise `MaskTypeError` at the offending span."""
    if isinstance(node, ast.IntLit):
        return _checked(node.value, node.span)
    if isinstance(node, ast.FloatLit):
        return node.value
    if isinstance(node, (ast.BoolLit, ast.StrLit)):
        return node.value
    if isinstance(node, ast.Name):
        return env.lookup(node)
    if isinstance(node, ast.Negate):
        operand = evaluate(node.operand, env)
        if isinstance(operand, float):
            return -operand
        _expect_int(operand, node.operand, "'-'")
        return -operand if known(operand) else INT
    if isinstance(node, ast.BinOp):
        return _binop(node, env)
    if isinstance(node, ast.Func):
        return _func(node, env)
    if isinstance(node, ast.Tuple):
        return tuple(evaluate(item, env) for item in node.items)
    if isinstance(node, ast.Range):
        start, stop = evaluate(node.start, env), evaluate(node.stop, env)
        _expect_int(start, node.start, "a range")
        _expect_int(stop, node.stop, "a range")
        return RangeVal(start, stop)
    if isinstance(node, ast.ModEq):
        modulus, residue = evaluate(node.modulus, env), evaluate(node.residue, env)
        _expect_int(modulus, node.modulus, "'%'")
        _expect_int(residue, node.residue, "'=='")
        _expect_positive(modulus, node.modulus, "a modulus")
        return ModSetVal(modulus, residue, residue + 1 if known(residue) else INT)
    if isinstance(node, ast.ModIn):
        values = [evaluate(v, env) for v in (node.modulus, node.start, node.stop)]
        for value, sub in zip(values, (node.modulus, node.start, node.stop), strict=True):
            _expect_int(value, sub, "'% m in a .. b'")
        _expect_positive(values[0], node.modulus, "a modulus")
        return ModSetVal(*values)
    raise MaskTypeError(f"expected a value, found {type(node).__name__}", getattr(node, "span", None))


def _checked(value: int, span: Span) -> int:
    if abs(value) > INT_LIMIT:
        raise MaskTypeError(f"the number {value} is too large (limit ±2**62)", span)
    return value


def _expect_int(value: object, node: object, where: str) -> None:
    if not is_int(value):
        raise MaskTypeError(f"{where} needs an integer, got {type_name(value)}", node.span)


def _expect_positive(value: object, node: object, what: str) -> None:
    if known(value) and value <= 0:
        raise MaskTypeError(f"{what} must be positive, got {value}", node.span)


_COMPARE = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _binop(node: ast.BinOp, env: Env) -> object:
    if node.op in _COMPARE:
        left, right = (evaluate(x, env) for x in node.operands)
        same_kind = (is_int(left) and is_int(right)) or (is_bool(left) and is_bool(right))
        if not same_kind:
            raise MaskTypeError(
                f"cannot compare {type_name(left)} with {type_name(right)}",
                node.span,
            )
        if not known(left, right):
            return BOOL
        return _COMPARE[node.op](left, right)
    # A chain, left to right, in a loop (a sum may have thousands of terms).
    first = node.operands[0]
    result = evaluate(first, env)
    for op, operand in zip(node.ops, node.operands[1:], strict=True):
        right = evaluate(operand, env)
        _expect_int(result, first, f"'{op}'")
        _expect_int(right, operand, f"'{op}'")
        if op in ("//", "%") and known(right) and right == 0:
            raise MaskTypeError(f"division by zero in '{op}'", operand.span)
        if not known(result, right):
            result = INT
            continue
        span = Span(first.span.line, first.span.column, operand.span.end_line, operand.span.end_column)
        result = _checked(_ARITH[op](result, right), span)
    return result


_ARITH = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
}


def _func(node: ast.Func, env: Env) -> object:
    entry = _BUILTIN_FUNCS.get(node.name)
    if entry is None:
        raise MaskTypeError(
            f"unknown function '{node.name}' (integer functions: {', '.join(_BUILTIN_FUNCS)})",
            node.span,
        )
    fn, least, most = entry
    args = [evaluate(a, env) for a in node.args]
    for arg, sub in zip(args, node.args, strict=True):
        _expect_int(arg, sub, f"{node.name}()")
    if len(args) < least or (most is not None and len(args) > most):
        count = str(least) if least == most else f"at least {least}"
        raise MaskTypeError(
            f"{node.name}() takes {count} argument{'s' if least != 1 else ''}, got {len(args)}", node.span
        )
    if not known(*args):
        return INT
    if node.name == "pow" and not 0 <= args[1] <= 62:
        raise MaskTypeError(f"pow() needs an exponent in 0 .. 62, got {args[1]}", node.args[1].span)
    return _checked(fn(*args), node.span)
