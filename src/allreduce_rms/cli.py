"""``allreduce-rms`` / ``python -m allreduce_rms``: check and benchmark on whatever this machine has.

With GPUs: one process per GPU (NCCL, cuda:rank; TP size = the number of GPUs, at most 8).
Without: 2 CPU ranks over gloo, with quick settings (a few minutes at most on 2 cores). First a
correctness check of :func:`allreduce_rms.qk_norm` against the float64 reference, then the
benchmark of :mod:`allreduce_rms.bench`. Under torchrun (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` set) each process is one rank of the job
instead, on ``cuda:LOCAL_RANK``, possibly on several hosts (the fused path then gives way to the
fallback over NCCL, and the run says why)::

    torchrun --nproc-per-node 8 --nnodes 2 ... -m allreduce_rms --json r.json

Progress (a rich progress bar with ETA on a terminal, one line per step otherwise) and notes go
to stderr, the tables to stdout; ``--json`` and ``--plot`` save the results. Both paths, and
matplotlib for ``--plot``, are checked before anything runs.

Exit status: 0 when the run finished and the check passed, 1 when the check failed or a rank
failed, 2 for bad arguments or unusable output paths, 130 after Ctrl-C (every rank stopped).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import textwrap
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import bench, launch

MAX_TOKENS = 1 << 20
DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                 "fp32": "fp32", "float32": "fp32", "float": "fp32"}
PROG = "allreduce-rms"
CPU_TIMING = dict(iters=5, graph_calls=1, graph_replays=1, eager_calls=8, eager_iters=5, warmup=2)
CPU_QUICK_TIMING = dict(iters=3, graph_calls=1, graph_replays=1, eager_calls=4, eager_iters=3, warmup=2)
GPU_TIMING = dict(iters=20, graph_calls=16, graph_replays=4, eager_calls=32, eager_iters=5, warmup=5)
GPU_QUICK_TIMING = dict(iters=5, graph_calls=8, graph_replays=2, eager_calls=8, eager_iters=3, warmup=3)


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


def version_text() -> str:
    """'allreduce-rms X.Y.Z (torch A.B.C)'."""
    import torch

    return f"{PROG} {bench.package_version()} (torch {torch.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        # (RawDescriptionHelpFormatter keeps the epilog's lines, so the description is wrapped here)
        description=textwrap.fill(
            "Check allreduce_rms.qk_norm against a float64 reference, then benchmark it against unfused torch, "
            "torch.compile, symmetric-memory and the HBM roofline on MiniMax-M2 shapes. Uses one process per "
            "visible GPU (NCCL), 2 CPU ranks over gloo without GPUs, or, under torchrun, this process as one "
            "rank of the job.", width=88),
        epilog="examples:\n"
               "  allreduce-rms --json results.json --plot results.png\n"
               "  allreduce-rms --quick\n"
               "  allreduce-rms --tokens 1,64,1024 --methods fused,unfused_eager --shape minimax\n"
               "  torchrun --nproc-per-node 8 -m allreduce_rms --json r.json   # one rank per GPU, any hosts\n"
               "  python -m allreduce_rms.report results.json   # markdown table for the README",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("--tokens", type=parse_tokens, help="token counts T, comma-separated "
                        f"(default {','.join(map(str, bench.DEFAULT_TOKENS))} on GPUs, "
                        f"{','.join(map(str, bench.CPU_TOKENS))} on CPU)")
    parser.add_argument("--dtype", type=parse_dtype, default="bf16", help="benchmark dtype: bf16 (default), fp16, fp32")
    parser.add_argument("--shape", choices=("minimax", "other", "all"), default="all",
                        help="minimax: 48 q / 8 kv heads, head_dim 128; other: 32 q / 8 kv heads, head_dim 64")
    parser.add_argument("--methods", type=parse_methods, default=None,
                        help=f"comma-separated subset of {', '.join(bench.METHODS)} "
                             "(default: every one that can run here)")
    parser.add_argument("--world-size", type=positive_int, help="ranks = TP size: 1, 2, 4 or 8 "
                        "(default: the number of GPUs, or 2 CPU ranks; under torchrun: the job's)")
    parser.add_argument("--iters", type=positive_int, help="timed samples per measurement (median and p20/p80)")
    parser.add_argument("--graph-calls", type=positive_int, help="calls captured into one CUDA graph (default 16)")
    parser.add_argument("--quick", action="store_true", help="few T values and samples (CI)")
    parser.add_argument("--cpu", action="store_true", help="use CPU ranks over gloo even when GPUs are visible")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    parser.add_argument("--json", metavar="PATH", help="write the results JSON here (the folder must exist)")
    parser.add_argument("--plot", metavar="PATH", help="write a plot of latency vs T here, e.g. results.png "
                        "(needs matplotlib: pip install \"allreduce-rms[plot]\")")
    parser.add_argument("--timeout", type=positive_int, help="seconds before the ranks are stopped "
                        "(default 1800 on GPUs, 600 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines on stderr")
    return parser


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve(args: argparse.Namespace, gpus: Optional[int] = None,
            job: Optional[Dict[str, Any]] = None) -> Tuple[bench.BenchConfig, int, List[str]]:
    """The run's config and world size from parsed arguments, and notes for the user.

    `gpus`: GPUs visible to this process (default: ask torch). `job`: :func:`launch.torchrun_env`
    of a torchrun rank, whose world size is then the run's. Raises UsageError.
    """
    notes: List[str] = []
    gpus = _visible_gpus() if gpus is None else gpus
    device = "cuda" if gpus > 0 and not args.cpu else "cpu"
    if job is not None:
        world = job["world_size"]
        if args.world_size is not None and args.world_size != world:
            raise UsageError(f"--world-size {args.world_size}: this torchrun job has {world} ranks "
                             "(leave --world-size out under torchrun)")
        if world not in bench.TP_SIZES:
            raise UsageError(f"the torchrun job has {world} ranks; the TP size must divide 8 kv heads, so one of "
                             f"{', '.join(map(str, bench.TP_SIZES))}")
        if device == "cuda" and job["local_rank"] >= gpus:
            raise UsageError(f"LOCAL_RANK {job['local_rank']} but only {gpus} GPU(s) visible on this host "
                             "(one process per GPU: --nproc-per-node at most the GPU count)")
    elif args.world_size is not None:
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
        timing = dict(GPU_QUICK_TIMING if quick else GPU_TIMING)
    else:
        timing = dict(CPU_QUICK_TIMING if quick else CPU_TIMING)
    if args.iters is not None:
        timing.update(iters=args.iters, eager_iters=args.iters)
    if args.graph_calls is not None:
        timing.update(graph_calls=args.graph_calls)
    methods = tuple(args.methods) if args.methods is not None else bench.METHODS
    if device == "cpu":
        runnable = [m for m in methods if m in bench.CPU_METHODS]
        if not runnable:
            raise UsageError(f"--methods {','.join(methods)}: on CPU ranks only "
                             f"{', '.join(bench.CPU_METHODS)} can be timed; the others run on GPUs only")
        why = "--cpu given" if args.cpu and gpus > 0 else "no GPU visible"
        samples = timing["eager_iters"]
        notes.append(f"{why}: {'quick ' if quick else ''}CPU run on {world} ranks over gloo "
                     f"(T = {', '.join(map(str, tokens))}; {samples} timed samples each), a few minutes at most.")
        notes.append("CPU numbers are eager wall-clock of the fallback and of plain torch; the fused kernel, "
                     "torch.compile and symmetric memory are timed on GPUs only.")
    cfg = bench.BenchConfig(device=device, tokens=tuple(tokens), shapes=shapes, methods=methods,
                            dtype=args.dtype, check=not args.no_check, progress=not args.no_progress, **timing)
    return cfg, world, notes


def expected_methods(cfg: bench.BenchConfig) -> Tuple[List[str], Dict[str, str]]:
    """The methods this run should measure, as far as this process can tell before any rank
    starts, and the others with the reason. The ranks have the last word (the fused path may
    fall back, symmetric memory may fail to set up): their plan is announced when it differs."""
    runs: List[str] = []
    not_run: Dict[str, str] = {}
    for method in cfg.methods:
        if cfg.device == "cpu" and method not in bench.CPU_METHODS:
            not_run[method] = bench.CPU_SKIP_REASONS.get(method, "timed on GPUs only")
        elif cfg.device == "cuda" and method == "fused":
            from . import _native

            error = _native.load(_native.device_backend_name())
            if error:
                not_run[method] = f"no GPU backend: {error}"
            else:
                runs.append(method)
        elif cfg.device == "cuda" and method == "symm_mem_oneshot":
            problem = _symm_mem_problem()
            if problem:
                not_run[method] = problem
            else:
                runs.append(method)
        else:
            runs.append(method)
    return runs, not_run


def _symm_mem_problem() -> Optional[str]:
    try:
        import torch
        import torch.distributed._symmetric_memory  # noqa: F401  (registers torch.ops.symm_mem)

        torch.ops.symm_mem.one_shot_all_reduce
    except Exception as exc:
        return f"this torch has no symmetric-memory one-shot all-reduce ({type(exc).__name__})"
    return None


# ----------------------------------------------------------------------------- output paths
def path_problem(flag: str, path: str) -> Optional[str]:
    """Why `path` cannot be written (one line naming `flag`), or None. Writes and removes a probe
    file in the folder, so permissions, read-only file systems and root are all judged alike."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{flag} {path}: is a folder; give a file name"
    if not os.path.isdir(folder):
        return f"{flag} {path}: the folder {folder} does not exist (create it first)"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"{flag} {path}: cannot write in the folder {folder} ({exc.strerror or exc})"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{flag} {path}: the file exists and is not writable"
    return None


