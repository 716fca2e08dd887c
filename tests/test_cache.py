"""The kernel cache: per-user directory, owner-only, atomic writes, corruption detected."""

from __future__ import annotations

import os
import stat
import threading

import pytest
import torch
from maskc.codegen import cache

import maskc


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "kernels"
    monkeypatch.setenv("MASKC_CACHE_DIR", str(root))
    return root


def test_directory_is_created_owner_only(cache_root):
    path = cache.kernel_file(cache.key_of("a"), "x = 1\n")
    assert path.parent == cache_root
    assert stat.S_IMODE(cache_root.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_key_depends_on_every_part():
    keys = {
        cache.key_of("src", "half", "0.1.0"),
        cache.key_of("src", "single", "0.1.0"),
        cache.key_of("src", "half", "0.2.0"),
    }
    assert len(keys) == 3


def test_corrupted_entry_is_detected_and_rewritten(cache_root):
    key, source = cache.key_of("b"), "VALUE = 41\n"
    path = cache.kernel_file(key, source)
    path.write_text(path.read_text().replace("41", "666"))  # edited: checksum no longer matches
    path = cache.kernel_file(key, source)
    assert "VALUE = 41" in path.read_text()
    path.write_text(path.read_text()[:5])  # truncated
    assert "VALUE = 41" in cache.kernel_file(key, source).read_text()


def test_no_partial_files_under_concurrent_writers(cache_root):
    key, source = cache.key_of("c"), "DATA = '" + "x" * 200_000 + "'\n"
    errors = []

    def write():
        try:
            for _ in range(5):
                cache.kernel_file(key, source)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache._valid(cache_root / f"k{key}.py")
    assert not [p for p in os.listdir(cache_root) if p.startswith(".tmp-")]


def test_a_failed_write_leaves_nothing_behind(cache_root, monkeypatch):
    cache_root.mkdir(mode=0o700)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        cache.kernel_file(cache.key_of("d"), "X = 1\n")
    assert os.listdir(cache_root) == []


def test_generated_kernels_live_in_the_cache_and_run(cache_root):
    program = maskc.compile("causal & window(4)")
    q = torch.randn(1, 1, 40, 16)
    out = program(q, q, q, backend="triton")
    torch.testing.assert_close(out, program.reference(q, q, q), atol=2e-5, rtol=2e-5)
    files = list(cache_root.glob("k*.py"))
    assert files and all(cache._valid(f) for f in files)
    text = files[0].read_text()
    assert "# pattern: causal & window(4)" in text and "-4 <= k - q <= 0" in text


def test_spec_text_reaches_kernels_only_as_numbers_and_maskc_names(cache_root):
    """Identifiers from the spec (pattern and tensor names) never reach code, only a comment."""
    program = maskc.compile("pattern evil_name(os_system: tensor) = causal & window(3) with bias(os_system)")
    q = torch.randn(1, 1, 20, 16)
    program(q, q, q, backend="triton", os_system=torch.zeros(1, 7))
    for f in cache_root.glob("k*.py"):
        code = [line for line in f.read_text().splitlines() if not line.lstrip().startswith("#")]
        assert not any("evil_name" in line or "os_system" in line for line in code)


def test_a_changed_kernel_template_changes_the_keys(monkeypatch):
    """Kernel files and the remembered tile choices are keyed by the whole generated text,
    which holds the shared kernels: a template change never reuses a stale kernel."""
    from maskc.codegen import aot, emit, kernel_template, plan, tiles
    from maskc.runtime import tuning

    program = maskc.compile("causal")
    forms = plan.normal_forms(program.instantiate(256))

    def keys() -> tuple[str, str]:
        (source,) = aot.sources_for(forms, program.source(), tiles.config(64, 256))
        tile_key = tuning._key(forms, program.source(), torch.float16, 64, 256, 90)
        return cache.module_key(source.text, torch.float16), tile_key

    before = keys()
    changed = kernel_template.KERNELS.replace("tl.exp2(s * scale", "tl.exp2(scale * s")
    assert changed != kernel_template.KERNELS
    monkeypatch.setattr(emit, "KERNELS", changed)
    after = keys()
    assert before[0] != after[0] and before[1] != after[1]
