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


# ------------------------------------------------------------------------- norm variants (issue 15)
# The options of rms_norm / qk_norm beyond the plain RMSNorm, computed in float32 on one rank's
# columns. allreduce_rms.variants validates the options and exchanges the statistics; these
# functions only do the arithmetic, in the order the docstrings state (the order decides the bits).
def activation(gate: torch.Tensor, gate_act: str) -> torch.Tensor:
    """silu(gate) or sigmoid(gate) in float32 (gate of any float dtype); same shape as gate."""
    g = gate.float()
    return torch.nn.functional.silu(g) if gate_act == "silu" else torch.sigmoid(g)


def gated_input(x: torch.Tensor, gate: Optional[torch.Tensor], gate_act: str, gate_position: str) -> torch.Tensor:
    """The float32 values the statistic is taken of: x * act(gate) when the gate comes "before"
    the norm (Mamba2), else x; x and gate [T, W]."""
    xf = x.float()
    if gate is not None and gate_position == "before":
        xf = xf * activation(gate, gate_act)
    return xf


def group_sum_of_squares(xf: torch.Tensor, group: int) -> torch.Tensor:
    """Sums of squares of consecutive column groups of `group` columns of a float32 [T, W]
    tensor (group divides W); returns [T, W // group] float32."""
    tokens, width = xf.shape
    return (xf * xf).view(tokens, width // group, group).sum(dim=-1)


def normalize_variant(
    xf: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    dtype: torch.dtype,
    *,
    gate: Optional[torch.Tensor] = None,
    gate_act: str = "silu",
    gate_position: str = "before",
    weight_offset: float = 0.0,
    weight_in_input_dtype: bool = False,
) -> torch.Tensor:
    """Scale, weight and gate one rank's columns; returns [T, W] in `dtype`.

    xf: [T, W] float32 from :func:`gated_input`; rstd: float32, [T, W] or [T, 1], the reciprocal
    RMS of each column's group, rsqrt(sum_sq / norm_width + eps); weight: [W] of any float
    dtype; gate: [T, W] or None. With n = xf * rstd and w = weight_offset + weight (float32):

    * weight_in_input_dtype False (OLMo2, Gemma, Falcon-H1): y = n * w, then, gate "after",
      y * act(gate); all float32, rounded to `dtype` once.
    * weight_in_input_dtype True (HF LlamaRMSNorm, MiniMaxM2RMSNorm, MambaRMSNormGated, vLLM):
      y = w.to(dtype) * n.to(dtype), rounded to `dtype`; gate "after" (MiniMax-Text-01):
      y = act(gate).to(gate.dtype) * y, rounded to `dtype`. Each product of two rounded values
      is exact in float32 and rounded once, as torch's own half-precision multiply does.
    """
    n = xf * rstd
    w = weight.float()
    if weight_offset != 0.0:
        w = w + weight_offset
    after = gate is not None and gate_position == "after"
    if not weight_in_input_dtype:
        y = n * w
        if after:
            y = y * activation(gate, gate_act)  # type: ignore[arg-type]
        return y.to(dtype)
    y = (w.to(dtype).float() * n.to(dtype).float()).to(dtype)
    if after:
        a = activation(gate, gate_act).to(gate.dtype)  # type: ignore[union-attr]
        y = (a.float() * y.float()).to(dtype)
    return y


def variant_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    gate: Optional[torch.Tensor] = None,
    gate_act: str = "silu",
    gate_position: str = "before",
    group_size: Optional[int] = None,
    weight_offset: float = 0.0,
    norm_width: Optional[int] = None,
) -> torch.Tensor:
    """Float64 reference of a norm variant on the FULL (unsharded) rows: x [T, F], weight [F],
    gate [T, F] or None. Returns [T, F] float64:

        g = x * act(gate) ("before") or x;  per group of group_size columns (default: all F):
        r = rsqrt(sum(g^2) / (norm_width or group size) + eps);  y = g * r * (weight_offset + weight)
        then y * act(gate) when the gate comes "after".

    Rounding conventions do not apply: it is the exact value both conventions round.
    Raises ValueError when group_size does not divide F.
    """
    xd = x.double()
    tokens, full = xd.shape
    group = full if group_size is None else group_size
    if full % group:
        raise ValueError(f"group_size={group} does not divide the width {full}")
    act = None
    if gate is not None:
        gd = gate.double()
        act = torch.nn.functional.silu(gd) if gate_act == "silu" else torch.sigmoid(gd)
        if gate_position == "before":
            xd = xd * act
    grouped = xd.view(tokens, full // group, group)
    divisor = norm_width if norm_width is not None else group
    rstd = torch.rsqrt((grouped * grouped).sum(dim=-1, keepdim=True) / divisor + eps)
    y = (grouped * rstd).view(tokens, full) * (weight_offset + weight.double())
    if act is not None and gate_position == "after":
        y = y * act
    return y
