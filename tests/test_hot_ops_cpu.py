"""The torch hot ops (cpp/hot_ops.cpp) on a CPU torch: registration through the stable C ABI,
the argument and result conventions of their boxed kernels, and ownership of the tensors they
are handed. Serving needs a GPU launch: tests/test_hot_path_gpu.py covers it.
"""

from __future__ import annotations

import sys

import torch

from allreduce_rms import _hot_path, _native

EPS = 1e-6


def test_hot_ops_register_on_this_torch() -> None:
    """The torch this suite runs with exports every entry point the kernels need (a CPU build
    lacks only the CUDA stream getter, which serving alone uses)."""
    assert _hot_path.HOT_OPS_ERROR is None
    schema = str(torch.ops.allreduce_rms._qk_norm_hot.default._schema)
    assert "int workspace, bool inplace) -> (Tensor, Tensor, int)" in schema
    # a CPU build of torch has no GPU launch to serve: the public functions never call the ops
    assert (_hot_path._qk_hot is None) == (not (torch.version.cuda or getattr(torch.version, "hip", None)))


def test_a_call_not_served_returns_its_input_and_launches_nothing() -> None:
    x, w = torch.randn(4, 16), torch.randn(16)
    before = x.clone()
    y, status = torch.ops.allreduce_rms._rms_norm_hot(x, w, EPS, 0, True)
    assert status == _hot_path.NOT_SERVED and y is x and torch.equal(x, before)
    qkv, qw, kw = torch.randn(4, 32), torch.randn(16), torch.randn(8)
    q, k, status = torch.ops.allreduce_rms._qk_norm_hot(qkv, qw, kw, 16, 8, EPS, 0, False)
    assert status == _hot_path.NOT_SERVED and q is qkv and k is qkv
    # shapes the kernel cannot describe (3-D rows, a 2-D weight) are misses too, not errors
    _, status = torch.ops.allreduce_rms._rms_norm_hot(x.view(2, 2, 16), w, EPS, 0, False)
    assert status == _hot_path.NOT_SERVED
    *_, status = torch.ops.allreduce_rms._qk_norm_hot(qkv, qw.view(2, 8), kw, 16, 8, EPS, 0, False)
    assert status == _hot_path.NOT_SERVED
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
