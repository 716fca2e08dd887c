"""Printing and parsing are inverse: `parse(to_text(tree)) == tree`, and the printed
form is a fixed point (`to_text(parse(to_text(tree))) == to_text(tree)`)."""

from __future__ import annotations

import functools
import re
from importlib import resources

import lark
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from maskc.dsl import MaskSyntaxError, ast, parse, to_text
from strategies import bodies, exprs, modules, mutate, token_soups, valid_specs, values

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _main_expr(text: str):
    return parse(text).main.expr


# ---------------------------------------------------------------- properties


@PROPERTY
@given(modules())
def test_module_round_trip_and_idempotent_printing(module: ast.Module) -> None:
    text = to_text(module)
    reparsed = parse(text)
    assert reparsed == module, text
    assert to_text(reparsed) == text


@PROPERTY
@given(bodies())
def test_body_round_trip(body: ast.Body) -> None:
    text = to_text(body)
    assert parse(text).main == body, text


@PROPERTY
@given(values(8))
def test_value_round_trip(value) -> None:
    # Every value can stand as a call argument.
    text = f"f({to_text(value)})"
    assert _main_expr(text).args[0].value == value, text


@PROPERTY
@given(exprs(10))
def test_expression_round_trip(expr) -> None:
    text = to_text(expr)
    assert _main_expr(text) == expr, text


@settings(PROPERTY, max_examples=60)
@given(st.lists(modules(), min_size=2, max_size=2))
def test_concatenated_modules_round_trip(parts: list[ast.Module]) -> None:
    """Definitions printed one after another (the way a file grows) keep their meaning."""
    defs = tuple(d for m in parts for d in m.defs)
    module = ast.Module(defs, parts[-1].main)
    assert parse(to_text(module)) == module


@PROPERTY
@given(valid_specs())
def test_valid_spec_text_reprints_to_the_same_tree(text: str) -> None:
    tree = parse(text)
    printed = to_text(tree)
    assert parse(printed) == tree
    assert to_text(parse(printed)) == printed


@PROPERTY
@given(
    st.one_of(
        token_soups(20),
        st.text(alphabet='()|&-~ ,.0123456789%=<>!*/abcdeghiklmnoprstwy{};:\n#"', max_size=40),
    )
)
def test_anything_that_parses_reprints_to_the_same_tree(text: str) -> None:
    try:
        tree = parse(text)
    except ValueError:
        return
    printed = to_text(tree)
    assert parse(printed) == tree, (text, printed)


# ---------------------------------------------------------------- examples

LANGUAGE_EXAMPLES = """\
# patterns/longformer.mask
# Longformer (Beltagy et al. 2020): sliding window plus symmetric global tokens.
pattern longformer(w = 256, g = 1) = window(w) | global(0 .. g)

pattern mistral(w = 4096) = causal & window(w, 0)
pattern natten2d(k = 7, d = 1) on grid(h, w) = neighborhood((k, k), dilation = (d, d))
pattern s2(b = 64, local = 16, s = 8) =
    causal & on blocks(b) (window(local - 1, 0) | keys(% s == (s - head % s) % s))
pattern ppma(alpha: tensor, beta: tensor) on grid(h, w) = all with polyline(alpha, beta)
"""

CANONICAL = """\
pattern longformer(w = 256, g = 1) = window(w) | global(0 .. g)
pattern mistral(w = 4096) = causal & window(w, 0)
pattern natten2d(k = 7, d = 1) on grid(h, w) = neighborhood((k, k), dilation = (d, d))
pattern s2(b = 64, local = 16, s = 8) = causal & on blocks(b) (window(local - 1, 0) | keys(% s == (s - head % s) % s))
pattern ppma(alpha: tensor, beta: tensor) on grid(h, w) = all with polyline(alpha, beta)
"""


def test_language_examples_print_canonically() -> None:
    module = parse(LANGUAGE_EXAMPLES)
    assert [d.name for d in module.defs] == ["longformer", "mistral", "natten2d", "s2", "ppma"]
    assert module.main is None
    assert to_text(module) == CANONICAL
    assert parse(CANONICAL) == module


