"""Autograd wiring for every backend, eagerly and under `torch.compile`.

Eager calls go through `_Attention`, a plain `torch.autograd.Function`.
Under `torch.compile`, the same work is the `torch.library` custom op
`maskc::attention` (with `maskc::attention_backward`), which Dynamo traces as
one opaque node, so `torch.compile(fullgraph=True)` works on models that call
maskc.  (Registering is cheap; the first *use* of a custom op imports Dynamo,
which would cost eager users seconds on their first call.)

Programs are referred to by a string key: the program's canonical text with its
fixed parameters (`program_key`), so equal programs share one key and the key
alone rebuilds a program that was collected (a compiled graph keeps only the
key).  The registry holds programs weakly.  Call-time bindings travel as names
joined by commas plus parallel lists of values.

Backwards: the Triton and CPU backends differentiate from the saved output and
log-sum-exp with their own kernels; patterns whose path needs autograd (CPU
softcap, gradients for modifier tensors, clustered attention, and Flex, whose
backward is Flex's own) run the forward again under autograd.  Eagerly that
forward runs once, its graph kept for the backward; under `torch.compile` the
whole backward, recompute included, is the `maskc::attention_backward` op, so
nothing traced depends on concrete sizes (dynamic shapes work).  Gradients come
back laid out like `torch.empty_like` of their inputs, what the fake kernels
promise.  FlexAttention has no CPU backward (torch 2.13, eager or compiled).

Dropout (`dropout_p > 0`): the forward draws a seed from torch's default CPU
generator (runtime/dropout.py) and keeps it for the backward, which regenerates
the same keep mask.  Under `torch.compile` a call with dropout is the sibling op
`maskc::attention_dropout`, which draws the seed when it runs (so compiled and
eager runs agree under `torch.manual_seed`) and returns it for
`maskc::attention_backward`; it is tagged nondeterministic_seeded.  Calls
without dropout take the paths above unchanged.  On CPU, dropout runs the
generic path (autograd does the backward).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
from maskc.dsl import ir

from .dropout import Dropout, draw_seed
from .prepare import Prepared, prepare
from .registry import program_for

_PREPARED: OrderedDict = OrderedDict()
PREPARED_CACHE_SIZE = 32


# ----------------------------------------------------------------- preparation


def _names(joined: str) -> list[str]:
    return joined.split(",") if joined else []


def _bindings(tensor_names: str, tensors, size_names: str, sizes) -> dict:
    """Names travel comma-joined (custom ops take no lists of strings); they are identifiers."""
    return {
        **dict(zip(_names(size_names), sizes, strict=True)),
        **dict(zip(_names(tensor_names), tensors, strict=True)),
    }


def prepared_for(key: str, backend: str, q, k, v, q_offset, bindings: dict) -> Prepared:
    """Prepare (instantiate + schedule), reusing the result for static patterns."""
    from .dispatch import blocks_for, clustered_heads

    program = program_for(key)
    block_q, block_k = blocks_for(backend, q, v, program)
    sizes = tuple(sorted((n, x) for n, x in bindings.items() if not isinstance(x, torch.Tensor)))
    tensors = sorted((n, x) for n, x in bindings.items() if isinstance(x, torch.Tensor))
    # A tensor binding (segment ids, a bias table) holds the same data while it is
    # the same object at the same version: packed-document ids reused call after
    # call keep their schedule.  The cached entry holds the tensor, so its id
    # cannot pass to another tensor meanwhile.
    # Inference tensors have no version counter (they may change in place unseen): never kept.
    inference = any(x.is_inference() for _, x in tensors)
    versions = tuple((n, id(x), None if inference else x._version) for n, x in tensors)
    cache_key = (key, backend, tuple(q.shape), tuple(k.shape), v.shape[-1], q_offset, sizes, versions, str(q.device))
    if not inference and cache_key in _PREPARED:
        _PREPARED.move_to_end(cache_key)
        return _PREPARED[cache_key]
    prepared = prepare(program, q, k, block_q, block_k, q_offset, bindings)
    if backend == "triton" and q.is_cuda and clustered_heads(backend, prepared) is None:
        prepared = _with_spill_free_tiles(prepared, program, q, k, v, q_offset, bindings)
    # Not kept: schedules over q and k's contents (routing, clusters), which hold for
    # one call, and tensors being trained (each step is a new version, or a fresh leaf).
    reused = not inference and not any(x.requires_grad for _, x in tensors)
    if reused and not any(ir.reads_qk(p.mask) for p in prepared.instance.patterns):
        _PREPARED[cache_key] = prepared
        while len(_PREPARED) > PREPARED_CACHE_SIZE:
            _PREPARED.popitem(last=False)
    return prepared


def _with_spill_free_tiles(prepared: Prepared, program, q, k, v, q_offset, bindings) -> Prepared:
    """On a GPU: the first tile configuration whose kernels do not spill there."""
    from .tuning import architecture, spill_free_config

    head_dim = max(q.shape[-1], v.shape[-1])
    tile = spill_free_config(prepared.forms, prepared.title, q.dtype, head_dim, q.shape[2], architecture(q.device))
    if (tile.block_q, tile.block_k) != (prepared.block_q, prepared.block_k):
        prepared = prepare(program, q, k, tile.block_q, tile.block_k, q_offset, bindings)
    prepared.tile = tile
    return prepared


# ----------------------------------------------------------------- the work itself


def forward_impl(q, k, v, key, backend, scale, q_offset, bindings, prepared: Prepared | None = None,
                 dropout: Dropout | None = None):  # fmt: skip
    """(out, lse), contiguous like the fake kernel's."""
    from .dispatch import run_prepared

    if prepared is None:
        prepared = prepared_for(key, backend, q, k, v, q_offset, bindings)
    with torch.no_grad():
        out, lse = run_prepared(backend, q, k, v, prepared, scale, dropout)
    return out.contiguous(), lse.contiguous()


