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
become two ``rms_norm`` nodes.

The pass is deliberately narrow: every intermediate value must be used only inside the pattern
(else nothing is replaced), the reduction must be a sum or mean of squares over the last
dimension, the collective a SUM all-reduce, the divisor exactly the full width, and the weight a
1-D tensor of the local width. Anything else -- a max, a plain sum, a local-width divisor, a
norm without all-reduce, the cast to x.dtype before the weight multiply -- is left alone.

Workspaces: each fused node names the workspace of its process group by key. Pass workspaces
explicitly (matched by group and device), or the pass takes :func:`workspace_for` ``(group,
device=...)``, which creates one on first use: that is collective, so it relies on every rank
compiling the same graph, as SPMD programs under torch.compile do.

Inductor: :func:`install_inductor_pass` appends a :class:`FusionPass` to
``torch._inductor.config.post_grad_custom_post_pass`` (torch 2.13 accepts a
``CustomGraphPass``, a callable on ``torch.fx.Graph``, or a list of them; the pass runs after
Inductor's own post-grad pattern passes, on the functionalized aten graph). Its ``uuid()`` is
None, which makes Inductor bypass its FX graph cache for graphs compiled while it is installed:
a cached graph would carry workspace keys of another process.
"""

from __future__ import annotations

import contextlib
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import custom_ops  # noqa: F401  (registers torch.ops.allreduce_rms.*)
from .workspace import Workspace, workspace_for

__all__ = ["FusionPass", "fuse", "install_inductor_pass", "inductor_pass", "uninstall_inductor_pass"]

aten = torch.ops.aten
Node = torch.fx.Node
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_F32 = torch.float32
_getitem = operator.getitem
try:
    # Dynamo traces dist.all_reduce as the functional pair all_reduce + wait_tensor ...
    _ALL_REDUCE: Any = torch.ops._c10d_functional.all_reduce.default
    _WAIT: Any = torch.ops._c10d_functional.wait_tensor.default
    # ... and make_fx records the eager in-place c10d op
    _C10D_ALL_REDUCE: Any = torch.ops.c10d.allreduce_.default
except (AttributeError, RuntimeError):  # torch built without distributed: nothing to match
    _ALL_REDUCE = _WAIT = _C10D_ALL_REDUCE = None


# ------------------------------------------------------------------------- node helpers
def _is(node: Any, *targets: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, Node) else None


def _only_user(node: Node) -> Optional[Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _number(value: Any) -> Optional[float]:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _cast_of(node: Any) -> Tuple[Optional[Node], Optional[torch.dtype]]:
    """(input, dtype) when `node` only converts its input's dtype, else (None, None)."""
    if _is(node, torch.ops.prims.convert_element_type.default):
        return node.args[0], node.args[1]
    if _is(node, aten._to_copy.default) and not node.args[1:] and set(node.kwargs) == {"dtype"}:
        return node.args[0], node.kwargs["dtype"]
    return None, None


def _is_last_dim(dims: Any, ndim: int) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, ndim - 1)


def _static_width(node: Node) -> Optional[int]:
    """The last dimension of node's value when it is a known integer (symbolic widths: None)."""
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.dim() < 1:
        return None
    width = val.shape[-1]
    if isinstance(width, torch.SymInt):
        width = width.node.maybe_as_int()  # a symbol that guards have pinned to one value
    return width if isinstance(width, int) else None


# ------------------------------------------------------------------------- pattern pieces
@dataclass
class _Stat:
    """One sum/mean of squares: x (as given to the op), its float32 form xf, the reduction."""

    x: Node
    xf: Node
    kind: str  # "sum" or "mean"
    width: int
    core: List[Node]  # nodes used only inside the pattern
    optional: List[Node] = field(default_factory=list)  # erased if nothing else uses them


@dataclass
class _Collective:
    stat_input: Node  # what is all-reduced
    reduced: Node  # the all-reduced value
    group: Any
    core: List[Node]
    optional: List[Node] = field(default_factory=list)


@dataclass
class _Tail:
    """divide -> + eps -> rsqrt -> * xf -> * weight -> cast, from one all-reduced statistic."""

    weight: Node
    eps: float
    out: Node
    core: List[Node]
    optional: List[Node]


