"""AST -> `ir.HeadPattern`: resolve names, bind arguments, evaluate values.

The same walk runs twice.  At compile time (`static=True`) sizes are unknown:
it checks names, arity, types and every constraint whose numbers are known,
and visits every branch of `heads { }`.  At call time it evaluates everything
for one head and builds the `ir` tree.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

from . import ast, ir
from .atoms import ATOMS, MODIFIERS, Frame, Lowering, axes_phrase, bind, check_modifier, check_relations
from .errors import MaskError, MaskTypeError, Span
from .values import (
    INT,
    Env,
    RangeVal,
    TensorRef,
    Unknown,
    evaluate,
    is_bool,
    is_int,
    is_number,
    known,
    type_name,
)

BUILTIN_NAMES = ("head", "heads", "lq", "lk")

# Guards that keep any spec, however written, from exhausting time, memory or
# Python's stack: how many sub-patterns a pattern may expand to once the
# patterns it calls are inlined (p1 = p0 | p0, p2 = p1 | p1, ... doubles each
# time), how deeply expressions and pattern calls may nest, and the largest
# number the instantiated pattern may hold (block sizes and windows multiply).
MAX_EXPANSION = 50_000
MAX_NESTING = 300
MAX_IR_INT = 2**63 - 1


@dataclass(frozen=True)
class Unit:
    """Where a definition's text came from, for error messages."""

    source: str
    filename: str | None = None


@dataclass(frozen=True)
class Definition:
    node: ast.PatternDef
    unit: Unit


Resolver = Callable[[str], "Definition | None"]


@dataclass(frozen=True)
class Sizes:
    """Everything known at call time besides tensors."""

    lq: int
    lk: int
    heads: int
    q_offset: int
    names: dict  # grid sizes and call-time parameters


def free_names(definition: ast.PatternDef | None, body: ast.Body) -> list[str]:
    """Names used in grid sizes that are neither parameters nor built in: they
    are bound at call time (`h=56, w=56`)."""
    params = {p.name for p in definition.params} if definition else set()
    found: list[str] = []
    stack: list[object] = [body]
    grids: list[tuple] = []
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Body) and node.grid is not None:
            grids.append(node.grid)
        if isinstance(node, ast.OnGrid):
            grids.append(node.sizes)
        stack.extend(ast.children(node))
    for sizes in grids:
        values: list[object] = list(sizes)
        while values:
            v = values.pop(0)
            if isinstance(v, ast.Name) and v.id not in params and v.id not in BUILTIN_NAMES and v.id not in found:
                found.append(v.id)
            values.extend(ast.children(v))
    return found


