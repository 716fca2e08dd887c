"""Regressions for the language items of issue 10 (12 to 15): one test per item,
each of which failed before its fix."""

from __future__ import annotations

import pytest
import torch
from maskc.dsl import ast, evaluate, parse, to_text
from maskc.dsl.lower import MAX_EXPANSION
from maskc.dsl.parser import MAX_DEPTH, MAX_SPEC_CHARS, MAX_TERMS, MAX_TOKENS

import maskc


def dense(lq: int, pred) -> torch.Tensor:
    """bool [lq, lq] from pred(q, k) on positions (queries aligned with keys)."""
    return torch.tensor([[bool(pred(q, k)) for k in range(lq)] for q in range(lq)], dtype=torch.bool)


def rejected_quickly(text: str) -> maskc.MaskError:
    """The error `text` is rejected with.  How quickly is measured by
    bench/parser.py on the same kinds of text, not asserted here: a timed unit
    test fails on a busy machine."""
    with pytest.raises(maskc.MaskError) as info:
        maskc.compile(text)
    return info.value


def test_item12_chains_are_flat_and_nesting_is_rejected_where_it_goes_too_deep() -> None:
    # A flat chain of 20,000 terms compiles (it was "nested more than 200 levels deep"),
    # is one node, prints back, and means what it says.
    chain = " | ".join(f"window({i % 5}, 0)" for i in range(20_000))
    program = maskc.compile(chain)
    assert isinstance(program.spec.body.expr, ast.SetOp) and len(program.spec.body.expr.operands) == 20_000
    assert parse(to_text(program.spec.body)) == parse(chain)
    assert torch.equal(program.mask(12)[0], dense(12, lambda q, k: 0 <= q - k <= 4))
    # So do long chains of & and -, mixed set operators, and integer arithmetic.
    assert torch.equal(maskc.compile(" & ".join(["causal"] * 20_000)).mask(6), maskc.compile("causal").mask(6))
    assert not maskc.compile("all" + " - causal" * 10_000).mask(6)[0].tril().any()
    total = maskc.compile("window(" + " + ".join(["1"] * 30_000) + " - 29998 * 1)")
    assert torch.equal(total.mask(9), maskc.compile("window(2)").mask(9))
    # 40,000 repeated terms: one term once lowered, and a printable normal form.
    repeated = maskc.compile(" | ".join(["all"] * 40_000))
    assert repeated.normal_form(64)[0][1] == maskc.compile("all").normal_form(64)[0][1]
    assert repeated.source().count("all") == 40_000
    # Genuine nesting past the limit is rejected at the bracket or operator that
    # opens level MAX_DEPTH + 1, quickly however long the text.
    for text, column in [
        ("(" * 400_000 + "all" + ")" * 400_000, MAX_DEPTH + 1),
        ("~" * (MAX_SPEC_CHARS - 3) + "all", MAX_DEPTH + 1),
        ("window(" + "-" * (MAX_SPEC_CHARS - 9) + "1)", MAX_DEPTH + 7),
        ("window(" + "(" * 400_000 + "1" + ")" * 400_000 + ")", MAX_DEPTH + 7),
    ]:
        error = rejected_quickly(text)
        assert isinstance(error, maskc.MaskSyntaxError) and "nested more than" in error.message
        assert (error.line, error.column) == (1, column)
    # Texts too long to read whole are rejected where they become too long,
    # and never as nesting (more terms than the lowering would expand, or too
    # many tokens).
    assert MAX_TERMS == MAX_EXPANSION
    error = rejected_quickly("|".join(["all"] * (MAX_SPEC_CHARS // 4)))
    assert "more than" in error.message and "pattern terms" in error.message
    assert error.column == 4 * MAX_TERMS + 1
    error = rejected_quickly("window(" + "+".join(["1"] * (MAX_SPEC_CHARS // 2 - 8)) + ")")
    assert "tokens" in error.message and "nested" not in error.message
    assert error.column == MAX_TOKENS + 6  # "window", "(", then one token per character


def test_item13_blocks_count_in_blocks_and_grids_over_blocks_hold_the_queries() -> None:
    # Modifiers of a pattern called inside `on blocks(4)` measure distances in blocks.
    program = maskc.compile("pattern near() = all with alibi\non blocks(4) near")
    instance = program.instantiate(8)
    scores = evaluate.scores(instance, evaluate.Tensors({}, instance), torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    (alibi,) = instance.patterns[0].modifiers
    block_distance = torch.tensor([[abs(q // 4 - k // 4) for k in range(8)] for q in range(8)], dtype=torch.float64)
    assert torch.allclose(scores[0, 0], -alibi.slope * block_distance)
    # A grid over blocks holds the queries as a grid over tokens does: queries
    # past the keys were given coordinates past the grid.
    grid = maskc.compile("on blocks(2) on grid(2, 2) window(1)")
    assert grid.mask(4, 8).shape == (1, 4, 8)
    with pytest.raises(maskc.MaskTypeError, match="queries must lie on the grid") as info:
        grid.mask(4, 8, q_offset=6)
    assert "blocks of 2 tokens" in info.value.message
    assert (info.value.line, info.value.column) == (1, 14)


def test_item14_definitions_without_parameters_need_no_parentheses() -> None:
    local = maskc.compile("pattern local = causal & window(256, 0)")
    assert torch.equal(local.mask(300), maskc.compile("causal & window(256, 0)").mask(300))
    tile = maskc.compile("pattern tile on grid(h, w) = block((4, 4))")
    assert torch.equal(tile.mask(64, h=8, w=8), maskc.compile("block((4, 4)) on grid(h, w)").mask(64, h=8, w=8))
    # The same tree as with "()", which is how it prints (and reads back).
    text = "pattern local = causal\npattern tile on grid(h, w) = local & block((4, 4))\ntile"
    module = parse(text)
    assert module == parse(text.replace("local =", "local() =").replace("tile on", "tile() on"))
    assert parse(to_text(module)) == module


def test_item15_tensors_are_bound_when_calling_and_library_patterns_compose() -> None:
    n = 12
    ids = torch.tensor([0] * 5 + [1] * 7)
    same_doc = lambda q, k: ids[q] == ids[k]  # noqa: E731
    expected = dense(n, lambda q, k: 0 <= q - k <= 3 and same_doc(q, k))
    # A free name where a tensor goes is a tensor bound when calling.
    inline = maskc.compile("causal & window(3, 0) & segments(ids)")
    assert inline.spec.tensor_params == ["ids"]
    assert torch.equal(inline.mask(n, ids=ids).reshape(n, n), expected)
    # A library pattern's tensor parameter, left out, is bound under its own name ...
    composed = maskc.compile("documents_causal & window(3, 0)")
    assert composed.spec.tensor_params == ["ids"]
    assert torch.equal(composed.mask(n, ids=ids).reshape(n, n), expected)
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(composed(q, k, v, ids=ids), composed.reference(q, k, v, ids=ids))
    # ... or passed under a name of the caller's.
    renamed = maskc.compile("documents_causal(ids = doc) & window(3, 0)")
    assert renamed.spec.tensor_params == ["doc"]
    assert torch.equal(renamed.mask(n, doc=ids).reshape(n, n), expected)
    # Ids of the wrong shape are named, with the shape received and the shape expected.
    bad = ids[None, None]
    for call in (
        lambda: composed.mask(n, ids=bad),
        lambda: composed.schedule(n, ids=bad),
        lambda: composed(q, k, v, ids=bad),
    ):
        with pytest.raises(maskc.MaskTypeError) as info:
            call()
        assert "'ids'" in info.value.message and "[1, 1, 12]" in info.value.message
        assert f"[batch, {n}]" in info.value.message
