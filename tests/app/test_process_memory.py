"""The server's allocator setting (app/process_memory.py), in a subprocess each: a cache that keeps evicting
blocks of a few hundred KiB (the prefix-state cache's pattern) between small long-lived objects keeps a flat RSS
with it, while glibc's default keeps the holes."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHURN = """
import collections, sys, torch
from rwkv_chat.app.process_memory import return_freed_memory
if sys.argv[1] == "fixed" and not return_freed_memory():
    print("unavailable"); sys.exit()
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
big = torch.empty(600 * 1024 // 4); del big  # one freed large block raises glibc's dynamic threshold
cache, small, marks = collections.OrderedDict(), [], []
for i in range(4000):
    cache[i] = (torch.ones(198 * 1024 // 4), torch.ones(256 * 1024 // 4))  # a state and a logits row
    small.append(torch.ones(64))  # session data, keys
    if len(small) > 2000: small.pop(0)
    while len(cache) > 300: cache.popitem(last=False)
    if i % 500 == 499: marks.append(rss())
print(marks[1], marks[-1])
"""


def rss_after(mode: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=300,
                         check=True).stdout.split()
    if out == ["unavailable"]:
        pytest.skip("not glibc (or MALLOC_MMAP_THRESHOLD_ is set): nothing to fix")
    return float(out[0]), float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_evicted_cache_blocks_go_back_to_the_system():
    early, late = rss_after("fixed")
    default_early, default_late = rss_after("default")
    assert late <= early * 1.03  # flat once the cache is full
    assert late < default_late  # and below what the default allocator settles at
