"""The fused Lamport path on 2+ GPUs: correctness, chunking, graphs, back-to-back, faults.

Every rank builds the same full (unsharded) tensors from one seed, takes its slice, and compares
its output with the float64 reference of the full row (tests/numerics.py states the tolerances).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

import allreduce_rms
from allreduce_rms import _native
from allreduce_rms.launch import run_ranks
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

    eager = [worst(run_all()) for _ in range(3)]
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        run_all()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_outs = run_all()
    for out in graph_outs:  # poison: a replay that writes nothing cannot pass
        for t in out:
            t.fill_(float("nan"))
    graphed = []
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize(dev)
        graphed.append(worst(graph_outs))
    ws.synchronize()
    ws.close()
    return {"eager": eager, "graph": graphed, "tol": tol}


def test_token_count_changes_from_call_to_call():
    for r in run_ranks(_changing_tokens_worker, WORLD, backend="nccl", timeout=300):
        assert max(r["eager"]) <= r["tol"], r
        assert max(r["graph"]) <= r["tol"], r


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


def test_back_to_back_calls_do_not_hang():
    results = run_ranks(_back_to_back_worker, WORLD, backend="nccl", timeout=300)
    for r in results:
        assert r["calls"] == 250 * 9 + 1 + 100 * 20 + 100 + 0 or r["calls"] >= 250 * 9 + 2000, r


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
    assert r0["message"] is not None and "qk_norm" in r0["message"] and "rank 0" in r0["message"], r0
    assert "rank 1" in r0["message"] or "rank" in r0["message"]
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
        # its device bytes: the Lamport buffer plus one control block (a few words)
        assert len(r["extra_bytes"]) == 1 and 0 < min(r["extra_bytes"]) <= 256, r
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
