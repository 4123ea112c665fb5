"""A build of the CPU kernels stopped while it held torch's build lock must not hang every later start: the lock
is cleared once it is older than any build takes, and only then (torch's own FileBaton is the oracle for what the
lock blocks)."""

from __future__ import annotations

import os
import time

import pytest
from torch.utils.file_baton import FileBaton

from rwkv_chat.kernels import cpu_kernels


def lock_of(directory, age_s: float):
    lock = directory / "lock"
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_lock_left_by_a_stopped_build_is_cleared_with_a_warning(tmp_path):
    lock = lock_of(tmp_path, cpu_kernels.STALE_LOCK_SECONDS + 60)
    assert not FileBaton(str(lock)).try_acquire()  # what torch's build would wait on, forever
    with pytest.warns(UserWarning, match="build lock .*lock, 11 min old"):
        assert cpu_kernels.clear_stale_lock(tmp_path)
    assert not lock.exists()
    baton = FileBaton(str(lock))
    assert baton.try_acquire()  # the next build goes ahead
    baton.release()


def test_a_recent_lock_is_another_build_and_stays(tmp_path, recwarn):
    lock = lock_of(tmp_path, cpu_kernels.STALE_LOCK_SECONDS - 60)
    assert not cpu_kernels.clear_stale_lock(tmp_path)
    assert lock.exists() and not recwarn.list
    assert not cpu_kernels.clear_stale_lock(tmp_path / "elsewhere")  # no lock at all


def test_the_lock_looked_at_is_the_one_torch_builds_under():
    if cpu_kernels.kernels() is None:
        pytest.skip("no CPU kernels here")
    directory = cpu_kernels.build_directory()
    assert directory is not None
    assert any(directory.glob(f"{cpu_kernels.EXTENSION_NAME}*.so"))  # the build torch made and loads
