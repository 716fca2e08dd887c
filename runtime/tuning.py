"""Which tile configuration the Triton backend runs, per pattern structure and GPU.

On a GPU, the kernels of a pattern are compiled ahead for the device's
architecture along the tile ladder (`codegen.aot.choose_config`), and the first
spill-free configuration is kept: in memory, and in `tiles.json` in the kernel
cache directory so later processes skip the compiles.  Under the interpreter
(CPU tensors) the ladder's first rung is used: nothing is compiled there.
"""

from __future__ import annotations

import json
import threading

import torch
from maskc.codegen import aot, cache, tiles
from maskc.codegen.version import __version__

_LOCK = threading.Lock()
_CHOICES: dict[str, tiles.Config] = {}


def architecture(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _key(forms, title: str, dtype: torch.dtype, head_dim: int, lq: int, arch: int) -> str:
    first = tiles.config(head_dim, lq, tiles.heavy_forms(forms))
    texts = sorted(s.text for s in aot.sources_for(forms, title, first))
    decode = lq <= tiles.DECODE_ROWS
    return cache.key_of(*texts, str(dtype), str(tiles.padded_dim(head_dim)), str(decode), str(arch), __version__)


def _saved() -> dict:
    path = cache.cache_dir() / "tiles.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def spill_free_config(forms, title: str, dtype: torch.dtype, head_dim: int, lq: int, arch: int) -> tiles.Config:
    key = _key(forms, title, dtype, head_dim, lq, arch)
    with _LOCK:
        if key in _CHOICES:
            return _CHOICES[key]
        saved = _saved().get(key)
        if saved is not None:
            _CHOICES[key] = tiles.Config(**saved)
            return _CHOICES[key]

    def load(source):
        from .triton_backend import dtype_class

        return cache.load_kernel(source.text, dtype_class(dtype), interpret=False)

    chosen, _ = aot.choose_config(load, forms, title, dtype, head_dim, lq, arch)
    with _LOCK:
        _CHOICES[key] = chosen
        table = _saved()
        table[key] = chosen.__dict__
        cache.write_atomic(cache.cache_dir() / "tiles.json", json.dumps(table, indent=1))
    return chosen