def test_language_examples_tree_shape() -> None:
    module = parse(LANGUAGE_EXAMPLES)
    longformer, mistral, natten, s2, ppma = module.defs
    assert longformer.params == (
        ast.Param("w", None, ast.IntLit(256)),
        ast.Param("g", None, ast.IntLit(1)),
    )
    assert longformer.body.expr == ast.SetOp(
        "|",
        ast.Call("window", (ast.Arg(None, ast.Name("w")),)),
        ast.Call("global", (ast.Arg(None, ast.Range(ast.IntLit(0), ast.Name("g"))),)),
    )
    assert mistral.body.expr.op == "&"
    assert natten.body.grid == (ast.Name("h"), ast.Name("w"))
    dilation = natten.body.expr.args[1]
    assert dilation.name == "dilation"
    assert dilation.value == ast.Tuple((ast.Name("d"), ast.Name("d")))
    inner = s2.body.expr.right
    assert isinstance(inner, ast.OnBlocks)
    keys = inner.body.right
    assert keys.args[0].value == ast.ModEq(
        ast.Name("s"),
        ast.BinOp(
            "%",
            ast.BinOp("-", ast.Name("s"), ast.BinOp("%", ast.Name("head"), ast.Name("s"))),
            ast.Name("s"),
        ),
    )
    assert [p.type for p in ppma.params] == ["tensor", "tensor"]
    assert ppma.body.modifiers == (
        ast.Call("polyline", (ast.Arg(None, ast.Name("alpha")), ast.Arg(None, ast.Name("beta")))),
    )


@pytest.mark.parametrize(
    "text",
    [
        "causal & window(4096)",
        "neighborhood((7, 7)) on grid(h, w)",
        "route(topk = 4, block = 64)",
        "all with polyline(alpha, beta)",
        "longformer(w = 128) & causal",
        "heads { 0 .. 4: causal; 4 .. 8: window(3) }",
        "causal & (window(1023, 0) | sink(4))",
        "all with alibi, softcap(30.0) on grid(4, 4)",
        "keys(0 .. 4, % 8 == 3, % 16 in 2 .. 5, 7)",
        "~causal - block(4) & stride(2) | none",
        "window(min(lq, lk) // 2 + abs(-3), max(1, 2, 3))",
        "random(2, block = 4, seed = 7, among = 0 .. 8, skip = 1)",
        'all with polyline(a, b, path = "vh")',
        "on grid(t, h, w) on blocks((1, 2, 2)) window((0, 1, 1))",
        "keys(% 2 == (head < heads // 2) * 1)",
        "heads { 0 .. heads: causal }",
    ],
)
def test_examples_are_canonical(text: str) -> None:
    tree = parse(text)
    assert to_text(tree) == text + "\n"
    assert parse(to_text(tree)) == tree


def test_set_operator_precedence() -> None:
    """~ binds tightest, then -, then &, then | (Python's sets)."""
    assert to_text(parse("a | b & c - ~d")) == "a | b & c - ~d\n"
    expr = _main_expr("a | b & c - ~d")
    assert expr == ast.SetOp(
        "|",
        ast.Call("a"),
        ast.SetOp("&", ast.Call("b"), ast.SetOp("-", ast.Call("c"), ast.Complement(ast.Call("d")))),
    )
    # Left associative; parentheses only where needed.
    assert to_text(parse("(a - b) - c")) == "a - b - c\n"
    assert to_text(parse("a - (b - c)")) == "a - (b - c)\n"
    assert to_text(parse("((a | b)) & ~(c & d)")) == "(a | b) & ~(c & d)\n"
    assert to_text(parse("~~a")) == "~~a\n"


def test_value_precedence() -> None:
    assert to_text(parse("f(1 + 2 * 3 - 4 // 2 % 3)")) == "f(1 + 2 * 3 - 4 // 2 % 3)\n"
    assert to_text(parse("f((1 + 2) * 3, 1 - (2 - 3), -(-x), --x)")) == "f((1 + 2) * 3, 1 - (2 - 3), --x, --x)\n"
    assert to_text(parse("f((a < b) == (c >= d), a + 1 != b)")) == "f((a < b) == (c >= d), a + 1 != b)\n"
    assert to_text(parse("f((0 .. 4) .. 3, (% 2 == 1), -(a + b))")) == "f((0 .. 4) .. 3, % 2 == 1, -(a + b))\n"


def test_comments_and_whitespace_are_ignored() -> None:
    text = """
    # leading comment
    pattern p(w = 3) =   # after the header
        window(w)        # the window
        |                # union
        sink(2)
    # between definitions

    pattern q() = p(w = 4)#no space
    # trailing comment"""
    module = parse(text)
    assert to_text(module) == "pattern p(w = 3) = window(w) | sink(2)\npattern q() = p(w = 4)\n"
    assert parse(to_text(module)) == module


def test_hash_inside_a_string_is_not_a_comment() -> None:
    tree = parse('all with polyline(a, b, path = "#vh")')
    assert tree.main.modifiers[0].args[2].value == ast.StrLit("#vh")
    assert parse(to_text(tree)) == tree


