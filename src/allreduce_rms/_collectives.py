"""Small host-side collectives over fixed-size tensors: integers, bytes and strings.

``torch.distributed.all_gather_object`` and friends pickle through numpy, which is not a
dependency of this package (torch does not require it): a user without numpy would fail in
``Workspace(group)``. These helpers send everything as int64 / uint8 tensors instead:

* :func:`all_gather_ints`  -- one ``all_gather`` of an int64 tensor of a fixed length;
* :func:`all_gather_bytes` -- two: the lengths (int64), then the payloads padded to the longest;
* :func:`all_gather_fields` -- integers and strings of every rank in two collectives;
* :func:`all_gather_strings` -- UTF-8 text over :func:`all_gather_bytes`.

Every rank of ``group`` must call the same helper with the same argument counts (the integers
of :func:`all_gather_ints` and :func:`all_gather_fields` have a length all ranks agree on).

Tensors live where the group's backend can take them: on the CPU for gloo (and for a group that
has a CPU backend beside NCCL), on the GPU for an NCCL/RCCL-only group -- :func:`tensor_device`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

__all__ = ["all_gather_bytes", "all_gather_fields", "all_gather_ints", "all_gather_strings", "tensor_device"]

DeviceLike = Union[torch.device, str, int, None]
_SEPARATOR = b"\0"  # between the strings of one rank in all_gather_fields (NULs in them are replaced)


def tensor_device(group: Optional[dist.ProcessGroup] = None, preferred: DeviceLike = None) -> torch.device:
    """The device on which collectives of `group` accept tensors.

    CPU when the group's backend takes CPU tensors (gloo, mpi, or a combined backend such as
    ``cpu:gloo,cuda:nccl``); otherwise (NCCL/RCCL alone) a GPU: `preferred` when it is a CUDA
    device, else the current CUDA device.
    """
    name = str(dist.get_backend(group)).lower()
    gpu_only = "nccl" in name and "cpu:" not in name
    if not gpu_only:
        return torch.device("cpu")
    if preferred is not None:
        dev = torch.device("cuda", preferred) if isinstance(preferred, int) else torch.device(preferred)
        if dev.type == "cuda":
            return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", torch.cuda.current_device())


def _world(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group)


def all_gather_ints(values: Sequence[int], group: Optional[dist.ProcessGroup] = None,
                    device: DeviceLike = None) -> List[List[int]]:
    """Every rank's `values` (len(values) must be equal on all ranks), indexed by group rank.

    Args:
        values: Python ints in the int64 range.
        group: the process group (None: the world group).
        device: where the tensors go when the backend needs a GPU (see :func:`tensor_device`).

    Returns:
        One list of ints per rank of the group.
    """
    dev = tensor_device(group, device)
    mine = torch.tensor([int(v) for v in values], dtype=torch.int64, device=dev)
    out = [torch.empty_like(mine) for _ in range(_world(group))]
    dist.all_gather(out, mine, group=group)
    return [t.tolist() for t in out]


def all_gather_bytes(data: bytes, group: Optional[dist.ProcessGroup] = None,
                     device: DeviceLike = None) -> List[bytes]:
    """Every rank's `data` (any length, ranks may differ), indexed by group rank.

    Two collectives: the lengths, then the payloads padded with zeros to the longest one.
    """
    dev = tensor_device(group, device)
    payload = bytes(data)
    lengths = [n for (n,) in all_gather_ints([len(payload)], group, dev)]
    return _gather_padded(payload, lengths, group, dev)


def _gather_padded(payload: bytes, lengths: List[int], group: Optional[dist.ProcessGroup],
                   dev: torch.device) -> List[bytes]:
    """All ranks' payloads, whose lengths every rank already knows, as one uint8 all_gather."""
    longest = max(lengths)
    if longest == 0:  # nothing to send: skip the collective on every rank alike
        return [b"" for _ in lengths]
    buf = torch.zeros(longest, dtype=torch.uint8)
    if payload:
        buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    buf = buf.to(dev)
    out = [torch.empty_like(buf) for _ in lengths]
    dist.all_gather(out, buf, group=group)
    return [bytes(t.cpu().tolist()[:n]) for t, n in zip(out, lengths)]


def all_gather_strings(text: str, group: Optional[dist.ProcessGroup] = None,
                       device: DeviceLike = None) -> List[str]:
    """Every rank's `text` (UTF-8 on the wire), indexed by group rank."""
    return [b.decode("utf-8", errors="replace") for b in all_gather_bytes(text.encode("utf-8"), group, device)]


def all_gather_fields(ints: Sequence[int], texts: Sequence[str], group: Optional[dist.ProcessGroup] = None,
                      device: DeviceLike = None) -> List[Tuple[List[int], List[str]]]:
    """Every rank's (`ints`, `texts`) in two collectives; both lengths must agree across ranks.

    A NUL character inside a string comes back as U+FFFD (NUL separates the strings on the wire).
    """
    blob = _SEPARATOR.join(t.replace("\0", "\ufffd").encode("utf-8") for t in texts)
    dev = tensor_device(group, device)
    heads = all_gather_ints([*ints, len(blob)], group, dev)
    blobs = _gather_padded(blob, [h[-1] for h in heads], group, dev)
    result = []
    for head, raw in zip(heads, blobs):
        parts = raw.split(_SEPARATOR) if texts else []
        result.append((head[:-1], [p.decode("utf-8", errors="replace") for p in parts]))
    return result
