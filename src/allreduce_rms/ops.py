"""The public ops: :func:`rms_norm` and :func:`qk_norm` over a tensor-parallel group.

For a group of N ranks, rank r holds x_r of shape [T, W] (its slice of a row of width N*W) and
the matching weight slice w_r of shape [W]. Both ops compute, in float32,

    out_r[t, j] = x_r[t, j] * rsqrt(sum over ranks of sum_j x_r[t, j]^2 / (N*W) + eps) * w_r[j]

and return out_r in x's dtype. qk_norm does this for q and k, two column slices of one qkv tensor,
each with its own statistic. Without a workspace (or with a one-rank group) they are plain
RMSNorm / QK-norm.

Debug mode (``ALLREDUCE_RMS_DEBUG=1``, read at each call on a multi-rank workspace, or
:func:`set_debug`): before communicating, the ranks all-gather what they were asked to do (op,
token count, widths) and every rank raises RuntimeError naming the rank(s) whose call differs,
instead of exchanging mismatched statistics or waiting in a collective forever. It costs one
extra collective per call (a small int64 all_gather whose result the host reads, so it
synchronizes with the device): leave it off while capturing CUDA graphs.
"""

from __future__ import annotations

import math
import operator
import os
import struct
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _hot_path, _native, fallback, variants
from . import workspace as _workspace
from ._collectives import all_gather_ints
from .workspace import Workspace, WorkspaceError

_DTYPES = _native.DTYPE_CODES
_debug_override: Optional[bool] = None


def set_debug(enabled: Optional[bool]) -> None:
    """Turn debug mode on or off for this process; None goes back to ``ALLREDUCE_RMS_DEBUG``."""
    global _debug_override
    _debug_override = None if enabled is None else bool(enabled)


try:  # os.environ.get costs ~1.3 us per call; its encoded dict is the same data, read in ~0.05 us
    _ENVIRON_DATA = os.environ._data  # type: ignore[attr-defined]
    _DEBUG_KEY = os.environ.encodekey("ALLREDUCE_RMS_DEBUG")  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - not CPython's os.environ
    _ENVIRON_DATA, _DEBUG_KEY = None, None


def _debug() -> bool:
    if _debug_override is not None:
        return _debug_override
    if _ENVIRON_DATA is not None:
        value = _ENVIRON_DATA.get(_DEBUG_KEY)
        return value is not None and value not in (b"", b"0", "", "0")
    return os.environ.get("ALLREDUCE_RMS_DEBUG", "0") not in ("", "0")  # pragma: no cover

