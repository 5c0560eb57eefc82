"""The fallback path over real processes (gloo on CPU), through the public API, against the
float64 reference; path choice (CPU, forced, multi-host); two groups used interleaved.

Each world size is one multi-process run (spawned processes cost seconds each); the worker
collects every result and the tests below assert on them, so a failure still names its case.
Tolerances: relative norm error ||out - ref|| / ||ref|| <= 1e-5 (fp32), 2e-3 (fp16), 1.6e-2 (bf16).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import pytest
import torch

from allreduce_rms.launch import run_ranks

from numerics import DTYPES, TOLERANCE
from numerics import rel_err as _rel_err

TOL = {str(dtype)[6:]: tol for dtype, tol in TOLERANCE.items()}  # keyed by name: rows travel between processes
TOKENS = (0, 1, 7, 64)
EPS = 1e-6


def _full(shape, dtype, seed):
    """The same tensor on every rank (each rank then takes its shard)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 0.25).to(dtype)


def _check_numerics(ws, members: List[int], tag: str, seed: int, errors: List[Any], *, full: bool = True) -> int:
    """Run every op variant on `ws` (whose group is the global ranks `members`) and append
    (case, dtype, error) for each result compared to the float64 reference. Returns the seed to
    use next, so interleaved callers on different groups never reuse data by accident."""
    import allreduce_rms
    from allreduce_rms.fallback import rms_norm_reference

    n = len(members)
    me = members.index(torch.distributed.get_rank())
    tokens = TOKENS if full else (0, 7)
    dtypes = DTYPES if full else (torch.bfloat16, torch.float32)
    for d_i, dtype in enumerate(dtypes):
        w_dtype = DTYPES[(d_i + 1) % 3]  # weights in another dtype than the activations
        for t in tokens:
            for width in ((8, 13) if full else (8,)):
                seed += 1
                name = f"{tag} T={t} W={width}"
                x_full = _full((t, width * n), dtype, seed)
                w_full = _full((width * n,), w_dtype, seed + 1000)
                xs = list(x_full.split(width, dim=-1))
                ws_ = list(w_full.split(width))
                ref = rms_norm_reference(xs, ws_, EPS)[me]
                x, w = xs[me].contiguous(), ws_[me].contiguous()

                out = allreduce_rms.rms_norm(x, w, EPS, ws)
                assert out.shape == x.shape and out.dtype == dtype, name
                errors.append((f"{name} rms_norm", str(dtype)[6:], _rel_err(out, ref)))
                buf = torch.full_like(x, float("nan"))
                assert allreduce_rms.rms_norm(x, w, EPS, ws, out=buf) is buf
                errors.append((f"{name} rms_norm out=", str(dtype)[6:], _rel_err(buf, ref)))
                inplace = x.clone()
                allreduce_rms.rms_norm(inplace, w, EPS, ws, out=inplace)
                errors.append((f"{name} rms_norm in place", str(dtype)[6:], _rel_err(inplace, ref)))

                # qk_norm: q and k shards of different widths, v untouched
                q_size, kv_size = width * 2, width
                q_full = _full((t, q_size * n), dtype, seed + 2000)
                k_full = _full((t, kv_size * n), dtype, seed + 3000)
                qw_full = _full((q_size * n,), w_dtype, seed + 4000)
                kw_full = _full((kv_size * n,), DTYPES[(d_i + 2) % 3], seed + 5000)
                qs, ks = list(q_full.split(q_size, -1)), list(k_full.split(kv_size, -1))
                qws, kws = list(qw_full.split(q_size)), list(kw_full.split(kv_size))
                q_ref = rms_norm_reference(qs, qws, EPS)[me]
                k_ref = rms_norm_reference(ks, kws, EPS)[me]
                v = _full((t, kv_size), dtype, seed + 6000 + me)
                qkv = torch.cat([qs[me], ks[me], v], dim=-1)
                before = qkv.clone()
                q, k = allreduce_rms.qk_norm(qkv, qws[me], kws[me], q_size, kv_size, EPS, ws)
                assert torch.equal(qkv, before), f"{name}: out-of-place qk_norm modified qkv"
                errors.append((f"{name} qk_norm q", str(dtype)[6:], _rel_err(q, q_ref)))
                errors.append((f"{name} qk_norm k", str(dtype)[6:], _rel_err(k, k_ref)))
                q2, k2 = allreduce_rms.qk_norm(qkv, qws[me], kws[me], q_size, kv_size, EPS, ws, inplace=True)
                assert torch.equal(qkv[:, q_size + kv_size:], v), f"{name}: in-place qk_norm touched v"
                assert torch.equal(q2, qkv[:, :q_size]) and torch.equal(k2, qkv[:, q_size:q_size + kv_size])
                errors.append((f"{name} qk_norm in place q", str(dtype)[6:], _rel_err(q2, q_ref)))
                errors.append((f"{name} qk_norm in place k", str(dtype)[6:], _rel_err(k2, k_ref)))
    return seed + 10_000


