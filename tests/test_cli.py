"""The CLI (`python -m allreduce_rms`), the benchmark's arithmetic and the report renderer, on CPU.

One real quick run (2 CPU ranks over gloo, a few seconds) is shared by the tests that read its
output; everything else is arithmetic on small hand-made results.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest

from allreduce_rms import bench, cli, report
from distributed import run_ranks


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(exit status, stdout, results dict, json path) of `main(["--quick", "--cpu", ...])`."""
    tmp = tmp_path_factory.mktemp("cli")
    path = tmp / "r.json"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["--quick", "--cpu", "--json", str(path), "--plot", str(tmp / "r.png")])
    results = json.loads(path.read_text()) if path.exists() else None
    return status, out.getvalue(), err.getvalue(), results, path


# ----------------------------------------------------------------------------- the real run
def test_quick_cpu_run_passes_and_writes_json(quick_run):
    status, stdout, stderr, results, _ = quick_run
    assert status == 0, stdout + stderr
    assert results["card"] == "cpu" and results["tp"] == 2 and results["dtype"] == "bf16"
    assert results["timing"] == "eager" and results["backend"] == "gloo"
    assert results["torch"] and results["copy_bandwidth_GBps"] > 0
    assert results["methods"] == ["fallback", "unfused_eager", "roofline"]
    skipped = {s["method"]: s["reason"] for s in results["skipped"]}
    assert set(skipped) == {"fused", "unfused_compiled", "symm_mem_oneshot"}
    assert all(skipped.values())
    assert results["paths"]["fallback"]["path"] == "fallback"