# One normalized column range on the pure-torch path: (input view [T, W], output view [T, W], weight [W]).
Segment = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
OP_RMS_NORM, OP_QK_NORM = 1, 2  # ArmsOp codes (backend_api.h)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    workspace: Optional[Workspace] = None,
    *,
    out: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    gate_act: str = "silu",
    gate_position: str = "before",
    group_size: Optional[int] = None,
    weight_offset: float = 0.0,
    norm_width: Optional[int] = None,
    weight_in_input_dtype: bool = False,
) -> torch.Tensor:
    """RMSNorm of this rank's slice of rows sharded over the workspace's TP group.

    Rank r holds W columns of rows of full width F = W * world_size. With the default options:
    y = x * rsqrt(sum of squares over all F columns / F + eps) * weight, in float32, rounded
    once to x's dtype. The keyword options give the model zoo's variants
    (:mod:`allreduce_rms.variants` has the table of models):

    * gate, gate_act, gate_position: gate "before" (Mamba2, Bamba, NemotronH):
      y = norm(x * act(gate)); "after" (MiniMax-Text-01, Falcon-H1): y = norm(x) * act(gate);
      act is "silu" or "sigmoid".
    * group_size G: one statistic per group of G consecutive columns of the full row (Mamba2's
      d_inner / n_groups), divided by G. A group lies inside one rank (G divides W; then nothing
      is exchanged) or covers whole consecutive ranks (W divides G).
    * weight_offset o: the weight used is (o + weight) (Gemma: o = 1).
    * norm_width n: the sum of squares is divided by n instead of F (InternViT's heads padded to
      divide TP: the padding columns are expected to be zero).
    * weight_in_input_dtype: False: y = ((x * r) * (o + w)) in float32, rounded once (OLMo2,
      Gemma); True: y = (o + w).to(dtype) * (x * r).to(dtype), rounded twice (HF LlamaRMSNorm,
      MiniMaxM2RMSNorm, MambaRMSNormGated, vLLM's RMSNorm); a gate "after" is then applied as
      act(gate).to(gate.dtype) * y, rounded once more, as HF's MiniMax-Text-01 does.

    On GPUs, calls with any non-default option run the two-pass wide-row kernel, fused where the
    default call is (allreduce_rms.variant_kernels); on CPUs, and for a group of ranks on a
    fallback workspace, the torch path (float32 torch math and an all-reduce of the statistics).

    Args:
        x: [..., W] float32/float16/bfloat16, unit stride in the last dimension.
        weight: [W] weight slice of this rank, any of the three dtypes, same device as x.
        eps: added to the mean square.
        workspace: the group's :class:`Workspace`; None normalizes locally (one rank).
        out: optional output of x's shape and dtype (may be x itself: in place).
        gate: None or a tensor of x's shape and device, float32/float16/bfloat16 (its own row
            stride allowed, unit stride in the last dimension).
        gate_act: "silu" or "sigmoid"; gate_position: "before" or "after" (both unused without
            a gate, as in Hugging Face's gated norms called with gate=None).
        group_size: None (the whole row) or the global width of one group.
        weight_offset: a finite real number added to every weight element.
        norm_width: None (F) or the global count, 1 <= norm_width <= F; not with group_size.
        weight_in_input_dtype: the rounding convention above (a bool).

    Returns:
        The normalized tensor, shape and dtype of x.

    Raises:
        TypeError: an argument of the wrong kind (the message names it): x, weight, out or gate
            not a torch.Tensor, eps or weight_offset not a real number (a str, None or a bool),
            workspace neither a Workspace nor None, gate_act or gate_position not a str,
            group_size or norm_width not an int or None, weight_in_input_dtype not a bool.
        ValueError: an argument of the right kind with a wrong value (the message names it and
            says why): an unsupported dtype, a shape, device or stride that does not fit, eps < 0
            or not finite, more tokens than ``max_tokens`` on a workspace created with
            ``chunking=False``; an unknown gate_act or gate_position; group_size <= 0, not
            dividing F, or a group straddling part of a rank; norm_width <= 0, > F, or given with
            group_size; weight_offset not finite.
        TimeoutError: a peer never joined an earlier fused call on this workspace.
        WorkspaceError: the workspace is closed, or was created in another process (fork).
        RuntimeError: debug mode only: the ranks of the group made different calls.
    """
    if (gate is not None or group_size is not None or norm_width is not None or weight_in_input_dtype is not False
            or weight_offset != 0.0 or (type(weight_offset) is not float and type(weight_offset) is not int)
            or gate_act != "silu" or gate_position != "before"):  # not variants.is_default, written out (hot path)
        return variants.rms_norm_variant(x, weight, eps, workspace, out, gate, gate_act, gate_position, group_size,
                                         weight_offset, norm_width, weight_in_input_dtype)
    # a call shape validated before (allreduce_rms._hot_path): the torch hot op, or the Python dict
    if _hot_path._rms_hot is not None and (out is None or out is x):
        if ((type(eps) is float or type(eps) is int) and (workspace is None or not _debug())):
            try:  # (the schema takes True for a float: only Python numbers are passed)
                y, status = _hot_path._rms_hot(x, weight, eps, 0 if workspace is None else workspace._hot_id,
                                               out is not None)
            except Exception:  # what the op's schema refuses (not tensors, not a Workspace): the full path says why
                status = _hot_path.NOT_SERVED
            if status == _hot_path.SERVED:
                return y
            if status == _hot_path.FAILED:
                _hot_path.raise_failure()
    else:
        y = _hot_path.rms_norm(x, weight, eps, workspace, out, _debug)
        if y is not None:
            return y
    _check_tensor("x", x)
    width = x.shape[-1]
    _check_weight("weight", weight, width, x)
    x2 = _rows("x", x)
    out_given, eps_given = out, eps
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        _check_tensor("out", out)
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out: expected shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}; "
                             f"got {tuple(out.shape)}, {out.dtype}, {out.device}")
    out2 = _rows("out", out)
    tokens = x2.shape[0]
    eps, world = _prepare(OP_RMS_NORM, x, tokens, (width,), eps, workspace)
    if x.is_cuda and _native.kernels_ready():
        if x.dim() == 2 and (world == 1 or workspace.path == "fused"):  # type: ignore[union-attr]
            out_stride = width if out_given is None else out.stride(0)
            key = _hot_path.rms_norm_key(x, weight, eps_given, out_given)
            entry = _remember(key, workspace, x, world, OP_RMS_NORM, eps,
                              ((_DTYPES[weight.dtype], x.stride(0), out_stride, width, width * world),), 0)
            return _hot_path.first_rms_norm(entry, x, weight, eps, workspace, out_given, out)
        args = (x2.data_ptr(), out2.data_ptr(), weight.data_ptr(), _DTYPES[weight.dtype], x2.stride(0),
                out2.stride(0), width, width * world) + _NO_SEGMENT
        _run_gpu(OP_RMS_NORM, x, tokens, args, 1, eps, workspace, world)
    else:
        _run_torch([(x2, out2, weight)], eps, workspace)
    return out


