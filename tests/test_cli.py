"""The CLI (`python -m allreduce_rms`), the benchmark's arithmetic and the report renderer, on CPU.

One real quick run (2 CPU ranks over gloo, a few seconds) is shared by the tests that read its
output; everything else is arithmetic on small hand-made results.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import pathlib
import os
import re
import subprocess
import sys
import time

import pytest

from allreduce_rms import bench, cli, launch, report
from allreduce_rms.launch import run_ranks

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """(exit status, stdout, stderr, results dict, json path) of `main(["--quick", "--cpu", ...])`."""
    tmp = tmp_path_factory.mktemp("cli")
    path = tmp / "r.json"
    out, err = io.StringIO(), io.StringIO()
    plot = ["--plot", str(tmp / "r.png")] if HAVE_MATPLOTLIB else []
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["--quick", "--cpu", "--json", str(path)] + plot)
    results = json.loads(path.read_text()) if path.exists() else None
    return status, out.getvalue(), err.getvalue(), results, path


# ----------------------------------------------------------------------------- the real run
def test_quick_cpu_run_passes_and_writes_json(quick_run):
    status, stdout, stderr, results, _ = quick_run
    assert status == 0, stdout + stderr
    assert results["card"] == "cpu" and results["tp"] == 2 and results["dtype"] == "bf16"
    assert results["timing"] == "eager" and results["backend"] == "gloo" and results["launcher"] == "spawn"
    assert results["schema"] == 2 and results["hosts"] == 1
    assert results["build"] is None  # the GPU backend's build note: a CPU run uses none
    assert results["torch"] and results["copy_bandwidth_GBps"] > 0
    assert results["copy_bandwidth_GBps_p20"] <= results["copy_bandwidth_GBps"] <= results["copy_bandwidth_GBps_p80"]
    assert results["methods"] == ["fallback", "unfused_eager", "roofline"]
    skipped = {s["method"]: s["reason"] for s in results["skipped"]}
    assert set(skipped) == {"fused", "unfused_compiled", "symm_mem_oneshot"}
    assert all("GPUs only" in reason for reason in skipped.values())


def test_reasons_are_true_and_plain(quick_run):
    # nobody forced a path: no reason may say so; the CPU run opens only the fallback workspace
    results, stdout = quick_run[3], quick_run[1]
    assert set(results["paths"]) == {"fallback"}
    assert results["paths"]["fallback"]["path"] == "fallback"
    assert "not a GPU" in results["paths"]["fallback"]["reason"]
    assert "forced" not in json.dumps(results) and "forced" not in stdout + quick_run[2]


def test_quick_cpu_run_has_every_method_and_token_row_with_its_spread(quick_run):
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
            for key in ("eager_us", "host_us"):
                assert 0 < row[f"{key}_p20"] <= row[key] <= row[f"{key}_p80"], (key, row)
            assert row["graph_us_p20"] is None and row["graph_us_p80"] is None
    assert "20th / 80th percentile" in results["spread"]
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


def test_quick_cpu_run_prints_the_tables(quick_run):
    stdout = quick_run[1]
    for text in ("Correctness check: PASS", "fallback", "unfused_eager", "roofline", "minimax", "other",
                 "Not measured: fused, unfused_compiled, symm_mem_oneshot: timed on GPUs only", "Targets (the project's",
                 "µs per call", "p20–p80"):
        assert text in stdout, text
    assert " us " not in stdout and "us per" not in stdout.replace("µs per", "")
    minimax = stdout.split("\nminimax:", 1)[1].split("\nother:", 1)[0]
    for tokens in bench.CPU_QUICK_TOKENS:  # one row per T: the medians, then under them the p20–p80 spreads
        assert re.search(rf"^ *{tokens} +[0-9.]+ +[0-9.]+ +[0-9.]+\n +[0-9.]+–[0-9.]+ +[0-9.]+–[0-9.]+ *$",
                         minimax, re.M), (tokens, minimax)


def test_quick_cpu_run_tells_the_user_what_runs_and_how_far_it_is(quick_run):
    stderr = quick_run[2]
    assert re.search(r"^allreduce-rms \S+ \(torch \S+\): 2 CPU ranks, gloo$", stderr, re.M), stderr
    assert "no GPU visible: quick CPU run on 2 ranks over gloo" in stderr
    # only what will run is listed
    assert "Measuring fallback, unfused_eager and the roofline;" in stderr
    assert "Measuring fused" not in stderr and "symm_mem_oneshot" not in stderr
    # no terminal here: one progress line per step, with the share done and an ETA
    steps = re.findall(r"^\[\d+:\d\d\] +(\d+)% (.*) \(ETA [-0-9:]+\)$", stderr, re.M)
    texts = [t for _, t in steps]
    assert "check fallback bf16" in texts and "measuring copy bandwidth" in texts and "other T=256 unfused_eager" in texts
    shares = [int(p) for p, _ in steps]
    assert shares == sorted(shares) and shares[-1] < 100
    assert "Results written to" in stderr
    assert ("Plot written to" in stderr) == HAVE_MATPLOTLIB


def test_quick_cpu_run_targets_not_measured_without_gpus(quick_run):
    targets = quick_run[3]["targets"]
    host_names = [f"host T={t} {what}" for t in (1, 1024) for what in ("public functions", "torch.ops custom ops")]
    assert [t["name"] for t in targets["rows"]] == [t["name"] for t in bench.TARGETS] + host_names
    assert all(t["status"] == "not measured" for t in targets["rows"])
    assert all("GPU" in t["text"] for t in targets["rows"])
    assert quick_run[3]["host"] is None and "GPU" in quick_run[3]["host_skipped"]
    assert ("all not measured (T=1, T=8, T=64, T=256, T=1024, T=4096, T=8192, T=16384, "
            f"{', '.join(host_names)})") in quick_run[1]


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed (the plot extra)")
def test_quick_cpu_run_wrote_the_plot(quick_run):
    png = quick_run[4].with_name("r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_renders_the_run(quick_run, tmp_path):
    path = quick_run[4]
    out = tmp_path / "table.md"
    assert report.main([str(path), "-o", str(out)]) == 0
    md = out.read_text()
    assert "| T | fallback | unfused_eager | roofline |" in md
    for tokens in bench.CPU_QUICK_TOKENS:
        assert re.search(rf"\n\| {tokens} \| [0-9.]+ \([0-9.]+–[0-9.]+\) \| ", md), tokens
    assert "| target | status |" in md and "T=1024" in md
    assert "PASS" in md
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert report.main(["--text", str(path)]) == 0
    assert "Correctness check: PASS" in text.getvalue()


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("bench-*.json")))
def test_report_reads_the_committed_results(name, tmp_path):
    # schema-1 files (no spread) still load and render, in µs
    md = tmp_path / "table.md"
    assert report.main([str(RESULTS / name), "-o", str(md)]) == 0
    text = md.read_text()
    assert "| T | fused | fallback |" in text and "µs" in text and " us" not in text
    plain = report.render_text(report.load(str(RESULTS / name)))
    assert "Correctness check: PASS" in plain and "minimax: 48 q heads" in plain


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
    assert "Errors:" in text and "other unfused_eager (T=64): rank 1: ValueError: injected on rank 1" in text
    assert results["check"] is None and "Correctness check: not run" in text


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
            assert row["graph_us_p20"] <= row["graph_us"] <= row["graph_us_p80"]
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
    # config.patch, not monkeypatch: Dynamo's config attributes live outside the module's
    # __dict__, so monkeypatch's undo would delete recompile_limit for every later compile
    limits = {k: 8 for k in ("recompile_limit", "cache_size_limit") if hasattr(torch._dynamo.config, k)}
    with torch._dynamo.config.patch(**limits):
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
    assert status["T=1"]["status"] == "met" and status["T=1"]["text"] == "met: 3.00 µs <= 3.4 µs"
    assert status["T=64"]["status"] == "not measured" and "boom" in status["T=64"]["text"]
    assert status["T=1024"]["status"] == "missed" and status["T=1024"]["text"].startswith("missed: 5.60 µs > 5.5 µs")
    assert status["T=8192"]["status"] == "met"
    assert status["T=8192"]["measured"] == pytest.approx(33.0 / 28.0)
    assert status["T=16384"]["status"] == "not measured"
    assert results["targets"]["met"] == 2 and results["targets"]["missed"] == 1
    assert status["host T=1 public functions"]["status"] == "not measured"
    assert results["targets"]["notes"] == []
    ratio = next(r for r in results["ratios"] if r["T"] == 1)
    assert ratio["baseline_over_fused"]["unfused_eager"] == pytest.approx(10.0)
    assert ratio["fused_over_roofline"] == pytest.approx(300.0)


def test_a_value_that_rounds_to_its_limit_prints_one_more_decimal():
    results = bench.finalize(_synthetic({64: 3.8004, 16384: 70.623}, {16384: 56.2835}))
    status = {t["name"]: t for t in results["targets"]["rows"]}
    assert status["T=64"]["text"] == "missed: 3.800 µs > 3.8 µs"
    assert status["T=16384"]["text"] == "missed: 1.255x roofline (70.6 µs) > 1.25x roofline"


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
    assert "| 1 | 3.00 | 30.0 | 0.01 | 300.00x | met (<= 3.4 µs) |" in md
    assert "| 8192 | 40.0 | - | 28.0 | 1.43x | missed (<= 1.25x roofline) |" in md
    assert "| 1 | 10.00x | 300.00x |" in md  # unfused_eager / fused, fused / roofline
    text = report.render_text(results)
    assert "missed: 1.43x roofline (40.0 µs) > 1.25x roofline" in text


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
    (["--methods", "fused,symm_mem_oneshot", "--cpu"], "on CPU ranks only fallback, unfused_eager, roofline"),
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
    err = capsys.readouterr().err
    assert "did not finish within the time limit (1 s" in err and "Traceback" not in err
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


def _events(view):
    view.handle("phase", "opening workspaces")
    view.handle("plan", {"total": 10.0, "methods": ["fallback"], "skipped": [], "paths": {}})
    for i in range(5):
        view.handle("step", {"text": f"step {i}", "units": 2.0})
    view.handle("done", None)


def test_progress_lines_without_a_terminal():
    from rich.console import Console

    stream = io.StringIO()
    with cli.ProgressView(Console(file=stream, width=120), enabled=True) as view:
        _events(view)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6 and lines[0].endswith("opening workspaces (ETA -:--)")
    shares = [int(re.search(r"\] +(\d+)% step", line).group(1)) for line in lines[1:]]
    assert shares == [0, 20, 40, 60, 80]  # each step's units are done when the next one starts
    assert all(re.search(r"\(ETA [-0-9:]+\)$", line) for line in lines)
    quiet = io.StringIO()
    with cli.ProgressView(Console(file=quiet), enabled=False) as view:
        _events(view)
    assert quiet.getvalue() == ""


def test_progress_bar_on_a_terminal():
    from rich.console import Console

    stream = io.StringIO()
    console = Console(file=stream, width=120, force_terminal=True, color_system=None)
    with cli.ProgressView(console, enabled=True, expected=["fused", "fallback"]) as view:
        assert view.live
        view.handle("phase", "opening workspaces")
        view.handle("plan", {"total": 4.0, "methods": ["fallback"], "paths": {},
                             "skipped": [{"method": "fused", "reason": "the library chose the fallback path: x"}]})
        view.handle("step", {"text": "minimax T=1 fallback", "units": 4.0})
        view.handle("done", None)
    text = stream.getvalue()
    assert "fused is not measured after all: the library chose the fallback path: x" in text
    assert "100%" in text and "ETA" in text and "━" in text  # rich's bar, completed
    assert "(ETA" not in text  # no log lines on a terminal


# ----------------------------------------------------------------------------- version, paths, Ctrl-C
def test_version(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"allreduce-rms {bench.package_version()} (torch {__import__('torch').__version__})"
    assert re.match(r"\d+\.\d+", bench.package_version())


@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if the CLI starts any rank."""
    def refuse(*args, **kwargs):
        raise AssertionError("the ranks were started")

    monkeypatch.setattr(cli, "run_ranks", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--json", "{tmp}/missing/r.json"], "--json {tmp}/missing/r.json: the folder {tmp}/missing does not exist"),
    (["--plot", "{tmp}/missing/r.png"], "--plot {tmp}/missing/r.png: the folder {tmp}/missing does not exist"),
    (["--json", "{tmp}"], "--json {tmp}: is a folder"),
    (["--json", "/proc/allreduce-rms.json"], "--json /proc/allreduce-rms.json: cannot write in the folder /proc"),
    (["--json", "{tmp}/r.json", "--plot", "{tmp}/r.json"], "--json and --plot name the same file"),
])
def test_output_paths_are_checked_before_the_run(argv, message, tmp_path, capsys, no_run):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(["--cpu", "--quick"] + argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("allreduce-rms: error:")]
    assert len(lines) == 1 and message.format(tmp=tmp_path) in lines[0], err
    assert "Traceback" not in err


