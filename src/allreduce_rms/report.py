"""Render benchmark results (the JSON that ``python -m allreduce_rms --json`` writes).

    python -m allreduce_rms.report results/*.json            # markdown, for README.md
    python -m allreduce_rms.report --text r.json             # the CLI's tables (rich), as text

Per shape, one table: T rows, one column per method in microseconds (µs) per call (CUDA-graph
replay on GPUs, eager wall-clock on CPU), each median with its p20-p80 spread where the file
has it (schema 2), fused / roofline, and the status of the performance targets. Terminal tables are drawn
by rich; the markdown is for README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from .bench import BASELINES, METHODS, SHAPES, TARGETS, compute_ratios, describe_target, evaluate_targets

US = "µs"
DASH = "–"  # between p20 and p80


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


def fmt_spread(row: Optional[Dict[str, Any]], key: str) -> str:
    """'p20–p80' of one timing ('' where the row has no percentiles: a schema-1 file, a bound)."""
    if row is None or row.get("error"):
        return ""
    low, high = row.get(f"{key}_p20"), row.get(f"{key}_p80")
    if low is None or high is None:
        return ""
    return f"{fmt_us(low)}{DASH}{fmt_us(high)}"


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


def _cell(row: Optional[Dict[str, Any]], key: str, spread: bool = False) -> str:
    """The median; with `spread`, followed by ' (p20–p80)' where the row has them."""
    if row is None:
        return "-"
    if row.get("error"):
        return "error"
    text = fmt_us(row.get(key))
    extra = fmt_spread(row, key) if spread else ""
    return f"{text} ({extra})" if extra else text


def _target_status(results: Dict[str, Any], shape: str, tokens: int) -> str:
    """Short status of the CUDA-graph target at this T ("" where there is none)."""
    targets = results.get("targets") or {}
    if shape != targets.get("setup", {}).get("shape"):
        return ""
    for entry in targets.get("rows", []):
        if entry["T"] != tokens or entry.get("kind") == "host":
            continue
        limit = f"<= {entry['limit']:g} {US}" if entry["unit"] == "us" else f"<= {entry['limit']:g}x roofline"
        return f"{entry['status']} ({limit})"
    return ""


def shape_table(results: Dict[str, Any], shape: str, key: Optional[str] = None, spread: bool = True) -> tuple:
    """(headers, rows) of one shape: T, methods (µs; 'median (p20–p80)' with `spread`),
    fused/roofline, target."""
    key = key or ("graph_us" if results.get("timing") == "graph" else "eager_us")
    methods = _methods(results)
    by = _rows_for(results, shape)
    ratios = {(e["shape"], e["T"]): e for e in results.get("ratios", [])}
    show_ratio = "fused" in methods and "roofline" in methods
    show_target = shape == "minimax" and key == "graph_us"
    headers = ["T"] + methods + (["fused/roofline"] if show_ratio else []) + (["target"] if show_target else [])
    rows = []
    for tokens in _tokens(results, shape):
        line = [str(tokens)] + [_cell(by.get((tokens, m)), key, spread) for m in methods]
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
def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = ["---" if h == "target" else "---:" for h in headers]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _title(results: Dict[str, Any]) -> str:
    card = results.get("card", "?")
    tp = results.get("tp", "?")
    hosts = results.get("hosts")
    where = f" on {hosts} hosts" if hosts and hosts > 1 else ""
    return (f"{card} x{tp} (TP{tp}{where}), {results.get('dtype', '?')}, torch {results.get('torch', '?')}, "
            f"{results.get('backend', '?')}")


def _has_spread(results: Dict[str, Any]) -> bool:
    return any(r.get("eager_us_p20") is not None or r.get("graph_us_p20") is not None
               for r in results.get("rows", []))


def _timing_words(results: Dict[str, Any]) -> str:
    spread = f" (p20{DASH}p80 spread under it)" if _has_spread(results) else ""
    if results.get("timing") == "graph":
        return f"{US} per call, median of CUDA-graph replays of back-to-back calls{spread}"
    return f"{US} per call, median of eager wall-clock samples{spread}; no CUDA graphs on CPU"


def _shape_words(results: Dict[str, Any], shape: str) -> str:
    info = results.get("shapes", {}).get(shape)
    if info:
        return (f"{shape}: {info['q_heads']} q heads, {info['kv_heads']} kv heads, head_dim {info['head_dim']}; "
                f"per rank q {info['q_size']}, k {info['kv_size']}")
    return f"{shape}: {SHAPES[shape].describe(results.get('tp', 1))}" if shape in SHAPES else shape


def _target_text(entry: Dict[str, Any]) -> str:
    try:  # re-worded from the entry's fields, so older files read like new ones
        return describe_target(entry)
    except (KeyError, TypeError):
        return str(entry.get("text", ""))


# ----------------------------------------------------------------------------- terminal (rich)
def _rich_table(headers: Sequence[str]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold", pad_edge=False)
    for h in headers:
        left = h in ("target", "status", "path", "dtype", "result", "worst case", "method", "why")
        table.add_column(h, justify="left" if left else "right", no_wrap=not left)
    return table


def _timing_cell(row: Optional[Dict[str, Any]], key: str, extra: str = "") -> Any:
    """A table cell: the median, and under it the p20–p80 spread (dim) and `extra`."""
    from rich.text import Text

    text = Text(_cell(row, key), style="red" if row is not None and row.get("error") else "")
    below = " ".join(x for x in (fmt_spread(row, key), extra) if x)
    if below:
        text.append("\n" + below, style="dim")
    return text


def host_table(results: Dict[str, Any]) -> Optional[tuple]:
    """(headers, rows): eager host us per call and its ratio to x.add_(0), per T and call; None
    when the run has no host rows (allreduce_rms.host_bench)."""
    rows = results.get("host")
    if not rows:
        return None
    columns = [(r["method"], r["call"]) for r in rows if r["T"] == rows[0]["T"] and r["method"] != "eager_floor"]
    headers = ["T", "x.add_(0)"] + [f"{call} ({'custom op' if method == 'fused_custom_op' else 'public'})"
                                    for method, call in columns]
    table = []
    for tokens in sorted({r["T"] for r in rows}):
        mine = {(r["method"], r["call"]): r for r in rows if r["T"] == tokens}
        floor = next((r for r in mine.values() if r["method"] == "eager_floor"), None)
        line = [str(tokens), fmt_us(floor["host_us"]) if floor else "-"]
        for column in columns:
            r = mine.get(column)
            line.append(f"{fmt_us(r['host_us'])} ({fmt_ratio(r['ratio_to_floor'])})" if r else "-")
        table.append(line)
    return headers, table


def variant_table(results: Dict[str, Any]) -> Optional[tuple]:
    """(headers, rows): the variant rows' CUDA-graph us per call by T and method, and the
    baselines over fused; None without variant rows (allreduce_rms.variant_bench)."""
    rows = [r for r in results.get("variant_rows") or []]
    if not rows:
        return None
    methods = list(dict.fromkeys(r["method"] for r in rows))
    key = "graph_us" if results.get("timing") == "graph" else "eager_us"
    baselines = [m for m in methods if m != "fused"]
    headers = ["T"] + methods + [f"{m}/fused" for m in baselines if "fused" in methods]
    table = []
    for tokens in sorted({r["T"] for r in rows}):
        mine = {r["method"]: r for r in rows if r["T"] == tokens}
        line = [str(tokens)] + [_cell(mine.get(m), key) for m in methods]
        fused = mine.get("fused", {}).get(key)
        for m in baselines:
            if "fused" in methods:
                value = mine.get(m, {}).get(key)
                line.append(fmt_ratio(value / fused) if value and fused else "-")
        table.append(line)
    return headers, table


def _host_renderables(results: Dict[str, Any]) -> List[Any]:
    from rich.text import Text

    table = host_table(results)
    if table is None:
        return []
    headers, rows = table
    out = [Text(f"Eager host time per call, fused path, {US} (ratio to x.add_(0) in the same run)", style="bold")]
    rich = _rich_table(headers)
    for line in rows:
        rich.add_row(*line)
    return out + [rich, Text("")]


def _variant_renderables(results: Dict[str, Any]) -> List[Any]:
    from rich.text import Text

    table = variant_table(results)
    if table is None:
        return []
    headers, rows = table
    rich = _rich_table(headers)
    for line in rows:
        rich.add_row(*line)
    return [Text(f"{results.get('variant_shape')}: {_timing_words(results)}", style="bold"), rich,
            Text("")]


def _shape_renderables(results: Dict[str, Any], shape: str) -> List[Any]:
    key = "graph_us" if results.get("timing") == "graph" else "eager_us"
    methods = _methods(results)
    by = _rows_for(results, shape)
    from rich.text import Text

    headers, plain = shape_table(results, shape, key, spread=False)
    table = _rich_table(headers)
    for tokens, line in zip(_tokens(results, shape), plain):
        cells: List[Any] = [line[0]]
        cells += [_timing_cell(by.get((tokens, m)), key) for m in methods]
        cells += line[1 + len(methods):]  # fused/roofline, target: plain text
        table.add_row(*cells)
    out: List[Any] = [Text(_shape_words(results, shape), style="bold"), Text(_timing_words(results)), table]
    if results.get("timing") == "graph":
        eager_methods = [m for m in methods if m != "roofline"]
        out.append(Text(f"Eager: {US} per call (p20{DASH}p80 under it), and the host time to enqueue one call"))
        eager = _rich_table(["T"] + eager_methods)
        for tokens in _tokens(results, shape):
            cells = [str(tokens)]
            for m in eager_methods:
                row = by.get((tokens, m))
                host = row.get("host_us") if row is not None and not row.get("error") else None
                cells.append(_timing_cell(row, "eager_us", f"host {fmt_us(host)}" if host is not None else ""))
            eager.add_row(*cells)
        out.append(eager)
    speed = speedup_table(results, shape)
    if speed:
        out.append(Text("Baseline time / fused time (> 1: fused is faster; fused/roofline: > 1 is slower than the roofline)"))
        table = _rich_table(speed[0])
        for line in speed[1]:
            table.add_row(*line)
        out.append(table)
    return out


def _check_renderables(check: Optional[Dict[str, Any]]) -> List[Any]:
    from rich.text import Text

    if not check:
        return [Text("Correctness check: not run")]
    verdict = Text("PASS", style="bold green") if check["passed"] else Text("FAIL", style="bold red")
    title = Text.assemble("Correctness check: ", verdict,
                          f" (qk_norm vs float64, relative norm error, T in {','.join(map(str, check['tokens']))}, "
                          f"shapes {','.join(check['shapes'])})")
    table = _rich_table(["path", "dtype", "max rel err", "tolerance", "result", "worst case"])
    for e in check["results"]:
        err = "-" if e["max_rel_err"] is None else f"{e['max_rel_err']:.2e}"
        result = Text("PASS", style="green") if e["passed"] else Text("FAIL", style="bold red")
        table.add_row(e["path"], e["dtype"], err, f"{e['tol']:.1e}", result, e.get("error") or e.get("worst_case") or "")
    if not check["results"]:
        return [title, Text("  no path could be checked", style="red")]
    return [title, table]


def _target_renderables(targets: Dict[str, Any]) -> List[Any]:
    from rich.text import Text

    setup = targets.get("setup", {})
    out: List[Any] = [Text(f"Targets (the project's, for 2x H200; TP{setup.get('tp')} {setup.get('shape')} {setup.get('dtype')}, "
                           f"fused path): {targets.get('met', 0)} met, {targets.get('missed', 0)} missed", style="bold")]
    for note in targets.get("notes", []):
        out.append(Text(f"  note: {note}", style="dim"))
    rows = targets.get("rows", [])
    whys = {e.get("why") for e in rows}
    if rows and all(e["status"] == "not measured" for e in rows) and len(whys) == 1:
        names = ", ".join(e["name"] for e in rows)
        out.append(Text(f"  all not measured ({names}): {whys.pop()}"))
        return out
    table = _rich_table(["target", "status", "TRT-LLM kernel"])
    style = {"met": "green", "missed": "red"}
    for entry in rows:
        ref = entry.get("reference_kernel_us")
        table.add_row(entry["name"], Text(_target_text(entry), style=style.get(entry["status"], "")),
                      f"{ref:g} {US}" if ref else "-")
    out.append(table)
    return out


def renderables(results: Dict[str, Any]) -> List[Any]:
    """Everything the CLI prints for one results dict, as rich renderables, in order."""
    from rich.text import Text

    out: List[Any] = [Text(f"allreduce-rms benchmark: {_title(results)}", style="bold")]
    bw = results.get("copy_bandwidth_GBps", 0) or 0
    low, high = results.get("copy_bandwidth_GBps_p20"), results.get("copy_bandwidth_GBps_p80")
    spread = f" ({low:.1f}{DASH}{high:.1f})" if low is not None and high is not None else ""
    out.append(Text(f"Copy bandwidth {bw:.1f} GB/s{spread}; roofline = 2*T*(q+k)*bytes / that"))
    for name, info in (results.get("paths") or {}).items():
        out.append(Text(f"{name} workspace: {info.get('path') or 'unavailable'} ({info.get('reason')})"))
    out.append(Text(""))
    out += _check_renderables(results.get("check"))
    by_reason: Dict[str, List[str]] = {}
    for skip in results.get("skipped", []):
        by_reason.setdefault(skip["reason"], []).append(skip["method"])
    for reason, methods in by_reason.items():
        out.append(Text(f"Not measured: {', '.join(methods)}: {reason}"))
    for shape in _shapes(results):
        out.append(Text(""))
        out += _shape_renderables(results, shape)
    errors = _errors(results)
    if errors:
        out.append(Text("Errors:", style="bold red"))
        out += [Text(f"  {e}") for e in errors]
    out.append(Text(""))
    out += _host_renderables(results)
    out += _variant_renderables(results)
    out += _target_renderables(results.get("targets") or evaluate_targets(results))
    return out


def print_results(results: Dict[str, Any], console: Any) -> None:
    """Print :func:`renderables` on a rich Console."""
    for item in renderables(results):
        console.print(item)


def render_text(results: Dict[str, Any], width: int = 160) -> str:
    """The CLI's report as plain text (no colors), `width` columns at most."""
    import io

    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, highlight=False,
                      soft_wrap=True)
    print_results(results, console)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