def qk_norm(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    q_size: int,
    kv_size: int,
    eps: float = 1e-6,
    workspace: Optional[Workspace] = None,
    *,
    inplace: bool = False,
    weight_offset: float = 0.0,
    weight_in_input_dtype: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """QK-norm across TP ranks: q and k, column slices of qkv, each normalized over all heads.

    For q and k held as two tensors (v possibly wider than k), use
    :func:`allreduce_rms.qk_norm_separate`: same math, same options.

    Args:
        qkv: [..., q_size + 2*kv_size] (q | k | v columns of this rank), unit stride in the last
            dimension. q and k are read in place at qkv's row stride; v is never touched.
        q_weight: [q_size]; k_weight: [kv_size]; each any of float32/float16/bfloat16.
        q_size, kv_size: this rank's q and k widths (heads on this rank x head_dim).
        eps: added to each mean square.
        workspace: the group's :class:`Workspace`; None normalizes locally (one rank).
        inplace: write the results back into qkv's q and k columns.
        weight_offset: the weights used are (weight_offset + q_weight), (weight_offset + k_weight).
        weight_in_input_dtype: the rounding convention of :func:`rms_norm`: False rounds
            ((x * r) * w) once (OLMo2); True computes w.to(dtype) * (x * r).to(dtype) (HF
            MiniMaxM2RMSNorm, vLLM). With either non-default option the call runs the two-pass
            wide-row kernel on GPUs (allreduce_rms.variant_kernels), the torch path on CPUs.

    Returns:
        (q, k): new [..., q_size] and [..., kv_size] tensors, or, when inplace, tensors over qkv's
        q and k columns. On GPUs, for a 2-D qkv, both are made in C++ and carry no autograd
        history: in place they share qkv's memory but are not autograd views of it, and out of
        place q and k share one allocation.

    Raises:
        TypeError: as :func:`rms_norm`, and q_size or kv_size not an int (a bool, float or str),
            inplace not a bool, weight_offset not a real number, weight_in_input_dtype not a bool.
        ValueError: as :func:`rms_norm`, and q_size or kv_size <= 0, or the last dimension of qkv
            not equal to q_size + 2*kv_size, weight_offset not finite.
        TimeoutError, WorkspaceError, RuntimeError: as :func:`rms_norm`.
    """
    # variants.is_plain_qk, written out: a function call costs ~0.3 us of this call's budget
    plain = weight_in_input_dtype is False and weight_offset == 0.0 and type(weight_offset) in (float, int)
    # a call shape validated before (allreduce_rms._hot_path): the torch hot op, or the Python dict;
    # a variant must never be served by a remembered kernel call shape
    if plain and _hot_path._qk_hot is not None:
        if ((type(eps) is float or type(eps) is int) and type(q_size) is int and type(kv_size) is int
                and type(inplace) is bool and (workspace is None or not _debug())):
            try:  # (the schema takes True for an int or a float: only Python numbers are passed)
                q, k, status = _hot_path._qk_hot(qkv, q_weight, k_weight, q_size, kv_size, eps,
                                                 0 if workspace is None else workspace._hot_id, inplace)
            except Exception:  # what the op's schema refuses: the full path says why
                status = _hot_path.NOT_SERVED
            if status == _hot_path.SERVED:
                return q, k
            if status == _hot_path.FAILED:
                _hot_path.raise_failure()
    elif plain:
        served = _hot_path.qk_norm(qkv, q_weight, k_weight, q_size, kv_size, eps, workspace, inplace, _debug)
        if served is not None:
            return served
    eps_given = eps
    if type(inplace) is not bool:
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__} {inplace!r}")
    _check_tensor("qkv", qkv)
    q_size = _positive_int("q_size", q_size)
    kv_size = _positive_int("kv_size", kv_size)
    if qkv.shape[-1] != q_size + 2 * kv_size:
        raise ValueError(f"qkv: last dimension is {qkv.shape[-1]}, but q_size + 2*kv_size = "
                         f"{q_size} + 2*{kv_size} = {q_size + 2 * kv_size}")
    _check_weight("q_weight", q_weight, q_size, qkv)
    _check_weight("k_weight", k_weight, kv_size, qkv)
    rows = _rows("qkv", qkv)
    tokens = rows.shape[0]
    if not plain:
        variant = variants.check_variant(weight_offset=weight_offset, weight_in_input_dtype=weight_in_input_dtype)
    op = OP_QK_NORM if plain else variants.debug_op(OP_QK_NORM, variant)
    eps, world = _prepare(op, qkv, tokens, (q_size, kv_size), eps, workspace)
    lead = qkv.shape[:-1]
    if plain and qkv.is_cuda and _native.kernels_ready() and qkv.dim() == 2 and (world == 1 or workspace.path == "fused"):  # type: ignore[union-attr]
        key = _hot_path.qk_norm_key(qkv, q_weight, k_weight, q_size, kv_size, eps_given, inplace)
        stride = qkv.stride(0)
        segments = ((_DTYPES[q_weight.dtype], stride, stride if inplace else q_size, q_size, q_size * world),
                    (_DTYPES[k_weight.dtype], stride, stride if inplace else kv_size, kv_size, kv_size * world))
        entry = _remember(key, workspace, qkv, world, OP_QK_NORM, eps, segments, q_size)
        return _hot_path.first_qk_norm(entry, qkv, q_weight, k_weight, q_size, kv_size, eps, workspace, inplace)
    if plain and qkv.is_cuda and _native.kernels_ready():
        # The hot path: q and k as pointer offsets into qkv, no view objects (each costs ~2 us).
        base, stride, step = rows.data_ptr(), rows.stride(0), rows.element_size()
        if inplace:
            q_out_ptr, k_out_ptr, q_out_stride, k_out_stride = base, base + q_size * step, stride, stride
            result = (qkv[..., :q_size], qkv[..., q_size:q_size + kv_size])
        else:
            q_out = torch.empty((*lead, q_size), dtype=qkv.dtype, device=qkv.device)
            k_out = torch.empty((*lead, kv_size), dtype=qkv.dtype, device=qkv.device)
            q_out_ptr, k_out_ptr, q_out_stride, k_out_stride = q_out.data_ptr(), k_out.data_ptr(), q_size, kv_size
            result = (q_out, k_out)
        args = (base, q_out_ptr, q_weight.data_ptr(), _DTYPES[q_weight.dtype], stride, q_out_stride, q_size,
                q_size * world, base + q_size * step, k_out_ptr, k_weight.data_ptr(), _DTYPES[k_weight.dtype], stride,
                k_out_stride, kv_size, kv_size * world)
        _run_gpu(OP_QK_NORM, qkv, tokens, args, 2, eps, workspace, world)
        return result
    q_in = rows[:, :q_size]
    k_in = rows[:, q_size:q_size + kv_size]
    if inplace:
        q_out, k_out = q_in, k_in
        result = (qkv[..., :q_size], qkv[..., q_size:q_size + kv_size])
    else:
        q_out = torch.empty((rows.shape[0], q_size), dtype=qkv.dtype, device=qkv.device)
        k_out = torch.empty((rows.shape[0], kv_size), dtype=qkv.dtype, device=qkv.device)
        result = (q_out.view(*lead, q_size), k_out.view(*lead, kv_size))
    if not plain:
        variants.qk_rows([(q_in, q_out, q_weight), (k_in, k_out, k_weight)], eps, workspace, variant.weight_offset,
                         variant.weight_in_input_dtype)
        return result
    _run_torch([(q_in, q_out, q_weight), (k_in, k_out, k_weight)], eps, workspace)
    return result


