"""Tile sizes and warps of the generated kernels.

A kernel that spills registers is a bug (README.md, "How it works"), and what spills depends on
the pattern (its predicate and modifiers), the head dim and the architecture
(ptxas allocates differently on sm_80 and sm_90).  So each kind of pattern has
a ladder of configurations, largest tiles first; `codegen.aot.choose_config`
compiles a pattern's kernels for the target GPU, specialised as Triton's
launcher specialises them for aligned tensors, and keeps the first rung on which
every kernel (with one of two warp counts) compiles without spills and within
the GPU's shared memory per block.  The
first rung is also the default when nothing is compiled (the interpreter).
"Heavy" patterns read a table per pair in their modifiers (polyline prefix
sums, bias tables); "wide" heads have more than 64 dims.  Decoding (lq <= 16)
uses 16-row query tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

from maskc.dsl import ir
from maskc.dsl.errors import MaskTypeError

DECODE_ROWS = 16
HEAVY_MODIFIERS = ("polyline", "bias")
KERNELS = ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


@dataclass(frozen=True)
class Config:
    block_q: int
    block_k: int
    fwd_warps: int
    dkdv_warps: int
    dq_warps: int

    def warps(self, kernel: str) -> int:
        return {"attn_fwd": self.fwd_warps, "attn_bwd_dkdv": self.dkdv_warps}.get(kernel, self.dq_warps)

    def with_warps(self, kernel: str, warps: int) -> Config:
        field = {"attn_fwd": "fwd_warps", "attn_bwd_dkdv": "dkdv_warps"}.get(kernel, "dq_warps")
        return Config(**{**self.__dict__, field: warps})


def padded_dim(d: int) -> int:
    """Head dims are padded to a power of two of at least 16 inside the kernels."""
    if not 1 <= d <= 256:
        raise MaskTypeError(f"the Triton kernels support head dims 1 to 256, got {d}")
    return max(16, 1 << (d - 1).bit_length())


# (wide, heavy) -> configurations, largest first; each ends on 16 x 16 tiles.
_LADDERS = {
    (False, False): [
        Config(64, 64, 4, 8, 8),
        Config(32, 32, 4, 4, 8),
        Config(16, 32, 4, 4, 4),
        Config(16, 16, 4, 4, 4),
    ],
    # 64 x 64 at head dim 128: spill-free on sm_80 and sm_90 once built with the launcher's hints
    # (90-140 KB of shared memory: GPUs with 99 KB per block take the next rung)
    (True, False): [
        Config(64, 64, 8, 8, 8),
        Config(32, 32, 8, 8, 8),
        Config(32, 32, 4, 4, 4),
        Config(16, 32, 8, 8, 8),
        Config(16, 16, 4, 4, 4),
    ],
    (False, True): [Config(32, 32, 4, 4, 8), Config(16, 32, 4, 4, 8), Config(16, 16, 4, 4, 4)],
    (True, True): [Config(16, 32, 8, 8, 8), Config(16, 16, 4, 4, 4), Config(16, 16, 8, 8, 8)],
}


def candidates(head_dim: int, lq: int, heavy: bool = False) -> list[Config]:
    wide = padded_dim(head_dim) > 64
    ladder = _LADDERS[(wide, heavy)]
    if lq <= DECODE_ROWS:  # decoding: short query tiles
        ladder = [Config(DECODE_ROWS, c.block_k, c.fwd_warps, c.dkdv_warps, c.dq_warps) for c in ladder]
        ladder = list(dict.fromkeys(ladder))
    return ladder


def config(head_dim: int, lq: int, heavy: bool = False) -> Config:
    """The default (first) configuration, used where nothing is compiled ahead."""
    return candidates(head_dim, lq, heavy)[0]


def heavy_forms(forms) -> bool:
    """Whether any head pattern (an `ir.HeadPattern`) reads tables in its modifiers."""
    return any(isinstance(m, (ir.Polyline, ir.Bias)) for form in forms for m in form.modifiers)
