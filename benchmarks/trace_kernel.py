"""Where the fused kernel's time goes: per-phase trace, machine floors and a plan sweep.

Spawns one process per GPU (TP = all visible GPUs, at least 2), opens a fused workspace and, for
MiniMax-M2 shapes (48 q heads, 8 kv heads, head_dim 128, bf16):

* floors: per-call time of a CUDA graph of back-to-back launches of an empty kernel, and of the
  smallest Lamport exchange (one value+flag packet per peer, no clearing, no fence), both with
  PDL where the norm kernel uses it (``floor_launch`` in the backend);
* trace: block 0 of every fused launch writes globaltimer stamps (entry, after the PDL wait,
  row loaded and reduced, partials sent, peers' partials arrived, stores issued); replaying a
  graph of back-to-back calls gives the median time of each phase and the period between calls.
  A trace build (``-Ccmake.define.ALLREDUCE_RMS_TRACE_ALL_BLOCKS=ON``) also has every block raise
  two shared stamps to its own first row reduced and sent and its last store, which adds how long
  after block 0's wait the grid's last block sent its first row's partials and stored its last, and how long after
  that last store the next launch passed its PDL wait;
* sweep (``--sweep``): the graph time of every valid (warps per token, vectors per thread) plan
  at each T, next to the launcher's own choice (``--plans`` names the plans; vectors per thread
  -1 is the two-pass wide-row kernel; a suffix ``pD`` sets the L2 prefetch distance in grid
  strides, ``eE`` early weights on (1) or off (0), ``bB`` one epoch reader per block (1) or per
  warp (0): ``2x8x1p0``, ``8x4x1e0``, ``16x1x1b0``).

    python benchmarks/trace_kernel.py --json trace.json [--tokens 1 64 1024 8192] [--sweep]

Times are microseconds per call (graph replay) or per phase (trace); the JSON names the card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PHASES = ("launch_to_wait", "load_and_reduce", "send", "exchange_wait", "normalize_store")
# plans tried by --sweep (see _plan; a knob left out is the launcher's choice)
SWEEP_SMALL = ["16x1x1", "16x1x1b0", "8x2x1", "8x2x1b0", "4x4x1", "4x4x1b0"]
SWEEP_LARGE = ["8x4x1", "4x4x1", "4x4x1b0", "4x4x1e0", "2x8x1", "2x8x1b0", "2x8x1e0", "2x8x1p0", "2x8x1p2"]


def _graph_us(ctx: Any, fn) -> Dict[str, float]:
    """Per-call us of a CUDA graph of back-to-back fn() calls (the benchmark's own timing,
    allreduce_rms.bench): median, p20 and p80 over its samples, each the slowest rank's."""
    from allreduce_rms import bench

    samples = bench._graph_samples(ctx, fn)
    stats = [bench._median(samples), bench.percentile(samples, 20), bench.percentile(samples, 80)]
    return dict(zip(("median", "p20", "p80"), ctx.max_over_ranks(stats)))


