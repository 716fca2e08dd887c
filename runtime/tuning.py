"""Which tiles each backend runs: one policy for block sizes and Triton's kernel configurations.

`POLICY.choose(backend, forms, title, dtype, head_dim, lq, device)` answers for
a pattern (its normal forms per head group; `title` heads its generated
files), a dtype, a head dim (the wider of q's and v's), the number of query
rows and a device:

* "cpu": query blocks of 64 rows (fewer when the call has fewer rows:
  decoding, short chunks) and key blocks of 64;
* "flex": 128 x 128, FlexAttention's block size;
* "triton": a rung of the tile ladder of codegen/tiles.py, by kind of pattern
  (modifiers that read tables per pair, heads wider than 64, decoding).  On a
  GPU, the first rung whose kernels compile without spills (and within its
  shared memory per block, built as Triton's launcher specialises them) for the device's
  architecture (`codegen.aot.choose_config` compiles them ahead), kept in memory
  and in `tiles.json` in the kernel cache directory so later processes skip the
  compiles; under the interpreter (CPU tensors) the ladder's first rung:
  nothing is compiled there.

The answer, `Tiles`, is what the schedule is built with (block sizes) and, on
Triton, the kernels' configuration (warps).  Everything that schedules asks
here: preparation (runtime/prepare.py), clustered Triton attention for its
gathered rows, decoding steps, and `Program.schedule` without block sizes.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import torch
from maskc.codegen import aot, cache, tiles
from maskc.codegen.version import __version__
from maskc.dsl.errors import MaskTypeError

_LOCK = threading.Lock()
_CHOICES: dict[str, tiles.Config] = {}


@dataclass(frozen=True)
class Tiles:
    """Block sizes to schedule with and, on Triton, the kernels' configuration
    (None: the ladder's first rung's warps, for blocks chosen by hand)."""

    block_q: int
    block_k: int
    kernel: tiles.Config | None = None


@dataclass(frozen=True)
class TilePolicy:
    cpu_block: int = 64
    flex_blocks: tuple[int, int] = (128, 128)

    def choose(self, backend: str, forms, title: str, dtype: torch.dtype, head_dim: int, lq: int,
               device: torch.device | str) -> Tiles:  # fmt: skip
        """The tiles `backend` runs this pattern with (see the module docstring)."""
        if backend == "cpu":  # decoding and short chunks: a query block no taller than the rows
            return Tiles(min(self.cpu_block, 1 << max(lq - 1, 0).bit_length()), self.cpu_block)
        if backend == "flex":
            return Tiles(*self.flex_blocks)
        if backend == "triton":
            config = self.triton_config(forms, title, dtype, head_dim, lq, device)
            return Tiles(config.block_q, config.block_k, config)
        raise MaskTypeError(f"backend={backend!r} runs no block schedule")

    def triton_config(self, forms, title: str, dtype: torch.dtype, head_dim: int, lq: int,
                      device: torch.device | str) -> tiles.Config:  # fmt: skip
        """On a GPU the first spill-free rung of the ladder, elsewhere its first rung."""
        device = torch.device(device)
        if device.type == "cuda":
            return spill_free_config(forms, title, dtype, head_dim, lq, architecture(device))
        return tiles.config(head_dim, lq, tiles.heavy_forms(forms))

    def warps(self, forms, head_dim: int, lq: int) -> tiles.Config:
        """The warps of kernels whose block sizes were chosen by hand: the first rung's."""
        return tiles.config(head_dim, lq, tiles.heavy_forms(forms))


POLICY = TilePolicy()


# ---------------------------------------------------------------- spill-free rungs on a GPU


def architecture(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _key(forms, title: str, dtype: torch.dtype, head_dim: int, lq: int, arch: int) -> str:
    first = tiles.config(head_dim, lq, tiles.heavy_forms(forms))
    texts = sorted(s.text for s in aot.sources_for(forms, title, first))
    decode = lq <= tiles.DECODE_ROWS
    ladder = tiles.candidates(head_dim, lq, tiles.heavy_forms(forms))
    # the ladder and how rungs are checked are part of the key: choices made before a change are not reused
    return cache.key_of(*texts, str(dtype), str(tiles.padded_dim(head_dim)), str(decode), str(arch), __version__,
                        repr(ladder), aot.RUNG_CHECK)  # fmt: skip


def _saved() -> dict:
    path = cache.cache_dir() / "tiles.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def spill_free_config(forms, title: str, dtype: torch.dtype, head_dim: int, lq: int, arch: int) -> tiles.Config:
    """The first rung of the ladder whose kernels compile without spills and within the shared
    memory of `sm_{arch}` (codegen.aot.choose_config)."""
    key = _key(forms, title, dtype, head_dim, lq, arch)
    with _LOCK:
        if key in _CHOICES:
            return _CHOICES[key]
        saved = _saved().get(key)
        if saved is not None:
            _CHOICES[key] = tiles.Config(**saved)
            return _CHOICES[key]

    def load(source):
        return cache.kernel_module(source.text, dtype, interpret=False)

    try:
        chosen, _ = aot.choose_config(load, forms, title, dtype, head_dim, lq, arch)
    except aot.SpecialisationUnavailableError:  # an older Triton: nothing is compiled ahead, the first rung runs
        return tiles.config(head_dim, lq, tiles.heavy_forms(forms))
    with _LOCK:
        _CHOICES[key] = chosen
        table = _saved()
        table[key] = chosen.__dict__
        cache.write_atomic(cache.cache_dir() / "tiles.json", json.dumps(table, indent=1))
    return chosen
