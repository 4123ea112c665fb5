"""benchmarks/load_test.py's memory of a server with engine processes: pages the processes share count once.

A parent process and its child both map and read the same 64 MiB file (as a server and its engine processes
share their libraries and the mmapped checkpoint). The load test's reader must find both processes, agree with
psutil's PSS of each (an independent reading of /proc/PID/smaps), and so come out ~64 MiB below the sum of their
RSS, which counts the shared file once a process."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import load_test

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's smaps_rollup")

SHARED = 64 << 20

MAPPER = """
import mmap
with open(args[0], "rb") as f:
    view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
total = sum(view[i] for i in range(0, len(view), 4096))  # every page resident
"""


def test_shared_pages_count_once_across_the_process_tree(tmp_path, process_pair):
    data = tmp_path / "shared.bin"
    data.write_bytes(bytes(range(256)) * (SHARED // 256))
    with process_pair(MAPPER, str(data)) as parent:
        tree = load_test.process_tree(parent.pid)
        assert len(tree) == 2 and tree[0] == parent.pid
        assert tree[1] == psutil.Process(parent.pid).children()[0].pid

        kind, read = load_test.memory_reader(parent.pid)
        ours = read()
        members = [psutil.Process(pid) for pid in tree]
        pss = sum(m.memory_full_info().pss for m in members)
        rss = sum(m.memory_info().rss for m in members)
        again = read()
    with pytest.raises(FileNotFoundError):  # a server that is gone: the sampler records nothing for it
        load_test.process_tree(parent.pid)

    assert kind == "PSS"
    assert abs(ours - pss) < 4 << 20 and abs(again - pss) < 4 << 20  # the same pages, read a moment apart
    assert rss - ours > 0.9 * SHARED  # the file is resident in both; PSS splits it between them
