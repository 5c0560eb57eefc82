"""Local (no communication) kernels on one GPU against the float64 reference.

With one rank, rms_norm and qk_norm are plain RMSNorm / QK-norm: this exercises the kernel's
vector widths (16-byte and the unaligned scalar path), vectors per thread, tokens per tile and
every dtype pairing of activations and weights.
"""

from __future__ import annotations

import pytest
import torch

import allreduce_rms
from allreduce_rms import _native
from numerics import DTYPES, TOLERANCE, reference, rel_err

pytestmark = pytest.mark.gpu

# (q_size, kv_size): MiniMax TP2 and TP1, other model shapes, an odd multiple of the 8-element
# vector, and widths that are no multiple of the vector (scalar path).
WIDTHS = [(3072, 512), (6144, 1024), (2048, 256), (4096, 128), (8 * 37, 8 * 5), (100, 36)]
TOKENS = [0, 1, 7, 64, 1000, 4099]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_size,kv_size", WIDTHS)
def test_qk_norm_local_matches_reference(dtype, q_size, kv_size):
    torch.manual_seed(q_size + kv_size)
    dev = torch.device("cuda", 0)
    eps = 1e-6
    for tokens in TOKENS:
        for wdtype in (dtype, torch.float32):
            qkv = torch.randn(tokens, q_size + 2 * kv_size, device=dev).to(dtype)
            qw = (1 + 0.1 * torch.randn(q_size, device=dev)).to(wdtype)
            kw = (1 + 0.1 * torch.randn(kv_size, device=dev)).to(wdtype)
            q_ref, = reference([qkv[:, :q_size]], [qw], eps)
            k_ref, = reference([qkv[:, q_size:q_size + kv_size]], [kw], eps)
            v_before = qkv[:, q_size + kv_size:].clone()
            q, k = allreduce_rms.qk_norm(qkv, qw, kw, q_size, kv_size, eps)
            assert rel_err(q, q_ref) <= TOLERANCE[dtype], (tokens, wdtype)
            assert rel_err(k, k_ref) <= TOLERANCE[dtype], (tokens, wdtype)
            q2, k2 = allreduce_rms.qk_norm(qkv, qw, kw, q_size, kv_size, eps, inplace=True)
            assert torch.equal(q2, q) and torch.equal(k2, k)  # same kernel, same bits
            assert q2.data_ptr() == qkv.data_ptr()
            assert torch.equal(qkv[:, q_size + kv_size:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_local_matches_reference_and_3d(dtype):
    dev = torch.device("cuda", 0)
    for width in (128, 4096, 5120, 8 * 41, 24):
        x = torch.randn(3, 37, width, device=dev).to(dtype)
        w = torch.randn(width, device=dev).to(torch.bfloat16)
        ref, = reference([x.reshape(-1, width)], [w], 1e-5)
        out = allreduce_rms.rms_norm(x, w, 1e-5)
        assert out.shape == x.shape
        assert rel_err(out.reshape(-1, width), ref) <= TOLERANCE[dtype]


def test_unaligned_view_takes_scalar_path_correctly():
    dev = torch.device("cuda", 0)
    base = torch.randn(65, 257, device=dev, dtype=torch.bfloat16)
    x = base[1:, 1:]  # pointer and row stride not 16-byte aligned
    w = torch.randn(256, device=dev)
    ref, = reference([x], [w], 1e-6)
    assert rel_err(allreduce_rms.rms_norm(x, w), ref) <= TOLERANCE[torch.bfloat16]


def test_dlpack_entry_point_dispatches_by_device_type():
    dev = torch.device("cuda", 0)
    x = torch.randn(10, 512, device=dev, dtype=torch.float16)
    w = torch.randn(512, device=dev, dtype=torch.float16)
    out = torch.empty_like(x)
    _native.front().rms_norm(x, w, out, 1e-6, _native.current_stream(dev))
    ref, = reference([x], [w], 1e-6)
    assert rel_err(out, ref) <= TOLERANCE[torch.float16]
    with pytest.raises(ValueError, match="CPU"):
        _native.front().rms_norm(x.cpu(), w.cpu(), out.cpu(), 1e-6, 0)


def test_output_is_poisoned_then_fully_written():
    dev = torch.device("cuda", 0)
    x = torch.randn(333, 3072, device=dev, dtype=torch.bfloat16)
    w = torch.randn(3072, device=dev, dtype=torch.bfloat16)
    out = torch.full_like(x, float("nan"))
    allreduce_rms.rms_norm(x, w, out=out)
    assert torch.isfinite(out).all()
