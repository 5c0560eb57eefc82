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

Environment: ``ALLREDUCE_RMS_PATH=fused|fallback`` forces a path (fused still fails loudly if it
cannot work); ``ALLREDUCE_RMS_TIMEOUT_MS`` bounds every spin (default 10000);
``ALLREDUCE_RMS_DEBUG_DROP_PEER_WRITES=1`` makes the functional check drop its peer writes, to
show that a link which reports P2P but loses writes ends on the fallback instead of hanging.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _native

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


def _hostname() -> str:
    """This process's host name (a seam for tests that fake several hosts)."""
    return socket.gethostname()


def _env_timeout_ms() -> int:
    value = os.environ.get("ALLREDUCE_RMS_TIMEOUT_MS")
    return int(value) if value else DEFAULT_TIMEOUT_MS


class WorkspaceError(RuntimeError):
    """A workspace was used in a way it cannot serve (closed, other group, other device)."""


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
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        requested = path if path is not None else os.environ.get("ALLREDUCE_RMS_PATH") or None
        if requested is not None and requested not in PATHS:
            raise ValueError(f"path must be one of {PATHS} or None, got {requested!r}")
        self.timeout_ms = int(timeout_ms) if timeout_ms is not None else _env_timeout_ms()
        if self.timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, got {self.timeout_ms}")

        distributed = dist.is_available() and dist.is_initialized()
        if group is None and distributed:
            group = dist.group.WORLD
        self.group = group
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.max_tokens = max_tokens + (max_tokens % 2)  # the kernel wants an even slot size
        self.chunking = chunking
        self.device = _resolve_device(device)
        self._native: Any = None
        self._closed = False
        with _lock:
            _counter += 1
            self.key = f"ws{_counter}"
        if self.world_size > MAX_FUSED_RANKS:
            if requested == "fused":
                raise ValueError(f"the fused path supports at most 8 ranks, the group has {self.world_size}")
            requested = "fallback"

        if self.world_size == 1:
            self.path, self.reason = "local", "one rank: no communication"
        else:
            self.path, self.reason = self._choose_path(requested)
            log.info("allreduce_rms: rank %d of %d uses the %s path (%s)", self.rank, self.world_size, self.path, self.reason)
        _registry[self.key] = self

    # ---------------------------------------------------------------- path choice
    def _agree(self, ok: bool, why: str) -> Tuple[bool, str]:
        """All-gather (ok, why) over the group; True only if every rank is ok."""
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (bool(ok), why), group=self.group)
        for r, (rank_ok, rank_why) in enumerate(gathered):
            if not rank_ok:
                return False, f"rank {r}: {rank_why}"
        return True, ""

    def _choose_path(self, requested: Optional[str]) -> Tuple[str, str]:
        if requested == "fallback":
            return "fallback", "forced (path='fallback' or ALLREDUCE_RMS_PATH)"
        ok, why = self._local_facts()
        ok, why = self._agree(ok, why)
        if ok:
            ok, why = self._same_host()
        if ok:
            ok, why = self._agree(*self._open_native())
        if ok:
            ok, why = self._agree(*self._functional_check())
        if ok:
            return "fused", "one P2P domain; functional peer check passed"
        self._release_native()
        if requested == "fused":
            raise RuntimeError(f"allreduce_rms: the fused path was forced but cannot work: {why}")
        return "fallback", why

    def _local_facts(self) -> Tuple[bool, str]:
        if self.device.type != "cuda":
            return False, f"device {self.device} is not a GPU"
        error = _native.load(_native.device_backend_name())
        if error is not None:
            return False, f"no GPU backend: {error}"
        return True, ""

    def _same_host(self) -> Tuple[bool, str]:
        facts: List[Any] = [None] * self.world_size
        dist.all_gather_object(facts, (_hostname(), self.device.index), group=self.group)
        hosts = {h for h, _ in facts}
        if len(hosts) > 1:
            return False, f"ranks span {len(hosts)} hosts: multi-node TP goes through the collective library"
        devices = [d for _, d in facts]
        if len(set(devices)) != len(devices):
            return False, "several ranks share one GPU"
        missing = [p for p in devices if p != self.device.index and not torch.cuda.can_device_access_peer(self.device.index, p)]
        why = f"no peer access from GPU {self.device.index} to GPU(s) {missing}" if missing else ""
        return self._agree(not missing, why)

    def _open_native(self) -> Tuple[bool, str]:
        handle = b""
        try:
            self._native = _native.front().NativeWorkspace(
                _native.dl_device_type(), self.device.index, self.rank, self.world_size, self.max_tokens,
                self.timeout_ms * 1_000_000,
            )
            handle = self._native.ipc_handle()
        except Exception as exc:  # every rank must still reach the collective below
            self._release_native()
            handles: List[Any] = [None] * self.world_size
            dist.all_gather_object(handles, b"", group=self.group)
            return False, f"workspace allocation failed: {exc}"
        handles = [None] * self.world_size
        dist.all_gather_object(handles, handle, group=self.group)
        if any(not h for h in handles):
            return False, "a peer could not allocate its workspace"
        try:
            self._native.open_peers(handles)
        except Exception as exc:
            return False, f"IPC open failed: {exc}"
        return True, ""

    def _functional_check(self) -> Tuple[bool, str]:
        nonce_box = [random.getrandbits(31) | 1]
        dist.broadcast_object_list(nonce_box, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                                   group=self.group)
        drop = os.environ.get("ALLREDUCE_RMS_DEBUG_DROP_PEER_WRITES", "0") not in ("", "0")
        timeout_ms = min(PROBE_TIMEOUT_MS, self.timeout_ms)
        try:
            arrived = self._native.probe(nonce_box[0], timeout_ms * 1_000_000, drop)
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
        """Raise if this workspace is closed or has recorded a peer timeout."""
        if self._closed:
            raise WorkspaceError("allreduce_rms: workspace used after close()")
        if self._native is not None:
            fault = self._native.fault()
            if fault["failed"]:
                raise TimeoutError(_timeout_message(fault, self.timeout_ms))

    def synchronize(self) -> None:
        """Wait for this rank's queued work and raise TimeoutError if a peer never wrote."""
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
        before any rank frees the memory its peers write into."""
        if self._closed:
            return
        if self._native is not None:
            torch.cuda.synchronize(self.device)
            dist.barrier(group=self.group)
            self._release_native()
        self._closed = True
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
            if getattr(self, "_native", None) is not None:
                self._native.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"Workspace(path={self.path!r}, rank={self.rank}, world_size={self.world_size}, "
                f"device={self.device}, max_tokens={self.max_tokens}, closed={self._closed})")


def _resolve_device(device: Optional[torch.device | str | int]) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _timeout_message(fault: Dict[str, Any], timeout_ms: int) -> str:
    return (f"allreduce_rms: {fault['op']} on rank {fault['rank']} timed out after {timeout_ms} ms waiting for "
            f"rank {fault['peer']} (call #{fault['call']} on this workspace, {fault['tokens']} tokens); "
            "the workspace is unusable: close it and create a new one")


def workspace_for(group: Optional[dist.ProcessGroup] = None, **kwargs: Any) -> Workspace:
    """The cached workspace of `group` (created, collectively, on first use)."""
    device = _resolve_device(kwargs.get("device"))
    key = (id(group) if group is not None else None, str(device), tuple(sorted((k, v) for k, v in kwargs.items() if k != "device")))
    ws = _cache.get(key)
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