def test_plot_without_matplotlib_exits_2_before_the_run(monkeypatch, tmp_path, capsys, no_run):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert cli.main(["--cpu", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"allreduce-rms: error: --plot {tmp_path}/r.png: the plot needs matplotlib, which is not "
                   'installed: pip install "allreduce-rms[plot]"')
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed (the plot extra)")
def test_plot_needs_an_image_file_name(tmp_path, capsys, no_run):
    assert cli.main(["--cpu", "--plot", str(tmp_path / "results.txt")]) == 2
    assert "cannot tell the image type" in capsys.readouterr().err


def test_ctrl_c_gives_one_line_and_status_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_ranks", interrupted)
    assert cli.main(["--cpu", "--quick", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "allreduce-rms: interrupted (Ctrl-C); every rank stopped."
    assert "Traceback" not in err


def _package_env():
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    import allreduce_rms

    if os.path.abspath(allreduce_rms.__file__).startswith(os.path.abspath(src)):
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _processes_with(marker):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the ranks")
def test_ctrl_c_at_a_terminal_stops_every_rank(tmp_path):
    # As a terminal does it: SIGINT to the whole process group, while the ranks are working.
    import signal
    import uuid

    marker = f"ALLREDUCE_RMS_TEST_MARK={uuid.uuid4().hex}"
    env = _package_env()
    env[marker.split("=")[0]] = marker.split("=")[1]
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "wb") as err:
        # SIGINT back to its default in the child even when pytest was started with it ignored
        # (nohup, `&`): an ignored signal stays ignored across exec, and Python keeps it so
        proc = subprocess.Popen([sys.executable, "-m", "allreduce_rms", "--cpu", "--json", str(tmp_path / "r.json")],
                                stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while "check fallback" not in err_path.read_text(errors="replace"):  # the ranks are at work
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.2)
        ranks = [pid for pid in _processes_with(marker) if pid != proc.pid]
        assert len(ranks) >= 2, ranks
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = err_path.read_text()
    assert err.rstrip().splitlines()[-1] == "allreduce-rms: interrupted (Ctrl-C); every rank stopped."
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    time.sleep(1)
    assert _processes_with(marker) == []  # no rank left behind
    assert not (tmp_path / "r.json").exists()


# ----------------------------------------------------------------------------- methods listed
def test_only_methods_that_can_run_are_announced(monkeypatch):
    from allreduce_rms import _native

    cfg, _, notes = cli.resolve(_args(), gpus=0)
    runs, not_run = cli.expected_methods(cfg)
    assert runs == ["fallback", "unfused_eager", "roofline"]
    assert set(not_run) == {"fused", "unfused_compiled", "symm_mem_oneshot"}
    assert any("no GPU visible" in n for n in notes) and any("GPUs only" in n for n in notes)

    cfg, _, _ = cli.resolve(_args(), gpus=2)
    monkeypatch.setattr(_native, "load", lambda name: "libarms_cuda.so was not built (no CUDA toolchain at build time)")
    monkeypatch.setattr(cli, "_symm_mem_problem", lambda: "this torch has no symmetric-memory one-shot all-reduce")
    runs, not_run = cli.expected_methods(cfg)
    assert runs == ["fallback", "unfused_eager", "unfused_compiled", "roofline"]
    assert not_run["fused"].startswith("no GPU backend: libarms_cuda.so was not built")
    monkeypatch.setattr(_native, "load", lambda name: None)
    monkeypatch.setattr(cli, "_symm_mem_problem", lambda: None)
    assert cli.expected_methods(cfg)[0] == list(bench.METHODS)


# ----------------------------------------------------------------------------- torchrun
def _torchrun_env(monkeypatch, world=1, rank=0):
    values = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(launch.free_port())}
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def test_under_torchrun_this_process_is_a_rank(monkeypatch, tmp_path, capsys, no_run):
    # a one-rank torchrun job, in this process: env:// rendezvous, no spawned ranks
    import torch.distributed as dist

    _torchrun_env(monkeypatch)
    path = tmp_path / "r.json"
    assert cli.main(["--cpu", "--tokens", "1,8", "--shape", "other", "--no-check", "--json", str(path)]) == 0
    assert not dist.is_initialized()  # left the group
    captured = capsys.readouterr()
    assert "torchrun job of 1 ranks (gloo), this is rank 0" in captured.err
    results = json.loads(path.read_text())
    assert results["launcher"] == "torchrun" and results["tp"] == 1 and results["backend"] == "gloo"
    assert {(r["T"], r["method"]) for r in results["rows"]} == {(t, m) for t in (1, 8)
                                                                for m in ("fallback", "unfused_eager", "roofline")}
    assert "other: 32 q heads" in captured.out


@pytest.mark.parametrize("world, extra, message", [
    (3, [], "the torchrun job has 3 ranks; the TP size must divide 8 kv heads"),
    (2, ["--world-size", "4"], "--world-size 4: this torchrun job has 2 ranks"),
])
def test_torchrun_job_of_the_wrong_size_exits_2_before_any_rendezvous(world, extra, message, monkeypatch, capsys):
    _torchrun_env(monkeypatch, world=world)
    assert cli.main(["--cpu"] + extra) == 2  # no rendezvous: it would wait for ranks that never come
    assert message in capsys.readouterr().err


def test_a_partial_torchrun_environment_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["--cpu"]) == 2
    assert "RANK set but not" in capsys.readouterr().err


