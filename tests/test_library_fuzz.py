"""A short fuzz run of every library pattern: schedule exact, CPU executor forward and
backward equal to the reference on random cases that fit the pattern."""

from __future__ import annotations

import pytest

import maskc
from maskc import patterns, testing


@pytest.mark.parametrize("name", patterns.names())
def test_library_pattern_fuzz(name):
    program = maskc.compile(name)
    report = testing.fuzz(program, examples=3, backends=("cpu",), max_len=64)
    assert report.ok, str(report)
