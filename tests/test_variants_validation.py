"""Every option of the norm variants (issue 15) rejected with a TypeError (wrong kind) or a
ValueError (wrong value) whose message names the argument and says why."""

from __future__ import annotations

import math

import pytest
import torch

import allreduce_rms
from allreduce_rms import TPQKNorm, TPRMSNorm
from allreduce_rms.launch import run_ranks
from allreduce_rms.variants import check_variant

X = torch.randn(3, 64)
W = torch.ones(64)


@pytest.mark.parametrize("options,error,message", [
    ({"gate": [1.0]}, TypeError, "gate: expected a torch.Tensor or None, got list"),
    ({"gate": torch.randn(3, 32)}, ValueError, r"gate: must have the shape of x \(3, 64\), got \(3, 32\)"),
    ({"gate": torch.randn(3, 64, device="meta")}, ValueError, "gate: on meta, but x is on cpu"),
    ({"gate": torch.randn(3, 64, dtype=torch.float64)}, ValueError, "gate: dtype torch.float64 is not supported"),
    ({"gate": torch.ones(3, 64, dtype=torch.int32)}, ValueError, "gate: dtype torch.int32 is not supported"),
    ({"gate": torch.randn(64, 3).t()}, ValueError, "gate: the last dimension must have unit stride"),
    ({"gate_act": "relu"}, ValueError, r"gate_act must be one of \('silu', 'sigmoid'\), got 'relu'"),
    ({"gate_act": None}, TypeError, "gate_act must be one of"),
    ({"gate_position": "middle"}, ValueError, r"gate_position must be one of \('before', 'after'\), got 'middle'"),
    ({"gate_position": 1}, TypeError, "gate_position must be one of"),
    ({"group_size": 0}, ValueError, "group_size must be a positive int, got 0"),
    ({"group_size": -8}, ValueError, "group_size must be a positive int, got -8"),
    ({"group_size": 16.0}, TypeError, "group_size must be a positive int or None, got float"),
    ({"group_size": True}, TypeError, "group_size must be a positive int or None, got True"),
    ({"group_size": 24}, ValueError, "group_size=24 does not divide the full width 64"),
    ({"group_size": 128}, ValueError, r"group_size=128 is larger than the full width 64 \(1 rank x 64 columns\)"),
    ({"norm_width": 65}, ValueError, "norm_width=65 is larger than the full width 64"),
    ({"norm_width": 0}, ValueError, "norm_width must be a positive int, got 0"),
    ({"norm_width": "64"}, TypeError, "norm_width must be a positive int or None, got str"),
    ({"norm_width": 32, "group_size": 16}, ValueError, "norm_width=32 and group_size=16 cannot be combined"),
    ({"weight_offset": "1"}, TypeError, "weight_offset must be a real number, got str"),
    ({"weight_offset": None}, TypeError, "weight_offset must be a real number, got NoneType"),
    ({"weight_offset": True}, TypeError, "weight_offset must be a real number, got bool"),
    ({"weight_offset": False}, TypeError, "weight_offset must be a real number, got bool"),  # == 0.0
    ({"weight_offset": 0j}, TypeError, "weight_offset must be a real number, got complex"),  # == 0.0
    ({"weight_offset": math.inf}, ValueError, "weight_offset must be finite, got inf"),
    ({"weight_offset": math.nan}, ValueError, "weight_offset must be finite, got nan"),
    ({"weight_in_input_dtype": 1}, TypeError, "weight_in_input_dtype must be a bool, got int 1"),
    ({"weight_in_input_dtype": "yes"}, TypeError, "weight_in_input_dtype must be a bool, got str"),
], ids=lambda v: None)
def test_rms_norm_rejects_each_bad_option(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        allreduce_rms.rms_norm(X, W, 1e-6, **options)
    name = next(iter(options))
    if name != "gate":  # the module takes the same options at construction (the gate in forward)
        with pytest.raises(error, match=message):
            TPRMSNorm(64, **options)


def test_the_gate_is_checked_against_x_also_in_forward() -> None:
    with pytest.raises(ValueError, match="gate: must have the shape of x"):
        TPRMSNorm(64, gate_position="after")(X, gate=torch.randn(3, 63))


@pytest.mark.parametrize("width,world,group,message", [
    (48, 2, 32, r"group_size=32 does not divide this rank's width 48: a group would straddle two ranks"),
    (48, 4, 64, r"group_size=64 is not a multiple of this rank's width 48: a group would cover 1.33 ranks"),
    (64, 2, 96, r"group_size=96 does not divide the full width 128 \(2 ranks x 64 columns\)"),
    (64, 2, 256, r"group_size=256 is larger than the full width 128"),
    (64, 2, None, None),
])
def test_groups_must_lie_inside_one_rank_or_cover_whole_ranks(width: int, world: int, group, message) -> None:
    if message is None:
        for ok in (1, 8, 64, 128):
            assert check_variant(group_size=ok, width=width, world=world).group_size == ok
        return
    with pytest.raises(ValueError, match=message):
        check_variant(group_size=group, width=width, world=world)


def _straddle_worker(rank: int, world: int) -> str:
    """On two gloo ranks: a group straddling the ranks raises on every rank before any exchange,
    and a valid call still works after it (no rank was left inside a collective)."""
    ws = allreduce_rms.Workspace()
    try:
        allreduce_rms.rms_norm(torch.randn(2, 48), torch.ones(48), 1e-6, ws, group_size=32)
        message = ""
    except ValueError as exc:
        message = str(exc)
    y = allreduce_rms.rms_norm(torch.ones(2, 64) * (rank + 1), torch.ones(64), 0.0, ws, group_size=128)
    ws.close()
    return f"{message}|{float(y[0, 0]):.6f}"


def test_a_straddling_group_raises_on_every_rank_before_communicating() -> None:
    results = run_ranks(_straddle_worker, 2)
    # full row: 64 ones and 64 twos, mean square 2.5: rank 0 gets 1/sqrt(2.5), rank 1 2/sqrt(2.5)
    expected = [1 / math.sqrt(2.5), 2 / math.sqrt(2.5)]
    for rank, result in enumerate(results):
        message, value = result.split("|")
        assert "group_size=32 does not divide this rank's width 48: a group would straddle two ranks" in message
        assert float(value) == pytest.approx(expected[rank], rel=1e-6)


QKV = torch.randn(3, 32 + 2 * 16)


@pytest.mark.parametrize("options,error,message", [
    ({"weight_offset": "0"}, TypeError, "weight_offset must be a real number"),
    ({"weight_offset": math.inf}, ValueError, "weight_offset must be finite"),
    ({"weight_in_input_dtype": None}, TypeError, "weight_in_input_dtype must be a bool"),
])
def test_qk_norm_rejects_bad_options(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        allreduce_rms.qk_norm(QKV, torch.ones(32), torch.ones(16), 32, 16, **options)
    with pytest.raises(error, match=message):
        allreduce_rms.qk_norm_separate(QKV[:, :32], QKV[:, 32:48], torch.ones(32), torch.ones(16), **options)
    with pytest.raises(error, match=message):
        TPQKNorm(32, 16, **options)


@pytest.mark.parametrize("k,message", [
    (torch.randn(4, 16), r"k: must match q in leading shape, dtype and device; q is \(3, 32\)"),
    (torch.randn(3, 16, dtype=torch.bfloat16), "k: must match q in leading shape, dtype and device"),
    (torch.randn(3, 16, device="meta"), "k: must match q in leading shape, dtype and device"),
    (torch.randn(16, 3).t(), "k: the last dimension must have unit stride"),
])
def test_qk_norm_separate_rejects_mismatched_k(k: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        allreduce_rms.qk_norm_separate(torch.randn(3, 32), k, torch.ones(32), torch.ones(16))


def test_qk_norm_separate_checks_its_weights_and_inplace() -> None:
    q, k = torch.randn(3, 32), torch.randn(3, 16)
    with pytest.raises(ValueError, match=r"k_weight: expected shape \(16,\)"):
        allreduce_rms.qk_norm_separate(q, k, torch.ones(32), torch.ones(32))
    with pytest.raises(TypeError, match="inplace must be a bool"):
        allreduce_rms.qk_norm_separate(q, k, torch.ones(32), torch.ones(16), inplace="yes")
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        allreduce_rms.qk_norm_separate(None, k, torch.ones(32), torch.ones(16))


def _debug_worker(rank: int, world: int) -> str:
    """Debug mode: rank 1 passes other variant options than rank 0 (a different group_size, then
    a weight_offset where rank 0 makes a default call); every rank raises naming rank 1."""
    from allreduce_rms import ops

    ops.set_debug(True)
    ws = allreduce_rms.Workspace()
    messages = []
    x = torch.randn(2, 64)
    for options in ({"group_size": 32 if rank else 64}, {"weight_offset": 1.0} if rank else {}):
        try:
            allreduce_rms.rms_norm(x, torch.ones(64), 1e-6, ws, **options)
            messages.append("")
        except RuntimeError as exc:
            messages.append(str(exc))
    ws.close()
    return "\n".join(messages)


def test_debug_mode_names_the_rank_whose_variant_options_differ() -> None:
    for result in run_ranks(_debug_worker, 2):
        first, second = result.split("\n")
        for message in (first, second):
            assert "made different calls: rank 1 called rms_norm (variant options #" in message, message
            assert "; rank 0 called rms_norm" in message, message
        assert "; rank 0 called rms_norm with 2 tokens" in second  # rank 0's call was a default one
