"""A parent process and its child doing the same work, as a server and its engine processes: for the load test's
readings of a whole process tree (tests/bench/test_load_test_memory.py, test_load_test_cpu.py)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap

import pytest

PAIR = """\
import subprocess, sys
role, args = sys.argv[1], sys.argv[2:]
child = subprocess.Popen([sys.executable, __file__, "child", *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE) if role == "parent" else None
{work}
if child is not None:
    child.stdout.readline()
print("ready", flush=True)
sys.stdin.read()  # until the test closes it
if child is not None:
    child.stdin.close()
    child.wait()
"""


@pytest.fixture
def process_pair(tmp_path):
    """process_pair(work, *args): a context manager starting a parent that starts a child, both running the Python
    lines `work` (`args` in their `args`), and yielding the parent's Popen once both are done with it; both idle
    until the context ends, then exit."""
    @contextlib.contextmanager
    def start(work: str, *args: str):
        script = tmp_path / "pair.py"
        script.write_text(PAIR.replace("{work}", textwrap.dedent(work)))
        parent = subprocess.Popen([sys.executable, str(script), "parent", *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)
        try:
            assert parent.stdout.readline().strip() == b"ready"
            yield parent
        finally:
            parent.stdin.close()
            parent.wait(timeout=30)
    return start
