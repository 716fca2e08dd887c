"""Autograd wiring for every backend, eagerly and under `torch.compile`.

Eager calls go through `_Attention`, a plain `torch.autograd.Function`.
Under `torch.compile`, the same work is the `torch.library` custom op
`maskc::attention` (with `maskc::attention_backward`), which Dynamo traces as
one opaque node, so `torch.compile(fullgraph=True)` works on models that call
maskc.  (Registering is cheap; the first *use* of a custom op imports Dynamo,
which would cost eager users seconds on their first call.)

Programs are referred to by a string key made when a `Program` is created;
call-time bindings travel as names joined by commas plus parallel lists of
values.  Backwards: the Triton and CPU backends differentiate from the saved
output and log-sum-exp with their own kernels; patterns whose CPU path needs
autograd (softcap, gradients for modifier tensors) recompute the forward
under autograd outside any op.  FlexAttention has no CPU backward.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import torch

from .prepare import Prepared, prepare

_PROGRAMS: dict[str, object] = {}
_COUNTER = itertools.count()
_PREPARED: OrderedDict = OrderedDict()
PREPARED_CACHE_SIZE = 32


def register(program) -> str:
    key = f"maskc{next(_COUNTER)}"
    _PROGRAMS[key] = program
    return key


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

    block_q, block_k = blocks_for(backend, q, v, _PROGRAMS[key])
    sizes = tuple(sorted((n, x) for n, x in bindings.items() if not isinstance(x, torch.Tensor)))
    cache_key = (key, backend, tuple(q.shape), tuple(k.shape), v.shape[-1], q_offset, sizes, str(q.device))
    has_tensors = any(isinstance(x, torch.Tensor) for x in bindings.values())
    if not has_tensors and cache_key in _PREPARED:
        _PREPARED.move_to_end(cache_key)
        return _PREPARED[cache_key]
    prepared = prepare(_PROGRAMS[key], q, k, block_q, block_k, q_offset, bindings)
    if backend == "triton" and q.is_cuda and clustered_heads(backend, prepared) is None:
        prepared = _with_spill_free_tiles(prepared, key, q, k, v, q_offset, bindings)
    if not has_tensors and not prepared.instance.dynamic:
        _PREPARED[cache_key] = prepared
        while len(_PREPARED) > PREPARED_CACHE_SIZE:
            _PREPARED.popitem(last=False)
    return prepared


def _with_spill_free_tiles(prepared: Prepared, key: str, q, k, v, q_offset, bindings) -> Prepared:
    """On a GPU: the first tile configuration whose kernels do not spill there."""
    from .tuning import architecture, spill_free_config

    head_dim = max(q.shape[-1], v.shape[-1])
    tile = spill_free_config(prepared.forms, prepared.title, q.dtype, head_dim, q.shape[2], architecture(q.device))
    if (tile.block_q, tile.block_k) != (prepared.block_q, prepared.block_k):
        prepared = prepare(_PROGRAMS[key], q, k, tile.block_q, tile.block_k, q_offset, bindings)
    prepared.tile = tile
    return prepared


# ----------------------------------------------------------------- the work itself


def forward_impl(q, k, v, key, backend, scale, q_offset, bindings) -> tuple[torch.Tensor, torch.Tensor]:
    from .dispatch import run_prepared

    prepared = prepared_for(key, backend, q, k, v, q_offset, bindings)
    with torch.no_grad():
        out, lse = run_prepared(backend, q, k, v, prepared, scale)
    return out.contiguous(), lse.contiguous()


def needs_recompute(backend: str, prepared: Prepared, wanted: list[bool]) -> bool:
    """Whether gradients need the forward again under autograd (CPU softcap / modifier
    tensors; clustered attention, which composes under autograd)."""
    from .dispatch import clustered_heads

    if clustered_heads(backend, prepared) is not None:
        return True
    if backend != "cpu":
        return False
    from . import cpu

    return any(wanted) or cpu._needs_generic(prepared, for_backward=True)


def backward_kernels(q, k, v, out, lse, dout, dlse, key, backend, scale, q_offset, bindings, wanted):
    """(dq, dk, dv, {tensor name: grad}) from the saved output and log-sum-exp."""
    from .dispatch import inverse_permutation

    if backend == "flex":
        raise NotImplementedError("FlexAttention has no CPU backward: use backend='cpu' or 'triton' to train")
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

        dq, dk, dv, grads = triton_backend.backward(q, k, v, out, lse, dout, dlse, prepared, scale, any(wanted))
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


def recompute_grads(
    q, k, v, dout, dlse, key, backend, scale, q_offset, tensor_names, tensors, size_names, sizes, wanted
):
    """Gradients by running the differentiable forward again under autograd."""
    from .dispatch import run_prepared

    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        extra = [t.detach().requires_grad_() if w else t for t, w in zip(tensors, wanted, strict=True)]
        bindings = _bindings(tensor_names, extra, size_names, sizes)
        prepared = prepare(_PROGRAMS[key], leaves[0], leaves[1], *_blocks(backend, q, v, key), q_offset, bindings)
        out, lse = run_prepared(backend, *leaves, prepared, scale)
        inputs = leaves + [t for t, w in zip(extra, wanted, strict=True) if w]
        grads = torch.autograd.grad((out, lse), inputs, (dout, dlse), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]
    rest = iter(grads[3:])
    return grads[0], grads[1], grads[2], [next(rest) if w else None for w in wanted]


def _blocks(backend, q, v, key):
    from .dispatch import blocks_for

    return blocks_for(backend, q, v, _PROGRAMS[key])


def gradients(q, k, v, out, lse, dout, dlse, key, backend, scale, q_offset, tensor_names, tensors, size_names, sizes,
              wanted, kernel_backward):  # fmt: skip
    """dq, dk, dv and a gradient (or None) per bound tensor; `kernel_backward` runs the kernels."""
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    bindings = _bindings(tensor_names, tensors, size_names, sizes)
    prepared = prepared_for(key, backend, q, k, v, q_offset, bindings)
    if needs_recompute(backend, prepared, wanted):
        return recompute_grads(
            q, k, v, dout, dlse, key, backend, scale, q_offset, tensor_names, tensors, size_names, sizes, wanted
        )
    dq, dk, dv, extra = kernel_backward(dout, dlse, q, k, v, out, lse, bindings, wanted)
    return dq, dk, dv, [g if w else None for g, w in zip(extra, wanted, strict=True)]


def _ordered_grads(grads: dict, names: list[str], tensors, wanted) -> list[torch.Tensor]:
    out = []
    for name, t, w in zip(names, tensors, wanted, strict=True):
        g = grads.get(name) if w else None
        out.append(torch.zeros_like(t) if g is None else g.reshape(t.shape).to(t.dtype))
    return out


# ----------------------------------------------------------------- eager autograd


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, meta, *tensors):
        key, backend, scale, q_offset, tensor_names, size_names, sizes = meta
        ctx.meta = meta
        bindings = _bindings(tensor_names, tensors, size_names, sizes)
        wanted = [bool(n) and t.is_floating_point() for n, t in zip(ctx.needs_input_grad[4:], tensors, strict=True)]
        if any(ctx.needs_input_grad) and needs_recompute(
            backend, prepared_for(key, backend, q, k, v, q_offset, bindings), wanted
        ):
            # Differentiable forward now, its graph kept for the backward (no second forward).
            from .dispatch import run_prepared

            with torch.enable_grad():
                leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                extra = [t.detach().requires_grad_() if w else t for t, w in zip(tensors, wanted, strict=True)]
                graph_bindings = _bindings(tensor_names, extra, size_names, sizes)
                prepared = prepare(_PROGRAMS[key], leaves[0], leaves[1], *_blocks(backend, q, v, key), q_offset,
                                   graph_bindings)  # fmt: skip
                out, lse = run_prepared(backend, *leaves, prepared, scale)
            ctx.graph = (out, lse, leaves + [t for t, w in zip(extra, wanted, strict=True) if w], wanted)
            return out.detach(), lse.detach()
        out, lse = forward_impl(q, k, v, key, backend, scale, q_offset, bindings)
        ctx.save_for_backward(q, k, v, out, lse, *tensors)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if getattr(ctx, "graph", None) is not None:
            out, lse, inputs, wanted = ctx.graph
            ctx.graph = None
            dout = torch.zeros_like(out) if dout is None else dout
            dlse = torch.zeros_like(lse) if dlse is None else dlse
            grads = torch.autograd.grad((out, lse), inputs, (dout, dlse), allow_unused=True)
            rest = iter(grads[3:])
            return grads[0], grads[1], grads[2], None, *(next(rest) if w else None for w in wanted)
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        key, backend, scale, q_offset, tensor_names, size_names, sizes = ctx.meta
        wanted = [
            bool(needs) and t.is_floating_point() for needs, t in zip(ctx.needs_input_grad[4:], tensors, strict=True)
        ]

        def kernels(dout, dlse, q, k, v, out, lse, bindings, wanted):
            dq, dk, dv, grads = backward_kernels(
                q, k, v, out, lse, dout, dlse, key, backend, scale, q_offset, bindings, wanted
            )
            return dq, dk, dv, _ordered_grads(grads, _names(tensor_names), tensors, wanted)

        dq, dk, dv, extra = gradients(
            q, k, v, out, lse, dout, dlse, key, backend, scale, q_offset, tensor_names, tensors, size_names, sizes,
            wanted, kernels,
        )  # fmt: skip
        return dq, dk, dv, None, *extra


def attention(q, k, v, key, backend, scale, q_offset, tensor_names, tensors, size_names, sizes):
    """Run the program `key` with its bindings; (out, lse).  Traced as one op under torch.compile."""
    if torch.compiler.is_compiling():
        return attention_op(q, k, v, key, backend, scale, q_offset, tensor_names, tensors, size_names, sizes)
    meta = (key, backend, scale, q_offset, tensor_names, size_names, tuple(sizes))
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    bindings = _bindings(tensor_names, tensors, size_names, sizes)
    dq, dk, dv, grads = backward_kernels(
        q, k, v, out, lse, dout, dlse, program, backend, scale, q_offset, bindings, wanted
    )
    return dq, dk, dv, _ordered_grads(grads, _names(tensor_names), tensors, wanted)


@attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes,
      wanted):  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), [torch.empty_like(t) for t in tensors]


def _setup_context(ctx, inputs, output):
    q, k, v, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes = inputs
    ctx.save_for_backward(q, k, v, *output, *tensors)
    ctx.args = (program, backend, scale, q_offset, tensor_names, size_names, sizes)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    program, backend, scale, q_offset, tensor_names, size_names, sizes = ctx.args
    wanted = [t.requires_grad and t.is_floating_point() for t in tensors]

    def kernels(dout, dlse, q, k, v, out, lse, bindings, wanted):
        return attention_backward_op(
            dout, dlse, q, k, v, out, lse, program, backend, scale, q_offset, tensor_names, tensors, size_names,
            sizes, wanted,
        )  # fmt: skip

    dq, dk, dv, extra = gradients(
        q, k, v, out, lse, dout, dlse, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes,
        wanted, kernels,
    )  # fmt: skip
    # The gradient mirrors the inputs' pytree: an empty list of ints counts as a list.
    return dq, dk, dv, None, None, None, None, None, extra, None, (None if sizes else [])


attention_op.register_autograd(_backward, setup_context=_setup_context)
