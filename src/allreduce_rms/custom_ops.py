"""The ops as ``torch.library`` custom ops, so that ``torch.compile`` traces them as single nodes.

Registered at ``import allreduce_rms``, namespace ``allreduce_rms``::

    rms_norm(Tensor x, Tensor weight, float eps, str workspace) -> Tensor
    qk_norm(Tensor qkv, Tensor q_weight, Tensor k_weight, SymInt q_size, SymInt kv_size, float eps,
            str workspace) -> (Tensor, Tensor)
    qk_norm_(Tensor(a!) qkv, Tensor q_weight, Tensor k_weight, SymInt q_size, SymInt kv_size,
             float eps, str workspace) -> ()          # in place: writes q and k back into qkv
    rms_norm_variant(Tensor x, Tensor weight, Tensor? gate, float eps, str workspace, str gate_act,
                     str gate_position, int group_size, float weight_offset, int norm_width,
                     bool weight_in_input_dtype) -> Tensor  # group_size/norm_width 0: None
    qk_norm_separate(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, float eps, str workspace,
                     float weight_offset, bool weight_in_input_dtype) -> (Tensor, Tensor)
    qk_norm_separate_(Tensor(a!) q, Tensor(b!) k, ...same...) -> ()   # in place

The ``*_variant`` / ``*_separate`` ops serve the options of issue 15 (:mod:`allreduce_rms.variants`):
a traced call with default options still goes to ``rms_norm`` / ``qk_norm``, and a traced
``qk_norm`` with a variant option goes to ``qk_norm_separate(_)`` on qkv's q and k columns.

A workspace is named by its :attr:`Workspace.key` (``""``: no workspace, plain local norm);
the implementation finds it with :func:`allreduce_rms.workspace.lookup` at every call. Each op
has a fake implementation that only validates and allocates, so graphs trace with symbolic
token counts (``mark_dynamic`` on dim 0) and without graph breaks. The ops have no autograd
formula: call them on tensors that do not require grad (inference, ``torch.no_grad()``).

Eager versus traced dispatch
----------------------------
Dispatching to a Python implementation through ``torch.library`` costs several microseconds per
call on top of the implementation itself, so eager calls must not go through these ops. The
public ``allreduce_rms.rms_norm`` / ``qk_norm`` are :func:`rms_norm` / :func:`qk_norm` below: one
test of ``torch.compiler.is_compiling()`` (a flag read, ~0.1 us), then

* eager: the plain Python functions of :mod:`allreduce_rms.ops` (``qk_norm_separate``: of
  :mod:`allreduce_rms.variants`), unchanged; they serve a call shape validated before through
  one dispatcher call to a C++ hot op (:mod:`allreduce_rms._hot_path`), not through these ops;
* traced: :func:`traced_rms_norm` / :func:`traced_qk_norm`, which call the custom ops. Dynamo
  folds ``is_compiling()`` to True while tracing, so the graph holds one
  ``torch.ops.allreduce_rms.*`` node per call; non-strict ``torch.export`` sets the same flag.

Why not ``torch.compiler.substitute_in_graph`` on the ops.* functions (no test at all in eager):
registering it imports Dynamo, about a second added to every ``import allreduce_rms``, and
non-strict export does not go through Dynamo, so it would trace into the eager code.
Consequences: ``allreduce_rms.ops.rms_norm`` called directly under ``torch.compile`` is a graph
break; use the package-level functions (or the modules). Tracers that set no flag (plain
``make_fx``) need the explicit ``traced_*`` forms.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _hot_path, ops, variants
from .workspace import Workspace, lookup

__all__ = ["qk_norm", "qk_norm_separate", "rms_norm", "traced_qk_norm", "traced_qk_norm_separate",
           "traced_rms_norm"]

_NAMESPACE = "allreduce_rms"


def _check_qk(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_size: int, kv_size: int) -> None:
    """The checks of ops.qk_norm that can run on fake tensors (same messages as eager)."""
    ops._check_tensor("qkv", qkv)
    for name, value in (("q_size", q_size), ("kv_size", kv_size)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
            raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
        if isinstance(value, int) and value <= 0:  # (a SymInt size is checked when it runs)
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if qkv.shape[-1] != q_size + 2 * kv_size:
        raise ValueError(f"qkv: last dimension is {qkv.shape[-1]}, but q_size + 2*kv_size = "
                         f"{q_size} + 2*{kv_size} = {q_size + 2 * kv_size}")
    ops._check_weight("q_weight", q_weight, q_size, qkv)
    ops._check_weight("k_weight", k_weight, kv_size, qkv)


# ------------------------------------------------------------------------- the custom ops
# Registered with a bare torch.library.Library: define the schema, implement it for the CPU and
# CUDA dispatch keys with plain Python functions, and register_fake for tracing. The
# torch.library.custom_op decorator would add its own Python layer around every call (about
# 12 us on an H200 host for a do-nothing op, against 3 us for a bare Library.impl:
# benchmarks/results/host-profile-*.json), more than the fused kernel takes at decode.
# No autograd kernel is registered: torch's default one passes inference calls through, and
# when an input requires grad it warns ("autograd kernel was not registered") and a backward
# through the op gives no gradient. torch.library.register_autograd with a raising backward would
# cost ~9 us more on every call, needed or not (measured here on a do-nothing op), and a raising
# autograd.Function cannot be traced by torch.compile(fullgraph=True); the ops are for inference.
# The in-place ops bump their tensors' version counters themselves, as custom_op's
# ADInplaceOrView kernel did.
_library = torch.library.Library(_NAMESPACE, "DEF")
_TAGS = (torch.Tag.pt2_compliant_tag,)
_library.define("rms_norm(Tensor x, Tensor weight, float eps, str workspace) -> Tensor", tags=_TAGS)
_library.define("qk_norm(Tensor qkv, Tensor q_weight, Tensor k_weight, SymInt q_size, SymInt kv_size, float eps, "
                "str workspace) -> (Tensor, Tensor)", tags=_TAGS)
_library.define("qk_norm_(Tensor(a!) qkv, Tensor q_weight, Tensor k_weight, SymInt q_size, SymInt kv_size, "
                "float eps, str workspace) -> ()", tags=_TAGS)


# Each implementation first offers the call to the torch hot op (allreduce_rms._hot_path), which
# serves a remembered call shape in one C++ kernel; the schema has already made q_size/kv_size
# ints and eps a float, so the eager functions' type checks have nothing left to refuse. A call
# it does not serve goes through the eager function (full validation, its errors).
def _hot_ready(ws: Optional[Workspace]) -> bool:
    return _hot_path._qk_hot is not None and (ws is None or not ops._debug())


def _rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float, workspace: str) -> torch.Tensor:
    ws = lookup(workspace) if workspace else None
    if _hot_ready(ws):
        y, status = _hot_path._rms_hot(x, weight, eps, 0 if ws is None else ws._hot_id, False)
        if status == _hot_path.SERVED:
            return y
        if status == _hot_path.FAILED:
            _hot_path.raise_failure()
    return ops.rms_norm(x, weight, eps, ws)


def _qk_norm_impl(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_size: int, kv_size: int,
                  eps: float, workspace: str) -> Tuple[torch.Tensor, torch.Tensor]:
    ws = lookup(workspace) if workspace else None
    if _hot_ready(ws):
        q, k, status = _hot_path._qk_hot(qkv, q_weight, k_weight, q_size, kv_size, eps,
                                         0 if ws is None else ws._hot_id, False)
        if status == _hot_path.SERVED:
            return q, k
        if status == _hot_path.FAILED:
            _hot_path.raise_failure()
    return ops.qk_norm(qkv, q_weight, k_weight, q_size, kv_size, eps, ws)


def _qk_norm_inplace_impl(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_size: int,
                          kv_size: int, eps: float, workspace: str) -> None:
    ws = lookup(workspace) if workspace else None
    status = _hot_path.NOT_SERVED
    if _hot_ready(ws):
        *_, status = _hot_path._qk_hot(qkv, q_weight, k_weight, q_size, kv_size, eps,
                                       0 if ws is None else ws._hot_id, True)
        if status == _hot_path.FAILED:
            _hot_path.raise_failure()
    if status != _hot_path.SERVED:
        ops.qk_norm(qkv, q_weight, k_weight, q_size, kv_size, eps, ws, inplace=True)
    torch.autograd.graph.increment_version(qkv)  # what custom_op's ADInplaceOrView kernel did


for _key_name in ("CPU", "CUDA"):  # torch's "CUDA" key also serves ROCm builds
    _library.impl("rms_norm", _rms_norm_impl, _key_name)
    _library.impl("qk_norm", _qk_norm_impl, _key_name)
    _library.impl("qk_norm_", _qk_norm_inplace_impl, _key_name)


@torch.library.register_fake(f"{_NAMESPACE}::rms_norm", lib=_library)
def _(x: torch.Tensor, weight: torch.Tensor, eps: float, workspace: str) -> torch.Tensor:
    ops._check_tensor("x", x)
    ops._check_weight("weight", weight, x.shape[-1], x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)  # what ops.rms_norm returns


@torch.library.register_fake(f"{_NAMESPACE}::qk_norm", lib=_library)
def _(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_size: int, kv_size: int, eps: float,
      workspace: str) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_qk(qkv, q_weight, k_weight, q_size, kv_size)
    lead = tuple(qkv.shape[:-1])
    return qkv.new_empty(lead + (q_size,)), qkv.new_empty(lead + (kv_size,))


@torch.library.register_fake(f"{_NAMESPACE}::qk_norm_", lib=_library)
def _(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_size: int, kv_size: int, eps: float,
      workspace: str) -> None:
    _check_qk(qkv, q_weight, k_weight, q_size, kv_size)


_library.define("rms_norm_variant(Tensor x, Tensor weight, Tensor? gate, float eps, str workspace, str gate_act, "
                "str gate_position, int group_size, float weight_offset, int norm_width, "
                "bool weight_in_input_dtype) -> Tensor", tags=_TAGS)
_library.define("qk_norm_separate(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, float eps, str workspace, "
                "float weight_offset, bool weight_in_input_dtype) -> (Tensor, Tensor)", tags=_TAGS)
_library.define("qk_norm_separate_(Tensor(a!) q, Tensor(b!) k, Tensor q_weight, Tensor k_weight, float eps, "
                "str workspace, float weight_offset, bool weight_in_input_dtype) -> ()", tags=_TAGS)


def _rms_norm_variant_impl(x: torch.Tensor, weight: torch.Tensor, gate: Optional[torch.Tensor], eps: float,
                           workspace: str, gate_act: str, gate_position: str, group_size: int, weight_offset: float,
                           norm_width: int, weight_in_input_dtype: bool) -> torch.Tensor:
    return ops.rms_norm(x, weight, eps, lookup(workspace) if workspace else None, gate=gate, gate_act=gate_act,
                        gate_position=gate_position, group_size=group_size or None, weight_offset=weight_offset,
                        norm_width=norm_width or None, weight_in_input_dtype=weight_in_input_dtype)


def _qk_norm_separate_impl(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                           eps: float, workspace: str, weight_offset: float,
                           weight_in_input_dtype: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return variants.qk_norm_separate(q, k, q_weight, k_weight, eps, lookup(workspace) if workspace else None,
                                     weight_offset=weight_offset, weight_in_input_dtype=weight_in_input_dtype)


def _qk_norm_separate_inplace_impl(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                                   eps: float, workspace: str, weight_offset: float,
                                   weight_in_input_dtype: bool) -> None:
    variants.qk_norm_separate(q, k, q_weight, k_weight, eps, lookup(workspace) if workspace else None, inplace=True,
                              weight_offset=weight_offset, weight_in_input_dtype=weight_in_input_dtype)
    torch.autograd.graph.increment_version((q, k))


for _key_name in ("CPU", "CUDA"):
    _library.impl("rms_norm_variant", _rms_norm_variant_impl, _key_name)
    _library.impl("qk_norm_separate", _qk_norm_separate_impl, _key_name)
    _library.impl("qk_norm_separate_", _qk_norm_separate_inplace_impl, _key_name)


@torch.library.register_fake(f"{_NAMESPACE}::rms_norm_variant", lib=_library)
def _(x: torch.Tensor, weight: torch.Tensor, gate: Optional[torch.Tensor], eps: float, workspace: str,
      gate_act: str, gate_position: str, group_size: int, weight_offset: float, norm_width: int,
      weight_in_input_dtype: bool) -> torch.Tensor:
    ops._check_tensor("x", x)
    ops._check_weight("weight", weight, x.shape[-1], x)
    if gate is not None:
        variants._check_gate(gate, x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_separate(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor) -> None:
    ops._check_tensor("q", q)
    ops._check_tensor("k", k)
    if k.shape[:-1] != q.shape[:-1] or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k: must match q in leading shape, dtype and device; q is {tuple(q.shape)} {q.dtype} on "
                         f"{q.device}, k is {tuple(k.shape)} {k.dtype} on {k.device}")
    ops._check_weight("q_weight", q_weight, q.shape[-1], q)
    ops._check_weight("k_weight", k_weight, k.shape[-1], q)


@torch.library.register_fake(f"{_NAMESPACE}::qk_norm_separate", lib=_library)
def _(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, workspace: str,
      weight_offset: float, weight_in_input_dtype: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_separate(q, k, q_weight, k_weight)
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.register_fake(f"{_NAMESPACE}::qk_norm_separate_", lib=_library)
def _(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, workspace: str,
      weight_offset: float, weight_in_input_dtype: bool) -> None:
    _check_separate(q, k, q_weight, k_weight)


# ------------------------------------------------------------------------- entry points
def _key(workspace: Optional[Workspace]) -> str:
    if workspace is None:
        return ""
    if not isinstance(workspace, Workspace):
        raise TypeError(f"workspace: expected an allreduce_rms.Workspace or None, got {type(workspace).__name__}")
    return workspace.key


def traced_rms_norm(
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
    """:func:`allreduce_rms.rms_norm` through ``torch.ops.allreduce_rms.rms_norm`` (traceable), or
    ``rms_norm_variant`` when a variant option is given.

    Same arguments, result and errors as the eager function; ``out`` is filled by a copy.
    """
    if variants.is_default(gate, gate_act, gate_position, group_size, weight_offset, norm_width,
                           weight_in_input_dtype):
        y = torch.ops.allreduce_rms.rms_norm(x, weight, ops.check_eps(eps), _key(workspace))
    else:
        v = variants.check_variant(gate_act=gate_act, gate_position=gate_position, group_size=group_size,
                                   weight_offset=weight_offset, norm_width=norm_width,
                                   weight_in_input_dtype=weight_in_input_dtype)
        y = torch.ops.allreduce_rms.rms_norm_variant(x, weight, gate, ops.check_eps(eps), _key(workspace),
                                                     v.gate_act, v.gate_position, v.group_size or 0,
                                                     v.weight_offset, v.norm_width or 0, v.weight_in_input_dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


def traced_qk_norm(
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
    """:func:`allreduce_rms.qk_norm` through ``torch.ops.allreduce_rms.qk_norm`` / ``qk_norm_``.

    Same arguments, result and errors as the eager function; ``inplace=True`` uses the mutating
    op and returns views of qkv's q and k columns. With a variant option it goes through
    ``qk_norm_separate(_)`` on qkv's q and k columns.
    """
    key = _key(workspace)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__} {inplace!r}")
    if not variants.is_plain_qk(weight_offset, weight_in_input_dtype):
        _check_qk(qkv, q_weight, k_weight, q_size, kv_size)
        return traced_qk_norm_separate(qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], q_weight, k_weight,
                                       eps, workspace, inplace=inplace, weight_offset=weight_offset,
                                       weight_in_input_dtype=weight_in_input_dtype)
    if not inplace:
        q, k = torch.ops.allreduce_rms.qk_norm(qkv, q_weight, k_weight, q_size, kv_size, ops.check_eps(eps), key)
    else:
        torch.ops.allreduce_rms.qk_norm_(qkv, q_weight, k_weight, q_size, kv_size, ops.check_eps(eps), key)
        q, k = qkv[..., :q_size], qkv[..., q_size:q_size + kv_size]
    return q, k


def traced_qk_norm_separate(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float = 1e-6,
    workspace: Optional[Workspace] = None,
    *,
    inplace: bool = False,
    weight_offset: float = 0.0,
    weight_in_input_dtype: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`allreduce_rms.qk_norm_separate` through ``torch.ops.allreduce_rms.qk_norm_separate(_)``."""
    v = variants.check_variant(weight_offset=weight_offset, weight_in_input_dtype=weight_in_input_dtype)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__} {inplace!r}")
    args = (q, k, q_weight, k_weight, ops.check_eps(eps), _key(workspace), v.weight_offset, v.weight_in_input_dtype)
    if not inplace:
        q_out, k_out = torch.ops.allreduce_rms.qk_norm_separate(*args)
    else:
        torch.ops.allreduce_rms.qk_norm_separate_(*args)
        q_out, k_out = q, k
    return q_out, k_out


