"""The per-group workspace: which path a TP group takes, and the Lamport buffers for the fused one.

Creating a Workspace is collective: every rank of the group must create it, with the same
arguments, in the same order. All ranks agree on one path through collectives, so no rank can
pick the fused path while a peer picks the fallback:

* ``local``    -- one rank: plain RMSNorm, no communication;
* ``fused``    -- every rank on one host, one GPU each, the backend loaded everywhere, peer
                  access reported, IPC handles open, and a functional check (each rank writes a
                  token into every peer's buffer and reads the peers' tokens, bounded in time)
                  passed: one kernel per call exchanges the statistics through NVLink/xGMI;
* ``fallback`` -- anything else (several hosts, PCIe without P2P, CPU tensors, a failed check):
                  local kernel -> ``torch.distributed.all_reduce`` (NCCL/RCCL/gloo) -> local kernel.

The ranks also agree on the creation arguments: ranks that pass different ``max_tokens`` or
``chunking``, or force conflicting paths, all raise ValueError naming the rank that differs,
instead of some of them waiting forever in a collective the others never join. The reason for a
fallback names the first fact that rules the fused path out, in this order: a forced path, more
than 8 ranks, ranks on several hosts, a rank without a GPU backend, a shared GPU, missing peer
access, IPC failure, the functional check.

Environment: ``ALLREDUCE_RMS_PATH=fused|fallback`` forces a path (fused still fails loudly if it
cannot work); ``ALLREDUCE_RMS_TIMEOUT_MS`` bounds every spin (default 10000);
``ALLREDUCE_RMS_DEBUG_DROP_PEER_WRITES=1`` makes the functional check drop its peer writes, to
show that a link which reports P2P but loses writes ends on the fallback instead of hanging.

Fork: a workspace belongs to the process that created it. A child made by ``os.fork`` (or a
``fork``-start multiprocessing worker) inherits a copy of the Python object but not what stands
behind it: CUDA contexts do not survive fork, the IPC mappings of peer buffers are not valid in
the child, and the child is not a member of the parent's process group. Every op called with an
inherited workspace therefore raises WorkspaceError (a cheap pid comparison per call), as do
:meth:`Workspace.check_usable`, :meth:`Workspace.synchronize` and :func:`workspace_for` in the
child. ``close()`` and garbage collection in the child only mark the copy closed; they never
touch the parent's buffers. A child that needs the op must join its own process group and create
its own workspace (use the ``spawn`` start method for GPU work).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _hot_path, _native
from ._collectives import all_gather_bytes, all_gather_fields, all_gather_ints

log = logging.getLogger("allreduce_rms")

DEFAULT_MAX_TOKENS = 16384
DEFAULT_TIMEOUT_MS = 10_000
PROBE_TIMEOUT_MS = 2_000
PATHS = ("fused", "fallback")
MAX_FUSED_RANKS = 8

_registry: "weakref.WeakValueDictionary[str, Workspace]" = weakref.WeakValueDictionary()
_cache: Dict[Tuple[Any, ...], "Workspace"] = {}
_counter = 0
_lock = threading.Lock()
_pid = os.getpid()  # this process's id, refreshed in fork children: a per-call check costs no syscall


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def current_pid() -> int:
    """This process's id (cached; kept right across os.fork)."""
    return _pid


def _hostname() -> str:
    """This process's host name (a seam for tests that fake several hosts)."""
    return socket.gethostname()


_PATH_CODES: Dict[Optional[str], int] = {None: 0, "fused": 1, "fallback": 2}  # a forced path on the wire
_PATH_NAMES = {code: name for name, code in _PATH_CODES.items()}


def _gpu_ids() -> List[str]:
    """An identity for each GPU this process sees, by visible index, that is the same in every
    process of the host whatever its CUDA_VISIBLE_DEVICES: the device UUID, else (a torch or
    driver that reports none) the PCI address, else only the visible index (the last resort
    cannot tell two isolated ranks' "cuda:0" apart)."""
    ids = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        uuid = str(getattr(props, "uuid", "") or "")
        if any(c not in "0-" for c in uuid.lower().replace("gpu-", "")):  # an all-zero UUID names nothing
            ids.append(f"uuid:{uuid}")
        elif hasattr(props, "pci_bus_id"):
            ids.append(f"pci:{getattr(props, 'pci_domain_id', 0)}:{props.pci_bus_id}:{getattr(props, 'pci_device_id', 0)}")
        else:
            ids.append(f"index:{index}")
    return ids


