"""Spec text -> `ast.Module`, with source spans and caret errors."""

from __future__ import annotations

import functools
import math
from importlib import resources

import lark
from lark import Token, Transformer, v_args

from . import ast
from .errors import MaskSyntaxError, Span

# Friendly names for the grammar's terminals in "expected ..." messages.
_TERMINAL_NAMES = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "STRING": "a string",
    "TYPE": "a type (int, bool, float, tensor)",
    "LPAR": "'('",
    "RPAR": "')'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "COMMA": "','",
    "SEMICOLON": "';'",
    "COLON": "':'",
    "EQUAL": "'='",
    "VBAR": "'|'",
    "AMPERSAND": "'&'",
    "MINUS": "'-'",
    "TILDE": "'~'",
    "_ON_BLOCKS": "'on'",
    "PERCENT": "'%'",
    "COMPARE": "a comparison",
    "ADD_OP": "'+' or '-'",
    "MUL_OP": "'*', '//' or '%'",
    "$END": "the end of the spec",
}

MAX_SPEC_CHARS = 1_000_000
MAX_DEPTH = 200
_START = Span(1, 1, 1, 2)


@functools.cache
def _lark() -> lark.Lark:
    grammar = resources.files(__package__).joinpath("grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _span_of(meta_or_token) -> Span:
    if getattr(meta_or_token, "empty", False):
        return ast.NO_SPAN
    return Span(
        meta_or_token.line,
        meta_or_token.column,
        meta_or_token.end_line,
        meta_or_token.end_column,
    )


# Longer literals could not even be converted (Python limits int() to 4300
# digits); any literal past 19 digits is rejected later as too large anyway.
MAX_INT_DIGITS = 1000


def _parse_int(token: Token) -> int:
    digits = str(token).lstrip("0") or "0"
    if len(digits) > MAX_INT_DIGITS:
        raise _PositionedError(f"the number has {len(digits)} digits; it is too large", _span_of(token))
    return int(digits)


def _parse_float(token: Token) -> float:
    value = float(str(token))
    if not math.isfinite(value):
        raise _PositionedError(f"the number {str(token)[:40]} is too large for a float", _span_of(token))
    return value


@v_args(meta=True)
class _ToAst(Transformer):
    """Builds `ast` nodes bottom-up from lark's parse tree."""

    # ------------------------------------------------------------ module
    def start(self, meta, children):
        defs = tuple(c for c in children if isinstance(c, ast.PatternDef))
        bodies = [c for c in children if isinstance(c, ast.Body)]
        return ast.Module(defs, bodies[0] if bodies else None, _span_of(meta))

    def pattern_def(self, meta, children):
        name, *params, grid, body = children
        params = tuple(p for p in params if p is not None)
        if grid is not None:
            if body.grid is not None:
                first, last = body.grid[0].span, body.grid[-1].span
                raise _PositionedError(
                    "a pattern takes one grid: in its header or after its body, not both",
                    Span(first.line, first.column, last.end_line, last.end_column),
                )
            body = ast.Body(body.expr, body.modifiers, grid.sizes, body.span)
        return ast.PatternDef(str(name), params, body, _span_of(meta))

    def param(self, meta, children):
        name, type_, default = children
        return ast.Param(str(name), str(type_) if type_ else None, default, _span_of(meta))

    def body(self, meta, children):
        expr, modifiers, grid = children
        return ast.Body(
            expr,
            tuple(modifiers or ()),
            grid.sizes if grid is not None else None,
            _span_of(meta),
        )

    def with_clause(self, meta, children):
        return list(children)

    def grid_clause(self, meta, children):
        return _GridClause(tuple(children))

    # ------------------------------------------------------------ patterns
    def union(self, meta, children):
        return self._fold("|", meta, children)

    def inter(self, meta, children):
        return self._fold("&", meta, children)

    def diff(self, meta, children):
        return self._fold("-", meta, children)

    def _fold(self, op, meta, children):
        result = children[0]
        for right in children[1:]:
            result = ast.SetOp(op, result, right, _join(result.span, right.span))
        return result

    def complement(self, meta, children):
        return ast.Complement(children[0], _span_of(meta))

    def on_blocks(self, meta, children):
        size, body = children
        return ast.OnBlocks(size, body, _span_of(meta))

    def on_grid(self, meta, children):
        *sizes, body = children
        return ast.OnGrid(tuple(sizes), body, _span_of(meta))

    def per_head(self, meta, children):
        return ast.PerHead(tuple(children), _span_of(meta))

    def head_case(self, meta, children):
        start, stop, body = children
        return ast.HeadCase(start, stop, body, _span_of(meta))

    def call(self, meta, children):
        name, *args = children
        args = tuple(a if isinstance(a, ast.Arg) else ast.Arg(None, a, a.span) for a in args if a is not None)
        return ast.Call(str(name), args, _span_of(meta))

    def kwarg(self, meta, children):
        name, value = children
        return ast.Arg(str(name), value, _span_of(meta))

    # ------------------------------------------------------------ values
    def range(self, meta, children):
        return ast.Range(children[0], children[1], _span_of(meta))

    def mod_eq(self, meta, children):
        return ast.ModEq(children[0], children[1], _span_of(meta))

    def mod_in(self, meta, children):
        return ast.ModIn(children[0], children[1], children[2], _span_of(meta))

    def compare(self, meta, children):
        left, op, right = children
        return ast.BinOp(str(op), left, right, _span_of(meta))

    def compare_eq(self, meta, children):
        left, right = children
        return ast.BinOp("==", left, right, _span_of(meta))

    def sum(self, meta, children):
        return self._fold_arith(children)

    def product(self, meta, children):
        return self._fold_arith(children)

    def _fold_arith(self, children):
        result = children[0]
        for op, right in zip(children[1::2], children[2::2], strict=True):
            result = ast.BinOp(str(op), result, right, _join(result.span, right.span))
        return result

    def negate(self, meta, children):
        return ast.Negate(children[0], _span_of(meta))

    def int_lit(self, meta, children):
        return ast.IntLit(_parse_int(children[0]), _span_of(meta))

    def float_lit(self, meta, children):
        return ast.FloatLit(_parse_float(children[0]), _span_of(meta))

    def true_lit(self, meta, children):
        return ast.BoolLit(True, _span_of(meta))

    def false_lit(self, meta, children):
        return ast.BoolLit(False, _span_of(meta))

    def str_lit(self, meta, children):
        return ast.StrLit(str(children[0])[1:-1], _span_of(meta))

    def name(self, meta, children):
        return ast.Name(str(children[0]), _span_of(meta))

    def func(self, meta, children):
        name, *args = children
        return ast.Func(str(name), tuple(args), _span_of(meta))

    def tuple(self, meta, children):
        return ast.Tuple(tuple(c for c in children if c is not None), _span_of(meta))


class _GridClause:
    def __init__(self, sizes: tuple) -> None:
        self.sizes = sizes


class _PositionedError(Exception):
    def __init__(self, message: str, span: Span) -> None:
        self.message = message
        self.span = span


def _join(a: Span, b: Span) -> Span:
    return Span(a.line, a.column, b.end_line, b.end_column)


def _end_span(text: str) -> Span:
    """Just after the last line with text on it (lines end at '\n' only, as lark counts them)."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()
    col = len(lines[-1]) + 1
    return Span(len(lines), col, len(lines), col + 1)


def _terminal_name(terminal: str) -> str:
    if terminal in _TERMINAL_NAMES:
        return _TERMINAL_NAMES[terminal]
    for definition in _lark().terminals:
        if definition.name == terminal and definition.pattern.type == "str":
            return f"'{definition.pattern.value}'"
    return terminal.lower()


def _expected(tokens) -> str:
    names = sorted({_terminal_name(t) for t in tokens})
    if len(names) > 8:
        names = [*names[:8], "..."]
    return ", ".join(names)


def parse(text: str, filename: str | None = None) -> ast.Module:
    """Parse spec text; raise `MaskSyntaxError` (with line, column, caret) on bad input."""
    if not isinstance(text, str):
        raise MaskSyntaxError(f"a spec is text, not {type(text).__name__}", _START)
    if len(text) > MAX_SPEC_CHARS:
        raise MaskSyntaxError(f"the spec is {len(text)} characters; at most {MAX_SPEC_CHARS} are read", _START)
    try:
        tree = _lark().parse(text)
        module = _ToAst().transform(tree)
        if ast.depth(module) > MAX_DEPTH:
            raise MaskSyntaxError(f"the spec is nested more than {MAX_DEPTH} levels deep", _START)
        return module
    except lark.UnexpectedCharacters as e:
        char = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        message = f"unexpected character {char!r}"
        if char == '"':
            message = "a string must end with '\"' on the line where it starts"
        err = MaskSyntaxError(message, Span(e.line, e.column, e.line, e.column + 1))
    except lark.UnexpectedToken as e:
        tok = e.token
        if tok.type == "$END":
            err = MaskSyntaxError(f"the spec ends too early; expected {_expected(e.expected)}", _end_span(text))
        else:
            span = Span(tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1)
            err = MaskSyntaxError(f"unexpected {str(tok)!r}; expected {_expected(e.expected)}", span)
    except lark.UnexpectedEOF as e:
        err = MaskSyntaxError(f"the spec ends too early; expected {_expected(e.expected)}", _end_span(text))
    except lark.exceptions.VisitError as e:
        inner = e.orig_exc
        if isinstance(inner, _PositionedError):
            err = MaskSyntaxError(inner.message, inner.span)
        elif isinstance(inner, RecursionError):
            err = MaskSyntaxError(f"the spec is nested more than {MAX_DEPTH} levels deep", _START)
        else:
            raise
    except RecursionError:
        err = MaskSyntaxError(f"the spec is nested more than {MAX_DEPTH} levels deep", _START)
    raise err.with_source(text, filename)
