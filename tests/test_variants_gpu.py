"""Norm variants (issue 15) on 2 GPUs: every variant x dtype at TP 2 over NCCL, on a fused
workspace and on the fallback path, against float64 references of the full rows and against
Hugging Face's modules; skipped without 2 GPUs and a loadable backend.

Variant calls run the wide-row kernel (allreduce_rms.variant_kernels): fused on a fused
workspace, local kernel -> NCCL -> local kernel on the fallback path, local launches for groups
inside one rank; default calls in the same run (qk_default, and qk_norm_separate with default
options) take the register-resident fused kernel, and the worker asserts that qk_norm,
qk_norm_separate (v wider than k) and both in-place forms agree bit for bit. A last test drives
the fused statistic over a group of ranks (rank_group) directly.
"""

from __future__ import annotations

import pytest
import torch

from allreduce_rms.launch import run_ranks
from numerics import DTYPES, TOLERANCE, rel_err
from variant_cases import (QK_CASES, RMS_CASES, dtype_name, full_qk_inputs, full_rms_inputs, gather, qk_reference,
                           rms_reference, variants_worker)

pytestmark = pytest.mark.multigpu
WORLD = 2
_outputs: dict = {}


def gpu_outputs(path: str) -> dict:
    """The full-row outputs of a 2-GPU run on `path`, once per session."""
    if path not in _outputs:
        _outputs[path] = gather(run_ranks(variants_worker, WORLD, path, backend="nccl", timeout=300.0,
                                          env={"ALLREDUCE_RMS_PATH": path}))
    return _outputs[path]


def _roundings(options: dict) -> int:
    if not options.get("weight_in_input_dtype"):
        return 1
    return 3 if options.get("gate_position") == "after" else 2


@pytest.mark.parametrize("path", ["fused", "fallback"])
def test_every_variant_on_two_gpus_matches_float64_reference(path: str) -> None:
    outputs = gpu_outputs(path)
    failures = []
    for dtype in DTYPES:
        name = dtype_name(dtype)
        for case, options in RMS_CASES.items():
            err = rel_err(outputs[(case, name)], rms_reference(dtype, WORLD, case))
            if not err <= TOLERANCE[dtype] * _roundings(options):
                failures.append(f"{case} {name}: {err:.3g}")
        for case, options in QK_CASES.items():
            for part in ("q", "k"):
                err = rel_err(outputs[(f"{case}:{part}", name)], qk_reference(dtype, WORLD, case, part))
                if not err <= TOLERANCE[dtype] * _roundings(options):
                    failures.append(f"{case} {part} {name}: {err:.3g}")
    assert not failures, failures


@pytest.mark.parametrize("path", ["fused", "fallback"])
def test_variants_on_two_gpus_match_hf_modules(path: str) -> None:
    pytest.importorskip("transformers")
    from test_variants_hf import QK_MODELS, RMS_MODELS, assert_matches_hf

    outputs = gpu_outputs(path)
    for dtype in DTYPES:
        name = dtype_name(dtype)
        with torch.no_grad():
            for case, model in RMS_MODELS.items():
                full = full_rms_inputs(dtype, WORLD, case)
                assert_matches_hf(outputs[(case, name)], model(full["x"], full["weight"], full["gate"]),
                                  f"{case} {name} {path}")
            for case, model in QK_MODELS.items():
                full = full_qk_inputs(dtype, WORLD, case)
                for part in ("q", "k"):
                    assert_matches_hf(outputs[(f"{case}:{part}", name)],
                                      model(full[part], full[part + "_weight"], None), f"{case} {part} {name} {path}")


