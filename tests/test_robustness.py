"""No user text makes maskc fail with anything but a `MaskError`.

Whatever string (or non-string) reaches `maskc.compile`, the outcome is a
`Program` or a `maskc.MaskError` (`MaskSyntaxError` / `MaskTypeError`) with a
location; and a program that compiled yields, for small sizes, a mask tensor or
a `MaskError`.  Any other exception escaping is a bug in maskc.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from maskc.dsl import parse, to_text
from maskc.dsl.parser import MAX_DEPTH
from strategies import (
    modules,
    mutate,
    mutated_cases,
    near_valid_modules,
    token_soups,
    tokenize,
    valid_cases,
    valid_specs,
)

import maskc

LANGUAGE_CHARACTERS = "()[]{}|&-~,.;:=!<>+*/%#\"' \n\tabcdefghiklmnoprstwxyz_0123456789"

PROPERTY = settings(
    max_examples=250,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def compile_or_error(spec, **params) -> maskc.Program | None:
    """The Program, or None after checking the MaskError it raised."""
    try:
        program = maskc.compile(spec, **params)
    except maskc.MaskError as e:
        check_error(e)
        note(f"compile: {type(e).__name__}")
        return None
    note("compile: ok")
    assert isinstance(program, maskc.Program)
    # A compiled program can always describe itself.
    assert parse(program.source()) is not None
    repr(program)
    return program


def note(what: str) -> None:
    """Count outcomes (pytest --hypothesis-show-statistics) inside property tests."""
    if currently_in_test_context():
        event(what)


def check_error(e: maskc.MaskError) -> None:
    assert isinstance(e, (maskc.MaskSyntaxError, maskc.MaskTypeError)) or type(e) is maskc.MaskError
    text = str(e)
    assert text and e.message
    assert "Traceback" not in text
    if e.line is not None:
        assert e.line >= 1 and e.column >= 1
        if e.source is not None:
            assert f"{e.line:>4} | " in text and "^" in text


def mask_or_error(program: maskc.Program, lq: int, lk: int | None = None, heads: int = 1, **bindings):
    try:
        mask = program.mask(lq, lk, heads=heads, **bindings)
    except maskc.MaskError as e:
        check_error(e)
        note(f"mask: {type(e).__name__}")
        return None
    note("mask: ok")
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    assert tuple(mask.shape[-3:]) == (heads, lq, lq if lk is None else lk)
    return mask


def small_bindings(program: maskc.Program, value: int) -> dict[str, int]:
    """Every call-time name a program may bind, bound to a small number."""
    return {name: value for name in program.spec.bindable()}


# ---------------------------------------------------------------- random text


@PROPERTY
@given(st.text(max_size=60))
def test_arbitrary_text(text: str) -> None:
    program = compile_or_error(text)
    if program is not None:
        mask_or_error(program, 3, heads=2, **small_bindings(program, 2))


@PROPERTY
@given(st.text(alphabet=st.sampled_from(list(LANGUAGE_CHARACTERS)), max_size=60))
def test_text_from_the_languages_characters(text: str) -> None:
    program = compile_or_error(text)
    if program is not None:
        mask_or_error(program, 4, heads=2, **small_bindings(program, 2))


@PROPERTY
@given(token_soups(), st.integers(1, 6), st.integers(1, 3), st.integers(1, 4))
def test_token_soups(text: str, lq: int, heads: int, size: int) -> None:
    program = compile_or_error(text)
    if program is not None:
        mask_or_error(program, lq, heads=heads, **small_bindings(program, size))
        mask_or_error(program, lq, lq + size, heads=heads, **small_bindings(program, size))


@PROPERTY
@given(mutated_cases())
def test_mutated_valid_specs(pair) -> None:
    case, text = pair
    program = compile_or_error(text)
    if program is None:
        return
    bindable = set(program.spec.bindable())
    bindings = {k: v for k, v in case.bindings.items() if k in bindable}
    bindings.update({name: 2 for name in bindable - set(bindings)})
    mask_or_error(program, case.lq, case.lk, case.heads, **bindings)
    mask_or_error(program, 1, heads=1, **bindings)


@PROPERTY
@given(valid_specs().flatmap(lambda text: mutate(text, 6)), st.integers(1, 8), st.integers(1, 8))
def test_heavily_mutated_specs(text: str, lq: int, lk: int) -> None:
    program = compile_or_error(text)
    if program is not None:
        mask_or_error(program, lq, lk, heads=3, **small_bindings(program, 3))


@PROPERTY
@given(valid_cases())
def test_valid_cases_compile_and_evaluate(case) -> None:
    """The valid-spec strategy keeps its promise (and maskc accepts valid specs)."""
    program = maskc.compile(case.text)
    mask = program.mask(case.lq, case.lk, heads=case.heads, **case.bindings)
    assert mask.shape == (case.heads, case.lq, case.lk)
    # The printed program means the same.
    again = maskc.compile(program.source())
    assert torch.equal(again.mask(case.lq, case.lk, heads=case.heads, **case.bindings), mask)


@PROPERTY
@given(valid_specs(), st.integers(1, 9), st.integers(1, 9), st.integers(1, 5))
def test_valid_specs_evaluate_at_any_size(text: str, lq: int, lk: int, heads: int) -> None:
    program = maskc.compile(text)
    assert program.mask(lq, lk, heads=heads).shape == (heads, lq, lk)


@PROPERTY
@given(valid_specs(), st.sampled_from([0, 1, 2, 3]))
def test_tokenize_is_lossless_and_respacing_keeps_meaning(text: str, style: int) -> None:
    tokens = [t for t in tokenize(text) if not t.isspace() and not t.startswith("#")]
    sep = [" ", "\n", "  \t", " \n # c\n "][style]
    respaced = sep.join(tokens)
    assert parse(respaced) == parse(text)


# ---------------------------------------------------------------- extremes


@pytest.mark.parametrize(
    "text",
    [
        "(" * 5000 + "all" + ")" * 5000,
        "~" * 5000 + "all",
        "~" * 150 + "all",
        "all | " * 3000 + "all",
        "window(" + "(" * 3000 + "1" + ")" * 3000 + ")",
        "window(" + "-" * 3000 + "1)",
        "window(" + "-" * 150 + "1)",
        "window(" + "1 + " * 3000 + "1)",
        "on blocks(1) " * 1000 + "all",
        "on blocks(1) " * 100 + "causal",
        "heads { 0 .. heads: " * 500 + "all" + " }" * 500,
        "on grid(1) " * 1000 + "all",
        "f(" * 2000 + ")" * 2000,
        "window((" * 2000 + "1" + ",1)" * 2000 + ")",
        "keys(" + ", ".join(["0 .. 1"] * 3000) + ")",
        "all with " + ", ".join(["softcap(1)"] * 2000),
    ],
    ids=lambda t: t[:24],
)
def test_deep_or_long_specs(text: str) -> None:
    program = compile_or_error(text)
    if program is not None:
        mask_or_error(program, 3, heads=2)


def test_nesting_through_pattern_calls_is_bounded() -> None:
    """Each definition is shallow, but calls chain them into a deep pattern."""
    chain = "".join(f"pattern p{i}() = {'~' * 150}p{i + 1}\n" for i in range(40)) + "pattern p40() = all\n"
    with pytest.raises(maskc.MaskTypeError, match="nests more than") as info:
        maskc.compile(chain, pattern="p0")
    check_error(info.value)
    shallow = "".join(f"pattern p{i}() = ~p{i + 1}\n" for i in range(40)) + "pattern p40() = causal\n"
    program = maskc.compile(shallow, pattern="p0")
    assert torch.equal(program.mask(4), maskc.compile("causal").mask(4))


def test_exponential_inlining_is_bounded() -> None:
    """p1 = p0 | ~p0, p2 = p1 | ~p1, ...: the inlined pattern doubles at each level."""
    defs = "pattern p0() = window(1)\n" + "".join(f"pattern p{i}() = p{i - 1} | ~p{i - 1}\n" for i in range(1, 40))
    program = compile_or_error(defs, pattern="p39")
    if program is not None:
        with pytest.raises(maskc.MaskTypeError, match="expands to more than") as info:
            program.mask(4)
        check_error(info.value)
    # A few levels are fine.
    assert maskc.compile(defs, pattern="p5").mask(4).all()


def test_recursion_limit_is_not_needed_near_the_limit() -> None:
    """Specs at the nesting limit work with Python's default recursion limit."""
    for text in ["~" * 190 + "all", "window(" + "-" * 190 + "1)", "on blocks(1) " * 190 + "all"]:
        program = maskc.compile(text)
        mask_or_error(program, 3)


