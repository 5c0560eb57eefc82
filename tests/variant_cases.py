"""Shared inputs, cases and rank worker of the norm-variant tests (issue 15).

Every case builds the FULL rows first ([T, F], float64, the same on every rank), scales the
columns that will land on rank r by r + 1 (numerics.shard_scale), casts to the dtype under
test, and only then shards them: rank r gets columns [r*W, (r+1)*W) of x, the gate and the
weight. The ranks' outputs, concatenated, are compared with a float64 reference of the full
rows (fallback.variant_reference) or with a Hugging Face module run on the full rows. With the
per-rank scales, a statistic taken over one rank only (a missing all-reduce, eps added per rank,
the wrong width) misses by tens of percent, far outside numerics.TOLERANCE.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import torch

import allreduce_rms
from numerics import DTYPES, shard_scale

EPS = 1e-6
TOKENS = 24
FULL = 256  # the full row: 256, 128 or 64 columns per rank at TP 1, 2, 4
PAD = 16  # norm_width cases: the last PAD columns are zero padding
Q_FULL, K_FULL, V_FULL = 256, 64, 96  # qk cases: v wider than k (aiter's layout)

# name -> rms_norm keyword options (the gate tensor is added when "gate_position" is given)
RMS_CASES: Dict[str, dict] = {
    "gate_before_silu": {"gate_position": "before", "gate_act": "silu"},
    "gate_before_sigmoid": {"gate_position": "before", "gate_act": "sigmoid"},
    "gate_after_sigmoid": {"gate_position": "after", "gate_act": "sigmoid"},
    "gate_after_silu": {"gate_position": "after", "gate_act": "silu"},
    "group_32": {"group_size": 32},  # inside one rank at every TP size
    "group_128": {"group_size": 128},  # inside one rank at TP 1/2, two whole ranks at TP 4
    "group_256": {"group_size": 256},  # one group over the whole row: every rank
    "mamba2_gated_group_64": {"gate_position": "before", "gate_act": "silu", "group_size": 64,
                              "weight_in_input_dtype": True},
    "mamba2_gated_one_group": {"gate_position": "before", "gate_act": "silu", "group_size": 256,
                               "weight_in_input_dtype": True},
    "minimax_text01_output": {"gate_position": "after", "gate_act": "sigmoid", "weight_in_input_dtype": True},
    "falcon_h1_gated_group_128": {"gate_position": "after", "gate_act": "silu", "group_size": 128},
    "gemma_offset_1": {"weight_offset": 1.0},
    "offset_half_in_dtype": {"weight_offset": 0.5, "weight_in_input_dtype": True},
    "norm_width_padded": {"norm_width": FULL - PAD},
    "weight_in_input_dtype": {"weight_in_input_dtype": True},
}
# name -> qk options
QK_CASES: Dict[str, dict] = {
    "qk_default": {},
    "qk_in_dtype": {"weight_in_input_dtype": True},  # MiniMax-M2 as HF computes it
    "qk_offset": {"weight_offset": 1.0},
    "qk_offset_in_dtype": {"weight_offset": -0.25, "weight_in_input_dtype": True},
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _column_scale(width: int, world: int) -> torch.Tensor:
    per_rank = width // world
    return torch.tensor([shard_scale(c // per_rank) for c in range(width)], dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def full_rms_inputs(dtype: torch.dtype, world: int, case: str) -> Dict[str, torch.Tensor]:
    """The full x, gate and weight of one rms case (same on every rank): x scaled per rank,
    a case with norm_width has its last PAD columns zero."""
    g = torch.Generator().manual_seed(1000 * world + sorted(RMS_CASES).index(case))
    x = torch.randn(TOKENS, FULL, generator=g, dtype=torch.float64) * _column_scale(FULL, world)
    if "norm_width" in RMS_CASES[case]:
        x[:, FULL - PAD:] = 0
    gate = 2 * torch.randn(TOKENS, FULL, generator=g, dtype=torch.float64)
    weight = 1 + 0.2 * torch.randn(FULL, generator=g, dtype=torch.float64)
    return {"x": x.to(dtype), "gate": gate.to(dtype), "weight": weight.to(dtype)}


@functools.lru_cache(maxsize=None)
def full_qk_inputs(dtype: torch.dtype, world: int, case: str) -> Dict[str, torch.Tensor]:
    """The full q, k, v rows and q/k weights of one qk case, q and k scaled per rank."""
    g = torch.Generator().manual_seed(2000 * world + sorted(QK_CASES).index(case))
    return {
        "q": (torch.randn(TOKENS, Q_FULL, generator=g, dtype=torch.float64) * _column_scale(Q_FULL, world)).to(dtype),
        "k": (torch.randn(TOKENS, K_FULL, generator=g, dtype=torch.float64) * _column_scale(K_FULL, world)).to(dtype),
        "v": torch.randn(TOKENS, V_FULL, generator=g, dtype=torch.float64).to(dtype),
        "q_weight": (1 + 0.2 * torch.randn(Q_FULL, generator=g, dtype=torch.float64)).to(dtype),
        "k_weight": (1 + 0.2 * torch.randn(K_FULL, generator=g, dtype=torch.float64)).to(dtype),
    }


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank r's equal column shard of t (last dimension), contiguous."""
    width = t.shape[-1] // world
    return t[..., rank * width:(rank + 1) * width].contiguous()


