"""Benchmark rows of a norm variant: Mamba2's gated norm over a TP-sharded row (issue 15).

The shape is a Bamba-9B-like Mamba2 mixer: d_inner 8192 in one group (so the statistic spans
every rank), the gate before the norm (y = norm(x * silu(z))) and Hugging Face's rounding
(MambaRMSNormGated: weight_in_input_dtype=True). Methods, timed like the benchmark's own rows
(CUDA-graph replay of back-to-back calls, slowest rank):

* ``fused``: ``rms_norm(x, w, eps, ws, gate=z, group_size=d_inner, weight_in_input_dtype=True)`` on a
  fused workspace (the two-pass wide-row kernel with the Lamport exchange);
* ``fallback``: the same call on a fallback workspace (local kernel -> NCCL all-reduce -> local
  kernel);
* ``unfused_eager``: what a serving engine runs without this library: torch ops for the gated
  input and its sum of squares, an NCCL all-reduce, torch ops for the normalization.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist

D_INNER = 8192
SHAPE = "mamba2_gated"
DESCRIPTION = (f"Mamba2 gated norm (Bamba-9B-like): d_inner {D_INNER}, one group, gate before, "
               "silu, weight_in_input_dtype")
METHODS = ("fused", "fallback", "unfused_eager")
EPS = 1e-5


def unfused_gated_norm(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    """The engine's unfused gated norm on one rank: float32 gated input, local sum of squares,
    all-reduce, normalize, Hugging Face's rounding."""
    xf = x.float() * torch.nn.functional.silu(z.float())
    stats = xf.pow(2).sum(-1, keepdim=True)
    if world > 1:
        dist.all_reduce(stats, group=group)
    return w * (xf * torch.rsqrt(stats / (x.shape[-1] * world) + EPS)).to(x.dtype)


def _call(method: str, spaces: Dict[str, Any], x: torch.Tensor, z: torch.Tensor, w: torch.Tensor,
          world: int) -> Callable[[], Any]:
    from .custom_ops import rms_norm

    if method == "unfused_eager":
        group = spaces["fused"].group if "fused" in spaces else spaces["fallback"].group
        return lambda: unfused_gated_norm(x, z, w, group, world)
    ws = spaces[method]
    return lambda: rms_norm(x, w, EPS, ws, gate=z, group_size=D_INNER, weight_in_input_dtype=True)


def measure_variant_rows(ctx: Any, spaces: Dict[str, Any], tokens_list: List[int]) -> List[Dict[str, Any]]:
    """One row per (T, method) of :data:`METHODS` that this run can time, bench's row format."""
    from .bench import DTYPES, SAMPLE_KEYS, _error_text, _measure

    dtype = DTYPES[ctx.cfg.dtype]
    width = D_INNER // ctx.world
    rows: List[Dict[str, Any]] = []
    methods = [m for m in METHODS if m == "unfused_eager" or (m in spaces and spaces[m].path == m)]
    for tokens in tokens_list:
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.rank * 7919 + tokens)
        x = (torch.randn(tokens, width, generator=gen, device=ctx.device) * (ctx.rank + 1)).to(dtype)
        z = torch.randn(tokens, width, generator=gen, device=ctx.device).to(dtype)
        w = (1 + 0.1 * torch.randn(width, generator=gen, device=ctx.device)).to(dtype)
        for method in methods:
            row: Dict[str, Any] = {"shape": SHAPE, "T": tokens, "method": method, "error": None}
            error = None
            try:
                row.update(_measure(ctx, _call(method, spaces, x, z, w, ctx.world)))
            except Exception as exc:
                error = _error_text(exc)
            error = ctx.agree_error(error)
            if error is not None:
                row.update({k: None for k in SAMPLE_KEYS})
                row["error"] = error
            else:
                values = ctx.max_over_ranks([row.get(k) if row.get(k) is not None else -1.0 for k in SAMPLE_KEYS])
                row.update({k: (v if v >= 0 else None) for k, v in zip(SAMPLE_KEYS, values)})
            rows.append(row)
    return rows