def _match_stat(node: Node) -> Optional[_Stat]:
    if _is(node, aten.sum.dim_IntList):
        kind = "sum"
    elif _is(node, aten.mean.dim):
        kind = "mean"
    else:
        return None
    square, dims = node.args[0], _arg(node, 1, "dim")
    if _arg(node, 2, "keepdim", False) is not True or _arg(node, 3, "dtype") not in (None, _F32):
        return None
    if not isinstance(square, Node) or _only_user(square) is not node:
        return None
    if _is(square, aten.pow.Tensor_Scalar) and _number(square.args[1]) == 2.0:
        xf = square.args[0]
    elif _is(square, aten.mul.Tensor) and square.args[0] is square.args[1]:
        xf = square.args[0]
    else:
        return None
    xf_val = _val(xf)
    if not isinstance(xf_val, torch.Tensor) or xf_val.dtype != _F32 or not _is_last_dim(dims, xf_val.dim()):
        return None
    width = _static_width(xf)
    if width is None:
        return None
    source, dtype = _cast_of(xf)
    x, optional = xf, []
    if source is not None and dtype == _F32:
        source_val = _val(source)
        if isinstance(source_val, torch.Tensor) and source_val.dtype in _DTYPES:
            x, optional = source, [xf]
    return _Stat(x, xf, kind, width, [square, node], optional)


def _match_collective(node: Node, gm: torch.fx.GraphModule) -> Optional[_Collective]:
    """A SUM all-reduce of one tensor: functional (Dynamo) or c10d in-place (make_fx)."""
    if _ALL_REDUCE is not None and _is(node, _ALL_REDUCE):
        source, wait = node.args[0], _only_user(node)
        if node.args[1] != "sum" or not isinstance(source, Node) or not _is(wait, _WAIT):
            return None
        core, reduced = [node, wait], wait
        copy = _only_user(wait)  # AOT graphs keep dist.all_reduce's in-place write as copy(source, result)
        if _is(copy, aten.copy.default) and copy.args[0] is source and copy.args[1] is wait:
            core, reduced = core + [copy], copy
        if set(source.users) != set(core[:1] + core[2:]):
            return None  # the statistic is used elsewhere too
        group = node.args[2]
        if isinstance(group, str):
            try:
                group = dist.distributed_c10d._resolve_process_group(group)
            except Exception:  # a group this process does not know
                return None
        return _Collective(source, reduced, group, core)
    if _C10D_ALL_REDUCE is not None and _is(node, _C10D_ALL_REDUCE):
        tensors, pg, op = node.args[0], node.args[1], node.args[2]
        if not (isinstance(tensors, (list, tuple)) and len(tensors) == 1 and isinstance(tensors[0], Node)):
            return None
        if not (isinstance(pg, Node) and pg.op == "get_attr" and isinstance(op, Node) and op.op == "get_attr"):
            return None
        if _arg(node, 3, "sparse_indices") is not None:
            return None
        try:
            if getattr(gm, op.target).op() != int(dist.ReduceOp.SUM):
                return None
            group = dist.ProcessGroup.unbox(getattr(gm, pg.target))
        except Exception:  # not the torchbind objects c10d traces to
            return None
        reduced, core = None, [node]
        for user in node.users:  # (tensors, work) = allreduce_(...): tensors[0] is the result
            if not _is(user, _getitem) or user.args[1] not in (0, 1):
                return None
            core.append(user)
            if user.args[1] == 1:
                if user.users:
                    return None  # someone waits on the Work: not the plain synchronous form
                continue
            first = _only_user(user)
            if not (_is(first, _getitem) and first.args[1] == 0) or reduced is not None:
                return None
            reduced = first
            core.append(first)
        if reduced is None or _only_user(tensors[0]) is not node:
            return None
        return _Collective(tensors[0], reduced, group, core, [pg, op])
    return None


