"""Norm variants (issue 15) on 2 GPUs: every variant x dtype at TP 2 over NCCL, on a fused
workspace and on the fallback path, against float64 references of the full rows and against
Hugging Face's modules; skipped without 2 GPUs and a loadable backend.

Variant calls take the torch path (local float32 math + all_reduce over the workspace's group)
even on a fused workspace for now; default calls in the same run (qk_default, and
qk_norm_separate with default options) take the fused kernel, and the worker asserts that
qk_norm, qk_norm_separate (v wider than k) and both in-place forms agree bit for bit.
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
