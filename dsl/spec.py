"""A checked spec: which pattern to run, its parameters, and what it needs at call time.

`load` parses and checks at compile time; `Spec.instantiate` evaluates the
pattern for concrete lengths, heads and grid sizes into one `ir.HeadPattern`
per head, sharing identical heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import ast, ir
from .errors import MaskError, MaskSyntaxError, MaskTypeError, Span
from .lower import BUILTIN_NAMES, Definition, Sizes, Unit, Walker, free_names, pattern_nodes
from .parser import parse
from .values import INT, INT_LIMIT, POSITION_LIMIT, Env, Unknown, type_name

LibraryLookup = Callable[[str], "Definition | None"]


class _Resolver:
    """Looks names up in the spec's own definitions first, then the library."""

    def __init__(self, local: dict[str, Definition], library: LibraryLookup | None, library_names) -> None:
        self.local = local
        self.library = library
        self.library_names = library_names

    def __call__(self, name: str) -> Definition | None:
        if name in self.local:
            return self.local[name]
        return self.library(name) if self.library else None

    def names(self) -> list[str]:
        return [*self.local, *(self.library_names() if self.library_names else [])]


@dataclass
class Instance:
    """A pattern evaluated for concrete sizes: one `HeadPattern` per head."""

    sizes: Sizes
    patterns: list[ir.HeadPattern]  # distinct patterns
    head_group: list[int]  # head -> index into `patterns`
    grids: list[tuple[int, ...]] = field(default_factory=list)  # grids over the tokens

    @property
    def dynamic(self) -> bool:
        return any(ir.is_dynamic(p.mask) for p in self.patterns)