@dataclass(frozen=True)
class _RankFacts:
    """What one rank knows alone when a workspace is created (gathered from every rank)."""

    rank: int
    requested: Optional[str]  # the path it forces, or None
    max_tokens: int
    chunking: bool
    ok: bool  # its device is a GPU and the GPU backend loads
    why: str  # why not, when not ok
    host: str
    gpu: str  # its GPU's identity (_gpu_ids), "" when not ok


def _static_verdict(facts: List[_RankFacts]) -> Tuple[bool, str]:
    """Whether the gathered facts allow the fused path before any peer is probed, and why not.

    The first fact that rules it out wins: more than MAX_FUSED_RANKS ranks, several hosts, a rank
    without a usable GPU backend, two ranks on one GPU (told apart by UUID, so ranks that each
    see their own GPU as "cuda:0" are not taken for one).
    """
    world = len(facts)
    hosts = sorted({f.host for f in facts})
    if world > MAX_FUSED_RANKS:
        return False, f"the group has {world} ranks; the fused path supports at most {MAX_FUSED_RANKS}"
    if len(hosts) > 1:
        per_host = {h: [f.rank for f in facts if f.host == h] for h in hosts}
        return False, (f"ranks span {len(hosts)} hosts ({per_host}): multi-node TP goes through the "
                       "collective library")
    bad = [f for f in facts if not f.ok]
    if bad:
        return False, f"rank {bad[0].rank}: {bad[0].why}"
    by_gpu: Dict[str, List[int]] = {}
    for f in facts:
        by_gpu.setdefault(f.gpu, []).append(f.rank)
    shared = [ranks for ranks in by_gpu.values() if len(ranks) > 1]
    if shared:
        return False, f"several ranks share one GPU: ranks {shared[0]} use the same device"
    return True, ""


def _env_timeout_ms() -> int:
    value = os.environ.get("ALLREDUCE_RMS_TIMEOUT_MS", "").strip()
    if not value:
        return DEFAULT_TIMEOUT_MS
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"ALLREDUCE_RMS_TIMEOUT_MS must be an integer number of milliseconds, got {value!r}") from None


def _env_path() -> Optional[str]:
    value = os.environ.get("ALLREDUCE_RMS_PATH", "").strip().lower()
    if value and value not in PATHS:
        raise ValueError(f"ALLREDUCE_RMS_PATH must be one of {PATHS} or empty, got {value!r}")
    return value or None


class WorkspaceError(RuntimeError):
    """A workspace was used in a way it cannot serve (closed, inherited across fork, or a forced
    fused path that cannot work)."""


