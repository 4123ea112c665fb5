"""The prefix-state cache and the state object."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from rwkv_chat.models import RwkvConfig, empty_state
from rwkv_chat.state import RwkvState
from rwkv_chat.serving.state_cache import NODE_BYTES, StateCache


def state(value: float, size: int = 256) -> RwkvState:
    return RwkvState(torch.full((1, 1, 2, size), value), torch.full((1, 1, 3, size), value))


ENTRY_BYTES = state(0).nbytes + 4 * 8  # state + 8 fp32 logits
ONE_TOKEN_KEY = NODE_BYTES + 4  # a key of one token that shares nothing: one tree node


def counted_bytes(cache: StateCache) -> int:
    """Everything the cache holds, recounted from its tree: entries, and every node with its tokens."""
    total, nodes = 0, [cache._root]
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children.values())
        if node is not cache._root:
            total += NODE_BYTES + 4 * len(node.label)
        if node.entry is not None:
            total += node.entry.nbytes
    return total


def test_longest_cached_prefix_is_found():
    cache = StateCache()
    cache.put([1, 2], state(2), torch.zeros(8))
    cache.put([1, 2, 3, 4], state(4), torch.zeros(8))
    cache.put([9], state(9), torch.zeros(8))
    assert cache.longest_prefix([1, 2, 3, 4, 5]).length == 4
    assert cache.longest_prefix([1, 2, 3]).length == 2
    assert cache.longest_prefix([1, 2, 3, 4]).state.equal(state(4))
    assert cache.longest_prefix([7, 1, 2]) is None


def test_entries_are_private_copies():
    cache = StateCache()
    original = state(1)
    cache.put([1], original, torch.zeros(8))
    original.shift.fill_(5)
    got = cache.longest_prefix([1])
    got.state.shift.fill_(7)
    assert cache.longest_prefix([1]).state.equal(state(1))


def test_least_recently_used_entries_are_evicted_beyond_the_byte_budget():
    cache = StateCache(max_bytes=3 * (ENTRY_BYTES + ONE_TOKEN_KEY))
    for key in range(3):
        cache.put([key], state(key), torch.zeros(8))
    cache.longest_prefix([0])  # 0 is now the most recently used
    cache.put([3], state(3), torch.zeros(8))
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    assert cache.longest_prefix([1]) is None and cache.longest_prefix([0]) is not None


def test_pinned_entries_survive_eviction_and_clear():
    cache = StateCache(max_bytes=2 * (ENTRY_BYTES + ONE_TOKEN_KEY))
    cache.put([42], state(42), torch.zeros(8), pinned=True)
    for key in range(5):
        cache.put([key], state(key), torch.zeros(8))
    cache.clear()
    assert cache.longest_prefix([42, 1]).length == 1 and len(cache) == 1


def test_states_are_stored_on_the_cpu():
    cache = StateCache(storage_device="cpu")
    cache.put([1], state(1), torch.zeros(8))
    assert cache.longest_prefix([1], device="cpu").state.device.type == "cpu"


def test_concurrent_use_keeps_the_byte_count_exact():
    cache = StateCache(max_bytes=10 * (ENTRY_BYTES + 2 * ONE_TOKEN_KEY))

    def work(offset):
        for key in range(50):
            cache.put([offset, key], state(key), torch.zeros(8))
            cache.longest_prefix([offset, key, 1])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.nbytes == counted_bytes(cache) <= cache.max_bytes


def test_keys_count_against_the_budget():
    cache = StateCache()
    cache.put(list(range(1000)), state(1), torch.zeros(8))
    assert cache.nbytes == ENTRY_BYTES + NODE_BYTES + 4 * 1000 == counted_bytes(cache)
    cache.put(list(range(500)) + [7] * 10, state(2), torch.zeros(8))  # splits the first key's edge at 500
    assert cache.nbytes == 2 * ENTRY_BYTES + 3 * NODE_BYTES + 4 * 1010 == counted_bytes(cache)
    cache.clear()
    assert cache.nbytes == 0 == len(cache) and not cache._root.children


def test_the_tree_answers_as_a_scan_of_every_key_would_through_puts_and_evictions():
    import random
    rng = random.Random(0)
    cache = StateCache(max_bytes=12 * (ENTRY_BYTES + 3 * ONE_TOKEN_KEY))
    for step in range(600):
        base = [rng.randrange(3) for _ in range(rng.randrange(1, 9))]
        if rng.random() < 0.5:
            cache.put(base, state(step), torch.full((8,), float(step)))
        query = base + [rng.randrange(3) for _ in range(rng.randrange(0, 4))]
        keys = []  # the oracle: every key in the cache, read from its LRU order
        for node in cache._lru:
            tokens, walk = [], node
            while walk is not cache._root:
                tokens[:0] = list(walk.label)
                walk = walk.parent
            keys.append(tokens)
        fits = [key for key in keys if query[:len(key)] == key]
        hit = cache.longest_prefix(query)
        assert (hit.length if hit else 0) == max(map(len, fits), default=0)
        assert cache.nbytes == counted_bytes(cache) <= cache.max_bytes


def test_state_stack_unstack_and_size():
    a, b = state(1), state(2)
    both = RwkvState.stack([a, b])
    assert both.batch_size == 2 and both.nbytes == a.nbytes + b.nbytes
    first, second = both.unstack()
    assert first.equal(a) and second.equal(b)
    assert both[-1].equal(b)
    zero = empty_state(RwkvConfig("4", n_layer=2, n_embd=8, dim_att=8, dim_ffn=32, vocab_size=16), 1, "cpu")
    assert torch.all(zero.wkv[:, :, 2] == torch.tensor(-1e30)) and zero.shift.abs().sum() == 0
    v5 = empty_state(RwkvConfig("5.2", n_layer=2, n_embd=128, dim_att=128, dim_ffn=448, vocab_size=16), 3, "cpu")
    assert v5.wkv.shape == (3, 2, 2, 64, 64) and v5.nbytes == 4 * (3 * 2 * 2 * 128 + 3 * 2 * 2 * 64 * 64)


CHURN = """
import collections, sys, torch
torch.set_num_threads(1)  # the allocator's pattern, not the threads': many workers may run at once
from rwkv_chat.serving.state_cache import StateCache
from rwkv_chat.state import RwkvState
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
big = torch.empty(600 * 1024 // 4); del big  # one freed large block raises glibc's dynamic mmap threshold
state = RwkvState(torch.ones(1, 12, 2, 768), torch.ones(1, 12, 1, 2600))  # ~198 KiB, as a 0.1B RWKV-4 state
logits = torch.ones(65536)  # 256 KiB
cache = StateCache(max_bytes=300 * (state.nbytes + logits.nbytes + 300))
heap = collections.OrderedDict()
small, marks = [], []
for i in range(4000):
    if sys.argv[1] == "cache":
        cache.put([i, i + 1], state, logits)
    else:  # what the cache kept before: plain copies, from the allocator's heap
        heap[i] = (state.clone(), logits.clone())
        while len(heap) > 300: heap.popitem(last=False)
    small.append(torch.ones(64))  # session data, keys
    if len(small) > 2000: small.pop(0)
    if i % 500 == 499: marks.append(rss())
print(len(cache) if sys.argv[1] == "cache" else len(heap), marks[1], marks[-1])
"""


def churn(mode: str) -> tuple[int, float, float]:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=300,
                         check=True).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; glibc's allocator")
def test_evicted_entries_go_back_to_the_system_under_the_default_allocator():
    """The cache's pattern (blocks of a few hundred KiB kept and evicted, between small long-lived objects) with
    glibc's default settings: entries kept by the cache leave the RSS flat once it is full, and it never grows
    more than the same churn of plain copies does. Where those grow (the heap's holes: glibc 2.36 with torch 2.13
    here, +138 MiB over the run) the cache's own mappings are what avoids it; where they stay flat (glibc 2.39
    with torch 2.11+cu130 on the GPU machine's host) the cache stays flat too."""
    kept, early, late = churn("cache")
    assert 250 <= kept <= 300
    _, heap_early, heap_late = churn("heap")
    assert late <= early * 1.03
    assert late - early <= max(0.0, heap_late - heap_early) + 1.0  # MiB


def _entry(seed: int) -> tuple[RwkvState, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (RwkvState(torch.randn(1, 3, 2, 40, generator=gen), torch.randn(1, 3, 4, 64, 64, generator=gen)),
            torch.randn(65536, generator=gen))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_an_entry_takes_at_most_one_mapping_and_gives_it_back_when_evicted():
    """The system allows a process ~65k maps: a cache of thousands of entries must not spend three each."""
    maps = lambda: len(open("/proc/self/maps").read().splitlines())  # noqa: E731
    state, logits = _entry(0)
    cache = StateCache(max_bytes=60 * (state.nbytes + logits.nbytes + 2 * NODE_BYTES))
    before = maps()
    for i in range(50):
        cache.put([i, 7], state, logits)
    assert len(cache) == 50 and maps() - before <= 50
    cache.clear()
    assert maps() - before <= 2


def test_entries_are_kept_as_ordinary_copies_where_no_mapping_can_be_made(monkeypatch):
    from rwkv_chat.serving import state_cache

    def refuse(*args):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(state_cache.mmap, "mmap", refuse)
    state, logits = _entry(1)
    cache = StateCache()
    cache.put([1, 2, 3], state, logits)
    found = cache.longest_prefix([1, 2, 3, 4])
    assert found.length == 3 and torch.equal(found.state.wkv, state.wkv) and torch.equal(found.logits, logits)