def flex_has_backward(device: torch.device) -> bool:
    """FlexAttention differentiates on GPUs, not on CPU or MPS (torch 2.13, eager and compiled)."""
    return device.type not in ("cpu", "mps")


def needs_recompute(backend: str, prepared: Prepared, wanted: list[bool], device: torch.device,
                    dropout: Dropout | None = None) -> bool:  # fmt: skip
    """Whether gradients need the forward again under autograd: Flex (its own backward),
    clustered attention (which composes under autograd), CPU softcap / modifier tensors
    / dropout."""
    from .dispatch import clustered_heads

    if backend == "flex":
        return flex_has_backward(device)
    if clustered_heads(backend, prepared) is not None:
        return True
    if backend != "cpu":
        return False
    if dropout is not None:
        return True
    from . import cpu

    return any(wanted) or cpu._needs_generic(prepared, for_backward=True)


def backward_kernels(q, k, v, out, lse, dout, dlse, key, backend, scale, q_offset, bindings, wanted, dropout=None):
    """(dq, dk, dv, {tensor name: grad}) from the saved output and log-sum-exp."""
    from .dispatch import inverse_permutation

    if backend == "flex":
        raise NotImplementedError(
            f"FlexAttention has no {q.device.type.upper()} backward: use backend='cpu' or 'triton' to train"
        )
    prepared = prepared_for(key, backend, q, k, v, q_offset, bindings)
    perm_q, perm_k = prepared.perm_q, prepared.perm_k
    if perm_q is not None:
        pq = perm_q.to(q.device)
        q, out, lse, dout, dlse = (x[:, :, pq] for x in (q, out, lse, dout, dlse))
    if perm_k is not None:
        pk = perm_k.to(k.device)
        k, v = k[:, :, pk], v[:, :, pk]
    if backend == "triton":
        from . import triton_backend

        dq, dk, dv, grads = triton_backend.backward(
            q, k, v, out, lse, dout, dlse, prepared, scale, any(wanted), dropout
        )
    else:
        from . import cpu

        dq, dk, dv = cpu.backward(q, k, v, out, lse, dout, dlse, prepared, scale)
        grads = {}
    if perm_q is not None:
        dq = dq[:, :, inverse_permutation(perm_q.to(q.device))]
    if perm_k is not None:
        inverse = inverse_permutation(perm_k.to(k.device))
        dk, dv = dk[:, :, inverse], dv[:, :, inverse]
    return dq, dk, dv, grads


