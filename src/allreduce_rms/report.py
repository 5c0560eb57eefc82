"""Render benchmark results (the JSON that ``python -m allreduce_rms --json`` writes).

    python -m allreduce_rms.report results/*.json            # markdown, for README.md
    python -m allreduce_rms.report --text r.json             # the CLI's plain-text table

Per shape, one table: T rows, one column per method in microseconds per call (CUDA-graph
replay on GPUs, eager wall-clock on CPU), fused / roofline, and the DESIGN.md target status.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Sequence

from .bench import BASELINES, METHODS, SHAPES, TARGETS, compute_ratios, evaluate_targets


def load(path: str) -> Dict[str, Any]:
    """Read one results file; add ratios/targets when an older file lacks them."""
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    if not isinstance(results, dict) or "rows" not in results:
        raise ValueError(f"{path}: not an allreduce-rms results file (no 'rows')")
    results.setdefault("ratios", compute_ratios(results))
    results.setdefault("targets", evaluate_targets(results))
    return results


# ----------------------------------------------------------------------------- cells
def fmt_us(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}"
    if value < 1000:
        return f"{value:.1f}"
    return f"{value:.0f}"


def fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _rows_for(results: Dict[str, Any], shape: str) -> Dict[tuple, Dict[str, Any]]:
    return {(r["T"], r["method"]): r for r in results.get("rows", []) if r["shape"] == shape}


def _tokens(results: Dict[str, Any], shape: str) -> List[int]:
    seen: List[int] = []
    for row in results.get("rows", []):
        if row["shape"] == shape and row["T"] not in seen:
            seen.append(row["T"])
    return seen


def _shapes(results: Dict[str, Any]) -> List[str]:
    seen: List[str] = []
    for row in results.get("rows", []):
        if row["shape"] not in seen:
            seen.append(row["shape"])
    return seen


def _methods(results: Dict[str, Any]) -> List[str]:
    """Methods that have rows, in the run's order (then any others the rows name)."""
    present = []
    for row in results.get("rows", []):
        if row["method"] not in present:
            present.append(row["method"])
    order = [m for m in results.get("methods") or [] if m in present]
    return order + [m for m in present if m not in order]


def _cell(row: Optional[Dict[str, Any]], key: str) -> str:
    if row is None:
        return "-"
    if row.get("error"):
        return "error"
    return fmt_us(row.get(key))


def _target_status(results: Dict[str, Any], shape: str, tokens: int) -> str:
    """Short status of the CUDA-graph target at this T ("" where there is none)."""
    targets = results.get("targets") or {}
    if shape != targets.get("setup", {}).get("shape"):
        return ""
    for entry in targets.get("rows", []):
        if entry["T"] != tokens or entry.get("kind") == "host":
            continue
        limit = f"<= {entry['limit']:g} us" if entry["unit"] == "us" else f"<= {entry['limit']:g}x roofline"
        return f"{entry['status']} ({limit})"
    return ""


def shape_table(results: Dict[str, Any], shape: str, key: Optional[str] = None) -> tuple:
    """(headers, rows) of one shape: T, methods (us), fused/roofline, target."""
    key = key or ("graph_us" if results.get("timing") == "graph" else "eager_us")
    methods = _methods(results)
    by = _rows_for(results, shape)
    ratios = {(e["shape"], e["T"]): e for e in results.get("ratios", [])}
    show_ratio = "fused" in methods and "roofline" in methods
    show_target = shape == "minimax" and key == "graph_us"
    headers = ["T"] + methods + (["fused/roofline"] if show_ratio else []) + (["target"] if show_target else [])
    rows = []
    for tokens in _tokens(results, shape):
        line = [str(tokens)] + [_cell(by.get((tokens, m)), key) for m in methods]
        if show_ratio:
            line.append(fmt_ratio(ratios.get((shape, tokens), {}).get("fused_over_roofline")))
        if show_target:
            line.append(_target_status(results, shape, tokens))
        rows.append(line)
    return headers, rows


def eager_table(results: Dict[str, Any], shape: str) -> tuple:
    """(headers, rows): eager wall us per call, with host enqueue us in parentheses."""
    methods = [m for m in _methods(results) if m != "roofline"]
    by = _rows_for(results, shape)
    rows = []
    for tokens in _tokens(results, shape):
        line = [str(tokens)]
        for m in methods:
            row = by.get((tokens, m))
            cell = _cell(row, "eager_us")
            if row is not None and not row.get("error") and row.get("host_us") is not None:
                cell += f" ({fmt_us(row['host_us'])})"
            line.append(cell)
        rows.append(line)
    return ["T"] + methods, rows


