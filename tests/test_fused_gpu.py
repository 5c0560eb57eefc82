"""The fused Lamport path on 2+ GPUs: correctness, chunking, graphs, back-to-back, faults.

Every rank builds the same full (unsharded) tensors from one seed, takes its slice, and compares
its output with the float64 reference of the full row (tests/numerics.py states the tolerances).
"""

from __future__ import annotations

import os
import re
import time

import pytest
import torch
import torch.distributed as dist

import allreduce_rms
from allreduce_rms import _native
from allreduce_rms.launch import run_ranks
from allreduce_rms.ops import fused_plan
from numerics import DTYPES, TOLERANCE, reference, rel_err, shard_scale

pytestmark = pytest.mark.multigpu

WORLD = min(torch.cuda.device_count(), 8) if torch.cuda.is_available() else 0
CAPACITY = 256
# Full (all-rank) widths (q, k): MiniMax-M2 (48 x 128, 8 x 128), two other models, and per-rank
# widths that are an odd multiple of the 8-element vector (37 x 8 and 5 x 8 per rank).
FULL_WIDTHS = [(6144, 1024), (4096, 512), (8192, 256), (8 * 37, 8 * 5)]
# 4099: prefill-sized, where the launcher gives each token few warps and each block several tokens
TOKENS = [0, 1, 7, 64, 1000, CAPACITY + 1, 3 * CAPACITY + 5, 4099]


def _column_scales(full: int, world: int) -> torch.Tensor:
    """[full] per-column scale: shard_scale(r) on rank r's columns."""
    return torch.tensor([shard_scale(r) for r in range(world)]).repeat_interleave(full // world)


def _problem(seed, tokens, q_full, k_full, dtype, world, rank, device):
    """This rank's qkv and weights plus the full-row q/k shards of every rank (all dtype-rounded)."""
    g = torch.Generator().manual_seed(seed)
    qs, ks = q_full // world, k_full // world
    # rank r's columns scaled by shard_scale(r): a missing or partial all-reduce fails widely
    q_all = (torch.randn(tokens, q_full, generator=g) * _column_scales(q_full, world)).to(dtype)
    k_all = (torch.randn(tokens, k_full, generator=g) * _column_scales(k_full, world)).to(dtype)
    v_all = torch.randn(tokens, k_full, generator=g).to(dtype)
    qw_all = (1 + 0.2 * torch.randn(q_full, generator=g)).to(dtype)
    kw_all = (1 + 0.2 * torch.randn(k_full, generator=g)).to(dtype)
    cols = lambda t, w, r: t[..., r * w:(r + 1) * w]  # noqa: E731
    qkv = torch.cat([cols(q_all, qs, rank), cols(k_all, ks, rank), cols(v_all, ks, rank)], dim=-1).to(device)
    q_ref = reference([cols(q_all, qs, r) for r in range(world)], [cols(qw_all, qs, r) for r in range(world)], 1e-6)[rank]
    k_ref = reference([cols(k_all, ks, r) for r in range(world)], [cols(kw_all, ks, r) for r in range(world)], 1e-6)[rank]
    return qkv, cols(qw_all, qs, rank).to(device), cols(kw_all, ks, rank).to(device), qs, ks, q_ref, k_ref


def _assert_eager_and_graph_within_tol(r):
    """r from a worker that used _eager_then_graphed: every eager and graphed run within r["tol"]."""
    assert max(r["eager"]) <= r["tol"], r
    assert max(r["graph"]) <= r["tol"], r


def _eager_then_graphed(dev, run_all, worst, eager_runs, replays):
    """worst(run_all()) over `eager_runs` eager runs, then run_all() captured once in a CUDA graph
    (after a warm-up on a side stream, as capture requires) and replayed `replays` times, its
    outputs poisoned with NaN before each replay so that a replay that writes nothing cannot pass.
    run_all returns a list of outputs, each a tensor or a tuple of tensors. Returns the eager and
    the graphed worst errors, one per run."""
    eager = [worst(run_all()) for _ in range(eager_runs)]
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        run_all()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_outs = run_all()
    graphed = []
    for _ in range(replays):
        for out in graph_outs:
            for t in (out if isinstance(out, tuple) else (out,)):
                t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize(dev)
        graphed.append(worst(graph_outs))
    return eager, graphed


def _correctness_worker(rank, world):
    dev = torch.device("cuda", rank)
    ws = allreduce_rms.Workspace(max_tokens=CAPACITY, timeout_ms=30_000)
    assert ws.path == "fused", ws.reason
    fb = allreduce_rms.Workspace(max_tokens=CAPACITY, path="fallback")
    assert fb.path == "fallback"
    checks = 0
    worst = {}
    for di, dtype in enumerate(DTYPES):
        tol = TOLERANCE[dtype]
        for wi, (q_full, k_full) in enumerate(FULL_WIDTHS):
            for tokens in TOKENS:
                seed = 1_000_003 * di + 10_007 * wi + tokens
                qkv, qw, kw, qs, ks, q_ref, k_ref = _problem(seed, tokens, q_full, k_full, dtype, world, rank, dev)
                where = f"{dtype} q{qs} k{ks} T={tokens}"
                q, k = allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, ws)
                errs = (rel_err(q, q_ref), rel_err(k, k_ref))
                worst[str(dtype)] = max(worst.get(str(dtype), 0.0), *errs)
                assert max(errs) <= tol, f"out-of-place {where}: {errs}"
                inplace = qkv.clone()
                q2, k2 = allreduce_rms.qk_norm(inplace, qw, kw, qs, ks, 1e-6, ws, inplace=True)
                assert max(rel_err(q2, q_ref), rel_err(k2, k_ref)) <= tol, f"in-place {where}"
                assert torch.equal(inplace[:, qs + ks:], qkv[:, qs + ks:]), f"v changed {where}"
                # the fallback path (local kernel -> NCCL -> local kernel) agrees with the fused one
                qf, kf = allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, fb)
                assert max(rel_err(qf, q_ref), rel_err(kf, k_ref)) <= tol, f"fallback {where}"
                assert rel_err(qf, q) <= tol and rel_err(kf, k) <= tol, f"fused vs fallback {where}"
                # rms_norm: one segment; normalizing q alone over the group is exactly q_ref
                out = allreduce_rms.rms_norm(qkv[:, :qs], qw, 1e-6, ws)
                assert rel_err(out, q_ref) <= tol, f"rms_norm {where}"
                checks += 4
    ws.synchronize()
    info = ws.info()
    ws.close()
    fb.close()
    return {"checks": checks, "worst": worst, "calls": info["calls"]}


