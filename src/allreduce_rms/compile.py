"""A graph pass that finds RMSNorm / QK-norm written the unfused tensor-parallel way and fuses it.

What it matches (aten graphs as Inductor sees them after AOT tracing; a token dim T of any size):

    xf  = x.float()                            # absent when x is already float32
    s   = (xf ** 2  or  xf * xf).sum(-1, keepdim=True)           # or .mean(-1, keepdim=True)
    s   = all-reduce(s, SUM, group)            # dist.all_reduce traced by Dynamo (functional
                                               # all_reduce + wait_tensor), or by make_fx (c10d.allreduce_)
    s   = s / D                                # D = world_size * W for sum, world_size for mean
    y   = xf * torch.rsqrt(s + eps) * w        # w: this rank's [W] weight (any of the 3 dtypes)
    out = y.to(x.dtype)                        # absent when x is float32

becomes ``out = torch.ops.allreduce_rms.rms_norm(x, w, eps, key)``. For QK-norm, q and k are
column slices of one qkv tensor (``qkv.split([q, kv, kv], -1)`` or ``qkv[..., a:b]``) whose two
statistics are concatenated and all-reduced together (``torch.cat([sq, sk], -1)``, then
``.chunk(2, -1)`` / ``.split(1, -1)`` or slices, the division before or after the split); that
becomes one ``torch.ops.allreduce_rms.qk_norm`` node. Two q/k norms with separate all-reduces
become two ``rms_norm`` nodes. Either product may be written in either order (``rsqrt(..) * xf``,
``w * y``), and ``x.float()`` may be spelled twice (two casts of the same x).

How: with Inductor's pattern matcher (``torch._inductor.pattern_matcher``). The patterns are
``CallFunction`` graphs registered with ``register_graph_pattern`` in a ``PatternMatcherPass``
(:attr:`FusionPass.patterns`), the form Inductor's own post-grad passes and vLLM's pass manager
use. Spellings that differ in structure are alternatives of one pattern (:class:`AnyOf`, a
``PatternExpr`` that tries each in turn), not hundreds of separately registered variants. What a
pattern graph cannot say is checked by each entry's ``extra_check`` on the match: reduction over
the last dimension, static widths, the divisor, the weight's shape, the group's world size, the
fused op's own argument checks (run on the fake tensors). The handler replaces the match with
``Match.replace_by_example`` (the fused op traced by ``fwd_only``). Why not ``register_replacement``
with traced search functions: the process-group name is a string argument of the collective,
which a traced pattern can only hold as a constant; tracing a search function runs its
collective; and each spelling would be one more traced pattern.

The pass is deliberately narrow: every intermediate value must be used only inside the pattern
(``_users`` of each pattern node; else nothing is replaced), the reduction must be a sum or mean
of squares over the last dimension, the collective a SUM all-reduce, the divisor exactly the
full width, and the weight a 1-D tensor of the local width. Anything else -- a max, a plain sum,
a local-width divisor, a norm without all-reduce, the cast to x.dtype before the weight multiply,
x of another dtype than float32/float16/bfloat16 -- is left alone, graph unchanged.

Workspaces: each fused node names the workspace of its process group by key. Pass workspaces
explicitly (matched by group and device), or the pass takes :func:`workspace_for` ``(group,
device=...)``, which creates one on first use: that is collective, so it relies on every rank
compiling the same graph, as SPMD programs under torch.compile do.

Inductor: :func:`install_inductor_pass` appends a :class:`FusionPass` to
``torch._inductor.config.post_grad_custom_post_pass`` (a ``CustomGraphPass``, a callable on
``torch.fx.Graph``, or a list of them; the pass runs after Inductor's own post-grad pattern
passes, on the functionalized aten graph). Its ``uuid()`` is None, which makes Inductor bypass
its FX graph cache for graphs compiled while it is installed: a cached graph would carry
workspace keys of another process. Another pass manager can run :attr:`FusionPass.patterns`
(``.apply(graph)``) itself, or call the pass on a graph.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import (
    MULTIPLE,
    CallFunction,
    FailedMatch,
    Ignored,
    KeywordArg,
    Match,
    MultiOutputPattern,
    PatternExpr,
    PatternMatcherPass,
    register_graph_pattern,
)
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import custom_ops  # noqa: F401  (registers torch.ops.allreduce_rms.*)
from .workspace import Workspace, workspace_for

__all__ = ["AnyOf", "FusionPass", "fuse", "install_inductor_pass", "inductor_pass", "uninstall_inductor_pass"]

aten = torch.ops.aten
Node = torch.fx.Node
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_F32 = torch.float32
_getitem = operator.getitem
_CONVERT = torch.ops.prims.convert_element_type.default
_TO_COPY = aten._to_copy.default
_REDUCTIONS = (aten.sum.dim_IntList, aten.mean.dim)
try:
    # Dynamo traces dist.all_reduce as the functional pair all_reduce + wait_tensor ...
    _ALL_REDUCE: Any = torch.ops._c10d_functional.all_reduce.default
    _WAIT: Any = torch.ops._c10d_functional.wait_tensor.default
    # ... and make_fx records the eager c10d op (its schema does not mark the list as mutated)
    _C10D_ALL_REDUCE: Any = torch.ops.c10d.allreduce_.default
except (AttributeError, RuntimeError):  # torch built without distributed: nothing to match
    _ALL_REDUCE = _WAIT = _C10D_ALL_REDUCE = None


# ------------------------------------------------------------------------- a pattern of alternatives
class AnyOf(PatternExpr):
    """Matches a node that one of `alternatives` (pattern expressions) matches: the first that does.

    A failed alternative leaves no bindings behind (the match context is restored, as
    ``MultiOutputPattern`` does between anchors). There is no backtracking into an alternative
    that matched, so list the more specific ones first (``x.float()`` before bare ``x``).

    Args:
        alternatives: ``PatternExpr`` objects; they may share sub-patterns.
        name: if given, the matched node is also passed to the handler as ``kwargs[name]``.
    """

    def __init__(self, *alternatives: PatternExpr, name: Optional[str] = None) -> None:
        super().__init__()
        if not alternatives or not all(isinstance(a, PatternExpr) for a in alternatives):
            raise TypeError("AnyOf: expected one or more PatternExpr alternatives")
        self.alternatives = alternatives
        self.name = name

    def __repr__(self) -> str:
        return f"AnyOf(<{len(self.alternatives)} alternatives>{', name=' + repr(self.name) if self.name else ''})"

    def _match(self, node: Any, ctx: Any) -> Any:
        saved, exclusive = dict(ctx.pattern_to_node), list(getattr(ctx, "exclusive_node_set", ()))
        failure: Any = FailedMatch("AnyOf: no alternative matched")
        for alternative in self.alternatives:
            try:
                m = ctx.match(alternative, node)
            except FailedMatch as e:  # raised by Match.extend on a keyword conflict
                m = e
            if m:
                if self.name is not None:
                    m.kwargs[self.name] = node
                return m
            failure = m
            ctx.pattern_to_node = dict(saved)
            if hasattr(ctx, "exclusive_node_set"):
                ctx.exclusive_node_set = list(exclusive)
        return failure

    def find_anchor_nodes(self, ctx: Any, searched: Any) -> Iterator[Any]:
        if self in ctx.pattern_to_node:
            yield ctx.pattern_to_node[self]
            return
        # Each alternative searches with its own copy of `searched`: alternatives share
        # sub-patterns, and a node one of them visited must stay a candidate for the next.
        seen = set()
        for alternative in self.alternatives:
            for node in alternative.find_anchor_nodes(ctx, copy.copy(searched)):
                if node not in seen:
                    seen.add(node)
                    yield node

    def pattern_eq(self, other: Any) -> bool:
        return (isinstance(other, AnyOf) and len(self.alternatives) == len(other.alternatives)
                and all(a.pattern_eq(b) for a, b in zip(self.alternatives, other.alternatives)))


# ------------------------------------------------------------------------- pattern pieces
def _to_f32(src: Any, users: Any = MULTIPLE) -> List[PatternExpr]:
    """The two spellings of ``src.float()``: Inductor's decomposed cast and make_fx's _to_copy."""
    return [CallFunction(_CONVERT, src, _F32, _users=users), CallFunction(_TO_COPY, src, dtype=_F32, _users=users)]


def _float_of(x: PatternExpr, name: str) -> AnyOf:
    """xf: ``x.float()``, or x itself (a float32 x has no cast node)."""
    return AnyOf(*_to_f32(x), x, name=name)


def _sum_of_squares(xf: PatternExpr, suffix: str, users: int) -> AnyOf:
    square = AnyOf(CallFunction(aten.pow.Tensor_Scalar, xf, 2), CallFunction(aten.mul.Tensor, xf, xf))
    reduce = CallFunction(list(_REDUCTIONS), square, KeywordArg("dim" + suffix), True, _users=users)
    return AnyOf(reduce, name="stat" + suffix)


def _all_reduced(stat: Callable[[int], PatternExpr], users: int) -> AnyOf:
    """stat after a SUM all-reduce: functional (Dynamo; AOT keeps the in-place write as a copy
    into the statistic until Inductor removes it), or c10d's (make_fx). `stat(n)`: the pattern
    of the statistic with n users."""
    def functional(source: PatternExpr) -> PatternExpr:
        return CallFunction(_WAIT, CallFunction(_ALL_REDUCE, source, "sum", KeywordArg("group")))

    alternatives: List[PatternExpr] = []
    if _ALL_REDUCE is not None:
        alternatives.append(CallFunction(_WAIT, CallFunction(_ALL_REDUCE, stat(1), "sum", KeywordArg("group")),
                                         _users=users))
        twice = stat(2)  # all_reduce's input and copy's destination
        alternatives.append(CallFunction(aten.copy.default, twice, functional(twice), _users=users))
    if _C10D_ALL_REDUCE is not None:
        once = stat(1)
        c10d = AnyOf(*(CallFunction(_C10D_ALL_REDUCE, [once], KeywordArg("process_group"), KeywordArg("reduce_op"),
                                    None, *trailing, _users=MULTIPLE)
                       for trailing in ((Ignored(),), (Ignored(), Ignored()))), name="c10d")
        alternatives.append(CallFunction(_getitem, CallFunction(_getitem, c10d, 0), 0, _users=users))
    return AnyOf(*alternatives)


def _outputs(var: PatternExpr, x: PatternExpr, xf: PatternExpr, suffix: str) -> List[PatternExpr]:
    """The tail ``(xf * rsqrt(var + eps) * w).to(x.dtype)`` in its spellings, one pattern per
    kind of output node (the cast, or the weight product when there is no cast)."""
    scaled = CallFunction(aten.rsqrt.default, CallFunction(aten.add.Tensor, var, KeywordArg("eps")))
    xf_again = AnyOf(*_to_f32(x), xf)  # a second x.float() of the same x, or the statistic's own xf
    normed = AnyOf(CallFunction(aten.mul.Tensor, xf_again, scaled), CallFunction(aten.mul.Tensor, scaled, xf_again))
    weight = KeywordArg("weight" + suffix)
    wf = AnyOf(*_to_f32(weight), weight)
    weighted = AnyOf(CallFunction(aten.mul.Tensor, normed, wf), CallFunction(aten.mul.Tensor, wf, normed))
    dtype = KeywordArg("out_dtype" + suffix)
    return [CallFunction(_CONVERT, weighted, dtype, _users=MULTIPLE),
            CallFunction(_TO_COPY, weighted, dtype=dtype, _users=MULTIPLE),
            CallFunction(aten.mul.Tensor, normed, wf, _users=MULTIPLE),
            CallFunction(aten.mul.Tensor, wf, normed, _users=MULTIPLE)]


def _rms_patterns() -> List[PatternExpr]:
    x = KeywordArg("x")
    xf = _float_of(x, "xf")
    stat = lambda users: _sum_of_squares(xf, "", users)  # noqa: E731
    var = CallFunction(aten.div.Tensor, _all_reduced(stat, 1), KeywordArg("divisor"))
    return _outputs(var, x, xf, "")


def _qk_patterns() -> List[PatternExpr]:
    """q and k (called a and b in the order of torch.cat) through one all-reduce."""
    x = {s: KeywordArg("x" + s) for s in ("_a", "_b")}
    xf = {s: _float_of(x[s], "xf" + s) for s in x}
    stats = [_sum_of_squares(xf[s], s, 1) for s in x]
    both = lambda users: CallFunction(aten.cat.default, stats, KeywordArg("cat_dim"), _users=users)  # noqa: E731
    pieces: List[Tuple[PatternExpr, PatternExpr]] = []
    for divide_first in (True, False):
        def source(users: int) -> PatternExpr:
            if divide_first:
                return CallFunction(aten.div.Tensor, _all_reduced(both, 1), KeywordArg("divisor"), _users=users)
            return _all_reduced(both, users)

        split_dim = KeywordArg("split_dim")
        forms = [CallFunction(aten.split.Tensor, source(1), 1, split_dim, _users=2),  # .chunk(2, -1), .split(1, -1)
                 CallFunction(aten.split_with_sizes.default, source(1), [1, 1], split_dim, _users=2)]
        halves = [(CallFunction(_getitem, f, 0), CallFunction(_getitem, f, 1)) for f in forms]
        sliced = source(2)
        halves.append(tuple(CallFunction(aten.slice.Tensor, sliced, split_dim, KeywordArg(f"start{s}"),
                                         KeywordArg(f"end{s}")) for s in x))
        for a, b in halves:
            if not divide_first:
                a, b = (CallFunction(aten.div.Tensor, h, KeywordArg("divisor" + s)) for h, s in ((a, "_a"), (b, "_b")))
            pieces.append((a, b))
    var = {"_a": AnyOf(*(p[0] for p in pieces)), "_b": AnyOf(*(p[1] for p in pieces))}
    outputs_b = AnyOf(*_outputs(var["_b"], x["_b"], xf["_b"], "_b"))
    return [MultiOutputPattern([out_a, outputs_b]) for out_a in _outputs(var["_a"], x["_a"], xf["_a"], "_a")]


# ------------------------------------------------------------------------- node helpers
def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, Node) else None


def _tensor(node: Any) -> Optional[torch.Tensor]:
    val = _val(node)
    return val if isinstance(val, torch.Tensor) else None


def _number(value: Any) -> Optional[float]:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _is_last_dim(dims: Any, ndim: int) -> bool:
    if isinstance(dims, (list, tuple)):
        if len(dims) != 1:
            return False
        dims = dims[0]
    return isinstance(dims, int) and dims in (-1, ndim - 1)


def _static_width(node: Any) -> Optional[int]:
    """The last dimension of node's value when it is a known integer (symbolic widths: None)."""
    val = _tensor(node)
    if val is None or val.dim() < 1:
        return None
    width = val.shape[-1]
    if isinstance(width, torch.SymInt):
        width = width.node.maybe_as_int()  # a symbol that guards have pinned to one value
    return width if isinstance(width, int) else None