def differentiable_forward(q, k, v, key, backend, scale, q_offset, tensor_names, tensors, size_names, sizes, wanted,
                           dropout: Dropout | None = None):  # fmt: skip
    """(out, lse, inputs): the forward under autograd from fresh leaves; `inputs` are the
    q, k, v leaves and the bound tensors that want a gradient."""
    from .dispatch import run_prepared

    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        extra = [t.detach().requires_grad_() if w else t for t, w in zip(tensors, wanted, strict=True)]
        bindings = _bindings(tensor_names, extra, size_names, sizes)
        prepared = prepared_for(key, backend, leaves[0], leaves[1], leaves[2], q_offset, bindings)
        out, lse = run_prepared(backend, *leaves, prepared, scale, dropout)
    return out, lse, leaves + [t for t, w in zip(extra, wanted, strict=True) if w]


def graph_grads(out, lse, inputs, dout, dlse, wanted) -> tuple:
    """dq, dk, dv and a gradient (or None) per bound tensor, through a kept forward graph."""
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    with torch.enable_grad():
        grads = torch.autograd.grad((out, lse), inputs, (dout, dlse), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]
    rest = iter(grads[3:])
    return grads[0], grads[1], grads[2], [next(rest) if w else None for w in wanted]


@contextlib.contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """A custom op's body runs below autograd (the dispatcher excludes the autograd keys),
    and the recompute path differentiates inside `maskc::attention_backward`: lift that."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for lifted in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor, keys.ADInplaceOrView):
        exclude = exclude.remove(lifted)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def backward_impl(dout, dlse, q, k, v, out, lse, key, backend, scale, q_offset, tensor_names, tensors, size_names,
                  sizes, wanted, dropout: Dropout | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """dq, dk, dv and a gradient per bound tensor (zeros where not wanted), each laid out
    like `torch.empty_like` of its input: the compiled graph checks the strides the fake
    kernel promises, and views into a backend's padded buffers would keep those alive."""
    bindings = _bindings(tensor_names, tensors, size_names, sizes)
    prepared = prepared_for(key, backend, q, k, v, q_offset, bindings)
    if needs_recompute(backend, prepared, wanted, q.device, dropout):
        with _autograd_inside_op():
            graph = differentiable_forward(
                q, k, v, key, backend, scale, q_offset, tensor_names, tensors, size_names, sizes, wanted, dropout
            )
            dq, dk, dv, extra = graph_grads(*graph, dout, dlse, wanted)
        grads = dict(zip(_names(tensor_names), extra, strict=True))
    else:
        dq, dk, dv, grads = backward_kernels(
            q, k, v, out, lse, dout, dlse, key, backend, scale, q_offset, bindings, wanted, dropout
        )
    extra = []
    for name, t, w in zip(_names(tensor_names), tensors, wanted, strict=True):
        g = grads.get(name) if w else None
        extra.append(torch.zeros_like(t) if g is None else laid_out_like(g.reshape(t.shape).to(t.dtype), t))
    return laid_out_like(dq, q), laid_out_like(dk, k), laid_out_like(dv, v), extra


