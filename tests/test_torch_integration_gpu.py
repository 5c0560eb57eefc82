"""torch.compile + CUDA graphs on real GPUs (NCCL, 2 ranks, device cuda:rank); skipped without 2 GPUs.

Each test compiles with torch.compile(fullgraph=True), warms up on a side stream, captures one
call in a CUDA graph, then copies new inputs into the static inputs and checks the replayed
outputs -- against the float64 reference for the ops, against the eager unfused block for the
fusion pass.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch

from allreduce_rms.launch import run_ranks

pytestmark = pytest.mark.multigpu

EPS = 1e-6
TOKENS = 64
BF16_TOLERANCE = 2e-2  # relative error norm of bf16 outputs


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


def _capture(fn: Callable[..., Any], static_inputs: Tuple[torch.Tensor, ...]) -> Tuple[torch.cuda.CUDAGraph, Any]:
    """Warm fn up on a side stream (compiling it), then capture one call; return (graph, outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static_inputs)
    return graph, outputs


def _ops_worker(rank: int, world: int) -> Dict[str, Any]:
    import allreduce_rms
    from allreduce_rms import TPQKNorm, TPRMSNorm, fallback

    device = torch.device("cuda", rank)
    ws = allreduce_rms.Workspace(device=device)
    q_full, kv_full = 48 * 128 // 8, 8 * 128 // 8  # MiniMax-M2 heads, scaled down
    g = torch.Generator().manual_seed(0)
    weights = {n: (1 + 0.1 * torch.randn(w, generator=g)).to(torch.bfloat16)
               for n, w in (("w", q_full), ("q", q_full), ("k", kv_full))}
    norm = TPRMSNorm.from_full_weight(weights["w"].to(device), rank, world, ws, eps=EPS)
    qk = TPQKNorm.from_full_weight(weights["q"].to(device), weights["k"].to(device), rank, world, ws, eps=EPS)

    def full_activations(seed: int) -> Dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {n: torch.randn(TOKENS, w, generator=gen).to(torch.bfloat16)
                for n, w in (("x", q_full), ("q", q_full), ("k", kv_full), ("v", kv_full))}

    def local(full: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        def part(t: torch.Tensor) -> torch.Tensor:
            w = t.shape[-1] // world
            return t[:, rank * w:(rank + 1) * w]

        qkv = torch.cat([part(full["q"]), part(full["k"]), part(full["v"])], dim=-1)
        return part(full["x"]).contiguous().to(device), qkv.contiguous().to(device)

    def reference(full: Dict[str, torch.Tensor], name: str, weight: str) -> torch.Tensor:
        shards = [full[name].chunk(world, dim=-1)[r] for r in range(world)]
        ws_ = [weights[weight].chunk(world)[r] for r in range(world)]
        return fallback.rms_norm_reference(shards, ws_, EPS)[rank]

    def step(x: torch.Tensor, qkv: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        y = norm(x)
        q, k = qk(qkv)
        return y, q, k

    compiled = torch.compile(step, fullgraph=True)
    static = local(full_activations(1))
    graph, outputs = _capture(compiled, static)
    errors: List[float] = []
    for seed in (2, 3, 4):  # new inputs copied into the static ones, then replay
        full = full_activations(seed)
        for dst, src in zip(static, local(full)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize(device)
        for out, (name, weight) in zip(outputs, (("x", "w"), ("q", "q"), ("k", "k"))):
            errors.append(_rel_err(out.cpu(), reference(full, name, weight)))
    ws.synchronize()  # raises if a peer timed out during the replays
    return {"path": ws.path, "max_error": max(errors)}


@pytest.mark.parametrize("path", ["fused", "fallback"])
def test_compiled_ops_replay_in_cuda_graph(path: str) -> None:
    results = run_ranks(_ops_worker, 2, backend="nccl", env={"ALLREDUCE_RMS_PATH": path})
    for r in results:
        assert r["path"] == path
        assert r["max_error"] <= BF16_TOLERANCE


def _fusion_worker(rank: int, world: int, model: str) -> Dict[str, Any]:
    """A model function of test_fusion (`attention_block`, or `spellings`: 3-D inputs, product
    orders, k's statistic first, division after the split, per-norm eps) compiled with the fusion
    pass through Inductor on GPUs, captured in a CUDA graph and replayed with new inputs."""
    import allreduce_rms
    from allreduce_rms.compile import inductor_pass

    import test_fusion

    fn = getattr(test_fusion, model)
    make_args = test_fusion._block_args if model == "attention_block" else test_fusion._spelling_args
    device = torch.device("cuda", rank)
    ws = allreduce_rms.Workspace(device=device)

    def inputs(seed: int) -> tuple:
        return tuple(t.to(device) for t in make_args(test_fusion._inputs(rank + 10 * seed, TOKENS)))

    compiled = torch.compile(fn, fullgraph=True)
    static = inputs(1)
    with inductor_pass(ws) as fusion:
        graph, outputs = _capture(compiled, static)
    errors: List[float] = []
    for seed in (2, 3):
        fresh = inputs(seed)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize(device)
        expected = fn(*fresh)  # eager, unfused, NCCL all-reduce
        errors += [_rel_err(o, e) for o, e in zip(outputs, expected)]
    ws.synchronize()
    return {"path": ws.path, "replaced": fusion.replaced, "max_error": max(errors)}


def test_fusion_pass_compiles_and_replays_in_cuda_graph() -> None:
    for r in run_ranks(_fusion_worker, 2, "attention_block", backend="nccl"):
        assert r["replaced"] == 2, r
        assert r["max_error"] <= BF16_TOLERANCE, r


def test_fusion_pass_spellings_compile_and_replay_in_cuda_graph() -> None:
    for r in run_ranks(_fusion_worker, 2, "spellings", backend="nccl"):
        assert r["replaced"] == 3, r  # rms_norm (3-D), qk_norm (3-D, k first), rms_norm (fp16, own eps)
        assert r["max_error"] <= BF16_TOLERANCE, r