# ------------------------------------------------------------------------- validation
# As in Python and torch: TypeError when an argument is not of an accepted kind (not a tensor,
# not a number, not an int, not a Workspace), ValueError when it is of the right kind but its
# value does not fit (a tensor's dtype, shape, device or strides; a number's range).
def _positive_int(name: str, value: object, kind: str = "a positive int") -> int:
    """value as an int (Python or numpy integer): TypeError for anything else (bools, floats,
    strings), ValueError for an int <= 0. kind: what the TypeError says the argument must be."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}") from None
    if number <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return number


def check_eps(eps: object) -> float:
    """eps as a float: TypeError unless a real number (a str, bytes, None or a bool is not),
    ValueError when negative, NaN or infinite."""
    if isinstance(eps, (bool, str, bytes)) or eps is None:
        raise TypeError(f"eps must be a real number, got {type(eps).__name__} {eps!r}")
    try:
        value = float(eps)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__} {eps!r}") from None
    if not 0.0 <= value < math.inf:  # also False for NaN
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


def _check_tensor(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported; use float32, float16 or bfloat16")
    if t.dim() < 1 or t.shape[-1] == 0:
        raise ValueError(f"{name}: needs a non-empty last dimension, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name}: the last dimension must have unit stride (got strides {t.stride()}); "
                         "call .contiguous() first")


def _check_weight(name: str, w: torch.Tensor, width: int, x: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _DTYPES:
        raise ValueError(f"{name}: dtype {w.dtype} is not supported; use float32, float16 or bfloat16")
    if w.dim() != 1 or w.shape[0] != width:
        raise ValueError(f"{name}: expected shape ({width},) to match the normalized width, got {tuple(w.shape)}")
    if w.device != x.device:
        raise ValueError(f"{name}: on {w.device}, but the activations are on {x.device}")
    if w.stride(0) != 1 and width > 1:
        raise ValueError(f"{name}: must be contiguous (stride {w.stride(0)})")


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """View t as [T, W] without copying; leading dimensions must merge into one row stride."""
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(f"{name}: leading dimensions of shape {tuple(t.shape)} and strides {t.stride()} "
                         "cannot be viewed as rows; call .contiguous() first") from None


# ------------------------------------------------------------------------- dispatch
def _remember(key: tuple, ws: Optional[Workspace], x: torch.Tensor, world: int, op: int, eps: float,
              segments: tuple, q_size: int) -> "_hot_path._Prepared":
    """Record a validated 2-D call shape for the hot path (fused or one-rank launches only)."""
    native_ws = ws._native if world > 1 else None  # type: ignore[union-attr]
    return _hot_path.remember(ws, key, native_ws, x.get_device(), op, _DTYPES[x.dtype], eps, segments, q_size,
                              x.element_size())


_NO_SEGMENT = (0, 0, 0, 0, 0, 0, 0, 0)  # the second segment's arguments when there is only one


def _prepare(op: int, x: torch.Tensor, tokens: int, widths: Tuple[int, ...], eps: object,
             ws: Optional[Workspace]) -> Tuple[float, int]:
    """Check eps and the workspace against this call; return (eps as float, ranks in the group)."""
    if type(eps) is not float or not 0.0 <= eps < math.inf:  # the common case costs one test
        eps = check_eps(eps)
    if ws is None:
        return eps, 1  # type: ignore[return-value]
    if not isinstance(ws, Workspace):
        raise TypeError(f"workspace: expected an allreduce_rms.Workspace or None, got {type(ws).__name__}")
    if ws._closed or ws._pid != _workspace._pid:
        ws.check_usable()  # raises WorkspaceError: closed, or inherited across fork
    world = ws.world_size
    if ws.device.type == "cuda":
        if x.get_device() != ws.device.index:
            raise ValueError(f"workspace: created for {ws.device}, but the tensors are on {x.device}")
    elif x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"workspace: created for {ws.device}, but the tensors are on {x.device}")
    if world > 1 and _debug():
        # before any rank-local check that could raise: a rank must not leave its peers
        # in a collective, and a mismatch must be reported, not the symptom of one
        _debug_check_same_call(ws, op, tokens, widths, eps)  # type: ignore[arg-type]
    if tokens > ws.max_tokens and not ws.chunking:
        raise ValueError(f"{tokens} tokens exceed the workspace's max_tokens={ws.max_tokens} "
                         "(created with chunking=False)")
    return eps, world  # type: ignore[return-value]


def _run_gpu(op: int, x: torch.Tensor, tokens: int, args: tuple, nseg: int, eps: float, ws: Optional[Workspace],
             world: int) -> None:
    """Launch on x's GPU; args are both segments' (in, out, weight, weight dtype, in stride,
    out stride, width, full width), the second all zeros for one segment."""
    if world == 1:
        _native.front().launch_local(_native.dl_device_type(), x.get_device(), _native.MODE_LOCAL, _DTYPES[x.dtype],
                                     tokens, eps, 0, _native.current_stream(x.device), *args)
    elif ws.path == "fused":  # type: ignore[union-attr]
        ws._native.launch(op, _DTYPES[x.dtype], tokens, eps, _native.current_stream(x.device), *args)  # type: ignore[union-attr]
    else:
        _run_fallback_gpu(x, tokens, args, nseg, eps, ws)  # type: ignore[arg-type]


def _run_fallback_gpu(x: torch.Tensor, tokens: int, args: tuple, nseg: int, eps: float, ws: Workspace) -> None:
    """Local statistics kernel -> all_reduce over the group's backend -> local normalize kernel."""
    stats = torch.empty((tokens, nseg), dtype=torch.float32, device=x.device)
    if tokens == 0:
        dist.all_reduce(stats, group=ws.group)  # keep collective counts equal across ranks
        return
    front, device, dtype, stream = _native.front(), x.get_device(), _DTYPES[x.dtype], _native.current_stream(x.device)
    front.launch_local(_native.dl_device_type(), device, _native.MODE_STATS_OUT, dtype, tokens, eps,
                       stats.data_ptr(), stream, *args)
    dist.all_reduce(stats, group=ws.group)
    front.launch_local(_native.dl_device_type(), device, _native.MODE_STATS_IN, dtype, tokens, eps,
                       stats.data_ptr(), stream, *args)