def _rank_group_worker(rank: int, world: int) -> dict:
    """Fused launches through front.launch_variant with rank_group 1 (each rank's statistic is
    its own partial only) and 0 (all ranks), against float64 norms of the own and the full rows."""
    import allreduce_rms
    from allreduce_rms import _native, variant_kernels
    from numerics import reference, shard_scale

    dev = torch.device("cuda", rank)
    width, tokens = 384, 37
    g = torch.Generator().manual_seed(5)
    shards = [torch.randn(tokens, width, generator=g) * shard_scale(r) for r in range(world)]
    weights = [1 + 0.2 * torch.randn(width, generator=g) for _ in range(world)]
    x, w = shards[rank].to(dev), weights[rank].to(dev)
    res = {}
    with allreduce_rms.Workspace(max_tokens=64, timeout_ms=30_000) as ws:
        assert ws.path == "fused", ws.reason
        for rank_group, divisor, want in ((1, width, reference([shards[rank]], [weights[rank]], 1e-6)[0]),
                                          (0, width * world, reference(shards, weights, 1e-6)[rank])):
            out = torch.empty_like(x)
            seg = variant_kernels.segment(x, out, w, width, divisor)
            _native.front().launch_variant(ws._native, _native.dl_device_type(), rank, _native.MODE_LOCAL,
                                           _native.DTYPE_CODES[x.dtype], tokens, 1e-6, 0,
                                           _native.current_stream(dev), rank_group, [seg])
            res[rank_group] = rel_err(out, want)
        ws.synchronize()
    return res


def test_fused_statistic_over_a_group_of_ranks() -> None:
    for r in run_ranks(_rank_group_worker, WORLD, backend="nccl", timeout=180.0):
        assert r[1] <= TOLERANCE[torch.float32] and r[0] <= TOLERANCE[torch.float32], r


def _chunked_and_graphed_worker(rank: int, world: int) -> dict:
    """Variant calls on a fused workspace of 16 tokens per slot: 40 tokens run as 3 chunked
    launches (the gate's rows offset with the input's), against the torch path on the same GPU
    (variants._rms_rows: torch math + NCCL); then the same calls captured in one CUDA graph,
    whose replays must give the eager bits."""
    import allreduce_rms
    from allreduce_rms import variants
    from numerics import shard_scale

    dev = torch.device("cuda", rank)
    width, tokens = 256, 40
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(tokens, width * world, generator=g) * shard_scale(rank)).to(torch.bfloat16)
    x = x[:, rank * width:(rank + 1) * width].contiguous().to(dev)
    z = torch.randn(tokens, width, generator=g).to(torch.bfloat16).to(dev)
    w = (1 + 0.2 * torch.randn(width, generator=g)).to(torch.bfloat16).to(dev)
    cases = {"mamba2": dict(gate=z, group_size=width * world, weight_in_input_dtype=True),
             "minimax_text01": dict(gate=z, gate_act="sigmoid", gate_position="after", weight_in_input_dtype=True),
             "gemma": dict(weight_offset=1.0)}
    res: dict = {}
    with allreduce_rms.Workspace(max_tokens=16, timeout_ms=30_000) as ws:
        assert ws.path == "fused", ws.reason
        eager = {name: allreduce_rms.rms_norm(x, w, 1e-5, ws, **opts) for name, opts in cases.items()}
        for name, opts in cases.items():
            variant = variants.check_variant(**{k: v for k, v in opts.items() if k != "gate"}, width=width,
                                             world=world)
            torch_path = variants._rms_rows(x, w, 1e-5, ws, opts.get("gate"), variant)
            res[f"{name} vs torch"] = rel_err(eager[name], torch_path)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for name, opts in cases.items():  # warm-up, as capture wants
                allreduce_rms.rms_norm(x, w, 1e-5, ws, **opts)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        with torch.cuda.graph(graph):
            graphed = {name: allreduce_rms.rms_norm(x, w, 1e-5, ws, **opts) for name, opts in cases.items()}
        for replay in range(3):
            for out in graphed.values():
                out.fill_(float("nan"))  # a replay that writes nothing cannot pass
            graph.replay()
            torch.cuda.synchronize(dev)
            res[f"replay {replay} equal"] = all(torch.equal(graphed[n], eager[n]) for n in cases)
        ws.synchronize()
    return res


def test_variants_chunked_and_in_cuda_graphs() -> None:
    for r in run_ranks(_chunked_and_graphed_worker, WORLD, backend="nccl", timeout=180.0):
        for key, value in r.items():
            if key.endswith("vs torch"):
                assert value <= 3 * TOLERANCE[torch.bfloat16], (key, value)
            else:
                assert value is True, (key, r)