@pytest.mark.parametrize(
    ("prefix", "opening", "inner", "closing", "suffix", "levels"),
    [
        # each level: one bracket, `~`, `-` or `on` (`on blocks(1)` also opens its
        # bracket); `heads { ... }` is two (as in the tree: the cases, then a case)
        ("", "(", "all", ")", "", MAX_DEPTH),
        ("", "~", "all", "", "", MAX_DEPTH),
        ("", "~(", "all | causal", ")", "", MAX_DEPTH // 2),
        ("", "on blocks(1) ", "all", "", "", MAX_DEPTH - 1),
        ("", "heads { 0 .. heads: ", "all", " }", "", MAX_DEPTH // 2),
        ("window(1 + ", "-", "1", "", ")", MAX_DEPTH - 1),
        ("window(", "(", "1 + 2 * 3", ")", ")", MAX_DEPTH - 1),
        ("window(", "min(1, ", "1", ")", ")", MAX_DEPTH - 1),
    ],
)
def test_nesting_at_the_limit_is_read_and_one_more_level_is_not(
    prefix: str, opening: str, inner: str, closing: str, suffix: str, levels: int
) -> None:
    """The parser counts nesting as it reads; at the limit every stage (checks,
    lowering, printing, evaluation) still fits Python's default stack, and one
    level more is reported where it opens."""
    text = prefix + opening * levels + inner + closing * levels + suffix
    program = maskc.compile(text)
    mask_or_error(program, 3, heads=2)
    assert parse(to_text(parse(text))) == parse(text)
    deeper = prefix + opening * (levels + 1) + inner + closing * (levels + 1) + suffix
    with pytest.raises(maskc.MaskSyntaxError, match="nested more than") as info:
        maskc.compile(deeper)
    check_error(info.value)
    assert info.value.line == 1 and deeper[info.value.column - 1] in "(~-oh{"


@pytest.mark.parametrize(
    "text",
    [
        "window(" + "9" * 5000 + ")",
        "window(" + "0" * 5000 + "3)",
        "window(99999999999999999999999)",
        "window(4611686018427387904)",
        "window(4611686018427387905)",
        "window(4611686018427387904 + 4611686018427387904)",
        "window(4611686018427387904 * 4611686018427387904)",
        "window(-4611686018427387904 - 4611686018427387904)",
        "all with softcap(1e400)",
        "all with softcap(" + "9" * 5000 + ".0)",
        "all with softcap(1e-400)",
        "dilated(4611686018427387904, 4611686018427387904)",
        "on blocks(4611686018427387904) on blocks(4611686018427387904) window(1)",
        "on blocks(4611686018427387904) on blocks(4611686018427387904) causal",
        "on blocks(4611686018427387904) block(4611686018427387904)",
        "on blocks(4611686018427387904) random(1, block = 4611686018427387904)",
        "on blocks(4611686018427387904) stride(4611686018427387904)",
        "on blocks(4611686018427387904) on blocks(4611686018427387904) all with alibi",
        "random(4611686018427387904, block = 1, seed = 4611686018427387904)",
        "keys(% 4611686018427387904 == 4611686018427387904)",
        "keys(4611686018427387904)",
        "global(0 .. 4611686018427387904)",
        "causal(-4611686018427387904)",
        "neighborhood(4611686018427387904, dilation = 4611686018427387904)",
        "window(1) on grid(4611686018427387904, 4611686018427387904)",
        "on grid(2) on blocks(4611686018427387904) window(1)",
        "heads { 0 .. 4611686018427387904: all }",
        "window(abs(-4611686018427387904) * 2)",
        "window(min(4611686018427387904, 4611686018427387904 * 2))",
        "pattern p(w = 4611686018427387904 * 2) = window(w)",
    ],
    ids=lambda t: t[:30],
)
def test_huge_numbers(text: str) -> None:
    program = compile_or_error(text)
    if program is not None:
        mask_or_error(program, 4, heads=2)


@pytest.mark.parametrize("value", [10**30, -(10**30), 2**63, float("inf"), float("nan"), "3", None, [1], True])
def test_huge_or_odd_compile_parameters(value) -> None:
    program = compile_or_error("pattern p(w = 1) = window(w)", w=value)
    if program is not None:
        mask_or_error(program, 4)


@pytest.mark.parametrize(
    "text",
    [
        "window(1 // 0)",
        "window(1 % 0)",
        "window(heads // (heads - heads))",
        "window(lq % (lk - lq))",
        "keys(% 0 == 1)",
        "keys(% (head - head) == 0)",
        "keys(% 0 in 0 .. 1)",
        "on blocks(0) all",
        "on blocks(heads - heads) all",
        "on blocks(head) all",
        "block(head)",
        "on grid(0) all",
        "window(1) on grid(lk // 0)",
        "pattern p(n = 0) = window(4 // n)",
        "pattern p(n = 0) = window(4 // n)\np(2)",
    ],
)
def test_division_by_zero_and_zero_sizes(text: str) -> None:
    program = compile_or_error(text)
    if program is not None:
        for lq, lk in [(4, 4), (3, 5)]:
            mask_or_error(program, lq, lk, heads=2)


@pytest.mark.parametrize("text", ["", " ", "\n\n", "# only a comment", "  # c1\n# c2\n", "\t\r\n"])
def test_empty_specs(text: str) -> None:
    with pytest.raises(maskc.MaskSyntaxError, match="empty") as info:
        maskc.compile(text)
    check_error(info.value)


@pytest.mark.parametrize("value", [None, 0, 1.5, b"causal", bytearray(b"causal"), ["causal"], {"causal": 1}, object()])
def test_non_string_specs(value) -> None:
    with pytest.raises(maskc.MaskError) as info:
        maskc.compile(value)
    check_error(info.value)


def test_non_string_parse_input() -> None:
    for value in [None, 1, b"all", ["all"]]:
        with pytest.raises(maskc.MaskSyntaxError):
            parse(value)


@pytest.mark.parametrize("value", [5, ["p"], None, "", "q", "p\x00"])
def test_odd_pattern_argument(value) -> None:
    text = "pattern p() = all\npattern q2() = causal"
    program = compile_or_error(text, pattern=value)
    if value is None:
        assert program is None  # two definitions and no choice
    elif program is not None:
        mask_or_error(program, 2)


@pytest.mark.parametrize(
    "text",
    [
        "causal\x00",
        "\x00.mask",
        "causal\r& window(1)",
        "causal\x0c& window(1)",
        "causal\u2028& window(1)",
        "causal \x1b[31m& x",
        "window(\u0663)",  # a non-ASCII digit
        "wíndow(3)",
        'all with polyline(decay = 0.5, path = "\U0001f600")',
        "\ufeffcausal",
        "causal" + "\n" * 10000 + "&",
        "x" * 100000,
        "causal & " + " " * 200000 + "x",
    ],
    ids=lambda t: repr(t[:20]),
)
def test_odd_characters(text: str) -> None:
    program = compile_or_error(text)
    if program is not None:
        mask_or_error(program, 3)


def test_spec_too_long() -> None:
    with pytest.raises(maskc.MaskSyntaxError, match="characters"):
        maskc.compile("all" + " " * 2_000_000)


def test_spec_files(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.mask"
    bad.write_bytes(b"\xff\xfe causal")
    good = tmp_path / "good.mask"
    good.write_text("# two\npattern a(w = 2) = window(w)\npattern b() = causal\n")
    folder = tmp_path / "folder.mask"
    folder.mkdir()
    for spec in [bad, str(bad), tmp_path / "missing.mask", str(folder), "  " + str(good)]:
        program = compile_or_error(spec)
        assert program is None
    assert compile_or_error(good, pattern="a") is not None
    with pytest.raises(maskc.MaskTypeError) as info:
        maskc.compile(good, pattern="zzz")
    check_error(info.value)


@pytest.mark.parametrize(
    "bindings",
    [
        {"lq": 0},
        {"lq": -1},
        {"lq": True},
        {"lq": 2.0},
        {"lq": "4"},
        {"lq": 4, "lk": 0},
        {"lq": 4, "heads": 0},
        {"lq": 4, "h": 2},
        {"lq": 4, "q_offset": -10},
        {"lq": 4, "q_offset": 10**30},
        {"lq": 4, "q_offset": 1.5},
        {"lq": 10**30},
        {"lq": 4, "heads": 10**30},
        {"lq": 4, "h": 10**30, "w": 1},
        {"lq": 4, "batch": "x"},
        {"lq": 4, "batch": True},
        {"lq": 4, "batch": -2},
        {"lq": 4, "batch": 10**30},
        {"lq": 4, "ids": torch.zeros(3)},
        {"lq": 4, "ids": "x"},
    ],
    ids=str,
)
def test_odd_mask_arguments(bindings: dict) -> None:
    for text in ["causal & window(1)", "pattern p(ids: tensor) = segments(ids)", "neighborhood(3) on grid(h, w)"]:
        program = maskc.compile(text)
        args = dict(bindings)
        lq = args.pop("lq")
        lk = args.pop("lk", None)
        heads = args.pop("heads", 1)
        try:
            program.mask(lq, lk, heads=heads, **args)
        except maskc.MaskError as e:
            check_error(e)


def test_reprinting_compiled_programs() -> None:
    for text in ["causal & window(3)", "pattern p(w = 2) = window(w)\np(3) | sink(1)", "natten2d"]:
        program = maskc.compile(text)
        source = program.source()
        assert parse(to_text(parse(source))) == parse(source)
        assert to_text(parse(source)).rstrip("\n") == source.rstrip("\n")


@settings(PROPERTY, max_examples=150)
@given(modules())
def test_random_trees(module) -> None:
    program = compile_or_error(to_text(module))
    if program is not None:
        mask_or_error(program, 4, heads=2, **small_bindings(program, 2))


@settings(PROPERTY, max_examples=150)
@given(near_valid_modules(), st.integers(1, 6), st.integers(1, 6), st.integers(1, 4))
def test_random_trees_over_the_real_vocabulary(module, lq: int, lk: int, heads: int) -> None:
    text = to_text(module)
    program = compile_or_error(text)
    if program is None and len(module.defs) > 1:
        program = compile_or_error(text, pattern=module.defs[0].name)
    if program is not None:
        mask_or_error(program, lq, lk, heads=heads, **small_bindings(program, 2))