class Walker:
    def __init__(self, resolve: Resolver, sizes: Sizes | None, head: int | None) -> None:
        self.resolve = resolve
        self.sizes = sizes
        self.static = sizes is None
        self.head = head
        self.modifiers: list[ir.Modifier] = []
        self.grids: list[tuple[int, ...]] = []  # grids laid over the token sequence itself
        self.stack: list[str] = []
        self.seen: set = set()
        self.steps = 0  # sub-patterns visited (MAX_EXPANSION)
        self.depth = 0  # nested expr/call/body frames (MAX_NESTING)

    # -------------------------------------------------------------- entry

    def top_frame(self) -> Frame:
        if self.static:
            return Frame(1, None, None)
        coord = ir.Coord(1, None, self.sizes.lk)
        return Frame(1, (coord,), coord)

    def builtins(self) -> dict[str, object]:
        if self.static:
            return {name: INT for name in BUILTIN_NAMES}
        s = self.sizes
        return {"head": self.head, "heads": s.heads, "lq": s.lq, "lk": s.lk}

    def _enter(self, span: Span | None) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise MaskTypeError(
                f"the pattern nests more than {MAX_NESTING} levels deep, counting the patterns it calls",
                span,
            )

    def body(self, body: ast.Body, env: Env, frame: Frame, unit: Unit) -> ir.Mask:
        self._enter(body.span)
        try:
            if body.grid is not None:
                first, last = body.grid[0].span, body.grid[-1].span
                grid_span = Span(first.line, first.column, last.end_line, last.end_column)
                frame = self.grid(body.grid, grid_span, env, frame)
            mask = self.expr(body.expr, env, frame, unit)
            for call in body.modifiers:
                self.modifier(call, env, frame)
            return mask
        except MaskError as e:
            raise e.with_source(unit.source, unit.filename) from None
        finally:
            self.depth -= 1

    # -------------------------------------------------------------- patterns

    def expr(self, node: object, env: Env, frame: Frame, unit: Unit) -> ir.Mask:
        span = getattr(node, "span", None)
        self.steps += 1
        if self.steps > MAX_EXPANSION:
            raise MaskTypeError(
                f"the pattern expands to more than {MAX_EXPANSION} sub-patterns once the patterns it calls are inlined",
                span,
            )
        self._enter(span)
        try:
            return self._expr(node, env, frame, unit)
        finally:
            self.depth -= 1

    def _expr(self, node: object, env: Env, frame: Frame, unit: Unit) -> ir.Mask:
        if isinstance(node, ast.SetOp):
            left = self.expr(node.left, env, frame, unit)
            right = self.expr(node.right, env, frame, unit)
            if node.op == "|":
                return ir.Or((left, right))
            if node.op == "&":
                return ir.And((left, right))
            return ir.And((left, ir.Not(right)))
        if isinstance(node, ast.Complement):
            return ir.Not(self.expr(node.operand, env, frame, unit))
        if isinstance(node, ast.OnBlocks):
            return self.expr(node.body, env, self.blocks(node, env, frame), unit)
        if isinstance(node, ast.OnGrid):
            return self.expr(node.body, env, self.grid(node.sizes, node.span, env, frame), unit)
        if isinstance(node, ast.PerHead):
            return self.per_head(node, env, frame, unit)
        if isinstance(node, ast.Call):
            return self.call(node, env, frame, unit)
        raise MaskTypeError(f"expected a pattern, found {type(node).__name__}", getattr(node, "span", None))

    def blocks(self, node: ast.OnBlocks, env: Env, frame: Frame) -> Frame:
        value = evaluate(node.size, env)
        sizes = value if isinstance(value, tuple) else (value,) * frame.ndim
        if len(sizes) != frame.ndim:
            raise MaskTypeError(
                f"blocks() has {len(sizes)} sizes, but the grid here has {axes_phrase(frame.ndim)}",
                node.size.span,
            )
        for size in sizes:
            if not is_int(size):
                raise MaskTypeError(f"a block size must be an integer, got {type_name(size)}", node.size.span)
            if known(size) and size < 1:
                raise MaskTypeError(f"a block size must be >= 1, got {size}", node.size.span)
        has_flat = frame.ndim == 1 and frame.has_flat
        if self.static:
            return Frame(frame.ndim, None, None, has_flat, True)
        axes = tuple(ax.blocked(b) for ax, b in zip(frame.axes, sizes, strict=True))
        return Frame(frame.ndim, axes, axes[0] if has_flat else None, has_flat, True)

    def grid(self, size_nodes: tuple, span: Span, env: Env, frame: Frame) -> Frame:
        sizes = [evaluate(n, env) for n in size_nodes]
        for value, node in zip(sizes, size_nodes, strict=True):
            if not is_int(value):
                raise MaskTypeError(f"a grid size must be an integer, got {type_name(value)}", node.span)
            if known(value) and value < 1:
                raise MaskTypeError(f"a grid size must be >= 1, got {value}", node.span)
        if not frame.has_flat:
            raise MaskTypeError("'on grid' cannot be used inside 'on blocks' over a grid", span)
        if self.static:
            return Frame(len(sizes), None, None, True, frame.blocked)
        flat = frame.flat
        total = math.prod(sizes)
        if total != flat.size:
            what = "the keys" if flat.div == 1 else "this context"
            raise MaskTypeError(
                f"grid({', '.join(map(str, sizes))}) holds {total} positions, but {what} have {flat.size}",
                span,
            )
        if flat.div == 1:
            if tuple(sizes) not in self.grids:
                self.grids.append(tuple(sizes))
            s = self.sizes
            if s.q_offset < 0 or s.q_offset + s.lq > s.lk:
                raise MaskTypeError(
                    f"on a grid, queries must lie on the grid: positions {s.q_offset} .. "
                    f"{s.q_offset + s.lq} fall outside 0 .. {s.lk}",
                    span,
                )
        axes = []
        for a, size in enumerate(sizes):
            inner = math.prod(sizes[a + 1 :])
            mod = None if a == 0 else flat.div * inner * size
            axes.append(ir.Coord(flat.div * inner, mod, size))
        return Frame(len(sizes), tuple(axes), flat, True, frame.blocked)

    def per_head(self, node: ast.PerHead, env: Env, frame: Frame, unit: Unit) -> ir.Mask:
        ranges = []
        for case in node.cases:
            start, stop = evaluate(case.start, env), evaluate(case.stop, env)
            for value, sub in ((start, case.start), (stop, case.stop)):
                if not is_int(value):
                    raise MaskTypeError(f"a head range needs integers, got {type_name(value)}", sub.span)
            if known(start, stop) and start > stop:
                raise MaskTypeError(f"head range {start} .. {stop} is reversed", case.span)
            ranges.append((start, stop, case))
        if all(known(a, b) for a, b, _ in ranges):
            ordered = sorted(ranges, key=lambda r: (r[0], r[1]))
            expected = 0
            for start, stop, case in ordered:
                if start != expected:
                    problem = (
                        "overlaps the previous range"
                        if start < expected
                        else f"leaves heads {expected} .. {start} uncovered"
                    )
                    raise MaskTypeError(f"head range {start} .. {stop} {problem}", case.span)
                expected = stop
            if not self.static and expected != self.sizes.heads:
                raise MaskTypeError(
                    f"the head ranges cover heads 0 .. {expected}, but there are {self.sizes.heads} heads",
                    node.span,
                )
        if self.static:
            for _, _, case in ranges:
                self.expr(case.body, env, frame, unit)
            return ir.Const(False)
        for start, stop, case in ranges:
            if start <= self.head < stop:
                return self.expr(case.body, env, frame, unit)
        raise AssertionError("head ranges were checked to cover every head")

    # -------------------------------------------------------------- calls

    def call(self, node: ast.Call, env: Env, frame: Frame, unit: Unit) -> ir.Mask:
        if node.name in ATOMS:
            sig = ATOMS[node.name]
            args = bind(sig, node, self.args(node, env), frame)
            check_relations(sig, args)
            if self.static:
                return ir.Const(False)
            return _fits_int64(sig.build(args, frame, Lowering(self.head, self.sizes.heads)), node)
        if node.name in MODIFIERS:
            raise MaskTypeError(
                f"'{node.name}' is a modifier: write it after 'with' (all with {node.name}(...))",
                node.span,
            )
        definition = self.resolve(node.name)
        if definition is None:
            names = [*ATOMS, *self.known_patterns()]
            close = difflib.get_close_matches(node.name, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise MaskTypeError(f"unknown pattern '{node.name}'{hint}", _name_of(node))
        if node.name in self.stack:
            chain = " -> ".join([*self.stack[self.stack.index(node.name) :], node.name])
            raise MaskTypeError(f"pattern '{node.name}' calls itself ({chain})", node.span)
        callee_env = self.call_env(definition, node, env)
        if self.static:
            key = (node.name, tuple(sorted(callee_env.names.items(), key=lambda kv: kv[0])), frame)
            if key in self.seen:
                return ir.Const(False)
            self.seen.add(key)
        self.stack.append(node.name)
        try:
            return self.body(definition.node.body, callee_env, frame, definition.unit)
        except MaskError as e:
            if e.filename != unit.filename or e.source != unit.source:
                e.called_from(node.name, node.span, unit.filename)
            raise
        finally:
            self.stack.pop()

    def known_patterns(self) -> list[str]:
        lister = getattr(self.resolve, "names", None)
        return list(lister()) if lister else []

    def args(self, node: ast.Call, env: Env) -> list[tuple[ast.Arg, object]]:
        return [(arg, evaluate(arg.value, env)) for arg in node.args]

    def call_env(self, definition: Definition, node: ast.Call, env: Env) -> Env:
        d = definition.node
        given: dict[str, tuple[object, Span]] = {}
        positional = 0
        for arg, value in self.args(node, env):
            if arg.name is None:
                if positional >= len(d.params):
                    raise MaskTypeError(
                        f"{d.name}() takes {len(d.params)} argument{'s' if len(d.params) != 1 else ''}, got more",
                        arg.span,
                    )
                name = d.params[positional].name
                positional += 1
            else:
                name = arg.name
                if name not in {p.name for p in d.params}:
                    names = ", ".join(p.name for p in d.params) or "none"
                    raise MaskTypeError(
                        f"{d.name}() has no parameter '{name}' (its parameters: {names})",
                        arg.span,
                    )
            if name in given:
                raise MaskTypeError(f"{d.name}() got parameter '{name}' twice", arg.span)
            given[name] = (value, arg.span)
        return self.definition_env(definition, given, node.span, missing=None)

    def definition_env(
        self,
        definition: Definition,
        given: dict[str, tuple[object, Span]],
        span: Span,
        missing: Callable[[ast.Param], object] | None,
    ) -> Env:
        """Bind a definition's parameters: given values, then defaults, then
        `missing(param)` (call-time values for the entry pattern)."""
        d = definition.node
        names: dict[str, object] = self.builtins()
        for param in d.params:
            if param.name in BUILTIN_NAMES:
                raise MaskTypeError(
                    f"'{param.name}' is a built-in name and cannot be a parameter",
                    param.span,
                ).with_source(definition.unit.source, definition.unit.filename)
            if param.name in given:
                value, value_span = given[param.name]
            elif param.default is not None:
                try:
                    value = evaluate(param.default, Env(names))
                except MaskError as e:
                    raise e.with_source(definition.unit.source, definition.unit.filename) from None
                value_span = param.default.span
            elif param.type == "tensor" and missing is not None:
                value, value_span = TensorRef(param.name), param.span
            elif missing is not None:
                value, value_span = missing(param), param.span
            else:
                raise MaskTypeError(f"{d.name}() needs parameter '{param.name}'", span)
            names[param.name] = _check_param(d, param, value, value_span, definition.unit, given)
        for name in free_names(d, d.body):
            if self.static:
                names[name] = INT
            elif name in self.sizes.names:
                names[name] = self.sizes.names[name]
            else:
                raise MaskTypeError(
                    f"grid size '{name}' is not bound: pass {name}=... when calling the pattern",
                    _first_use(d.body, name),
                ).with_source(definition.unit.source, definition.unit.filename)
        return Env(names)

    # -------------------------------------------------------------- modifiers

    def modifier(self, node: ast.Call, env: Env, frame: Frame) -> None:
        sig = MODIFIERS.get(node.name)
        if sig is None:
            if node.name in ATOMS:
                raise MaskTypeError(
                    f"'{node.name}' is a pattern, not a modifier; modifiers are: {', '.join(MODIFIERS)}",
                    node.span,
                )
            close = difflib.get_close_matches(node.name, list(MODIFIERS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise MaskTypeError(f"unknown modifier '{node.name}'{hint}", _name_of(node))
        args = bind(sig, node, self.args(node, env), frame)
        check_modifier(sig, args, frame, node)
        if not self.static:
            self.modifiers.append(_fits_int64(sig.build(args, frame, Lowering(self.head, self.sizes.heads)), node))


def _check_param(
    d: ast.PatternDef,
    param: ast.Param,
    value: object,
    span: Span,
    unit: Unit,
    given: dict,
) -> object:
    declared = param.type
    if declared is None and param.default is not None:
        # The default's own kind: a number literal takes numbers, true/false takes
        # bools (so `streaming(w = true)` is reported where it is written).
        declared = _literal_kind(param.default)
    ok = True
    if declared == "number":
        ok = is_number(value)
        declared = "a number"
    elif declared == "int" or (declared is None and param.default is None):
        ok = is_int(value)
        declared = "int"
    elif declared == "bool":
        ok = is_bool(value)
    elif declared == "float":
        ok = is_number(value)
        if ok and known(value):
            value = float(value)
    elif declared == "tensor":
        ok = isinstance(value, TensorRef)
    if not ok:
        error = MaskTypeError(
            f"parameter '{param.name}' of {d.name}() is {declared}, got {type_name(value)}",
            span,
        )
        if param.name not in given:
            error.with_source(unit.source, unit.filename)
        raise error
    if isinstance(value, (RangeVal,)) or (isinstance(value, Unknown) and value.type not in ("int", "bool", "float")):
        raise MaskTypeError(f"parameter '{param.name}' cannot hold a {type_name(value)}", span)
    return value


def _literal_kind(default: object) -> str | None:
    while isinstance(default, ast.Negate):
        default = default.operand
    if isinstance(default, ast.BoolLit):
        return "bool"
    if isinstance(default, (ast.IntLit, ast.FloatLit)):
        return "number"
    return None


def _name_of(call: ast.Call) -> Span:
    """The span of a call's name alone (a call starts with its name)."""
    s = call.span
    return Span(s.line, s.column, s.line, s.column + len(call.name)) if s.line else s


def _fits_int64(node: object, call: ast.Call) -> object:
    """`node` (an `ir` tree built for `call`) if every integer in it fits in 64 bits.

    Arguments are limited one by one (values.INT_LIMIT), but an atom multiplies
    them (dilated: w * d) and nested `on blocks` multiply block sizes into the
    coordinates atoms read, so the products are checked here, once, for all atoms.
    """
    stack = [node]
    while stack:
        x = stack.pop()
        if isinstance(x, bool) or x is None:
            continue
        if isinstance(x, int):
            if abs(x) > MAX_IR_INT:
                raise MaskTypeError(
                    f"{call.name}() here needs the number {x}, which does not fit in 64 bits "
                    "(its arguments and the enclosing block sizes multiply)",
                    call.span,
                )
        elif isinstance(x, tuple):
            stack.extend(x)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            stack.extend(getattr(x, f.name) for f in dataclasses.fields(x) if f.name != "span")
    return node


def _first_use(body: ast.Body, name: str) -> Span:
    stack: list[object] = [body]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Name) and node.id == name:
            return node.span
        stack.extend(ast.children(node))
    return body.span
