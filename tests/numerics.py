"""Shared numerics for the tests: tolerances per dtype and the relative error against float64."""

from __future__ import annotations

import torch

# Relative norm error ||out - ref|| / ||ref|| against the float64 reference. The output is
# rounded once to its dtype, so the bound is a few units of that dtype's epsilon:
# fp32 2^-24, fp16 2^-11, bf16 2^-8.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 for empty tensors); NaN anywhere gives inf."""
    if out.numel() == 0:
        return 0.0
    o = out.double()
    r = ref.double().to(o.device)
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def reference(shards, weights, eps):
    """Float64 TP RMSNorm of per-rank shards (list of [T, W_r]); returns float64 shards."""
    xs = [s.double() for s in shards]
    total = sum((x * x).sum(dim=-1) for x in xs)
    width = sum(x.shape[-1] for x in xs)
    scale = torch.rsqrt(total / width + eps).unsqueeze(-1)
    return [x * scale * w.double() for x, w in zip(xs, weights)]
