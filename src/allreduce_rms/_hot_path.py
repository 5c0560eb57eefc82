"""The eager hot path: calls of a shape that was already validated skip the validation.

An eager call pays for every Python operation it makes: on an H200 host a bare ``x.add_(0)``
costs about 10 us, ``torch.empty`` 6 us, a column view ``qkv[..., :q]`` 4 us and a call into the
front module with 21 arguments 5 us (benchmarks/results/host-profile-*.json). Full validation of
a qk_norm call (types, dtypes, shapes, strides, devices, sizes, eps, the workspace) reads about
thirty tensor attributes, and used to cost more than the launch itself.

The first call of a shape goes through the full validation in :mod:`allreduce_rms.ops`; if it
takes a GPU kernel path (fused, or local on one rank) the shape is remembered under a key made
of everything that validation looked at except the token count:

    (dtype, device, row stride and width of the 2-D activations; shape, stride, dtype and device
     of each weight; q_size and kv_size; eps; the workspace; the output mode: new tensors, in
     place, or an ``out`` tensor's dtype, device and strides)

A later call whose key matches is valid by construction: the same checks on the same values
give the same answer. What the key leaves out is checked on every call: the token count
(against ``max_tokens`` when the workspace does not chunk, and an ``out`` tensor's rows), that
debug mode is off (debug calls take the full path, which runs the cross-rank check), and that
the workspace is still open and in this process (the Python dict reads ``Workspace._closed``
and its pid; the hot ops forget a workspace's shapes when it closes, for good, and every shape
in a fork child). Pointers and their alignment are not part of the key either: the backend
checks them on every launch and picks the vector width from them.

Two ways serve a remembered shape:

* **The torch hot ops** (``torch.ops.allreduce_rms._rms_norm_hot`` / ``_qk_norm_hot``; C++
  kernels in cpp/hot_ops.cpp registered through torch's stable C ABI): one dispatcher call reads
  the tensors' metadata, finds the shape, allocates the outputs (or makes the in-place views) and
  launches, without a Python operation per tensor. The key lives in C++, computed from the
  tensors by the same code when a shape is remembered (the full path stages its prepared launch,
  then calls the op) and when it is looked up. A call the op does not serve returns
  ``NOT_SERVED`` having launched nothing, and the full path runs: it raises the errors a bad
  call deserves, with their Python types; a launch that failed in the GPU runtime returns
  ``FAILED`` and raises RuntimeError without being made again. The results carry no autograd
  history: in place, q and k are tensors over qkv's memory, not autograd views of it; out of
  place, q and k share one allocation. The Python layer checks the scalar arguments' types
  first (torch's schema would accept ``True`` for an int or a float). Serves 2-D calls with new
  outputs or in place, on torch builds with CUDA or ROCm that export the stable C ABI functions
  cpp/torch_abi.h lists (measured with torch 2.11; registration also checked with 2.13).
* **A Python dict** of keys (per workspace, and one for calls without a workspace) for every
  other case: an ``out`` tensor given to rms_norm, or a torch without the hot ops. Its key also
  holds the Python types of the tensors and scalars, bounded by :data:`MAX_ENTRIES`.

Other ranks of tensors take the full path every time.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from . import _native
from . import workspace as _workspace

MAX_ENTRIES = 64  # call shapes remembered per workspace; a full dict is cleared and refilled
_no_workspace_calls: Dict[tuple, "_Prepared"] = {}

# ------------------------------------------------------------------------- the torch hot ops
# For eager calls: the public functions call them only outside torch.compile, and no fake kernel
# is registered (a tracer that runs them sees a call it does not serve: fake and meta tensors are
# never served). ``workspace`` is Workspace._hot_id (0: none); with status NOT_SERVED nothing was
# launched and the tensor results are the first input.
_library = torch.library.Library("allreduce_rms", "FRAGMENT")
_library.define("_rms_norm_hot(Tensor(a!) x, Tensor weight, float eps, int workspace, bool inplace) "
                "-> (Tensor, int)")
_library.define("_qk_norm_hot(Tensor(a!) qkv, Tensor q_weight, Tensor k_weight, int q_size, int kv_size, "
                "float eps, int workspace, bool inplace) -> (Tensor, Tensor, int)")
NOT_SERVED, SERVED, FAILED = 0, 1, 2  # the ops' status result (cpp/hot_ops.cpp)
_TORCH_LIBRARIES = ("libtorch_cpu.so", "libtorch_cuda.so", "libtorch_hip.so")  # resolved only if loaded


def raise_failure() -> None:
    """Raise for a hot-op call that returned FAILED: its launch failed in the GPU runtime, maybe
    after some chunks ran, so the call must not be made again by the full path."""
    raise RuntimeError(f"allreduce_rms: {_native._front.hot_failure()}")


def _register_hot_ops() -> Optional[str]:
    """Register the hot ops' C++ kernels; None when registered, else why not."""
    if _native._front is None:
        return _native._FRONT_ERROR
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    # torch's own lib folder (pip wheels), else the names alone (the loader's own copies, e.g. conda's)
    paths = [os.path.join(lib_dir, name) for name in _TORCH_LIBRARIES] + list(_TORCH_LIBRARIES)
    return _native._front.register_hot_ops(paths) or None


