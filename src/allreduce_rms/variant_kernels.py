"""The norm variants on the GPU kernels (backend ABI 4): which path takes a validated variant call.

:mod:`allreduce_rms.variants` validates a call and holds its torch path; this module launches it
on the wide-row kernel instead whenever the tensors are on a GPU with the backend loaded:

* a group inside one rank (group_size divides this rank's width): each group is a kernel row of
  its own (``groups_in_row``), with a statistic of its own and nothing to exchange, so it is a
  local launch whatever the workspace;
* one statistic per row (no group_size, or a group that is the whole row): the fused exchange on
  a fused workspace, local kernel -> ``all_reduce`` -> local kernel on a fallback one, a local
  launch on one rank;
* a group covering k whole ranks (1 < k < world): the fused exchange adds only the partials of the
  k ranks of this rank's group (``rank_group``); on a fallback workspace the torch path serves it.

The kernel computes each variant with the formulas and rounding order of
:func:`allreduce_rms.fallback.normalize_variant`; silu and sigmoid use the device's exp and
division (fast math on CUDA), so gated results can differ from torch's by a few fp32 ulps.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import _native

_DTYPES = _native.DTYPE_CODES


def flags(gate: Optional[torch.Tensor], gate_act: str, gate_position: str, weight_in_input_dtype: bool) -> int:
    """ArmsVariantFlags of the options (backend_api.h)."""
    front = _native.front()
    value = front.WEIGHT_IN_INPUT_DTYPE if weight_in_input_dtype else 0
    if gate is not None:
        value |= front.GATE_BEFORE if gate_position == "before" else front.GATE_AFTER
        if gate_act == "sigmoid":
            value |= front.GATE_SIGMOID
    return value


def segment(inp: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, width: int, divisor: int,
            gate: Optional[torch.Tensor] = None, variant_flags: int = 0, weight_offset: float = 0.0,
            groups_in_row: int = 1) -> Tuple:
    """One segment of front.launch_variant: [T, *] rows of inp/out (and gate), width columns each
    (of one group when groups_in_row > 1), the sum of squares divided by divisor."""
    return (inp.data_ptr(), out.data_ptr(), weight.data_ptr(), _DTYPES[weight.dtype], inp.stride(0), out.stride(0),
            width, divisor, 0 if gate is None else gate.data_ptr(), 0 if gate is None else gate.stride(0),
            _DTYPES[gate.dtype] if gate is not None else 0, variant_flags, float(weight_offset), groups_in_row)


def ready(x: torch.Tensor) -> bool:
    """True when x is on a GPU whose backend kernels are loaded."""
    return x.is_cuda and _native.kernels_ready()


def launch(x: torch.Tensor, tokens: int, segments: Sequence[Tuple], eps: float, ws: Any, *,
           local: bool = False, rank_group: int = 0) -> bool:
    """Launch segments (of :func:`segment`) over ws's group; False when this path cannot serve
    the call (a group of ranks on a fallback workspace), and then nothing was launched.

    local: the statistic needs no exchange (groups inside one rank, or one rank)."""
    if tokens == 0:
        return True
    front, device = _native.front(), x.get_device()
    stream = _native.current_stream(x.device)
    dtype = _DTYPES[x.dtype]
    world = 1 if ws is None else ws.world_size
    if local or world == 1:
        front.launch_variant(None, _native.dl_device_type(), device, _native.MODE_LOCAL, dtype, tokens, eps, 0, stream,
                             0, list(segments))
        return True
    if ws.path == "fused":
        front.launch_variant(ws._native, _native.dl_device_type(), device, _native.MODE_LOCAL, dtype, tokens, eps, 0,
                             stream, rank_group, list(segments))
        return True
    if rank_group:
        return False  # the all-reduce below adds every rank's partial; the torch path adds its group's
    stats = torch.empty((tokens, len(segments)), dtype=torch.float32, device=x.device)
    front.launch_variant(None, _native.dl_device_type(), device, _native.MODE_STATS_OUT, dtype, tokens, eps,
                         stats.data_ptr(), stream, 0, list(segments))
    dist.all_reduce(stats, group=ws.group)
    front.launch_variant(None, _native.dl_device_type(), device, _native.MODE_STATS_IN, dtype, tokens, eps,
                         stats.data_ptr(), stream, 0, list(segments))
    return True


def rms_norm(x2: torch.Tensor, out2: torch.Tensor, weight: torch.Tensor, gate2: Optional[torch.Tensor], eps: float,
             ws: Any, gate_act: str, gate_position: str, group_size: Optional[int], weight_offset: float,
             norm_width: Optional[int], weight_in_input_dtype: bool) -> bool:
    """The variant rms_norm of [T, W] rows x2 into out2 on the kernels; False: take the torch path."""
    tokens, width = x2.shape
    world = 1 if ws is None else ws.world_size
    variant_flags = flags(gate2, gate_act, gate_position, weight_in_input_dtype)
    if group_size is not None and group_size < width:  # groups inside this rank: local, one row each
        seg = segment(x2, out2, weight, group_size, group_size, gate2, variant_flags, weight_offset,
                      width // group_size)
        return launch(x2, tokens, [seg], eps, ws, local=True)
    if group_size is not None:  # one group per rank (local) or a group over group // width ranks
        ranks = group_size // width
        seg = segment(x2, out2, weight, width, group_size, gate2, variant_flags, weight_offset)
        return launch(x2, tokens, [seg], eps, ws, local=ranks == 1, rank_group=ranks if ranks < world else 0)
    divisor = norm_width if norm_width is not None else width * world
    seg = segment(x2, out2, weight, width, divisor, gate2, variant_flags, weight_offset)
    return launch(x2, tokens, [seg], eps, ws)


def qk_norm(segments: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], eps: float, ws: Any,
            weight_offset: float, weight_in_input_dtype: bool) -> bool:
    """QK-norm variants of (input [T, W], output [T, W], weight [W]) pairs on the kernels."""
    x = segments[0][0]
    world = 1 if ws is None else ws.world_size
    variant_flags = flags(None, "silu", "before", weight_in_input_dtype)
    segs = [segment(inp, out, w, inp.shape[1], inp.shape[1] * world, None, variant_flags, weight_offset)
            for inp, out, w in segments]
    return launch(x, x.shape[0], segs, eps, ws)