_is_compiling = torch.compiler.is_compiling


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
    if _is_compiling():
        return traced_rms_norm(x, weight, eps, workspace, out=out, gate=gate, gate_act=gate_act,
                               gate_position=gate_position, group_size=group_size, weight_offset=weight_offset,
                               norm_width=norm_width, weight_in_input_dtype=weight_in_input_dtype)
    return ops.rms_norm(x, weight, eps, workspace, out=out, gate=gate, gate_act=gate_act, gate_position=gate_position,
                        group_size=group_size, weight_offset=weight_offset, norm_width=norm_width,
                        weight_in_input_dtype=weight_in_input_dtype)


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
    if _is_compiling():
        return traced_qk_norm(qkv, q_weight, k_weight, q_size, kv_size, eps, workspace, inplace=inplace,
                              weight_offset=weight_offset, weight_in_input_dtype=weight_in_input_dtype)
    return ops.qk_norm(qkv, q_weight, k_weight, q_size, kv_size, eps, workspace, inplace=inplace,
                       weight_offset=weight_offset, weight_in_input_dtype=weight_in_input_dtype)


def qk_norm_separate(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float = 1e-6,
    workspace: Optional[Workspace] = None,
    *,
    inplace: bool = False,
    weight_offset: float = 0.0,
    weight_in_input_dtype: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    if _is_compiling():
        return traced_qk_norm_separate(q, k, q_weight, k_weight, eps, workspace, inplace=inplace,
                                       weight_offset=weight_offset, weight_in_input_dtype=weight_in_input_dtype)
    return variants.qk_norm_separate(q, k, q_weight, k_weight, eps, workspace, inplace=inplace,
                                     weight_offset=weight_offset, weight_in_input_dtype=weight_in_input_dtype)


_ROUTING_NOTE = """
    Eager calls run :func:`allreduce_rms.{0}.{1}` directly; under ``torch.compile`` (or
    non-strict ``torch.export``) this traces to ``torch.ops.allreduce_rms.{1}`` instead (see
    :mod:`allreduce_rms.custom_ops`).
"""
rms_norm.__doc__ = (ops.rms_norm.__doc__ or "") + _ROUTING_NOTE.format("ops", "rms_norm")
qk_norm.__doc__ = (ops.qk_norm.__doc__ or "") + _ROUTING_NOTE.format("ops", "qk_norm")
qk_norm_separate.__doc__ = ((variants.qk_norm_separate.__doc__ or "")
                            + _ROUTING_NOTE.format("variants", "qk_norm_separate"))