def rms_call_kwargs(case: str, gate: Optional[torch.Tensor]) -> dict:
    kwargs = dict(RMS_CASES[case])
    if "gate_position" in kwargs:
        kwargs["gate"] = gate
    return kwargs


def rank_outputs(rank: int, world: int, ws: Optional[allreduce_rms.Workspace],
                 device: torch.device) -> Dict[Tuple[str, str], torch.Tensor]:
    """This rank's outputs of every case x dtype: {(case, dtype name): tensor on the CPU}.
    qk cases give "q" and "k" entries as (case + ":q", ...) and (case + ":k", ...); every qk case
    is run through qk_norm (qkv form), qk_norm_separate (v wider than k) and both in place, and the
    four must agree bit for bit (asserted here)."""
    results: Dict[Tuple[str, str], torch.Tensor] = {}
    for dtype in DTYPES:
        name = dtype_name(dtype)
        for case in RMS_CASES:
            full = full_rms_inputs(dtype, world, case)
            x = shard(full["x"], rank, world).to(device)
            weight = shard(full["weight"], rank, world).to(device)
            # the gate as a column view of a wider tensor: its own row stride
            wide = torch.cat([shard(full["gate"], rank, world), torch.zeros_like(x.cpu())], dim=-1).to(device)
            gate = wide[:, :x.shape[-1]]
            plain = allreduce_rms.rms_norm(x, weight, EPS, ws)  # a default call of the same shape first
            y = allreduce_rms.rms_norm(x, weight, EPS, ws, **rms_call_kwargs(case, gate))
            if case != "group_256":  # one group over the whole row is the default norm
                _assert_not_the_plain_result(y, plain, case)
            # out= and in place give the same bits
            x_in = x.clone()
            allreduce_rms.rms_norm(x_in, weight, EPS, ws, out=x_in, **rms_call_kwargs(case, gate))
            torch.testing.assert_close(x_in, y, rtol=0, atol=0)
            results[(case, name)] = y.cpu()
        for case, options in QK_CASES.items():
            full = full_qk_inputs(dtype, world, case)
            q, k, v = (shard(full[n], rank, world).to(device) for n in ("q", "k", "v"))
            q_w, k_w = (shard(full[n], rank, world).to(device) for n in ("q_weight", "k_weight"))
            qkv = torch.cat([q, k, k], dim=-1)  # the qkv form needs v as wide as k
            plain_q, _ = allreduce_rms.qk_norm(qkv, q_w, k_w, q.shape[-1], k.shape[-1], EPS, ws)  # same shape first
            q_out, k_out = allreduce_rms.qk_norm(qkv, q_w, k_w, q.shape[-1], k.shape[-1], EPS, ws, **options)
            if options:
                _assert_not_the_plain_result(q_out, plain_q, case)
            aiter = torch.cat([q, k, v], dim=-1)  # v wider than k: q and k as column views
            qs, ks = aiter[:, :q.shape[-1]], aiter[:, q.shape[-1]:q.shape[-1] + k.shape[-1]]
            q_sep, k_sep = allreduce_rms.qk_norm_separate(qs, ks, q_w, k_w, EPS, ws, **options)
            v_before = aiter[:, -v.shape[-1]:].clone()
            q_in, k_in = allreduce_rms.qk_norm_separate(qs, ks, q_w, k_w, EPS, ws, inplace=True, **options)
            assert q_in.data_ptr() == aiter.data_ptr()
            torch.testing.assert_close(aiter[:, -v.shape[-1]:], v_before, rtol=0, atol=0)  # v untouched
            q_qkv, k_qkv = allreduce_rms.qk_norm(qkv, q_w, k_w, q.shape[-1], k.shape[-1], EPS, ws, inplace=True,
                                                 **options)
            for other in ((q_sep, k_sep), (q_in, k_in), (q_qkv, k_qkv)):
                torch.testing.assert_close(other[0], q_out, rtol=0, atol=0)
                torch.testing.assert_close(other[1], k_out, rtol=0, atol=0)
            results[(case + ":q", name)] = q_out.cpu()
            results[(case + ":k", name)] = k_out.cpu()
    return results


