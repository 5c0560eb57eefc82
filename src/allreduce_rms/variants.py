"""The norm variants of the model zoo (issue 15): options of :func:`rms_norm` and :func:`qk_norm`.

The same pattern, a norm over a row that tensor parallelism shards, appears with these options
(DESIGN.md, "Variants"); each rank holds W columns of a row of full width F = W * world_size:

========================  ==============================================================  =======================
option                    computes (float32 accumulation)                                  source model
========================  ==============================================================  =======================
gate, "before"            y = norm(x * act(gate))                                          Mamba2, Bamba, NemotronH
gate, "after"             y = norm(x) * act(gate)                                          MiniMax-Text-01, Falcon-H1
gate_act                  act = silu or sigmoid                                            (silu: Mamba2; sigmoid: MiniMax-Text-01)
group_size = G            one statistic per group of G consecutive columns of the full row Mamba2 n_groups
weight_offset = o         the weight used is (o + w)                                       Gemma (o = 1)
norm_width = n            sum of squares divided by n, not F (columns past n are padding)  InternViT padded heads
weight_in_input_dtype     False: ((x * r) * w) in float32, rounded once                    OLMo2, Gemma
                          True: w.to(dtype) * (x * r).to(dtype), rounded twice             HF Llama/MiniMax-M2, vLLM
========================  ==============================================================  =======================

where r = rsqrt(sum of squares over the group / (norm_width or group width) + eps). The formulas
and their rounding are those of :func:`allreduce_rms.fallback.normalize_variant`.

Groups and communication: a group lies inside one rank (G divides W: no all-reduce at all, every
statistic is local) or covers k = G / W whole consecutive ranks (W divides G). In the second
case each rank writes its partial sum into column ``rank // k`` of a [T, F / G] float32 tensor
of zeros, and one all-reduce over the whole TP group sums each group's k partials (zeros from
every other rank), so the one collective the plain op uses still gives every statistic.

Paths: on GPUs a call that uses a non-default option runs the two-pass wide-row kernel, which
computes every option with the formulas of :func:`allreduce_rms.fallback.normalize_variant`
(:mod:`allreduce_rms.variant_kernels`: fused on a fused workspace, with the statistic of a group
of ranks added over those ranks only; groups inside one rank as local launches). The torch path
here (local float32 math + ``torch.distributed.all_reduce`` of the statistics) serves CPUs and a
group of ranks on a fallback workspace. Default calls keep :mod:`allreduce_rms.ops`' kernels;
:func:`qk_norm_separate` runs the kernels of :func:`qk_norm` either way.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _native, fallback, variant_kernels
from . import ops

__all__ = ["Variant", "check_variant", "qk_norm_separate", "rms_norm_variant"]

GATE_ACTS = ("silu", "sigmoid")
GATE_POSITIONS = ("before", "after")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Variant:
    """The validated options of one call (see the module docstring for their meaning)."""

    gate_act: str = "silu"
    gate_position: str = "before"
    group_size: Optional[int] = None
    weight_offset: float = 0.0
    norm_width: Optional[int] = None
    weight_in_input_dtype: bool = False


def is_plain_qk(weight_offset: object, weight_in_input_dtype: object) -> bool:
    """True when a qk_norm call's options ask for nothing beyond the plain op. (ops.qk_norm writes
    this test out inline: it runs on every eager call.)"""
    return weight_in_input_dtype is False and type(weight_offset) in (float, int) and weight_offset == 0


def is_default(gate: object, gate_act: object, gate_position: object, group_size: object, weight_offset: object,
               norm_width: object, weight_in_input_dtype: object) -> bool:
    """True when a call asks for nothing beyond the plain op (the kernels' hot path). (ops.rms_norm
    writes this test out inline: it runs on every eager call.)"""
    return (gate is None and group_size is None and norm_width is None and gate_act == "silu"
            and gate_position == "before" and is_plain_qk(weight_offset, weight_in_input_dtype))


# ------------------------------------------------------------------------- validation
def _choice(name: str, value: object, choices: Tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _optional_positive_int(name: str, value: object) -> Optional[int]:
    return None if value is None else ops._positive_int(name, value, "a positive int or None")


def _offset(value: object) -> float:
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"weight_offset must be a real number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"weight_offset must be a real number, got {type(value).__name__} {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"weight_offset must be finite, got {value!r}")
    return number


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"weight_in_input_dtype must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_variant(*, gate_act: object = "silu", gate_position: object = "before", group_size: object = None,
                  weight_offset: object = 0.0, norm_width: object = None, weight_in_input_dtype: object = False,
                  width: Optional[int] = None, world: int = 1) -> Variant:
    """Validate the options against a rank width W (`width`) and the number of ranks; the full
    width is F = W * world. Without `width` only the kinds and ranges are checked.

    Raises:
        TypeError: gate_act / gate_position not a str, group_size / norm_width not an int or
            None (bools included), weight_offset not a real number, weight_in_input_dtype not a
            bool.
        ValueError: gate_act not "silu"/"sigmoid", gate_position not "before"/"after",
            group_size or norm_width <= 0, weight_offset not finite; with `width`: group_size not
            dividing F, a group straddling part of a rank (G < W not dividing W, or G > W not a
            multiple of W), norm_width larger than F, norm_width together with group_size.
    """
    variant = Variant(_choice("gate_act", gate_act, GATE_ACTS), _choice("gate_position", gate_position, GATE_POSITIONS),
                      _optional_positive_int("group_size", group_size), _offset(weight_offset),
                      _optional_positive_int("norm_width", norm_width), _flag(weight_in_input_dtype))
    if variant.norm_width is not None and variant.group_size is not None:
        raise ValueError(f"norm_width={variant.norm_width} and group_size={variant.group_size} cannot be combined: "
                         "norm_width is the divisor of a whole-row statistic; each group divides by its own size")
    if width is None:
        return variant
    full = width * world
    group = variant.group_size
    if group is not None:
        ranks = f"{world} rank{'s' if world != 1 else ''} x {width} columns"
        if group > full:
            raise ValueError(f"group_size={group} is larger than the full width {full} ({ranks})")
        if full % group:
            raise ValueError(f"group_size={group} does not divide the full width {full} ({ranks}): the row must "
                             "split into whole groups")
        if group < width and width % group:
            raise ValueError(f"group_size={group} does not divide this rank's width {width}: a group would straddle "
                             "two ranks, partly on each; groups must lie inside one rank or cover whole ranks")
        if group > width and group % width:
            raise ValueError(f"group_size={group} is not a multiple of this rank's width {width}: a group would cover "
                             f"{group / width:.3g} ranks; groups must lie inside one rank or cover whole ranks")
    if variant.norm_width is not None and variant.norm_width > full:
        raise ValueError(f"norm_width={variant.norm_width} is larger than the full width {full} ({world} "
                         f"rank{'s' if world != 1 else ''} x {width} columns): it counts the real (unpadded) "
                         "columns of the row")
    return variant


def _check_gate(gate: object, x: torch.Tensor) -> torch.Tensor:
    """gate as [T, W] rows: a tensor of x's shape and device, float32/float16/bfloat16 (its own
    dtype and row stride allowed), unit stride in the last dimension."""
    if not isinstance(gate, torch.Tensor):
        raise TypeError(f"gate: expected a torch.Tensor or None, got {type(gate).__name__}")
    if gate.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"gate: dtype {gate.dtype} is not supported; use float32, float16 or bfloat16")
    if gate.shape != x.shape:
        raise ValueError(f"gate: must have the shape of x {tuple(x.shape)}, got {tuple(gate.shape)}")
    if gate.device != x.device:
        raise ValueError(f"gate: on {gate.device}, but x is on {x.device}")
    if gate.stride(-1) != 1 and gate.shape[-1] > 1:
        raise ValueError(f"gate: the last dimension must have unit stride (got strides {gate.stride()}); "
                         "call .contiguous() first")
    return ops._rows("gate", gate)


# ------------------------------------------------------------------------- the ops
def debug_op(op: int, variant: Variant, gate: bool = False) -> int:
    """The op code debug mode compares across ranks (ops._debug_check_same_call): `op` in the low
    byte and a 24-bit digest of the options above it, so ranks that pass different options are
    named instead of disagreeing on whether and what to exchange."""
    digest = zlib.crc32(f"{variant!r} gate={gate}".encode()) & 0xFFFFFF
    return op | (digest << 8)


def _world(ws: object) -> int:
    return 1 if ws is None else ws.world_size  # type: ignore[attr-defined]


def _all_reduce(stats: torch.Tensor, ws: object) -> None:
    if ws is not None and ws.world_size > 1:  # type: ignore[attr-defined]
        dist.all_reduce(stats, group=ws.group)  # type: ignore[attr-defined]


def rms_norm_variant(x: torch.Tensor, weight: torch.Tensor, eps: object, workspace: object, out: Optional[torch.Tensor],
                     gate: Optional[torch.Tensor], gate_act: object, gate_position: object, group_size: object,
                     weight_offset: object, norm_width: object, weight_in_input_dtype: object) -> torch.Tensor:
    """:func:`allreduce_rms.rms_norm` with non-default options (same arguments); see its docstring."""
    ops._check_tensor("x", x)
    width = x.shape[-1]
    ops._check_weight("weight", weight, width, x)
    x2 = ops._rows("x", x)
    gate2 = None if gate is None else _check_gate(gate, x)
    if out is not None:
        ops._check_tensor("out", out)
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out: expected shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}; "
                             f"got {tuple(out.shape)}, {out.dtype}, {out.device}")
    tokens = x2.shape[0]
    # kinds and ranges here; what depends on the width after _prepare, whose debug check names a
    # rank that passed another width instead of leaving its peers in the debug all-gather
    options = dict(gate_act=gate_act, gate_position=gate_position, group_size=group_size,
                   weight_offset=weight_offset, norm_width=norm_width, weight_in_input_dtype=weight_in_input_dtype)
    variant = check_variant(**options)  # type: ignore[arg-type]
    op = debug_op(ops.OP_RMS_NORM, variant, gate is not None)
    eps_value, world = ops._prepare(op, x, tokens, (width,), eps, workspace)  # type: ignore[arg-type]
    check_variant(**options, width=width, world=world)  # type: ignore[arg-type]
    if variant_kernels.ready(x):
        # the wide-row kernel computes every variant (allreduce_rms.variant_kernels), straight
        # into out's rows where they can be viewed as [T, W], else into new rows copied out
        out2 = None if out is None or out.stride(-1) != 1 else _rows_or_none(out, width)
        rows = torch.empty_like(x2, memory_format=torch.contiguous_format) if out2 is None else out2
        if variant_kernels.rms_norm(x2, rows, weight, gate2, eps_value, workspace, variant.gate_act,
                                    variant.gate_position, variant.group_size, variant.weight_offset,
                                    variant.norm_width, variant.weight_in_input_dtype):
            if out is None:
                return rows.view(x.shape)
            if out2 is None:
                out.copy_(rows.view(x.shape))
            return out
    y = _rms_rows(x2, weight, eps_value, workspace, gate2, variant)
    if out is None:
        return y.view(x.shape)
    out.copy_(y.view(x.shape))
    return out


def _rows_or_none(t: torch.Tensor, width: int) -> Optional[torch.Tensor]:
    """t as [T, width] rows without a copy, or None when its leading dimensions do not merge."""
    try:
        return t.view(-1, width)
    except RuntimeError:
        return None


def _rms_rows(x2: torch.Tensor, weight: torch.Tensor, eps: float, ws: object, gate2: Optional[torch.Tensor],
              variant: Variant) -> torch.Tensor:
    """The torch path of one rank: [T, W] rows in, [T, W] rows of x's dtype out."""
    tokens, width = x2.shape
    world = _world(ws)
    full = width * world
    xf = fallback.gated_input(x2, gate2, variant.gate_act, variant.gate_position)
    group = variant.group_size
    if group is not None and group <= width:
        # every group inside this rank: its statistic is local, nothing to exchange
        rstd = torch.rsqrt(fallback.group_sum_of_squares(xf, group) / group + eps)
        rstd = rstd.repeat_interleave(group, dim=1)
    elif group is not None:
        # each group covers group // width whole ranks: this rank's partial goes to its group's column,
        # the other columns stay zero, and one all-reduce over the TP group sums each group's partials
        ranks_per_group = group // width
        stats = torch.zeros((tokens, full // group), dtype=torch.float32, device=x2.device)
        column = ws.rank // ranks_per_group  # type: ignore[attr-defined]
        stats[:, column] = fallback.sum_of_squares(xf)
        _all_reduce(stats, ws)
        rstd = torch.rsqrt(stats[:, column:column + 1] / group + eps)
    else:
        stats = fallback.sum_of_squares(xf).unsqueeze(-1)
        _all_reduce(stats, ws)
        divisor = variant.norm_width if variant.norm_width is not None else full
        rstd = torch.rsqrt(stats / divisor + eps)
    return fallback.normalize_variant(xf, rstd, weight, x2.dtype, gate=gate2, gate_act=variant.gate_act,
                                      gate_position=variant.gate_position, weight_offset=variant.weight_offset,
                                      weight_in_input_dtype=variant.weight_in_input_dtype)


def qk_rows(segments: List[ops.Segment], eps: float, ws: object, weight_offset: float,
            weight_in_input_dtype: bool) -> None:
    """A QK-norm variant: each (input [T, W], output [T, W], weight [W]) gets its own statistic,
    results written into the outputs. On GPUs the wide-row kernel (allreduce_rms.variant_kernels);
    else the torch path: local float32 math and one all-reduce of the [T, segments] sums."""
    if variant_kernels.ready(segments[0][0]) and variant_kernels.qk_norm(segments, eps, ws, weight_offset,
                                                                         weight_in_input_dtype):
        return
    world = _world(ws)
    xfs = [seg[0].float() for seg in segments]
    stats = torch.stack([fallback.sum_of_squares(xf) for xf in xfs], dim=-1)
    _all_reduce(stats, ws)
    for i, ((inp, out, w), xf) in enumerate(zip(segments, xfs)):
        rstd = torch.rsqrt(stats[:, i:i + 1] / (inp.shape[1] * world) + eps)
        out.copy_(fallback.normalize_variant(xf, rstd, w, inp.dtype, weight_offset=weight_offset,
                                             weight_in_input_dtype=weight_in_input_dtype))


def qk_norm_separate(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float = 1e-6,
    workspace: Optional[ops.Workspace] = None,
    *,
    inplace: bool = False,
    weight_offset: float = 0.0,
    weight_in_input_dtype: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """QK-norm across TP ranks with q and k given as two tensors (TensorRT-LLM's and SGLang's callers).

    Computes what :func:`allreduce_rms.qk_norm` computes: q and k each normalized over all ranks'
    columns, each with its own all-reduced statistic. q and k may be column views of one qkv
    tensor whose v part is wider than k (aiter's layout) or two unrelated tensors.

    Args:
        q: [..., Wq]; k: [..., Wk] with the same leading shape, dtype and device as q; each
            float32/float16/bfloat16 with unit stride in the last dimension (any row stride).
        q_weight: [Wq]; k_weight: [Wk]; each any of float32/float16/bfloat16.
        eps: added to each mean square.
        workspace: the group's :class:`Workspace`; None normalizes locally (one rank).
        inplace: write the results back into q and k (and return them).
        weight_offset, weight_in_input_dtype: as in :func:`allreduce_rms.qk_norm`.

    Returns:
        (q_out, k_out) of q's and k's shapes and dtype: new contiguous tensors, or q and k
        themselves when inplace.

    Raises:
        TypeError: an argument of the wrong kind (the message names it), as :func:`qk_norm`.
        ValueError: as :func:`qk_norm`, and q and k differing in leading shape, dtype or device.
        TimeoutError, WorkspaceError, RuntimeError: as :func:`qk_norm`.
    """
    ops._check_tensor("q", q)
    ops._check_tensor("k", k)
    if k.shape[:-1] != q.shape[:-1] or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k: must match q in leading shape, dtype and device; q is {tuple(q.shape)} {q.dtype} on "
                         f"{q.device}, k is {tuple(k.shape)} {k.dtype} on {k.device}")
    q_size, kv_size = q.shape[-1], k.shape[-1]
    ops._check_weight("q_weight", q_weight, q_size, q)
    ops._check_weight("k_weight", k_weight, kv_size, q)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__} {inplace!r}")
    variant = check_variant(weight_offset=weight_offset, weight_in_input_dtype=weight_in_input_dtype)
    q2, k2 = ops._rows("q", q), ops._rows("k", k)
    tokens = q2.shape[0]
    default = variant.weight_offset == 0.0 and not variant.weight_in_input_dtype
    op = ops.OP_QK_NORM if default else debug_op(ops.OP_QK_NORM, variant)
    eps_value, world = ops._prepare(op, q, tokens, (q_size, kv_size), eps, workspace)
    if inplace:
        q_out, k_out, result = q2, k2, (q, k)
    else:
        q_out = torch.empty((tokens, q_size), dtype=q.dtype, device=q.device)
        k_out = torch.empty((tokens, kv_size), dtype=q.dtype, device=q.device)
        result = (q_out.view(q.shape), k_out.view(k.shape))
    if default and q.is_cuda and _native.kernels_ready():
        dtypes = ops._DTYPES
        args = (q2.data_ptr(), q_out.data_ptr(), q_weight.data_ptr(), dtypes[q_weight.dtype], q2.stride(0),
                q_out.stride(0), q_size, q_size * world, k2.data_ptr(), k_out.data_ptr(), k_weight.data_ptr(),
                dtypes[k_weight.dtype], k2.stride(0), k_out.stride(0), kv_size, kv_size * world)
        ops._run_gpu(ops.OP_QK_NORM, q, tokens, args, 2, eps_value, workspace, world)
    else:
        qk_rows([(q2, q_out, q_weight), (k2, k_out, k_weight)], eps_value, workspace, variant.weight_offset,
                variant.weight_in_input_dtype)
    return result
