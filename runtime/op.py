"""`maskc::attention` as a `torch.library` custom op, with its backward.

Registering the kernels as an opaque op lets `torch.compile(fullgraph=True)`
trace models that call maskc, and gives every backend the same autograd
wiring.  Programs are referred to by a string key (registered when a
`Program` is made); call-time bindings travel as parallel lists of names and
values.  The Triton backend has its own backward kernels; the other backends
recompute their (differentiable) forward under autograd.
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
    from .dispatch import blocks_for

    block_q, block_k = blocks_for(backend, q, v)
    sizes = tuple(sorted((n, x) for n, x in bindings.items() if not isinstance(x, torch.Tensor)))
    cache_key = (key, backend, tuple(q.shape), tuple(k.shape), v.shape[-1], q_offset, sizes, str(q.device))
    has_tensors = any(isinstance(x, torch.Tensor) for x in bindings.values())
    if not has_tensors and cache_key in _PREPARED:
        _PREPARED.move_to_end(cache_key)
        return _PREPARED[cache_key]
    prepared = prepare(_PROGRAMS[key], q, k, block_q, block_k, q_offset, bindings)
    if not has_tensors and not prepared.instance.dynamic:
        _PREPARED[cache_key] = prepared
        while len(_PREPARED) > PREPARED_CACHE_SIZE:
            _PREPARED.popitem(last=False)
    return prepared


@torch.library.custom_op("maskc::attention", mutates_args=())
def attention(
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
    from .dispatch import run_prepared

    bindings = _bindings(tensor_names, tensors, size_names, sizes)
    prepared = prepared_for(program, backend, q, k, v, q_offset, bindings)
    with torch.no_grad():
        out, lse = run_prepared(backend, q, k, v, prepared, scale)
    return out.contiguous(), lse.contiguous()


@attention.register_fake
def _(q, k, v, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes):
    batch, heads, lq, _ = q.shape
    out = q.new_empty(batch, heads, lq, v.shape[-1])
    lse = q.new_empty(batch, heads, lq, dtype=torch.float32)
    return out, lse


@torch.library.custom_op("maskc::attention_backward", mutates_args=())
def attention_backward(
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
    tensor_grads: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    from .dispatch import run_prepared

    bindings = _bindings(tensor_names, tensors, size_names, sizes)
    prepared = prepared_for(program, backend, q, k, v, q_offset, bindings)
    differentiable = [g and t.is_floating_point() for t, g in zip(tensors, tensor_grads, strict=True)]
    if backend == "triton":
        from . import triton_backend

        names = _names(tensor_names)
        dq, dk, dv, grads = _triton_backward(
            triton_backend, q, k, v, out, lse, dout, dlse, prepared, scale, any(differentiable)
        )
        extra = []
        for name, t, wanted in zip(names, tensors, differentiable, strict=True):
            g = grads.get(name) if wanted else None
            extra.append(torch.zeros_like(t) if g is None else g.reshape(t.shape).to(t.dtype))
        return dq, dk, dv, extra
    # Other backends: recompute the differentiable forward and let autograd do the rest.
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        extra = [t.detach().requires_grad_() if d else t for t, d in zip(tensors, differentiable, strict=True)]
        if any(differentiable):
            bindings = _bindings(tensor_names, extra, size_names, sizes)
            prepared = prepare(
                _PROGRAMS[program], leaves[0], leaves[1], prepared.block_q, prepared.block_k, q_offset, bindings
            )
        o, l = run_prepared(backend, *leaves, prepared, scale)
        inputs = leaves + [t for t, d in zip(extra, differentiable, strict=True) if d]
        grads = torch.autograd.grad((o, l), inputs, (dout, dlse), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]
    rest = iter(grads[3:])
    extra_grads = [next(rest) if d else torch.zeros_like(t) for t, d in zip(tensors, differentiable, strict=True)]
    return grads[0], grads[1], grads[2], extra_grads


def _triton_backward(triton_backend, q, k, v, out, lse, dout, dlse, prepared, scale, tensor_grads=False):
    """The Triton backward in the schedule's token order, gradients back in the given order."""
    from .dispatch import inverse_permutation

    perm_q, perm_k = prepared.perm_q, prepared.perm_k
    if perm_q is not None:
        pq = perm_q.to(q.device)
        q, out, lse, dout, dlse = (x[:, :, pq] for x in (q, out, lse, dout, dlse))
    if perm_k is not None:
        pk = perm_k.to(k.device)
        k, v = k[:, :, pk], v[:, :, pk]
    dq, dk, dv, grads = triton_backend.backward(q, k, v, out, lse, dout, dlse, prepared, scale, tensor_grads)
    if perm_q is not None:
        dq = dq[:, :, inverse_permutation(perm_q.to(q.device))]
    if perm_k is not None:
        inverse = inverse_permutation(perm_k.to(k.device))
        dk, dv = dk[:, :, inverse], dv[:, :, inverse]
    return dq, dk, dv, grads


@attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes,
      tensor_grads):  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), [torch.empty_like(t) for t in tensors]


def _setup_context(ctx, inputs, output):
    q, k, v, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tensors)
    ctx.args = (program, backend, scale, q_offset, tensor_names, size_names, sizes)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    program, backend, scale, q_offset, tensor_names, size_names, sizes = ctx.args
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    wanted = [t.requires_grad and t.is_floating_point() for t in tensors]
    dq, dk, dv, extra = attention_backward(
        dout, dlse, q, k, v, out, lse, program, backend, scale, q_offset, tensor_names, tensors, size_names, sizes,
        wanted,
    )  # fmt: skip
    extra = extra if ctx.needs_input_grad[8] else [None] * len(extra)
    # The gradient must mirror the inputs' pytree: an empty list of ints counts as a list.
    return dq, dk, dv, None, None, None, None, None, extra, None, (None if sizes else [])


attention.register_autograd(_backward, setup_context=_setup_context)