def test_quick_cpu_run_has_every_method_and_token_row(quick_run):
    results = quick_run[3]
    got = {(r["shape"], r["T"], r["method"]) for r in results["rows"]}
    want = {(s, t, m) for s in ("minimax", "other") for t in bench.CPU_QUICK_TOKENS
            for m in ("fallback", "unfused_eager", "roofline")}
    assert got == want
    for row in results["rows"]:
        assert row["error"] is None, row
        assert row["graph_us"] is None  # no CUDA graphs on CPU
        assert row["eager_us"] > 0, row
        if row["method"] != "roofline":
            assert row["host_us"] > 0, row
    q_size, kv_size = results["shapes"]["minimax"]["q_size"], results["shapes"]["minimax"]["kv_size"]
    assert (q_size, kv_size) == (48 * 128 // 2, 8 * 128 // 2)
    roof = next(r for r in results["rows"] if r["method"] == "roofline" and r["shape"] == "minimax" and r["T"] == 64)
    assert roof["bytes"] == 2 * 64 * (q_size + kv_size) * 2
    assert roof["eager_us"] == pytest.approx(roof["bytes"] / (results["copy_bandwidth_GBps"] * 1e3))


def test_quick_cpu_run_checked_every_dtype(quick_run):
    check = quick_run[3]["check"]
    assert check["passed"] is True
    assert check["tolerances"] == {"fp32": 1e-6, "fp16": 5e-4, "bf16": 4e-3}
    by_dtype = {e["dtype"]: e for e in check["results"] if e["path"] == "fallback"}
    assert set(by_dtype) == {"fp32", "fp16", "bf16"}
    for dtype, entry in by_dtype.items():
        assert entry["passed"] and entry["error"] is None
        assert 0 <= entry["max_rel_err"] <= entry["tol"] == bench.TOLERANCES[dtype]


def test_quick_cpu_run_prints_the_table(quick_run):
    stdout, stderr = quick_run[1], quick_run[2]
    for text in ("overall: PASS", "fallback", "unfused_eager", "roofline", "minimax", "other",
                 "skipped fused", "targets (DESIGN.md"):
        assert text in stdout, text
    minimax = stdout.split("\nminimax:", 1)[1].split("\nother:", 1)[0]
    for tokens in bench.CPU_QUICK_TOKENS:  # one row per T: the T, then a number per method
        assert re.search(rf"^ +{tokens} +[0-9.]+ +[0-9.]+ +[0-9.]+$", minimax, re.M), (tokens, minimax)
    assert "matplotlib" in stderr or "plot written" in stderr


def test_quick_cpu_run_targets_not_measured_without_gpus(quick_run):
    targets = quick_run[3]["targets"]
    assert [t["name"] for t in targets["rows"]] == [t["name"] for t in bench.TARGETS]
    assert all(t["status"] == "not measured" for t in targets["rows"])
    assert all("GPU" in t["text"] for t in targets["rows"])
    assert "all not measured (T=1, T=8, T=64, T=256, T=1024, T=4096, T=8192, T=16384, eager host overhead)" in quick_run[1]


def test_report_renders_the_run(quick_run, tmp_path):
    path = quick_run[4]
    out = tmp_path / "table.md"
    assert report.main([str(path), "-o", str(out)]) == 0
    md = out.read_text()
    assert "| T | fallback | unfused_eager | roofline |" in md
    for tokens in bench.CPU_QUICK_TOKENS:
        assert f"\n| {tokens} | " in md
    assert "| target | status |" in md and "T=1024" in md
    assert "PASS" in md
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert report.main(["--text", str(path)]) == 0
    assert "overall: PASS" in text.getvalue()


def test_report_rejects_a_file_that_is_not_results(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert report.main([str(bad)]) == 2
    assert "not an allreduce-rms results file" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing.json")]) == 2


def _worker_with_failures(rank, world):
    """The benchmark on 2 gloo ranks with two injected failures: fallback at T=1 fails on every
    rank before it runs; unfused_eager at T=64 fails on rank 1 only, after its collectives."""
    current = {}
    real_method_fn, real_measure = bench._method_fn, bench._measure

    def method_fn(method, ctx, spaces, symm, qkv, *args):
        current["case"] = (method, qkv.shape[0])
        if current["case"] == ("fallback", 1):
            raise RuntimeError("injected on every rank")
        return real_method_fn(method, ctx, spaces, symm, qkv, *args)

    def measure(ctx, fn):
        result = real_measure(ctx, fn)
        if ctx.rank == 1 and current["case"] == ("unfused_eager", 64):
            raise ValueError("injected on rank 1")
        return result

    bench._method_fn, bench._measure = method_fn, measure
    cfg = bench.BenchConfig(device="cpu", tokens=(1, 64), shapes=("other",), methods=bench.METHODS, check=False,
                            progress=False, iters=2, eager_calls=2, eager_iters=2, warmup=1)
    return bench.run_rank(rank, world, cfg)


def test_a_failing_method_is_recorded_and_the_run_goes_on():
    results, other = run_ranks(_worker_with_failures, 2, timeout=120)
    assert other is None  # only rank 0 reports
    rows = {(r["method"], r["T"]): r for r in results["rows"]}
    assert set(rows) == {(m, t) for m in ("fallback", "unfused_eager", "roofline") for t in (1, 64)}
    assert rows[("fallback", 1)]["error"] == "RuntimeError: injected on every rank"
    assert rows[("unfused_eager", 64)]["error"] == "rank 1: ValueError: injected on rank 1"
    assert rows[("fallback", 1)]["eager_us"] is None and rows[("unfused_eager", 64)]["eager_us"] is None
    for case in (("fallback", 64), ("unfused_eager", 1)):
        assert rows[case]["error"] is None and rows[case]["eager_us"] > 0
    text = report.render_text(results)
    assert "errors:" in text and "other unfused_eager (T=64): rank 1: ValueError: injected on rank 1" in text
    assert results["check"] is None and "correctness check: not run" in text


class _FakeCuda:
    """Just enough of torch.cuda for the benchmark's GPU-only timing code to run on CPU tensors
    (streams and graphs do nothing, events read the host clock): checks the plumbing, not torch."""

    def __init__(self):
        self.log = []
        fake = self

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                fake.log.append("wait_stream")

        class CUDAGraph:
            def replay(self):
                fake.log.append("replay")

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.t = None

            def record(self):
                self.t = time.perf_counter()

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3 + 1e-3

        @contextlib.contextmanager
        def stream(s):
            yield

        @contextlib.contextmanager
        def graph(g, capture_error_mode="global"):
            fake.log.append(("capture", capture_error_mode))
            yield

        self.attrs = {"Stream": Stream, "CUDAGraph": CUDAGraph, "Event": Event, "stream": stream, "graph": graph,
                      "synchronize": lambda device=None: None, "current_stream": lambda device=None: Stream()}


def test_gpu_timing_code_runs_against_a_fake_cuda(monkeypatch):
    import torch

    from allreduce_rms import Workspace

    fake = _FakeCuda()
    for name, value in fake.attrs.items():
        monkeypatch.setattr(torch.cuda, name, value)
    cfg = bench.BenchConfig(device="cpu", tokens=(1, 8), shapes=("other",),
                            methods=("fallback", "unfused_eager", "symm_mem_oneshot", "roofline"), iters=2,
                            graph_calls=3, graph_replays=2, eager_calls=2, eager_iters=2, warmup=1)
    ctx = bench._Rank(0, 1, torch.device("cpu"), cfg, None)
    ctx.cuda = True  # take every GPU branch; the tensors stay on the CPU
    bandwidth = bench.measure_copy_bandwidth(ctx, nbytes=1 << 16)
    assert bandwidth > 0
    rows = bench.run_benchmark(ctx, {"fallback": Workspace(device="cpu", path="fallback")},
                               list(cfg.methods), bandwidth)
    by = {(r["method"], r["T"]): r for r in rows}
    for method in ("fallback", "unfused_eager"):
        for tokens in (1, 8):
            row = by[(method, tokens)]
            assert row["error"] is None and row["graph_us"] > 0 and row["eager_us"] > 0 and row["host_us"] > 0
    for tokens in (1, 8):  # torch.distributed is not initialized: recorded, and the run went on
        assert by[("symm_mem_oneshot", tokens)]["error"].startswith("RuntimeError: symmetric memory unavailable")
        assert by[("roofline", tokens)]["graph_us"] == by[("roofline", tokens)]["eager_us"] > 0
    assert fake.log.count(("capture", "thread_local")) == 4  # 2 methods x 2 T
    assert fake.log.count("replay") == 4 * cfg.iters * (1 + cfg.graph_replays)
    results = bench.finalize({"tp": 1, "dtype": "bf16", "timing": "graph", "rows": rows, "skipped": [],
                              "methods": list(cfg.methods)})
    assert "other" in report.render_text(results)


def test_compiled_baseline_is_built_lazily_with_room_for_every_shape(monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(bench, "_compiled", {})
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    stats_fn, normalize_fn = bench._compiled_parts()
    assert callable(stats_fn) and callable(normalize_fn)
    assert bench._compiled_parts() == (stats_fn, normalize_fn)  # built once
    assert torch._dynamo.config.recompile_limit >= 64


def test_unfused_baseline_matches_the_reference():
    import torch

    from allreduce_rms.fallback import rms_norm_reference

    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, 64 + 2 * 32, generator=gen)
    wq, wk = torch.rand(64, generator=gen) + 0.5, torch.rand(32, generator=gen) + 0.5
    q, k = bench.unfused_qk_norm(qkv, wq, wk, 64, 32, world=1)
    ref_q = rms_norm_reference([qkv[:, :64]], [wq], bench.EPS)[0]
    ref_k = rms_norm_reference([qkv[:, 64:96]], [wk], bench.EPS)[0]
    assert bench.relative_error(q, ref_q) < 1e-6 and bench.relative_error(k, ref_k) < 1e-6


# ----------------------------------------------------------------------------- arithmetic
def test_roofline_arithmetic_matches_design():
    # DESIGN.md: TP2 MiniMax bf16, T=8192 -> 28.1 us at the H200's copy bandwidth (~4.18 TB/s)
    q_size, kv_size = bench.SHAPES["minimax"].sizes(2)
    assert (q_size, kv_size) == (3072, 512)
    nbytes = bench.roofline_bytes(8192, q_size, kv_size, 2)
    assert nbytes == 2 * 8192 * 3584 * 2 == 117_440_512
    assert bench.roofline_us(nbytes, 4180.0) == pytest.approx(28.096, abs=1e-3)
    assert bench.roofline_us(1e9, 1.0) == pytest.approx(1e6)  # 1 GB at 1 GB/s is one second
    with pytest.raises(ValueError):
        bench.roofline_us(1, 0.0)
    assert bench.SHAPES["other"].sizes(4) == (512, 128)
    with pytest.raises(ValueError, match="does not divide"):
        bench.SHAPES["minimax"].sizes(3)


def _synthetic(fused, roof, extra=()):
    rows = []
    for tokens, value in fused.items():
        rows.append({"shape": "minimax", "T": tokens, "method": "fused", "graph_us": value, "eager_us": 20.0,
                     "host_us": 8.0, "error": None})
    for tokens, value in roof.items():
        rows.append({"shape": "minimax", "T": tokens, "method": "roofline", "graph_us": value, "eager_us": value,
                     "host_us": None, "error": None})
    rows += list(extra)
    return {"tp": 2, "dtype": "bf16", "timing": "graph", "card": "NVIDIA H200", "torch": "x", "methods": list(bench.METHODS),
            "skipped": [], "rows": rows, "copy_bandwidth_GBps": 4000.0}


def test_targets_met_missed_and_not_measured():
    baseline = {"shape": "minimax", "T": 1, "method": "unfused_eager", "graph_us": 30.0, "eager_us": 60.0,
                "host_us": 40.0, "error": None}
    failed = {"shape": "minimax", "T": 64, "method": "fused", "graph_us": None, "eager_us": None,
              "host_us": None, "error": "RuntimeError: boom"}
    results = bench.finalize(_synthetic({1: 3.0, 1024: 5.6, 8192: 33.0}, {1: 0.01, 8192: 28.0}, [baseline, failed]))
    status = {t["name"]: t for t in results["targets"]["rows"]}
    assert status["T=1"]["status"] == "met" and status["T=1"]["text"] == "met: 3.00 us <= 3.4 us"
    assert status["T=64"]["status"] == "not measured" and "boom" in status["T=64"]["text"]
    assert status["T=1024"]["status"] == "missed" and status["T=1024"]["text"].startswith("missed: 5.60 us > 5.5 us")
    assert status["T=8192"]["status"] == "met"
    assert status["T=8192"]["measured"] == pytest.approx(33.0 / 28.0)
    assert status["T=16384"]["status"] == "not measured"
    assert status["eager host overhead"]["status"] == "met" and status["eager host overhead"]["measured"] == 8.0
    assert results["targets"]["met"] == 3 and results["targets"]["missed"] == 1
    assert results["targets"]["notes"] == []
    ratio = next(r for r in results["ratios"] if r["T"] == 1)
    assert ratio["baseline_over_fused"]["unfused_eager"] == pytest.approx(10.0)
    assert ratio["fused_over_roofline"] == pytest.approx(300.0)


def test_targets_note_another_setup():
    results = _synthetic({1: 3.0}, {})
    results["tp"] = 4
    targets = bench.evaluate_targets(results)
    assert targets["notes"] and "tp 4" in targets["notes"][0]
    results["card"] = "NVIDIA H100 80GB HBM3"
    assert "set on 2x H200" in bench.evaluate_targets(results)["notes"][-1]


def test_markdown_has_target_and_ratio_columns():
    baseline = {"shape": "minimax", "T": 1, "method": "unfused_eager", "graph_us": 30.0, "eager_us": 60.0,
                "host_us": 40.0, "error": None}
    results = bench.finalize(_synthetic({1: 3.0, 8192: 40.0}, {1: 0.01, 8192: 28.0}, [baseline]))
    md = report.render_markdown([results])
    assert "| T | fused | unfused_eager | roofline | fused/roofline | target |" in md
    assert "| 1 | 3.00 | 30.0 | 0.01 | 300.00x | met (<= 3.4 us) |" in md
    assert "| 8192 | 40.0 | - | 28.0 | 1.43x | missed (<= 1.25x roofline) |" in md
    assert "| 1 | 10.00x | 300.00x |" in md  # unfused_eager / fused, fused / roofline
    text = report.render_text(results)
    assert "missed: 1.43x roofline (40.0 us) > 1.25x roofline" in text


def test_plot_without_matplotlib_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    why = report.plot(_synthetic({1: 3.0}, {1: 0.01}), str(tmp_path / "p.png"))
    assert why and "matplotlib" in why
    assert not (tmp_path / "p.png").exists()


def test_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    results = bench.finalize(_synthetic({1: 3.0, 64: 3.4, 1024: 5.0}, {1: 0.01, 64: 0.2, 1024: 3.5}))
    path = tmp_path / "p.png"
    assert report.plot(results, str(path)) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("argv, message", [
    (["--tokens", "1,x"], "is not an integer"),
    (["--tokens", "0"], "out of range"),
    (["--methods", "fused,bogus"], "unknown method(s) bogus"),
    (["--dtype", "int8"], "is not one of bf16, fp16, fp32"),
    (["--world-size", "3", "--cpu"], "one of 1, 2, 4, 8"),
    (["--iters", "0"], "must be at least 1"),
    (["--shape", "llama"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "usage: allreduce-rms" in err


def test_module_entry_point_rejects_bad_arguments():
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    import allreduce_rms

    if not os.path.abspath(allreduce_rms.__file__).startswith(os.path.abspath(src)):
        src = None  # the installed package is the one under test
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "allreduce_rms", "--tokens", "1,-4"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "allreduce-rms: error: argument --tokens" in proc.stderr and "out of range" in proc.stderr


def test_a_run_past_its_time_limit_fails_cleanly(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert cli.main(["--quick", "--cpu", "--no-progress", "--timeout", "1", "--json", str(path)]) == 1
    assert "did not finish within the time limit" in capsys.readouterr().err
    data = json.loads(path.read_text())
    assert "did not finish" in data["error"] and data["tp"] == 2


def _args(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_resolve_picks_ranks_from_the_machine():
    cfg, world, notes = cli.resolve(_args(), gpus=0)
    assert (cfg.device, world, tuple(cfg.tokens)) == ("cpu", 2, bench.CPU_TOKENS)
    cfg, world, notes = cli.resolve(_args("--quick"), gpus=2)
    assert (cfg.device, world, tuple(cfg.tokens)) == ("cuda", 2, bench.QUICK_TOKENS)
    cfg, world, notes = cli.resolve(_args(), gpus=3)
    assert (cfg.device, world) == ("cuda", 2) and notes and "3 GPUs" in notes[0]
    assert tuple(cfg.tokens) == bench.DEFAULT_TOKENS and cfg.iters == 20
    cfg, world, _ = cli.resolve(_args(), gpus=16)
    assert world == 8
    cfg, world, _ = cli.resolve(_args("--cpu", "--world-size", "4", "--shape", "other", "--iters", "7"), gpus=8)
    assert (cfg.device, world, tuple(cfg.shapes), cfg.iters, cfg.eager_iters) == ("cpu", 4, ("other",), 7, 7)
    cfg, _, _ = cli.resolve(_args("--tokens", "64,1,64", "--methods", "roofline,fused", "--dtype", "float16"), gpus=1)
    assert tuple(cfg.tokens) == (1, 64) and tuple(cfg.methods) == ("fused", "roofline") and cfg.dtype == "fp16"
    with pytest.raises(cli.UsageError, match="only 2 GPU"):
        cli.resolve(_args("--world-size", "4"), gpus=2)


def test_progress_lines_without_a_terminal():
    stream = io.StringIO()
    progress = cli.Progress(stream, enabled=True)
    progress("step one")
    progress("step two")
    progress.done()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith("step one") and lines[1].endswith("step two")
    quiet = io.StringIO()
    cli.Progress(quiet, enabled=False)("nothing")
    assert quiet.getvalue() == ""