def test_fused_matches_reference_and_fallback():
    results = run_ranks(_correctness_worker, WORLD, backend="nccl", timeout=600)
    for r in results:
        assert r["checks"] == len(DTYPES) * len(FULL_WIDTHS) * len(TOKENS) * 4
        # chunked calls advance the epoch once per chunk: more launches than calls
        assert r["calls"] > len(DTYPES) * len(FULL_WIDTHS) * len(TOKENS) * 2
    print("worst relative errors per dtype:", results[0]["worst"])


def _graph_worker(rank, world, replays):
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    ws = allreduce_rms.Workspace(max_tokens=128, timeout_ms=30_000)
    assert ws.path == "fused", ws.reason
    tokens, q_full, k_full, dtype = 64, 6144, 1024, torch.bfloat16
    qs, ks = q_full // world, k_full // world
    g = torch.Generator().manual_seed(7)
    qw_all = (1 + 0.2 * torch.randn(q_full, generator=g)).to(dtype)
    kw_all = (1 + 0.2 * torch.randn(k_full, generator=g)).to(dtype)
    qw = qw_all[rank * qs:(rank + 1) * qs].to(dev)
    kw = kw_all[rank * ks:(rank + 1) * ks].to(dev)
    static = torch.zeros(tokens, qs + 2 * ks, device=dev, dtype=dtype)

    def step():
        q, k = allreduce_rms.qk_norm(static, qw, kw, qs, ks, 1e-6, ws)
        q_again, _ = allreduce_rms.qk_norm(static, qw, kw, qs, ks, 1e-6, ws)  # back to back in the graph
        return q, k, q_again

    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_out, k_out, q_again = step()

    gen = torch.Generator(device=dev).manual_seed(1234)  # same stream of inputs on every rank
    worst = torch.zeros((), device=dev, dtype=torch.float64)
    qw64, kw64 = qw_all.double().to(dev), kw_all.double().to(dev)
    q_scale, k_scale = _column_scales(q_full, world).to(dev), _column_scales(k_full, world).to(dev)
    for _ in range(replays):
        q_all = (torch.randn(tokens, q_full, generator=gen, device=dev) * q_scale).to(dtype)
        k_all = (torch.randn(tokens, k_full, generator=gen, device=dev) * k_scale).to(dtype)
        static[:, :qs].copy_(q_all[:, rank * qs:(rank + 1) * qs])
        static[:, qs:qs + ks].copy_(k_all[:, rank * ks:(rank + 1) * ks])
        graph.replay()
        for out, full, w64, width in ((q_out, q_all, qw64, qs), (k_out, k_all, kw64, ks), (q_again, q_all, qw64, qs)):
            f = full.double()
            ref = (f * torch.rsqrt((f * f).mean(-1, keepdim=True) + 1e-6) * w64)[:, rank * width:(rank + 1) * width]
            err = (out.double() - ref).norm() / ref.norm()
            worst = torch.maximum(worst, torch.nan_to_num(err, nan=float("inf")))
    ws.synchronize()
    calls = ws.info()["calls"]
    ws.close()
    return {"worst": float(worst), "calls": calls}


def test_graph_replay_10000_times_with_new_inputs():
    replays = 10_000
    results = run_ranks(_graph_worker, WORLD, replays, backend="nccl", timeout=600)
    for r in results:
        assert r["worst"] <= TOLERANCE[torch.bfloat16], r
        assert r["calls"] == 2 * (replays + 3 + 1) or r["calls"] >= 2 * replays  # epoch advanced by the kernel
    print("graph replay worst relative error:", [r["worst"] for r in results])


