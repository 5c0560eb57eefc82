"""torch integration on CPU: custom ops, torch.compile, the nn.Modules (gloo, 2 ranks).

Workers run in spawned processes (tests/distributed.py) and return plain Python values: a
tensor put on the result queue would outlive the process that shares it.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch

import allreduce_rms
from allreduce_rms import TPQKNorm, TPRMSNorm, custom_ops, fallback
from allreduce_rms.launch import run_ranks

EPS = 1e-6
# relative error norm ||y - ref|| / ||ref|| against the float64 reference, per input dtype
from numerics import TOLERANCE, rel_err


def full_inputs(dtype: torch.dtype, tokens: int, q: int, kv: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The same full (unsharded) tensors on every rank: the test slices them per rank."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(tokens, q, generator=g).to(dtype),
        "weight": (1 + 0.1 * torch.randn(q, generator=g)).to(dtype),
        "q": torch.randn(tokens, q, generator=g).to(dtype),
        "k": torch.randn(tokens, kv, generator=g).to(dtype),
        "v": torch.randn(tokens, kv, generator=g).to(dtype),
        "q_weight": (1 + 0.1 * torch.randn(q, generator=g)).to(dtype),
        "k_weight": (1 + 0.1 * torch.randn(kv, generator=g)).to(dtype),
    }


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    width = t.shape[-1] // world
    return t[..., rank * width:(rank + 1) * width]


def local_qkv(full: Dict[str, torch.Tensor], rank: int, world: int) -> torch.Tensor:
    return torch.cat([shard(full[n], rank, world) for n in ("q", "k", "v")], dim=-1).contiguous()


def reference(full: Dict[str, torch.Tensor], name: str, weight: str, rank: int, world: int) -> torch.Tensor:
    shards = [shard(full[name], r, world) for r in range(world)]
    weights = [shard(full[weight], r, world) for r in range(world)]
    return fallback.rms_norm_reference(shards, weights, EPS)[rank]


# ------------------------------------------------------------------------- one process
def test_ops_are_registered_with_the_documented_schemas() -> None:
    schemas = {name: str(getattr(torch.ops.allreduce_rms, name).default._schema)
               for name in ("rms_norm", "qk_norm", "qk_norm_")}
    assert schemas["rms_norm"] == "allreduce_rms::rms_norm(Tensor x, Tensor weight, float eps, str workspace) -> Tensor"
    assert "qk_norm(Tensor qkv, Tensor q_weight, Tensor k_weight, SymInt q_size, SymInt kv_size, float eps, " \
           "str workspace) -> (Tensor, Tensor)" in schemas["qk_norm"]
    assert "qk_norm_(Tensor(a!) qkv," in schemas["qk_norm_"] and schemas["qk_norm_"].endswith("-> ()")



def test_ops_are_tagged_and_in_place_ops_bump_the_version() -> None:
    assert torch.Tag.pt2_compliant_tag in torch.ops.allreduce_rms.rms_norm.default.tags
    assert torch.Tag.pt2_compliant_tag in torch.ops.allreduce_rms.qk_norm_.default.tags
    qkv, qw, kw = torch.randn(3, 8 + 2 * 4), torch.randn(8), torch.randn(4)
    before = qkv._version
    torch.ops.allreduce_rms.qk_norm_(qkv, qw, kw, 8, 4, 1e-6, "")
    assert qkv._version > before  # autograd's in-place checks can see the write
    q, k = torch.randn(3, 8), torch.randn(3, 4)
    versions = (q._version, k._version)
    torch.ops.allreduce_rms.qk_norm_separate_(q, k, qw, kw, 1e-6, "", 0.0, False)
    assert q._version > versions[0] and k._version > versions[1]


def _needs_gradient_worker(rank: int, world: int) -> dict:
    import warnings

    x, w = torch.randn(4, 16, requires_grad=True), torch.randn(16)
    compiled = torch.compile(lambda a: allreduce_rms.rms_norm(a, w, 1e-6), backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(x).sum().backward()
    with torch.no_grad():
        needs_grad_without = compiled(x).requires_grad
    return {"warnings": [str(w.message) for w in caught], "needs_grad_without": needs_grad_without}


def test_a_call_that_needs_a_gradient_warns() -> None:
    """No autograd formula (inference only): torch's default autograd kernel warns when a
    gradient would be needed, rather than failing silently (custom_ops' module comment). In a
    fresh process: torch warns once per process."""
    (r,) = run_ranks(_needs_gradient_worker, 1, timeout=120)
    assert any("autograd kernel was not registered" in m for m in r["warnings"]), r["warnings"]
    assert r["needs_grad_without"] is False


def test_eager_calls_do_not_go_through_the_dispatcher() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: List[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w = torch.randn(3, 16), torch.ones(16)
    qkv, qw, kw = torch.randn(3, 32), torch.ones(16), torch.ones(8)
    with Record() as eager:
        allreduce_rms.rms_norm(x, w)
        allreduce_rms.qk_norm(qkv, qw, kw, 16, 8)
        TPRMSNorm(16)(x)
    with Record() as op:
        torch.ops.allreduce_rms.rms_norm(x, w, EPS, "")
    assert eager.names and not [n for n in eager.names if n.startswith("allreduce_rms.")]
    assert op.names[0] == "allreduce_rms.rms_norm.default"


def test_fake_impls_give_shapes_and_check_arguments() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qkv = torch.empty(3, 5, 96, dtype=torch.bfloat16)
        q, k = torch.ops.allreduce_rms.qk_norm(qkv, torch.empty(64), torch.empty(16), 64, 16, EPS, "")
        assert (q.shape, k.shape, q.dtype) == ((3, 5, 64), (3, 5, 16), torch.bfloat16)
        y = torch.ops.allreduce_rms.rms_norm(qkv, torch.empty(96), EPS, "")
        assert y.shape == qkv.shape and y.dtype == qkv.dtype and y.is_contiguous()
        with pytest.raises(ValueError, match="k_weight"):
            torch.ops.allreduce_rms.qk_norm_(qkv, torch.empty(64), torch.empty(8), 64, 16, EPS, "")
        with pytest.raises(ValueError, match="q_size"):
            torch.ops.allreduce_rms.qk_norm(qkv, torch.empty(60), torch.empty(16), 60, 16, EPS, "")


def test_custom_ops_eager_match_the_plain_functions_locally() -> None:
    full = full_inputs(torch.float32, 7, 64, 16)
    qkv = local_qkv(full, 0, 1)
    qw, kw = full["q_weight"], full["k_weight"]
    ws = allreduce_rms.Workspace()  # torch.distributed not initialized: one rank, local path
    assert ws.path == "local"
    y = torch.ops.allreduce_rms.rms_norm(full["x"], full["weight"], EPS, ws.key)
    torch.testing.assert_close(y, allreduce_rms.rms_norm(full["x"], full["weight"], EPS, ws))
    q, k = torch.ops.allreduce_rms.qk_norm(qkv, qw, kw, 64, 16, EPS, "")
    torch.testing.assert_close(q, allreduce_rms.qk_norm(qkv, qw, kw, 64, 16, EPS)[0])
    before = qkv.clone()
    torch.ops.allreduce_rms.qk_norm_(qkv, qw, kw, 64, 16, EPS, ws.key)
    torch.testing.assert_close(qkv[:, :64], q)
    torch.testing.assert_close(qkv[:, 64:80], k)
    torch.testing.assert_close(qkv[:, 80:], before[:, 80:])  # v untouched
    # the explicit traceable forms, out= and inplace= included
    out = torch.empty_like(full["x"])
    assert custom_ops.traced_rms_norm(full["x"], full["weight"], EPS, ws, out=out) is out
    torch.testing.assert_close(out, y)
    q2, k2 = custom_ops.traced_qk_norm(before, qw, kw, 64, 16, EPS, None, inplace=True)
    assert q2.data_ptr() == before.data_ptr()
    torch.testing.assert_close(before, qkv)


def test_module_constructor_and_from_full_weight_errors() -> None:
    norm = TPRMSNorm(32, eps=1e-5, dtype=torch.bfloat16)
    assert norm.weight.shape == (32,) and norm.weight.dtype == torch.bfloat16 and not norm.weight.requires_grad
    assert norm.workspace.path == "local" and "world_size=1" in repr(norm)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    assert rel_err(norm(x), fallback.rms_norm_reference([x], [norm.weight], 1e-5)[0]) < TOLERANCE[torch.bfloat16]
    with pytest.raises(ValueError, match="weight: its 10 elements cannot be split into 3 equal shards"):
        TPRMSNorm.from_full_weight(torch.ones(10), 0, 3)
    with pytest.raises(ValueError, match="k_weight"):
        TPQKNorm.from_full_weight(torch.ones(12), torch.ones(5), 0, 3)
    with pytest.raises(ValueError, match="q_weight: expected a 1-D tensor"):
        TPQKNorm.from_full_weight(torch.ones(2, 6), torch.ones(6), 0, 2)
    with pytest.raises(ValueError, match="rank must be in"):
        TPRMSNorm.from_full_weight(torch.ones(8), 2, 2)
    with pytest.raises(ValueError, match="do not match the group"):  # no process group: one rank
        TPRMSNorm.from_full_weight(torch.ones(8), 1, 2)
    with pytest.raises(ValueError, match="size must be a positive int"):
        TPRMSNorm(0)
    with pytest.raises(TypeError, match="group"):  # the wrong kind of argument: TypeError
        TPQKNorm(8, 4, group="tp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"x: last dimension is 128, but this module normalizes 256 columns"):
        TPRMSNorm.from_full_weight(torch.ones(256), 0, 1)(torch.randn(4, 128))  # names x, not the weight


# ------------------------------------------------------------------------- two ranks (gloo)
def _modules_worker(rank: int, world: int) -> List[str]:
    """TPRMSNorm / TPQKNorm from full weights against the float64 reference, three dtypes."""
    failures = []
    ws = allreduce_rms.Workspace()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        full = full_inputs(dtype, 9, 64, 16, seed=1)
        norm = TPRMSNorm.from_full_weight(full["weight"], rank, world, eps=EPS)  # group=None: the world group
        qk = TPQKNorm.from_full_weight(full["q_weight"], full["k_weight"], rank, world, ws, eps=EPS)
        assert norm.weight.dtype == dtype and norm.weight.shape == (32,)
        qkv = local_qkv(full, rank, world)
        results = {"x": norm(shard(full["x"], rank, world))}
        results["q"], results["k"] = qk(qkv)
        q_view, k_view = qk(qkv, inplace=True)
        assert q_view.data_ptr() == qkv.data_ptr()
        torch.testing.assert_close(q_view, results["q"], rtol=0, atol=0)
        for name, weight in (("x", "weight"), ("q", "q_weight"), ("k", "k_weight")):
            err = rel_err(results[name], reference(full, name, weight, rank, world))
            if not err <= TOLERANCE[dtype]:
                failures.append(f"{dtype} {name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}")
    return failures


def test_modules_match_float64_reference_two_ranks() -> None:
    assert run_ranks(_modules_worker, 2) == [[], []]


def _compiled_ops_worker(rank: int, world: int) -> Dict[str, object]:
    """The custom ops under torch.compile(fullgraph=True, dynamic=True) versus eager."""
    from torch._dynamo.utils import counters

    torch._inductor.config.compile_threads = 1
    ws = allreduce_rms.Workspace()
    assert ws.path == "fallback", ws.reason
    full = full_inputs(torch.bfloat16, 16, 64, 16, seed=2)
    norm = TPRMSNorm.from_full_weight(full["weight"], rank, world, ws, eps=EPS)
    qk = TPQKNorm.from_full_weight(full["q_weight"], full["k_weight"], rank, world, ws, eps=EPS)

    def step(x: torch.Tensor, qkv: torch.Tensor, buf: torch.Tensor):
        y = norm(x)
        q, k = qk(qkv)
        allreduce_rms.qk_norm(buf, qk.q_weight, qk.k_weight, qk.q_size, qk.kv_size, EPS, ws, inplace=True)
        return y, q, k

    explained = torch._dynamo.explain(step)(*(t.clone() for t in _step_inputs(full, rank, world, 5)))
    targets = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    counters.clear()  # count only what torch.compile does below
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    errors = []
    for tokens in (5, 11):  # two token counts: one graph, no recompilation
        x, qkv, buf = _step_inputs(full, rank, world, tokens)
        v_before = buf[:, 40:].clone()
        eager_buf = buf.clone()
        expected = step(x, qkv, eager_buf)
        got = compiled(x, qkv, buf)
        for e, g in zip(expected, got):
            errors.append(rel_err(g, e))
        # the in-place op wrote q and k into the input buffer, and left v alone
        torch.testing.assert_close(buf[:, :32], got[1], rtol=0, atol=0)
        torch.testing.assert_close(buf[:, 32:40], got[2], rtol=0, atol=0)
        torch.testing.assert_close(buf[:, 40:], v_before, rtol=0, atol=0)
        errors.append(rel_err(buf, eager_buf))
    return {"graph_breaks": explained.graph_break_count + sum(counters["graph_break"].values()),
            "recompiles": sum(counters["recompiles"].values()),
            "graphs": counters["stats"]["unique_graphs"], "targets": sorted(targets), "max_error": max(errors)}


def _step_inputs(full: Dict[str, torch.Tensor], rank: int, world: int, tokens: int):
    qkv = local_qkv(full, rank, world)[:tokens].contiguous()
    return shard(full["x"], rank, world)[:tokens].contiguous(), qkv, qkv.clone()


def test_custom_ops_under_torch_compile_two_ranks() -> None:
    for result in run_ranks(_compiled_ops_worker, 2):
        assert result["graph_breaks"] == 0
        # dynamic token count: one graph, no recompilation for the second shape
        assert (result["graphs"], result["recompiles"]) == (1, 0)
        assert {"allreduce_rms.rms_norm", "allreduce_rms.qk_norm", "allreduce_rms.qk_norm_"} <= set(result["targets"])
        assert result["max_error"] <= 1e-6  # the same kernels compiled and eager: same numbers
