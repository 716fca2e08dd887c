"""The generated Triton kernels, launched from PyTorch: forward and backward.

One kernel file per distinct normal-form *structure* (heads that differ only
in data share it); one launch per head group.  On CPU tensors the same files
run under Triton's interpreter (`TRITON_INTERPRET=1` semantics).
"""

from __future__ import annotations

import math
from dataclasses import fields, replace

import torch
from maskc.codegen import cache, tiles
from maskc.codegen.emit import KernelSource, emit
from maskc.codegen.plan import MAX_TRITON_CLUSTERS
from maskc.codegen.schedule import Runs
from maskc.codegen.triton_exprs import Table
from maskc.codegen.version import __version__
from maskc.dsl import evaluate, ir
from maskc.dsl.errors import MaskTypeError
from maskc.dsl.random_blocks import draw

from .autograd import Kernels, kernel_attention
from .dropout import Dropout
from .prepare import Prepared
from .tuning import POLICY

SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


padded_dim = tiles.padded_dim


def kernel_source(prepared: Prepared, group: int) -> KernelSource:
    """The generated kernel source of a head group, emitted once per `Prepared`."""
    sources = prepared.artifacts.kernel_sources
    if group not in sources:
        sources[group] = emit(prepared.forms[group], prepared.title, prepared.block_q, prepared.block_k, __version__)
    return sources[group]


def kernel_module(source: KernelSource, dtype: torch.dtype, interpret: bool):
    return cache.kernel_module(source.text, dtype, interpret)


