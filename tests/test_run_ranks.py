"""The process-launch harness itself (allreduce_rms.launch), which the CLI and every multi-process
test use: results come back per rank; a rank that raises, crashes, hangs, or reports success and
then hangs or crashes on its way out fails the run; messages reach the parent in order; each
rank sees the torchrun-style environment and its own variables; Ctrl-C stops every rank.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import threading
import time

import pytest

from allreduce_rms import launch
from allreduce_rms.launch import RanksFailed, run_ranks


def _ok_worker(rank, world):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)  # the group is really initialized
    return {"rank": rank, "pid": os.getpid(), "sum": t.item(), "backend": dist.get_backend()}


def _env_worker(rank, world):
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "SHARED", "MINE")
    return {k: os.environ.get(k) for k in keys}


def _messages_worker(rank, world):
    if rank == 0:
        for i in range(5):
            launch.send(("step", i))
    return rank


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


def _crashes_worker(rank, world):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # rank 0 never reports: only the crash may end the run
    return rank


def _sleeps_worker(rank, world):
    time.sleep(60)
    return rank


def _unpicklable_worker(rank, world):
    return lambda: rank


def test_results_come_back_per_rank_over_gloo():
    results = run_ranks(_ok_worker, 2, timeout=120)
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert results[0]["backend"] == "gloo" and results[0]["pid"] != results[1]["pid"] != os.getpid()


def test_each_rank_sees_the_torchrun_variables_and_its_env():
    results = run_ranks(_env_worker, 2, timeout=120, env=[{"SHARED": "x", "MINE": "a"}, {"SHARED": "x", "MINE": "b"}])
    for rank, env in enumerate(results):
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2" and env["MASTER_ADDR"] == "127.0.0.1"
        assert env["SHARED"] == "x" and env["MINE"] == "ab"[rank]
    same = run_ranks(_env_worker, 2, timeout=120, env={"SHARED": "y"})
    assert [e["SHARED"] for e in same] == ["y", "y"]
    with pytest.raises(ValueError, match="1 mappings for 2 ranks"):
        run_ranks(_env_worker, 2, env=[{}])


def test_messages_reach_the_parent_in_order():
    seen = []
    run_ranks(_messages_worker, 2, timeout=120, on_message=lambda rank, msg: seen.append((rank, msg)))
    assert seen == [(0, ("step", i)) for i in range(5)]


class _TakenPorts:
    """free_port() that hands out `taken` ports held by a listening socket (as if another process
    had bound them after the harness chose them), then free ones."""

    def __init__(self, taken: int) -> None:
        self.blockers = []
        for _ in range(taken):
            s = socket.socket()
            s.bind(("", 0))  # every address, so the store's bind on any of them fails
            s.listen()
            self.blockers.append(s)
        self.handed = []

    def __call__(self) -> int:
        port = self.blockers[len(self.handed)].getsockname()[1] if len(self.handed) < len(self.blockers) \
            else _real_free_port()
        self.handed.append(port)
        return port

    def close(self) -> None:
        for s in self.blockers:
            s.close()


_real_free_port = launch.free_port


def test_a_taken_rendezvous_port_starts_the_run_again_on_another(monkeypatch):
    ports = _TakenPorts(taken=1)
    monkeypatch.setattr(launch, "free_port", ports)
    try:
        results = run_ranks(_ok_worker, 2)
    finally:
        ports.close()
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert len(ports.handed) == 2 and ports.handed[0] != ports.handed[1], ports.handed


def test_a_port_taken_every_time_fails_with_the_reason(monkeypatch):
    ports = _TakenPorts(taken=launch.RENDEZVOUS_ATTEMPTS)
    monkeypatch.setattr(launch, "free_port", ports)
    try:
        with pytest.raises(RanksFailed, match="rendezvous port was taken"):
            run_ranks(_ok_worker, 2, timeout=60)
    finally:
        ports.close()
    assert len(ports.handed) == launch.RENDEZVOUS_ATTEMPTS


def _address_in_use_worker(rank, world):
    import errno

    raise OSError(errno.EADDRINUSE, "Address already in use (raised by fn, not by the rendezvous)")


def test_address_in_use_raised_by_fn_fails_the_run_without_a_retry(monkeypatch):
    handed = []

    def counting_free_port():
        handed.append(_real_free_port())
        return handed[-1]

    monkeypatch.setattr(launch, "free_port", counting_free_port)
    with pytest.raises(RanksFailed, match="raised by fn") as info:
        run_ranks(_address_in_use_worker, 2, timeout=60)
    assert len(info.value.failures) == 2 and len(handed) == 1, (info.value.failures, handed)


def test_send_outside_a_rank_raises():
    with pytest.raises(RuntimeError, match="not a rank started by run_ranks"):
        launch.send("hello")


@pytest.mark.parametrize("exit_hard", [None, True, False])
def test_every_exit_mode_delivers_every_result(exit_hard):
    results = run_ranks(_ok_worker, 2, exit_hard=exit_hard, timeout=120)
    assert [r["rank"] for r in results] == [0, 1]


def test_a_rank_that_hangs_at_exit_fails():
    # exit_hard=False: the interpreter's own exit, whose atexit handlers are what hangs here
    with pytest.raises(RanksFailed, match=r"rank 1 reported success but did not exit within 2 s"):
        run_ranks(_hangs_at_exit_worker, 2, timeout=60, exit_timeout=2.0, exit_hard=False)


def test_a_rank_that_crashes_at_exit_fails():
    with pytest.raises(RanksFailed, match="rank 1 reported success but exited with code 3"):
        run_ranks(_crashes_at_exit_worker, 2, timeout=60, exit_hard=False)


def test_the_default_exit_skips_interpreter_teardown():
    # barrier, destroy_process_group, os._exit: an atexit handler that would hang never runs
    started = time.monotonic()
    assert run_ranks(_hangs_at_exit_worker, 2, timeout=60, exit_timeout=20.0) == [0, 1]
    assert time.monotonic() - started < 20.0


def test_after_a_failure_only_the_failure_is_reported():
    # the other ranks of a failed run may well be stuck: killing them is no second failure
    with pytest.raises(RanksFailed) as info:
        run_ranks(_fails_and_peer_hangs_worker, 2, timeout=60, exit_timeout=2.0)
    assert "rank 0 failed" in str(info.value) and "ValueError: injected" in str(info.value)
    assert "did not exit" not in str(info.value) and not info.value.timed_out
    assert len(info.value.failures) == 1


def test_a_rank_killed_by_a_signal_fails_the_run_quickly():
    started = time.monotonic()
    with pytest.raises(RanksFailed, match="rank 1 was killed by signal SIGKILL without reporting a result"):
        run_ranks(_crashes_worker, 2, timeout=120)
    assert time.monotonic() - started < 60  # not the whole timeout: the crash ends the wait


def test_a_run_past_its_timeout_fails_and_kills_every_rank():
    started = time.monotonic()
    with pytest.raises(RanksFailed, match=r"rank\(s\) 0, 1 did not finish within 3 s") as info:
        run_ranks(_sleeps_worker, 2, timeout=3)
    assert info.value.timed_out
    assert time.monotonic() - started < 30


def test_a_result_that_does_not_pickle_is_a_failure_with_its_reason():
    with pytest.raises(RanksFailed, match="rank 0 failed"):
        run_ranks(_unpicklable_worker, 2, timeout=120)


def test_bad_arguments():
    with pytest.raises(ValueError, match="world_size"):
        run_ranks(_ok_worker, 0)
    with pytest.raises(ValueError, match="backend"):
        run_ranks(_ok_worker, 2, backend="mpi")


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_ctrl_c_in_the_parent_stops_every_rank():
    pids = []

    def interrupt(rank, message):  # the ranks are up: now the user presses Ctrl-C
        pids.append(message)
        if len(pids) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    # Python's own Ctrl-C handler even when pytest was started with SIGINT ignored (nohup, `&`)
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_ranks(_pid_then_sleep_worker, 2, timeout=120, on_message=interrupt)
    finally:
        signal.signal(signal.SIGINT, old_handler)
    time.sleep(0.5)
    for pid in pids:  # gone: not even a zombie of ours is left
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _pid_then_sleep_worker(rank, world):
    launch.send(os.getpid())
    time.sleep(60)
    return rank


def test_ranks_ignore_the_terminals_sigint():
    # the terminal sends SIGINT to the whole foreground group: only the parent may act on it
    results = run_ranks(_sigint_self_worker, 2, timeout=120)
    assert results == ["survived", "survived"]


def _sigint_self_worker(rank, world):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    return "survived"


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}, None),  # left in a shell: not a job
    ({"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "node0",
      "MASTER_PORT": "29500"},
     {"rank": 3, "world_size": 16, "local_rank": 1, "local_world_size": 8, "master_addr": "node0",
      "master_port": 29500}),
])
def test_torchrun_env(env, expected):
    assert launch.torchrun_env(env) == expected


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "set but not LOCAL_RANK, MASTER_ADDR, MASTER_PORT"),
    ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK='x'"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "outside"),
])
def test_torchrun_env_rejects_a_partial_or_wrong_job(env, message):
    with pytest.raises(ValueError, match=message):
        launch.torchrun_env(env)


def test_tests_helper_is_the_package_harness():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import distributed

    assert distributed.run_ranks is run_ranks