def test_multi_line_definitions() -> None:
    text = """\
pattern big(
    w = 3,
    n: int,
    scale: float = 0.5,
    flag: bool = true,
    ids: tensor,
) on grid(
    h,
    w
) =
    heads {
        0 .. heads // 2: window(w);
        heads // 2 .. heads: segments(ids);
    }
    with
        softcap(30),
        alibi
"""
    module = parse(text)
    (d,) = module.defs
    assert [(p.name, p.type) for p in d.params] == [
        ("w", None),
        ("n", "int"),
        ("scale", "float"),
        ("flag", "bool"),
        ("ids", "tensor"),
    ]
    assert d.params[2].default == ast.FloatLit(0.5)
    assert d.params[3].default == ast.BoolLit(True)
    assert d.body.grid == (ast.Name("h"), ast.Name("w"))
    assert len(d.body.expr.cases) == 2
    assert [m.name for m in d.body.modifiers] == ["softcap", "alibi"]
    printed = to_text(module)
    assert "\n" not in printed.rstrip("\n")
    assert parse(printed) == module


def test_header_grid_and_suffix_grid_are_the_same_tree() -> None:
    header = parse("pattern p(k = 3) on grid(h, w) = neighborhood(k)")
    suffix = parse("pattern p(k = 3) = neighborhood(k) on grid(h, w)")
    assert header == suffix
    # The printer puts a definition's grid in its header ...
    assert to_text(suffix) == "pattern p(k = 3) on grid(h, w) = neighborhood(k)\n"
    # ... and a bare body's grid after it.
    assert to_text(parse("neighborhood(3) on grid(h, w)")) == "neighborhood(3) on grid(h, w)\n"


def test_suffix_grid_differs_from_prefix_grid() -> None:
    suffix = parse("window(1) on grid(2, 3)").main
    prefix = parse("on grid(2, 3) window(1)").main
    assert suffix.grid == (ast.IntLit(2), ast.IntLit(3))
    assert isinstance(prefix.expr, ast.OnGrid) and prefix.grid is None
    assert suffix != prefix
    # Both at once: the prefix grid is part of the expression.
    both = parse("on grid(2, 3) window(1) on grid(6)").main
    assert isinstance(both.expr, ast.OnGrid) and both.grid == (ast.IntLit(6),)
    assert parse(to_text(both)) == parse("on grid(2, 3) window(1) on grid(6)")


def test_bare_call_then_parenthesised_body() -> None:
    """A definition ending in a bare call, followed by a body starting with '(':
    the printer must not glue them into one call."""
    module = ast.Module(
        (ast.PatternDef("p", (), ast.Body(ast.Call("x"))),),
        ast.Body(ast.SetOp("-", ast.SetOp("|", ast.Call("a"), ast.Call("b")), ast.Call("c"))),
    )
    text = to_text(module)
    assert parse(text) == module, text
    assert to_text(parse(text)) == text


def test_definition_then_bare_expression_starting_with_on() -> None:
    # "on blocks" after a definition starts the bare expression ...
    module = parse("pattern p() = x\non blocks(2) y")
    assert module.defs[0].body == ast.Body(ast.Call("x"))
    assert module.main == ast.Body(ast.OnBlocks(ast.IntLit(2), ast.Call("y")))
    assert parse(to_text(module)) == module
    # ... while "on grid" continues the definition (its grid), so a bare
    # expression starting with "on grid" is printed in parentheses.
    assert parse("pattern p() = x\non grid(2)").defs[0].body.grid == (ast.IntLit(2),)
    module = ast.Module(
        (ast.PatternDef("p", (), ast.Body(ast.Call("x"))),),
        ast.Body(ast.SetOp("|", ast.OnGrid((ast.IntLit(2),), ast.Call("y")), ast.Call("z"))),
    )
    text = to_text(module)
    assert text == "pattern p() = x()\n(on grid(2) y | z)\n"
    assert parse(text) == module


def test_infinite_float_literals_are_rejected() -> None:
    # 1e400 would read as inf, which has no literal to print back.
    for text in ["all with softcap(1e400)", "f(1" + "0" * 400 + ".0)"]:
        with pytest.raises(MaskSyntaxError, match="too large"):
            parse(text)


def test_empty_module() -> None:
    assert to_text(ast.Module()) == ""
    assert parse("") == ast.Module()
    assert parse("  # only a comment\n\n") == ast.Module()


def test_trailing_commas() -> None:
    assert parse("pattern p(a = 1,) = f(a, b = 2,)") == parse("pattern p(a = 1) = f(a, b = 2)")
    assert parse("f((1, 2,))") == parse("f((1, 2))")
    assert parse("heads { 0 .. 1: a; }") == parse("heads { 0 .. 1: a }")


def test_call_without_arguments_equals_bare_name() -> None:
    assert parse("causal()") == parse("causal")
    assert to_text(parse("all with alibi()")) == "all with alibi\n"


