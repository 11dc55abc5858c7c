"""Freed heap memory given back to the system (runtime/heap.py; the engine's use of it is tested in
test_runtime.py)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from gemel_studio.runtime.heap import HeapTrimmer


def test_the_trimmer_trims_at_most_once_per_interval():
    calls = []
    trimmer = HeapTrimmer(every_s=10.0, trim=lambda pad: calls.append(pad) or 1)
    assert trimmer.available
    assert [trimmer.maybe_trim(t) for t in (100.0, 105.0, 109.9, 110.0, 115.0, 120.5)] == \
        [True, False, False, True, False, True]
    assert calls == [0, 0, 0] and trimmer.trims == 3
    none = HeapTrimmer(trim=None)  # a C library without malloc_trim: nothing happens, nothing fails
    assert not none.available and none.maybe_trim(0.0) is False and none.trims == 0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_malloc_trim_gives_freed_heap_memory_back():
    # 150 MB in 64 KiB blocks (below glibc's mmap threshold: they come from the heap), all freed
    # but the last, which pins the top of the heap so that free() alone cannot shrink it.
    script = """
import gc
from gemel_studio.runtime.heap import HeapTrimmer

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

blocks = [bytearray(b"x" * 65536) for _ in range(2400)]
last = blocks[-1]
del blocks
gc.collect()
before = rss()
trimmer = HeapTrimmer()
assert trimmer.available and trimmer.maybe_trim(0.0)
print(before - rss())
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) > 100 * 2**20  # most of the 157 MB that were freed left the process

