"""Giving the heap memory a run has freed back to the system, so that a long run's resident
memory stays where it settles.

glibc's malloc keeps memory a program frees for its next allocations, and returns it to the
system only from the top of the heap. When frames pile up for a moment (the box stalled, a
burst of frames), the batches that clear them take more memory than a steady run; once they
are freed, that memory stays resident although nothing uses it. Measured with
`benchmarks/soak.py`'s run (four streams at 10 fps, merged, the process stopped for half a
second every 30 s): the first stall left the resident memory 9.0 MiB higher, in the main heap
(six later stalls added 1.6 MiB: the freed memory was reused); `malloc_trim(0)` right after a
stall gave all of it back (1,172.6 to 1,157.2 MiB). In a 30-minute soak one such step, at a
moment when two frames were late, was most of the resident memory's rise.

`HeapTrimmer.maybe_trim(now)` calls `malloc_trim(0)` at most every `every_s` seconds; the
engine calls it when it has no frame waiting, so the call (a few milliseconds over a large
heap) delays no frame. Where the C library has no `malloc_trim` (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable

TRIM_EVERY_S = 10.0  # at most this often; the engine trims only when idle


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer:
    """`maybe_trim(now)`: give freed heap memory back if `every_s` seconds have passed since the
    last trim (the first call trims). `trim` is the function called with 0 (default: glibc's
    malloc_trim; None where there is none). `trims` counts the calls made."""

    def __init__(self, every_s: float = TRIM_EVERY_S, trim: Callable[[int], int] | None | str = "libc"):
        self.every_s = every_s
        self.trim = _malloc_trim() if trim == "libc" else trim
        self.trims = 0
        self._last: float | None = None

    @property
    def available(self) -> bool:
        return self.trim is not None

    def maybe_trim(self, now: float) -> bool:
        if self.trim is None or (self._last is not None and now - self._last < self.every_s):
            return False
        self._last = now
        self.trim(0)
        self.trims += 1
        return True


__all__ = ["TRIM_EVERY_S", "HeapTrimmer"]
