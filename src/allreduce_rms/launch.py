"""Run one function in N local processes, one rank each, with torch.distributed initialized.

The CLI (``allreduce-rms``) and the multi-process tests both start their ranks here::

    from allreduce_rms.launch import run_ranks

    def worker(rank, world_size, scale):          # module-level: it is pickled into each process
        t = torch.full((2,), float(rank) * scale)
        torch.distributed.all_reduce(t)
        return t.tolist()

    run_ranks(worker, 2, 10.0)                     # -> [[10.0, 10.0], [10.0, 10.0]]

Processes are started by :func:`torch.multiprocessing.start_processes` (``spawn``), which also
asks the kernel to signal a rank whose parent dies. Each rank joins the group through the
``env://`` rendezvous, with the same variables torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so code that runs
under torchrun runs here unchanged. :func:`torchrun_env` tells whether this process is itself a
torchrun rank.

What the parent sees: each rank's return value (or its traceback), messages a rank sends with
:func:`send` while it runs, and how the rank ended. A rank that raises, crashes, or does not
finish within ``timeout`` seconds fails the run; so does a rank that reported success and then
hangs or crashes on its way out, since leaving cleanly is part of what the library promises.
Failures raise :class:`RanksFailed`, whose message names every failed rank.

Ctrl-C: the ranks ignore SIGINT (the terminal sends it to the whole foreground process group),
so only the parent sees ``KeyboardInterrupt``; it stops every rank before re-raising it.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import signal
import socket
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

# Seconds a rank may take to exit after it reported its result (interpreter teardown, CUDA
# contexts). A rank that ran torch.compile may need well over 10 s to stop Inductor's workers.
EXIT_TIMEOUT = 60.0
# Seconds the parent keeps collecting the other ranks' reports after a first failure: they may
# well be stuck in a collective the failed rank never joins.
FAILURE_GRACE = 10.0
# Seconds between a rank's exit and the parent's verdict "exited without a report" (the report
# may still be in the pipe when the exit is seen).
REPORT_GRACE = 2.0
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

_channel: Optional[tuple] = None  # (queue, rank) inside a rank started by run_ranks


class RanksFailed(RuntimeError):
    """One or more ranks failed; ``failures`` holds one text per failed rank (tracebacks
    included) and ``timed_out`` is True when the run hit its time limit."""

    def __init__(self, failures: Sequence[str], timed_out: bool = False) -> None:
        super().__init__("\n".join(failures))
        self.failures = list(failures)
        self.timed_out = timed_out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the rendezvous store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, addr: str = "127.0.0.1") -> Dict[str, str]:
    """The env:// rendezvous variables of one local rank, as torchrun sets them."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": addr, "MASTER_PORT": str(port)}