HOT_OPS_ERROR: Optional[str] = _register_hot_ops()  # why the torch hot ops are not registered, or None
_HOT_OPS_SERVE = HOT_OPS_ERROR is None and bool(torch.version.cuda or getattr(torch.version, "hip", None))


def _raw_op(overload: Any) -> Any:
    # the overload's C++ callable: OpOverload.__call__ adds a Python frame (1.6 us of 4.9 measured
    # on a CPU host for _qk_norm_hot)
    return getattr(overload, "_op", overload)


# the hot ops' callables where they can serve calls (a GPU build of torch), else None
_rms_hot = _raw_op(torch.ops.allreduce_rms._rms_norm_hot.default) if _HOT_OPS_SERVE else None
_qk_hot = _raw_op(torch.ops.allreduce_rms._qk_norm_hot.default) if _HOT_OPS_SERVE else None


def forget(workspace_id: int) -> None:
    """Forget the call shapes the hot ops remember for a workspace (Workspace.close)."""
    if HOT_OPS_ERROR is None:
        _native._front.hot_forget(workspace_id)


class _Prepared:
    """One validated call shape: the front module's PreparedNorm and what the call needs around it."""

    __slots__ = ("launch", "stream", "device", "max_tokens", "world", "q_size", "kv_size", "k_offset")

    def __init__(self, launch: Any, device: int, max_tokens: float, world: int, q_size: int, kv_size: int,
                 elem_bytes: int):
        self.launch = launch          # PreparedNorm: (stream, tokens, x, out0, out1, w0, w1) -> None
        self.stream = _raw_stream     # stream(device) -> the current stream's handle
        self.device = device
        self.max_tokens = max_tokens  # inf when the workspace chunks (or there is none)
        self.world = world
        self.q_size = q_size
        self.kv_size = kv_size
        self.k_offset = q_size * elem_bytes


_raw_stream: Callable[[int], int] = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda device: torch.cuda.current_stream(device).cuda_stream)  # pragma: no cover - older torch


def _calls(ws: Any) -> Dict[tuple, _Prepared]:
    """The entry dict of workspace ws (AttributeError for anything but a Workspace or None)."""
    return _no_workspace_calls if ws is None else ws._hot_calls


# Every call served here also passes this test, written out in rms_norm and qk_norm below (a
# function call costs ~0.3 us on an H200 host): the token count within max_tokens (else the full
# path raises that error), and for a workspace: open, created in this process (else the full path
# raises WorkspaceError), and debug mode off on a multi-rank one (else the full path runs the
# cross-rank check).

