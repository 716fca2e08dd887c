"""Spec text -> `ast.Module`, with source spans and caret errors.

The grammar is `grammar.lark`, the reference: tests check that this parser
accepts the texts it accepts.  The parser is written by hand so that any text
up to MAX_SPEC_CHARS is read or rejected in about a second at most, with
bounded stack, whatever its shape:

* a chain of binary operators (`a | b & c | ...`, `1 + 2 * 3 - ...`) is read in
  a loop, each run of one precedence level into one flat node;
* nesting (brackets, `~`, negation, `on blocks` / `on grid`, `heads`) is counted
  as it is read: the token that opens level MAX_DEPTH + 1 is reported, having
  read only that far (recursion is therefore bounded too);
* tokens are read in small batches, and the token past MAX_TOKENS, or the
  pattern term past MAX_TERMS, is reported where it stands.

Every error is reported at the first offending token in reading order.
"""

from __future__ import annotations

import gc
import math
import re
from bisect import bisect_right
from itertools import islice
from typing import NoReturn

from . import ast
from .errors import MaskSyntaxError, Span

MAX_SPEC_CHARS = 1_000_000
MAX_DEPTH = 200
# Reading costs a few microseconds per token, and checking a few tens per
# pattern term: these keep any text within about a second (bench/parser.py).
# A chain of 40,000 terms such as `window(1) | ...` (199,999 tokens) is still
# read.  MAX_TERMS is the lowering's MAX_EXPANSION (lower.py): a spec with
# more terms could not be instantiated whole anyway.
MAX_TOKENS = 200_000
MAX_TERMS = 50_000
# Longer literals could not even be converted (Python limits int() to 4300
# digits); any literal past 19 digits is rejected later as too large anyway.
MAX_INT_DIGITS = 1000

_START = Span(1, 1, 1, 2)

# One match per token, with the whitespace (the grammar's common.WS: not "\v"
# nor other Unicode spaces) and comments before it.  A character that starts
# no token is a BAD token, and END matches at the end: the lexer never fails,
# so the parser reports every problem in reading order.
_TOKEN = re.compile(
    r"""
    [ \t\f\r\n]*(?:\#[^\n]*[ \t\f\r\n]*)*
    (?:
      (?P<NAME>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<OP>\.\.|//|==|!=|<=|>=|[(){};:,=|&~%<>*+-])
    | (?P<FLOAT>[0-9]+\.[0-9]+(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)
    | (?P<INT>[0-9]+)
    | (?P<STRING>"[^"\n]*")
    | (?P<BAD>[\s\S])
    | (?P<END>\Z)
    )
    """,
    re.VERBOSE,
)
_BATCH = 1024

_TYPES = ("int", "bool", "float", "tensor")
_SET_OPS = ("|", "&", "-")
_SET_LEVELS = ("-", "&", "|")  # tightest first
_COMPARE = frozenset({"==", "!=", "<", "<=", ">", ">="})
_ARITH = {"*": 0, "//": 0, "%": 0, "+": 1, "-": 1}  # products bind tighter than sums
_ARITH_LEVELS = ((0, frozenset({"*", "//", "%"})), (1, frozenset({"+", "-"})))

# What may come next where the grammar branches, for "expected ..." messages.
_EXPR_START = "a name, '(', '~', 'on', 'heads'"
_PRIMARY_START = "a name, '(', 'on', 'heads'"
_VALUE_START = "a name, an integer, a number, a string, '(', '-', '%', 'true', 'false'"
_ATOM_START = "a name, an integer, a number, a string, '(', '-', 'true', 'false'"
_AFTER_EXPR = "'|', '&', '-'"

# A token: (kind, text, offset); kind is NAME, INT, FLOAT, STRING, OP, BAD, END
# or LIMIT (the token past MAX_TOKENS).  The text alone tells symbols and
# keywords apart: no NAME is spelled like a symbol, and no symbol like a name.
Token = tuple[str, str, int]


class _Error(Exception):
    def __init__(self, message: str, span: Span) -> None:
        self.message = message
        self.span = span


