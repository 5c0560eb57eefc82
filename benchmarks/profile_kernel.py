"""Where the fused kernel's time goes: the same kernel without the exchange (one GPU, LOCAL mode).

The fused qk_norm kernel does four things per token: load q and k, reduce, exchange the sums
with the peers, normalize and store. LOCAL mode runs the identical code with the exchange
removed, so comparing the two on the same card separates memory-pipeline cost from exchange
cost. This script times LOCAL mode by CUDA-graph replay of back-to-back calls at the MiniMax-M2
TP2 shapes, next to the HBM roofline from a device copy measured in the same process, and
writes JSON. With ``--ncu-tokens T`` it instead makes a handful of calls at T tokens for Nsight
Compute to capture (``scripts/gpu_run.sh`` stage ``profile`` does both).

    python benchmarks/profile_kernel.py --json out.json
    ncu --set full -k regex:norm_kernel --launch-skip 5 --launch-count 1 \\
        python benchmarks/profile_kernel.py --ncu-tokens 8192
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List

import torch

import allreduce_rms
from allreduce_rms import bench

TOKENS = [1, 8, 64, 256, 1024, 4096, 8192, 16384]


def one_gpu_rank() -> "bench._Rank":
    """A one-rank benchmark context on this GPU, so LOCAL mode is timed and its roofline computed
    by the benchmark's own helpers (a graph of 16 back-to-back calls; here one replay per sample,
    median of 20 samples)."""
    cfg = bench.BenchConfig(device="cuda", iters=20, graph_calls=16, graph_replays=1)
    return bench._Rank(0, 1, torch.device("cuda", torch.cuda.current_device()), cfg, None)


def problem(tokens: int, q_size: int, kv_size: int):
    qkv = torch.randn(tokens, q_size + 2 * kv_size, device="cuda", dtype=torch.bfloat16)
    q_weight = torch.randn(q_size, device="cuda", dtype=torch.bfloat16)
    k_weight = torch.randn(kv_size, device="cuda", dtype=torch.bfloat16)
    return lambda: allreduce_rms.qk_norm(qkv, q_weight, k_weight, q_size, kv_size, 1e-6)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--q-size", type=int, default=3072, help="q columns per rank (MiniMax-M2 at TP2)")
    parser.add_argument("--kv-size", type=int, default=512, help="k (and v) columns per rank")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--ncu-tokens", type=int, help="only make 8 calls at this many tokens (for ncu)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_kernel: needs a GPU", file=sys.stderr)
        return 2
    if args.ncu_tokens:
        fn = problem(args.ncu_tokens, args.q_size, args.kv_size)
        for _ in range(8):
            fn()
        torch.cuda.synchronize()
        return 0

    ctx = one_gpu_rank()
    bandwidth = bench.measure_copy_bandwidth(ctx)
    rows: List[Dict[str, float]] = []
    print(f"{'T':>6} {'local us':>9} {'roofline us':>12} {'ratio':>6}")
    for tokens in args.tokens:
        us = bench._time_graph(ctx, problem(tokens, args.q_size, args.kv_size))
        roofline = bench.roofline_us(bench.roofline_bytes(tokens, args.q_size, args.kv_size, 2), bandwidth)
        rows.append({"T": tokens, "local_us": us, "roofline_us": roofline, "local_over_roofline": us / roofline})
        print(f"{tokens:>6} {us:>9.2f} {roofline:>12.2f} {us / roofline:>6.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(0), "mode": "local (no exchange)", "dtype": "bf16",
                       "q_size": args.q_size, "kv_size": args.kv_size, "copy_bandwidth_GBps": bandwidth,
                       "timing": "CUDA-graph replay of 16 back-to-back calls, median of 20", "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
