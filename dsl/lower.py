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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import ast, ir
from .atoms import (
    ATOMS,
    MODIFIERS,
    Frame,
    Lowering,
    Signature,
    axes_phrase,
    bind,
    check_modifier,
    check_relations,
)
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


def pattern_nodes(body: ast.Body) -> Iterator[object]:
    """The body and the pattern expressions in it, depth first, but not the values
    they hold: grids and pattern calls are found here, and a walk that skips the
    arguments of every call is several times shorter."""
    stack: list[object] = [body]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.SetOp):
            stack.extend(node.operands)
        elif isinstance(node, ast.Complement):
            stack.append(node.operand)
        elif isinstance(node, (ast.OnBlocks, ast.OnGrid)):
            stack.append(node.body)
        elif isinstance(node, ast.PerHead):
            stack.extend(case.body for case in node.cases)
        elif isinstance(node, ast.Body):
            stack.append(node.expr)


def free_names(definition: ast.PatternDef | None, body: ast.Body, nodes: list | None = None) -> list[str]:
    """Names used in grid sizes that are neither parameters nor built in: they
    are bound at call time (`h=56, w=56`).  `nodes`: the body's pattern nodes,
    when the caller has them already."""
    params = {p.name for p in definition.params} if definition else set()
    found: list[str] = []
    grids: list[tuple] = []
    for node in pattern_nodes(body) if nodes is None else nodes:
        if isinstance(node, ast.Body) and node.grid is not None:
            grids.append(node.grid)
        if isinstance(node, ast.OnGrid):
            grids.append(node.sizes)
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
        self.tensors: dict[str, None] = {}  # call-time tensors met, in order
        # Atom calls already checked (and built): a spec may repeat one thousands of times.
        self.atoms: dict[tuple, ir.Mask] = {}

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
        if isinstance(node, ast.Call):  # the most common node, asked first
            return self.call(node, env, frame, unit)
        if isinstance(node, ast.SetOp):
            # One n-ary node for the whole chain; repeated terms (`all | all | ...`)
            # are kept once, so a long chain of few distinct terms stays small.
            parts = [self.expr(x, env, frame, unit) for x in node.operands]
            if node.op == "-":  # a - b - c: a and neither b nor c
                return ir.And((parts[0], *(ir.Not(x) for x in dict.fromkeys(parts[1:]))))
            unique = tuple(dict.fromkeys(parts))
            if len(unique) == 1:
                return unique[0]
            return ir.Or(unique) if node.op == "|" else ir.And(unique)
        if isinstance(node, ast.Complement):
            return ir.Not(self.expr(node.operand, env, frame, unit))
        if isinstance(node, ast.OnBlocks):
            return self.expr(node.body, env, self.blocks(node, env, frame), unit)
        if isinstance(node, ast.OnGrid):
            return self.expr(node.body, env, self.grid(node.sizes, node.span, env, frame), unit)
        if isinstance(node, ast.PerHead):
            return self.per_head(node, env, frame, unit)
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
        if flat.div == 1 and tuple(sizes) not in self.grids:
            self.grids.append(tuple(sizes))
        # Grid coordinates exist for key positions only, over tokens and over
        # blocks of them alike (a query past the keys would get coordinates
        # past the grid, silently wrapped).
        s = self.sizes
        if s.q_offset < 0 or s.q_offset + s.lq > s.lk:
            where = "" if flat.div == 1 else f" (here of blocks of {flat.div} tokens)"
            raise MaskTypeError(
                f"on a grid{where}, queries must lie on the grid: positions {s.q_offset} .. "
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
            values = self.args(node, env, sig)
            key = (node.name, tuple((arg.name, value) for arg, value in values), frame)
            if key in self.atoms:
                return self.atoms[key]
            args = bind(sig, node, values, frame)
            check_relations(sig, args)
            if self.static:
                mask = ir.Const(False)
            else:
                mask = _fits_int64(sig.build(args, frame, Lowering(self.head, self.sizes.heads, self.sizes.lq)), node)
            self.atoms[key] = mask
            return mask
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

    def args(self, node: ast.Call, env: Env, callee: Signature | ast.PatternDef) -> list[tuple[ast.Arg, object]]:
        """Each argument with its value.  Where the callee takes a tensor, a name
        that is not bound here is a tensor bound when calling (`segments(ids)`)."""
        slots = _tensor_slots(node, callee)
        out: list[tuple[ast.Arg, object]] = []
        for i, arg in enumerate(node.args):
            v = arg.value
            if i in slots and isinstance(v, ast.Name) and v.id not in env.names:
                self.tensors[v.id] = None
                out.append((arg, TensorRef(v.id)))
            else:
                out.append((arg, evaluate(v, env)))
        return out

    def call_env(self, definition: Definition, node: ast.Call, env: Env) -> Env:
        d = definition.node
        given: dict[str, tuple[object, Span]] = {}
        positional = 0
        for arg, value in self.args(node, env, d):
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
            elif param.type == "tensor":
                # Not passed (the entry pattern's, or a called pattern's left out):
                # a tensor bound when calling, under the parameter's own name.
                value, value_span = TensorRef(param.name), param.span
                self.tensors[param.name] = None
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
        args = bind(sig, node, self.args(node, env, sig), frame)
        check_modifier(sig, args, frame, node)
        if not self.static:
            self.modifiers.append(_fits_int64(sig.build(args, frame, Lowering(self.head, self.sizes.heads)), node))


_TAKES_TENSORS = frozenset(
    sig.name
    for sig in (*ATOMS.values(), *MODIFIERS.values())
    if any(p.kind in ("tensor", "tensor?") for p in sig.params)
)
_NO_SLOTS: frozenset[int] = frozenset()


def _tensor_slots(node: ast.Call, callee: Signature | ast.PatternDef) -> frozenset[int] | set[int]:
    """Indices of the call's arguments that go to a tensor parameter (matched as
    `bind` and `call_env` match them: by position, else by name)."""
    if isinstance(callee, Signature):
        if callee.name not in _TAKES_TENSORS:
            return _NO_SLOTS  # most atoms: decided without looking at the arguments
        params = [(p.name, p.kind in ("tensor", "tensor?")) for p in callee.params]
        positional = [] if callee.variadic is not None else params
    else:
        params = positional = [(p.name, p.type == "tensor") for p in callee.params]
    tensors = {name for name, is_tensor in params if is_tensor}
    if not tensors:
        return _NO_SLOTS
    slots: set[int] = set()
    position = 0
    for i, arg in enumerate(node.args):
        if arg.name is None:
            if position < len(positional) and positional[position][1]:
                slots.add(i)
            position += 1
        elif arg.name in tensors:
            slots.add(i)
    return slots


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
