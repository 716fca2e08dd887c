"""Error messages: the right class, the right place, the line quoted with a caret.

Every mistake below is checked for its class (`MaskSyntaxError` when the text
does not follow the grammar, `MaskTypeError` when it parses but means nothing),
its `.line` and `.column`, a message that says what is wrong, and a rendering
that quotes the offending line with a caret under the offending column.
"""

from __future__ import annotations

import pytest

import maskc
from maskc import MaskError, MaskSyntaxError, MaskTypeError


def caret_lines(error: MaskError) -> tuple[str, str, int]:
    """(quoted line, caret line, gutter width) from the rendered error."""
    rendered = str(error).split("\n")
    gutter = f"{error.line:>4} | "
    for i, line in enumerate(rendered):
        if line.startswith(gutter):
            return line[len(gutter) :], rendered[i + 1], len(gutter)
    raise AssertionError(f"no quoted line {error.line} in:\n{error}")


def check_location(error: MaskError, line: int, column: int, token: str | None = None) -> None:
    """`error` is at line:column, quotes that line, and puts its caret there
    (under `token` when given: the caret spans exactly the token)."""
    assert (error.line, error.column) == (line, column), str(error)
    where = error.filename or "<spec>"
    assert str(error).startswith(f"{where}:{line}:{column}: "), str(error)
    quoted, carets, gutter = caret_lines(error)
    source_line = error.source.split("\n")[line - 1]
    start = carets.index("^")
    assert carets[:start].strip() == ""
    if len(source_line) <= 100:
        assert quoted == source_line, (quoted, source_line)
        assert start == gutter + column - 1, str(error)
    else:  # a long line is quoted around the problem
        shown = quoted.removeprefix("...").removesuffix("...")
        assert shown in source_line and len(shown) == 100
        offset = len(quoted) - len(quoted.removeprefix("..."))
        assert source_line[column - 1 :].startswith(quoted[start - gutter : start - gutter + 1] or "")
        assert source_line.index(shown) + (start - gutter - offset) == column - 1
    if token is not None:
        assert source_line[column - 1 : column - 1 + len(token)] == token
        assert carets[start:] == "^" * len(token), str(error)


def compile_error(text: str, kind: type[MaskError], **params) -> MaskError:
    with pytest.raises(kind) as info:
        maskc.compile(text, **params)
    assert type(info.value) is kind
    return info.value


def mask_error(text: str, kind: type[MaskError], lq: int = 8, **kwargs) -> MaskError:
    program = maskc.compile(text)
    with pytest.raises(kind) as info:
        program.mask(lq, **kwargs)
    assert type(info.value) is kind
    return info.value


# ---------------------------------------------------------------- syntax errors

SYNTAX = [
    # text, line, column, caret token, words in the message
    ("causal &", 1, 9, None, "ends too early"),
    ("window(3", 1, 9, None, "ends too early"),
    ("causal & & window(3)", 1, 10, "&", "unexpected '&'"),
    ("causal $ window(3)", 1, 8, "$", "unexpected character '$'"),
    ("window(1,,2)", 1, 10, ",", "unexpected ','"),
    ("heads { 0 .. 2 causal }", 1, 16, "causal", "unexpected 'causal'"),
    ("pattern (x) = all", 1, 9, "(", "unexpected '('"),
    ("pattern p() =", 1, 14, None, "ends too early"),
    ("pattern p(w: integer) = all", 1, 14, "integer", "unexpected 'integer'"),
    ('all with polyline(a, b, path = "hv)', 1, 32, '"', "string must end"),
    ("window(3) window(4)", 1, 11, "window", "unexpected 'window'"),
    ("causal\n& window(3)\n| | sink(4)", 3, 3, "|", "unexpected '|'"),
    ("# a comment\n\n  causal &&", 3, 11, "&", "unexpected '&'"),
    ("pattern p() on grid(2) = all on grid(2, 3)", 1, 38, "2, 3", "one grid"),
    ("all with softcap(1e400)", 1, 18, "1e400", "too large"),
    ("window(" + "9" * 5000 + ")", 1, 8, None, "too large"),
    ("on blocks 4 all", 1, 11, "4", "unexpected '4'"),
    ("keys(% 4 = 1)", 1, 10, "=", "unexpected '='"),
]


