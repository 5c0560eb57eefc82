"""The eager hot path (allreduce_rms._hot_path): a call shape validated once is served without
validation, and any change from that shape is still caught.

Each test first makes a valid call (which records the shape), then changes one thing the
validation looks at and checks that the change gives the same error a first call would, or, for
a valid change, a result that matches the float64 reference. The tests run twice, once per way
of serving a remembered shape: the torch hot ops (C++, cpp/hot_ops.cpp) and the Python dict.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import allreduce_rms
from allreduce_rms import _hot_path, ops
from allreduce_rms.launch import run_ranks
from numerics import TOLERANCE, reference, rel_err, shard_scale

gpu = pytest.mark.gpu
HAS_GPU = torch.cuda.is_available() and allreduce_rms._native.gpu_kernels_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA/ROCm GPU and the built backend")
EPS = 1e-6


def _local_ref(x: torch.Tensor, w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return reference([x], [w], eps)[0]


@pytest.fixture(params=["hot ops", "python dict"])
def serving(request, monkeypatch) -> str:
    """Serve remembered shapes through the torch hot ops, or (with them switched off, as on a
    torch without them) through the Python dict. Starts with nothing remembered."""
    if request.param == "hot ops":
        assert _hot_path._qk_hot is not None, _hot_path.HOT_OPS_ERROR  # the GPU machine's torch has them
    else:
        monkeypatch.setattr(_hot_path, "_rms_hot", None)
        monkeypatch.setattr(_hot_path, "_qk_hot", None)
    _hot_path._no_workspace_calls.clear()
    _native_front().hot_forget(0)  # calls without a workspace
    return request.param


def _native_front():
    return allreduce_rms._native.front()


@gpu
@needs_gpu
def test_a_remembered_shape_is_served_without_validation(serving: str, monkeypatch) -> None:
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    first = allreduce_rms.rms_norm(x, w, EPS)
    assert len(_hot_path._no_workspace_calls) == 1
    assert _native_front().hot_remembered() == (1 if serving == "hot ops" else 0)

    def no_validation(*args, **kwargs):
        raise AssertionError("the full validation ran for a remembered shape")

    monkeypatch.setattr(ops, "_check_tensor", no_validation)
    again = allreduce_rms.rms_norm(x, w, EPS)
    other_tokens = allreduce_rms.rms_norm(x[:3], w, EPS)  # the token count is not part of the shape
    assert torch.equal(first, again) and torch.equal(first[:3], other_tokens)
    assert rel_err(first, _local_ref(x, w)) <= TOLERANCE[torch.bfloat16]


def test_only_python_numbers_enter_a_key() -> None:
    """A tensor accepted as eps or a size compares equal to itself after an in-place change, so
    calls with one are never remembered (CPU: the keys only)."""
    x, w = torch.randn(4, 8), torch.randn(8)
    qkv = torch.randn(4, 16)
    assert _hot_path.rms_norm_key(x, w, 1e-6, None) is not None
    assert _hot_path.rms_norm_key(x, w, torch.tensor(1e-6), None) is None
    assert _hot_path.qk_norm_key(qkv, w, w[:4], 8, 4, 1e-6, False) is not None
    for q_size, kv_size, eps, inplace in ((torch.tensor(8), 4, 1e-6, False), (8, torch.tensor(4), 1e-6, False),
                                          (8, 4, torch.tensor(1e-6), False), (8, 4, 1e-6, 1)):
        assert _hot_path.qk_norm_key(qkv, w, w[:4], q_size, kv_size, eps, inplace) is None


@gpu
@needs_gpu
def test_every_change_after_a_remembered_call_is_caught(serving: str) -> None:
    width = 512
    x = torch.randn(8, width, device="cuda", dtype=torch.float16)
    w = torch.randn(width, device="cuda", dtype=torch.float16)
    allreduce_rms.rms_norm(x, w, EPS)  # remembered
    with pytest.raises(ValueError, match="dtype"):
        allreduce_rms.rms_norm(x.to(torch.int32), w, EPS)
    with pytest.raises(ValueError, match="weight"):
        allreduce_rms.rms_norm(x, w[:-8], EPS)
    with pytest.raises(ValueError, match="weight"):
        allreduce_rms.rms_norm(x, w.cpu(), EPS)
    with pytest.raises(ValueError, match="unit stride"):
        allreduce_rms.rms_norm(torch.randn(width, 8, device="cuda", dtype=torch.float16).t(), w, EPS)
    with pytest.raises(ValueError, match="eps"):
        allreduce_rms.rms_norm(x, w, -1.0)
    with pytest.raises(TypeError, match="eps"):
        allreduce_rms.rms_norm(x, w, True)  # == 1.0, but not a real number of the right kind
    with pytest.raises(TypeError, match="x"):
        allreduce_rms.rms_norm(x.tolist(), w, EPS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out"):
        allreduce_rms.rms_norm(x, w, EPS, out=torch.empty(7, width, device="cuda", dtype=torch.float16))
    out = torch.empty_like(x)
    allreduce_rms.rms_norm(x, w, EPS, out=out)  # remembered with an out tensor
    with pytest.raises(ValueError, match="out"):
        allreduce_rms.rms_norm(x[:4], w, EPS, out=out)  # same out tensor, other row count

    qkv = torch.randn(4, 64 + 2 * 16, device="cuda")
    qw, kw = torch.randn(64, device="cuda"), torch.randn(16, device="cuda")
    allreduce_rms.qk_norm(qkv, qw, kw, 64, 16, EPS)  # remembered
    with pytest.raises(ValueError, match="last dimension"):
        allreduce_rms.qk_norm(qkv, qw, kw, 64, 8, EPS)
    with pytest.raises(TypeError, match="q_size"):
        allreduce_rms.qk_norm(qkv, qw, kw, 64.0, 16, EPS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="workspace"):
        allreduce_rms.qk_norm(qkv, qw, kw, 64, 16, EPS, "ws1")  # type: ignore[arg-type]
    allreduce_rms.qk_norm(qkv, qw, kw, 64, 16, EPS, inplace=True)  # remembered in place
    with pytest.raises(TypeError, match="inplace"):
        allreduce_rms.qk_norm(qkv, qw, kw, 64, 16, EPS, inplace=1)  # type: ignore[arg-type]
    allreduce_rms.rms_norm(x, w, 1.0)  # remembered with eps 1.0: True (== 1.0) must still be refused
    with pytest.raises(TypeError, match="eps"):
        allreduce_rms.rms_norm(x, w, True)
    with pytest.raises(ValueError, match="q_weight"):
        allreduce_rms.qk_norm(qkv, qw[:32], kw, 64, 16, EPS)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_valid_changes_give_correct_results(serving: str, dtype: torch.dtype) -> None:
    """Same strides and widths but other pointers (a misaligned start takes the scalar path),
    other token counts, other eps, out and in place: each result against float64."""
    tol = TOLERANCE[dtype]
    width = 3 * 128
    buf = torch.randn(4099, width + 8, device="cuda").to(dtype)
    w = (1 + 0.2 * torch.randn(width, device="cuda")).to(dtype)
    for tokens in (1, 4099, 7, 0, 1024, 2):
        for start in (0, 1, 8):  # column 1: same strides, 2 or 4 bytes off 16-byte alignment
            x = buf[:tokens, start:start + width]
            for eps in (EPS, 0.5):
                got = allreduce_rms.rms_norm(x, w, eps)
                assert rel_err(got, _local_ref(x, w, eps)) <= tol, (tokens, start, eps)
            inplace = buf.clone()[:tokens, start:start + width]
            allreduce_rms.rms_norm(inplace, w, EPS, out=inplace)
            assert rel_err(inplace, _local_ref(x, w)) <= tol, (tokens, start, "in place")
    q_size, kv_size = 256, 64
    qkv_buf = torch.randn(64, q_size + 2 * kv_size + 8, device="cuda").to(dtype)
    qw = (1 + 0.2 * torch.randn(q_size, device="cuda")).to(dtype)
    kw = (1 + 0.2 * torch.randn(kv_size, device="cuda")).to(dtype)
    for tokens in (1, 64, 3, 0):
        for start in (0, 1):
            qkv = qkv_buf[:tokens, start:start + q_size + 2 * kv_size]
            q, k = allreduce_rms.qk_norm(qkv, qw, kw, q_size, kv_size, EPS)
            assert rel_err(q, _local_ref(qkv[:, :q_size], qw)) <= tol
            assert rel_err(k, _local_ref(qkv[:, q_size:q_size + kv_size], kw)) <= tol
            # in place on a copy with the same layout (a clone of the view would be contiguous
            # and aligned, another kernel path with another summation order)
            inplace = qkv_buf.clone()[:tokens, start:start + q_size + 2 * kv_size]
            q2, k2 = allreduce_rms.qk_norm(inplace, qw, kw, q_size, kv_size, EPS, inplace=True)
            assert q2.shape == (tokens, q_size) and k2.shape == (tokens, kv_size)
            if tokens:  # (empty tensors have no storage to point into)
                assert q2.data_ptr() == inplace.data_ptr()
                assert k2.data_ptr() == inplace.data_ptr() + q_size * inplace.element_size()
            assert torch.equal(q2, q) and torch.equal(k2, k), (tokens, start)
            assert torch.equal(inplace[:, q_size + kv_size:], qkv[:, q_size + kv_size:])  # v untouched


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hot_ops_give_the_bits_of_the_direct_launch(dtype: torch.dtype, monkeypatch) -> None:
    """Every result the hot ops serve (new outputs, in-place views; a weight dtype other than the
    remembered one; T = 0) equals, bit for bit, the same call launched from Python."""
    assert _hot_path._qk_hot is not None, _hot_path.HOT_OPS_ERROR
    q_size, kv_size = 384, 128
    qkv_buf = torch.randn(33, q_size + 2 * kv_size + 8, device="cuda").to(dtype)
    qw = (1 + 0.2 * torch.randn(q_size, device="cuda")).to(dtype)
    kw = (1 + 0.2 * torch.randn(kv_size, device="cuda")).to(dtype)

    def run_all() -> list:
        results = []
        for tokens in (1, 33, 0, 5):
            for start in (0, 2):
                qkv = qkv_buf[:tokens, start:start + q_size + 2 * kv_size]
                for weights in ((qw, kw), (qw.float(), kw)):  # a second weight dtype: another shape
                    results += list(allreduce_rms.qk_norm(qkv, *weights, q_size, kv_size, EPS))
                    results += list(allreduce_rms.qk_norm(qkv, *weights, q_size, kv_size, EPS))  # served
                    inplace = qkv_buf.clone()[:tokens, start:start + q_size + 2 * kv_size]
                    q, k = allreduce_rms.qk_norm(inplace, *weights, q_size, kv_size, EPS, inplace=True)
                    assert q.stride() == inplace.stride() and k.stride() == inplace.stride()
                    if tokens:  # q and k lie in qkv's memory
                        assert q.data_ptr() == inplace.data_ptr()
                        assert k.data_ptr() == inplace.data_ptr() + q_size * inplace.element_size()
                    results += [q.clone(), k.clone(), inplace.clone()]
                x = qkv[:, :q_size]
                results.append(allreduce_rms.rms_norm(x, qw, EPS))
                y = x.clone()
                assert allreduce_rms.rms_norm(y, qw, EPS, out=y) is y
                results.append(y)
        torch.cuda.synchronize()
        return results

    _native_front().hot_forget(0)
    served = run_all()
    assert _native_front().hot_remembered() >= 4  # at least one call shape per output mode, remembered in C++
    monkeypatch.setattr(_hot_path, "_rms_hot", None)
    monkeypatch.setattr(_hot_path, "_qk_hot", None)
    _hot_path._no_workspace_calls.clear()
    direct = run_all()
    assert len(served) == len(direct)
    for i, (a, b) in enumerate(zip(served, direct)):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), i


@gpu
@needs_gpu
def test_a_staged_launch_is_taken_by_the_next_call_only() -> None:
    """A launch staged for a call the op cannot describe (3-D rows) is dropped with it, never
    kept for a later call of another shape, which would then run with the wrong launch."""
    assert _hot_path._qk_hot is not None, _hot_path.HOT_OPS_ERROR
    _native_front().hot_forget(0)
    _hot_path._no_workspace_calls.clear()
    qkv = torch.randn(4, 64 + 2 * 16, device="cuda")
    qw, kw = torch.randn(64, device="cuda"), torch.randn(16, device="cuda")
    allreduce_rms.qk_norm(qkv, qw, kw, 64, 16, EPS)
    entry = next(iter(_hot_path._no_workspace_calls.values()))
    assert _native_front().hot_remembered() == 1
    entry.launch.stage(1 << 20)
    *_, status = torch.ops.allreduce_rms._qk_norm_hot(qkv.view(2, 2, -1), qw, kw, 64, 16, EPS, 0, False)
    assert status == _hot_path.NOT_SERVED
    other = torch.randn(4, 32 + 2 * 16, device="cuda")  # never validated
    *_, status = torch.ops.allreduce_rms._qk_norm_hot(other, qw[:32], kw, 32, 16, EPS, 0, False)
    assert status == _hot_path.NOT_SERVED and _native_front().hot_remembered() == 1


@gpu
@needs_gpu
def test_hot_ops_edge_cases() -> None:
    """Served calls release every tensor they are handed; a fake tensor matching a remembered
    shape is not served (its data pointer is its storage offset, not memory); True for a size of
    1 is still refused after a size-1 shape was remembered; a fork child starts with nothing
    remembered; closing a one-rank workspace forgets its shapes for good."""
    assert _hot_path._qk_hot is not None, _hot_path.HOT_OPS_ERROR
    _native_front().hot_forget(0)
    buf = torch.randn(6, 1 + 2 * 64 + 8, device="cuda")
    qkv = buf[:, 2:2 + 1 + 2 * 64]  # an offset view: a fake copy has a non-null data pointer
    qw, kw = torch.randn(1, device="cuda"), torch.randn(64, device="cuda")
    allreduce_rms.qk_norm(qkv, qw, kw, 1, 64, EPS)  # remembered, q_size 1
    counts = [sys.getrefcount(t) for t in (qkv, qw, kw)]
    for _ in range(200):
        allreduce_rms.qk_norm(qkv, qw, kw, 1, 64, EPS)
        allreduce_rms.qk_norm(qkv, qw, kw, 1, 64, EPS, inplace=True)
    torch.cuda.synchronize()
    assert [sys.getrefcount(t) for t in (qkv, qw, kw)] == counts
    with pytest.raises(TypeError, match="q_size"):
        allreduce_rms.qk_norm(qkv, qw, kw, True, 64, EPS)  # type: ignore[arg-type]

    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = mode.from_tensor(buf)[:, 2:2 + 1 + 2 * 64]
        *_, status = torch.ops.allreduce_rms._qk_norm_hot(fake, mode.from_tensor(qw), mode.from_tensor(kw), 1, 64,
                                                          EPS, 0, False)
    assert status == _hot_path.NOT_SERVED
    torch.cuda.synchronize()  # the context is alive: nothing was launched on a fake address

    pid = os.fork()
    if pid == 0:  # the child touches no CUDA state: it only reads the table's size
        os._exit(0 if _native_front().hot_remembered() == 0 else 1)
    _, code = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(code) == 0, "a fork child inherited the parent's call shapes"

    ws = allreduce_rms.Workspace(max_tokens=8, device="cuda")
    x, w = torch.randn(4, 256, device="cuda"), torch.randn(256, device="cuda")
    before = _native_front().hot_remembered()
    allreduce_rms.rms_norm(x, w, EPS, ws)
    assert _native_front().hot_remembered() == before + 1
    ws.close()
    assert _native_front().hot_remembered() == before
    with pytest.raises(allreduce_rms.WorkspaceError, match="after close"):
        allreduce_rms.rms_norm(x, w, EPS, ws)


# ------------------------------------------------------------------------- fused, 2 GPUs
def _fused_worker(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    dev = torch.device("cuda", rank)
    width = 256
    g = torch.Generator().manual_seed(1)
    full = torch.randn(16, width * world, generator=g)
    full *= torch.tensor([shard_scale(r) for r in range(world)]).repeat_interleave(width)
    weights = 1 + 0.2 * torch.randn(width * world, generator=g)
    shards = [full[:, r * width:(r + 1) * width] for r in range(world)]
    wshards = [weights[r * width:(r + 1) * width] for r in range(world)]
    want = reference(shards, wshards, EPS)[rank]
    x, w = shards[rank].to(dev), wshards[rank].to(dev)
    res = {}
    with allreduce_rms.Workspace(max_tokens=8, chunking=False, timeout_ms=30_000) as ws:
        assert ws.path == "fused", ws.reason
        res["first"] = rel_err(allreduce_rms.rms_norm(x[:8], w, EPS, ws), want[:8])
        res["again"] = rel_err(allreduce_rms.rms_norm(x[:8], w, EPS, ws), want[:8])
        res["remembered"] = len(ws._hot_calls)
        res["hot_remembered"] = allreduce_rms._native.front().hot_remembered()
        try:  # a remembered shape with more tokens than max_tokens: the same error as a first call
            allreduce_rms.rms_norm(x, w, EPS, ws)
            res["too_many"] = ""
        except ValueError as exc:
            res["too_many"] = str(exc)
        ops.set_debug(True)  # debug mode turned on after the shape was remembered: the check runs
        try:
            allreduce_rms.rms_norm(x[: 4 + rank], w, EPS, ws)
            res["debug"] = ""
        except RuntimeError as exc:
            res["debug"] = str(exc)
        finally:
            ops.set_debug(None)
    try:  # closed after the shape was remembered
        allreduce_rms.rms_norm(x[:8], w, EPS, ws)
        res["closed"] = ""
    except allreduce_rms.WorkspaceError as exc:
        res["closed"] = str(exc)
    res["remembered_after_close"] = len(ws._hot_calls)
    res["hot_remembered_after_close"] = allreduce_rms._native.front().hot_remembered()
    return res


@pytest.mark.multigpu
@pytest.mark.skipif(not HAS_GPU or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fused_workspace_state_is_checked_on_every_call() -> None:
    for r in run_ranks(_fused_worker, 2, backend="nccl", timeout=180):
        assert r["first"] <= TOLERANCE[torch.float32] and r["again"] <= TOLERANCE[torch.float32]
        assert r["remembered"] == 1
        assert "max_tokens=8" in r["too_many"]
        assert "different calls" in r["debug"]
        assert "after close()" in r["closed"]
        assert r["remembered_after_close"] == 0
        assert r["hot_remembered"] == 1 and r["hot_remembered_after_close"] == 0
