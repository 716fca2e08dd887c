"""Imports go down the pipeline only: maskc/ (the facade) -> runtime/ -> codegen/ -> dsl/.

Every module's imports are read with `ast`, function-local ones and those under
`TYPE_CHECKING` included.  A stage may import its own modules and earlier
stages, never a later stage, and no stage but the facade imports the facade
package `maskc` itself (`import maskc`, `from maskc import Program`); naming a
stage's submodule through it (`from maskc import patterns`) is that stage.
`patterns/` (the library, written in the language) sits between dsl/ and codegen/.

Modules also keep to each other's public names: no `from m import _private`,
no `module._private`, and no `obj._private` where `_private` is defined in
another module only (`spec._reachable()` from runtime/).  Every
`torch.autograd.Function` lives in runtime/autograd.py.

A failure lists every violation as `path:line: what`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# directory -> dotted package; stages in pipeline order (the facade last)
PACKAGES = {
    "dsl": "maskc.dsl",
    "patterns": "maskc.patterns",
    "codegen": "maskc.codegen",
    "runtime": "maskc.runtime",
    "maskc": "maskc",
}
STAGES = ("dsl", "patterns", "codegen", "runtime", "maskc")
AUTOGRAD_HOME = "maskc.runtime.autograd"


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. maskc.runtime.op
    path: Path
    is_package: bool

    @property
    def stage(self) -> str:
        return stage_of(self.name)

    @property
    def where(self) -> str:
        return str(self.path.relative_to(ROOT))


def stage_of(name: str) -> str:
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] in STAGES[:-1]:
        return parts[1]
    return "maskc"


def modules() -> dict[str, Module]:
    found = {}
    for directory, package in PACKAGES.items():
        for path in sorted((ROOT / directory).rglob("*.py")):
            parts = list(path.relative_to(ROOT / directory).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join([package, *parts])
            found[name] = Module(name, path, is_package)
    return found


MODULES = modules()


@dataclass(frozen=True)
class Import:
    target: str  # the dotted module imported (a project module, or the package a name comes from)
    names: tuple[str, ...]  # names taken from it by `from ... import`
    line: int


def imports(module: Module, tree: ast.AST) -> list[Import]:
    """Every import of the module, anywhere in it, resolved to absolute names."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(Import(alias.name, (), node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.name.split(".")
                if not module.is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:  # `from maskc.runtime import op`: the module op
                    out.append(Import(sub, (), node.lineno))
                else:
                    out.append(Import(source, (alias.name,), node.lineno))
    return out


def parsed() -> list[tuple[Module, ast.AST]]:
    return [(m, ast.parse(m.path.read_text(encoding="utf-8"), str(m.path))) for m in MODULES.values()]


def layering_violations() -> list[str]:
    found = []
    for module, tree in parsed():
        rank = STAGES.index(module.stage)
        for imp in imports(module, tree):
            if imp.target != "maskc" and not imp.target.startswith("maskc."):
                continue
            target = stage_of(imp.target)
            if STAGES.index(target) > rank:
                what = "the facade package maskc" if imp.target == "maskc" else imp.target
                found.append(f"{module.where}:{imp.line}: {module.stage}/ imports {what} ({target}/ comes later)")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, assignments, attributes set on self."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if _private(n)}


def private_reach_ins() -> list[str]:
    trees = parsed()
    defined = {module.name: _defined_names(tree) for module, tree in trees}
    found = []
    for module, tree in trees:
        own = defined[module.name]
        elsewhere = set().union(*(names for name, names in defined.items() if name != module.name)) - own
        aliases = {}  # local name -> project module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES and alias.asname:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                for imp in imports(module, ast.Module([node], [])):
                    if imp.target in MODULES and imp.target != module.name:
                        for name in imp.names:
                            if _private(name):
                                found.append(f"{module.where}:{imp.line}: imports {imp.target}.{name}")
                for alias in node.names:
                    sub = [i.target for i in imports(module, ast.Module([node], [])) if not i.names]
                    for target in sub:
                        if target.rsplit(".", 1)[-1] == alias.name:
                            aliases[alias.asname or alias.name] = target
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            base = node.value
            if isinstance(base, ast.Name) and base.id in aliases:
                found.append(f"{module.where}:{node.lineno}: reads {aliases[base.id]}.{node.attr}")
            elif isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            elif node.attr in elsewhere:
                found.append(f"{module.where}:{node.lineno}: reads .{node.attr}, private to another module")
    return found


def autograd_functions_elsewhere() -> list[str]:
    found = []
    for module, tree in parsed():
        if module.name == AUTOGRAD_HOME:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for base in node.bases:
                    if ast.unparse(base).endswith("autograd.Function"):
                        found.append(f"{module.where}:{node.lineno}: class {node.name}(torch.autograd.Function)")
    return found


def test_the_modules_are_found():
    stages = {m.stage for m in MODULES.values()}
    assert stages == set(STAGES)
    assert "maskc.runtime.op" in MODULES and "maskc.dsl.parser" in MODULES and "maskc.program" in MODULES


def test_imports_go_down_the_pipeline():
    violations = layering_violations()
    assert not violations, "imports against the pipeline:\n" + "\n".join(violations)


def test_no_private_names_across_modules():
    violations = private_reach_ins()
    assert not violations, "private names used across modules:\n" + "\n".join(violations)


def test_autograd_functions_live_in_one_module():
    violations = autograd_functions_elsewhere()
    assert not violations, f"torch.autograd.Function outside {AUTOGRAD_HOME}:\n" + "\n".join(violations)


def test_the_checks_see_violations():
    """The checks themselves: a planted upward import, facade import and private reach-in are found."""
    module = Module("maskc.codegen.planted", ROOT / "codegen" / "planted.py", False)
    text = "import maskc\nfrom maskc.runtime import op\nfrom ..dsl import spec\ndef f():\n    from . import plan\n"
    tree = ast.parse(text)
    targets = [(i.target, i.line) for i in imports(module, tree)]
    assert targets == [("maskc", 1), ("maskc.runtime.op", 2), ("maskc.dsl.spec", 3), ("maskc.codegen.plan", 5)]
    assert [stage_of(t) for t, _ in targets] == ["maskc", "runtime", "dsl", "codegen"]