# ------------------------------------------------------------------------- keys
# Scalars enter a key only as Python numbers: a tensor (or any mutable object) that validation
# accepted as eps or a size would compare equal to itself after an in-place change.
def rms_norm_key(x: torch.Tensor, weight: torch.Tensor, eps: Any, out: Any) -> Optional[tuple]:
    """The key of an rms_norm call, or None when it must not be remembered (eps not a Python
    float or int); raises AttributeError/TypeError/ValueError for arguments the hot path does not
    serve (not 2-D, not tensors): the caller then takes the full path."""
    if type(eps) is not float and type(eps) is not int:
        return None
    if out is None:
        out_key: Any = None
    elif out is x:
        out_key = True
    else:
        out_key = (type(out), out.dtype, out.device, out.stride())
    _, width = x.shape  # ValueError unless 2-D
    return (type(x), x.dtype, x.device, width, x.stride(), type(weight), weight.shape, weight.stride(), weight.dtype,
            weight.device, eps, type(eps), out_key)


def qk_norm_key(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_size: Any, kv_size: Any,
                eps: Any, inplace: Any) -> Optional[tuple]:
    """The key of a qk_norm call, or None when it must not be remembered (eps, q_size, kv_size or
    inplace not a plain Python number / bool); raises for arguments the hot path does not serve."""
    if ((type(eps) is not float and type(eps) is not int) or type(q_size) is not int or type(kv_size) is not int
            or type(inplace) is not bool):
        return None
    _, width = qkv.shape
    return (type(qkv), qkv.dtype, qkv.device, width, qkv.stride(), q_size, type(q_size), kv_size, type(kv_size),
            type(q_weight), q_weight.shape, q_weight.stride(), q_weight.dtype, q_weight.device, type(k_weight),
            k_weight.shape, k_weight.stride(), k_weight.dtype, k_weight.device, eps, type(eps), inplace)


# ------------------------------------------------------------------------- calls
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: Any, ws: Any, out: Optional[torch.Tensor],
             debug: Callable[[], bool]) -> Optional[torch.Tensor]:
    """The result of an rms_norm call served from the Python dict, or None (take the full path)."""
    try:
        entry = (_no_workspace_calls if ws is None else ws._hot_calls).get(rms_norm_key(x, weight, eps, out))
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None
    if entry is None or x.shape[0] > entry.max_tokens or (ws is not None and (
            ws._closed or ws._pid != _workspace._pid or (entry.world > 1 and debug()))):
        return None
    if out is not None and out is not x and out.shape != x.shape:
        return None
    return launch_rms_norm(entry, x, weight, out)


