"""Pure-torch pieces of the op: statistics, normalization and the float64 reference.

Used on CPU tensors, where no backend kernel applies, and as the reference the tests and the
CLI compare every kernel against.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Per-row sum of squares of a [T, W] tensor, accumulated in float32; returns [T] float32."""
    xf = x.float()
    return (xf * xf).sum(dim=-1)


def normalize(
    x: torch.Tensor,
    total_sum_sq: torch.Tensor,
    full_width: int,
    weight: torch.Tensor,
    eps: float,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x * rsqrt(total_sum_sq / full_width + eps) * weight, computed in float32, cast to x.dtype.

    x: [T, W]; total_sum_sq: [T] float32 (summed over all ranks); weight: [W].
    Writes into `out` when given (may alias x) and returns it.
    """
    scale = torch.rsqrt(total_sum_sq.float() / full_width + eps).unsqueeze(-1)
    y = (x.float() * scale * weight.float()).to(x.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


def rms_norm_reference(shards: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], eps: float) -> list:
    """Float64 reference of the TP-sharded RMSNorm: shards[r] is rank r's [T, W_r] slice.

    Returns the normalized shards in float64, one per rank.

    Raises:
        ValueError: no shards, a different number of weights than shards, shards with different
            row counts, or a weight whose width does not match its shard.
    """
    if len(shards) == 0 or len(shards) != len(weights):
        raise ValueError(f"shards, weights: need one weight per shard and at least one shard, got "
                         f"{len(shards)} shards and {len(weights)} weights")
    for r, (s, w) in enumerate(zip(shards, weights)):
        if s.shape[:-1] != shards[0].shape[:-1]:
            raise ValueError(f"shards: shard {r} has shape {tuple(s.shape)}, shard 0 {tuple(shards[0].shape)}; "
                             "the rows must match")
        if w.dim() != 1 or w.shape[0] != s.shape[-1]:
            raise ValueError(f"weights: weight {r} has shape {tuple(w.shape)}, its shard is {s.shape[-1]} wide")
    xs = [s.double() for s in shards]
    total = sum((x * x).sum(dim=-1) for x in xs)
    full_width = sum(x.shape[-1] for x in xs)
    scale = torch.rsqrt(total / full_width + eps).unsqueeze(-1)
    return [x * scale * w.double() for x, w in zip(xs, weights)]
