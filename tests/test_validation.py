"""Argument validation (issues 7 and 12): every bad argument raises the documented exception, and
the message names the argument. As in Python and torch, an argument of the wrong kind (not a
tensor, not a number, not an int, not a Workspace) raises TypeError; one of the right kind with a
wrong value (dtype, shape, device, stride, range) raises ValueError. Single-process checks first; then one 2-rank gloo run for what needs
a group: debug mode, closed workspaces, creation arguments that differ across ranks.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Dict

import pytest
import torch

import allreduce_rms
from allreduce_rms import TPQKNorm, TPRMSNorm, Workspace, WorkspaceError, custom_ops, qk_norm, rms_norm
from allreduce_rms.launch import run_ranks

W = 16
Q, KV = 16, 8


def x_(*shape, dtype=torch.float32):
    return torch.randn(shape or (4, W), dtype=dtype)


def w_(n=W, dtype=torch.float32):
    return torch.randn(n, dtype=dtype)


def qkv_(t=4, dtype=torch.float32):
    return torch.randn(t, Q + 2 * KV, dtype=dtype)


def raises(exc, name, fn, *args, **kwargs):
    """fn(*args, **kwargs) raises exc with a message that names `name`."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert re.search(rf"\b{re.escape(name)}\b", str(info.value)), f"message does not name {name!r}: {info.value}"
    return info.value


# ------------------------------------------------------------------ tensors
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.bool, torch.complex64], ids=str)
def test_bad_dtypes(dtype):
    bad_x = torch.zeros(4, W, dtype=dtype)
    raises(ValueError, "x", rms_norm, bad_x, w_())
    raises(ValueError, "weight", rms_norm, x_(), torch.zeros(W, dtype=dtype))
    raises(ValueError, "qkv", qk_norm, torch.zeros(4, Q + 2 * KV, dtype=dtype), w_(Q), w_(KV), Q, KV)
    raises(ValueError, "q_weight", qk_norm, qkv_(), torch.zeros(Q, dtype=dtype), w_(KV), Q, KV)
    raises(ValueError, "k_weight", qk_norm, qkv_(), w_(Q), torch.zeros(KV, dtype=dtype), Q, KV)


def test_not_a_tensor():
    raises(TypeError, "x", rms_norm, [[1.0] * W], w_())
    raises(TypeError, "weight", rms_norm, x_(), [1.0] * W)
    raises(TypeError, "qkv", qk_norm, None, w_(Q), w_(KV), Q, KV)
    raises(TypeError, "q_weight", qk_norm, qkv_(), (1.0,) * Q, w_(KV), Q, KV)
    raises(TypeError, "k_weight", qk_norm, qkv_(), w_(Q), 1.0, Q, KV)
    raises(TypeError, "out", rms_norm, x_(), w_(), out=[0.0] * W)


def test_mixed_devices():
    meta = torch.device("meta")
    raises(ValueError, "weight", rms_norm, x_(), w_().to(meta))
    raises(ValueError, "q_weight", qk_norm, qkv_(), w_(Q).to(meta), w_(KV), Q, KV)
    raises(ValueError, "k_weight", qk_norm, qkv_(), w_(Q), w_(KV).to(meta), Q, KV)
    raises(ValueError, "out", rms_norm, x_(), w_(), out=torch.empty(4, W, device=meta))
    with Workspace() as ws:  # a CPU workspace and tensors on another device
        raises(ValueError, "workspace", rms_norm, x_().to(meta), w_().to(meta), 1e-6, ws)


