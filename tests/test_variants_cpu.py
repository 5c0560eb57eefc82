"""Norm variants (issue 15) on the CPU: every variant x dtype x TP 1, 2, 4 (gloo) against float64
references of the full rows, under torch.compile, and through the modules.

See variant_cases.py for how the inputs are built (full rows, shard r scaled by r + 1).
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import allreduce_rms
from allreduce_rms import TPQKNorm, TPRMSNorm, fallback
from numerics import DTYPES, TOLERANCE, rel_err
from variant_cases import (EPS, QK_CASES, RMS_CASES, cpu_outputs, dtype_name, full_rms_inputs, qk_reference,
                           rms_reference, shard)

WORLDS = (1, 2, 4)
# Rounding twice (weight_in_input_dtype) or three times (and a gate after the norm) doubles or
# triples the output's rounding error at most: the tolerance scales with the number of roundings.


def _roundings(options: dict) -> int:
    if not options.get("weight_in_input_dtype"):
        return 1
    return 3 if options.get("gate_position") == "after" else 2


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"tp{w}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", sorted(RMS_CASES))
def test_rms_norm_variant_matches_float64_reference_of_full_rows(case: str, dtype: torch.dtype, world: int) -> None:
    out = cpu_outputs(world)[(case, dtype_name(dtype))]
    ref = rms_reference(dtype, world, case)
    assert out.dtype == dtype and out.shape == ref.shape
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype] * _roundings(RMS_CASES[case]), f"{case} {dtype} TP{world}: rel err {err:.3g}"


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"tp{w}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", sorted(QK_CASES))
@pytest.mark.parametrize("part", ("q", "k"))
def test_qk_norm_variant_matches_float64_reference_of_full_rows(part: str, case: str, dtype: torch.dtype,
                                                                world: int) -> None:
    out = cpu_outputs(world)[(f"{case}:{part}", dtype_name(dtype))]
    ref = qk_reference(dtype, world, case, part)
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype] * _roundings(QK_CASES[case]), f"{case} {part} {dtype} TP{world}: {err:.3g}"


@pytest.mark.parametrize("case", ["group_128", "group_256", "gate_before_silu", "norm_width_padded"])
def test_a_statistic_of_one_rank_would_miss_widely(case: str) -> None:
    """The test data can tell: the reference built from per-rank statistics (what a missing
    all-reduce gives) is off by far more than any tolerance at TP 4 for groups that span ranks."""
    full = full_rms_inputs(torch.float32, 4, case)
    options = dict(RMS_CASES[case])
    gate = full["gate"] if "gate_position" in options else None
    local = []
    for r in range(4):
        per_rank = dict(options)
        if "group_size" in per_rank:
            per_rank["group_size"] = min(per_rank["group_size"], 64)
        per_rank.pop("norm_width", None)
        per_rank.pop("weight_in_input_dtype", None)
        local.append(fallback.variant_reference(shard(full["x"], r, 4), shard(full["weight"], r, 4), EPS,
                                                gate=None if gate is None else shard(gate, r, 4), **per_rank))
    err = rel_err(torch.cat(local, dim=-1), rms_reference(torch.float32, 4, case))
    assert err > 25 * TOLERANCE[torch.bfloat16], err  # tens of percent: 0.26 for group_128, the least


def test_padding_columns_do_not_count_but_norm_width_does() -> None:
    """InternViT's padded heads: zero columns added to a row and norm_width set to the real width
    give the norm of the unpadded row on the real columns."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 40, generator=g), torch.rand(40, generator=g)
    padded, w_padded = torch.cat([x, torch.zeros(3, 8)], dim=-1), torch.cat([w, torch.ones(8)])
    y = allreduce_rms.rms_norm(padded, w_padded, EPS, norm_width=40)
    torch.testing.assert_close(y[:, :40], allreduce_rms.rms_norm(x, w, EPS), rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(y[:, 40:]) == 0


def test_weight_in_input_dtype_rounds_the_normalized_value_before_the_weight() -> None:
    """The two conventions give different bf16 bits on some elements; each is what its formula says."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, 128, generator=g).bfloat16()
    w = (1 + 0.3 * torch.randn(128, generator=g)).bfloat16()
    r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)
    once = allreduce_rms.rms_norm(x, w, EPS)
    twice = allreduce_rms.rms_norm(x, w, EPS, weight_in_input_dtype=True)
    torch.testing.assert_close(once, ((x.float() * r) * w.float()).bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(twice, w * (x.float() * r).bfloat16(), rtol=0, atol=0)
    assert not torch.equal(once, twice)


def _compiled(fn, *args):
    return torch.compile(fn, fullgraph=True)(*args)


def _compile_worker(rank: int, world: int) -> str:
    """In a fresh process: this suite's other tests change torch._dynamo.config in-process
    (test_cli's recompile_limit), which a later in-process compile trips over."""
    g = torch.Generator().manual_seed(7)
    x, gate, w = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g), torch.rand(64, generator=g)
    qkv = torch.randn(5, 32 + 2 * 16, generator=g)
    q_w, k_w = torch.rand(32, generator=g), torch.rand(16, generator=g)

    def gated(x, gate, w):
        return allreduce_rms.rms_norm(x, w, EPS, gate=gate, gate_position="after", gate_act="sigmoid",
                                      group_size=16, weight_in_input_dtype=True)

    def qk(qkv):
        return allreduce_rms.qk_norm(qkv, q_w, k_w, 32, 16, EPS, weight_offset=1.0)

    def qk_inplace(qkv):
        allreduce_rms.qk_norm_separate(qkv[:, :32], qkv[:, 32:48], q_w, k_w, EPS, inplace=True,
                                       weight_in_input_dtype=True)
        return qkv

    torch.testing.assert_close(_compiled(gated, x, gate, w), gated(x, gate, w), rtol=0, atol=0)
    torch.testing.assert_close(_compiled(qk, qkv), qk(qkv), rtol=0, atol=0)
    a, b = qkv.clone(), qkv.clone()
    _compiled(qk_inplace, a)
    qk_inplace(b)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, qkv) and torch.equal(a[:, 48:], qkv[:, 48:])
    return "ok"


