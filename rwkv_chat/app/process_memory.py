"""Make a long-running server give freed memory back to the system (glibc's allocator only).

Why: the prefix-state cache keeps and evicts blocks of a few hundred KiB (a state, a logits row). glibc serves
the first ones with mmap, then raises its mmap threshold once such a block is freed, so later ones come from the
heap; evicted entries leave holes there that are never returned, and the server's RSS grows by ~170 KiB a turn
after the cache is full (docs/PERFORMANCE.md, "Load and soak"). Fixing the threshold at MMAP_THRESHOLD_BYTES
keeps every block of that size on mmap, returned to the system when freed.

Promises: `return_freed_memory()` sets the threshold through glibc's mallopt and says whether it did; on another C
library or platform it does nothing and returns False. An M_MMAP_THRESHOLD the operator set in the environment
(MALLOC_MMAP_THRESHOLD_) is left as it is. Knows nothing of the app.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's starting value, kept fixed


def return_freed_memory() -> bool:
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