def torchrun_env(environ: Optional[Mapping[str, str]] = None) -> Optional[Dict[str, Any]]:
    """This process's place in a torchrun (or any env:// launcher) job, or None outside one.

    Returns ``{"rank", "world_size", "local_rank", "local_world_size", "master_addr",
    "master_port"}`` (ints but the address) when RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT are all set; None when none of RANK, WORLD_SIZE and LOCAL_RANK is (MASTER_ADDR
    alone, left in a shell, does not make a job). Raises ValueError when only some are set or a
    number is not a number, naming the variable.
    """
    env = os.environ if environ is None else environ
    present = [k for k in TORCHRUN_VARS if env.get(k, "") != ""]
    if not any(k in present for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    missing = [k for k in TORCHRUN_VARS if k not in present]
    if missing:
        raise ValueError(f"{', '.join(present)} set but not {', '.join(missing)}: start the job with torchrun "
                         "(or set all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    out: Dict[str, Any] = {"master_addr": env["MASTER_ADDR"]}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        text = env.get(key, env["WORLD_SIZE"] if key == "LOCAL_WORLD_SIZE" else "")
        try:
            out[key.lower()] = int(text)
        except ValueError:
            raise ValueError(f"{key}={text!r} is not an integer") from None
    if not 0 <= out["rank"] < out["world_size"]:
        raise ValueError(f"RANK={out['rank']} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={out['world_size']})")
    return out


def send(message: Any) -> None:
    """From inside a rank started by :func:`run_ranks`: hand `message` (picklable) to the
    parent's ``on_message(rank, message)``, while the rank goes on. Raises RuntimeError in any
    other process."""
    if _channel is None:
        raise RuntimeError("allreduce_rms.launch.send: this process is not a rank started by run_ranks")
    q, rank = _channel
    q.put((rank, "message", message))


# ----------------------------------------------------------------------------- inside a rank
def _set_parent_death_signal() -> None:
    # start_processes asks for SIGINT when the parent dies, but the ranks ignore SIGINT (see
    # the module docstring): ask for SIGTERM instead, whose default action ends the process.
    try:
        from torch.multiprocessing import _prctl_pr_set_pdeathsig  # type: ignore[attr-defined]

        _prctl_pr_set_pdeathsig(signal.SIGTERM)
    except Exception:  # not Linux, or a torch without it: only orphan cleanup is lost
        pass


def _flush_and_exit(q: Any, code: int) -> None:
    # The queue's feeder thread must deliver what was put before the process vanishes.
    q.close()
    q.join_thread()
    os._exit(code)


def _entry(rank: int, fn: Callable[..., Any], world_size: int, backend: str, port: int,
           envs: Sequence[Mapping[str, str]], args: tuple, q: Any, exit_mode: str, bind_device: bool) -> None:
    """One rank: init the group (env://), run fn, report (rank, "result", ok, payload), leave."""
    global _channel
    _set_parent_death_signal()
    _channel = (q, rank)
    ok, payload = False, None
    initialized = False
    try:
        os.environ.update(rank_env(rank, world_size, port))
        os.environ.update(envs[rank])
        import torch
        import torch.distributed as dist

        kwargs: Dict[str, Any] = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            if bind_device:  # eager communicator on this GPU (device-bound barriers, symm_mem)
                kwargs["device_id"] = torch.device("cuda", rank)
        try:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
        except Exception as exc:
            # only rank 0 binds the rendezvous port (the store's server): another rank's EADDRINUSE
            # is some other socket's, and rank 0 may be in fn by then
            if rank == 0 and _port_taken(exc):  # the parent starts the run again on another port
                q.put((rank, "port_taken", str(exc)))
                _flush_and_exit(q, 1)
            raise
        initialized = True
        payload = fn(rank, world_size, *args)
        pickle.dumps(payload)  # fail here, with a traceback, rather than silently in the feeder thread
        ok = True
    except BaseException:  # report everything, including assertion failures
        payload = traceback.format_exc()
    q.put((rank, "result", ok, payload))

    import torch.distributed as dist

    if not ok:
        # Peers may be stuck in a collective this rank never joins: no barrier, no teardown.
        _flush_and_exit(q, 1)
    if exit_mode == "quick":
        # Leave together, then skip interpreter teardown: with gloo on CPU a rank otherwise
        # aborts now and then at exit ("terminate called without an active exception").
        code = 0
        try:
            if initialized:
                dist.barrier()
                dist.destroy_process_group()
        except BaseException:
            traceback.print_exc()
            code = 1
        _flush_and_exit(q, code)
    if initialized:
        dist.destroy_process_group()  # no barrier: the exit itself is what is under test
    if exit_mode == "hard":
        # End like a killed server: no interpreter teardown, no destructors, no atexit.
        _flush_and_exit(q, 0)
    # exit_mode == "interpreter": return; the interpreter exits normally (atexit, destructors)


def _port_taken(exc: BaseException) -> bool:
    """Did init_process_group fail because the rendezvous port was taken between free_port() and
    rank 0's bind (another process got it in that moment)?"""
    text = str(exc).lower()
    return "eaddrinuse" in text or "address already in use" in text


# ----------------------------------------------------------------------------- the parent
class _PortTaken(Exception):
    """Rank 0 found the rendezvous port taken: the run is started again on another port."""


# Runs, each on a fresh port, before a rendezvous port taken every time fails the run (_port_taken).
RENDEZVOUS_ATTEMPTS = 3


def _how_it_ended(exitcode: Optional[int]) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            return f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _stop(procs: Sequence[Any], grace: float = 3.0) -> None:
    """SIGTERM every live rank, then SIGKILL whatever is still alive after `grace` seconds."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()


class _IgnoreSigint:
    """SIGINT ignored while the ranks are started, so that they inherit SIG_IGN."""

    def __enter__(self) -> None:
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", timeout: float = 180.0,
              env: Union[None, Mapping[str, str], Sequence[Mapping[str, str]]] = None,
              exit_hard: Optional[bool] = None, exit_timeout: float = EXIT_TIMEOUT,
              on_message: Optional[Callable[[int, Any], None]] = None, bind_device: bool = False) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in `world_size` spawned processes; return the
    per-rank results as a list indexed by rank.

    Args:
        fn: a module-level function (pickled into each process); its return value must pickle.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (rank r uses ``cuda:r``).
        timeout: seconds for every rank to report; then the run fails and all ranks are killed.
        env: variables set in every rank (one mapping), or one mapping per rank (a sequence).
        exit_hard: how a rank that succeeded leaves. None (default): barrier,
            ``destroy_process_group``, then ``os._exit(0)`` (no interpreter teardown, which with
            gloo sometimes aborts). False: ``destroy_process_group`` and an ordinary interpreter
            exit (atexit handlers, destructors), for tests of clean exit. True: ``os._exit(0)``
            right after ``destroy_process_group``, like a server killed after its work.
        exit_timeout: seconds (for all ranks together) to exit after the last report.
        on_message: called in the parent as ``on_message(rank, message)`` for each
            :func:`send` of a rank, in order, while the parent waits.
        bind_device: with nccl, bind the communicator to the rank's GPU (``device_id``).

    The rendezvous port comes from :func:`free_port`, which another process can take before rank
    0 binds it; when rank 0 finds it taken, the run starts again on a new port (no rank has called
    `fn` by then, unless what holds the port is another job's rendezvous store), up to
    ``RENDEZVOUS_ATTEMPTS`` runs.

    Raises:
        RanksFailed: a rank raised (its traceback is in the message), exited or was killed
            without reporting, did not report within `timeout`, or, when every rank succeeded,
            then exited with a nonzero code or did not exit within `exit_timeout`.
            Also when the rendezvous port was taken in every one of ``RENDEZVOUS_ATTEMPTS`` runs.
        ValueError: `world_size` < 1, an unknown backend, or `env` of the wrong length.
        KeyboardInterrupt: re-raised after every rank was stopped.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if env is None or isinstance(env, Mapping):
        envs = [dict(env or {})] * world_size
    else:
        envs = [dict(e) for e in env]
        if len(envs) != world_size:
            raise ValueError(f"env: {len(envs)} mappings for {world_size} ranks")
    exit_mode = {None: "quick", False: "interpreter", True: "hard"}[exit_hard]
    for _ in range(RENDEZVOUS_ATTEMPTS):
        try:
            return _run_once(fn, world_size, args, backend, timeout, envs, exit_mode, exit_timeout, on_message,
                             bind_device)
        except _PortTaken as taken:
            last = taken
    raise RanksFailed([f"the rendezvous port was taken {RENDEZVOUS_ATTEMPTS} times in a row: {last}"])


def _run_once(fn: Callable[..., Any], world_size: int, args: tuple, backend: str, timeout: float,
              envs: List[Dict[str, str]], exit_mode: str, exit_timeout: float,
              on_message: Optional[Callable[[int, Any], None]], bind_device: bool) -> List[Any]:
    """One run of run_ranks on a fresh port. Raises _PortTaken when rank 0 found that port taken
    (every rank is stopped first; no rank has called fn then, since rank 0 never got the port)."""
    import torch.multiprocessing as mp

    q = mp.get_context("spawn").Queue()
    port = free_port()
    with _IgnoreSigint():
        context = mp.start_processes(_entry, args=(fn, world_size, backend, port, envs, args, q, exit_mode,
                                                   bind_device),
                                     nprocs=world_size, join=False, start_method="spawn")
    procs = context.processes
    results: Dict[int, Any] = {}
    reported: set = set()
    failures: List[str] = []
    timed_out = False
    deadline = time.monotonic() + timeout
    stop_at: Optional[float] = None
    exited_at: Dict[int, float] = {}
    try:
        while len(reported) < world_size:
            now = time.monotonic()
            if stop_at is not None and now > stop_at:
                break
            if now > deadline:
                missing = sorted(set(range(world_size)) - reported)
                failures.append(f"rank(s) {', '.join(map(str, missing))} did not finish within {timeout:g} s "
                                "(killed)")
                timed_out = True
                break
            try:
                item = q.get(timeout=0.2)
            except queue_module.Empty:
                for r, p in enumerate(procs):
                    if r in reported or p.exitcode is None:
                        continue
                    if now - exited_at.setdefault(r, now) > REPORT_GRACE:
                        failures.append(f"rank {r} {_how_it_ended(p.exitcode)} without reporting a result"
                                        + _error_file_text(context.error_files[r]))
                        reported.add(r)
                        stop_at = stop_at or now + FAILURE_GRACE
                continue
            rank, kind = item[0], item[1]
            if kind == "port_taken":
                raise _PortTaken(f"rank {rank}: {item[2]}")
            if kind == "message":
                if on_message is not None:
                    on_message(rank, item[2])
                continue
            ok, payload = item[2], item[3]
            reported.add(rank)
            if ok:
                results[rank] = payload
            else:
                failures.append(f"rank {rank} failed:\n{payload}")
                stop_at = stop_at or time.monotonic() + FAILURE_GRACE
    except BaseException:  # KeyboardInterrupt, or an on_message that raised
        _stop(procs, grace=2.0)
        q.close()
        raise
    if failures:
        # After a failure the other ranks may be stuck in a collective: stopping them is
        # expected then, and no second failure.
        _stop(procs, grace=1.0)
    else:
        end = time.monotonic() + exit_timeout
        for r, p in enumerate(procs):
            p.join(max(0.0, end - time.monotonic()))
        for r, p in enumerate(procs):
            if p.is_alive():
                failures.append(f"rank {r} reported success but did not exit within {exit_timeout:g} s (killed)")
            elif p.exitcode != 0:
                failures.append(f"rank {r} reported success but {_how_it_ended(p.exitcode)}")
        _stop(procs, grace=1.0)
    q.close()
    for path in context.error_files:
        if path and os.path.exists(path):
            os.unlink(path)
    if failures:
        raise RanksFailed(failures, timed_out)
    return [results[r] for r in range(world_size)]


def _error_file_text(path: Optional[str]) -> str:
    """The traceback start_processes saved for an exception that escaped the rank's entry."""
    try:
        with open(path or "", "rb") as f:
            return ":\n" + str(pickle.load(f))
    except Exception:
        return ""