class Workspace:
    """Per-rank state of one tensor-parallel group for :func:`rms_norm` and :func:`qk_norm`.

    Args:
        group: the TP process group (default: the world group, or a single rank when
            torch.distributed is not initialized).
        max_tokens: tokens per Lamport slot. Larger calls are processed in chunks unless
            ``chunking=False``, in which case they raise ValueError.
        device: the GPU this rank uses (default: the current CUDA device, or CPU without GPUs).
        path: ``"fused"`` or ``"fallback"`` to force a path; default ``ALLREDUCE_RMS_PATH`` or
            automatic choice.
        timeout_ms: bound on every wait for a peer; on expiry the call's outputs are NaN and the
            next call (or :meth:`synchronize`) raises TimeoutError naming the op and the ranks.
        chunking: allow calls with more than ``max_tokens`` tokens.

    Attributes:
        path: ``"local"``, ``"fused"`` or ``"fallback"``.
        reason: why this path was chosen.
        rank, world_size, device, key (the name custom ops use to find this workspace).

    Creating one is collective over ``group``. Use as a context manager, or call :meth:`close`
    on every rank. :func:`workspace_for` returns one cached workspace per group.

    Raises:
        TypeError: an argument of the wrong kind: group not a ProcessGroup, max_tokens or
            timeout_ms not an int (a bool or float is not), path not a str, device not a
            torch.device/str/int.
        ValueError: a wrong value: max_tokens or timeout_ms < 1, an unknown path or device, a
            bad ``ALLREDUCE_RMS_PATH`` / ``ALLREDUCE_RMS_TIMEOUT_MS``, this process not in the
            group; and, on every rank alike, creation arguments that differ across ranks or
            forced paths that conflict (the message names the rank).
        WorkspaceError: the fused path was forced but cannot work (the message says why).
    """

    def __init__(
        self,
        group: Optional[dist.ProcessGroup] = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        device: Optional[torch.device | str | int] = None,
        *,
        path: Optional[str] = None,
        timeout_ms: Optional[int] = None,
        chunking: bool = True,
    ) -> None:
        global _counter
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise TypeError(f"max_tokens must be a positive int, got {type(max_tokens).__name__} {max_tokens!r}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if path is not None and not isinstance(path, str):
            raise TypeError(f"path must be one of {PATHS} or None, got {type(path).__name__} {path!r}")
        if path is not None and path not in PATHS:
            raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
        if timeout_ms is not None and (not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool)):
            raise TypeError(f"timeout_ms must be a positive int (milliseconds), got {type(timeout_ms).__name__} "
                            f"{timeout_ms!r}")
        if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)) \
                and group is not getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", None):
            # (dist.new_group hands non-members a placeholder, answered below with a ValueError)
            raise TypeError(f"group: expected a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
        requested = path if path is not None else _env_path()
        self.timeout_ms = timeout_ms if timeout_ms is not None else _env_timeout_ms()
        if self.timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, got {self.timeout_ms}")

        distributed = dist.is_available() and dist.is_initialized()
        if group is None and distributed:
            group = dist.group.WORLD
        self.group = group
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        if self.rank < 0 or self.world_size < 1:
            raise ValueError("group: this process is not a member of the group (dist.new_group returns a "
                             "placeholder on non-members); create the workspace only on the group's ranks")
        self.max_tokens = max_tokens
        self._slot_tokens = max_tokens + (max_tokens % 2)  # the kernel wants an even slot size
        self.chunking = bool(chunking)
        self.device = _resolve_device(device)
        self._native: Any = None
        self._closed = False
        self._pid = _pid
        self._hot_calls: Dict[tuple, Any] = {}  # validated call shapes (allreduce_rms._hot_path)
        with _lock:
            _counter += 1
            self.key = f"ws{_counter}"
            self._hot_id = _counter  # names it to the torch hot ops (allreduce_rms._hot_path); 0 is no workspace

        if self.world_size == 1:
            self.path, self.reason = "local", "one rank: no communication"
        else:
            self.path, self.reason = self._choose_path(requested)
            log.info("allreduce_rms: rank %d of %d uses the %s path (%s)", self.rank, self.world_size, self.path, self.reason)
        _registry[self.key] = self

    # ---------------------------------------------------------------- path choice
    # Every exchange below goes through fixed-size int64/uint8 tensor collectives
    # (allreduce_rms._collectives): object collectives pickle through numpy, which this package
    # does not depend on.
    def _agree(self, ok: bool, why: str, note: str = "") -> Tuple[bool, str, List[Tuple[int, str]]]:
        """Gather (ok, why, note) over the group: (True only if every rank is ok, the first
        failing rank's reason, the non-empty notes with their ranks)."""
        gathered = all_gather_fields([int(bool(ok))], [why, note], self.group, self.device)
        notes = [(r, texts[1]) for r, (_, texts) in enumerate(gathered) if texts[1]]
        for r, ((rank_ok,), (rank_why, _)) in enumerate(gathered):
            if not rank_ok:
                return False, f"rank {r}: {rank_why}", notes
        return True, "", notes

    def _choose_path(self, requested: Optional[str]) -> Tuple[str, str]:
        # One all-gather of everything each rank knows alone. Every decision below is taken from
        # the same gathered facts on every rank, so all ranks raise together or none does, and
        # all run the same collectives afterwards (a rank that decided alone could leave its
        # peers waiting in a collective it never joins).
        gpu_id = ""
        try:
            local_ok, local_why = (True, "") if requested == "fallback" else self._local_facts()
            if local_ok and requested != "fallback":
                gpu_id = _gpu_ids()[self.device.index]
        except Exception as exc:  # this rank must still reach the all-gather below
            local_ok, local_why = False, f"backend check failed: {exc}"
        facts = [_RankFacts(rank=r, requested=_PATH_NAMES[ints[0]], max_tokens=ints[1], chunking=bool(ints[2]),
                            ok=bool(ints[3]), host=texts[0], gpu=texts[1], why=texts[2])
                 for r, (ints, texts) in enumerate(all_gather_fields(
                     [_PATH_CODES[requested], self.max_tokens, int(self.chunking), int(local_ok)],
                     [_hostname(), gpu_id, local_why], self.group, self.device))]

        for name in ("max_tokens", "chunking"):
            for f in facts:
                if getattr(f, name) != getattr(facts[0], name):
                    raise ValueError(f"allreduce_rms: Workspace arguments differ across ranks: rank {f.rank} passed "
                                     f"{name}={getattr(f, name)!r}, rank 0 passed {name}={getattr(facts[0], name)!r}")
        requests = [f.requested for f in facts]
        if "fused" in requests and "fallback" in requests:
            raise ValueError(f"allreduce_rms: ranks force different paths (path= or ALLREDUCE_RMS_PATH): rank "
                             f"{requests.index('fused')} asks for 'fused', rank {requests.index('fallback')} for 'fallback'")
        if "fallback" in requests:
            forcing = [r for r, q in enumerate(requests) if q == "fallback"]
            who = "" if len(forcing) == self.world_size else f" by rank(s) {forcing}"
            return "fallback", f"forced{who} (path='fallback' or ALLREDUCE_RMS_PATH)"
        forced = "fused" in requests

        ok, why = _static_verdict(facts)
        # From here on each rank learns something only it can see; _agree shares it.
        notes: List[Tuple[int, str]] = []
        if ok:
            ok, why, notes = self._agree(*self._peer_access([f.gpu for f in facts]))
        if ok:
            ok, why, _ = self._agree(*self._open_native())
        if ok:
            ok, why, _ = self._agree(*self._functional_check())
        if ok:
            reason = "one P2P domain; functional peer check passed"
            if notes:
                reason += (f" (peer access not queried by rank(s) {[r for r, _ in notes]}: {notes[0][1]}; the IPC "
                           "open and the functional check decided)")
            return "fused", reason
        self._release_native()
        if forced:
            raise WorkspaceError(f"allreduce_rms: the fused path was forced but cannot work: {why}")
        return "fallback", why

    def _local_facts(self) -> Tuple[bool, str]:
        if self.device.type != "cuda":
            return False, f"device {self.device} is not a GPU"
        error = _native.load(_native.device_backend_name())
        if error is not None:
            return False, f"no GPU backend: {error}"
        return True, ""

    def _peer_access(self, gpus: List[str]) -> Tuple[bool, str, str]:
        """Whether this rank's GPU reports peer access to every other rank's GPU (one host).

        `gpus` holds every rank's GPU identity (:func:`_gpu_ids`). A peer GPU that this process
        cannot see (each rank started with its own CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES)
        cannot be asked about: torch.cuda.can_device_access_peer takes visible indices only.
        Such peers are skipped here (the third value says so), and the IPC open and the
        functional peer-write check that follow decide alone.
        """
        try:
            visible = {gpu: index for index, gpu in enumerate(_gpu_ids())}
            mine = self.device.index
            missing, unseen = [], []
            for rank, gpu in enumerate(gpus):
                if rank == self.rank:
                    continue
                if gpu not in visible:
                    unseen.append(rank)
                elif not torch.cuda.can_device_access_peer(mine, visible[gpu]):
                    missing.append(visible[gpu])
        except Exception as exc:  # this rank must still reach the agreement that follows
            return False, f"peer access query failed: {exc}", ""
        if missing:
            return False, f"no peer access from GPU {mine} to GPU(s) {missing}", ""
        note = f"the GPU(s) of rank(s) {unseen} are not visible to this process" if unseen else ""
        return True, "", note

    def _open_native(self) -> Tuple[bool, str]:
        handle = b""
        error = ""
        try:
            self._native = _native.front().NativeWorkspace(
                _native.dl_device_type(), self.device.index, self.rank, self.world_size, self._slot_tokens,
                self.timeout_ms * 1_000_000,
            )
            handle = bytes(self._native.ipc_handle())
        except Exception as exc:  # every rank must still reach the collective below
            self._release_native()
            handle, error = b"", f"workspace allocation failed: {exc}"
        # IPC handles are fixed-size byte strings (64 bytes for CUDA and HIP); an empty one says
        # "this rank could not allocate"
        handles = all_gather_bytes(handle, self.group, self.device)
        if error:
            return False, error
        if any(not h for h in handles):
            return False, "a peer could not allocate its workspace"
        try:
            self._native.open_peers(handles)
        except Exception as exc:
            return False, f"IPC open failed: {exc}"
        return True, ""

    def _functional_check(self) -> Tuple[bool, str]:
        # every rank draws a nonce and all use rank 0's: a shared value without a broadcast
        nonce = all_gather_ints([random.getrandbits(31) | 1], self.group, self.device)[0][0]
        drop = os.environ.get("ALLREDUCE_RMS_DEBUG_DROP_PEER_WRITES", "0") not in ("", "0")
        timeout_ms = min(PROBE_TIMEOUT_MS, self.timeout_ms)
        try:
            arrived = self._native.probe(nonce, timeout_ms * 1_000_000, drop)
        except Exception as exc:
            return False, f"functional peer check failed to run: {exc}"
        if not arrived:
            return False, f"functional peer check: peer writes did not arrive within {timeout_ms} ms"
        return True, ""

    def _release_native(self) -> None:
        if self._native is not None:
            self._native.close()
            self._native = None

    # ---------------------------------------------------------------- use
    def check_usable(self) -> None:
        """Raise WorkspaceError if this workspace is closed or was inherited across fork, and
        TimeoutError if it has recorded a peer timeout."""
        if self._pid != _pid:
            raise WorkspaceError(
                f"allreduce_rms: workspace {self.key} was created in process {self._pid} and used in process "
                f"{_pid} (a fork child): CUDA contexts and IPC mappings do not survive fork; create a new "
                "workspace in this process")
        if self._closed:
            raise WorkspaceError(f"allreduce_rms: workspace {self.key} used after close()")
        if self._native is not None:
            fault = self._native.fault()
            if fault["failed"]:
                raise TimeoutError(_timeout_message(fault, self.timeout_ms))

    def synchronize(self) -> None:
        """Wait for this rank's queued work and raise TimeoutError if a peer never wrote."""
        if self._pid != _pid:
            self.check_usable()  # raises before touching a CUDA context the fork child lacks
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.check_usable()

    def info(self) -> Dict[str, Any]:
        """Path, reason and (for the fused path) completed calls, capacity and open peer mappings."""
        data: Dict[str, Any] = {"path": self.path, "reason": self.reason, "rank": self.rank,
                                "world_size": self.world_size, "max_tokens": self.max_tokens}
        if self._native is not None:
            data.update(self._native.info())
        return data

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Free the buffers. Collective on the fused path: every rank's kernels must be done
        before any rank frees the memory its peers write into. Idempotent. In a fork child it
        only marks the inherited copy closed."""
        if self._closed:
            return
        _hot_path.forget(self._hot_id)  # before the buffers go: no hot op may launch on them
        if self._pid != _pid:
            self._native = None  # the parent's buffers: not ours to free, and not reachable here
        elif self._native is not None:
            torch.cuda.synchronize(self.device)
            dist.barrier(group=self.group)
            self._release_native()
        self._closed = True
        self._hot_calls.clear()  # their prepared launches hold the native workspace
        _registry.pop(self.key, None)
        for k, v in list(_cache.items()):
            if v is self:
                del _cache[k]

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # no collectives here: only free what is local
        try:
            if getattr(self, "_native", None) is not None and getattr(self, "_pid", None) == _pid:
                self._native.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"Workspace(path={self.path!r}, rank={self.rank}, world_size={self.world_size}, "
                f"device={self.device}, max_tokens={self.max_tokens}, closed={self._closed})")


def _resolve_device(device: Optional[torch.device | str | int]) -> torch.device:
    """The device a workspace serves: TypeError for a device of another kind, ValueError for a
    string or index torch does not accept."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise TypeError(f"device: expected a torch.device, a str, an int (a CUDA index) or None, got "
                        f"{type(device).__name__} {device!r}")
    try:
        dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    except RuntimeError as exc:  # an unknown device string, a negative index
        raise ValueError(f"device: {exc}") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _timeout_message(fault: Dict[str, Any], timeout_ms: int) -> str:
    return (f"allreduce_rms: {fault['op']} on rank {fault['rank']} timed out after {timeout_ms} ms waiting for "
            f"rank {fault['peer']} (call #{fault['call']} on this workspace, {fault['tokens']} tokens); "
            "the workspace is unusable: close it and create a new one")


def workspace_for(group: Optional[dist.ProcessGroup] = None, **kwargs: Any) -> Workspace:
    """The cached workspace of `group` (created, collectively, on first use).

    One workspace per (group, device, other arguments) until it is closed; ``None`` and the
    world group name the same group once torch.distributed is initialized. Raises
    WorkspaceError for a cached workspace inherited across fork.
    """
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    device = _resolve_device(kwargs.get("device"))
    key = (id(group) if group is not None else None, str(device), tuple(sorted((k, v) for k, v in kwargs.items() if k != "device")))
    ws = _cache.get(key)
    if ws is not None and ws._pid != _pid:
        ws.check_usable()  # raises: inherited from the parent across fork
    if ws is None or ws.closed:
        ws = Workspace(group, **kwargs)
        _cache[key] = ws
    return ws


def lookup(key: str) -> Workspace:
    """The live workspace named `key` (custom ops refer to workspaces by name)."""
    ws = _registry.get(key)
    if ws is None:
        raise WorkspaceError(f"allreduce_rms: no live workspace named {key!r} (closed or never created)")
    return ws
