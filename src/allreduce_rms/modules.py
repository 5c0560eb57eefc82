"""``nn.Module`` wrappers: a tensor-parallel RMSNorm and QK-norm holding this rank's weight shards.

Each module keeps its weight shard(s) as Parameters and the group's :class:`Workspace`, and
calls :func:`allreduce_rms.rms_norm` / :func:`allreduce_rms.qk_norm` in ``forward``: the plain
eager functions when run eagerly, the custom ops when traced by ``torch.compile`` (see
:mod:`allreduce_rms.custom_ops`). The weights are created with ``requires_grad=False``: the ops
have no autograd formula.

Building them is collective when a process group with several ranks is given (the workspace is
created or fetched with :func:`workspace_for`): every rank of the group must build its modules
in the same order.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from . import custom_ops
from .ops import check_eps
from .variants import Variant, check_variant
from .workspace import Workspace, workspace_for

__all__ = ["TPQKNorm", "TPRMSNorm"]

GroupOrWorkspace = Union[dist.ProcessGroup, Workspace, None]


def _resolve_workspace(group: GroupOrWorkspace, device: Optional[Union[torch.device, str, int]]) -> Workspace:
    """The workspace to use: `group` itself when it is one, else the cached one of the group."""
    if isinstance(group, Workspace):
        return group
    non_member = getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", None)  # Workspace explains it
    if group is not None and not isinstance(group, dist.ProcessGroup) and group is not non_member:
        raise TypeError(f"group: expected a torch.distributed.ProcessGroup, an allreduce_rms.Workspace or None, "
                         f"got {type(group).__name__}")
    return workspace_for(group, device=device)


def _shard(name: str, full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s equal slice of the 1-D tensor `full` (a copy)."""
    if not isinstance(full, torch.Tensor):
        raise TypeError(f"{name}: expected a 1-D torch.Tensor (the full weight), got {type(full).__name__}")
    if full.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor (the full weight), got shape {tuple(full.shape)}")
    if full.shape[0] % world_size:
        raise ValueError(f"{name}: its {full.shape[0]} elements cannot be split into {world_size} equal shards")
    width = full.shape[0] // world_size
    return full[rank * width:(rank + 1) * width].detach().clone()