def _phases(rows: torch.Tensor) -> Dict[str, Any]:
    """Median per-phase us of traced launches (rows: [n, 8] int64 stamps, 0 = unused row): block
    0's phases and its PDL wait to its last store; in a trace build also, from block 0's PDL wait,
    the grid's latest first row reduced and sent and its latest last store, and the gap from that
    last store to the next launch's PDL wait."""
    rows = rows[rows[:, 0] > 0]
    rows = rows[torch.argsort(rows[:, 0])]
    d = lambda a, b: (rows[:, b] - rows[:, a]).double() / 1e3  # noqa: E731
    out: Dict[str, Any] = {}
    for name, (a, b) in zip(PHASES, ((0, 1), (1, 2), (2, 3), (3, 4), (4, 5))):
        out[name] = float(d(a, b).median())
    out["entry_to_stored"] = float(d(0, 5).median())
    out["wait_to_stored"] = float(d(1, 5).median())
    all_blocks = bool((rows[:, 7] > 0).all())  # a trace build (ALLREDUCE_RMS_TRACE_ALL_BLOCKS=ON)
    if all_blocks:
        out["wait_to_last_block_loaded"] = float(d(1, 6).median())
        out["wait_to_last_block_stored"] = float(d(1, 7).median())
    if len(rows) > 2:
        # differences of the int64 stamps first: a double holds a globaltimer reading (about 1.8e18
        # ns) only to 256 ns (runs before this fix report these two in 0.25 us steps)
        out["period_between_calls"] = float((rows[1:, 1] - rows[:-1, 1]).double().median() / 1e3)
        if all_blocks:
            out["last_block_stored_to_next_wait"] = float((rows[1:, 1] - rows[:-1, 7]).double().median() / 1e3)
    out["launches_traced"] = int(len(rows))
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    import allreduce_rms
    from allreduce_rms import _native, bench
    from allreduce_rms.ops import fused_plan

    front = _native.front()
    ws = allreduce_rms.Workspace(max_tokens=16384, path="fused", timeout_ms=20_000)
    device = torch.device("cuda", rank)
    # graphs of 20 back-to-back calls, 10 replays per sample, 7 samples (2 for a traced pass)
    cfg = bench.BenchConfig(device="cuda", iters=7, graph_calls=20, graph_replays=10)
    ctx = bench._Rank(rank, world, device, cfg, None)
    trace_ctx = bench._Rank(rank, world, device, dataclasses.replace(cfg, iters=2), None)
    out: Dict[str, Any] = {"card": torch.cuda.get_device_name(), "tp": world, "torch": torch.__version__}

    out["floors_us"] = {name: _graph_us(ctx, fn) for name, fn in bench.floor_calls(ws, device).items()}
    q_size, kv_size = 48 * 128 // world, 8 * 128 // world
    trace = torch.zeros(256, front.TRACE_POINTS, dtype=torch.int64, device="cuda")
    results: List[Dict[str, Any]] = []
    for tokens in args.tokens:
        g = torch.Generator(device="cuda").manual_seed(tokens)
        qkv = (torch.randn(tokens, q_size + 2 * kv_size, generator=g, device="cuda") * (rank + 1)).to(torch.bfloat16)
        wq = torch.ones(q_size, dtype=torch.bfloat16, device="cuda")
        wk = torch.ones(kv_size, dtype=torch.bfloat16, device="cuda")
        call = lambda: allreduce_rms.qk_norm(qkv, wq, wk, q_size, kv_size, 1e-6, ws)  # noqa: E731
        entry: Dict[str, Any] = {"T": tokens, "plan": fused_plan(qkv, wq, wk, q_size, kv_size, ws)}
        entry["graph_us"] = _graph_us(ctx, call)
        ws._native.set_trace(trace.data_ptr(), trace.shape[0])
        trace.zero_()
        bench._graph_samples(trace_ctx, call)
        ws._native.set_trace(0, 0)
        torch.cuda.synchronize()
        entry["trace_rank_us"] = _phases(trace.cpu())
        if args.sweep:
            sweep = {}
            plans = args.plans or [_plan(text) for text in (SWEEP_SMALL if tokens <= 64 else SWEEP_LARGE)]
            for plan in plans:
                warps, vpt = plan[:2]
                if vpt > 0 and warps * 32 * vpt < (q_size + kv_size) // 8:
                    continue
                front.set_plan_override(_native.dl_device_type(), *plan)
                sweep[_plan_name(plan)] = _graph_us(ctx, call)["median"]
            front.set_plan_override(_native.dl_device_type(), 0, 0, 0, -1, -1, -1)
            entry["sweep_us"] = sweep
        results.append(entry)
        if rank == 0:
            print(f"T={tokens}: {entry['graph_us']['median']:.2f} us, plan {entry['plan']}, "
                  f"phases {entry['trace_rank_us']}" + (f", sweep {entry.get('sweep_us')}" if args.sweep else ""),
                  flush=True)
    gathered: List[Any] = [None] * world
    out["runs"] = results
    # a trace build (ALLREDUCE_RMS_TRACE_ALL_BLOCKS=ON) is seen by its all-block stamps; its graph
    # times carry their small cost (README, Results)
    out["trace_build"] = any("wait_to_last_block_stored" in e["trace_rank_us"] for e in results)
    dist.all_gather_object(gathered, results)
    out["per_rank"] = [[{"T": e["T"], "trace_rank_us": e["trace_rank_us"]} for e in r] for r in gathered]
    ws.close()
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


KNOBS = "peb"  # suffix letters, in order: prefetch distance, early weights, epoch reader per block


def _plan(text: str) -> tuple:
    """'2x8x1' or '2x8x1p2e0b1' -> (warps, vpt, tokens per block, prefetch, early weights, epoch
    per block), the set_plan_override arguments; a knob left out is -1 (the launcher's choice)."""
    match = re.fullmatch(r"(-?\d+)x(-?\d+)x(\d+)(?:p(\d+))?(?:e([01]))?(?:b([01]))?", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"plan {text!r}: expected WARPSxVPTxTOKENS[pPREFETCH][eEARLY][bPERBLOCK], e.g. 2x8x1p2")
    return tuple(-1 if v is None else int(v) for v in match.groups())


def _plan_name(plan: tuple) -> str:
    warps, vpt, per_block = plan[:3]
    return f"{warps}x{vpt}x{per_block}" + "".join(f"{k}{v}" for k, v in zip(KNOBS, plan[3:]) if v >= 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 1024, 4096, 8192, 16384])
    parser.add_argument("--sweep", action="store_true", help="time every valid plan at each T")
    parser.add_argument("--plans", type=_plan, nargs="+",
                        help="with --sweep: these plans (WARPSxVPTxTOKENS[pPREFETCH][eEARLY][bPERBLOCK], e.g. "
                             "2x8x1 or 2x8x1p0b0; VPT -1 is the wide-row kernel) at every T instead of the built-in lists")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    world = torch.cuda.device_count()
    if world < 2:
        print("needs 2+ GPUs", file=sys.stderr)
        return 2
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, port, args, queue), nprocs=world, start_method="spawn")
    out = queue.get()
    print(json.dumps(out["floors_us"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
