"""Shared numerics for the tests: tolerances per dtype and the relative error against float64."""

from __future__ import annotations

import torch

# Relative norm error ||out - ref|| / ||ref|| against the float64 reference. The output is
# rounded once to its dtype (inputs are already in it), so the error is that rounding: at most
# half a unit in the last place per element, a relative RMS of about eps/(2*sqrt(3)) with eps =
# 2^-24 (fp32), 2^-11 (fp16), 2^-8 (bf16): 1.7e-8, 1.4e-4, 1.1e-3. The bounds below leave ~3.5x
# room for the fp32 accumulation. They are tight enough that a plausible bug fails by a wide
# margin when the ranks' shards have different scales (SHARD_SCALE): a missing all-reduce is
# off by tens of percent, eps added per rank or the weight applied twice by far more than 4e-3.
TOLERANCE = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def shard_scale(rank: int) -> float:
    """Scale of rank r's shard in multi-rank tests (r + 1): with equal scales every rank's mean
    square is close to the global one, and a kernel that skips the exchange would still pass."""
    return float(rank + 1)
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