def test_weight_width_and_shape():
    raises(ValueError, "weight", rms_norm, x_(), w_(W - 1))
    raises(ValueError, "weight", rms_norm, x_(), torch.randn(2, W // 2))
    raises(ValueError, "weight", rms_norm, x_(), torch.tensor(1.0))
    raises(ValueError, "q_weight", qk_norm, qkv_(), w_(Q + 1), w_(KV), Q, KV)
    raises(ValueError, "k_weight", qk_norm, qkv_(), w_(Q), w_(Q), Q, KV)
    raises(ValueError, "weight", rms_norm, x_(), torch.randn(2 * W)[::2])  # strided weight


def test_qkv_width_must_be_q_plus_two_kv():
    err = raises(ValueError, "qkv", qk_norm, torch.randn(4, Q + KV), w_(Q), w_(KV), Q, KV)
    assert "q_size" in str(err) and "kv_size" in str(err)
    raises(ValueError, "qkv", qk_norm, torch.randn(4, Q + 2 * KV + 1), w_(Q), w_(KV), Q, KV)


@pytest.mark.parametrize("bad", [0, -8])
def test_sizes_must_be_positive(bad):
    raises(ValueError, "q_size", qk_norm, qkv_(), w_(Q), w_(KV), bad, KV)
    raises(ValueError, "kv_size", qk_norm, qkv_(), w_(Q), w_(KV), Q, bad)


@pytest.mark.parametrize("bad", ["yes", 1, 0, None], ids=repr)
def test_inplace_must_be_a_bool(bad):
    raises(TypeError, "inplace must be a bool", qk_norm, qkv_(), w_(Q), w_(KV), Q, KV, 1e-6, inplace=bad)


@pytest.mark.parametrize("bad", [True, False, 16.0, "16", None, torch.tensor(16.0)], ids=repr)
def test_sizes_must_be_ints(bad):
    raises(TypeError, "q_size", qk_norm, qkv_(), w_(Q), w_(KV), bad, KV)
    raises(TypeError, "kv_size", qk_norm, qkv_(), w_(Q), w_(KV), Q, bad)


def test_sizes_accept_integer_like_values():
    np = pytest.importorskip("numpy")
    q, k = qk_norm(qkv_(), w_(Q), w_(KV), np.int64(Q), np.int32(KV))
    assert q.shape == (4, Q) and k.shape == (4, KV)


def test_last_dim_must_have_unit_stride():
    t = torch.randn(W, 4).t()  # [4, W] with strides (1, 4)
    raises(ValueError, "x", rms_norm, t, w_())
    raises(ValueError, "qkv", qk_norm, torch.randn(Q + 2 * KV, 4).t(), w_(Q), w_(KV), Q, KV)
    raises(ValueError, "out", rms_norm, x_(), w_(), out=torch.empty(W, 4).t())


def test_leading_dims_must_merge_into_rows():
    x = torch.randn(3, 5, W).transpose(0, 1)  # [5, 3, W]: rows cannot be one stride
    raises(ValueError, "x", rms_norm, x, w_())
    qkv = torch.randn(3, 5, Q + 2 * KV).transpose(0, 1)
    raises(ValueError, "qkv", qk_norm, qkv, w_(Q), w_(KV), Q, KV)
    out = torch.empty(3, 5, W).transpose(0, 1)
    raises(ValueError, "out", rms_norm, torch.randn(5, 3, W), w_(), out=out)
    # the same shapes, contiguous, work
    assert rms_norm(x.contiguous(), w_()).shape == (5, 3, W)


def test_empty_or_scalar_inputs():
    raises(ValueError, "x", rms_norm, torch.tensor(1.0), w_(1))
    raises(ValueError, "x", rms_norm, torch.empty(4, 0), torch.empty(0))


def test_out_shape_and_dtype():
    raises(ValueError, "out", rms_norm, x_(), w_(), out=torch.empty(4, W + 1))
    raises(ValueError, "out", rms_norm, x_(), w_(), out=torch.empty(5, W))
    raises(ValueError, "out", rms_norm, x_(), w_(), out=torch.empty(4, W, dtype=torch.float16))
    raises(ValueError, "out", rms_norm, x_(), w_(), out=torch.empty(4, W, dtype=torch.float64))


@pytest.mark.parametrize("eps", [-1e-6, float("nan"), float("inf"), -1])
def test_bad_eps_values(eps):
    raises(ValueError, "eps", rms_norm, x_(), w_(), eps)
    raises(ValueError, "eps", qk_norm, qkv_(), w_(Q), w_(KV), Q, KV, eps)


@pytest.mark.parametrize("eps", ["1e-6", b"1e-6", None, True, 1e-6j, [1e-6]], ids=repr)
def test_eps_of_the_wrong_type(eps):
    raises(TypeError, "eps", rms_norm, x_(), w_(), eps)
    raises(TypeError, "eps", qk_norm, qkv_(), w_(Q), w_(KV), Q, KV, eps)


def test_eps_accepts_real_numbers():
    x, w = x_(), w_()
    ref = rms_norm(x, w, 0.5)
    for eps in (Fraction(1, 2), torch.tensor(0.5)):
        assert torch.equal(rms_norm(x, w, eps), ref)
    assert torch.equal(rms_norm(x, w, 0), rms_norm(x, w, 0.0))


def test_eps_zero_is_allowed():
    assert torch.isfinite(rms_norm(x_(), w_(), 0.0)).all()


# ------------------------------------------------------------------ workspaces (one rank)
@pytest.mark.parametrize("bad", ["ws1", object(), 1, torch.empty(0)], ids=lambda b: type(b).__name__)
def test_workspace_of_the_wrong_type(bad):
    raises(TypeError, "workspace", rms_norm, x_(), w_(), 1e-6, bad)
    raises(TypeError, "workspace", qk_norm, qkv_(), w_(Q), w_(KV), Q, KV, 1e-6, bad)
    raises(TypeError, "workspace", custom_ops.traced_rms_norm, x_(), w_(), 1e-6, bad)
    raises(TypeError, "workspace", custom_ops.traced_qk_norm, qkv_(), w_(Q), w_(KV), Q, KV, 1e-6, bad)


def test_traced_forms_check_eps_like_the_eager_ones():
    raises(TypeError, "eps", custom_ops.traced_rms_norm, x_(), w_(), "1e-6")
    raises(ValueError, "eps", custom_ops.traced_qk_norm, qkv_(), w_(Q), w_(KV), Q, KV, -1.0)


def test_workspace_used_after_close():
    ws = Workspace()
    ws.close()
    ws.close()  # idempotent
    raises(WorkspaceError, "close", rms_norm, x_(), w_(), 1e-6, ws)
    raises(WorkspaceError, "close", qk_norm, qkv_(), w_(Q), w_(KV), Q, KV, 1e-6, ws)
    raises(WorkspaceError, "close", ws.check_usable)


def test_max_tokens_without_chunking():
    with Workspace(max_tokens=7, chunking=False) as ws:
        assert ws.max_tokens == 7  # as asked; the kernel's even slot size is internal
        rms_norm(x_(7, W), w_(), 1e-6, ws)
        rms_norm(x_(0, W), w_(), 1e-6, ws)
        raises(ValueError, "max_tokens", rms_norm, x_(8, W), w_(), 1e-6, ws)
        raises(ValueError, "max_tokens", qk_norm, qkv_(9), w_(Q), w_(KV), Q, KV, 1e-6, ws)
        raises(ValueError, "max_tokens", rms_norm, x_(2, 4, W), w_(), 1e-6, ws)  # tokens = rows of all leading dims
    with Workspace(max_tokens=4) as ws:  # chunking (the default) accepts any T
        assert rms_norm(x_(100, W), w_(), 1e-6, ws).shape == (100, W)


@pytest.mark.parametrize("kwargs, name", [
    ({"max_tokens": 0}, "max_tokens"), ({"path": "nccl"}, "path"), ({"timeout_ms": 0}, "timeout_ms"),
    ({"timeout_ms": -5}, "timeout_ms"), ({"device": "gpu"}, "device"),
])
def test_bad_workspace_values(kwargs, name):
    raises(ValueError, name, Workspace, **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 2.0}, "max_tokens"), ({"max_tokens": "64"}, "max_tokens"),
    ({"path": 1}, "path"), ({"timeout_ms": 1.5}, "timeout_ms"), ({"timeout_ms": "100"}, "timeout_ms"),
    ({"group": "tp"}, "group"), ({"group": 0}, "group"), ({"device": 1.0}, "device"), ({"device": True}, "device"),
])
def test_workspace_arguments_of_the_wrong_type(kwargs, name):
    raises(TypeError, name, Workspace, **kwargs)