def _changing_tokens_worker(rank, world):
    """T changes from call to call on one workspace (chunked, empty, tiny, large): every call
    right, eagerly and inside one captured graph that replays the same sequence."""
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    ws = allreduce_rms.Workspace(max_tokens=2048, timeout_ms=30_000)
    assert ws.path == "fused", ws.reason
    sizes = [1, 4099, 7, 0, 1024, 2, 300, 2048, 1]
    problems = [_problem(500 + i, t, 6144, 1024, torch.bfloat16, world, rank, dev) for i, t in enumerate(sizes)]
    tol = TOLERANCE[torch.bfloat16]

    def run_all():
        return [allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, ws) for qkv, qw, kw, qs, ks, _, _ in problems]

    def worst(outs):
        return max(max(rel_err(q, p[5]), rel_err(k, p[6])) for (q, k), p in zip(outs, problems))

    eager, graphed = _eager_then_graphed(dev, run_all, worst, eager_runs=3, replays=5)
    ws.synchronize()
    ws.close()
    return {"eager": eager, "graph": graphed, "tol": tol}


def test_token_count_changes_from_call_to_call():
    for r in run_ranks(_changing_tokens_worker, WORLD, backend="nccl", timeout=300):
        _assert_eager_and_graph_within_tol(r)


def _back_to_back_worker(rank, world):
    """Many launches with no other kernel between them, with PDL on (sm_90+): none may hang."""
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    ws = allreduce_rms.Workspace(max_tokens=2048, timeout_ms=20_000)
    assert ws.path == "fused", ws.reason
    sizes = [1000, 1, 64, 1000, 7, 2048, 3, 500]  # varying sizes: each launch clears what the last used
    problems = [_problem(100 + i, t, 6144, 1024, torch.bfloat16, world, rank, dev) for i, t in enumerate(sizes)]
    outs = []
    t0 = time.monotonic()
    for rep in range(250):
        for qkv, qw, kw, qs, ks, _, _ in problems:
            outs.append(allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, ws))
        qkv, qw, _, qs, _, _, _ = problems[rep % len(problems)]
        outs.append((allreduce_rms.rms_norm(qkv[:, :qs], qw, 1e-6, ws), None))  # one-segment launch in between
    ws.synchronize()
    eager_s = time.monotonic() - t0
    for rep in range(250):
        base = rep * (len(problems) + 1)
        for i, (_, _, _, _, _, q_ref, k_ref) in enumerate(problems):
            q, k = outs[base + i]
            assert rel_err(q, q_ref) <= TOLERANCE[torch.bfloat16] and rel_err(k, k_ref) <= TOLERANCE[torch.bfloat16], (rep, i)
    # the same inside one captured graph: 100 back-to-back launches, replayed 20 times
    qkv, qw, kw, qs, ks, q_ref, k_ref = problems[2]
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, ws)
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_outs = [allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, ws) for _ in range(100)]
    for _ in range(20):
        graph.replay()
    ws.synchronize()
    for q, k in graph_outs:
        assert rel_err(q, q_ref) <= TOLERANCE[torch.bfloat16] and rel_err(k, k_ref) <= TOLERANCE[torch.bfloat16]
    calls = ws.info()["calls"]
    ws.close()
    return {"calls": calls, "eager_s": eager_s, "pdl": os.environ.get("ALLREDUCE_RMS_PDL", "1")}


def _epoch_readers_worker(rank, world):
    """Launches whose epoch is read per warp and per block (the plan override's epoch_per_block),
    one-block and many-block, chunked and not, alternating back to back on one workspace, eager
    and inside one captured graph: every launch must find the epoch the previous one left."""
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    front, device_type = _native.front(), _native.dl_device_type()
    ws = allreduce_rms.Workspace(max_tokens=2048, timeout_ms=20_000)
    assert ws.path == "fused", ws.reason
    sizes = [1, 300, 1024, 5000, 7, 64]  # 5000: three chunks of one call
    problems = [_problem(300 + i, t, 6144, 1024, torch.bfloat16, world, rank, dev) for i, t in enumerate(sizes)]
    tol = TOLERANCE[torch.bfloat16]

    def calls():
        outs = []
        for rep in range(4):
            for i, (qkv, qw, kw, qs, ks, _, _) in enumerate(problems):
                front.set_plan_override(device_type, 0, 0, 0, -1, -1, (rep + i) % 2)
                outs.append(allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, ws))
        return outs

    def worst(outs):
        return max(max(rel_err(q, problems[j % len(problems)][5]), rel_err(k, problems[j % len(problems)][6]))
                   for j, (q, k) in enumerate(outs))

    try:
        eager, graphed = _eager_then_graphed(dev, calls, worst, eager_runs=1, replays=10)
        ws.synchronize()
    finally:
        front.set_plan_override(device_type, 0, 0, 0, -1, -1, -1)
    ws.close()
    return {"eager": eager, "graph": graphed, "tol": tol}


