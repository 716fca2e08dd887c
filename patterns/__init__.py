"""The library of published patterns, written in the language (`*.mask`).

Every definition here can be called by name from any spec, loaded with
`maskc.compile("natten2d", k=7)`, and listed with `maskc patterns`.
"""

from __future__ import annotations

import functools
from importlib import resources

from maskc.dsl.errors import MaskTypeError
from maskc.dsl.lower import Definition, Unit
from maskc.dsl.parser import parse


@functools.cache
def _index() -> dict[str, Definition]:
    found: dict[str, Definition] = {}
    for entry in sorted(resources.files(__package__).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".mask"):
            continue
        text = entry.read_text()
        unit = Unit(text, f"patterns/{entry.name}")
        for d in parse(text, unit.filename).defs:
            if d.name in found:
                raise MaskTypeError(
                    f"library pattern '{d.name}' is defined in {found[d.name].unit.filename} and again here",
                    d.span,
                ).with_source(text, unit.filename)
            found[d.name] = Definition(d, unit)
    return found


def lookup(name: str) -> Definition | None:
    return _index().get(name)


def names() -> list[str]:
    return sorted(_index())


def definitions() -> dict[str, Definition]:
    return dict(_index())