@dataclass
class Spec:
    """A parsed, checked pattern with its compile-time parameters fixed."""

    name: str | None
    body: ast.Body
    definition: Definition | None
    unit: Unit
    resolver: _Resolver
    params: dict[str, object]
    call_params: list[str] = field(default_factory=list)
    tensor_params: list[str] = field(default_factory=list)
    size_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.definition is not None:
            d = self.definition.node
            self.tensor_params = [p.name for p in d.params if p.type == "tensor"]
            self.call_params = [
                p.name for p in d.params if p.type != "tensor" and p.default is None and p.name not in self.params
            ]
        self.size_names = self._size_names()
        _, _, tensors = self._walk(None, None)  # compile-time checks
        # Tensors bound when calling: the entry's tensor parameters, then the names
        # the walk met where a tensor goes (`segments(ids)`, or the tensor
        # parameter of a called pattern left out, bound under its own name).
        self.tensor_params = [*self.tensor_params, *(n for n in tensors if n not in self.tensor_params)]

    # ------------------------------------------------------------------ queries

    def source_text(self) -> str:
        return self.unit.source

    def bindable(self) -> list[str]:
        """Integer names a caller may (or must) bind: grid sizes, call-time parameters."""
        return [*self.call_params, *(n for n in self.size_names if n not in self.call_params)]

    def _size_names(self) -> list[str]:
        names: list[str] = []
        seen: set[str] = set()
        pending: list[tuple[ast.PatternDef | None, ast.Body]] = [
            (self.definition.node if self.definition else None, self.body)
        ]
        while pending:
            d, body = pending.pop()
            nodes = list(pattern_nodes(body))
            names.extend(n for n in free_names(d, body, nodes) if n not in names)
            for node in nodes:
                if isinstance(node, ast.Call) and node.name not in seen:
                    seen.add(node.name)  # looked up once, found or not (atoms are not)
                    callee = self.resolver(node.name)
                    if callee is not None:
                        pending.append((callee.node, callee.node.body))
        return names

    # ------------------------------------------------------------------ evaluation

    def _walk(self, sizes: Sizes | None, head: int | None) -> tuple[ir.HeadPattern, list, list[str]]:
        walker = Walker(self.resolver, sizes, head)
        if self.definition is None:
            if sizes is not None:
                self._require_sizes(sizes)
            env_names = dict(walker.builtins())
            for name in self.size_names:
                env_names[name] = sizes.names[name] if sizes else INT
            env = Env(env_names)
        else:
            # Values given to compile(**params) are reported at their parameter.
            spans = {p.name: p.span for p in self.definition.node.params}
            given = {k: (v, spans[k]) for k, v in self.params.items()}
            if sizes is not None:
                self._require_sizes(sizes)
            try:
                env = walker.definition_env(
                    self.definition,
                    given,
                    self.definition.node.span,
                    missing=lambda p: sizes.names[p.name] if sizes else Unknown(p.type or "int"),
                )
            except MaskError as e:
                raise e.with_source(self.definition.unit.source, self.definition.unit.filename) from None
        mask = walker.body(self.body, env, walker.top_frame(), self.unit)
        return ir.HeadPattern(mask, tuple(walker.modifiers)), walker.grids, list(walker.tensors)

    def _require_sizes(self, sizes: Sizes) -> None:
        for name in self.bindable():
            if name not in sizes.names:
                kind = "parameter" if name in self.call_params else "grid size"
                raise MaskTypeError(
                    f"{kind} '{name}' is not bound: pass {name}=... when calling the pattern",
                    self.name_span(name),
                ).with_source(self.unit.source, self.unit.filename)

    def name_span(self, name: str) -> Span:
        """Where `name` is first written in the pattern (its parameter or a use), for errors."""
        stack: list[object] = [self.definition.node if self.definition else self.body]
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.Name, ast.Param)) and getattr(node, "name", getattr(node, "id", None)) == name:
                return node.span
            stack.extend(ast.children(node))
        return self.body.span

    def infer_sizes(self, lk: int, names: dict[str, int]) -> dict[str, int]:
        """Fill in one missing grid size from lk and the others (h from lk // w)."""
        missing = [n for n in self.size_names if n not in names and n not in self.call_params]
        if len(missing) != 1:
            return names
        known = {**self.literal_params(), **names}
        for sizes in self.grid_sizes():
            if not any(isinstance(v, ast.Name) and v.id == missing[0] for v in sizes):
                continue
            known_product = 1
            for v in sizes:
                if isinstance(v, ast.IntLit):
                    known_product *= v.value
                elif isinstance(v, ast.Name) and isinstance(known.get(v.id), int):
                    known_product *= known[v.id]
                elif not (isinstance(v, ast.Name) and v.id == missing[0]):
                    break
            else:
                if known_product > 0 and lk % known_product == 0:
                    return {**names, missing[0]: lk // known_product}
        return names

    def literal_params(self) -> dict[str, int]:
        """The entry's integer parameters known without evaluation: given ones, literal defaults."""
        out: dict[str, int] = {}
        if self.definition is not None:
            for p in self.definition.node.params:
                if isinstance(p.default, ast.IntLit):
                    out[p.name] = p.default.value
        out.update({k: v for k, v in self.params.items() if isinstance(v, int) and not isinstance(v, bool)})
        return out

    def modifier_names(self) -> set[str]:
        """Names of the modifiers this pattern (with the patterns it calls) applies."""
        return {m.name for node in self.reachable_nodes() if isinstance(node, ast.Body) for m in node.modifiers}

    def grid_sizes(self) -> Iterable[tuple]:
        """The size expressions of every grid the pattern (with its callees) declares."""
        for node in self.reachable_nodes():
            if isinstance(node, ast.Body) and node.grid is not None:
                yield node.grid
            if isinstance(node, ast.OnGrid):
                yield node.sizes

    def reachable_nodes(self) -> Iterable[object]:
        """Every AST node of the body and of the patterns it calls (each callee once)."""
        stack: list[object] = [self.body]
        seen: set[str] = set()
        while stack:
            node = stack.pop()
            yield node
            if isinstance(node, ast.Call) and node.name not in seen:
                callee = self.resolver(node.name)
                if callee is not None:
                    seen.add(node.name)
                    stack.append(callee.node.body)
            stack.extend(ast.children(node))

    def instantiate(
        self,
        lq: int,
        lk: int | None = None,
        *,
        heads: int = 1,
        q_offset: int | None = None,
        sizes: dict[str, int] | None = None,
    ) -> Instance:
        """Evaluate the pattern for concrete sizes; raise `MaskTypeError` if they do not fit."""
        lk = lq if lk is None else lk
        for name, value in (("lq", lq), ("lk", lk), ("heads", heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MaskTypeError(f"{name} must be a positive integer, got {value!r}")
            if value > INT_LIMIT:
                raise MaskTypeError(f"{name} = {value} is too large (limit 2**62)")
        if q_offset is None:
            q_offset = lk - lq
        if not isinstance(q_offset, int) or isinstance(q_offset, bool):
            raise MaskTypeError(f"q_offset must be an integer, got {q_offset!r}")
        _check_positions(lq, lk, q_offset)
        names = self.infer_sizes(lk, dict(sizes or {}))
        for name, value in names.items():
            if name not in self.bindable():
                allowed = ", ".join(self.bindable()) or "none"
                raise MaskTypeError(f"unknown binding '{name}' (this pattern binds: {allowed})")
            if not isinstance(value, int) or isinstance(value, bool):
                raise MaskTypeError(f"binding '{name}' must be an integer, got {type_name(value)}")
            if abs(value) > INT_LIMIT:
                raise MaskTypeError(f"binding '{name}' = {value} is too large (limit ±2**62)")
        s = Sizes(lq, lk, heads, q_offset, names)
        patterns: list[ir.HeadPattern] = []
        index: dict[ir.HeadPattern, int] = {}
        groups: list[int] = []
        grids: list[tuple[int, ...]] = []
        for head in range(heads):
            pattern, head_grids, _ = self._walk(s, head)
            grids.extend(g for g in head_grids if g not in grids)
            if pattern not in index:
                index[pattern] = len(patterns)
                patterns.append(pattern)
            groups.append(index[pattern])
        return Instance(s, patterns, groups, grids)


def load(
    text: str,
    *,
    filename: str | None = None,
    pattern: str | None = None,
    params: dict[str, object] | None = None,
    library: LibraryLookup | None = None,
    library_names: Callable[[], list[str]] | None = None,
) -> Spec:
    """Parse and check spec text; pick the pattern to run; fix compile-time parameters."""
    module = parse(text, filename)
    unit = Unit(text, filename)
    local: dict[str, Definition] = {}
    for d in module.defs:
        if d.name in local:
            raise MaskTypeError(f"pattern '{d.name}' is defined twice", d.span).with_source(text, filename)
        _check_params(d, unit)
        local[d.name] = Definition(d, unit)
    resolver = _Resolver(local, library, library_names)
    params = dict(params or {})
    definition: Definition | None
    if pattern is not None:
        if not isinstance(pattern, str):
            raise MaskTypeError(f"pattern= takes a pattern's name, not {type(pattern).__name__}")
        if pattern not in local:
            names = ", ".join(local) or "none"
            raise MaskTypeError(f"the spec defines no pattern '{pattern}' (it defines: {names})")
        definition, body = local[pattern], local[pattern].node.body
    elif module.main is not None:
        definition, body = None, module.main
    elif len(module.defs) == 1:
        definition, body = local[module.defs[0].name], module.defs[0].body
    elif not module.defs:
        raise MaskSyntaxError(
            "the spec is empty: write a pattern such as 'causal & window(256)'", Span(1, 1, 1, 2)
        ).with_source(text, filename)
    else:
        names = ", ".join(local)
        raise MaskTypeError(
            f"the spec defines several patterns ({names}); choose one with pattern=...",
            module.defs[1].span,
        ).with_source(text, filename)
    try:
        _check_given_params(definition, params)
    except MaskTypeError as e:
        # Point at the parameter, else at the definition that takes the parameters
        # (or the bare expression, which takes none).
        where = definition.unit if definition else unit
        if e.span is None:
            node = definition.node if definition else body
            header = f"pattern {definition.node.name}" if definition else ""
            end = node.span.column + len(header) if header else node.span.end_column
            e.span = Span(node.span.line, node.span.column, node.span.line, end)
        raise e.with_source(where.source, where.filename) from None
    return Spec(
        definition.node.name if definition else None,
        body,
        definition,
        unit,
        resolver,
        params,
    )


def _check_params(d: ast.PatternDef, unit: Unit) -> None:
    seen: set[str] = set()
    for p in d.params:
        if p.name in seen:
            raise MaskTypeError(f"parameter '{p.name}' appears twice", p.span).with_source(unit.source, unit.filename)
        if p.name in BUILTIN_NAMES:
            raise MaskTypeError(f"'{p.name}' is a built-in name and cannot be a parameter", p.span).with_source(
                unit.source, unit.filename
            )
        if p.type == "tensor" and p.default is not None:
            raise MaskTypeError(f"tensor parameter '{p.name}' cannot have a default", p.span).with_source(
                unit.source, unit.filename
            )
        seen.add(p.name)


def _check_given_params(definition: Definition | None, params: dict[str, object]) -> None:
    declared = {p.name: p for p in definition.node.params} if definition else {}
    for name, value in params.items():
        if name not in declared:
            names = ", ".join(declared) or "none"
            raise MaskTypeError(f"the pattern has no parameter '{name}' (its parameters: {names})")
        p = declared[name]
        if p.type == "tensor":
            raise MaskTypeError(f"'{name}' is a tensor parameter: pass it when calling the pattern", p.span)
        number = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and not (isinstance(value, float) and not math.isfinite(value))
        )
        # A bool may go to a bool parameter or an untyped one whose default is not a number
        # (the walk checks it against how the parameter is used).
        flag = isinstance(value, bool) and (
            p.type == "bool" or (p.type is None and not isinstance(p.default, (ast.IntLit, ast.FloatLit)))
        )
        if not (number or flag):
            raise MaskTypeError(f"parameter '{name}' must be a number or bool, got {value!r}", p.span)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT:
            raise MaskTypeError(f"parameter '{name}' = {value} is too large (limit ±2**62)", p.span)


def _check_positions(lq: int, lk: int, q_offset: int) -> None:
    """Every token position must lie in [-2**30, 2**30) (see values.POSITION_LIMIT)."""
    first, last = q_offset, q_offset + lq - 1
    if lk > POSITION_LIMIT or first < -POSITION_LIMIT or last >= POSITION_LIMIT:
        raise MaskTypeError(
            f"token positions must lie in [-2**30, 2**30): queries span {first} .. {last} "
            f"(q_offset = {q_offset}, lq = {lq}), keys 0 .. {lk - 1}"
        )