def test_epoch_read_per_warp_and_per_block_alternate_safely():
    for r in run_ranks(_epoch_readers_worker, WORLD, backend="nccl", timeout=300):
        _assert_eager_and_graph_within_tol(r)


def test_back_to_back_calls_do_not_hang():
    results = run_ranks(_back_to_back_worker, WORLD, backend="nccl", timeout=300)
    for r in results:
        assert r["calls"] == 250 * 9 + 1 + 100 * 20 + 100 + 0 or r["calls"] >= 250 * 9 + 2000, r


def _chained_in_place_worker(rank, world):
    """In-place calls back to back, each reading the q and k the previous call wrote: with PDL,
    a launch asks L2 for its rows before its PDL wait, while the previous launch may still be
    writing them (cpp/norm_kernel.cuh). The chain, eager and in one captured graph, must equal bit
    for bit the same calls made one at a time with the device synchronized in between."""
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    ws = allreduce_rms.Workspace(max_tokens=4096, timeout_ms=20_000)
    assert ws.path == "fused", ws.reason
    links, mismatches, plans = 6, [], []
    # The prefill plan's grid on this machine and TP (co-resident blocks, at most 2048).
    probe = _problem(900, 4096, 6144, 1024, torch.bfloat16, world, rank, dev)
    grid = fused_plan(*probe[:5], ws)["grid"]
    # No pre-wait prefetch where every block has one row and there are more than 4 rows per SM
    # (norm_launch.cu's prewait_prefetch_for): 1000 rows on 1000 blocks; 200 rows keep it.
    rule = {}
    for t in (200, 1000):
        p = fused_plan(*_problem(900 + t, t, 6144, 1024, torch.bfloat16, world, rank, dev)[:5], ws)
        rule[t] = (p["grid"], p["prewait_prefetch_rows"])
    # one row per block, about two, several (4096 is at least two per block), and two chunks
    for tokens in (1, 2 * grid - 1, 4096, 4099):
        qkv0, qw, kw, qs, ks, _, _ = _problem(900 + tokens, tokens, 6144, 1024, torch.bfloat16, world, rank, dev)
        plan = fused_plan(qkv0, qw, kw, qs, ks, ws)
        plans.append((tokens, plan["pdl"], plan["prewait_prefetch_rows"]))
        expected = qkv0.clone()
        for link in range(links):  # one call at a time; each must change q and k
            before = expected[:, :qs + ks].clone()
            allreduce_rms.qk_norm(expected, qw, kw, qs, ks, 1e-6, ws, inplace=True)
            ws.synchronize()
            if torch.equal(expected[:, :qs + ks], before):  # a no-op chain would pass the checks below
                mismatches.append((tokens, f"link {link} changed nothing", 0))
        chained = qkv0.clone()
        for _ in range(links):
            allreduce_rms.qk_norm(chained, qw, kw, qs, ks, 1e-6, ws, inplace=True)
        ws.synchronize()
        graphed = qkv0.clone()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up, as capture requires (on a scratch copy)
            allreduce_rms.qk_norm(graphed.clone(), qw, kw, qs, ks, 1e-6, ws, inplace=True)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(links):
                allreduce_rms.qk_norm(graphed, qw, kw, qs, ks, 1e-6, ws, inplace=True)
        graphed.copy_(qkv0)
        graph.replay()
        ws.synchronize()
        for name, got in (("eager", chained), ("graph", graphed)):
            if not torch.equal(got, expected):
                mismatches.append((tokens, name, int((got != expected).sum())))
    ws.close()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    return {"mismatches": mismatches, "plans": plans, "rule": rule, "sms": sms,
            "sm90": torch.cuda.get_device_capability(dev) >= (9, 0)}


def test_chained_in_place_calls_read_what_the_previous_call_wrote():
    for r in run_ranks(_chained_in_place_worker, WORLD, backend="nccl", timeout=300):
        assert r["mismatches"] == [], r
        if r["sm90"] and os.environ.get("ALLREDUCE_RMS_PDL", "1") != "0":
            # the case under test exists: PDL on, and rows asked of L2 before the PDL wait
            assert all(pdl and rows > 0 for _, pdl, rows in r["plans"]), r
            if os.environ.get("ALLREDUCE_RMS_PREWAIT_PREFETCH", "1") == "1":
                (grid200, rows200), (grid1000, rows1000) = r["rule"][200], r["rule"][1000]
                assert rows200 == 1, r["rule"]  # one row per block, under 4 per SM: prefetched
                if grid1000 == 1000 and 2 * 1000 // r["sms"] > 8:  # one wave of the prefill plan
                    assert rows1000 == 0, r["rule"]


def _peer_skips_worker(rank, world):
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    ws = allreduce_rms.Workspace(max_tokens=64, timeout_ms=300)
    assert ws.path == "fused", ws.reason
    qkv, qw, kw, qs, ks, _, _ = _problem(5, 16, 6144, 1024, torch.bfloat16, world, rank, dev)
    result = {}
    if rank == 0:  # rank 0 calls; every other rank skips the call
        t0 = time.monotonic()
        q, _ = allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, ws)
        try:
            ws.synchronize()
            result["message"] = None
        except TimeoutError as exc:
            result["message"] = str(exc)
        result["elapsed"] = time.monotonic() - t0
        result["all_nan"] = bool(torch.isnan(q).all())
        try:  # the workspace refuses further use
            allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, ws)
            result["refused"] = False
        except TimeoutError:
            result["refused"] = True
    dist.barrier()
    ws.close()
    return result