def _run_torch(segments: List[Segment], eps: float, ws: Optional[Workspace]) -> None:
    stats = torch.stack([fallback.sum_of_squares(inp) for inp, _, _ in segments], dim=-1)
    world = 1
    if ws is not None and ws.world_size > 1:
        world = ws.world_size
        dist.all_reduce(stats, group=ws.group)
    for i, (inp, out, w) in enumerate(segments):
        fallback.normalize(inp, stats[:, i], inp.shape[1] * world, w, eps, out=out)


_OP_NAMES = {OP_RMS_NORM: "rms_norm", OP_QK_NORM: "qk_norm"}


def _debug_check_same_call(ws: Workspace, op: int, tokens: int, widths: Tuple[int, ...], eps: float) -> None:
    """Debug mode: every rank must make the same call; every rank raises naming the ranks that differ.

    The expected call is the one most ranks made (ties go to the lowest rank), so with one
    stray rank among several, that rank is the one named.
    """
    # one fixed-size int64 all_gather: (op, tokens, number of widths, widths padded to two, eps's
    # float64 bits: ranks with different eps would normalize differently without an error)
    padded = list(widths) + [0] * (2 - len(widths))
    eps_bits = struct.unpack("<q", struct.pack("<d", eps))[0]
    gathered = all_gather_ints([op, tokens, len(widths), *padded, eps_bits], ws.group, ws.device)
    calls = [(g[0], g[1], tuple(g[3:3 + g[2]]), g[5]) for g in gathered]
    if all(c == calls[0] for c in calls):
        return
    expected = max(calls, key=lambda c: (calls.count(c), -calls.index(c)))
    differ = [r for r, c in enumerate(calls) if c != expected]
    agree = [r for r, c in enumerate(calls) if c == expected]

    def describe(call: Tuple[int, int, Tuple[int, ...], int]) -> str:
        rank_op, rank_tokens, rank_widths, rank_eps_bits = call
        options = f" (variant options #{rank_op >> 8:06x})" if rank_op >> 8 else ""  # variants.debug_op
        rank_eps = struct.unpack("<d", struct.pack("<q", rank_eps_bits))[0]
        return (f"{_OP_NAMES.get(rank_op & 0xFF, rank_op)}{options} with {rank_tokens} tokens, widths "
                f"{rank_widths} and eps {rank_eps:g}")

    detail = "; ".join(f"rank {r} called {describe(calls[r])}" for r in differ)  # type: ignore[arg-type]
    others = ", ".join(str(r) for r in agree)
    raise RuntimeError(
        f"allreduce_rms debug (rank {ws.rank}): the ranks of workspace {ws.key} made different calls: {detail}; "
        f"rank{'s' if len(agree) > 1 else ''} {others} called {describe(expected)}")  # type: ignore[arg-type]