def preflight(args: argparse.Namespace) -> Optional[str]:
    """Everything about --json and --plot that can fail at the end, checked at the start: the
    first problem as one line, or None."""
    from . import report

    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            problem = path_problem(flag, path)
            if problem:
                return problem
    if args.json and args.plot and os.path.abspath(args.json) == os.path.abspath(args.plot):
        return f"--json and --plot name the same file {args.json}"
    if args.plot:
        problem = report.plot_problem(args.plot)
        if problem:
            return f"--plot {args.plot}: {problem}"
    return None


# ----------------------------------------------------------------------------- progress
def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "-:--"
    value = int(round(value))
    return f"{value // 60}:{value % 60:02d}"


class ProgressView:
    """Rank 0's progress events (see :mod:`allreduce_rms.bench`) shown on a rich Console: a
    progress bar with elapsed time and ETA on a terminal, one line per step in a log file.

    `expected`: the methods announced before the run; when the ranks' plan drops one, the view
    says which and why.
    """

    def __init__(self, console: Any, enabled: bool = True, expected: Sequence[str] = ()) -> None:
        self.console = console
        self.enabled = enabled
        self.live = bool(enabled and console.is_terminal)
        self.expected = list(expected)
        self.progress: Any = None
        self.task: Any = None
        self.units = 0.0          # units of the step in progress
        self.started = time.monotonic()

    def __enter__(self) -> "ProgressView":
        if self.enabled:
            from rich.progress import (BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     TaskProgressColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=self.console, disable=not self.live)
            self.progress.start()
            self.task = self.progress.add_task("starting the ranks", total=None)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def on_message(self, rank: int, message: Any) -> None:
        """:func:`launch.run_ranks`'s on_message: rank 0 sends (kind, data) events."""
        kind, data = message
        self.handle(kind, data)

    def handle(self, kind: str, data: Any) -> None:
        if self.progress is None:
            return
        if kind == "phase":
            self.progress.update(self.task, description=str(data))
            self._line(str(data))
        elif kind == "plan":
            self.progress.update(self.task, total=float(data["total"]), completed=0.0)
            dropped = {s["method"]: s["reason"] for s in data.get("skipped", []) if s["method"] in self.expected}
            for method, reason in dropped.items():
                self.console.print(f"[yellow]{method} is not measured after all:[/] {reason}", highlight=False)
        elif kind == "step":
            self.progress.advance(self.task, self.units)
            self.units = float(data["units"])
            self.progress.update(self.task, description=str(data["text"]))
            self._line(str(data["text"]))
        elif kind == "done":
            task = self._task()
            self.progress.update(self.task, completed=task.total, description="done")
            self.units = 0.0

    def _task(self) -> Any:
        return next(t for t in self.progress.tasks if t.id == self.task)

    def _line(self, text: str) -> None:
        """In a log (no terminal): one line per step with elapsed time, share done and ETA."""
        if self.live:
            return
        task = self._task()
        share = f"{task.percentage:3.0f}%" if task.total else "   -"
        self.console.print(f"[{_seconds(time.monotonic() - self.started)}] {share} {text} "
                           f"(ETA {_seconds(task.time_remaining)})", highlight=False, markup=False)