def _end_span(text: str) -> Span:
    """Just after the last line with text on it (lines end at '\n' only)."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()
    col = len(lines[-1]) + 1
    return Span(len(lines), col, len(lines), col + 1)


class _Parser:
    """Recursive descent, recursing only where the text nests."""

    def __init__(self, text: str) -> None:
        self.text = text
        # Offsets where lines start; lines end at "\n" only, as carets count them.
        self.line_starts = [0, *(m.end() for m in re.finditer("\n", text))]
        # The line of the last token taken (spans are asked for in reading order)
        # and the offsets where it starts and the next one starts.
        self.line, self.line_start, self.next_line = 1, 0, self._start_of(2)
        self.matches = _TOKEN.finditer(text)
        self.tokens: list[Token] = []
        self.lexed = 0
        self.i = 0
        self._more()
        self.tok = self.tokens[0]
        self.depth = 0
        self.terms = 0

    # ------------------------------------------------------------ tokens

    def _more(self) -> None:
        """Lex the next batch of tokens; the one past MAX_TOKENS becomes LIMIT."""
        if self.lexed > MAX_TOKENS:
            return
        batch = [(m.lastgroup, m.group(m.lastgroup), m.start(m.lastgroup)) for m in islice(self.matches, _BATCH)]
        cut = MAX_TOKENS - self.lexed
        if len(batch) > cut and batch[cut][0] != "END":
            batch[cut:] = [("LIMIT", "", batch[cut][2])]
        self.lexed += len(batch)
        self.tokens.extend(batch)

    def advance(self) -> Token:
        """Take the current token; return it."""
        tok = self.tok
        self.i += 1
        if self.i >= len(self.tokens):
            self._more()
        self.tok = self.tokens[self.i]
        return tok

    def peek(self) -> Token:
        """The token after the current one (END and LIMIT, which end the tokens, are their own)."""
        if self.i + 1 >= len(self.tokens):
            self._more()
            if self.i + 1 >= len(self.tokens):
                return self.tok
        return self.tokens[self.i + 1]

    def expect(self, text: str, expected: str | None = None) -> Token:
        if self.tok[1] != text:
            self.fail(expected or f"'{text}'")
        return self.advance()

    def name(self, expected: str = "a name") -> str:
        if self.tok[0] != "NAME":
            self.fail(expected)
        return self.advance()[1]

    def fail(self, expected: str) -> NoReturn:
        kind, text, _ = self.tok
        if kind == "END":
            raise _Error(f"the spec ends too early; expected {expected}", _end_span(self.text))
        span = self.token_span(self.tok)
        if kind == "LIMIT":
            raise _Error(f"the spec is too long: it has more than {MAX_TOKENS} tokens (names, numbers, symbols)", span)
        if kind == "BAD":
            message = f"unexpected character {text!r}"
            if text == '"':
                message = "a string must end with '\"' on the line where it starts"
            raise _Error(message, span)
        raise _Error(f"unexpected {text!r}; expected {expected}", span)

    # ------------------------------------------------------------ places

    def _start_of(self, line: int) -> float:
        starts = self.line_starts
        return starts[line - 1] if line <= len(starts) else math.inf

    def where(self, pos: int) -> tuple[int, int]:
        """(line, column) of an offset."""
        starts = self.line_starts
        line = bisect_right(starts, pos)
        return line, pos - starts[line - 1] + 1

    def token_span(self, tok: Token) -> Span:
        line, column = self.where(tok[2])
        return Span(line, column, line, column + max(1, len(tok[1])))

    def since(self, first: int) -> Span:
        """From offset `first` to the end of the last token taken."""
        _, text, pos = self.tokens[self.i - 1]
        if pos >= self.next_line:  # the last token is on a later line than before
            self.line = line = bisect_right(self.line_starts, pos)
            self.line_start, self.next_line = self.line_starts[line - 1], self._start_of(line + 1)
        line, start = self.line, self.line_start
        end = pos - start + 1 + len(text)
        if first >= start:  # most spans are on one line
            return Span(line, first - start + 1, line, end)
        first_line, first_column = self.where(first)
        return Span(first_line, first_column, line, end)

    def enter(self) -> None:
        """One level deeper at the current token (which opens the level); take it."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Error(
                f"the spec is nested more than {MAX_DEPTH} levels deep (brackets, '~', '-', 'on' and 'heads' count)",
                self.token_span(self.tok),
            )
        self.advance()

    def open(self, text: str) -> None:
        """Take `text` (a bracket), one level deeper."""
        if self.tok[1] != text:
            self.fail(f"'{text}'")
        self.enter()

    def close(self, text: str, expected: str) -> None:
        self.expect(text, expected)
        self.depth -= 1

    # ------------------------------------------------------------ module

    def module(self) -> ast.Module:
        first = self.tok[2]
        defs: list[ast.PatternDef] = []
        while self.tok[1] == "pattern" and self.tok[0] == "NAME":
            defs.append(self.definition())
        main = None
        if self.tok[0] != "END":
            main = self.body(in_definition=False)
            if self.tok[0] != "END":
                self.fail(f"{_AFTER_EXPR}, 'with', 'on', the end of the spec")
        span = self.since(first) if defs or main else ast.NO_SPAN
        return ast.Module(tuple(defs), main, span)

    def definition(self) -> ast.PatternDef:
        first = self.tok[2]
        self.advance()  # "pattern"
        name = self.name()
        params: list[ast.Param] = []
        has_list = self.tok[1] == "("
        if has_list:  # may be left out when there are no parameters
            self.enter()
            while self.tok[1] != ")":
                params.append(self.param())
                if self.tok[1] != ",":
                    break
                self.advance()
            self.close(")", "',', ')'")
        grid = self.grid_clause() if self.tok[1] == "on" else None
        self.expect("=", "'=', 'on'" if has_list or grid else "'(', '=', 'on'")
        body = self.body(in_definition=True)
        if grid is not None:
            if body.grid is not None:
                first_size, last_size = body.grid[0].span, body.grid[-1].span
                raise _Error(
                    "a pattern takes one grid: in its header or after its body, not both",
                    Span(first_size.line, first_size.column, last_size.end_line, last_size.end_column),
                )
            body = ast.Body(body.expr, body.modifiers, grid, body.span)
        return ast.PatternDef(name, tuple(params), body, self.since(first))

    def param(self) -> ast.Param:
        first = self.tok[2]
        name = self.name("a name, ')'")
        type_ = None
        if self.tok[1] == ":":
            self.advance()
            if self.tok[0] != "NAME" or self.tok[1] not in _TYPES:
                self.fail("a type (int, bool, float, tensor)")
            type_ = self.advance()[1]
        default = None
        if self.tok[1] == "=":
            self.advance()
            default = self.value()
        return ast.Param(name, type_, default, self.since(first))

    def body(self, in_definition: bool) -> ast.Body:
        first = self.tok[2]
        expr = self.expr()
        modifiers: list[ast.Call] = []
        if self.tok[1] == "with":
            self.advance()
            modifiers.append(self.call())
            while self.tok[1] == ",":
                self.advance()
                modifiers.append(self.call())
        grid = None
        # After a definition "on blocks" starts the bare expression; "on grid" is the grid.
        if self.tok[1] == "on" and not (in_definition and self.peek()[1] == "blocks"):
            grid = self.grid_clause()
        return ast.Body(expr, tuple(modifiers), grid, self.since(first))

    def grid_clause(self) -> tuple[ast.Value, ...]:
        self.advance()  # "on"
        self.expect("grid")
        return self.sizes()

    def sizes(self) -> tuple[ast.Value, ...]:
        """`( value, ... )` after `grid`."""
        self.open("(")
        sizes = [self.value()]
        while self.tok[1] == ",":
            self.advance()
            sizes.append(self.value())
        self.close(")", "',', ')'")
        return tuple(sizes)

    # ------------------------------------------------------------ patterns

    def expr(self) -> ast.Expr:
        first = self.operand()
        if self.tok[1] not in _SET_OPS or self.tok[0] != "OP":
            return first
        operands, ops = [first], []
        while self.tok[1] in _SET_OPS and self.tok[0] == "OP":
            ops.append(self.advance()[1])
            operands.append(self.operand())
        for op in _SET_LEVELS:
            if op in ops:
                operands, ops = _group(operands, ops, frozenset(op), _set_chain)
        return operands[0]

    def operand(self) -> ast.Expr:
        """`~`s, `on blocks(b)` / `on grid(...)` prefixes, then `( expr )`,
        `heads { ... }` or a call."""
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise _Error(f"the spec is too long: it has more than {MAX_TERMS} pattern terms", self.token_span(self.tok))
        entered = self.depth
        complements: list[int] = []
        while self.tok[1] == "~":
            complements.append(self.tok[2])
            self.enter()
        prefixes: list[tuple[int, str, object]] = []
        while self.tok[1] == "on" and self.tok[0] == "NAME":
            first = self.tok[2]
            self.enter()
            if self.tok[1] == "blocks":
                self.advance()
                self.open("(")
                size = self.value()
                self.close(")", "')'")
                prefixes.append((first, "blocks", size))
            else:
                self.expect("grid", "'grid', 'blocks'")
                prefixes.append((first, "grid", self.sizes()))
        kind, text, pos = self.tok
        if text == "(" and kind == "OP":
            self.enter()
            node = self.expr()
            self.close(")", f"{_AFTER_EXPR}, ')'")
        elif text == "heads" and kind == "NAME":
            self.enter()  # two levels, as in the tree: the cases, and each case
            self.open("{")
            cases = [self.head_case()]
            while self.tok[1] == ";":
                self.advance()
                if self.tok[1] == "}":
                    break
                cases.append(self.head_case())
            self.close("}", f"{_AFTER_EXPR}, ';', '}}'")
            node = ast.PerHead(tuple(cases), self.since(pos))
        elif kind == "NAME":
            node = self.call()
        else:
            self.fail(_PRIMARY_START if complements or prefixes else _EXPR_START)
        for first, which, arg in reversed(prefixes):
            span = self.since(first)
            node = ast.OnBlocks(arg, node, span) if which == "blocks" else ast.OnGrid(arg, node, span)
        for first in reversed(complements):
            node = ast.Complement(node, self.since(first))
        self.depth = entered
        return node

    def head_case(self) -> ast.HeadCase:
        first = self.tok[2]
        start = self.sum()
        self.expect("..", "'..', an operator")
        stop = self.sum()
        self.expect(":", "':', an operator")
        return ast.HeadCase(start, stop, self.expr(), self.since(first))

    def call(self) -> ast.Call:
        kind, name, first = self.tok
        if kind != "NAME":
            self.fail("a name")
        self.advance()
        if self.tok[1] != "(":
            return ast.Call(name, (), self.since(first))
        self.enter()
        args: list[ast.Arg] = []
        while self.tok[1] != ")":
            args.append(self.arg())
            if self.tok[1] != ",":
                break
            self.advance()
        self.close(")", "',', ')'")
        return ast.Call(name, tuple(args), self.since(first))

    def arg(self) -> ast.Arg:
        kind, text, pos = self.tok
        after = self.peek()[1]
        if kind == "NAME" and after == "=" and text not in ("true", "false"):
            self.advance()
            self.advance()
            value = self.value()
            return ast.Arg(text, value, self.since(pos))
        if (after == "," or after == ")") and (kind == "INT" or kind == "NAME"):
            value = self.atom()  # a lone number or name, the usual argument: no operators to look for
        else:
            value = self.value()
        return ast.Arg(None, value, value.span)

    # ------------------------------------------------------------ values

    def value(self) -> ast.Value:
        first = self.tok[2]
        if self.tok[1] == "%":
            self.advance()
            modulus = self.sum()
            if self.tok[1] == "==":
                self.advance()
                return ast.ModEq(modulus, self.sum(), span=self.since(first))
            if self.tok[1] == "in" and self.tok[0] == "NAME":
                self.advance()
                start = self.sum()
                self.expect("..", "'..', an operator")
                return ast.ModIn(modulus, start, self.sum(), span=self.since(first))
            self.fail("'==', 'in', an operator")
        if self.tok[0] not in ("NAME", "INT", "FLOAT", "STRING") and self.tok[1] not in ("(", "-"):
            self.fail(_VALUE_START)
        left = self.sum()
        text = self.tok[1]
        if text == "..":
            self.advance()
            return ast.Range(left, self.sum(), span=self.since(first))
        if text in _COMPARE:
            self.advance()
            return ast.BinOp(text, left, self.sum(), span=self.since(first))
        return left

    def sum(self) -> ast.Value:
        first = self.atom()
        if self.tok[1] not in _ARITH or self.tok[0] != "OP":
            return first
        operands, ops = [first], []
        while self.tok[1] in _ARITH and self.tok[0] == "OP":
            ops.append(self.advance()[1])
            operands.append(self.atom())
        for _, level in _ARITH_LEVELS:
            if not level.isdisjoint(ops):
                operands, ops = _group(operands, ops, level, _arith_chain)
        return operands[0]

    def atom(self) -> ast.Value:
        """`-`s, then a literal, a name, a function call, `( value )` or a tuple."""
        kind, text, pos = self.tok
        if text == "-":
            entered = self.depth
            negations: list[int] = []
            while self.tok[1] == "-":
                negations.append(self.tok[2])
                self.enter()
            node = self.atom()
            for first in reversed(negations):
                node = ast.Negate(node, self.since(first))
            self.depth = entered
            return node
        if kind == "INT":
            self.advance()
            digits = text.lstrip("0") or "0"
            if len(digits) > MAX_INT_DIGITS:
                raise _Error(f"the number has {len(digits)} digits; it is too large", self.since(pos))
            return ast.IntLit(int(digits), self.since(pos))
        if kind == "NAME":
            self.advance()
            if text == "true" or text == "false":
                return ast.BoolLit(text == "true", self.since(pos))
            if self.tok[1] != "(":
                return ast.Name(text, self.since(pos))
            self.enter()
            items = [self.value()]
            while self.tok[1] == ",":
                self.advance()
                items.append(self.value())
            self.close(")", "',', ')'")
            return ast.Func(text, tuple(items), self.since(pos))
        if kind == "FLOAT":
            self.advance()
            number = float(text)
            if not math.isfinite(number):
                raise _Error(f"the number {text[:40]} is too large for a float", self.since(pos))
            return ast.FloatLit(number, self.since(pos))
        if kind == "STRING":
            self.advance()
            return ast.StrLit(text[1:-1], self.since(pos))
        if text == "(" and kind == "OP":
            self.enter()
            inner = self.value()
            if self.tok[1] != ",":
                self.close(")", "',', ')'")
                return inner
            items = [inner]
            while self.tok[1] == ",":
                self.advance()
                if self.tok[1] == ")" and len(items) > 1:
                    break
                items.append(self.value())
            self.close(")", "',', ')'")
            return ast.Tuple(tuple(items), self.since(pos))
        self.fail(_ATOM_START)