def test_floats_print_exactly() -> None:
    for value in (0.0, 0.1, 1e-7, 2.5e300, 1e16, 123456789.125, 5e-324, 1.7976931348623157e308):
        tree = ast.Module((), ast.Body(ast.Call("f", (ast.Arg(None, ast.FloatLit(value)),))))
        assert parse(to_text(tree)) == tree, to_text(tree)


def test_huge_integers_round_trip() -> None:
    big = 10**40
    tree = parse(f"window({big})")
    assert tree.main.expr.args[0].value == ast.IntLit(big)
    assert to_text(tree) == f"window({big})\n"


def test_keyword_prefixed_names() -> None:
    text = "pattern index(ongoing = 1, integer = 2, truey = 3) = window(ongoing + integer + truey)\n"
    assert to_text(parse(text)) == text
    # Names spelled like types are ordinary names in values.
    assert _main_expr("f(int, tensor)").args[0].value == ast.Name("int")


def test_spans_are_excluded_from_equality_but_present() -> None:
    a = parse("window(3)")
    b = parse("\n\n   window( 3 )")
    assert a == b
    assert a.main.expr.span.line == 1 and b.main.expr.span.line == 3
    assert b.main.expr.args[0].value.span.column == 12


# ---------------------------------------------------------------- the reference grammar

# lark's contextual lexer splits a keyword off the front of a longer word where
# only the keyword may come ("ongrid" reads "on grid", "withalibi" "with alibi");
# the parser reads words whole.  Texts with such words are left out.
_GLUED_KEYWORD = re.compile(r"(?<![A-Za-z0-9_])(on|with|grid|blocks|heads|pattern|in)[A-Za-z0-9_]")


@functools.cache
def _reference() -> lark.Lark:
    return lark.Lark(resources.files("maskc.dsl").joinpath("grammar.lark").read_text(), parser="lalr")


def _reference_accepts(text: str) -> bool:
    try:
        _reference().parse(text)
    except lark.exceptions.LarkError:
        return False
    return True


def _accepts(text: str) -> bool:
    try:
        parse(text)
    except MaskSyntaxError as e:
        # Checks the grammar does not make: literals too large, two grids.
        return "too large" in e.message or "one grid" in e.message
    return True


@PROPERTY
@given(
    st.one_of(
        token_soups(20),
        valid_specs().flatmap(lambda t: mutate(t, 2)),
        st.builds(to_text, modules()),
        st.text(alphabet='()|&-~ ,.0123456789%=<>!*/abcdeghiklmnoprstwy{};:\n#"', max_size=40),
    )
)
def test_the_parser_accepts_what_the_reference_grammar_accepts(text: str) -> None:
    """dsl/grammar.lark is the language's reference; the parser is written by hand."""
    assume(not _GLUED_KEYWORD.search(text))
    assert _accepts(text) == _reference_accepts(text), text


@PROPERTY
@given(modules())
def test_definitions_without_parameters_may_leave_out_the_parentheses(module: ast.Module) -> None:
    text = to_text(module)
    bare = re.sub(r"^pattern (\w+)\(\)", r"pattern \1", text, flags=re.MULTILINE)
    assert parse(bare) == module, bare


def test_chains_are_one_node_and_print_back() -> None:
    expr = _main_expr("a | b | (c | d) | e - f - (g - h)")
    assert expr == ast.SetOp(
        "|",
        ast.Call("a"),
        ast.Call("b"),
        ast.SetOp("|", ast.Call("c"), ast.Call("d")),
        ast.SetOp("-", ast.Call("e"), ast.Call("f"), ast.SetOp("-", ast.Call("g"), ast.Call("h"))),
    )
    # A parenthesised chain on the left continues the chain, as before.
    assert (
        _main_expr("(a - b) - c")
        == _main_expr("a - b - c")
        == ast.SetOp("-", ast.Call("a"), ast.Call("b"), ast.Call("c"))
    )
    # The binary view: the chain without its last operand, and that operand.
    assert expr.right == expr.operands[-1] and expr.left == ast.SetOp("|", *expr.operands[:3])
    value = _main_expr("f(1 + 2 * 3 - 4 // 2 % 3 + x)").args[0].value
    assert value.ops == ("+", "-", "+") and value.operands[1] == ast.BinOp(("*",), ast.IntLit(2), ast.IntLit(3))
    assert value.operands[2] == ast.BinOp(("//", "%"), ast.IntLit(4), ast.IntLit(2), ast.IntLit(3))
    text = "f(" + " - ".join(str(i) for i in range(5000)) + ") | " + " | ".join(["a"] * 5000)
    assert to_text(parse(text)) == text + "\n"
