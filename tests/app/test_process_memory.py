"""Handing freed heap memory back (app/process_memory.py), in a subprocess each: blocks of a few hundred KiB kept
and evicted between small long-lived objects (what a server's heap sees) leave glibc's default RSS growing; trimmed
now and then, it stays flat. The trimmer thread starts, trims and stops."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from rwkv_chat.app import process_memory

CHURN = """
import collections, sys, torch
torch.set_num_threads(1)  # the allocator's pattern, not the threads': many workers may run at once
from rwkv_chat.app.process_memory import trim_freed_memory
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
big = torch.empty(600 * 1024 // 4); del big  # one freed large block raises glibc's dynamic mmap threshold
kept, small, marks = collections.OrderedDict(), [], []
for i in range(4000):
    kept[i] = (torch.ones(198 * 1024 // 4), torch.ones(256 * 1024 // 4))  # a state and a logits row
    small.append(torch.ones(64))
    if len(small) > 2000: small.pop(0)
    while len(kept) > 300: kept.popitem(last=False)
    if sys.argv[1] == "trim" and i % 100 == 99: trim_freed_memory()
    if i % 500 == 499: marks.append(rss())
print(marks[1], marks[-1])
"""


def churn(mode: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=300,
                         check=True).stdout.split()
    return float(out[0]), float(out[1])


@pytest.mark.skipif(not process_memory.trim_freed_memory(), reason="needs glibc's malloc_trim")
def test_trimming_keeps_the_rss_of_a_churning_heap_flat():
    early, late = churn("trim")
    _, default_late = churn("default")
    assert late <= early * 1.03
    assert late < default_late


@pytest.mark.skipif(not process_memory.trim_freed_memory(), reason="needs glibc's malloc_trim")
def test_the_trimmer_thread_trims_until_stopped(monkeypatch):
    calls = []
    monkeypatch.setattr(process_memory, "trim_freed_memory", lambda: calls.append(1) or True)
    trimmer = process_memory.MemoryTrimmer(0.01)
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    trimmer.stop()
    stopped_at = len(calls)
    time.sleep(0.05)
    assert stopped_at >= 3 and len(calls) == stopped_at
    with pytest.raises(ValueError, match="interval"):
        process_memory.MemoryTrimmer(0)
