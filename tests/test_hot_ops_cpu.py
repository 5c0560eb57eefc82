"""The torch hot ops (cpp/hot_ops.cpp) on a CPU torch: registration through the stable C ABI,
the argument and result conventions of their boxed kernels, and ownership of the tensors they
are handed. Serving needs a GPU launch: tests/test_hot_path_gpu.py covers it.
"""

from __future__ import annotations

import sys

import pytest
import torch

import allreduce_rms
from allreduce_rms import _hot_path, _native

EPS = 1e-6


def test_hot_ops_register_on_this_torch() -> None:
    """The torch this suite runs with exports every entry point the kernels need (a CPU build
    lacks only the CUDA stream getter, which serving alone uses)."""
    assert _hot_path.HOT_OPS_ERROR is None
    schema = str(torch.ops.allreduce_rms._qk_norm_hot.default._schema)
    assert "int workspace, bool inplace) -> (Tensor, Tensor, bool)" in schema
    # a CPU build of torch has no GPU launch to serve: the public functions never call the ops
    assert (_hot_path._qk_hot is None) == (not (torch.version.cuda or getattr(torch.version, "hip", None)))


def test_a_call_not_served_returns_its_input_and_launches_nothing() -> None:
    x, w = torch.randn(4, 16), torch.randn(16)
    before = x.clone()
    y, served = torch.ops.allreduce_rms._rms_norm_hot(x, w, EPS, 0, True)
    assert served is False and y is x and torch.equal(x, before)
    qkv, qw, kw = torch.randn(4, 32), torch.randn(16), torch.randn(8)
    q, k, served = torch.ops.allreduce_rms._qk_norm_hot(qkv, qw, kw, 16, 8, EPS, 0, False)
    assert served is False and q is qkv and k is qkv
    # shapes the kernel cannot describe (3-D rows, a 2-D weight) are misses too, not errors
    _, served = torch.ops.allreduce_rms._rms_norm_hot(x.view(2, 2, 16), w, EPS, 0, False)
    assert served is False
    *_, served = torch.ops.allreduce_rms._qk_norm_hot(qkv, qw.view(2, 8), kw, 16, 8, EPS, 0, False)
    assert served is False
    assert _native.front().hot_remembered() == 0  # nothing was staged: nothing remembered


def test_the_kernels_release_every_tensor_they_are_handed() -> None:
    """Each Tensor argument arrives as an owning handle: a kernel that kept one would leak the
    tensor (its refcount would grow by one per call)."""
    qkv, qw, kw = torch.randn(4, 32), torch.randn(16), torch.randn(8)
    x, w = torch.randn(4, 16), torch.randn(16)
    counts = [sys.getrefcount(t) for t in (qkv, qw, kw, x, w)]
    for _ in range(1000):
        torch.ops.allreduce_rms._qk_norm_hot(qkv, qw, kw, 16, 8, EPS, 0, True)
        torch.ops.allreduce_rms._rms_norm_hot(x, w, EPS, 0, False)
    assert [sys.getrefcount(t) for t in (qkv, qw, kw, x, w)] == counts


def test_workspace_close_forgets_its_call_shapes() -> None:
    with allreduce_rms.Workspace(max_tokens=8, device="cpu") as ws:
        assert ws._hot_id > 0
        allreduce_rms.rms_norm(torch.randn(2, 8), torch.randn(8), EPS, ws)
    assert ws.closed and _native.front().hot_remembered() == 0


@pytest.mark.parametrize("bad", ["q_size", "eps", "inplace"])
def test_scalars_of_the_wrong_kind_still_raise_type_error(bad: str) -> None:
    """torch's schema takes True for an int or a float; the public functions must not."""
    qkv, qw, kw = torch.randn(4, 32), torch.randn(16), torch.randn(8)
    args = dict(q_size=16, eps=EPS, inplace=False)
    args[bad] = True if bad != "inplace" else 1
    with pytest.raises(TypeError, match=bad):
        allreduce_rms.qk_norm(qkv, qw, kw, args["q_size"], 8, args["eps"], inplace=args["inplace"])
