"""Patterns as `nn.Module`s: `SparseAttention` and PPMA's `PolylineAttention`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from maskc.dsl import ast, ir
from maskc.program import compile as compile_spec


class SparseAttention(nn.Module):
    """Attention restricted to a pattern, like `F.scaled_dot_product_attention`.

    Example::

        >>> attn = maskc.SparseAttention("natten2d", k=7)
        >>> out = attn(q, k, v, h=56, w=56)      # q, k, v: [batch, heads, 3136, dim]

    `params` fix the pattern's parameters; `forward` takes the call-time
    bindings (grid sizes, tensors such as segment ids).  The call goes through
    the `maskc::attention` op, so `torch.compile(fullgraph=True)` traces it.

    Patterns with `cluster(n, size = w)` (Routing Transformer) keep their
    centroids here, a buffer [heads, n, dim] made at the first call; in
    training mode each call moves every centroid towards the mean of the
    (normalised) queries and keys nearest to it, by an exponential moving
    average with `decay`.  In eval mode the centroids do not change.
    """

    def __init__(
        self,
        spec: str,
        *,
        pattern: str | None = None,
        backend: str = "auto",
        scale: float | None = None,
        decay: float = 0.999,
        **params,
    ) -> None:
        super().__init__()
        self.program = compile_spec(spec, pattern=pattern, **params)
        # Known from the spec alone, so a traced call of a pattern without clusters
        # never instantiates it (that would fix the sequence length under dynamic shapes).
        self._has_clusters = any(
            isinstance(node, ast.Call) and node.name == "cluster" for node in self.program.spec.reachable_nodes()
        )
        self.backend = backend
        self.scale = scale
        self.decay = decay
        self.register_buffer("centroids", None)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **bindings) -> torch.Tensor:
        clusters = self._clusters(q, k, bindings)
        if clusters:
            if self.centroids is None:
                self.centroids = _initial_centroids(q.shape[1], clusters, q.shape[-1], q.device)
            bindings = {"centroids": self.centroids.to(q.dtype), **bindings}
        out = self.program(q, k, v, backend=self.backend, scale=self.scale, **bindings)
        if clusters and self.training:
            self._update_centroids(q, k)
        return out

    def _clusters(self, q, k, bindings) -> int:
        """The number of clusters of the pattern's cluster() atoms, 0 without any.  With
        clusters the centroids' shape depends on the sizes, which `int` fixes when traced."""
        if not self._has_clusters:
            return 0
        sizes = {n: _concrete(x) for n, x in bindings.items() if not isinstance(x, torch.Tensor)}
        lq, lk, heads = (_concrete(x) for x in (q.shape[2], k.shape[2], q.shape[1]))
        instance = self.program.instantiate(lq, lk, heads=heads, **sizes)
        counts = {node.clusters for p in instance.patterns for node in ir.walk(p.mask) if isinstance(node, ir.Cluster)}
        if len(counts) > 1:
            raise ValueError(
                f"all cluster() atoms of a SparseAttention must use the same number of clusters, got {sorted(counts)}"
            )
        return counts.pop() if counts else 0

    @torch.no_grad()
    def _update_centroids(self, q: torch.Tensor, k: torch.Tensor) -> None:
        heads = q.shape[1]
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        tokens = F.normalize(torch.cat([q, k], dim=2).float(), dim=-1)  # [B, H, L, D]
        mu = self.centroids
        nearest = torch.einsum("bhld,hnd->bhln", tokens, mu).argmax(-1)  # [B, H, L]
        onehot = F.one_hot(nearest, mu.shape[1]).float()  # [B, H, L, n]
        sums = torch.einsum("bhln,bhld->hnd", onehot, tokens)
        counts = onehot.sum((0, 2))[..., None]  # [H, n, 1]
        means = sums / counts.clamp(min=1)
        moved = torch.where(counts > 0, self.decay * mu + (1 - self.decay) * means, mu)
        self.centroids = F.normalize(moved, dim=-1)

    def extra_repr(self) -> str:
        return f"{self.program.source().strip()!r}, backend={self.backend!r}"


def _concrete(x):
    """A traced size as an int (a guard on its value); anything else unchanged."""
    return int(x) if isinstance(x, torch.SymInt) else x


def _initial_centroids(heads: int, clusters: int, dim: int, device) -> torch.Tensor:
    """Deterministic, well-spread unit vectors [heads, clusters, dim].  A hash of the
    index rather than a seeded generator, so a compiled model can create them."""
    index = torch.arange(heads * clusters * dim, device=device, dtype=torch.float32)
    noise = torch.frac(torch.sin(index * 12.9898 + 78.233) * 43758.5453) * 2 - 1
    return F.normalize(noise.view(heads, clusters, dim), dim=-1)


class PolylineAttention(nn.Module):
    """PPMA's attention core (Zhao et al. 2025): softmax attention with the 2-D
    polyline path mask, averaged over both path orders.

    Per token, head and direction the decays are PPMA's
    alpha = -softplus(dt_alpha + dt_bias[h]) * exp(A_log[h]) (beta likewise,
    sharing `dt_bias` and `A_log`), with `dt_bias` and `A_log` learnable and
    initialised as in PPMA's code (dt log-uniform in [dt_min, dt_max] through
    an inverse softplus; A uniform in `A_init`).  `forward(q, k, v, dt_alpha,
    dt_beta, h=..., w=...)` returns 0.5 * (softmax(S + M) + softmax(S + M^T)) v
    with the mask computed inside the kernel from prefix sums: no N x N tensor.

    `pattern` restricts attention further (e.g. "neighborhood((7, 7))").
    """

    def __init__(
        self,
        heads: int,
        *,
        pattern: str = "all",
        backend: str = "auto",
        scale: float | None = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init: tuple[float, float] = (1.0, 1.1),  # noqa: N803 - PPMA's name
    ) -> None:
        super().__init__()
        dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(*A_init)))
        self.backend = backend
        self.scale = scale
        self.paths = {
            path: compile_spec(
                f"pattern ppma_{path}(alpha: tensor, beta: tensor) on grid(h, w) = ({pattern}) "
                f'with polyline(alpha, beta, path = "{path}")'
            )
            for path in ("hv", "vh")
        }

    def decays(self, dt_alpha: torch.Tensor, dt_beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha, beta [batch, heads, h, w] (all <= 0) from the raw per-token inputs."""
        rate = -torch.exp(self.A_log)[None, :, None, None]
        bias = self.dt_bias[None, :, None, None]
        return F.softplus(dt_alpha + bias) * rate, F.softplus(dt_beta + bias) * rate

    def forward(self, q, k, v, dt_alpha: torch.Tensor, dt_beta: torch.Tensor, *, h: int, w: int) -> torch.Tensor:
        alpha, beta = self.decays(dt_alpha, dt_beta)
        outs = [
            program(q, k, v, backend=self.backend, scale=self.scale, alpha=alpha, beta=beta, h=h, w=w)
            for program in self.paths.values()
        ]
        return 0.5 * (outs[0] + outs[1])
