"""The canonical printer: `parse(to_text(tree)) == tree`, and printing is idempotent.

Parentheses appear exactly where precedence needs them, so the printed form is
also the normal way to write a spec (one definition per line).
"""

from __future__ import annotations

import re

from . import ast

# Pattern-level precedence: | < & < - < ~ < primary.
_SET_PREC = {"|": 1, "&": 2, "-": 3}
_COMPLEMENT_PREC = 4
_PRIMARY_PREC = 5

# Value-level precedence: range/set items < comparison < sum < product < negate < atom.
_VALUE_PREC = {"+": 2, "-": 2, "*": 3, "//": 3, "%": 3}
_COMPARE_OPS = {"==", "!=", "<", "<=", ">", ">="}
_RANGE_PREC, _COMPARE_PREC, _SUM_PREC, _NEG_PREC, _ATOM_PREC = 0, 1, 2, 4, 5

# A printed definition ends in a bare call exactly when it ends in a name character.
_ENDS_WITH_NAME = re.compile(r"[A-Za-z0-9_]$")


def to_text(node: object) -> str:
    """Print any AST node (module, definition, body, expression or value)."""
    if isinstance(node, ast.Module):
        parts = [_definition(d) for d in node.defs]
        if node.main is not None:
            main = _body(node.main, header_grid=False)
            if parts:
                # After a definition, "on grid(...)" would read as that definition's
                # grid: a bare expression starting with it goes in parentheses.
                if main.startswith("on grid"):
                    main = _body(node.main, header_grid=False, parenthesise=True)
                # "x" then "(a | b) - c" would read as the call "x(a | b) - c":
                # a definition ending in a bare call gets "()", which means the same.
                if main.startswith("(") and _ENDS_WITH_NAME.search(parts[-1]):
                    parts[-1] += "()"
            parts.append(main)
        return "\n".join(parts) + ("\n" if parts else "")
    if isinstance(node, ast.PatternDef):
        return _definition(node)
    if isinstance(node, ast.Body):
        return _body(node, header_grid=False)
    if isinstance(node, ast.Arg):
        return _arg(node)
    if isinstance(node, ast.Param):
        return _param(node)
    if isinstance(node, ast.HeadCase):
        return _head_case(node)
    if isinstance(node, (ast.Call, ast.SetOp, ast.Complement, ast.OnBlocks, ast.OnGrid, ast.PerHead)):
        return _expr(node, 0)
    return _value(node, 0)


def _definition(d: ast.PatternDef) -> str:
    params = ", ".join(_param(p) for p in d.params)
    grid = f" on grid({values_text(d.body.grid)})" if d.body.grid is not None else ""
    return f"pattern {d.name}({params}){grid} = {_body(d.body, header_grid=True)}"


def _param(p: ast.Param) -> str:
    text = p.name
    if p.type is not None:
        text += f": {p.type}"
    if p.default is not None:
        text += f" = {_value(p.default, 0)}"
    return text


def _body(b: ast.Body, header_grid: bool, parenthesise: bool = False) -> str:
    text = _expr(b.expr, _PRIMARY_PREC + 1 if parenthesise else 0)
    if b.modifiers:
        text += " with " + ", ".join(_expr(m, _PRIMARY_PREC) for m in b.modifiers)
    if b.grid is not None and not header_grid:
        text += f" on grid({values_text(b.grid)})"
    return text


def _expr(e: object, min_prec: int) -> str:
    if isinstance(e, ast.SetOp):
        prec = _SET_PREC[e.op]
        first, *rest = e.operands
        text = f" {e.op} ".join([_expr(first, prec), *(_expr(x, prec + 1) for x in rest)])
    elif isinstance(e, ast.Complement):
        prec = _COMPLEMENT_PREC
        text = "~" + _expr(e.operand, _COMPLEMENT_PREC)
    else:
        prec = _PRIMARY_PREC
        if isinstance(e, ast.Call):
            text = e.name if not e.args else f"{e.name}({', '.join(_arg(a) for a in e.args)})"
        elif isinstance(e, ast.OnBlocks):
            text = f"on blocks({_value(e.size, 0)}) {_expr(e.body, _PRIMARY_PREC)}"
        elif isinstance(e, ast.OnGrid):
            text = f"on grid({values_text(e.sizes)}) {_expr(e.body, _PRIMARY_PREC)}"
        elif isinstance(e, ast.PerHead):
            text = "heads { " + "; ".join(_head_case(c) for c in e.cases) + " }"
        else:
            raise TypeError(f"not a pattern expression: {e!r}")
    return f"({text})" if prec < min_prec else text


def _head_case(c: ast.HeadCase) -> str:
    return f"{_value(c.start, _SUM_PREC)} .. {_value(c.stop, _SUM_PREC)}: {_expr(c.body, 0)}"


def _arg(a: ast.Arg) -> str:
    value = _value(a.value, 0)
    return value if a.name is None else f"{a.name} = {value}"


def values_text(values: tuple) -> str:
    """Argument values as written in the language, comma-separated: `h, w` or `(3, 3), 2`."""
    return ", ".join(_value(v, 0) for v in values)


def _value(v: object, min_prec: int) -> str:
    if isinstance(v, ast.IntLit):
        prec, text = _ATOM_PREC, str(v.value)
        if v.value < 0:
            prec, text = _NEG_PREC, f"-{-v.value}"
    elif isinstance(v, ast.FloatLit):
        prec, text = _ATOM_PREC, repr(float(v.value))
    elif isinstance(v, ast.BoolLit):
        prec, text = _ATOM_PREC, "true" if v.value else "false"
    elif isinstance(v, ast.StrLit):
        prec, text = _ATOM_PREC, f'"{v.value}"'
    elif isinstance(v, ast.Name):
        prec, text = _ATOM_PREC, v.id
    elif isinstance(v, ast.Func):
        prec, text = _ATOM_PREC, f"{v.name}({values_text(v.args)})"
    elif isinstance(v, ast.Tuple):
        prec, text = _ATOM_PREC, f"({values_text(v.items)})"
    elif isinstance(v, ast.Negate):
        prec, text = _NEG_PREC, "-" + _value(v.operand, _NEG_PREC)
    elif isinstance(v, ast.BinOp) and v.op in _COMPARE_OPS:
        prec = _COMPARE_PREC
        left, right = v.operands
        text = f"{_value(left, _SUM_PREC)} {v.op} {_value(right, _SUM_PREC)}"
    elif isinstance(v, ast.BinOp):
        prec = _VALUE_PREC[v.op]
        first, *rest = v.operands
        parts = [_value(first, prec)]
        for op, x in zip(v.ops, rest, strict=True):
            parts += (op, _value(x, prec + 1))
        text = " ".join(parts)
    elif isinstance(v, ast.Range):
        prec = _RANGE_PREC
        text = f"{_value(v.start, _SUM_PREC)} .. {_value(v.stop, _SUM_PREC)}"
    elif isinstance(v, ast.ModEq):
        prec = _RANGE_PREC
        text = f"% {_value(v.modulus, _SUM_PREC)} == {_value(v.residue, _SUM_PREC)}"
    elif isinstance(v, ast.ModIn):
        prec = _RANGE_PREC
        text = f"% {_value(v.modulus, _SUM_PREC)} in {_value(v.start, _SUM_PREC)} .. {_value(v.stop, _SUM_PREC)}"
    else:
        raise TypeError(f"not a value: {v!r}")
    return f"({text})" if prec < min_prec else text
