"""docs/language.md stays true to the code.

* Every ```mask block compiles: each of its definitions by name, and its bare
  expression.  A comment `# mask(lq=6, ...)` (or `# NAME.mask(...)` for a
  definition) followed by comment rows of `x` (allowed) and `.` (not) is a
  picture: it must equal `Program.mask` with those arguments, heads one after
  the other (a list argument becomes an integer tensor, as `ids=[0, 0, 1]`).
* Every ```mask-error block fails with a `MaskError` (when compiled, or when
  called as its `# mask(...)` line says), and the ```text block right after it
  is the error's exact text.
* Every atom and modifier of the registry, and the parser's and the lowering's
  limits, appear in the document.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from maskc.dsl import lower, parse, parser
from maskc.dsl.atoms import ATOMS, MODIFIERS

import maskc

DOC = Path(__file__).resolve().parent.parent / "docs" / "language.md"

_CALL = re.compile(r"^#\s*(?:(?P<name>[A-Za-z_]\w*)\.)?mask\((?P<args>.*)\)\s*:?\s*$")
_ROW = re.compile(r"^#\s+(?P<row>[x.]+)\s*$")
_HEAD = re.compile(r"^#\s*head \d+:?\s*$")


@dataclass
class Block:
    info: str
    text: str
    line: int  # of the opening fence


@dataclass
class Picture:
    name: str | None
    args: dict
    rows: list[str] = field(default_factory=list)


def blocks() -> list[Block]:
    out: list[Block] = []
    lines = DOC.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            info, start, body = lines[i][3:].strip(), i + 1, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append(Block(info, "\n".join(body) + "\n", start))
        i += 1
    return out


def call_args(text: str) -> dict:
    """`lq=6, ids=[0, 1]` -> {"lq": 6, "ids": tensor([0, 1])}, literals only."""
    node = ast.parse(f"f({text})", mode="eval").body
    assert isinstance(node, ast.Call) and not node.args, text
    args = {}
    for kw in node.keywords:
        value = ast.literal_eval(kw.value)
        args[kw.arg] = torch.tensor(value) if isinstance(value, list) else value
    return args


def pictures(text: str) -> list[Picture]:
    out: list[Picture] = []
    current: Picture | None = None
    for line in text.splitlines():
        line = line.strip()
        call = _CALL.match(line)
        if call:
            current = Picture(call["name"], call_args(call["args"]))
            out.append(current)
        elif current is not None and _ROW.match(line):
            current.rows.append(_ROW.match(line)["row"])
        elif current is not None and _HEAD.match(line):
            continue
        else:
            current = None
    return out


def program(text: str, name: str | None) -> maskc.Program:
    return maskc.compile(text, pattern=name) if name else maskc.compile(text)


def run(text: str, picture: Picture) -> torch.Tensor:
    args = dict(picture.args)
    mask = program(text, picture.name).mask(args.pop("lq"), **args)
    if mask.dim() == 4:
        assert mask.shape[0] == 1
        mask = mask[0]
    return mask


BLOCKS = blocks()
SPECS = [b for b in BLOCKS if b.info == "mask"]
ERRORS = [(b, BLOCKS[i + 1] if i + 1 < len(BLOCKS) else None) for i, b in enumerate(BLOCKS) if b.info == "mask-error"]


def test_the_document_has_examples():
    assert len(SPECS) >= 30
    assert sum(len(pictures(b.text)) for b in SPECS) >= 20
    assert len(ERRORS) >= 4


@pytest.mark.parametrize("block", SPECS, ids=[f"line{b.line}" for b in SPECS])
def test_spec_block_compiles_and_its_pictures_hold(block: Block):
    module = parse(block.text)
    for d in module.defs:
        program(block.text, d.name)
    if module.main is not None:
        program(block.text, None)
    for picture in pictures(block.text):
        mask = run(block.text, picture)
        heads, lq, lk = mask.shape
        assert len(picture.rows) == heads * lq, (picture.args, picture.rows)
        got = ["".join("x" if v else "." for v in row) for row in mask.reshape(heads * lq, lk).tolist()]
        assert got == picture.rows, f"line {block.line}: {picture}"


@pytest.mark.parametrize("case", ERRORS, ids=[f"line{b.line}" for b, _ in ERRORS])
def test_error_block_fails_with_the_message_shown(case):
    block, shown = case
    assert shown is not None and shown.info == "text", f"line {block.line}: a ```text block must follow"
    calls = pictures(block.text)
    with pytest.raises(maskc.MaskError) as e:
        maskc.compile(block.text)
        for picture in calls:
            run(block.text, picture)
        assert calls, "compiled without an error"
    assert str(e.value) == shown.text.rstrip("\n")
    assert e.value.line is not None  # every example error is located


def test_every_atom_and_modifier_is_documented():
    text = DOC.read_text(encoding="utf-8")
    for name in [*ATOMS, *MODIFIERS]:
        assert f"| `{name}" in text, f"{name} has no row in a table of docs/language.md"


def test_limits_are_the_codes():
    text = DOC.read_text(encoding="utf-8")
    for value in (
        parser.MAX_SPEC_CHARS,
        parser.MAX_TOKENS,
        parser.MAX_TERMS,
        parser.MAX_DEPTH,
        parser.MAX_INT_DIGITS,
        lower.MAX_EXPANSION,
        lower.MAX_NESTING,
    ):
        assert f"{value:,}" in text, value