def _check_rank(rank: int, world_size: int) -> None:
    for name, value in (("rank", rank), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def _check_group(rank: int, world_size: int, ws: Workspace) -> None:
    if (ws.rank, ws.world_size) != (rank, world_size):
        raise ValueError(f"rank={rank}, world_size={world_size} do not match the group: this process is rank "
                         f"{ws.rank} of {ws.world_size}")


def _ones_weight(size: int, dtype: Optional[torch.dtype], device: Optional[Union[torch.device, str, int]],
                 ws: Workspace) -> nn.Parameter:
    """A frozen weight of ones: float32 unless told, on the workspace's device unless told."""
    target = device if device is not None else ws.device
    return nn.Parameter(torch.ones(size, dtype=dtype or torch.float32, device=target), requires_grad=False)


def _variant_weight(size: int, dtype: Optional[torch.dtype], device: Optional[Union[torch.device, str, int]],
                    ws: Workspace, weight_offset: float) -> nn.Parameter:
    """A frozen weight of (1 - weight_offset): the module starts as a plain RMSNorm whatever the
    offset (Gemma-style weights, offset 1, start at zero as Gemma's do)."""
    weight = _ones_weight(size, dtype, device, ws)
    if weight_offset != 0.0:
        weight.data.fill_(1.0 - weight_offset)
    return weight


def _check_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _kv_heads(k_weight: torch.Tensor, num_kv_heads: Optional[int],
              head_dim: Optional[int]) -> Tuple[Optional[int], Optional[int]]:
    """(num_kv_heads, head_dim) checked against the full 1-D k weight, the missing one inferred;
    (None, None) when neither is given."""
    if not isinstance(k_weight, torch.Tensor):
        raise TypeError(f"k_weight: expected a 1-D torch.Tensor (the full weight), got {type(k_weight).__name__}")
    if k_weight.dim() != 1:
        raise ValueError(f"k_weight: expected a 1-D tensor (the full weight), got shape {tuple(k_weight.shape)}")
    if num_kv_heads is None and head_dim is None:
        return None, None
    length = k_weight.shape[0]
    if num_kv_heads is not None:
        _check_size("num_kv_heads", num_kv_heads)
    if head_dim is not None:
        _check_size("head_dim", head_dim)
    if head_dim is None:
        if length % num_kv_heads:
            raise ValueError(f"k_weight: its {length} elements are not num_kv_heads={num_kv_heads} heads of equal "
                             f"width")
        head_dim = length // num_kv_heads
    elif num_kv_heads is None:
        if length % head_dim:
            raise ValueError(f"k_weight: its {length} elements are not whole heads of head_dim={head_dim}")
        num_kv_heads = length // head_dim
    if length != num_kv_heads * head_dim:
        raise ValueError(f"k_weight: has {length} elements, but num_kv_heads * head_dim = {num_kv_heads} * {head_dim} "
                         f"= {num_kv_heads * head_dim}")
    return num_kv_heads, head_dim


_PLAIN = Variant()


class TPRMSNorm(nn.Module):
    """RMSNorm over a row of width ``world_size * size`` of which this rank holds ``size`` columns.

    The keyword options are :func:`allreduce_rms.rms_norm`'s variants (the gate itself is an
    argument of ``forward``): a Mamba2/Bamba/NemotronH gated norm is
    ``TPRMSNorm(d_inner // tp, eps, group, group_size=d_inner // n_groups, weight_in_input_dtype=True)``
    called as ``norm(x, gate=z)``; MiniMax-Text-01's output norm adds ``gate_act="sigmoid",
    gate_position="after"``; a Gemma-style norm ``weight_offset=1.0``.

    Args:
        size: this rank's width W (its share of the normalized dimension).
        eps: added to the mean square.
        group: the tensor-parallel ProcessGroup, or a ready :class:`Workspace`, or None for the
            default group (the world group when torch.distributed is initialized, else a single
            rank: a plain RMSNorm).
        dtype, device: of the weight (default: float32, the current device of the workspace).
        gate_act, gate_position, group_size, weight_offset, norm_width, weight_in_input_dtype:
            as in :func:`allreduce_rms.rms_norm` (keyword only), checked here against W and
            the group's size.

    Attributes:
        weight: Parameter [W], initialized to 1 - weight_offset (so that the module starts as a
            plain RMSNorm: ones, or Gemma's zeros with offset 1).
        workspace: the group's :class:`Workspace`.
        variant: the validated options (:class:`allreduce_rms.variants.Variant`).

    Shapes: ``forward(x, gate=None)`` takes x of shape [..., W] (float32/float16/bfloat16, unit
    stride in the last dimension) and optionally a gate of the same shape, and returns the
    normalized tensor of x's shape and dtype.

    Raises:
        TypeError: size not an int, eps not a real number, group of another kind, an option of
            the wrong kind (the message names the argument).
        ValueError: size <= 0, eps < 0 or not finite, an option value that does not fit (a
            group_size straddling ranks, a norm_width wider than the row, ...). forward raises
            as :func:`rms_norm`.
    """

    def __init__(
        self,
        size: int,
        eps: float = 1e-6,
        group: GroupOrWorkspace = None,
        *,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str, int]] = None,
        gate_act: str = "silu",
        gate_position: str = "before",
        group_size: Optional[int] = None,
        weight_offset: float = 0.0,
        norm_width: Optional[int] = None,
        weight_in_input_dtype: bool = False,
    ) -> None:
        super().__init__()
        _check_size("size", size)
        self.eps = check_eps(eps)
        self.workspace = _resolve_workspace(group, device)
        self.variant: Variant = check_variant(gate_act=gate_act, gate_position=gate_position, group_size=group_size,
                                              weight_offset=weight_offset, norm_width=norm_width,
                                              weight_in_input_dtype=weight_in_input_dtype, width=size,
                                              world=self.workspace.world_size)
        self.weight = _variant_weight(size, dtype, device, self.workspace, self.variant.weight_offset)

    @classmethod
    def from_full_weight(
        cls,
        weight: torch.Tensor,
        rank: int,
        world_size: int,
        group: GroupOrWorkspace = None,
        eps: float = 1e-6,
        **options: object,
    ) -> "TPRMSNorm":
        """The module of rank `rank` of `world_size`, holding its equal shard of `weight`.

        Args:
            weight: the full [world_size * W] weight (any device/dtype; the shard keeps both),
                as the checkpoint stores it (for weight_offset models: without the offset).
            rank, world_size: this rank's place in the group; must match `group`.
            group, eps: as in the constructor.
            options: the constructor's keyword options (gate_act, gate_position, group_size,
                weight_offset, norm_width, weight_in_input_dtype), global like the weight.

        Raises:
            TypeError: `weight` is not a tensor, rank or world_size is not an int, an unknown
                option name, or an option of the wrong kind.
            ValueError: `weight` is not 1-D or its length is not divisible by `world_size`, or
                rank/world_size are out of range or differ from the group's, or an option does
                not fit the shard (as the constructor).
        """
        _check_rank(rank, world_size)
        shard = _shard("weight", weight, rank, world_size)
        ws = _resolve_workspace(group, weight.device)
        _check_group(rank, world_size, ws)
        module = cls(shard.shape[0], eps, ws, dtype=shard.dtype, device=shard.device, **options)  # type: ignore[arg-type]
        module.weight.data.copy_(shard)
        return module

    def forward(self, x: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        width = self.weight.shape[0]
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] != width:
            raise ValueError(f"x: last dimension is {x.shape[-1]}, but this module normalizes {width} columns per "
                             f"rank (its weight slice; {width * self.workspace.world_size} over "
                             f"{self.workspace.world_size} rank(s))")
        v = self.variant
        if gate is None and v == _PLAIN:
            return custom_ops.rms_norm(x, self.weight, self.eps, self.workspace)
        return custom_ops.rms_norm(x, self.weight, self.eps, self.workspace, gate=gate, gate_act=v.gate_act,
                                   gate_position=v.gate_position, group_size=v.group_size,
                                   weight_offset=v.weight_offset, norm_width=v.norm_width,
                                   weight_in_input_dtype=v.weight_in_input_dtype)

    def extra_repr(self) -> str:
        options = "".join(f", {name}={getattr(self.variant, name)!r}" for name in Variant.__dataclass_fields__
                          if getattr(self.variant, name) != getattr(_PLAIN, name))
        return (f"size={self.weight.shape[0]}, eps={self.eps}{options}, rank={self.workspace.rank}, "
                f"world_size={self.workspace.world_size}, path={self.workspace.path!r}")