def _assert_not_the_plain_result(y: torch.Tensor, plain: torch.Tensor, case: str) -> None:
    """A variant call right after a default call of the same shape must not be served as the
    default one (a remembered kernel call shape ignoring the options): in 16-bit types even the
    rounding convention alone changes more than 5% of the elements."""
    if y.dtype != torch.float32:
        changed = float((y != plain).double().mean())
        assert changed > 0.05, f"{case}: only {changed:.1%} of the elements differ from the default call's"


def variants_worker(rank: int, world: int, path: str = "fallback") -> Dict[Tuple[str, str], torch.Tensor]:
    """run_ranks worker: gloo ranks on the CPU, or nccl ranks on cuda:rank with the path forced
    by ALLREDUCE_RMS_PATH (asserted)."""
    gpu = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    ws = allreduce_rms.Workspace(device=device)
    assert ws.path == path and ws.world_size == world, (ws.path, ws.reason)
    try:
        outputs = rank_outputs(rank, world, ws, device)
    finally:
        ws.close()
    # as plain lists: a tensor would travel as a shared-memory handle that dies with the rank.
    # float32 holds every float16/bfloat16 value exactly, so the bits survive the round trip.
    return {key: (str(t.dtype), t.float().tolist()) for key, t in outputs.items()}


def _from_rank(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    dtype, rows = value  # type: ignore[misc]
    return torch.tensor(rows, dtype=torch.float32).to(getattr(torch, dtype.replace("torch.", "")))


def gather(per_rank: List[Dict[Tuple[str, str], object]]) -> Dict[Tuple[str, str], torch.Tensor]:
    """The ranks' outputs concatenated into full rows, per (case, dtype)."""
    return {key: torch.cat([_from_rank(r[key]) for r in per_rank], dim=-1) for key in per_rank[0]}


@functools.lru_cache(maxsize=None)
def cpu_outputs(world: int) -> Dict[Tuple[str, str], torch.Tensor]:
    """The full-row outputs at TP `world` on the CPU (gloo ranks; TP 1 in this process without a
    workspace), computed once per test session."""
    if world == 1:
        return gather([rank_outputs(0, 1, None, torch.device("cpu"))])
    from allreduce_rms.launch import run_ranks

    return gather(run_ranks(variants_worker, world, timeout=300.0))


def rms_reference(dtype: torch.dtype, world: int, case: str) -> torch.Tensor:
    full = full_rms_inputs(dtype, world, case)
    options = rms_call_kwargs(case, full["gate"])
    options.pop("weight_in_input_dtype", None)  # a rounding convention: the exact value is the same
    return allreduce_rms.fallback.variant_reference(full["x"], full["weight"], EPS, **options)


def qk_reference(dtype: torch.dtype, world: int, case: str, part: str) -> torch.Tensor:
    full = full_qk_inputs(dtype, world, case)
    return allreduce_rms.fallback.variant_reference(full[part], full[part + "_weight"], EPS,
                                                    weight_offset=QK_CASES[case].get("weight_offset", 0.0))


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element, how many representable values of the dtype lie between a and b (same dtype,
    finite): 0 when bit-identical (+0 and -0 count as equal)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(bits).long()
        sign_bit = 1 << (torch.finfo(t.dtype).bits - 1)
        # two's-complement view of sign-magnitude floats: negative values count down from 0
        return torch.where(i < 0, -(i + sign_bit), i)

    return (ordered(a) - ordered(b)).abs()