@pytest.mark.parametrize(("text", "line", "column", "token", "words"), SYNTAX, ids=[s[0][:30] for s in SYNTAX])
def test_syntax_errors(text: str, line: int, column: int, token: str | None, words: str) -> None:
    error = compile_error(text, MaskSyntaxError)
    assert words in error.message
    check_location(error, line, column, token)


def test_syntax_error_lists_what_was_expected() -> None:
    error = compile_error("causal &", MaskSyntaxError)
    assert "expected" in error.message and "a name" in error.message and "'('" in error.message


def test_syntax_error_on_a_long_line_quotes_the_neighbourhood() -> None:
    text = "causal & " + " | ".join(f"window({i})" for i in range(40)) + " $ sink(1)"
    error = compile_error(text, MaskSyntaxError)
    assert error.column == text.index("$") + 1
    quoted, carets, gutter = caret_lines(error)
    assert len(quoted) <= 106 and quoted.startswith("...")  # 100 characters and "..."
    assert quoted[carets.index("^") - gutter] == "$"


def test_syntax_error_with_odd_whitespace_quotes_the_right_line() -> None:
    # A form feed or a carriage return does not start a line for the parser,
    # so it must not for the quote either.
    for text in ["causal\x0c&\nwindow(3)\n| $", "causal\r& window(3)\n  \n| $", "causal\r\n& window(3)\r\n| $"]:
        error = compile_error(text, MaskSyntaxError)
        assert error.line == 3
        quoted, carets, gutter = caret_lines(error)
        assert quoted == "| $"
        assert carets.index("^") - gutter == 2


def test_tabs_and_control_characters_keep_the_caret_aligned() -> None:
    error = compile_error("\twindow(3) \x1b $", MaskSyntaxError)
    assert error.column == 12
    quoted, carets, gutter = caret_lines(error)
    assert "\x1b" not in str(error)  # no terminal escapes from the spec
    assert quoted[carets.index("^") - gutter] == " "  # the control character, blanked
    error = compile_error("\twindow(3) $", MaskSyntaxError)
    quoted, carets, gutter = caret_lines(error)
    assert quoted[carets.index("^") - gutter] == "$"


def test_empty_spec() -> None:
    error = compile_error("  # nothing here\n", MaskSyntaxError)
    assert "empty" in error.message
    assert (error.line, error.column) == (1, 1)


# ---------------------------------------------------------------- type errors

