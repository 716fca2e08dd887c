"""Triton source for one head group's normal form: a readable `.py` file.

The file holds a header naming the pattern and its normal form, the pattern's
`allowed` predicate and `modify` / `modify_grad` logit modifiers, and the
shared attention kernels (`kernel_template.KERNELS`).  Identical structures
give identical text, so heads that differ only in data (ALiBi slopes, random
block draws, bias rows) share one kernel file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace

from maskc.dsl import ir

from .irtext import mask_text, modifier_text
from .kernel_template import KERNELS
from .triton_exprs import Emitter, GradTable, Step, Table, clustered_predicate, modifier_steps, predicate


@dataclass(frozen=True)
class KernelSource:
    text: str
    tables: tuple[Table, ...]
    softcap: bool
    grads: tuple[GradTable, ...] = ()


def _modifier_bodies(steps: list[Step], setup: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Bodies of `modify`, `modify_grad` and `modify_backward`.

    `modify_backward` adds into the gradient buffer of each differentiable
    modifier tensor (its lines come from `Step.backward`), given ds = d loss /
    d (final logits): for modifier i that is ds times the derivatives of the
    softcaps applied after it, for which it replays the modifiers up to the last
    such softcap.  It returns nothing."""
    modify = list(setup)
    for step in steps:
        modify.append(f"s = s + {step.value}" if step.kind == "add" else f"s = {step.value} * _tanh(s / {step.value})")
    modify.append("return s")
    softcaps = [i for i, step in enumerate(steps) if step.kind == "softcap"]
    grad = ["return s * 0.0 + 1.0"]
    if softcaps:
        grad = [*setup, "g = s * 0.0 + 1.0"]
        for step in steps:
            if step.kind == "add":
                grad.append(f"s = s + {step.value}")
            else:
                grad += [f"t = _tanh(s / {step.value})", "g = g * (1.0 - t * t)", f"s = {step.value} * t"]
        grad.append("return g")
    differentiable = [i for i, step in enumerate(steps) if step.backward is not None]
    after = [j for j in softcaps if differentiable and j > differentiable[0]]  # softcaps a gradient goes through
    backward = list(setup)
    for i, step in enumerate(steps[: after[-1] + 1] if after else []):
        if step.kind == "add":
            backward.append(f"s = s + {step.value}")
        else:
            backward += [f"t{i} = _tanh(s / {step.value})", f"s = {step.value} * t{i}"]
    for i in differentiable:
        factors = [f"(1.0 - t{j} * t{j})" for j in softcaps if j > i]
        ds = "ds"
        if factors:
            ds = f"ds_{i}"
            backward.append(f"{ds} = ds * " + " * ".join(factors))
        backward += steps[i].backward(ds)
    return modify, grad, backward or ["pass"]


def _function(name: str, params: str, body: list[str], doc: str) -> str:
    lines = ["@triton.jit", f"def {name}({params}):", f'    """{doc}"""']
    lines += [f"    {line}" for text in body for line in text.split("\n")]
    return "\n".join(lines)


def emit(form: ir.HeadPattern, title: str, block_m: int, block_n: int, version: str) -> KernelSource:
    """The kernel file for one normal form (`title`: the pattern's source)."""
    e = Emitter()
    expr = predicate(form.mask, e)
    return _assemble(form, [*e.lines, f"return {expr}"], e, title, block_m, block_n, version)


def emit_clustered(
    form: ir.HeadPattern, rest: ir.Mask | None, title: str, block_m: int, block_n: int, version: str
) -> KernelSource:
    """The kernel file for clustered execution of `form` (a cluster atom, and the
    static `rest`): the same kernels, run over sequences gathered into cluster
    order with a block-diagonal schedule (runtime/clustered.py)."""
    e = Emitter()
    expr = clustered_predicate(rest, e)
    note = "# execution: gathered into cluster order, block-diagonal schedule over the gathered rows\n"
    source = _assemble(form, [*e.lines, f"return {expr}"], e, title, block_m, block_n, version)
    return replace(source, text=source.text.replace("\nimport triton", note + "\nimport triton", 1))


def _assemble(form: ir.HeadPattern, allowed_body: list[str], e: Emitter, title: str, block_m: int, block_n: int,
              version: str) -> KernelSource:  # fmt: skip
    e.new_scope()
    steps = modifier_steps(form.modifiers, e)
    modify_body, grad_body, backward_body = _modifier_bodies(steps, list(e.lines))
    softcap = any(step.kind == "softcap" for step in steps)
    table_args = e.table_args()
    params = ", ".join(["qpos", "kpos", "b", "h", "q_offset", *table_args])
    tables_sig = "".join(f" {a}," for a in table_args)
    header = _header(form, title, block_m, block_n, version, e.tables)
    parts = [
        header,
        "import triton",
        "import triton.language as tl",
        "",
        f"MODIFIED = tl.constexpr({bool(steps)})  # whether logit modifiers run (else the kernels skip them)",
        "",
        "",
        _function(
            "allowed",
            params,
            allowed_body,
            "Whether query positions qpos [M, 1] may attend to key positions kpos [1, N].",
        ),
        "",
        "",
        _function("modify", "s, " + params, modify_body, "The logits after the pattern's modifiers."),
        "",
        "",
        _function("modify_grad", "s, " + params, grad_body, "d modify(s) / d s (softcap's chain rule)."),
        "",
        "",
        _function(
            "modify_backward",
            "ds, s, " + params,
            backward_body,
            "Add d loss / d (each modifier tensor) into its buffer, given ds = d loss / d (final logits).",
        ),
        "",
        KERNELS.replace("{tables_call}", tables_sig).replace("{tables}", tables_sig),
    ]
    return KernelSource("\n".join(parts), tuple(e.tables), softcap, tuple(e.grads))


def without_head_data(node):
    """The node with per-head data (head index, ALiBi slope) blanked: what the
    generated code depends on, since that data reaches kernels as tables."""
    if isinstance(node, (ir.And, ir.Or)):
        return type(node)(tuple(without_head_data(p) for p in node.parts))
    if isinstance(node, ir.Not):
        return ir.Not(without_head_data(node.part))
    names = {f.name for f in fields(node)}
    changes = {name: value for name, value in (("head", 0), ("slope", 0.0)) if name in names}
    return replace(node, **changes) if changes else node


_SAFE = re.compile(r"[^A-Za-z0-9_ ()\[\],.:=+\-*/%<>|&~{};!]")


def _header(form: ir.HeadPattern, title: str, block_m: int, block_n: int, version: str, tables) -> str:
    """A comment block; spec text in it is reduced to a safe alphabet on one line."""
    form = ir.HeadPattern(without_head_data(form.mask), tuple(without_head_data(m) for m in form.modifiers))
    title = _SAFE.sub("?", " ".join(title.split()))
    normal = mask_text(form.mask).replace("\n", "\n#     ")
    lines = [
        "# Generated by maskc " + version + ". Do not edit: regenerated from the pattern.",
        "# Per-head data (head index, ALiBi slopes, random draws) arrives in tables at run time.",
        "#",
        "# pattern: " + title,
        "# normal form:",
        "#     " + normal,
    ]
    if form.modifiers:
        lines.append("# modifiers: " + ", ".join(modifier_text(m) for m in form.modifiers))
    lines.append(f"# blocks: {block_m} queries x {block_n} keys")
    for t in tables:
        lines.append(f"# {t.name}: {t.kind} table")
    return "\n".join(lines) + "\n"