def split_runs(runs: Runs, full: bool, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CSR of only the full (or only the partial) runs."""
    counts = (runs.row_ptr[1:] - runs.row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(runs.rows), counts)
    pick = runs.full == full
    ptr = torch.zeros(runs.rows + 1, dtype=torch.int32)
    ptr[1:] = torch.cumsum(torch.bincount(rows[pick], minlength=runs.rows), 0)
    return ptr.to(device), runs.start[pick].to(device), runs.end[pick].to(device)


def _csr(prepared: Prepared, group: int, transposed: bool, device):
    """The group's full runs, then its partial runs, as CSR on the device (made once)."""
    key = (group, transposed, str(device))
    tables = prepared.artifacts.kernel_runs
    if key not in tables:
        runs = prepared.transposed_runs(group) if transposed else prepared.runs(group)
        tables[key] = (*split_runs(runs, True, device), *split_runs(runs, False, device))
    return tables[key]


# ---------------------------------------------------------------- tables


def _table_args(table: Table, prepared: Prepared, group: int, device) -> list:
    node = _node_for_group(prepared, group, table)
    t = prepared.tensors
    s = prepared.instance.sizes
    if table.kind == "random":
        first = min(0, s.q_offset // node.coord.div)  # query blocks before the keys draw too
        top = max((s.q_offset + s.lq - 1) // node.coord.div + 1, first + 1)
        if node.coord.mod is not None:
            top = max(top, (node.coord.mod - 1) // node.coord.div + 1)
        drawn = draw(torch.arange(first, top), node.count, node.seed, node.head, node.lo, node.hi, node.skip)
        width = max(drawn.shape[1], 1)
        data = torch.full((top - first, width), -1, dtype=torch.int32)
        data[:, : drawn.shape[1]] = drawn.to(torch.int32)
        return [data.contiguous().to(device), width, first]
    if table.kind == "ids":
        ids = t.get(node.tensor)
        ids = ids[None] if ids.dim() == 1 else ids
        data = ids.to(device=device, dtype=torch.int32).contiguous()
        return [data, data.shape[1] if data.shape[0] > 1 else 0]
    if table.kind == "route":
        data = evaluate.route_table(t, node).to(device=device, dtype=torch.int8).contiguous()
        nq, nk = data.shape[-2:]  # query and key regions may differ (query_block)
        return [data, nq * nk if data.shape[0] > 1 else 0, nk]
    if table.kind in ("vs_columns", "vs_diagonals"):
        data = evaluate.vertical_slash_table(t, node)[table.kind == "vs_diagonals"].to(device, torch.int8)
        return [data.contiguous(), data.shape[1] if data.shape[0] > 1 else 0]
    if table.kind == "cluster":
        if node.clusters > MAX_TRITON_CLUSTERS:
            raise MaskTypeError(
                f"the Triton backend handles at most {MAX_TRITON_CLUSTERS} clusters, got {node.clusters}"
            )
        bits_q, bits_k = evaluate.cluster_table(t, node)  # one word of bits
        width = max(s.lq, s.lk)
        data = torch.zeros(bits_q.shape[0], 2, width, dtype=torch.int64)
        data[:, 0, : s.lq] = bits_q[:, 0]
        data[:, 1, : s.lk] = bits_k[:, 0]
        data = data.to(device).contiguous()
        return [data, 2 * width if data.shape[0] > 1 else 0, width]
    if table.kind == "clusters":
        return prepared.extra_tables["clusters"]
    if table.kind == "alibi":
        # Per head, the slope of this table's own ALiBi term in the head's form (a form
        # may hold several ALiBi terms, or none when the head runs in another launch).
        slopes = torch.zeros(s.heads, dtype=torch.float32)
        for h, g in enumerate(prepared.head_group):
            alibi = _node_for_group(prepared, g, table)
            slopes[h] = t.get(alibi.tensor)[h].detach().float() if alibi.tensor else alibi.slope
        return [slopes.to(device)]
    if table.kind == "bias":
        data = t.get(node.tensor).detach().to(device=device, dtype=torch.float32).contiguous()
        strides = list(data.stride())
        if data.shape[0] == 1:
            strides[0] = 0
        reaches = [(n - 1) // 2 for n in data.shape[1:]]
        return [data, *strides, *reaches]
    if table.kind in ("prefix_alpha", "prefix_beta"):
        name = node.alpha if table.kind == "prefix_alpha" else node.beta
        x = t.get(name).detach().to(device=device, dtype=torch.float32)
        data = torch.cumsum(x, dim=-1 if table.kind == "prefix_alpha" else -2).contiguous()
        sb, sh = data.stride(0), data.stride(1)
        return [data, 0 if data.shape[0] == 1 else sb, 0 if data.shape[1] == 1 else sh]
    raise MaskTypeError(f"the Triton backend does not support {table.kind} yet")


def _node_for_group(prepared: Prepared, group: int, table: Table):
    """The group's own node for a table (the emitted node may belong to another group)."""
    form = prepared.forms[group]
    candidates = list(ir.walk(form.mask)) + list(form.modifiers)
    for node in candidates:
        if type(node) is type(table.node) and _strip(node) == _strip(table.node):
            return node
    return table.node


def _strip(node):
    names = {f.name for f in fields(node)}
    changes = {"head": 0} if "head" in names else {}
    if "slope" in names:
        changes["slope"] = 0.0
    return replace(node, **changes)


def _flatten_tables(source: KernelSource, prepared: Prepared, group: int, device, grads: dict | None = None) -> list:
    """Kernel arguments for the tables, then one pointer per gradient buffer
    (a table itself stands in when no gradient is wanted)."""
    args, data = [], {}
    for table in source.tables:
        table_args = _table_args(table, prepared, group, device)
        data[table.name] = table_args[0]
        args.extend(table_args)
    for g in source.grads:
        args.append(grads[_grad_key(g)] if grads is not None else data[g.like])
    return args


def _grad_key(g) -> tuple[str, str]:
    """(kind, tensor name) of a gradient table: which call-time tensor it differentiates."""
    if g.kind == "prefix_alpha":
        return g.kind, g.node.alpha
    if g.kind == "prefix_beta":
        return g.kind, g.node.beta
    return g.kind, g.node.tensor


def _grad_buffers(prepared: Prepared, device) -> dict:
    """Zeroed float32 gradient buffers shaped like the tables they shadow."""
    buffers = {}
    for group in range(len(prepared.forms)):
        for g in kernel_source(prepared, group).grads:
            key = _grad_key(g)
            if key in buffers:
                continue
            x = prepared.tensors.get(key[1])
            if g.kind == "alibi":
                x = x.reshape(-1)
            buffers[key] = torch.zeros(x.shape, dtype=torch.float32, device=device)
    return buffers


def _tensor_grads(buffers: dict) -> dict[str, torch.Tensor]:
    """d loss / d tensor from the buffers: prefix-sum gradients become reverse cumulative sums."""
    out: dict[str, torch.Tensor] = {}
    for (kind, name), g in buffers.items():
        if kind == "prefix_alpha":
            g = g.flip(-1).cumsum(-1).flip(-1)
        elif kind == "prefix_beta":
            g = g.flip(-2).cumsum(-2).flip(-2)
        out[name] = out[name] + g if name in out else g
    return out


# ---------------------------------------------------------------- launches


def _common(q, k, v, prepared: Prepared):
    if q.dtype not in SUPPORTED:
        raise MaskTypeError(f"the Triton backend supports float16, bfloat16 and float32, not {q.dtype}")
    interpret = q.device.type == "cpu"

    def as_int32(perm):
        return perm.to(device=q.device, dtype=torch.int32) if perm is not None else None

    return interpret, as_int32(prepared.perm_q), as_int32(prepared.perm_k)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels take batch, head and row strides but step one element along the
    head dim: a view into a KV cache (a decode step's prefix) is read in place."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _tile(prepared: Prepared, head_dim: int, lq: int):
    """The kernels' configuration the tile policy chose (or, for blocks chosen by hand, its warps)."""
    return prepared.tiles.kernel or POLICY.warps(prepared.forms, head_dim, lq)


def _or(tensor, fallback):
    return tensor if tensor is not None else fallback


def _dropout_args(dropout: Dropout | None) -> tuple[int, int, float]:
    """(drop_seed, drop_threshold, drop_scale) kernel arguments; unused unless DROPOUT."""
    return (0, 0, 1.0) if dropout is None else (dropout.seed, dropout.threshold, dropout.scale)


def forward(
    q, k, v, prepared: Prepared, scale: float, dropout: Dropout | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    interpret, perm_q, perm_k = _common(q, k, v, prepared)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    batch, heads, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    out = torch.empty(batch, heads, lq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, lq, dtype=torch.float32, device=q.device)
    kv_group = heads // k.shape[1]
    bm, bn = prepared.block_q, prepared.block_k
    for group in range(len(prepared.forms)):
        group_heads = torch.tensor(prepared.group_heads(group), dtype=torch.int32, device=q.device)
        source = kernel_source(prepared, group)
        module = kernel_module(source, q.dtype, interpret)
        tables = _flatten_tables(source, prepared, group, q.device)
        csr = _csr(prepared, group, False, q.device)
        grid = (math.ceil(lq / bm), batch * group_heads.numel())
        with cache.mode(interpret):
            module.attn_fwd[grid](
            q, k, v, out, lse, group_heads, _or(perm_q, group_heads),
                _or(perm_k, group_heads),
            *csr,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            heads, lq, lk, prepared.instance.sizes.q_offset, scale, group_heads.numel(), kv_group,
            *_dropout_args(dropout), *tables,
            HAS_PERM_Q=perm_q is not None,
            HAS_PERM_K=perm_k is not None, BLOCK_M=bm, BLOCK_N=bn,
            HEAD_DIM=padded_dim(d), HEAD_DIM_V=padded_dim(dv), QK_DIM=d, V_DIM=dv,
            INPUT_PRECISION=_precision(q.dtype),
            UPCAST=interpret and q.dtype == torch.bfloat16, DROPOUT=dropout is not None,
            num_warps=_tile(prepared, max(d, dv), lq).fwd_warps,
        )  # fmt: skip
    return out, lse


def backward(q, k, v, out, lse, dout, dlse, prepared: Prepared, scale: float, tensor_grads: bool = False,
             dropout: Dropout | None = None):  # fmt: skip
    """(dq, dk, dv, {tensor name: gradient}); the dict is filled when `tensor_grads`.
    With `dropout`, `out` is the forward's dropped output: Delta = rowsum(dO * O) holds."""
    interpret, perm_q, perm_k = _common(q, k, v, prepared)
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous()
    batch, heads, lq, d = q.shape
    kv_heads, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    kv_group = heads // kv_heads
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    # the kernels' softmax runs in base 2: the log-sum-exp in log2 units, +inf for empty rows
    lse_b = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse * LOG2E).contiguous()
    delta = delta.contiguous()
    dq = torch.zeros(batch, heads, lq, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(batch, heads, lk, d, dtype=torch.float32, device=q.device)
    dvv = torch.zeros(batch, heads, lk, dv, dtype=torch.float32, device=q.device)
    bm, bn = prepared.block_q, prepared.block_k
    buffers = _grad_buffers(prepared, q.device) if tensor_grads else None
    for group in range(len(prepared.forms)):
        group_heads = torch.tensor(prepared.group_heads(group), dtype=torch.int32, device=q.device)
        source = kernel_source(prepared, group)
        module = kernel_module(source, q.dtype, interpret)
        tables = _flatten_tables(source, prepared, group, q.device)
        dq_tables = _flatten_tables(source, prepared, group, q.device, buffers) if buffers is not None else tables
        common = dict(
            HAS_PERM_Q=perm_q is not None,
            HAS_PERM_K=perm_k is not None, BLOCK_M=bm, BLOCK_N=bn,
            HEAD_DIM=padded_dim(d), HEAD_DIM_V=padded_dim(dv), QK_DIM=d, V_DIM=dv,
            INPUT_PRECISION=_precision(q.dtype), SOFTCAP=source.softcap,
            UPCAST=interpret and q.dtype == torch.bfloat16, DROPOUT=dropout is not None,
        )  # fmt: skip
        tile = _tile(prepared, max(d, dv), lq)
        perms = (_or(perm_q, group_heads), _or(perm_k, group_heads))
        sizes = (heads, lq, lk, prepared.instance.sizes.q_offset, scale, group_heads.numel(), kv_group,
                 *_dropout_args(dropout))  # fmt: skip
        with cache.mode(interpret):
            module.attn_bwd_dkdv[(math.ceil(lk / bn), batch * group_heads.numel())](
            q, k, v, dout, lse_b, delta, dk, dvv, group_heads, *perms,
            *_csr(prepared, group, True, q.device),
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dvv.stride(0), dvv.stride(1), dvv.stride(2),
            *sizes, *tables, **common, num_warps=tile.dkdv_warps,
        )  # fmt: skip
        with cache.mode(interpret):
            module.attn_bwd_dq[(math.ceil(lq / bm), batch * group_heads.numel())](
            q, k, v, dout, lse_b, delta, dq, group_heads, *perms,
            *_csr(prepared, group, False, q.device),
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            *sizes, *dq_tables, **common, TENSOR_GRADS=buffers is not None and bool(source.grads),
            num_warps=tile.dq_warps,
        )  # fmt: skip
    dk = dk.view(batch, kv_heads, kv_group, lk, d).sum(2)
    dvv = dvv.view(batch, kv_heads, kv_group, lk, dv).sum(2)
    grads = _tensor_grads(buffers) if buffers is not None else {}
    return dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), grads


def _forward_kernels(q, k, v, prepared: Prepared, scale: float, dropout: Dropout | None):
    out, lse = forward(q, k, v, prepared, scale, dropout)
    return out, lse, None


def _backward_kernels(q, k, v, out, lse, dout, dlse, prepared: Prepared, scale: float, dropout, state):
    dout = torch.zeros_like(out) if dout is None else dout
    dq, dk, dv, _ = backward(q, k, v, out, lse, dout, dlse, prepared, scale, dropout=dropout)
    return dq, dk, dv


# The kernels as autograd differentiates them (runtime/autograd.py).
TRITON = Kernels(_forward_kernels, _backward_kernels)


def triton_attention(q, k, v, prepared: Prepared, scale: float, dropout: Dropout | None = None):
    """(out, lse) by the generated kernels, differentiable through their backward kernels."""
    return kernel_attention(TRITON, q, k, v, prepared, scale, dropout)
