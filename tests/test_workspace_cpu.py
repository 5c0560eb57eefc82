"""Workspace lifecycle on CPU: many create/close cycles leave nothing behind, context managers,
workspace_for caching, and fork (a child must not use its parent's workspace).
"""

from __future__ import annotations

import gc
import os
import signal
from typing import Any, Dict

import pytest
import torch

import allreduce_rms
from allreduce_rms import Workspace, WorkspaceError, workspace_for
from allreduce_rms import _native
from allreduce_rms import workspace as wsmod
from allreduce_rms.launch import run_ranks

W = 8
CYCLES = 100

# child exit codes of the fork checks (0 = every check passed)
FORK_CODES = {
    1: "rms_norm with the parent's workspace did not raise WorkspaceError",
    2: "qk_norm with the parent's workspace did not raise WorkspaceError",
    3: "check_usable() in the child did not raise WorkspaceError",
    4: "workspace_for() in the child did not raise WorkspaceError",
    5: "close() in the child raised",
    6: "the error message does not explain the fork",
    7: "an unexpected exception in the child",
    -14: "the child hung (killed by its 20 s alarm)",
}


def _fork_and_check(ws: Workspace) -> int:
    """Fork; in the child, use the parent's workspace `ws`; return the child's exit code."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no torch compute (OpenMP pools do not survive fork)
        code = 7
        signal.alarm(20)  # a child stuck in a collective dies (exit code -14) instead of hanging the test
        try:
            code = _child_checks(ws)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _expect_workspace_error(fn) -> str:
    try:
        fn()
    except WorkspaceError as exc:
        return str(exc)
    return ""


def _child_checks(ws: Workspace) -> int:
    x, w = torch.ones(2, W), torch.ones(W)
    message = _expect_workspace_error(lambda: allreduce_rms.rms_norm(x, w, 1e-6, ws))
    if not message:
        return 1
    if "fork" not in message or str(os.getpid()) not in message:
        return 6
    if not _expect_workspace_error(lambda: allreduce_rms.qk_norm(torch.ones(2, 3 * W), w, w, W, W, 1e-6, ws)):
        return 2
    if not _expect_workspace_error(ws.check_usable):
        return 3
    # the parent's cached workspace (a cache miss would create one: a collective the child must
    # not join, so the tests always hand in the cached one)
    if not _expect_workspace_error(lambda: workspace_for(ws.group)):
        return 4
    try:
        ws.close()
    except Exception:
        return 5
    return 0


def test_fork_child_cannot_use_parent_workspace():
    ws = workspace_for()  # one rank: the local path
    assert ws.path == "local"
    code = _fork_and_check(ws)
    assert code == 0, FORK_CODES.get(code, f"child exit code {code}")
    # the child's close() did not close the parent's workspace
    assert not ws.closed and workspace_for() is ws
    out = allreduce_rms.rms_norm(torch.ones(2, W), torch.ones(W), 0.0, ws)
    assert torch.equal(out, torch.ones(2, W))
    ws.close()


def test_one_rank_lifecycle():
    before = (len(wsmod._registry), len(wsmod._cache))
    for _ in range(CYCLES):
        with Workspace() as ws:
            assert wsmod.lookup(ws.key) is ws
        assert ws.closed
        with pytest.raises(WorkspaceError):
            wsmod.lookup(ws.key)
    dropped = Workspace()
    key = dropped.key
    del dropped
    gc.collect()
    assert key not in wsmod._registry, "a workspace nobody holds must leave the registry"
    assert (len(wsmod._registry), len(wsmod._cache)) == before


def _lifecycle_worker(rank: int, world: int) -> Dict[str, Any]:
    import torch.distributed as dist

    res: Dict[str, Any] = {}
    gc.collect()
    start = (len(wsmod._registry), len(wsmod._cache))
    x, w = torch.ones(3, W), torch.ones(W)
    ones = torch.ones(3, W)

    # many create/close cycles, each used once: nothing accumulates
    ok = True
    for i in range(CYCLES):
        ws = Workspace()
        ok &= ws.path == "fallback" and wsmod.lookup(ws.key) is ws
        ok &= bool(torch.allclose(allreduce_rms.rms_norm(x, w, 0.0, ws), ones))
        ws.close()
        ok &= ws.closed
    res["cycles_ok"] = ok
    gc.collect()
    res["after_cycles"] = (len(wsmod._registry), len(wsmod._cache))

    # the context manager closes on exit, also when the body raises
    with Workspace() as ws:
        res["ctx_open"] = not ws.closed
    res["ctx_closed"] = ws.closed
    try:
        with Workspace() as ws2:
            raise KeyError("body failed")
    except KeyError:
        pass
    res["ctx_closed_on_error"] = ws2.closed

    # workspace_for: one object per group (and arguments) until it is closed
    a = workspace_for()
    res["same"] = workspace_for() is a and workspace_for(None) is a
    res["other_args"] = workspace_for(max_tokens=128) is not a
    workspace_for(max_tokens=128).close()
    group = dist.new_group(list(range(world)))
    g = workspace_for(group)
    res["per_group"] = g is not a and g.group is group and workspace_for(group) is g
    ok = True
    for _ in range(CYCLES // 4):  # cached, closed, re-created
        b = workspace_for()
        ok &= bool(torch.allclose(allreduce_rms.rms_norm(x, w, 0.0, b), ones))
        b.close()
        ok &= workspace_for() is not b
    res["recreated_ok"] = ok
    workspace_for().close()
    g.close()
    gc.collect()
    res["after_all"] = (len(wsmod._registry), len(wsmod._cache))
    res["start"] = start

    # fork: rank 0's child must not use the group's workspace; the group is unharmed
    with workspace_for() as ws:
        assert workspace_for(dist.group.WORLD) is ws  # None and WORLD are one group
        res["fork_code"] = _fork_and_check(ws) if rank == 0 else 0
        res["after_fork"] = bool(torch.allclose(allreduce_rms.rms_norm(x, w, 0.0, ws), ones))
    return res


@pytest.fixture(scope="module")
def lifecycle():
    return run_ranks(_lifecycle_worker, 2, backend="gloo", timeout=120)


def test_create_close_many_leaves_nothing_behind(lifecycle):
    for res in lifecycle:
        assert res["cycles_ok"]
        assert res["after_cycles"] == res["start"], "registry/cache grew over create/close cycles"
        assert res["after_all"] == res["start"], "registry/cache grew through workspace_for"


def test_context_manager(lifecycle):
    for res in lifecycle:
        assert res["ctx_open"] and res["ctx_closed"] and res["ctx_closed_on_error"]


def test_workspace_for_caches_until_closed(lifecycle):
    for res in lifecycle:
        assert res["same"] and res["other_args"] and res["per_group"] and res["recreated_ok"]


def test_fork_child_in_a_group(lifecycle):
    code = lifecycle[0]["fork_code"]
    assert code == 0, FORK_CODES.get(code, f"child exit code {code}")
    assert all(res["after_fork"] for res in lifecycle)


def test_backend_resources_of_an_unloaded_backend_are_zero(monkeypatch):
    # a backend that was never loaded cannot hold anything, and asking must not load it
    monkeypatch.setattr(_native, "_load_errors", {})
    zeros = {"workspaces_live": 0, "ipc_mappings_open": 0, "device_bytes": 0, "loaded": False}
    assert _native.backend_resources() == zeros
    assert _native._load_errors == {}
    monkeypatch.setattr(_native, "_front", None)  # a checkout that was never built
    assert _native.backend_resources() == zeros


def test_backend_resources_of_the_loaded_backend():
    name = _native.device_backend_name()
    error = _native.load(name)
    if error is not None:
        pytest.skip(f"the {name} backend does not load here: {error}")
    res = _native.backend_resources()
    assert res["loaded"] is True and set(res) == {"workspaces_live", "ipc_mappings_open", "device_bytes", "loaded"}
    assert all(isinstance(v, int) and v >= 0 for k, v in res.items() if k != "loaded")
    if not torch.cuda.is_available():  # without a GPU no workspace can have been created
        assert res == {"workspaces_live": 0, "ipc_mappings_open": 0, "device_bytes": 0, "loaded": True}
    # a creation refused on its arguments allocates nothing and counts nothing
    with pytest.raises(ValueError, match="nranks"):
        _native.front().NativeWorkspace(_native.dl_device_type(), 0, 0, 0, 2, 10**9)
    assert _native.backend_resources() == res
    # the front module refuses a backend that is not loaded, naming it
    other = {"cuda": "hip", "hip": "cuda"}[name]
    if _native.load(other) is not None:
        with pytest.raises(RuntimeError, match=f"no {other.upper()} backend loaded"):
            _native.front().backend_resources(_native._DL_CODES[other])