def test_torchrun_runs_the_main_job_on_two_cpu_ranks(tmp_path):
    path = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "allreduce_rms", "--cpu", "--tokens", "1,64", "--shape", "other", "--no-check",
                           "--json", str(path)], capture_output=True, text=True, env=_package_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(path.read_text())
    assert results["launcher"] == "torchrun" and results["tp"] == 2 and results["hosts"] == 1
    assert all(r["error"] is None for r in results["rows"])
    assert proc.stdout.count("other: 32 q heads") == 1  # rank 0 alone reports


# ----------------------------------------------------------------------------- tensor collectives
def _no_object_collectives_worker(rank, world):
    """bench's own collectives with every object collective of torch.distributed broken (they need
    numpy at run time): texts, agreement on errors and a whole timing pass still work."""
    import torch
    import torch.distributed as dist

    def broken(*args, **kwargs):
        raise RuntimeError("object collective used")

    for name in ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list"):
        setattr(dist, name, broken)
    cfg = bench.BenchConfig(device="cpu", tokens=(1, 8), shapes=("other",), iters=2, eager_calls=2, eager_iters=3,
                            warmup=1, check=False, progress=False)
    ctx = bench._Rank(rank, world, torch.device("cpu"), cfg, None)
    texts = ctx.gather_text(f"rank {rank} says µ")
    none = ctx.agree_error(None)
    one = ctx.agree_error("ValueError: only rank 1" if rank == 1 else None)
    both = ctx.agree_error(f"E{rank}")
    rows = bench.run_benchmark(ctx, {}, ["unfused_eager", "roofline"], 5.0)
    return texts, none, one, both, [(r["method"], r["error"], r["eager_us"] is not None) for r in rows]


