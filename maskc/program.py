"""`maskc.compile` and `Program`: the public face of a compiled pattern."""

from __future__ import annotations

import functools
import inspect
import os
import re
from pathlib import Path

import torch

from maskc import patterns as library
from maskc.codegen import plan
from maskc.codegen.schedule import BlockSchedule
from maskc.dsl import evaluate
from maskc.dsl.errors import MaskError, MaskTypeError
from maskc.dsl.spec import Instance, Spec, load
from maskc.runtime import decode as decoding
from maskc.runtime import dispatch, dropout, registry
from maskc.runtime.inputs import backend_for, check_qkv
from maskc.runtime.prepare import DYNAMIC_TENSORS, instantiate, source_text
from maskc.runtime.reference import pattern_reference
from maskc.runtime.tuning import POLICY, Tiles

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _read_spec(spec: str | os.PathLike, pattern: str | None) -> tuple[str, str | None, str | None]:
    """(text, filename, pattern) for spec text, a `.mask` path or a library name."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise MaskError(f"a spec is text, a .mask path or a library name, not {type(spec).__name__}")
    stripped = spec.strip()
    if _IDENTIFIER.fullmatch(stripped) and library.lookup(stripped) is not None:
        definition = library.lookup(stripped)
        if pattern is not None and pattern != stripped:
            raise MaskError(f"'{stripped}' is a library pattern; pattern={pattern!r} does not apply")
        return definition.unit.source, definition.unit.filename, stripped
    if stripped.endswith(".mask") and "\n" not in stripped and "\x00" not in stripped:
        try:
            return Path(stripped).read_text(encoding="utf-8"), stripped, pattern
        except OSError as e:
            raise MaskError(f"cannot read spec file {stripped}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise MaskError(f"cannot read spec file {stripped}: it is not UTF-8 text (byte {e.start})") from None
    return spec, None, pattern


def compile(spec: str | os.PathLike, /, *, pattern: str | None = None, **params) -> Program:
    """Parse and check a pattern; fix its parameters.

    `spec` is spec text (``"causal & window(256)"``), a path to a ``.mask``
    file, or the name of a library pattern (``"natten2d"``).  `pattern` picks
    one definition of a file that has several; `params` override defaults.

    Example::

        >>> prog = maskc.compile("natten2d", k=7)
        >>> prog.mask(3136, h=56, w=56).shape
        torch.Size([1, 3136, 3136])
    """
    text, filename, pattern = _read_spec(spec, pattern)
    checked = load(
        text,
        filename=filename,
        pattern=pattern,
        params=params,
        library=library.lookup,
        library_names=library.names,
    )
    _check_binding_names(checked)
    return Program(checked)


def _check_binding_names(spec: Spec) -> None:
    """Names bound when calling (grid sizes, parameters without defaults) are
    passed as keyword arguments, so none may be one of the call's own arguments
    (`batch`, `q_offset`, `v`, ...): `prog.mask(64, batch=2)` could not tell them apart."""
    reserved = _call_arguments()
    for name in spec.bindable():
        if name in reserved:
            kind = "parameter" if name in spec.call_params else "grid size"
            params = spec.definition.node.params if spec.definition else ()
            span = next((p.span for p in params if p.name == name), None) or spec.name_span(name)
            raise MaskTypeError(
                f"{kind} '{name}' is bound when calling, but '{name}' is an argument of the "
                "call itself (Program.mask, Program.__call__, ...): rename it",
                span,
            ).with_source(spec.unit.source, spec.unit.filename)


@functools.cache
def _call_arguments() -> frozenset[str]:
    names: set[str] = set(DYNAMIC_TENSORS)
    for method in (Program.mask, Program.reference, Program.__call__, Program.schedule, Program.instantiate):
        for p in inspect.signature(method).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                names.add(p.name)
    return frozenset(names)


class Program:
    """A checked pattern.  Call it like `scaled_dot_product_attention`."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.key = registry.register(self)  # how the torch.library ops refer to this program

    # ------------------------------------------------------------ description

    @property
    def name(self) -> str | None:
        return self.spec.name

    @property
    def params(self) -> dict[str, object]:
        return dict(self.spec.params)

    def source(self) -> str:
        """The canonical text of the pattern that runs."""
        return source_text(self.spec)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.spec.params.items())
        return f"Program({self.source()!r}{', ' + params if params else ''})"

    # ------------------------------------------------------------ evaluation

    def instantiate(
        self,
        lq: int,
        lk: int | None = None,
        *,
        heads: int = 1,
        q_offset: int | None = None,
        **sizes: int,
    ) -> Instance:
        """The pattern evaluated per head for concrete lengths and grid sizes."""
        return self.spec.instantiate(lq, lk, heads=heads, q_offset=q_offset, sizes=sizes)

    def mask(
        self,
        lq: int,
        lk: int | None = None,
        *,
        heads: int = 1,
        batch: int | None = None,
        q_offset: int | None = None,
        **bindings,
    ) -> torch.Tensor:
        """The dense boolean mask: [heads, lq, lk], or [batch, heads, lq, lk] when
        `batch` is given or a runtime tensor varies per batch element.

        `bindings` give grid sizes (``h=56, w=56``), call-time parameters, and
        tensors (``ids=...``, ``q=..., k=...`` for `route`/`cluster`).
        """
        instance, tensors = instantiate(self.spec, lq, lk, heads, q_offset, batch, bindings)
        return evaluate.dense_mask(instance, tensors)

    def reference(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        q_offset: int | None = None,
        return_lse: bool = False,
        dropout_p: float = 0.0,
        dropout_seed: int | None = None,
        **bindings,
    ):
        """Dense attention over the mask and modifiers (slow, exact, differentiable).

        q [batch, heads, lq, dim], k and v [batch, kv_heads, lk, dim] with
        kv_heads dividing heads.  Rows with no allowed key output 0.
        `dropout_p` drops with the keep mask every backend uses for `dropout_seed`
        (drawn like the forward draws it when None: see `dropout_seed()`).
        """
        return pattern_reference(
            self.spec,
            q,
            k,
            v,
            scale=scale,
            q_offset=q_offset,
            return_lse=return_lse,
            dropout_p=dropout_p,
            dropout_seed=dropout_seed,
            bindings=bindings,
        )

    def normal_form(self, lq: int, lk: int | None = None, *, heads: int = 1, q_offset: int | None = None, **sizes):
        """Each distinct head pattern in normal form, with the heads that share it."""
        instance = self.instantiate(lq, lk, heads=heads, q_offset=q_offset, **sizes)
        forms = plan.normal_forms(instance)
        return [([h for h, g in enumerate(instance.head_group) if g == i], form) for i, form in enumerate(forms)]

    def schedule(
        self,
        lq: int,
        lk: int | None = None,
        *,
        block_q: int | None = None,
        block_k: int | None = None,
        heads: int = 1,
        q_offset: int | None = None,
        layout: str = "auto",
        backend: str = "auto",
        head_dim: int = 64,
        **bindings,
    ) -> BlockSchedule:
        """The exact block schedule: per head group and query block, the key blocks
        to visit, each full or partial.  Built from interval reasoning, in time
        that grows with the visited blocks (never with lq * lk).

        Without `block_q` / `block_k`, the blocks `backend` runs for q of `head_dim`
        (the tile policy of runtime/tuning.py): "auto" is Triton when CUDA is
        available (on the GPU, for half precision), else the CPU executor (64 x 64,
        query blocks no taller than lq); "flex" is 128 x 128.
        `layout="auto"` may reorder a grid's tokens into tiles when that visits
        fewer blocks; "rowmajor" keeps the given order, "tiled" insists on tiles.
        """
        instance, tensors = instantiate(self.spec, lq, lk, heads, q_offset, None, bindings)
        if block_q is None or block_k is None:
            tiles = self._default_tiles(instance, backend, head_dim)
            block_q = tiles.block_q if block_q is None else block_q
            block_k = tiles.block_k if block_k is None else block_k
        return plan.plan_schedule(instance, block_q, block_k, layout, tensors)

    def _default_tiles(self, instance: Instance, backend: str, head_dim: int) -> Tiles:
        cuda = torch.cuda.is_available()
        name = backend_for(backend, cuda)
        if name == "reference":
            raise MaskTypeError("backend='reference' runs no block schedule: give block_q and block_k")
        device = "cuda" if cuda and name == "triton" else "cpu"
        forms = plan.normal_forms(instance)
        return POLICY.choose(name, forms, self.source(), torch.float16, head_dim, instance.sizes.lq, device)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        backend: str = "auto",
        scale: float | None = None,
        return_lse: bool = False,
        q_offset: int | None = None,
        dropout_p: float = 0.0,
        **bindings,
    ):
        """Attention with this pattern, like `scaled_dot_product_attention`.

        `backend`: "auto" (Triton on CUDA tensors, the CPU executor on CPU),
        "triton" (on CPU tensors: the generated kernels under TRITON_INTERPRET=1),
        "cpu", "flex" (FlexAttention with maskc's schedule) or "reference".
        `return_lse=True` also returns the log-sum-exp per query row, float32
        [batch, heads, lq] (float64 for float64 inputs on the CPU, as FlexAttention),
        so results over key shards can be merged exactly.
        `dropout_p` (0 <= p < 1) drops attention probabilities like SDPA's: the keep
        mask hashes (seed, batch, head, query and key positions), the seed drawn from
        torch's default generator (`dropout_seed()`); "cpu", "triton", "reference".
        """
        return dispatch.run(
            self,
            q,
            k,
            v,
            backend=backend,
            scale=scale,
            return_lse=return_lse,
            q_offset=q_offset,
            dropout_p=dropout_p,
            **bindings,
        )

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        positions: int | torch.Tensor,
        *,
        key_lengths: int | torch.Tensor | None = None,
        backend: str = "auto",
        scale: float | None = None,
        return_lse: bool = False,
        **bindings,
    ):
        """A decoding step: a few new queries per sequence against a KV cache of fixed capacity.

        q [batch, heads, n, dim] holds each sequence's n new queries (1 when
        decoding, a few for chunked prefill or speculative decoding), at
        positions ``positions[b] .. positions[b] + n - 1``; k_cache and v_cache
        [batch, kv_heads, capacity, dim] hold keys in slots 0 .. capacity - 1,
        of which sequence b uses the first ``key_lengths[b]`` (default
        ``positions + n``: the new tokens' keys are already written).  The
        result equals calling the program on ``k_cache[b, :, :key_lengths[b]]``
        with ``q_offset=positions[b]``, per sequence.  Tensor bindings indexed
        by key position (segment ids) cover the whole capacity.

        Positions and lengths are data (ints or integer tensors [batch]): under
        ``torch.compile`` a loop of steps compiles once.  On the CPU, a pattern
        whose meaning does not depend on the sequence length (windows, sinks,
        causal, segments, ALiBi, softcap) reads only the keys it attends
        (strided views of the cache, no copy), with block schedules cached per
        tile of positions; other patterns and backends run the program on each
        sequence's cache prefix.  No gradients: train with ``prog(q, k, v)``.

        Example::

            prog = maskc.compile("streaming", sinks=4, w=1024)
            k_cache[:, :, pos] = k_new[:, :, 0]  # write the step's key and value
            v_cache[:, :, pos] = v_new[:, :, 0]
            out = prog.decode(q_new, k_cache, v_cache, pos)  # pos: int or tensor [batch]
        """
        return decoding.run(
            self,
            q,
            k_cache,
            v_cache,
            positions,
            key_lengths,
            backend=backend,
            scale=scale,
            return_lse=return_lse,
            bindings=bindings,
        )


def dropout_seed() -> int:
    """The seed a forward with `dropout_p > 0` draws from torch's default CPU generator:
    after ``torch.manual_seed(s)``, ``dropout_seed()`` returns the seed the next such
    forward will use, for ``Program.reference(..., dropout_seed=...)``."""
    return dropout.draw_seed()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: str, /, **params_and_bindings):
    """One-shot attention: compile `spec` and run it.

    Keyword arguments that name the pattern's parameters fix them; the rest
    are bindings (grid sizes, tensors, `scale`, `q_offset`, `dropout_p`).
    """
    probe = compile(spec)
    declared = {p.name for p in probe.spec.definition.node.params} if probe.spec.definition else set()
    tensor_params = set(probe.spec.tensor_params)
    params = {k_: v_ for k_, v_ in params_and_bindings.items() if k_ in declared and k_ not in tensor_params}
    rest = {k_: v_ for k_, v_ in params_and_bindings.items() if k_ not in params}
    program = compile(spec, **params) if params else probe
    return program(q, k, v, **rest)


# A key alone (a compiled graph keeps only keys) rebuilds a Program.
registry.build_programs_with(Program)

__all__ = ["Program", "attention", "check_qkv", "compile", "dropout_seed"]