def _group(operands: list, ops: list[str], level: frozenset[str], chain) -> tuple[list, list[str]]:
    """Merge each run of operands joined by operators of `level` into one chain."""
    out, out_ops = [operands[0]], []
    run, run_ops = [operands[0]], []
    for op, right in zip(ops, operands[1:], strict=True):
        if op in level:
            run.append(right)
            run_ops.append(op)
            continue
        if run_ops:
            out[-1] = chain(run_ops, run)
        out_ops.append(op)
        out.append(right)
        run, run_ops = [right], []
    if run_ops:
        out[-1] = chain(run_ops, run)
    return out, out_ops


def _chain_span(operands: list) -> Span:
    first, last = operands[0].span, operands[-1].span
    return Span(first.line, first.column, last.end_line, last.end_column)


def _set_chain(ops: list[str], operands: list) -> ast.SetOp:
    return ast.SetOp(ops[0], *operands, span=_chain_span(operands))


def _arith_chain(ops: list[str], operands: list) -> ast.BinOp:
    return ast.BinOp(tuple(ops), *operands, span=_chain_span(operands))


def parse(text: str, filename: str | None = None) -> ast.Module:
    """Parse spec text; raise `MaskSyntaxError` (with line, column, caret) on bad input."""
    if not isinstance(text, str):
        raise MaskSyntaxError(f"a spec is text, not {type(text).__name__}", _START)
    if len(text) > MAX_SPEC_CHARS:
        raise MaskSyntaxError(f"the spec is {len(text)} characters; at most {MAX_SPEC_CHARS} are read", _START)
    # The tree has no cycles: collecting while it grows only costs time.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _Parser(text).module()
    except _Error as e:
        err = MaskSyntaxError(e.message, e.span)
    except RecursionError:
        # Only when the caller has already used most of Python's stack.
        err = MaskSyntaxError(f"the spec is nested too deeply for the stack left (limit {MAX_DEPTH} levels)", _START)
    finally:
        if collecting:
            gc.enable()
    raise err.with_source(text, filename)