def test_bench_collectives_use_tensors_only():
    for texts, none, one, both, rows in run_ranks(_no_object_collectives_worker, 2, timeout=120):
        assert texts == ["rank 0 says µ", "rank 1 says µ"]
        assert none is None and one == "rank 1: ValueError: only rank 1" and both == "E0"
        assert rows == [("unfused_eager", None, True), ("roofline", None, True)] * 2


def test_percentiles_match_linear_interpolation():
    assert bench.percentile([5, 1, 4, 2, 3], 20) == pytest.approx(1.8)
    assert bench.percentile([5, 1, 4, 2, 3], 80) == pytest.approx(4.2)
    assert bench.percentile([7.0], 80) == 7.0
    assert bench.summarize([1, 2, 3, 4, 5], "eager_us") == pytest.approx(
        {"eager_us": 3.0, "eager_us_p20": 1.8, "eager_us_p80": 4.2})
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_host_targets_take_the_worst_call_and_the_table_shows_ratios():
    rows = []
    for tokens in (1, 1024):
        for method, call, us in (("eager_floor", "x.add_(0)", 10.0), ("fused", "qk_norm", 14.0),
                                 ("fused", "qk_norm in place", 16.0), ("fused_custom_op", "qk_norm", 19.0)):
            rows.append({"T": tokens, "method": method, "call": call, "host_us": us, "host_us_p20": us,
                         "host_us_p80": us, "ratio_to_floor": us / 10.0})
    results = bench.finalize(dict(_synthetic({1: 3.0}, {}), host=rows, host_skipped=None))
    status = {t["name"]: t for t in results["targets"]["rows"]}
    public = status["host T=1 public functions"]
    assert public["status"] == "missed" and public["worst_call"] == "qk_norm in place"
    assert public["measured"] == pytest.approx(1.6) and public["text"].startswith("missed: 1.60x floor (> 1.5x")
    custom = status["host T=1024 torch.ops custom ops"]
    assert custom["status"] == "met" and custom["measured"] == pytest.approx(1.9)
    headers, table = report.host_table(results)
    assert headers[:2] == ["T", "x.add_(0)"] and "qk_norm in place (public)" in headers
    assert [line[0] for line in table] == ["1", "1024"]
    assert "(1.60x)" in table[0][headers.index("qk_norm in place (public)")]
    assert "host time per call" in report.render_markdown([results])


def test_variant_rows_table_shows_times_and_ratios():
    rows = [{"shape": "mamba2_gated", "T": t, "method": m, "graph_us": us, "eager_us": us, "host_us": 1.0,
             "error": None} for t, m, us in ((1, "fused", 5.0), (1, "fallback", 10.0), (1, "unfused_eager", 40.0),
                                             (64, "fused", 6.0), (64, "fallback", 9.0), (64, "unfused_eager", 30.0))]
    results = bench.finalize(dict(_synthetic({1: 3.0}, {}), variant_rows=rows, variant_shape="Mamba2 gated"))
    headers, table = report.variant_table(results)
    assert headers == ["T", "fused", "fallback", "unfused_eager", "fallback/fused", "unfused_eager/fused"]
    assert table[0][0] == "1" and table[0][-2:] == ["2.00x", "8.00x"] and table[1][-1] == "5.00x"
    assert "Mamba2 gated" in report.render_markdown([results]) and "Mamba2 gated" in report.render_text(results)