# ----------------------------------------------------------------------------- the ranks
def _send_progress(kind: str, data: Any) -> None:
    launch.send((kind, data))


def _rank_job(rank: int, world: int, cfg: bench.BenchConfig) -> Optional[Dict[str, Any]]:
    """One spawned rank (torch.distributed initialized by the harness): the whole job."""
    return bench.run_rank(rank, world, cfg, _send_progress if rank == 0 and cfg.progress else None)


def run_ranks(cfg: bench.BenchConfig, world: int, timeout: float,
              on_message: Optional[Any] = None) -> Dict[str, Any]:
    """Spawn `world` ranks on this host and return rank 0's results; launch.RanksFailed names
    the failed ranks."""
    results = launch.run_ranks(_rank_job, world, cfg, backend="nccl" if cfg.device == "cuda" else "gloo",
                               timeout=timeout, on_message=on_message, bind_device=cfg.device == "cuda")
    if not isinstance(results[0], dict):
        raise launch.RanksFailed(["rank 0 returned no results"])
    return results[0]


# ----------------------------------------------------------------------------- main
def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False, soft_wrap=True)  # long lines: the terminal wraps them
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = 160  # a log file: room for the widest table, no wrapping
    return console


def _write_json(path: str, data: Dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def _error(console: Any, text: str) -> None:
    console.print(f"{PROG}: error: {text}", markup=False, highlight=False)


def _header(err: Any, cfg: bench.BenchConfig, world: int, where: str, notes: Sequence[str],
            expected: Sequence[str], not_run: Dict[str, str]) -> None:
    err.print(f"[bold]{version_text()}[/]: {where}", highlight=False)
    for note in notes:
        err.print(f"  {note}", markup=False, highlight=False)
    shown = [m for m in expected if m != "roofline"]
    roof = " and the roofline" if "roofline" in expected else ""
    err.print(f"  Measuring {', '.join(shown) or 'nothing'}{roof}; T = {', '.join(map(str, cfg.tokens))}; "
              f"shapes {', '.join(cfg.shapes)}; {cfg.dtype}"
              + ("; correctness check first" if cfg.check else ""), markup=False, highlight=False)
    if cfg.device == "cuda":  # on CPU the note above already says what runs on GPUs only
        for method, reason in not_run.items():
            err.print(f"  {method} is not measured: {reason}", markup=False, highlight=False)


def _finish(results: Dict[str, Any], args: argparse.Namespace, out: Any, err: Any) -> int:
    """Print the tables, write --json and --plot; the exit status from the check."""
    from . import report

    report.print_results(results, out)
    if args.json:
        try:
            _write_json(args.json, results)
        except OSError as exc:
            _error(err, f"--json {args.json}: {exc}")
            return 1
        err.print(f"Results written to {args.json}", markup=False, highlight=False)
    if args.plot:
        try:
            why = report.plot(results, args.plot)
        except Exception as exc:  # checked before the run; a full disk can still fail here
            why = f"{type(exc).__name__}: {exc}"
        if why:
            _error(err, f"--plot {args.plot}: {why}")
            return 1
        err.print(f"Plot written to {args.plot}", markup=False, highlight=False)
    check = results.get("check")
    if check is not None and not check["passed"]:
        err.print(f"[bold red]{PROG}: the correctness check FAILED[/]", highlight=False)
        return 1
    return 0


def _main_spawn(args: argparse.Namespace, out: Any, err: Any) -> int:
    try:
        cfg, world, notes = resolve(args)
    except UsageError as exc:
        build_parser().print_usage(sys.stderr)
        _error(err, str(exc))
        return 2
    problem = preflight(args)
    if problem:
        _error(err, problem)
        return 2
    expected, not_run = expected_methods(cfg)
    timeout = args.timeout or (1800 if cfg.device == "cuda" else 600)
    where = f"{world} GPU ranks, NCCL" if cfg.device == "cuda" else f"{world} CPU ranks, gloo"
    _header(err, cfg, world, where, notes, expected, not_run)
    try:
        with ProgressView(err, cfg.progress, expected) as view:
            results = run_ranks(cfg, world, timeout, view.on_message)
    except launch.RanksFailed as exc:
        if exc.timed_out:
            _error(err, f"the run did not finish within the time limit ({timeout} s; --timeout to change it):\n{exc}")
        else:
            _error(err, f"the run failed:\n{exc}")
        if args.json:
            _write_json(args.json, {"error": str(exc), "config": _plain(cfg), "tp": world})
        return 1
    results["launcher"] = "spawn"
    return _finish(results, args, out, err)


def _plain(cfg: bench.BenchConfig) -> Dict[str, Any]:
    import dataclasses

    return {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in dataclasses.asdict(cfg).items()}


def _main_torchrun(args: argparse.Namespace, job: Dict[str, Any], out: Any, err: Any) -> int:
    """This process is one rank of a torchrun job: join it (env://), run the job, rank 0 reports."""
    import torch
    import torch.distributed as dist

    rank, lead = job["rank"], job["rank"] == 0
    try:  # the same arguments and environment on every rank: all fail alike, before any rendezvous
        cfg, world, notes = resolve(args, job=job)
    except UsageError as exc:
        if lead:
            build_parser().print_usage(sys.stderr)
            _error(err, str(exc))
        return 2
    problem = preflight(args) if lead else None
    timeout = args.timeout or (1800 if cfg.device == "cuda" else 600)
    kwargs: Dict[str, Any] = {}
    if cfg.device == "cuda":
        torch.cuda.set_device(job["local_rank"])
        kwargs["device_id"] = torch.device("cuda", job["local_rank"])
    dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo", init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout), **kwargs)
    # Ctrl-C or an exception leaves without teardown (a peer may be inside a collective);
    # torchrun stops the other ranks.
    flag = torch.tensor([1 if problem else 0], device="cuda" if cfg.device == "cuda" else "cpu")
    dist.broadcast(flag, src=0)  # rank 0 alone checked the output paths
    if int(flag.item()):
        if lead:
            _error(err, str(problem))
        dist.destroy_process_group()
        return 2
    expected, not_run = expected_methods(cfg)
    if lead:
        backend = "NCCL" if cfg.device == "cuda" else "gloo"
        _header(err, cfg, world, f"torchrun job of {world} ranks ({backend}), this is rank 0", notes,
                expected, not_run)
    try:
        with ProgressView(err, cfg.progress and lead, expected) as view:
            results = bench.run_rank(rank, world, cfg, view.handle if lead else None, job["local_rank"])
    except Exception:
        err.print(f"{PROG}: rank {rank} failed:\n{traceback.format_exc()}", markup=False, highlight=False)
        return 1
    dist.barrier()
    dist.destroy_process_group()
    if not lead:
        return 0
    assert results is not None
    results["launcher"] = "torchrun"
    return _finish(results, args, out, err)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the check and the benchmark; return the exit status (see the module docstring).

    Under torchrun, when called as the program (argv None), the process ends right after its
    output is flushed (os._exit): with gloo a rank otherwise aborts now and then at exit.
    """
    out, err = _console(), _console(stderr=True)
    job = None
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse printed usage and the message (or --help, --version)
            return int(exc.code) if isinstance(exc.code, int) else 2
        try:
            job = launch.torchrun_env()
        except ValueError as exc:
            parser.print_usage(sys.stderr)
            _error(err, str(exc))
            return 2
        if job is None:
            return _main_spawn(args, out, err)
        status = _main_torchrun(args, job, out, err)
    except KeyboardInterrupt:
        if job is None:
            err.print(f"{PROG}: interrupted (Ctrl-C); every rank stopped.", markup=False, highlight=False)
            return 130
        if job["rank"] == 0:  # every rank of the job got the signal: one line is enough
            err.print(f"{PROG}: interrupted (Ctrl-C).", markup=False, highlight=False)
        status = 130
    if argv is None:  # the program itself, a torchrun rank: no interpreter teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