TYPE = [
    # unknown names, with a suggestion
    ("windw(3)", 1, 1, "windw", ["unknown pattern 'windw'", "did you mean 'window'"]),
    ("causal & neighbourhood(3)", 1, 10, "neighbourhood", ["did you mean 'neighborhood'"]),
    ("causal | zzz", 1, 10, "zzz", ["unknown pattern 'zzz'"]),
    ("pattern longfrmr() = all\ncausal & longfrmer", 2, 10, "longfrmer", ["did you mean"]),
    ("window(w)", 1, 8, "w", ["unknown name 'w'"]),
    ("window(sqrt(4))", 1, 8, "sqrt(4)", ["unknown function 'sqrt'"]),
    ("all with softcp(3.0)", 1, 10, "softcp", ["unknown modifier 'softcp'", "did you mean 'softcap'"]),
    # arity and argument names
    ("window(1, 2, 3)", 1, 14, "3", ["takes at most 2 positional arguments"]),
    ("window()", 1, 1, "window()", ["needs argument 'l'"]),
    ("dilated(3)", 1, 1, "dilated(3)", ["needs argument 'd'"]),
    ("window(1, width = 2)", 1, 11, "width = 2", ["no argument 'width'"]),
    ("window(1, l = 2)", 1, 11, "l = 2", ["argument 'l' twice"]),
    ("keys()", 1, 1, "keys()", ["needs at least one position set"]),
    ("pattern p(a = 1) = window(a)\np(1, 2)", 2, 6, "2", ["p() takes 1 argument, got more"]),
    ("pattern p(a = 1) = window(a)\np(b = 2)", 2, 3, "b = 2", ["no parameter 'b'"]),
    ("pattern p(a) = window(a)\np | causal", 2, 1, "p", ["needs parameter 'a'"]),
    ("window(abs(1, 2))", 1, 8, "abs(1, 2)", ["abs() takes 1 argument"]),
    # wrong types
    ("window(true)", 1, 8, "true", ["must be an integer, got bool"]),
    ("window(1.5)", 1, 8, "1.5", ["must be an integer, got float"]),
    ('window("3")', 1, 8, '"3"', ["must be an integer, got string"]),
    ("window(0 .. 3)", 1, 8, "0 .. 3", ["must be an integer, got range"]),
    ("keys(true)", 1, 6, "true", ["position sets"]),
    ("neighborhood(3, causal = 1)", 1, 17, "causal = 1", ["must be true or false"]),
    ("all with softcap(true)", 1, 18, "true", ["must be a number"]),
    ('all with polyline(decay = 0.5, path = "xy")', 1, 32, 'path = "xy"', ['"hv" or "vh"']),
    ("window(1 + true)", 1, 12, "true", ["needs an integer, got bool"]),
    ("window(1 < true)", 1, 8, "1 < true", ["cannot compare int with bool"]),
    ("segments(3)", 1, 10, "3", ["must be a tensor parameter"]),
    ("pattern p(n: bool = 3) = window(1)", 1, 21, "3", ["parameter 'n' of p() is bool, got int"]),
    ("pattern p(n: int = 1) = window(n)\np(n = true)", 2, 3, "n = true", ["is int, got bool"]),
    # negative or zero sizes
    ("window(-1)", 1, 8, "-1", ["must be >= 0, got -1"]),
    ("window(1, -2)", 1, 11, "-2", ["argument 'r' must be >= 0"]),
    ("block(0)", 1, 7, "0", ["must be >= 1, got 0"]),
    ("sink(-2)", 1, 6, "-2", ["must be >= 0"]),
    ("dilated(2, 0)", 1, 12, "0", ["must be >= 1"]),
    ("on blocks(0) causal", 1, 11, "0", ["block size must be >= 1"]),
    ("on grid(4, 0) all", 1, 12, "0", ["grid size must be >= 1"]),
    ("all with softcap(0)", 1, 18, "0", ["must be > 0"]),
    ("all with polyline(decay = 1.5)", 1, 19, "decay = 1.5", ["in (0, 1]"]),
    ("keys(% 0 == 1)", 1, 8, "0", ["modulus must be positive"]),
    ("keys(% 4 in 0 .. 2, % -1 == 0)", 1, 23, "-1", ["modulus must be positive"]),
    ("window(1 // 0)", 1, 13, "0", ["division by zero"]),
    ("window(4 % (2 - 2))", 1, 13, "2 - 2", ["division by zero"]),
    ("window(4611686018427387905)", 1, 8, "4611686018427387905", ["too large"]),
    ("window(2305843009213693952 * 4)", 1, 8, None, ["too large"]),
    # neighborhood's own rule
    ("neighborhood(3, stride = 4)", 1, 17, "stride = 4", ["stride 4 is larger than its window 3"]),
    ("neighborhood((3, 5), stride = (2, 7)) on grid(8, 8)", 1, 22, None, ["stride 7 is larger than its window 5"]),
    ("neighborhood(0)", 1, 14, "0", ["must be >= 1"]),
    # heads ranges
    ("heads { 0 .. 2: causal; 1 .. 4: all }", 1, 25, "1 .. 4: all", ["1 .. 4 overlaps the previous range"]),
    ("heads { 0 .. 1: causal; 2 .. 4: all }", 1, 25, "2 .. 4: all", ["leaves heads 1 .. 2 uncovered"]),
    ("heads { 1 .. 4: causal }", 1, 9, "1 .. 4: causal", ["leaves heads 0 .. 1 uncovered"]),
    ("heads { 3 .. 1: causal }", 1, 9, "3 .. 1: causal", ["reversed"]),
    ("heads { 0 .. true: causal }", 1, 14, "true", ["head range needs integers"]),
    # modifiers and patterns in each other's place
    ("alibi & causal", 1, 1, "alibi", ["'alibi' is a modifier", "after 'with'"]),
    ("causal | softcap(30.0)", 1, 10, "softcap(30.0)", ["'softcap' is a modifier"]),
    ("all with causal", 1, 10, "causal", ["'causal' is a pattern, not a modifier"]),
    ("all with alibi, window(3)", 1, 17, "window(3)", ["'window' is a pattern, not a modifier"]),
    # polyline needs a 2-D grid
    (
        "pattern p(a: tensor, b: tensor) = all with polyline(a, b)",
        1,
        44,
        "polyline(a, b)",
        ["needs a 2-D grid", "1 axis"],
    ),
    (
        "pattern p(a: tensor, b: tensor) on grid(2, 2, 2) = all with polyline(a, b)",
        1,
        61,
        "polyline(a, b)",
        ["needs a 2-D grid", "3 axes"],
    ),
    # (x, where a tensor goes, is a tensor bound when calling: the arguments clash)
    ("all with polyline(decay = 0.5, alpha = x)", 1, 10, None, ["either alpha and beta, or decay, not both"]),
    ("all with polyline(decay = 0.5, path = x)", 1, 39, "x", ["unknown name 'x'"]),
    # grids and blocks
    ("window((1, 2))", 1, 8, "(1, 2)", ["has 2 values, but the grid here has 1 axis"]),
    ("on grid(2, 2) on blocks((1, 2, 3)) all", 1, 25, "(1, 2, 3)", ["blocks() has 3 sizes", "2 axes"]),
    ("on grid(2, 2) on blocks(2) causal", 1, 28, "causal", ["reads token positions"]),
    # definitions
    ("pattern p() = all\npattern q() = causal\npattern p() = none", 3, 1, None, ["pattern 'p' is defined twice"]),
    ("pattern p(w, w) = window(w)", 1, 14, "w", ["parameter 'w' appears twice"]),
    ("pattern p(x: tensor = 1) = all", 1, 11, "x: tensor = 1", ["tensor parameter 'x' cannot have a default"]),
    ("pattern p(head = 1) = window(head)", 1, 11, "head = 1", ["'head' is a built-in name"]),
    ("pattern a() = all\npattern b() = causal", 2, 1, None, ["several patterns", "pattern=..."]),
    # recursion between patterns
    ("pattern a() = b | causal\npattern b() = ~a\na", 2, 16, "a", ["pattern 'a' calls itself (a -> b -> a)"]),
    ("pattern a(n = 1) = window(n) | a(n - 1)\na", 1, 32, "a(n - 1)", ["pattern 'a' calls itself (a -> a)"]),
    # calls to names bound when calling
    ("window(1) on grid(batch, w)", 1, 19, "batch", ["'batch' is an argument of the call itself"]),
]