def _rows_ok(node: Node) -> bool:
    """Whether the eager op accepts this input: unit last stride, leading dims viewable as rows."""
    val = _tensor(node)
    if val is None or not statically_known_true(val.stride(-1) == 1):
        return False
    for i in range(val.dim() - 2):  # leading dims must merge into one row stride
        if not statically_known_true(val.stride(i) == val.stride(i + 1) * val.shape[i + 1]):
            return False
    return True


def _column_slice(node: Any) -> Optional[Tuple[Node, int, int]]:
    """(qkv, start, width) when `node` is a last-dim column slice of a 2+-D tensor."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    if node.target is _getitem and isinstance(node.args[0], Node) and \
            node.args[0].target is aten.split_with_sizes.default:
        split = node.args[0]
        source, sizes = split.args[0], split.args[1]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        source_val = _tensor(source)
        if source_val is None or not _is_last_dim(dim, source_val.dim()) or \
                not all(isinstance(s, int) for s in sizes):
            return None
        index = node.args[1]
        return source, sum(sizes[:index]), sizes[index]
    if node.target is aten.slice.Tensor and not node.kwargs:
        source, rest = node.args[0], list(node.args[1:]) + [None] * (5 - len(node.args))
        dim, start, end, step = rest[0] if rest[0] is not None else 0, rest[1] or 0, rest[2], rest[3] or 1
        width = _static_width(source)
        if width is None or step != 1 or not _is_last_dim(dim, _tensor(source).dim()):
            return None
        end = width if end is None else min(end, width)
        if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start < end:
            return None
        return source, start, end - start
    return None


def _kwargs_ok(node: Node) -> bool:
    """A pattern node takes keyword arguments only where the matched op spells them so; the
    matcher itself ignores keywords a pattern does not name (an add's alpha, say)."""
    if node.target is _TO_COPY:
        return set(node.kwargs) == {"dtype"} and len(node.args) == 1
    if node.target in _REDUCTIONS:
        return set(node.kwargs) <= {"dtype"} and node.kwargs.get("dtype") in (None, _F32)
    if node.target is _C10D_ALL_REDUCE:
        return node.kwargs.get("sparse_indices") is None
    return not node.kwargs


def _dead(node: Node) -> bool:
    return not node.users and not node._erased


# ------------------------------------------------------------------------- what a match means
@dataclass
class _Collective:
    group: Any
    world: int
    c10d: Optional[Node]  # the c10d.allreduce_ node, erased with its Work result before replacing


@dataclass
class _Norm:
    """One normalized operand as matched: x (as given to the op), its width, reduction kind."""

    x: Node
    xf: Node
    kind: str  # "sum" or "mean"
    width: int
    weight: Node
    divisor: Optional[float]  # the division after the split (QK), or the only one (rms)
    out_dtype: Optional[torch.dtype]


@dataclass
class _Plan:
    """Everything the handler needs, computed by the entry's extra_check."""

    target: Any
    inputs: List[Node]  # the fused op's tensor arguments, in order
    build: Callable[[str], Callable[..., Any]]  # workspace key -> replacement function
    collective: _Collective
    device: torch.device
    leftovers: List[Node]  # nodes outside the match that the replacement leaves unused


def _collective(match: Match) -> Optional[_Collective]:
    kwargs = match.kwargs
    c10d = kwargs.get("c10d")
    if c10d is None:
        group = kwargs.get("group")
        if not isinstance(group, (str, int)):
            return None
        try:
            group = dist.distributed_c10d._resolve_process_group(str(group))
        except Exception:  # a group this process does not know
            return None
    else:
        gm = match.graph.owning_module
        pg, op = kwargs.get("process_group"), kwargs.get("reduce_op")
        if gm is None or not all(isinstance(n, Node) and n.op == "get_attr" for n in (pg, op)):
            return None
        try:
            if getattr(gm, op.target).op() != int(dist.ReduceOp.SUM):
                return None
            group = dist.ProcessGroup.unbox(getattr(gm, pg.target))
        except Exception:  # not the torchbind objects c10d traces to
            return None
        # (tensors, work) = allreduce_(...): tensors[0] is in the match; nobody may wait on work
        for user in c10d.users:
            if user not in match.nodes and not (user.target is _getitem and user.args[1] == 1 and not user.users):
                return None
    try:
        world = dist.get_world_size(group)
    except Exception:
        return None
    return _Collective(group, world, c10d)


def _norm(match: Match, suffix: str) -> Optional[_Norm]:
    kwargs = match.kwargs
    x, xf, stat, weight = (kwargs.get(n + suffix) for n in ("x", "xf", "stat", "weight"))
    x_val, xf_val, w_val = _tensor(x), _tensor(xf), _tensor(weight)
    if x_val is None or xf_val is None or w_val is None or not isinstance(stat, Node):
        return None
    if xf_val.dtype != _F32 or x_val.dtype not in _DTYPES or not _is_last_dim(kwargs.get("dim" + suffix), xf_val.dim()):
        return None
    width = _static_width(xf)
    if width is None or w_val.dim() != 1 or _static_width(weight) != width or w_val.dtype not in _DTYPES:
        return None
    out_dtype = kwargs.get("out_dtype" + suffix)
    if (out_dtype is None) != (x_val.dtype == _F32) or (out_dtype is not None and out_dtype != x_val.dtype):
        return None  # the output must come back in x's dtype, cast iff x is not float32
    divisor = kwargs.get("divisor" + suffix, kwargs.get("divisor"))
    return _Norm(x, xf, "sum" if stat.target is aten.sum.dim_IntList else "mean", width, weight, _number(divisor),
                 out_dtype)


def _divisor_ok(divisor: Optional[float], norm: _Norm, world: int) -> bool:
    expected = world * norm.width if norm.kind == "sum" else world
    return divisor is not None and divisor == float(expected)


def _common_checks(match: Match) -> Optional[Tuple[_Collective, float]]:
    if not all(_kwargs_ok(n) for n in match.nodes):
        return None
    eps = _number(match.kwargs.get("eps"))
    if eps is None or not eps >= 0.0:
        return None
    collective = _collective(match)
    return None if collective is None else (collective, eps)


def _defined_before_outputs(match: Match, inputs: Sequence[Node]) -> bool:
    """The replacement goes before the first output: its inputs must already exist there."""
    order = {n: i for i, n in enumerate(match.graph.nodes)}
    first = min(order[n] for n in match.output_nodes() if n is not None)
    return all(order[n] < first for n in inputs)


def _op_accepts(target: Any, args: Sequence[Any]) -> bool:
    """Run the fused op's fake implementation (its argument checks) on the inputs' fake values."""
    from torch._guards import detect_fake_mode

    vals = [_val(a) if isinstance(a, Node) else a for a in args]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:
        return False
    try:
        with mode:
            target(*vals)
    except (TypeError, ValueError):  # the op's own checks reject these inputs: keep the unfused form
        return False
    return True


def _plan_rms(match: Match) -> Optional[_Plan]:
    common = _common_checks(match)
    norm = _norm(match, "")
    if common is None or norm is None:
        return None
    collective, eps = common
    if not _divisor_ok(norm.divisor, norm, collective.world) or not _rows_ok(norm.x):
        return None
    target = torch.ops.allreduce_rms.rms_norm.default
    if not _op_accepts(target, (norm.x, norm.weight, eps, "")):
        return None

    def build(key: str) -> Callable[..., Any]:
        return lambda x, weight: target(x, weight, eps, key)

    return _Plan(target, [norm.x, norm.weight], build, collective, _tensor(norm.x).device, [])


def _plan_qk(match: Match) -> Optional[_Plan]:
    common = _common_checks(match)
    norms = [_norm(match, s) for s in ("_a", "_b")]
    if common is None or None in norms:
        return None
    collective, eps = common
    a, b = norms
    kwargs, world = match.kwargs, collective.world
    stats = _tensor(kwargs["stat_a"])
    if a.kind != b.kind or stats is None or not _is_last_dim(kwargs.get("cat_dim"), stats.dim()):
        return None
    if not _is_last_dim(kwargs.get("split_dim"), stats.dim()):
        return None
    if "start_a" in kwargs:  # the two statistics taken back by slices: [..., 0:1] and [..., 1:2]
        for s, first in (("_a", 0), ("_b", 1)):
            end = kwargs["end" + s]
            if kwargs["start" + s] != first or not isinstance(end, int) or min(end, 2) != first + 1:
                return None
    divisor = _number(kwargs.get("divisor"))
    if "divisor" in kwargs:  # divided before the split: one divisor for both
        a.divisor = b.divisor = divisor
    if not (_divisor_ok(a.divisor, a, world) and _divisor_ok(b.divisor, b, world)):
        return None
    # q and k must be the first two column blocks of one [.., q + 2*kv] tensor
    slices = [_column_slice(n.x) for n in norms]
    if None in slices or slices[0][0] is not slices[1][0]:
        return None
    q_first = slices[0][1] < slices[1][1]
    (qkv, q_start, q_size), (_, k_start, kv_size) = slices if q_first else slices[::-1]
    q, k = (a, b) if q_first else (b, a)
    if q_start != 0 or k_start != q_size or _static_width(qkv) != q_size + 2 * kv_size or not _rows_ok(qkv):
        return None
    inputs = [qkv, q.weight, k.weight]
    if not _defined_before_outputs(match, inputs):
        return None
    target = torch.ops.allreduce_rms.qk_norm.default
    if not _op_accepts(target, (qkv, q.weight, k.weight, q_size, kv_size, eps, "")):
        return None

    def build(key: str) -> Callable[..., Any]:
        def fused(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor) -> Tuple[torch.Tensor, ...]:
            q_out, k_out = target(qkv, q_weight, k_weight, q_size, kv_size, eps, key)
            return (q_out, k_out) if q_first else (k_out, q_out)  # in the order of the matched outputs
        return fused

    return _Plan(target, inputs, build, collective, _tensor(qkv).device, [a.x, b.x])


# ------------------------------------------------------------------------- the pass
class FusionPass(CustomGraphPass):
    """The fusion as an Inductor post-grad custom pass (a callable on ``torch.fx.Graph``).

    Args:
        workspaces: the workspaces to name in the fused nodes (matched by group and device);
            for a group without one, :func:`workspace_for` is used (collective on first use).

    Attributes:
        patterns: the ``PatternMatcherPass`` holding the patterns (``patterns.apply(graph)``
            replaces matches and returns their number; the graph module is not recompiled).
        replaced: patterns replaced so far, over every graph this pass has seen (a QK pair
            counts once).
    """

    def __init__(self, workspaces: Union[Workspace, Iterable[Workspace], None] = None) -> None:
        self.workspaces = [workspaces] if isinstance(workspaces, Workspace) else list(workspaces or ())
        self.replaced = 0
        self.patterns = PatternMatcherPass(pass_name="allreduce_rms_fusion")
        for pattern in _rms_patterns():
            register_graph_pattern(pattern, extra_check=self._check(_plan_rms), pass_dict=self.patterns)(self._replace)
        for pattern in _qk_patterns():
            register_graph_pattern(pattern, extra_check=self._check(_plan_qk), pass_dict=self.patterns)(self._replace)

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        if gm is None:
            raise RuntimeError("allreduce_rms FusionPass: the graph has no owning GraphModule")
        self.apply(gm)

    def apply(self, gm: torch.fx.GraphModule) -> int:
        """Replace every match in `gm` (in place); return how many. Recompiles `gm` if any."""
        count = self.patterns.apply(gm)
        if count:
            gm.graph.lint()
            gm.recompile()
        return count

    def uuid(self) -> Optional[Any]:
        # None: Inductor must not cache graphs this pass touched; they name workspaces by a
        # per-process key, meaningless in the process that would load them from the cache.
        return None

    @staticmethod
    def _check(plan: Callable[[Match], Optional[_Plan]]) -> Callable[[Match], bool]:
        def extra_check(match: Match) -> bool:
            match.allreduce_rms_plan = plan(match)  # type: ignore[attr-defined]
            return match.allreduce_rms_plan is not None  # type: ignore[attr-defined]
        return extra_check

    def _replace(self, match: Match, *args: Any, **kwargs: Any) -> None:
        from torch._guards import detect_fake_mode
        from torch._inductor.virtualized import NullHandler, V

        plan: _Plan = match.allreduce_rms_plan  # type: ignore[attr-defined]
        graph = match.graph
        key = self._workspace(plan.collective.group, plan.device).key
        c10d = plan.collective.c10d
        attrs: List[Node] = []
        if c10d is not None:  # the unused Work result would keep the collective alive
            for user in list(c10d.users):
                if user not in match.nodes:
                    graph.erase_node(user)
            attrs = [a for a in c10d.args[1:3] if isinstance(a, Node)]
        # replace_by_example traces the replacement under Inductor's fake mode; outside
        # Inductor (fuse() on a make_fx / AOT graph) use the one of the graph's values
        fake = contextlib.nullcontext()
        if isinstance(V.fake_mode, NullHandler):
            fake = V.set_fake_mode(detect_fake_mode([_val(n) for n in plan.inputs]))
        with fake:
            match.replace_by_example(plan.build(key), plan.inputs)
        for node in plan.leftovers + attrs:  # pure nodes: column slices of qkv, c10d's get_attrs
            if _dead(node):
                source = node.args[0] if node.target is _getitem else None
                graph.erase_node(node)
                if isinstance(source, Node) and _dead(source) and source.target is aten.split_with_sizes.default:
                    graph.erase_node(source)
        self.replaced += 1

    def _workspace(self, group: Any, device: torch.device) -> Workspace:
        for ws in self.workspaces:
            same_group = ws.group is group or (ws.group is not None and group is not None
                                               and ws.group.group_name == group.group_name)
            if same_group and not ws.closed and ws.device == device:
                return ws
        # Collective on first use (see the module docstring). workspace_for caches the default
        # group under None (what Workspace() and the modules use), not under the group object.
        return workspace_for(None if group is dist.group.WORLD else group, device=device)


def fuse(gm: torch.fx.GraphModule, workspaces: Union[Workspace, Iterable[Workspace], None] = None) -> int:
    """Replace every unfused TP RMSNorm / QK-norm pattern of `gm` by the fused op, in place.

    Args:
        gm: an aten-level graph with tensor metadata (``node.meta['val']``), as Inductor's
            post-grad passes, AOT autograd or ``make_fx`` produce.
        workspaces: the workspaces to name in the fused nodes (matched by group and device);
            for a group without one, :func:`workspace_for` is used (collective on first use).

    Returns:
        The number of replaced patterns (a QK pair counts once). The graph module is recompiled
        when it is non-zero; otherwise it is left exactly as it was.
    """
    return FusionPass(workspaces).apply(gm)


def _installed() -> List[Any]:
    from torch._inductor import config

    current = config.post_grad_custom_post_pass
    if current is None:
        return []
    return list(current) if isinstance(current, (list, tuple)) else [current]


def install_inductor_pass(workspaces: Union[Workspace, Iterable[Workspace], None] = None) -> FusionPass:
    """Install a :class:`FusionPass` as an Inductor post-grad custom pass; return it.

    Other passes already installed there are kept; an earlier :class:`FusionPass` is replaced.
    The pass applies to graphs compiled after this call (not to ones already compiled).
    """
    from torch._inductor import config

    fusion = FusionPass(workspaces)
    passes = [p for p in _installed() if not isinstance(p, FusionPass)] + [fusion]
    config.post_grad_custom_post_pass = passes[0] if len(passes) == 1 else passes
    return fusion


def uninstall_inductor_pass() -> None:
    """Remove every :class:`FusionPass` from Inductor's post-grad custom passes."""
    from torch._inductor import config

    passes = [p for p in _installed() if not isinstance(p, FusionPass)]
    config.post_grad_custom_post_pass = None if not passes else passes[0] if len(passes) == 1 else passes


@contextlib.contextmanager
def inductor_pass(workspaces: Union[Workspace, Iterable[Workspace], None] = None) -> Iterator[FusionPass]:
    """Context manager: the fusion pass is installed inside the block, and the previous setting
    restored after it. Compilation happens at the first call of a compiled function, so call it
    inside the block."""
    from torch._inductor import config

    previous = config.post_grad_custom_post_pass
    try:
        yield install_inductor_pass(workspaces)
    finally:
        config.post_grad_custom_post_pass = previous
