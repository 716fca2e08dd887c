"""Everything a backend needs for one call: sizes, normal forms, tiles, schedule, tensors.

`prepared_for` instantiates a program for a call's tensors and bindings
(`instantiate`), normalises it, and leaves the tiles (runtime/tuning.py) and the
block schedule to be made on first use: clustered attention needs neither.
Preparations of static patterns are kept (`PREPARED_CACHE_SIZE`), so calls
that repeat a shape reuse the schedule and everything backends derive from it
(`ScheduleArtifacts`).

Backends work in *execution order*: when the schedule carries a layout
permutation, runtime/execute.py permutes q, k, v before the backend runs and
restores the output's order after.  Block positions handed to the predicate are
absolute positions of the original sequence, so the predicate never needs to
know about layouts.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from maskc.codegen import plan
from maskc.codegen.schedule import BlockSchedule, Runs
from maskc.dsl import evaluate, ir, printer
from maskc.dsl.errors import MaskTypeError
from maskc.dsl.spec import Instance, Spec

from .tuning import POLICY, Tiles

if TYPE_CHECKING:
    from maskc.codegen.emit import KernelSource

    from .cpu.plan import GroupPlan


@dataclass
class ScheduleArtifacts:
    """What backends derive from a `Prepared` once and reuse for as long as it is kept
    (static patterns are kept across calls: `prepared_for`), per head group."""

    # the partial blocks and their masks: (rows, cols, bool mask [(batch,) n, bq, bk])
    partial_masks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # the CPU executor's segments (runtime/cpu/plan.py)
    cpu_plans: dict[int, GroupPlan] = field(default_factory=dict)
    # the generated Triton kernel source
    kernel_sources: dict[int, KernelSource] = field(default_factory=dict)
    # (group, transposed, device) -> the schedule's runs as the kernels read them, on the device:
    # (full ptr, start, end, partial ptr, start, end)
    kernel_runs: dict[tuple[int, bool, str], tuple[torch.Tensor, ...]] = field(default_factory=dict)


@dataclass
class Prepared:
    instance: Instance
    forms: list[ir.HeadPattern]  # normal form per head group (index = schedule group)
    tensors: evaluate.Tensors
    title: str = "pattern"  # the program's source, for generated files' headers
    choose_tiles: Callable[[], Tiles] | None = field(default=None, repr=False)  # asked on first use
    layout: str = "auto"  # the schedule's token layout (codegen.plan.LAYOUTS)
    artifacts: ScheduleArtifacts = field(default_factory=ScheduleArtifacts, repr=False)
    # kernel tables made by the runtime rather than from bindings (clustered execution)
    extra_tables: dict = field(default_factory=dict, repr=False)
    _tiles: Tiles | None = field(default=None, repr=False)
    _schedule: BlockSchedule | None = field(default=None, repr=False)

    @classmethod
    def with_schedule(cls, instance: Instance, forms, tensors, title: str, schedule: BlockSchedule,
                      tiles: Tiles) -> Prepared:  # fmt: skip
        """A preparation whose schedule is made already (gathered clusters, decoding steps)."""
        return cls(instance, forms, tensors, title, _tiles=tiles, _schedule=schedule)

    @property
    def tiles(self) -> Tiles:
        """The tiles the backend runs: chosen on first use (clustered attention never needs them)."""
        if self._tiles is None:
            self._tiles = self.choose_tiles()
        return self._tiles

    @property
    def schedule(self) -> BlockSchedule:
        """Built on first use: clustered attention (runtime.clustered) never needs it."""
        if self._schedule is None:
            t = self.tiles
            self._schedule = plan.plan_schedule(self.instance, t.block_q, t.block_k, self.layout, self.tensors)
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
        return self.tiles.block_q

    @property
    def block_k(self) -> int:
        return self.tiles.block_k

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
        masks = self.artifacts.partial_masks
        if group not in masks:
            rows, cols, full = self.runs(group).blocks()
            rows, cols = rows[~full], cols[~full]
            masks[group] = (rows, cols, self.block_mask(group, rows, cols))
        return masks[group]

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
    spec: Spec,
    lq: int,
    lk: int | None,
    heads: int,
    q_offset: int | None,
    batch: int | None,
    bindings: dict,
    derived: Callable[[Instance], dict] | None = None,
) -> tuple[Instance, evaluate.Tensors]:
    """The pattern instantiated for a call's sizes, with its tensor bindings checked.

    `bindings` give grid sizes and call-time parameters (ints) and tensors (the
    pattern's tensor parameters, and q, k, centroids for dynamic atoms).
    `derived(instance)` gives tables made elsewhere, keyed as `evaluate` caches
    them (context parallel's route selections from sums over every rank)."""
    sizes, tensors = _split(spec, bindings)
    instance = spec.instantiate(lq, lk, heads=heads, q_offset=q_offset, sizes=sizes)
    batch = _batch_of(tensors, batch, _batched_names(instance))
    checked = evaluate.Tensors(tensors, instance, batch=batch, cache=derived(instance) if derived else {})
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
    """Tensors with a leading batch dim: q, k, segment ids, route block scores,
    polyline decays (not bias tables, ALiBi slopes or centroids, which are per head)."""
    names = {"q", "k"}
    for pattern in instance.patterns:
        names.update(n.tensor for n in ir.walk(pattern.mask) if isinstance(n, ir.Segments))
        names.update(n.scores for n in ir.walk(pattern.mask) if isinstance(n, ir.Route) and n.scores)
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
    """Instantiate and normalise the program for these tensors, to be scheduled with
    blocks chosen by hand (tests and benchmarks; calls ask the tile policy)."""
    tiles = Tiles(block_q, block_k)
    return _prepare(program, q, k, q_offset, bindings, lambda forms, title: tiles, layout)


def prepare_for_backend(program, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        q_offset: int | None, bindings: dict) -> Prepared:  # fmt: skip
    """Instantiate and normalise the program for these tensors, to be scheduled with the
    tiles the policy picks for the backend (runtime/tuning.py) when first needed."""
    dtype, device, head_dim, lq = q.dtype, q.device, max(q.shape[-1], v.shape[-1]), q.shape[2]

    def choose(forms, title: str) -> Tiles:
        return POLICY.choose(backend, forms, title, dtype, head_dim, lq, device)

    return _prepare(program, q, k, q_offset, bindings, choose)


def _prepare(program, q, k, q_offset, bindings, choose: Callable, layout: str = "auto") -> Prepared:
    bindings = {"q": q, "k": k, **bindings}
    instance, tensors = instantiate(program.spec, q.shape[2], k.shape[2], q.shape[1], q_offset, q.shape[0], bindings)
    forms = plan.normal_forms(instance)
    title = source_text(program.spec).strip()
    return Prepared(instance, forms, tensors, title, lambda: choose(forms, title), layout)


# ---------------------------------------------------------------- preparations kept across calls

_PREPARED: OrderedDict = OrderedDict()
PREPARED_CACHE_SIZE = 32


def prepared_for(program, backend: str, q, k, v, q_offset: int | None, bindings: dict) -> Prepared:
    """`prepare_for_backend`, reusing the result for static patterns."""
    sizes = tuple(sorted((n, x) for n, x in bindings.items() if not isinstance(x, torch.Tensor)))
    tensors = sorted((n, x) for n, x in bindings.items() if isinstance(x, torch.Tensor))
    # A tensor binding (segment ids, a bias table) holds the same data while it is
    # the same object at the same version: packed-document ids reused call after
    # call keep their schedule.  The cached entry holds the tensor, so its id
    # cannot pass to another tensor meanwhile.
    # Inference tensors have no version counter (they may change in place unseen): never kept.
    inference = any(x.is_inference() for _, x in tensors)
    versions = tuple((n, id(x), None if inference else x._version) for n, x in tensors)
    cache_key = (program.key, backend, tuple(q.shape), tuple(k.shape), v.shape[-1], q.dtype, q_offset, sizes, versions,
                 str(q.device))  # fmt: skip
    if not inference and cache_key in _PREPARED:
        _PREPARED.move_to_end(cache_key)
        return _PREPARED[cache_key]
    prepared = prepare_for_backend(program, backend, q, k, v, q_offset, bindings)
    # Not kept: schedules over q and k's contents (routing, clusters), which hold for
    # one call, and tensors being trained (each step is a new version, or a fresh leaf).
    reused = not inference and not any(x.requires_grad for _, x in tensors)
    if reused and not any(ir.reads_qk(p.mask) for p in prepared.instance.patterns):
        _PREPARED[cache_key] = prepared
        while len(_PREPARED) > PREPARED_CACHE_SIZE:
            _PREPARED.popitem(last=False)
    return prepared


def clear_cache() -> None:
    """Forget every kept preparation."""
    _PREPARED.clear()