def test_module_arguments():
    raises(TypeError, "size", TPRMSNorm, 8.0)
    raises(ValueError, "size", TPRMSNorm, -1)
    raises(TypeError, "eps", TPRMSNorm, 8, "1e-6")
    raises(ValueError, "eps", TPRMSNorm, 8, -1e-6)
    raises(TypeError, "kv_size", TPQKNorm, 8, None)
    raises(TypeError, "eps", TPQKNorm, 8, 4, None)
    raises(TypeError, "weight", TPRMSNorm.from_full_weight, [1.0] * 8, 0, 1)
    raises(TypeError, "rank", TPRMSNorm.from_full_weight, torch.ones(8), 0.0, 1)
    raises(TypeError, "world_size", TPQKNorm.from_full_weight, torch.ones(8), torch.ones(4), 0, "1")
    raises(ValueError, "rank", TPRMSNorm.from_full_weight, torch.ones(8), 1, 1)


def test_bad_workspace_environment(monkeypatch):
    monkeypatch.setenv("ALLREDUCE_RMS_PATH", "fastest")
    raises(ValueError, "ALLREDUCE_RMS_PATH", Workspace)
    monkeypatch.setenv("ALLREDUCE_RMS_PATH", " Fallback ")  # case and spaces are forgiven
    Workspace().close()
    monkeypatch.delenv("ALLREDUCE_RMS_PATH")
    monkeypatch.setenv("ALLREDUCE_RMS_TIMEOUT_MS", "10s")
    raises(ValueError, "ALLREDUCE_RMS_TIMEOUT_MS", Workspace)


# ------------------------------------------------------------------ a 2-rank group
def _outcome(fn) -> Dict[str, str]:
    try:
        fn()
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": "", "message": ""}