@pytest.mark.parametrize(("text", "line", "column", "token", "words"), TYPE, ids=[t[0][:40] for t in TYPE])
def test_type_errors(text: str, line: int, column: int, token: str | None, words: list[str]) -> None:
    error = compile_error(text, MaskTypeError)
    for word in words:
        assert word in error.message, error.message
    check_location(error, line, column, token)


# ---------------------------------------------------------------- call-time errors


def test_heads_ranges_must_reach_heads() -> None:
    error = mask_error("causal &\n  heads { 0 .. 2: causal; 2 .. 4: all }", MaskTypeError, heads=6)
    assert "cover heads 0 .. 4, but there are 6 heads" in error.message
    check_location(error, 2, 3, "heads { 0 .. 2: causal; 2 .. 4: all }")
    maskc.compile("heads { 0 .. 2: causal; 2 .. 4: all }").mask(8, heads=4)  # exactly right


def test_heads_ranges_written_with_heads_are_checked_per_call() -> None:
    program = maskc.compile("heads { 0 .. heads // 2: causal; 2 .. heads: all }")
    program.mask(8, heads=4)
    with pytest.raises(MaskTypeError) as info:
        program.mask(8, heads=6)  # 0 .. 3 then 2 .. 6: overlap
    assert "overlaps" in info.value.message
    check_location(info.value, 1, 34, "2 .. heads: all")


def test_sizes_that_only_fail_when_known() -> None:
    error = mask_error("window(lq - 10)", MaskTypeError, lq=8)
    assert "must be >= 0, got -2" in error.message
    check_location(error, 1, 8, "lq - 10")
    error = mask_error("neighborhood(5, dilation = 2)", MaskTypeError, lq=8)
    assert "needs at least 10 positions" in error.message
    check_location(error, 1, 14, "5")


def test_grid_sizes_that_do_not_fit() -> None:
    error = mask_error("neighborhood(3)\n  on grid(h, w)", MaskTypeError, lq=12, h=3, w=5)
    assert "grid(3, 5) holds 15 positions, but the keys have 12" in error.message
    check_location(error, 2, 11, "h, w")
    error = mask_error("window(1) on grid(h, w)", MaskTypeError, lq=12, h=5)  # w cannot be 12 / 5
    assert "grid size 'w' is not bound: pass w=..." in error.message
    check_location(error, 1, 22, "w")