def first_rms_norm(entry: _Prepared, x: torch.Tensor, weight: torch.Tensor, eps: float, ws: Any,
                   out_given: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The launch of an rms_norm call the full path has just validated: through the hot op, which
    remembers the shape for the calls after it, where it serves this output mode; else directly."""
    if _rms_hot is not None and (out_given is None or out_given is x):
        *results, status = _staged_call(entry, _rms_hot, x, weight, eps, 0 if ws is None else ws._hot_id,
                                        out_given is not None)
        if status == SERVED:
            return results[0]
        if status == FAILED:
            raise_failure()
    return launch_rms_norm(entry, x, weight, out)


def first_qk_norm(entry: _Prepared, qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_size: int,
                  kv_size: int, eps: float, ws: Any, inplace: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """qk_norm's counterpart of :func:`first_rms_norm`."""
    if _qk_hot is not None:
        q, k, status = _staged_call(entry, _qk_hot, qkv, q_weight, k_weight, q_size, kv_size, eps,
                                    0 if ws is None else ws._hot_id, inplace)
        if status == SERVED:
            return q, k
        if status == FAILED:
            raise_failure()
    return launch_qk_norm(entry, qkv, q_weight, k_weight, inplace)


def _staged_call(entry: _Prepared, op: Any, *args: Any) -> tuple:
    """op(*args) with entry's launch staged, so that the op remembers the call's shape with it;
    (..., NOT_SERVED) when the op refuses the call (a tensor subclass's __torch_function__, say)."""
    entry.launch.stage(entry.max_tokens if entry.max_tokens != math.inf else _NO_TOKEN_LIMIT)
    try:
        return op(*args)
    except Exception:
        return (None, None, NOT_SERVED)
    finally:
        _native._front.hot_unstage()  # a call refused before the kernel ran must leave nothing staged


_NO_TOKEN_LIMIT = 2 ** 62


def launch_rms_norm(entry: _Prepared, x: torch.Tensor, weight: torch.Tensor,
                    out: Optional[torch.Tensor]) -> torch.Tensor:
    tokens, width = x.shape
    if out is None:
        out = x.new_empty(tokens, width)
    entry.launch(entry.stream(entry.device), tokens, x.data_ptr(), out.data_ptr(), 0, weight.data_ptr(), 0)
    return out


def qk_norm(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_size: Any, kv_size: Any, eps: Any,
            ws: Any, inplace: Any, debug: Callable[[], bool]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The result of a qk_norm call served from the Python dict, or None (take the full path)."""
    try:
        entry = (_no_workspace_calls if ws is None else ws._hot_calls).get(
            qk_norm_key(qkv, q_weight, k_weight, q_size, kv_size, eps, inplace))
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None
    if entry is None or qkv.shape[0] > entry.max_tokens or (ws is not None and (
            ws._closed or ws._pid != _workspace._pid or (entry.world > 1 and debug()))):
        return None
    return launch_qk_norm(entry, qkv, q_weight, k_weight, inplace)


def launch_qk_norm(entry: _Prepared, qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                   inplace: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    tokens = qkv.shape[0]
    base = qkv.data_ptr()
    q_size, kv_size = entry.q_size, entry.kv_size  # the validated sizes
    if inplace:
        # views of qkv's q and k columns; as_strided costs a third of qkv[..., :q_size]
        row_stride = qkv.stride(0)
        q = qkv.as_strided((tokens, q_size), (row_stride, 1))
        k = qkv.as_strided((tokens, kv_size), (row_stride, 1), qkv.storage_offset() + q_size)
        entry.launch(entry.stream(entry.device), tokens, base, base, base + entry.k_offset, q_weight.data_ptr(),
                     k_weight.data_ptr())
    else:
        q = qkv.new_empty(tokens, q_size)
        k = qkv.new_empty(tokens, kv_size)
        entry.launch(entry.stream(entry.device), tokens, base, q.data_ptr(), k.data_ptr(), q_weight.data_ptr(),
                     k_weight.data_ptr())
    return q, k


# ------------------------------------------------------------------------- entries
def remember(ws: Any, key: Optional[tuple], native_ws: Any, device: int, op: int, dtype: int, eps: float,
             segments: Tuple[Tuple[int, int, int, int, int], ...], q_size: int, elem_bytes: int) -> _Prepared:
    """Record a validated call shape (unless key is None) and return its entry.

    segments: per segment (weight dtype code, in row stride, out row stride (0: the out tensor is
    new and contiguous, its stride is its width), width, full width); native_ws: the workspace's
    NativeWorkspace for a fused call, None for a local one.
    """
    front = _native.front()
    (wdt0, is0, os0, w0, f0) = segments[0]
    (wdt1, is1, os1, w1, f1) = segments[1] if len(segments) > 1 else (0, 0, 0, 0, 0)
    launch = front.PreparedNorm(native_ws, _native.dl_device_type(), device, op, dtype, eps, wdt0, is0, os0, w0, f0,
                                q_size * elem_bytes, wdt1, is1, os1, w1, f1)
    max_tokens = math.inf if ws is None or ws.chunking else ws.max_tokens
    entry = _Prepared(launch, device, max_tokens, 1 if ws is None else ws.world_size, q_size, w1, elem_bytes)
    if key is None:
        return entry  # served once, not remembered
    calls = _calls(ws)
    if len(calls) >= MAX_ENTRIES:
        calls.clear()
    calls[key] = entry
    return entry