def _group_worker(rank: int, world: int) -> Dict[str, Any]:
    import os

    import torch.distributed as dist

    from allreduce_rms import ops

    res: Dict[str, Any] = {}
    assert os.environ.get("ALLREDUCE_RMS_DEBUG") == "1"  # set after allreduce_rms was imported
    ws = Workspace()
    x, w = torch.randn(4, W), torch.randn(W)
    qkv, qw, kw = torch.randn(4, Q + 2 * KV), torch.randn(Q), torch.randn(KV)

    # debug mode: same calls pass; a different T, op or width fails on every rank
    res["same"] = _outcome(lambda: (rms_norm(x, w, 1e-6, ws), qk_norm(qkv, qw, kw, Q, KV, 1e-6, ws)))
    res["tokens"] = _outcome(lambda: rms_norm(x[: 3 + rank], w, 1e-6, ws))
    res["op"] = _outcome(lambda: rms_norm(x, w, 1e-6, ws) if rank == 0 else qk_norm(qkv, qw, kw, Q, KV, 1e-6, ws))
    res["width"] = _outcome(lambda: rms_norm(x[:, : W - 8 * rank], w[: W - 8 * rank], 1e-6, ws))
    ops.set_debug(False)  # the setter wins over the environment
    res["debug_off"] = _outcome(lambda: rms_norm(x, w, 1e-6, ws))
    ops.set_debug(None)

    # T over max_tokens without chunking: the same error on both ranks, before any collective
    with Workspace(max_tokens=3, chunking=False) as small:
        res["max_tokens"] = _outcome(lambda: rms_norm(x, w, 1e-6, small))
        res["after_max_tokens"] = _outcome(lambda: rms_norm(x[:3], w, 1e-6, small))

    # creation arguments that differ across ranks: every rank raises, none waits
    res["args_differ"] = _outcome(lambda: Workspace(max_tokens=64 + rank))
    res["chunking_differs"] = _outcome(lambda: Workspace(chunking=rank == 0))
    res["paths_conflict"] = _outcome(lambda: Workspace(path="fallback" if rank == 0 else "fused"))
    mixed = Workspace(path="fallback" if rank == 1 else None)
    res["mixed_path"] = (mixed.path, mixed.reason)
    mixed.close()

    # a group this rank is not in (new_group is called on every rank, the workspace only on members
    # would be right; a non-member gets a clear error instead of a negative world size)
    only_rank0 = dist.new_group([0])
    res["non_member"] = _outcome(lambda: Workspace(only_rank0).close())

    # a closed workspace, and its group still usable through another one
    ws.close()
    res["closed"] = _outcome(lambda: rms_norm(x, w, 1e-6, ws))
    with Workspace() as again:
        out = rms_norm(torch.ones(2, W), torch.ones(W), 0.0, again)
        res["again"] = bool(torch.allclose(out, torch.ones(2, W)))
    dist.barrier()
    return res


@pytest.fixture(scope="module")
def group_results():
    return run_ranks(_group_worker, 2, backend="gloo", timeout=120, env={"ALLREDUCE_RMS_DEBUG": "1"})


def test_debug_mode_same_calls_pass(group_results):
    for res in group_results:
        assert res["same"]["type"] == "", res["same"]
        assert res["debug_off"]["type"] == "", res["debug_off"]


@pytest.mark.parametrize("case, words", [
    ("tokens", ["rank 1", "4 tokens", "3 tokens"]),
    ("op", ["rank 1", "qk_norm", "rms_norm"]),
    ("width", ["rank 1", "(8,)", "(16,)"]),
])
def test_debug_mode_names_the_rank_that_differs(group_results, case, words):
    for rank, res in enumerate(group_results):
        err = res[case]
        assert err["type"] == "RuntimeError", (rank, err)
        for word in words:
            assert word in err["message"], (rank, word, err["message"])


def test_too_many_tokens_raise_on_every_rank(group_results):
    for res in group_results:
        assert res["max_tokens"]["type"] == "ValueError" and "max_tokens=3" in res["max_tokens"]["message"]
        assert res["after_max_tokens"]["type"] == ""


def test_creation_arguments_must_agree(group_results):
    for res in group_results:
        for case, word in (("args_differ", "max_tokens"), ("chunking_differs", "chunking"), ("paths_conflict", "fused")):
            err = res[case]
            assert err["type"] == "ValueError" and word in err["message"] and "rank 1" in err["message"], (case, err)
        path, reason = res["mixed_path"]
        assert path == "fallback" and "forced by rank(s) [1]" in reason, reason


def test_workspace_on_a_group_without_this_rank(group_results):
    assert group_results[0]["non_member"]["type"] == ""  # rank 0 is the group: a local workspace
    err = group_results[1]["non_member"]
    assert err["type"] == "ValueError" and "group" in err["message"] and "not a member" in err["message"], err


def test_closed_workspace_in_a_group(group_results):
    for res in group_results:
        assert res["closed"]["type"] == "WorkspaceError" and "close()" in res["closed"]["message"]
        assert res["again"] is True
