"""pipeline.fileio.exclusive_lock: mutual exclusion between real processes, and no lock file left behind."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from pipeline.fileio import exclusive_lock


def _increment(lock: str, counter: str, times: int) -> None:
    for _ in range(times):
        with exclusive_lock(lock):
            path = Path(counter)
            value = int(path.read_text()) if path.exists() else 0
            path.write_text(str(value + 1))  # a lost update shows as a final count below the total


def test_processes_never_hold_the_lock_together_and_leave_no_file(tmp_path):
    lock, counter = str(tmp_path / "key.lock"), str(tmp_path / "counter")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_increment, args=(lock, counter, 150)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    assert int(Path(counter).read_text()) == 450
    assert not Path(lock).exists()


def _hold(lock: str, ready, release) -> None:
    with exclusive_lock(lock):
        ready.set()
        release.wait(60)


def _start_holder(lock: str):
    """A spawned process that holds ``lock`` until its ``release`` event is set -> (process, ready, release)."""
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(lock, ready, release))
    holder.start()
    return holder, ready, release


def test_a_held_lock_times_out_with_a_clear_error(tmp_path):
    lock = str(tmp_path / "key.lock")
    holder, ready, release = _start_holder(lock)
    try:
        assert ready.wait(60)
        with pytest.raises(TimeoutError, match="another process holds the lock"):
            with exclusive_lock(lock, timeout=0.3):
                pass
    finally:
        release.set()
        holder.join(60)
    with exclusive_lock(lock, timeout=5):  # free again once the holder is gone
        pass
    assert not Path(lock).exists()


def test_a_killed_holder_releases_the_lock(tmp_path):
    lock = str(tmp_path / "key.lock")
    holder, ready, _ = _start_holder(lock)
    assert ready.wait(60)
    holder.kill()  # SIGKILL: no cleanup runs; the OS drops the flock, the file stays
    holder.join(60)
    with exclusive_lock(lock, timeout=5):
        pass
    assert not Path(lock).exists()
