"""Programs by key: how the torch.library ops, which take no Python objects, find the program a call runs.

A key is the canonical text of the definitions a program runs with its fixed
parameters (`program_key`), so equal programs share one key and the key alone
rebuilds a program that was collected (a compiled graph keeps only the key).
`PROGRAMS` holds programs weakly: one-shot calls do not accumulate them.

Rebuilding makes an object of the type the facade registered with
`build_programs_with` (maskc/program.py registers `Program`), so the runtime
never imports the facade.
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Callable

from maskc.dsl import ast, printer
from maskc.dsl.atoms import ATOMS, MODIFIERS
from maskc.dsl.spec import Spec, load

from maskc import patterns as library

# key -> the live program with that key
PROGRAMS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
# Programs rebuilt from their keys (their originals were collected) that stay alive,
# so that a compiled graph calling one does not parse its spec again at every call.
REBUILT_CACHE_SIZE = 16
_BUILD: list[Callable[[Spec], object]] = []


def build_programs_with(build: Callable[[Spec], object]) -> None:
    """How to make a program from a checked spec when only its key is left."""
    _BUILD[:] = [build]


def program_key(spec: Spec) -> str:
    """The canonical text of the definitions the program runs with its fixed
    parameters, as JSON: equal programs share it, and it rebuilds the program.

    The text holds the entry and every definition of the spec's own file it
    reaches (also through library patterns, which resolve names in that file
    first); library patterns stay calls by name.
    """
    local = spec.resolver.local
    names = {
        node.name
        for node in spec.reachable_nodes()
        if isinstance(node, ast.Call) and node.name in local and node.name not in ATOMS and node.name not in MODIFIERS
    }
    entry = spec.definition.node.name if spec.definition is not None else None
    if entry is not None:
        names.add(entry)
    module = ast.Module(tuple(local[n].node for n in sorted(names)), None if entry is not None else spec.body)
    return json.dumps([printer.to_text(module), entry, sorted(spec.params.items())])


def register(program) -> str:
    """The program's key; the registry holds the program weakly (a live equal one is kept)."""
    key = program_key(program.spec)
    if PROGRAMS.get(key) is None:
        PROGRAMS[key] = program
    return key


def program_for(key: str):
    """The live program with this key, else one rebuilt from the key."""
    found = PROGRAMS.get(key)
    return found if found is not None else rebuilt(key)


@functools.lru_cache(maxsize=REBUILT_CACHE_SIZE)
def rebuilt(key: str):
    """A program made anew from its key (kept among the last REBUILT_CACHE_SIZE)."""
    if not _BUILD:
        raise RuntimeError("no program type registered: import maskc")
    text, entry, params = json.loads(key)
    spec = load(text, pattern=entry, params=dict(params), library=library.lookup, library_names=library.names)
    return _BUILD[0](spec)
