"""Eager host time per call, next to a bare torch op timed in the same run (issue 14).

Serving engines run prefill and mixed batches outside CUDA graphs, where the CPU thread that
enqueues the kernels is the bottleneck at small batches: the host time of one call multiplies by
layers and steps. This part of the benchmark times, on the fused path, the host time to enqueue
one call (a loop of :data:`CALLS` calls, then a synchronize and a barrier; median over
:data:`SAMPLES` samples; the slowest rank) of

* the public functions ``allreduce_rms.rms_norm`` / ``qk_norm``, out of place and in place
  (method ``"fused"``);
* the same calls through ``torch.ops.allreduce_rms.*.default``, the op overloads a
  ``torch.compile`` graph calls (method ``"fused_custom_op"``; rms_norm has no in-place op);
* ``x.add_(0)`` on a tensor of the same device (method ``"eager_floor"``): the cost of the
  cheapest torch op on this host, the unit of the targets.

Targets (at T = 1 and 1024): the public functions at most :data:`LIMITS` ``["fused"]`` times
the floor, the custom ops at most ``["fused_custom_op"]`` times.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

CALLS = 100    # calls per timed sample
SAMPLES = 7    # timed samples per row
TARGET_TOKENS = (1, 1024)
LIMITS = {"fused": 1.5, "fused_custom_op": 2.0}  # x eager_floor
EPS = 1e-6


def host_samples(ctx: Any, fn: Callable[[], Any]) -> List[float]:
    """Host us per call of SAMPLES loops of CALLS back-to-back fn() (each rank's own samples)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(SAMPLES):
        ctx.sync()
        t0 = time.perf_counter()
        for _ in range(CALLS):
            fn()
        samples.append((time.perf_counter() - t0) / CALLS * 1e6)
    ctx.sync()
    return samples


def _calls(ws: Any, qkv: torch.Tensor, x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, q_size: int,
           kv_size: int) -> List[Tuple[str, str, Callable[[], Any]]]:
    """(method, call, fn) for every timed row at one T."""
    import allreduce_rms

    ops, key = torch.ops.allreduce_rms, ws.key
    return [
        ("eager_floor", "x.add_(0)", lambda: x.add_(0)),
        ("fused", "rms_norm", lambda: allreduce_rms.rms_norm(x, wq, EPS, ws)),
        ("fused", "rms_norm in place", lambda: allreduce_rms.rms_norm(x, wq, EPS, ws, out=x)),
        ("fused", "qk_norm", lambda: allreduce_rms.qk_norm(qkv, wq, wk, q_size, kv_size, EPS, ws)),
        ("fused", "qk_norm in place", lambda: allreduce_rms.qk_norm(qkv, wq, wk, q_size, kv_size, EPS, ws, inplace=True)),
        ("fused_custom_op", "rms_norm", lambda: ops.rms_norm.default(x, wq, EPS, key)),
        ("fused_custom_op", "qk_norm", lambda: ops.qk_norm.default(qkv, wq, wk, q_size, kv_size, EPS, key)),
        ("fused_custom_op", "qk_norm in place", lambda: ops.qk_norm_.default(qkv, wq, wk, q_size, kv_size, EPS, key)),
    ]


def measure_host_rows(ctx: Any, ws: Any, q_size: int, kv_size: int, dtype: torch.dtype,
                      tokens_list: List[int]) -> List[Dict[str, Any]]:
    """One row per (T, method, call): host_us (median, slowest rank), p20/p80 and ratio_to_floor."""
    from .bench import percentile  # the benchmark's own percentile (bench imports this module lazily)

    rows: List[Dict[str, Any]] = []
    for tokens in tokens_list:
        qkv = torch.randn(tokens, q_size + 2 * kv_size, device=ctx.device).to(dtype)
        x = qkv[:, :q_size].contiguous()
        wq = torch.ones(q_size, dtype=dtype, device=ctx.device)
        wk = torch.ones(kv_size, dtype=dtype, device=ctx.device)
        floor = None
        for method, call, fn in _calls(ws, qkv, x, wq, wk, q_size, kv_size):
            samples = host_samples(ctx, fn)
            stats = ctx.max_over_ranks([percentile(samples, 50), percentile(samples, 20), percentile(samples, 80)])
            if method == "eager_floor":
                floor = stats[0]
            rows.append({"T": tokens, "method": method, "call": call, "host_us": stats[0], "host_us_p20": stats[1],
                         "host_us_p80": stats[2], "ratio_to_floor": stats[0] / floor if floor else None})
    return rows


def evaluate_host_targets(rows: Optional[List[Dict[str, Any]]], skip_reason: Optional[str]) -> List[Dict[str, Any]]:
    """One target per (T in TARGET_TOKENS, method in LIMITS): the worst call's ratio to the floor."""
    out = []
    for tokens in TARGET_TOKENS:
        for method, limit in LIMITS.items():
            what = "public functions" if method == "fused" else "torch.ops custom ops"
            entry: Dict[str, Any] = {"name": f"host T={tokens} {what}", "T": tokens, "kind": "host", "unit": "x floor",
                                     "limit": limit, "status": "not measured", "measured": None,
                                     "what": f"eager host time per call of the {what} / x.add_(0), worst call",
                                     "reference_kernel_us": None}
            mine = [r for r in rows or [] if r["T"] == tokens and r["method"] == method and r["ratio_to_floor"]]
            if mine:
                worst = max(mine, key=lambda r: r["ratio_to_floor"])
                entry.update(measured=worst["ratio_to_floor"], worst_call=worst["call"], host_us=worst["host_us"],
                             status="met" if worst["ratio_to_floor"] <= limit else "missed")
                entry["text"] = (f"{entry['status']}: {worst['ratio_to_floor']:.2f}x floor "
                                 f"({'<=' if entry['status'] == 'met' else '>'} {limit:g}x; worst {worst['call']}, "
                                 f"{worst['host_us']:.1f} µs)")
            else:
                entry["why"] = f"fused not measured: {skip_reason}" if skip_reason else f"no host rows at T={tokens}"
                entry["text"] = f"not measured (target <= {limit:g}x floor): {entry['why']}"
            out.append(entry)
    return out
