"""The multi-process helper itself (tests/distributed.py): a rank that reports success and then
hangs or crashes on its way out must fail the test, since exiting cleanly is what the exit tests
on GPUs check; exit_hard still delivers every result.
"""

from __future__ import annotations

import atexit
import os
import time

import pytest

from distributed import run_ranks


def _ok_worker(rank, world):
    return {"rank": rank, "pid": os.getpid()}


def _hangs_at_exit_worker(rank, world):
    if rank == 1:
        atexit.register(time.sleep, 60)  # runs during interpreter exit, after the result is sent
    return rank


def _crashes_at_exit_worker(rank, world):
    if rank == 1:
        atexit.register(os._exit, 3)
    return rank


def _fails_and_peer_hangs_worker(rank, world):
    if rank == 0:
        raise ValueError("injected")
    atexit.register(time.sleep, 60)
    return rank


def test_exit_hard_delivers_every_result():
    results = run_ranks(_ok_worker, 2, exit_hard=True, timeout=60)
    assert [r["rank"] for r in results] == [0, 1]


def test_a_rank_that_hangs_at_exit_fails():
    with pytest.raises(AssertionError, match=r"rank 1 reported success but did not exit within 2.0 s"):
        run_ranks(_hangs_at_exit_worker, 2, timeout=60, exit_timeout=2.0)


def test_a_rank_that_crashes_at_exit_fails():
    with pytest.raises(AssertionError, match="rank 1 reported success but exited with code 3"):
        run_ranks(_crashes_at_exit_worker, 2, timeout=60)


def test_after_a_failure_only_the_failure_is_reported():
    # the other ranks of a failed run may well be stuck: killing them is no second failure
    with pytest.raises(AssertionError) as info:
        run_ranks(_fails_and_peer_hangs_worker, 2, timeout=60, exit_timeout=2.0)
    assert "ValueError: injected" in str(info.value) and "did not exit" not in str(info.value)