def test_peer_that_skips_a_call_raises_timeout_not_hang():
    r0 = run_ranks(_peer_skips_worker, WORLD, backend="nccl", timeout=120)[0]
    assert r0["message"] is not None and "qk_norm on rank 0" in r0["message"], r0
    # the peer waited for is one of the ranks that skipped the call
    assert re.search(r"waiting for rank [1-9][0-9]*\b", r0["message"]), r0
    assert r0["elapsed"] < 10, r0
    assert r0["all_nan"] and r0["refused"], r0


def _probe_drop_worker(rank, world):
    torch.cuda.set_device(rank)
    t0 = time.monotonic()
    ws = allreduce_rms.Workspace(max_tokens=64)
    elapsed = time.monotonic() - t0
    dev = torch.device("cuda", rank)
    qkv, qw, kw, qs, ks, q_ref, k_ref = _problem(9, 33, 6144, 1024, torch.float16, world, rank, dev)
    q, k = allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, ws)
    ok = rel_err(q, q_ref) <= TOLERANCE[torch.float16] and rel_err(k, k_ref) <= TOLERANCE[torch.float16]
    path, reason = ws.path, ws.reason
    ws.close()
    return {"path": path, "reason": reason, "elapsed": elapsed, "ok": ok}


def test_lost_peer_writes_end_on_fallback_within_bound():
    env = {"ALLREDUCE_RMS_DEBUG_DROP_PEER_WRITES": "1"}
    for r in run_ranks(_probe_drop_worker, WORLD, backend="nccl", timeout=120, env=env):
        assert r["path"] == "fallback" and "functional peer check" in r["reason"], r
        assert r["elapsed"] < 15 and r["ok"], r


def _resources_since(baseline):
    """The backend's process-wide counts minus `baseline` (this process may hold other workspaces)."""
    now = _native.backend_resources()
    return tuple(now[k] - baseline[k] for k in ("workspaces_live", "ipc_mappings_open", "device_bytes"))


def _lifecycle_worker(rank, world):
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    qkv, qw, kw, qs, ks, q_ref, _ = _problem(11, 8, 6144, 1024, torch.bfloat16, world, rank, dev)
    assert _native.load(_native.device_backend_name()) is None  # so the baseline is a real count
    baseline = _native.backend_resources()

    def cycle():
        with allreduce_rms.Workspace(max_tokens=1024) as ws:
            assert ws.path == "fused", ws.reason
            q, _ = allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, ws)
            assert rel_err(q, q_ref) <= TOLERANCE[torch.bfloat16]
            info = ws.info()
            live, mappings, nbytes = _resources_since(baseline)
        return info["peers_open"], live, mappings, nbytes - info["buffer_bytes"]

    cycle()  # warm-up: contexts, peer access, allocator pools
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info(dev)[0]
    open_counts = [cycle() for _ in range(100)]
    torch.cuda.synchronize()
    free_after = torch.cuda.mem_get_info(dev)[0]
    after_cycles = _resources_since(baseline)
    # two workspaces on two groups, used interleaved
    other = dist.new_group(list(range(world)))
    a = allreduce_rms.Workspace(max_tokens=64)
    b = allreduce_rms.Workspace(other, max_tokens=64)
    for _ in range(50):
        qa, _ = allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, a)
        qb, _ = allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, b)
    interleaved_ok = rel_err(qa, q_ref) <= TOLERANCE[torch.bfloat16] and torch.equal(qa, qb)
    two_open = _resources_since(baseline)[:2]
    a.close()
    b.close()
    return {"leak_bytes": free_before - free_after, "open_counts": {c[:3] for c in open_counts},
            "extra_bytes": {c[3] for c in open_counts}, "interleaved_ok": interleaved_ok,
            "after_cycles": after_cycles, "two_open": two_open, "after_close": _resources_since(baseline)}


def test_hundred_workspaces_leak_nothing():
    for r in run_ranks(_lifecycle_worker, WORLD, backend="nccl", timeout=300):
        # every open workspace: its peers mapped, and exactly one workspace and world - 1 mappings
        # more in the backend's own process-wide counts
        assert r["open_counts"] == {(WORLD - 1, 1, WORLD - 1)}, r
        # its device bytes: the Lamport buffer plus one control block (a few words and one epoch
        # cell per block index, 2048 x 4 bytes: cpp/lamport.cuh)
        assert len(r["extra_bytes"]) == 1 and 0 < min(r["extra_bytes"]) <= 8192 + 64, r
        assert r["leak_bytes"] < 4 * 2**20, r  # less than 4 MiB over 100 create/close cycles
        assert r["interleaved_ok"], r
        assert r["two_open"] == (2, 2 * (WORLD - 1)), r
        # (live workspaces, open IPC mappings, device bytes) back to where the test started
        assert r["after_cycles"] == (0, 0, 0), r
        assert r["after_close"] == (0, 0, 0), r


