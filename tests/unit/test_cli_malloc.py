"""The CLI applies the Makefile's malloc thresholds itself, unless the environment already sets them."""

import ctypes
import sys

import pytest

from genlab import cli


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_thresholds_are_set_unless_the_environment_sets_them(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    cli._tune_malloc()
    assert calls == [(-3, 32 * 1024 * 1024), (-1, 1024 * 1024 * 1024)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    calls.clear()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    cli._tune_malloc()
    assert calls == []


def test_a_libc_without_mallopt_is_left_alone(monkeypatch):
    def missing(name):
        raise OSError(f"{name}: not found")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    cli._tune_malloc()  # no error: the allocator keeps its defaults
