"""The tensor collectives that replace object collectives (allreduce_rms._collectives), and the
promise behind them: the library runs without numpy, which it does not declare.
"""

from __future__ import annotations

import sys
import textwrap
from typing import Any, Dict

import pytest
import torch
import torch.distributed as dist

from allreduce_rms import _collectives as coll

from allreduce_rms.launch import run_ranks
from distributed import run_script_ranks


def _worker(rank: int, world: int) -> Dict[str, Any]:
    res: Dict[str, Any] = {}
    res["ints"] = coll.all_gather_ints([rank, -rank, 2**40 + rank])
    # lengths differ across ranks, one rank sends nothing, bytes 0 and 255 survive
    res["bytes"] = coll.all_gather_bytes(bytes(range(256))[: 64 * rank] + b"\0\xff" * rank)
    res["empty"] = coll.all_gather_bytes(b"")
    res["strings"] = coll.all_gather_strings(["", "héllo, 世界"][rank % 2] + "!" * rank)
    res["fields"] = coll.all_gather_fields([rank, 7], [f"host{rank}", "", "a\0b"])
    res["no_texts"] = coll.all_gather_fields([rank], [])
    sub = dist.new_group([1, 2]) if world > 2 else None
    if sub is not None and rank in (1, 2):  # group ranks, not global ranks
        res["subgroup"] = coll.all_gather_strings(f"global {rank}", sub)
    return res


@pytest.fixture(scope="module")
def gathered():
    return run_ranks(_worker, 3, backend="gloo", timeout=120)


def test_ints(gathered):
    for res in gathered:
        assert res["ints"] == [[r, -r, 2**40 + r] for r in range(3)]


def test_bytes_of_different_lengths(gathered):
    expected = [bytes(range(256))[: 64 * r] + b"\0\xff" * r for r in range(3)]
    for res in gathered:
        assert res["bytes"] == expected
        assert res["empty"] == [b"", b"", b""]


def test_strings(gathered):
    for res in gathered:
        assert res["strings"] == ["", "héllo, 世界!", "!!"]


def test_fields(gathered):
    for res in gathered:
        assert res["fields"] == [([r, 7], [f"host{r}", "", "a\ufffdb"]) for r in range(3)]
        assert res["no_texts"] == [([r], []) for r in range(3)]


def test_subgroup_ranks(gathered):
    assert gathered[1]["subgroup"] == gathered[2]["subgroup"] == ["global 1", "global 2"]


@pytest.mark.parametrize("backend, preferred, expected", [
    ("gloo", "cuda:1", "cpu"),
    ("cpu:gloo,cuda:nccl", "cuda:1", "cpu"),
    ("nccl", "cuda:1", "cuda:1"),
    ("nccl", 3, "cuda:3"),
    ("mpi", None, "cpu"),
])
def test_tensor_device_follows_the_backend(monkeypatch, backend, preferred, expected):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    assert coll.tensor_device(None, preferred) == torch.device(expected)


def test_tensor_device_of_an_nccl_group_without_a_cuda_preference(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    assert coll.tensor_device(None, "cpu") == torch.device("cuda", 5)


# A rank that cannot import numpy (a meta-path finder answers as if it were not installed) creates a 2-rank workspace,
# normalizes, runs debug mode's call check and hits an argument disagreement. Each rank is a plain
# subprocess (env:// rendezvous), so the block is in place before anything imports torch.
_NO_NUMPY_RANK = textwrap.dedent("""
    import sys

    class BlockNumpy:
        def find_spec(self, name, path=None, target=None):
            if name == "numpy" or name.startswith("numpy."):
                raise ModuleNotFoundError("No module named 'numpy' (blocked in this test)", name=name)
            return None

    sys.meta_path.insert(0, BlockNumpy())
    import warnings
    warnings.simplefilter("ignore")  # torch warns once that it has no numpy

    import torch
    import torch.distributed as dist
    import allreduce_rms
    from allreduce_rms.fallback import rms_norm_reference

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(5)
    shards = [torch.randn(6, 32, generator=gen) for _ in range(world)]
    weights = [torch.randn(32, generator=gen) for _ in range(world)]
    with allreduce_rms.Workspace() as ws:
        assert ws.path == "fallback", ws.reason
        out = allreduce_rms.rms_norm(shards[rank], weights[rank], 1e-6, ws)
        ref = rms_norm_reference(shards, weights, 1e-6)[rank]
        err = float((out.double() - ref).norm() / ref.norm())
        assert err < 1e-5, err
        allreduce_rms.ops.set_debug(True)
        try:
            allreduce_rms.rms_norm(shards[rank][: 5 + rank], weights[rank], 1e-6, ws)
            raise AssertionError("debug mode did not see the different token counts")
        except RuntimeError as exc:
            assert "rank 1" in str(exc), exc
        allreduce_rms.ops.set_debug(None)
    try:
        allreduce_rms.Workspace(max_tokens=64 + rank)
        raise AssertionError("different max_tokens were accepted")
    except ValueError as exc:
        assert "max_tokens" in str(exc)
    assert "numpy" not in sys.modules
    print(f"rank {rank}: ok without numpy, relative error {err:.1e}", flush=True)
    # Leave as run_ranks does (allreduce_rms.launch): torch's gloo process group can abort a rank
    # in interpreter teardown ("terminate called without an active exception", seen about 1 run
    # in 10 to 20 after everything above passed); a barrier, the group's destruction and an
    # immediate exit avoid that teardown.
    dist.barrier()
    dist.destroy_process_group()
    import os
    os._exit(0)
""")


def test_runs_without_numpy(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_NO_NUMPY_RANK)
    for r, (code, out) in enumerate(run_script_ranks(script, 2, timeout=120)):
        assert code == 0, f"rank {r} failed without numpy:\n{out}"
        assert f"rank {r}: ok without numpy" in out, out