def test_variants_trace_under_torch_compile_fullgraph() -> None:
    """Variant calls compile with fullgraph=True (the custom ops rms_norm_variant and
    qk_norm_separate(_)) and give the eager bits, in place on column views of qkv included."""
    from allreduce_rms.launch import run_ranks

    assert run_ranks(_compile_worker, 1, timeout=300.0) == ["ok"]


def test_modules_carry_the_options() -> None:
    g = torch.Generator().manual_seed(8)
    x, gate = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    full_w = torch.randn(64, generator=g)
    norm = TPRMSNorm.from_full_weight(full_w, 0, 1, gate_position="after", gate_act="sigmoid", group_size=16,
                                      weight_offset=1.0)
    assert "group_size=16" in repr(norm) and "weight_offset=1.0" in repr(norm)
    expected = allreduce_rms.rms_norm(x, full_w, 1e-6, gate=gate, gate_position="after", gate_act="sigmoid",
                                      group_size=16, weight_offset=1.0)
    torch.testing.assert_close(norm(x, gate=gate), expected, rtol=0, atol=0)
    ref = fallback.variant_reference(x, full_w, 1e-6, gate=gate, gate_position="after", gate_act="sigmoid",
                                     group_size=16, weight_offset=1.0)
    assert rel_err(norm(x, gate=gate), ref) < TOLERANCE[torch.float32]
    fresh = TPRMSNorm(64, weight_offset=1.0)  # Gemma-style: starts at zero, acts as a plain norm
    assert torch.count_nonzero(fresh.weight) == 0
    torch.testing.assert_close(fresh(x), allreduce_rms.rms_norm(x, torch.ones(64)), rtol=1e-6, atol=1e-6)
    qk = TPQKNorm.from_full_weight(torch.rand(32), torch.rand(16), 0, 1, weight_in_input_dtype=True,
                                   weight_offset=0.5)
    assert "weight_in_input_dtype=True" in repr(qk)
    qkv = torch.randn(4, 64, generator=g).bfloat16()
    q, k = qk(qkv)
    q2, k2 = allreduce_rms.qk_norm(qkv, qk.q_weight, qk.k_weight, 32, 16, 1e-6, weight_offset=0.5,
                                   weight_in_input_dtype=True)
    torch.testing.assert_close((q, k), (q2, k2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not divide the full width 64"):
        TPRMSNorm(64, group_size=24)


def test_readme_variants_example_runs() -> None:
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"<!-- variants-example -->\s*```python\n(.*?)```", readme, flags=re.S)
    assert match, "README has no python block marked <!-- variants-example -->"
    exec(compile(match.group(1), "README.md (variants-example)", "exec"), {})


def test_readme_variants_table_names_every_option() -> None:
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Norm variants"):readme.index("<!-- variants-example -->")]
    for option in ("gate=", "gate_act=", "gate_position=", "group_size=", "weight_offset=", "norm_width=",
                   "weight_in_input_dtype=True", "qk_norm_separate(", "num_kv_heads="):
        assert option in section, option
