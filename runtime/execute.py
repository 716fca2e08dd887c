"""A prepared call on a backend, forward and backward, in the schedule's token order.

Backends work in *execution order*: when the schedule carries a layout
permutation, q, k, v are permuted into it before the backend runs and the
results are permuted back after (block positions handed to predicates are
those of the original sequence, so no predicate knows about layouts).
Clustered patterns on maskc's own backends are gathered into cluster order
instead (runtime/clustered.py, runtime/clustered_triton.py).

Backends take execution-order q, k, v and a `Prepared`, and return
(out, lse): out like q (with v's head dim), lse [batch, heads, lq] float32 (float64 for float64 inputs on the CPU)
(-inf for rows with no allowed key).  `run_prepared` is differentiable (the
backends are: runtime/autograd.py); `backward_prepared` computes gradients from
a saved output and log-sum-exp with the backend's own backward kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from maskc.codegen.plan import clustered_splits
from maskc.dsl.errors import MaskTypeError

from . import clustered, cpu, flex, triton_backend
from .clustered_triton import triton_clustered_attention
from .dropout import Dropout
from .prepare import Prepared

# Each backend's forward, looked up when it runs.
_FORWARD = {
    "cpu": (cpu, "cpu_attention"),
    "flex": (flex, "flex_backend"),
    "triton": (triton_backend, "triton_attention"),
}


def backend_function(name: str) -> Callable:
    module, attr = _FORWARD[name]
    return getattr(module, attr)


def clustered_heads(name: str, prepared: Prepared) -> list[clustered.ClusterHead] | None:
    """Clustered execution plan for maskc's own backends (FlexAttention keeps the block schedule)."""
    return clustered.plan(prepared) if name in ("cpu", "triton") else None


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def run_prepared(name: str, q, k, v, prepared: Prepared, scale: float, dropout: Dropout | None = None):
    """Permute into the schedule's token order, run the backend, permute back
    (clustered patterns: gather into cluster order instead, see runtime/clustered.py).
    `dropout` (None: none) reaches the CPU and Triton backends only."""
    heads = clustered_heads(name, prepared)
    if heads is not None:
        if dropout is not None:
            raise MaskTypeError(
                f"backend={name!r} has no attention dropout for clustered patterns (cluster(...) heads run "
                "gathered into cluster order): use dropout_p=0"
            )
        if name == "triton" and clustered_splits(prepared.forms) is not None:  # what AOT compiles, too
            return triton_clustered_attention(q, k, v, prepared, scale, heads)
        return clustered.clustered_attention(q, k, v, prepared, scale, heads)
    perm_q, perm_k = prepared.perm_q, prepared.perm_k
    if perm_q is not None:
        q = q[:, :, perm_q.to(q.device)]
    if perm_k is not None:
        k, v = k[:, :, perm_k.to(k.device)], v[:, :, perm_k.to(k.device)]
    if dropout is None:
        out, lse = backend_function(name)(q, k, v, prepared, scale)
    elif name in ("cpu", "triton"):
        out, lse = backend_function(name)(q, k, v, prepared, scale, dropout)
    else:
        raise MaskTypeError(f"backend={name!r} has no attention dropout: use backend='cpu' or 'triton'")
    if perm_q is not None:
        inverse = inverse_permutation(perm_q.to(q.device))
        out, lse = out[:, :, inverse], lse[:, :, inverse]
    return out, lse


def backward_prepared(name: str, q, k, v, out, lse, dout, dlse, prepared: Prepared, scale: float,
                      tensor_grads: bool = False, dropout: Dropout | None = None):  # fmt: skip
    """(dq, dk, dv, {tensor name: grad}) from the saved output and log-sum-exp by the
    backend's backward kernels (modifier tensors' gradients on Triton when `tensor_grads`)."""
    if name == "flex":
        raise NotImplementedError(
            f"FlexAttention has no {q.device.type.upper()} backward: use backend='cpu' or 'triton' to train"
        )
    perm_q, perm_k = prepared.perm_q, prepared.perm_k
    if perm_q is not None:
        pq = perm_q.to(q.device)
        q, out, lse, dout, dlse = (x[:, :, pq] for x in (q, out, lse, dout, dlse))
    if perm_k is not None:
        pk = perm_k.to(k.device)
        k, v = k[:, :, pk], v[:, :, pk]
    if name == "triton":
        dq, dk, dv, grads = triton_backend.backward(
            q, k, v, out, lse, dout, dlse, prepared, scale, tensor_grads, dropout
        )
    else:
        dq, dk, dv = cpu.backward(q, k, v, out, lse, dout, dlse, prepared, scale)
        grads = {}
    if perm_q is not None:
        dq = dq[:, :, inverse_permutation(perm_q.to(q.device))]
    if perm_k is not None:
        inverse = inverse_permutation(perm_k.to(k.device))
        dk, dv = dk[:, :, inverse], dv[:, :, inverse]
    return dq, dk, dv, grads