def _raises(fn) -> Dict[str, str]:
    try:
        fn()
    except Exception as exc:  # the tests assert on the type and the message
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": "", "message": "did not raise"}


def _worker(rank: int, world: int) -> Dict[str, Any]:
    import torch.distributed as dist

    import allreduce_rms
    import allreduce_rms.workspace as wsmod

    res: Dict[str, Any] = {"errors": []}
    everyone = list(range(world))

    # automatic choice on CPU: fallback, with a reason
    ws = allreduce_rms.Workspace()
    res["auto"] = (ws.path, ws.reason)
    seed = _check_numerics(ws, everyone, "auto", 0, res["errors"])

    # forced by argument and by environment
    with allreduce_rms.Workspace(path="fallback") as forced:
        res["forced_arg"] = (forced.path, forced.reason)
        seed = _check_numerics(forced, everyone, "forced", seed, res["errors"], full=False)
    os.environ["ALLREDUCE_RMS_PATH"] = "fallback"
    with allreduce_rms.Workspace() as forced:
        res["forced_env"] = (forced.path, forced.reason)
    # fused forced on CPU: every rank raises, and no rank is left in a collective
    res["fused_arg"] = _raises(lambda: allreduce_rms.Workspace(path="fused"))
    os.environ["ALLREDUCE_RMS_PATH"] = "fused"
    res["fused_env"] = _raises(lambda: allreduce_rms.Workspace())
    del os.environ["ALLREDUCE_RMS_PATH"]
    seed = _check_numerics(ws, everyone, "after fused error", seed, res["errors"], full=False)

    # two fake hosts: the first half of the ranks on host A, the rest on host B
    real_hostname = wsmod._hostname
    wsmod._hostname = lambda: "host-A" if rank < world // 2 else "host-B"
    try:
        with allreduce_rms.Workspace() as multi:
            res["hosts"] = (multi.path, multi.reason)
            seed = _check_numerics(multi, everyone, "two hosts", seed, res["errors"], full=False)
        res["hosts_fused"] = _raises(lambda: allreduce_rms.Workspace(path="fused"))
    finally:
        wsmod._hostname = real_hostname

    # two workspaces on two different groups, used interleaved: the whole world (a new group,
    # not WORLD) and this rank's half of it (one-rank groups when world == 2)
    half = world // 2
    whole_group = dist.new_group(everyone)
    halves = [dist.new_group(everyone[:half]), dist.new_group(everyone[half:])]
    my_half = everyone[:half] if rank < half else everyone[half:]
    ws_whole = allreduce_rms.Workspace(whole_group)
    ws_half = allreduce_rms.Workspace(halves[0] if rank < half else halves[1])
    res["groups"] = [(ws_whole.path, ws_whole.world_size), (ws_half.path, ws_half.world_size)]
    group_errors: List[Any] = []
    for i in range(3):
        seed = _check_numerics(ws_half, my_half, f"half#{i}", seed, group_errors, full=False)
        seed = _check_numerics(ws_whole, everyone, f"whole#{i}", seed, group_errors, full=False)
        seed = _check_numerics(ws, everyone, f"world#{i}", seed, group_errors, full=False)
    res["group_errors"] = group_errors

    # debug mode (setter): one stray rank among the others is the one every rank names
    from allreduce_rms import ops

    ops.set_debug(True)
    x, w = torch.randn(6, 8), torch.randn(8)
    res["debug_last"] = _raises(lambda: allreduce_rms.rms_norm(x[: 4 + (rank == world - 1)], w, EPS, ws))
    res["debug_first"] = _raises(lambda: allreduce_rms.rms_norm(x[: 4 + (rank == 0)], w, EPS, ws))
    res["debug_same"] = _raises(lambda: allreduce_rms.rms_norm(x, w, EPS, ws))
    res["debug_eps"] = _raises(lambda: allreduce_rms.rms_norm(x, w, EPS * (1 + (rank == world - 1)), ws))
    ops.set_debug(None)
    ws_half.close()
    ws_whole.close()
    ws.close()
    return res


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def ranks(request):
    return request.param, run_ranks(_worker, request.param, backend="gloo", timeout=120)


