"""The correctness check and the benchmark behind ``python -m allreduce_rms``.

Every rank of a TP group runs :func:`run_rank` (the CLI spawns one process per GPU, or CPU
ranks over gloo, or runs as one rank of a torchrun job); rank 0 returns the results dict,
everything else here is arithmetic on it. The ranks talk to each other only through tensor
collectives (fixed-size byte tensors for text), on the device of the group's backend (nccl:
the rank's GPU, gloo: the CPU), so nothing here needs numpy.

Methods, measured side by side on the same inputs in one run (DESIGN.md, "Performance targets"):

* ``fused``            -- :func:`allreduce_rms.qk_norm` on a ``Workspace(path="fused")``;
* ``fallback``         -- the same call on a ``Workspace(path="fallback")``;
* ``unfused_eager``    -- plain torch: q/k float sums of squares -> ``[T, 2]`` -> NCCL all-reduce
                          -> normalize, all eager;
* ``unfused_compiled`` -- the same with both local parts under ``torch.compile`` (the
                          all-reduce stays eager between them);
* ``symm_mem_oneshot`` -- PyTorch symmetric-memory one-shot all-reduce of the ``[T, 2]`` fp32
                          statistics alone (no norm work at all);
* ``roofline``         -- HBM time for the bytes the op must move, ``2*T*(q_size+kv_size)``
                          elements (q and k read once, written once), at the device copy
                          bandwidth measured in the same run.

Times are microseconds per call: ``graph_us`` is the median over several CUDA-graph replays of
back-to-back calls (GPU only); ``eager_us`` is host wall-clock per call of a tight eager loop
synchronized at the end; ``host_us`` is the host time to enqueue one call (the eager host
overhead). Each has its spread beside it: ``graph_us_p20`` / ``graph_us_p80`` (and likewise for
eager and host) are the 20th and 80th percentiles of the same timed samples. Any failure of one
method at one T is recorded as that row's ``error``.

Results (rank 0's return value; the CLI writes it with ``--json``)::

    {"schema": 2, "card": "NVIDIA H200" | "cpu", "tp": 2, "device": "cuda" | "cpu",
     "backend": "nccl" | "gloo", "torch": "2.11.0+cu130", "cuda": ..., "hip": ..., "dtype": "bf16",
     "build": "built with nvcc 13.0 for architectures 90a" | None,  # the GPU backend's build note (a
                                           # trace build says so: its calls carry the stamps' cost)
     "timing": "graph" | "eager",          # which column the tables and targets use
     "copy_bandwidth_GBps": 4100.0,        # (bytes read + written) / time of a large copy
     "copy_bandwidth_GBps_p20": ..., "copy_bandwidth_GBps_p80": ...,
     "spread": "p20/p80 ...",              # what the *_p20 / *_p80 keys are
     "shapes": {"minimax": {"q_heads", "kv_heads", "head_dim", "q_size", "kv_size"}, ...},
     "tokens": [...], "methods": [measured methods], "skipped": [{"method", "reason"}],
     "paths": {"fused": {"path", "reason"}, "fallback": {...}},
     "check": {"passed", "tolerances", "tokens", "shapes",
               "results": [{"path", "dtype", "max_rel_err", "worst_case", "tol", "passed", "error"}]},
     "rows": [{"shape", "T", "method", "graph_us", "eager_us", "host_us", "error",
               "graph_us_p20", "graph_us_p80", "eager_us_p20", "eager_us_p80", "host_us_p20", "host_us_p80"}],
              # roofline rows: the bound in graph_us (GPU) and eager_us, plus "bytes"
     "ratios": [{"shape", "T", "fused_us", "fused_over_roofline", "baseline_over_fused": {method: x}}],
     "host": [{"T", "method", "call", "host_us", "host_us_p20", "host_us_p80", "ratio_to_floor"}] | None,
     "variant_shape": "...", "variant_rows": [rows as above, shape "mamba2_gated"] | None,  # GPU runs
              # eager host time per call (allreduce_rms.host_bench), None with "host_skipped": why
     "targets": {"setup", "notes", "met", "missed",
                 "rows": [{"name", "T", "kind", "limit", "unit", "measured", "status", "text", ...}]},
     "config": {...}, "env": {...}, "elapsed_s": ...}

All times are microseconds per call; values (each percentile separately) from the slowest rank.
Schema 1 files (before the spread was recorded) have the same keys less the percentiles.

Progress: rank 0 calls ``progress(kind, data)`` as it goes: ``("phase", text)`` while the
amount of work is not known yet, ``("plan", {"total", "methods", "skipped", "paths"})`` once
it is (total in work units), ``("step", {"text", "units"})`` when a step of that many units
starts (the previous one is then done), and ``("done", None)`` at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import host_bench, variant_bench
from ._collectives import all_gather_strings, tensor_device

METHODS = ("fused", "fallback", "unfused_eager", "unfused_compiled", "symm_mem_oneshot", "roofline")
BASELINES = ("fallback", "unfused_eager", "unfused_compiled", "symm_mem_oneshot")
CPU_METHODS = ("fallback", "unfused_eager", "roofline")  # what a CPU (gloo) run can measure
# Why a CPU run leaves the others out, in plain words (the fused kernel and symmetric memory
# exist on GPUs only; torch.compile for CPU needs a C++ compiler and minutes on a small machine).
CPU_SKIP_REASONS = {m: "timed on GPUs only (this is a CPU run)" for m in ("fused", "unfused_compiled", "symm_mem_oneshot")}
PERCENTILES = (20, 80)  # the spread reported beside every median

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative norm error ||out - ref|| / ||ref|| against the float64 reference.
TOLERANCES = {"fp32": 1e-6, "fp16": 5e-4, "bf16": 4e-3}  # as tests/numerics.py explains
CHECK_TOKENS = (1, 7, 64, 1000)
EPS = 1e-6

DEFAULT_TOKENS = (1, 8, 64, 256, 1024, 4096, 8192, 16384)
QUICK_TOKENS = (1, 64, 1024, 8192)
CPU_TOKENS = (1, 8, 64, 256, 1024)
CPU_QUICK_TOKENS = (1, 64, 256)
TP_SIZES = (1, 2, 4, 8)  # must divide every shape's kv heads (8)


@dataclasses.dataclass(frozen=True)
class Shape:
    """Attention head layout of one model; per-rank widths follow from the TP size."""

    name: str
    q_heads: int
    kv_heads: int
    head_dim: int

    def sizes(self, tp: int) -> Tuple[int, int]:
        """(q_size, kv_size) of one rank: its heads times head_dim."""
        if self.q_heads % tp or self.kv_heads % tp:
            raise ValueError(f"shape {self.name}: TP size {tp} does not divide {self.q_heads} q heads "
                             f"and {self.kv_heads} kv heads")
        return self.q_heads // tp * self.head_dim, self.kv_heads // tp * self.head_dim

    def describe(self, tp: int) -> str:
        q_size, kv_size = self.sizes(tp)
        return (f"{self.q_heads} q heads, {self.kv_heads} kv heads, head_dim {self.head_dim}; "
                f"per rank q {q_size}, k {kv_size}, qkv [T, {q_size + 2 * kv_size}]")


SHAPES = {
    "minimax": Shape("minimax", 48, 8, 128),  # MiniMax-M2 QK-norm
    "other": Shape("other", 32, 8, 64),       # a non-MiniMax layout (Llama-like GQA, small heads)
}

# DESIGN.md "Performance targets": TP2, MiniMax-M2 shapes, bf16, CUDA-graph replay, fused path.
# reference_kernel_us: TensorRT-LLM's MiniMax all-reduce RMSNorm kernel on 2x H200 (same method).
TARGET_SETUP = {"tp": 2, "shape": "minimax", "dtype": "bf16"}
TARGETS = (
    {"name": "T=1", "T": 1, "limit_us": 3.4, "reference_kernel_us": 3.73},
    {"name": "T=8", "T": 8, "limit_us": 3.6, "reference_kernel_us": 4.55},
    {"name": "T=64", "T": 64, "limit_us": 3.8, "reference_kernel_us": 4.84},
    {"name": "T=256", "T": 256, "limit_us": 4.5, "reference_kernel_us": 5.03},
    {"name": "T=1024", "T": 1024, "limit_us": 5.5, "reference_kernel_us": 6.56},
    {"name": "T=4096", "T": 4096, "limit_us": 20.0, "reference_kernel_us": 30.97},
    {"name": "T=8192", "T": 8192, "roofline_factor": 1.25, "design_us": 35.0, "reference_kernel_us": 57.30},
    {"name": "T=16384", "T": 16384, "roofline_factor": 1.25, "design_us": 70.0, "reference_kernel_us": 108.4},
)
VARIANT_TOKENS = (1, 64, 1024, 8192)  # T of the variant rows (allreduce_rms.variant_bench)
# and the eager host-time targets of issue 14 (allreduce_rms.host_bench: ratios to x.add_(0))


@dataclasses.dataclass
class BenchConfig:
    """What one run measures; built by the CLI, pickled into every rank."""

    device: str = "cpu"                # "cuda" (one GPU per rank, NCCL) or "cpu" (gloo)
    tokens: Sequence[int] = CPU_QUICK_TOKENS
    shapes: Sequence[str] = ("minimax", "other")
    methods: Sequence[str] = METHODS
    dtype: str = "bf16"
    iters: int = 5                     # timed samples per measurement (median and p20/p80 reported)
    graph_calls: int = 16              # calls captured into one CUDA graph
    graph_replays: int = 4             # graph replays per timed sample
    eager_calls: int = 8               # calls per timed eager sample
    eager_iters: int = 3               # timed eager samples
    warmup: int = 3                    # eager calls before any timing
    check: bool = True
    seed: int = 1234
    progress: bool = True


# ----------------------------------------------------------------------------- arithmetic
def roofline_bytes(tokens: int, q_size: int, kv_size: int, elem_bytes: int) -> int:
    """Bytes the op must move: q and k read once and written once (v is never touched)."""
    return 2 * tokens * (q_size + kv_size) * elem_bytes


def roofline_us(nbytes: float, bandwidth_GBps: float) -> float:
    """Time in microseconds to move `nbytes` at `bandwidth_GBps` (1 GB/s = 1e9 bytes/s)."""
    if bandwidth_GBps <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth_GBps}")
    return nbytes / (bandwidth_GBps * 1e3)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when ref is all zeros and out is not)."""
    out64, ref64 = out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    num, den = float((out64 - ref64).norm()), float(ref64.norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, interpolated linearly between the sorted
    samples (numpy's default). Raises ValueError on an empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(float(v) for v in values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(math.floor(pos))
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(values: Sequence[float], key: str) -> Dict[str, float]:
    """{key: median, key_p20: 20th percentile, key_p80: 80th percentile} of the samples."""
    out = {key: _median(values)}
    for q in PERCENTILES:
        out[f"{key}_p{q}"] = percentile(values, q)
    return out


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 400 else text[:397] + "..."


# ----------------------------------------------------------------------------- the rank context

ProgressFn = Callable[[str, Any], None]


class _Rank:
    """This process's rank, device and the few collectives the benchmark itself needs."""

    def __init__(self, rank: int, world: int, device: torch.device, cfg: BenchConfig,
                 progress: Optional[ProgressFn]) -> None:
        self.rank, self.world, self.device, self.cfg = rank, world, device, cfg
        self.cuda = device.type == "cuda"
        self.progress = progress if rank == 0 else None
        # where the benchmark's own collective tensors live: the GPU for nccl, the CPU for gloo
        self.coll_device = tensor_device(None, device) if world > 1 else torch.device("cpu")
        self._flag = torch.zeros(1, device=self.coll_device)

    def device_sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def sync(self) -> None:
        """All ranks' queued work done, and every rank at this point (host-side barrier)."""
        self.device_sync()
        if self.world > 1:
            if self.cuda:
                dist.all_reduce(self._flag)
                self.device_sync()
            else:
                dist.barrier()

    def max_over_ranks(self, values: List[float]) -> List[float]:
        """Element-wise maximum over the ranks (collective)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.coll_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def gather_text(self, text: str) -> List[str]:
        """Every rank's `text`, indexed by rank (collective; tensors only, no numpy)."""
        if self.world == 1:
            return [text]
        return all_gather_strings(text, None, self.coll_device)

    def agree_error(self, error: Optional[str]) -> Optional[str]:
        """Every rank learns whether any rank failed; the text names the failing ranks."""
        flag = self.max_over_ranks([1.0 if error else 0.0])[0]
        if not flag:
            return None
        texts = self.gather_text(error or "")
        failed = [(r, t) for r, t in enumerate(texts) if t]
        first = failed[0][1]
        ranks = ",".join(str(r) for r, _ in failed)
        return first if len(failed) == self.world else f"rank {ranks}: {first}"

    def report(self, kind: str, data: Any = None) -> None:
        """One progress event (see the module docstring); rank 0 only."""
        if self.progress is not None:
            self.progress(kind, data)


# ----------------------------------------------------------------------------- workspaces
def _open_workspaces(ctx: _Rank) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
    """Open the workspaces the run needs (collective) and say, for each path, why it is what it is.

    On GPUs the first workspace takes the path the library picks by itself (or the one
    ``ALLREDUCE_RMS_PATH`` asks for), with the library's reason; when that is the fused path, a
    second one is opened with ``path="fallback"`` to time the fallback beside it. On CPU ranks
    one workspace serves: the library's own choice, the fallback.
    """
    from .workspace import Workspace

    spaces: Dict[str, Any] = {}
    info: Dict[str, Dict[str, Any]] = {}
    auto_error = None
    try:
        ws = Workspace(device=ctx.device)
    except Exception as exc:  # e.g. ALLREDUCE_RMS_PATH=fused where it cannot work; alike on every rank
        auto_error = _error_text(exc)
    else:
        if ws.path == "fallback" or not ctx.cuda:
            spaces["fallback"] = ws
            info["fallback"] = {"path": ws.path, "reason": ws.reason}
            if ctx.cuda:
                info["fused"] = {"path": None, "reason": f"the library chose the fallback path: {ws.reason}"}
        else:  # fused, or local (one rank: the local-only kernel)
            spaces["fused"] = ws
            info["fused"] = {"path": ws.path, "reason": ws.reason}
    if auto_error is not None and ctx.cuda:
        info["fused"] = {"path": None, "reason": auto_error}
    if "fallback" not in spaces:
        try:
            ws = Workspace(device=ctx.device, path="fallback")
            spaces["fallback"] = ws
            why = "opened with path='fallback' by the benchmark, to time the fallback"
            if auto_error is not None:
                why += f" (the library's own choice failed: {auto_error})"
            info["fallback"] = {"path": ws.path, "reason": ws.reason if ws.path == "local" else why}
        except Exception as exc:
            info["fallback"] = {"path": None, "reason": _error_text(exc)}
    return spaces, info


def _fused_skip_reason(ctx: _Rank, spaces: Dict[str, Any], info: Dict[str, Dict[str, Any]]) -> Optional[str]:
    """None when the fused kernel can be measured, else why not, in plain words."""
    if not ctx.cuda:
        return CPU_SKIP_REASONS["fused"]
    if "fused" in spaces:
        return None
    return info.get("fused", {}).get("reason") or "no fused workspace"


def _close_workspaces(spaces: Dict[str, Any]) -> None:
    for ws in spaces.values():
        try:
            ws.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------- correctness
def _check_inputs(ctx: _Rank, shape: Shape, tokens: int, dtype: torch.dtype, seed: int):
    """Inputs of every rank, generated identically on every rank (no communication), so each
    rank can build the float64 reference of its own shard."""
    q_size, kv_size = shape.sizes(ctx.world)
    gen = torch.Generator().manual_seed(seed)
    row_scale = torch.exp(torch.randn(tokens, 1, generator=gen))  # rows of unlike magnitude
    # rank r's shard scaled by r + 1, so a missing or partial all-reduce cannot pass
    shard = lambda width: torch.arange(1, ctx.world + 1, dtype=torch.float32).repeat_interleave(width)  # noqa: E731
    q_full = (torch.randn(tokens, q_size * ctx.world, generator=gen) * row_scale * shard(q_size)).to(dtype)
    k_full = (torch.randn(tokens, kv_size * ctx.world, generator=gen) * row_scale * 0.5 * shard(kv_size)).to(dtype)
    wq_full = (1.0 + 0.1 * torch.randn(q_size * ctx.world, generator=gen)).to(dtype)
    wk_full = (1.0 + 0.1 * torch.randn(kv_size * ctx.world, generator=gen)).to(dtype)
    v = torch.randn(tokens, kv_size, generator=gen).to(dtype)
    return q_full, k_full, wq_full, wk_full, v


def _check_case(ctx: _Rank, ws: Any, shape: Shape, tokens: int, dtype: torch.dtype, seed: int) -> float:
    from .fallback import rms_norm_reference
    from .ops import qk_norm

    q_size, kv_size = shape.sizes(ctx.world)
    q_full, k_full, wq_full, wk_full, v = _check_inputs(ctx, shape, tokens, dtype, seed)
    qs = slice(ctx.rank * q_size, (ctx.rank + 1) * q_size)
    ks = slice(ctx.rank * kv_size, (ctx.rank + 1) * kv_size)
    qkv = torch.cat([q_full[:, qs], k_full[:, ks], v], dim=1).to(ctx.device)
    q, k = qk_norm(qkv, wq_full[qs].to(ctx.device), wk_full[ks].to(ctx.device), q_size, kv_size, EPS, ws)
    ctx.device_sync()
    ref_q = rms_norm_reference(q_full.chunk(ctx.world, dim=1), wq_full.chunk(ctx.world), EPS)[ctx.rank]
    ref_k = rms_norm_reference(k_full.chunk(ctx.world, dim=1), wk_full.chunk(ctx.world), EPS)[ctx.rank]
    if q.dtype != dtype or tuple(q.shape) != (tokens, q_size) or tuple(k.shape) != (tokens, kv_size):
        raise AssertionError(f"qk_norm returned q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}")
    if not torch.equal(qkv[:, q_size + kv_size:].cpu(), v):
        raise AssertionError("qk_norm modified the v columns of qkv")
    err = max(relative_error(q, ref_q), relative_error(k, ref_k))
    return err if math.isfinite(err) else math.inf


def check_correctness(ctx: _Rank, spaces: Dict[str, Any], fused_skip: Optional[str],
                      shapes: Sequence[str]) -> Dict[str, Any]:
    """qk_norm on every usable path and dtype against the float64 reference."""
    paths = [p for p in ("fused", "fallback") if p in spaces and (p != "fused" or fused_skip is None)]
    entries = []
    for path in paths:
        ws = spaces[path]
        for dname, dtype in DTYPES.items():
            ctx.report("step", {"text": f"check {path} {dname}", "units": CHECK_UNITS})
            worst, where, error = 0.0, "", None
            for si, sname in enumerate(shapes):
                for tokens in CHECK_TOKENS:
                    try:
                        err = _check_case(ctx, ws, SHAPES[sname], tokens, dtype, ctx.cfg.seed + 97 * si + tokens)
                    except Exception as exc:
                        err, error = math.inf, error or _error_text(exc)
                    # agree after every call: a rank that failed must not leave a peer waiting
                    err = ctx.max_over_ranks([err if math.isfinite(err) else 1e300])[0]
                    if err > worst or (err == worst and not where):
                        worst, where = err, f"{sname} T={tokens}"
            try:
                ws.synchronize()  # a fused call whose peer never wrote raises here
            except Exception as exc:
                error = error or _error_text(exc)
            error = ctx.agree_error(error)
            tol = TOLERANCES[dname]
            worst_value = worst if worst < 1e299 else None
            passed = error is None and worst_value is not None and worst_value <= tol
            entries.append({"path": path, "dtype": dname, "max_rel_err": worst_value, "worst_case": where,
                            "tol": tol, "passed": passed, "error": error})
    return {
        "metric": "||out - ref|| / ||ref|| against allreduce_rms.fallback.rms_norm_reference (float64)",
        "tokens": list(CHECK_TOKENS),
        "shapes": list(shapes),
        "tolerances": dict(TOLERANCES),
        "results": entries,
        "passed": bool(entries) and all(e["passed"] for e in entries),
    }


# ----------------------------------------------------------------------------- timing
def measure_copy_bandwidth(ctx: _Rank, nbytes: Optional[int] = None) -> float:
    """Device-to-device copy bandwidth in GB/s: (bytes read + bytes written) / time of copies of
    `nbytes` (default 512 MiB on GPUs, far beyond L2; 32 MiB on CPU); the median of 3 samples."""
    return _median(copy_bandwidth_samples(ctx, nbytes))


def copy_bandwidth_samples(ctx: _Rank, nbytes: Optional[int] = None) -> List[float]:
    """The 3 samples (GB/s) behind :func:`measure_copy_bandwidth`."""
    nbytes = nbytes or ((512 << 20) if ctx.cuda else (32 << 20))
    reps = 10 if ctx.cuda else 4
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    src.fill_(1)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    samples = []
    for _ in range(3):
        if ctx.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) * 1e-3
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                dst.copy_(src)
            seconds = time.perf_counter() - t0
        samples.append(2.0 * nbytes * reps / max(seconds, 1e-12) / 1e9)
    del src, dst
    return samples


def _time_eager(ctx: _Rank, fn: Callable[[], Any]) -> Tuple[List[float], List[float]]:
    """Samples (one per eager_iters) of (wall us per call, host enqueue us per call): a tight
    loop of eager_calls calls, synchronized at the end."""
    cfg = ctx.cfg
    wall, host = [], []
    for _ in range(cfg.eager_iters):
        ctx.sync()
        t0 = time.perf_counter()
        for _ in range(cfg.eager_calls):
            fn()
        t1 = time.perf_counter()
        ctx.device_sync()
        t2 = time.perf_counter()
        wall.append((t2 - t0) / cfg.eager_calls * 1e6)
        host.append((t1 - t0) / cfg.eager_calls * 1e6)
    return wall, host


def _time_graph(ctx: _Rank, fn: Callable[[], Any]) -> float:
    """Median us per call over replays of a CUDA graph of `graph_calls` back-to-back calls."""
    return _median(_graph_samples(ctx, fn))


def _graph_samples(ctx: _Rank, fn: Callable[[], Any]) -> List[float]:
    """`iters` samples of us per call, each from `graph_replays` replays of a CUDA graph of
    `graph_calls` back-to-back calls."""
    cfg = ctx.cfg
    current = torch.cuda.current_stream(ctx.device)
    side = torch.cuda.Stream(ctx.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(2):
            fn()
    current.wait_stream(side)
    ctx.sync()
    graph = torch.cuda.CUDAGraph()
    # thread_local: NCCL's watchdog thread may query events while this thread captures
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(cfg.graph_calls):
            fn()
    ctx.sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    try:
        for _ in range(cfg.iters):
            ctx.sync()
            graph.replay()  # untimed: absorbs the skew between the ranks' launches
            start.record()
            for _ in range(cfg.graph_replays):
                graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / (cfg.graph_replays * cfg.graph_calls))
        ctx.device_sync()
    finally:
        del graph
    return samples


def measure_floors(ctx: _Rank, spaces: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """This machine's floors, timed like the methods (CUDA graph of back-to-back launches), with
    PDL where the norm kernel uses it: an empty kernel, and the smallest Lamport exchange (one
    value+flag packet to every peer and a poll for theirs, no clearing, no fence). None unless a
    fused workspace is open."""
    ws = spaces.get("fused")
    if not ctx.cuda or ws is None or ws.path != "fused":
        return None
    return {f"{name}_us": ctx.max_over_ranks([_time_graph(ctx, fn)])[0]
            for name, fn in floor_calls(ws, ctx.device).items()}


def floor_calls(ws: Any, device: torch.device) -> Dict[str, Callable[[], Any]]:
    """One launch of each floor probe on a fused workspace's device and peers, by name:
    ``empty_kernel`` and ``value_flag_exchange`` (see :func:`measure_floors`)."""
    from . import _native

    front = _native.front()
    stream = lambda: torch.cuda.current_stream(device).cuda_stream  # noqa: E731
    return {"empty_kernel": lambda: ws._native.floor(front.FLOOR_EMPTY, stream()),
            "value_flag_exchange": lambda: ws._native.floor(front.FLOOR_EXCHANGE, stream())}


# ----------------------------------------------------------------------------- the baselines
def local_stats(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[T, 2] float32: per-row sums of squares of this rank's q and k."""
    qf, kf = q.float(), k.float()
    return torch.stack([(qf * qf).sum(dim=-1), (kf * kf).sum(dim=-1)], dim=-1)


def local_normalize(q: torch.Tensor, k: torch.Tensor, stats: torch.Tensor, q_weight: torch.Tensor,
                    k_weight: torch.Tensor, q_width: int, k_width: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalize q and k by the all-reduced [T, 2] statistics (widths are over all ranks)."""
    q_scale = torch.rsqrt(stats[:, 0:1] / q_width + eps)
    k_scale = torch.rsqrt(stats[:, 1:2] / k_width + eps)
    return ((q.float() * q_scale * q_weight.float()).to(q.dtype),
            (k.float() * k_scale * k_weight.float()).to(k.dtype))


def unfused_qk_norm(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_size: int, kv_size: int,
                    world: int, eps: float = EPS, stats_fn: Callable = local_stats,
                    normalize_fn: Callable = local_normalize) -> Tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch baseline: local statistics -> all_reduce of [T, 2] -> local normalize."""
    q = qkv[:, :q_size]
    k = qkv[:, q_size:q_size + kv_size]
    stats = stats_fn(q, k)
    if world > 1:
        dist.all_reduce(stats)
    return normalize_fn(q, k, stats, q_weight, k_weight, q_size * world, kv_size * world, eps)


_compiled: Dict[str, Callable] = {}


def _compiled_parts() -> Tuple[Callable, Callable]:
    if not _compiled:
        import torch._dynamo

        # every (shape, T) is a new input shape; keep them all compiled instead of falling back
        for name in ("recompile_limit", "cache_size_limit"):
            try:
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
            except Exception:
                pass
        _compiled["stats"] = torch.compile(local_stats)
        _compiled["normalize"] = torch.compile(local_normalize)
    return _compiled["stats"], _compiled["normalize"]


class _SymmMem:
    """One symmetric-memory buffer for the [T, 2] statistics, set up once (collectively)."""

    def __init__(self) -> None:
        self.buf: Optional[torch.Tensor] = None
        self.group_name = ""
        self.error: Optional[str] = None

    def setup(self, ctx: _Rank, max_tokens: int) -> None:
        if self.buf is not None:
            return
        if self.error is not None:
            raise RuntimeError(self.error)
        try:
            import warnings

            import torch.distributed._symmetric_memory as symm_mem

            op = torch.ops.symm_mem.one_shot_all_reduce  # AttributeError when this torch lacks it
            group_name = dist.group.WORLD.group_name
            with warnings.catch_warnings():  # deprecated (and unneeded) in newer torch
                warnings.simplefilter("ignore")
                if hasattr(symm_mem, "enable_symm_mem_for_group"):
                    symm_mem.enable_symm_mem_for_group(group_name)
            try:  # the CUDA (P2P + signal pad) backend, whose one-shot kernel is the baseline
                symm_mem.set_backend("CUDA")
            except Exception:  # older torch without backends, or one already chosen
                pass
            buf = symm_mem.empty(max_tokens * 2, dtype=torch.float32, device=ctx.device)
            symm_mem.rendezvous(buf, group_name)
            buf.fill_(float(ctx.rank + 1))
            total = op(buf[:2], "sum", group_name)
            torch.cuda.synchronize(ctx.device)
            expected = ctx.world * (ctx.world + 1) / 2
            if not torch.all(total == expected):
                raise RuntimeError(f"symm_mem one_shot_all_reduce returned {total.tolist()}, expected {expected}")
            self.buf, self.group_name = buf, group_name
        except Exception as exc:
            self.error = f"symmetric memory unavailable: {_error_text(exc)}"
            raise RuntimeError(self.error) from None

    def call(self, tokens: int) -> Callable[[], Any]:
        view = self.buf[: 2 * tokens].view(tokens, 2)
        op, name = torch.ops.symm_mem.one_shot_all_reduce, self.group_name
        return lambda: op(view, "sum", name)


# ----------------------------------------------------------------------------- the benchmark
def _method_fn(method: str, ctx: _Rank, spaces: Dict[str, Any], symm: _SymmMem, qkv: torch.Tensor,
               wq: torch.Tensor, wk: torch.Tensor, q_size: int, kv_size: int) -> Callable[[], Any]:
    from .ops import qk_norm

    world = ctx.world
    if method in ("fused", "fallback"):
        ws = spaces[method]
        return lambda: qk_norm(qkv, wq, wk, q_size, kv_size, EPS, ws)
    if method == "unfused_eager":
        return lambda: unfused_qk_norm(qkv, wq, wk, q_size, kv_size, world)
    if method == "unfused_compiled":
        stats_fn, normalize_fn = _compiled_parts()
        return lambda: unfused_qk_norm(qkv, wq, wk, q_size, kv_size, world, EPS, stats_fn, normalize_fn)
    if method == "symm_mem_oneshot":
        symm.setup(ctx, max(ctx.cfg.tokens))
        return symm.call(qkv.shape[0])
    raise ValueError(f"unknown method {method!r}")


TIMING_KEYS = ("graph_us", "eager_us", "host_us")
# every key a timed row carries: the median and its spread, per timing
SAMPLE_KEYS = tuple(f"{k}{suffix}" for k in TIMING_KEYS for suffix in ("", *(f"_p{q}" for q in PERCENTILES)))


def _measure(ctx: _Rank, fn: Callable[[], Any]) -> Dict[str, Optional[float]]:
    """Warm up, then time `fn`: median and p20/p80 of eager wall, host and (GPU) graph samples."""
    for _ in range(ctx.cfg.warmup):  # also compiles, and creates NCCL communicators before capture
        fn()
    ctx.sync()
    wall, host = _time_eager(ctx, fn)
    out: Dict[str, Optional[float]] = {k: None for k in SAMPLE_KEYS}
    out.update(summarize(wall, "eager_us"))
    out.update(summarize(host, "host_us"))
    if ctx.cuda:
        out.update(summarize(_graph_samples(ctx, fn), "graph_us"))
    return out


def _step_units(tokens: int) -> float:
    """Rough cost of timing one method at T tokens, in progress units (for the ETA)."""
    return 1.0 + tokens / 1024.0


CHECK_UNITS = 2.0  # one path x dtype of the correctness check, in the same units


def plan_methods(ctx: _Rank, fused_skip: Optional[str], spaces: Dict[str, Any],
                 info: Dict[str, Dict[str, Any]], symm: Optional["_SymmMem"] = None
                 ) -> Tuple[List[str], List[Dict[str, str]]]:
    """The methods this run measures, in order, and the others with the reason in plain words.

    Collective on GPUs when symm_mem_oneshot is asked for: its buffer is set up here, so that a
    torch without symmetric memory is known before any timing.
    """
    measured, skipped = [], []
    for method in ctx.cfg.methods:
        reason = None
        if method == "fused":
            reason = fused_skip
        elif not ctx.cuda and method not in CPU_METHODS:
            reason = CPU_SKIP_REASONS.get(method, "timed on GPUs only")
        elif method == "fallback" and "fallback" not in spaces:
            reason = f"no fallback workspace: {info.get('fallback', {}).get('reason')}"
        elif method == "symm_mem_oneshot" and symm is not None:
            error = None
            try:
                symm.setup(ctx, max(ctx.cfg.tokens))
            except Exception as exc:
                error = str(exc)
            reason = ctx.agree_error(error)  # every rank skips it, or none does
        if reason:
            skipped.append({"method": method, "reason": reason})
        else:
            measured.append(method)
    return measured, skipped


def plan_units(ctx: _Rank, methods: Sequence[str], checks: int) -> float:
    """Total progress units of the run after the plan: checks, bandwidth, timings."""
    timed = [m for m in methods if m != "roofline"]
    return checks * CHECK_UNITS + 1.0 + len(ctx.cfg.shapes) * len(timed) * sum(_step_units(t) for t in ctx.cfg.tokens)


def run_benchmark(ctx: _Rank, spaces: Dict[str, Any], methods: List[str], bandwidth: float,
                  symm: Optional["_SymmMem"] = None) -> List[Dict[str, Any]]:
    """Time every method at every (shape, T); one row each (see the module docstring)."""
    from .ops import fused_plan

    cfg = ctx.cfg
    dtype = DTYPES[cfg.dtype]
    elem = torch.tensor([], dtype=dtype).element_size()
    symm = symm if symm is not None else _SymmMem()
    rows: List[Dict[str, Any]] = []
    for sname in cfg.shapes:
        shape = SHAPES[sname]
        q_size, kv_size = shape.sizes(ctx.world)
        for tokens in cfg.tokens:
            gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed + ctx.rank * 7919 + tokens)
            qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=gen, device=ctx.device).to(dtype)
            wq = (1.0 + 0.1 * torch.randn(q_size, generator=gen, device=ctx.device)).to(dtype)
            wk = (1.0 + 0.1 * torch.randn(kv_size, generator=gen, device=ctx.device)).to(dtype)
            for method in methods:
                row: Dict[str, Any] = {"shape": sname, "T": tokens, "method": method,
                                       "graph_us": None, "eager_us": None, "host_us": None, "error": None}
                if method == "roofline":
                    nbytes = roofline_bytes(tokens, q_size, kv_size, elem)
                    value = roofline_us(nbytes, bandwidth)
                    # a bound, not a timing: the same value serves either timing column
                    row.update(graph_us=value if ctx.cuda else None, eager_us=value, bytes=nbytes)
                    rows.append(row)
                    continue
                ctx.report("step", {"text": f"{sname} T={tokens} {method}", "units": _step_units(tokens)})
                error = None
                try:
                    if method == "fused" and ctx.cuda and spaces["fused"].path == "fused":
                        row["plan"] = fused_plan(qkv, wq, wk, q_size, kv_size, spaces["fused"])
                    row.update(_measure(ctx, _method_fn(method, ctx, spaces, symm, qkv, wq, wk, q_size, kv_size)))
                except Exception as exc:
                    error = _error_text(exc)
                    if os.environ.get("ALLREDUCE_RMS_BENCH_TRACEBACK"):
                        traceback.print_exc()
                    try:
                        ctx.device_sync()
                    except Exception:
                        pass
                error = ctx.agree_error(error)
                if error is not None:
                    row.update({k: None for k in SAMPLE_KEYS})
                    row["error"] = error
                else:  # report the slowest rank, statistic by statistic
                    values = ctx.max_over_ranks([row.get(k) if row.get(k) is not None else -1.0 for k in SAMPLE_KEYS])
                    row.update({k: (v if v >= 0 else None) for k, v in zip(SAMPLE_KEYS, values)})
                rows.append(row)
            del qkv, wq, wk
    symm.buf = None  # free the symmetric buffer before the process group goes away
    if "fused" in spaces:
        try:
            spaces["fused"].synchronize()
        except Exception as exc:  # a fused call timed out somewhere: do not trust its timings
            for row in rows:
                if row["method"] == "fused" and row["error"] is None:
                    row["error"] = f"after the run: {_error_text(exc)}"
    return rows


# ----------------------------------------------------------------------------- targets and ratios
def _row_value(row: Dict[str, Any], timing: str) -> Optional[float]:
    value = row.get("graph_us" if timing == "graph" else "eager_us")
    return float(value) if value is not None and row.get("error") is None else None


def lookup(results: Dict[str, Any], shape: str, tokens: int, method: str) -> Optional[Dict[str, Any]]:
    for row in results.get("rows", []):
        if row["shape"] == shape and row["T"] == tokens and row["method"] == method:
            return row
    return None


def compute_ratios(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per (shape, T): fused / roofline, and each baseline's time / fused time (>1: fused wins)."""
    timing = results.get("timing", "graph")
    out = []
    seen = []
    for row in results.get("rows", []):
        key = (row["shape"], row["T"])
        if key not in seen:
            seen.append(key)
    for shape, tokens in seen:
        fused_row = lookup(results, shape, tokens, "fused")
        fused = _row_value(fused_row, timing) if fused_row else None
        entry: Dict[str, Any] = {"shape": shape, "T": tokens, "fused_us": fused, "fused_over_roofline": None,
                                 "baseline_over_fused": {}}
        roof_row = lookup(results, shape, tokens, "roofline")
        roof = _row_value(roof_row, timing) if roof_row else None
        if fused and roof:
            entry["fused_over_roofline"] = fused / roof
        for method in BASELINES:
            row = lookup(results, shape, tokens, method)
            value = _row_value(row, timing) if row else None
            if row is not None:
                entry["baseline_over_fused"][method] = (value / fused) if (value and fused) else None
        out.append(entry)
    return out


def evaluate_targets(results: Dict[str, Any]) -> Dict[str, Any]:
    """Status of every DESIGN.md target row: met / missed (with the measured value) / not measured."""
    shape = TARGET_SETUP["shape"]
    timing = results.get("timing", "graph")
    setup = {"tp": results.get("tp"), "shape": shape, "dtype": results.get("dtype")}
    differs = [f"{k} {setup[k]} (targets are for {v})" for k, v in TARGET_SETUP.items() if k != "shape" and setup[k] != v]
    notes = []
    if differs:
        notes.append("this run's " + ", ".join(differs) + ": absolute limits are for reference only")
    if timing != "graph":
        notes.append("no CUDA-graph timings in this run")
    elif "H200" not in str(results.get("card", "")):
        notes.append(f"the absolute limits were set on 2x H200; this run is on {results.get('card')}: "
                     "compare the x-roofline rows and the ratios")
    fused_skip = next((s["reason"] for s in results.get("skipped", []) if s["method"] == "fused"), None)
    rows = []
    for target in TARGETS:
        tokens = target["T"]
        entry: Dict[str, Any] = {"name": target["name"], "T": tokens, "status": "not measured", "measured": None,
                                 "limit": None, "unit": "us", "reference_kernel_us": target.get("reference_kernel_us")}
        fused_row = lookup(results, shape, tokens, "fused")
        if "limit_us" in target:
            entry["kind"] = "graph"
            entry["limit"] = target["limit_us"]
            entry["what"] = "fused CUDA-graph time per call"
            measured = _row_value(fused_row, "graph") if fused_row else None
        else:
            entry["kind"] = "roofline"
            entry["unit"] = "x roofline"
            entry["limit"] = target["roofline_factor"]
            entry["design_us"] = target.get("design_us")
            entry["what"] = "fused CUDA-graph time / roofline"
            graph = _row_value(fused_row, "graph") if fused_row else None
            roof_row = lookup(results, shape, tokens, "roofline")
            roof = _row_value(roof_row, "graph") if roof_row else None
            measured = graph / roof if graph and roof else None
            entry["fused_us"] = graph
            entry["roofline_us"] = roof
        if measured is not None:
            entry["measured"] = measured
            entry["status"] = "met" if measured <= entry["limit"] else "missed"
        else:
            if fused_row is None and fused_skip:
                entry["why"] = f"fused not measured: {fused_skip}"
            elif fused_row is None:
                entry["why"] = f"no fused {shape} row at T={tokens} in this run"
            elif fused_row.get("error"):
                entry["why"] = f"fused failed: {fused_row['error']}"
            else:
                entry["why"] = "no CUDA-graph timing (CPU run)" if timing != "graph" else "roofline missing"
        entry["text"] = describe_target(entry)
        rows.append(entry)
    rows += host_bench.evaluate_host_targets(results.get("host"), results.get("host_skipped"))
    return {"setup": dict(TARGET_SETUP), "notes": notes, "rows": rows,
            "met": sum(r["status"] == "met" for r in rows), "missed": sum(r["status"] == "missed" for r in rows)}


def describe_target(entry: Dict[str, Any]) -> str:
    """One line: 'met: 2.91 µs <= 3.2 µs' / 'missed: 1.41x roofline > 1.25x roofline' / ..."""
    limit = entry["limit"]
    if entry["unit"] == "x floor":  # a host target (allreduce_rms.host_bench)
        return str(entry["text"])
    measured = entry["measured"]
    # one more decimal where two would print a miss as the limit itself (3.8004 as "3.80", 1.2548x
    # as "1.25x")
    digits = 3 if measured is not None and f"{measured:.2f}" == f"{limit:.2f}" else 2
    if entry["unit"] == "us":
        limit_text = f"{limit:g} µs"
        value_text = f"{measured:.{digits}f} µs" if measured is not None else ""
    else:
        limit_text = f"{limit:g}x roofline"
        value_text = f"{measured:.{digits}f}x roofline" if measured is not None else ""
        if entry.get("fused_us") is not None:
            value_text += f" ({entry['fused_us']:.1f} µs)"
    if entry["status"] == "met":
        return f"met: {value_text} <= {limit_text}"
    if entry["status"] == "missed":
        return f"missed: {value_text} > {limit_text}"
    return f"not measured (target <= {limit_text}): {entry.get('why', '')}".rstrip(": ")


def finalize(results: Dict[str, Any]) -> Dict[str, Any]:
    """Add the derived parts (ratios, targets) to a results dict; returns it."""
    results["ratios"] = compute_ratios(results)
    results["targets"] = evaluate_targets(results)
    return results


# ----------------------------------------------------------------------------- one rank's job
def package_version() -> str:
    """This package's version: the installed distribution's, else the module's ``__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("allreduce-rms")
    except PackageNotFoundError:
        pass
    import importlib

    package = importlib.import_module(__package__ or "allreduce_rms")
    return str(getattr(package, "__version__", "unknown"))


def run_rank(rank: int, world: int, cfg: BenchConfig, progress: Optional[ProgressFn] = None,
             local_rank: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """The whole job on one rank (torch.distributed already initialized when world > 1).

    Args:
        rank, world: this rank and the group size (the TP size).
        cfg: what to measure (identical on every rank).
        progress: rank 0's progress events (see the module docstring); ignored elsewhere.
        local_rank: the GPU index on this host (default `rank`; torchrun's LOCAL_RANK on
            several hosts).

    Returns the results dict on rank 0, None elsewhere.
    """
    started = time.perf_counter()
    local_rank = rank if local_rank is None else local_rank
    if cfg.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    ctx = _Rank(rank, world, device, cfg, progress)
    ctx.report("phase", "opening workspaces")
    hosts = len(set(ctx.gather_text(socket.gethostname())))
    spaces, paths = _open_workspaces(ctx)
    symm = _SymmMem()
    try:
        fused_skip = _fused_skip_reason(ctx, spaces, paths)
        methods, skipped = plan_methods(ctx, fused_skip, spaces, paths, symm if ctx.cuda else None)
        checked = [p for p in ("fused", "fallback") if p in spaces and (p != "fused" or fused_skip is None)]
        checks = len(checked) * len(DTYPES) if cfg.check else 0
        ctx.report("plan", {"total": plan_units(ctx, methods, checks), "methods": methods, "skipped": skipped,
                            "paths": paths})
        check = check_correctness(ctx, spaces, fused_skip, cfg.shapes) if cfg.check else None
        ctx.report("step", {"text": "measuring copy bandwidth", "units": 1.0})
        samples = copy_bandwidth_samples(ctx)
        rows = run_benchmark(ctx, spaces, methods, _median(samples), symm)
        ctx.report("phase", "measuring the machine's floors")
        floors = measure_floors(ctx, spaces)
        host_skipped = fused_skip or (None if ctx.cuda else "host times are measured on GPUs only")
        host_rows = None
        if host_skipped is None and "fused" in methods:
            ctx.report("phase", "measuring eager host time per call")
            q_size, kv_size = SHAPES[TARGET_SETUP["shape"]].sizes(ctx.world)
            host_rows = host_bench.measure_host_rows(ctx, spaces["fused"], q_size, kv_size, DTYPES[cfg.dtype],
                                                     list(cfg.tokens))
        elif host_skipped is None:
            host_skipped = "the fused method was not asked for"
        variant_rows = None
        if ctx.cuda and "fused" in methods:
            ctx.report("phase", "measuring a norm variant (Mamba2 gated)")
            variant_rows = variant_bench.measure_variant_rows(
                ctx, spaces, [t for t in cfg.tokens if t in VARIANT_TOKENS] or list(cfg.tokens)[:2])
        ctx.sync()
    finally:
        symm.buf = None
        _close_workspaces(spaces)
    ctx.report("done")
    if rank != 0:
        return None

    from . import _native

    results: Dict[str, Any] = {
        "schema": 2,
        "card": torch.cuda.get_device_name(device) if ctx.cuda else "cpu",
        "tp": world,
        "device": device.type,
        "backend": "nccl" if ctx.cuda else "gloo",
        "torch": torch.__version__,
        "cuda": getattr(torch.version, "cuda", None),
        "hip": getattr(torch.version, "hip", None),
        "allreduce_rms": package_version(),
        # how the backend was built (a trace build's every block stamps the trace: slower calls)
        "build": _native.build_note("hip" if torch.version.hip else "cuda") if ctx.cuda else None,
        "hosts": hosts,
        "python": sys.version.split()[0],
        "dtype": cfg.dtype,
        "timing": "graph" if ctx.cuda else "eager",
        "config": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in dataclasses.asdict(cfg).items()},
        "env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                           "ALLREDUCE_RMS_PATH", "CUDA_VISIBLE_DEVICES") if k in os.environ},
        "shapes": {name: {"q_heads": SHAPES[name].q_heads, "kv_heads": SHAPES[name].kv_heads,
                          "head_dim": SHAPES[name].head_dim, "q_size": SHAPES[name].sizes(world)[0],
                          "kv_size": SHAPES[name].sizes(world)[1]} for name in cfg.shapes},
        "tokens": list(cfg.tokens),
        "methods": methods,
        "skipped": skipped,
        "paths": paths,
        "floors": floors,
        "copy_bandwidth_GBps": _median(samples),
        "copy_bandwidth_GBps_p20": percentile(samples, 20),
        "copy_bandwidth_GBps_p80": percentile(samples, 80),
        "spread": (f"*_p20 / *_p80: 20th / 80th percentile of the timed samples ({cfg.iters} CUDA-graph samples, "
                   f"{cfg.eager_iters} eager samples per row; slowest rank)"),
        "check": check,
        "rows": rows,
        "host": host_rows,          # allreduce_rms.host_bench: eager host us per call, ratio to x.add_(0)
        "host_skipped": host_skipped,
        "variant_shape": variant_bench.DESCRIPTION,  # allreduce_rms.variant_bench (GPU runs only)
        "variant_rows": variant_rows,
    }
    finalize(results)
    results["elapsed_s"] = time.perf_counter() - started
    return results