def laid_out_like(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`grad` with the dtype and strides of `torch.empty_like(x)` (copied only when they differ)."""
    if grad.shape == x.shape and grad.dtype == x.dtype:
        want = torch.empty_like(x, device="meta").stride()
        if all(s == w or n == 1 for s, w, n in zip(grad.stride(), want, x.shape, strict=True)):
            return grad
    return torch.empty_like(x).copy_(grad)


# ----------------------------------------------------------------- eager autograd


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, meta, *tensors):
        key, backend, scale, q_offset, tensor_names, size_names, sizes, dropout_p = meta
        ctx.meta = meta
        # the seed is drawn here, when the forward runs, and kept for the backward
        dropout = ctx.dropout = Dropout(dropout_p, draw_seed()) if dropout_p else None
        ctx.program = program_for(key)  # alive until the backward (a one-shot program may be dropped)
        bindings = _bindings(tensor_names, tensors, size_names, sizes)
        wanted = [bool(n) and t.is_floating_point() for n, t in zip(ctx.needs_input_grad[4:], tensors, strict=True)]
        prepared = None
        if any(ctx.needs_input_grad):
            prepared = prepared_for(key, backend, q, k, v, q_offset, bindings)
        if prepared is not None and needs_recompute(backend, prepared, wanted, q.device, dropout):
            # Differentiable forward now, its graph kept for the backward (no second forward).
            out, lse, inputs = differentiable_forward(
                q, k, v, key, backend, scale, q_offset, tensor_names, tensors, size_names, sizes, wanted, dropout
            )
            ctx.graph = (out, lse, inputs, wanted)
            return out.detach(), lse.detach()
        out, lse = forward_impl(q, k, v, key, backend, scale, q_offset, bindings, prepared, dropout)
        ctx.save_for_backward(q, k, v, out, lse, *tensors)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if getattr(ctx, "graph", None) is not None:
            out, lse, inputs, wanted = ctx.graph
            ctx.graph = None
            dq, dk, dv, extra = graph_grads(out, lse, inputs, dout, dlse, wanted)
            return dq, dk, dv, None, *extra
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        key, backend, scale, q_offset, tensor_names, size_names, sizes, _ = ctx.meta
        wanted = [
            bool(needs) and t.is_floating_point() for needs, t in zip(ctx.needs_input_grad[4:], tensors, strict=True)
        ]
        dout = torch.zeros_like(out) if dout is None else dout
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        dq, dk, dv, extra = backward_impl(
            dout, dlse, q, k, v, out, lse, key, backend, scale, q_offset, tensor_names, tensors, size_names, sizes,
            wanted, ctx.dropout,
        )  # fmt: skip
        return dq, dk, dv, None, *(g if w else None for g, w in zip(extra, wanted, strict=True))


def attention(q, k, v, key, backend, scale, q_offset, tensor_names, tensors, size_names, sizes, dropout_p=0.0):
    """Run the program `key` with its bindings; (out, lse).  Traced as one op under torch.compile
    (`maskc::attention`, or `maskc::attention_dropout` when dropout_p > 0)."""
    if torch.compiler.is_compiling():
        if dropout_p:
            out, lse, _ = attention_dropout_op(
                q, k, v, key, backend, scale, q_offset, tensor_names, tensors, size_names, sizes, dropout_p
            )
            return out, lse
        return attention_op(q, k, v, key, backend, scale, q_offset, tensor_names, tensors, size_names, sizes)
    meta = (key, backend, scale, q_offset, tensor_names, size_names, tuple(sizes), dropout_p)
    return _Attention.apply(q, k, v, meta, *tensors)


# ----------------------------------------------------------------- torch.compile


@torch.library.custom_op("maskc::attention", mutates_args=())
def attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    program: str,
    backend: str,
    scale: float,
    q_offset: int | None,
    tensor_names: str,
    tensors: list[torch.Tensor],
    size_names: str,
    sizes: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    bindings = _bindings(tensor_names, tensors, size_names, sizes)
    return forward_impl(q, k, v, program, backend, scale, q_offset, bindings)


@attention_op.register_fake
def _(q, k, v, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes):
    batch, heads, lq, _ = q.shape
    return q.new_empty(batch, heads, lq, v.shape[-1]), q.new_empty(batch, heads, lq, dtype=torch.float32)


@torch.library.custom_op("maskc::attention_backward", mutates_args=())
def attention_backward_op(
    dout: torch.Tensor,
    dlse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    program: str,
    backend: str,
    scale: float,
    q_offset: int | None,
    tensor_names: str,
    tensors: list[torch.Tensor],
    size_names: str,
    sizes: list[int],
    wanted: list[bool],
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    dropout = Dropout(dropout_p, int(dropout_seed)) if dropout_p else None
    return backward_impl(
        dout, dlse, q, k, v, out, lse, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes,
        wanted, dropout,
    )  # fmt: skip


@attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes,
      wanted, dropout_p=0.0, dropout_seed=None):  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), [torch.empty_like(t) for t in tensors]


def _setup_context(ctx, inputs, output):
    q, k, v, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes = inputs
    ctx.save_for_backward(q, k, v, *output, *tensors)
    ctx.args = (program, backend, scale, q_offset, tensor_names, size_names, sizes)


def _backward(ctx, dout, dlse):
    """Traced: everything that depends on sizes runs inside `maskc::attention_backward`."""
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    program, backend, scale, q_offset, tensor_names, size_names, sizes = ctx.args
    wanted = [t.requires_grad and t.is_floating_point() for t in tensors]
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dq, dk, dv, extra = attention_backward_op(
        dout, dlse, q, k, v, out, lse, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes,
        wanted,
    )  # fmt: skip
    extra = [g if w else None for g, w in zip(extra, wanted, strict=True)]
    # The gradient mirrors the inputs' pytree: an empty list of ints counts as a list.
    return dq, dk, dv, None, None, None, None, None, extra, None, (None if sizes else [])


attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------- torch.compile, with dropout


@torch.library.custom_op("maskc::attention_dropout", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def attention_dropout_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    program: str,
    backend: str,
    scale: float,
    q_offset: int | None,
    tensor_names: str,
    tensors: list[torch.Tensor],
    size_names: str,
    sizes: list[int],
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`maskc::attention` with dropout: (out, lse, seed), the seed (int64, CPU) drawn when it runs."""
    seed = draw_seed()
    bindings = _bindings(tensor_names, tensors, size_names, sizes)
    out, lse = forward_impl(q, k, v, program, backend, scale, q_offset, bindings, dropout=Dropout(dropout_p, seed))
    return out, lse, torch.tensor(seed, dtype=torch.int64)


@attention_dropout_op.register_fake
def _(q, k, v, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes, dropout_p):
    batch, heads, lq, _ = q.shape
    out = q.new_empty(batch, heads, lq, v.shape[-1])
    return out, q.new_empty(batch, heads, lq, dtype=torch.float32), torch.empty((), dtype=torch.int64)


def _setup_dropout_context(ctx, inputs, output):
    q, k, v, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes, dropout_p = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, seed, *tensors)
    ctx.args = (program, backend, scale, q_offset, tensor_names, size_names, sizes, dropout_p)


def _dropout_backward(ctx, dout, dlse, _dseed):
    q, k, v, out, lse, seed, *tensors = ctx.saved_tensors
    program, backend, scale, q_offset, tensor_names, size_names, sizes, dropout_p = ctx.args
    wanted = [t.requires_grad and t.is_floating_point() for t in tensors]
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dq, dk, dv, extra = attention_backward_op(
        dout, dlse, q, k, v, out, lse, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes,
        wanted, dropout_p, seed,
    )  # fmt: skip
    extra = [g if w else None for g, w in zip(extra, wanted, strict=True)]
    return dq, dk, dv, None, None, None, None, None, extra, None, (None if sizes else []), None


attention_dropout_op.register_autograd(_dropout_backward, setup_context=_setup_dropout_context)