class TPQKNorm(nn.Module):
    """QK-norm of a tensor-parallel attention layer: q and k each normalized over all heads.

    Args:
        q_size: this rank's q width (its q heads x head_dim); kv_size: its k width.
        eps: added to each mean square.
        group: the tensor-parallel ProcessGroup, a :class:`Workspace`, or None (as :class:`TPRMSNorm`).
        dtype, device: of the weights (default: float32, the device of the workspace).
        weight_offset, weight_in_input_dtype: as in :func:`allreduce_rms.qk_norm` (keyword
            only): MiniMax-M2 as Hugging Face computes it is ``weight_in_input_dtype=True``,
            OLMo-2 the default False.

    Attributes:
        q_weight: Parameter [q_size]; k_weight: Parameter [kv_size]; both initialized to
            1 - weight_offset (ones by default).
        workspace: the group's :class:`Workspace`.
        num_kv_heads, head_dim: the model's total KV head count and head width when given to
            :meth:`from_full_weight`, else None (informative: forward does not use them).

    Shapes: ``forward(qkv, inplace=False)`` takes qkv of shape [..., q_size + 2*kv_size] (q | k | v
    columns of this rank, float32/float16/bfloat16) and returns (q [..., q_size], k [..., kv_size])
    in qkv's dtype -- new tensors, or qkv's q and k columns, written in place, when ``inplace``.

    Replicated KV heads (fewer KV heads than ranks) need nothing special at run time: each rank
    holds its head's k columns, the R = world_size / num_kv_heads copies of a head each add its
    sum of squares, and the width the sum is divided by is R times the real one, so the mean
    square is the real one. Build such a module with ``from_full_weight(..., num_kv_heads=...)``.

    Raises:
        TypeError: q_size or kv_size not an int, eps not a real number, group of another kind.
        ValueError: q_size or kv_size <= 0, eps < 0 or not finite. forward raises ValueError when
            qkv's last dimension is not q_size + 2*kv_size (the message gives the layout the
            module expects, and points at ``num_kv_heads`` when k and v look like whole
            multiples of kv_size, the sign of replicated KV heads built without it), and
            otherwise raises as :func:`qk_norm`.
    """

    def __init__(
        self,
        q_size: int,
        kv_size: int,
        eps: float = 1e-6,
        group: GroupOrWorkspace = None,
        *,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str, int]] = None,
        weight_offset: float = 0.0,
        weight_in_input_dtype: bool = False,
    ) -> None:
        super().__init__()
        _check_size("q_size", q_size)
        _check_size("kv_size", kv_size)
        eps = check_eps(eps)
        variant = check_variant(weight_offset=weight_offset, weight_in_input_dtype=weight_in_input_dtype)
        self.workspace = _resolve_workspace(group, device)
        self.q_size, self.kv_size, self.eps = q_size, kv_size, eps
        self.weight_offset, self.weight_in_input_dtype = variant.weight_offset, variant.weight_in_input_dtype
        self.num_kv_heads: Optional[int] = None
        self.head_dim: Optional[int] = None
        self.q_weight = _variant_weight(q_size, dtype, device, self.workspace, self.weight_offset)
        self.k_weight = _variant_weight(kv_size, dtype, device, self.workspace, self.weight_offset)

    @classmethod
    def from_full_weight(
        cls,
        q_weight: torch.Tensor,
        k_weight: torch.Tensor,
        rank: int,
        world_size: int,
        group: GroupOrWorkspace = None,
        eps: float = 1e-6,
        *,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        weight_offset: float = 0.0,
        weight_in_input_dtype: bool = False,
    ) -> "TPQKNorm":
        """The module of rank `rank`, holding its shards of the full q and k weights.

        The q weight is split into `world_size` equal consecutive shards. The k weight is split
        the way vLLM and SGLang lay out the KV heads of a tensor-parallel attention layer:

        * num_kv_heads and head_dim None: into `world_size` equal shards, as q.
        * num_kv_heads >= world_size: each rank holds num_kv_heads / world_size whole heads
          (the same equal split, checked against the head count).
        * num_kv_heads < world_size (replicated KV heads, e.g. MiniMax-M2's 8 KV heads at TP 16):
          each head sits on R = world_size / num_kv_heads consecutive ranks, and rank r holds
          all of head h = r // R: k_weight[h*head_dim:(h+1)*head_dim], so kv_size = head_dim.
          The rank's qkv must then carry that head's k and v columns (q_size + 2*head_dim).

        Args:
            q_weight: the full [num_heads * head_dim] q weight; k_weight: the full
                [num_kv_heads * head_dim] k weight (same device and dtype as q_weight; any of
                float32/float16/bfloat16; the shards keep both).
            rank, world_size: this rank's place in the group; must match `group`.
            group, eps: as in the constructor.
            num_kv_heads: the model's total KV head count (keyword only). Needed when it is less
                than `world_size`; otherwise it only adds checks.
            head_dim: the width of one head (keyword only). Default: k_weight's length divided
                by num_kv_heads. Given alone, num_kv_heads is k_weight's length divided by it.
                When given or inferred, each rank must hold whole q heads too.
            weight_offset, weight_in_input_dtype: as in the constructor (keyword only); the
                weights are the checkpoint's (without the offset).

        Raises:
            TypeError: a weight is not a tensor; rank, world_size, num_kv_heads or head_dim is
                not an int (bools included).
            ValueError: a weight is not 1-D or its length is not divisible by `world_size` (the
                message names it); num_kv_heads or head_dim <= 0; k_weight's length is not
                num_kv_heads * head_dim; num_kv_heads < world_size without dividing it, or
                >= world_size without being a multiple of it; q_weight's length is not a
                multiple of world_size * head_dim; the weights differ in device or dtype; or
                rank/world_size are out of range or differ from the group's.
        """
        _check_rank(rank, world_size)
        q_shard = _shard("q_weight", q_weight, rank, world_size)
        num_kv_heads, head_dim = _kv_heads(k_weight, num_kv_heads, head_dim)
        if head_dim is not None and q_weight.shape[0] % (world_size * head_dim):
            raise ValueError(f"q_weight: its {q_weight.shape[0]} elements are not whole heads of head_dim={head_dim} "
                             f"split evenly over {world_size} ranks (need a multiple of {world_size * head_dim})")
        if num_kv_heads is not None and head_dim is not None and num_kv_heads < world_size:
            if world_size % num_kv_heads:
                raise ValueError(f"num_kv_heads={num_kv_heads} is less than world_size={world_size} but does not "
                                 f"divide it: each KV head must be replicated on the same number of ranks")
            head = rank // (world_size // num_kv_heads)
            k_shard = k_weight[head * head_dim:(head + 1) * head_dim].detach().clone()
        else:
            if num_kv_heads is not None and num_kv_heads % world_size:
                raise ValueError(f"num_kv_heads={num_kv_heads} cannot be split into {world_size} equal shards of whole "
                                 f"heads: it must be a multiple of world_size, or a divisor of it (replicated heads)")
            k_shard = _shard("k_weight", k_weight, rank, world_size)
        if (k_shard.dtype, k_shard.device) != (q_shard.dtype, q_shard.device):
            raise ValueError(f"k_weight: dtype {k_shard.dtype} on {k_shard.device} differs from q_weight's "
                             f"{q_shard.dtype} on {q_shard.device}")
        ws = _resolve_workspace(group, q_weight.device)
        _check_group(rank, world_size, ws)
        module = cls(q_shard.shape[0], k_shard.shape[0], eps, ws, dtype=q_shard.dtype, device=q_shard.device,
                     weight_offset=weight_offset, weight_in_input_dtype=weight_in_input_dtype)
        module.q_weight.data.copy_(q_shard)
        module.k_weight.data.copy_(k_shard)
        module.num_kv_heads, module.head_dim = num_kv_heads, head_dim
        return module

    def forward(self, qkv: torch.Tensor, inplace: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(qkv, torch.Tensor) and qkv.dim() >= 1 and qkv.shape[-1] != self.q_size + 2 * self.kv_size:
            raise ValueError(self._width_message(int(qkv.shape[-1])))
        if self.weight_offset == 0.0 and not self.weight_in_input_dtype:
            return custom_ops.qk_norm(qkv, self.q_weight, self.k_weight, self.q_size, self.kv_size, self.eps,
                                      self.workspace, inplace=inplace)
        return custom_ops.qk_norm(qkv, self.q_weight, self.k_weight, self.q_size, self.kv_size, self.eps,
                                  self.workspace, inplace=inplace, weight_offset=self.weight_offset,
                                  weight_in_input_dtype=self.weight_in_input_dtype)

    def _width_message(self, width: int) -> str:
        """Why a qkv of last dimension `width` does not fit, and the likely cause."""
        q, kv, world = self.q_size, self.kv_size, self.workspace.world_size
        message = (f"qkv: last dimension is {width}, but this TPQKNorm expects this rank's q | k | v columns, "
                   f"q_size + 2*kv_size = {q} + 2*{kv} = {q + 2 * kv}")
        rest = width - q
        # k and v a whole multiple of kv_size wider: the k weight was split evenly over the ranks
        # although each rank holds whole (replicated) KV heads.
        if self.num_kv_heads is None and world > 1 and rest > 2 * kv and rest % (2 * kv) == 0:
            message += (f". Its k and v look {rest // (2 * kv)} times wider ({rest // 2} columns each): if the model "
                        f"has fewer KV heads than the {world} ranks, each head replicated on several ranks, build the "
                        f"module with TPQKNorm.from_full_weight(..., num_kv_heads=..., head_dim=...)")
        return message

    def extra_repr(self) -> str:
        heads = "" if self.num_kv_heads is None else f", num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
        if self.weight_offset != 0.0:
            heads += f", weight_offset={self.weight_offset!r}"
        if self.weight_in_input_dtype:
            heads += ", weight_in_input_dtype=True"
        return (f"q_size={self.q_size}, kv_size={self.kv_size}{heads}, eps={self.eps}, rank={self.workspace.rank}, "
                f"world_size={self.workspace.world_size}, path={self.workspace.path!r}")
