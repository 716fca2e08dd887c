"""The library of published patterns, written in the language (`*.mask`).

Every definition here can be called by name from any spec, loaded with
`maskc.compile("natten2d", k=7)`, and listed with `maskc patterns`.  The
comment block above a definition is its documentation; a line in it of the
form `# example: lq=3136, h=56, w=56` gives sizes for pictures and tests.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import resources

from maskc.dsl.errors import MaskTypeError
from maskc.dsl.lower import Definition, Unit
from maskc.dsl.parser import parse

_EXAMPLE = re.compile(r"^#\s*example:\s*(.*)$")


@dataclass(frozen=True)
class Entry:
    definition: Definition
    doc: str
    example: dict[str, int] = field(default_factory=dict)


def _comment_block(lines: list[str], line: int) -> list[str]:
    """The comment lines right above 1-based `line`."""
    out: list[str] = []
    i = line - 2
    while i >= 0 and lines[i].lstrip().startswith("#"):
        out.append(lines[i].strip())
        i -= 1
    return out[::-1]


def _example(comments: list[str], where: str) -> dict[str, int]:
    for text in comments:
        match = _EXAMPLE.match(text)
        if match:
            pairs = [p.strip() for p in match.group(1).split(",") if p.strip()]
            out = {}
            for pair in pairs:
                name, _, value = pair.partition("=")
                if not value.strip().lstrip("-").isdigit():
                    raise MaskTypeError(f"{where}: bad example binding {pair!r}")
                out[name.strip()] = int(value)
            return out
    return {}


@functools.cache
def _index() -> dict[str, Entry]:
    found: dict[str, Entry] = {}
    for path in sorted(resources.files(__package__).iterdir(), key=lambda e: e.name):
        if not path.name.endswith(".mask"):
            continue
        text = path.read_text()
        unit = Unit(text, f"patterns/{path.name}")
        lines = text.splitlines()
        for d in parse(text, unit.filename).defs:
            if d.name in found:
                raise MaskTypeError(
                    f"library pattern '{d.name}' is defined in {found[d.name].definition.unit.filename} and again here",
                    d.span,
                ).with_source(text, unit.filename)
            comments = _comment_block(lines, d.span.line)
            doc = "\n".join(c.lstrip("#").strip() for c in comments if not _EXAMPLE.match(c))
            found[d.name] = Entry(Definition(d, unit), doc, _example(comments, f"{unit.filename}:{d.span.line}"))
    return found


def lookup(name: str) -> Definition | None:
    entry = _index().get(name)
    return entry.definition if entry else None


def names() -> list[str]:
    return sorted(_index())


def entries() -> dict[str, Entry]:
    return dict(_index())


def definitions() -> dict[str, Definition]:
    return {name: entry.definition for name, entry in _index().items()}