# Workspaces the exit test leaves open on purpose: a module global keeps them alive, so no
# destructor runs before the interpreter (or os._exit) ends the process.
_LEFT_OPEN = []


def _exit_without_close_worker(rank, world):
    dev = torch.device("cuda", rank)
    ws = allreduce_rms.Workspace(max_tokens=4096)
    assert ws.path == "fused", ws.reason
    _LEFT_OPEN.append(ws)
    qkv, qw, kw, qs, ks, q_ref, k_ref = _problem(13, 100, 6144, 1024, torch.bfloat16, world, rank, dev)
    q, k = allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, ws)
    torch.cuda.synchronize(dev)
    ok = rel_err(q, q_ref) <= TOLERANCE[torch.bfloat16] and rel_err(k, k_ref) <= TOLERANCE[torch.bfloat16]
    # no rank leaves while a peer still runs the exchange: the test is about exiting, not racing
    dist.barrier()
    return {"ok": ok, "resources": _native.backend_resources()}


def _fresh_round_worker(rank, world):
    dev = torch.device("cuda", rank)
    with allreduce_rms.Workspace(max_tokens=256) as ws:
        assert ws.path == "fused", ws.reason
        qkv, qw, kw, qs, ks, q_ref, k_ref = _problem(17, 33, 6144, 1024, torch.bfloat16, world, rank, dev)
        q, k = allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, ws)
        ws.synchronize()
        return max(rel_err(q, q_ref), rel_err(k, k_ref))


def _shm_entries():
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.mark.parametrize("exit_hard", [False, True], ids=["interpreter-exit", "os-exit"])
def test_exit_without_close_leaves_nothing_behind(exit_hard):
    devices = range(WORLD)
    for i in devices:  # create this process's contexts first, so they are in both measurements
        torch.cuda.mem_get_info(i)
    free_before = [torch.cuda.mem_get_info(i)[0] for i in devices]
    shm_before = _shm_entries()

    # run_ranks fails if a rank hangs or crashes on its way out: exactly the bug looked for here
    results = run_ranks(_exit_without_close_worker, WORLD, backend="nccl", timeout=180, exit_hard=exit_hard)
    for r in results:
        assert r["ok"], r
        # the workspace really was open when the process ended
        assert r["resources"]["workspaces_live"] == 1 and r["resources"]["ipc_mappings_open"] == WORLD - 1, r

    # the driver frees a dead process's memory asynchronously: wait for it, within bounds
    slack = 8 * 2**20
    deadline = time.monotonic() + 5
    while True:
        lost = [before - torch.cuda.mem_get_info(i)[0] for i, before in zip(devices, free_before)]
        if all(b <= slack for b in lost) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(b <= slack for b in lost), f"GPU memory not given back after exit (bytes per GPU): {lost}"
    left = sorted(e for e in _shm_entries() - shm_before if any(s in e.lower() for s in ("allreduce", "arms", "nccl")))
    assert not left, f"new /dev/shm entries left behind: {left}"

    # the GPUs still work: a fresh group creates a workspace and gets the right answer
    for err in run_ranks(_fresh_round_worker, 2, backend="nccl", timeout=120):
        assert err <= TOLERANCE[torch.bfloat16], err


# ---------------------------------------------------------------- rows of any width (issue 15)
# Per-rank widths past both limits of the register-resident kernel (16-bit rows above 32768 and
# fp32 above 16384 elements; unaligned rows above 4096), taken by the wide-row kernel; 3 stays on
# the fast kernel's scalar path. qk pairs: MiniMax-M2's whole q and k on each rank, and a
# scalar-path pair past 4096. ANY_CAPACITY + 3 tokens run as two chunked launches.
ANY_CAPACITY = 64
ANY_WIDTHS = [3, 4097, 4100, 16388, 32776, 65536]
ANY_QK_WIDTHS = [(30720, 4096), (4097, 3)]
ANY_TOKENS = [0, 1, 7, ANY_CAPACITY + 3]


def _any_width_shards(seed, tokens, width, dtype, world, device):
    """Every rank's [T, width] shard of one [T, width * world] row set, the same on every rank
    (one seed, one GPU generator): rank r's shard scaled by shard_scale(r) (a missing or partial
    exchange fails widely), the first and last 8 columns of each shard 16x larger (they hold a
    large share of the sum, so a dropped unaligned head or tail fails widely), token t scaled by
    1 + t % 3 (a statistic applied to the wrong token fails)."""
    g = torch.Generator(device=device).manual_seed(seed)
    edge = torch.ones(width, device=device, dtype=torch.float64)
    edge[:8] = 16.0
    edge[-8:] = 16.0
    rows = 1.0 + (torch.arange(tokens, device=device) % 3).double()[:, None]
    return [(torch.randn(tokens, width, generator=g, device=device, dtype=torch.float64) * edge * rows *
             shard_scale(r)).to(dtype) for r in range(world)]