# ----------------------------------------------------------------------------- renderers
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
                out += ["", "Baseline time / fused time (> 1: fused is faster; fused/roofline: > 1 is slower than "
                        "the roofline):", "", _md_table(*speed)]
        errors = _errors(results)
        if errors:
            out += ["", "Errors:", ""] + [f"- {e}" for e in errors]
        host = host_table(results)
        if host:
            out += ["", f"Eager host time per call, fused path, {US} (ratio to `x.add_(0)` in the same run):", "",
                    _md_table(*host)]
        variant = variant_table(results)
        if variant:
            out += ["", f"{results.get('variant_shape')}, {US} per call:", "", _md_table(*variant)]
        targets = results.get("targets") or evaluate_targets(results)
        out += ["", "| target | status | TRT-LLM kernel |", "|---|---|---:|"]
        for entry in targets.get("rows", []):
            ref = entry.get("reference_kernel_us")
            out.append(f"| {entry['name']} | {_target_text(entry)} | {f'{ref:g} {US}' if ref else '-'} |")
        for note in targets.get("notes", []):
            out += ["", f"Note: {note}."]
        out.append("")
    return "\n".join(out)


PLOT_INSTALL = 'pip install "allreduce-rms[plot]"'


def plot_problem(path: str) -> Optional[str]:
    """Why `path` cannot take the plot (None when it can): matplotlib missing, or a file type
    matplotlib does not write. Imports matplotlib (about a second)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        return f"the plot needs matplotlib, which is not installed: {PLOT_INSTALL}"
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    kinds = Figure().canvas.get_supported_filetypes()
    if ext not in kinds:
        return (f"cannot tell the image type from {path!r}: end the name with one of "
                f".{', .'.join(sorted(kinds))} (e.g. results.png)")
    return None


def plot(results: Dict[str, Any], path: str) -> Optional[str]:
    """Write a PNG of latency vs T per method (log-log; the p20–p80 spread shaded; roofline
    dashed); None when written, else the reason it was not (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed: no plot ({PLOT_INSTALL})"
    key = "graph_us" if results.get("timing") == "graph" else "eager_us"
    shapes = _shapes(results) or ["minimax"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        by = _rows_for(results, shape)
        for method in _methods(results):
            points = sorted((t, r[key], r.get(f"{key}_p20"), r.get(f"{key}_p80")) for (t, m), r in by.items()
                            if m == method and not r.get("error") and r.get(key) and r[key] > 0)
            if not points:
                continue
            xs, ys, lows, highs = zip(*points)
            if method == "roofline":
                ax.plot(xs, ys, linestyle="--", color="black", label="roofline (copy bandwidth)")
            else:  # one color per method in every panel
                color = f"C{METHODS.index(method)}" if method in METHODS else None
                ax.plot(xs, ys, marker="o", markersize=3, color=color, label=method)
                if all(v is not None for v in lows + highs):
                    ax.fill_between(xs, lows, highs, color=color, alpha=0.2, linewidth=0)
        limits = [(t["T"], t["limit_us"]) for t in TARGETS if "limit_us" in t]
        if shape == "minimax" and key == "graph_us" and any((t, "fused") in by for t, _ in limits):
            ax.plot(*zip(*limits), marker="v", color="red", linestyle="none", label="target")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel(f"{US} per call" + (" (CUDA graph)" if key == "graph_us" else " (eager)")
                      + (f", median and p20{DASH}p80" if _has_spread(results) else ""))
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
    if args.text and not args.output:
        from rich.console import Console

        console = Console(highlight=False, soft_wrap=True)
        if not console.is_terminal:
            console.width = 160
        for results in all_results:
            print_results(results, console)
        return 0
    text = "".join(render_text(r) for r in all_results) if args.text else render_markdown(all_results)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
