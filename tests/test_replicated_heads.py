"""Replicated KV heads: TPQKNorm.from_full_weight(..., num_kv_heads=...) with fewer KV heads than ranks.

vLLM and SGLang put each KV head on world/num_kv_heads consecutive ranks when the model has fewer
KV heads than TP ranks (MiniMax-M2's 8 at TP 16). The op is not told: each of the R copies of a
head adds its sum of squares, and the width it divides by is R times the real one. These tests
check that claim against a float64 reference computed on the full, unreplicated q and k rows, on
CPU with gloo: 4 ranks with 2 KV heads, and 2 ranks with 1 KV head.

The shards have different scales (rank r's q columns times r + 1, KV head h times 4**h), so a
wrong statistic (no all-reduce, or the width not multiplied by R) is off by tens of percent.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch

import allreduce_rms
from allreduce_rms import TPQKNorm
from allreduce_rms.launch import run_ranks
from numerics import TOLERANCE, rel_err, shard_scale

EPS = 1e-6
TOKENS = 7
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def head_scale(head: int) -> float:
    """Scale of KV head h's k columns: a head-local or a wrongly weighted statistic fails widely."""
    return 4.0 ** head


def full_inputs(dtype: torch.dtype, world: int, num_heads: int, num_kv_heads: int,
                head_dim: int) -> Dict[str, torch.Tensor]:
    """The full (unsharded, unreplicated) q, k, v rows and weights, the same on every rank."""
    g = torch.Generator().manual_seed(num_heads * 100 + num_kv_heads * 10 + world)
    q = torch.randn(TOKENS, num_heads * head_dim, generator=g, dtype=torch.float64)
    q *= torch.tensor([shard_scale(c // (num_heads * head_dim // world)) for c in range(q.shape[1])],
                      dtype=torch.float64)
    k = torch.randn(TOKENS, num_kv_heads * head_dim, generator=g, dtype=torch.float64)
    k *= torch.tensor([head_scale(c // head_dim) for c in range(k.shape[1])], dtype=torch.float64)
    return {
        "q": q.to(dtype),
        "k": k.to(dtype),
        "v": torch.randn(TOKENS, num_kv_heads * head_dim, generator=g).to(dtype),
        "q_weight": (1 + 0.1 * torch.randn(num_heads * head_dim, generator=g)).to(dtype),
        "k_weight": (1 + 0.1 * torch.randn(num_kv_heads * head_dim, generator=g)).to(dtype),
    }


def norm64(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Float64 RMSNorm over the whole (full, unreplicated) row."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + EPS) * weight.double()


def rank_layout(full: Dict[str, torch.Tensor], rank: int, world: int, num_kv_heads: int,
                head_dim: int) -> Tuple[torch.Tensor, slice, slice]:
    """This rank's qkv as vLLM/SGLang lay it out, and its q and k columns in the full rows."""
    q_width = full["q"].shape[1] // world
    q_cols = slice(rank * q_width, (rank + 1) * q_width)
    head = rank // (world // num_kv_heads)
    k_cols = slice(head * head_dim, (head + 1) * head_dim)
    qkv = torch.cat([full["q"][:, q_cols], full["k"][:, k_cols], full["v"][:, k_cols]], dim=-1).contiguous()
    return qkv, q_cols, k_cols


def _replicated_worker(rank: int, world: int, num_heads: int, num_kv_heads: int, head_dim: int,
                       path: str = "fallback") -> Dict[str, object]:
    """Per dtype: relative errors against the float64 reference of the full rows, and k's values
    (to compare the replicas of one head), plus what a user who forgets num_kv_heads sees.
    On CPU (gloo) the path is "fallback"; on GPUs rank r uses cuda:r and the path ALLREDUCE_RMS_PATH."""
    device = torch.device("cuda", rank) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    ws = allreduce_rms.Workspace(device=device)
    assert ws.path == path and ws.world_size == world, (ws.path, ws.reason)
    errors: Dict[str, float] = {}
    k_values: Dict[str, List[List[float]]] = {}
    for dtype in DTYPES:
        full = {n: t.to(device) for n, t in full_inputs(dtype, world, num_heads, num_kv_heads, head_dim).items()}
        qk = TPQKNorm.from_full_weight(full["q_weight"], full["k_weight"], rank, world, ws, eps=EPS,
                                       num_kv_heads=num_kv_heads, head_dim=head_dim)
        assert (qk.q_size, qk.kv_size) == (num_heads * head_dim // world, head_dim), (qk.q_size, qk.kv_size)
        assert (qk.num_kv_heads, qk.head_dim) == (num_kv_heads, head_dim)
        assert f"num_kv_heads={num_kv_heads}" in repr(qk)
        qkv, q_cols, k_cols = rank_layout(full, rank, world, num_kv_heads, head_dim)
        torch.testing.assert_close(qk.k_weight.data, full["k_weight"][k_cols], rtol=0, atol=0)
        q, k = qk(qkv)
        q_ref = norm64(full["q"], full["q_weight"])[:, q_cols]
        k_ref = norm64(full["k"], full["k_weight"])[:, k_cols]
        name = str(dtype).replace("torch.", "")
        errors[f"{name} q"] = rel_err(q, q_ref)
        errors[f"{name} k"] = rel_err(k, k_ref)
        k_values[name] = k.float().tolist()
        v_before = qkv[:, -head_dim:].clone()
        q_in, k_in = qk(qkv, inplace=True)  # the in-place path gives the same bits, v untouched
        assert q_in.data_ptr() == qkv.data_ptr()
        torch.testing.assert_close(q_in, q, rtol=0, atol=0)
        torch.testing.assert_close(k_in, k, rtol=0, atol=0)
        torch.testing.assert_close(qkv[:, -head_dim:], v_before, rtol=0, atol=0)
    # A new user's mistake: the same qkv, but the module built without num_kv_heads (k split evenly).
    full = {n: t.to(device) for n, t in full_inputs(torch.float32, world, num_heads, num_kv_heads, head_dim).items()}
    plain = TPQKNorm.from_full_weight(full["q_weight"], full["k_weight"], rank, world, ws, eps=EPS)
    qkv, _, _ = rank_layout(full, rank, world, num_kv_heads, head_dim)
    try:
        plain(qkv)
        forgot = ""
    except ValueError as exc:
        forgot = str(exc)
    return {"errors": errors, "k": k_values, "forgot": forgot}


@pytest.mark.parametrize("world,num_heads,num_kv_heads,head_dim", [(4, 8, 2, 8), (2, 4, 1, 16)],
                         ids=["4ranks-2kvheads", "2ranks-1kvhead"])
def test_replicated_kv_heads_match_float64_reference_of_full_rows(world: int, num_heads: int, num_kv_heads: int,
                                                                  head_dim: int) -> None:
    check_replicated(run_ranks(_replicated_worker, world, num_heads, num_kv_heads, head_dim), world, num_kv_heads)


@pytest.mark.multigpu
@pytest.mark.parametrize("path", ["fused", "fallback"])
def test_replicated_kv_heads_on_two_gpus(path: str) -> None:
    """2 GPUs, 1 KV head of 128 on both ranks (MiniMax-M2's head width), both paths."""
    results = run_ranks(_replicated_worker, 2, 4, 1, 128, path, backend="nccl", env={"ALLREDUCE_RMS_PATH": path})
    check_replicated(results, 2, 1)


def check_replicated(results: List[Dict[str, object]], world: int, num_kv_heads: int) -> None:
    """Every rank within tolerance, replicas of a head bit-identical, the forgotten-argument hint."""
    failures = []
    for rank, result in enumerate(results):
        for key, err in result["errors"].items():
            dtype = getattr(torch, key.split()[0])
            if not err <= TOLERANCE[dtype]:
                failures.append(f"rank {rank} {key}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}")
    assert not failures, failures
    replicas = world // num_kv_heads
    for rank in range(world):  # the replicas of one head hold the same k, bit for bit
        first = rank - rank % replicas
        assert results[rank]["k"] == results[first]["k"], f"rank {rank} differs from rank {first}"
    for rank, result in enumerate(results):
        forgot = result["forgot"]
        assert forgot.startswith("qkv: last dimension is"), (rank, forgot)
        assert "num_kv_heads=" in forgot and f"{replicas} times wider" in forgot, (rank, forgot)


def _wrong_statistic_fails_worker(rank: int, world: int) -> Dict[str, float]:
    """The test's own sensitivity: k normalized by a wrong statistic misses the reference widely."""
    num_heads, num_kv_heads, head_dim = 8, 2, 8
    full = full_inputs(torch.float32, world, num_heads, num_kv_heads, head_dim)
    _, _, k_cols = rank_layout(full, rank, world, num_kv_heads, head_dim)
    k_ref = norm64(full["k"], full["k_weight"])[:, k_cols]
    k, w = full["k"][:, k_cols].double(), full["k_weight"][k_cols].double()
    local = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + EPS) * w  # no all-reduce
    total = k.pow(2).sum(-1, keepdim=True)
    torch.distributed.all_reduce(total)
    unscaled = k * torch.rsqrt(total / (num_kv_heads * head_dim) + EPS) * w  # R copies, real width
    return {"local": rel_err(local, k_ref), "unscaled": rel_err(unscaled, k_ref)}


def test_a_wrong_statistic_would_fail_by_a_wide_margin() -> None:
    for result in run_ranks(_wrong_statistic_fails_worker, 4):
        assert result["local"] > 0.1 and result["unscaled"] > 0.1, result


# ------------------------------------------------------------------------- errors, one process
# Everything below raises before the group is consulted, so rank 0 of 4 works without processes.
def test_num_kv_heads_and_head_dim_of_the_wrong_kind_raise_type_error() -> None:
    q, k = torch.ones(64), torch.ones(16)
    for bad in ("2", 2.0, True):
        with pytest.raises(TypeError, match="num_kv_heads must be a positive int"):
            TPQKNorm.from_full_weight(q, k, 0, 4, num_kv_heads=bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="head_dim must be a positive int"):
            TPQKNorm.from_full_weight(q, k, 0, 4, head_dim=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="k_weight: expected a 1-D torch.Tensor"):
        TPQKNorm.from_full_weight(q, [1.0] * 16, 0, 4, num_kv_heads=2)  # type: ignore[arg-type]


@pytest.mark.parametrize("k_len,world,kwargs,match", [
    (16, 4, {"num_kv_heads": 0}, "num_kv_heads must be a positive int"),
    (16, 4, {"num_kv_heads": 2, "head_dim": -8}, "head_dim must be a positive int"),
    (16, 4, {"num_kv_heads": 2, "head_dim": 4}, r"k_weight: has 16 elements, but num_kv_heads \* head_dim = 2 \* 4"),
    (15, 4, {"num_kv_heads": 2}, "k_weight: its 15 elements are not num_kv_heads=2 heads"),
    (16, 4, {"head_dim": 5}, "k_weight: its 16 elements are not whole heads of head_dim=5"),
    (24, 4, {"num_kv_heads": 3}, "num_kv_heads=3 is less than world_size=4 but does not divide it"),
    (48, 4, {"num_kv_heads": 6}, "num_kv_heads=6 cannot be split into 4 equal shards of whole heads"),
    (16, 4, {"num_kv_heads": 2, "head_dim": 8, "q_len": 48}, "q_weight: its 48 elements are not whole heads"),
], ids=["zero-heads", "negative-head-dim", "length-mismatch", "heads-not-equal", "head-dim-not-dividing",
        "heads-not-dividing-world", "heads-not-multiple-of-world", "q-not-whole-heads"])
def test_num_kv_heads_values_that_do_not_fit_raise_value_error(k_len: int, world: int, kwargs: dict,
                                                               match: str) -> None:
    q_len = kwargs.pop("q_len", 64)
    with pytest.raises(ValueError, match=match):
        TPQKNorm.from_full_weight(torch.ones(q_len), torch.ones(k_len), 0, world, **kwargs)


def test_enough_kv_heads_split_evenly_and_one_rank_keeps_everything() -> None:
    """num_kv_heads >= world_size is the usual even split; one rank holds the whole weights."""
    q, k = torch.arange(64.0), torch.arange(16.0)
    one = TPQKNorm.from_full_weight(q, k, 0, 1, num_kv_heads=2, head_dim=8)
    assert (one.q_size, one.kv_size, one.num_kv_heads, one.head_dim) == (64, 16, 2, 8)
    torch.testing.assert_close(one.k_weight.data, k, rtol=0, atol=0)
    inferred = TPQKNorm.from_full_weight(q, k, 0, 1, head_dim=8)
    assert inferred.num_kv_heads == 2
    # The width check names the layout; with one rank there is no replication to hint at.
    with pytest.raises(ValueError, match=r"expects this rank's q \| k \| v columns, q_size \+ 2\*kv_size = "
                                         r"64 \+ 2\*16 = 96") as info:
        one(torch.ones(3, 128))
    assert "num_kv_heads" not in str(info.value)


def _even_split_worker(rank: int, world: int) -> List[float]:
    """num_kv_heads = world_size: one head per rank, the same as the plain even split."""
    k = torch.arange(16.0)
    qk = TPQKNorm.from_full_weight(torch.ones(32), k, rank, world, num_kv_heads=2, head_dim=8)
    plain = TPQKNorm.from_full_weight(torch.ones(32), k, rank, world)
    assert qk.kv_size == plain.kv_size == 8
    torch.testing.assert_close(qk.k_weight.data, plain.k_weight.data, rtol=0, atol=0)
    return qk.k_weight.tolist()


def test_as_many_kv_heads_as_ranks_is_the_even_split() -> None:
    assert run_ranks(_even_split_worker, 2) == [list(map(float, range(8))), list(map(float, range(8, 16)))]
