"""``pinn-balance report``: the table and plots of finished ``run`` / ``demo`` results (``results.json`` files)."""

from __future__ import annotations

import json
import os
import sys

from .plots import plot_comparison, plot_curves
from .runner import UsageError, _slug

__all__ = ["find_results", "report", "report_rows", "report_table"]


def find_results(dirs) -> list:
    found = []
    for d in dirs:
        direct = os.path.join(d, "results.json")
        if os.path.isfile(direct):
            found.append(direct)
        elif os.path.isdir(d):
            nested = sorted(os.path.join(d, s, "results.json") for s in os.listdir(d)
                            if os.path.isfile(os.path.join(d, s, "results.json")))
            if not nested:
                raise UsageError(f"pinn-balance report: error: no results.json in {d!r} or its subfolders")
            found.extend(nested)
        else:
            raise UsageError(f"pinn-balance report: error: {d!r} is not a folder")
    summaries = []
    for path in found:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"pinn-balance report: error: cannot read {path}: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict) or not isinstance(data.get("methods"), dict):
            continue  # not a `run` result (a `table`'s): skipped
        summaries.append((path, data))
    if not summaries:
        raise UsageError("pinn-balance report: error: none of the results.json files comes from `pinn-balance run` "
                         "or `demo`")
    return summaries


def report_rows(summaries) -> list:
    """One row per (run, method): problem, method, seeds, iterations, mean, std, published, error name, path."""
    rows = []
    for path, data in summaries:
        for label, m in data["methods"].items():
            rows.append({"problem": data.get("problem_name", data.get("problem")), "method": label,
                         "seeds": len(m.get("errors", [])), "iters": data.get("iters"),
                         "mean": m.get("error_mean"), "std": m.get("error_std"), "published": m.get("published"),
                         "error_name": data.get("error_name", "relative $L_2$ error"), "path": path})
    return rows


def report_table(rows) -> str:
    """A markdown table of :func:`report_rows`."""
    lines = ["| problem | method | seeds | iterations | error (mean ± std) | published | metric | run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pub = "–" if r["published"] is None else f"{r['published']:.2e}"
        metric = "rel. L2" if "L_2" in r["error_name"] else r["error_name"].split("$")[0].strip()
        lines.append(f"| {r['problem']} | {r['method']} | {r['seeds']} | {r['iters']} | "
                     f"{r['mean']:.2e} ± {r['std']:.1e} | {pub} | {metric} | {os.path.dirname(r['path'])} |")
    return "\n".join(lines)


def report(summaries, out: str = os.path.join("runs", "report"), dpi: int = 80) -> int:
    """Print the table; write ``report.md``, ``comparison.png`` and, per run, ``curves_<run folder>.png`` (test
    error and loss weights against iterations, every method of the run) into ``out``; returns 0."""
    rows = report_rows(summaries)
    table = report_table(rows)
    print(table)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("# Benchmark results\n\n" + table + "\n")
    print(f"\nwrote {path}")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: plot skipped", file=sys.stderr)
        return 0
    print(f"wrote {plot_comparison(Figure, rows, os.path.join(out, 'comparison.png'), dpi=dpi)}")
    for path, data in summaries:
        name = _slug(os.path.basename(os.path.dirname(os.path.abspath(path))))
        print(f"wrote {plot_curves(Figure, data, os.path.join(out, f'curves_{name}.png'), dpi=dpi)}")
    return 0
