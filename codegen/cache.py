"""Generated kernel files: a per-user cache of `.py` files, written atomically.

Triton's `@jit` needs its functions in a real file, so every kernel source is
written to `$MASKC_CACHE_DIR` (default: `$XDG_CACHE_HOME/maskc` or
`~/.cache/maskc`), created owner-only (0700).  A file's name is a hash of its
source key (normal form, block sizes, dtype class, maskc version); its last
line is a checksum of the rest, so a truncated or edited file is detected and
written again.  Writes go to a temporary file in the same directory and are
renamed into place, so concurrent processes and crashes never leave half a
kernel behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from .version import __version__

CHECKSUM_PREFIX = "# maskc-checksum: "
_LOCK = threading.Lock()
_MODULES: dict[tuple[str, bool], ModuleType] = {}


def cache_dir() -> Path:
    root = os.environ.get("MASKC_CACHE_DIR")
    if root:
        path = Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "maskc"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_uid == os.getuid():
        path.chmod(0o700)
    return path


def key_of(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _valid(path: Path) -> bool:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    body, sep, last = text.rpartition("\n" + CHECKSUM_PREFIX)
    return bool(sep) and last.strip() == _checksum(body + "\n")


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:  # noqa: N801 - a tiny contextlib.suppress(OSError)
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def kernel_file(key: str, source: str) -> Path:
    """The cached file for `source`, (re)written when missing or corrupted."""
    if not re.fullmatch(r"[0-9a-f]{32}", key):
        raise ValueError(f"bad kernel key {key!r}")
    path = cache_dir() / f"k{key}.py"
    if not _valid(path):
        body = source if source.endswith("\n") else source + "\n"
        write_atomic(path, body + CHECKSUM_PREFIX + _checksum(body) + "\n")
    return path


def dtype_class(dtype: torch.dtype) -> str:
    """Which compiled variant of a kernel a dtype runs: "half" (float16, bfloat16) or "single"."""
    return "half" if dtype in (torch.float16, torch.bfloat16) else "single"


def module_key(text: str, dtype: torch.dtype) -> str:
    """The cache key of a generated kernel source for `dtype`: its whole text (the
    pattern's functions and the shared kernels of kernel_template.py, so a changed
    template never reuses a stale file), the dtype's class and maskc's version."""
    return key_of(text, dtype_class(dtype), __version__)


def kernel_module(text: str, dtype: torch.dtype, interpret: bool) -> ModuleType:
    """The module of a generated kernel source for `dtype` (see `module_key`)."""
    return load(module_key(text, dtype), text, interpret)


def load(key: str, source: str, interpret: bool) -> ModuleType:
    """Import the kernel module, compiled (`interpret=False`) or under Triton's interpreter."""
    with _LOCK:
        cached = _MODULES.get((key, interpret))
        if cached is not None:
            return cached
        path = kernel_file(key, source)
        name = f"maskc_kernel_{key}{'_interp' if interpret else ''}"
        with mode(interpret):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        _MODULES[(key, interpret)] = module
        return module


@contextlib.contextmanager
def mode(interpret: bool) -> Iterator[None]:
    """Run (or import) kernels under Triton's interpreter or its compiler.

    Triton reads TRITON_INTERPRET when a function is decorated and again
    while launching, so both must happen inside this context."""
    # Keep Triton 3.9's default (fusion on) without its warning about the default changing.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