def _assert_errors(rows, world):
    assert rows, "no results"
    bad = [f"{case} [{dtype}]: {err:.3g} > {TOL[dtype]:g}" for case, dtype, err in rows if not err <= TOL[dtype]]
    assert not bad, f"{world} ranks, {len(bad)} of {len(rows)} results off the float64 reference:\n" + "\n".join(bad[:20])


def test_fallback_matches_float64_reference(ranks):
    world, results = ranks
    for rank, res in enumerate(results):
        _assert_errors(res["errors"], world)
        dtypes = {d for _, d, _ in res["errors"]}
        assert dtypes == set(TOL), f"rank {rank}: dtypes covered {dtypes}"


def test_cpu_ranks_take_the_fallback_with_a_reason(ranks):
    world, results = ranks
    for rank, res in enumerate(results):
        path, reason = res["auto"]
        assert path == "fallback"
        assert "not a GPU" in reason and "cpu" in reason, reason


def test_fallback_can_be_forced_by_argument_and_environment(ranks):
    _, results = ranks
    for res in results:
        for key in ("forced_arg", "forced_env"):
            path, reason = res[key]
            assert path == "fallback" and "forced" in reason, (key, reason)


def test_forcing_fused_on_cpu_raises_on_every_rank(ranks):
    _, results = ranks
    for rank, res in enumerate(results):
        for key in ("fused_arg", "fused_env"):
            err = res[key]
            assert err["type"] == "WorkspaceError", (rank, key, err)
            assert "fused path was forced" in err["message"] and "not a GPU" in err["message"], err["message"]


def test_ranks_on_two_hosts_take_the_fallback(ranks):
    world, results = ranks
    for res in results:
        path, reason = res["hosts"]
        assert path == "fallback"
        # the host check comes before the device check, so this is the reason on CPU too
        assert "span 2 hosts" in reason and "host-A" in reason and "host-B" in reason, reason
        err = res["hosts_fused"]
        assert err["type"] == "WorkspaceError" and "hosts" in err["message"], err


def test_two_groups_used_interleaved(ranks):
    world, results = ranks
    for res in results:
        assert res["groups"] == [("fallback", world), ("local" if world == 2 else "fallback", world // 2)]
        _assert_errors(res["group_errors"], world)


def test_debug_mode_names_the_stray_rank(ranks):
    world, results = ranks
    for res in results:
        assert res["debug_same"]["message"] == "did not raise"
        err = res["debug_eps"]  # the same shapes, another eps: a different normalization, named
        assert err["type"] == "RuntimeError" and f"rank {world - 1} called rms_norm with " in err["message"]
        assert f"eps {2 * EPS:g}" in err["message"] and f"eps {EPS:g}" in err["message"], err
        err = res["debug_last"]
        assert err["type"] == "RuntimeError" and f"rank {world - 1} called rms_norm with 5 tokens" in err["message"], err
        if world > 2:  # with two ranks there is no majority; with four, rank 0 is the odd one
            err = res["debug_first"]
            assert err["type"] == "RuntimeError" and "rank 0 called rms_norm with 5 tokens" in err["message"], err
            assert f"ranks {', '.join(map(str, range(1, world)))} called rms_norm with 4 tokens" in err["message"], err
        else:
            assert res["debug_first"]["type"] == "RuntimeError"
