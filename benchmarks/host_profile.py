"""What one eager call costs on the host, part by part (issue 14's host profile).

Spawns one process per GPU (TP = all visible GPUs, at least 2), opens a fused workspace and, for
MiniMax-M2 shapes (48 q heads, 8 kv heads, head_dim 128, bf16) at each T, times host enqueue time
per call (a loop of --calls calls, then a device synchronize and a barrier; median over
--samples samples; the slowest rank) of:

* the floor: ``x.add_(0)`` on a tensor of the same device (issue 14's "eager_floor");
* the primitives a call is made of: ``torch.empty``, ``torch.cuda.current_stream()``, the raw
  stream handle, a column view, ``data_ptr()``, ``os.environ.get``;
* the native launch alone, its arguments computed once (the front module crossing plus the
  backend's launch, no Python validation, no allocation), with 21 arguments and as the hot
  path's prepared launch (allreduce_rms._hot_path) with 7, and the hot path's key;
* the torch hot ops (allreduce_rms._hot_path, cpp/hot_ops.cpp) called directly: serving a
  remembered qk_norm shape, and a call they do not serve (3-D qkv: the dispatcher crossing alone);
* the public calls: ``rms_norm`` and ``qk_norm``, out of place and in place, served by the hot
  ops, then again with the hot ops switched off (served by the Python dict, as before them), and
  the calls through ``torch.ops.allreduce_rms.*`` (the custom ops torch.compile traces to).

    python benchmarks/host_profile.py --json host-profile.json [--tokens 1 1024]

Microseconds per call; the JSON names the card and the torch version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist


def _host_us(fn: Callable[[], Any], calls: int, samples: int, world: int, flag: torch.Tensor) -> float:
    """Median over samples of host us per call of `calls` back-to-back fn(), the slowest rank's."""
    for _ in range(3):
        fn()
    per_call: List[float] = []
    for _ in range(samples):
        torch.cuda.synchronize()
        dist.all_reduce(flag)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    per_call.sort()
    median = torch.tensor([per_call[len(per_call) // 2]], dtype=torch.float64, device="cuda")
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return float(median.item())


def _noop_ops() -> Dict[str, Callable[[torch.Tensor], Any]]:
    """Two do-nothing ops with a Python CUDA kernel: what crossing torch.ops costs by itself,
    registered through torch.library.custom_op (as allreduce_rms's ops are) and through a bare
    torch.library.Library.impl."""
    lib = torch.library.Library("arms_host_probe", "DEF")
    lib.define("bare(Tensor x) -> ()")
    lib.impl("bare", lambda x: None, "CUDA")
    _noop_ops.lib = lib  # type: ignore[attr-defined]  # keep the registration alive

    @torch.library.custom_op("arms_host_probe::wrapped", mutates_args=())
    def wrapped(x: torch.Tensor) -> None:
        return None

    return {"torch.ops no-op (custom_op)": torch.ops.arms_host_probe.wrapped,
            "torch.ops no-op (Library.impl)": torch.ops.arms_host_probe.bare}


def _worker(rank: int, world: int, args: argparse.Namespace) -> Dict[str, Any]:
    """One rank (allreduce_rms.launch.run_ranks: NCCL group up, cuda:rank current)."""
    import allreduce_rms
    from allreduce_rms import _native

    ws = allreduce_rms.Workspace(max_tokens=max(args.tokens), path="fused", timeout_ms=20_000)
    device = torch.device("cuda", rank)
    flag = torch.zeros(1, device=device)
    q_size, kv_size = 48 * 128 // world, 8 * 128 // world
    out: Dict[str, Any] = {"card": torch.cuda.get_device_name(), "tp": world, "torch": torch.__version__,
                           "calls_per_sample": args.calls, "samples": args.samples, "runs": []}
    noop_ops = _noop_ops()
    time_us = lambda fn: _host_us(fn, args.calls, args.samples, world, flag)  # noqa: E731
    for tokens in args.tokens:
        qkv = (torch.randn(tokens, q_size + 2 * kv_size, device=device) * (rank + 1)).to(torch.bfloat16)
        x = qkv[:, :q_size].contiguous()
        wq = torch.ones(q_size, dtype=torch.bfloat16, device=device)
        wk = torch.ones(kv_size, dtype=torch.bfloat16, device=device)
        key = ws.key
        ops = torch.ops.allreduce_rms
        native = _native.front()
        stream = _native.current_stream(device)
        base, stride = qkv.data_ptr(), qkv.stride(0)
        native_args = (2, 2, tokens, 1e-6, stream, base, base, wq.data_ptr(), 2, stride, stride, q_size,
                       q_size * world, base + 2 * q_size, base + 2 * q_size, wk.data_ptr(), 2, stride, stride,
                       kv_size, kv_size * world)
        from allreduce_rms import _hot_path

        allreduce_rms.qk_norm(qkv, wq, wk, q_size, kv_size, 1e-6, ws, inplace=True)  # remembers the shape
        hot_key = lambda: _hot_path.qk_norm_key(qkv, wq, wk, q_size, kv_size, 1e-6, True)  # noqa: E731
        entry = ws._hot_calls[hot_key()]
        k_ptr = base + 2 * q_size
        parts: Dict[str, Callable[[], Any]] = {
            "eager_floor: x.add_(0)": lambda: x.add_(0),
            "torch.empty([T, q_size])": lambda: torch.empty((tokens, q_size), dtype=torch.bfloat16, device=device),
            "torch.cuda.current_stream()": torch.cuda.current_stream,
            "raw stream handle": lambda: _native.current_stream(device),
            "column view qkv[..., :q_size]": lambda: qkv[..., :q_size],
            "data_ptr()": qkv.data_ptr,
            "os.environ.get": lambda: os.environ.get("ALLREDUCE_RMS_DEBUG", "0"),
            "x.new_empty(T, q_size)": lambda: qkv.new_empty(tokens, q_size),
            "as_strided column view": lambda: qkv.as_strided((tokens, q_size), (stride, 1)),
            "Python dict key + lookup (qk_norm)": lambda: ws._hot_calls.get(hot_key()),
            "native launch, 21 arguments (qk_norm in place)": lambda: ws._native.launch(*native_args),
            "prepared launch, 7 arguments (qk_norm in place)":
                lambda: entry.launch(stream, tokens, base, base, k_ptr, wq.data_ptr(), wk.data_ptr()),
            "rms_norm out of place": lambda: allreduce_rms.rms_norm(x, wq, 1e-6, ws),
            "rms_norm in place (out=x)": lambda: allreduce_rms.rms_norm(x, wq, 1e-6, ws, out=x),
            "qk_norm out of place": lambda: allreduce_rms.qk_norm(qkv, wq, wk, q_size, kv_size, 1e-6, ws),
            "qk_norm in place": lambda: allreduce_rms.qk_norm(qkv, wq, wk, q_size, kv_size, 1e-6, ws, inplace=True),
            "empty kernel launch (backend floor_launch, PDL)": lambda: ws._native.floor(native.FLOOR_EMPTY, stream),
            "torch.ops qk_norm.default": lambda: ops.qk_norm.default(qkv, wq, wk, q_size, kv_size, 1e-6, key),
            "torch.ops rms_norm": lambda: ops.rms_norm(x, wq, 1e-6, key),
            "torch.ops qk_norm": lambda: ops.qk_norm(qkv, wq, wk, q_size, kv_size, 1e-6, key),
            "torch.ops qk_norm_ (in place)": lambda: ops.qk_norm_(qkv, wq, wk, q_size, kv_size, 1e-6, key),
        }
        parts.update({name: (lambda op=op: op(x)) for name, op in noop_ops.items()})
        qk_hot, hot_id = _hot_path._qk_hot, ws._hot_id
        if qk_hot is not None:
            qkv3 = qkv.view(1, tokens, -1)
            parts.update({
                "hot op qk_norm out of place (served)":
                    lambda: qk_hot(qkv, wq, wk, q_size, kv_size, 1e-6, hot_id, False),
                "hot op qk_norm in place (served)": lambda: qk_hot(qkv, wq, wk, q_size, kv_size, 1e-6, hot_id, True),
                "hot op call not served (3-D qkv)": lambda: qk_hot(qkv3, wq, wk, q_size, kv_size, 1e-6, hot_id, True),
            })
        run = {"T": tokens, "host_us": {name: time_us(fn) for name, fn in parts.items()}}
        # the public calls again, served by the Python dict (the hot ops switched off)
        saved = _hot_path._rms_hot, _hot_path._qk_hot
        _hot_path._rms_hot = _hot_path._qk_hot = None
        try:
            for name in ("rms_norm out of place", "rms_norm in place (out=x)", "qk_norm out of place",
                         "qk_norm in place"):
                run["host_us"][name + ", Python dict path"] = time_us(parts[name])
        finally:
            _hot_path._rms_hot, _hot_path._qk_hot = saved
        floor = run["host_us"]["eager_floor: x.add_(0)"]
        run["ratio_to_floor"] = {name: us / floor for name, us in run["host_us"].items()}
        out["runs"].append(run)
        if rank == 0:
            print(f"T={tokens}")
            for name, us in run["host_us"].items():
                print(f"  {name:50s} {us:7.2f} us  {us / floor:5.2f}x floor", flush=True)
    ws.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 1024])
    parser.add_argument("--calls", type=int, default=200, help="calls per timed sample")
    parser.add_argument("--samples", type=int, default=9, help="timed samples per row")
    parser.add_argument("--label", default="", help="stored in the JSON (e.g. the commit)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    world = torch.cuda.device_count()
    if world < 2:
        print("needs 2+ GPUs", file=sys.stderr)
        return 2
    from allreduce_rms.launch import run_ranks

    out = run_ranks(_worker, world, args, backend="nccl", timeout=600, bind_device=True)[0]
    out["label"] = args.label
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
