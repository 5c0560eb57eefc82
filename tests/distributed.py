"""Run a function in N real processes, one rank each, with torch.distributed initialized.

Used by every multi-process test (gloo on CPU, NCCL on GPUs). A rank that raises fails the test
with its traceback; a rank that hangs is killed after `timeout` seconds and fails the test, so a
test can never hang CI. A rank that reported success but then hangs or crashes on its way out
fails the test too: leaving cleanly is part of what the library promises.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Seconds a rank may take to exit after it reported its result (interpreter teardown, CUDA
# contexts); module-level so a test of this helper can shorten it.
# A rank that ran torch.compile may need well over 10 s to stop Inductor's compile workers.
EXIT_TIMEOUT = 60.0


def _entry(fn: Callable[..., Any], rank: int, world_size: int, backend: str, port: int, env: Dict[str, str],
           args: tuple, queue: Any, exit_hard: bool) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(env)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            # tear down without a barrier: a rank that failed must not wait for the others
            dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:  # report everything, including assertion failures
        queue.put((rank, False, traceback.format_exc()))
    if exit_hard:
        # End like a killed server: no interpreter teardown, no destructors, no atexit. The queue's
        # feeder thread must deliver the result first, or the parent would never see it.
        queue.close()
        queue.join_thread()
        os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", timeout: float = 180.0,
              env: Optional[Dict[str, str]] = None, exit_hard: bool = False,
              exit_timeout: float = EXIT_TIMEOUT) -> List[Any]:
    """Run fn(rank, world_size, *args) in world_size processes; return the per-rank results.

    fn must be a module-level function (it is pickled into spawned processes). Raises
    AssertionError naming the rank on any failure or on timeout, and, when every rank succeeded,
    on a rank that then exits with a nonzero code or has to be killed after exit_timeout seconds.
    exit_hard: each rank ends with os._exit(0) right after reporting (skipping interpreter exit).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry,
                         args=(fn, r, world_size, backend, port, dict(env or {}), args, queue, exit_hard))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: Dict[int, Any] = {}
    failures: List[str] = []
    try:
        import queue as queue_module

        for _ in range(world_size):
            try:
                rank, ok, payload = queue.get(timeout=timeout)
            except queue_module.Empty:
                failures.append(f"timed out after {timeout} s waiting for ranks {sorted(set(range(world_size)) - set(results))}")
                break
            if ok:
                results[rank] = payload
            else:
                failures.append(f"rank {rank} failed:\n{payload}")
                results[rank] = None
    finally:
        exits: List[str] = []
        for r, p in enumerate(procs):
            p.join(timeout=exit_timeout)
            if p.is_alive():
                p.kill()
                p.join()
                exits.append(f"rank {r} reported success but did not exit within {exit_timeout} s (killed)")
            elif p.exitcode != 0:
                exits.append(f"rank {r} reported success but exited with code {p.exitcode}")
    # After a failure the other ranks may be stuck in a collective: killing them is expected then.
    if not failures:
        failures = exits
    if failures:
        raise AssertionError("\n".join(failures))
    return [results[r] for r in range(world_size)]