def speedup_table(results: Dict[str, Any], shape: str) -> Optional[tuple]:
    """(headers, rows): each baseline's time / fused time (> 1: fused is faster); None without fused."""
    entries = [e for e in results.get("ratios", []) if e["shape"] == shape and e.get("fused_us")]
    if not entries:
        return None
    methods = [m for m in BASELINES if any(m in e["baseline_over_fused"] for e in entries)]
    if not methods:
        return None
    headers = ["T"] + [f"{m}/fused" for m in methods] + ["fused/roofline"]
    rows = [[str(e["T"])] + [fmt_ratio(e["baseline_over_fused"].get(m)) for m in methods]
            + [fmt_ratio(e.get("fused_over_roofline"))] for e in entries]
    return headers, rows


def _errors(results: Dict[str, Any]) -> List[str]:
    """'shape method (T=1,8): message', one line per distinct message."""
    grouped: Dict[tuple, List[int]] = {}
    for row in results.get("rows", []):
        if row.get("error"):
            grouped.setdefault((row["shape"], row["method"], row["error"]), []).append(row["T"])
    return [f"{shape} {method} (T={','.join(map(str, ts))}): {err}" for (shape, method, err), ts in grouped.items()]


# ----------------------------------------------------------------------------- layout
def _text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    """Aligned columns: numbers right-justified, the free-text 'target' column left-justified."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    left = {i for i, h in enumerate(headers) if h == "target"}

    def line(cells: Sequence[str]) -> str:
        return (indent + "  ".join(c.ljust(w) if i in left else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))).rstrip()

    return "\n".join([line(headers), indent + "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = ["---" if h == "target" else "---:" for h in headers]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _title(results: Dict[str, Any]) -> str:
    card = results.get("card", "?")
    tp = results.get("tp", "?")
    return (f"{card} x{tp} (TP{tp}), {results.get('dtype', '?')}, torch {results.get('torch', '?')}, "
            f"{results.get('backend', '?')}")


def _timing_words(results: Dict[str, Any]) -> str:
    if results.get("timing") == "graph":
        return "us per call, median of CUDA-graph replays of back-to-back calls"
    return "us per call, eager host wall-clock (no CUDA graphs on CPU)"


def _shape_words(results: Dict[str, Any], shape: str) -> str:
    info = results.get("shapes", {}).get(shape)
    if info:
        return (f"{shape}: {info['q_heads']} q heads, {info['kv_heads']} kv heads, head_dim {info['head_dim']}; "
                f"per rank q {info['q_size']}, k {info['kv_size']}")
    return f"{shape}: {SHAPES[shape].describe(results.get('tp', 1))}" if shape in SHAPES else shape


def check_lines(check: Optional[Dict[str, Any]]) -> List[str]:
    if not check:
        return ["correctness check: not run"]
    lines = [f"correctness check: qk_norm vs float64 reference, {check['metric'].split(' against')[0]}, "
             f"T in {','.join(map(str, check['tokens']))}, shapes {','.join(check['shapes'])}"]
    for e in check["results"]:
        err = "-" if e["max_rel_err"] is None else f"{e['max_rel_err']:.2e}"
        verdict = "PASS" if e["passed"] else "FAIL"
        extra = f"  ({e['error']})" if e.get("error") else (f"  worst at {e['worst_case']}" if e.get("worst_case") else "")
        lines.append(f"  {e['path']:<9} {e['dtype']:<5} max rel err {err:>9}  tol {e['tol']:.1e}  {verdict}{extra}")
    if not check["results"]:
        lines.append("  no path could be checked")
    lines.append(f"  overall: {'PASS' if check['passed'] else 'FAIL'}")
    return lines


def target_lines(targets: Dict[str, Any]) -> List[str]:
    setup = targets.get("setup", {})
    lines = [f"targets (DESIGN.md; TP{setup.get('tp')} {setup.get('shape')} {setup.get('dtype')}, fused path): "
             f"{targets.get('met', 0)} met, {targets.get('missed', 0)} missed"]
    for note in targets.get("notes", []):
        lines.append(f"  note: {note}")
    rows = targets.get("rows", [])
    whys = {e.get("why") for e in rows}
    if rows and all(e["status"] == "not measured" for e in rows) and len(whys) == 1:
        names = ", ".join(e["name"] for e in rows)
        return lines + [f"  all not measured ({names}): {whys.pop()}"]
    for entry in rows:
        ref = entry.get("reference_kernel_us")
        ref_text = f"  [TRT-LLM kernel {ref:g} us]" if ref else ""
        lines.append(f"  {entry['name']:<20} {entry['text']}{ref_text}")
    return lines


# ----------------------------------------------------------------------------- renderers
def render_text(results: Dict[str, Any]) -> str:
    """The plain-text report the CLI prints to stdout."""
    out = [f"allreduce-rms benchmark: {_title(results)}",
           f"copy bandwidth: {results.get('copy_bandwidth_GBps', 0):.1f} GB/s (roofline = 2*T*(q+k)*bytes / that)"]
    for name, info in (results.get("paths") or {}).items():
        out.append(f"{name} workspace: {info.get('path') or 'unavailable'} ({info.get('reason')})")
    out.append("")
    out += check_lines(results.get("check"))
    for skip in results.get("skipped", []):
        out.append(f"skipped {skip['method']}: {skip['reason']}")
    for shape in _shapes(results):
        out += ["", f"{_shape_words(results, shape)}  [{_timing_words(results)}]"]
        out.append(_text_table(*shape_table(results, shape)))
        if results.get("timing") == "graph":
            out += ["", "  eager: us per call (host enqueue us per call)"]
            out.append(_text_table(*eager_table(results, shape)))
        speed = speedup_table(results, shape)
        if speed:
            out += ["", "  ratios: baseline time / fused time (> 1: fused is faster)"]
            out.append(_text_table(*speed))
    errors = _errors(results)
    if errors:
        out += ["", "errors:"] + [f"  {e}" for e in errors]
    out += [""] + target_lines(results.get("targets") or evaluate_targets(results))
    return "\n".join(out) + "\n"


def render_markdown(all_results: Sequence[Dict[str, Any]]) -> str:
    """Markdown for README.md: one section per results file, one table per shape."""
    out: List[str] = []
    for results in all_results:
        out += [f"### {_title(results)}", ""]
        out.append(f"Copy bandwidth {results.get('copy_bandwidth_GBps', 0):.0f} GB/s; {_timing_words(results)}.")
        check = results.get("check")
        if check:
            parts = [f"{e['path']} {e['dtype']} {'-' if e['max_rel_err'] is None else format(e['max_rel_err'], '.1e')}"
                     f" {'PASS' if e['passed'] else 'FAIL'}" for e in check["results"]]
            out.append(f"Correctness (max relative error vs float64): {'; '.join(parts) or 'not run'}.")
        for skip in results.get("skipped", []):
            out.append(f"Skipped `{skip['method']}`: {skip['reason']}.")
        for shape in _shapes(results):
            out += ["", f"**{_shape_words(results, shape)}**", "", _md_table(*shape_table(results, shape))]
            speed = speedup_table(results, shape)
            if speed:
                out += ["", "Baseline time / fused time (> 1: fused is faster):", "", _md_table(*speed)]
        errors = _errors(results)
        if errors:
            out += ["", "Errors:", ""] + [f"- {e}" for e in errors]
        targets = results.get("targets") or evaluate_targets(results)
        out += ["", "| target | status | TRT-LLM kernel |", "|---|---|---:|"]
        for entry in targets.get("rows", []):
            ref = entry.get("reference_kernel_us")
            out.append(f"| {entry['name']} | {entry['text']} | {f'{ref:g} us' if ref else '-'} |")
        for note in targets.get("notes", []):
            out += ["", f"Note: {note}."]
        out.append("")
    return "\n".join(out)


def plot(results: Dict[str, Any], path: str) -> Optional[str]:
    """Write a PNG of latency vs T per method (log-log, roofline dashed); None when written,
    else the reason it was skipped (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipping the plot (pip install 'allreduce-rms[plot]')"
    key = "graph_us" if results.get("timing") == "graph" else "eager_us"
    shapes = _shapes(results) or ["minimax"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        by = _rows_for(results, shape)
        for method in _methods(results):
            points = sorted((t, r[key]) for (t, m), r in by.items()
                            if m == method and not r.get("error") and r.get(key) and r[key] > 0)
            if not points:
                continue
            xs, ys = zip(*points)
            if method == "roofline":
                ax.plot(xs, ys, linestyle="--", color="black", label="roofline (copy bandwidth)")
            else:  # one color per method in every panel
                color = f"C{METHODS.index(method)}" if method in METHODS else None
                ax.plot(xs, ys, marker="o", markersize=3, color=color, label=method)
        limits = [(t["T"], t["limit_us"]) for t in TARGETS if "limit_us" in t]
        if shape == "minimax" and key == "graph_us" and any((t, "fused") in by for t, _ in limits):
            ax.plot(*zip(*limits), marker="v", color="red", linestyle="none", label="DESIGN.md target")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("us per call" + (" (CUDA graph)" if key == "graph_us" else " (eager)"))
        ax.set_title(_shape_words(results, shape), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(results), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m allreduce_rms.report",
                                     description="Render allreduce-rms benchmark results as markdown (or text).")
    parser.add_argument("files", nargs="+", help="results JSON files written by `python -m allreduce_rms --json`")
    parser.add_argument("--text", action="store_true", help="plain text, as the CLI prints it, instead of markdown")
    parser.add_argument("-o", "--output", help="write here instead of stdout")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        all_results = [load(path) for path in args.files]
    except (OSError, ValueError) as exc:
        print(f"allreduce_rms.report: {exc}", file=sys.stderr)
        return 2
    text = "".join(render_text(r) for r in all_results) if args.text else render_markdown(all_results)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
