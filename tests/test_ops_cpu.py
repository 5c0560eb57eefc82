"""Plain (one-rank) rms_norm and qk_norm on CPU against the float64 reference.

workspace=None and a one-rank Workspace must both be plain RMSNorm / QK-norm. Tolerances are on
the relative norm error ||out - ref|| / ||ref||, where ref is computed in float64 from the same
(already rounded) inputs, so they only have to cover fp32 accumulation and the final rounding to
the output dtype: fp32 1e-5, fp16 2e-3, bf16 1.6e-2.
"""

from __future__ import annotations

import pytest
import torch

import allreduce_rms
from allreduce_rms.fallback import rms_norm_reference

from numerics import DTYPES, rel_err
from numerics import TOLERANCE as TOL

EPS = 1e-6


def make(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # an offset keeps the mean square away from 1 so a wrong width or eps shows
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2.5 + 0.3).to(dtype)


def reference(x: torch.Tensor, w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rms_norm_reference([rows], [w], eps)[0].reshape(x.shape)


SHAPES = [(0, 64), (1, 64), (7, 13), (64, 8), (5, 1), (3, 5, 24), (2, 3, 7), (2, 0, 16), (40,)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("w_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_plain(dtype, w_dtype, shape):
    x = make(shape, dtype, 1)
    w = make(shape[-1:], w_dtype, 2)
    ref = reference(x, w)
    x_before = x.clone()

    out = allreduce_rms.rms_norm(x, w, EPS)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(x, x_before), "out-of-place rms_norm modified its input"
    assert rel_err(out, ref) <= TOL[dtype]

    buf = torch.full_like(x, float("nan"))
    got = allreduce_rms.rms_norm(x, w, EPS, out=buf)
    assert got is buf
    assert torch.equal(buf, out), "out= must give the same result as the returned tensor"

    inplace = x.clone()
    got = allreduce_rms.rms_norm(inplace, w, EPS, out=inplace)
    assert got is inplace
    assert torch.equal(inplace, out), "in place (out=x) must give the same result"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_eps_and_strided_rows(dtype):
    # eps large enough to matter; x a column slice of a wider tensor (row stride != width)
    big = make((9, 40), dtype, 3)
    x = big[:, 8:32]
    w = make((24,), torch.float32, 4)
    out = allreduce_rms.rms_norm(x, w, eps=0.5)
    assert rel_err(out, reference(x, w, 0.5)) <= TOL[dtype]
    # 3-D with a sliced last dimension: the leading dims still merge into one row stride
    big3 = make((2, 3, 40), dtype, 5)
    x3 = big3[..., :24]
    out3 = allreduce_rms.rms_norm(x3, w, EPS)
    assert rel_err(out3, reference(x3, w)) <= TOL[dtype]
    # all-zero rows: eps keeps them finite (zero)
    z = torch.zeros((3, 24), dtype=dtype)
    assert torch.equal(allreduce_rms.rms_norm(z, w, EPS), z)


QK_SHAPES = [  # (leading shape, q_size, kv_size)
    ((0,), 16, 8),
    ((1,), 16, 8),
    ((7,), 12, 5),
    ((64,), 32, 8),
    ((3, 5), 24, 8),
    ((2, 3), 7, 3),
    ((4,), 1, 1),
]


@pytest.mark.parametrize("case", QK_SHAPES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-q{c[1]}-kv{c[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qk_norm_plain(dtype, case):
    lead, q_size, kv_size = case
    width = q_size + 2 * kv_size
    for qw_dtype, kw_dtype in ((torch.float32, torch.bfloat16), (dtype, dtype), (torch.float16, torch.float32)):
        qkv = make((*lead, width), dtype, 6)
        qw, kw = make((q_size,), qw_dtype, 7), make((kv_size,), kw_dtype, 8)
        q_ref = reference(qkv[..., :q_size], qw)
        k_ref = reference(qkv[..., q_size:q_size + kv_size], kw)
        before = qkv.clone()

        q, k = allreduce_rms.qk_norm(qkv, qw, kw, q_size, kv_size, EPS)
        assert q.shape == (*lead, q_size) and k.shape == (*lead, kv_size)
        assert q.dtype == dtype and k.dtype == dtype
        assert torch.equal(qkv, before), "out-of-place qk_norm modified qkv"
        assert rel_err(q, q_ref) <= TOL[dtype]
        assert rel_err(k, k_ref) <= TOL[dtype]

        q2, k2 = allreduce_rms.qk_norm(qkv, qw, kw, q_size, kv_size, EPS, inplace=True)
        if qkv.numel():
            assert q2.data_ptr() == qkv.data_ptr(), "inplace q must be a view into qkv"
            assert k2.data_ptr() == qkv[..., q_size:].data_ptr(), "inplace k must be a view into qkv"
        assert torch.equal(q2, q) and torch.equal(k2, k)
        assert torch.equal(qkv[..., :q_size], q) and torch.equal(qkv[..., q_size:q_size + kv_size], k)
        assert torch.equal(qkv[..., q_size + kv_size:], before[..., q_size + kv_size:]), "v was modified"


def test_one_rank_workspace_is_plain():
    # without torch.distributed a Workspace is a one-rank group: the local path, same results
    with allreduce_rms.Workspace() as ws:
        assert ws.path == "local" and ws.world_size == 1 and ws.reason
        for dtype in DTYPES:
            x = make((7, 24), dtype, 9)
            w = make((24,), torch.bfloat16, 10)
            assert torch.equal(allreduce_rms.rms_norm(x, w, EPS, ws), allreduce_rms.rms_norm(x, w, EPS))
            qkv = make((7, 40), dtype, 11)
            qw, kw = make((24,), dtype, 12), make((8,), dtype, 13)
            got = allreduce_rms.qk_norm(qkv, qw, kw, 24, 8, EPS, ws)
            want = allreduce_rms.qk_norm(qkv, qw, kw, 24, 8, EPS)
            assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_reference_matches_textbook_formula():
    # the reference itself, on a case small enough to check by hand: two shards of one row
    x = [torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]])]
    w = [torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])]
    out = rms_norm_reference(x, w, eps=0.0)
    # mean square over the full row of 4 = 25/4, rms = 2.5
    assert torch.allclose(out[0], torch.tensor([[1.2, 3.2]], dtype=torch.float64))
    assert torch.equal(out[1], torch.zeros((1, 2), dtype=torch.float64))
    assert out[0].dtype == torch.float64


def test_reference_rejects_mismatched_inputs():
    x, w = torch.ones(2, 4), torch.ones(4)
    for shards, weights, name in (([], [], "shards"), ([x, x], [w], "weights"), ([x], [torch.ones(3)], "weights"),
                                  ([x, torch.ones(3, 4)], [w, w], "shards")):
        with pytest.raises(ValueError, match=name):
            rms_norm_reference(shards, weights, EPS)