def test_unbound_grid_size() -> None:
    error = mask_error("neighborhood(3) on grid(t, h, w)", MaskTypeError, lq=8, h=2)
    assert "is not bound" in error.message and "=..." in error.message
    assert error.line == 1 and error.column in (25, 31)
    check_location(error, error.line, error.column)


def test_unknown_binding_lists_what_can_be_bound() -> None:
    program = maskc.compile("neighborhood(3) on grid(h, w)")
    with pytest.raises(MaskTypeError, match=r"unknown binding 'x' \(this pattern binds: h, w\)"):
        program.mask(16, h=4, w=4, x=1)


# ---------------------------------------------------------------- compile(**params)


def test_unknown_parameter_in_compile_params() -> None:
    error = compile_error("# header\npattern p(w = 1, g = 2) = window(w) | global(0 .. g)", MaskTypeError, x=3)
    assert "no parameter 'x'" in error.message and "its parameters: w, g" in error.message
    check_location(error, 2, 1, "pattern p")


def test_parameters_of_a_bare_expression() -> None:
    error = compile_error("causal & window(3)", MaskTypeError, w=3)
    assert "no parameter 'w'" in error.message
    check_location(error, 1, 1)


@pytest.mark.parametrize(
    ("value", "words"),
    [("x", "must be a number or bool"), (float("nan"), "must be a number or bool"), (10**30, "too large")],
)
def test_bad_values_in_compile_params(value, words: str) -> None:
    error = compile_error("pattern p(a = 1, w = 1) = window(w)", MaskTypeError, w=value)
    assert words in error.message
    check_location(error, 1, 18, "w = 1")


def test_tensor_parameter_in_compile_params() -> None:
    error = compile_error("pattern p(ids: tensor) = segments(ids)", MaskTypeError, ids=1)
    assert "tensor parameter" in error.message
    check_location(error, 1, 11, "ids: tensor")


def test_unknown_pattern_choice() -> None:
    with pytest.raises(MaskTypeError, match=r"defines no pattern 'c' \(it defines: a, b\)"):
        maskc.compile("pattern a() = all\npattern b() = none", pattern="c")


# ---------------------------------------------------------------- library patterns


def test_error_inside_a_library_pattern_names_the_library_file() -> None:
    error = compile_error("causal &\n  streaming(w = 0)", MaskTypeError)
    assert error.filename is not None and error.filename.endswith("local.mask")
    assert "window() argument 'l' must be >= 0, got -1" in error.message
    text = str(error)
    assert text.startswith(f"{error.filename}:{error.line}:{error.column}: ")
    # The quoted line is the library's, and the caret is under `w - 1` there.
    quoted, carets, gutter = caret_lines(error)
    assert "pattern streaming" in error.source.split("\n")[error.line - 1]
    assert quoted[carets.index("^") - gutter :].startswith("w - 1")
    # The call site in the user's spec is named too.
    assert "in streaming() called at <spec>:2:3" in text


def test_error_in_a_library_call_site_points_at_the_user_spec() -> None:
    error = compile_error("causal & streaming(w = true)", MaskTypeError)
    assert error.filename is None
    assert "parameter 'w' of streaming() is a number, got bool" in error.message
    check_location(error, 1, 20, "w = true")


def test_error_in_a_nested_call_lists_every_call_site() -> None:
    text = "pattern outer(w = 3) = inner(w - 5)\npattern inner(v = 1) = window(v)\nouter"
    error = compile_error(text, MaskTypeError)
    assert "must be >= 0, got -2" in error.message
    check_location(error, 2, 31, "v")
    assert "in inner() called at <spec>:1:24" in str(error) or "inner" in str(error)


def test_errors_in_spec_files_name_the_file(tmp_path) -> None:
    path = tmp_path / "mine.mask"
    path.write_text("# my patterns\npattern good() = causal\npattern bad() = window(-3)\n")
    with pytest.raises(MaskTypeError) as info:
        maskc.compile(str(path), pattern="bad")
    error = info.value
    assert error.filename == str(path)
    check_location(error, 3, 24, "-3")
    assert str(error).startswith(f"{path}:3:24: ")


# ---------------------------------------------------------------- general shape


@pytest.mark.parametrize("text", [s[0] for s in SYNTAX] + [t[0] for t in TYPE])
def test_every_error_is_a_value_error_with_a_location(text: str) -> None:
    with pytest.raises(MaskError) as info:
        maskc.compile(text)
    error = info.value
    assert isinstance(error, ValueError)
    assert error.line is not None and error.column is not None
    assert "Traceback" not in str(error)