def _match_tail(start: Node, stat: _Stat, world: int, divided: bool) -> Optional[_Tail]:
    """Walk from an all-reduced statistic to the output; `divided`: the division came before."""
    core: List[Node] = []
    node = start
    if not divided:
        div = _only_user(node)
        if not _is(div, aten.div.Tensor) or div.args[0] is not node or not _divisor_ok(div.args[1], stat, world):
            return None
        core.append(div)
        node = div
    add = _only_user(node)
    if not _is(add, aten.add.Tensor) or add.args[0] is not node or len(add.args) != 2 or add.kwargs:
        return None
    eps = _number(add.args[1])
    if eps is None or not eps >= 0.0:
        return None
    rsqrt = _only_user(add)
    if not _is(rsqrt, aten.rsqrt.default):
        return None
    scaled = _only_user(rsqrt)
    if not _is(scaled, aten.mul.Tensor) or len(scaled.args) != 2 or rsqrt not in scaled.args:
        return None
    optional: List[Node] = []
    xf = scaled.args[1] if scaled.args[0] is rsqrt else scaled.args[0]
    if xf is not stat.xf:  # x.float() spelled twice: a second cast of the same x is as good
        if stat.x is stat.xf or _cast_of(xf) != (stat.x, _F32):
            return None
        optional.append(xf)
    weighted = _only_user(scaled)
    if not _is(weighted, aten.mul.Tensor) or len(weighted.args) != 2 or scaled not in weighted.args:
        return None
    wf = weighted.args[1] if weighted.args[0] is scaled else weighted.args[0]
    if not isinstance(wf, Node):
        return None
    weight = wf
    source, dtype = _cast_of(wf)
    if source is not None and dtype == _F32:
        weight = source
        optional.append(wf)
    weight_val = _val(weight)
    if (not isinstance(weight_val, torch.Tensor) or weight_val.dim() != 1 or _static_width(weight) != stat.width
            or weight_val.dtype not in _DTYPES):
        return None
    core += [add, rsqrt, scaled]
    x_dtype = _val(stat.x).dtype
    out = weighted
    if x_dtype != _F32:
        cast = _only_user(weighted)
        source, dtype = _cast_of(cast)
        if source is not weighted or dtype != x_dtype:
            return None
        core.append(weighted)
        out = cast
    elif _val(weighted).dtype != _F32:
        return None
    return _Tail(weight, eps, out, core, optional)


def _divisor_ok(divisor: Any, stat: _Stat, world: int) -> bool:
    value = _number(divisor)
    expected = world * stat.width if stat.kind == "sum" else world
    return value is not None and value == float(expected)


def _column_slice(node: Node) -> Optional[Tuple[Node, int, int]]:
    """(qkv, start, width) when `node` is a last-dim column slice of a 2+-D tensor."""
    if _is(node, _getitem) and _is(node.args[0], aten.split_with_sizes.default):
        split = node.args[0]
        source, sizes, dim = split.args[0], split.args[1], _arg(split, 2, "dim", 0)
        ndim = _val(source).dim() if isinstance(_val(source), torch.Tensor) else 0
        if dim not in (-1, ndim - 1) or not all(isinstance(s, int) for s in sizes):
            return None
        index = node.args[1]
        return source, sum(sizes[:index]), sizes[index]
    if _is(node, aten.slice.Tensor):
        source = node.args[0]
        dim, start, end = _arg(node, 1, "dim", 0), _arg(node, 2, "start", 0), _arg(node, 3, "end")
        step = _arg(node, 4, "step", 1)
        width = _static_width(source) if isinstance(source, Node) else None
        if width is None or step != 1 or dim not in (-1, _val(source).dim() - 1):
            return None
        start = 0 if start is None else start
        end = width if end is None else min(end, width)
        if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start < end:
            return None
        return source, start, end - start
    return None


def _rows_ok(node: Node) -> bool:
    """Whether the eager op accepts this input: unit last stride, leading dims viewable as rows."""
    val = _val(node)
    if not isinstance(val, torch.Tensor) or not statically_known_true(val.stride(-1) == 1):
        return False
    for i in range(val.dim() - 2):  # leading dims must merge into one row stride
        if not statically_known_true(val.stride(i) == val.stride(i + 1) * val.shape[i + 1]):
            return False
    return True