def fused_plan(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_size: int, kv_size: int,
               workspace: Workspace) -> dict:
    """The launch plan a fused :func:`qk_norm` (out of place) with these arguments would use.

    Returns a dict: ``warps_per_token`` (warps of one block, which serves one token at a time),
    ``vectors_per_thread``, ``vector_elems``, ``block`` (threads), ``grid`` (blocks of the first
    launch), ``launches`` (chunks), ``pdl``, ``prefetch_rows`` (L2 prefetch distance in grid
    strides of a block that walks several rows; 0: none), ``early_weights`` (True: each block has
    one row and fetches its weights with it, before the exchange), ``epoch_per_block`` (True: one
    thread per block, not per warp, reads the workspace's epoch), ``prewait_prefetch_rows`` (rows
    of its own each block asks L2 for before its PDL wait: 0, 1 or 2). For the benchmark's record and tuning: it
    synchronizes the device (to read the workspace's capacity), so never call it while capturing
    a CUDA graph. Raises ValueError unless ``workspace.path == "fused"`` and qkv is on its GPU.
    """
    if workspace.path != "fused" or not qkv.is_cuda:
        raise ValueError("fused_plan: needs a fused workspace and GPU tensors")
    rows = _rows("qkv", qkv)
    base, stride, step = rows.data_ptr(), rows.stride(0), rows.element_size()
    world = workspace.world_size
    # out-of-place outputs are fresh contiguous tensors: 16-byte aligned, row stride = width
    return workspace._native.plan(OP_QK_NORM, _DTYPES[qkv.dtype], rows.shape[0], base, base, q_weight.data_ptr(),
                                  _DTYPES[q_weight.dtype], stride, q_size, q_size, q_size * world,
                                  base + q_size * step, base, k_weight.data_ptr(), _DTYPES[k_weight.dtype], stride,
                                  kv_size, kv_size, kv_size * world)
