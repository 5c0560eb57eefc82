"""The workspace's path choice on CPU, with the GPU facts monkeypatched: GPUs are told apart by
UUID (ranks that each see their own GPU as "cuda:0" are not "several ranks share one GPU"), and
peers this process cannot see are not asked about peer access (the IPC open and the functional
check decide instead).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List

import pytest
import torch

from allreduce_rms import Workspace, WorkspaceError
from allreduce_rms import workspace as wsmod
from allreduce_rms.workspace import _RankFacts, _static_verdict

from allreduce_rms.launch import run_ranks


def facts(gpus: List[str], hosts: List[str] = None, ok: List[bool] = None) -> List[_RankFacts]:
    n = len(gpus)
    hosts = hosts or ["node0"] * n
    ok = ok or [True] * n
    return [_RankFacts(rank=r, requested=None, max_tokens=64, chunking=True, ok=ok[r],
                       why="" if ok[r] else "no GPU backend: gone", host=hosts[r], gpu=gpus[r]) for r in range(n)]


# ---------------------------------------------------------------- the gathered facts alone
def test_distinct_uuids_are_distinct_gpus():
    assert _static_verdict(facts(["uuid:GPU-a", "uuid:GPU-b"])) == (True, "")


def test_one_uuid_twice_is_a_shared_gpu():
    ok, why = _static_verdict(facts(["uuid:GPU-a", "uuid:GPU-b", "uuid:GPU-a"]))
    assert not ok and why.startswith("several ranks share one GPU") and "[0, 2]" in why


def test_the_first_ruling_fact_wins():
    ok, why = _static_verdict(facts(["uuid:a", "uuid:a"], hosts=["n0", "n1"]))
    assert not ok and "ranks span 2 hosts" in why and "{'n0': [0], 'n1': [1]}" in why
    ok, why = _static_verdict(facts(["uuid:a", ""], ok=[True, False]))
    assert not ok and why == "rank 1: no GPU backend: gone"
    ok, why = _static_verdict(facts([f"uuid:{i}" for i in range(9)]))
    assert not ok and "9 ranks" in why


# ---------------------------------------------------------------- identities of visible GPUs
def _props(uuid: Any = None, pci: Any = None) -> SimpleNamespace:
    p = SimpleNamespace()
    if uuid is not None:
        p.uuid = uuid
    if pci is not None:
        p.pci_domain_id, p.pci_bus_id, p.pci_device_id = pci
    return p


def test_gpu_ids_prefer_the_uuid_then_the_pci_address(monkeypatch):
    props = [_props(uuid="58f0dc4b-1f2e-4c1a-9d7e-0123456789ab"),
             _props(uuid="00000000-0000-0000-0000-000000000000", pci=(0, 0x1b, 0)),
             _props(pci=(1, 0x2c, 0)), _props()]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    assert wsmod._gpu_ids() == ["uuid:58f0dc4b-1f2e-4c1a-9d7e-0123456789ab", "pci:0:27:0", "pci:1:44:0", "index:3"]


# ---------------------------------------------------------------- peer access
def _ws_for_peer_access(rank: int) -> Any:
    ws = object.__new__(Workspace)  # only the attributes _peer_access reads
    ws.rank, ws.device = rank, torch.device("cuda", 0)
    return ws


def test_isolated_visibility_skips_the_peer_query(monkeypatch):
    # each rank sees only its own GPU as cuda:0 (CUDA_VISIBLE_DEVICES=rank)
    monkeypatch.setattr(wsmod, "_gpu_ids", lambda: ["uuid:GPU-b"])

    def never(*args: Any) -> bool:
        raise AssertionError("can_device_access_peer asked about a GPU this process cannot see")

    monkeypatch.setattr(torch.cuda, "can_device_access_peer", never)
    ok, why, note = _ws_for_peer_access(1)._peer_access(["uuid:GPU-a", "uuid:GPU-b"])
    assert (ok, why) == (True, "") and "rank(s) [0]" in note and "not visible" in note


def test_visible_peers_are_asked_by_their_local_index(monkeypatch):
    monkeypatch.setattr(wsmod, "_gpu_ids", lambda: ["uuid:GPU-a", "uuid:GPU-b", "uuid:GPU-c"])
    asked: List[tuple] = []

    def access(mine: int, peer: int) -> bool:
        asked.append((mine, peer))
        return peer != 2

    monkeypatch.setattr(torch.cuda, "can_device_access_peer", access)
    ws = _ws_for_peer_access(0)
    ws.device = torch.device("cuda", 1)  # rank 0 runs on visible GPU 1 (GPU-b)
    ok, why, note = ws._peer_access(["uuid:GPU-b", "uuid:GPU-a", "uuid:GPU-c"])
    assert asked == [(1, 0), (1, 2)]
    assert not ok and why == "no peer access from GPU 1 to GPU(s) [2]" and note == ""


# ---------------------------------------------------------------- a 2-rank group, faked GPUs
def _fake_gpu_worker(rank: int, world: int, case: str) -> Dict[str, Any]:
    """Each rank claims "cuda:0" with a backend loaded; `case` sets what the GPUs are."""
    gpus = {"isolated": [f"uuid:GPU-{rank}"], "shared": ["uuid:GPU-0"]}[case]
    wsmod._gpu_ids = lambda: gpus
    Workspace._local_facts = lambda self: (True, "")
    Workspace._open_native = lambda self: (False, "IPC open failed: (faked) invalid device")
    res = {}
    with Workspace(device="cuda:0") as ws:
        res["auto"] = (ws.path, ws.reason)
    try:
        Workspace(device="cuda:0", path="fused")
        res["forced"] = ("", "")
    except WorkspaceError as exc:
        res["forced"] = ("WorkspaceError", str(exc))
    # the whole way through: IPC open and the functional check pass (faked)
    Workspace._open_native = lambda self: (True, "")
    Workspace._functional_check = lambda self: (True, "")
    ws = Workspace(device="cuda:0")
    res["passing"] = (ws.path, ws.reason)
    ws._closed = True  # nothing native to free; close() would synchronize a GPU this host lacks
    return res


@pytest.fixture(scope="module")
def isolated():
    return run_ranks(_fake_gpu_worker, 2, "isolated", backend="gloo", timeout=120)


def test_isolated_ranks_get_a_true_reason(isolated):
    for res in isolated:
        path, reason = res["auto"]
        assert path == "fallback"
        assert "share" not in reason and reason == "rank 0: IPC open failed: (faked) invalid device", reason
        kind, message = res["forced"]
        assert kind == "WorkspaceError" and "IPC open failed" in message


def test_isolated_ranks_take_the_fused_path_when_the_checks_pass(isolated):
    for res in isolated:
        path, reason = res["passing"]
        assert path == "fused", reason
        assert reason.startswith("one P2P domain; functional peer check passed")
        assert "peer access not queried by rank(s) [0, 1]" in reason and "not visible" in reason


def test_one_gpu_for_two_ranks_is_still_caught():
    for res in run_ranks(_fake_gpu_worker, 2, "shared", backend="gloo", timeout=120):
        path, reason = res["auto"]
        assert path == "fallback" and reason.startswith("several ranks share one GPU: ranks [0, 1]"), reason