# ------------------------------------------------------------------------- the pass
class _Fuser:
    def __init__(self, gm: torch.fx.GraphModule, workspaces: Sequence[Workspace]) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.workspaces = list(workspaces)
        self.erased: set = set()

    def run(self) -> int:
        count = 0
        for node in list(self.graph.nodes):
            if node in self.erased or node.op != "call_function":
                continue
            coll = _match_collective(node, self.gm)
            if coll is None:
                continue
            count += self._fuse_one(coll)
        if count:
            self.graph.lint()
            self.gm.recompile()
        return count

    def _fuse_one(self, coll: _Collective) -> int:
        world = dist.get_world_size(coll.group)
        stat = _match_stat(coll.stat_input)
        if stat is not None:
            tail = _match_tail(coll.reduced, stat, world, divided=False)
            if tail is None or not _rows_ok(stat.x):
                return 0
            ws = self._workspace(coll.group, stat.x)
            return self._replace(torch.ops.allreduce_rms.rms_norm.default, (stat.x, tail.weight, tail.eps, ws.key),
                                 [tail.out], stat.core + coll.core + tail.core,
                                 stat.optional + tail.optional + coll.optional)
        return self._fuse_qk(coll, world)

    def _fuse_qk(self, coll: _Collective, world: int) -> int:
        cat = coll.stat_input
        if not _is(cat, aten.cat.default):  # (_match_collective checked that nothing else uses it)
            return 0
        parts, dim = cat.args[0], _arg(cat, 1, "dim", 0)
        if len(parts) != 2 or dim not in (-1, _val(cat).dim() - 1):
            return 0
        stats = [_match_stat(p) if isinstance(p, Node) and _only_user(p) is cat else None for p in parts]
        if None in stats or stats[0].kind != stats[1].kind:
            return 0
        # split the reduced [.., 2] back into the two statistics, dividing before or after
        node, core, divided = coll.reduced, [], False
        first = _only_user(node)
        if _is(first, aten.div.Tensor) and first.args[0] is node:
            if not all(_divisor_ok(first.args[1], s, world) for s in stats):
                return 0
            node, core, divided = first, [first], True
        pieces = self._split_two(node, core)
        if pieces is None:
            return 0
        tails = [_match_tail(piece, s, world, divided) for piece, s in zip(pieces, stats)]
        if None in tails or tails[0].eps != tails[1].eps:
            return 0
        # q and k must be the first two column blocks of one [.., q + 2*kv] tensor
        slices = [_column_slice(s.x) for s in stats]
        if None in slices or slices[0][0] is not slices[1][0]:
            return 0
        order = sorted(range(2), key=lambda i: slices[i][1])
        (qkv, q_start, q_size), (_, k_start, kv_size) = slices[order[0]], slices[order[1]]
        if q_start != 0 or k_start != q_size or _static_width(qkv) != q_size + 2 * kv_size or not _rows_ok(qkv):
            return 0
        ws = self._workspace(coll.group, qkv)
        q_tail, k_tail = tails[order[0]], tails[order[1]]
        args = (qkv, q_tail.weight, k_tail.weight, q_size, kv_size, q_tail.eps, ws.key)
        nodes = [cat] + stats[0].core + stats[1].core + coll.core + core + tails[0].core + tails[1].core
        optional = stats[0].optional + stats[1].optional + tails[0].optional + tails[1].optional + coll.optional
        return self._replace(torch.ops.allreduce_rms.qk_norm.default, args, [q_tail.out, k_tail.out], nodes, optional)

    @staticmethod
    def _split_two(node: Node, core: List[Node]) -> Optional[List[Node]]:
        """The two [.., 1] halves of `node` ([.., 2]): split/chunk + getitem, or two slices."""
        users = list(node.users)
        if len(users) == 1 and (_is(users[0], aten.split.Tensor) and _arg(users[0], 1, "split_size") == 1
                                or _is(users[0], aten.split_with_sizes.default) and list(users[0].args[1]) == [1, 1]):
            split = users[0]
            if _arg(split, 2, "dim", 0) not in (-1, _val(node).dim() - 1):
                return None
            items = sorted(split.users, key=lambda u: u.args[1] if _is(u, _getitem) else -1)
            if len(items) != 2 or not all(_is(u, _getitem) for u in items) or [u.args[1] for u in items] != [0, 1]:
                return None
            core += [split] + items
            return items
        if len(users) == 2 and all(_column_slice(u) is not None for u in users):
            found = {_column_slice(u)[1:]: u for u in users}
            if set(found) != {(0, 1), (1, 1)}:
                return None
            core += users
            return [found[(0, 1)], found[(1, 1)]]
        return None

    def _workspace(self, group: Any, x: Node) -> Workspace:
        device = _val(x).device
        for ws in self.workspaces:
            same_group = ws.group is group or (ws.group is not None and group is not None
                                               and ws.group.group_name == group.group_name)
            if same_group and not ws.closed and ws.device == device:
                return ws
        # Collective on first use (see the module docstring). workspace_for caches the default
        # group under None (what Workspace() and the modules use), not under the group object.
        return workspace_for(None if group is dist.group.WORLD else group, device=device)

    def _replace(self, target: Any, args: tuple, outs: List[Node], core: List[Node], optional: List[Node]) -> int:
        members = set(core) | set(outs)
        if any(user not in members for node in core for user in node.users):
            return 0  # an intermediate value is used outside the pattern: fusing would lose it
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        first_out = min(outs, key=order.__getitem__)
        inputs = [a for a in args if isinstance(a, Node)]
        if any(order[a] >= order[first_out] for a in inputs):
            return 0  # an input is defined after the first output: leave the graph as it is
        try:
            val = _fake_result(target, args)
        except ValueError:  # the op's own checks reject these inputs: keep the unfused form
            return 0
        with self.graph.inserting_before(first_out):
            fused = self.graph.call_function(target, args)
            fused.meta["val"] = val
            results = [fused]
            if len(outs) > 1:
                results = []
                for i in range(len(outs)):
                    item = self.graph.call_function(_getitem, (fused, i))
                    if val is not None:
                        item.meta["val"] = val[i]
                    results.append(item)
        for out, result in zip(outs, results):
            out.replace_all_uses_with(result)
        for node in sorted(members, key=order.__getitem__, reverse=True):
            self.graph.erase_node(node)
            self.erased.add(node)
        for node in optional:
            if node not in self.erased and not node.users:
                self.graph.erase_node(node)
                self.erased.add(node)
        return 1