def _any_width_weights(seed, width, dtype, world, device):
    """Every rank's [width] weight shard (near 1), the same on every rank."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [(1 + 0.2 * torch.randn(width, generator=g, device=device)).to(dtype) for _ in range(world)]


def _any_width_worker(rank, world):
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    from allreduce_rms.ops import fused_plan

    ws = allreduce_rms.Workspace(max_tokens=ANY_CAPACITY, timeout_ms=30_000)
    assert ws.path == "fused", ws.reason
    fb = allreduce_rms.Workspace(max_tokens=ANY_CAPACITY, path="fallback")
    eps, checks, worst = 1e-6, 0, {}
    for di, dtype in enumerate(DTYPES):
        tol = TOLERANCE[dtype]
        # rms_norm: rows as a contiguous tensor (offset 0), and as a column view one element off
        # 16-byte alignment whose row stride moves every row's alignment (offset 1, with fp32
        # weights, so the weight's vectors are 32 bytes in 16-bit types)
        for width in ANY_WIDTHS:
            for tokens in ANY_TOKENS:
                seed = 7919 * di + 31 * width + tokens
                shards = _any_width_shards(seed, tokens, width, dtype, world, dev)
                for offset, wdtype in ((0, dtype), (1, torch.float32)):
                    weights = _any_width_weights(seed + 1, width, wdtype, world, dev)
                    ref = reference(shards, weights, eps)[rank]
                    base = torch.zeros(tokens, width + offset, device=dev, dtype=dtype)
                    x = base[:, offset:]
                    x.copy_(shards[rank])
                    where = f"rms_norm {dtype} W={width}/rank offset={offset} w={wdtype} T={tokens}"
                    outs = []
                    for path in (ws, fb):
                        out = torch.full((tokens, width), float("nan"), device=dev, dtype=dtype)
                        allreduce_rms.rms_norm(x, weights[rank], eps, path, out=out)
                        err = rel_err(out, ref)
                        worst[str(dtype)] = max(worst.get(str(dtype), 0.0), err)
                        assert err <= tol, f"{where} {path.path}: {err}"
                        outs.append(out)
                    allreduce_rms.rms_norm(x, weights[rank], eps, ws, out=x)  # in place, fused
                    assert torch.equal(x, outs[0]), f"{where}: in place differs from out of place"
                    assert torch.equal(base[:, :offset], torch.zeros_like(base[:, :offset])), where
                    checks += 3
        # qk_norm: q and k read in place as column slices of qkv, out of place and in place
        for qs, ks in ANY_QK_WIDTHS:
            for tokens in ANY_TOKENS:
                seed = 104729 * di + qs + tokens
                q_shards = _any_width_shards(seed, tokens, qs, dtype, world, dev)
                k_shards = _any_width_shards(seed + 1, tokens, ks, dtype, world, dev)
                qws = _any_width_weights(seed + 2, qs, dtype, world, dev)
                kws = _any_width_weights(seed + 3, ks, torch.float32, world, dev)
                v = torch.randn(tokens, ks, device=dev).to(dtype)
                qkv = torch.cat([q_shards[rank], k_shards[rank], v], dim=-1)
                q_ref, k_ref = reference(q_shards, qws, eps)[rank], reference(k_shards, kws, eps)[rank]
                where = f"qk_norm {dtype} q{qs} k{ks}/rank T={tokens}"
                if tokens:
                    plan = fused_plan(qkv, qws[rank], kws[rank], qs, ks, ws)
                    assert plan["vectors_per_thread"] == -1, f"{where}: not the wide-row kernel: {plan}"
                q, k = allreduce_rms.qk_norm(qkv, qws[rank], kws[rank], qs, ks, eps, ws)
                assert max(rel_err(q, q_ref), rel_err(k, k_ref)) <= tol, f"{where} fused"
                inplace = qkv.clone()
                q2, k2 = allreduce_rms.qk_norm(inplace, qws[rank], kws[rank], qs, ks, eps, ws, inplace=True)
                assert torch.equal(q2, q) and torch.equal(k2, k), f"{where}: in place differs"
                assert torch.equal(inplace[:, qs + ks:], v), f"{where}: v changed"
                qf, kf = allreduce_rms.qk_norm(qkv, qws[rank], kws[rank], qs, ks, eps, fb)
                assert max(rel_err(qf, q_ref), rel_err(kf, k_ref)) <= tol, f"{where} fallback"
                checks += 3
    ws.synchronize()
    ws.close()
    fb.close()
    return {"checks": checks, "worst": worst}


def test_rows_of_any_width_fused_and_fallback():
    results = run_ranks(_any_width_worker, WORLD, backend="nccl", timeout=600)
    for r in results:
        assert r["checks"] == len(DTYPES) * (len(ANY_WIDTHS) * len(ANY_TOKENS) * 2 + len(ANY_QK_WIDTHS) * len(ANY_TOKENS)) * 3
    print("rows of any width, worst relative errors per dtype:", results[0]["worst"])


def _wide_row_forced_worker(rank, world):
    """The wide-row kernel forced for every row (plan override, vectors_per_thread = -1) on the
    usual widths and token counts of the fused correctness test: its exchange, chunking and
    in-place path on rows the fast kernel would take."""
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    front, device_type = _native.front(), _native.dl_device_type()
    ws = allreduce_rms.Workspace(max_tokens=CAPACITY, timeout_ms=30_000)
    assert ws.path == "fused", ws.reason
    checks = 0
    front.set_plan_override(device_type, 0, -1, 0)
    try:
        for di, dtype in enumerate(DTYPES):
            for wi, (q_full, k_full) in enumerate(FULL_WIDTHS):
                for tokens in (1, 7, 3 * CAPACITY + 5):
                    qkv, qw, kw, qs, ks, q_ref, k_ref = _problem(99 + 1000 * di + 10 * wi + tokens, tokens, q_full,
                                                                 k_full, dtype, world, rank, dev)
                    q, k = allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, 1e-6, ws)
                    assert max(rel_err(q, q_ref), rel_err(k, k_ref)) <= TOLERANCE[dtype], (dtype, qs, ks, tokens)
                    q2, k2 = allreduce_rms.qk_norm(qkv.clone(), qw, kw, qs, ks, 1e-6, ws, inplace=True)
                    assert torch.equal(q2, q) and torch.equal(k2, k), (dtype, qs, ks, tokens)
                    checks += 2
    finally:
        front.set_plan_override(device_type, 0, 0, 0)
    ws.synchronize()
    ws.close()
    return checks


def test_wide_row_kernel_forced_on_usual_widths():
    for checks in run_ranks(_wide_row_forced_worker, WORLD, backend="nccl", timeout=300):
        assert checks == len(DTYPES) * len(FULL_WIDTHS) * 3 * 2


def _wide_and_fast_mixed_worker(rank, world):
    """Wide-row and fast-kernel launches back to back on one workspace (they share its epoch and
    packet slots), eagerly and inside one captured graph replayed with the same inputs after the
    outputs are poisoned: every result right every time."""
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    ws = allreduce_rms.Workspace(max_tokens=ANY_CAPACITY, timeout_ms=30_000)
    assert ws.path == "fused", ws.reason
    dtype, eps, tol = torch.bfloat16, 1e-6, TOLERANCE[torch.bfloat16]
    fast = _problem(3, 40, 6144, 1024, dtype, world, rank, dev)
    wide = []
    for i, (width, tokens) in enumerate(((65536, 3), (4100, ANY_CAPACITY + 3), (32776, 1))):
        shards = _any_width_shards(50 + i, tokens, width, dtype, world, dev)
        weights = _any_width_weights(60 + i, width, dtype, world, dev)
        wide.append((shards[rank], weights[rank], reference(shards, weights, eps)[rank]))

    def run_all():
        outs = []
        for x, w, _ in wide:
            qkv, qw, kw, qs, ks, _, _ = fast
            outs.append(allreduce_rms.qk_norm(qkv, qw, kw, qs, ks, eps, ws))
            outs.append(allreduce_rms.rms_norm(x, w, eps, ws))
        return outs

    def worst(outs):
        errs = []
        for i, (_, _, ref) in enumerate(wide):
            q, k = outs[2 * i]
            errs += [rel_err(q, fast[5]), rel_err(k, fast[6]), rel_err(outs[2 * i + 1], ref)]
        return max(errs)

    eager, graphed = _eager_then_graphed(dev, run_all, worst, eager_runs=20, replays=20)
    ws.synchronize()
    ws.close()
    return {"eager": eager, "graph": graphed, "tol": tol}


def test_wide_row_and_fast_launches_back_to_back_eager_and_graphed():
    for r in run_ranks(_wide_and_fast_mixed_worker, WORLD, backend="nccl", timeout=300):
        _assert_eager_and_graph_within_tol(r)


def _wide_peer_skips_worker(rank, world):
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    ws = allreduce_rms.Workspace(max_tokens=64, timeout_ms=300)
    assert ws.path == "fused", ws.reason
    x = _any_width_shards(5, 16, 65536, torch.bfloat16, world, dev)[rank]
    w = torch.ones(65536, device=dev, dtype=torch.bfloat16)
    result = {}
    if rank == 0:  # rank 0 calls; every other rank skips the call
        t0 = time.monotonic()
        out = allreduce_rms.rms_norm(x, w, 1e-6, ws)
        try:
            ws.synchronize()
            result["message"] = None
        except TimeoutError as exc:
            result["message"] = str(exc)
        result["elapsed"] = time.monotonic() - t0
        result["all_nan"] = bool(torch.isnan(out).all())
    dist.barrier()
    ws.close()
    return result


def test_wide_row_peer_that_skips_a_call_raises_timeout_with_nan_rows():
    r0 = run_ranks(_wide_peer_skips_worker, WORLD, backend="nccl", timeout=120)[0]
    assert r0["message"] is not None and "rms_norm" in r0["message"] and "rank 0" in r0["message"], r0
    assert r0["elapsed"] < 10 and r0["all_nan"], r0
