"""Give the memory a long-running server has freed back to the system (glibc's allocator only).

Why: the prefix-state cache keeps its blocks in mappings of their own (serving/state_cache.py), returned when
evicted. What remains on the heap are the temporaries of prompts and decode steps; glibc keeps freed heap memory
for reuse, which is what makes a CPU prefill fast, but blocks stranded between small long-lived objects (sessions,
keys) are never handed back on their own, so RSS crept up with traffic (+93 KiB a turn in an 8-minute soak with
the cache's mappings alone; docs/PERFORMANCE.md). glibc's `malloc_trim(0)` returns every whole free page of the
heaps. An earlier fix, a fixed mmap threshold of 128 KiB, returned every such block at once but mapped and faulted
in each of a prompt's temporaries afresh: CPU prefill ran 2-2.3x slower in int8 (same document).

Promises: `trim_freed_memory()` calls malloc_trim(0) once and says whether it could; `MemoryTrimmer(seconds)`
does it from a daemon thread every `seconds` until `stop()`. On another C library or platform both do nothing.
Knows nothing of the app.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import threading

TRIM_SECONDS = 30.0  # how often a server's processes hand their heaps' free pages back to the system


@functools.lru_cache(maxsize=1)
def _malloc_trim():  # looked up once, not at every trim
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim_freed_memory() -> bool:
    """Hand the heaps' whole free pages back to the system now; False where glibc's malloc_trim is missing."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class MemoryTrimmer:
    """trim_freed_memory() every `seconds` from a daemon thread (a pass over a server's heaps takes milliseconds)."""

    def __init__(self, seconds: float = 30.0):
        if seconds <= 0:
            raise ValueError(f"the trimming interval must be positive, got {seconds}")
        self.seconds = seconds
        self._stopped = threading.Event()
        self.available = _malloc_trim() is not None
        self._thread = threading.Thread(target=self._run, name="memory-trimmer", daemon=True)
        if self.available:
            self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.seconds):
            trim_freed_memory()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
