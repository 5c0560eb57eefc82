"""Local (no communication) kernels on one GPU against the float64 reference.

With one rank, rms_norm and qk_norm are plain RMSNorm / QK-norm: this exercises the kernel's
vector widths (16-byte and the unaligned scalar path), vectors per thread, tokens per tile and
every dtype pairing of activations and weights.
"""

from __future__ import annotations

import pytest
import torch

import allreduce_rms
from allreduce_rms import _native
from numerics import DTYPES, TOLERANCE, reference, rel_err

pytestmark = pytest.mark.gpu

# (q_size, kv_size): MiniMax TP2 and TP1, other model shapes, an odd multiple of the 8-element
# vector, and widths that are no multiple of the vector (scalar path).
WIDTHS = [(3072, 512), (6144, 1024), (2048, 256), (4096, 128), (8 * 37, 8 * 5), (100, 36)]
TOKENS = [0, 1, 7, 64, 1000, 4099]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_size,kv_size", WIDTHS)
def test_qk_norm_local_matches_reference(dtype, q_size, kv_size):
    torch.manual_seed(q_size + kv_size)
    dev = torch.device("cuda", 0)
    eps = 1e-6
    for tokens in TOKENS:
        for wdtype in (dtype, torch.float32):
            qkv = torch.randn(tokens, q_size + 2 * kv_size, device=dev).to(dtype)
            qw = (1 + 0.1 * torch.randn(q_size, device=dev)).to(wdtype)
            kw = (1 + 0.1 * torch.randn(kv_size, device=dev)).to(wdtype)
            q_ref, = reference([qkv[:, :q_size]], [qw], eps)
            k_ref, = reference([qkv[:, q_size:q_size + kv_size]], [kw], eps)
            v_before = qkv[:, q_size + kv_size:].clone()
            q, k = allreduce_rms.qk_norm(qkv, qw, kw, q_size, kv_size, eps)
            assert rel_err(q, q_ref) <= TOLERANCE[dtype], (tokens, wdtype)
            assert rel_err(k, k_ref) <= TOLERANCE[dtype], (tokens, wdtype)
            q2, k2 = allreduce_rms.qk_norm(qkv, qw, kw, q_size, kv_size, eps, inplace=True)
            assert torch.equal(q2, q) and torch.equal(k2, k)  # same kernel, same bits
            assert q2.data_ptr() == qkv.data_ptr()
            assert torch.equal(qkv[:, q_size + kv_size:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_local_matches_reference_and_3d(dtype):
    dev = torch.device("cuda", 0)
    for width in (128, 4096, 5120, 8 * 41, 24):
        x = torch.randn(3, 37, width, device=dev).to(dtype)
        w = torch.randn(width, device=dev).to(torch.bfloat16)
        ref, = reference([x.reshape(-1, width)], [w], 1e-5)
        out = allreduce_rms.rms_norm(x, w, 1e-5)
        assert out.shape == x.shape
        assert rel_err(out.reshape(-1, width), ref) <= TOLERANCE[dtype]


def test_unaligned_view_takes_scalar_path_correctly():
    dev = torch.device("cuda", 0)
    base = torch.randn(65, 257, device=dev, dtype=torch.bfloat16)
    x = base[1:, 1:]  # pointer and row stride not 16-byte aligned
    w = torch.randn(256, device=dev)
    ref, = reference([x], [w], 1e-6)
    assert rel_err(allreduce_rms.rms_norm(x, w), ref) <= TOLERANCE[torch.bfloat16]


def test_dlpack_entry_point_dispatches_by_device_type():
    dev = torch.device("cuda", 0)
    x = torch.randn(10, 512, device=dev, dtype=torch.float16)
    w = torch.randn(512, device=dev, dtype=torch.float16)
    out = torch.empty_like(x)
    _native.front().rms_norm(x, w, out, 1e-6, _native.current_stream(dev))
    ref, = reference([x], [w], 1e-6)
    assert rel_err(out, ref) <= TOLERANCE[torch.float16]
    with pytest.raises(ValueError, match="CPU"):
        _native.front().rms_norm(x.cpu(), w.cpu(), out.cpu(), 1e-6, 0)


def test_output_is_poisoned_then_fully_written():
    dev = torch.device("cuda", 0)
    x = torch.randn(333, 3072, device=dev, dtype=torch.bfloat16)
    w = torch.randn(3072, device=dev, dtype=torch.bfloat16)
    out = torch.full_like(x, float("nan"))
    allreduce_rms.rms_norm(x, w, out=out)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- rows of any width (issue 15)
# Rows the register-resident kernel cannot hold go to the wide-row kernel: 16-bit rows above
# 32768 and fp32 rows above 16384 elements (32776, 65536; 16388), rows beyond the unaligned scalar
# path's 4096 (4097, 4100 in 16-bit types), and odd widths that stay on the fast kernel (1, 3).
ANY_WIDTHS = [1, 3, 4097, 4100, 16388, 32776, 65536]
ANY_TOKENS = [1, 5, 300]
# (q_size, kv_size): MiniMax-M2's full q and k on one rank (30720 + 4096: wide-row in every
# dtype), and a scalar-path pair past 4096 elements.
ANY_QK_WIDTHS = [(30720, 4096), (4097, 3)]


def _edgy_rows(tokens, width, dtype, device, seed):
    """[T, W] normal rows whose first and last 8 columns are 16x larger, so they hold a large
    share of the sum of squares (a kernel that drops a row's unaligned head or tail, or never
    writes it, fails by far more than the tolerance), and whose token t is scaled by 1 + t % 3
    (a statistic applied to the wrong token fails too)."""
    g = torch.Generator().manual_seed(seed)
    edge = torch.ones(width)
    edge[:8] = 16.0
    edge[-8:] = 16.0
    rows = 1.0 + (torch.arange(tokens) % 3).double()
    x = torch.randn(tokens, width, generator=g, dtype=torch.float64) * edge.double() * rows[:, None]
    return x.to(dtype).to(device)


def _weight(width, dtype, device, seed, offset=0):
    """[width] weight near 1 of `dtype`; offset > 0 makes it a view `offset` elements into a
    larger tensor (contiguous, but its pointer off 16-byte alignment)."""
    g = torch.Generator().manual_seed(seed)
    w = (1 + 0.2 * torch.randn(width + offset, generator=g)).to(dtype).to(device)
    return w[offset:]


def _check_rms_norm(x, w, dtype, where):
    """rms_norm of x (any row layout) out of place into a NaN-filled output and in place, both
    against float64; the two must be the same bits (one kernel, same inputs)."""
    eps = 1e-6
    ref, = reference([x], [w], eps)
    out = torch.full(x.shape, float("nan"), device=x.device, dtype=dtype)
    allreduce_rms.rms_norm(x, w, eps, out=out)
    assert rel_err(out, ref) <= TOLERANCE[dtype], (where, rel_err(out, ref))
    inplace = x.clone() if x.is_contiguous() else x  # a column view stays one: its own layout, in place
    allreduce_rms.rms_norm(inplace, w, eps, out=inplace)
    assert torch.equal(inplace, out), where


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", ANY_WIDTHS)
def test_rms_norm_rows_of_any_width(dtype, width):
    dev = torch.device("cuda", 0)
    for tokens in ANY_TOKENS:
        for wdtype in (dtype, torch.float32):
            x = _edgy_rows(tokens, width, dtype, dev, seed=width + tokens)
            _check_rms_norm(x, _weight(width, wdtype, dev, seed=width), dtype, (tokens, wdtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [4100, 5120, 16388, 32776])
@pytest.mark.parametrize("offset", [1, 3])
def test_rms_norm_misaligned_column_view_of_any_width(dtype, width, offset):
    """x = base[:, offset:] of a [T, W + offset] tensor: the row start is `offset` elements off
    16-byte alignment and the row stride W + offset moves it from row to row, so every row has
    its own head; the output is a fresh (aligned) tensor, so input and output are aligned at
    different columns. The weight is misaligned too (a view one element into a larger one)."""
    dev = torch.device("cuda", 0)
    tokens = 37
    base = _edgy_rows(tokens, width + offset, dtype, dev, seed=width * 7 + offset)
    x = base[:, offset:]
    assert x.data_ptr() % 16 != 0 and not x.is_contiguous()
    for wdtype in (dtype, torch.float32):
        for woff in (0, 1):
            head = base[:, :offset].clone()
            _check_rms_norm(x, _weight(width, wdtype, dev, seed=width, offset=woff), dtype, (wdtype, woff))
            assert torch.equal(base[:, :offset], head)  # columns left of the view untouched
            x.copy_(_edgy_rows(tokens, width + offset, dtype, dev, seed=width * 7 + offset)[:, offset:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_size,kv_size", ANY_QK_WIDTHS)
def test_qk_norm_rows_of_any_width(dtype, q_size, kv_size):
    dev = torch.device("cuda", 0)
    eps = 1e-6
    for tokens in ANY_TOKENS:
        for wdtype in (dtype, torch.float32):
            qkv = _edgy_rows(tokens, q_size + 2 * kv_size, dtype, dev, seed=q_size + tokens)
            qw = _weight(q_size, wdtype, dev, seed=1)
            kw = _weight(kv_size, wdtype, dev, seed=2)
            q_ref, = reference([qkv[:, :q_size]], [qw], eps)
            k_ref, = reference([qkv[:, q_size:q_size + kv_size]], [kw], eps)
            v_before = qkv[:, q_size + kv_size:].clone()
            q, k = allreduce_rms.qk_norm(qkv, qw, kw, q_size, kv_size, eps)
            assert rel_err(q, q_ref) <= TOLERANCE[dtype], (tokens, wdtype, rel_err(q, q_ref))
            assert rel_err(k, k_ref) <= TOLERANCE[dtype], (tokens, wdtype, rel_err(k, k_ref))
            q2, k2 = allreduce_rms.qk_norm(qkv, qw, kw, q_size, kv_size, eps, inplace=True)
            assert torch.equal(q2, q) and torch.equal(k2, k)
            assert q2.data_ptr() == qkv.data_ptr()
            assert torch.equal(qkv[:, q_size + kv_size:], v_before)  # v untouched


@pytest.fixture
def wide_row_kernel_forced():
    """Yields a function that forces the wide-row kernel for every row (set_plan_override with
    vectors_per_thread = -1, at the given warps per block, 0 = its default); reset afterwards."""
    front, device_type = _native.front(), _native.dl_device_type()

    def force(warps=0):
        front.set_plan_override(device_type, warps, -1, 0)

    try:
        yield force
    finally:
        front.set_plan_override(device_type, 0, 0, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("warps", [0, 1, 4])
def test_wide_row_kernel_forced_on_every_width(dtype, warps, wide_row_kernel_forced):
    """The wide-row kernel on the widths the fast kernel usually takes (heads and tails of every
    length, one-warp and few-warp blocks), so its edges are checked beyond the widths that reach it
    on their own; the in-place and out-of-place results agree bit for bit."""
    wide_row_kernel_forced(warps)
    dev = torch.device("cuda", 0)
    for width in (1, 3, 8, 24, 100, 3072, 4096):
        for tokens in (1, 7, 1000):
            x = _edgy_rows(tokens, width, dtype, dev, seed=width + tokens)
            _check_rms_norm(x, _weight(width, torch.float32, dev, seed=width), dtype, (width, tokens))
    base = _edgy_rows(65, 257, dtype, dev, seed=3)
    _check_rms_norm(base[1:, 1:], _weight(256, dtype, dev, seed=4, offset=1), dtype, "unaligned view")
    eps = 1e-6
    for q_size, kv_size in WIDTHS:
        qkv = _edgy_rows(99, q_size + 2 * kv_size, dtype, dev, seed=q_size)
        qw, kw = _weight(q_size, dtype, dev, seed=5), _weight(kv_size, torch.float32, dev, seed=6)
        q_ref, = reference([qkv[:, :q_size]], [qw], eps)
        k_ref, = reference([qkv[:, q_size:q_size + kv_size]], [kw], eps)
        q, k = allreduce_rms.qk_norm(qkv, qw, kw, q_size, kv_size, eps)
        assert rel_err(q, q_ref) <= TOLERANCE[dtype] and rel_err(k, k_ref) <= TOLERANCE[dtype], (q_size, kv_size)


def test_plan_override_rejects_unknown_vectors_per_thread():
    with pytest.raises(ValueError, match="wide-row"):
        _native.front().set_plan_override(_native.dl_device_type(), 0, 3, 0)


def test_plan_override_rejects_bad_prefetch_early_weights_and_epoch_readers():
    front, device_type = _native.front(), _native.dl_device_type()
    with pytest.raises(ValueError, match="prefetch_rows"):
        front.set_plan_override(device_type, 0, 0, 0, 9, -1)
    with pytest.raises(ValueError, match="early_weights"):
        front.set_plan_override(device_type, 0, 0, 0, -1, 2)
    with pytest.raises(ValueError, match="epoch_per_block"):
        front.set_plan_override(device_type, 0, 0, 0, -1, -1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefetch_and_early_weights_change_no_bit(dtype):
    """The ABI 5 plan knobs move loads earlier, never the math. With the L2 prefetch 0, 1 or 3 grid
    strides ahead and the weights fetched before or after the statistic, plans of the same warps and
    vectors per thread give the same bits, and every plan matches the float64 reference.

    T=256 gives every block one row (where weights are fetched early); T=1000 and 20000 with 4 rows
    per block (tokens_per_block) give every block several (where rows are prefetched). Weights in
    the activations' dtype (fetched early) and in fp32 (always read after the exchange). The plans
    hold the MiniMax TP2 row (3584 elements) in registers at every dtype (16-byte vectors of 8 or
    4 elements), so no call goes to the wide-row kernel, which has neither knob."""
    front, device_type = _native.front(), _native.dl_device_type()
    dev = torch.device("cuda", 0)
    q_size, kv_size, eps = 3072, 512, 1e-6
    row_vecs = (q_size + kv_size) * torch.tensor([], dtype=dtype).element_size() // 16
    shapes = [(4, 4), (2, 8)] if row_vecs <= 4 * 32 * 4 else [(8, 4), (4, 8)]
    knobs = [(-1, 0), (-1, 1), (0, 1), (1, 1), (3, 1), (1, 0)]  # (prefetch_rows, early_weights)
    for warps, vpt in shapes:
        assert warps * 32 * vpt >= row_vecs, (warps, vpt, row_vecs)  # the register-resident kernel
    try:
        for tokens, per_block in ((256, 1), (1000, 4), (20000, 4)):
            g = torch.Generator(device=dev).manual_seed(tokens)
            qkv = torch.randn(tokens, q_size + 2 * kv_size, device=dev, generator=g)
            qkv = (qkv * torch.rand(tokens, 1, device=dev, generator=g) * 4).to(dtype)  # rows of different scales
            for wdtype in (dtype, torch.float32):
                qw = (1 + 0.5 * torch.randn(q_size, device=dev, generator=g)).to(wdtype)
                kw = (1 + 0.5 * torch.randn(kv_size, device=dev, generator=g)).to(wdtype)
                q_ref, = reference([qkv[:, :q_size]], [qw], eps)
                k_ref, = reference([qkv[:, q_size:q_size + kv_size]], [kw], eps)
                for warps, vpt in shapes:
                    first = None
                    for prefetch, early in knobs:
                        front.set_plan_override(device_type, warps, vpt, per_block, prefetch, early)
                        q, k = allreduce_rms.qk_norm(qkv, qw, kw, q_size, kv_size, eps)
                        where = (tokens, wdtype, warps, vpt, prefetch, early)
                        assert rel_err(q, q_ref) <= TOLERANCE[dtype] and rel_err(k, k_ref) <= TOLERANCE[dtype], where
                        # the same warps and vectors per thread add in the same order: the same bits
                        first = first or (q, k)
                        assert torch.equal(q, first[0]) and torch.equal(k, first[1]), where
    finally:
        front.set_plan_override(device_type, 0, 0, 0, -1, -1, -1)
