"""``python -m allreduce_rms`` / ``allreduce-rms``: check and benchmark on whatever this machine has.

With GPUs: one process per GPU (NCCL, cuda:rank; TP size = the number of GPUs, at most 8).
Without: 2 CPU ranks over gloo. First a correctness check of :func:`allreduce_rms.qk_norm`
against the float64 reference, then the benchmark of :mod:`allreduce_rms.bench`. Progress goes
to stderr (rank 0), the table to stdout; ``--json`` and ``--plot`` save the results.

Exit status: 0 when the run finished and the check passed, 1 when the check failed or a rank
failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue as queue_module
import socket
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import bench

MAX_TOKENS = 1 << 20
DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                 "fp32": "fp32", "float32": "fp32", "float": "fp32"}


class UsageError(Exception):
    """A bad command line; the message says what to change."""


# ----------------------------------------------------------------------------- arguments
def parse_tokens(text: str) -> Tuple[int, ...]:
    """'1,8,64' -> (1, 8, 64): positive ints, sorted, duplicates dropped."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"token count {part!r} is not an integer (expected e.g. 1,8,64)") from None
        if not 1 <= value <= MAX_TOKENS:
            raise argparse.ArgumentTypeError(f"token count {value} is out of range 1..{MAX_TOKENS}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("no token counts given (expected e.g. 1,8,64)")
    return tuple(sorted(set(values)))


def parse_methods(text: str) -> Tuple[str, ...]:
    """'fused,fallback' or 'all' -> method names in the canonical order."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if names == ["all"]:
        return bench.METHODS
    unknown = [n for n in names if n not in bench.METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(bench.METHODS)} or 'all'")
    return tuple(m for m in bench.METHODS if m in names)


def parse_dtype(text: str) -> str:
    try:
        return DTYPE_ALIASES[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"dtype {text!r} is not one of bf16, fp16, fp32") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="allreduce-rms",
        description="Check allreduce_rms.qk_norm against a float64 reference, then benchmark it against "
                    "unfused torch, torch.compile, symmetric-memory and the HBM roofline on MiniMax-M2 "
                    "shapes. Uses one process per visible GPU (NCCL), or 2 CPU ranks over gloo.",
        epilog="examples:\n"
               "  allreduce-rms --quick\n"
               "  allreduce-rms --json results.json --plot results.png\n"
               "  allreduce-rms --tokens 1,64,1024 --methods fused,unfused_eager --shape minimax\n"
               "  python -m allreduce_rms.report results.json   # markdown table for the README",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tokens", type=parse_tokens, help="token counts T, comma-separated "
                        f"(default {','.join(map(str, bench.DEFAULT_TOKENS))} on GPUs, "
                        f"{','.join(map(str, bench.CPU_TOKENS))} on CPU)")
    parser.add_argument("--dtype", type=parse_dtype, default="bf16", help="benchmark dtype: bf16 (default), fp16, fp32")
    parser.add_argument("--shape", choices=("minimax", "other", "all"), default="all",
                        help="minimax: 48 q / 8 kv heads, head_dim 128; other: 32 q / 8 kv heads, head_dim 64")
    parser.add_argument("--methods", type=parse_methods, default=bench.METHODS,
                        help=f"comma-separated subset of {','.join(bench.METHODS)} (default all)")
    parser.add_argument("--world-size", type=positive_int, help="ranks = TP size: 1, 2, 4 or 8 "
                        "(default: the number of GPUs, or 2 CPU ranks)")
    parser.add_argument("--iters", type=positive_int, help="timed samples per measurement (median reported)")
    parser.add_argument("--graph-calls", type=positive_int, help="calls captured into one CUDA graph (default 16)")
    parser.add_argument("--quick", action="store_true", help="few T values and iterations (CI)")
    parser.add_argument("--cpu", action="store_true", help="use CPU ranks over gloo even when GPUs are visible")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    parser.add_argument("--json", metavar="PATH", help="write the results JSON here")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of latency vs T here (needs matplotlib)")
    parser.add_argument("--timeout", type=positive_int, help="seconds before the ranks are killed "
                        "(default 1800 on GPUs, 600 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return parser


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve(args: argparse.Namespace, gpus: Optional[int] = None) -> Tuple[bench.BenchConfig, int, List[str]]:
    """The run's config and world size from parsed arguments; notes for the user. Raises UsageError."""
    notes: List[str] = []
    gpus = _visible_gpus() if gpus is None else gpus
    device = "cuda" if gpus > 0 and not args.cpu else "cpu"
    if args.world_size is not None:
        world = args.world_size
        if world not in bench.TP_SIZES:
            raise UsageError(f"--world-size {world}: the TP size must divide 8 kv heads, so one of "
                             f"{', '.join(map(str, bench.TP_SIZES))}")
        if device == "cuda" and world > gpus:
            raise UsageError(f"--world-size {world}: only {gpus} GPU(s) visible (use --cpu for CPU ranks)")
    elif device == "cuda":
        world = max(n for n in bench.TP_SIZES if n <= min(gpus, 8))
        if world != gpus:
            notes.append(f"{gpus} GPUs visible; using {world} (TP must be 1, 2, 4 or 8)")
    else:
        world = 2
    quick = args.quick
    if args.tokens is not None:
        tokens = args.tokens
    elif device == "cuda":
        tokens = bench.QUICK_TOKENS if quick else bench.DEFAULT_TOKENS
    else:
        tokens = bench.CPU_QUICK_TOKENS if quick else bench.CPU_TOKENS
    shapes = ("minimax", "other") if args.shape == "all" else (args.shape,)
    if device == "cuda":
        timing = dict(iters=5, graph_calls=8, graph_replays=2, eager_calls=8, eager_iters=3, warmup=3) if quick else \
            dict(iters=20, graph_calls=16, graph_replays=4, eager_calls=32, eager_iters=5, warmup=5)
    else:
        timing = dict(iters=3, graph_calls=1, graph_replays=1, eager_calls=4, eager_iters=3, warmup=2) if quick else \
            dict(iters=5, graph_calls=1, graph_replays=1, eager_calls=8, eager_iters=5, warmup=2)
    if args.iters is not None:
        timing.update(iters=args.iters, eager_iters=args.iters)
    if args.graph_calls is not None:
        timing.update(graph_calls=args.graph_calls)
    cfg = bench.BenchConfig(device=device, tokens=tuple(tokens), shapes=shapes, methods=tuple(args.methods),
                            dtype=args.dtype, check=not args.no_check, progress=not args.no_progress, **timing)
    return cfg, world, notes


# ----------------------------------------------------------------------------- ranks
class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, stream: Any = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self.width = 0

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.perf_counter() - self.started:7.1f} s] {text}"
        if self.tty:
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg: bench.BenchConfig, results: Any) -> None:
    """One rank's process: init torch.distributed, run the job, report (rank, ok, payload)."""
    progress = Progress(sys.stderr, cfg.progress) if rank == 0 else None
    try:
        import torch
        import torch.distributed as dist

        kwargs: Dict[str, Any] = {}
        if cfg.device == "cuda":
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device("cuda", rank)  # binds the communicator to this GPU
        init = dict(init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        try:
            dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo", **init, **kwargs)
        except TypeError:  # a torch without device_id
            dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo", **init)
        try:
            payload = bench.run_rank(rank, world, cfg, progress)
        finally:
            if progress is not None:
                progress.done()
            dist.destroy_process_group()  # no barrier: a failed rank must not wait for the others
        results.put((rank, True, payload))
    except BaseException:
        if progress is not None:
            progress.done()
        results.put((rank, False, traceback.format_exc()))


def run_ranks(cfg: bench.BenchConfig, world: int, timeout: float) -> Dict[str, Any]:
    """Spawn `world` rank processes and return rank 0's results; RuntimeError names failed ranks."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, cfg, results)) for r in range(world)]
    for p in procs:
        p.start()
    reports: Dict[int, Tuple[bool, Any]] = {}
    failures: List[str] = []
    deadline = time.monotonic() + timeout
    dead_since: Dict[int, float] = {}
    try:
        while len(reports) < world:
            try:
                rank, ok, payload = results.get(timeout=0.5)
            except queue_module.Empty:
                now = time.monotonic()
                if now > deadline:
                    missing = sorted(set(range(world)) - set(reports))
                    failures.append(f"ranks {missing} did not finish within the time limit (hung? see progress above)")
                    break
                for r, p in enumerate(procs):
                    if r not in reports and p.exitcode is not None:
                        dead_since.setdefault(r, now)
                        if now - dead_since[r] > 5 and not any(f.startswith(f"rank {r} ") for f in failures):
                            failures.append(f"rank {r} exited with code {p.exitcode} without a report (crashed)")
                            reports[r] = (False, None)
                            deadline = min(deadline, now + 30)  # peers of a dead rank may wait forever
                continue
            reports[rank] = (ok, payload)
            if not ok:
                failures.append(f"rank {rank} failed:\n{payload}")
                deadline = min(deadline, time.monotonic() + 30)
    finally:
        for p in procs:
            p.join(timeout=10 if not failures else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        raise RuntimeError("\n".join(failures))
    ok, payload = reports[0]
    if not isinstance(payload, dict):
        raise RuntimeError("rank 0 returned no results")
    return payload


# ----------------------------------------------------------------------------- main
def _write_json(path: str, data: Dict[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the check and the benchmark; return the exit status (see the module docstring)."""
    from . import report

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed usage and the message
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        cfg, world, notes = resolve(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    timeout = args.timeout or (1800 if cfg.device == "cuda" else 600)
    where = f"{world} GPU rank(s), NCCL" if cfg.device == "cuda" else f"{world} CPU rank(s), gloo"
    print(f"allreduce-rms: {where}; T {','.join(map(str, cfg.tokens))}; shapes {','.join(cfg.shapes)}; "
          f"{cfg.dtype}; methods {','.join(cfg.methods)}", file=sys.stderr)
    try:
        results = run_ranks(cfg, world, timeout)
    except RuntimeError as exc:
        print(f"allreduce-rms: the run failed:\n{exc}", file=sys.stderr)
        if args.json:
            _write_json(args.json, {"error": str(exc), "config": dataclasses.asdict(cfg), "tp": world})
        return 1
    sys.stdout.write(report.render_text(results))
    sys.stdout.flush()
    if args.json:
        _write_json(args.json, results)
        print(f"results written to {args.json}", file=sys.stderr)
    if args.plot:
        why = report.plot(results, args.plot)
        print(why if why else f"plot written to {args.plot}", file=sys.stderr)
    check = results.get("check")
    if check is not None and not check["passed"]:
        print("allreduce-rms: correctness check FAILED", file=sys.stderr)
        return 1
    return 0