def _fake_result(target: Any, args: tuple) -> Any:
    """The op's fake result on the inputs' fake values (the node's meta['val']), or None."""
    from torch._guards import detect_fake_mode

    vals = [_val(a) if isinstance(a, Node) else a for a in args]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:
        return None
    with mode:
        return target(*vals)


def fuse(gm: torch.fx.GraphModule, workspaces: Union[Workspace, Iterable[Workspace], None] = None) -> int:
    """Replace every unfused TP RMSNorm / QK-norm pattern of `gm` by the fused op, in place.

    Args:
        gm: an aten-level graph with tensor metadata (``node.meta['val']``), as Inductor's
            post-grad passes, AOT autograd or ``make_fx`` produce.
        workspaces: the workspaces to name in the fused nodes (matched by group and device);
            for a group without one, :func:`workspace_for` is used (collective on first use).

    Returns:
        The number of replaced patterns (a QK pair counts once). The graph module is recompiled
        when it is non-zero.
    """
    if isinstance(workspaces, Workspace):
        workspaces = [workspaces]
    return _Fuser(gm, list(workspaces or ())).run()


class FusionPass(CustomGraphPass):
    """:func:`fuse` as an Inductor post-grad custom pass (a callable on ``torch.fx.Graph``).

    Attributes:
        replaced: patterns replaced so far, over every graph this pass has seen.
    """

    def __init__(self, workspaces: Union[Workspace, Iterable[Workspace], None] = None) -> None:
        self.workspaces = [workspaces] if isinstance(workspaces, Workspace) else list(workspaces or ())
        self.replaced = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        if gm is None:
            raise RuntimeError("allreduce_rms FusionPass: the graph has no owning GraphModule")
        self.replaced += fuse(gm, self.workspaces)

    def uuid(self) -> Optional[Any]:
        # None: Inductor must not cache graphs this pass touched; they name workspaces by a
        # per-process key, meaningless in the process that would load them from the cache.
        return None


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
