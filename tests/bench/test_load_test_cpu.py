"""benchmarks/load_test.py's CPU use of a server with engine processes: the server's and its descendants' CPU
seconds together.

A parent process and its child each burn 0.4 s of CPU time, then idle: the load test's count must find both
(about 0.8 s, well above what either burned alone) and agree with psutil's CPU times of the two processes (an
independent reading, of the same /proc files through another parser)."""

from __future__ import annotations

import pytest

from benchmarks import load_test

psutil = pytest.importorskip("psutil")

BURN_S = 0.4

BURN = f"""
import time
while time.process_time() < {BURN_S}:
    pass
"""


def test_cpu_seconds_count_the_server_and_its_engine_processes(process_pair):
    with process_pair(BURN) as parent:
        ours = load_test.cpu_seconds(parent.pid)
        members = [psutil.Process(parent.pid)] + psutil.Process(parent.pid).children(recursive=True)
        theirs = sum(m.cpu_times().user + m.cpu_times().system for m in members)
    assert len(members) == 2
    assert ours >= 2 * BURN_S * 0.95  # both processes' burn (each at least BURN_S of process time)
    assert abs(ours - theirs) < 0.05  # both idle now: the same counters read a moment apart
    assert load_test.cpu_seconds(parent.pid) is None  # a server that is gone
