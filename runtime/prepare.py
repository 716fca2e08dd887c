"""Everything a backend needs for one call: sizes, normal forms, schedule, tensors.

Backends work in *execution order*: when the schedule carries a layout
permutation, `run` (in `runtime.dispatch`) permutes q, k, v before the backend
runs and restores the output's order after.  Block positions handed to the
predicate are absolute positions of the original sequence, so the predicate
never needs to know about layouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from maskc.codegen import plan
from maskc.codegen.schedule import BlockSchedule, Runs
from maskc.dsl import evaluate, ir, printer
from maskc.dsl.errors import MaskTypeError
from maskc.dsl.spec import Instance, Spec


@dataclass
class Prepared:
    instance: Instance
    forms: list[ir.HeadPattern]  # normal form per head group (index = schedule group)
    build_schedule: Callable[[], BlockSchedule] = field(repr=False)
    tensors: evaluate.Tensors
    title: str = "pattern"  # the program's source, for generated files' headers
    tile: object = None  # the Triton tile configuration (codegen.tiles.Config) when chosen
    _block_masks: dict = field(default_factory=dict, repr=False)
    _schedule: BlockSchedule | None = field(default=None, repr=False)
    # kernel tables made by the runtime rather than from bindings (clustered execution)
    extra_tables: dict = field(default_factory=dict, repr=False)

    @property
    def schedule(self) -> BlockSchedule:
        """Built on first use: clustered attention (runtime.clustered) never needs it."""
        if self._schedule is None:
            self._schedule = self.build_schedule()
        return self._schedule

    # ------------------------------------------------------------ shapes

    @property
    def lq(self) -> int:
        return self.instance.sizes.lq

    @property
    def lk(self) -> int:
        return self.instance.sizes.lk

    @property
    def heads(self) -> int:
        return self.instance.sizes.heads

    @property
    def head_group(self) -> list[int]:
        return self.instance.head_group

    def group_heads(self, group: int) -> list[int]:
        return [h for h, g in enumerate(self.head_group) if g == group]

    @property
    def block_q(self) -> int:
        return self.schedule.block_q

    @property
    def block_k(self) -> int:
        return self.schedule.block_k

    @property
    def perm_q(self) -> torch.Tensor | None:
        """Execution order -> original query index (None: the given order)."""
        return self.schedule.perm_q

    @property
    def perm_k(self) -> torch.Tensor | None:
        """Execution order -> original key index (None: the given order)."""
        return self.schedule.perm_k

    @property
    def perm(self) -> torch.Tensor | None:
        """The permutation shared by queries and keys (tiled grids), or None."""
        if self.perm_q is not None and self.perm_q is not self.perm_k:
            raise ValueError("queries and keys are laid out differently: use perm_q and perm_k")
        return self.perm_q

    def runs(self, group: int) -> Runs:
        return self.schedule.groups[group]

    def transposed_runs(self, group: int) -> Runs:
        return self.schedule.transposed()[group]

    # ------------------------------------------------------------ blocks

    def block_positions(self, rows: torch.Tensor, cols: torch.Tensor):
        """Absolute positions of query blocks `rows` and key blocks `cols`:
        (qp [n, bq], q_valid [n, bq], kp [n, bk], k_valid [n, bk])."""
        qp, qv = self.schedule.q_geometry.positions(rows)
        kp, kv = self.schedule.k_geometry.positions(cols)
        return qp, qv, kp, kv

    def block_mask(self, group: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Allowed pairs of the given blocks, padding excluded: bool [n, bq, bk]
        ([batch, n, bq, bk] for data-dependent patterns)."""
        qp, qv, kp, kv = self.block_positions(rows, cols)
        allowed = evaluate.mask(self.forms[group].mask, qp[:, :, None], kp[:, None, :], self.tensors)
        return allowed & (qv[:, :, None] & kv[:, None, :])

    def partial_block_mask(self, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, mask) of every partial block of a head group, computed once."""
        if group not in self._block_masks:
            rows, cols, full = self.runs(group).blocks()
            rows, cols = rows[~full], cols[~full]
            self._block_masks[group] = (rows, cols, self.block_mask(group, rows, cols))
        return self._block_masks[group]

    def modifiers(self, group: int) -> tuple[ir.Modifier, ...]:
        return self.forms[group].modifiers

    def apply_modifiers(self, group: int, scores: torch.Tensor, qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
        """Modified logits for scores [..., bq, bk] at absolute positions qp [..., bq, 1], kp [..., 1, bk]."""
        terms = evaluate.modifier_terms(self.modifiers(group), qp, kp, self.tensors)
        return evaluate.apply_terms(scores, terms)

    def default_scale(self, dim: int) -> float:
        return 1.0 / math.sqrt(dim)


# Tensors that dynamic atoms read besides the pattern's own tensor parameters.
DYNAMIC_TENSORS = ("q", "k", "centroids")


def instantiate(
    spec: Spec, lq: int, lk: int | None, heads: int, q_offset: int | None, batch: int | None, bindings: dict
) -> tuple[Instance, evaluate.Tensors]:
    """The pattern instantiated for a call's sizes, with its tensor bindings checked.

    `bindings` give grid sizes and call-time parameters (ints) and tensors (the
    pattern's tensor parameters, and q, k, centroids for dynamic atoms)."""
    sizes, tensors = _split(spec, bindings)
    instance = spec.instantiate(lq, lk, heads=heads, q_offset=q_offset, sizes=sizes)
    checked = evaluate.Tensors(tensors, instance, batch=_batch_of(tensors, batch, _batched_names(instance)))
    # Shapes are named here, before any schedule or kernel indexes a tensor
    # (ids of shape [1, 1, L] would otherwise fail deep inside torch).
    evaluate.check_tensors(instance, checked)
    return instance, checked


def _split(spec: Spec, bindings: dict) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    sizes, tensors = {}, {}
    allowed_tensors = {*spec.tensor_params, *DYNAMIC_TENSORS}
    for name, value in bindings.items():
        if isinstance(value, torch.Tensor):
            if name not in allowed_tensors:
                names = ", ".join(sorted(allowed_tensors))
                raise MaskTypeError(f"unknown tensor binding '{name}' (this pattern takes: {names})")
            tensors[name] = value
        else:
            sizes[name] = value
    return sizes, tensors


def _batched_names(instance: Instance) -> set[str]:
    """Tensors with a leading batch dim: q, k, segment ids, polyline decays
    (not bias tables, ALiBi slopes or centroids, which are per head)."""
    names = {"q", "k"}
    for pattern in instance.patterns:
        names.update(n.tensor for n in ir.walk(pattern.mask) if isinstance(n, ir.Segments))
        for m in pattern.modifiers:
            if isinstance(m, ir.Polyline):
                names.update((m.alpha, m.beta))
    return names


def _batch_of(tensors: dict[str, torch.Tensor], batch: int | None, batched: set[str]) -> int | None:
    sizes = {t.shape[0] for name, t in tensors.items() if t.dim() >= 2 and name in batched}
    sizes.discard(1)
    if batch is not None:
        if not isinstance(batch, int) or isinstance(batch, bool) or not 0 <= batch < 2**31:
            raise MaskTypeError(f"batch must be an integer in 0 .. 2**31, got {batch!r}")
        if sizes - {batch}:
            raise MaskTypeError(f"batch={batch}, but the tensors have batch sizes {sorted(sizes)}")
        return batch
    if len(sizes) > 1:
        raise MaskTypeError(f"the tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop() if sizes else None


def source_text(spec: Spec) -> str:
    """The canonical text of the pattern a spec runs (titles of generated files)."""
    return printer.to_text(spec.definition.node if spec.definition is not None else spec.body)


def prepare(
    program,
    q: torch.Tensor,
    k: torch.Tensor,
    block_q: int,
    block_k: int,
    q_offset: int | None,
    bindings: dict,
    layout: str = "auto",
) -> Prepared:
    """Instantiate, normalise and schedule the program for these tensors."""
    bindings = {"q": q, "k": k, **bindings}
    instance, tensors = instantiate(program.spec, q.shape[2], k.shape[2], q.shape[1], q_offset, q.shape[0], bindings)
    forms = plan.normal_forms(instance)

    def build() -> BlockSchedule:
        return plan.plan_schedule(instance, block_q, block_k, layout, tensors)

    return Prepared(instance, forms, build, tensors, source_text(program.spec).strip())
