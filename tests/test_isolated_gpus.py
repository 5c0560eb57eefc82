"""Ranks that each see only their own GPU (CUDA_VISIBLE_DEVICES=rank, every rank on "cuda:0"):
the workspace must tell the GPUs apart by UUID and give a true reason, never "several ranks share
one GPU". Also exercises the tensor collectives of the path choice and of debug mode over NCCL
(GPU tensors). Needs 2 GPUs; each rank is its own process with an env:// rendezvous, since the
shared harness pins rank r to cuda:r.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from distributed import run_script_ranks

_RANK = textwrap.dedent("""
    import torch
    import torch.distributed as dist
    import allreduce_rms
    from allreduce_rms.fallback import rms_norm_reference

    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert torch.cuda.device_count() == 1
    gen = torch.Generator().manual_seed(11)
    shards = [torch.randn(33, 256, generator=gen) for _ in range(world)]
    weights = [torch.randn(256, generator=gen) for _ in range(world)]
    ref = rms_norm_reference(shards, weights, 1e-6)[rank]
    with allreduce_rms.Workspace() as ws:
        print(f"rank {rank}: path={ws.path} reason={ws.reason}", flush=True)
        out = allreduce_rms.rms_norm(shards[rank].cuda(), weights[rank].cuda(), 1e-6, ws)
        torch.cuda.synchronize()
        err = float((out.double().cpu() - ref).norm() / ref.norm())
        assert err < 1e-5, err
        allreduce_rms.ops.set_debug(True)  # one int64 all_gather on GPU tensors per call
        allreduce_rms.rms_norm(shards[rank].cuda(), weights[rank].cuda(), 1e-6, ws)
        try:
            allreduce_rms.rms_norm(shards[rank][: 30 + rank].cuda(), weights[rank].cuda(), 1e-6, ws)
            raise AssertionError("debug mode missed different token counts")
        except RuntimeError as exc:
            assert "rank 1" in str(exc), exc
        allreduce_rms.ops.set_debug(None)
        torch.cuda.synchronize()
    dist.destroy_process_group()
    print(f"rank {rank}: ok, relative error {err:.1e}", flush=True)
""")


@pytest.mark.multigpu
def test_isolated_visibility_gives_a_true_reason(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    ranks = run_script_ranks(script, 2, lambda r: {"CUDA_VISIBLE_DEVICES": str(r)}, timeout=180)
    for r, (code, out) in enumerate(ranks):
        assert code == 0, f"rank {r}:\n{out}"
        line = next(l for l in out.splitlines() if l.startswith(f"rank {r}: path="))
        assert "share one GPU" not in line, line
        if "path=fused" in line:
            # the peers are invisible to each other: no peer-access query, the checks decided
            assert "peer access not queried" in line, line
        else:  # a fallback must name what really failed: the IPC open or the functional check
            assert "IPC" in line or "functional peer check" in line or "allocat" in line, line
        assert f"rank {r}: ok" in out, out
